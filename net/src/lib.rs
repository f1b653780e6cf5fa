//! pvfs-net: everything that crosses the network.
//!
//! Owns: the wire protocol (`wire`), device identity and TLS (`tls`), the QUIC transport
//! (`transport`), pairing (`join`), discovery (`discovery`), namespace sync and fetch
//! (`sync`), chunk streams (`chunks`) and holdings announcements (`holdings`).
//! Must not: be imported by `pvfs-fs` (the filesystem asks for absent chunks through a trait
//! that `tools` wires to this crate), or trust any byte from a peer before validating it.

mod chunks;
pub mod discovery;
pub mod error;
pub mod holdings;
pub mod join;
mod keep;
pub mod sync;
pub mod tls;
pub mod transport;
pub mod wire;

pub use error::{NetError, Result};
