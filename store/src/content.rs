//! File content edits: replacing extents, truncating, punching holes, sharing ranges.
//!
//! Owns: the extent map invariants (extents of a file never overlap, lie below its size, and
//! each holds one reference on its chunk) and the `Content` op of each edit.
//! Must not: chunk large buffers (callers prepare chunks off the writer lock) or know about
//! open files and their buffers (that is `fs`).

use bytes::Bytes;

use crate::error::{Result, StoreError};
use crate::records::{ExtentRecord, NodeRecord, OpKind};
use crate::txn::{PreparedChunk, Txn};
use crate::types::{ChunkId, FileKind, Ino, OpId, Timestamp};

/// True if every byte is zero (such ranges are stored as holes).
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    let words_zero = words.all(|w| u128::from_ne_bytes(w.try_into().expect("16-byte chunk")) == 0);
    words_zero && words.remainder().iter().all(|&b| b == 0)
}

/// One new extent of an edit.
#[derive(Clone, Debug)]
pub struct NewExtent {
    /// File offset.
    pub offset: u64,
    /// The chunk.
    pub chunk: PreparedChunk,
}

impl<'a> Txn<'a> {
    fn file_req(&self, ino: Ino) -> Result<NodeRecord> {
        let n = self.node_req(ino)?;
        match n.kind {
            FileKind::File => Ok(n),
            FileKind::Dir => Err(StoreError::IsADirectory),
            _ => Err(StoreError::Invalid("not a regular file".into())),
        }
    }

    fn set_size(&mut self, n: &mut NodeRecord, size: u64) {
        let s = &mut self.state.stats;
        s.logical_bytes = s.logical_bytes.saturating_sub(n.size).saturating_add(size);
        n.size = size;
    }

    /// Removes content in `[a, b)`: extents inside go, extents across an edge are cut and
    /// their remaining part stored as a new chunk. Returns the extents created at the edges.
    fn zero_range(&mut self, ino: Ino, a: u64, b: u64) -> Result<Vec<(u64, ChunkId, u32)>> {
        let mut created = Vec::new();
        for (off, e) in self.extents(ino, a, b)? {
            let end = off + u64::from(e.len);
            if off >= a && end <= b {
                self.delete_extent(ino, off, &e)?;
                continue;
            }
            // Read the edge chunk before its reference goes: that may delete it.
            let plain = self.chunk_plain(&e.chunk, e.len)?;
            self.delete_extent(ino, off, &e)?;
            if off < a {
                let piece = &plain[..(a - off) as usize];
                created.extend(self.put_piece(ino, off, piece)?);
            }
            if end > b {
                let piece = &plain[(b - off) as usize..];
                created.extend(self.put_piece(ino, b, piece)?);
            }
        }
        Ok(created)
    }

    fn put_piece(
        &mut self,
        ino: Ino,
        off: u64,
        piece: &[u8],
    ) -> Result<Option<(u64, ChunkId, u32)>> {
        if is_zero(piece) {
            return Ok(None);
        }
        let c = PreparedChunk::new(Bytes::copy_from_slice(piece), false);
        self.incref(&c)?;
        let len = piece.len() as u32;
        self.put_extent(ino, off, ExtentRecord { chunk: c.id, len });
        Ok(Some((off, c.id, len)))
    }

    fn content_changed(
        &mut self,
        ino: Ino,
        mut n: NodeRecord,
        (start, end): (u64, u64),
        extents: Vec<(u64, ChunkId, u32)>,
        mtime: Timestamp,
    ) -> OpId {
        n.mtime = mtime;
        n.ctime = self.now();
        let op = self.record(OpKind::Content {
            node: n.id,
            base: n.version,
            start,
            end,
            extents,
            size: n.size,
            mtime,
        });
        n.version = Some(op);
        n.stamps.mtime = self.state.hlc;
        self.put_node(ino, &n);
        op
    }

    /// Replaces the content of `ino` in `[start, end)` with `new` and sets the size.
    ///
    /// `start` and `end` must not fall inside an existing extent: callers extend an edit to
    /// the extents around it and re-chunk the whole region. Holes are simply gaps in `new`.
    pub fn replace_extents(
        &mut self,
        ino: Ino,
        (start, end): (u64, u64),
        new: &[NewExtent],
        size: u64,
        mtime: Timestamp,
    ) -> Result<OpId> {
        let mut n = self.file_req(ino)?;
        let old = self.extents(ino, start, end)?;
        if let Some((off, _)) = old.first() {
            if *off < start {
                return Err(StoreError::Invalid(format!(
                    "edit of inode {ino} starts inside an extent"
                )));
            }
        }
        if let Some((off, e)) = old.last() {
            if off + u64::from(e.len) > end {
                return Err(StoreError::Invalid(format!(
                    "edit of inode {ino} ends inside an extent"
                )));
            }
        }
        let mut pos = start;
        for x in new {
            let len = x.chunk.plain.len() as u64;
            if x.offset < pos || x.offset + len > end {
                return Err(StoreError::Invalid(
                    "new extents overlap or leave the edited range".into(),
                ));
            }
            pos = x.offset + len;
        }
        // Reference the new chunks before dropping the old ones, so shared chunks stay stored.
        for x in new {
            self.incref(&x.chunk)?;
        }
        for (off, e) in old {
            self.delete_extent(ino, off, &e)?;
        }
        let mut extents = Vec::with_capacity(new.len());
        for x in new {
            let len = x.chunk.plain.len() as u32;
            self.put_extent(
                ino,
                x.offset,
                ExtentRecord {
                    chunk: x.chunk.id,
                    len,
                },
            );
            extents.push((x.offset, x.chunk.id, len));
        }
        if size < n.size {
            extents.extend(self.zero_range(ino, size, u64::MAX)?);
        }
        self.set_size(&mut n, size);
        Ok(self.content_changed(ino, n, (start, end), extents, mtime))
    }

    /// Sets the size of a file: shrinking drops content beyond it, growing adds a hole.
    pub fn truncate(&mut self, ino: Ino, size: u64) -> Result<NodeRecord> {
        let mut n = self.file_req(ino)?;
        let old = n.size;
        let extents = if size < old {
            self.zero_range(ino, size, u64::MAX)?
        } else {
            Vec::new()
        };
        self.set_size(&mut n, size);
        let now = self.now();
        self.content_changed(ino, n, (size.min(old), size.max(old)), extents, now);
        self.node_req(ino)
    }

    /// Makes `[a, b)` a hole without changing the size (`FALLOC_FL_PUNCH_HOLE`).
    pub fn punch_hole(&mut self, ino: Ino, a: u64, b: u64) -> Result<()> {
        let n = self.file_req(ino)?;
        let b = b.min(n.size);
        if a >= b {
            return Ok(());
        }
        let extents = self.zero_range(ino, a, b)?;
        let now = self.now();
        self.content_changed(ino, n, (a, b), extents, now);
        Ok(())
    }

    /// Grows a file to at least `size` (`fallocate` mode 0: the new range reads as zeros).
    pub fn allocate(&mut self, ino: Ino, size: u64) -> Result<()> {
        let mut n = self.file_req(ino)?;
        if size <= n.size {
            return Ok(());
        }
        let old = n.size;
        self.set_size(&mut n, size);
        let mtime = n.mtime;
        self.content_changed(ino, n, (old, size), Vec::new(), mtime);
        Ok(())
    }

    /// Gives the empty file `ino` the content `extents` (offset, chunk, length: chunks this
    /// store references already, held here or not) and size `size`, as a local edit.
    pub(crate) fn fill_empty(
        &mut self,
        ino: Ino,
        extents: Vec<(u64, ChunkId, u32)>,
        size: u64,
        mtime: Timestamp,
    ) -> Result<()> {
        let mut n = self.file_req(ino)?;
        if n.size != 0 || !self.extents(ino, 0, u64::MAX)?.is_empty() {
            return Err(StoreError::Invalid(format!("inode {ino} is not empty")));
        }
        let device = self.state.device;
        for &(off, chunk, len) in &extents {
            self.incref_id(&chunk, len, device)?;
            self.put_extent(ino, off, ExtentRecord { chunk, len });
        }
        self.set_size(&mut n, size);
        self.content_changed(ino, n, (0, size), extents, mtime);
        Ok(())
    }

    /// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off`, sharing whole chunks
    /// instead of copying their bytes. Returns the number of bytes copied (short at the end of
    /// the source).
    pub fn copy_range(
        &mut self,
        src: Ino,
        src_off: u64,
        dst: Ino,
        dst_off: u64,
        len: u64,
    ) -> Result<u64> {
        let s = self.file_req(src)?;
        let mut d = self.file_req(dst)?;
        let len = len.min(s.size.saturating_sub(src_off));
        if len == 0 {
            return Ok(0);
        }
        let src_end = src_off + len;
        let dst_end = dst_off
            .checked_add(len)
            .ok_or_else(|| StoreError::Invalid("offset overflow".into()))?;
        // Collect the pieces first: source and destination may be the same file.
        let mut shared: Vec<(u64, ExtentRecord)> = Vec::new();
        let mut partial: Vec<(u64, PreparedChunk)> = Vec::new();
        for (off, e) in self.extents(src, src_off, src_end)? {
            let end = off + u64::from(e.len);
            let to = off.max(src_off) - src_off + dst_off;
            if off >= src_off && end <= src_end {
                shared.push((to, e));
            } else {
                let plain = self.chunk_plain(&e.chunk, e.len)?;
                let a = (off.max(src_off) - off) as usize;
                let b = (end.min(src_end) - off) as usize;
                if !is_zero(&plain[a..b]) {
                    partial.push((
                        to,
                        PreparedChunk::new(Bytes::copy_from_slice(&plain[a..b]), false),
                    ));
                }
            }
        }
        for (_, e) in &shared {
            self.incref_existing(&e.chunk)?;
        }
        for (_, c) in &partial {
            self.incref(c)?;
        }
        let mut extents = self.zero_range(dst, dst_off, dst_end)?;
        for (to, e) in shared {
            self.put_extent(dst, to, e);
            extents.push((to, e.chunk, e.len));
        }
        for (to, c) in partial {
            let len = c.plain.len() as u32;
            self.put_extent(dst, to, ExtentRecord { chunk: c.id, len });
            extents.push((to, c.id, len));
        }
        extents.sort_by_key(|x| x.0);
        if dst_end > d.size {
            self.set_size(&mut d, dst_end);
        }
        let now = self.now();
        self.content_changed(dst, d, (dst_off, dst_end), extents, now);
        Ok(len)
    }
}
