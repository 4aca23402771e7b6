//! The kiosk's secret and the `AUTH` challenge–response that proves a client knows it without
//! sending it: the kiosk sends a fresh random challenge, the client answers with
//! `hex(HMAC-SHA256(key = the secret's text, message = the challenge's text))`.
//!
//! The secret is 32 random bytes as 64 hex digits in `DIR/secret`, created at the first start
//! with mode 0600 (written like every other file: temp file, fsync, rename). `graft doctor
//! --data DIR` shows it; anyone who can read the data folder can change the kiosk anyway.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::store::{write_atomic, StoreError};

/// The secret's file name in a kiosk data folder.
pub const SECRET_FILE: &str = "secret";
/// How long a challenge can be answered.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(30);
/// Wrong responses a link may send before it is closed.
pub const MAX_FAILURES: u32 = 3;

/// A kiosk's shared secret.
#[derive(Clone)]
pub struct Secret {
    text: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Secret {
    /// Where a data folder keeps its secret.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(SECRET_FILE)
    }

    /// Reads `DIR/secret`; creates it (0600) when there is none. The flag says it was created
    /// now (the caller shows it once).
    pub fn load_or_create(dir: &Path) -> Result<(Secret, bool), StoreError> {
        let path = Secret::path(dir);
        match Secret::load(dir) {
            Ok(Some(s)) => return Ok((s, false)),
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        let text = random_hex(32);
        // tempfile creates its files 0600, and the rename keeps the mode.
        write_atomic(&path, |w| w.write_all(format!("{text}\n").as_bytes()))?;
        Ok((Secret { text }, true))
    }

    /// Reads `DIR/secret`, if there is one. A secret others can read is refused.
    pub fn load(dir: &Path) -> Result<Option<Secret>, StoreError> {
        use std::os::unix::fs::PermissionsExt;
        let path = Secret::path(dir);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        if !meta.is_file() {
            return Err(StoreError::format(&path, "not a regular file"));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(StoreError::format(
                &path,
                format!(
                    "readable by others (mode {:o}): run `chmod 600 {}`",
                    meta.permissions().mode() & 0o777,
                    path.display()
                ),
            ));
        }
        let text = crate::userfile::read_to_string(&path).map_err(|e| StoreError::io(&path, e))?;
        let text = text.trim().to_string();
        if text.len() < 32 || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(StoreError::format(
                &path,
                "not a kiosk secret (32+ printable characters): delete it to make a new one",
            ));
        }
        Ok(Some(Secret { text }))
    }

    /// The secret's text, to show to its owner.
    pub fn reveal(&self) -> &str {
        &self.text
    }

    fn mac(&self, challenge: &str) -> Hmac<Sha256> {
        // HMAC takes keys of any length: this cannot fail.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(self.text.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        m.update(challenge.as_bytes());
        m
    }

    /// The response to `challenge`, as a client computes it.
    pub fn respond(&self, challenge: &str) -> String {
        self.mac(challenge)
            .finalize()
            .into_bytes()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    }

    /// Whether `given` is the secret itself (a web login); compared in constant time (as
    /// HMAC tags of a fixed message keyed with each).
    pub fn matches(&self, given: &str) -> bool {
        let mut theirs = <Hmac<Sha256> as Mac>::new_from_slice(given.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        theirs.update(b"graft web login");
        self.mac("graft web login")
            .verify_slice(&theirs.finalize().into_bytes())
            .is_ok()
    }

    /// Whether `response` (hex) answers `challenge`; compared in constant time.
    pub fn verify(&self, challenge: &str, response: &str) -> bool {
        let Some(bytes) = decode_hex(response) else {
            return false;
        };
        self.mac(challenge).verify_slice(&bytes).is_ok()
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One link's authentication state.
#[derive(Debug, Default)]
pub(crate) struct LinkAuth {
    /// Serial, loopback or `--insecure`: nothing to prove.
    pub trusted: bool,
    /// Proved the secret.
    pub authenticated: bool,
    challenge: Option<(String, Instant)>,
    failures: u32,
}

/// What an `AUTH <response>` did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Proof {
    /// Accepted.
    Accepted,
    /// No challenge outstanding (or it expired).
    NoChallenge,
    /// Wrong; `close` when the link has used up its tries.
    Wrong { close: bool },
}

impl LinkAuth {
    /// A link that needs no proof.
    pub fn trusted() -> LinkAuth {
        LinkAuth {
            trusted: true,
            ..LinkAuth::default()
        }
    }

    /// Whether state changes (and reads, when `reads_too`) are allowed.
    pub fn allowed(&self) -> bool {
        self.trusted || self.authenticated
    }

    /// A fresh challenge (the previous one, if any, is void).
    pub fn challenge(&mut self) -> String {
        let c = random_hex(16);
        self.challenge = Some((c.clone(), Instant::now()));
        c
    }

    /// Checks a response against the outstanding challenge (used once, right or wrong).
    pub fn prove(&mut self, secret: &Secret, response: &str) -> Proof {
        let Some((challenge, at)) = self.challenge.take() else {
            return Proof::NoChallenge;
        };
        if at.elapsed() > CHALLENGE_TTL {
            return Proof::NoChallenge;
        }
        if secret.verify(&challenge, response) {
            self.authenticated = true;
            Proof::Accepted
        } else {
            self.failures += 1;
            Proof::Wrong {
                close: self.failures >= MAX_FAILURES,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2 (key "Jefe"), so clients in other languages can check their code
    /// against the same numbers.
    #[test]
    fn hmac_matches_rfc_4231() {
        let s = Secret {
            text: "Jefe".into(),
        };
        assert_eq!(
            s.respond("what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn secret_is_created_0600_once_and_challenges_are_single_use() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let (s, created) = Secret::load_or_create(t.path()).unwrap();
        assert!(created);
        let mode = std::fs::metadata(Secret::path(t.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, created) = Secret::load_or_create(t.path()).unwrap();
        assert!(!created);
        assert_eq!(again.reveal(), s.reveal());

        let mut link = LinkAuth::default();
        assert!(!link.allowed());
        assert_eq!(link.prove(&s, &"0".repeat(64)), Proof::NoChallenge);
        let c = link.challenge();
        let answer = s.respond(&c);
        assert_eq!(
            link.prove(&s, &"0".repeat(64)),
            Proof::Wrong { close: false }
        );
        assert_eq!(
            link.prove(&s, &answer),
            Proof::NoChallenge,
            "a challenge is used once, even by a wrong answer"
        );
        let c = link.challenge();
        assert_eq!(link.prove(&s, &s.respond(&c)), Proof::Accepted);
        assert!(link.allowed());

        std::fs::set_permissions(
            Secret::path(t.path()),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let e = Secret::load(t.path()).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn a_link_is_closed_after_three_wrong_answers() {
        let s = Secret {
            text: "k".repeat(64),
        };
        let mut link = LinkAuth::default();
        for i in 1..=MAX_FAILURES {
            link.challenge();
            assert_eq!(
                link.prove(&s, &"1".repeat(64)),
                Proof::Wrong {
                    close: i == MAX_FAILURES
                }
            );
        }
    }
}
