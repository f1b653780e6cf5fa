//! In-process clusters: several devices, each a store and a QUIC endpoint on 127.0.0.1, in one
//! namespace. Changes on any device show on all; content made elsewhere is fetched, checked
//! and stored; strangers get nothing; a lying peer is caught; a hostile member's forged,
//! equivocating and far-future ops are refused one by one while sync goes on.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pvfs_net::sync::{namespace_hash, Hooks, Net, NetOptions};
use pvfs_net::tls::DeviceCert;
use pvfs_net::transport::Endpoint;
use pvfs_net::wire::{self, Hello, Message, PROTOCOL_VERSION};
use pvfs_store::{
    ChunkId, FileKind, Ino, NewExtent, NewNode, PreparedChunk, RenameFlags, RootOwner, Store,
    Timestamp, ROOT_INO,
};

const NS: [u8; 16] = [42; 16];
const OWNER: RootOwner = RootOwner { uid: 0, gid: 0 };

struct Device {
    store: Store,
    net: Net,
    cert: Arc<DeviceCert>,
}

fn cert() -> DeviceCert {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    DeviceCert::from_key_pem(&key.serialize_pem()).unwrap()
}

fn no_hooks() -> Hooks {
    Hooks {
        applied: Box::new(|_| {}),
        is_open: Arc::new(|_| false),
    }
}

fn opts(timeout: Duration) -> NetOptions {
    NetOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        fetch_timeout: timeout,
        address_book: None,
    }
}

/// `n` devices in one namespace, each knowing all of them as members.
fn cluster(n: usize) -> Vec<Device> {
    let certs: Vec<Arc<DeviceCert>> = (0..n).map(|_| Arc::new(cert())).collect();
    certs
        .iter()
        .map(|c| {
            let store = Store::in_memory_in(c.clone(), OWNER, NS).unwrap();
            store
                .commit(false, |tx| {
                    for (i, m) in certs.iter().enumerate() {
                        tx.set_member(m.device(), &format!("dev{i}"), true)?;
                    }
                    Ok(())
                })
                .unwrap();
            let net =
                Net::start(store.clone(), c, opts(Duration::from_secs(5)), no_hooks()).unwrap();
            Device {
                store,
                net,
                cert: c.clone(),
            }
        })
        .collect()
}

fn connect(a: &Device, b: &Device) {
    a.net.add_peer(b.net.local_addr().unwrap().to_string());
}

/// A new regular file owned by root.
fn regular() -> NewNode {
    NewNode {
        kind: FileKind::File,
        perm: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
        target: None,
    }
}

fn write_file(s: &Store, dir: Ino, name: &str, data: &[u8]) -> Ino {
    s.commit(false, |tx| {
        let (ino, _) = tx.create(dir, name.as_bytes(), regular())?;
        let mut exts = Vec::new();
        let mut off = 0;
        for piece in data.chunks(100_000) {
            exts.push(NewExtent {
                offset: off,
                chunk: PreparedChunk::new(Bytes::copy_from_slice(piece), true),
            });
            off += piece.len() as u64;
        }
        tx.replace_extents(ino, (0, off), &exts, off, Timestamp::now())?;
        Ok(ino)
    })
    .unwrap()
}

fn lookup(s: &Store, dir: Ino, name: &str) -> Option<Ino> {
    s.lookup(dir, name.as_bytes()).unwrap().map(|d| d.ino)
}

/// Reads a whole file, fetching what is absent.
async fn read_file(d: &Device, ino: Ino) -> Vec<u8> {
    let size = d.store.node(ino).unwrap().unwrap().size as usize;
    let mut out = vec![0u8; size];
    for (off, e) in d.store.extents(ino, 0, size as u64).unwrap() {
        if !d.store.has_chunk(&e.chunk).unwrap() {
            d.net.fetch(e.chunk, e.len).await.unwrap();
        }
        let data = d.store.chunk(&e.chunk, e.len).unwrap();
        out[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    out
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting until {what}");
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_on_any_device_show_on_all() {
    let devs = cluster(3);
    connect(&devs[0], &devs[1]);
    connect(&devs[1], &devs[2]);
    connect(&devs[2], &devs[0]);
    let content = data(1_000_000, 7);
    write_file(&devs[0].store, ROOT_INO, "hello", &content);
    for d in &devs {
        eventually("every device sees the new file", || {
            lookup(&d.store, ROOT_INO, "hello").is_some()
        })
        .await;
    }
    // Content written on device 0 reads back identical on device 2, fetched over QUIC.
    let ino = lookup(&devs[2].store, ROOT_INO, "hello").unwrap();
    assert!(!devs[2]
        .store
        .has_chunk(&devs[2].store.extents(ino, 0, 1).unwrap()[0].1.chunk)
        .unwrap());
    assert_eq!(read_file(&devs[2], ino).await, content);

    // A directory and a rename on device 1, a delete on device 2.
    let s1 = &devs[1].store;
    let dir = s1
        .commit(false, |tx| {
            tx.create(
                ROOT_INO,
                b"docs",
                NewNode {
                    kind: FileKind::Dir,
                    perm: 0o755,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    target: None,
                },
            )
        })
        .unwrap()
        .0;
    s1.commit(false, |tx| {
        tx.rename(
            ROOT_INO,
            b"hello",
            dir,
            b"hello.txt",
            RenameFlags::default(),
            &|_| false,
        )
    })
    .unwrap();
    write_file(&devs[2].store, ROOT_INO, "scratch", b"temporary");
    for d in &devs {
        eventually("the rename reaches every device", || {
            let Some(docs) = lookup(&d.store, ROOT_INO, "docs") else {
                return false;
            };
            lookup(&d.store, docs, "hello.txt").is_some()
                && lookup(&d.store, ROOT_INO, "hello").is_none()
                && lookup(&d.store, ROOT_INO, "scratch").is_some()
        })
        .await;
    }
    devs[2]
        .store
        .commit(false, |tx| tx.unlink(ROOT_INO, b"scratch", &|_| false))
        .unwrap();
    for d in &devs {
        eventually("the delete reaches every device", || {
            lookup(&d.store, ROOT_INO, "scratch").is_none()
        })
        .await;
    }
    for d in &devs {
        let report = d.store.fsck().unwrap();
        assert!(report.is_clean(), "fsck: {:?}", report.problems);
        assert_eq!(d.store.version_vector(), devs[0].store.version_vector());
    }
    // Shutdown: every task of each network ends (loops first, then the sessions with
    // their connections), and a closed device is no longer reachable.
    for d in &devs {
        d.net.close();
    }
    for d in &devs {
        tokio::time::timeout(Duration::from_secs(5), d.net.closed())
            .await
            .expect("the network's tasks end after close");
        assert!(d.net.peers().is_empty(), "sessions left after close");
    }
}

/// Fetches every absent chunk of a file at once, as a deep read-ahead does.
async fn fetch_all(d: &Device, ino: Ino) {
    let size = d.store.node(ino).unwrap().unwrap().size;
    let mut set = tokio::task::JoinSet::new();
    for (_, e) in d.store.extents(ino, 0, size).unwrap() {
        let net = d.net.clone();
        set.spawn(async move { net.fetch(e.chunk, e.len).await });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
}

/// `from`'s row for `to` in `pvfs-admin peers`.
fn row(from: &Device, to: &Device) -> Option<pvfs_net::sync::PeerInfo> {
    let to = to.net.device().to_string();
    from.net.peers().into_iter().find(|p| p.device == to)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_announce_what_they_hold_and_holders_share_a_large_file() {
    let devs = cluster(3);
    let (a, b, c) = (&devs[0], &devs[1], &devs[2]);
    connect(a, b);
    connect(b, c);
    connect(c, a);
    // 40 chunks written on a, then read by b: both hold them.
    let big = data(4_000_000, 1);
    write_file(&a.store, ROOT_INO, "big", &big);
    eventually("b sees big", || lookup(&b.store, ROOT_INO, "big").is_some()).await;
    fetch_all(b, lookup(&b.store, ROOT_INO, "big").unwrap()).await;
    // 20 more written on b only.
    let mine = data(2_000_000, 2);
    write_file(&b.store, ROOT_INO, "mine", &mine);
    eventually("c sees both files", || {
        lookup(&c.store, ROOT_INO, "mine").is_some() && lookup(&c.store, ROOT_INO, "big").is_some()
    })
    .await;
    let held = |d: &Device| d.store.held_chunks(|_| {}).unwrap();
    assert_eq!((held(a), held(b), held(c)), (40, 60, 0));
    // c learns what each holds: a's filter, and b's filter plus what b fetched and wrote
    // since.
    eventually("c has a's and b's announcements, and a has c's", || {
        row(c, a).and_then(|p| p.holds_chunks) >= Some(40)
            && row(c, b).and_then(|p| p.holds_chunks) >= Some(60)
            && row(a, c).and_then(|p| p.holds_chunks) == Some(0)
    })
    .await;

    // Content only b holds is asked of b alone, although a is connected and idle.
    let ino = lookup(&c.store, ROOT_INO, "mine").unwrap();
    fetch_all(c, ino).await;
    assert_eq!(read_file(c, ino).await, mine);
    assert_eq!(
        row(a, c).unwrap().not_held,
        0,
        "a was asked for chunks it lacks"
    );
    assert_eq!(row(a, c).unwrap().served_bytes, 0);
    // Content both hold comes from both at once.
    let ino = lookup(&c.store, ROOT_INO, "big").unwrap();
    fetch_all(c, ino).await;
    assert_eq!(read_file(c, ino).await, big);
    let (from_a, from_b) = (row(a, c).unwrap(), row(b, c).unwrap());
    assert!(
        from_a.served_bytes > 0 && from_b.served_bytes > 0,
        "one holder served it all: a {} bytes, b {} bytes",
        from_a.served_bytes,
        from_b.served_bytes
    );
    assert_eq!(from_a.not_held + from_b.not_held, 0);
    // And c announces what it fetched.
    eventually("a hears that c holds 60 chunks", || {
        row(a, c).and_then(|p| p.holds_chunks) >= Some(60)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_get_nothing_and_revoked_devices_are_refused() {
    let devs = cluster(2);
    write_file(&devs[0].store, ROOT_INO, "secret", b"for members only");
    // A device with a valid certificate that was never paired: same namespace id even.
    let stranger_cert = Arc::new(cert());
    let stranger_store = Store::in_memory_in(stranger_cert.clone(), OWNER, NS).unwrap();
    for d in &devs {
        stranger_store
            .commit(false, |tx| tx.set_member(d.cert.device(), "victim", true))
            .unwrap();
    }
    let stranger = Net::start(
        stranger_store.clone(),
        &stranger_cert,
        opts(Duration::from_secs(1)),
        no_hooks(),
    )
    .unwrap();
    stranger.add_peer(devs[0].net.local_addr().unwrap().to_string());
    devs[0]
        .net
        .add_peer(stranger.local_addr().unwrap().to_string());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        lookup(&stranger_store, ROOT_INO, "secret").is_none(),
        "not even names"
    );
    assert!(stranger.peers().is_empty());
    assert!(devs[0].net.peers().is_empty());

    // Members connect; then device 1 is removed and refused from then on.
    connect(&devs[1], &devs[0]);
    eventually("members connect", || {
        lookup(&devs[1].store, ROOT_INO, "secret").is_some()
    })
    .await;
    let gone = devs[1].cert.device();
    devs[0]
        .store
        .commit(false, |tx| tx.set_member(gone, "dev1", false))
        .unwrap();
    assert!(!devs[0].store.is_member(&gone).unwrap());
    let probe = Endpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        &devs[1].cert,
        Arc::new(pvfs_net::sync::StoreMembers(devs[1].store.clone())),
    )
    .unwrap();
    let res = probe.connect(devs[0].net.local_addr().unwrap()).await;
    let refused = match res {
        Err(_) => true,
        // The client side may finish before the server's verdict: then the server closes it.
        Ok(p) => tokio::time::timeout(Duration::from_secs(3), p.conn.closed())
            .await
            .is_ok(),
    };
    assert!(refused, "a removed device still gets a connection");
}

/// A member of `devs`' namespace that says Hello properly and answers each `Want` with
/// what `answer` makes of it (`None`: no answer at all); returns its address and how many
/// `Want`s it got.
fn fake_member(
    devs: &[Device],
    answer: fn(Vec<ChunkId>) -> Option<Message>,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let fake_cert = cert();
    for d in devs {
        d.store
            .commit(false, |tx| tx.set_member(fake_cert.device(), "fake", true))
            .unwrap();
    }
    let members = Arc::new(pvfs_net::sync::StoreMembers(devs[0].store.clone()));
    let fake = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &fake_cert, members).unwrap();
    let addr = fake.local_addr().unwrap();
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = asked.clone();
    let device = fake_cert.device();
    tokio::spawn(async move {
        while let Some(p) = fake.accept().await {
            let asked = counter.clone();
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = p.conn.accept_bi().await {
                    let asked = asked.clone();
                    tokio::spawn(async move {
                        while let Ok(Some(m)) = wire::read_message(&mut recv).await {
                            let reply = match m {
                                Message::Hello(_) => Message::Hello(Hello {
                                    protocol: PROTOCOL_VERSION,
                                    device,
                                    namespace: namespace_hash(&NS),
                                    have: Vec::new(),
                                }),
                                Message::Want(ids) => {
                                    asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                    match answer(ids) {
                                        Some(m) => m,
                                        None => continue,
                                    }
                                }
                                _ => continue,
                            };
                            if wire::write_message(&mut send, &reply).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        }
    });
    (addr, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_holder_is_hedged_around_within_the_fetch_deadline() {
    let devs = cluster(2);
    // A member that takes every request and never answers.
    let (silent_addr, asked) = fake_member(&devs, |_| None);
    let (fetch, e, _a2) = fetch_from_a_fake_then_a(&devs, silent_addr, asked, |_| {}).await;
    // Without hedging the fetch would wait for the silent member until its 5 s deadline and
    // fail; it is served by the holder that came back instead.
    fetch.await.unwrap().unwrap();
    let got = devs[1].store.chunk(&e.chunk, e.len).unwrap();
    assert_eq!(ChunkId::of(&got), e.chunk);
}

/// Device 0 writes file "f" and device 1 learns it; then device 0 goes away, device 1
/// connects to the fake member at `fake` only and fetches the file's first chunk, which the
/// fake is asked for (`asked`); `meanwhile` runs, and device 0 comes back (the `Net`
/// returned). Returns the fetch under way and the chunk's extent.
async fn fetch_from_a_fake_then_a(
    devs: &[Device],
    fake: std::net::SocketAddr,
    asked: Arc<std::sync::atomic::AtomicUsize>,
    meanwhile: impl FnOnce(&pvfs_store::ExtentRecord),
) -> (
    tokio::task::JoinHandle<pvfs_net::error::Result<()>>,
    pvfs_store::ExtentRecord,
    Net,
) {
    let (a, b) = (&devs[0], &devs[1]);
    write_file(&a.store, ROOT_INO, "f", &data(300_000, 3));
    connect(b, a);
    eventually("b sees the file", || {
        lookup(&b.store, ROOT_INO, "f").is_some()
    })
    .await;
    let ino = lookup(&b.store, ROOT_INO, "f").unwrap();
    let (_, e) = b.store.extents(ino, 0, 1).unwrap()[0];
    assert!(!b.store.has_chunk(&e.chunk).unwrap());
    a.net.close();
    eventually("b loses a", || b.net.peers().is_empty()).await;
    b.net.connect_once(fake).await.unwrap();
    eventually("b is connected to the fake", || !b.net.peers().is_empty()).await;
    let fetch = tokio::spawn({
        let net = b.net.clone();
        async move { net.fetch(e.chunk, e.len).await }
    });
    eventually("the fake was asked", || {
        asked.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    meanwhile(&e);
    let a2 = Net::start(
        a.store.clone(),
        &a.cert,
        opts(Duration::from_secs(5)),
        no_hooks(),
    )
    .unwrap();
    b.net.connect_once(a2.local_addr().unwrap()).await.unwrap();
    (fetch, e, a2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lying_peer_is_caught_and_another_holder_serves() {
    let devs = cluster(2);
    // The liar: a member that says Hello properly and answers every Want with garbage.
    let (liar_addr, asked) = fake_member(&devs, |ids| {
        Some(Message::Chunk {
            id: ids[0],
            data: Bytes::from(vec![0u8; 100_000]),
        })
    });
    let b = &devs[1];
    let (fetch, e, _a2) = fetch_from_a_fake_then_a(&devs, liar_addr, asked, |e| {
        assert!(
            !b.store.has_chunk(&e.chunk).unwrap(),
            "wrong bytes are never stored"
        );
    })
    .await;
    // The honest holder came back: the same fetch completes from it.
    fetch.await.unwrap().unwrap();
    let got = b.store.chunk(&e.chunk, e.len).unwrap();
    assert_eq!(
        got,
        Bytes::copy_from_slice(&data(300_000, 3)[..e.len as usize])
    );
    assert_eq!(ChunkId::of(&got), e.chunk);
}

/// `keep_elsewhere` from `d`, awaited.
async fn keep(d: &Device, chunks: Vec<(ChunkId, Bytes, u32)>) -> pvfs_store::Result<()> {
    use pvfs_store::ChunkSource;
    let (tx, rx) = tokio::sync::oneshot::channel();
    d.net.keep_elsewhere(
        chunks,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_online_only_device_keeps_its_content_on_another() {
    let devs = cluster(2);
    let (a, b) = (&devs[0], &devs[1]);
    b.store.set_online_only(true);
    // Not connected: nothing takes it, at once.
    let c = PreparedChunk::new(Bytes::from(data(200_000, 7)), true);
    let pushed = (c.id, c.encoded.clone().unwrap(), c.plain.len() as u32);
    assert!(keep(b, vec![pushed.clone()]).await.is_err());
    connect(b, a);
    eventually("b is connected", || b.net.is_connected(a.store.device())).await;
    eventually("a is connected", || a.net.is_connected(b.store.device())).await;

    // A chunk whose bytes do not match its id is refused, and nothing of its message kept.
    let other = PreparedChunk::new(Bytes::from(data(1000, 8)), true);
    let lie = (other.id, pushed.1.clone(), pushed.2);
    let err = keep(b, vec![pushed.clone(), lie]).await.unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    assert!(a.store.stored_chunk(&c.id).unwrap().is_none());
    assert!(a.store.stored_chunk(&other.id).unwrap().is_none());

    // The real thing: A keeps it and serves it before any op references it.
    keep(b, vec![pushed.clone()]).await.unwrap();
    assert!(a.store.stored_chunk(&c.id).unwrap().is_some());
    // B's file references it as absent; A holds it once B's op is there, and B reads it
    // back from A.
    let ino = b
        .store
        .commit(false, |tx| {
            let (ino, _) = tx.create(ROOT_INO, b"thin", regular())?;
            let mut chunk = c.clone();
            chunk.elsewhere = true;
            let len = chunk.plain.len() as u64;
            tx.replace_extents(
                ino,
                (0, len),
                &[NewExtent { offset: 0, chunk }],
                len,
                Timestamp::now(),
            )?;
            Ok(ino)
        })
        .unwrap();
    assert!(!b.store.has_chunk(&c.id).unwrap());
    eventually("A holds B's content", || {
        lookup(&a.store, ROOT_INO, "thin").is_some() && a.store.is_stored(&c.id).unwrap()
    })
    .await;
    assert_eq!(read_file(b, ino).await, c.plain.to_vec());
    // Fetched on an online-only device: readable, not on its disk, not announced.
    assert!(!b.store.is_stored(&c.id).unwrap());
    assert!(b.store.is_readable(&c.id).unwrap());

    // An online-only device keeps nothing for others.
    a.store.set_online_only(true);
    let d = PreparedChunk::new(Bytes::from(data(5000, 9)), true);
    let err = keep(b, vec![(d.id, d.encoded.unwrap(), 5000)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("online-only"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_online_only_device_hands_off_what_it_wrote_alone() {
    let devs = cluster(2);
    let (a, b) = (&devs[0], &devs[1]);
    b.store.set_online_only(true);
    // Written while no device could take it: on B's disk.
    let content = data(700_000, 11);
    let ino = write_file(&b.store, ROOT_INO, "alone", &content);
    assert!(b.store.stats().stored_bytes > 0);
    connect(b, a);
    let ids: Vec<ChunkId> = b
        .store
        .extents(ino, 0, u64::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.chunk)
        .collect();
    eventually("B handed its content to A", || {
        b.store.stats().stored_bytes == 0 && ids.iter().all(|id| a.store.is_stored(id).unwrap())
    })
    .await;
    assert_eq!(read_file(b, ino).await, content);
    assert_eq!(b.store.stats().stored_bytes, 0);
    for d in [a, b] {
        let report = d.store.fsck().unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
    }
}

/// Signs `op` again with `key` (after its fields were changed).
fn resign(op: &mut pvfs_store::OpRecord, key: &DeviceCert) {
    use pvfs_store::Signer;
    op.sig = key.sign(&pvfs_store::sign_message(&NS, &pvfs_store::op_hash(op)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_member_is_refused_op_by_op_and_sync_goes_on() {
    let devs = cluster(2);
    let (a, b) = (&devs[0], &devs[1]);
    connect(b, a);
    // M: a member holding its key, that speaks the wire protocol itself.
    let m_cert = Arc::new(cert());
    let m = m_cert.device();
    for d in [a, b] {
        d.store
            .commit(false, |tx| tx.set_member(m, "mallory", true))
            .unwrap();
    }
    let m_store = Store::in_memory_in(m_cert.clone(), OWNER, NS).unwrap();
    m_store
        .commit(false, |tx| {
            tx.create(ROOT_INO, b"from-m", regular()).map(|_| ())
        })
        .unwrap();
    let m_ops = m_store.ops_after(&Default::default(), usize::MAX).unwrap();
    let m_key: [u8; 32] = pvfs_store::Signer::public_key(&*m_cert).try_into().unwrap();
    let first = m_ops[0].clone();

    let ep = Endpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        &m_cert,
        Arc::new(pvfs_net::sync::StoreMembers(b.store.clone())),
    )
    .unwrap();
    let peer = ep.connect(a.net.local_addr().unwrap()).await.unwrap();
    let (mut send, mut recv) = peer.conn.open_bi().await.unwrap();
    let hello = Message::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        device: m,
        namespace: namespace_hash(&NS),
        have: Vec::new(),
    });
    wire::write_message(&mut send, &hello).await.unwrap();
    // Whatever A sends is read and dropped.
    tokio::spawn(async move { while let Ok(Some(_)) = wire::read_message(&mut recv).await {} });
    let send_ops = |ops: Vec<pvfs_store::OpRecord>| Message::Ops {
        keys: vec![m_key],
        ops,
    };
    // Its genuine op, then: an op in B's name, signed by M.
    wire::write_message(&mut send, &send_ops(m_ops.clone()))
        .await
        .unwrap();
    let mut forged = first.clone();
    forged.id.device = b.cert.device();
    resign(&mut forged, &m_cert);
    wire::write_message(&mut send, &send_ops(vec![forged]))
        .await
        .unwrap();
    // A second op under the id of its first (equivocation).
    let mut twin = first.clone();
    if let pvfs_store::OpKind::Create { name, .. } = &mut twin.kind {
        *name = b"twin".to_vec();
    }
    resign(&mut twin, &m_cert);
    wire::write_message(&mut send, &send_ops(vec![twin]))
        .await
        .unwrap();
    // An op with a clock three hours ahead.
    let mut future = m_ops.last().unwrap().clone();
    future.prev = pvfs_store::op_hash(&future);
    future.id.seq += 1;
    future.hlc = pvfs_store::Hlc(future.hlc.0 + ((3 * 3600 * 1000) << 16));
    resign(&mut future, &m_cert);
    wire::write_message(&mut send, &send_ops(vec![future]))
        .await
        .unwrap();

    eventually("A applies M's genuine op", || {
        lookup(&a.store, ROOT_INO, "from-m").is_some()
    })
    .await;
    eventually("A keeps the evidence", || {
        a.store
            .evidence()
            .unwrap()
            .iter()
            .any(|(d, e)| *d == m && e.proves(&NS, &m_key))
    })
    .await;
    eventually("A shows why it refused M's last op", || {
        a.net.peers().iter().any(|p| {
            p.device == m.to_string()
                && p.last_error.as_deref().is_some_and(|e| e.contains("ahead"))
        })
    })
    .await;
    assert!(lookup(&a.store, ROOT_INO, "twin").is_none());
    // A stream that announces an oversized frame is closed; the connection stays.
    let (mut s2, _r2) = peer.conn.open_bi().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s2, &u32::MAX.to_be_bytes())
        .await
        .unwrap();
    // The honest devices stay in sync, both ways.
    write_file(
        &b.store,
        ROOT_INO,
        "after",
        b"written on B after the attack",
    );
    eventually("A sees B's new file", || {
        lookup(&a.store, ROOT_INO, "after").is_some()
    })
    .await;
    eventually("B gets M's genuine op through A", || {
        lookup(&b.store, ROOT_INO, "from-m").is_some()
    })
    .await;
    assert!(a.net.peers().iter().any(|p| p.device == m.to_string()));
    assert!(lookup(&b.store, ROOT_INO, "twin").is_none());
    for d in [a, b] {
        assert!(d.store.fsck().unwrap().is_clean());
    }
    ep.close();
}
