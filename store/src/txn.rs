//! A write transaction: reads that see its own writes, and one atomic batch at the end.
//!
//! Owns: the write overlay, the writer state (ino/seq counters, clock, statistics) as seen
//! inside a transaction, op recording, and chunk reference counting.
//! Must not: be held across an await or a network wait; transactions run under the store's
//! writer lock, on a blocking thread, and are short.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;

use crate::auth::{self, OpHash, Signer};
use crate::chunk;
use crate::env::Env;
use crate::error::{Result, StoreError};
use crate::kv::{self, BatchOp, Cf, Kv, ReadView};
use crate::records::{
    self, key, BornRecord, DirentRecord, EntryRecord, ExtentRecord, MoveRecord, NodeRecord, OpKind,
    OpRecord, RefRecord, StatsRecord,
};
use crate::types::{ChunkId, DeviceId, Hlc, Ino, NodeId, OpId, Timestamp, Writer};

/// Counters and clock owned by the single writer; persisted in `Cf::Meta` with every commit.
#[derive(Clone, Debug)]
pub(crate) struct WriterState {
    pub(crate) device: DeviceId,
    pub(crate) namespace: [u8; 16],
    /// This opening of the store: the writer of every op made here until it closes.
    pub(crate) incarnation: u64,
    pub(crate) next_ino: Ino,
    pub(crate) next_seq: u64,
    /// The hash of this incarnation's last op (`GENESIS` before its first).
    pub(crate) last_hash: OpHash,
    pub(crate) hlc: Hlc,
    pub(crate) stats: StatsRecord,
    /// Every other writer's last op held here (earlier incarnations of this device too):
    /// its sequence number and hash.
    pub(crate) heads: BTreeMap<Writer, (u64, OpHash)>,
    pub(crate) heads_changed: bool,
    /// The last checkpoint (`crate::compact`): ops before its horizon are compacted.
    pub(crate) checkpoint: std::sync::Arc<records::CheckpointRecord>,
}

impl WriterState {
    /// This store's writer (device and incarnation).
    pub(crate) fn writer(&self) -> Writer {
        Writer {
            device: self.device,
            incarnation: self.incarnation,
        }
    }
}

/// Pending-marker tokens with this bit set mark chunks another device pushed here and has
/// not referenced yet (`Store::keep_pushed`), one token per device; staging tokens never
/// have it.
pub(crate) const PUSHED_BIT: u64 = 1 << 63;

/// The pending-marker token of chunks `device` pushed here.
pub(crate) fn pushed_token(device: DeviceId) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&device.0[..8]);
    u64::from_be_bytes(b) | PUSHED_BIT
}

/// True if a pending-marker key is that of a pushed chunk (its token has `PUSHED_BIT`).
pub(crate) fn is_pushed_marker(key: &[u8]) -> bool {
    key.get(32..40)
        .and_then(|t| <[u8; 8]>::try_from(t).ok())
        .is_some_and(|t| u64::from_be_bytes(t) & PUSHED_BIT != 0)
}

/// Seconds since the epoch, now (0 before it).
pub(crate) fn unix_secs() -> u64 {
    Timestamp::now().sec.max(0) as u64
}

/// The value of a pushed chunk's marker: when it came (seconds since the epoch), its stored
/// length and its plaintext length, big-endian.
pub(crate) fn pushed_marker(stored: u32, len: u32) -> Vec<u8> {
    let mut v = unix_secs().to_be_bytes().to_vec();
    v.extend_from_slice(&stored.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// (when, stored length, plaintext length) of a pushed chunk's marker.
pub(crate) fn pushed_fields(v: &[u8]) -> Result<(u64, u32, u32)> {
    let bad = || StoreError::corrupt("pushed chunk marker of the wrong length");
    let v: &[u8; 16] = v.try_into().map_err(|_| bad())?;
    let at = u64::from_be_bytes(v[..8].try_into().map_err(|_| bad())?);
    let stored = u32::from_be_bytes(v[8..12].try_into().map_err(|_| bad())?);
    let len = u32::from_be_bytes(v[12..].try_into().map_err(|_| bad())?);
    Ok((at, stored, len))
}

/// A chunk ready to be referenced: its id, plaintext, and (if it was new when prepared) its
/// stored encoding.
#[derive(Clone, Debug)]
pub struct PreparedChunk {
    /// BLAKE3 of `plain`.
    pub id: ChunkId,
    /// The plaintext.
    pub plain: Bytes,
    /// The stored encoding, computed ahead of the commit when the chunk looked new.
    pub encoded: Option<Bytes>,
    /// Set when `Store::stage` already stored the data: the token of its pending marker.
    pub staged: Option<u64>,
    /// Set when another device stored the data for this commit (`Store::keep_pushed` there):
    /// a new chunk is referenced as absent here, as content made elsewhere is.
    pub elsewhere: bool,
}

impl PreparedChunk {
    /// Hashes `plain`; encodes it too when `encode` is set.
    pub fn new(plain: Bytes, encode: bool) -> PreparedChunk {
        let id = ChunkId::of(&plain);
        let encoded = encode.then(|| chunk::encode(&plain));
        PreparedChunk {
            id,
            plain,
            encoded,
            staged: None,
            elsewhere: false,
        }
    }
}

/// An open write transaction. Obtained from `Store::commit`.
pub struct Txn<'a> {
    view: &'a dyn ReadView,
    overlay: BTreeMap<(Cf, Vec<u8>), Option<Vec<u8>>>,
    pub(crate) state: WriterState,
    env: &'a dyn Env,
    /// Signs each op as it is recorded (`None`: a store opened without its key, which
    /// records nothing: `finish` refuses a transaction that made ops).
    signer: Option<&'a dyn Signer>,
    now: Timestamp,
    /// How many ops this transaction recorded.
    ops: usize,
    pub(crate) new_bytes: u64,
    pub(crate) freed_bytes: u64,
}

impl std::fmt::Debug for Txn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("writes", &self.overlay.len())
            .field("ops", &self.ops)
            .finish()
    }
}

impl<'a> Txn<'a> {
    pub(crate) fn new(
        view: &'a dyn ReadView,
        state: WriterState,
        env: &'a dyn Env,
        signer: Option<&'a dyn Signer>,
    ) -> Txn<'a> {
        Txn {
            view,
            overlay: BTreeMap::new(),
            state,
            env,
            signer,
            now: env.now(),
            ops: 0,
            new_bytes: 0,
            freed_bytes: 0,
        }
    }

    /// The wall-clock time this transaction runs at.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// A fresh id for a new node or directory entry.
    pub(crate) fn new_id(&self) -> NodeId {
        loop {
            if let Some(id) = NodeId::from_unique(self.env.unique()) {
                return id;
            }
        }
    }

    /// This device.
    pub fn device(&self) -> DeviceId {
        self.state.device
    }

    // ---- raw access -------------------------------------------------------------------

    pub(crate) fn get(&self, cf: Cf, k: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.overlay.get(&(cf, k.to_vec())) {
            return Ok(v.clone());
        }
        self.view.get(cf, k)
    }

    pub(crate) fn put(&mut self, cf: Cf, k: &[u8], v: Vec<u8>) {
        self.overlay.insert((cf, k.to_vec()), Some(v));
    }

    pub(crate) fn delete(&mut self, cf: Cf, k: &[u8]) {
        self.overlay.insert((cf, k.to_vec()), None);
    }

    /// Up to `limit` pairs with keys in `[from, to)`, ascending, merging the overlay.
    pub(crate) fn scan(&self, cf: Cf, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<Kv>> {
        let lo = (cf, from.to_vec());
        let hi = (cf, to.to_vec());
        let mut over = self
            .overlay
            .range((Bound::Included(&lo), Bound::Excluded(&hi)))
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .peekable();
        let mut base = self.view.scan(cf, from, Some(to), false).peekable();
        let mut out = Vec::new();
        while out.len() < limit {
            let base_key = match base.peek() {
                Some(Ok((k, _))) if k.as_slice() < to => Some(k.clone()),
                Some(Err(_)) => {
                    return Err(base.next().and_then(|r| r.err()).expect("peeked an error"))
                }
                _ => None,
            };
            let over_key = over.peek().map(|(k, _)| k.clone());
            match (base_key, over_key) {
                (None, None) => break,
                (Some(b), Some(o)) if o <= b => {
                    if o == b {
                        base.next();
                    }
                    let (k, v) = over.next().expect("peeked");
                    if let Some(v) = v {
                        out.push((k, v));
                    }
                }
                (Some(_), _) => {
                    let (k, v) = base.next().expect("peeked")?;
                    out.push((k, v));
                }
                (None, Some(_)) => {
                    let (k, v) = over.next().expect("peeked");
                    if let Some(v) = v {
                        out.push((k, v));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The last pair with a key in `[lo, at]`, merging the overlay.
    pub(crate) fn last_at_or_before(&self, cf: Cf, lo: &[u8], at: &[u8]) -> Result<Option<Kv>> {
        let lo_k = (cf, lo.to_vec());
        let at_k = (cf, at.to_vec());
        let mut over = self
            .overlay
            .range((Bound::Included(&lo_k), Bound::Included(&at_k)))
            .rev()
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .peekable();
        let after = kv::key_after(at);
        let mut base = self.view.scan(cf, lo, Some(&after), true).peekable();
        loop {
            let base_key = match base.peek() {
                Some(Ok((k, _))) if k.as_slice() >= lo => Some(k.clone()),
                Some(Err(_)) => {
                    return Err(base.next().and_then(|r| r.err()).expect("peeked an error"))
                }
                _ => None,
            };
            let over_key = over.peek().map(|(k, _)| k.clone());
            let (k, v) = match (base_key, over_key) {
                (None, None) => return Ok(None),
                (Some(b), Some(o)) if o >= b => {
                    if o == b {
                        base.next();
                    }
                    over.next().expect("peeked")
                }
                (Some(_), _) => {
                    let (k, v) = base.next().expect("peeked")?;
                    (k, Some(v))
                }
                (None, Some(_)) => over.next().expect("peeked"),
            };
            if let Some(v) = v {
                return Ok(Some((k, v)));
            }
        }
    }

    // ---- typed access -----------------------------------------------------------------

    /// The node with this ino, if any.
    pub fn node(&self, ino: Ino) -> Result<Option<NodeRecord>> {
        self.get(Cf::Nodes, &key::ino(ino))?
            .map(|b| records::decode("node", &b))
            .transpose()
    }

    /// The node with this ino, or `NotFound`.
    pub fn node_req(&self, ino: Ino) -> Result<NodeRecord> {
        self.node(ino)?
            .ok_or_else(|| StoreError::NotFound(format!("inode {ino}")))
    }

    pub(crate) fn put_node(&mut self, ino: Ino, node: &NodeRecord) {
        self.put(Cf::Nodes, &key::ino(ino), records::encode(node));
    }

    /// The entry `name` in directory `parent`, if any.
    pub fn dirent(&self, parent: Ino, name: &[u8]) -> Result<Option<DirentRecord>> {
        self.get(Cf::Dirents, &key::dirent(parent, name))?
            .map(|b| records::decode("dirent", &b))
            .transpose()
    }

    pub(crate) fn put_dirent(&mut self, parent: Ino, name: &[u8], d: DirentRecord) {
        self.put(Cf::Dirents, &key::dirent(parent, name), records::encode(&d));
    }

    pub(crate) fn delete_dirent(&mut self, parent: Ino, name: &[u8]) {
        self.delete(Cf::Dirents, &key::dirent(parent, name));
    }

    /// Where the entry `id` is, if it is in the tree.
    pub fn entry(&self, id: NodeId) -> Result<Option<EntryRecord>> {
        self.get(Cf::Entries, &key::node_id(id))?
            .map(|b| records::decode("entry", &b))
            .transpose()
    }

    pub(crate) fn put_entry(&mut self, id: NodeId, e: &EntryRecord) {
        self.put(Cf::Entries, &key::node_id(id), records::encode(e));
    }

    pub(crate) fn delete_entry(&mut self, id: NodeId) {
        self.delete(Cf::Entries, &key::node_id(id));
    }

    pub(crate) fn born(&self, id: NodeId) -> Result<Option<BornRecord>> {
        self.get(Cf::Born, &key::node_id(id))?
            .map(|b| records::decode("born", &b))
            .transpose()
    }

    /// Logs the `idx`-th entry move of the op just recorded (`op`, at the current clock).
    pub(crate) fn log_move(&mut self, op: OpId, idx: u8, m: &MoveRecord) {
        let hlc = self.state.hlc;
        self.put(Cf::Moves, &key::mv(hlc, op, idx), records::encode(m));
    }

    /// The clock of the next op this transaction records (`record` takes it; `touch_dir`
    /// stamps a directory with it just before the op that changes the directory).
    pub(crate) fn next_hlc(&self) -> Hlc {
        self.state.hlc.tick(self.now.millis())
    }

    /// Records an op made on this device now; returns its id. The op joins this writer's
    /// hash chain and is signed at once (written when the transaction commits).
    pub(crate) fn record(&mut self, kind: OpKind) -> OpId {
        let id = OpId {
            device: self.state.device,
            incarnation: self.state.incarnation,
            seq: self.state.next_seq,
        };
        self.state.next_seq += 1;
        self.state.hlc = self.next_hlc();
        let mut rec = OpRecord {
            id,
            hlc: self.state.hlc,
            prev: self.state.last_hash,
            kind,
            sig: Vec::new(),
        };
        let hash = auth::op_hash(&rec);
        if let Some(signer) = self.signer {
            rec.sig = signer.sign(&auth::sign_message(&self.state.namespace, &hash));
        }
        self.state.last_hash = hash;
        self.put_op(&rec);
        self.ops += 1;
        id
    }

    /// Writes `op` into the op log (and the index of membership changes).
    pub(crate) fn put_op(&mut self, op: &OpRecord) {
        if matches!(op.kind, OpKind::Member { .. }) {
            self.put(Cf::Meta, &key::member_op(op.id), Vec::new());
        }
        self.put(Cf::Oplog, &key::op_id(op.id), records::encode(op));
    }

    /// Allocates a fresh local inode number.
    pub(crate) fn alloc_ino(&mut self) -> Ino {
        let ino = self.state.next_ino;
        self.state.next_ino += 1;
        ino
    }

    pub(crate) fn map_id(&mut self, id: NodeId, ino: Ino) {
        self.put(Cf::Ids, &key::node_id(id), ino.to_be_bytes().to_vec());
    }

    // ---- chunk references -------------------------------------------------------------

    pub(crate) fn refs(&self, id: &ChunkId) -> Result<Option<RefRecord>> {
        self.get(Cf::Refs, &id.0)?
            .map(|b| records::decode("chunk ref", &b))
            .transpose()
    }

    /// Adds one reference to a chunk, storing its data if this is the first.
    pub(crate) fn incref(&mut self, c: &PreparedChunk) -> Result<()> {
        let len = u32::try_from(c.plain.len())
            .map_err(|_| StoreError::Invalid("chunk too large".into()))?;
        let rec = match self.refs(&c.id)? {
            Some(mut r) if r.stored > 0 => {
                r.count += 1;
                r
            }
            Some(mut r) if c.elsewhere && c.staged.is_none() => {
                r.count += 1;
                r
            }
            None if c.elsewhere && c.staged.is_none() => RefRecord {
                count: 1,
                len,
                stored: 0,
            },
            absent => {
                let count = absent.map_or(0, |r| r.count) + 1;
                let stored = match (&c.encoded, c.staged) {
                    // Staged: the data is stored already and its pending marker kept it.
                    (Some(e), Some(_)) => e.len() as u32,
                    (encoded, _) => {
                        let encoded = match encoded {
                            Some(e) => e.to_vec(),
                            None => chunk::encode(&c.plain).to_vec(),
                        };
                        let stored = encoded.len() as u32;
                        self.new_bytes += u64::from(stored);
                        self.put(Cf::Chunks, &c.id.0, encoded);
                        stored
                    }
                };
                self.state.stats.chunks += 1;
                self.state.stats.chunk_bytes += u64::from(len);
                self.state.stats.stored_bytes += u64::from(stored);
                RefRecord { count, len, stored }
            }
        };
        self.put(Cf::Refs, &c.id.0, records::encode(&rec));
        if let Some(token) = c.staged {
            self.delete(Cf::Pending, &key::pending(&c.id, token));
        }
        Ok(())
    }

    /// Adds one reference to a chunk that may not be stored here (content made on another
    /// device): an absent chunk is recorded with stored length 0 until it is fetched.
    /// `author` made the op that references it: a chunk it pushed here is settled.
    pub(crate) fn incref_id(&mut self, id: &ChunkId, len: u32, author: DeviceId) -> Result<()> {
        let r = match self.refs(id)? {
            Some(mut r) => {
                if r.len != len {
                    return Err(StoreError::Invalid(format!(
                        "chunk {} has length {}, not {len}",
                        id.fmt_short(),
                        r.len
                    )));
                }
                r.count += 1;
                r
            }
            None => RefRecord {
                count: 1,
                len,
                stored: 0,
            },
        };
        self.put(Cf::Refs, &id.0, records::encode(&r));
        self.settle_pushed(id, author)
    }

    /// The op of `author` that references a chunk it pushed here (`Store::keep_pushed`) has
    /// come: the marker that kept the chunk alive meanwhile goes, and its data counts as held.
    fn settle_pushed(&mut self, id: &ChunkId, author: DeviceId) -> Result<()> {
        let marker = key::pending(id, pushed_token(author));
        let Some(v) = self.get(Cf::Pending, &marker)? else {
            return Ok(());
        };
        self.delete(Cf::Pending, &marker);
        let (_, stored, len) = pushed_fields(&v)?;
        self.hold_pushed(id, stored, len)
    }

    /// Records the data of a pushed chunk (just written, `stored` bytes) as held if the chunk
    /// is referenced here.
    pub(crate) fn hold_pushed(&mut self, id: &ChunkId, stored: u32, len: u32) -> Result<()> {
        let Some(mut r) = self.refs(id)? else {
            return Ok(());
        };
        if len != r.len {
            return Err(StoreError::Invalid(format!(
                "chunk {} was pushed with length {len}, not {}",
                id.fmt_short(),
                r.len
            )));
        }
        let s = &mut self.state.stats;
        if r.stored == 0 {
            s.chunks += 1;
            s.chunk_bytes += u64::from(r.len);
        }
        // The pushed data replaced what was stored (the same bytes, unless an encoder of
        // another version chose differently).
        s.stored_bytes = s.stored_bytes.saturating_sub(u64::from(r.stored)) + u64::from(stored);
        r.stored = stored;
        self.put(Cf::Refs, &id.0, records::encode(&r));
        Ok(())
    }

    /// Records that the data of an absent chunk, written and made durable by
    /// `Store::put_fetched`, is held now. If the chunk lost its last reference meanwhile,
    /// the data goes again (this delete is ordered after that write).
    /// With `data`, the data is written here, in this commit.
    pub(crate) fn mark_fetched(
        &mut self,
        id: &ChunkId,
        len: usize,
        stored: usize,
        data: Option<Vec<u8>>,
    ) -> Result<()> {
        let Some(mut r) = self.refs(id)? else {
            if !self.is_staged(id)? {
                self.delete(Cf::Chunks, &id.0);
            }
            return Ok(());
        };
        if r.stored > 0 {
            return Ok(());
        }
        if r.len as usize != len {
            return Err(StoreError::Invalid(format!(
                "chunk {} has length {len}, {} expected",
                id.fmt_short(),
                r.len
            )));
        }
        r.stored = stored as u32;
        if let Some(data) = data {
            self.new_bytes += data.len() as u64;
            self.put(Cf::Chunks, &id.0, data);
        }
        let s = &mut self.state.stats;
        s.chunks += 1;
        s.chunk_bytes += u64::from(r.len);
        s.stored_bytes += u64::from(r.stored);
        self.put(Cf::Refs, &id.0, records::encode(&r));
        Ok(())
    }

    /// Drops the data of a chunk held here, which stays referenced, as absent (another
    /// device holds it). Returns the stored bytes freed.
    pub(crate) fn evict(&mut self, id: &ChunkId) -> Result<u64> {
        let Some(mut r) = self.refs(id)? else {
            return Ok(0);
        };
        if r.stored == 0 {
            return Ok(0);
        }
        let freed = u64::from(r.stored);
        if !self.is_staged(id)? {
            self.delete(Cf::Chunks, &id.0);
        }
        let s = &mut self.state.stats;
        s.chunks = s.chunks.saturating_sub(1);
        s.chunk_bytes = s.chunk_bytes.saturating_sub(u64::from(r.len));
        s.stored_bytes = s.stored_bytes.saturating_sub(freed);
        self.freed_bytes += freed;
        r.stored = 0;
        self.put(Cf::Refs, &id.0, records::encode(&r));
        Ok(freed)
    }

    /// The chunks of files open without a name (orphans): their content must stay here.
    pub(crate) fn orphan_chunks(&self) -> Result<std::collections::HashSet<ChunkId>> {
        let mut out = std::collections::HashSet::new();
        for (k, _) in self.scan(Cf::Orphans, &[], &[0xff; 9], usize::MAX)? {
            let ino = key::ino_of(&k)?;
            for (_, e) in self.extents(ino, 0, u64::MAX)? {
                out.insert(e.chunk);
            }
        }
        Ok(out)
    }

    /// True if a staged, not yet committed, write of this chunk exists.
    pub(crate) fn is_staged(&self, id: &ChunkId) -> Result<bool> {
        let end = key::pending_end(id);
        Ok(!self.scan(Cf::Pending, &id.0, &end, 1)?.is_empty())
    }

    /// Adds one reference to a chunk that must already be stored.
    pub(crate) fn incref_existing(&mut self, id: &ChunkId) -> Result<()> {
        let mut r = self
            .refs(id)?
            .ok_or_else(|| StoreError::corrupt(format!("chunk {} has no refs", id.fmt_short())))?;
        r.count += 1;
        self.put(Cf::Refs, &id.0, records::encode(&r));
        Ok(())
    }

    /// Drops one reference; the chunk is deleted with its last reference.
    pub(crate) fn decref(&mut self, id: &ChunkId) -> Result<()> {
        let Some(mut r) = self.refs(id)? else {
            return Err(StoreError::corrupt(format!(
                "chunk {} is referenced but has no refs entry",
                id.fmt_short()
            )));
        };
        r.count = r.count.saturating_sub(1);
        if r.count == 0 && r.stored == 0 {
            // Never fetched: nothing counted (data a crash left mid-fetch goes too, unless a
            // marker keeps it).
            self.delete(Cf::Refs, &id.0);
            if !self.is_staged(id)? {
                self.delete(Cf::Chunks, &id.0);
            }
        } else if r.count == 0 {
            self.delete(Cf::Refs, &id.0);
            // A staged write of the same chunk is about to reference this data: keep it.
            if !self.is_staged(id)? {
                self.delete(Cf::Chunks, &id.0);
            }
            self.freed_bytes += u64::from(r.stored);
            let s = &mut self.state.stats;
            s.chunks = s.chunks.saturating_sub(1);
            s.chunk_bytes = s.chunk_bytes.saturating_sub(u64::from(r.len));
            s.stored_bytes = s.stored_bytes.saturating_sub(u64::from(r.stored));
        } else {
            self.put(Cf::Refs, &id.0, records::encode(&r));
        }
        Ok(())
    }

    /// Reads a chunk's plaintext (for re-chunking the edges of an edit).
    pub(crate) fn chunk_plain(&self, id: &ChunkId, len: u32) -> Result<Vec<u8>> {
        let stored = self
            .get(Cf::Chunks, &id.0)?
            .ok_or(StoreError::ChunkAbsent(*id))?;
        chunk::decode(&stored, len as usize)
    }

    // ---- extents ----------------------------------------------------------------------

    /// Extents of `ino` overlapping `[start, end)`, in order, as (offset, extent).
    pub fn extents(&self, ino: Ino, start: u64, end: u64) -> Result<Vec<(u64, ExtentRecord)>> {
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        if let Some((k, v)) =
            self.last_at_or_before(Cf::Extents, &key::extent(ino, 0), &key::extent(ino, start))?
        {
            let (_, off) = key::extent_offset(&k)?;
            let e: ExtentRecord = records::decode("extent", &v)?;
            if off < start && off + u64::from(e.len) > start {
                out.push((off, e));
            }
        }
        for (k, v) in self.scan(
            Cf::Extents,
            &key::extent(ino, start),
            &key::extent(ino, end),
            usize::MAX,
        )? {
            let (_, off) = key::extent_offset(&k)?;
            out.push((off, records::decode("extent", &v)?));
        }
        Ok(out)
    }

    pub(crate) fn put_extent(&mut self, ino: Ino, off: u64, e: ExtentRecord) {
        self.state.stats.referenced_bytes += u64::from(e.len);
        self.put(Cf::Extents, &key::extent(ino, off), records::encode(&e));
    }

    pub(crate) fn delete_extent(&mut self, ino: Ino, off: u64, e: &ExtentRecord) -> Result<()> {
        self.state.stats.referenced_bytes = self
            .state
            .stats
            .referenced_bytes
            .saturating_sub(u64::from(e.len));
        self.delete(Cf::Extents, &key::extent(ino, off));
        self.decref(&e.chunk)
    }

    // ---- finishing --------------------------------------------------------------------

    /// The transaction's writes, with every op it recorded signed by `signer` (a store
    /// opened without a device key cannot record ops).
    pub(crate) fn finish(mut self) -> Result<(Vec<BatchOp>, WriterState, usize)> {
        if self.ops > 0 && self.signer.is_none() {
            return Err(StoreError::Invalid(
                "this store was opened without its device key".into(),
            ));
        }
        let st = &self.state;
        let meta = [
            (key::META_NEXT_INO, st.next_ino.to_be_bytes().to_vec()),
            (key::META_NEXT_SEQ, st.next_seq.to_be_bytes().to_vec()),
            (key::META_INCARNATION, st.incarnation.to_be_bytes().to_vec()),
            (key::META_LAST_HASH, st.last_hash.to_vec()),
            (key::META_HLC, st.hlc.0.to_be_bytes().to_vec()),
            (key::META_STATS, records::encode(&st.stats)),
        ];
        let heads = st.heads_changed.then(|| records::encode(&st.heads));
        for (k, v) in meta {
            self.put(Cf::Meta, k, v);
        }
        if let Some(heads) = heads {
            self.put(Cf::Meta, key::META_HEADS, heads);
        }
        let batch = self
            .overlay
            .into_iter()
            .map(|((cf, k), v)| (cf, k, v))
            .collect();
        let st = WriterState {
            heads_changed: false,
            ..self.state
        };
        Ok((batch, st, self.ops))
    }
}
