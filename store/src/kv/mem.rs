//! An in-memory backend: a `BTreeMap` per column family behind a lock.
//!
//! Used by tests (the proptest reference model, fast unit tests) so that store logic is checked
//! against a second implementation of the same contract, and simulations of power cuts: it
//! models what RocksDB keeps after one (see `copy_in_memory`).

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use super::{Backend, BatchOp, Cf, ReadView, Scan};
use crate::error::Result;

type Tables = BTreeMap<Cf, BTreeMap<Vec<u8>, Vec<u8>>>;

/// The in-memory backend.
#[derive(Debug, Default)]
pub(crate) struct MemBackend {
    tables: RwLock<Tables>,
    /// What a power cut would leave.
    durable: Mutex<Durable>,
}

/// The durable state: what survives a power cut at best, and the writes since.
#[derive(Debug, Default)]
struct Durable {
    /// Every synced write (and every chunk write made durable) applied.
    tables: Tables,
    /// Writes not yet durable, in order; `true` for chunk writes, which skip the WAL.
    pending: Vec<(bool, Vec<BatchOp>)>,
}

fn apply(tables: &mut Tables, batch: Vec<BatchOp>) {
    for (cf, key, value) in batch {
        let t = tables.entry(cf).or_default();
        match value {
            Some(v) => {
                t.insert(key, v);
            }
            None => {
                t.remove(&key);
            }
        }
    }
}

impl MemBackend {
    fn write_logged(&self, batch: Vec<BatchOp>, sync: bool, chunks: bool) {
        let mut durable = self.durable.lock();
        durable.pending.push((chunks, batch.clone()));
        apply(&mut self.tables.write(), batch);
        if sync {
            Self::make_durable(&mut durable, |_| true);
        }
    }

    /// Applies the pending writes `which` selects to the durable state, in order.
    fn make_durable(durable: &mut Durable, which: impl Fn(bool) -> bool) {
        let pending = std::mem::take(&mut durable.pending);
        for (chunks, batch) in pending {
            if which(chunks) {
                apply(&mut durable.tables, batch);
            } else {
                durable.pending.push((chunks, batch));
            }
        }
    }
}

struct MemSnapshot(Tables);

fn get(tables: &Tables, cf: Cf, key: &[u8]) -> Option<Vec<u8>> {
    tables.get(&cf).and_then(|t| t.get(key)).cloned()
}

fn range<'a>(tables: &Tables, cf: Cf, lo: &[u8], hi: Option<&[u8]>, reverse: bool) -> Scan<'a> {
    let Some(t) = tables.get(&cf) else {
        return Box::new(std::iter::empty());
    };
    if hi.is_some_and(|hi| hi <= lo) {
        return Box::new(std::iter::empty());
    }
    let upper = hi.map_or(Bound::Unbounded, Bound::Excluded);
    let items = t.range::<[u8], _>((Bound::Included(lo), upper));
    let mut out: Vec<_> = items.map(|(k, v)| Ok((k.clone(), v.clone()))).collect();
    if reverse {
        out.reverse();
    }
    Box::new(out.into_iter())
}

impl ReadView for MemBackend {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(get(&self.tables.read(), cf, key))
    }
    fn scan<'a>(&'a self, cf: Cf, lo: &[u8], hi: Option<&[u8]>, reverse: bool) -> Scan<'a> {
        range(&self.tables.read(), cf, lo, hi, reverse)
    }
}

impl ReadView for MemSnapshot {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(get(&self.0, cf, key))
    }
    fn scan<'a>(&'a self, cf: Cf, lo: &[u8], hi: Option<&[u8]>, reverse: bool) -> Scan<'a> {
        range(&self.0, cf, lo, hi, reverse)
    }
}

impl Backend for MemBackend {
    fn copy_in_memory(&self, crash: Option<usize>) -> Option<Box<dyn Backend>> {
        let durable = self.durable.lock();
        let tables = match crash {
            None => self.tables.read().clone(),
            Some(keep) => {
                // A power cut keeps what was synced and a prefix of the WAL written since
                // (RocksDB replays the WAL up to its first torn record); chunk writes that
                // skipped the WAL and were not flushed are gone.
                let mut tables = durable.tables.clone();
                for (_, batch) in durable.pending.iter().filter(|p| !p.0).take(keep) {
                    apply(&mut tables, batch.clone());
                }
                tables
            }
        };
        Some(Box::new(MemBackend {
            durable: Mutex::new(Durable {
                tables: tables.clone(),
                pending: Vec::new(),
            }),
            tables: RwLock::new(tables),
        }))
    }

    fn cf_bytes(&self, cf: Cf) -> Result<u64> {
        Ok(self.tables.read().get(&cf).map_or(0, |t| {
            t.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
        }))
    }

    fn unsynced_writes(&self) -> usize {
        self.durable.lock().pending.iter().filter(|p| !p.0).count()
    }

    fn write(&self, batch: Vec<BatchOp>, sync: bool) -> Result<()> {
        self.write_logged(batch, sync, false);
        Ok(())
    }
    fn sync(&self) -> Result<()> {
        Self::make_durable(&mut self.durable.lock(), |_| true);
        Ok(())
    }
    fn get_chunk(&self, id: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get(Cf::Chunks, id)
    }
    fn wait_chunks_durable(&self) -> Result<()> {
        Self::make_durable(&mut self.durable.lock(), |chunks| chunks);
        Ok(())
    }
    fn write_chunks(&self, chunks: Vec<(Vec<u8>, Bytes)>) -> Result<()> {
        let batch = chunks
            .into_iter()
            .map(|(k, v)| (Cf::Chunks, k, Some(v.to_vec())))
            .collect();
        self.write_logged(batch, false, true);
        Ok(())
    }
    fn snapshot(&self) -> Box<dyn ReadView + '_> {
        Box::new(MemSnapshot(self.tables.read().clone()))
    }
    fn reclaim(&self) -> Result<()> {
        Ok(())
    }
}
