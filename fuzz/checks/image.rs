//! Pictures: `preprocess::decode_bytes` on any bytes, then `prepare` into the bundled model's
//! input (`models/efficientnet-lite0-fp32.toml`'s `[input]`: shorter side 256, crop 224).
//!
//! Run with `-rss_limit_mb=2048 -malloc_limit_mb=2048` (`fuzz/run.sh` does): a small file that
//! makes the decoder or the resize ask for more is a finding, as a panic is. Property: a decoded
//! picture prepares to `3 × 224 × 224` finite values.
//!
//! Shared by the fuzz target (`fuzz/fuzz_targets/image.rs`) and the test that replays every
//! committed seed (`tests/integration/fuzz_seeds.rs`).

use std::path::Path;
use std::sync::OnceLock;

use graft::backbone::manifest::InputSpec;
use graft::backbone::preprocess::{decode_bytes, prepare};
use graft::backbone::Manifest;

fn spec() -> &'static InputSpec {
    static SPEC: OnceLock<InputSpec> = OnceLock::new();
    SPEC.get_or_init(|| {
        let text = include_str!("../../models/efficientnet-lite0-fp32.toml");
        match Manifest::parse(text, "efficientnet-lite0-fp32.toml") {
            Ok(m) => m.input,
            Err(e) => panic!("the bundled manifest does not parse: {e}"),
        }
    })
}

/// One input, as the fuzz target gets it: panics on a finding.
pub fn one(data: &[u8]) {
    let Ok(frame) = decode_bytes(data, Path::new("fuzz.img")) else {
        return;
    };
    assert!(frame.width() > 0 && frame.height() > 0);
    let spec = spec();
    let p = prepare(&frame, spec);
    let side = spec.size as usize;
    assert_eq!(p.as_slice().len(), 3 * side * side);
    assert!(p.as_slice().iter().all(|v| v.is_finite()));
}
