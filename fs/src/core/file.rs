//! Open regular files: write buffering, reads through the buffer, and content commits.
//!
//! Owns: per-file buffered writes (`dirty`), the buffer being committed (`inflight`, still
//! readable), and the commit algorithm: every buffered run is widened to the extents around
//! it, re-chunked with FastCDC, and committed as one store transaction. Only the changed
//! regions are read and hashed again, so appending to a large file costs the size of its
//! last chunk, not of the file. A background commit (above `commit_threshold`) commits only
//! chunks whose end the content has decided and keeps the undecided tail buffered, so that a
//! stream gets the same cut points however it was written.
//! Must not: hold `inner` while doing store I/O; only `commit_lock` is held across a commit.

use crate::fs_err;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use pvfs_store::{is_zero, ChunkId, Ino, NewExtent, PreparedChunk, Staging, Store, Timestamp};

use super::remote::{Keeping, Remote};
use super::{Attr, FsOptions};
use crate::error::{FsError, Result, StoreResultExt};

/// Plaintext bytes hashed and staged as one part (`Store::stage_part`): storing one part
/// overlaps hashing the next.
const STAGE_PART_BYTES: usize = 4 << 20;
/// New (encoded) bytes from which a part is staged ahead of its commit instead of going
/// through the write-ahead log with it.
const STAGE_MIN_BYTES: usize = 1 << 20;

/// Buffered byte runs by file offset: never overlapping, never touching.
type Runs = BTreeMap<u64, Vec<u8>>;

/// Runs taken for a commit: immutable, so chunks can be cut from them without a copy.
type Frozen = BTreeMap<u64, Bytes>;

/// Once a run has grown to this size, it reserves room for a whole commit at once, so that a
/// streaming writer's buffer is not copied again each time it doubles.
const RUN_RESERVE_FROM: usize = 1 << 20;

#[derive(Debug, Default)]
struct Inner {
    size: u64,
    dirty: Runs,
    dirty_bytes: usize,
    inflight: Option<Arc<Frozen>>,
    mtime: Option<Timestamp>,
    error: Option<FsError>,
    background: bool,
}

/// The shared state of an open regular file.
#[derive(Debug)]
pub(crate) struct FileState {
    ino: Ino,
    inner: Mutex<Inner>,
    cond: Condvar,
    commit_lock: Mutex<()>,
    opts: FsOptions,
    dirty_total: Arc<AtomicU64>,
    /// (end of the last read, end of what read-ahead has asked for).
    read_ahead: Mutex<(u64, u64)>,
    /// Where the content a commit must read comes from when it was made elsewhere.
    remote: Arc<Remote>,
}

/// Most buffered bytes a commit may have to be run on the requesting thread (`Fs::is_light`):
/// chunking and storing that much costs about as much as handing it to another thread.
const LIGHT_COMMIT_MAX: usize = 256 << 10;

/// How far ahead of a sequential reader chunks are loaded.
const READ_AHEAD: u64 = 8 << 20;

/// Copies `data` into `runs` at `off`, merging with overlapping or adjacent runs.
/// Returns the change in buffered bytes.
fn insert(runs: &mut Runs, off: u64, data: &[u8]) -> isize {
    insert_reserving(runs, off, data, 0)
}

/// `insert`, where a run that grows past `RUN_RESERVE_FROM` by appending reserves room up to
/// `reserve` bytes at once.
fn insert_reserving(runs: &mut Runs, off: u64, data: &[u8], reserve: usize) -> isize {
    if data.is_empty() {
        return 0;
    }
    let end = off + data.len() as u64;
    // Fast paths: append to the run ending at `off`, or overwrite inside one run.
    if let Some((&k, v)) = runs.range_mut(..=off).next_back() {
        let kend = k + v.len() as u64;
        if k <= off && kend >= end {
            v[(off - k) as usize..(end - k) as usize].copy_from_slice(data);
            return 0;
        }
        if kend == off && runs.range(off + 1..=end).next().is_none() {
            let v = runs.get_mut(&k).expect("found above");
            let want = v.len() + data.len();
            if want > v.capacity() && want >= RUN_RESERVE_FROM && reserve > want {
                v.reserve_exact(reserve - v.len());
            }
            v.extend_from_slice(data);
            return data.len() as isize;
        }
    }
    let mut touching: Vec<u64> = Vec::new();
    for (&k, v) in runs.range(..=end).rev() {
        if k + v.len() as u64 >= off {
            touching.push(k);
        } else {
            break;
        }
    }
    let mut start = off;
    let mut stop = end;
    for k in &touching {
        start = start.min(*k);
        stop = stop.max(k + runs[k].len() as u64);
    }
    let mut merged = vec![0u8; (stop - start) as usize];
    let mut old = 0usize;
    for k in touching {
        let v = runs.remove(&k).expect("key collected above");
        old += v.len();
        merged[(k - start) as usize..(k - start) as usize + v.len()].copy_from_slice(&v);
    }
    merged[(off - start) as usize..(end - start) as usize].copy_from_slice(data);
    let new = merged.len();
    runs.insert(start, merged);
    new as isize - old as isize
}

/// Copies into `runs` only the parts of `data` that no run covers (older data under newer).
fn insert_under(runs: &mut Runs, off: u64, data: &[u8]) -> isize {
    let end = off + data.len() as u64;
    let mut gaps = Vec::new();
    let mut pos = off;
    let first = runs
        .range(..=off)
        .next_back()
        .map(|(&k, v)| (k, k + v.len() as u64));
    let covering = first.into_iter().chain(
        runs.range(off + 1..end)
            .map(|(&k, v)| (k, k + v.len() as u64)),
    );
    for (k, kend) in covering {
        if kend <= pos {
            continue;
        }
        if k > pos {
            gaps.push((pos, k.min(end)));
        }
        pos = pos.max(kend);
        if pos >= end {
            break;
        }
    }
    if pos < end {
        gaps.push((pos, end));
    }
    let mut delta = 0;
    for (a, b) in gaps {
        delta += insert(runs, a, &data[(a - off) as usize..(b - off) as usize]);
    }
    delta
}

/// Drops buffered bytes at or beyond `size`. Returns the change in buffered bytes.
fn trim(runs: &mut Runs, size: u64) -> isize {
    let mut delta = 0isize;
    let beyond: Vec<u64> = runs.range(size..).map(|(&k, _)| k).collect();
    for k in beyond {
        delta -= runs.remove(&k).map_or(0, |v| v.len()) as isize;
    }
    if let Some((&k, v)) = runs.range_mut(..size).next_back() {
        let keep = (size - k) as usize;
        if v.len() > keep {
            delta -= (v.len() - keep) as isize;
            v.truncate(keep);
        }
    }
    delta
}

/// The parts of `runs` that overlap `[off, end)`, as (offset, bytes), in order.
fn overlapping<V: AsRef<[u8]>>(
    runs: &BTreeMap<u64, V>,
    off: u64,
    end: u64,
) -> impl Iterator<Item = (u64, &[u8])> {
    let first = runs.range(..=off).next_back();
    first
        .into_iter()
        .chain(runs.range(off + 1..end.max(off + 1)))
        .filter_map(move |(&k, v)| {
            let v = v.as_ref();
            let a = k.max(off);
            let b = (k + v.len() as u64).min(end);
            (a < b).then(|| (a, &v[(a - k) as usize..(b - k) as usize]))
        })
}

/// Copies the parts of `runs` that overlap `[off, off + out.len())` into `out`.
fn copy_out<V: AsRef<[u8]>>(runs: &BTreeMap<u64, V>, off: u64, out: &mut [u8]) {
    for (a, piece) in overlapping(runs, off, off + out.len() as u64) {
        let at = (a - off) as usize;
        out[at..at + piece.len()].copy_from_slice(piece);
    }
}

/// Reads committed content of `ino` at `off` into `out` (holes read as zeros).
pub(crate) fn read_committed(store: &Store, ino: Ino, off: u64, out: &mut [u8]) -> Result<()> {
    read_committed_except(store, ino, off, out, &[])
}

/// `read_committed`, skipping the extents that lie inside one of `spans` (sorted, disjoint
/// `(start, end)` ranges about to be overwritten): their bytes in `out` are left as they are.
fn read_committed_except(
    store: &Store,
    ino: Ino,
    off: u64,
    out: &mut [u8],
    spans: &[(u64, u64)],
) -> Result<()> {
    let end = off + out.len() as u64;
    for (eoff, e) in store.extents(ino, off, end).fs()? {
        if covered(spans, eoff, eoff + u64::from(e.len)) {
            continue;
        }
        let data = store.chunk(&e.chunk, e.len).map_err(|err| {
            if matches!(err, pvfs_store::StoreError::ChunkAbsent(_)) {
                tracing::debug!(ino, offset = eoff, chunk = %e.chunk.fmt_short(), "content is on another device");
            } else {
                tracing::warn!(ino, offset = eoff, chunk = %e.chunk.fmt_short(), "read failed: {err:#}");
            }
            FsError::from_store(err)
        })?;
        let a = eoff.max(off);
        let b = (eoff + u64::from(e.len)).min(end);
        if a < b {
            out[(a - off) as usize..(b - off) as usize]
                .copy_from_slice(&data[(a - eoff) as usize..(b - eoff) as usize]);
        }
    }
    Ok(())
}

/// One region edit: the replaced range and its new extents.
struct Edit {
    start: u64,
    end: u64,
    extents: Vec<NewExtent>,
}

impl FileState {
    pub(crate) fn new(
        ino: Ino,
        size: u64,
        opts: FsOptions,
        dirty_total: Arc<AtomicU64>,
        remote: Arc<Remote>,
    ) -> FileState {
        FileState {
            ino,
            inner: Mutex::new(Inner {
                size,
                ..Inner::default()
            }),
            cond: Condvar::new(),
            commit_lock: Mutex::new(()),
            opts,
            dirty_total,
            read_ahead: Mutex::new((0, 0)),
            remote,
        }
    }

    /// Starts loading the chunks after a sequential read into the cache.
    fn read_ahead(&self, store: &Store, off: u64, end: u64, size: u64) {
        let from = {
            let mut ra = self.read_ahead.lock();
            let sequential = off == ra.0 || (off < ra.0 && off + READ_AHEAD > ra.0);
            ra.0 = end;
            if !sequential || end + READ_AHEAD / 2 <= ra.1 {
                return;
            }
            let from = ra.1.max(end);
            ra.1 = (end + READ_AHEAD).min(size);
            from
        };
        let until = (end + READ_AHEAD).min(size);
        if from >= until {
            return;
        }
        match store.extents(self.ino, from, until) {
            Ok(extents) => store.prefetch(extents.into_iter().map(|(_, e)| (e.chunk, e.len))),
            Err(e) => tracing::debug!(ino = self.ino, "read-ahead: {e:#}"),
        }
    }

    fn account(&self, delta: isize) {
        if delta >= 0 {
            self.dirty_total.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.dirty_total
                .fetch_sub(delta.unsigned_abs() as u64, Ordering::Relaxed);
        }
    }

    /// Size and mtime as buffered writes left them.
    pub(crate) fn overlay_attr(&self, a: &mut Attr) {
        let g = self.inner.lock();
        a.size = g.size;
        a.blocks = g.size.div_ceil(512);
        if let Some(m) = g.mtime {
            a.mtime = m;
            a.ctime = a.ctime.max(m);
        }
    }

    /// True if committing this file now is quick: little is buffered, no commit runs, and
    /// the commit reads no content held elsewhere.
    pub(crate) fn commit_is_light(&self, store: &Store) -> bool {
        let spans = {
            let g = self.inner.lock();
            if g.dirty_bytes > LIGHT_COMMIT_MAX || g.inflight.is_some() || g.background {
                return false;
            }
            // An online-only device's commit waits for another device to store the data.
            if store.is_online_only() && !g.dirty.is_empty() {
                return false;
            }
            spans(&g.dirty)
        };
        regions(store, self.ino, &spans)
            .and_then(|r| absent_under(store, self.ino, &r, &spans))
            .is_ok_and(|a| a.is_empty())
    }

    /// Buffers a write; may start a background commit or wait for one (back-pressure).
    pub(crate) fn write(self: &Arc<Self>, store: &Store, off: u64, data: &[u8]) -> Result<()> {
        let end = off
            .checked_add(data.len() as u64)
            .ok_or_else(|| fs_err!(EFBIG, "write beyond the largest offset"))?;
        let mut g = self.inner.lock();
        if let Some(e) = g.error.take() {
            return Err(e);
        }
        while g.dirty_bytes >= self.opts.dirty_limit && g.background {
            self.cond.wait(&mut g);
        }
        let reserve = self.opts.commit_threshold + data.len();
        let delta = insert_reserving(&mut g.dirty, off, data, reserve);
        g.dirty_bytes = g.dirty_bytes.saturating_add_signed(delta);
        self.account(delta);
        g.size = g.size.max(end);
        g.mtime = Some(Timestamp::now());
        if g.dirty_bytes >= self.opts.commit_threshold && !g.background {
            g.background = true;
            let me = self.clone();
            let store = store.clone();
            let spawned = std::thread::Builder::new()
                .name("pvfs-commit".into())
                .spawn(move || {
                    let res = super::remote::waiting_allowed(|| me.flush(&store, false));
                    if let Err(e) = res {
                        tracing::warn!(ino = me.ino, "background commit failed: {e:#}");
                    }
                    me.inner.lock().background = false;
                    me.cond.notify_all();
                });
            if spawned.is_err() {
                g.background = false;
            }
        }
        Ok(())
    }

    /// Reads `[off, off + len)` as the file is now, buffered writes included.
    pub(crate) fn read(&self, store: &Store, off: u64, len: u32) -> Result<Vec<u8>> {
        let (end, overlay) = {
            let g = self.inner.lock();
            let end = off.saturating_add(u64::from(len)).min(g.size);
            if off >= end {
                return Ok(Vec::new());
            }
            let mut overlay: Vec<(u64, Vec<u8>)> = Vec::new();
            if let Some(inflight) = g.inflight.as_deref() {
                overlay.extend(overlapping(inflight, off, end).map(|(a, p)| (a, p.to_vec())));
            }
            overlay.extend(overlapping(&g.dirty, off, end).map(|(a, p)| (a, p.to_vec())));
            (end, overlay)
        };
        let mut buf = vec![0u8; (end - off) as usize];
        read_committed(store, self.ino, off, &mut buf)?;
        let size = self.inner.lock().size;
        self.read_ahead(store, off, end, size);
        for (a, piece) in overlay {
            let at = (a - off) as usize;
            buf[at..at + piece.len()].copy_from_slice(&piece);
        }
        Ok(buf)
    }

    /// Commits buffered writes. With `force`, everything (durable against a daemon crash once
    /// this returns, and against power loss after `Store::sync`); without, only content-decided
    /// chunks. Returns the deferred error of an earlier background commit, if any.
    pub(crate) fn flush(&self, store: &Store, force: bool) -> Result<()> {
        let _c = self.commit_lock.lock();
        self.flush_locked(store, force)
    }

    fn flush_locked(&self, store: &Store, force: bool) -> Result<()> {
        let (runs, size, mtime) = {
            let mut g = self.inner.lock();
            if let Some(e) = g.error.take() {
                return Err(e);
            }
            if g.dirty.is_empty() {
                return Ok(());
            }
            let runs: Frozen = std::mem::take(&mut g.dirty)
                .into_iter()
                .map(|(k, v)| (k, Bytes::from(v)))
                .collect();
            let runs = Arc::new(runs);
            g.dirty_bytes = 0;
            g.inflight = Some(runs.clone());
            (runs, g.size, g.mtime.take())
        };
        let taken: usize = runs.values().map(Bytes::len).sum();
        let res = self.remote.retrying(store, self.ino, || {
            commit_runs(store, &self.remote, self.ino, &runs, size, force, mtime)
        });
        let mut g = self.inner.lock();
        g.inflight = None;
        let mut kept = 0isize;
        let out = match res {
            Ok(leftover) => {
                for (off, data) in leftover {
                    kept += insert_under(&mut g.dirty, off, &data);
                }
                Ok(())
            }
            Err(e) => {
                // Nothing is lost: the runs go back under whatever was written since.
                for (off, data) in runs.iter() {
                    kept += insert_under(&mut g.dirty, *off, data);
                }
                if g.mtime.is_none() {
                    g.mtime = mtime;
                }
                Err(e)
            }
        };
        g.dirty_bytes = g.dirty.values().map(Vec::len).sum();
        self.account(kept - taken as isize);
        drop(g);
        self.cond.notify_all();
        match out {
            Err(e) if !force => {
                let errno = e.to_errno();
                self.inner.lock().error = Some(FsError::new(errno, e.to_string()));
                Err(e)
            }
            other => other,
        }
    }

    /// Runs a structural change (truncate, hole punch, range copy) on the committed content:
    /// buffered writes are committed first and no commit runs meanwhile. `before` edits the
    /// buffer first (under its lock).
    pub(crate) fn exclusive<T>(
        &self,
        store: &Store,
        before: impl FnOnce(&mut Runs) -> isize,
        op: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let _c = self.commit_lock.lock();
        {
            let mut g = self.inner.lock();
            let delta = before(&mut g.dirty);
            g.dirty_bytes = g.dirty_bytes.saturating_add_signed(delta);
            self.account(delta);
        }
        self.flush_locked(store, true)?;
        let out = self.remote.retrying(store, self.ino, op)?;
        let committed = store.node(self.ino).fs()?.map_or(0, |n| n.size);
        let mut g = self.inner.lock();
        let dirty_end = g
            .dirty
            .iter()
            .next_back()
            .map_or(0, |(&k, v)| k + v.len() as u64);
        g.size = committed.max(dirty_end);
        Ok(out)
    }

    /// Shrinks or grows the file to `size`.
    pub(crate) fn truncate(&self, store: &Store, size: u64) -> Result<()> {
        let ino = self.ino;
        self.exclusive(
            store,
            |runs| trim(runs, size),
            || {
                store.commit(false, |tx| tx.truncate(ino, size)).fs()?;
                Ok(())
            },
        )?;
        let mut g = self.inner.lock();
        g.size = size.max(
            g.dirty
                .iter()
                .next_back()
                .map_or(0, |(&k, v)| k + v.len() as u64),
        );
        Ok(())
    }
}

/// The `(start, end)` ranges of buffered runs, in order.
fn spans<V: AsRef<[u8]>>(runs: &BTreeMap<u64, V>) -> Vec<(u64, u64)> {
    runs.iter()
        .map(|(&k, v)| (k, k + v.as_ref().len() as u64))
        .collect()
}

/// True if `[a, b)` lies inside one of `spans` (sorted, disjoint, never touching).
fn covered(spans: &[(u64, u64)], a: u64, b: u64) -> bool {
    let i = spans.partition_point(|&(s, _)| s <= a);
    i > 0 && spans[i - 1].1 >= b
}

/// The regions a commit of buffered `spans` rewrites: each span widened to the extents
/// around it, touching ones merged.
fn regions(store: &Store, ino: Ino, spans: &[(u64, u64)]) -> Result<Vec<(u64, u64)>> {
    let mut regions: Vec<(u64, u64)> = Vec::new();
    for &(a, b) in spans {
        let s = match store.extents(ino, a, a + 1).fs()?.first() {
            Some(&(off, _)) if off < a => off,
            _ => a,
        };
        let e = match store.extents(ino, b - 1, b).fs()?.first() {
            Some(&(off, ext)) if off + u64::from(ext.len) > b => off + u64::from(ext.len),
            _ => b,
        };
        match regions.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => regions.push((s, e)),
        }
    }
    Ok(regions)
}

/// The chunks a commit of buffered `spans` (widened to `regions`) has to read and this
/// device does not hold: those of the extents the spans overwrite only in part.
fn absent_under(
    store: &Store,
    ino: Ino,
    regions: &[(u64, u64)],
    spans: &[(u64, u64)],
) -> Result<Vec<(ChunkId, u32)>> {
    let mut out: Vec<(ChunkId, u32)> = Vec::new();
    for &(s, e) in regions {
        if covered(spans, s, e) {
            continue;
        }
        for (off, x) in store.extents(ino, s, e).fs()? {
            if !covered(spans, off, off + u64::from(x.len))
                && !out.iter().any(|(id, _)| *id == x.chunk)
                && !store.is_readable(&x.chunk).fs()?
            {
                out.push((x.chunk, x.len));
            }
        }
    }
    Ok(out)
}

/// Chunks and commits `runs` (see the module doc). Returns the undecided tail that stays
/// buffered (only without `force`).
fn commit_runs(
    store: &Store,
    remote: &Remote,
    ino: Ino,
    runs: &Frozen,
    size: u64,
    force: bool,
    mtime: Option<Timestamp>,
) -> Result<Vec<(u64, Vec<u8>)>> {
    let node = store
        .node(ino)
        .fs()?
        .ok_or_else(|| fs_err!(ENOENT, "file {ino} is gone"))?;
    let spans = spans(runs);
    let regions = regions(store, ino, &spans)?;
    // Content made elsewhere that the commit reads (the rest of chunks written in part) is
    // fetched first, all at once; the caller's `retrying` catches what changes meanwhile.
    remote.fetch_wait(ino, &absent_under(store, ino, &regions, &spans)?)?;
    let mut edits = Vec::new();
    let mut leftover = Vec::new();
    let mut staging = Staging::new();
    let res = edit_regions(
        store,
        remote,
        ino,
        runs,
        &regions,
        (size, force),
        &mut staging,
        &mut edits,
        &mut leftover,
    );
    if let Err(e) = res {
        unstage_edits(store, ino, &edits);
        return Err(e);
    }
    let new_size = match leftover.first() {
        Some(&(tail_start, _)) => node.size.max(tail_start),
        None => size,
    };
    if edits.is_empty() && new_size == node.size && mtime.is_none() {
        return Ok(leftover);
    }
    let mtime = mtime.unwrap_or(node.mtime);
    let res = store
        .stage_finish(staging)
        .and_then(|()| {
            store.commit(false, |tx| {
                if edits.is_empty() {
                    tx.replace_extents(ino, (new_size, new_size), &[], new_size, mtime)?;
                }
                for edit in &edits {
                    tx.replace_extents(
                        ino,
                        (edit.start, edit.end),
                        &edit.extents,
                        new_size,
                        mtime,
                    )?;
                }
                Ok(())
            })
        })
        .fs();
    if let Err(e) = res {
        unstage_edits(store, ino, &edits);
        return Err(e);
    }
    Ok(leftover)
}

/// Re-chunks each region (committed content under the buffered runs) into `edits`; the
/// content-undecided tail of the last region goes to `leftover` unless `force`.
#[allow(clippy::too_many_arguments)]
fn edit_regions(
    store: &Store,
    remote: &Remote,
    ino: Ino,
    runs: &Frozen,
    regions: &[(u64, u64)],
    (size, force): (u64, bool),
    staging: &mut Staging,
    edits: &mut Vec<Edit>,
    leftover: &mut Vec<(u64, Vec<u8>)>,
) -> Result<()> {
    let n_regions = regions.len();
    let spans = spans(runs);
    for (i, &(s, e)) in regions.iter().enumerate() {
        let buf = match runs.get(&s) {
            // The region is one buffered run (an append, a rewrite of whole chunks): cut the
            // chunks from it without copying.
            Some(run) if run.len() as u64 == e - s => run.clone(),
            _ => {
                let mut buf = vec![0u8; (e - s) as usize];
                read_committed_except(store, ino, s, &mut buf, &spans)?;
                copy_out(runs, s, &mut buf);
                Bytes::from(buf)
            }
        };
        let tail = !force && i + 1 == n_regions && e >= size;
        let mut lens = pvfs_store::cut(&buf, !tail);
        let mut committed: usize = lens.iter().sum();
        if tail && committed < buf.len() {
            // Never leave committed content of this region uncovered: if the decided part
            // ends before the old extents do, commit the region whole.
            let old_end = store
                .extents(ino, s, e)
                .fs()?
                .last()
                .map_or(s, |&(o, x)| o + u64::from(x.len));
            if s + (committed as u64) < old_end {
                lens = pvfs_store::cut(&buf, true);
                committed = buf.len();
            }
        }
        if committed < buf.len() {
            leftover.push((s + committed as u64, buf[committed..].to_vec()));
        }
        if committed == 0 {
            continue;
        }
        let buf = buf.slice(..committed);
        let mut offsets = Vec::with_capacity(lens.len());
        let mut pieces = Vec::with_capacity(lens.len());
        let mut pos = 0usize;
        for len in lens {
            let piece = buf.slice(pos..pos + len);
            if !is_zero(&piece) {
                offsets.push(s + pos as u64);
                pieces.push(piece);
            }
            pos += len;
        }
        let chunks = prepare_and_stage(store, remote, ino, pieces, staging)?;
        let extents = offsets
            .into_iter()
            .zip(chunks)
            .map(|(offset, chunk)| NewExtent { offset, chunk })
            .collect();
        edits.push(Edit {
            start: s,
            end: s + committed as u64,
            extents,
        });
    }
    Ok(())
}

/// Drops the staging markers of the chunks of `edits` after their commit failed.
fn unstage_edits(store: &Store, ino: Ino, edits: &[Edit]) {
    let chunks: Vec<&PreparedChunk> = edits
        .iter()
        .flat_map(|e| &e.extents)
        .map(|x| &x.chunk)
        .collect();
    let _span = tracing::debug_span!("unstage", ino).entered();
    drop_staged(store, chunks.iter().copied());
}

/// Drops the staging markers (and data nothing references) of those `chunks` that were
/// staged; a failure only delays that until the store is opened next.
fn drop_staged<'a>(store: &Store, chunks: impl IntoIterator<Item = &'a PreparedChunk> + Clone) {
    if chunks.clone().into_iter().any(|c| c.staged.is_some()) {
        if let Err(e) = store.unstage(chunks) {
            tracing::warn!("dropping staged chunks failed: {e:#}");
        }
    }
}

/// Hashes and encodes `pieces` in parts; a part with enough new data is staged at once, so
/// that its write overlaps hashing the next part (`Store::stage_part`). On an online-only
/// device each part's new chunks go to another device instead, while the next part is
/// hashed; a part no device took is staged here after all.
fn prepare_and_stage(
    store: &Store,
    remote: &Remote,
    ino: Ino,
    pieces: Vec<Bytes>,
    staging: &mut Staging,
) -> Result<Vec<PreparedChunk>> {
    let mut out: Vec<PreparedChunk> = Vec::with_capacity(pieces.len());
    let mut keeping: Vec<(std::ops::Range<usize>, Keeping)> = Vec::new();
    let mut part = Vec::new();
    let mut part_bytes = 0;
    let mut pieces = pieces.into_iter().peekable();
    while let Some(piece) = pieces.next() {
        part_bytes += piece.len();
        part.push(piece);
        if part_bytes < STAGE_PART_BYTES && pieces.peek().is_some() {
            continue;
        }
        let first = out.len();
        let prepared = store.prepare_many(std::mem::take(&mut part));
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                drop_staged(store, &out);
                return Err(FsError::from_store(e));
            }
        };
        out.extend(prepared);
        part_bytes = 0;
        if store.is_online_only() {
            if let Some(k) = keep_start(remote, ino, &out[first..]) {
                keeping.push((first..out.len(), k));
                continue;
            }
        }
        let end = out.len();
        stage_if_large(store, staging, &mut out, first..end)?;
    }
    for (range, k) in keeping {
        match k.wait() {
            Ok(()) => {
                for c in out[range].iter_mut().filter(|c| c.encoded.is_some()) {
                    c.elsewhere = true;
                }
            }
            Err(e) => {
                warn_kept_here(ino, &e);
                stage_if_large(store, staging, &mut out, range)?;
            }
        }
    }
    Ok(out)
}

/// Stages the chunks of `out[range]` if they hold enough new data; on failure drops what
/// `out` staged before.
fn stage_if_large(
    store: &Store,
    staging: &mut Staging,
    out: &mut [PreparedChunk],
    range: std::ops::Range<usize>,
) -> Result<()> {
    let new_bytes: usize = out[range.clone()]
        .iter()
        .filter_map(|c| c.encoded.as_ref())
        .map(Bytes::len)
        .sum();
    if new_bytes >= STAGE_MIN_BYTES {
        if let Err(e) = store.stage_part(staging, &mut out[range]) {
            // Markers of earlier parts (and of this one, if they were written) go again.
            drop_staged(store, &*out);
            return Err(FsError::from_store(e));
        }
    }
    Ok(())
}

/// On an online-only device: starts storing the new chunks among `chunks` on another
/// device (none new: `None`). Once that is done, the commit references them as absent;
/// when no device takes them they stay new here: content is never dropped for want of a
/// peer.
fn keep_start(remote: &Remote, ino: Ino, chunks: &[PreparedChunk]) -> Option<Keeping> {
    let mut new: Vec<(ChunkId, Bytes, u32)> = Vec::new();
    for c in chunks {
        if let Some(e) = &c.encoded {
            if !new.iter().any(|(id, ..)| *id == c.id) {
                new.push((c.id, e.clone(), c.plain.len() as u32));
            }
        }
    }
    (!new.is_empty()).then(|| remote.keep_start(ino, new))
}

/// Logs that new content of `ino` stays on this device, once a minute at most: an offline
/// device would log every close.
fn warn_kept_here(ino: Ino, e: &FsError) {
    static WARNED: Mutex<Option<std::time::Instant>> = Mutex::new(None);
    let mut last = WARNED.lock();
    if last.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(60)) {
        *last = Some(std::time::Instant::now());
        tracing::warn!(ino, "new content stays on this device: {e:#}");
    } else {
        tracing::debug!(ino, "new content stays on this device: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(runs: &Runs) -> Vec<(u64, Vec<u8>)> {
        runs.iter().map(|(&k, v)| (k, v.clone())).collect()
    }

    #[test]
    fn insert_merges_and_overwrites() {
        let mut r = Runs::new();
        assert_eq!(insert(&mut r, 10, b"abc"), 3);
        assert_eq!(insert(&mut r, 13, b"de"), 2);
        assert_eq!(flat(&r), vec![(10, b"abcde".to_vec())]);
        assert_eq!(insert(&mut r, 11, b"XY"), 0);
        assert_eq!(flat(&r), vec![(10, b"aXYde".to_vec())]);
        assert_eq!(insert(&mut r, 0, b"12"), 2);
        assert_eq!(insert(&mut r, 2, b"34567890"), 8);
        assert_eq!(flat(&r), vec![(0, b"1234567890aXYde".to_vec())]);
        assert_eq!(insert(&mut r, 20, b"z"), 1);
        assert_eq!(insert(&mut r, 13, b"________"), 5);
        assert_eq!(flat(&r), vec![(0, b"1234567890aXY________".to_vec())]);
    }

    #[test]
    fn insert_under_fills_only_gaps() {
        let mut r = Runs::new();
        insert(&mut r, 5, b"NEW");
        assert_eq!(insert_under(&mut r, 3, b"oooooooo"), 5);
        assert_eq!(flat(&r), vec![(3, b"ooNEWooo".to_vec())]);
    }

    #[test]
    fn trim_cuts_runs() {
        let mut r = Runs::new();
        insert(&mut r, 0, b"abcdef");
        insert(&mut r, 10, b"xyz");
        assert_eq!(trim(&mut r, 4), -5);
        assert_eq!(flat(&r), vec![(0, b"abcd".to_vec())]);
    }

    #[test]
    fn copy_out_overlays() {
        let mut r = Runs::new();
        insert(&mut r, 2, b"ab");
        insert(&mut r, 6, b"cd");
        let mut out = vec![b'.'; 6];
        copy_out(&r, 1, &mut out);
        assert_eq!(&out, b".ab..c");
    }
}
