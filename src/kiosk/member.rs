//! A kiosk as a member of a fleet: what it learns goes out as operations, what the fleet learns
//! comes in as [`Op::Fleet`](super::Op::Fleet) on the kiosk's one request queue, like any other
//! change.
//!
//! ```text
//! LEARN / FORGET / rename / delete / restore / RESET (any front end)
//!   └─ Kiosk commits examples.jsonl ─ Server::fleet_absorb: Replica::absorb (intents, then the
//!      difference kiosk − fleet) → fleet.log (fsync) → Outgoing::Ops → the transport publishes
//! the transport receives operations (tag checked)
//!   └─ Op::Fleet(ops) ─ Server::fleet_merge: Replica::merge_logged → fleet.log (fsync)
//!      → Kiosk::fleet_apply_begin(view) commits examples.jsonl → refit (off the queue)
//! ```
//!
//! The transport (MQTT, `crate::fleet`) is given an [`Outbox`] and sends [`Op::Fleet`]s through
//! its [`Handle`](super::Handle); this module names no MQTT type.

use std::collections::HashSet;

use super::ops::{later, now};
use super::protocol::{Code, Field};
use super::replica::{FleetOp, Replica};
use super::server::{conflict, Answer, Done, Server, Then};
use super::state::KioskError;
use super::wire::{self, MemberStatus};

/// What a kiosk hands its fleet transport.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// Operations this kiosk made, logged already: to publish.
    Ops(Vec<FleetOp>),
    /// Its heartbeat, changed.
    Status(MemberStatus),
}

/// Where a kiosk's [`Outgoing`] go (the transport's queue).
pub type Outbox = Box<dyn Fn(Outgoing) + Send>;

/// A kiosk's membership: its replica and its transport's queue.
pub(super) struct Member {
    replica: Replica,
    out: Outbox,
    /// The kiosk holds the fleet's view (false after a failed apply: until one succeeds, a
    /// difference is not taken for a delete).
    in_sync: bool,
    /// Operations refused for another backbone.
    refused: u64,
    /// Origins already named in a log line for running another backbone.
    warned: HashSet<String>,
    model: String,
}

impl Server {
    /// Joins a fleet with `replica` (opened on this kiosk's `fleet.log`): what the kiosk holds
    /// and the fleet lacks becomes operations (a kiosk that had examples before it joined
    /// shares them), what the fleet holds is applied to the kiosk (refit here, before serving),
    /// and every operation of this kiosk is handed to `out` to publish.
    pub fn join_fleet(&mut self, mut replica: Replica, out: Outbox) -> Result<(), KioskError> {
        let intents = self.kiosk.take_intents();
        replica.absorb(intents, &self.kiosk.held(), false)?;
        if let Some(job) = self
            .kiosk
            .fleet_apply_begin(&replica.view(), replica.me())?
        {
            self.kiosk.install(job.run())?;
        }
        out(Outgoing::Ops(replica.own()));
        self.member = Some(Member {
            replica,
            out,
            in_sync: true,
            refused: 0,
            warned: HashSet::new(),
            model: self.kiosk.backbone().id().name.clone(),
        });
        self.fleet_status();
        Ok(())
    }

    /// After a change from any front end: takes it into the replica and hands the new
    /// operations to the transport.
    pub(super) fn fleet_absorb(&mut self) {
        let Some(m) = self.member.as_mut() else {
            return;
        };
        let intents = self.kiosk.take_intents();
        match m.replica.absorb(intents, &self.kiosk.held(), m.in_sync) {
            Ok(ops) if ops.is_empty() => return,
            Ok(ops) => (m.out)(Outgoing::Ops(ops)),
            Err(e) => {
                log::error!("fleet: {e}; the change stays on this kiosk until the next one");
                return;
            }
        }
        self.fleet_status();
    }

    /// Sends the kiosk's heartbeat to the transport.
    pub(super) fn fleet_status(&mut self) {
        let Some(m) = self.member.as_mut() else {
            return;
        };
        let (classes, examples, digest) = m.replica.summary();
        (m.out)(Outgoing::Status(MemberStatus {
            kiosk: m.replica.me().to_string(),
            model: m.model.clone(),
            backbone: wire::hex(&m.replica.backbone()),
            time_ms: 0,
            examples,
            classes,
            digest,
            ops: m.replica.len(),
            refused: m.refused,
        }));
    }

    /// [`Op::Fleet`](super::Op::Fleet): merges operations from the fleet and applies the result.
    pub(super) fn fleet_merge(&mut self, ops: Vec<FleetOp>) -> Answer {
        let Some(m) = self.member.as_mut() else {
            return now(Err((Code::Conflict, "this kiosk is in no fleet".into())));
        };
        let (new, other) = match m.replica.merge_logged(ops) {
            Ok(r) => r,
            Err(e) => return now(Err((Code::Internal, e.to_string()))),
        };
        for o in &other {
            m.refused += 1;
            if m.warned.insert(o.stamp.origin.clone()) {
                log::warn!(
                    "fleet: kiosk {} embeds with another backbone (tag {}, ours {} = {}); its examples are refused",
                    o.stamp.origin,
                    wire::hex(&o.backbone),
                    wire::hex(&m.replica.backbone()),
                    m.model
                );
            }
        }
        let merged = new.len();
        let fields =
            |classes: usize| vec![Field::new("merged", merged), Field::new("classes", classes)];
        if merged == 0 && m.in_sync {
            return now(Ok(Done::fields(fields(self.kiosk.labels().len()))));
        }
        let result = self
            .kiosk
            .fleet_apply_begin(&m.replica.view(), m.replica.me());
        m.in_sync = result.is_ok();
        let answer = match result {
            Ok(Some(job)) => {
                log::info!("fleet: {merged} operations merged; refitting");
                later(job, Then::Fleet { merged })
            }
            Ok(None) => now(Ok(Done::fields(fields(self.kiosk.labels().len())))),
            Err(e) => {
                log::error!("fleet: {e}; will apply the fleet's examples again");
                now(Err(conflict(e)))
            }
        };
        self.fleet_status();
        answer
    }
}

/// This kiosk's id in fleet `fleet`, kept in `DIR/fleet.json` from its first start: `wanted`
/// if given (and it must stay the same), else the host name and 8 random hex digits (two
/// boards cloned from one SD card still differ). A data folder belongs to one fleet: its log
/// holds that fleet's operations.
pub fn fleet_identity(
    dir: &std::path::Path,
    fleet: &str,
    wanted: Option<&str>,
) -> Result<String, KioskError> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Identity {
        fleet: String,
        kiosk: String,
    }
    let path = dir.join("fleet.json");
    let bad = |why: String| KioskError::Store(crate::store::StoreError::format(&path, why));
    if let Some(w) = wanted {
        if !wire::valid_name(w) || w.contains('~') {
            return Err(bad(format!(
                "kiosk id {w:?}: use 1-100 of A-Z a-z 0-9 . _ - (no leading dot)"
            )));
        }
    }
    match crate::userfile::read(&path) {
        Ok(bytes) => {
            let id: Identity = serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("not a fleet identity: {e}")))?;
            if id.fleet != fleet {
                return Err(bad(format!(
                    "this data folder is kiosk {} of fleet {:?}, not {fleet:?} (its fleet.log holds that fleet's examples; use another --data)",
                    id.kiosk, id.fleet
                )));
            }
            if let Some(w) = wanted.filter(|w| *w != id.kiosk) {
                return Err(bad(format!(
                    "this data folder is kiosk {:?} in its fleet, not {w:?}",
                    id.kiosk
                )));
            }
            Ok(id.kiosk)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kiosk = match wanted {
                Some(w) => w.to_string(),
                None => {
                    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
                    let host: String = host
                        .trim()
                        .chars()
                        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .take(40)
                        .collect();
                    let host = if host.is_empty() {
                        "kiosk".into()
                    } else {
                        host
                    };
                    format!("{host}-{:08x}", rand::random::<u32>())
                }
            };
            let bytes = serde_json::to_vec_pretty(&Identity {
                fleet: fleet.to_string(),
                kiosk: kiosk.clone(),
            })
            .map_err(|e| bad(e.to_string()))?;
            crate::store::write_atomic(&path, |w| w.write_all(&bytes))?;
            Ok(kiosk)
        }
        Err(e) => Err(bad(e.to_string())),
    }
}
