//! Board profiles (`boards/*.toml`, compiled in): what graft should do on each board — threads,
//! model precision, camera and serial defaults — and detection of the board it runs on from
//! `/proc/device-tree/model` and the CPU architecture.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::capture::{CameraRequest, PixelFormat};

/// The bundled profiles: (file name, text).
const PROFILES: &[(&str, &str)] = &[
    ("pi-zero-2w.toml", include_str!("../boards/pi-zero-2w.toml")),
    ("pi3-armv7.toml", include_str!("../boards/pi3-armv7.toml")),
    (
        "pi3-aarch64.toml",
        include_str!("../boards/pi3-aarch64.toml"),
    ),
    ("pi4.toml", include_str!("../boards/pi4.toml")),
    ("pi5.toml", include_str!("../boards/pi5.toml")),
    (
        "jetson-orin-nano.toml",
        include_str!("../boards/jetson-orin-nano.toml"),
    ),
    ("x86_64.toml", include_str!("../boards/x86_64.toml")),
];

/// Where the device tree names the board.
pub const DEVICE_TREE_MODEL: &str = "/proc/device-tree/model";

/// Board profile errors.
#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    /// `--board` named no profile.
    #[error("unknown board {name:?}; known: {}", .known.join(", "))]
    Unknown {
        /// The name given.
        name: String,
        /// The profiles.
        known: Vec<String>,
    },
    /// A profile that does not parse (a build defect: profiles are compiled in and tested).
    #[error("board profile {file}: {reason}")]
    Malformed {
        /// The file.
        file: String,
        /// Why.
        reason: String,
    },
}

/// Camera defaults of a board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CameraDefaults {
    /// Device path.
    pub device: String,
    /// Pixel format name.
    pub format: String,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
}

/// Serial defaults of a board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SerialDefaults {
    /// Device path.
    pub device: String,
}

/// Whether a GPU path makes sense on the board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuNote {
    /// Capable of a useful GPU path.
    pub capable: bool,
    /// Why (not).
    pub reason: String,
}

/// One board profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Board {
    /// Short name (`--board`).
    pub name: String,
    /// Human name.
    pub title: String,
    /// Substrings of `/proc/device-tree/model` that identify it.
    #[serde(rename = "match")]
    pub matches: Vec<String>,
    /// CPU architecture (`std::env::consts::ARCH`) it applies to, when the model string alone
    /// does not decide (a Pi 3 runs 32- or 64-bit OSes).
    #[serde(default)]
    pub arch: Option<String>,
    /// Rust target triple to build for it.
    pub target: String,
    /// CPU cores (name).
    pub cpu: String,
    /// Cores (0: whatever the machine has).
    pub cores: u32,
    /// Inference threads to use (0: all cores).
    pub threads: u32,
    /// Default backbone.
    pub model: String,
    /// Why that precision.
    pub precision_reason: String,
    /// Camera defaults.
    pub camera: CameraDefaults,
    /// Serial defaults.
    pub serial: SerialDefaults,
    /// GPU note.
    pub gpu: GpuNote,
}

/// How the board was chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `--board` / `GRAFT_BOARD`.
    Given,
    /// The device tree's model string.
    DeviceTree(String),
    /// The CPU architecture alone.
    Arch,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Given => f.write_str("--board"),
            Source::DeviceTree(m) => write!(f, "{DEVICE_TREE_MODEL}: {m:?}"),
            Source::Arch => write!(f, "CPU architecture {}", std::env::consts::ARCH),
        }
    }
}

impl Board {
    /// Inference threads: the profile's, or every core when it says 0.
    pub fn threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        }
    }

    /// The camera request the profile prefers.
    pub fn camera_request(&self) -> CameraRequest {
        CameraRequest {
            format: self.camera.format.parse::<PixelFormat>().ok(),
            size: Some((self.camera.width, self.camera.height)),
            fps: Some(self.camera.fps),
        }
    }
}

/// Every bundled profile.
pub fn all() -> Result<Vec<Board>, BoardError> {
    PROFILES
        .iter()
        .map(|(file, text)| {
            toml::from_str::<Board>(text).map_err(|e| BoardError::Malformed {
                file: format!("boards/{file}"),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// The profile called `name`.
pub fn by_name(name: &str) -> Result<Board, BoardError> {
    let boards = all()?;
    let known = boards.iter().map(|b| b.name.clone()).collect();
    boards
        .into_iter()
        .find(|b| b.name.eq_ignore_ascii_case(name.trim()))
        .ok_or(BoardError::Unknown {
            name: name.into(),
            known,
        })
}

/// Picks the profile for a device-tree model string and CPU architecture: the first whose match
/// string is in the model (and whose `arch`, if any, is this one); else the profile of the
/// architecture alone (x86_64); else none.
pub fn detect_from(model: Option<&str>, arch: &str) -> Result<Option<(Board, Source)>, BoardError> {
    let boards = all()?;
    if let Some(model) = model {
        let hit = boards.iter().find(|b| {
            b.arch.as_deref().is_none_or(|a| a == arch)
                && b.matches.iter().any(|m| model.contains(m.as_str()))
        });
        if let Some(b) = hit {
            return Ok(Some((b.clone(), Source::DeviceTree(model.to_string()))));
        }
    }
    Ok(boards
        .into_iter()
        .find(|b| b.matches.is_empty() && b.arch.as_deref() == Some(arch))
        .map(|b| (b, Source::Arch)))
}

/// The board this runs on, if a profile fits.
pub fn detect() -> Result<Option<(Board, Source)>, BoardError> {
    let model = std::fs::read(DEVICE_TREE_MODEL).ok().map(|b| {
        String::from_utf8_lossy(&b)
            .trim_end_matches('\0')
            .trim()
            .to_string()
    });
    detect_from(model.as_deref(), std::env::consts::ARCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_parses_and_names_a_real_model_and_format() {
        let boards = all().unwrap();
        assert_eq!(boards.len(), PROFILES.len());
        for b in &boards {
            crate::backbone::ModelSpec::resolve(&b.model).unwrap();
            b.camera.format.parse::<PixelFormat>().unwrap();
            assert!(b.target.contains("linux"), "{}", b.name);
            assert!(!b.gpu.reason.is_empty());
        }
        let names: std::collections::BTreeSet<_> = boards.iter().map(|b| &b.name).collect();
        assert_eq!(names.len(), boards.len(), "names are unique");
    }

    #[test]
    fn detection() {
        let pick = |m: Option<&str>, arch| detect_from(m, arch).unwrap().map(|(b, _)| b.name);
        assert_eq!(
            pick(Some("Raspberry Pi 4 Model B Rev 1.4"), "aarch64").as_deref(),
            Some("pi4")
        );
        assert_eq!(
            pick(Some("Raspberry Pi 3 Model B Plus Rev 1.3"), "arm").as_deref(),
            Some("pi3-armv7")
        );
        assert_eq!(
            pick(Some("Raspberry Pi 3 Model B Rev 1.2"), "aarch64").as_deref(),
            Some("pi3-aarch64")
        );
        assert_eq!(
            pick(Some("Raspberry Pi Zero 2 W Rev 1.0"), "aarch64").as_deref(),
            Some("pi-zero-2w")
        );
        assert_eq!(
            pick(Some("Raspberry Pi 5 Model B Rev 1.0"), "aarch64").as_deref(),
            Some("pi5")
        );
        assert_eq!(pick(None, "x86_64").as_deref(), Some("x86_64"));
        assert_eq!(pick(Some("Some Other Board"), "riscv64"), None);
        assert!(by_name("PI4").is_ok());
        assert!(by_name("pi6")
            .unwrap_err()
            .to_string()
            .contains("pi-zero-2w"));
    }
}
