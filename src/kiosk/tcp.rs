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

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::feed::Feed;
use super::hub::{Fronts, Out, ToCore};
use super::protocol::{err_line, Code, Input, LineSplitter, Request};
use super::server::Server;

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
    /// a time. Returns when stopped. (The TCP front alone of [`Server::run`].)
    pub fn serve_tcp(
        &mut self,
        listener: TcpListener,
        tcp: &TcpOptions,
        stop: &AtomicBool,
    ) -> std::io::Result<()> {
        let fronts = Fronts {
            tcp: Some((listener, tcp.clone())),
            ..Fronts::default()
        };
        self.run(fronts, Arc::new(Feed::new(1.0, 320, 75)), stop);
        Ok(())
    }
}

/// Accepts TCP clients until `stop` is set: a reader and a writer thread each, their requests
/// to `core`.
#[allow(clippy::too_many_arguments)]
pub(super) fn accept<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    listener: TcpListener,
    tcp: &'scope TcpOptions,
    core: Sender<ToCore>,
    ids: &'scope AtomicU64,
    stop: &'scope AtomicBool,
    line_timeout: Duration,
    max_queue: usize,
) {
    if let Err(e) = listener.set_nonblocking(true) {
        log::error!("TCP listener: {e}");
        return;
    }
    let started = Instant::now();
    let active = Arc::new(AtomicUsize::new(0));
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
        let id = ids.fetch_add(1, Ordering::SeqCst) + 1;
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
        if core
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
        let core = core.clone();
        let active = Arc::clone(&active);
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
