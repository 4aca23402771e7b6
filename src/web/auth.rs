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
        let mine: Vec<Instant> = f
            .iter()
            .filter(|(ip, _)| *ip == peer)
            .map(|(_, t)| *t)
            .collect();
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
            if let Some(oldest) = s
                .iter()
                .min_by_key(|(_, v)| v.last_used)
                .map(|(k, _)| k.clone())
            {
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

    /// Whether a session is still logged in (without counting as a use).
    pub fn alive(&self, id: &str) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_some_and(|v| v.last_used.elapsed() < SESSION_IDLE)
    }

    /// The session a cookie value names, if it is alive.
    pub fn session(&self, id: &str) -> Option<String> {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let alive = s
            .get(id)
            .is_some_and(|v| v.last_used.elapsed() < SESSION_IDLE);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> (tempfile::TempDir, Auth, String) {
        let t = tempfile::tempdir().unwrap();
        let (secret, _) = Secret::load_or_create(t.path()).unwrap();
        let text = secret.reveal().to_string();
        (t, Auth::new(secret), text)
    }

    #[test]
    fn wrong_secrets_are_limited_per_client_then_overall() {
        let (_t, a, secret) = auth();
        let me: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..FAILURES_PER_CLIENT {
            assert_eq!(a.check(me, "wrong"), Err(Refused::Wrong));
        }
        assert!(matches!(a.check(me, &secret), Err(Refused::Wait(_))));
        // Another address is not held up by this one's guesses.
        assert_eq!(a.check(other, &secret), Ok(()));
        // Guesses spread over many addresses meet the overall limit.
        for i in 0..FAILURES_OVERALL {
            let ip: IpAddr = format!("198.51.100.{}", i % 250).parse().unwrap();
            let _ = a.check(ip, "wrong");
        }
        assert!(matches!(a.check(other, &secret), Err(Refused::Wait(_))));
    }

    #[test]
    fn sessions_carry_their_own_csrf_token_and_end_at_logout() {
        let (_t, a, secret) = auth();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (id, csrf) = a.login(ip, &secret).unwrap();
        let (id2, csrf2) = a.login(ip, &secret).unwrap();
        assert_ne!(id, id2);
        assert_ne!(csrf, csrf2);
        assert_eq!(a.session(&id), Some(csrf));
        assert_eq!(a.session("not-a-session"), None);
        assert!(a.alive(&id));
        a.logout(&id);
        assert!(!a.alive(&id));
        assert_eq!(a.session(&id), None);
        assert_eq!(a.session(&id2), Some(csrf2));
        assert!(a.login(ip, "").is_err());
        assert!(a.login(ip, &secret[..secret.len() - 1]).is_err());
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "ab"));
        assert!(!same_token("", "a"));
    }
}
