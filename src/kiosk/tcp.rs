//! Serving the protocol to several TCP clients at once.
//!
//! ```text
//! acceptor thread ── accepts, refuses beyond max_clients, starts ─┐
//! per client: reader thread ── lines ─┐                           │
//!             writer thread ◀─ replies, events ─┐                 │
//! caller's thread: one queue of requests ───────┴─ Server::answer, stream ticks (one at a time)
//! ```
//!
//! The reader stops reading while the client has `max_queue` replies not yet written (so a
//! client that floods and never reads holds memory bounded by one read), answers a partial
//! line left hanging with `ERR 408`, and closes a client silent for `idle_timeout`. The writer
//! closes a client that has not read its replies within `write_timeout`.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::protocol::{err_line, Code, Input, LineSplitter, Request};
use super::server::{Answer, Deferred, Server, Session};
use crate::store::learn::{Fitted, LearnError};
use crate::store::StoreError;

/// Which TCP clients need `AUTH` before changing the kiosk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Clients on this machine (loopback) are trusted; others must `AUTH`.
    Loopback,
    /// Every client must `AUTH`.
    Nobody,
    /// Every client is trusted (`--insecure`: protocol version 1 behaviour).
    Everyone,
}

/// TCP serving limits.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// Clients served at once; more are answered `ERR 503` and closed.
    pub max_clients: usize,
    /// A client that sends nothing (and is not streaming) for this long is closed.
    pub idle_timeout: Duration,
    /// A client that does not take a reply within this long is closed.
    pub write_timeout: Duration,
    /// Who must `AUTH`.
    pub trust: Trust,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            max_clients: 8,
            idle_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(5),
            trust: Trust::Loopback,
        }
    }
}

enum ToCore {
    Open {
        id: u64,
        trusted: bool,
        out: Sender<Out>,
    },
    Input {
        id: u64,
        input: Input,
    },
    /// A reply the reader made itself (429, 408): through the queue, so that replies keep the
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
}

enum Out {
    Reply(String),
    Event(String),
    Close,
}

/// What a connection's reader and writer share.
struct Conn {
    /// Replies queued but not yet written.
    in_flight: AtomicUsize,
    /// Milliseconds since the server started at the last event written.
    last_event_ms: AtomicU64,
    closed: AtomicBool,
}

impl Server {
    /// Serves clients of `listener` until `stop` is set; requests run on this thread, one at
    /// a time. Returns when stopped.
    pub fn serve_tcp(
        &mut self,
        listener: TcpListener,
        tcp: &TcpOptions,
        stop: &AtomicBool,
    ) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let started = Instant::now();
        let active = AtomicUsize::new(0);
        let (core_tx, core_rx) = mpsc::channel::<ToCore>();
        let line_timeout = self.options.line_timeout;
        let max_queue = self.options.max_queue;
        std::thread::scope(|scope| {
            let acceptor_tx = core_tx.clone();
            let active = &active;
            scope.spawn(move || {
                let mut next_id = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let (conn, peer) = match listener.accept() {
                        Ok(c) => c,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                        Err(e) => {
                            // Out of file descriptors and the like: keep serving the others.
                            log::warn!("accepting a connection: {e}");
                            std::thread::sleep(Duration::from_millis(200));
                            continue;
                        }
                    };
                    if active.load(Ordering::SeqCst) >= tcp.max_clients {
                        log::warn!("client {peer} refused: {} clients already", tcp.max_clients);
                        refuse(conn, tcp.max_clients);
                        continue;
                    }
                    if let Err(e) = setup(&conn, tcp) {
                        log::warn!("client {peer}: {e}; dropped");
                        continue;
                    }
                    let Ok(writer) = conn.try_clone() else {
                        continue;
                    };
                    next_id += 1;
                    let id = next_id;
                    let trusted = match tcp.trust {
                        Trust::Everyone => true,
                        Trust::Nobody => false,
                        Trust::Loopback => peer.ip().is_loopback(),
                    };
                    log::info!(
                        "client {peer} connected{}",
                        if trusted {
                            ""
                        } else {
                            " (must AUTH to change the kiosk)"
                        }
                    );
                    active.fetch_add(1, Ordering::SeqCst);
                    let shared = Arc::new(Conn {
                        in_flight: AtomicUsize::new(0),
                        last_event_ms: AtomicU64::new(0),
                        closed: AtomicBool::new(false),
                    });
                    let (out_tx, out_rx) = mpsc::channel::<Out>();
                    if acceptor_tx
                        .send(ToCore::Open {
                            id,
                            trusted,
                            out: out_tx,
                        })
                        .is_err()
                    {
                        return;
                    }
                    let w = Arc::clone(&shared);
                    scope.spawn(move || write_loop(writer, out_rx, &w, started));
                    let core = acceptor_tx.clone();
                    scope.spawn(move || {
                        let reader = Reader {
                            id,
                            conn,
                            shared,
                            core,
                            started,
                        };
                        reader.run(stop, line_timeout, max_queue, tcp.idle_timeout);
                        active.fetch_sub(1, Ordering::SeqCst);
                        log::info!("client {peer} gone");
                    });
                }
            });
            drop(core_tx);
            self.run_queue(&core_rx, stop);
        });
        Ok(())
    }

    /// Runs requests from every client, in arrival order, and their streams. A refit (LEARN,
    /// TRAIN, FORGET) runs on a thread of its own: meanwhile the other clients' reads are
    /// answered with the previous head, and state changes (and everything the refitting client
    /// sends) wait their turn.
    fn run_queue(&mut self, rx: &mpsc::Receiver<ToCore>, stop: &AtomicBool) {
        let mut q = Queue {
            sessions: HashMap::new(),
            held: VecDeque::new(),
            busy: None,
        };
        while !stop.load(Ordering::SeqCst) {
            q.poll_fit(self);
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(msg) => q.handle(self, msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            for (session, out) in q.sessions.values_mut() {
                if let Some(evt) = self.stream_tick(session) {
                    let _ = out.send(Out::Event(evt));
                }
            }
        }
        // Dropping the sessions drops their senders: the writers finish.
    }
}

/// A refit running on its own thread, and the reply waiting for it.
struct Busy {
    id: u64,
    deferred: Box<Deferred>,
    rx: mpsc::Receiver<Result<Fitted, LearnError>>,
}

/// The request queue's state on the serving thread.
struct Queue {
    sessions: HashMap<u64, (Session, Sender<Out>)>,
    /// Messages waiting for the refit in progress, in arrival order.
    held: VecDeque<ToCore>,
    busy: Option<Busy>,
}

impl Queue {
    /// Whether `msg` must wait for the refit in progress: a state change, or anything from a
    /// client that already has a request waiting (its replies keep their order).
    fn must_wait(&self, msg: &ToCore) -> bool {
        let Some(busy) = &self.busy else {
            return false;
        };
        let (id, changes) = match msg {
            ToCore::Input { id, input } => (
                *id,
                matches!(input, Input::Line(l)
                    if Request::parse(l).is_ok_and(|r| r.verb.changes_state())),
            ),
            ToCore::Reply { id, .. } => (*id, false),
            ToCore::Open { .. } | ToCore::Gone { .. } => return false,
        };
        changes
            || busy.id == id
            || self.held.iter().any(|m| match m {
                ToCore::Input { id: h, .. } | ToCore::Reply { id: h, .. } => *h == id,
                _ => false,
            })
    }

    fn handle(&mut self, server: &mut Server, msg: ToCore) {
        if self.must_wait(&msg) {
            self.held.push_back(msg);
            return;
        }
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
                    Answer::Now(line) => {
                        let _ = out.send(Out::Reply(line));
                        if session.closing() {
                            let _ = out.send(Out::Close);
                            self.sessions.remove(&id);
                        }
                    }
                    Answer::Later(mut deferred) => {
                        let (tx, rx) = mpsc::channel();
                        if let Some(job) = deferred.job.take() {
                            std::thread::spawn(move || {
                                let _ = tx.send(job.run());
                            });
                        }
                        self.busy = Some(Busy { id, deferred, rx });
                    }
                }
            }
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
    }

    /// Finishes a refit that is done: installs it, replies, then runs what waited for it.
    fn poll_fit(&mut self, server: &mut Server) {
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
        let Some(Busy { id, deferred, .. }) = self.busy.take() else {
            return;
        };
        match self.sessions.get_mut(&id) {
            Some((session, out)) => {
                let line = server.finish(session, *deferred, fitted);
                let _ = out.send(Out::Reply(line));
            }
            None => {
                // The client left; the change it asked for is committed all the same.
                let _ = server.finish(&mut Session::trusted(), *deferred, fitted);
            }
        }
        while self.busy.is_none() {
            let Some(msg) = self.held.pop_front() else {
                break;
            };
            self.handle(server, msg);
        }
    }
}

fn setup(conn: &TcpStream, tcp: &TcpOptions) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_millis(50)))?;
    conn.set_write_timeout(Some(tcp.write_timeout))?;
    conn.set_nodelay(true)
}

fn refuse(mut conn: TcpStream, max: usize) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
    let line = err_line(
        None,
        false,
        Code::Camera,
        &format!("{max} clients are connected already; try again later"),
    );
    let _ = conn.write_all(format!("{line}\n").as_bytes());
    let _ = conn.shutdown(Shutdown::Both);
}

fn write_loop(mut conn: TcpStream, rx: mpsc::Receiver<Out>, shared: &Conn, started: Instant) {
    for out in rx.iter() {
        let (line, reply) = match out {
            Out::Reply(l) => (l, true),
            Out::Event(l) => (l, false),
            Out::Close => break,
        };
        let mut bytes = line.into_bytes();
        bytes.push(b'\n');
        // A reply stops counting as waiting before it is written, not after: a client that
        // has read its reply and sends the next requests at once must find the room it freed
        // (under load, the writer was sometimes preempted between the write and the count,
        // and such a client's 32nd pipelined request was refused). A blocked write therefore
        // lets the reader take at most one request more.
        if reply {
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        if let Err(e) = conn.write_all(&bytes) {
            log::warn!("client does not take its replies ({e}): closing");
            break;
        }
        if !reply {
            let ms = started.elapsed().as_millis() as u64;
            shared.last_event_ms.store(ms, Ordering::SeqCst);
        }
    }
    shared.closed.store(true, Ordering::SeqCst);
    let _ = conn.shutdown(Shutdown::Both);
}

struct Reader {
    id: u64,
    conn: TcpStream,
    shared: Arc<Conn>,
    core: Sender<ToCore>,
    started: Instant,
}

impl Reader {
    fn reply(&self, id: Option<&str>, code: Code, message: &str, close: bool) {
        self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let _ = self.core.send(ToCore::Reply {
            id: self.id,
            line: err_line(id, false, code, message),
            close,
        });
    }

    fn run(mut self, stop: &AtomicBool, line_timeout: Duration, max_queue: usize, idle: Duration) {
        let mut splitter = LineSplitter::default();
        let mut buf = [0u8; 4096];
        let mut last_in = Instant::now();
        while !stop.load(Ordering::SeqCst) && !self.shared.closed.load(Ordering::SeqCst) {
            if self.shared.in_flight.load(Ordering::SeqCst) >= max_queue {
                // The client has not taken its replies: read no more until it does (or the
                // writer gives up on it).
                std::thread::sleep(Duration::from_millis(10));
                last_in = Instant::now();
                continue;
            }
            match self.conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    last_in = Instant::now();
                    // As on a serial link: of the requests that arrive together, those beyond
                    // the room left are refused.
                    let room =
                        max_queue.saturating_sub(self.shared.in_flight.load(Ordering::SeqCst));
                    for (i, input) in splitter.push(&buf[..n]).into_iter().enumerate() {
                        if i >= room {
                            let id = match &input {
                                Input::Line(l) => Request::parse(l).ok().and_then(|r| r.id),
                                Input::TooLong => None,
                            };
                            self.reply(
                                id.as_deref(),
                                Code::Busy,
                                &format!(
                                    "more than {max_queue} requests waiting; this one was not run"
                                ),
                                false,
                            );
                            continue;
                        }
                        self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
                        if self
                            .core
                            .send(ToCore::Input { id: self.id, input })
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::TimedOut | ErrorKind::WouldBlock | ErrorKind::Interrupted
                    ) => {}
                Err(_) => break,
            }
            if splitter.pending() && last_in.elapsed() >= line_timeout {
                splitter.expire();
                self.reply(
                    None,
                    Code::Timeout,
                    &format!(
                        "partial line dropped after {} ms of silence",
                        line_timeout.as_millis()
                    ),
                    false,
                );
            }
            let event_ms = self.shared.last_event_ms.load(Ordering::SeqCst);
            let since_event = self
                .started
                .elapsed()
                .saturating_sub(Duration::from_millis(event_ms));
            let waiting = self.shared.in_flight.load(Ordering::SeqCst) > 0;
            if !waiting && last_in.elapsed() >= idle && since_event >= idle {
                self.reply(
                    None,
                    Code::Timeout,
                    &format!("idle for {} s: closing", idle.as_secs()),
                    true,
                );
                // The writer closes the connection once the reply is out.
                return;
            }
        }
        let _ = self.core.send(ToCore::Gone { id: self.id });
        let _ = self.conn.shutdown(Shutdown::Read);
    }
}
