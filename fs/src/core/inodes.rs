//! The inode table: what the kernel holds (lookup counts) and what is open (open counts and
//! write buffers), per local inode number.
//!
//! Owns: the lifetime of per-inode state. An entry lives while the kernel has a lookup
//! reference or a handle is open, and goes at `forget`/last `release`: the table is bounded
//! by what the kernel itself keeps. Attributes are not cached here: they come from the store.
//! Must not: call into the store while holding its lock (the store calls `is_open` under
//! its writer lock).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use pvfs_store::Ino;

use super::file::FileState;

#[derive(Debug, Default)]
struct Entry {
    nlookup: u64,
    open: u32,
    file: Option<Arc<FileState>>,
}

/// Per-inode state, keyed by local inode number.
#[derive(Debug, Default)]
pub(crate) struct InodeTable {
    map: Mutex<HashMap<Ino, Entry>>,
}

impl InodeTable {
    pub(crate) fn lookup(&self, ino: Ino) {
        self.map.lock().entry(ino).or_default().nlookup += 1;
    }

    pub(crate) fn forget(&self, ino: Ino, n: u64) {
        let mut map = self.map.lock();
        if let Some(e) = map.get_mut(&ino) {
            e.nlookup = e.nlookup.saturating_sub(n);
            if e.nlookup == 0 && e.open == 0 {
                map.remove(&ino);
            }
        }
    }

    /// Registers an open handle; returns the file's shared state, made by `make` on first open.
    pub(crate) fn open(&self, ino: Ino, make: impl FnOnce() -> Arc<FileState>) -> Arc<FileState> {
        let mut map = self.map.lock();
        let e = map.entry(ino).or_default();
        e.open += 1;
        e.file.get_or_insert_with(make).clone()
    }

    /// Unregisters an open handle; returns true if it was the last one.
    pub(crate) fn release(&self, ino: Ino) -> bool {
        let mut map = self.map.lock();
        let Some(e) = map.get_mut(&ino) else {
            return true;
        };
        e.open = e.open.saturating_sub(1);
        if e.open > 0 {
            return false;
        }
        e.file = None;
        if e.nlookup == 0 {
            map.remove(&ino);
        }
        true
    }

    pub(crate) fn is_open(&self, ino: Ino) -> bool {
        self.map.lock().get(&ino).is_some_and(|e| e.open > 0)
    }

    pub(crate) fn file(&self, ino: Ino) -> Option<Arc<FileState>> {
        self.map.lock().get(&ino).and_then(|e| e.file.clone())
    }

    pub(crate) fn open_files(&self) -> Vec<Arc<FileState>> {
        self.map
            .lock()
            .values()
            .filter_map(|e| e.file.clone())
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.lock().len()
    }
}
