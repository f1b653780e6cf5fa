//! A member turned hostile: it holds a member's key, speaks QUIC with the device's own
//! transport, and floods a device with streams that each announce a frame as large as the
//! wire allows and feed it as fast as flow control lets them, on as many connections as it
//! may open (and one more), plus frames over the size limit. The device and its honest peer
//! stay in sync, the device names the offender in its log, and its memory grows by no more
//! than its documented bound per member device.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pvfs_net::sync::MAX_CONNECTIONS_PER_DEVICE;
use pvfs_net::tls::{DeviceCert, Members};
use pvfs_net::transport::{Endpoint, CONN_RECEIVE_WINDOW};
use pvfs_net::wire::{MAX_FRAME, PEER_FRAME_BUDGET};
use pvfs_store::DeviceId;
use pvfs_tests::{join_through, wait_until, Daemon, Scratch};

/// The hostile client trusts whatever it reaches.
#[derive(Debug)]
struct Anyone;

impl Members for Anyone {
    fn is_member(&self, _: &DeviceId) -> bool {
        true
    }
}

/// A field of `/proc/<pid>/status` in KiB (VmRSS, VmHWM).
fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Opens `MAX_CONNECTIONS_PER_DEVICE + 1` connections to `addr` as `cert` (the device closes
/// the oldest), and on each as many streams as the device allows, each announcing a
/// `MAX_FRAME` frame (one in eight an oversized one) and sending garbage until `stop`.
/// Returns how many connections the device kept open.
async fn flood(cert: DeviceCert, addr: std::net::SocketAddr, stop: Arc<AtomicBool>) -> usize {
    let ep = Endpoint::bind("127.0.0.1:0".parse().unwrap(), &cert, Arc::new(Anyone))
        .expect("bind the hostile endpoint");
    let mut conns = Vec::new();
    for _ in 0..=MAX_CONNECTIONS_PER_DEVICE {
        let peer = ep.connect(addr).await.expect("the hostile member connects");
        for i in 0..256u32 {
            let Ok((mut send, _recv)) = peer.conn.open_bi().await else {
                break;
            };
            let stop = stop.clone();
            tokio::spawn(async move {
                let len = if i % 8 == 7 { MAX_FRAME + 1 } else { MAX_FRAME };
                let _ = send.write_all(&(len as u32).to_be_bytes()).await;
                let junk = vec![0x55u8; 64 << 10];
                while !stop.load(Ordering::Relaxed) {
                    if send.write_all(&junk).await.is_err() {
                        break;
                    }
                }
                // Keep the stream (and its announced frame) open until the end.
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
        conns.push(peer);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open = conns
        .iter()
        .filter(|p| p.conn.close_reason().is_none())
        .count();
    ep.close();
    open
}

/// Devices A and B in sync, and a third member, the hostile one, joined through A with no
/// daemon of its own (its data directory holds its key and store).
struct Trio {
    a: Scratch,
    b: Scratch,
    h: Scratch,
    da: Daemon,
    db: Daemon,
    listen_a: String,
}

impl Trio {
    fn start() -> Trio {
        let (a, b, h) = (Scratch::new(), Scratch::new(), Scratch::new());
        let da = Daemon::start(&a.data(), &a.mnt());
        let listen_a = da.listen_addr();
        join_through(&da, &b.data(), "bee");
        let db = Daemon::try_start(&b.data(), &b.mnt(), &["--peer", &listen_a])
            .unwrap_or_else(|e| panic!("{e}"));
        join_through(&da, &h.data(), "hostile");
        let t = Trio {
            a,
            b,
            h,
            da,
            db,
            listen_a,
        };
        assert!(t.synced("before.txt", b"before"), "B: {}", t.db.log_text());
        t
    }

    /// Writes `name` on A; true once B reads the same.
    fn synced(&self, name: &str, content: &[u8]) -> bool {
        std::fs::write(self.a.mnt().join(name), content).unwrap();
        wait_until(Duration::from_secs(30), || {
            std::fs::read(self.b.mnt().join(name)).is_ok_and(|d| d == content)
        })
    }

    /// The hostile member's key.
    fn hostile_key(&self) -> String {
        std::fs::read_to_string(self.h.data().join("identity.pem")).expect("identity")
    }
}

#[test]
fn a_flooding_member_neither_stalls_sync_nor_exhausts_memory() {
    let t = Trio::start();
    let (da, db) = (&t.da, &t.db);
    let cert = DeviceCert::from_key_pem(&t.hostile_key()).expect("the hostile member's key");
    let hostile = cert.device();
    let rss_before = vm_kib(da.pid(), "VmRSS");

    let stop = Arc::new(AtomicBool::new(false));
    let addr = t.listen_a.parse().expect("A's address");
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(flood(cert, addr, stop))
        })
    };
    // Under the flood: changes on A still reach B, and A's memory is sampled.
    let started = Instant::now();
    let mut peak = rss_before;
    std::thread::sleep(Duration::from_secs(2));
    let during = t.synced("during.txt", b"written under the flood");
    while started.elapsed() < Duration::from_secs(8) {
        peak = peak.max(vm_kib(da.pid(), "VmRSS"));
        std::thread::sleep(Duration::from_millis(100));
    }
    peak = peak.max(vm_kib(da.pid(), "VmRSS"));
    stop.store(true, Ordering::Relaxed);
    let kept = flooder.join().expect("the flooder");
    assert!(during, "A -> B under the flood\nA: {}", da.log_text());

    // Its live connections, and one it replaced whose memory is given back as its tasks
    // end.
    let bound_kib = ((MAX_CONNECTIONS_PER_DEVICE + 1)
        * (CONN_RECEIVE_WINDOW as usize + PEER_FRAME_BUDGET)) as u64
        >> 10;
    let grew = peak.saturating_sub(rss_before);
    eprintln!(
        "A's resident memory: {rss_before} KiB before, peak {peak} KiB under the flood \
         (+{grew} KiB; documented bound per member device {bound_kib} KiB)"
    );
    // The bound, plus room for the allocator and the decoded requests of 768 streams.
    assert!(
        grew < bound_kib + (32 << 10),
        "A grew by {grew} KiB under the flood (bound {bound_kib} KiB)"
    );
    assert!(
        kept <= MAX_CONNECTIONS_PER_DEVICE,
        "A kept {kept} connections of one device"
    );
    let log = da.log_text();
    let named = log.lines().any(|l| {
        l.contains(&hostile.fmt_short()) && (l.contains("stream:") || l.contains("replaces"))
    });
    assert!(named, "A's log does not name the offender:\n{log}");
    assert!(t.synced("after.txt", b"after"), "B: {}", db.log_text());
}

/// Signs `op` again with `key` for `namespace` (after its fields were changed).
fn resign(op: &mut pvfs_store::OpRecord, key: &DeviceCert, namespace: &[u8; 16]) {
    use pvfs_store::Signer;
    op.sig = key.sign(&pvfs_store::sign_message(
        namespace,
        &pvfs_store::op_hash(op),
    ));
}

/// The same member speaks the sync protocol and sends ops of every bad kind on its sync
/// stream: equivocating, forged in another device's name, far-future, backdated behind its
/// own previous op, malformed (a name with `/`), and at last a message over the wire's
/// limits. A keeps its valid op, refuses the rest, keeps the equivocation's evidence and
/// shows it in `pvfs-admin status`, and A and B stay in sync with clean stores.
#[test]
fn a_hostile_members_bad_ops_are_refused_and_reported() {
    use pvfs_net::sync::namespace_hash;
    use pvfs_net::wire::{write_message, Hello, Message, MAX_OPS, PROTOCOL_VERSION};
    use pvfs_store::{FileKind, Hlc, NewNode, OpKind, Store, StoreOptions, ROOT_INO};

    let t = Trio::start();
    let (a, b, h, da, db) = (&t.a, &t.b, &t.h, &t.da, &t.db);
    // A learns B's key from B's ops, so that an op forged in B's name fails on its signature.
    std::fs::write(b.mnt().join("from-b.txt"), b"b").unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || a
            .mnt()
            .join("from-b.txt")
            .exists()),
        "A: {}",
        da.log_text()
    );

    // The hostile member's own store makes one valid op; the rest are made from it.
    let pem = t.hostile_key();
    let cert = DeviceCert::from_key_pem(&pem).expect("key");
    let signer = Arc::new(DeviceCert::from_key_pem(&pem).expect("key"));
    let store = Store::open(&h.data(), &StoreOptions::default(), Some(signer)).expect("open");
    let ns = store.namespace();
    let new = NewNode {
        kind: FileKind::File,
        perm: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
        target: None,
    };
    store
        .commit(true, |tx| tx.create(ROOT_INO, b"hostile.txt", new))
        .expect("a valid op");
    let op1 = store
        .ops(store.writer(), 1, 1)
        .unwrap()
        .pop()
        .expect("op 1");
    let hostile = cert.device();
    let key: [u8; pvfs_store::KEY_LEN] = {
        use pvfs_store::Signer;
        cert.public_key().try_into().unwrap()
    };
    let rename = |op: &mut pvfs_store::OpRecord, to: &[u8]| {
        if let OpKind::Create { name, .. } = &mut op.kind {
            *name = to.to_vec();
        }
    };
    let mut twin = op1.clone();
    rename(&mut twin, b"twin.txt");
    resign(&mut twin, &cert, &ns);
    // Each bad op under a writer of its own, so that A reports each refusal.
    let bad = |writer: Option<u64>, hlc: u64, name: &[u8]| {
        let mut op = op1.clone();
        match writer {
            // A new writer of the hostile device: its first op.
            Some(incarnation) => {
                op.id.incarnation = incarnation;
                op.prev = pvfs_store::GENESIS;
            }
            // The next op of op1's writer.
            None => {
                op.id.seq = 2;
                op.prev = pvfs_store::op_hash(&op1);
            }
        }
        op.hlc = Hlc(hlc);
        if let OpKind::Create { node, .. } = &mut op.kind {
            node.0 ^= u128::from(hlc);
        }
        rename(&mut op, name);
        resign(&mut op, &cert, &ns);
        op
    };
    let far = bad(
        Some(11),
        op1.hlc.0 + ((3 * 3600 * 1000) << 16),
        b"future.txt",
    );
    let back = bad(None, op1.hlc.0 - (1 << 16), b"backdated.txt");
    let bad_name = bad(Some(12), op1.hlc.0 + 1, b"a/b");
    // In B's name, signed by the hostile key.
    let mut forged = bad(Some(13), op1.hlc.0 + 2, b"forged.txt");
    forged.id.device = {
        let pem_b = std::fs::read_to_string(b.data().join("identity.pem")).unwrap();
        DeviceCert::from_key_pem(&pem_b).unwrap().device()
    };
    resign(&mut forged, &cert, &ns);
    drop(store);

    let addr: std::net::SocketAddr = t.listen_a.parse().unwrap();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let ep =
                Endpoint::bind("127.0.0.1:0".parse().unwrap(), &cert, Arc::new(Anyone)).unwrap();
            let peer = ep.connect(addr).await.expect("connect");
            let (mut send, mut recv) = peer.conn.open_bi().await.unwrap();
            let hello = Message::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                device: cert.device(),
                namespace: namespace_hash(&ns),
                have: Vec::new(),
            });
            write_message(&mut send, &hello).await.unwrap();
            // Drain what A sends, so that its pushes never wait on this stream.
            tokio::spawn(async move {
                while let Ok(Some(_)) = pvfs_net::wire::read_message(&mut recv).await {}
            });
            for ops in [
                vec![op1.clone()],
                vec![twin],
                vec![forged],
                vec![far],
                vec![back],
                vec![bad_name],
            ] {
                let msg = Message::Ops {
                    keys: vec![key],
                    ops,
                };
                write_message(&mut send, &msg).await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let flood = Message::Ops {
                keys: vec![key],
                ops: vec![op1; MAX_OPS + 1],
            };
            let _ = write_message(&mut send, &flood).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            ep.close();
        });

    let exists = |name: &str| a.mnt().join(name).exists() || b.mnt().join(name).exists();
    assert!(
        wait_until(Duration::from_secs(20), || b
            .mnt()
            .join("hostile.txt")
            .exists()),
        "the hostile member's valid op reaches B\nA: {}",
        da.log_text()
    );
    for name in ["twin.txt", "future.txt", "backdated.txt", "forged.txt"] {
        assert!(!exists(name), "{name} was applied\nA: {}", da.log_text());
    }
    let status = da.admin(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("WARNING") && text.contains(&hostile.fmt_short()),
        "status does not report the equivocation:\n{text}"
    );
    let log = da.log_text();
    for why in [
        "two different ops under one id",
        "a bad signature",
        "more than an hour ahead",
        "backdated",
        "name",
    ] {
        assert!(log.contains(why), "A's log does not say {why:?}:\n{log}");
    }
    assert!(t.synced("after.txt", b"after"), "B: {}", db.log_text());
    drop(t.db);
    drop(t.da);
    pvfs_tests::assert_fsck_clean(&t.a.data());
    pvfs_tests::assert_fsck_clean(&t.b.data());
}
