//! Model manifests: `Manifest::parse` (TOML, then `Manifest::validate`) on any text.
//!
//! Properties, beyond "no panic": a parsed manifest passes `validate` again, and written back as
//! TOML it parses to a manifest that writes the same TOML.
//!
//! Shared by the fuzz target (`fuzz/fuzz_targets/manifest.rs`) and the test that replays every
//! committed seed (`tests/integration/fuzz_seeds.rs`).

use graft::backbone::Manifest;

/// One input, as the fuzz target gets it: panics on a finding.
pub fn one(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(m) = Manifest::parse(text, "fuzz.toml") else {
        return;
    };
    m.validate().expect("a parsed manifest is valid");
    let Ok(written) = toml::to_string(&m) else {
        return;
    };
    let back = Manifest::parse(&written, "written.toml")
        .unwrap_or_else(|e| panic!("{written:?} does not parse back: {e}"));
    assert_eq!(
        toml::to_string(&back).ok().as_deref(),
        Some(written.as_str())
    );
}
