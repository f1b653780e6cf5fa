//! The error type of pvfs-net.

use thiserror::Error;

/// Errors of the network layer.
#[derive(Debug, Error)]
pub enum NetError {
    /// A peer sent something that is not a valid message: the stream is closed.
    #[error("malformed message from peer: {0}")]
    Malformed(String),
    /// A frame longer than the protocol allows: the stream is closed before reading it.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// Certificates, keys or the TLS configuration.
    #[error("TLS: {0}")]
    Tls(String),
    /// A connection could not be made, or was refused by the peer.
    #[error("connection: {0}")]
    Connect(String),
    /// An I/O error on the stream.
    #[error("stream I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The local store refused or failed.
    #[error("store: {0}")]
    Store(#[from] pvfs_store::StoreError),
}

/// Result with `NetError`.
pub type Result<T> = std::result::Result<T, NetError>;
