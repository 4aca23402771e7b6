//! The `export_meta` fuzz target: [`checks::one`] (`fuzz/checks/export_meta.rs` says what it holds the
//! library to) on every input libFuzzer makes.
#![no_main]

#[path = "../checks/export_meta.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::one(data));
