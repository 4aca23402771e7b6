//! The kiosk: a line protocol (`protocol.rs`, pure code) that a microcontroller, PLC or host
//! drives over a serial port or TCP, the persistent state it changes (`state.rs`), and the
//! request loop (`server.rs`), its TCP front (`tcp.rs`, several clients at once) and the `AUTH`
//! secret (`auth.rs`). The serial transport lives elsewhere: [`crate::serial`] owns the port; TCP
//! is the standard library's.

pub mod auth;
pub mod protocol;
pub mod server;
pub mod state;
pub mod tcp;

pub use auth::Secret;
pub use server::{Ended, Options, Server, Session};
pub use state::{Kiosk, KioskError};
pub use tcp::{TcpOptions, Trust};
