//! An export's metadata: `ExportMeta::from_metadata` on any key/value strings, and `read_meta`
//! (protobuf decoding first) on any bytes.
//!
//! The input is read twice: as an ONNX file's bytes, and as text of `key=value` lines (the seed
//! corpus has both forms, made from `graft export` outputs). Properties, beyond "no panic":
//! metadata that reads passes `validate`, and written back (`to_metadata`) reads the same.
//!
//! Shared by the fuzz target (`fuzz/fuzz_targets/export_meta.rs`) and the test that replays every
//! committed seed (`tests/integration/fuzz_seeds.rs`).

use graft::backbone::exported::{read_meta, ExportMeta};

fn check(meta: Option<ExportMeta>) {
    let Some(meta) = meta else {
        return;
    };
    meta.validate().expect("metadata that reads is valid");
    let written = meta.to_metadata();
    let props: Vec<(&str, &str)> = written
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let back = ExportMeta::from_metadata(&props, "written")
        .unwrap_or_else(|e| panic!("{written:?} does not read back: {e}"));
    assert_eq!(back.as_ref(), Some(&meta), "{written:?}");
}

/// One input, as the fuzz target gets it: panics on a finding.
pub fn one(data: &[u8]) {
    if let Ok(meta) = read_meta(data, "fuzz.onnx") {
        check(meta);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let props: Vec<(&str, &str)> = text
        .split('\n')
        .map(|line| line.split_once('=').unwrap_or((line, "")))
        .collect();
    if let Ok(meta) = ExportMeta::from_metadata(&props, "fuzz") {
        check(meta);
    }
}
