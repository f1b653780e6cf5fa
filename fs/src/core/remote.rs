//! Content held on other devices, for the operations that must read it to change a file,
//! and for an online-only device's commits, which store new content elsewhere.
//!
//! A commit that rewrites part of a chunk, a truncation or hole punch that cuts one, and a
//! range copy that starts inside one all read the chunk first; when it was made elsewhere
//! and never fetched, the operation fetches it and runs again.
//!
//! Owns: the `ChunkSource` the daemon wires in, and waiting for its transfers on the
//! threads that may wait (the blocking pool, background commits, shutdown).
//! Must not: wait anywhere else, a FUSE session thread above all. Code that may wait is
//! marked (`waiting_allowed`); elsewhere a chunk that is not here is an error, not a wait.
//! `Fs::is_light` keeps commits that need remote content off the session threads.

use std::cell::Cell;
use std::sync::{mpsc, Arc};

use bytes::Bytes;
use parking_lot::RwLock;
use pvfs_store::{ChunkId, ChunkSource, Ino, Store};

use crate::error::{FsError, Result, StoreResultExt};
use crate::fs_err;

/// Most rounds of fetch-and-retry one operation gets: each round fetches the chunk the last
/// one stopped at. A truncation needs one, a hole punch two, a range copy up to four (the
/// edges of both ranges); content changing underneath (a peer's edit) costs more.
const MAX_ROUNDS: usize = 8;

thread_local! {
    static MAY_WAIT: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` on a thread that may wait for other devices (never a FUSE session thread).
pub fn waiting_allowed<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            MAY_WAIT.set(self.0);
        }
    }
    let _reset = Reset(MAY_WAIT.replace(true));
    f()
}

fn may_wait() -> bool {
    MAY_WAIT.get()
}

/// Where absent chunks come from.
#[derive(Debug, Default)]
pub(crate) struct Remote {
    source: RwLock<Option<Arc<dyn ChunkSource>>>,
}

impl Remote {
    pub(crate) fn set(&self, source: Arc<dyn ChunkSource>) {
        *self.source.write() = Some(source);
    }

    pub(crate) fn get(&self) -> Option<Arc<dyn ChunkSource>> {
        self.source.read().clone()
    }

    /// Fetches `chunks` of `ino` and returns once all of them are here (or one failed: the
    /// source gives up after its own timeout).
    pub(crate) fn fetch_wait(&self, ino: Ino, chunks: &[(ChunkId, u32)]) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        if !may_wait() {
            return Err(fs_err!(
                EIO,
                "file {ino} needs content held elsewhere and this thread may not wait for it"
            ));
        }
        let source = self.get().ok_or_else(|| {
            fs_err!(
                EIO,
                "file {ino} needs content held elsewhere and no network is configured"
            )
        })?;
        let _span = tracing::debug_span!("fetch_wait", ino, chunks = chunks.len()).entered();
        let (tx, rx) = mpsc::channel();
        for &(id, len) in chunks {
            let tx = tx.clone();
            source.fetch(id, len, ino, Box::new(move |res| drop(tx.send(res))));
        }
        drop(tx);
        for _ in chunks {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(ino, "content held elsewhere could not be fetched: {e:#}");
                    return Err(FsError::new(
                        libc::EIO,
                        format!("file {ino}: content held elsewhere could not be fetched: {e}"),
                    ));
                }
                Err(_) => return Err(fs_err!(EIO, "file {ino}: a fetch was dropped")),
            }
        }
        Ok(())
    }

    /// Starts storing `chunks` (id, stored encoding, plaintext length) of `ino` on another
    /// device; `Keeping::wait` returns once one has them durably.
    pub(crate) fn keep_start(&self, ino: Ino, chunks: Vec<(ChunkId, Bytes, u32)>) -> Keeping {
        if !may_wait() {
            return Keeping(Err(fs_err!(
                EIO,
                "file {ino}: this thread may not wait for another device"
            )));
        }
        let Some(source) = self.get() else {
            return Keeping(Err(fs_err!(EIO, "file {ino}: no network is configured")));
        };
        tracing::debug!(ino, chunks = chunks.len(), "storing new content elsewhere");
        let (tx, rx) = mpsc::channel();
        source.keep_elsewhere(chunks, Box::new(move |res| drop(tx.send(res))));
        Keeping(Ok((ino, rx)))
    }

    /// Runs `op`; when it stops at a chunk that is not here, fetches that chunk and runs it
    /// again. `op` must change nothing when it fails.
    pub(crate) fn retrying<T>(
        &self,
        store: &Store,
        ino: Ino,
        mut op: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let mut round = 0;
        loop {
            let e = match op() {
                Err(e) if round + 1 < MAX_ROUNDS && may_wait() => e,
                res => return res,
            };
            let Some(id) = e.absent_chunk() else {
                return Err(e);
            };
            let Some(len) = store.chunk_len(&id).fs()? else {
                return Err(e);
            };
            self.fetch_wait(ino, &[(id, len)])?;
            round += 1;
        }
    }
}

/// A transfer of new content of a file to another device (`Remote::keep_start`), or why
/// none started.
#[derive(Debug)]
pub(crate) struct Keeping(Result<(Ino, mpsc::Receiver<pvfs_store::Result<()>>)>);

impl Keeping {
    /// Waits until another device has the content durably, or the transfer failed.
    pub(crate) fn wait(self) -> Result<()> {
        let (ino, rx) = self.0?;
        match rx.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(FsError::new(
                libc::EIO,
                format!("file {ino}: no other device took its new content: {e}"),
            )),
            Err(_) => Err(fs_err!(EIO, "file {ino}: the transfer was dropped")),
        }
    }
}
