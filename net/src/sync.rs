//! Sessions between member devices: namespace sync and chunk fetch.
//!
//! Owns: the per-connection session (a `Hello` each way on the first stream, then the ops the
//! other lacks by version vector, then live push of new ops and of what this device holds),
//! fetching absent chunks (one transfer per chunk however many readers wait; announced
//! holders first, then every connected peer; a timeout), landing fetched chunks in the store,
//! dialling addresses with backoff, and the peer table that `pvfs-admin peers` shows. The
//! chunk streams themselves are `chunks`.
//! Must not: call the store on an async worker where it may touch the disk (those calls go
//! to the blocking pool; landing a fetched chunk is an in-memory insert), or trust a peer:
//! ops are validated by the store, chunks by their BLAKE3 id, announcements are only hints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bytes::Bytes;
use pvfs_store::{Applied, ChunkId, ChunkSource, DeviceId, Ino, Store, StoreError, VersionVector};
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::chunks::{self, Requester, Served};
use crate::error::{NetError, Result};
use crate::holdings::Holdings;
use crate::keep;
use crate::tls::{DeviceCert, Members};
use crate::transport::{Endpoint, Peer};
use crate::wire::{self, Hello, Message, PROTOCOL_VERSION};

/// Ops per `Ops` message at most (the frame limit may cut a batch shorter).
const BATCH_OPS: usize = 512;
/// Encoded bytes per `Ops` message, roughly.
const BATCH_BYTES: usize = 1 << 20;
/// How often devices heard of but not connected are dialled again.
const REDIAL: Duration = Duration::from_secs(2);
/// The least time a holder has to answer a chunk request before the next holder is asked
/// too (`Shared::hedge_after`).
const MIN_HEDGE: Duration = Duration::from_millis(250);
/// Connections one device may hold to this one at once (two: both dialled at once); a new
/// one replaces the oldest.
pub const MAX_CONNECTIONS_PER_DEVICE: usize = 2;
/// Longest wait between two attempts to reach a peer.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often an online-only device looks for content still on its disk to hand off.
const HAND_OFF_EVERY: Duration = Duration::from_secs(2);
/// Most stored bytes an online-only device hands off in one round.
const HAND_OFF_BYTES: u64 = 64 << 20;

/// Settings of the network layer.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// UDP address to listen on (port 0: any).
    pub listen: SocketAddr,
    /// A read of content that no reachable device delivers fails after this long.
    pub fetch_timeout: Duration,
    /// Where the last known address of each device is kept (redialled at start).
    pub address_book: Option<std::path::PathBuf>,
}

/// What the network tells the rest of the daemon.
pub struct Hooks {
    /// Ops from peers were applied: the kernel's caches must drop these names and inodes.
    pub applied: Box<dyn Fn(&Applied) + Send + Sync>,
    /// Whether a local inode is open (an open file losing its last name stays until closed).
    pub is_open: Arc<dyn Fn(Ino) -> bool + Send + Sync>,
}

/// The members of the namespace, as the store knows them.
#[derive(Debug, Clone)]
pub struct StoreMembers(pub Store);

impl Members for StoreMembers {
    fn is_member(&self, device: &DeviceId) -> bool {
        match self.0.is_member(device) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("reading the member list: {e}");
                false
            }
        }
    }
}

/// One row of `pvfs-admin peers`.
#[derive(Clone, Debug, Serialize)]
pub struct PeerInfo {
    /// The device.
    pub device: String,
    /// Its address.
    pub addr: SocketAddr,
    /// Round-trip time, milliseconds.
    pub rtt_ms: f64,
    /// Chunk bytes fetched from it.
    pub fetched_bytes: u64,
    /// Measured fetch throughput, MB/s (0 before the first fetch).
    pub throughput_mbs: f64,
    /// Seconds since the connection was made.
    pub connected_secs: u64,
    /// UDP bytes sent to it on this connection.
    pub bytes_sent: u64,
    /// UDP bytes received from it on this connection.
    pub bytes_received: u64,
    /// Unix time the device was last heard from.
    pub last_seen: u64,
    /// Chunks it announced it holds (`None` before its announcement arrived).
    pub holds_chunks: Option<u64>,
    /// Chunk bytes served to it.
    pub served_bytes: u64,
    /// Chunks it asked for that this device does not hold.
    pub not_held: u64,
    /// `in sync` (this device holds every op the peer had), `catching up`, or `starting`
    /// (no op exchange yet on this connection).
    pub sync: &'static str,
    /// Ops the peer had when the session began that this device still lacks (refused
    /// ones included).
    pub behind_ops: u64,
    /// The last op of the peer's that was refused, and why.
    pub last_error: Option<String>,
}

/// Where the op exchange with one peer stands.
#[derive(Debug, Default)]
struct SyncState {
    /// The peer's version vector from its `Hello` (`None` before it came).
    peer_had: Option<VersionVector>,
    /// Ops of `peer_had` this device lacks.
    behind: u64,
    last_error: Option<String>,
    /// Writers whose refusal was logged at warn level on this connection.
    warned: std::collections::HashSet<pvfs_store::Writer>,
}

/// Ops in `had` that `have` lacks.
fn lacking(had: &VersionVector, have: &VersionVector) -> u64 {
    had.iter()
        .map(|(w, &seq)| seq.saturating_sub(have.get(w).copied().unwrap_or(0)))
        .sum()
}

struct Session {
    device: DeviceId,
    conn: quinn::Connection,
    since: Instant,
    fetched: AtomicU64,
    /// Fetches in flight, since when, and the total time with at least one in flight: the
    /// measured throughput is bytes over busy time.
    busy: Mutex<(usize, Option<Instant>, Duration)>,
    last_seen: AtomicU64,
    /// Chunk requests to this device, pipelined on one stream.
    requester: Requester,
    /// What it serves this device.
    served: Arc<Served>,
    /// What it announced it holds (`None` until its filter arrives).
    holdings: Mutex<Option<Holdings>>,
    /// The op exchange.
    sync: Mutex<SyncState>,
    /// Frame memory of the streams this device opened (`wire::PEER_FRAME_BUDGET`).
    budget: wire::Budget,
    /// True once it has opened its sync stream (one per connection).
    sync_opened: std::sync::atomic::AtomicBool,
}

impl Session {
    fn busy(&self, starting: bool) {
        let mut b = self.busy.lock();
        if starting {
            if b.0 == 0 {
                b.1 = Some(Instant::now());
            }
            b.0 += 1;
        } else {
            b.0 = b.0.saturating_sub(1);
            if b.0 == 0 {
                if let Some(since) = b.1.take() {
                    b.2 += since.elapsed();
                }
            }
        }
    }

    fn throughput_mbs(&self) -> f64 {
        let b = self.busy.lock();
        let busy = b.2 + b.1.map_or(Duration::ZERO, |s| s.elapsed());
        let secs = busy.as_secs_f64();
        if secs > 0.0 {
            self.fetched.load(Ordering::Relaxed) as f64 / secs / 1e6
        } else {
            0.0
        }
    }

    fn touch(&self) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_seen.store(now, Ordering::Relaxed);
    }
}

type Waiter = Box<dyn FnOnce(pvfs_store::Result<()>) + Send>;

/// A fetched chunk on its way into the store: id, stored encoding, plaintext, and who waits.
type Stashed = (ChunkId, Bytes, Bytes, tokio::sync::oneshot::Sender<()>);

/// Batches of fetched chunk ids queued for announcement; a session that falls further behind
/// sends a fresh holdings filter instead.
const HELD_QUEUE: usize = 64;

/// Chunks a fresh holdings filter has room for beyond twice what is held.
const SPARE_ROOM: u64 = 16 << 10;

/// Chunks landed at once at most.
const STASH_BATCH: usize = 256;

/// Fetched bytes readable but not yet on disk before fetching waits for the disk.
const LANDED_MAX: u64 = 256 << 20;

/// Takes fetched chunks into the store: each is readable once landed (`Store::land_fetched`),
/// and whoever waits is told then; the disk takes everything landed meanwhile in one batch
/// (`Store::persist_landed`), one batch at a time.
async fn stash(
    store: Store,
    mut rx: tokio::sync::mpsc::Receiver<Stashed>,
    held: broadcast::Sender<Arc<Vec<ChunkId>>>,
    cancel: CancellationToken,
) {
    let persist = |store: &Store| {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.persist_landed())
    };
    let mut persisting: Option<tokio::task::JoinHandle<pvfs_store::Result<usize>>> = None;
    let mut dirty = false;
    loop {
        let next = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => Some(m),
                None => break,
            },
            // Shutting down: what is landed goes to disk below, then the task ends.
            _ = cancel.cancelled() => break,
            r = async { persisting.as_mut().expect("guarded").await }, if persisting.is_some() => {
                persisting = None;
                match r {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!("keeping fetched chunks on disk: {e}"),
                    Err(e) => tracing::warn!("keeping fetched chunks on disk: {e}"),
                }
                None
            }
        };
        if let Some(first) = next {
            let mut batch = vec![first];
            while batch.len() < STASH_BATCH {
                match rx.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            let mut ids = Vec::with_capacity(batch.len());
            let mut chunks = Vec::with_capacity(batch.len());
            let mut waiters = Vec::with_capacity(batch.len());
            for (id, encoded, plain, done) in batch {
                ids.push(id);
                chunks.push((id, encoded, plain));
                waiters.push(done);
            }
            let landed = store.land_fetched(chunks);
            dirty = true;
            for w in waiters {
                let _ = w.send(());
            }
            // Peers learn that this device holds these now (no one listening is fine); an
            // online-only device keeps them in memory only and announces nothing.
            if !store.is_online_only() {
                let _ = held.send(Arc::new(ids));
            }
            if landed > LANDED_MAX {
                if let Some(p) = persisting.take() {
                    let _ = p.await;
                }
            }
        }
        if persisting.is_none() && dirty {
            dirty = false;
            persisting = Some(persist(&store));
        }
    }
    if let Some(p) = persisting.take() {
        let _ = p.await;
    }
    if let Ok(Err(e)) = persist(&store).await {
        tracing::warn!("keeping fetched chunks on disk: {e}");
    }
}

/// A session's place in `Shared::sessions`, given up when dropped.
struct Registered<'a>(&'a Mutex<HashMap<usize, Arc<Session>>>, usize);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

struct Shared {
    store: Store,
    endpoint: Endpoint,
    device: DeviceId,
    namespace_hash: [u8; 32],
    changed: watch::Sender<u64>,
    sessions: Mutex<HashMap<usize, Arc<Session>>>,
    inflight: Mutex<HashMap<ChunkId, Vec<Waiter>>>,
    hooks: Hooks,
    opts: NetOptions,
    runtime: tokio::runtime::Handle,
    stash: tokio::sync::mpsc::Sender<Stashed>,
    /// Chunks fetched and stored here, for the peers' holdings filters.
    held: broadcast::Sender<Arc<Vec<ChunkId>>>,
    /// Devices heard of (mDNS) and where: redialled while not connected.
    known: Mutex<HashMap<DeviceId, Vec<SocketAddr>>>,
    dialing: Mutex<std::collections::HashSet<DeviceId>>,
    /// Every task of the network, so that shutdown can wait for them (`Net::closed`).
    tasks: TaskTracker,
    /// Cancelled first at shutdown: the loops (accepting, redialling, hand-off, discovery,
    /// the stash) stop, then the endpoint closes every connection and the tasks of the
    /// sessions end with them.
    cancel: CancellationToken,
}

/// The network side of a daemon. Cheap to clone.
#[derive(Clone)]
pub struct Net {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("device", &self.shared.device)
            .finish_non_exhaustive()
    }
}

/// The last known addresses of devices, from the address book (missing or unreadable: none).
fn load_address_book(path: Option<&std::path::Path>) -> HashMap<DeviceId, Vec<SocketAddr>> {
    let Some(path) = path else {
        return HashMap::new();
    };
    let Ok(bytes) = std::fs::read(path) else {
        return HashMap::new();
    };
    let parsed: std::collections::BTreeMap<String, Vec<SocketAddr>> =
        match serde_json::from_slice(&bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring the address book: {e}");
                return HashMap::new();
            }
        };
    parsed
        .into_iter()
        .filter_map(|(d, a)| Some((d.parse().ok()?, a.into_iter().take(8).collect())))
        .collect()
}

/// BLAKE3 of a namespace id, as `Hello` and mDNS carry it.
pub fn namespace_hash(namespace: &[u8; 16]) -> [u8; 32] {
    *blake3::hash(namespace).as_bytes()
}

fn blocking_err(e: tokio::task::JoinError) -> NetError {
    NetError::Io(std::io::Error::other(e))
}

impl Net {
    /// Listens on `opts.listen` as `cert` and starts serving members. Must be called inside
    /// the tokio runtime that will run the network.
    pub fn start(store: Store, cert: &DeviceCert, opts: NetOptions, hooks: Hooks) -> Result<Net> {
        let members = Arc::new(StoreMembers(store.clone()));
        let opts_book = opts.address_book.clone();
        let endpoint = Endpoint::bind(opts.listen, cert, members)?;
        let (changed, _) = watch::channel(0u64);
        let (stash_tx, stash_rx) = tokio::sync::mpsc::channel(2 * STASH_BATCH);
        let (held, _) = broadcast::channel(HELD_QUEUE);
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        tasks.spawn(stash(store.clone(), stash_rx, held.clone(), cancel.clone()));
        let shared = Arc::new(Shared {
            device: store.device(),
            namespace_hash: namespace_hash(&store.namespace()),
            store: store.clone(),
            endpoint,
            changed,
            sessions: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            hooks,
            opts,
            runtime: tokio::runtime::Handle::current(),
            stash: stash_tx,
            held,
            known: Mutex::new(load_address_book(opts_book.as_deref())),
            dialing: Mutex::new(Default::default()),
            tasks,
            cancel,
        });
        {
            let tx = shared.changed.clone();
            store.set_on_commit(Arc::new(move || {
                tx.send_modify(|v| *v += 1);
            }));
        }
        let net = Net { shared };
        let keeper = net.clone();
        net.spawn_loop(async move {
            loop {
                tokio::time::sleep(REDIAL).await;
                let known: Vec<DeviceId> = keeper.shared.known.lock().keys().copied().collect();
                // Devices that are not (or no longer) members are forgotten, not dialled.
                for (d, member) in keeper.shared.membership(known).await {
                    match member {
                        Some(true) => keeper.dial_known(d),
                        Some(false) => {
                            keeper.shared.known.lock().remove(&d);
                        }
                        None => {}
                    }
                }
            }
        });
        net.spawn_loop(hand_off(net.shared.clone()));
        let acceptor = net.clone();
        net.spawn_loop(async move {
            while let Some(peer) = acceptor.shared.endpoint.accept().await {
                let s = acceptor.shared.clone();
                acceptor
                    .shared
                    .spawn(async move { s.run(peer, false).await });
            }
        });
        Ok(net)
    }

    /// This device.
    pub fn device(&self) -> DeviceId {
        self.shared.device
    }

    /// The hash of the namespace id, as `Hello` and mDNS carry it.
    pub fn namespace_hash(&self) -> [u8; 32] {
        self.shared.namespace_hash
    }

    /// True while a session with `device` is open.
    pub fn is_connected(&self, device: DeviceId) -> bool {
        self.shared
            .sessions
            .lock()
            .values()
            .any(|s| s.device == device)
    }

    /// A device was heard of at `addrs` (mDNS): if it is a member, it is dialled now, and
    /// again whenever it is not connected (an announcement of any other id is ignored: anyone
    /// on the network can announce anything).
    pub async fn discovered(&self, device: DeviceId, addrs: Vec<SocketAddr>) {
        if addrs.is_empty() {
            return;
        }
        let member = self.shared.membership(vec![device]).await;
        if member.first().and_then(|m| m.1) != Some(true) {
            tracing::debug!(device = %device.fmt_short(), "mDNS: not a member, not dialled");
            return;
        }
        let addrs = addrs.into_iter().take(8).collect();
        self.shared.known.lock().insert(device, addrs);
        self.dial_known(device);
    }

    fn dial_known(&self, device: DeviceId) {
        if self.is_connected(device) || !self.shared.dialing.lock().insert(device) {
            return;
        }
        let addrs = self
            .shared
            .known
            .lock()
            .get(&device)
            .cloned()
            .unwrap_or_default();
        let shared = self.shared.clone();
        self.shared.spawn(async move {
            for a in addrs {
                match shared.endpoint.connect(a).await {
                    Ok(peer) if peer.device == device => {
                        shared.dialing.lock().remove(&device);
                        shared.clone().run(peer, true).await;
                        return;
                    }
                    Ok(peer) => peer.conn.close(4u32.into(), b"not the device announced"),
                    Err(e) => tracing::debug!(%a, "dialling a discovered device: {e}"),
                }
            }
            shared.dialing.lock().remove(&device);
        });
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.shared.endpoint.local_addr()
    }

    /// Keeps a connection to `addr` (`host:port`) open: dials it, and again with backoff
    /// whenever the connection fails or ends.
    pub fn add_peer(&self, addr: String) {
        let shared = self.shared.clone();
        self.spawn_loop(async move {
            let mut backoff = Duration::from_millis(250);
            loop {
                match tokio::net::lookup_host(addr.as_str()).await {
                    Ok(addrs) => {
                        for a in addrs {
                            match shared.endpoint.connect(a).await {
                                Ok(peer) => {
                                    backoff = Duration::from_millis(250);
                                    shared.clone().run(peer, true).await;
                                }
                                Err(e) => tracing::debug!(%a, "dialling: {e}"),
                            }
                        }
                    }
                    Err(e) => tracing::debug!(%addr, "resolving: {e}"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
    }

    /// Dials `addr` once; returns when the session ends (tests and discovery use it).
    pub async fn connect_once(&self, addr: SocketAddr) -> Result<()> {
        let peer = self.shared.endpoint.connect(addr).await?;
        let shared = self.shared.clone();
        self.shared
            .spawn(async move { shared.run(peer, true).await });
        Ok(())
    }

    /// The devices connected now.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let sessions = self.shared.sessions.lock();
        sessions
            .values()
            .map(|s| {
                let stats = s.conn.stats();
                let (sync, behind_ops, last_error) = {
                    let st = s.sync.lock();
                    let state = match (&st.peer_had, st.behind) {
                        (None, _) => "starting",
                        (Some(_), 0) => "in sync",
                        (Some(_), _) => "catching up",
                    };
                    (state, st.behind, st.last_error.clone())
                };
                PeerInfo {
                    device: s.device.to_string(),
                    addr: s.conn.remote_address(),
                    rtt_ms: s.conn.rtt().as_secs_f64() * 1000.0,
                    fetched_bytes: s.fetched.load(Ordering::Relaxed),
                    throughput_mbs: s.throughput_mbs(),
                    connected_secs: s.since.elapsed().as_secs(),
                    bytes_sent: stats.udp_tx.bytes,
                    bytes_received: stats.udp_rx.bytes,
                    last_seen: s.last_seen.load(Ordering::Relaxed),
                    holds_chunks: s.holdings.lock().as_ref().map(Holdings::count),
                    served_bytes: s.served.bytes.load(Ordering::Relaxed),
                    not_held: s.served.missing.load(Ordering::Relaxed),
                    sync,
                    behind_ops,
                    last_error,
                }
            })
            .collect()
    }

    /// Asks every connected device which of `ids` it holds: (device, held flags).
    pub async fn holders(&self, ids: &[ChunkId]) -> Vec<(DeviceId, Vec<bool>)> {
        let sessions = self.shared.sessions();
        let mut out: Vec<(DeviceId, Vec<bool>)> = Vec::new();
        for s in sessions {
            if out.iter().any(|(d, _)| *d == s.device) {
                continue;
            }
            let mut held = Vec::with_capacity(ids.len());
            for part in ids.chunks(wire::MAX_IDS) {
                match tokio::time::timeout(Duration::from_secs(5), ask_has(&s.conn, part)).await {
                    Ok(Ok(bits)) => held.extend(
                        (0..part.len())
                            .map(|i| bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)),
                    ),
                    _ => {
                        held.clear();
                        break;
                    }
                }
            }
            if held.len() == ids.len() {
                out.push((s.device, held));
            }
        }
        out
    }

    /// Closes the connections of `device` (after it was removed from the namespace).
    pub fn disconnect(&self, device: DeviceId) {
        for s in self.shared.sessions.lock().values() {
            if s.device == device {
                s.conn.close(3u32.into(), b"removed from the namespace");
            }
        }
    }

    /// Shuts the network down, in order: the loops stop (no new connections are accepted
    /// or dialled), then every connection closes, which ends the sessions' tasks.
    /// `closed` waits for them.
    pub fn close(&self) {
        self.shared.cancel.cancel();
        self.shared.endpoint.close();
        self.shared.tasks.close();
    }

    /// Waits until every task of the network has ended (after `close`), chunks fetched but
    /// not yet on disk written out.
    pub async fn closed(&self) {
        self.shared.tasks.wait().await;
    }

    /// Runs `fut` as one of the network's loops: until it ends or the network closes.
    pub(crate) fn spawn_loop<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let cancel = self.shared.cancel.clone();
        self.shared.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = fut => {}
            }
        });
    }

    /// Fetches chunk `id` from a connected device and stores it here.
    pub async fn fetch(&self, id: ChunkId, len: u32) -> Result<()> {
        self.shared.fetch(id, len).await
    }
}

impl ChunkSource for Net {
    fn fetch(&self, id: ChunkId, len: u32, ino: Ino, done: Waiter) {
        {
            let mut inflight = self.shared.inflight.lock();
            if let Some(waiters) = inflight.get_mut(&id) {
                waiters.push(done);
                return;
            }
            inflight.insert(id, vec![done]);
        }
        let shared = self.shared.clone();
        self.shared.spawn(async move {
            let res = shared.fetch(id, len).await;
            if let Err(e) = &res {
                tracing::warn!(ino, chunk = %id.fmt_short(), "fetching content: {e}");
            }
            let waiters = shared.inflight.lock().remove(&id).unwrap_or_default();
            for w in waiters {
                w(res
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| StoreError::Invalid(e.to_string())));
            }
        });
    }

    fn keep_elsewhere(&self, chunks: Vec<(ChunkId, Bytes, u32)>, done: Waiter) {
        let shared = self.shared.clone();
        self.shared.spawn(async move {
            let res = shared.keep_elsewhere(&chunks).await;
            done(res.map_err(|e| StoreError::Invalid(e.to_string())));
        });
    }
}

impl Shared {
    /// Runs `fut` on the network's runtime as one of its tasks (`Net::closed` waits for it).
    fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<()>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn_on(fut, &self.runtime)
    }

    /// The open sessions, now.
    fn sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.lock().values().cloned().collect()
    }

    fn hello(&self, have: VersionVector) -> Message {
        Message::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            device: self.device,
            namespace: self.namespace_hash,
            have: have.into_iter().collect(),
        })
    }

    async fn version_vector(&self) -> Result<VersionVector> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.version_vector())
            .await
            .map_err(blocking_err)
    }

    /// Notes where a device was reached (one socket serves and dials, so an incoming
    /// connection's address is where the device listens) and saves the address book.
    fn remember(&self, device: DeviceId, addr: SocketAddr) {
        let snapshot = {
            let mut known = self.known.lock();
            let addrs = known.entry(device).or_default();
            if addrs.first() == Some(&addr) {
                return;
            }
            addrs.retain(|a| *a != addr);
            addrs.insert(0, addr);
            addrs.truncate(8);
            known
                .iter()
                .map(|(d, a)| (d.to_string(), a.clone()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        if let Some(path) = &self.opts.address_book {
            let tmp = path.with_extension("tmp");
            let res = serde_json::to_vec_pretty(&snapshot)
                .map_err(std::io::Error::other)
                .and_then(|b| std::fs::write(&tmp, b))
                .and_then(|()| std::fs::rename(&tmp, path));
            if let Err(e) = res {
                tracing::warn!(path = %path.display(), "saving the address book: {e}");
            }
        }
    }

    /// Runs one connection until it ends.
    async fn run(self: Arc<Self>, peer: Peer, dialer: bool) {
        let key = peer.conn.stable_id();
        let session = Arc::new(Session {
            device: peer.device,
            conn: peer.conn.clone(),
            since: Instant::now(),
            fetched: AtomicU64::new(0),
            busy: Mutex::new((0, None, Duration::ZERO)),
            last_seen: AtomicU64::new(0),
            requester: Requester::new(peer.conn.clone()),
            served: Arc::default(),
            holdings: Mutex::new(None),
            sync: Mutex::default(),
            budget: wire::Budget::default(),
            sync_opened: Default::default(),
        });
        session.touch();
        {
            // A device has at most MAX_CONNECTIONS_PER_DEVICE: a new one replaces its oldest
            // (most often a connection of its previous run, which crashed or restarted and
            // whose end has not reached this device yet).
            let mut sessions = self.sessions.lock();
            let mut same: Vec<(Instant, Arc<Session>)> = sessions
                .values()
                .filter(|s| s.device == peer.device)
                .map(|s| (s.since, s.clone()))
                .collect();
            same.sort_by_key(|(since, _)| *since);
            let excess = (same.len() + 1).saturating_sub(MAX_CONNECTIONS_PER_DEVICE);
            for (_, old) in same.into_iter().take(excess) {
                tracing::info!(device = %peer.device.fmt_short(), "a new connection replaces the oldest of this device");
                old.conn
                    .close(4u32.into(), b"replaced by a newer connection");
            }
            sessions.insert(key, session.clone());
        }
        // The session leaves the table however this ends: returned, or dropped by a loop
        // that shutdown cancelled (its connection then closes with the endpoint).
        let _registered = Registered(&self.sessions, key);
        tracing::info!(device = %peer.device.fmt_short(), addr = %peer.conn.remote_address(), dialer, "connected");
        self.remember(peer.device, peer.conn.remote_address());
        let res = self
            .clone()
            .serve(peer.clone(), session.clone(), dialer)
            .await;
        match res {
            Ok(()) => tracing::info!(device = %peer.device.fmt_short(), "disconnected"),
            Err(e) => {
                tracing::warn!(device = %peer.device.fmt_short(), "session ended: {e}");
                peer.conn.close(2u32.into(), b"session error");
            }
        }
    }

    async fn serve(self: Arc<Self>, peer: Peer, session: Arc<Session>, dialer: bool) -> Result<()> {
        if dialer {
            session
                .sync_opened
                .store(true, std::sync::atomic::Ordering::Release);
            let (send, recv) = peer
                .conn
                .open_bi()
                .await
                .map_err(|e| NetError::Connect(e.to_string()))?;
            let me = self.clone();
            let (p, s) = (peer.clone(), session.clone());
            self.spawn(async move {
                if let Err(e) = me.sync(p.clone(), s, send, recv, None).await {
                    tracing::warn!(device = %p.device.fmt_short(), "sync: {e}");
                    p.conn.close(2u32.into(), b"sync error");
                }
            });
        }
        loop {
            let (send, mut recv) = match peer.conn.accept_bi().await {
                Ok(s) => s,
                Err(quinn::ConnectionError::ApplicationClosed(_))
                | Err(quinn::ConnectionError::LocallyClosed) => return Ok(()),
                Err(e) => return Err(NetError::Connect(e.to_string())),
            };
            session.touch();
            let me = self.clone();
            let (p, s) = (peer.clone(), session.clone());
            self.spawn(async move {
                // The first frame's memory is the peer's budget's until it is decoded.
                let first = wire::read_message_within(&mut recv, &s.budget)
                    .await
                    .map(|m| m.map(|(m, _)| m));
                let res = match first {
                    Ok(Some(Message::Hello(_)))
                        if s.sync_opened
                            .swap(true, std::sync::atomic::Ordering::AcqRel) =>
                    {
                        Err(NetError::Malformed("a second sync stream".into()))
                    }
                    Ok(Some(Message::Hello(h))) => me.sync(p.clone(), s, send, recv, Some(h)).await,
                    Ok(Some(Message::Want(ids))) => {
                        chunks::serve(me.store.clone(), s.served.clone(), send, recv, ids).await
                    }
                    Ok(Some(Message::Has(ids))) => me.serve_has(send, ids).await,
                    Ok(Some(Message::Keep(chunks))) => {
                        let held = me.held.clone();
                        let budget = s.budget.clone();
                        keep::serve(me.store.clone(), held, p.device, send, recv, chunks, budget)
                            .await
                    }
                    Ok(Some(other)) => Err(NetError::Malformed(format!(
                        "a stream cannot start with {other:?}"
                    ))),
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                };
                if let Err(e) = res {
                    tracing::warn!(device = %p.device.fmt_short(), "stream: {e}");
                }
            });
        }
    }

    /// The sync stream: `Hello` both ways, then each side sends what the other lacks and
    /// every new op after that.
    async fn sync(
        self: Arc<Self>,
        peer: Peer,
        session: Arc<Session>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        hello: Option<Hello>,
    ) -> Result<()> {
        let have = self.version_vector().await?;
        wire::write_message(&mut send, &self.hello(have.clone())).await?;
        let hello = match hello {
            Some(h) => h,
            None => match wire::read_message(&mut recv).await? {
                Some(Message::Hello(h)) => h,
                other => {
                    return Err(NetError::Malformed(format!(
                        "expected Hello, got {other:?}"
                    )))
                }
            },
        };
        if hello.protocol != PROTOCOL_VERSION {
            return Err(NetError::Malformed(format!(
                "protocol {} (this device speaks {PROTOCOL_VERSION})",
                hello.protocol
            )));
        }
        if hello.device != peer.device {
            return Err(NetError::Malformed(
                "Hello names another device than the certificate".into(),
            ));
        }
        if hello.namespace != self.namespace_hash {
            return Err(NetError::Malformed(
                "the peer is in another namespace".into(),
            ));
        }
        let peer_have: VersionVector = hello.have.into_iter().collect();
        {
            let behind = lacking(&peer_have, &have);
            let mut st = session.sync.lock();
            st.peer_had = Some(peer_have.clone());
            st.behind = behind;
        }
        let sender = self.spawn(self.clone().push(send, peer_have));
        let res = self.receive(&peer, &session, recv).await;
        sender.abort();
        res
    }

    /// Sends the peer every op it lacks, now and whenever new ones are committed here. Once
    /// the peer has them all, it also learns what this device holds (`Holds`), and from then
    /// on what it comes to hold (`Held`: chunks fetched, chunks of this device's own edits).
    async fn push(self: Arc<Self>, mut send: quinn::SendStream, mut peer_have: VersionVector) {
        let mut changed = self.changed.subscribe();
        // Subscribed before the filter is built: nothing stored meanwhile goes unannounced.
        let mut fetched = self.held.subscribe();
        // Room left in the peer's copy of the filter; `None` until one is sent, and when a
        // fresh one is due.
        let mut room: Option<u64> = None;
        loop {
            changed.borrow_and_update();
            let store = self.store.clone();
            let have = peer_have.clone();
            let (me, announcing) = (self.device, room.is_some());
            let read = tokio::task::spawn_blocking(move || {
                let ops = store.ops_after(&have, BATCH_OPS)?;
                let authors: std::collections::BTreeSet<DeviceId> =
                    ops.iter().map(|o| o.id.device).collect();
                let keys = store.device_keys(authors)?;
                let held = if announcing {
                    own_held(&store, me, &ops)?
                } else {
                    Vec::new()
                };
                Ok::<_, StoreError>((ops, keys, held))
            })
            .await;
            let (ops, keys, held) = match read {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::error!("reading the op log: {e}");
                    return;
                }
                Err(_) => return,
            };
            if let Err(e) = announce(&mut send, &mut room, &held).await {
                tracing::debug!("announcing chunks: {e}");
                return;
            }
            if ops.is_empty() {
                // In sync: announce, and wait for new ops.
                loop {
                    if room.is_none() {
                        match self.send_holdings(&mut send).await {
                            Ok(r) => room = Some(r),
                            Err(e) => {
                                tracing::debug!("announcing holdings: {e}");
                                return;
                            }
                        }
                    }
                    tokio::select! {
                        r = changed.changed() => {
                            if r.is_err() {
                                return;
                            }
                            break;
                        }
                        r = fetched.recv() => match r {
                            Ok(ids) => {
                                if let Err(e) = announce(&mut send, &mut room, &ids).await {
                                    tracing::debug!("announcing chunks: {e}");
                                    return;
                                }
                            }
                            Err(broadcast::error::RecvError::Lagged(_)) => room = None,
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                    }
                }
                continue;
            }
            // Cut into messages of about BATCH_BYTES, where the receiver can vouch for each
            // writer's run in the message (`vouched`).
            let by_device: HashMap<DeviceId, [u8; pvfs_store::KEY_LEN]> = keys
                .iter()
                .map(|k| (DeviceId::from_public_key(k), *k))
                .collect();
            let namespace = self.store.namespace();
            let mut batch = Vec::new();
            let mut bytes = 0;
            let n = ops.len();
            for (i, op) in ops.into_iter().enumerate() {
                bytes += postcard::to_stdvec(&op).map_or(0, |v| v.len());
                let e = peer_have.entry(op.id.writer()).or_default();
                *e = (*e).max(op.id.seq);
                batch.push(op);
                let cut = i + 1 == n
                    || (bytes >= BATCH_BYTES && vouched(&batch, me, &namespace, &by_device));
                if cut {
                    let msg = Message::Ops {
                        keys: keys.clone(),
                        ops: std::mem::take(&mut batch),
                    };
                    if let Err(e) = wire::write_message(&mut send, &msg).await {
                        tracing::debug!("pushing ops: {e}");
                        return;
                    }
                    bytes = 0;
                }
            }
        }
    }

    /// Sends a filter of every chunk held here; returns the room it has for additions.
    async fn send_holdings(&self, send: &mut quinn::SendStream) -> Result<u64> {
        let store = self.store.clone();
        let ids = tokio::task::spawn_blocking(move || {
            let mut ids = Vec::new();
            store.held_chunks(|id| ids.push(*id)).map(|_| ids)
        })
        .await
        .map_err(blocking_err)??;
        // Room for as many again, and for a GiB or so more: a fetching device does not
        // send a fresh filter every few chunks.
        let mut h = Holdings::with_capacity(ids.len() as u64 * 2 + SPARE_ROOM);
        for id in &ids {
            h.insert(id);
        }
        let room = h.capacity().saturating_sub(h.count());
        tracing::debug!(chunks = h.count(), bytes = h.bytes(), "announcing holdings");
        wire::write_message(send, &Message::Holds(h)).await?;
        Ok(room)
    }

    /// Applies the ops the peer sends.
    async fn receive(
        &self,
        peer: &Peer,
        session: &Session,
        mut recv: quinn::RecvStream,
    ) -> Result<()> {
        loop {
            // The batch holds its share of the peer's budget until it is applied.
            let (msg, _frame) = match wire::read_message_within(&mut recv, &session.budget).await? {
                Some(m) => m,
                None => return Ok(()),
            };
            session.touch();
            let ops = match msg {
                Message::Ops { keys, ops } => (keys, ops),
                Message::Holds(h) => {
                    tracing::debug!(device = %peer.device.fmt_short(), chunks = h.count(), "holdings");
                    *session.holdings.lock() = Some(h);
                    continue;
                }
                Message::Held(ids) => {
                    if let Some(h) = session.holdings.lock().as_mut() {
                        for id in &ids {
                            h.insert(id);
                        }
                    }
                    continue;
                }
                other => {
                    return Err(NetError::Malformed(format!(
                        "unexpected message on the sync stream: {other:?}"
                    )))
                }
            };
            let store = self.store.clone();
            let is_open = self.hooks.is_open.clone();
            let (keys, ops) = ops;
            let n = ops.len();
            let (applied, have) = tokio::task::spawn_blocking(move || {
                let applied = store.apply_remote(&ops, &keys, &*is_open)?;
                Ok::<_, StoreError>((applied, store.version_vector()))
            })
            .await
            .map_err(blocking_err)??;
            self.note_refused(peer, session, &applied, &have);
            tracing::debug!(
                device = %peer.device.fmt_short(),
                received = n,
                applied = applied.applied,
                "ops"
            );
            if applied.applied > 0 {
                self.drop_removed().await;
                (self.hooks.applied)(&applied);
                // Other peers may lack these too.
                self.changed.send_modify(|v| *v += 1);
            }
        }
    }

    /// Records what a batch from `peer` left undone: refused ops are logged (at warn level
    /// once per writer and connection) and shown by `pvfs-admin peers`; the session goes on,
    /// and they are offered again on the next connection.
    fn note_refused(
        &self,
        peer: &Peer,
        session: &Session,
        applied: &Applied,
        have: &VersionVector,
    ) {
        let mut st = session.sync.lock();
        if let Some(had) = &st.peer_had {
            st.behind = lacking(had, have);
        }
        for r in &applied.refused {
            let first = st.warned.insert(r.op.writer());
            if first {
                tracing::warn!(
                    device = %peer.device.fmt_short(),
                    op = %r.op.fmt_short(),
                    "refused an op and the ops after it of its writer: {}",
                    r.reason
                );
            } else {
                tracing::debug!(op = %r.op.fmt_short(), "refused an op: {}", r.reason);
            }
            st.last_error = Some(format!("op {}: {}", r.op.fmt_short(), r.reason));
        }
    }

    /// Closes the sessions of devices that are no longer members (a removal arrived).
    /// Whether each of `devices` is a member, read on the blocking pool; `None` where the
    /// store could not tell (logged): callers then leave that device as it is.
    async fn membership(&self, devices: Vec<DeviceId>) -> Vec<(DeviceId, Option<bool>)> {
        let store = self.store.clone();
        let n = devices.len();
        let read = tokio::task::spawn_blocking(move || {
            devices
                .into_iter()
                .map(|d| match store.is_member(&d) {
                    Ok(m) => (d, Some(m)),
                    Err(e) => {
                        tracing::error!(device = %d.fmt_short(), "reading the member list: {e}");
                        (d, None)
                    }
                })
                .collect()
        })
        .await;
        read.unwrap_or_else(|e| {
            tracing::error!("reading the member list: {e}");
            Vec::with_capacity(n)
        })
    }

    async fn drop_removed(&self) {
        let sessions = self.sessions();
        let members = self
            .membership(sessions.iter().map(|s| s.device).collect())
            .await;
        for (s, _) in sessions
            .into_iter()
            .zip(members)
            .filter(|(_, (_, m))| *m == Some(false))
        {
            tracing::info!(device = %s.device.fmt_short(), "closing the session of a removed device");
            s.conn.close(3u32.into(), b"removed from the namespace");
        }
    }

    /// Answers one `Has`: which of the chunks this device holds.
    async fn serve_has(&self, mut send: quinn::SendStream, ids: Vec<ChunkId>) -> Result<()> {
        let store = self.store.clone();
        let held = tokio::task::spawn_blocking(move || {
            ids.iter()
                .map(|id| store.has_chunk(id))
                .collect::<pvfs_store::Result<Vec<bool>>>()
        })
        .await
        .map_err(blocking_err)??;
        let mut bits = vec![0u8; held.len().div_ceil(8)];
        for (i, h) in held.iter().enumerate() {
            if *h {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        wire::write_message(&mut send, &Message::Holding(bits)).await?;
        let _ = send.finish();
        Ok(())
    }

    /// Stores `chunks` on one connected device, the nearest first, for an online-only
    /// device's commit. Fails at once when no device is connected: the commit then keeps
    /// its content here.
    async fn keep_elsewhere(&self, chunks: &[(ChunkId, Bytes, u32)]) -> Result<()> {
        let mut sessions = self.sessions();
        sessions.sort_by_key(|s| s.conn.rtt());
        let mut last = String::from("no other device is connected");
        let mut tried: Vec<DeviceId> = Vec::new();
        for s in sessions {
            if tried.contains(&s.device) {
                continue;
            }
            tried.push(s.device);
            match tokio::time::timeout(self.opts.fetch_timeout, keep::push(&s.conn, chunks)).await {
                Ok(Ok(())) => {
                    s.touch();
                    return Ok(());
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("no answer within {:?}", self.opts.fetch_timeout),
            }
            tracing::debug!(device = %s.device.fmt_short(), "pushing chunks: {last}");
        }
        Err(NetError::Connect(last))
    }

    /// Fetches one chunk: each connected device in turn (fastest first) until one delivers
    /// bytes that match the id; waits for a connection while there is none.
    async fn fetch(&self, id: ChunkId, len: u32) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.opts.fetch_timeout;
        let mut tried: Vec<usize> = Vec::new();
        let mut last = String::from("no device holding it is reachable");
        // Requests under way, each to another device: a holder that has not answered within
        // its own deadline (`hedge_after`) is left running while the next one is asked too,
        // so one slow or silent holder cannot spend the read's whole deadline.
        let mut asking: tokio::task::JoinSet<(Arc<Session>, Result<Bytes>)> =
            tokio::task::JoinSet::new();
        let mut next_hedge = tokio::time::Instant::now();
        loop {
            let now = tokio::time::Instant::now();
            if asking.is_empty() || now >= next_hedge {
                if let Some((key, session)) = self.next_holder(id, &tried) {
                    tried.push(key);
                    next_hedge = now + self.hedge_after(&session);
                    asking.spawn(async move {
                        let _busy = Busy::start(session.clone());
                        let res = session.requester.get(id).await;
                        (session, res)
                    });
                    continue;
                }
                if asking.is_empty() {
                    if now >= deadline {
                        return Err(NetError::Connect(format!(
                            "chunk {}: {last} (gave up after {:?})",
                            id.fmt_short(),
                            self.opts.fetch_timeout
                        )));
                    }
                    // Wait for a (new) connection.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if tried.len() >= self.sessions.lock().len() {
                        tried.clear();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    continue;
                }
                // Every connected device is being asked: look again for new ones in a while.
                next_hedge = now + Duration::from_millis(200);
            }
            let answer = tokio::select! {
                a = asking.join_next() => a,
                _ = tokio::time::sleep_until(next_hedge) => continue,
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(NetError::Connect(format!(
                        "chunk {}: no answer within {:?}",
                        id.fmt_short(),
                        self.opts.fetch_timeout
                    )))
                }
            };
            let Some(Ok((session, res))) = answer else {
                continue;
            };
            match res {
                Err(e) => {
                    tracing::debug!(device = %session.device.fmt_short(), chunk = %id.fmt_short(), "fetch: {e}");
                    last = e.to_string();
                    // Ask the next device now rather than at the hedge time.
                    next_hedge = tokio::time::Instant::now();
                }
                Ok(encoded) => {
                    let Ok(plain) = pvfs_store::decode_fetched(&id, &encoded, len) else {
                        // A device that serves wrong bytes is buggy or hostile: drop it.
                        tracing::warn!(
                            device = %session.device.fmt_short(),
                            chunk = %id.fmt_short(),
                            "the peer sent wrong bytes for a chunk: closing its connection"
                        );
                        session.conn.close(5u32.into(), b"wrong bytes for a chunk");
                        last = "a device sent wrong bytes".into();
                        next_hedge = tokio::time::Instant::now();
                        continue;
                    };
                    // The others are not waited for (dropping the set stops them).
                    drop(asking);
                    session
                        .fetched
                        .fetch_add(plain.len() as u64, Ordering::Relaxed);
                    session.touch();
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    self.stash
                        .send((id, encoded, plain, tx))
                        .await
                        .map_err(|_| NetError::Connect("shutting down".into()))?;
                    return rx
                        .await
                        .map_err(|_| NetError::Connect("shutting down".into()));
                }
            }
        }
    }

    /// The device to ask for chunk `id` next, of those not in `tried`: devices that
    /// announced they may hold it first, then the least loaded, then the nearest, so that a
    /// large file's chunks spread over every device that holds them. A "no" may be stale,
    /// so those devices are asked last.
    fn next_holder(&self, id: ChunkId, tried: &[usize]) -> Option<(usize, Arc<Session>)> {
        self.sessions
            .lock()
            .iter()
            .filter(|(k, _)| !tried.contains(k))
            .map(|(k, s)| (*k, s.clone()))
            .min_by_key(|(_, s)| {
                let lacks = s.holdings.lock().as_ref().is_some_and(|h| !h.may_hold(&id));
                (lacks, s.requester.load(), s.conn.rtt())
            })
    }

    /// How long a holder has to answer before the next one is asked too: a few round trips,
    /// within `MIN_HEDGE` and a quarter of the fetch timeout.
    fn hedge_after(&self, session: &Session) -> Duration {
        let max = (self.opts.fetch_timeout / 4).max(MIN_HEDGE);
        (session.conn.rtt() * 4 + MIN_HEDGE).min(max)
    }
}

/// True if every other device's run in `batch` ends at an op whose signature verifies: the
/// receiver checks each run's last signature and the hash chain of the rest, so a message
/// may end only there (the whole batch from `ops_after` does; a cut inside it must too).
fn vouched(
    batch: &[pvfs_store::OpRecord],
    me: DeviceId,
    namespace: &[u8; 16],
    keys: &HashMap<DeviceId, [u8; pvfs_store::KEY_LEN]>,
) -> bool {
    let mut seen = std::collections::HashSet::new();
    batch.iter().rev().all(|op| {
        let w = op.id.writer();
        if op.id.device == me || !seen.insert(w) {
            return true;
        }
        keys.get(&op.id.device)
            .is_some_and(|k| pvfs_store::verify_op(namespace, k, op).is_ok())
    })
}

/// A session counted busy while a request to it is under way, however the request ends.
struct Busy(Arc<Session>);

impl Busy {
    fn start(session: Arc<Session>) -> Busy {
        session.busy(true);
        Busy(session)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy(false);
    }
}

/// An online-only device's content that is on its disk (written while no device could take
/// it, or before the device became online-only) goes to another device, then leaves the
/// disk, a round of at most `HAND_OFF_BYTES` every `HAND_OFF_EVERY`. A round that hands
/// off nothing (all refused, or only chunks of open files left) doubles the pause, up to
/// `MAX_BACKOFF`: each round reads the disk.
async fn hand_off(shared: Arc<Shared>) {
    let mut pause = HAND_OFF_EVERY;
    loop {
        tokio::time::sleep(pause).await;
        let store = shared.store.clone();
        if !store.is_online_only() || store.stats().stored_bytes == 0 {
            pause = HAND_OFF_EVERY;
            continue;
        }
        if shared.sessions().is_empty() {
            continue;
        }
        let res = async {
            let batch = {
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.evictable(HAND_OFF_BYTES))
                    .await
                    .map_err(blocking_err)??
            };
            if batch.is_empty() {
                return Ok(0);
            }
            shared.keep_elsewhere(&batch).await?;
            let ids: Vec<ChunkId> = batch.iter().map(|c| c.0).collect();
            tokio::task::spawn_blocking(move || store.evict(&ids))
                .await
                .map_err(blocking_err)?
                .map_err(NetError::from)
        }
        .await;
        match res {
            Ok(0) => pause = (pause * 2).min(MAX_BACKOFF),
            Ok(freed) => {
                pause = HAND_OFF_EVERY;
                tracing::info!(freed, "handed content on this disk to another device");
            }
            Err(e) => {
                pause = (pause * 2).min(MAX_BACKOFF);
                tracing::debug!("handing content to another device: {e}");
            }
        }
    }
}

/// Tells the peer this device holds `ids` too, while its filter has room; once it has none,
/// `room` becomes `None` and a fresh filter is sent instead.
async fn announce(
    send: &mut quinn::SendStream,
    room: &mut Option<u64>,
    ids: &[ChunkId],
) -> Result<()> {
    let Some(left) = room else { return Ok(()) };
    if ids.is_empty() {
        return Ok(());
    }
    if *left < ids.len() as u64 {
        *room = None;
        return Ok(());
    }
    *left -= ids.len() as u64;
    for part in ids.chunks(wire::MAX_IDS) {
        wire::write_message(send, &Message::Held(part.to_vec())).await?;
    }
    Ok(())
}

/// The chunks of this device's own edits among `ops` that it holds (an edit can share chunks
/// this device never had, as a copy of a file whose content lives elsewhere does).
fn own_held(
    store: &Store,
    me: DeviceId,
    ops: &[pvfs_store::OpRecord],
) -> pvfs_store::Result<Vec<ChunkId>> {
    let mut ids: Vec<ChunkId> = ops
        .iter()
        .filter(|op| op.id.device == me)
        .flat_map(|op| match &op.kind {
            pvfs_store::OpKind::Content { extents, .. } => extents.iter().map(|e| e.1).collect(),
            _ => Vec::new(),
        })
        .collect();
    ids.sort();
    ids.dedup();
    let mut held = Vec::with_capacity(ids.len());
    for id in ids {
        if store.has_chunk(&id)? {
            held.push(id);
        }
    }
    Ok(held)
}

/// Sends one request on a new stream and reads the one answer.
async fn request(conn: &quinn::Connection, msg: &Message) -> Result<Option<Message>> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| NetError::Connect(e.to_string()))?;
    wire::write_message(&mut send, msg).await?;
    let _ = send.finish();
    wire::read_message(&mut recv).await
}

/// Asks one device which of `ids` it holds.
async fn ask_has(conn: &quinn::Connection, ids: &[ChunkId]) -> Result<Vec<u8>> {
    match request(conn, &Message::Has(ids.to_vec())).await? {
        Some(Message::Holding(bits)) if bits.len() == ids.len().div_ceil(8) => Ok(bits),
        other => Err(NetError::Malformed(format!(
            "unexpected answer to Has: {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use pvfs_store::{DeviceKey, RootOwner, Signer, Store, KEY_LEN};

    use super::vouched;

    /// A message may end another device's run only at an op whose signature verifies; this
    /// device's own ops need no check.
    #[test]
    fn a_message_ends_a_foreign_run_only_at_a_good_signature() {
        let ns = [3; 16];
        let (me, other) = (
            Arc::new(DeviceKey::from_seed([1; 32])),
            Arc::new(DeviceKey::from_seed([2; 32])),
        );
        let ops = |k: &Arc<DeviceKey>| {
            let s = Store::in_memory_in(k.clone(), RootOwner { uid: 0, gid: 0 }, ns).unwrap();
            s.commit(false, |tx| {
                tx.set_member(k.device(), "a", true)?;
                tx.set_member(k.device(), "b", true)
            })
            .unwrap();
            s.ops(s.writer(), 1, usize::MAX).unwrap()
        };
        let keys: HashMap<_, [u8; KEY_LEN]> = [&me, &other]
            .iter()
            .map(|k| (k.device(), k.public_key().try_into().unwrap()))
            .collect();
        let mut theirs = ops(&other);
        assert!(vouched(&theirs, me.device(), &ns, &keys));
        theirs[1].sig = vec![0; 64];
        assert!(!vouched(&theirs, me.device(), &ns, &keys), "a bad run end");
        assert!(
            vouched(&theirs[..1], me.device(), &ns, &keys),
            "cut before it"
        );
        let mut mine = ops(&me);
        mine[1].sig = vec![0; 64];
        assert!(
            vouched(&mine, me.device(), &ns, &keys),
            "own ops are not checked"
        );
    }
}
