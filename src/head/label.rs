//! Class names. A label becomes a folder name (`DATASET/<label>/`, the kiosk's
//! `examples/<label>/`), a word of the line protocol and a key in JSON, so every front end
//! (`train`'s class folders, `add --label`, `capture --label`, the protocol's LEARN / FORGET)
//! accepts exactly the names [`Label::new`] accepts.

use std::fmt;

use serde::Serialize;

use super::UNKNOWN;

/// Longest label, in bytes.
pub const MAX_LABEL_BYTES: usize = 64;

/// A validated class name: 1–64 bytes of letters, digits, `_`, `-` and `.`, not starting with
/// `.`, and not `unknown` (reserved for rejected inputs, in any case).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Label(String);

/// Why a string is not a usable class name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LabelError {
    /// Empty, too long, or a character outside the allowed set.
    #[error(
        "{0:?} is not a usable class name: use 1-{MAX_LABEL_BYTES} letters, digits, '_', '-' or '.' (not starting with '.')"
    )]
    Invalid(String),
    /// The reserved word `unknown`.
    #[error("{0:?} is not a usable class name: it is reserved for rejected inputs")]
    Reserved(String),
}

impl Label {
    /// Validates a class name; surrounding white space is trimmed first.
    pub fn new(name: &str) -> Result<Label, LabelError> {
        let l = name.trim();
        let ok = !l.is_empty()
            && l.len() <= MAX_LABEL_BYTES
            && !l.starts_with('.')
            && l.chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !ok {
            return Err(LabelError::Invalid(name.to_string()));
        }
        if l.eq_ignore_ascii_case(UNKNOWN) {
            return Err(LabelError::Reserved(name.to_string()));
        }
        Ok(Label(l.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Label {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A label is one safe path component (no separator, not `.` or `..`, not hidden): the folder
/// its examples are saved in.
impl AsRef<std::path::Path> for Label {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(&self.0)
    }
}

impl std::str::FromStr for Label {
    type Err = LabelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Label::new(s)
    }
}

impl PartialEq<str> for Label {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<String> for Label {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_become_folders_and_protocol_words() {
        for (given, want) in [
            ("cup", "cup"),
            ("red-mug", "red-mug"),
            ("Tasse_2", "Tasse_2"),
            ("v1.0", "v1.0"),
            ("ça", "ça"),
            (" cup\t", "cup"),
        ] {
            assert_eq!(Label::new(given).unwrap().as_str(), want, "{given:?}");
        }
        for bad in [
            "",
            " ",
            "a/b",
            "..",
            ".hidden",
            "x y",
            "a,b",
            "a\nb",
            "a*b",
            "#7",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(Label::new(bad), Err(LabelError::Invalid(_))),
                "{bad:?}"
            );
        }
        for reserved in ["unknown", "UNKNOWN", " Unknown "] {
            assert!(
                matches!(Label::new(reserved), Err(LabelError::Reserved(_))),
                "{reserved:?}"
            );
        }
        // 64 bytes of a two-byte letter is 32 characters: the limit is in bytes.
        assert!(Label::new(&"é".repeat(32)).is_ok());
        assert!(Label::new(&"é".repeat(33)).is_err());
    }
}
