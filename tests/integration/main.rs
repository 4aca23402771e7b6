//! Integration tests: the real `graft` binary and library on real files.
//! One test binary, split into topic modules (see TESTING in ARCHITECTURE.md).

mod backbone;
mod boards;
mod capture;
mod common;
mod errors;
mod export;
mod finetune;
#[cfg(feature = "fleet")]
mod fleet;
mod fuzz_seeds;
#[cfg(feature = "gpu")]
mod gpu;
mod heads;
mod odd_files;
mod performance;
#[cfg(feature = "serial")]
mod serve;
#[cfg(all(feature = "web", feature = "serial"))]
mod web;
