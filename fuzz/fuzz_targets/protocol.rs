//! The `protocol` fuzz target: [`checks::one`] (`fuzz/checks/protocol.rs` says what it holds the
//! library to) on every input libFuzzer makes.
#![no_main]

#[path = "../checks/protocol.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::one(data));
