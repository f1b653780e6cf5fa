//! The one error type of pvfs-fs: POSIX-shaped, one errno per error.
//!
//! Owns: `FsError`, its log level, and the mapping of store errors onto errno values.
//! Errors get their errno where they happen; the store's cause is kept as the source.

use pvfs_store::StoreError;

/// A failed filesystem operation.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct FsError {
    errno: i32,
    message: String,
    #[source]
    source: Option<StoreError>,
}

impl FsError {
    /// An error with this errno and message.
    pub fn new(errno: i32, message: impl Into<String>) -> FsError {
        FsError {
            errno,
            message: message.into(),
            source: None,
        }
    }

    /// The errno the kernel gets.
    pub fn to_errno(&self) -> i32 {
        self.errno
    }

    /// True if the cause is content that is not on this device (it can be fetched).
    pub fn is_absent(&self) -> bool {
        self.absent_chunk().is_some()
    }

    /// The chunk whose absence caused this error, if that was the cause.
    pub fn absent_chunk(&self) -> Option<pvfs_store::ChunkId> {
        match self.source {
            Some(StoreError::ChunkAbsent(id)) => Some(id),
            _ => None,
        }
    }

    /// Whether this is worth a warning: expected outcomes (ENOENT, EEXIST, ...) log at debug.
    pub fn is_serious(&self) -> bool {
        matches!(
            self.errno,
            libc::EIO | libc::ENOSPC | libc::ENOMEM | libc::EFBIG
        )
    }

    /// Maps a store error onto the errno POSIX prescribes for it, keeping it as the cause.
    pub fn from_store(e: StoreError) -> FsError {
        let errno = match &e {
            StoreError::NotFound(_) => libc::ENOENT,
            StoreError::AlreadyExists(_) => libc::EEXIST,
            StoreError::NotEmpty => libc::ENOTEMPTY,
            StoreError::NotADirectory => libc::ENOTDIR,
            StoreError::IsADirectory => libc::EISDIR,
            StoreError::InvalidName(_) | StoreError::Invalid(_) => libc::EINVAL,
            StoreError::NameTooLong(_) => libc::ENAMETOOLONG,
            StoreError::TooManyLinks => libc::EMLINK,
            StoreError::NoAttribute => libc::ENODATA,
            StoreError::AttributeTooLarge => libc::E2BIG,
            e if e.is_no_space() => libc::ENOSPC,
            _ => libc::EIO,
        };
        FsError {
            errno,
            message: e.to_string(),
            source: Some(e),
        }
    }
}

/// `FsError::new(libc::ENOENT, format!(...))` as a macro: `fs_err!(ENOENT, "no {}", x)`.
#[macro_export]
macro_rules! fs_err {
    ($errno:ident, $($arg:tt)+) => {
        $crate::FsError::new(libc::$errno, format!($($arg)+))
    };
}

/// The result type of pvfs-fs.
pub type Result<T, E = FsError> = std::result::Result<T, E>;

/// `?` on store calls inside fs: maps with `FsError::from_store`.
pub(crate) trait StoreResultExt<T> {
    fn fs(self) -> Result<T>;
}

impl<T> StoreResultExt<T> for std::result::Result<T, StoreError> {
    fn fs(self) -> Result<T> {
        self.map_err(FsError::from_store)
    }
}
