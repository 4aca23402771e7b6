//! The `image` fuzz target: [`checks::one`] (`fuzz/checks/image.rs` says what it holds the
//! library to) on every input libFuzzer makes.
#![no_main]

#[path = "../checks/image.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::one(data));
