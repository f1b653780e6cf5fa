//! The RocksDB backend: one database per device, one column family per `Cf`.
//!
//! Owns: RocksDB options (BlobDB for chunks, bloom filters, one shared block cache) and the
//! mapping of RocksDB errors onto `StoreError`.
//! Must not: leak `rocksdb` types outside this module.

use std::path::Path;

use bytes::Bytes;
use rocksdb::{
    BlockBasedOptions, BottommostLevelCompaction, Cache, ColumnFamilyDescriptor, CompactOptions,
    DBCompressionType, DBRawIteratorWithThreadMode, Env, FlushOptions, Options, ReadOptions,
    WriteBatch, WriteOptions, DB,
};

use super::{Backend, BatchOp, Cf, ReadView, Scan};
use crate::error::{is_no_space_message, Result, StoreError};

/// Tuning knobs for the RocksDB backend.
#[derive(Clone, Debug)]
pub struct RocksOptions {
    /// Shared block cache for metadata column families, in bytes.
    pub block_cache_bytes: usize,
    /// Memtable size of the chunks column family, in bytes.
    pub chunk_write_buffer_bytes: usize,
}

impl Default for RocksOptions {
    fn default() -> Self {
        RocksOptions {
            block_cache_bytes: 128 << 20,
            chunk_write_buffer_bytes: 64 << 20,
        }
    }
}

pub(crate) struct RocksBackend {
    db: DB,
}

impl std::fmt::Debug for RocksBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksBackend")
            .field("path", &self.db.path())
            .finish()
    }
}

/// Times a manual flush refused with TryAgain (a write stall) is tried again, the n-th time
/// after n × 10 ms: about 20 s in all.
const FLUSH_TRIES: u64 = 64;

pub(crate) fn db_err(e: rocksdb::Error) -> StoreError {
    let msg = e.into_string();
    if is_no_space_message(&msg) {
        StoreError::NoSpace
    } else {
        StoreError::Db(msg)
    }
}

fn cf_options(cf: Cf, cache: &Cache, opts: &RocksOptions) -> Options {
    let mut o = Options::default();
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    table.set_format_version(5);
    match cf {
        Cf::Chunks => {
            // Chunks are compressed (or found incompressible) before they get here.
            o.set_compression_type(DBCompressionType::None);
            o.set_enable_blob_files(true);
            o.set_min_blob_size(4096);
            o.set_blob_file_size(256 << 20);
            o.set_blob_compression_type(DBCompressionType::None);
            // Blob files are rewritten only by `reclaim`, when deletes have freed enough to
            // be worth it: automatic GC would rewrite live chunks during every compaction.
            o.set_enable_blob_gc(false);
            o.set_write_buffer_size(opts.chunk_write_buffer_bytes);
            // Staged parts are flushed one after another while the next part is hashed.
            o.set_max_write_buffer_number(4);
        }
        _ => {
            o.set_compression_type(DBCompressionType::Lz4);
            o.set_write_buffer_size(16 << 20);
        }
    }
    o.set_level_compaction_dynamic_level_bytes(true);
    o.set_block_based_table_factory(&table);
    o
}

impl RocksBackend {
    /// Flushes the chunks column family's memtable to blob files, waiting or not.
    fn flush_chunks(&self, wait: bool) -> std::result::Result<(), rocksdb::Error> {
        let mut flush = FlushOptions::default();
        flush.set_wait(wait);
        self.db.flush_cf_opt(self.cf(Cf::Chunks), &flush)
    }

    pub(crate) fn open(path: &Path, opts: &RocksOptions) -> Result<RocksBackend> {
        let cache = Cache::new_lru_cache(opts.block_cache_bytes);
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(4);
        db_opts.increase_parallelism(2);
        // Compactions (and `reclaim`, which can rewrite gigabytes) run below the priority of
        // requests: stat of 30,000 files right after deleting 4 GiB measured 3,300 files/s
        // with compactions at normal priority, 9,400 with them lowered. Flushes keep normal
        // priority; fsync waits on them.
        let mut env = Env::new().map_err(db_err)?;
        env.lower_thread_pool_cpu_priority();
        env.lower_thread_pool_io_priority();
        db_opts.set_env(&env);
        db_opts.set_bytes_per_sync(1 << 20);
        db_opts.set_use_direct_io_for_flush_and_compaction(true);
        // Keep the WAL short-lived: once every column family with data in a WAL file has been
        // flushed the file is deleted, usually before the kernel writes it back, so chunk
        // data reaches the disk once (in blob files), not twice. `Backend::sync` still makes
        // every commit durable.
        db_opts.set_max_total_wal_size(256 << 20);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_max_log_file_size(16 << 20);
        db_opts.set_max_open_files(512);
        let cfs = Cf::ALL
            .iter()
            .map(|&cf| ColumnFamilyDescriptor::new(cf.name(), cf_options(cf, &cache, opts)));
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|e| {
            let msg = e.into_string();
            let reason = if msg.contains("lock") || msg.contains("LOCK") {
                "in use by another pvfs daemon (the RocksDB lock is held)".to_string()
            } else {
                msg
            };
            StoreError::DataDir {
                path: path.to_path_buf(),
                reason,
            }
        })?;
        Ok(RocksBackend { db })
    }

    fn cf(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(cf.name())
            .expect("every column family is created at open")
    }
}

struct RawScan<'a> {
    it: DBRawIteratorWithThreadMode<'a, DB>,
    forward: bool,
    done: bool,
}

impl Iterator for RawScan<'_> {
    type Item = Result<(Vec<u8>, Vec<u8>)>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if !self.it.valid() {
            self.done = true;
            return match self.it.status() {
                Ok(()) => None,
                Err(e) => Some(Err(db_err(e))),
            };
        }
        let item = match (self.it.key(), self.it.value()) {
            (Some(k), Some(v)) => (k.to_vec(), v.to_vec()),
            _ => {
                self.done = true;
                return None;
            }
        };
        if self.forward {
            self.it.next();
        } else {
            self.it.prev();
        }
        Some(Ok(item))
    }
}

/// Read options that confine an iterator to `[lo, hi)`: RocksDB then stops at the bounds
/// instead of stepping over every tombstone beyond them (a reverse seek over the extents of
/// thousands of deleted files costs milliseconds otherwise).
fn bounded(lo: &[u8], hi: Option<&[u8]>) -> ReadOptions {
    let mut ro = ReadOptions::default();
    ro.set_iterate_lower_bound(lo.to_vec());
    if let Some(hi) = hi {
        ro.set_iterate_upper_bound(hi.to_vec());
    }
    ro
}

fn raw_scan<'a>(
    mut it: DBRawIteratorWithThreadMode<'a, DB>,
    lo: &[u8],
    hi: Option<&[u8]>,
    reverse: bool,
) -> Scan<'a> {
    if hi.is_some_and(|hi| hi <= lo) {
        return Box::new(std::iter::empty());
    }
    if reverse {
        // Lands on the last key below the upper bound.
        it.seek_to_last();
    } else {
        it.seek(lo);
    }
    Box::new(RawScan {
        it,
        forward: !reverse,
        done: false,
    })
}

impl ReadView for RocksBackend {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db
            .get_pinned_cf(self.cf(cf), key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(db_err)
    }
    fn scan<'a>(&'a self, cf: Cf, lo: &[u8], hi: Option<&[u8]>, reverse: bool) -> Scan<'a> {
        let it = self.db.raw_iterator_cf_opt(self.cf(cf), bounded(lo, hi));
        raw_scan(it, lo, hi, reverse)
    }
}

struct RocksSnapshot<'a> {
    backend: &'a RocksBackend,
    snap: rocksdb::SnapshotWithThreadMode<'a, DB>,
}

impl ReadView for RocksSnapshot<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.snap
            .get_pinned_cf(self.backend.cf(cf), key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(db_err)
    }
    fn scan<'a>(&'a self, cf: Cf, lo: &[u8], hi: Option<&[u8]>, reverse: bool) -> Scan<'a> {
        let it = self
            .snap
            .raw_iterator_cf_opt(self.backend.cf(cf), bounded(lo, hi));
        raw_scan(it, lo, hi, reverse)
    }
}

impl Backend for RocksBackend {
    fn write(&self, batch: Vec<BatchOp>, sync: bool) -> Result<()> {
        let bytes: usize = batch
            .iter()
            .map(|(_, k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 16)
            .sum();
        let mut wb = WriteBatch::with_capacity_bytes(bytes + 64);
        for (cf, key, value) in &batch {
            match value {
                Some(v) => wb.put_cf(self.cf(*cf), key, v),
                None => wb.delete_cf(self.cf(*cf), key),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(wb, &wo).map_err(db_err)
    }
    fn sync(&self) -> Result<()> {
        self.db.flush_wal(true).map_err(db_err)
    }
    fn get_chunk(&self, id: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(false);
        self.db
            .get_pinned_cf_opt(self.cf(Cf::Chunks), id, &ro)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(db_err)
    }
    fn write_chunks(&self, chunks: Vec<(Vec<u8>, Bytes)>) -> Result<()> {
        let cf = self.cf(Cf::Chunks);
        let bytes: usize = chunks.iter().map(|(k, v)| k.len() + v.len() + 16).sum();
        let mut wb = WriteBatch::with_capacity_bytes(bytes + 64);
        for (k, v) in &chunks {
            wb.put_cf(cf, k, v);
        }
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(wb, &wo).map_err(db_err)?;
        // Only an early start: while writes stall, the waiting flush does it later.
        match self.flush_chunks(false) {
            Err(e) if e.kind() == rocksdb::ErrorKind::TryAgain => Ok(()),
            other => other.map_err(db_err),
        }
    }
    fn wait_chunks_durable(&self) -> Result<()> {
        // A waiting flush also waits for the memtables that earlier flushes made immutable.
        // While writes are stopped (too many memtables waiting for earlier flushes) RocksDB
        // refuses a manual flush with TryAgain; the stall ends as those flushes finish.
        let mut tries = 0;
        loop {
            match self.flush_chunks(true) {
                Err(e) if e.kind() == rocksdb::ErrorKind::TryAgain && tries < FLUSH_TRIES => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10 * tries));
                }
                other => return other.map_err(db_err),
            }
        }
    }
    fn snapshot(&self) -> Box<dyn ReadView + '_> {
        Box::new(RocksSnapshot {
            backend: self,
            snap: self.db.snapshot(),
        })
    }

    fn cf_bytes(&self, cf: Cf) -> Result<u64> {
        let mut total = 0;
        for prop in [
            "rocksdb.total-sst-files-size",
            "rocksdb.cur-size-all-mem-tables",
            "rocksdb.total-blob-file-size",
        ] {
            total += self
                .db
                .property_int_value_cf(self.cf(cf), prop)
                .map_err(db_err)?
                .unwrap_or(0);
        }
        Ok(total)
    }

    fn reclaim(&self) -> Result<()> {
        let mut flush = FlushOptions::default();
        flush.set_wait(true);
        let cfs: Vec<_> = Cf::ALL.iter().map(|&cf| self.cf(cf)).collect();
        self.db.flush_cfs_opt(&cfs, &flush).map_err(db_err)?;
        let chunks = self.cf(Cf::Chunks);
        let gc = |on: &str| {
            self.db
                .set_options_cf(
                    chunks,
                    &[
                        ("enable_blob_garbage_collection", on),
                        ("blob_garbage_collection_age_cutoff", "1.0"),
                    ],
                )
                .map_err(db_err)
        };
        gc("true")?;
        let mut opts = CompactOptions::default();
        opts.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
        self.db
            .compact_range_cf_opt(chunks, None::<&[u8]>, None::<&[u8]>, &opts);
        gc("false")
    }
}
