//! The request loop: bytes in from a link (serial port, TCP connection), one reply line out per
//! request, `EVT` lines while streaming.
//!
//! One [`Server`] holds the kiosk and the frame source; each link has a [`Session`] of its own
//! (its stream, its RESET token, its `AUTH` state). A serial port is served by [`Server::serve`]
//! on the caller's thread. TCP ([`Server::serve_tcp`]) serves several clients at once: a reader
//! and a writer thread per connection move bytes, and every request goes through one queue to
//! the caller's thread, which runs them one at a time in arrival order, so all links see one
//! state. A client that sends nothing is closed after an idle timeout; one that does not read
//! its replies is closed when a write times out; neither holds up anyone else.

use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

use super::auth::{LinkAuth, Proof, Secret};
use super::protocol::{
    err_line, event_line, ok_line, Code, Field, Input, LineSplitter, Rejection, Request, Verb,
    VERBS, VERSION,
};
use super::state::{Kiosk, KioskError};
use crate::capture::{Frame, FrameSource};
use crate::head::{self, Label};
use crate::live::{Smoother, Smoothing};
use crate::store::learn::{FitJob, Fitted, LearnError};

/// Server settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// A partial line followed by this much silence is answered with `ERR 408` and dropped.
    pub line_timeout: Duration,
    /// Requests arriving together beyond this many are answered `ERR 429` unexecuted.
    pub max_queue: usize,
    /// Pause between the frames of one `LEARN` (time for the object to move a little).
    pub learn_interval: Duration,
    /// Default `STREAM ON` period.
    pub stream_period: Duration,
    /// The secret `AUTH` proves (`None`: no link can authenticate, e.g. `--insecure`).
    pub secret: Option<Secret>,
    /// Whether read-only verbs (INFO, LABELS, CLASSIFY, STREAM, THRESHOLD) need `AUTH` too on
    /// links that are not trusted. PING, HELP and AUTH never do.
    pub reads_need_auth: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            line_timeout: Duration::from_secs(2),
            max_queue: 32,
            learn_interval: Duration::from_millis(200),
            stream_period: Duration::from_secs(1),
            secret: None,
            reads_need_auth: false,
        }
    }
}

/// Why [`Server::serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The other side closed the link.
    Closed,
    /// The stop flag was set (SIGTERM).
    Stopped,
}

struct Stream {
    period: Duration,
    next_at: Instant,
    smoother: Smoother,
}

/// One link's state: its stream, its RESET confirmation, its authentication.
pub struct Session {
    stream: Option<Stream>,
    reset_token: Option<(String, Instant)>,
    auth: LinkAuth,
    /// The link is to be closed after this reply (too many wrong AUTH answers).
    close: bool,
}

impl Session {
    /// A link that needs no `AUTH` (serial, loopback, `--insecure`).
    pub fn trusted() -> Session {
        Session {
            stream: None,
            reset_token: None,
            auth: LinkAuth::trusted(),
            close: false,
        }
    }

    /// A link whose state changes need `AUTH` first.
    pub fn untrusted() -> Session {
        Session {
            auth: LinkAuth::default(),
            ..Session::trusted()
        }
    }

    /// The link is to be closed after the last reply.
    pub fn closing(&self) -> bool {
        self.close
    }
}

/// A kiosk and its frame source, served to one link or many.
pub struct Server {
    pub(super) kiosk: Kiosk,
    source: Box<dyn FrameSource>,
    pub(super) options: Options,
    /// Requests answered so far.
    pub answered: u64,
    /// The last burst ([`Op::Burst`](super::Op::Burst)) a front end asked to stop.
    pub(super) burst_stop: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Where captured frames go while someone watches ([`Server::run`] sets it).
    pub(super) feed: Option<std::sync::Arc<super::feed::Feed>>,
    /// The fleet this kiosk is a member of ([`Server::join_fleet`]).
    pub(super) member: Option<super::member::Member>,
}

/// What a request's execution gives: its reply's fields, or a refit to run first.
enum Outcome {
    Fields(Vec<Field>),
    Fit(Box<FitJob>, Then),
}

/// What a reply that waited for a refit reports.
pub(super) enum Then {
    Learn { label: Label, added: usize },
    Train,
    Forget { label: Label, removed: usize },
    Rename { to: Label },
    Delete { label: Label, left: usize },
    Restore { examples: usize },
    Fleet { merged: usize },
}

/// A reply waiting for a refit.
pub(super) struct Deferred {
    id: Option<String>,
    checksum: bool,
    /// The refit (taken by whoever runs it).
    pub(super) job: Option<FitJob>,
    then: Then,
}

impl Deferred {
    pub(super) fn new(job: FitJob, then: Then) -> Deferred {
        Deferred {
            id: None,
            checksum: false,
            job: Some(job),
            then,
        }
    }
}

/// A reply now, or one waiting for a refit.
pub(super) enum Answer {
    Now(Reply),
    Later(Box<Deferred>),
}

/// What a request got: the fields of its `OK` (and, for some [`Op`](super::Op)s, a body), or an error
/// code and message. A line link sends it as one line ([`Reply::line`]); the web page's API
/// as JSON with the code as the HTTP status.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The request's `#ID`, echoed.
    pub id: Option<String>,
    /// The request carried a checksum: so does the reply line.
    pub checksum: bool,
    /// The outcome.
    pub result: Result<Done, (Code, String)>,
}

/// What some [`Op`](super::Op)s hand back besides fields.
#[derive(Debug, Clone, Default)]
pub enum Body {
    /// Nothing.
    #[default]
    None,
    /// A file: a frame, an export.
    Bytes {
        /// Its MIME type.
        content_type: &'static str,
        /// Its bytes.
        bytes: Vec<u8>,
    },
    /// The classes and their examples.
    Classes(Vec<super::ops::ClassInfo>),
    /// What the evaluation pictures are drawn from.
    Evaluation(Box<super::report::EvalData>),
}

/// A successful request's reply.
#[derive(Debug, Clone, Default)]
pub struct Done {
    /// The `OK` line's fields.
    pub fields: Vec<Field>,
    /// What some [`Op`](super::Op)s hand back besides.
    pub body: Body,
}

impl Done {
    /// A reply of fields only.
    pub fn fields(fields: Vec<Field>) -> Done {
        Done {
            fields,
            body: Body::None,
        }
    }
}

impl Reply {
    fn new(
        id: Option<String>,
        checksum: bool,
        result: Result<Vec<Field>, (Code, String)>,
    ) -> Reply {
        Reply {
            id,
            checksum,
            result: result.map(|fields| Done {
                fields,
                body: Body::None,
            }),
        }
    }

    /// An error reply to no request in particular.
    pub fn error(code: Code, message: impl Into<String>) -> Reply {
        Reply {
            id: None,
            checksum: false,
            result: Err((code, message.into())),
        }
    }

    /// The reply line of the line protocol (without its `\n`).
    pub fn line(&self) -> String {
        match &self.result {
            Ok(done) => ok_line(self.id.as_deref(), self.checksum, &done.fields),
            Err((code, message)) => {
                log::info!("ERR {} {message}", code.number());
                err_line(self.id.as_deref(), self.checksum, *code, message)
            }
        }
    }
}

pub(super) fn conflict(e: KioskError) -> (Code, String) {
    match e {
        KioskError::NoHead { .. }
        | KioskError::NoClass(_)
        | KioskError::ClassExists(_)
        | KioskError::NoExample { .. } => (Code::Conflict, e.to_string()),
        KioskError::BadBackup(_) => (Code::BadRequest, e.to_string()),
        KioskError::Store(ref s) if s.is_disk_full() => {
            (Code::NoSpace, format!("{e}; nothing was changed"))
        }
        _ => (Code::Internal, e.to_string()),
    }
}

impl Server {
    /// A server over a kiosk and a frame source.
    pub fn new(kiosk: Kiosk, source: Box<dyn FrameSource>, options: Options) -> Server {
        Server {
            kiosk,
            source,
            options,
            answered: 0,
            burst_stop: Default::default(),
            feed: None,
            member: None,
        }
    }

    /// The kiosk.
    pub fn kiosk(&self) -> &Kiosk {
        &self.kiosk
    }

    /// The kiosk to read and the frame source to take preview frames from, at once (the live
    /// view keeps showing the camera while a frame is classified).
    pub(super) fn parts(&mut self) -> (&Kiosk, &mut dyn FrameSource) {
        (&self.kiosk, self.source.as_mut())
    }

    /// `n` frames for LEARN, `learn_interval` apart; fewer when `burst` is stopped meanwhile.
    pub(super) fn capture_frames(
        &mut self,
        n: u32,
        burst: Option<u64>,
    ) -> Result<Vec<Frame>, (Code, String)> {
        let mut frames = Vec::with_capacity(n as usize);
        for i in 0..n {
            if i > 0 {
                std::thread::sleep(self.options.learn_interval);
                if burst.is_some_and(|b| self.burst_stop.load(Ordering::SeqCst) == b) {
                    break;
                }
            }
            frames.push(self.frame()?);
        }
        Ok(frames)
    }

    pub(super) fn frame(&mut self) -> Result<Frame, (Code, String)> {
        match self.source.next_frame() {
            Ok(Some(f)) => {
                if let Some(feed) = self.feed.as_ref().filter(|f| f.viewed()) {
                    feed.publish_frame(&f.image);
                }
                Ok(f)
            }
            Ok(None) => Err((
                Code::Camera,
                format!("frame source {} has no more frames", self.source.describe()),
            )),
            Err(e) => Err((Code::Camera, e.to_string())),
        }
    }

    /// Answers one input line of a link: exactly one reply line (without its `\n`). A refit
    /// (LEARN, TRAIN, FORGET) runs here, on this thread.
    pub fn answer(&mut self, session: &mut Session, input: &Input) -> String {
        match self.answer_step(session, input) {
            Answer::Now(reply) => reply.line(),
            Answer::Later(mut d) => {
                let fitted = match d.job.take() {
                    Some(job) => job.run(),
                    None => Err(LearnError::Store(crate::store::StoreError::format(
                        self.kiosk.dir(),
                        "refit already taken",
                    ))),
                };
                self.finish(session, *d, fitted).line()
            }
        }
    }

    /// Answers one input line, or hands back the refit its reply waits for: run
    /// [`Deferred::job`] anywhere, then [`finish`](Server::finish) it here. Until then no other
    /// state change may run (reads may).
    pub(super) fn answer_step(&mut self, session: &mut Session, input: &Input) -> Answer {
        self.answered += 1;
        let (id, checksum, result) = match input {
            Input::TooLong => (
                None,
                false,
                Err((
                    Code::TooLong,
                    format!("line longer than {} bytes", super::protocol::MAX_LINE),
                )),
            ),
            Input::Line(bytes) => match Request::parse(bytes) {
                Err(Rejection {
                    id,
                    checksum,
                    code,
                    message,
                }) => (id, checksum, Err((code, message))),
                Ok(req) => {
                    log::debug!("request: {}", req.encode());
                    match self.execute(session, &req.verb) {
                        Ok(Outcome::Fit(job, then)) => {
                            return Answer::Later(Box::new(Deferred {
                                id: req.id,
                                checksum: req.checksum,
                                job: Some(*job),
                                then,
                            }))
                        }
                        Ok(Outcome::Fields(f)) => (req.id, req.checksum, Ok(f)),
                        Err(e) => (req.id, req.checksum, Err(e)),
                    }
                }
            },
        };
        Answer::Now(Reply::new(id, checksum, result))
    }

    /// Installs the refit a deferred reply waited for and makes that reply.
    pub(super) fn finish(
        &mut self,
        session: &mut Session,
        d: Deferred,
        fitted: Result<Fitted, LearnError>,
    ) -> Reply {
        let result = self
            .kiosk
            .install(fitted)
            .map_err(conflict)
            .and_then(|()| self.after_fit(session, &d.then));
        Reply::new(d.id, d.checksum, result)
    }

    fn after_fit(
        &mut self,
        session: &mut Session,
        then: &Then,
    ) -> Result<Vec<Field>, (Code, String)> {
        Self::reset_stream(&self.kiosk, session);
        Ok(match then {
            Then::Learn { label, added } => {
                let l = self.kiosk.learned(label, *added);
                log::info!(
                    "learned {} frames of {label:?} ({} classes)",
                    l.added,
                    l.classes
                );
                vec![
                    Field::new("label", label),
                    Field::new("added", l.added),
                    Field::new("examples", l.examples),
                    Field::new("classes", l.classes),
                    Field::new("trained", u8::from(l.trained)),
                ]
            }
            Then::Train => {
                let t = self.kiosk.trained_info().map_err(conflict)?;
                vec![
                    Field::new("head", t.kind),
                    Field::new("cv", format!("{:.3}", t.cv_accuracy)),
                    Field::new("threshold", format!("{:.3}", t.threshold)),
                ]
            }
            Then::Forget { label, removed } => vec![
                Field::new("label", label),
                Field::new("removed", removed),
                Field::new("classes", self.kiosk.labels().len()),
            ],
            Then::Rename { to } => vec![
                Field::new("label", to),
                Field::new("classes", self.kiosk.labels().len()),
            ],
            Then::Restore { examples } => vec![
                Field::new("restored", examples),
                Field::new("classes", self.kiosk.labels().len()),
                Field::new("trained", u8::from(self.kiosk.head().is_some())),
            ],
            Then::Delete { label, left } => vec![
                Field::new("label", label),
                Field::new("examples", left),
                Field::new("classes", self.kiosk.labels().len()),
            ],
            Then::Fleet { merged } => vec![
                Field::new("merged", merged),
                Field::new("classes", self.kiosk.labels().len()),
            ],
        })
    }

    fn execute(&mut self, session: &mut Session, verb: &Verb) -> Result<Outcome, (Code, String)> {
        let needs_auth =
            verb.changes_state() || (self.options.reads_need_auth && !verb.always_allowed());
        if needs_auth && !session.auth.allowed() {
            return Err((
                Code::Forbidden,
                "this link must AUTH first: send AUTH, then AUTH <HMAC-SHA256 of the challenge keyed with the kiosk secret> (docs/PROTOCOL.md)".into(),
            ));
        }
        let k = &self.kiosk;
        match verb {
            Verb::Auth(None) => {
                if self.options.secret.is_none() {
                    return Err((
                        Code::Conflict,
                        "this kiosk has no secret (--insecure): nothing to prove".into(),
                    ));
                }
                Ok(Outcome::Fields(vec![
                    Field::new("challenge", session.auth.challenge()),
                    Field::new("within_s", super::auth::CHALLENGE_TTL.as_secs()),
                ]))
            }
            Verb::Auth(Some(response)) => {
                let Some(secret) = &self.options.secret else {
                    return Err((
                        Code::Conflict,
                        "this kiosk has no secret (--insecure): nothing to prove".into(),
                    ));
                };
                match session.auth.prove(secret, response) {
                    Proof::Accepted => Ok(Outcome::Fields(vec![Field::new("auth", 1)])),
                    Proof::NoChallenge => Err((
                        Code::Conflict,
                        "no challenge to answer (or it expired): send AUTH first".into(),
                    )),
                    Proof::Wrong { close } => {
                        log::warn!("wrong AUTH response");
                        session.close = close;
                        Err((
                            Code::Forbidden,
                            if close {
                                "wrong AUTH response; too many: closing".into()
                            } else {
                                "wrong AUTH response".into()
                            },
                        ))
                    }
                }
            }
            Verb::Ping => Ok(Outcome::Fields(vec![Field::new("pong", 1)])),
            Verb::Help => Ok(Outcome::Fields(vec![
                Field::new("protocol", VERSION),
                Field::new("verbs", VERBS.join(",")),
            ])),
            Verb::Info => {
                let h = k.head();
                Ok(Outcome::Fields(vec![
                    Field::new("version", env!("CARGO_PKG_VERSION")),
                    Field::new("protocol", VERSION),
                    Field::new("model", &k.backbone().id().name),
                    Field::new("head", h.map_or("none".into(), |h| h.head.kind.to_string())),
                    Field::new("labels", k.labels().join(",")),
                    Field::new(
                        "threshold",
                        h.map_or("none".into(), |h| format!("{:.3}", h.head.threshold)),
                    ),
                    Field::new("examples", k.counts().iter().sum::<usize>()),
                    Field::new(
                        "cv",
                        h.and_then(|h| h.cv_accuracy)
                            .map_or("none".into(), |a| format!("{a:.3}")),
                    ),
                    Field::new("saved", u8::from(!k.head_unsaved())),
                ]))
            }
            Verb::Labels => {
                let counts: Vec<String> = k.counts().iter().map(|c| c.to_string()).collect();
                Ok(Outcome::Fields(vec![
                    Field::new("labels", k.labels().join(",")),
                    Field::new("counts", counts.join(",")),
                ]))
            }
            Verb::Classify => {
                if k.head().is_none() {
                    return Err(conflict(KioskError::NoHead {
                        have: k.labels().len(),
                    }));
                }
                let frame = self.frame()?;
                let c = self.kiosk.classify(&frame).map_err(conflict)?;
                Ok(Outcome::Fields(vec![
                    Field::new("label", &c.prediction.label),
                    Field::new("score", format!("{:.3}", c.prediction.score)),
                    Field::new("best", &c.prediction.best),
                    Field::new("ms", format!("{:.0}", c.stages.total_ms())),
                ]))
            }
            Verb::Learn { label, n } => {
                let frames = self.capture_frames(*n, None)?;
                let (added, job) = self.kiosk.learn_begin(label, &frames).map_err(conflict)?;
                Ok(Outcome::Fit(
                    Box::new(job),
                    Then::Learn {
                        label: label.clone(),
                        added,
                    },
                ))
            }
            Verb::Train => {
                let job = self.kiosk.train_begin().map_err(conflict)?;
                Ok(Outcome::Fit(Box::new(job), Then::Train))
            }
            Verb::Forget { label } => {
                let (removed, job) = self.kiosk.forget_begin(label).map_err(conflict)?;
                Ok(Outcome::Fit(
                    Box::new(job),
                    Then::Forget {
                        label: label.clone(),
                        removed,
                    },
                ))
            }
            Verb::Threshold(None) => match k.head() {
                Some(h) => Ok(Outcome::Fields(vec![Field::new(
                    "threshold",
                    format!("{:.3}", h.head.threshold),
                )])),
                None => Err(conflict(KioskError::NoHead {
                    have: k.labels().len(),
                })),
            },
            Verb::Threshold(Some(t)) => {
                self.kiosk.set_threshold(*t).map_err(conflict)?;
                Self::reset_stream(&self.kiosk, session);
                Ok(Outcome::Fields(vec![Field::new(
                    "threshold",
                    format!("{t:.3}"),
                )]))
            }
            Verb::Save => {
                self.kiosk.save().map_err(conflict)?;
                Ok(Outcome::Fields(vec![Field::new(
                    "saved",
                    self.kiosk.dir().display(),
                )]))
            }
            Verb::Reset(None) => {
                let token = format!("{:06x}", rand::thread_rng().gen_range(0..0x100_0000u32));
                session.reset_token = Some((token.clone(), Instant::now()));
                Ok(Outcome::Fields(vec![
                    Field::new("confirm", &token),
                    Field::new("within_s", 30),
                ]))
            }
            Verb::Reset(Some(t)) => {
                let valid = session
                    .reset_token
                    .take()
                    .filter(|(tok, at)| tok == t && at.elapsed() < Duration::from_secs(30));
                if valid.is_none() {
                    return Err((
                        Code::Conflict,
                        "wrong or expired confirmation token: send RESET, then RESET <token> within 30 s".into(),
                    ));
                }
                self.kiosk.reset().map_err(conflict)?;
                session.stream = None;
                log::warn!("reset: every example and the head deleted");
                Ok(Outcome::Fields(vec![Field::new("reset", 1)]))
            }
            Verb::Stream { on: false, .. } => {
                session.stream = None;
                Ok(Outcome::Fields(vec![Field::new("stream", "off")]))
            }
            Verb::Stream {
                on: true,
                period_ms,
            } => {
                let Some(h) = k.head() else {
                    return Err(conflict(KioskError::NoHead {
                        have: k.labels().len(),
                    }));
                };
                let period = period_ms
                    .map(|p| Duration::from_millis(u64::from(p)))
                    .unwrap_or(self.options.stream_period);
                session.stream = Some(Stream {
                    period,
                    next_at: Instant::now(),
                    smoother: Smoother::new(Smoothing::Ema { alpha: 0.5 }, h.head.threshold, 2),
                });
                Ok(Outcome::Fields(vec![
                    Field::new("stream", "on"),
                    Field::new("period_ms", period.as_millis()),
                ]))
            }
        }
    }

    fn reset_stream(kiosk: &Kiosk, session: &mut Session) {
        let threshold = kiosk.head().map(|h| h.head.threshold);
        match (session.stream.as_mut(), threshold) {
            (Some(s), Some(t)) => {
                s.smoother = Smoother::new(Smoothing::Ema { alpha: 0.5 }, t, 2);
            }
            _ => session.stream = None,
        }
    }

    /// One streaming step of a link if one is due: an `EVT` line (or none).
    pub(super) fn stream_tick(&mut self, session: &mut Session) -> Option<String> {
        let s = session.stream.as_ref()?;
        if Instant::now() < s.next_at {
            return None;
        }
        let frame = match self.frame() {
            Ok(f) => f,
            Err((_, message)) => {
                session.stream = None;
                return Some(event_line(&[
                    Field::new("error", message),
                    Field::new("stream", "off"),
                ]));
            }
        };
        let result = self.kiosk.classify(&frame);
        let head = self.kiosk.head()?;
        let s = session.stream.as_mut()?;
        s.next_at = Instant::now() + s.period;
        let c = match result {
            Ok(c) => c,
            Err(e) => return Some(event_line(&[Field::new("error", e)])),
        };
        let (now, report) = s.smoother.push(&c.probs);
        let label = now
            .label
            .map_or(head::UNKNOWN, |i| head.head.labels[i].as_str());
        Some(event_line(&[
            Field::new("label", label),
            Field::new("score", format!("{:.3}", now.score)),
            Field::new("changed", u8::from(report.is_some())),
        ]))
    }

    /// Serves one link until it closes or `stop` is set. The link's reads must time out (a
    /// serial port's timeout, a socket's read timeout) so that silence, streaming and `stop`
    /// are noticed. I/O errors other than timeouts are returned (the caller reopens the port).
    /// A serial link is trusted: whoever holds the wire holds the kiosk.
    pub fn serve<L: Read + Write>(
        &mut self,
        link: &mut L,
        stop: &AtomicBool,
    ) -> std::io::Result<Ended> {
        let mut session = Session::trusted();
        let mut splitter = LineSplitter::default();
        let mut buf = [0u8; 1024];
        let mut last_byte = Instant::now();
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(Ended::Stopped);
            }
            let mut out: Vec<String> = Vec::new();
            match link.read(&mut buf) {
                Ok(0) => return Ok(Ended::Closed),
                Ok(n) => {
                    last_byte = Instant::now();
                    let inputs = splitter.push(&buf[..n]);
                    for (i, input) in inputs.iter().enumerate() {
                        if i < self.options.max_queue {
                            out.push(self.answer(&mut session, input));
                        } else {
                            self.answered += 1;
                            let id = match input {
                                Input::Line(l) => Request::parse(l).ok().and_then(|r| r.id),
                                Input::TooLong => None,
                            };
                            out.push(err_line(
                                id.as_deref(),
                                false,
                                Code::Busy,
                                &format!(
                                    "more than {} requests at once; this one was not run",
                                    self.options.max_queue
                                ),
                            ));
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::TimedOut | ErrorKind::WouldBlock | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
            if splitter.pending() && last_byte.elapsed() >= self.options.line_timeout {
                splitter.expire();
                self.answered += 1;
                out.push(err_line(
                    None,
                    false,
                    Code::Timeout,
                    &format!(
                        "partial line dropped after {} ms of silence",
                        self.options.line_timeout.as_millis()
                    ),
                ));
            }
            if let Some(evt) = self.stream_tick(&mut session) {
                out.push(evt);
            }
            if !out.is_empty() {
                let mut bytes = out.join("\n");
                bytes.push('\n');
                link.write_all(bytes.as_bytes())?;
                link.flush()?;
            }
        }
    }
}
