//! The kiosk: a line protocol (`protocol.rs`, pure code) that a microcontroller, PLC or host
//! drives over a serial port or TCP, the persistent state it changes (`state.rs`), and the
//! request loop (`server.rs`), its TCP front (`tcp.rs`, several clients at once) and the `AUTH`
//! secret (`auth.rs`). The serial transport lives elsewhere: [`crate::serial`] owns the port; TCP
//! is the standard library's.

pub mod auth;
pub mod feed;
pub mod hub;
mod member;
mod ops;
pub mod protocol;
pub mod replica;
pub mod report;
pub mod server;
pub mod state;
pub mod tcp;
pub mod wire;

pub use auth::Secret;
pub use feed::Feed;
pub use hub::{Fronts, Handle, Link, SerialFront};
pub use member::{fleet_identity, Outbox, Outgoing};
pub use ops::{ClassInfo, Op};
pub use server::{Body, Done, Ended, Options, Reply, Server, Session};
pub use state::{Kiosk, KioskError};
pub use tcp::{TcpOptions, Trust};
