//! HTTP/1.1 on the standard library's sockets: a bounded set of connection threads, each
//! reading requests with deadlines and size limits, parsed by `httparse`, answered with a
//! length-delimited body or a stream (MJPEG, Server-Sent Events) that ends the connection.
//!
//! Limits: request head 16 KiB and 32 headers (`431`), a body no larger than its route allows
//! (`413`, checked from `Content-Length` before a byte of it is read; chunked bodies are
//! refused with `411`), the head within 10 s of its first byte and the body within 60 s
//! (`408`), an idle keep-alive connection closed after 30 s, more than `max_connections` at
//! once answered `503`.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest request head (request line + headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers in a request.
pub const MAX_HEADERS: usize = 32;
/// Time to send a request head once its first byte arrived.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to send a request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// An idle keep-alive connection is closed after this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A response that the client does not take within this is abandoned.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// One request.
#[derive(Debug)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// Query parameters, percent-decoded.
    pub query: HashMap<String, String>,
    /// Headers by lower-case name (the last of repeated ones).
    pub headers: HashMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
    /// The client's address.
    pub peer: IpAddr,
}

impl Request {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// A cookie's value.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.header("cookie")?
            .split(';')
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// Writes a streamed response's body.
pub type StreamFn<'a> = dyn FnOnce(&mut TcpStream) -> std::io::Result<()> + Send + 'a;

/// A response body.
pub enum Body<'a> {
    /// Bytes, sent with their length.
    Bytes(Vec<u8>),
    /// Static bytes (the page's assets).
    Static(&'static [u8]),
    /// A stream written until it returns (an error, the client gone, or the end): sent without
    /// a length, and the connection closes after it.
    Stream(Box<StreamFn<'a>>),
}

/// A response.
pub struct Response<'a> {
    /// Status code.
    pub status: u16,
    /// Headers besides the length, connection and security ones.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Body<'a>,
}

impl<'a> Response<'a> {
    /// A response with `body` of `content_type`.
    pub fn new(status: u16, content_type: &str, body: Vec<u8>) -> Response<'a> {
        Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: Body::Bytes(body),
        }
    }

    /// A JSON response.
    pub fn json(status: u16, value: &serde_json::Value) -> Response<'a> {
        Response::new(status, "application/json", value.to_string().into_bytes())
    }

    /// A JSON error: `{"ok": false, "code": status, "error": message}`.
    pub fn error(status: u16, message: &str) -> Response<'a> {
        Response::json(
            status,
            &serde_json::json!({"ok": false, "code": status, "error": message}),
        )
    }

    /// Adds a header.
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Response<'a> {
        self.headers.push((name.into(), value.into()));
        self
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Status",
    }
}

/// Headers every response carries: the page is its own origin and nobody frames it.
const SECURITY_HEADERS: &str = "X-Content-Type-Options: nosniff\r\n\
X-Frame-Options: DENY\r\n\
Referrer-Policy: no-referrer\r\n\
Content-Security-Policy: default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'\r\n";

fn write_response(
    conn: &mut TcpStream,
    r: Response<'_>,
    keep_alive: bool,
) -> std::io::Result<bool> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status));
    for (k, v) in &r.headers {
        // Header values are ours; a newline in one would split the response.
        if k.contains(['\r', '\n']) || v.contains(['\r', '\n']) {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(SECURITY_HEADERS);
    match r.body {
        Body::Bytes(_) | Body::Static(_) => {
            let bytes: &[u8] = match &r.body {
                Body::Bytes(b) => b,
                Body::Static(b) => b,
                Body::Stream(_) => &[],
            };
            head.push_str(&format!("Content-Length: {}\r\n", bytes.len()));
            head.push_str(if keep_alive {
                "Connection: keep-alive\r\n\r\n"
            } else {
                "Connection: close\r\n\r\n"
            });
            conn.write_all(head.as_bytes())?;
            conn.write_all(bytes)?;
            conn.flush()?;
            Ok(keep_alive)
        }
        Body::Stream(f) => {
            head.push_str("Cache-Control: no-store\r\nConnection: close\r\n\r\n");
            conn.write_all(head.as_bytes())?;
            conn.flush()?;
            let _ = f(conn);
            Ok(false)
        }
    }
}

/// Reads bytes until `done(buffer)` says how far the wanted part goes, the buffer exceeds
/// `max` (`Err(431/413)`), the deadline passes (`Err(408)`), or the peer closes (`Ok(None)`).
enum ReadOutcome {
    Got,
    Closed,
    TooLarge,
    TimedOut,
}

fn read_until(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    deadline: Option<Instant>,
    idle_deadline: Instant,
    stop: &AtomicBool,
    done: impl Fn(&[u8]) -> bool,
) -> ReadOutcome {
    let mut chunk = [0u8; 8192];
    loop {
        if done(buf) {
            return ReadOutcome::Got;
        }
        if buf.len() > max {
            return ReadOutcome::TooLarge;
        }
        let now = Instant::now();
        if stop.load(Ordering::SeqCst) {
            return ReadOutcome::Closed;
        }
        match deadline {
            Some(d) if now >= d => return ReadOutcome::TimedOut,
            None if now >= idle_deadline => return ReadOutcome::Closed,
            _ => {}
        }
        match conn.read(&mut chunk) {
            Ok(0) => return ReadOutcome::Closed,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return ReadOutcome::Closed,
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// What the server needs from its application.
pub trait App: Sync {
    /// The largest body `method path` accepts (0: none).
    fn body_limit(&self, method: &str, path: &str) -> usize;
    /// Answers a request.
    fn handle(&self, req: Request) -> Response<'_>;
}

/// Limits of the server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; more get `503`.
    pub max_connections: usize,
    /// Connections from one client address at once; more get `503`.
    pub max_per_client: usize,
}

/// Serves `app` on `listener` until `stop` is set.
pub fn serve<A: App>(listener: TcpListener, app: &A, limits: &Limits, stop: &AtomicBool) {
    if let Err(e) = listener.set_nonblocking(true) {
        log::error!("HTTP listener: {e}");
        return;
    }
    let active = Arc::new(AtomicUsize::new(0));
    let per_client: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    std::thread::scope(|scope| {
        while !stop.load(Ordering::SeqCst) {
            let (mut conn, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => {
                    log::warn!("HTTP: accepting a connection: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            let setup = conn
                .set_nonblocking(false)
                .and_then(|()| conn.set_read_timeout(Some(Duration::from_millis(100))))
                .and_then(|()| conn.set_write_timeout(Some(WRITE_TIMEOUT)))
                .and_then(|()| conn.set_nodelay(true));
            if setup.is_err() {
                continue;
            }
            let ip = peer.ip();
            let mine = per_client
                .lock()
                .map_or(0, |m| m.get(&ip).copied().unwrap_or(0));
            if active.load(Ordering::SeqCst) >= limits.max_connections
                || mine >= limits.max_per_client
            {
                log::warn!(
                    "HTTP: {peer} refused: {} connections already ({mine} from it)",
                    active.load(Ordering::SeqCst)
                );
                let r = Response::error(503, "too many connections; try again later")
                    .with("Retry-After", "5");
                let _ = write_response(&mut conn, r, false);
                let _ = conn.shutdown(Shutdown::Both);
                continue;
            }
            active.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut m) = per_client.lock() {
                *m.entry(ip).or_default() += 1;
            }
            let active = Arc::clone(&active);
            let per_client = Arc::clone(&per_client);
            scope.spawn(move || {
                connection(conn, ip, app, stop);
                active.fetch_sub(1, Ordering::SeqCst);
                if let Ok(mut m) = per_client.lock() {
                    if let Some(n) = m.get_mut(&ip) {
                        *n -= 1;
                        if *n == 0 {
                            m.remove(&ip);
                        }
                    }
                }
            });
        }
    });
}

fn connection<A: App>(mut conn: TcpStream, peer: IpAddr, app: &A, stop: &AtomicBool) {
    let mut buf: Vec<u8> = Vec::new();
    let mut first = true;
    loop {
        // The head: a new connection sends its first one within HEAD_TIMEOUT; a kept-alive one
        // may idle for IDLE_TIMEOUT, then has HEAD_TIMEOUT from its first byte.
        let idle_deadline = Instant::now() + if first { HEAD_TIMEOUT } else { IDLE_TIMEOUT };
        first = false;
        // Its first byte (unless a pipelined request already sent some), then the rest.
        let started = if buf.is_empty() {
            read_until(
                &mut conn,
                &mut buf,
                MAX_HEAD,
                None,
                idle_deadline,
                stop,
                |b| !b.is_empty(),
            )
        } else {
            ReadOutcome::Got
        };
        let got = match started {
            ReadOutcome::Got => read_until(
                &mut conn,
                &mut buf,
                MAX_HEAD,
                Some(Instant::now() + HEAD_TIMEOUT),
                idle_deadline,
                stop,
                |b| find_head_end(b).is_some(),
            ),
            other => other,
        };
        let fail = |conn: &mut TcpStream, status: u16, message: &str| {
            let _ = write_response(conn, Response::error(status, message), false);
            let _ = conn.shutdown(Shutdown::Both);
        };
        match got {
            ReadOutcome::Got => {}
            ReadOutcome::Closed => return,
            ReadOutcome::TooLarge => return fail(&mut conn, 431, "request head too large"),
            ReadOutcome::TimedOut => return fail(&mut conn, 408, "request head not sent in time"),
        }
        let Some(head_end) = find_head_end(&buf) else {
            return fail(&mut conn, 431, "request head too large");
        };
        if head_end > MAX_HEAD {
            return fail(&mut conn, 431, "request head too large");
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf[..head_end]) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return fail(&mut conn, 400, "malformed request"),
            Err(httparse::Error::TooManyHeaders) => {
                return fail(&mut conn, 431, "too many headers")
            }
            Err(e) => return fail(&mut conn, 400, &format!("malformed request: {e}")),
        }
        let method = parsed.method.unwrap_or("").to_string();
        let target = parsed.path.unwrap_or("/").to_string();
        let http10 = parsed.version == Some(0);
        let mut map = HashMap::new();
        for h in parsed.headers.iter() {
            map.insert(
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            );
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (target.clone(), String::new()),
        };
        let query: HashMap<String, String> = query
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (decode(k), decode(v)),
                None => (decode(kv), String::new()),
            })
            .collect();
        if map.contains_key("transfer-encoding") {
            return fail(&mut conn, 411, "send the body with a Content-Length");
        }
        let length = match map.get("content-length").map(|v| v.trim().parse::<usize>()) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(_)) => return fail(&mut conn, 400, "bad Content-Length"),
        };
        let limit = app.body_limit(&method, &path);
        if length > limit {
            return fail(
                &mut conn,
                413,
                &format!("body of {length} bytes; {path} takes at most {limit}"),
            );
        }
        buf.drain(..head_end);
        let body_deadline = Instant::now() + BODY_TIMEOUT;
        match read_until(
            &mut conn,
            &mut buf,
            length,
            Some(body_deadline),
            body_deadline,
            stop,
            |b| b.len() >= length,
        ) {
            ReadOutcome::Got => {}
            ReadOutcome::Closed => return,
            ReadOutcome::TooLarge => return fail(&mut conn, 413, "body too large"),
            ReadOutcome::TimedOut => return fail(&mut conn, 408, "request body not sent in time"),
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        let keep_alive = !http10
            && !map
                .get("connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let req = Request {
            method,
            path,
            query,
            headers: map,
            body,
            peer,
        };
        let response = app.handle(req);
        match write_response(&mut conn, response, keep_alive) {
            Ok(true) if !stop.load(Ordering::SeqCst) => {}
            _ => {
                let _ = conn.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}
