//! The kiosk: a line protocol (`protocol.rs`, pure code) that a microcontroller, PLC or host
//! drives over a serial port or TCP, the persistent state it changes (`state.rs`), and the
//! request loop (`server.rs`). The transports live elsewhere: [`crate::serial`] owns the serial
//! port; TCP is the standard library's.

pub mod protocol;
pub mod server;
pub mod state;

pub use server::{Ended, Options, Server};
pub use state::{Kiosk, KioskError};
