//! The one error type of pvfs-store.
//!
//! Owns: `StoreError` and `Result`.
//! Namespace errors are POSIX-shaped so that `fs` can pick an errno where it calls the store.

use std::path::PathBuf;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A node, name or chunk that was asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A name that must be new is already taken.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// A directory that must be empty is not.
    #[error("directory not empty")]
    NotEmpty,
    /// A directory was needed and something else was found.
    #[error("not a directory")]
    NotADirectory,
    /// A non-directory was needed and a directory was found.
    #[error("is a directory")]
    IsADirectory,
    /// A name is empty, `.`/`..`, or contains `/` or NUL.
    #[error("invalid name {0:?}")]
    InvalidName(String),
    /// A name is longer than the limit.
    #[error("name too long ({0} bytes)")]
    NameTooLong(usize),
    /// An operation would make a directory its own descendant, or is otherwise not allowed
    /// on this kind of node (hard link to a directory, ...).
    #[error("invalid operation: {0}")]
    Invalid(String),
    /// Hard link count limit reached.
    #[error("too many links")]
    TooManyLinks,
    /// The extended attribute does not exist.
    #[error("no such attribute")]
    NoAttribute,
    /// The extended attribute value or list is over its size limit.
    #[error("attribute too large")]
    AttributeTooLarge,
    /// The data directory's disk is (nearly) full.
    #[error("no space left in the data directory")]
    NoSpace,
    /// A chunk needed for a read is not stored on this device.
    #[error("chunk {0} is not stored on this device")]
    ChunkAbsent(crate::ChunkId),
    /// RocksDB reported an error.
    #[error("database: {0}")]
    Db(String),
    /// Stored bytes failed to decode or violate an invariant.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// The data directory cannot be used (missing, not a directory, locked by another daemon...).
    #[error("data directory {path}: {reason}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// A peer asked for ops this device has compacted into a checkpoint: it needs a
    /// snapshot instead.
    #[error("compacted: {0}")]
    Compacted(String),
    /// An I/O error outside RocksDB.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt(what.to_string())
    }

    /// True for errors caused by a full disk.
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::NoSpace => true,
            StoreError::Db(msg) => is_no_space_message(msg),
            StoreError::Io(e) => e.raw_os_error() == Some(libc::ENOSPC),
            _ => false,
        }
    }
}

pub(crate) fn is_no_space_message(msg: &str) -> bool {
    msg.contains("No space left on device") || msg.contains("NoSpace")
}

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
