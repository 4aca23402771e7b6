//! One request queue for every front end of a kiosk.
//!
//! ```text
//! TCP clients ──── reader threads ─┐
//! serial port ──── link thread ────┤   ToCore     ┌─ Server::answer_step / op_step, one at a time
//! web page ─────── HTTP threads ───┼────────────▶ │  refits on a thread of their own
//!   (Handle::call)                 │              │  stream ticks (STREAM ON), the live feed
//! ```
//!
//! Every request from every front end runs on the caller's thread of [`Server::run`], in arrival
//! order, so a LEARN from the page and a CLASSIFY from the serial link see the same examples. A
//! refit (LEARN, TRAIN, FORGET, an upload, a rename) runs on a thread of its own: meanwhile reads
//! are answered with the previous head, and state changes — and anything else from the client
//! waiting for it — are held in order until it is installed.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::feed::Feed;
use super::ops::Op;
use super::protocol::{err_line, Code, Input, LineSplitter, Request};
use super::server::{Answer, Deferred, Reply, Server, Session};
use super::tcp::TcpOptions;
use crate::head;
use crate::live::{Smoother, Smoothing};
use crate::store::learn::{Fitted, LearnError};
use crate::store::StoreError;

/// A byte link a front end serves the line protocol on (a serial port).
pub trait Link: Read + Write + Send {}
impl<T: Read + Write + Send> Link for T {}

/// Opens (or reopens, after an unplug) a serial link.
pub type Opener<'a> = Box<dyn FnMut() -> std::io::Result<Box<dyn Link>> + Send + 'a>;

/// A serial port served beside the other front ends: the link, opened already (so that a
/// missing port is an error at start), and how to open it again when it goes away.
pub struct SerialFront<'a> {
    /// For log lines: the port.
    pub name: String,
    /// The open link; its reads must time out (50 ms).
    pub link: Box<dyn Link>,
    /// Reopens it.
    pub reopen: Opener<'a>,
}

/// Another front end: runs on a thread of its own with a [`Handle`] until the stop flag it
/// watches is set (the web page's HTTP server).
pub type Front<'a> = Box<dyn FnOnce(Handle) + Send + 'a>;

/// The front ends [`Server::run`] serves at once.
#[derive(Default)]
pub struct Fronts<'a> {
    /// TCP clients of the line protocol.
    pub tcp: Option<(TcpListener, TcpOptions)>,
    /// A serial link.
    pub serial: Option<SerialFront<'a>>,
    /// Front ends that speak [`Op`]s (the web page).
    pub others: Vec<Front<'a>>,
}

pub(super) enum ToCore {
    Open {
        id: u64,
        trusted: bool,
        out: Sender<Out>,
    },
    Input {
        id: u64,
        input: Input,
    },
    /// A reply a transport made itself (429, 408): through the queue, so that replies keep the
    /// order of their requests.
    Reply {
        id: u64,
        line: String,
        /// Close the connection after it.
        close: bool,
    },
    Gone {
        id: u64,
    },
    Op {
        op: Op,
        reply: Sender<Reply>,
    },
}

pub(super) enum Out {
    Reply(String),
    Event(String),
    Close,
}

/// What a front end holds to reach the kiosk: send it [`Op`]s, watch its [`Feed`].
#[derive(Clone)]
pub struct Handle {
    tx: Sender<ToCore>,
    feed: Arc<Feed>,
    burst_stop: Arc<AtomicU64>,
    next_burst: Arc<AtomicU64>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").finish_non_exhaustive()
    }
}

impl Handle {
    /// Runs `op` on the kiosk's queue and waits up to `wait` for its reply (`ERR 503` after).
    pub fn call(&self, op: Op, wait: Duration) -> Reply {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(ToCore::Op { op, reply: tx }).is_err() {
            return Reply::error(Code::Camera, "the kiosk is stopping");
        }
        rx.recv_timeout(wait).unwrap_or_else(|_| {
            Reply::error(
                Code::Camera,
                format!("no reply within {} s", wait.as_secs()),
            )
        })
    }

    /// The live feed.
    pub fn feed(&self) -> &Feed {
        &self.feed
    }

    /// A fresh id for an [`Op::Burst`].
    pub fn new_burst(&self) -> u64 {
        self.next_burst.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Ends the burst `burst` after the frame it is capturing (the button was released).
    pub fn stop_burst(&self, burst: u64) {
        self.burst_stop.store(burst, Ordering::SeqCst);
    }
}

impl Server {
    /// Serves every front end in `fronts` until `stop` is set, all on one request queue run on
    /// this thread; `feed` is what watchers of the web page see.
    pub fn run(&mut self, fronts: Fronts<'_>, feed: Arc<Feed>, stop: &AtomicBool) {
        let (core_tx, core_rx) = mpsc::channel::<ToCore>();
        let ids = AtomicU64::new(0);
        let line_timeout = self.options.line_timeout;
        let max_queue = self.options.max_queue;
        let handle = Handle {
            tx: core_tx.clone(),
            feed: Arc::clone(&feed),
            burst_stop: Arc::clone(&self.burst_stop),
            next_burst: Arc::default(),
        };
        self.feed = Some(Arc::clone(&feed));
        let (listener, tcp) = fronts.tcp.map_or((None, None), |(l, o)| (Some(l), Some(o)));
        let Fronts { serial, others, .. } = fronts;
        std::thread::scope(|scope| {
            let ids = &ids;
            if let (Some(listener), Some(tcp)) = (listener, tcp.as_ref()) {
                let core = core_tx.clone();
                scope.spawn(move || {
                    super::tcp::accept(
                        scope,
                        listener,
                        tcp,
                        core,
                        ids,
                        stop,
                        line_timeout,
                        max_queue,
                    )
                });
            }
            if let Some(serial) = serial {
                let core = core_tx.clone();
                let id = ids.fetch_add(1, Ordering::SeqCst) + 1;
                scope.spawn(move || serial_loop(serial, id, core, stop, line_timeout, max_queue));
            }
            for front in others {
                let h = handle.clone();
                scope.spawn(move || front(h));
            }
            drop(handle);
            drop(core_tx);
            let core_rx = core_rx;
            self.run_queue(&core_rx, &feed, stop);
            // Before the fronts are joined: a front waiting for a reply (Handle::call) gets
            // its answer (the kiosk is stopping) now, not after its whole wait.
            drop(core_rx);
        });
    }

    /// Runs requests from every front end, in arrival order, their streams, and the live feed.
    fn run_queue(&mut self, rx: &mpsc::Receiver<ToCore>, feed: &Feed, stop: &AtomicBool) {
        // One thread classifies the live feed's frames, always the same one (tract's scratch
        // buffers stay warm), with the backbone shared and a snapshot of the head.
        let (jobs, queue) = mpsc::channel::<Job>();
        let backbone = self.kiosk().shared_backbone();
        std::thread::spawn(move || {
            for (head, frame, reply) in queue {
                let _ = reply.send(crate::live::classify(&backbone, &head, &frame, None));
            }
        });
        let mut q = Queue {
            classifier: jobs,
            sessions: HashMap::new(),
            web: Session::trusted(),
            held: VecDeque::new(),
            busy: None,
            live: None,
            next_live: Instant::now(),
        };
        while !stop.load(Ordering::SeqCst) {
            q.poll_fit(self, feed);
            let wait = if feed.watched() {
                q.next_live
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(20))
            } else {
                Duration::from_millis(20)
            };
            match rx.recv_timeout(wait) {
                Ok(msg) => q.handle(self, feed, msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            for (session, out) in q.sessions.values_mut() {
                if let Some(evt) = self.stream_tick(session) {
                    let _ = out.send(Out::Event(evt));
                }
            }
            q.live_tick(self, feed);
        }
        // Dropping the sessions drops their senders: the writers finish.
    }
}

/// Where a reply goes.
enum To {
    Session(u64),
    Op(Sender<Reply>),
}

/// A refit running on its own thread, and the reply waiting for it.
struct Busy {
    to: To,
    deferred: Box<Deferred>,
    rx: mpsc::Receiver<Result<Fitted, LearnError>>,
}

/// The request queue's state on the serving thread.
struct Queue {
    sessions: HashMap<u64, (Session, Sender<Out>)>,
    /// The session of every [`Op`] (front ends that authenticate themselves).
    web: Session,
    /// Messages waiting for the refit in progress, in arrival order.
    held: VecDeque<ToCore>,
    busy: Option<Busy>,
    /// The head the feed classifies with and its smoothing, made again when the head changes.
    live: Option<Live>,
    next_live: Instant,
    /// The classifier thread's queue.
    classifier: Sender<Job>,
}

/// A frame to classify with a head, and where the result goes.
type Job = (
    Arc<crate::head::Head>,
    crate::capture::Frame,
    Sender<Result<crate::live::Classified, crate::live::LiveError>>,
);

/// The live feed's head and smoothing.
struct Live {
    classes: usize,
    head: Arc<crate::head::Head>,
    smoother: Smoother,
}

fn changes_state(msg: &ToCore) -> bool {
    match msg {
        ToCore::Input { input, .. } => matches!(input, Input::Line(l)
            if Request::parse(l).is_ok_and(|r| r.verb.changes_state())),
        ToCore::Op { op, .. } => op.changes_state(),
        _ => false,
    }
}

fn changed(feed: &Feed) {
    feed.publish_event(r#"{"type":"changed"}"#.to_string());
}

impl Queue {
    /// Whether `msg` must wait for the refit in progress: a state change, or anything from a
    /// client that already has a request waiting (its replies keep their order).
    fn must_wait(&self, msg: &ToCore) -> bool {
        let Some(busy) = &self.busy else {
            return false;
        };
        if changes_state(msg) {
            return true;
        }
        let id = match msg {
            ToCore::Input { id, .. } | ToCore::Reply { id, .. } => *id,
            ToCore::Op { .. } | ToCore::Open { .. } | ToCore::Gone { .. } => return false,
        };
        matches!(busy.to, To::Session(b) if b == id)
            || self.held.iter().any(|m| match m {
                ToCore::Input { id: h, .. } | ToCore::Reply { id: h, .. } => *h == id,
                _ => false,
            })
    }

    fn handle(&mut self, server: &mut Server, feed: &Feed, msg: ToCore) {
        if self.must_wait(&msg) {
            self.held.push_back(msg);
            return;
        }
        let changes = changes_state(&msg);
        match msg {
            ToCore::Open { id, trusted, out } => {
                let s = if trusted {
                    Session::trusted()
                } else {
                    Session::untrusted()
                };
                self.sessions.insert(id, (s, out));
            }
            ToCore::Input { id, input } => {
                let Some((session, out)) = self.sessions.get_mut(&id) else {
                    return;
                };
                match server.answer_step(session, &input) {
                    Answer::Now(reply) => {
                        let _ = out.send(Out::Reply(reply.line()));
                        if session.closing() {
                            let _ = out.send(Out::Close);
                            self.sessions.remove(&id);
                        }
                        if changes && reply.result.is_ok() {
                            self.live = None;
                            changed(feed);
                        }
                    }
                    Answer::Later(deferred) => self.start_fit(To::Session(id), deferred),
                }
            }
            ToCore::Op { op, reply } => match server.op_step(&mut self.web, op) {
                Answer::Now(r) => {
                    let ok = r.result.is_ok();
                    let _ = reply.send(r);
                    if changes && ok {
                        self.live = None;
                        changed(feed);
                    }
                }
                Answer::Later(deferred) => self.start_fit(To::Op(reply), deferred),
            },
            ToCore::Reply { id, line, close } => {
                if let Some((_, out)) = self.sessions.get(&id) {
                    let _ = out.send(Out::Reply(line));
                    if close {
                        let _ = out.send(Out::Close);
                        self.sessions.remove(&id);
                    }
                }
            }
            ToCore::Gone { id } => {
                self.sessions.remove(&id);
            }
        }
        if changes {
            // Committed (or refused) already; only the refit may still be running.
            server.fleet_absorb();
        }
    }

    fn start_fit(&mut self, to: To, mut deferred: Box<Deferred>) {
        let (tx, rx) = mpsc::channel();
        if let Some(job) = deferred.job.take() {
            std::thread::spawn(move || {
                let _ = tx.send(job.run());
            });
        }
        self.busy = Some(Busy { to, deferred, rx });
    }

    /// Finishes a refit that is done: installs it, replies, then runs what waited for it.
    fn poll_fit(&mut self, server: &mut Server, feed: &Feed) {
        let Some(busy) = &self.busy else {
            return;
        };
        let fitted = match busy.rx.try_recv() {
            Ok(f) => f,
            Err(TryRecvError::Empty) => return,
            // The fitting thread died without an answer (a panic in a fit): say so.
            Err(TryRecvError::Disconnected) => Err(LearnError::Store(StoreError::format(
                server.kiosk().dir(),
                "the refit failed unexpectedly; the previous head is kept",
            ))),
        };
        let Some(Busy { to, deferred, .. }) = self.busy.take() else {
            return;
        };
        match to {
            To::Session(id) => match self.sessions.get_mut(&id) {
                Some((session, out)) => {
                    let reply = server.finish(session, *deferred, fitted);
                    let _ = out.send(Out::Reply(reply.line()));
                }
                None => {
                    // The client left; the change it asked for is committed all the same.
                    let _ = server.finish(&mut Session::trusted(), *deferred, fitted);
                }
            },
            To::Op(tx) => {
                let _ = tx.send(server.finish(&mut self.web, *deferred, fitted));
            }
        }
        self.live = None;
        changed(feed);
        server.fleet_status();
        while self.busy.is_none() {
            let Some(msg) = self.held.pop_front() else {
                break;
            };
            self.handle(server, feed, msg);
        }
    }

    /// While someone watches: a frame for the preview, classified with the head in use, its
    /// smoothed label as an event.
    fn live_tick(&mut self, server: &mut Server, feed: &Feed) {
        if !feed.watched() || Instant::now() < self.next_live {
            return;
        }
        self.next_live = Instant::now() + feed.period;
        let frame = match server.frame() {
            Ok(f) => f,
            Err((_, message)) => {
                // A camera that fails: say so once a second, not at the frame rate.
                self.next_live = Instant::now() + Duration::from_secs(1);
                feed.publish_event(
                    serde_json::json!({"type": "error", "message": message}).to_string(),
                );
                return;
            }
        };
        // (server.frame() published it to the feed.)
        let Some(h) = server.kiosk().head() else {
            return;
        };
        let n = h.head.labels.len();
        let threshold = h.head.threshold;
        let head = match &self.live {
            Some(l) if l.classes == n => Arc::clone(&l.head),
            _ => {
                let head = Arc::new(h.head.clone());
                self.live = Some(Live {
                    classes: n,
                    head: Arc::clone(&head),
                    smoother: Smoother::new(Smoothing::Ema { alpha: 0.5 }, threshold, 2),
                });
                head
            }
        };
        // The frame is classified on the classifier's thread; meanwhile the camera keeps
        // feeding the preview (a board that classifies 3 frames a second still shows 15).
        let (tx, rx) = mpsc::channel();
        if self.classifier.send((head, frame, tx)).is_err() {
            return;
        }
        let (_, source) = server.parts();
        let mut next = Instant::now() + feed.period;
        let classified = loop {
            match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(r) => break r,
                Err(RecvTimeoutError::Disconnected) => {
                    feed.publish_event(
                        serde_json::json!({"type": "error", "message": "the classifier failed (a panic)"})
                            .to_string(),
                    );
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    if feed.viewed() {
                        if let Ok(Some(f)) = source.next_frame() {
                            feed.publish_frame(&f.image);
                        }
                    }
                    next = Instant::now() + feed.period;
                }
            }
        };
        let c = match classified {
            Ok(c) => c,
            Err(e) => {
                feed.publish_event(
                    serde_json::json!({"type": "error", "message": e.to_string()}).to_string(),
                );
                return;
            }
        };
        feed.count_classified();
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let (now, report) = live.smoother.push(&c.probs);
        let label = now
            .label
            .and_then(|i| live.head.labels.get(i))
            .map_or(head::UNKNOWN, String::as_str);
        feed.publish_event(
            serde_json::json!({
                "type": "label",
                "label": label,
                "score": (f64::from(now.score) * 1000.0).round() / 1000.0,
                "best": c.prediction.best,
                "changed": report.is_some(),
                "ms": (c.stages.total_ms() * 10.0).round() / 10.0,
            })
            .to_string(),
        );
    }
}

/// Serves a serial link: lines in, replies and events out, on one thread; reopens the port when
/// it goes away (an unplugged USB adapter) and keeps the link's session.
fn serial_loop(
    mut front: SerialFront<'_>,
    id: u64,
    core: Sender<ToCore>,
    stop: &AtomicBool,
    line_timeout: Duration,
    max_queue: usize,
) {
    let (out_tx, out_rx) = mpsc::channel::<Out>();
    if core
        .send(ToCore::Open {
            id,
            trusted: true,
            out: out_tx,
        })
        .is_err()
    {
        return;
    }
    let mut splitter = LineSplitter::default();
    let mut buf = [0u8; 1024];
    let mut last_byte = Instant::now();
    let mut in_flight = 0usize;
    let reply = |in_flight: &mut usize, id_s: Option<&str>, code: Code, message: &str| {
        *in_flight += 1;
        let _ = core.send(ToCore::Reply {
            id,
            line: err_line(id_s, false, code, message),
            close: false,
        });
    };
    while !stop.load(Ordering::SeqCst) {
        let mut broken = false;
        match front.link.read(&mut buf) {
            Ok(0) => broken = true,
            Ok(n) => {
                last_byte = Instant::now();
                let room = max_queue.saturating_sub(in_flight);
                for (i, input) in splitter.push(&buf[..n]).into_iter().enumerate() {
                    if i >= room {
                        let rid = match &input {
                            Input::Line(l) => Request::parse(l).ok().and_then(|r| r.id),
                            Input::TooLong => None,
                        };
                        reply(
                            &mut in_flight,
                            rid.as_deref(),
                            Code::Busy,
                            &format!(
                                "more than {max_queue} requests at once; this one was not run"
                            ),
                        );
                        continue;
                    }
                    in_flight += 1;
                    if core.send(ToCore::Input { id, input }).is_err() {
                        return;
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::TimedOut | ErrorKind::WouldBlock | ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                log::warn!("{}: {e}; waiting for it to come back", front.name);
                broken = true;
            }
        }
        if splitter.pending() && last_byte.elapsed() >= line_timeout {
            splitter.expire();
            reply(
                &mut in_flight,
                None,
                Code::Timeout,
                &format!(
                    "partial line dropped after {} ms of silence",
                    line_timeout.as_millis()
                ),
            );
        }
        let mut bytes = Vec::new();
        while let Ok(out) = out_rx.try_recv() {
            match out {
                Out::Reply(l) => {
                    in_flight = in_flight.saturating_sub(1);
                    bytes.extend_from_slice(l.as_bytes());
                    bytes.push(b'\n');
                }
                Out::Event(l) => {
                    bytes.extend_from_slice(l.as_bytes());
                    bytes.push(b'\n');
                }
                Out::Close => {}
            }
        }
        if !broken && !bytes.is_empty() {
            if let Err(e) = front
                .link
                .write_all(&bytes)
                .and_then(|()| front.link.flush())
            {
                log::warn!("{}: {e}; waiting for it to come back", front.name);
                broken = true;
            }
        }
        if broken {
            let since = Instant::now();
            loop {
                if stop.load(Ordering::SeqCst) {
                    let _ = core.send(ToCore::Gone { id });
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
                // Replies to the lost link's requests go nowhere.
                while let Ok(out) = out_rx.try_recv() {
                    if matches!(out, Out::Reply(_)) {
                        in_flight = in_flight.saturating_sub(1);
                    }
                }
                match (front.reopen)() {
                    Ok(l) => {
                        log::info!(
                            "{}: reopened after {:.1} s",
                            front.name,
                            since.elapsed().as_secs_f64()
                        );
                        front.link = l;
                        splitter = LineSplitter::default();
                        break;
                    }
                    Err(e) => log::debug!("{}: {e}", front.name),
                }
            }
        }
    }
    let _ = core.send(ToCore::Gone { id });
}
