//! The filesystem core: POSIX operations on local inode numbers, with no FUSE types.
//!
//! Owns: the inode table (lookup counts, open counts, per-file write buffers), file and
//! directory handles, and the translation of POSIX calls into store transactions.
//! Operations live one family per file: `names` (lookup, create, link, unlink, rename),
//! `attrs` (getattr, setattr, xattrs, access, statfs), `io` (open, read, write, flush,
//! fsync, fallocate, lseek, copy_file_range), `dir` (opendir, readdir).
//! Must not: wait on the network, except inside `waiting_allowed` (the FUSE layer's blocking
//! pool, background commits, shutdown), where a commit may wait for content held elsewhere.
//! Calls may block on the local disk; the FUSE layer calls them from its own session threads
//! and its blocking pool, never from async workers.

mod attrs;
mod dir;
mod file;
mod inodes;
mod io;
mod names;
mod remote;

use crate::fs_err;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use pvfs_store::{ChunkSource, FileKind, Ino, NodeRecord, Store, Timestamp};

pub use attrs::{SetAttrRequest, StatFs};
pub use dir::DirEntry;
pub use remote::waiting_allowed;

use crate::error::{Result, StoreResultExt};
use file::FileState;
use inodes::InodeTable;
use remote::Remote;

/// Tuning of the filesystem core.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Buffered bytes of one file at which a background commit starts.
    pub commit_threshold: usize,
    /// Buffered bytes of one file at which writers wait for the commit in flight.
    pub dirty_limit: usize,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            commit_threshold: 16 << 20,
            dirty_limit: 64 << 20,
        }
    }
}

/// Who is asking: the caller's uid and gid.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// Attributes of a node as the kernel sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Local inode number.
    pub ino: Ino,
    /// Kind.
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky.
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number.
    pub rdev: u32,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks.
    pub blocks: u64,
    /// Access time.
    pub atime: Timestamp,
    /// Modification time.
    pub mtime: Timestamp,
    /// Change time.
    pub ctime: Timestamp,
    /// Creation time.
    pub btime: Timestamp,
}

impl Attr {
    fn from_node(ino: Ino, n: &NodeRecord) -> Attr {
        Attr {
            ino,
            kind: n.kind,
            perm: (n.perm & 0o7777) as u16,
            nlink: n.nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: n.rdev,
            size: n.size,
            blocks: n.size.div_ceil(512),
            atime: n.atime,
            mtime: n.mtime,
            ctime: n.ctime,
            btime: n.btime,
        }
    }
}

/// The filesystem. Shared by all FUSE session threads.
#[derive(Debug)]
pub struct Fs {
    store: Store,
    inodes: InodeTable,
    handles: Mutex<std::collections::HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    opts: FsOptions,
    /// Bytes buffered in all open files, checked against free space on write.
    dirty_total: Arc<AtomicU64>,
    /// Where absent chunks come from (other devices), once the daemon wires it in.
    remote: Arc<Remote>,
}

#[derive(Debug)]
enum Handle {
    File {
        ino: Ino,
        file: Arc<FileState>,
    },
    Dir {
        ino: Ino,
        entries: Option<Arc<Vec<DirEntry>>>,
    },
}

impl Fs {
    /// A filesystem over `store`. Open-but-unlinked files left by a crash are deleted now.
    pub fn new(store: Store, opts: FsOptions) -> Result<Fs> {
        for ino in store.orphans().fs()? {
            store.commit(false, |tx| tx.release_orphan(ino)).fs()?;
            tracing::info!(
                ino,
                "deleted an unlinked file left open by the previous run"
            );
        }
        Ok(Fs {
            store,
            inodes: InodeTable::default(),
            handles: Mutex::new(Default::default()),
            next_handle: AtomicU64::new(1),
            opts,
            dirty_total: Arc::new(AtomicU64::new(0)),
            remote: Arc::default(),
        })
    }

    /// True if the kernel holds `ino` open or referenced (a remote delete keeps it until
    /// closed).
    pub fn is_open(&self, ino: Ino) -> bool {
        self.inodes.is_open(ino)
    }

    /// Sets where absent chunks are fetched from.
    pub fn set_remote(&self, remote: Arc<dyn ChunkSource>) {
        self.remote.set(remote);
    }

    /// Where absent chunks are fetched from, if anywhere.
    pub fn remote(&self) -> Option<Arc<dyn ChunkSource>> {
        self.remote.get()
    }

    /// The store under this filesystem.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn new_handle(&self, h: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, h);
        fh
    }

    fn node(&self, ino: Ino) -> Result<NodeRecord> {
        self.store
            .node(ino)
            .fs()?
            .ok_or_else(|| fs_err!(ENOENT, "inode {ino} does not exist"))
    }

    /// Attributes of `ino`, including what is still buffered in an open file.
    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let n = self.node(ino)?;
        let mut a = Attr::from_node(ino, &n);
        if let Some(f) = self.inodes.file(ino) {
            f.overlay_attr(&mut a);
        }
        Ok(a)
    }

    /// Counts one more kernel reference to `ino` (from lookup, create, readdirplus...).
    pub fn remember(&self, ino: Ino) {
        self.inodes.lookup(ino);
    }

    /// Drops `n` kernel references to `ino`.
    pub fn forget(&self, ino: Ino, n: u64) {
        self.inodes.forget(ino, n);
    }

    /// Number of inodes the table tracks (for tests and stats).
    pub fn tracked_inodes(&self) -> usize {
        self.inodes.len()
    }

    /// Commits every buffered write of every open file (at unmount).
    pub fn flush_all(&self) -> Result<()> {
        remote::waiting_allowed(|| {
            for f in self.inodes.open_files() {
                f.flush(&self.store, true)?;
            }
            self.store.sync().fs()
        })
    }
}
