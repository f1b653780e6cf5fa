//! An in-memory backend: a `BTreeMap` per column family behind a lock.
//!
//! Used by tests (the proptest reference model, fast unit tests) so that store logic is checked
//! against a second implementation of the same contract. Not durable.

use std::collections::BTreeMap;
use std::ops::Bound;

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

fn range(tables: &Tables, cf: Cf, from: &[u8], forward: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Some(t) = tables.get(&cf) else {
        return Vec::new();
    };
    if forward {
        t.range::<[u8], _>((Bound::Included(from), Bound::Unbounded))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    } else {
        t.range::<[u8], _>((Bound::Unbounded, Bound::Included(from)))
            .rev()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl ReadView for MemBackend {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(get(&self.tables.read(), cf, key))
    }
    fn scan_from<'a>(&'a self, cf: Cf, from: &[u8]) -> Scan<'a> {
        Box::new(
            range(&self.tables.read(), cf, from, true)
                .into_iter()
                .map(Ok),
        )
    }
    fn scan_back<'a>(&'a self, cf: Cf, from: &[u8]) -> Scan<'a> {
        Box::new(
            range(&self.tables.read(), cf, from, false)
                .into_iter()
                .map(Ok),
        )
    }
}

impl ReadView for MemSnapshot {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(get(&self.0, cf, key))
    }
    fn scan_from<'a>(&'a self, cf: Cf, from: &[u8]) -> Scan<'a> {
        Box::new(range(&self.0, cf, from, true).into_iter().map(Ok))
    }
    fn scan_back<'a>(&'a self, cf: Cf, from: &[u8]) -> Scan<'a> {
        Box::new(range(&self.0, cf, from, false).into_iter().map(Ok))
    }
}

impl Backend for MemBackend {
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
    fn write_chunks_durably(&self, chunks: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        self.write(
            chunks
                .into_iter()
                .map(|(k, v)| (Cf::Chunks, k, Some(v)))
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
