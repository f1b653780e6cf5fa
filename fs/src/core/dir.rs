//! Directory handles: opendir, readdir(plus), releasedir, fsyncdir.
//!
//! Owns: the listing snapshot of an open directory. A listing is taken when reading starts
//! (offset 0) and offsets index into it, so entries removed or added while a directory is
//! read (`rm -rf` deletes as it reads) never make a reader skip or repeat an entry.

use crate::fs_err;
use std::sync::Arc;

use pvfs_store::{FileKind, Ino};

use super::{Fs, Handle};
use crate::error::{Result, StoreResultExt};

/// One directory entry.
#[derive(Clone, Debug)]
pub struct DirEntry {
    /// Child inode.
    pub ino: Ino,
    /// Offset of the entry after this one (what the kernel passes to continue).
    pub next: u64,
    /// Kind.
    pub kind: FileKind,
    /// Name.
    pub name: Vec<u8>,
}

impl DirEntry {
    /// True for `.` and `..`, which the kernel does not count as lookups.
    pub fn is_dot(&self) -> bool {
        self.name == b"." || self.name == b".."
    }
}

impl Fs {
    /// Opens a directory; returns the handle.
    pub fn opendir(&self, ino: Ino) -> Result<u64> {
        if self.node(ino)?.kind != FileKind::Dir {
            return Err(fs_err!(ENOTDIR, "inode {ino} is not a directory"));
        }
        Ok(self.new_handle(Handle::Dir { ino, entries: None }))
    }

    fn listing(&self, ino: Ino) -> Result<Arc<Vec<DirEntry>>> {
        let n = self.node(ino)?;
        let children = self.store.list_dir(ino).fs()?;
        let mut out = Vec::with_capacity(children.len() + 2);
        out.push(DirEntry {
            ino,
            next: 1,
            kind: FileKind::Dir,
            name: b".".to_vec(),
        });
        out.push(DirEntry {
            ino: n.parent,
            next: 2,
            kind: FileKind::Dir,
            name: b"..".to_vec(),
        });
        for (i, (name, d)) in children.into_iter().enumerate() {
            out.push(DirEntry {
                ino: d.ino,
                next: i as u64 + 3,
                kind: d.kind,
                name,
            });
        }
        Ok(Arc::new(out))
    }

    /// Entries of an open directory from `offset` on (0 starts over with a fresh listing).
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<(Arc<Vec<DirEntry>>, usize)> {
        let ino = match self.handles.lock().get(&fh) {
            Some(Handle::Dir { ino, entries }) if offset > 0 => {
                if let Some(e) = entries {
                    return Ok((e.clone(), (offset as usize).min(e.len())));
                }
                *ino
            }
            Some(Handle::Dir { ino, .. }) => *ino,
            _ => return Err(fs_err!(EBADF, "no open directory with handle {fh}")),
        };
        let listing = self.listing(ino)?;
        if let Some(Handle::Dir { entries, .. }) = self.handles.lock().get_mut(&fh) {
            *entries = Some(listing.clone());
        }
        let start = (offset as usize).min(listing.len());
        Ok((listing, start))
    }

    /// Closes a directory handle.
    pub fn releasedir(&self, fh: u64) {
        self.handles.lock().remove(&fh);
    }

    /// Makes every change so far durable (names are part of the op log).
    pub fn fsyncdir(&self) -> Result<()> {
        self.store.sync().fs()
    }
}
