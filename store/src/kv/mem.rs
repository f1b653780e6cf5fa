//! An in-memory backend: a `BTreeMap` per column family behind a lock.
//!
//! Used by tests (the proptest reference model, fast unit tests) so that store logic is checked
//! against a second implementation of the same contract. Not durable.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use parking_lot::RwLock;

use super::{Backend, BatchOp, Cf, ReadView, Scan};
use crate::error::Result;

type Tables = BTreeMap<Cf, BTreeMap<Vec<u8>, Vec<u8>>>;

/// The in-memory backend.
#[derive(Debug, Default)]
pub(crate) struct MemBackend {
    tables: RwLock<Tables>,
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
    fn copy_in_memory(&self) -> Option<Box<dyn Backend>> {
        Some(Box::new(MemBackend {
            tables: RwLock::new(self.tables.read().clone()),
        }))
    }

    fn write(&self, batch: Vec<BatchOp>, _sync: bool) -> Result<()> {
        let mut tables = self.tables.write();
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
        Ok(())
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn get_chunk(&self, id: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get(Cf::Chunks, id)
    }
    fn wait_chunks_durable(&self) -> Result<()> {
        Ok(())
    }
    fn write_chunks(&self, chunks: Vec<(Vec<u8>, Bytes)>) -> Result<()> {
        self.write(
            chunks
                .into_iter()
                .map(|(k, v)| (Cf::Chunks, k, Some(v.to_vec())))
                .collect(),
            false,
        )
    }
    fn snapshot(&self) -> Box<dyn ReadView + '_> {
        Box::new(MemSnapshot(self.tables.read().clone()))
    }
    fn reclaim(&self) -> Result<()> {
        Ok(())
    }
}
