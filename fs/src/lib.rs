//! pvfs-fs: the filesystem a FUSE mount shows, over a pvfs store.
//!
//! `core` is the filesystem proper: POSIX operations on inode numbers, write buffering and
//! content commits, handles, results as `FsError` with an errno. `fuse` is a thin
//! `fuser::Filesystem` that turns kernel requests into `core` calls and replies.
//!
//! Architecture invariant: this crate never depends on `pvfs-net`; remote content reaches it
//! through traits defined in `pvfs-store`. Only `fuse` names `fuser` types.

#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

pub mod core;
mod error;
pub mod fuse;

pub use crate::core::{Attr, Caller, DirEntry, Fs, FsOptions, SetAttrRequest, StatFs};
pub use error::{FsError, Result};
