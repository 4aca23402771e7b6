//! Who may use the page: the kiosk's secret (the same one the line protocol's `AUTH` proves,
//! `DATA/secret`, 0600, printed by `graft serve` at first start and by `graft doctor`) logs a
//! browser in; a session cookie (`HttpOnly`, `SameSite=Strict`) and a CSRF token sent back in a
//! header carry it. Scripts may send the secret itself as `Authorization: Bearer`. Wrong secrets
//! are rate-limited per client address and overall.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;

use crate::kiosk::Secret;

/// The session cookie's name.
pub const COOKIE: &str = "graft_session";
/// The header a logged-in page sends its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session unused this long ends.
pub const SESSION_IDLE: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once (the oldest goes).
pub const MAX_SESSIONS: usize = 64;
/// Wrong secrets per client address per window before it must wait.
pub const FAILURES_PER_CLIENT: usize = 5;
/// Wrong secrets from everyone per window.
pub const FAILURES_OVERALL: usize = 30;
/// The rate-limit window.
pub const WINDOW: Duration = Duration::from_secs(60);

struct Session {
    csrf: String,
    last_used: Instant,
}

/// Sessions and the login limiter.
pub struct Auth {
    secret: Secret,
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<Vec<(IpAddr, Instant)>>,
}

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// Nobody proved anything.
    Anonymous,
    /// A browser session; state changes need its CSRF token.
    Session {
        /// The token the page must send with state changes.
        csrf: String,
    },
    /// The secret itself (`Authorization: Bearer`): no cookie, so no cross-site request can
    /// carry it.
    Bearer,
}

/// Why a login (or a bearer secret) was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Wrong secret.
    Wrong,
    /// Too many wrong ones: wait this long.
    Wait(Duration),
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Auth {
    /// Logins checked against `secret`.
    pub fn new(secret: Secret) -> Auth {
        Auth {
            secret,
            sessions: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    fn limited(&self, peer: IpAddr) -> Option<Duration> {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        f.retain(|(_, at)| now.duration_since(*at) < WINDOW);
        let mine: Vec<Instant> = f.iter().filter(|(ip, _)| *ip == peer).map(|(_, t)| *t).collect();
        let wait = |oldest: Instant| WINDOW.saturating_sub(now.duration_since(oldest));
        if mine.len() >= FAILURES_PER_CLIENT {
            return mine.first().map(|t| wait(*t));
        }
        if f.len() >= FAILURES_OVERALL {
            return f.first().map(|(_, t)| wait(*t));
        }
        None
    }

    /// Checks a secret `given` by `peer` (constant time), counting failures.
    pub fn check(&self, peer: IpAddr, given: &str) -> Result<(), Refused> {
        if let Some(w) = self.limited(peer) {
            return Err(Refused::Wait(w.max(Duration::from_secs(1))));
        }
        if self.secret.matches(given) {
            return Ok(());
        }
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((peer, Instant::now()));
        log::warn!("web: wrong secret from {peer}");
        Err(Refused::Wrong)
    }

    /// Logs in with `given`: a new session's cookie value and CSRF token.
    pub fn login(&self, peer: IpAddr, given: &str) -> Result<(String, String), Refused> {
        self.check(peer, given)?;
        let (id, csrf) = (random_hex(32), random_hex(16));
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.retain(|_, v| v.last_used.elapsed() < SESSION_IDLE);
        if s.len() >= MAX_SESSIONS {
            if let Some(oldest) = s.iter().min_by_key(|(_, v)| v.last_used).map(|(k, _)| k.clone()) {
                s.remove(&oldest);
            }
        }
        s.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                last_used: Instant::now(),
            },
        );
        log::info!("web: {peer} logged in");
        Ok((id, csrf))
    }

    /// Ends a session.
    pub fn logout(&self, id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// The session a cookie value names, if it is alive.
    pub fn session(&self, id: &str) -> Option<String> {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let alive = s.get(id).is_some_and(|v| v.last_used.elapsed() < SESSION_IDLE);
        if !alive {
            s.remove(id);
            return None;
        }
        let v = s.get_mut(id)?;
        v.last_used = Instant::now();
        Some(v.csrf.clone())
    }
}

/// Whether two tokens are equal, in time independent of where they differ.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}
