//! The kiosk's web page (`graft serve --http`): live view, classes, capture and upload, train,
//! files — served from the binary (no CDN, works offline) with an HTTP JSON API that the page
//! itself uses (docs/HTTP.md). Owns `httparse` (request parsing, `http.rs`) and
//! `percent-encoding`; speaks to the kiosk only through [`crate::kiosk::Handle`], so every
//! request runs on the kiosk's one queue beside the serial and TCP clients.

pub mod auth;
pub mod http;

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{json, Map, Value};

use self::auth::{Auth, Refused, Who, COOKIE, CSRF_HEADER};
use self::http::{Request, Response};
use crate::capture::Frame;
use crate::head::Label;
use crate::kiosk::report::EvalData;
use crate::kiosk::{Body, Done, Handle, Op, Reply, Secret};
use crate::store::export::Format;

const INDEX: &[u8] = include_bytes!("assets/index.html");
const SCRIPT: &[u8] = include_bytes!("assets/app.js");
const STYLE: &[u8] = include_bytes!("assets/app.css");
const ICON: &[u8] = include_bytes!("assets/icon.svg");

/// Web server settings.
#[derive(Debug, Clone)]
pub struct WebOptions {
    /// HTTP connections at once (each preview or event stream holds one).
    pub max_connections: usize,
    /// HTTP connections from one client address at once (a browser opens up to 6).
    pub max_per_client: usize,
    /// Preview and event streams at once.
    pub max_streams: usize,
    /// Largest uploaded photo, in bytes.
    pub max_upload: usize,
    /// Largest backup restored, in bytes.
    pub max_restore: usize,
    /// Longest wait for the kiosk to answer one request (a LEARN of many frames, a refit).
    pub call_timeout: Duration,
    /// Longest side of an uploaded photo as stored (larger ones are scaled down first).
    pub upload_side: u32,
    /// Frames a held capture button takes at most.
    pub max_burst: u32,
}

impl Default for WebOptions {
    fn default() -> Self {
        WebOptions {
            max_connections: 16,
            max_per_client: 8,
            max_streams: 8,
            max_upload: 16 << 20,
            max_restore: 256 << 20,
            call_timeout: Duration::from_secs(120),
            upload_side: 1280,
            max_burst: 50,
        }
    }
}

/// Body limit of JSON requests.
const MAX_JSON: usize = 4096;

struct App<'a> {
    handle: Handle,
    auth: Auth,
    options: WebOptions,
    streams: AtomicUsize,
    burst: AtomicU64,
    stop: &'a AtomicBool,
}

/// Serves the page and its API on `listener` until `stop` is set; logins prove `secret`.
pub fn serve(
    listener: TcpListener,
    handle: Handle,
    secret: Secret,
    options: &WebOptions,
    stop: &AtomicBool,
) {
    let app = App {
        handle,
        auth: Auth::new(secret),
        options: options.clone(),
        streams: AtomicUsize::new(0),
        burst: AtomicU64::new(0),
        stop,
    };
    let limits = http::Limits {
        max_connections: options.max_connections,
        max_per_client: options.max_per_client,
    };
    http::serve(listener, &app, &limits, stop);
}

/// A field value as JSON: numbers as numbers, `a,b` lists (labels, counts) as arrays.
fn field_value(key: &str, v: &str) -> Value {
    if matches!(key, "labels" | "counts" | "verbs") {
        let items = v.split(',').filter(|s| !s.is_empty());
        return Value::Array(
            items
                .map(|s| s.parse::<i64>().map_or_else(|_| json!(s), |n| json!(n)))
                .collect(),
        );
    }
    if let Ok(n) = v.parse::<i64>() {
        return json!(n);
    }
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && !v.starts_with(['+', '.']) => json!(x),
        _ => json!(v),
    }
}

/// A kiosk reply as an HTTP response: its fields as a JSON object, its code as the status.
fn respond(r: Reply, download: Option<&str>) -> Response<'static> {
    match r.result {
        Err((code, message)) => Response::error(code.number(), &message),
        Ok(done) => match done.body {
            Body::Bytes {
                content_type,
                bytes,
            } => {
                let resp = Response::new(200, content_type, bytes);
                match download {
                    Some(name) => resp.with(
                        "Content-Disposition",
                        format!("attachment; filename=\"{name}\""),
                    ),
                    None => resp.with("Cache-Control", "private, max-age=60"),
                }
            }
            Body::Classes(classes) => Response::json(
                200,
                &json!({"ok": true, "classes": classes.iter().map(|c| json!({
                    "label": c.label, "count": c.files.len(), "files": c.files,
                })).collect::<Vec<_>>()}),
            ),
            Body::Evaluation(_) => Response::error(500, "an evaluation snapshot is not a reply"),
            Body::None => {
                let mut m = Map::new();
                m.insert("ok".into(), json!(true));
                for f in &done.fields {
                    m.insert(f.0.clone(), field_value(&f.0, &f.1));
                }
                Response::json(200, &Value::Object(m))
            }
        },
    }
}

fn asset(bytes: &'static [u8], kind: &str) -> Response<'static> {
    Response {
        status: 200,
        headers: vec![
            ("Content-Type".into(), kind.into()),
            ("Cache-Control".into(), "no-cache".into()),
        ],
        body: http::Body::Static(bytes),
    }
}

/// The JSON object a request sent, or a 400.
fn object(req: &Request) -> Result<Map<String, Value>, Response<'static>> {
    match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Response::error(400, "send a JSON object")),
    }
}

fn text<'m>(m: &'m Map<String, Value>, key: &str) -> Result<&'m str, Response<'static>> {
    m.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| Response::error(400, &format!("{key:?} (text) is missing")))
}

fn label(s: &str) -> Result<Label, Response<'static>> {
    Label::new(s).map_err(|e| Response::error(400, &e.to_string()))
}

impl App<'_> {
    fn call(&self, op: Op) -> Reply {
        self.handle.call(op, self.options.call_timeout)
    }

    fn line(&self, line: String) -> Response<'static> {
        respond(self.call(Op::Line(line)), None)
    }

    /// Who sent `req`; `Err` is the response for a refused secret.
    fn who(&self, req: &Request) -> Result<Who, Response<'static>> {
        if let Some(given) = req
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
        {
            return match self.auth.check(req.peer, given.trim()) {
                Ok(()) => Ok(Who::Bearer),
                Err(r) => Err(refused(r)),
            };
        }
        Ok(req
            .cookie(COOKIE)
            .and_then(|id| self.auth.session(id))
            .map_or(Who::Anonymous, |csrf| Who::Session { csrf }))
    }

    fn streams(&self) -> Option<StreamSlot<'_>> {
        let n = self.streams.fetch_add(1, Ordering::SeqCst);
        let slot = StreamSlot(&self.streams);
        (n < self.options.max_streams).then_some(slot)
    }

    fn api(&self, req: &Request, who: &Who) -> Response<'_> {
        let body = || object(req);
        let result: Result<Response<'_>, Response<'_>> = (|| {
            Ok(match (req.method.as_str(), req.path.as_str()) {
                ("GET", "/api/session") => match who {
                    Who::Session { csrf } => {
                        Response::json(200, &json!({"ok": true, "csrf": csrf}))
                    }
                    _ => Response::json(200, &json!({"ok": true, "csrf": null})),
                },
                ("GET", "/api/info") => self.line("INFO".into()),
                ("GET", "/api/classes") => respond(self.call(Op::Examples), None),
                ("GET", "/api/example") => {
                    let l = label(req.query.get("label").map_or("", String::as_str))?;
                    let file = req.query.get("file").cloned().unwrap_or_default();
                    respond(self.call(Op::ExampleFrame { label: l, file }), None)
                }
                ("GET", "/api/export.onnx") => respond(
                    self.call(Op::Export(Format::Onnx)),
                    Some("graft-export.onnx"),
                ),
                ("GET", "/api/export.json") => {
                    respond(self.call(Op::Export(Format::Json)), Some("graft-head.json"))
                }
                ("GET", "/api/plots/confusion.svg") => self.picture(|d| d.confusion_svg()),
                ("GET", "/api/plots/curve.svg") => self.picture(|d| d.curve_svg()),
                ("GET", "/api/backup") => respond(self.call(Op::Backup), Some("graft-backup.tar")),
                ("POST", "/api/restore") => {
                    let kind = req.header("content-type").unwrap_or("");
                    if kind != "application/x-tar" {
                        return Err(Response::error(
                            415,
                            "send the backup itself as the body, Content-Type application/x-tar",
                        ));
                    }
                    respond(self.call(Op::Restore(req.body.clone())), None)
                }
                ("GET", "/api/events") => self.events(session(req, who)),
                ("GET", "/api/preview.mjpg") => self.preview(session(req, who)),
                ("POST", "/api/classify") => self.line("CLASSIFY".into()),
                ("POST", "/api/train") => self.line("TRAIN".into()),
                ("POST", "/api/learn") => {
                    let m = body()?;
                    let l = label(text(&m, "label")?)?;
                    let n = m.get("n").and_then(Value::as_u64).unwrap_or(1);
                    if !(1..=100).contains(&n) {
                        return Err(Response::error(400, "n must be 1 to 100 frames"));
                    }
                    self.line(format!("LEARN {l} {n}"))
                }
                ("POST", "/api/burst") => {
                    let m = body()?;
                    let l = label(text(&m, "label")?)?;
                    let burst = self.handle.new_burst();
                    self.burst.store(burst, Ordering::SeqCst);
                    respond(
                        self.call(Op::Burst {
                            label: l,
                            max: self.options.max_burst,
                            burst,
                        }),
                        None,
                    )
                }
                ("POST", "/api/burst/stop") => {
                    self.handle.stop_burst(self.burst.load(Ordering::SeqCst));
                    Response::json(200, &json!({"ok": true}))
                }
                ("POST", "/api/upload") => {
                    let l = label(req.query.get("label").map_or("", String::as_str))?;
                    let kind = req.header("content-type").unwrap_or("");
                    if !kind.starts_with("image/") {
                        return Err(Response::error(
                            415,
                            "send the photo itself as the body, with an image/* Content-Type",
                        ));
                    }
                    let name = req
                        .query
                        .get("name")
                        .map_or("an uploaded photo".to_string(), |n| format!("upload {n:?}"));
                    let mut frame = Frame::from_bytes(&req.body, &name)
                        .map_err(|e| Response::error(400, &e.to_string()))?;
                    frame.image = frame.image.thumbnail(self.options.upload_side);
                    respond(
                        self.call(Op::Upload {
                            label: l,
                            frames: vec![frame],
                        }),
                        None,
                    )
                }
                ("POST", "/api/forget") => {
                    let m = body()?;
                    let l = label(text(&m, "label")?)?;
                    self.line(format!("FORGET {l}"))
                }
                ("POST", "/api/rename") => {
                    let m = body()?;
                    let from = label(text(&m, "from")?)?;
                    let to = label(text(&m, "to")?)?;
                    respond(self.call(Op::Rename { from, to }), None)
                }
                ("POST", "/api/delete-example") => {
                    let m = body()?;
                    let l = label(text(&m, "label")?)?;
                    let file = text(&m, "file")?.to_string();
                    respond(self.call(Op::DeleteExample { label: l, file }), None)
                }
                ("POST", "/api/threshold") => {
                    let m = body()?;
                    let t = m
                        .get("value")
                        .and_then(Value::as_f64)
                        .filter(|t| (0.0..=1.0).contains(t))
                        .ok_or_else(|| {
                            Response::error(400, "value must be a number from 0 to 1")
                        })?;
                    self.line(format!("THRESHOLD {t:.3}"))
                }
                ("POST", "/api/logout") => {
                    if let Some(id) = req.cookie(COOKIE) {
                        self.auth.logout(id);
                    }
                    Response::json(200, &json!({"ok": true})).with(
                        "Set-Cookie",
                        format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
                    )
                }
                (_, p) if known(p) => Response::error(405, "method not allowed"),
                _ => Response::error(404, "no such API"),
            })
        })();
        result.unwrap_or_else(|r| r)
    }

    /// An evaluation picture, drawn on this thread from a snapshot the queue hands out.
    fn picture(
        &self,
        draw: impl Fn(&EvalData) -> Result<String, crate::kiosk::KioskError>,
    ) -> Response<'static> {
        let r = self.call(Op::Evaluation);
        match r.result {
            Ok(Done {
                body: Body::Evaluation(d),
                ..
            }) => match draw(&d) {
                Ok(svg) => Response::new(200, "image/svg+xml", svg.into_bytes())
                    .with("Cache-Control", "no-store"),
                Err(e) => Response::error(409, &e.to_string()),
            },
            other => respond(Reply { result: other, ..r }, None),
        }
    }

    /// Whether a stream opened by `session` may go on (its browser has not logged out).
    fn alive(&self, session: Option<&str>) -> bool {
        !self.stop.load(Ordering::SeqCst) && session.is_none_or(|id| self.auth.alive(id))
    }

    fn events(&self, session: Option<String>) -> Response<'_> {
        let Some(slot) = self.streams() else {
            return Response::error(503, "too many live views open");
        };
        let stream = move |conn: &mut std::net::TcpStream| -> std::io::Result<()> {
            let _slot = slot;
            let feed = self.handle.feed();
            let _watching = feed.watch();
            let mut after = feed.last_event();
            conn.write_all(b"retry: 2000\n\n")?;
            conn.flush()?;
            while self.alive(session.as_deref()) {
                let (next, events) = feed.next_events(after, Duration::from_secs(1));
                let mut out = String::new();
                for e in &events {
                    out.push_str("data: ");
                    out.push_str(e);
                    out.push_str("\n\n");
                }
                if events.is_empty() {
                    // A comment: finds a client that has gone.
                    out.push_str(": -\n\n");
                }
                after = next;
                conn.write_all(out.as_bytes())?;
                conn.flush()?;
            }
            Ok(())
        };
        Response {
            status: 200,
            headers: vec![("Content-Type".into(), "text/event-stream".into())],
            body: http::Body::Stream(Box::new(stream)),
        }
    }

    fn preview(&self, session: Option<String>) -> Response<'_> {
        let Some(slot) = self.streams() else {
            return Response::error(503, "too many live views open");
        };
        let stream = move |conn: &mut std::net::TcpStream| -> std::io::Result<()> {
            let _slot = slot;
            let feed = self.handle.feed();
            let _watching = feed.view();
            let mut seen = 0;
            while self.alive(session.as_deref()) {
                let Some((seq, jpeg)) = feed.next_jpeg(seen, Duration::from_secs(1)) else {
                    continue;
                };
                seen = seq;
                let head = format!(
                    "--graftframe\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
                    jpeg.len()
                );
                conn.write_all(head.as_bytes())?;
                conn.write_all(&jpeg)?;
                conn.write_all(b"\r\n")?;
                conn.flush()?;
            }
            Ok(())
        };
        Response {
            status: 200,
            headers: vec![(
                "Content-Type".into(),
                "multipart/x-mixed-replace; boundary=graftframe".into(),
            )],
            body: http::Body::Stream(Box::new(stream)),
        }
    }
}

/// The session cookie of a browser's request (`None` for a bearer secret).
fn session(req: &Request, who: &Who) -> Option<String> {
    match who {
        Who::Session { .. } => req.cookie(COOKIE).map(str::to_string),
        _ => None,
    }
}

/// A preview or event stream's place among the `max_streams`.
struct StreamSlot<'a>(&'a AtomicUsize);

impl Drop for StreamSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn known(path: &str) -> bool {
    matches!(
        path,
        "/api/session"
            | "/api/info"
            | "/api/classes"
            | "/api/example"
            | "/api/export.onnx"
            | "/api/export.json"
            | "/api/events"
            | "/api/backup"
            | "/api/plots/confusion.svg"
            | "/api/plots/curve.svg"
            | "/api/restore"
            | "/api/preview.mjpg"
            | "/api/classify"
            | "/api/train"
            | "/api/learn"
            | "/api/burst"
            | "/api/burst/stop"
            | "/api/upload"
            | "/api/forget"
            | "/api/rename"
            | "/api/delete-example"
            | "/api/threshold"
            | "/api/logout"
            | "/api/login"
    )
}

fn refused(r: Refused) -> Response<'static> {
    match r {
        Refused::Wrong => Response::error(403, "wrong secret"),
        Refused::Wait(w) => Response::error(429, "too many wrong secrets; wait a minute")
            .with("Retry-After", w.as_secs().max(1).to_string()),
    }
}

impl http::App for App<'_> {
    fn body_limit(&self, method: &str, path: &str) -> usize {
        match (method, path) {
            ("POST", "/api/upload") => self.options.max_upload,
            ("POST", "/api/restore") => self.options.max_restore,
            ("POST", _) => MAX_JSON,
            _ => 0,
        }
    }

    fn handle(&self, req: Request) -> Response<'_> {
        let state_change = req.method != "GET" && req.method != "HEAD";
        // A request another site's page made the browser send carries that site's Origin:
        // refused before anything else (the CSRF token and SameSite cookie stop it too).
        if state_change {
            if let Some(origin) = req.header("origin") {
                let host = req.header("host").unwrap_or("");
                let same = origin
                    .split_once("://")
                    .is_some_and(|(_, h)| h.eq_ignore_ascii_case(host));
                if !same {
                    return Response::error(403, "cross-origin request refused");
                }
            }
        }
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/") | ("GET", "/index.html") => {
                return asset(INDEX, "text/html; charset=utf-8")
            }
            ("GET", "/app.js") => return asset(SCRIPT, "text/javascript; charset=utf-8"),
            ("GET", "/app.css") => return asset(STYLE, "text/css; charset=utf-8"),
            ("GET", "/icon.svg") => return asset(ICON, "image/svg+xml"),
            ("GET", "/api/health") => return Response::json(200, &json!({"ok": true})),
            ("POST", "/api/login") => {
                let given = match object(&req) {
                    Ok(m) => m
                        .get("secret")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    Err(r) => return r,
                };
                return match self.auth.login(req.peer, &given) {
                    Ok((id, csrf)) => Response::json(200, &json!({"ok": true, "csrf": csrf})).with(
                        "Set-Cookie",
                        format!(
                            "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
                            auth::SESSION_IDLE.as_secs()
                        ),
                    ),
                    Err(r) => refused(r),
                };
            }
            _ => {}
        }
        if !req.path.starts_with("/api/") {
            return Response::error(404, "not found");
        }
        let who = match self.who(&req) {
            Ok(w) => w,
            Err(r) => return r,
        };
        match &who {
            Who::Anonymous if req.path == "/api/session" => {}
            Who::Anonymous => return Response::error(401, "log in first (the kiosk's secret)"),
            Who::Session { csrf } if state_change => {
                let sent = req.header(CSRF_HEADER).unwrap_or("");
                if !auth::same_token(sent, csrf) {
                    return Response::error(403, "missing or wrong CSRF token");
                }
            }
            _ => {}
        }
        self.api(&req, &who)
    }
}
