//! pvfs-store: everything one device keeps, in one RocksDB database.
//!
//! Column families hold the namespace (nodes, directory entries, the id map), file content
//! (extent maps onto FastCDC chunks named by their BLAKE3 hash, with reference counts), the
//! op log (every change as an op with device, sequence number and hybrid logical clock) and
//! metadata. A change is one `Txn` committed as one atomic `WriteBatch`: chunks, extent map,
//! node records and the op together.
//!
//! Architecture invariant: this crate does no network I/O and never runs on an async worker;
//! every call may block on the local disk.

#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

mod auth;
mod chunk;
mod compact;
mod content;
mod env;
mod error;
mod fsck;
mod kv;
mod ns;
mod records;
mod replica;
mod store;
mod txn;
mod types;

pub use auth::{
    op_hash, sign_message, verify as verify_op, DeviceKey, Evidence, OpHash, Signer, GENESIS,
    KEY_LEN, SIG_LEN,
};
pub use chunk::{cut, AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};
pub use compact::{plan as plan_checkpoint, Checkpoint, Compaction, Report, DEFAULT_LAG_MS};
pub use content::{is_zero, NewExtent};
pub use env::{Env, SystemEnv};
pub use error::{Result, StoreError};
pub use fsck::FsckReport;
pub use kv::rocks::RocksOptions;
pub use ns::{
    validate_name, NewNode, RenameFlags, SetAttrs, SetTime, XattrMode, LINK_MAX, NAME_MAX,
    SYMLINK_MAX, XATTR_VALUE_MAX,
};
pub use records::{
    DirentRecord, EntryRecord, ExtentRecord, Loc, MemberRecord, NodeRecord, OpKind, OpRecord,
    Stamps, StatsRecord,
};
pub use replica::{
    conflict_name, Applied, Refused, Version, VersionVector, MAX_CLOCK_SKEW_MS,
    MAX_REFUSED_WRITERS, MEMBER_NAME_MAX,
};
pub use store::{LogBytes, RootOwner, SpaceInfo, Staging, Store, StoreOptions};
pub use txn::{PreparedChunk, Txn};
pub use types::{
    os_random, ChunkId, DeviceId, FileKind, Hlc, Ino, NodeId, OpId, Timestamp, Writer, ROOT_INO,
};

/// The plaintext of a chunk received in its stored encoding (raw, or a zstd frame when
/// shorter than `len`), checked against its id: a peer's bytes are never trusted.
pub fn decode_fetched(id: &ChunkId, encoded: &bytes::Bytes, len: u32) -> Result<bytes::Bytes> {
    if encoded.len() == len as usize {
        // Stored raw: the plaintext is the same bytes, shared rather than copied.
        return chunk::verified(id, encoded.clone());
    }
    chunk::decode_verified(id, encoded.to_vec(), len as usize)
}

/// Where absent chunks come from, and where an online-only device's new chunks go:
/// implemented by the network layer, wired in by the daemon, so that the filesystem can move
/// content without depending on the network.
///
/// Neither method blocks: each starts the transfer and returns; `done` runs later, on
/// another thread, with the outcome (`Err` after the configured timeout at the latest).
pub trait ChunkSource: Send + Sync + std::fmt::Debug {
    /// Fetches chunk `id` (plaintext length `len`) for inode `ino` of this device.
    fn fetch(&self, id: ChunkId, len: u32, ino: Ino, done: Box<dyn FnOnce(Result<()>) + Send>);

    /// Stores `chunks` (id, stored encoding, plaintext length) durably on another device
    /// (`Store::keep_pushed` there); `Ok` once one device has all of them.
    fn keep_elsewhere(
        &self,
        chunks: Vec<(ChunkId, bytes::Bytes, u32)>,
        done: Box<dyn FnOnce(Result<()>) + Send>,
    ) {
        let _ = chunks;
        done(Err(StoreError::Invalid(
            "this source cannot store chunks elsewhere".into(),
        )));
    }
}
