//! File I/O: open, read, write, flush, release, fsync, fallocate, lseek, copy_file_range.
//!
//! Owns: file handles and the open/close lifecycle of `FileState` (buffers are committed at
//! close; a file without names is deleted at its last close).
//! Must not: hold a store lock while taking the inode table's, or the reverse.

use crate::fs_err;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use pvfs_store::{ChunkId, FileKind, Ino};

use super::file::FileState;
use super::{Fs, Handle};
use crate::error::{Result, StoreResultExt};

/// Largest unlinked file whose deletion at its last close runs on the requesting thread.
const LIGHT_DELETE_MAX: u64 = 4 << 20;

/// Largest file offset pvfs accepts.
pub(crate) const MAX_FILE_SIZE: u64 = i64::MAX as u64;

impl Fs {
    fn file_state(&self, ino: Ino, size: u64) -> Arc<FileState> {
        let opts = self.opts.clone();
        let dirty = self.dirty_total.clone();
        let remote = self.remote.clone();
        self.inodes.open(ino, || {
            Arc::new(FileState::new(ino, size, opts, dirty, remote))
        })
    }

    pub(crate) fn handle_file(&self, fh: u64) -> Result<(Ino, Arc<FileState>)> {
        match self.handles.lock().get(&fh) {
            Some(Handle::File { ino, file }) => Ok((*ino, file.clone())),
            _ => Err(fs_err!(EBADF, "no open file with handle {fh}")),
        }
    }

    /// Opens `ino`; returns the handle. `truncate` is `O_TRUNC`.
    pub fn open(&self, ino: Ino, truncate: bool) -> Result<u64> {
        let n = self.node(ino)?;
        match n.kind {
            FileKind::File => {}
            FileKind::Dir => return Err(fs_err!(EISDIR, "inode {ino} is a directory")),
            _ => return Err(fs_err!(ENXIO, "inode {ino} is not a regular file")),
        }
        let file = self.file_state(ino, n.size);
        if truncate {
            if let Err(e) = file.truncate(&self.store, 0) {
                self.release_file(ino)?;
                return Err(e);
            }
        }
        Ok(self.new_handle(Handle::File { ino, file }))
    }

    /// Opens a handle on a file just created by `create`.
    pub(crate) fn open_new(&self, ino: Ino) -> u64 {
        let file = self.file_state(ino, 0);
        self.new_handle(Handle::File { ino, file })
    }

    /// True if closing, flushing or changing the size or times of the file behind `fh` (or
    /// of inode `ino`, when `fh` is `None`) is quick enough to run on the requesting thread:
    /// the commit it implies is small and no large orphan would be deleted.
    pub fn is_light(&self, ino: Ino, fh: Option<u64>) -> bool {
        let file = match fh {
            Some(fh) => self.handle_file(fh).ok().map(|(_, f)| f),
            None => self.inodes.file(ino),
        };
        let light_commit = file.is_none_or(|f| f.commit_is_light(&self.store));
        light_commit
            && self
                .store
                .node(ino)
                .ok()
                .flatten()
                .is_some_and(|n| n.nlink > 0 || n.size <= LIGHT_DELETE_MAX)
    }

    /// Reads up to `size` bytes at `offset`.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let (_, file) = self.handle_file(fh)?;
        file.read(&self.store, offset, size)
    }

    /// `read`, fetching what content made elsewhere it finds absent (a file edited while
    /// its reader waited for a fetch); only where waiting is allowed.
    pub fn read_fetching(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let (ino, file) = self.handle_file(fh)?;
        match file.read(&self.store, offset, size) {
            Err(e) if e.is_absent() => {
                // Everything absent in the range at once, then whatever changes meanwhile.
                let (_, absent) = self.absent_chunks(fh, offset, u64::from(size))?;
                self.remote.fetch_wait(ino, &absent)?;
                self.remote
                    .retrying(&self.store, ino, || file.read(&self.store, offset, size))
            }
            res => res,
        }
    }

    /// The chunks of the committed content of `fh` in `[offset, offset + len)` that are not
    /// stored on this device (content made elsewhere), with the file's inode.
    pub fn absent_chunks(
        &self,
        fh: u64,
        offset: u64,
        len: u64,
    ) -> Result<(Ino, Vec<(ChunkId, u32)>)> {
        let (ino, _) = self.handle_file(fh)?;
        let mut out = Vec::new();
        for (_, e) in self
            .store
            .extents(ino, offset, offset.saturating_add(len))
            .fs()?
        {
            if !self.store.is_readable(&e.chunk).fs()? {
                out.push((e.chunk, e.len));
            }
        }
        Ok((ino, out))
    }

    /// Writes `data` at `offset`; returns the bytes written. `kill_suidgid`: the writer is
    /// unprivileged, so setuid (and setgid with group-execute) must go, as on a local fs.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_suidgid: bool) -> Result<u32> {
        let (ino, file) = self.handle_file(fh)?;
        if kill_suidgid {
            self.kill_suidgid(ino)?;
        }
        if offset.saturating_add(data.len() as u64) > MAX_FILE_SIZE {
            return Err(fs_err!(EFBIG, "write beyond the largest file size"));
        }
        let buffered = self.dirty_total.load(Ordering::Relaxed);
        self.store.check_space(buffered + data.len() as u64).fs()?;
        file.write(&self.store, offset, data)?;
        Ok(data.len() as u32)
    }

    /// Commits what this file has buffered (on every `close`).
    pub fn flush(&self, fh: u64) -> Result<()> {
        let (_, file) = self.handle_file(fh)?;
        file.flush(&self.store, true)
    }

    /// Makes the file's data and every change before it durable.
    pub fn fsync(&self, fh: u64) -> Result<()> {
        let (_, file) = self.handle_file(fh)?;
        file.flush(&self.store, true)?;
        self.store.sync().fs()
    }

    /// Closes a handle. At the last close, buffers are committed, and a file that lost all
    /// its names meanwhile is deleted.
    pub fn release(&self, fh: u64) -> Result<()> {
        let Some(h) = self.handles.lock().remove(&fh) else {
            return Err(fs_err!(EBADF, "no open handle {fh}"));
        };
        let Handle::File { ino, file } = h else {
            return Ok(());
        };
        let res = file.flush(&self.store, true);
        drop(file);
        self.release_file(ino)?;
        res
    }

    fn release_file(&self, ino: Ino) -> Result<()> {
        if self.inodes.release(ino) && self.store.node(ino).fs()?.is_some_and(|n| n.nlink == 0) {
            self.store.commit(false, |tx| tx.release_orphan(ino)).fs()?;
        }
        Ok(())
    }

    /// `fallocate`: mode 0 (allocate, may grow the file), `KEEP_SIZE`, and
    /// `PUNCH_HOLE | KEEP_SIZE`. Other modes are not supported.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let (ino, file) = self.handle_file(fh)?;
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or_else(|| fs_err!(EFBIG, "range too large"))?;
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        let store = &self.store;
        match mode {
            0 => {
                let size = self.getattr(ino)?.size;
                if end > size {
                    let avail = store.space().fs()?.available;
                    if end - size > avail {
                        return Err(fs_err!(
                            ENOSPC,
                            "not enough free space to allocate {length} bytes"
                        ));
                    }
                    file.exclusive(
                        store,
                        |_| 0,
                        || store.commit(false, |tx| tx.allocate(ino, end)).fs(),
                    )?;
                }
                Ok(())
            }
            KEEP => Ok(()),
            m if m == PUNCH | KEEP => file.exclusive(
                store,
                |_| 0,
                || {
                    store
                        .commit(false, |tx| tx.punch_hole(ino, offset, end))
                        .fs()
                },
            ),
            _ => Err(fs_err!(
                EOPNOTSUPP,
                "fallocate mode {mode:#x} is not supported"
            )),
        }
    }

    /// `lseek` with `SEEK_DATA` or `SEEK_HOLE` (others are handled by the kernel).
    pub fn lseek(&self, fh: u64, offset: u64, whence: i32) -> Result<u64> {
        let (ino, file) = self.handle_file(fh)?;
        file.flush(&self.store, true)?;
        let size = self.getattr(ino)?.size;
        if offset >= size {
            return Err(fs_err!(ENXIO, "offset {offset} is at or beyond the end"));
        }
        let extents = self.store.extents(ino, offset, size).fs()?;
        match whence {
            libc::SEEK_DATA => extents
                .first()
                .map(|&(off, _)| off.max(offset))
                .ok_or_else(|| fs_err!(ENXIO, "no data after {offset}")),
            libc::SEEK_HOLE => {
                let mut pos = offset;
                for (off, e) in extents {
                    if off > pos {
                        break;
                    }
                    pos = pos.max(off + u64::from(e.len));
                }
                Ok(pos.min(size))
            }
            _ => Err(fs_err!(
                EINVAL,
                "lseek whence {whence} is not supported here"
            )),
        }
    }

    /// Copies a range between (or within) files, sharing chunks instead of copying bytes.
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u64> {
        let (ino_in, file_in) = self.handle_file(fh_in)?;
        let (ino_out, file_out) = self.handle_file(fh_out)?;
        let len = len.min(1 << 30);
        if off_out.saturating_add(len) > MAX_FILE_SIZE {
            return Err(fs_err!(EFBIG, "copy beyond the largest file size"));
        }
        // Commit the source first, then work under the destination's commit lock only: two
        // copies in opposite directions never hold both locks.
        if ino_in != ino_out {
            file_in.flush(&self.store, true)?;
        }
        let store = &self.store;
        file_out.exclusive(
            store,
            |_| 0,
            || {
                store
                    .commit(false, |tx| {
                        tx.copy_range(ino_in, off_in, ino_out, off_out, len)
                    })
                    .fs()
            },
        )
    }
}
