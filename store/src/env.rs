//! What a store takes from the world outside the database: the wall clock and fresh ids.
//!
//! Owns: the `Env` trait and `SystemEnv`, the real clock and the OS random source.
//! Must not: hold state of its own that a store depends on; a simulation replaces `SystemEnv`
//! with a seeded, virtual-time `Env` so that every run of a seed makes the same ops.

use std::fmt::Debug;

use crate::types::{random_bytes, Timestamp};

/// The clock and the source of unique ids a store runs with.
pub trait Env: Send + Sync + Debug {
    /// The current wall-clock time.
    fn now(&self) -> Timestamp;
    /// 16 bytes that no other call on any device returns (node and entry ids, incarnations):
    /// unique, not secret.
    fn unique(&self) -> [u8; 16];
}

/// The real clock and the operating system's random source.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemEnv;

impl Env for SystemEnv {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
    fn unique(&self) -> [u8; 16] {
        random_bytes()
    }
}
