//! The store handle: opening a device's database, reads, and serialized commits.
//!
//! Owns: the writer lock (one transaction at a time; RocksDB groups concurrent WAL writes
//! below us), the decoded-chunk cache, and the free-space guard of the data directory.
//! Must not: do network I/O, or be called from an async worker thread (every call may block
//! on disk: use `spawn_blocking` or a dedicated thread).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;

use crate::auth::{self, Signer, GENESIS};
use crate::chunk;
use crate::env::{Env, SystemEnv};
use crate::error::{Result, StoreError};
use crate::kv::mem::MemBackend;
use crate::kv::rocks::{RocksBackend, RocksOptions};
use crate::kv::{self, scan_prefix, Backend, Cf, ReadView};
use crate::records::{
    self, key, DirentRecord, ExtentRecord, MemberRecord, NodeRecord, OpRecord, RefRecord,
    StatsRecord, FORMAT_VERSION,
};
use crate::txn::{
    is_pushed_marker, pushed_fields, pushed_marker, pushed_token, unix_secs, PreparedChunk, Txn,
    WriterState, PUSHED_BIT,
};
use crate::types::{ChunkId, DeviceId, FileKind, Hlc, Ino, NodeId, Writer, ROOT_INO};

/// New chunks being stored ahead of one commit (`Store::stage_part`).
#[derive(Debug)]
pub struct Staging {
    token: u64,
    parts: usize,
}

impl Staging {
    /// Starts staging for one commit.
    pub fn new() -> Staging {
        Staging {
            token: u64::from_le_bytes(crate::types::random_bytes()) & !PUSHED_BIT,
            parts: 0,
        }
    }
}

impl Default for Staging {
    fn default() -> Self {
        Staging::new()
    }
}

/// Most threads `Store::prepare_many` hashes and encodes on.
const PREPARE_THREADS: usize = 4;
/// Least data per thread for `Store::prepare_many` to use another thread.
const PREPARE_MIN_BYTES_PER_THREAD: usize = 2 << 20;

/// Settings of a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// RocksDB tuning.
    pub rocks: RocksOptions,
    /// Bytes of decoded chunks kept in memory.
    pub chunk_cache_bytes: u64,
    /// Free space kept in reserve on the data directory's disk: new data is refused with
    /// `NoSpace` below it, so that deletes and RocksDB's own flushes still fit.
    pub reserve_bytes: u64,
    /// The clock and id source (`SystemEnv`; simulations run on virtual time).
    pub env: Arc<dyn Env>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            rocks: RocksOptions::default(),
            chunk_cache_bytes: 256 << 20,
            reserve_bytes: 192 << 20,
            env: Arc::new(SystemEnv),
        }
    }
}

/// The size of a store's logs.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogBytes {
    /// Every op held (all writers).
    pub op_log: u64,
    /// The moves of entries, for undo and redo of late ops.
    pub move_log: u64,
    /// What checkpoints kept of compacted ops (creates, whole file versions, membership
    /// changes), and the checkpoint itself.
    pub kept: u64,
}

/// How a new namespace's root directory starts out.
#[derive(Clone, Copy, Debug)]
pub struct RootOwner {
    /// Owner of the root directory.
    pub uid: u32,
    /// Group of the root directory.
    pub gid: u32,
}

/// Capacity of the disk under the data directory.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpaceInfo {
    /// Block size.
    pub block_size: u64,
    /// Total bytes.
    pub total: u64,
    /// Free bytes.
    pub free: u64,
    /// Bytes available to pvfs (free minus the reserve).
    pub available: u64,
}

#[derive(Clone)]
struct ChunkWeight;

impl quick_cache::Weighter<ChunkId, Bytes> for ChunkWeight {
    fn weight(&self, _key: &ChunkId, val: &Bytes) -> u64 {
        val.len() as u64 + 64
    }
}

struct SpaceGuard {
    path: PathBuf,
    reserve: u64,
    free: AtomicU64,
    checked: Mutex<Option<Instant>>,
}

impl SpaceGuard {
    fn statvfs(&self) -> Result<SpaceInfo> {
        let st = rustix::fs::statvfs(&self.path).map_err(|e| StoreError::Io(e.into()))?;
        let bs = st.f_frsize.max(1);
        let free = st.f_bavail.saturating_mul(bs);
        Ok(SpaceInfo {
            block_size: bs,
            total: st.f_blocks.saturating_mul(bs),
            free,
            available: free.saturating_sub(self.reserve),
        })
    }

    fn free_bytes(&self) -> Result<u64> {
        let mut checked = self.checked.lock();
        if checked.is_none_or(|t| t.elapsed() > Duration::from_millis(50)) {
            let info = self.statvfs()?;
            self.free.store(info.free, Ordering::Relaxed);
            *checked = Some(Instant::now());
        }
        Ok(self.free.load(Ordering::Relaxed))
    }

    fn consumed(&self, bytes: u64) {
        // Until the next statvfs, assume what we wrote took that much space.
        let _ = self
            .free
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                Some(f.saturating_sub(bytes))
            });
    }
}

/// Freed chunk bytes after which a background `reclaim` returns their space.
const RECLAIM_AT: u64 = 256 << 20;

/// Background chunk loading for read-ahead: a few threads, a bounded queue.
struct Prefetcher {
    queue: std::sync::mpsc::SyncSender<(ChunkId, u32)>,
    inflight: Mutex<std::collections::HashSet<ChunkId>>,
}

const PREFETCH_THREADS: usize = 4;

impl Prefetcher {
    fn start(store: std::sync::Weak<Inner>) -> Prefetcher {
        let (queue, rx) = std::sync::mpsc::sync_channel::<(ChunkId, u32)>(256);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..PREFETCH_THREADS {
            let (rx, store) = (rx.clone(), store.clone());
            // The threads end when the store is dropped (the queue's sender goes with it).
            let _ = std::thread::Builder::new()
                .name(format!("pvfs-prefetch-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().recv();
                    let Ok((id, len)) = job else { return };
                    let Some(inner) = store.upgrade() else { return };
                    let s = Store { inner };
                    if let Err(e) = s.chunk(&id, len) {
                        tracing::debug!(chunk = %id.fmt_short(), "prefetch failed: {e:#}");
                    }
                    if let Some(p) = s.inner.prefetch.get() {
                        p.inflight.lock().remove(&id);
                    }
                });
        }
        Prefetcher {
            queue,
            inflight: Mutex::new(Default::default()),
        }
    }
}

struct Inner {
    backend: Box<dyn Backend>,
    prefetch: std::sync::OnceLock<Prefetcher>,
    /// Bytes of deleted chunks whose disk space RocksDB still holds.
    reclaimable: AtomicU64,
    reclaiming: std::sync::atomic::AtomicBool,
    reclaim_lock: Mutex<()>,
    /// Held by a compaction of the logs (one at a time).
    compact_lock: Mutex<()>,
    /// Commits written so far, and how many of them a WAL sync has made durable: a sync
    /// covers every commit before it, so concurrent `sync` calls share one (group commit).
    committed: AtomicU64,
    synced: Mutex<u64>,
    writer: Mutex<WriterState>,
    /// The current members, as last read (`None`: read at the next `is_member`).
    members: parking_lot::RwLock<Option<std::collections::HashSet<DeviceId>>>,
    env: Arc<dyn Env>,
    device: DeviceId,
    namespace: [u8; 16],
    /// Signs the ops recorded here (`None`: opened for inspection, records nothing).
    signer: Option<Arc<dyn Signer>>,
    /// The highest sequence number of this incarnation's ops that a WAL sync has made
    /// durable: only those leave the device (`ops_after`).
    durable_seq: AtomicU64,
    cache: quick_cache::sync::Cache<ChunkId, Bytes, ChunkWeight>,
    space: Option<SpaceGuard>,
    /// Called after every commit that recorded ops (the network pushes them to peers).
    on_commit: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    /// Chunks fetched from other devices, readable already, not yet on disk.
    landed: Mutex<Landed>,
    /// Keep no content on disk (`set_online_only`).
    online_only: std::sync::atomic::AtomicBool,
}

/// Fetched chunks between `land_fetched` and `persist_landed`: readers and peers are served
/// from here, and the disk sees them in large batches, not one flush per network batch. A
/// crash loses them, which costs only fetching them again: nothing records them as held.
#[derive(Default)]
struct Landed {
    /// Stored encoding and plaintext of each.
    chunks: HashMap<ChunkId, (Bytes, Bytes)>,
    /// Their encoded bytes.
    bytes: u64,
}

/// Fetched chunks below this many bytes in one batch are stored through the WAL (cheaper
/// than a flush); larger batches bypass it.
const FETCH_VIA_WAL: u64 = 256 << 10;

/// A device's store. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("device", &self.inner.device)
            .finish()
    }
}

fn meta_u64(view: &dyn ReadView, k: &[u8]) -> Result<u64> {
    let v = view.get(Cf::Meta, k)?.ok_or_else(|| {
        StoreError::corrupt(format!("meta {} missing", String::from_utf8_lossy(k)))
    })?;
    let b: [u8; 8] = v
        .as_slice()
        .try_into()
        .map_err(|_| StoreError::corrupt("meta value length"))?;
    Ok(u64::from_be_bytes(b))
}

impl Store {
    /// True if `dir` holds an initialized store.
    pub fn exists(dir: &Path) -> bool {
        dir.join("db").join("CURRENT").is_file()
    }

    /// Opens the store in `dir` (its RocksDB lives in `dir/db`). It must have been created.
    /// `signer` is the device's key; without it the store can be read and checked but
    /// records no ops. Every opening starts a new incarnation of the device's op log.
    pub fn open(dir: &Path, opts: &StoreOptions, signer: Option<Arc<dyn Signer>>) -> Result<Store> {
        if !Store::exists(dir) {
            return Err(StoreError::DataDir {
                path: dir.to_path_buf(),
                reason: "no pvfs store here (run `pvfs init`)".into(),
            });
        }
        let backend = RocksBackend::open(&dir.join("db"), &opts.rocks)?;
        Store::from_backend(Box::new(backend), opts, Some(dir), signer, None)
    }

    /// Creates a new store with a new namespace in `dir`, for the device of `signer`.
    pub fn create(
        dir: &Path,
        opts: &StoreOptions,
        signer: Arc<dyn Signer>,
        owner: RootOwner,
    ) -> Result<Store> {
        Store::create_in(dir, opts, signer, owner, None)
    }

    /// Creates a store in `dir` for the device of `signer` joining the namespace `namespace`
    /// (`None`: a new namespace).
    pub fn create_in(
        dir: &Path,
        opts: &StoreOptions,
        signer: Arc<dyn Signer>,
        owner: RootOwner,
        namespace: Option<[u8; 16]>,
    ) -> Result<Store> {
        if Store::exists(dir) {
            return Err(StoreError::DataDir {
                path: dir.to_path_buf(),
                reason: "a pvfs store already exists here".into(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| StoreError::DataDir {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let backend = RocksBackend::open(&dir.join("db"), &opts.rocks)?;
        Store::from_backend(
            Box::new(backend),
            opts,
            Some(dir),
            Some(signer),
            Some((owner, namespace)),
        )
    }

    /// A new store in memory in the namespace `namespace` (in-process clusters in tests).
    pub fn in_memory_in(
        signer: Arc<dyn Signer>,
        owner: RootOwner,
        namespace: [u8; 16],
    ) -> Result<Store> {
        Store::in_memory_with(&StoreOptions::default(), signer, owner, namespace)
    }

    /// A new store in memory in the namespace `namespace`, with `opts` (simulations give
    /// their own `Env`).
    pub fn in_memory_with(
        opts: &StoreOptions,
        signer: Arc<dyn Signer>,
        owner: RootOwner,
        namespace: [u8; 16],
    ) -> Result<Store> {
        Store::from_backend(
            Box::new(MemBackend::default()),
            opts,
            None,
            Some(signer),
            Some((owner, Some(namespace))),
        )
    }

    /// A new store in memory (tests, models).
    pub fn in_memory(signer: Arc<dyn Signer>, owner: RootOwner) -> Result<Store> {
        Store::from_backend(
            Box::new(MemBackend::default()),
            &StoreOptions::default(),
            None,
            Some(signer),
            Some((owner, None)),
        )
    }

    /// A copy of this in-memory store's database, opened as a new incarnation with the same
    /// key: what a device restored from a backup of its data directory is (simulations).
    /// `None` for a store on disk (copy its directory instead).
    pub fn restored_copy(&self) -> Result<Option<Store>> {
        self.reopened_copy(None)
    }

    /// What this in-memory store would be after a power cut now, reopened: its durable
    /// state and the first `keep` of its unsynced writes (`unsynced_writes`), as a new
    /// incarnation (simulations). `None` for a store on disk.
    pub fn crashed_copy(&self, keep: usize) -> Result<Option<Store>> {
        self.reopened_copy(Some(keep))
    }

    /// Writes since the last WAL sync, for `crashed_copy` (0 for a store on disk).
    pub fn unsynced_writes(&self) -> usize {
        self.inner.backend.unsynced_writes()
    }

    fn reopened_copy(&self, crash: Option<usize>) -> Result<Option<Store>> {
        let Some(copy) = self.inner.backend.copy_in_memory(crash) else {
            return Ok(None);
        };
        let opts = StoreOptions {
            env: self.inner.env.clone(),
            ..StoreOptions::default()
        };
        Store::from_backend(copy, &opts, None, self.inner.signer.clone(), None).map(Some)
    }

    fn from_backend(
        backend: Box<dyn Backend>,
        opts: &StoreOptions,
        dir: Option<&Path>,
        signer: Option<Arc<dyn Signer>>,
        init: Option<(RootOwner, Option<[u8; 16]>)>,
    ) -> Result<Store> {
        if let Some((owner, namespace)) = init {
            let signer = signer
                .as_deref()
                .ok_or_else(|| StoreError::Invalid("a new store needs its device key".into()))?;
            let (key, device) = auth::signer_key(signer)?;
            initialize(&*backend, device, &key, owner, namespace, &*opts.env)?;
        }
        let format = backend.get(Cf::Meta, key::META_FORMAT)?;
        match format {
            None => return Err(StoreError::corrupt("the database has no format record")),
            Some(f) if f != FORMAT_VERSION.to_be_bytes() => {
                let found = <[u8; 4]>::try_from(f.as_slice())
                    .map_or_else(|_| format!("{f:?}"), |b| u32::from_be_bytes(b).to_string());
                return Err(StoreError::corrupt(format!(
                    "the store has format {found}, this pvfs reads format {FORMAT_VERSION} \
                     (no conversion exists yet: move the data directory away and start afresh)"
                )));
            }
            Some(_) => {}
        }
        let device_bytes = backend
            .get(Cf::Meta, key::META_DEVICE)?
            .ok_or_else(|| StoreError::corrupt("no device id"))?;
        let device = DeviceId(
            device_bytes
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::corrupt("device id length"))?,
        );
        let ns = backend
            .get(Cf::Meta, key::META_NAMESPACE)?
            .ok_or_else(|| StoreError::corrupt("no namespace id"))?;
        let namespace: [u8; 16] = ns
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::corrupt("namespace id length"))?;
        if let Some(signer) = signer.as_deref() {
            let (_, of) = auth::signer_key(signer)?;
            if of != device {
                return Err(StoreError::Invalid(format!(
                    "the device key is device {of}'s, this store is device {device}'s"
                )));
            }
        }
        let stats = match backend.get(Cf::Meta, key::META_STATS)? {
            Some(b) => records::decode("stats", &b)?,
            None => StatsRecord::default(),
        };
        // The last opening's ops are another writer's from now on: this opening makes its
        // ops under a fresh incarnation, so that a store restored from a backup never reuses
        // an op id its peers hold for other content. (The next commit persists the heads.)
        let heads = stored_heads(&*backend, device)?;
        let heads_changed = true;
        let state = WriterState {
            device,
            namespace,
            incarnation: incarnation(&*opts.env),
            next_ino: meta_u64(&*backend, key::META_NEXT_INO)?,
            next_seq: 1,
            last_hash: GENESIS,
            hlc: Hlc(meta_u64(&*backend, key::META_HLC)?),
            stats,
            heads,
            heads_changed,
            checkpoint: std::sync::Arc::new(match backend.get(Cf::Meta, key::META_CHECKPOINT)? {
                Some(b) => records::decode("checkpoint", &b)?,
                None => Default::default(),
            }),
        };
        clean_staged(&*backend)?;
        let cache_items = (opts.chunk_cache_bytes / chunk::AVG_CHUNK as u64).max(16) as usize;
        let space = dir.map(|d| SpaceGuard {
            path: d.to_path_buf(),
            reserve: opts.reserve_bytes,
            free: AtomicU64::new(0),
            checked: Mutex::new(None),
        });
        Ok(Store {
            inner: Arc::new(Inner {
                backend,
                prefetch: std::sync::OnceLock::new(),
                reclaimable: AtomicU64::new(0),
                reclaiming: std::sync::atomic::AtomicBool::new(false),
                reclaim_lock: Mutex::new(()),
                compact_lock: Mutex::new(()),
                committed: AtomicU64::new(0),
                synced: Mutex::new(0),
                writer: Mutex::new(state),
                members: Default::default(),
                env: opts.env.clone(),
                device,
                namespace,
                signer,
                durable_seq: AtomicU64::new(0),
                cache: quick_cache::sync::Cache::with_weighter(
                    cache_items,
                    opts.chunk_cache_bytes,
                    ChunkWeight,
                ),
                space,
                on_commit: Mutex::new(None),
                landed: Mutex::new(Landed::default()),
                online_only: Default::default(),
            }),
        })
    }

    /// This device's id.
    pub fn device(&self) -> DeviceId {
        self.inner.device
    }

    /// The writer of the ops this store records now: the device and this opening's
    /// incarnation.
    pub fn writer(&self) -> Writer {
        self.inner.writer.lock().writer()
    }

    /// The namespace id.
    pub fn namespace(&self) -> [u8; 16] {
        self.inner.namespace
    }

    /// The member devices of the namespace (removed ones included, marked).
    pub fn members(&self) -> Result<Vec<(DeviceId, MemberRecord)>> {
        self.device_records(key::META_MEMBER, "member")
    }

    /// The records kept per device in `Cf::Meta` under `prefix` + device id.
    pub(crate) fn device_records<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &[u8],
        what: &str,
    ) -> Result<Vec<(DeviceId, T)>> {
        let mut out = Vec::new();
        for item in scan_prefix(&*self.inner.backend, Cf::Meta, prefix) {
            let (k, v) = item?;
            let id: [u8; 16] = k[prefix.len()..]
                .try_into()
                .map_err(|_| StoreError::corrupt(format!("{what} key length")))?;
            out.push((DeviceId(id), records::decode(what, &v)?));
        }
        Ok(out)
    }

    /// True if `device` is a current member (added and never removed). Answered from
    /// memory once the member list has been read (a commit that changes it drops the copy),
    /// so that the network may ask from an async task or a TLS verifier.
    pub fn is_member(&self, device: &DeviceId) -> Result<bool> {
        let mut current = self.inner.members.write();
        let set = match &*current {
            Some(set) => set,
            None => current.insert(
                self.members()?
                    .into_iter()
                    .filter(|(_, m)| m.added && !m.removed)
                    .map(|(d, _)| d)
                    .collect(),
            ),
        };
        Ok(set.contains(device))
    }

    /// Sets the function called after every commit that recorded ops.
    pub fn set_on_commit(&self, f: Arc<dyn Fn() + Send + Sync>) {
        *self.inner.on_commit.lock() = Some(f);
    }

    /// The last checkpoint of the logs (cheap: no copy of the writer state).
    pub(crate) fn checkpoint(&self) -> Arc<records::CheckpointRecord> {
        self.inner.writer.lock().checkpoint.clone()
    }

    /// Held while the logs are compacted.
    pub(crate) fn compact_lock(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.inner.compact_lock.lock()
    }

    /// A copy of the writer's counters and clock.
    pub(crate) fn writer_state(&self) -> WriterState {
        self.inner.writer.lock().clone()
    }

    /// A read-only transaction view of the current state.
    pub(crate) fn reader(&self) -> Txn<'_> {
        let state = WriterState {
            device: self.inner.device,
            namespace: self.inner.namespace,
            incarnation: 0,
            next_ino: 0,
            next_seq: 0,
            last_hash: GENESIS,
            hlc: Hlc::default(),
            stats: StatsRecord::default(),
            heads: Default::default(),
            heads_changed: false,
            checkpoint: Default::default(),
        };
        Txn::new(&*self.inner.backend, state, &*self.inner.env, None)
    }

    /// The node with this ino.
    pub fn node(&self, ino: Ino) -> Result<Option<NodeRecord>> {
        self.reader().node(ino)
    }

    /// The ino of a global node id.
    pub fn ino_of(&self, id: NodeId) -> Result<Option<Ino>> {
        match self.inner.backend.get(Cf::Ids, &key::node_id(id))? {
            Some(v) => Ok(Some(key::ino_of(&v)?)),
            None => Ok(None),
        }
    }

    /// The entry `name` in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Option<DirentRecord>> {
        self.reader().dirent(parent, name)
    }

    /// All entries of a directory, in name order.
    pub fn list_dir(&self, ino: Ino) -> Result<Vec<(Vec<u8>, DirentRecord)>> {
        let mut out = Vec::new();
        for item in scan_prefix(&*self.inner.backend, Cf::Dirents, &key::ino(ino)) {
            let (k, v) = item?;
            out.push((k[8..].to_vec(), records::decode("dirent", &v)?));
        }
        Ok(out)
    }

    /// Extents of `ino` overlapping `[start, end)`.
    pub fn extents(&self, ino: Ino, start: u64, end: u64) -> Result<Vec<(u64, ExtentRecord)>> {
        self.reader().extents(ino, start, end)
    }

    /// The value of an extended attribute.
    pub fn xattr(&self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.backend.get(Cf::Xattrs, &key::xattr(ino, name))
    }

    /// Names of the extended attributes of a node.
    pub fn xattr_names(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for item in scan_prefix(&*self.inner.backend, Cf::Xattrs, &key::ino(ino)) {
            out.push(item?.0[8..].to_vec());
        }
        Ok(out)
    }

    /// Inodes of nodes without names that were still open when they lost their last name.
    pub fn orphans(&self) -> Result<Vec<Ino>> {
        let mut out = Vec::new();
        for item in self.inner.backend.scan_from(Cf::Orphans, &[]) {
            out.push(key::ino_of(&item?.0)?);
        }
        Ok(out)
    }

    /// The plaintext of a chunk of length `len`, checked against its BLAKE3 id.
    pub fn chunk(&self, id: &ChunkId, len: u32) -> Result<Bytes> {
        if let Some(b) = self.inner.cache.get(id) {
            return Ok(b);
        }
        if let Some((_, plain)) = self.inner.landed.lock().chunks.get(id) {
            return Ok(plain.clone());
        }
        // `persist_landed` may have moved it between the two looks (it fills the cache
        // before it empties `landed`).
        if let Some(b) = self.inner.cache.get(id) {
            return Ok(b);
        }
        let stored = self
            .inner
            .backend
            .get_chunk(&id.0)?
            .ok_or(StoreError::ChunkAbsent(*id))?;
        let plain = chunk::decode_verified(id, stored, len as usize)?;
        self.inner.cache.insert(*id, plain.clone());
        Ok(plain)
    }

    /// Loads chunks into the cache in the background (read-ahead). Chunks already cached
    /// or being loaded are skipped; when the queue is full the rest is dropped.
    pub fn prefetch(&self, chunks: impl IntoIterator<Item = (ChunkId, u32)>) {
        let p = self
            .inner
            .prefetch
            .get_or_init(|| Prefetcher::start(Arc::downgrade(&self.inner)));
        for (id, len) in chunks {
            if self.inner.cache.get(&id).is_some() || !p.inflight.lock().insert(id) {
                continue;
            }
            if p.queue.try_send((id, len)).is_err() {
                p.inflight.lock().remove(&id);
                break;
            }
        }
    }

    /// Takes chunks fetched from other devices, each as `(id, stored encoding, plaintext)`
    /// where the plaintext was decoded from the encoding and checked against the id
    /// (`decode_fetched`). They are readable (and served to peers) at once; `persist_landed`
    /// writes them to disk. Returns the encoded bytes landed and not yet persisted.
    pub fn land_fetched(&self, chunks: Vec<(ChunkId, Bytes, Bytes)>) -> u64 {
        let mut landed = self.inner.landed.lock();
        for (id, encoded, plain) in chunks {
            let n = encoded.len() as u64;
            if landed.chunks.insert(id, (encoded, plain)).is_none() {
                landed.bytes += n;
            }
        }
        landed.bytes
    }

    /// Writes every landed chunk to disk and records it as held; returns how many were
    /// written. Chunks this device no longer references, or already holds, are dropped. A
    /// few go through the WAL with the commit; many are written once (no WAL, as staged
    /// writes are) and made durable before the one commit that records them. On failure
    /// (a full disk) the landed chunks are dropped: they can be fetched again.
    pub fn persist_landed(&self) -> Result<usize> {
        let chunks: Vec<(ChunkId, Bytes, Bytes)> = self
            .inner
            .landed
            .lock()
            .chunks
            .iter()
            .map(|(id, (e, p))| (*id, e.clone(), p.clone()))
            .collect();
        if chunks.is_empty() {
            return Ok(0);
        }
        let res = if self.is_online_only() {
            // Kept in memory only, where the cache holds what was read lately.
            for (id, _, plain) in &chunks {
                self.inner.cache.insert(*id, plain.clone());
            }
            Ok(0)
        } else {
            self.put_fetched(&chunks)
        };
        let mut landed = self.inner.landed.lock();
        for (id, ..) in &chunks {
            if let Some((e, _)) = landed.chunks.remove(id) {
                landed.bytes -= e.len() as u64;
            }
        }
        res
    }

    fn put_fetched(&self, chunks: &[(ChunkId, Bytes, Bytes)]) -> Result<usize> {
        let reader = self.reader();
        let mut wanted = Vec::new();
        for c in chunks {
            if reader.refs(&c.0)?.is_some_and(|r| r.stored == 0) {
                wanted.push(c);
            }
        }
        drop(reader);
        if wanted.is_empty() {
            return Ok(0);
        }
        let bytes: u64 = wanted.iter().map(|(_, e, _)| e.len() as u64).sum();
        self.check_space(bytes)?;
        // A few chunks (a reader waits for each) go through the WAL with the commit: a flush
        // would cost milliseconds. Many go to disk once, and are flushed before the commit.
        let small = bytes < FETCH_VIA_WAL;
        if !small {
            let data = wanted
                .iter()
                .map(|(id, e, _)| (id.0.to_vec(), e.clone()))
                .collect();
            self.inner.backend.write_chunks(data)?;
            self.inner.backend.wait_chunks_durable()?;
        }
        self.commit(false, |tx| {
            for (id, encoded, plain) in &wanted {
                let data = small.then(|| encoded.to_vec());
                tx.mark_fetched(id, plain.len(), encoded.len(), data)?;
            }
            Ok(())
        })?;
        if let Some(space) = &self.inner.space {
            space.consumed(bytes);
        }
        for (id, _, plain) in &wanted {
            self.inner.cache.insert(*id, plain.clone());
        }
        Ok(wanted.len())
    }

    /// The stored encoding of a chunk held here and its plaintext length (to serve a peer,
    /// which decodes and checks it). Chunks another device pushed here are served before
    /// its op referencing them has arrived.
    pub fn stored_chunk(&self, id: &ChunkId) -> Result<Option<(Bytes, u32)>> {
        if let Some((e, p)) = self.inner.landed.lock().chunks.get(id) {
            return Ok(Some((e.clone(), p.len() as u32)));
        }
        let Some(held) = self.ref_record(id)?.filter(|r| r.stored > 0) else {
            return self.pushed_chunk(id);
        };
        Ok(self
            .inner
            .backend
            .get_chunk(&id.0)?
            .map(|data| (Bytes::from(data), held.len)))
    }

    /// A chunk another device pushed here and no op references yet: (encoding, length).
    fn pushed_chunk(&self, id: &ChunkId) -> Result<Option<(Bytes, u32)>> {
        let end = key::pending_end(id);
        let markers = self
            .inner
            .backend
            .scan(Cf::Pending, &id.0, Some(&end), false);
        for item in markers {
            let (k, v) = item?;
            if is_pushed_marker(&k) {
                let (_, _, len) = pushed_fields(&v)?;
                return Ok(self
                    .inner
                    .backend
                    .get_chunk(&id.0)?
                    .map(|data| (Bytes::from(data), len)));
            }
        }
        Ok(None)
    }

    /// Keeps chunks that device `from` pushed here for a commit of its own (an online-only
    /// device stores its new content elsewhere): each is `(id, stored encoding, plaintext
    /// length)`, already checked against its id. Durable when this returns. A pending marker
    /// per chunk (token `pushed_token(from)`) keeps it alive and servable until an op of
    /// `from` references it, whatever other ops do meanwhile; markers no op claimed within
    /// `PUSHED_KEEP` go when the store is opened.
    pub fn keep_pushed(&self, from: DeviceId, chunks: Vec<(ChunkId, Bytes, u32)>) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let token = pushed_token(from);
        // The data is written even where it is held already: a delete could drop it before
        // the marker is down.
        let mut markers = Vec::with_capacity(chunks.len());
        let mut data = Vec::with_capacity(chunks.len());
        for (id, e, len) in &chunks {
            markers.push((
                Cf::Pending,
                key::pending(id, token).to_vec(),
                Some(pushed_marker(e.len() as u32, *len)),
            ));
            data.push((id.0.to_vec(), e.clone()));
        }
        let bytes: u64 = data.iter().map(|(_, e)| e.len() as u64).sum();
        self.check_space(bytes)?;
        if bytes < FETCH_VIA_WAL {
            // Few bytes: data and markers through the WAL, one sync.
            let data = data
                .into_iter()
                .map(|(k, e)| (Cf::Chunks, k, Some(e.to_vec())));
            markers.extend(data);
            self.inner.backend.write(markers, true)?;
        } else {
            // Markers first (a crash then leaves markers the next open cleans), then the
            // data once, flushed.
            self.inner.backend.write(markers, true)?;
            self.inner.backend.write_chunks(data)?;
            self.inner.backend.wait_chunks_durable()?;
        }
        if let Some(space) = &self.inner.space {
            space.consumed(bytes);
        }
        // Chunks referenced here as absent (another device's op came first) are held from now
        // on.
        self.commit(true, |tx| {
            for (id, e, len) in &chunks {
                tx.hold_pushed(id, e.len() as u32, *len)?;
            }
            Ok(())
        })
    }

    /// For an online-only device: up to about `max_bytes` of chunks stored here that may
    /// go to another device and leave this one (all but those of files open without a
    /// name), as (id, stored encoding, plaintext length).
    pub fn evictable(&self, max_bytes: u64) -> Result<Vec<(ChunkId, Bytes, u32)>> {
        let keep = self.reader().orphan_chunks()?;
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let snap = self.snapshot();
        for item in snap.scan_from(Cf::Refs, &[]) {
            let (k, v) = item?;
            let r: RefRecord = records::decode("chunk ref", &v)?;
            let Ok(id) = <[u8; 32]>::try_from(k.as_slice()).map(ChunkId) else {
                continue;
            };
            if r.stored == 0 || keep.contains(&id) {
                continue;
            }
            let Some(data) = self.inner.backend.get_chunk(&id.0)? else {
                continue;
            };
            bytes += data.len() as u64;
            out.push((id, Bytes::from(data), r.len));
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Drops the data of `chunks` from this device's disk, once another device holds them
    /// (`keep_pushed` there): they stay referenced, as absent. Chunks of files open without
    /// a name stay. Returns the stored bytes freed.
    pub fn evict(&self, chunks: &[ChunkId]) -> Result<u64> {
        self.commit(false, |tx| {
            let keep = tx.orphan_chunks()?;
            let mut freed = 0;
            for id in chunks.iter().filter(|id| !keep.contains(id)) {
                freed += tx.evict(id)?;
            }
            Ok(freed)
        })
    }

    /// Keeps no file content on disk: fetched chunks stay in memory (`persist_landed`
    /// only caches them), and the filesystem pushes new content to other devices
    /// (`keep_pushed` there) before committing it as absent.
    pub fn set_online_only(&self, on: bool) {
        self.inner.online_only.store(on, Ordering::Relaxed);
    }

    /// See `set_online_only`.
    pub fn is_online_only(&self) -> bool {
        self.inner.online_only.load(Ordering::Relaxed)
    }

    /// Calls `f` with every chunk stored (or landed) on this device, and returns how many
    /// calls there were: what a device announces it holds.
    pub fn held_chunks(&self, mut f: impl FnMut(&ChunkId)) -> Result<u64> {
        // Landed first: a chunk persisted between the two looks is seen twice, never missed.
        let landed: Vec<ChunkId> = self.inner.landed.lock().chunks.keys().copied().collect();
        landed.iter().for_each(&mut f);
        let mut n = landed.len() as u64;
        let snap = self.snapshot();
        for item in snap.scan_from(Cf::Refs, &[]) {
            let (k, v) = item?;
            let id: [u8; 32] = k
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::corrupt("refs key of the wrong length"))?;
            if records::decode::<RefRecord>("chunk ref", &v)?.stored > 0 {
                f(&ChunkId(id));
                n += 1;
            }
        }
        Ok(n)
    }

    /// The reference record of a chunk, if this device references it.
    fn ref_record(&self, id: &ChunkId) -> Result<Option<RefRecord>> {
        self.inner
            .backend
            .get(Cf::Refs, &id.0)?
            .map(|v| records::decode("chunk ref", &v))
            .transpose()
    }

    /// The plaintext length of a chunk this device references, held or not.
    pub fn chunk_len(&self, id: &ChunkId) -> Result<Option<u32>> {
        Ok(self.ref_record(id)?.map(|r| r.len))
    }

    /// True if the chunk is on this device's disk (not only landed or cached).
    pub fn is_stored(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.ref_record(id)?.is_some_and(|r| r.stored > 0))
    }

    /// True if `chunk` can read the chunk without another device: stored, landed, or in
    /// the cache (where an online-only device keeps what it fetched).
    pub fn is_readable(&self, id: &ChunkId) -> Result<bool> {
        if self.inner.cache.peek(id).is_some() {
            return Ok(true);
        }
        self.has_chunk(id)
    }

    /// Stores absent chunks this device references and can read (fetched, landed or
    /// cached) on its disk, even on an online-only device: an open file that loses its last
    /// name here must stay readable after the devices holding its content delete it.
    pub fn keep_here(&self, chunks: &[(ChunkId, u32)]) -> Result<()> {
        let mut out = Vec::with_capacity(chunks.len());
        for &(id, len) in chunks {
            let landed = self.inner.landed.lock().chunks.get(&id).cloned();
            let (encoded, plain) = match landed {
                Some(x) => x,
                None => {
                    let plain = self.chunk(&id, len)?;
                    (chunk::encode(&plain), plain)
                }
            };
            out.push((id, encoded, plain));
        }
        self.put_fetched(&out).map(|_| ())
    }

    /// True if the chunk is stored on this device (or landed, see `land_fetched`).
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        if self.inner.landed.lock().chunks.contains_key(id) {
            return Ok(true);
        }
        self.is_stored(id)
    }

    /// Hashes a chunk and, if it is not stored yet, encodes it, so that the commit that
    /// references it does little work under the writer lock.
    pub fn prepare(&self, plain: Bytes) -> Result<PreparedChunk> {
        let mut c = PreparedChunk::new(plain, false);
        if !self.has_chunk(&c.id)? {
            c.encoded = Some(chunk::encode(&c.plain));
        }
        Ok(c)
    }

    /// `prepare` for many chunks, hashed and encoded on several threads when there is enough
    /// data to be worth it. Results are in the order of `plains`.
    pub fn prepare_many(&self, plains: Vec<Bytes>) -> Result<Vec<PreparedChunk>> {
        let total: usize = plains.iter().map(Bytes::len).sum();
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(PREPARE_THREADS)
            .min(total / PREPARE_MIN_BYTES_PER_THREAD)
            .max(1);
        if threads == 1 {
            return plains.into_iter().map(|p| self.prepare(p)).collect();
        }
        let per = plains.len().div_ceil(threads);
        let mut parts: Vec<Vec<Bytes>> = Vec::with_capacity(threads);
        let mut it = plains.into_iter();
        loop {
            let part: Vec<Bytes> = it.by_ref().take(per).collect();
            if part.is_empty() {
                break;
            }
            parts.push(part);
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|part| {
                    scope.spawn(move || {
                        part.into_iter()
                            .map(|p| self.prepare(p))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            let mut out = Vec::new();
            for h in handles {
                match h.join() {
                    Ok(part) => out.extend(part?),
                    Err(_) => {
                        return Err(StoreError::Invalid(
                            "a chunk hashing thread panicked".into(),
                        ))
                    }
                }
            }
            Ok(out)
        })
    }

    /// Stores the data of new chunks durably ahead of the commit that will reference them,
    /// so that large writes reach the disk once (in blob files) instead of twice (WAL, then
    /// blob files). Each staged chunk gets a pending marker (through the WAL, synced) that
    /// keeps its data alive until a commit references it or `unstage` drops it; markers left
    /// by a crash are cleaned when the store is opened.
    ///
    /// Staging goes part by part (`stage_part`), so that storing one part overlaps preparing
    /// the next; `stage_finish` waits until all of it is durable.
    pub fn stage<'a>(&self, chunks: impl IntoIterator<Item = &'a mut PreparedChunk>) -> Result<()> {
        let mut staging = Staging::new();
        self.stage_part(&mut staging, chunks)?;
        self.stage_finish(staging)
    }

    /// Stages one part of a commit's new chunks: their markers durably, their data on its
    /// way to the disk. Chunks already staged or not new are skipped.
    pub fn stage_part<'a>(
        &self,
        staging: &mut Staging,
        chunks: impl IntoIterator<Item = &'a mut PreparedChunk>,
    ) -> Result<()> {
        let mut chunks: Vec<&mut PreparedChunk> = chunks.into_iter().collect();
        let token = staging.token;
        let mut markers = Vec::new();
        let mut data = Vec::new();
        for c in chunks.iter().filter(|c| c.staged.is_none() && !c.elsewhere) {
            if let Some(e) = &c.encoded {
                markers.push((
                    Cf::Pending,
                    key::pending(&c.id, token).to_vec(),
                    Some(Vec::new()),
                ));
                data.push((c.id.0.to_vec(), e.clone()));
            }
        }
        if data.is_empty() {
            return Ok(());
        }
        let bytes: u64 = data.iter().map(|(_, v)| v.len() as u64).sum();
        self.check_space(bytes)?;
        self.inner.backend.write(markers, true)?;
        // From here on the markers exist: mark the chunks even if the data write fails, so
        // that `unstage` drops the markers again.
        for c in chunks
            .iter_mut()
            .filter(|c| c.staged.is_none() && !c.elsewhere && c.encoded.is_some())
        {
            c.staged = Some(token);
        }
        self.inner.backend.write_chunks(data)?;
        staging.parts += 1;
        if let Some(space) = &self.inner.space {
            space.consumed(bytes);
        }
        Ok(())
    }

    /// Returns once every part staged through `staging` is durable; only then may a commit
    /// reference its chunks.
    pub fn stage_finish(&self, staging: Staging) -> Result<()> {
        if staging.parts == 0 {
            return Ok(());
        }
        self.inner.backend.wait_chunks_durable()
    }

    /// Drops the pending markers of staged chunks whose commit failed, and their data if
    /// nothing references it.
    pub fn unstage<'a>(&self, chunks: impl IntoIterator<Item = &'a PreparedChunk>) -> Result<()> {
        let chunks: Vec<&PreparedChunk> = chunks.into_iter().collect();
        self.commit(false, |tx| {
            for c in &chunks {
                if let Some(token) = c.staged {
                    tx.delete(Cf::Pending, &key::pending(&c.id, token));
                    if tx.refs(&c.id)?.is_none() && !tx.is_staged(&c.id)? {
                        tx.delete(Cf::Chunks, &c.id.0);
                    }
                }
            }
            Ok(())
        })
    }

    /// Running totals.
    pub fn stats(&self) -> StatsRecord {
        self.inner.writer.lock().stats
    }

    /// Ops of `writer` from sequence number `from` on, at most `limit`.
    pub fn ops(&self, writer: Writer, from: u64, limit: usize) -> Result<Vec<OpRecord>> {
        let mut out = Vec::new();
        let prefix = key::writer(writer);
        let start = key::op_id(crate::types::OpId {
            device: writer.device,
            incarnation: writer.incarnation,
            seq: from,
        });
        let end = kv::prefix_end(&prefix);
        let ops = self
            .inner
            .backend
            .scan(Cf::Oplog, &start, end.as_deref(), false);
        for item in ops {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if out.len() >= limit {
                break;
            }
            out.push(records::decode("op", &v)?);
        }
        Ok(out)
    }

    /// Bytes the op log and the move log take (`pvfs-admin stats`): what compaction of the
    /// logs is to bound.
    pub fn log_bytes(&self) -> Result<LogBytes> {
        let mut kept = 0u64;
        let view = self.snapshot();
        for prefix in [
            key::META_COMPACTED,
            key::META_MEMBER_OP,
            key::META_CHECKPOINT,
        ] {
            for item in kv::scan_prefix(&*view, Cf::Meta, prefix) {
                let (k, v) = item?;
                kept += (k.len() + v.len()) as u64;
            }
        }
        Ok(LogBytes {
            op_log: self.inner.backend.cf_bytes(Cf::Oplog)?,
            move_log: self.inner.backend.cf_bytes(Cf::Moves)?,
            kept,
        })
    }

    /// Fails with `NoSpace` if writing `extra` more bytes would eat into the reserve (after
    /// trying to get back the space of deleted data).
    pub fn check_space(&self, extra: u64) -> Result<()> {
        let Some(space) = &self.inner.space else {
            return Ok(());
        };
        let enough = |free: u64| free >= space.reserve.saturating_add(extra);
        if enough(space.free_bytes()?) {
            return Ok(());
        }
        // A background reclaim may be under way (it has taken the count already): wait for
        // it to finish rather than fail while it frees the space.
        drop(self.inner.reclaim_lock.lock());
        if self.inner.reclaimable.load(Ordering::Relaxed) > 0 {
            self.reclaim()?;
        }
        *space.checked.lock() = None;
        if enough(space.free_bytes()?) {
            return Ok(());
        }
        Err(StoreError::NoSpace)
    }

    /// Gives the disk space of deleted chunks back to the filesystem (see `Backend::reclaim`).
    pub fn reclaim(&self) -> Result<()> {
        let _one = self.inner.reclaim_lock.lock();
        let freed = self.inner.reclaimable.swap(0, Ordering::Relaxed);
        let started = Instant::now();
        let res = self.inner.backend.reclaim();
        match &res {
            Ok(()) => tracing::info!(
                freed,
                ms = started.elapsed().as_millis() as u64,
                "reclaimed the space of deleted chunks"
            ),
            Err(e) => {
                self.inner.reclaimable.fetch_add(freed, Ordering::Relaxed);
                tracing::warn!("reclaiming space failed: {e:#}");
            }
        }
        res
    }

    fn maybe_reclaim_in_background(&self) {
        if self.inner.reclaimable.load(Ordering::Relaxed) < RECLAIM_AT
            || self.inner.reclaiming.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let store = self.clone();
        let spawned = std::thread::Builder::new()
            .name("pvfs-reclaim".into())
            .spawn(move || {
                let _ = store.reclaim();
                store.inner.reclaiming.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.inner.reclaiming.store(false, Ordering::Release);
        }
    }

    /// Capacity of the data directory's disk (a large fake one for in-memory stores).
    pub fn space(&self) -> Result<SpaceInfo> {
        match &self.inner.space {
            Some(s) => s.statvfs(),
            None => Ok(SpaceInfo {
                block_size: 4096,
                total: 1 << 40,
                free: 1 << 40,
                available: 1 << 40,
            }),
        }
    }

    /// Runs `f` as one transaction and commits its writes and ops in one atomic batch.
    /// With `sync`, the batch is durable when this returns. Nothing is written if `f` fails.
    pub fn commit<T>(&self, sync: bool, f: impl FnOnce(&mut Txn<'_>) -> Result<T>) -> Result<T> {
        let mut state = self.inner.writer.lock();
        let mut tx = Txn::new(
            &*self.inner.backend,
            state.clone(),
            &*self.inner.env,
            self.inner.signer.as_deref(),
        );
        let out = f(&mut tx)?;
        let (new_bytes, freed_bytes) = (tx.new_bytes, tx.freed_bytes);
        if new_bytes > 0 {
            self.check_space(new_bytes)?;
        }
        let (batch, new_state, ops) = tx.finish()?;
        let members_changed = batch
            .iter()
            .any(|(cf, k, _)| *cf == Cf::Meta && k.starts_with(key::META_MEMBER));
        self.inner.backend.write(batch, sync)?;
        if members_changed {
            *self.inner.members.write() = None;
        }
        let last_seq = new_state.next_seq - 1;
        *state = new_state;
        self.inner.committed.fetch_add(1, Ordering::Release);
        drop(state);
        if sync {
            self.inner.durable_seq.fetch_max(last_seq, Ordering::AcqRel);
        }
        if ops > 0 {
            let hook = self.inner.on_commit.lock().clone();
            if let Some(hook) = hook {
                hook();
            }
        }
        if let Some(space) = &self.inner.space {
            space.consumed(new_bytes);
        }
        if freed_bytes > 0 {
            self.inner
                .reclaimable
                .fetch_add(freed_bytes, Ordering::Relaxed);
            self.maybe_reclaim_in_background();
        }
        Ok(out)
    }

    /// Makes every commit so far durable (syncs the write-ahead log). Callers that arrive
    /// while a sync runs wait for it and then return at once if it covered their commits.
    pub fn sync(&self) -> Result<()> {
        let target = self.inner.committed.load(Ordering::Acquire);
        let mut synced = self.inner.synced.lock();
        if *synced >= target {
            return Ok(());
        }
        // Every op up to `last_seq` is in the WAL already (commits write under the writer
        // lock), so the sync below makes them durable.
        let last_seq = self.inner.writer.lock().next_seq - 1;
        let covering = self.inner.committed.load(Ordering::Acquire);
        self.inner.backend.sync()?;
        *synced = covering;
        self.inner.durable_seq.fetch_max(last_seq, Ordering::AcqRel);
        Ok(())
    }

    /// The highest sequence number of this incarnation's ops that is durable.
    pub(crate) fn durable_seq(&self) -> u64 {
        self.inner.durable_seq.load(Ordering::Acquire)
    }

    /// A consistent point-in-time view for whole-store scans (fsck).
    pub(crate) fn snapshot(&self) -> Box<dyn ReadView + '_> {
        self.inner.backend.snapshot()
    }
}

/// How long a chunk another device pushed here is kept without an op referencing it.
const PUSHED_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// Removes pending markers (and unreferenced staged data) left by a crash between staging
/// chunks and the commit that would have referenced them, and markers of pushed chunks no
/// op claimed within `PUSHED_KEEP`.
fn clean_staged(backend: &dyn Backend) -> Result<()> {
    let now = unix_secs();
    let mut batch = Vec::new();
    for item in backend.scan_from(Cf::Pending, &[]) {
        let (k, v) = item?;
        let id = &k[..32.min(k.len())];
        let pushed = is_pushed_marker(&k);
        // A pushed chunk is kept for its op unless it is too old, or a crash cut its data
        // (the pusher was never told it was kept).
        if pushed
            && pushed_fields(&v).is_ok_and(|(t, ..)| t + PUSHED_KEEP.as_secs() > now)
            && backend.get_chunk(id)?.is_some()
        {
            continue;
        }
        if backend.get(Cf::Refs, id)?.is_none() {
            batch.push((Cf::Chunks, id.to_vec(), None));
        }
        batch.push((Cf::Pending, k, None));
    }
    if !batch.is_empty() {
        tracing::info!(
            entries = batch.len(),
            "cleaned chunks staged by an interrupted commit"
        );
        backend.write(batch, true)?;
    }
    Ok(())
}

/// Every writer whose ops this store holds, with its last op (sequence number and hash):
/// `META_HEADS`, and the ops this device made since it was last opened (its counters).
pub(crate) fn stored_heads(
    view: &dyn ReadView,
    device: DeviceId,
) -> Result<std::collections::BTreeMap<Writer, (u64, auth::OpHash)>> {
    let mut heads: std::collections::BTreeMap<Writer, (u64, auth::OpHash)> =
        match view.get(Cf::Meta, key::META_HEADS)? {
            Some(b) => records::decode("heads", &b)?,
            None => Default::default(),
        };
    let last_seq = meta_u64(view, key::META_NEXT_SEQ)?.saturating_sub(1);
    if last_seq > 0 {
        let incarnation = meta_u64(view, key::META_INCARNATION)?;
        let hash: auth::OpHash = view
            .get(Cf::Meta, key::META_LAST_HASH)?
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| StoreError::corrupt("the last op's hash is missing"))?;
        heads.insert(
            Writer {
                device,
                incarnation,
            },
            (last_seq, hash),
        );
    }
    Ok(heads)
}

/// A fresh incarnation number for this opening of a store.
fn incarnation(env: &dyn Env) -> u64 {
    let b = env.unique();
    u64::from_le_bytes(b[..8].try_into().expect("8 of 16 bytes"))
}

fn initialize(
    backend: &dyn Backend,
    device: DeviceId,
    key: &[u8; auth::KEY_LEN],
    owner: RootOwner,
    namespace: Option<[u8; 16]>,
    env: &dyn Env,
) -> Result<()> {
    if backend.get(Cf::Meta, key::META_FORMAT)?.is_some() {
        return Err(StoreError::corrupt("store is already initialized"));
    }
    let now = env.now();
    let root = NodeRecord {
        id: NodeId::ROOT,
        kind: FileKind::Dir,
        perm: 0o755,
        uid: owner.uid,
        gid: owner.gid,
        rdev: 0,
        nlink: 2,
        size: 0,
        atime: now,
        mtime: now,
        ctime: now,
        btime: now,
        parent: ROOT_INO,
        version: None,
        stamps: Default::default(),
        target: None,
    };
    let stats = StatsRecord {
        nodes: 1,
        dirs: 1,
        ..StatsRecord::default()
    };
    let namespace: [u8; 16] = namespace.unwrap_or_else(|| env.unique());
    let batch = vec![
        (
            Cf::Meta,
            key::META_FORMAT.to_vec(),
            Some(FORMAT_VERSION.to_be_bytes().to_vec()),
        ),
        (Cf::Meta, key::META_DEVICE.to_vec(), Some(device.0.to_vec())),
        (Cf::Meta, key::device_key(&device), Some(key.to_vec())),
        (
            Cf::Meta,
            key::META_NAMESPACE.to_vec(),
            Some(namespace.to_vec()),
        ),
        (
            Cf::Meta,
            key::META_NEXT_INO.to_vec(),
            Some((ROOT_INO + 1).to_be_bytes().to_vec()),
        ),
        (
            Cf::Meta,
            key::META_NEXT_SEQ.to_vec(),
            Some(1u64.to_be_bytes().to_vec()),
        ),
        (
            Cf::Meta,
            key::META_HLC.to_vec(),
            Some(0u64.to_be_bytes().to_vec()),
        ),
        (
            Cf::Meta,
            key::META_STATS.to_vec(),
            Some(records::encode(&stats)),
        ),
        (
            Cf::Nodes,
            key::ino(ROOT_INO).to_vec(),
            Some(records::encode(&root)),
        ),
        (
            Cf::Ids,
            key::node_id(NodeId::ROOT).to_vec(),
            Some(ROOT_INO.to_be_bytes().to_vec()),
        ),
    ];
    backend.write(batch, true)
}
