//! The key-value layer under the store: column families, batches, and two backends.
//!
//! Owns: the `Backend` trait, `Cf`, `BatchOp`, and the RocksDB (`rocks`) and in-memory (`mem`)
//! implementations. Everything above this module is backend-agnostic, so every store test runs
//! against both.
//! Must not: know what the keys mean; only `rocks` may name `rocksdb` types.

pub(crate) mod mem;
pub(crate) mod rocks;

use crate::error::Result;

/// The column families of a device's database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Cf {
    /// Device id, namespace id, counters, clock, statistics.
    Meta,
    /// ino -> node record (kind, attributes, content version).
    Nodes,
    /// global node id -> ino.
    Ids,
    /// (parent ino, name) -> child.
    Dirents,
    /// (ino, file offset) -> chunk extent.
    Extents,
    /// chunk id -> encoded chunk bytes (BlobDB).
    Chunks,
    /// chunk id -> reference count and sizes.
    Refs,
    /// (device, seq) -> op.
    Oplog,
    /// ino -> () for nodes with no names left that are still open.
    Orphans,
    /// (ino, name) -> extended attribute value.
    Xattrs,
    /// (chunk id, token) -> () for chunks staged ahead of the commit that references them.
    Pending,
}

impl Cf {
    pub(crate) const ALL: [Cf; 11] = [
        Cf::Meta,
        Cf::Nodes,
        Cf::Ids,
        Cf::Dirents,
        Cf::Extents,
        Cf::Chunks,
        Cf::Refs,
        Cf::Oplog,
        Cf::Orphans,
        Cf::Xattrs,
        Cf::Pending,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Nodes => "nodes",
            Cf::Ids => "ids",
            Cf::Dirents => "dirents",
            Cf::Extents => "extents",
            Cf::Chunks => "chunks",
            Cf::Refs => "refs",
            Cf::Oplog => "oplog",
            Cf::Orphans => "orphans",
            Cf::Xattrs => "xattrs",
            Cf::Pending => "pending",
        }
    }
}

/// One write in a batch: `None` deletes the key.
pub(crate) type BatchOp = (Cf, Vec<u8>, Option<Vec<u8>>);

/// A key-value pair read from a scan.
pub(crate) type Kv = (Vec<u8>, Vec<u8>);

/// A boxed iterator over a scan.
pub(crate) type Scan<'a> = Box<dyn Iterator<Item = Result<Kv>> + 'a>;

/// Consistent reads: the live database or a snapshot of it.
pub(crate) trait ReadView {
    /// The value of `key`, if any.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Keys `>= from` in ascending order.
    fn scan_from<'a>(&'a self, cf: Cf, from: &[u8]) -> Scan<'a>;
    /// Keys `<= from` in descending order.
    fn scan_back<'a>(&'a self, cf: Cf, from: &[u8]) -> Scan<'a>;
}

/// A database: reads, atomic batches, durability and snapshots.
pub(crate) trait Backend: ReadView + Send + Sync {
    /// Applies `batch` atomically. With `sync`, it is durable when this returns.
    fn write(&self, batch: Vec<BatchOp>, sync: bool) -> Result<()>;
    /// Makes every write that returned so far durable.
    fn sync(&self) -> Result<()>;
    /// Reads a chunk's stored bytes without RocksDB's block checksum check: callers verify
    /// the chunk's BLAKE3 hash instead, which covers the data end to end.
    fn get_chunk(&self, id: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Writes chunk data without the write-ahead log and makes it durable by flushing the
    /// chunks column family: large data reaches the disk once, in blob files.
    fn write_chunks_durably(&self, chunks: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()>;
    /// A point-in-time view.
    fn snapshot(&self) -> Box<dyn ReadView + '_>;
    /// Returns the disk space of deleted data to the filesystem (flush, compact, rewrite
    /// blob files that hold dead chunks). Slow; runs rarely, off the request path.
    fn reclaim(&self) -> Result<()>;
}

/// Ascending scan restricted to keys starting with `prefix`.
pub(crate) fn scan_prefix<'a>(view: &'a dyn ReadView, cf: Cf, prefix: &[u8]) -> Scan<'a> {
    let prefix = prefix.to_vec();
    Box::new(
        view.scan_from(cf, &prefix.clone())
            .take_while(move |r| match r {
                Ok((k, _)) => k.starts_with(&prefix),
                Err(_) => true,
            }),
    )
}
