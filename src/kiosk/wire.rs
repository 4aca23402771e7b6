//! How a fleet operation travels: one compact binary body per operation, authenticated with the
//! fleet key (docs/FLEET.md has the layout). Pure code: the MQTT client is `crate::fleet`'s.
//!
//! ```text
//! body  = "GF" 1 kind hlc:u64 origin:str8 backbone:[8] ...
//!   add     eid:[16] label:str8 file:str8 sha256:[32] dim:u16 scale:f32 q:i8×dim
//!   delete  eid:[16]
//!   forget  label:str8
//!   rename  from:str8 to:str8
//!   status  JSON (the member's heartbeat)
//! message = body ‖ HMAC-SHA256(key, fleet ‖ 0 ‖ topic ‖ 0 ‖ body)[..16]
//! ```
//!
//! An embedding travels as one byte per value on a square-root scale: `q = round(127 ·
//! sign(v) · sqrt(|v| / m))` with `m = max |v|`. The heads read `sign(v) · |v|^0.5` (their input
//! transform), where this is a uniform 8-bit quantisation; 1,280 values take 1,286 bytes.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::replica::{Body, Eid, FleetOp, Stamp};
use crate::backbone::BackboneId;

/// Bytes of the authentication tag after each body.
pub const TAG_LEN: usize = 16;
const MAGIC: &[u8; 2] = b"GF";
const VERSION: u8 = 1;
/// The largest embedding a message carries.
pub const MAX_DIM: usize = 65_535;

/// Why a message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// Too short, a bad field, or not a graft fleet message at all.
    #[error("not a graft fleet message: {0}")]
    Malformed(String),
    /// The tag does not match: another fleet key, or the message was changed on the way.
    #[error("the fleet key does not match (a client without the key, or a changed message)")]
    BadTag,
}

fn bad(why: impl Into<String>) -> WireError {
    WireError::Malformed(why.into())
}

/// The kind byte of each operation.
const ADD: u8 = 1;
const DELETE: u8 = 2;
const FORGET: u8 = 3;
const RENAME: u8 = 4;
const STATUS: u8 = 5;

/// What a fleet message holds: an operation on the examples, or a member's heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// An operation.
    Op(FleetOp),
    /// A heartbeat: who the member is and what it holds.
    Status(MemberStatus),
}

/// A member's heartbeat, as `graft fleet status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemberStatus {
    /// The kiosk's id in the fleet.
    pub kiosk: String,
    /// Its backbone's name, and the tag its examples carry (hex).
    pub model: String,
    /// Tag of the backbone (hex of [`backbone_tag`]).
    pub backbone: String,
    /// Unix ms when it was sent.
    pub time_ms: u64,
    /// Examples it holds (the fleet's, as it sees them).
    pub examples: usize,
    /// Examples per class.
    pub classes: std::collections::BTreeMap<String, usize>,
    /// A digest of its examples (ids and labels): equal digests, equal examples.
    pub digest: String,
    /// Operations it knows.
    pub ops: usize,
    /// Messages it refused (wrong key, other backbone, malformed) since it started.
    pub refused: u64,
}

/// The 8 bytes that say which backbone an example was embedded with (its graph's sha256,
/// dimension and preprocessing: what [`BackboneId::compatible`] compares).
pub fn backbone_tag(id: &BackboneId) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(id.sha256.as_bytes());
    h.update([0]);
    h.update(id.dim.to_le_bytes());
    h.update(id.preprocess.as_bytes());
    let d = h.finalize();
    let mut t = [0u8; 8];
    t.copy_from_slice(&d[..8]);
    t
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from lowercase or uppercase hex of exactly `N` bytes.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Quantises an embedding to one byte per value (module docs); returns the scale `m`.
pub fn quantize(v: &[f32]) -> (f32, Vec<i8>) {
    let m = v
        .iter()
        .filter(|x| x.is_finite())
        .fold(0f32, |a, x| a.max(x.abs()));
    if m == 0.0 {
        return (0.0, vec![0; v.len()]);
    }
    let q = v
        .iter()
        .map(|x| {
            if !x.is_finite() {
                return 0;
            }
            let r = (x.abs() / m).sqrt() * 127.0;
            (r.round().min(127.0) as i8) * if *x < 0.0 { -1 } else { 1 }
        })
        .collect();
    (m, q)
}

/// The inverse of [`quantize`].
pub fn dequantize(m: f32, q: &[i8]) -> Vec<f32> {
    q.iter()
        .map(|&b| {
            let r = f32::from(b) / 127.0;
            r * r.abs() * m
        })
        .collect()
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Callers' strings are validated to fit (labels ≤ 32 characters, names ≤ 100 bytes).
    let b = s.as_bytes();
    let n = b.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(&b[..n]);
}

/// Encodes an operation's body (what the log stores and [`seal`] signs).
pub fn encode(op: &FleetOp) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    let kind = match &op.body {
        Body::Add { .. } => ADD,
        Body::Delete { .. } => DELETE,
        Body::Forget { .. } => FORGET,
        Body::Rename { .. } => RENAME,
    };
    out.push(kind);
    out.extend_from_slice(&op.stamp.hlc.to_le_bytes());
    put_str(&mut out, &op.stamp.origin);
    out.extend_from_slice(&op.backbone);
    match &op.body {
        Body::Add {
            eid,
            label,
            file,
            sha256,
            embedding,
        } => {
            out.extend_from_slice(eid);
            put_str(&mut out, label);
            put_str(&mut out, file);
            out.extend_from_slice(sha256);
            let dim = embedding.len().min(MAX_DIM);
            out.extend_from_slice(&(dim as u16).to_le_bytes());
            let (m, q) = quantize(&embedding[..dim]);
            out.extend_from_slice(&m.to_le_bytes());
            out.extend(q.iter().map(|b| *b as u8));
        }
        Body::Delete { eid } => out.extend_from_slice(eid),
        Body::Forget { label } => put_str(&mut out, label),
        Body::Rename { from, to } => {
            put_str(&mut out, from);
            put_str(&mut out, to);
        }
    }
    out
}

/// Encodes a heartbeat.
pub fn encode_status(s: &MemberStatus) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(STATUS);
    out.extend(serde_json::to_vec(s).unwrap_or_default());
    out
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(bad("cut short"));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn str8(&mut self, what: &str) -> Result<String, WireError> {
        let n = self.take(1)?[0] as usize;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| bad(format!("{what} is not UTF-8")))
    }
}

/// A name of the fleet (kiosk ids, frame file names): 1–100 of `A–Z a–z 0–9 . _ - ~`, not
/// starting with a dot.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~'))
}

/// Decodes a body [`encode`] or [`encode_status`] made; every field is checked (labels as
/// [`Label::new`](crate::head::Label::new) would, names by [`valid_name`], finite scale).
pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
    let mut r = Reader { b: bytes };
    if r.take(2)? != MAGIC {
        return Err(bad("no GF magic"));
    }
    let v = r.take(1)?[0];
    if v != VERSION {
        return Err(bad(format!("version {v}, this graft reads {VERSION}")));
    }
    let kind = r.take(1)?[0];
    if kind == STATUS {
        let s: MemberStatus =
            serde_json::from_slice(r.b).map_err(|e| bad(format!("status: {e}")))?;
        if !valid_name(&s.kiosk) {
            return Err(bad("status: bad kiosk id"));
        }
        return Ok(Message::Status(s));
    }
    let hlc = u64::from_le_bytes(r.arr()?);
    let origin = r.str8("origin")?;
    if !valid_name(&origin) {
        return Err(bad(format!("origin {origin:?}")));
    }
    let backbone = r.arr::<8>()?;
    let label = |r: &mut Reader<'_>| -> Result<String, WireError> {
        let s = r.str8("label")?;
        crate::head::Label::new(&s)
            .map(|l| l.to_string())
            .map_err(|e| bad(e.to_string()))
    };
    let body = match kind {
        ADD => {
            let eid: Eid = r.arr()?;
            let label = label(&mut r)?;
            let file = r.str8("file")?;
            if !valid_name(&file) {
                return Err(bad(format!("file name {file:?}")));
            }
            let sha256 = r.arr::<32>()?;
            let dim = u16::from_le_bytes(r.arr()?) as usize;
            let m = f32::from_le_bytes(r.arr()?);
            if !(m.is_finite() && m >= 0.0) {
                return Err(bad("embedding scale is not a finite number ≥ 0"));
            }
            let q: Vec<i8> = r.take(dim)?.iter().map(|b| *b as i8).collect();
            Body::Add {
                eid,
                label,
                file,
                sha256,
                embedding: dequantize(m, &q),
            }
        }
        DELETE => Body::Delete { eid: r.arr()? },
        FORGET => Body::Forget {
            label: label(&mut r)?,
        },
        RENAME => Body::Rename {
            from: label(&mut r)?,
            to: label(&mut r)?,
        },
        k => return Err(bad(format!("unknown kind {k}"))),
    };
    if !r.b.is_empty() {
        return Err(bad(format!("{} bytes after the body", r.b.len())));
    }
    Ok(Message::Op(FleetOp {
        stamp: Stamp { hlc, origin },
        backbone,
        body,
    }))
}

fn mac(key: &[u8], fleet: &str, topic: &str, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(fleet.as_bytes());
    m.update(&[0]);
    m.update(topic.as_bytes());
    m.update(&[0]);
    m.update(body);
    m
}

/// `body` with its tag: what is published on `topic`.
pub fn seal(key: &[u8], fleet: &str, topic: &str, body: &[u8]) -> Vec<u8> {
    let tag = mac(key, fleet, topic, body).finalize().into_bytes();
    let mut out = Vec::with_capacity(body.len() + TAG_LEN);
    out.extend_from_slice(body);
    out.extend_from_slice(&tag[..TAG_LEN]);
    out
}

/// Checks a message's tag (constant time) and decodes its body.
pub fn open(key: &[u8], fleet: &str, topic: &str, payload: &[u8]) -> Result<Message, WireError> {
    if payload.len() < TAG_LEN {
        return Err(bad("shorter than its tag"));
    }
    let (body, tag) = payload.split_at(payload.len() - TAG_LEN);
    mac(key, fleet, topic, body)
        .verify_truncated_left(tag)
        .map_err(|_| WireError::BadTag)?;
    decode(body)
}

/// The topic an operation is published on (retained), always under its own kiosk's name (so a
/// broker ACL can let each kiosk write only its own topics): an example's add is
/// `graft/FLEET/x/ORIGIN/EID` and its tombstone `graft/FLEET/x/DELETER/EID` (the same topic,
/// replacing the add on the broker, when the origin deletes it); a label operation is
/// `graft/FLEET/l/ORIGIN/HLC`.
pub fn topic(fleet: &str, op: &FleetOp) -> String {
    match &op.body {
        Body::Add { eid, .. } | Body::Delete { eid } => {
            format!("graft/{fleet}/x/{}/{}", op.stamp.origin, hex(eid))
        }
        Body::Forget { .. } | Body::Rename { .. } => {
            format!("graft/{fleet}/l/{}/{:016x}", op.stamp.origin, op.stamp.hlc)
        }
    }
}

/// A member's heartbeat topic (retained).
pub fn status_topic(fleet: &str, kiosk: &str) -> String {
    format!("graft/{fleet}/m/{kiosk}")
}

/// Every topic of a fleet, to subscribe to.
pub fn fleet_filter(fleet: &str) -> String {
    format!("graft/{fleet}/#")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(label: &str, dim: usize) -> FleetOp {
        FleetOp {
            stamp: Stamp {
                hlc: 0x1234_5678_9abc,
                origin: "kiosk-a".into(),
            },
            backbone: [7; 8],
            body: Body::Add {
                eid: [3; 16],
                label: label.into(),
                file: "birds-1764000000000_004.jpg".into(),
                sha256: [9; 32],
                embedding: (0..dim).map(|i| ((i * 37) % 101) as f32 / 50.0).collect(),
            },
        }
    }

    #[test]
    fn every_kind_round_trips_and_an_example_fits_in_1_5_kb() {
        let ops = [
            add("birds", 1280),
            FleetOp {
                body: Body::Delete { eid: [1; 16] },
                ..add("x", 1)
            },
            FleetOp {
                body: Body::Forget {
                    label: "fruit".into(),
                },
                ..add("x", 1)
            },
            FleetOp {
                body: Body::Rename {
                    from: "fruit".into(),
                    to: "apples".into(),
                },
                ..add("x", 1)
            },
        ];
        let key = b"fleet key";
        for op in &ops {
            let t = topic("shop", op);
            let msg = seal(key, "shop", &t, &encode(op));
            let Message::Op(back) = open(key, "shop", &t, &msg).unwrap() else {
                panic!("not an op")
            };
            assert_eq!(back.stamp, op.stamp);
            assert_eq!(back.backbone, op.backbone);
            match (&back.body, &op.body) {
                (Body::Add { embedding: a, .. }, Body::Add { embedding: b, .. }) => {
                    // The heads' input transform (sign·sqrt, then L2) sees nearly the same vector.
                    let f = |v: &[f32]| -> Vec<f32> {
                        v.iter().map(|x| x.signum() * x.abs().sqrt()).collect()
                    };
                    let (a, b) = (f(a), f(b));
                    let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
                    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
                    let cos = dot / (n(&a) * n(&b));
                    assert!(cos > 0.9999, "cosine {cos}");
                    // The MQTT PUBLISH: fixed header (≤ 4), topic length + topic, packet id, payload.
                    let wire = 1 + 2 + 2 + t.len() + 2 + msg.len();
                    assert!(wire <= 1536, "{wire} bytes on the wire");
                }
                (a, b) => assert_eq!(a, b),
            }
        }
    }

    #[test]
    fn a_wrong_key_a_moved_message_and_garbage_are_refused() {
        let op = add("birds", 16);
        let t = topic("shop", &op);
        let msg = seal(b"right", "shop", &t, &encode(&op));
        assert_eq!(open(b"wrong", "shop", &t, &msg), Err(WireError::BadTag));
        assert_eq!(open(b"right", "other", &t, &msg), Err(WireError::BadTag));
        let moved = t.replace("kiosk-a", "kiosk-b");
        assert_eq!(open(b"right", "shop", &moved, &msg), Err(WireError::BadTag));
        let mut flipped = msg.clone();
        flipped[20] ^= 1;
        assert_eq!(open(b"right", "shop", &t, &flipped), Err(WireError::BadTag));
        // Every truncation of a valid body is an error, never a panic.
        let body = encode(&op);
        for n in 0..body.len() {
            assert!(decode(&body[..n]).is_err(), "{n} bytes decoded");
        }
        // A label the kiosk would refuse is refused here too.
        let mut evil = add("birds", 4);
        if let Body::Add { label, .. } = &mut evil.body {
            *label = "../etc".into();
        }
        assert!(matches!(
            decode(&encode(&evil)),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn quantisation_keeps_signs_zeros_and_the_largest_value() {
        let v = [0.0, -4.0, 1.0, 4.0, f32::NAN];
        let (m, q) = quantize(&v);
        assert_eq!(m, 4.0);
        let back = dequantize(m, &q);
        assert_eq!(back[0], 0.0);
        assert_eq!(back[1], -4.0);
        assert_eq!(back[3], 4.0);
        assert!((back[2] - 1.0).abs() < 0.02, "{}", back[2]);
        assert_eq!(back[4], 0.0);
        assert_eq!(quantize(&[0.0; 3]), (0.0, vec![0; 3]));
    }
}
