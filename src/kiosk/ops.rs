//! Requests beyond the line protocol's verbs, for front ends that carry more than a line: the
//! web page uploads photos, renames a class, deletes one example, shows thumbnails and hands out
//! exports. Each runs on the kiosk's one request queue like a protocol request (see
//! [`super::hub`]), so every front end sees one state, and uses the same [`Kiosk`] operations
//! and error codes as the protocol's verbs.

use super::protocol::{Code, Field, Input};
use super::server::{conflict, Answer, Body, Deferred, Done, Reply, Server, Session, Then};
use super::state::KioskError;
use crate::capture::Frame;
use crate::head::Label;
use crate::store::export::{self, Format};

/// A request to the kiosk from a front end.
#[derive(Debug)]
pub enum Op {
    /// A line of the line protocol (`LEARN birds 5`, `TRAIN`, ...).
    Line(String),
    /// Pictures sent by the client (uploaded photos), learnt as examples of `label` exactly as
    /// camera frames are by `LEARN`.
    Upload {
        /// The class.
        label: Label,
        /// The decoded pictures.
        frames: Vec<Frame>,
    },
    /// `LEARN label max`, ending early when [`Handle::stop_burst`](super::Handle::stop_burst)
    /// names `burst` (a button held down on the page, then released).
    Burst {
        /// The class.
        label: Label,
        /// Frames at most.
        max: u32,
        /// Which burst this is, for stopping it.
        burst: u64,
    },
    /// Renames a class.
    Rename {
        /// The class.
        from: Label,
        /// Its new name.
        to: Label,
    },
    /// Deletes one example (by its frame's file name).
    DeleteExample {
        /// The class.
        label: Label,
        /// The frame's file name, as [`Op::Examples`] lists it.
        file: String,
    },
    /// Every class with its examples' frame file names ([`Body::Classes`]).
    Examples,
    /// One example's frame, JPEG ([`Body::Bytes`]).
    ExampleFrame {
        /// The class.
        label: Label,
        /// The frame's file name.
        file: String,
    },
    /// The head exported ([`Body::Bytes`]): ONNX model or JSON.
    Export(Format),
    /// A snapshot to draw the evaluation pictures from ([`Body::Evaluation`]).
    Evaluation,
    /// A backup of the examples, frames and settings ([`Body::Bytes`], a tar archive).
    Backup,
    /// Replaces everything with a backup's content (a tar archive [`Op::Backup`] made).
    Restore(Vec<u8>),
    /// Operations from the kiosk's fleet, authenticated by its transport (`crate::fleet`).
    Fleet(Vec<super::replica::FleetOp>),
}

impl Op {
    /// Whether this changes the kiosk (needs the secret, waits for a refit in progress).
    pub fn changes_state(&self) -> bool {
        match self {
            Op::Line(l) => {
                super::protocol::Request::parse(l.as_bytes()).is_ok_and(|r| r.verb.changes_state())
            }
            Op::Upload { .. }
            | Op::Burst { .. }
            | Op::Rename { .. }
            | Op::DeleteExample { .. }
            | Op::Restore(_)
            | Op::Fleet(_) => true,
            Op::Examples
            | Op::ExampleFrame { .. }
            | Op::Export(_)
            | Op::Backup
            | Op::Evaluation => false,
        }
    }
}

/// One class as [`Op::Examples`] lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClassInfo {
    /// The class name.
    pub label: String,
    /// Its examples' frame file names.
    pub files: Vec<String>,
}

pub(super) fn later(job: crate::store::learn::FitJob, then: Then) -> Answer {
    Answer::Later(Box::new(Deferred::new(job, then)))
}

/// An answer now (no refit to wait for).
pub(super) fn now(result: Result<Done, (Code, String)>) -> Answer {
    Answer::Now(Reply {
        id: None,
        checksum: false,
        result,
    })
}

impl Server {
    /// Answers an [`Op`] from a front end whose requests run as `session`.
    pub(super) fn op_step(&mut self, session: &mut Session, op: Op) -> Answer {
        let bytes = |content_type: &'static str, bytes: Vec<u8>| Done {
            fields: Vec::new(),
            body: Body::Bytes {
                content_type,
                bytes,
            },
        };
        match op {
            Op::Line(line) => self.answer_step(session, &Input::Line(line.into_bytes())),
            Op::Upload { label, frames } => {
                self.answered += 1;
                match self.kiosk.learn_begin(&label, &frames) {
                    Ok((added, job)) => later(job, Then::Learn { label, added }),
                    Err(e) => now(Err(conflict(e))),
                }
            }
            Op::Burst { label, max, burst } => {
                self.answered += 1;
                match self.capture_frames(max, Some(burst)) {
                    Ok(frames) => match self.kiosk.learn_begin(&label, &frames) {
                        Ok((added, job)) => later(job, Then::Learn { label, added }),
                        Err(e) => now(Err(conflict(e))),
                    },
                    Err(e) => now(Err(e)),
                }
            }
            Op::Rename { from, to } => {
                self.answered += 1;
                match self.kiosk.rename_begin(&from, &to) {
                    Ok(job) => later(job, Then::Rename { to }),
                    Err(e) => now(Err(conflict(e))),
                }
            }
            Op::DeleteExample { label, file } => {
                self.answered += 1;
                match self.kiosk.delete_example_begin(&label, &file) {
                    Ok((left, job)) => later(job, Then::Delete { label, left }),
                    Err(e) => now(Err(conflict(e))),
                }
            }
            Op::Examples => now(Ok(Done {
                fields: Vec::new(),
                body: Body::Classes(
                    self.kiosk
                        .examples()
                        .into_iter()
                        .map(|(label, files)| ClassInfo { label, files })
                        .collect(),
                ),
            })),
            Op::ExampleFrame { label, file } => now(self
                .kiosk
                .example_frame(&label, &file)
                .map_err(conflict)
                .and_then(|p| {
                    crate::userfile::read(p).map_err(|e| match file.split_once('~') {
                        // An example of another kiosk of the fleet: examples travel, photos do not.
                        Some((origin, _)) if !p.exists() => (
                            Code::Conflict,
                            format!("{file}: learnt by kiosk {origin}; its photo stays there"),
                        ),
                        _ => (Code::Internal, format!("{}: {e}", p.display())),
                    })
                })
                .map(|b| bytes("image/jpeg", b))),
            Op::Evaluation => {
                let k = &self.kiosk;
                now(match k.evaluation_data() {
                    Some(d) => Ok(Done {
                        fields: Vec::new(),
                        body: Body::Evaluation(Box::new(d)),
                    }),
                    None => Err(conflict(KioskError::NoHead {
                        have: k.labels().len(),
                    })),
                })
            }
            Op::Backup => now(self
                .kiosk
                .backup()
                .map_err(conflict)
                .map(|b| bytes("application/x-tar", b))),
            Op::Restore(archive) => {
                self.answered += 1;
                match self.kiosk.restore_begin(&archive) {
                    Ok((examples, job)) => later(job, Then::Restore { examples }),
                    Err(e) => now(Err(conflict(e))),
                }
            }
            Op::Fleet(ops) => self.fleet_merge(ops),
            Op::Export(format) => {
                let k = &self.kiosk;
                let Some(h) = k.head() else {
                    return now(Err(conflict(KioskError::NoHead {
                        have: k.labels().len(),
                    })));
                };
                let path = k.dir().join("head.graft");
                now(export::export(k.backbone(), h, &path, format, true)
                    .map_err(|e| (Code::Internal, e.to_string()))
                    .map(|b| {
                        let kind = match format {
                            Format::Onnx => "application/octet-stream",
                            Format::Json => "application/json",
                        };
                        bytes(kind, b)
                    }))
            }
        }
    }
}

impl Reply {
    /// The reply's fields, for a front end that shows them.
    pub fn fields(&self) -> &[Field] {
        match &self.result {
            Ok(d) => &d.fields,
            Err(_) => &[],
        }
    }
}
