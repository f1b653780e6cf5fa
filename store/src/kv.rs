//! The key-value layer under the store: column families, batches, and two backends.
//!
//! Owns: the `Backend` trait, `Cf`, `BatchOp`, and the RocksDB (`rocks`) and in-memory (`mem`)
//! implementations. Everything above this module is backend-agnostic, so every store test runs
//! against both.
//! Must not: know what the keys mean; only `rocks` may name `rocksdb` types.

pub(crate) mod mem;
pub(crate) mod rocks;

use bytes::Bytes;

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
    /// entry id -> where the entry is (parent node id, name, node).
    Entries,
    /// (hlc, device, seq, index) -> entry move, for undo and redo of late ops.
    Moves,
    /// node id -> the op that created the node, to rebuild a deleted node that comes back.
    Born,
    /// (node id, name) -> (clock, value or removal): each extended attribute of a node is a
    /// last-writer-wins register of its own, kept while the node is deleted.
    XattrRegs,
}

impl Cf {
    pub(crate) const ALL: [Cf; 15] = [
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
        Cf::Entries,
        Cf::Moves,
        Cf::Born,
        Cf::XattrRegs,
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
            Cf::Entries => "entries",
            Cf::Moves => "moves",
            Cf::Born => "born",
            Cf::XattrRegs => "xattr_regs",
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
    /// Keys in `[lo, hi)` (`hi = None`: no upper bound), ascending, or descending with
    /// `reverse`. The bounds go down to the storage engine, so a scan never walks the
    /// deletion tombstones of keys outside its range.
    fn scan<'a>(&'a self, cf: Cf, lo: &[u8], hi: Option<&[u8]>, reverse: bool) -> Scan<'a>;

    /// Keys `>= from` in ascending order.
    fn scan_from<'a>(&'a self, cf: Cf, from: &[u8]) -> Scan<'a> {
        self.scan(cf, from, None, false)
    }
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
    /// Writes chunk data without the write-ahead log and starts flushing the chunks column
    /// family, without waiting: large data reaches the disk once, in blob files.
    fn write_chunks(&self, chunks: Vec<(Vec<u8>, Bytes)>) -> Result<()>;
    /// Waits until every chunk written by `write_chunks` so far is durable.
    fn wait_chunks_durable(&self) -> Result<()>;
    /// A point-in-time view.
    fn snapshot(&self) -> Box<dyn ReadView + '_>;
    /// Returns the disk space of deleted data to the filesystem (flush, compact, rewrite
    /// blob files that hold dead chunks). Slow; runs rarely, off the request path.
    fn reclaim(&self) -> Result<()>;
    /// A copy of the database in memory (the in-memory backend only, for simulations;
    /// `None` elsewhere): with `crash: None` all of it (a backup); with `Some(keep)` what a
    /// power cut now would leave, the durable state and the first `keep` writes after it.
    fn copy_in_memory(&self, crash: Option<usize>) -> Option<Box<dyn Backend>> {
        let _ = crash;
        None
    }
    /// Bytes the column family `cf` takes: on disk and in memory tables (RocksDB's own
    /// figures, compressed), or its keys and values (in memory).
    fn cf_bytes(&self, cf: Cf) -> Result<u64>;
    /// Writes through the write-ahead log since the last sync (the in-memory backend only;
    /// 0 elsewhere).
    fn unsynced_writes(&self) -> usize {
        0
    }
}

/// The smallest key greater than every key that starts with `prefix`, if there is one.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The smallest key greater than `key`.
pub(crate) fn key_after(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.extend_from_slice(key);
    k.push(0);
    k
}

/// Ascending scan restricted to keys starting with `prefix`.
pub(crate) fn scan_prefix<'a>(view: &'a dyn ReadView, cf: Cf, prefix: &[u8]) -> Scan<'a> {
    view.scan(cf, prefix, prefix_end(prefix).as_deref(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
        assert!(key_after(b"ab").as_slice() > b"ab".as_slice());
        assert!(key_after(b"ab").as_slice() < b"ab\x00\x00".as_slice());
    }

    fn keys(scan: Scan<'_>) -> Vec<Vec<u8>> {
        scan.map(|r| r.expect("scan").0).collect()
    }

    /// Both backends honour `[lo, hi)` in both directions, also next to deleted keys.
    fn check_bounded_scans(b: &dyn Backend) {
        let put = |k: &[u8]| (Cf::Extents, k.to_vec(), Some(vec![1]));
        let del = |k: &[u8]| (Cf::Extents, k.to_vec(), None);
        b.write(
            vec![put(b"a1"), put(b"a2"), put(b"b1"), put(b"b2"), put(b"c1")],
            false,
        )
        .expect("write");
        b.write(vec![del(b"a2"), del(b"b1")], false)
            .expect("delete");
        let k = |s: &[&[u8]]| s.iter().map(|k| k.to_vec()).collect::<Vec<_>>();
        assert_eq!(
            keys(b.scan(Cf::Extents, b"b", Some(b"c"), false)),
            k(&[b"b2"])
        );
        assert_eq!(
            keys(b.scan(Cf::Extents, b"a", Some(b"c"), true)),
            k(&[b"b2", b"a1"])
        );
        assert_eq!(
            keys(b.scan(Cf::Extents, b"a1", Some(b"a1\0"), true)),
            k(&[b"a1"])
        );
        assert_eq!(
            keys(b.scan(Cf::Extents, b"b", None, true)),
            k(&[b"c1", b"b2"])
        );
        assert_eq!(keys(b.scan(Cf::Extents, b"b1", Some(b"b2"), false)), k(&[]));
        assert_eq!(keys(b.scan(Cf::Extents, b"c", Some(b"b"), true)), k(&[]));
        assert_eq!(keys(scan_prefix(b, Cf::Extents, b"a")), k(&[b"a1"]));
        let snap = b.snapshot();
        assert_eq!(
            keys(snap.scan(Cf::Extents, b"", Some(b"b3"), true)),
            k(&[b"b2", b"a1"])
        );
    }

    #[test]
    fn bounded_scans_agree_on_both_backends() {
        check_bounded_scans(&mem::MemBackend::default());
        let dir = tempfile::tempdir().expect("tempdir");
        let rocks = rocks::RocksBackend::open(dir.path(), &rocks::RocksOptions::default())
            .expect("open rocksdb");
        check_bounded_scans(&rocks);
    }
}
