//! A kiosk's copy of what its fleet learnt: a set of operations that merges in any order, any
//! number of times, to the same examples (a state-based CRDT). Pure code and one log file; the
//! MQTT transport is `crate::fleet`'s, the wire layout [`super::wire`]'s.
//!
//! ```text
//! Add(eid, label, picture sha256, embedding)   an example; eid = sha256(origin, hlc, label, sha)[..16]
//! Delete(eid)                                  its tombstone: a deleted example never comes back
//! Forget(label) @ t                            hides every example whose label was set before t
//! Rename(from → to) @ t                        moves every example whose label was set before t;
//!                                              per `from`, the latest rename wins
//! ```
//!
//! Every operation carries a hybrid logical clock (`hlc`: Unix ms << 16 | counter, never behind
//! any clock it has seen) and its origin kiosk; `(hlc, origin)` orders any two. The examples a
//! kiosk holds are a pure function of the set of operations ([`Replica::view`]): an example's
//! label starts as its add's, follows the renames of that label newer than it (each step moves
//! the time forward, so chains end), and the example is hidden when its label was forgotten
//! later than that. Merging is set union, so delivery order and duplicates do not matter.
//!
//! The log (`fleet.log` in the data folder) holds every operation this kiosk knows, appended
//! and fsynced before it is published or applied: length, 4 bytes of sha256, the body. A record
//! a power cut left half written is cut off at the next start.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::wire::{self, Message};
use crate::store::StoreError;

/// An example's id in the fleet.
pub type Eid = [u8; 16];

/// When and where an operation was made; `(hlc, origin)` orders operations totally.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp {
    /// Hybrid logical clock: Unix ms << 16 | a counter.
    pub hlc: u64,
    /// The kiosk that made it.
    pub origin: String,
}

/// What an operation does.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// An example.
    Add {
        /// Its id.
        eid: Eid,
        /// Its class when added.
        label: String,
        /// Its frame's file name on the origin (for the object groups of cross-validation).
        file: String,
        /// sha256 of the picture.
        sha256: [u8; 32],
        /// The raw embedding.
        embedding: Vec<f32>,
    },
    /// An example deleted.
    Delete {
        /// Its id.
        eid: Eid,
    },
    /// A class forgotten.
    Forget {
        /// The class.
        label: String,
    },
    /// A class renamed.
    Rename {
        /// Old name.
        from: String,
        /// New name.
        to: String,
    },
}

/// One operation of a fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetOp {
    /// When and where.
    pub stamp: Stamp,
    /// The backbone its embedding was made with ([`wire::backbone_tag`]).
    pub backbone: [u8; 8],
    /// What it does.
    pub body: Body,
}

/// A label-level change a kiosk made (examples are compared, labels are not).
#[derive(Debug, Clone, PartialEq)]
pub enum Intent {
    /// FORGET label.
    Forget(String),
    /// A rename.
    Rename(String, String),
}

/// One example the kiosk holds, as [`Replica::absorb`] compares them.
#[derive(Debug, Clone, Copy)]
pub struct Held<'a> {
    /// Its class.
    pub label: &'a str,
    /// sha256 of its picture, hex.
    pub sha256: &'a str,
    /// Its frame's file name.
    pub file: &'a str,
    /// The raw embedding.
    pub embedding: &'a [f32],
}

/// An example of the fleet as the kiosk should hold it.
#[derive(Debug, Clone, Copy)]
pub struct Visible<'a> {
    /// Its id.
    pub eid: &'a Eid,
    /// Its class now.
    pub label: &'a str,
    /// sha256 of its picture.
    pub sha256: &'a [u8; 32],
    /// The frame's file name on its origin.
    pub file: &'a str,
    /// Who added it.
    pub origin: &'a str,
    /// Its embedding.
    pub embedding: &'a [f32],
}

/// The clock part of an hlc: Unix ms.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A kiosk's replica of its fleet's operations.
#[derive(Debug)]
pub struct Replica {
    me: String,
    backbone: [u8; 8],
    clock: u64,
    adds: HashMap<Eid, FleetOp>,
    deleted: HashMap<Eid, Stamp>,
    /// Every forget of each class, sorted.
    forgets: HashMap<String, Vec<Stamp>>,
    renames: HashMap<String, (Stamp, String)>,
    ops: usize,
    keep_embeddings: bool,
    log: Option<Log>,
}

impl Replica {
    /// An empty replica in memory for kiosk `me` (no log: the scale simulation's clients).
    pub fn in_memory(me: &str, backbone: [u8; 8], keep_embeddings: bool) -> Replica {
        Replica {
            me: me.to_string(),
            backbone,
            clock: 0,
            adds: HashMap::new(),
            deleted: HashMap::new(),
            forgets: HashMap::new(),
            renames: HashMap::new(),
            ops: 0,
            keep_embeddings,
            log: None,
        }
    }

    /// Opens (or starts) the replica logged at `path`: every record read back (a torn last
    /// record cut off), then appends go there.
    pub fn open(path: &Path, me: &str, backbone: [u8; 8]) -> Result<Replica, StoreError> {
        let mut r = Replica::in_memory(me, backbone, true);
        let (ops, log) = Log::open(path)?;
        for op in ops {
            r.merge(op);
        }
        r.log = Some(log);
        Ok(r)
    }

    /// This kiosk's id.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The backbone tag this replica accepts.
    pub fn backbone(&self) -> [u8; 8] {
        self.backbone
    }

    /// Operations known (tombstones and label operations included).
    pub fn len(&self) -> usize {
        self.ops
    }

    /// Whether it knows no operation.
    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    /// A new stamp from this kiosk, after every one it has seen.
    pub fn tick(&mut self) -> Stamp {
        let now = wall_ms() << 16;
        self.clock = if now > self.clock {
            now
        } else {
            self.clock + 1
        };
        Stamp {
            hlc: self.clock,
            origin: self.me.clone(),
        }
    }

    /// Merges one operation; true if it was new. Idempotent and commutative.
    pub fn merge(&mut self, mut op: FleetOp) -> bool {
        self.clock = self.clock.max(op.stamp.hlc);
        let new = match &mut op.body {
            Body::Add { eid, embedding, .. } => {
                if self.deleted.contains_key(eid) || self.adds.contains_key(eid) {
                    false
                } else {
                    if !self.keep_embeddings {
                        *embedding = Vec::new();
                    }
                    self.adds.insert(*eid, op);
                    true
                }
            }
            Body::Delete { eid } => {
                if self.deleted.contains_key(eid) {
                    false
                } else {
                    self.adds.remove(eid);
                    self.deleted.insert(*eid, op.stamp);
                    true
                }
            }
            Body::Forget { label } => {
                let stamps = self.forgets.entry(label.clone()).or_default();
                match stamps.binary_search(&op.stamp) {
                    Ok(_) => false,
                    Err(i) => {
                        stamps.insert(i, op.stamp);
                        true
                    }
                }
            }
            Body::Rename { from, to } => match self.renames.get(from) {
                Some((s, _)) if *s >= op.stamp => false,
                _ => {
                    self.renames
                        .insert(from.clone(), (op.stamp, std::mem::take(to)));
                    true
                }
            },
        };
        if new {
            self.ops += 1;
        }
        new
    }

    /// Merges operations from elsewhere and logs the new ones; returns them. Operations made
    /// with another backbone are not merged: they come back in the second list.
    pub fn merge_logged(
        &mut self,
        ops: Vec<FleetOp>,
    ) -> Result<(Vec<FleetOp>, Vec<FleetOp>), StoreError> {
        let (ours, other): (Vec<_>, Vec<_>) =
            ops.into_iter().partition(|o| o.backbone == self.backbone);
        let mut new = Vec::new();
        for op in ours {
            if self.merge(op.clone()) {
                new.push(op);
            }
        }
        self.append(&new)?;
        Ok((new, other))
    }

    fn append(&mut self, ops: &[FleetOp]) -> Result<(), StoreError> {
        match &mut self.log {
            Some(log) if !ops.is_empty() => log.append(ops),
            _ => Ok(()),
        }
    }

    /// The class an add's example has now, or `None` if it is hidden: it sits in `label` from
    /// `at` until that class's rename (if later), and is gone if the class was forgotten
    /// meanwhile.
    fn label_of<'a>(&'a self, label: &'a str, stamp: &'a Stamp) -> Option<&'a str> {
        let (mut label, mut at) = (label, stamp);
        // Each step moves `at` forward, so a chain is at most as long as the renames.
        for _ in 0..=self.renames.len() {
            let until = match self.renames.get(label) {
                Some((s, to)) if s > at => Some((s, to)),
                _ => None,
            };
            let forgotten = self.forgets.get(label).is_some_and(|fs| {
                fs.iter()
                    .any(|f| f > at && until.is_none_or(|(s, _)| f < s))
            });
            if forgotten {
                return None;
            }
            match until {
                Some((s, to)) => {
                    label = to;
                    at = s;
                }
                None => return Some(label),
            }
        }
        Some(label)
    }

    /// The examples the fleet holds, in a canonical order (class, then stamp). Two adds of one
    /// picture that end in one class are one example (the older one).
    pub fn view(&self) -> Vec<Visible<'_>> {
        let mut by_key: HashMap<(&str, &[u8; 32]), (&Stamp, Visible<'_>)> = HashMap::new();
        for op in self.adds.values() {
            let Body::Add {
                eid,
                label,
                file,
                sha256,
                embedding,
            } = &op.body
            else {
                continue;
            };
            let Some(now) = self.label_of(label, &op.stamp) else {
                continue;
            };
            let v = Visible {
                eid,
                label: now,
                sha256,
                file,
                origin: &op.stamp.origin,
                embedding,
            };
            match by_key.get(&(now, sha256)) {
                Some((s, w)) if (*s, w.eid) <= (&op.stamp, eid) => {}
                _ => {
                    by_key.insert((now, sha256), (&op.stamp, v));
                }
            }
        }
        let mut out: Vec<(&Stamp, Visible<'_>)> = by_key.into_values().collect();
        out.sort_by(|a, b| (a.1.label, a.0).cmp(&(b.1.label, b.0)));
        out.into_iter().map(|(_, v)| v).collect()
    }

    /// Examples per class, and a digest of the examples (ids and classes): two kiosks with the
    /// same digest hold the same examples.
    pub fn summary(&self) -> (BTreeMap<String, usize>, usize, String) {
        let view = self.view();
        let mut classes = BTreeMap::new();
        let mut keys: Vec<(&Eid, &str)> = Vec::with_capacity(view.len());
        for v in &view {
            *classes.entry(v.label.to_string()).or_insert(0) += 1;
            keys.push((v.eid, v.label));
        }
        keys.sort();
        let mut h = Sha256::new();
        for (eid, label) in &keys {
            h.update(eid);
            h.update(label.as_bytes());
            h.update([0]);
        }
        (classes, view.len(), wire::hex(&h.finalize()[..8]))
    }

    /// Takes in what the kiosk did: its label-level `intents` first, then the difference
    /// between the examples it holds and the fleet's (an example it holds that the fleet lacks
    /// is an add; with `deletes`, one the fleet holds that the kiosk lacks is a delete). The
    /// operations are logged, then returned to be published.
    pub fn absorb(
        &mut self,
        intents: Vec<Intent>,
        held: &[Held<'_>],
        deletes: bool,
    ) -> Result<Vec<FleetOp>, StoreError> {
        let mut out = Vec::new();
        for i in intents {
            let body = match i {
                Intent::Forget(label) => Body::Forget { label },
                Intent::Rename(from, to) => Body::Rename { from, to },
            };
            let op = FleetOp {
                stamp: self.tick(),
                backbone: self.backbone,
                body,
            };
            self.merge(op.clone());
            out.push(op);
        }
        let fleet: HashSet<(String, [u8; 32])> = self
            .view()
            .iter()
            .map(|v| (v.label.to_string(), *v.sha256))
            .collect();
        let mut mine: HashSet<(String, [u8; 32])> = HashSet::new();
        for h in held {
            let Some(sha) = wire::unhex::<32>(h.sha256) else {
                log::warn!("example {} has no sha256; not shared", h.file);
                continue;
            };
            let key = (h.label.to_string(), sha);
            if !fleet.contains(&key) && !mine.contains(&key) {
                let stamp = self.tick();
                let mut e = Sha256::new();
                e.update(stamp.origin.as_bytes());
                e.update(stamp.hlc.to_le_bytes());
                e.update(h.label.as_bytes());
                e.update([0]);
                e.update(sha);
                let mut eid = [0u8; 16];
                eid.copy_from_slice(&e.finalize()[..16]);
                let file = if wire::valid_name(h.file) {
                    h.file.to_string()
                } else {
                    format!("{}.jpg", wire::hex(&eid))
                };
                let op = FleetOp {
                    stamp,
                    backbone: self.backbone,
                    body: Body::Add {
                        eid,
                        label: h.label.to_string(),
                        file,
                        sha256: sha,
                        embedding: h.embedding.to_vec(),
                    },
                };
                self.merge(op.clone());
                out.push(op);
            }
            mine.insert(key);
        }
        // Two adds of one picture in one class show as one example: deleting it deletes
        // both, or the other would step in. Each round deletes at least one add.
        loop {
            if !deletes {
                break;
            }
            let mut gone: Vec<Eid> = self
                .view()
                .iter()
                .filter(|v| !mine.contains(&(v.label.to_string(), *v.sha256)))
                .map(|v| *v.eid)
                .collect();
            if gone.is_empty() {
                break;
            }
            gone.sort();
            for eid in gone {
                let op = FleetOp {
                    stamp: self.tick(),
                    backbone: self.backbone,
                    body: Body::Delete { eid },
                };
                self.merge(op.clone());
                out.push(op);
            }
        }
        self.append(&out)?;
        Ok(out)
    }

    /// Every operation this kiosk made that still matters (an add not deleted, a tombstone, a
    /// label operation), to publish again after the broker lost them.
    pub fn own(&self) -> Vec<FleetOp> {
        let mine = |s: &Stamp| s.origin == self.me;
        let mut out: Vec<FleetOp> = self
            .adds
            .values()
            .filter(|o| mine(&o.stamp))
            .cloned()
            .collect();
        // A tombstone replaces its add at the same topic; the origin of the add publishes it,
        // and so does whoever deleted it (whichever arrives, the example stays deleted).
        for (eid, s) in &self.deleted {
            if mine(s) {
                out.push(FleetOp {
                    stamp: s.clone(),
                    backbone: self.backbone,
                    body: Body::Delete { eid: *eid },
                });
            }
        }
        for (label, stamps) in &self.forgets {
            for s in stamps.iter().filter(|s| mine(s)) {
                out.push(FleetOp {
                    stamp: s.clone(),
                    backbone: self.backbone,
                    body: Body::Forget {
                        label: label.clone(),
                    },
                });
            }
        }
        for (from, (s, to)) in &self.renames {
            if mine(s) {
                out.push(FleetOp {
                    stamp: s.clone(),
                    backbone: self.backbone,
                    body: Body::Rename {
                        from: from.clone(),
                        to: to.clone(),
                    },
                });
            }
        }
        out.sort_by(|a, b| a.stamp.cmp(&b.stamp));
        out
    }
}

/// The append-only log of a replica.
#[derive(Debug)]
struct Log {
    path: PathBuf,
    file: std::fs::File,
}

impl Log {
    fn open(path: &Path) -> Result<(Vec<FleetOp>, Log), StoreError> {
        let io = |e| StoreError::io(path, e);
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
        };
        let mut ops = Vec::new();
        let mut at = 0usize;
        while bytes.len() - at >= 8 {
            let n = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
                as usize;
            let Some(body) = bytes.get(at + 8..at + 8 + n) else {
                break;
            };
            if Sha256::digest(body)[..4] != bytes[at + 4..at + 8] {
                break;
            }
            match wire::decode(body) {
                Ok(Message::Op(op)) => ops.push(op),
                Ok(Message::Status(_)) | Err(_) => break,
            }
            at += 8 + n;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        if at < bytes.len() {
            log::warn!(
                "{}: {} bytes after the last whole record (a write a power cut interrupted) cut off",
                path.display(),
                bytes.len() - at
            );
            file.set_len(at as u64).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        Ok((
            ops,
            Log {
                path: path.to_path_buf(),
                file,
            },
        ))
    }

    fn append(&mut self, ops: &[FleetOp]) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        for op in ops {
            let body = wire::encode(op);
            buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
            buf.extend_from_slice(&Sha256::digest(&body)[..4]);
            buf.extend_from_slice(&body);
        }
        self.file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| StoreError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BB: [u8; 8] = [1; 8];

    fn sha(n: u8) -> String {
        wire::hex(&[n; 32])
    }

    fn held<'a>(label: &'a str, sha: &'a str, file: &'a str) -> Held<'a> {
        Held {
            label,
            sha256: sha,
            file,
            embedding: &[0.5, 1.0],
        }
    }

    /// Labels of the view, sorted, for comparisons.
    fn labels(r: &Replica) -> Vec<(String, String)> {
        let mut v: Vec<_> = r
            .view()
            .iter()
            .map(|v| (v.label.to_string(), wire::hex(v.sha256)))
            .collect();
        v.sort();
        v
    }

    /// Three kiosks make concurrent changes; every order and duplication of the messages gives
    /// every kiosk the same examples.
    #[test]
    fn any_order_and_duplication_of_delivery_converges() {
        let (s1, s2, s3, s4) = (sha(1), sha(2), sha(3), sha(4));
        let mut a = Replica::in_memory("a", BB, true);
        let mut b = Replica::in_memory("b", BB, true);
        let mut c = Replica::in_memory("c", BB, true);
        let mut all = Vec::new();
        all.extend(
            a.absorb(
                vec![],
                &[held("birds", &s1, "b_0.jpg"), held("fruit", &s2, "f_0.jpg")],
                true,
            )
            .unwrap(),
        );
        all.extend(
            b.absorb(vec![], &[held("birds", &s3, "x_0.jpg")], true)
                .unwrap(),
        );
        // c: learns fruit, then forgets birds (it knows none yet), then renames fruit.
        all.extend(
            c.absorb(vec![], &[held("fruit", &s4, "y_0.jpg")], true)
                .unwrap(),
        );
        all.extend(
            c.absorb(
                vec![Intent::Rename("fruit".into(), "apples".into())],
                &[held("apples", &s4, "y_0.jpg")],
                true,
            )
            .unwrap(),
        );
        // a deletes its own fruit example.
        all.extend(
            a.absorb(vec![], &[held("birds", &s1, "b_0.jpg")], true)
                .unwrap(),
        );
        assert_eq!(all.len(), 6);
        let mut rng = 12345u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut digests = HashSet::new();
        for _ in 0..200 {
            let mut msgs = all.clone();
            // Duplicates, then a shuffle.
            for _ in 0..(next() % 4) {
                let i = (next() % msgs.len() as u64) as usize;
                msgs.push(msgs[i].clone());
            }
            for i in (1..msgs.len()).rev() {
                msgs.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            let mut r = Replica::in_memory("z", BB, true);
            for m in msgs {
                r.merge(m);
            }
            digests.insert(r.summary().2);
            // Rename is newer than fruit's add at c, older than nothing else: apples.
            // a's fruit example (s2) was added before the rename too: it moved, then a
            // deleted it.
            assert_eq!(
                labels(&r),
                vec![
                    ("apples".to_string(), s4.clone()),
                    ("birds".to_string(), s1.clone()),
                    ("birds".to_string(), s3.clone()),
                ]
            );
        }
        assert_eq!(digests.len(), 1);
    }

    #[test]
    fn a_forget_hides_older_examples_only_and_renames_chain() {
        let (s1, s2) = (sha(1), sha(2));
        let mut a = Replica::in_memory("a", BB, true);
        let early = a
            .absorb(vec![], &[held("cups", &s1, "c_0.jpg")], true)
            .unwrap();
        let forget = a
            .absorb(vec![Intent::Forget("cups".into())], &[], true)
            .unwrap();
        let late = a
            .absorb(vec![], &[held("cups", &s2, "c_1.jpg")], true)
            .unwrap();
        // A kiosk that hears them in reverse order ends the same: only the later cup.
        let mut b = Replica::in_memory("b", BB, true);
        for op in late.iter().chain(&forget).chain(&early) {
            b.merge(op.clone());
        }
        assert_eq!(labels(&b), vec![("cups".to_string(), s2.clone())]);
        // cups → mugs → cups again: the latest rename of each name decides.
        let r1 = a
            .absorb(
                vec![Intent::Rename("cups".into(), "mugs".into())],
                &[held("mugs", &s2, "c_1.jpg")],
                true,
            )
            .unwrap();
        let r2 = a
            .absorb(
                vec![Intent::Rename("mugs".into(), "cups".into())],
                &[held("cups", &s2, "c_1.jpg")],
                true,
            )
            .unwrap();
        assert!(r1.len() == 1 && r2.len() == 1, "{r1:?} {r2:?}");
        for op in r2.iter().chain(&r1) {
            b.merge(op.clone());
        }
        assert_eq!(labels(&b), vec![("cups".to_string(), s2)]);
        assert_eq!(labels(&a), labels(&b));
    }

    /// One picture learnt in one class on two kiosks is one example; deleting it on one
    /// deletes it everywhere (the other add does not step in).
    #[test]
    fn deleting_a_picture_two_kiosks_added_deletes_both_adds() {
        let s1 = sha(1);
        let mut a = Replica::in_memory("a", BB, true);
        let mut b = Replica::in_memory("b", BB, true);
        let from_a = a
            .absorb(vec![], &[held("cups", &s1, "c_0.jpg")], true)
            .unwrap();
        let from_b = b
            .absorb(vec![], &[held("cups", &s1, "d_0.jpg")], true)
            .unwrap();
        for op in from_b {
            a.merge(op);
        }
        assert_eq!(a.view().len(), 1);
        let deleted = a.absorb(vec![], &[], true).unwrap();
        assert_eq!(deleted.len(), 2, "{deleted:?}");
        for op in from_a.into_iter().chain(deleted) {
            b.merge(op);
        }
        assert!(a.view().is_empty() && b.view().is_empty());
    }

    #[test]
    fn other_backbones_are_not_merged() {
        let mut a = Replica::in_memory("a", BB, true);
        let ops = a
            .absorb(vec![], &[held("birds", &sha(1), "b_0.jpg")], true)
            .unwrap();
        let mut b = Replica::in_memory("b", [2; 8], true);
        let (new, other) = b.merge_logged(ops).unwrap();
        assert!(new.is_empty() && other.len() == 1);
        assert!(b.view().is_empty());
    }

    /// The log survives a restart, and a record cut short by a power cut is dropped, not fatal.
    #[test]
    fn the_log_is_read_back_and_a_torn_tail_is_cut() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("fleet.log");
        let mut a = Replica::open(&p, "a", BB).unwrap();
        let (s1, s2) = (sha(1), sha(2));
        a.absorb(
            vec![],
            &[held("birds", &s1, "b_0.jpg"), held("fruit", &s2, "f_0.jpg")],
            true,
        )
        .unwrap();
        let before = a.summary();
        drop(a);
        let len = std::fs::metadata(&p).unwrap().len();
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let a = Replica::open(&p, "a", BB).unwrap();
        assert_eq!(a.summary(), before);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), len);
        // Its clock is ahead of everything it logged.
        let mut a = a;
        let last = a.own().iter().map(|o| o.stamp.hlc).max().unwrap();
        assert!(a.tick().hlc > last);
    }
}
