//! The kiosk line protocol, version 2 (version 1 plus `AUTH`): parsing requests and formatting replies. Pure code, no
//! I/O; `docs/PROTOCOL.md` is its specification and a test runs that document's examples.
//!
//! ```text
//! request  := [ "#" ID " " ] VERB { " " ARG } [ "*" XX ] ( "\n" | "\r\n" )
//! reply    := ( "OK" | "ERR " CODE ) [ " #" ID ] { " " FIELD } [ "*" XX ] "\n"
//! event    := "EVT" { " " FIELD } "\n"
//! ```
//!
//! `XX` is the XOR of every byte before the `*`, as two hex digits (NMEA style). A request that
//! carries one gets its reply with one.

use std::fmt;

use crate::head::Label;

/// Protocol version, reported by `INFO`.
pub const VERSION: u32 = 2;
/// Length of an `AUTH` response: an HMAC-SHA256, as lowercase hex.
pub const AUTH_RESPONSE_LEN: usize = 64;
/// Longest request line accepted, in bytes (without the line end).
pub const MAX_LINE: usize = 256;
/// Longest request id.
pub const MAX_ID: usize = 16;

/// Error codes of `ERR` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// 400: malformed request or argument.
    BadRequest,
    /// 401: checksum does not match.
    Checksum,
    /// 403: this verb needs `AUTH` first on this link.
    Forbidden,
    /// 404: unknown verb.
    UnknownVerb,
    /// 408: a partial line followed by silence.
    Timeout,
    /// 409: not possible in the current state (no head yet, wrong confirmation token).
    Conflict,
    /// 413: line longer than [`MAX_LINE`].
    TooLong,
    /// 415: not UTF-8 / not printable text.
    Encoding,
    /// 429: too many requests queued at once.
    Busy,
    /// 500: failure inside graft (a file could not be written, ...).
    Internal,
    /// 503: no frame could be captured, or no room for another client.
    Camera,
    /// 507: the disk is full: nothing was changed.
    NoSpace,
}

impl Code {
    /// The number sent on the wire.
    pub fn number(self) -> u16 {
        match self {
            Code::BadRequest => 400,
            Code::Checksum => 401,
            Code::Forbidden => 403,
            Code::UnknownVerb => 404,
            Code::Timeout => 408,
            Code::Conflict => 409,
            Code::TooLong => 413,
            Code::Encoding => 415,
            Code::Busy => 429,
            Code::Internal => 500,
            Code::Camera => 503,
            Code::NoSpace => 507,
        }
    }
}

/// A request's verb and arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum Verb {
    /// Liveness.
    Ping,
    /// Version, model, head, labels, threshold.
    Info,
    /// Capture a frame and classify it.
    Classify,
    /// Capture `n` frames as examples of `label` and add them.
    Learn {
        /// Class name.
        label: Label,
        /// Frames.
        n: u32,
    },
    /// Refit (choosing the head type by cross-validation) and report CV accuracy.
    Train,
    /// Class names and example counts.
    Labels,
    /// Remove a class and its examples.
    Forget {
        /// Class name.
        label: Label,
    },
    /// Show (`None`) or set the rejection threshold.
    Threshold(Option<f32>),
    /// Make sure everything is on disk.
    Save,
    /// Forget everything; without a token it returns one to confirm with.
    Reset(Option<String>),
    /// Start / stop periodic `EVT` results (with an optional period in ms).
    Stream {
        /// On or off.
        on: bool,
        /// Milliseconds between frames (0: as fast as frames come).
        period_ms: Option<u32>,
    },
    /// The verbs.
    Help,
    /// Without an argument: a fresh challenge. With one: the response to it, the HMAC-SHA256 of
    /// the challenge keyed with the kiosk's secret, as lowercase hex.
    Auth(Option<String>),
}

impl Verb {
    /// Whether the verb changes the kiosk's state (examples, head, settings): on a TCP link
    /// from another host it needs `AUTH` first.
    pub fn changes_state(&self) -> bool {
        matches!(
            self,
            Verb::Learn { .. }
                | Verb::Train
                | Verb::Forget { .. }
                | Verb::Threshold(Some(_))
                | Verb::Save
                | Verb::Reset(_)
        )
    }

    /// Whether the verb is always allowed, before any `AUTH`.
    pub fn always_allowed(&self) -> bool {
        matches!(self, Verb::Ping | Verb::Help | Verb::Auth(_))
    }
}

/// The verbs, as `HELP` lists them.
pub const VERBS: [&str; 13] = [
    "PING",
    "INFO",
    "CLASSIFY",
    "LEARN",
    "TRAIN",
    "LABELS",
    "FORGET",
    "THRESHOLD",
    "SAVE",
    "RESET",
    "STREAM",
    "HELP",
    "AUTH",
];

/// One parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The id to echo, if any.
    pub id: Option<String>,
    /// Whether the request carried a checksum (the reply then carries one too).
    pub checksum: bool,
    /// What to do.
    pub verb: Verb,
}

/// A request that could not be parsed: the reply to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// Id, when it could be read.
    pub id: Option<String>,
    /// Whether to checksum the reply.
    pub checksum: bool,
    /// Error code.
    pub code: Code,
    /// Message.
    pub message: String,
}

/// XOR of the bytes, NMEA style.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |a, b| a ^ b)
}

fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Request {
    /// Parses one line (without its line end). Never panics, whatever the bytes.
    pub fn parse(line: &[u8]) -> Result<Request, Rejection> {
        let reject = |id: Option<String>, checksum, code, message: String| Rejection {
            id,
            checksum,
            code,
            message,
        };
        if line.len() > MAX_LINE {
            return Err(reject(
                None,
                false,
                Code::TooLong,
                format!("line longer than {MAX_LINE} bytes"),
            ));
        }
        let Ok(text) = std::str::from_utf8(line) else {
            return Err(reject(
                None,
                false,
                Code::Encoding,
                "line is not UTF-8 text".into(),
            ));
        };
        if text.chars().any(|c| c.is_control() && c != '\t') {
            return Err(reject(
                None,
                false,
                Code::Encoding,
                "line holds control characters".into(),
            ));
        }
        let (body, checked) = match text.rsplit_once('*') {
            Some((body, sum)) => {
                let want = u8::from_str_radix(sum.trim(), 16)
                    .ok()
                    .filter(|_| sum.trim().len() == 2);
                let Some(want) = want else {
                    return Err(reject(
                        None,
                        true,
                        Code::Checksum,
                        format!("checksum {sum:?} is not two hex digits"),
                    ));
                };
                let got = checksum(body.as_bytes());
                if got != want {
                    return Err(reject(
                        None,
                        true,
                        Code::Checksum,
                        format!("checksum is {got:02X}, line says {want:02X}"),
                    ));
                }
                (body, true)
            }
            None => (text, false),
        };
        let mut words = body.split_whitespace();
        let mut first = words.next();
        let mut id = None;
        if let Some(w) = first.and_then(|w| w.strip_prefix('#')) {
            if !is_id(w) {
                return Err(reject(
                    None,
                    checked,
                    Code::BadRequest,
                    format!("request id must be 1-{MAX_ID} letters, digits, '-' or '_'"),
                ));
            }
            id = Some(w.to_string());
            first = words.next();
        }
        let bad = |m: String| reject(id.clone(), checked, Code::BadRequest, m);
        let Some(verb) = first else {
            return Err(bad("empty request".into()));
        };
        let args: Vec<&str> = words.collect();
        let verb_upper = verb.to_ascii_uppercase();
        let n_args = |min: usize, max: usize| -> Result<(), Rejection> {
            if args.len() < min || args.len() > max {
                let want = if min == max {
                    format!("{min}")
                } else {
                    format!("{min}-{max}")
                };
                Err(bad(format!(
                    "{verb_upper} takes {want} argument(s), got {}",
                    args.len()
                )))
            } else {
                Ok(())
            }
        };
        let label = |s: &str| Label::new(s).map_err(|e| bad(e.to_string()));
        let verb = match verb_upper.as_str() {
            "PING" => n_args(0, 0).map(|_| Verb::Ping),
            "INFO" => n_args(0, 0).map(|_| Verb::Info),
            "CLASSIFY" => n_args(0, 0).map(|_| Verb::Classify),
            "TRAIN" => n_args(0, 0).map(|_| Verb::Train),
            "LABELS" => n_args(0, 0).map(|_| Verb::Labels),
            "SAVE" => n_args(0, 0).map(|_| Verb::Save),
            "HELP" => n_args(0, 0).map(|_| Verb::Help),
            "LEARN" => n_args(1, 2).and_then(|_| {
                let n = match args.get(1) {
                    None => Ok(5),
                    Some(s) => s
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (1..=100).contains(n))
                        .ok_or_else(|| bad(format!("frame count {s:?} is not 1-100"))),
                }?;
                Ok(Verb::Learn {
                    label: label(args[0])?,
                    n,
                })
            }),
            "FORGET" => n_args(1, 1).and_then(|_| {
                Ok(Verb::Forget {
                    label: label(args[0])?,
                })
            }),
            "THRESHOLD" => n_args(0, 1).and_then(|_| match args.first() {
                None => Ok(Verb::Threshold(None)),
                Some(s) => s
                    .parse::<f32>()
                    .ok()
                    .filter(|t| (0.0..=1.0).contains(t))
                    .map(|t| Verb::Threshold(Some(t)))
                    .ok_or_else(|| bad(format!("threshold {s:?} is not a number in [0, 1]"))),
            }),
            "AUTH" => n_args(0, 1).and_then(|_| match args.first() {
                Some(r)
                    if r.len() != AUTH_RESPONSE_LEN
                        || !r.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    Err(bad(format!(
                        "AUTH response must be {AUTH_RESPONSE_LEN} hex digits"
                    )))
                }
                r => Ok(Verb::Auth(r.map(|r| r.to_ascii_lowercase()))),
            }),
            "RESET" => n_args(0, 1).and_then(|_| match args.first() {
                Some(t) if !is_id(t) => Err(bad(format!("confirmation token {t:?} is malformed"))),
                t => Ok(Verb::Reset(t.map(|t| t.to_string()))),
            }),
            "STREAM" => n_args(1, 2).and_then(|_| {
                let on = match args[0].to_ascii_uppercase().as_str() {
                    "ON" => true,
                    "OFF" => false,
                    other => return Err(bad(format!("STREAM takes ON or OFF, not {other:?}"))),
                };
                let period_ms = match args.get(1) {
                    None => None,
                    Some(s) => Some(
                        s.parse::<u32>()
                            .ok()
                            .filter(|p| *p <= 60_000)
                            .ok_or_else(|| bad(format!("period {s:?} is not 0-60000 ms")))?,
                    ),
                };
                Ok(Verb::Stream { on, period_ms })
            }),
            _ => Err(reject(
                id.clone(),
                checked,
                Code::UnknownVerb,
                format!("unknown verb {:?}; send HELP", truncate(verb, 20)),
            )),
        }?;
        Ok(Request {
            id,
            checksum: checked,
            verb,
        })
    }

    /// The request as a line (without line end): parsing it gives back the same request.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        if let Some(id) = &self.id {
            s.push('#');
            s.push_str(id);
            s.push(' ');
        }
        match &self.verb {
            Verb::Ping => s.push_str("PING"),
            Verb::Info => s.push_str("INFO"),
            Verb::Classify => s.push_str("CLASSIFY"),
            Verb::Learn { label, n } => s.push_str(&format!("LEARN {label} {n}")),
            Verb::Train => s.push_str("TRAIN"),
            Verb::Labels => s.push_str("LABELS"),
            Verb::Forget { label } => s.push_str(&format!("FORGET {label}")),
            Verb::Threshold(None) => s.push_str("THRESHOLD"),
            Verb::Threshold(Some(t)) => s.push_str(&format!("THRESHOLD {t}")),
            Verb::Save => s.push_str("SAVE"),
            Verb::Reset(None) => s.push_str("RESET"),
            Verb::Reset(Some(t)) => s.push_str(&format!("RESET {t}")),
            Verb::Stream { on, period_ms } => {
                s.push_str(if *on { "STREAM ON" } else { "STREAM OFF" });
                if let Some(p) = period_ms {
                    s.push_str(&format!(" {p}"));
                }
            }
            Verb::Help => s.push_str("HELP"),
            Verb::Auth(None) => s.push_str("AUTH"),
            Verb::Auth(Some(r)) => s.push_str(&format!("AUTH {r}")),
        }
        if self.checksum {
            let c = checksum(s.as_bytes());
            s.push_str(&format!("*{c:02X}"));
        }
        s
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// One `key=value` field of a reply. Values are sanitised: no spaces (`_`), no line ends, no `*`.
#[derive(Debug, Clone, PartialEq)]
pub struct Field(pub String, pub String);

impl Field {
    /// A field from anything printable.
    pub fn new(key: &str, value: impl fmt::Display) -> Field {
        Field(key.to_string(), value.to_string())
    }
}

fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() || c == '*' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// A reply line (without its `\n`).
pub fn ok_line(id: Option<&str>, checksum: bool, fields: &[Field]) -> String {
    let mut s = String::from("OK");
    if let Some(id) = id {
        s.push_str(" #");
        s.push_str(id);
    }
    for Field(k, v) in fields {
        s.push(' ');
        s.push_str(k);
        s.push('=');
        s.push_str(&clean(v));
    }
    seal(s, checksum)
}

/// An error line (without its `\n`): `ERR <code> [#id] <message>`.
pub fn err_line(id: Option<&str>, checksum: bool, code: Code, message: &str) -> String {
    let mut s = format!("ERR {}", code.number());
    if let Some(id) = id {
        s.push_str(" #");
        s.push_str(id);
    }
    s.push(' ');
    s.push_str(
        &message
            .chars()
            .map(|c| if c.is_control() || c == '*' { ' ' } else { c })
            .take(200)
            .collect::<String>(),
    );
    seal(s, checksum)
}

/// An event line (without its `\n`).
pub fn event_line(fields: &[Field]) -> String {
    let mut s = String::from("EVT");
    for Field(k, v) in fields {
        s.push(' ');
        s.push_str(k);
        s.push('=');
        s.push_str(&clean(v));
    }
    s
}

fn seal(mut s: String, checksum: bool) -> String {
    if checksum {
        let c = self::checksum(s.as_bytes());
        s.push_str(&format!("*{c:02X}"));
    }
    s
}

/// What the line splitter hands out.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A complete line, without its line end.
    Line(Vec<u8>),
    /// A line longer than [`MAX_LINE`] (its bytes were dropped up to the next line end).
    TooLong,
}

/// Splits a byte stream into lines: `\n` or `\r\n` ends a line; overlong lines are dropped (and
/// reported once); a partial line can be timed out.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    overlong: bool,
}

impl LineSplitter {
    /// Feeds bytes; returns the complete inputs they finish.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Input> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                if self.overlong {
                    out.push(Input::TooLong);
                } else {
                    let mut line = std::mem::take(&mut self.buf);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    out.push(Input::Line(line));
                }
                self.buf.clear();
                self.overlong = false;
            } else if self.overlong {
                continue;
            } else if self.buf.len() > MAX_LINE {
                self.overlong = true;
                self.buf.clear();
            } else {
                self.buf.push(b);
            }
        }
        out
    }

    /// True while part of a line is waiting for its end.
    pub fn pending(&self) -> bool {
        !self.buf.is_empty() || self.overlong
    }

    /// Drops a partial line (after a silence); true if there was one.
    pub fn expire(&mut self) -> bool {
        let had = self.pending();
        self.buf.clear();
        self.overlong = false;
        had
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Request, Rejection> {
        Request::parse(s.as_bytes())
    }

    #[test]
    fn verbs_are_case_insensitive_and_ids_echo() {
        let r = parse("#a7 learn cup 3").unwrap();
        assert_eq!(r.id.as_deref(), Some("a7"));
        assert_eq!(
            r.verb,
            Verb::Learn {
                label: Label::new("cup").unwrap(),
                n: 3
            }
        );
        assert_eq!(parse("Ping").unwrap().verb, Verb::Ping);
        assert_eq!(
            parse("LEARN mug").unwrap().verb,
            Verb::Learn {
                label: Label::new("mug").unwrap(),
                n: 5
            }
        );
        assert_eq!(
            parse("stream on 500").unwrap().verb,
            Verb::Stream {
                on: true,
                period_ms: Some(500)
            }
        );
    }

    #[test]
    fn checksums() {
        let line = format!("PING*{:02X}", checksum(b"PING"));
        let r = parse(&line).unwrap();
        assert!(r.checksum);
        let e = parse("PING*00").unwrap_err();
        assert_eq!(e.code, Code::Checksum);
        assert!(e.checksum, "the error reply is checksummed too");
        let e = parse("PING*G1").unwrap_err();
        assert_eq!(e.code, Code::Checksum);
        let reply = ok_line(Some("1"), true, &[Field::new("pong", 1)]);
        let (body, sum) = reply.rsplit_once('*').unwrap();
        assert_eq!(format!("{:02X}", checksum(body.as_bytes())), sum);
    }

    #[test]
    fn bad_requests_get_codes() {
        let cases = [
            ("", Code::BadRequest),
            ("#1", Code::BadRequest),
            ("FLY", Code::UnknownVerb),
            ("LEARN", Code::BadRequest),
            ("LEARN a/b", Code::BadRequest),
            ("LEARN unknown", Code::BadRequest),
            ("LEARN cup 0", Code::BadRequest),
            ("THRESHOLD 1.5", Code::BadRequest),
            ("THRESHOLD nan", Code::BadRequest),
            ("STREAM maybe", Code::BadRequest),
            ("PING extra", Code::BadRequest),
            ("AUTH 1234", Code::BadRequest),
            ("AUTH a b", Code::BadRequest),
            ("#toolongidtoolongid PING", Code::BadRequest),
            ("PI\u{7}NG", Code::Encoding),
        ];
        for (line, code) in cases {
            assert_eq!(parse(line).unwrap_err().code, code, "{line:?}");
        }
        assert_eq!(
            Request::parse(&[0xFF, 0xFE]).unwrap_err().code,
            Code::Encoding
        );
        assert_eq!(
            Request::parse(&vec![b'A'; MAX_LINE + 1]).unwrap_err().code,
            Code::TooLong
        );
        let e = parse("#k FLY").unwrap_err();
        assert_eq!(e.id.as_deref(), Some("k"), "ids are echoed on errors too");
    }

    #[test]
    fn auth_takes_a_challenge_request_or_a_hex_hmac() {
        assert_eq!(parse("auth").unwrap().verb, Verb::Auth(None));
        let r = "AB".repeat(32);
        assert_eq!(
            parse(&format!("AUTH {r}")).unwrap().verb,
            Verb::Auth(Some("ab".repeat(32)))
        );
        assert!(Verb::Learn {
            label: Label::new("cup").unwrap(),
            n: 1
        }
        .changes_state());
        assert!(!Verb::Threshold(None).changes_state());
        assert!(Verb::Threshold(Some(0.5)).changes_state());
        assert!(Verb::Auth(None).always_allowed() && !Verb::Classify.always_allowed());
    }

    #[test]
    fn splitter_handles_crlf_overlong_and_partial_lines() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"PING\r\nIN"), vec![Input::Line(b"PING".to_vec())]);
        assert!(s.pending());
        assert_eq!(s.push(b"FO\n"), vec![Input::Line(b"INFO".to_vec())]);
        let mut long = vec![b'x'; MAX_LINE * 3];
        long.push(b'\n');
        long.extend_from_slice(b"PING\n");
        assert_eq!(
            s.push(&long),
            vec![Input::TooLong, Input::Line(b"PING".to_vec())]
        );
        s.push(b"half");
        assert!(s.expire());
        assert!(!s.expire());
    }

    #[test]
    fn replies_cannot_be_broken_by_values() {
        let l = ok_line(None, false, &[Field::new("label", "a b\nc*d")]);
        assert_eq!(l, "OK label=a_b_c_d");
        let l = err_line(Some("x"), false, Code::Conflict, "no head\nyet");
        assert_eq!(l, "ERR 409 #x no head yet");
    }

    /// Property test: arbitrary bytes never panic; whatever parses re-encodes to a line that
    /// parses to the same request; the splitter never loses or invents a line.
    #[test]
    fn arbitrary_bytes_never_panic_and_accepted_lines_round_trip() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(20261127);
        let mut words: Vec<&str> = VERBS.to_vec();
        words.extend([
            "info",
            "Classify",
            "cup",
            "on",
            "OFF",
            "0.5",
            "3",
            "#a1",
            "*",
            "\r",
            "é",
            "1e3",
            "-1",
            "unknown",
            "a/b",
            "",
            "00112233445566778899AABBCCDDEEFF00112233445566778899aabbccddeeff",
        ]);
        let mut accepted = 0;
        for i in 0..100_000 {
            let line: Vec<u8> = if i % 2 == 0 {
                // Random bytes, biased toward printable text.
                let n = rng.gen_range(0..(MAX_LINE + 20));
                (0..n)
                    .map(|_| {
                        if rng.gen_bool(0.8) {
                            rng.gen_range(0x20..0x7F)
                        } else {
                            rng.gen()
                        }
                    })
                    .collect()
            } else {
                // Random sequences of protocol-ish words.
                let n = rng.gen_range(0..5);
                let mut s: Vec<&str> = (0..n)
                    .map(|_| words[rng.gen_range(0..words.len())])
                    .collect();
                if rng.gen_bool(0.3) {
                    s.insert(0, "#x9");
                }
                let mut line = s.join(" ");
                if rng.gen_bool(0.3) {
                    let c = checksum(line.as_bytes());
                    line.push_str(&format!("*{c:02X}"));
                }
                line.into_bytes()
            };
            if let Ok(req) = Request::parse(&line) {
                accepted += 1;
                let again = Request::parse(req.encode().as_bytes());
                assert_eq!(
                    again.as_ref(),
                    Ok(&req),
                    "{:?}",
                    String::from_utf8_lossy(&line)
                );
            }
            // Split the same bytes, with line ends, at random points: one input per line.
            let mut stream = line.clone();
            stream.retain(|b| *b != b'\n');
            stream.extend_from_slice(b"\nPING\r\n");
            let mut sp = LineSplitter::default();
            let mut got = Vec::new();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let k = rng.gen_range(1..=rest.len());
                got.extend(sp.push(&rest[..k]));
                rest = &rest[k..];
            }
            assert_eq!(got.len(), 2, "{stream:?}");
            assert_eq!(got[1], Input::Line(b"PING".to_vec()));
            assert!(!sp.pending());
        }
        assert!(
            accepted > 3_000,
            "the generator must reach the parser's accepting paths ({accepted})"
        );
    }
}
