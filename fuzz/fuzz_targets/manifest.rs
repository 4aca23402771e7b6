//! The `manifest` fuzz target: [`checks::one`] (`fuzz/checks/manifest.rs` says what it holds the
//! library to) on every input libFuzzer makes.
#![no_main]

#[path = "../checks/manifest.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::one(data));
