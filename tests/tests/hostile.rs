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

/// Opens `MAX_CONNECTIONS_PER_DEVICE + 1` connections to `addr` as `cert`, and on each as
/// many streams as the device allows, each announcing a `MAX_FRAME` frame (one in eight an
/// oversized one) and sending garbage until `stop`. Returns how many connections the device
/// kept open.
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

#[test]
fn a_flooding_member_neither_stalls_sync_nor_exhausts_memory() {
    let (a, b, h) = (Scratch::new(), Scratch::new(), Scratch::new());
    let da = Daemon::start(&a.data(), &a.mnt());
    let listen_a = da.listen_addr();
    join_through(&da, &b.data(), "bee");
    let db = Daemon::try_start(&b.data(), &b.mnt(), &["--peer", &listen_a])
        .unwrap_or_else(|e| panic!("{e}"));
    // The hostile member: a device joined like any other, with no daemon of its own.
    join_through(&da, &h.data(), "hostile");
    let pem = std::fs::read_to_string(h.data().join("identity.pem")).expect("identity");
    let cert = DeviceCert::from_key_pem(&pem).expect("the hostile member's key");
    let hostile = cert.device();

    let synced = |name: &str, content: &[u8]| {
        std::fs::write(a.mnt().join(name), content).unwrap();
        wait_until(Duration::from_secs(30), || {
            std::fs::read(b.mnt().join(name)).is_ok_and(|d| d == content)
        })
    };
    assert!(synced("before.txt", b"before"), "B: {}", db.log_text());
    let rss_before = vm_kib(da.pid(), "VmRSS");

    let stop = Arc::new(AtomicBool::new(false));
    let addr = listen_a.parse().expect("A's address");
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
    let during = synced("during.txt", b"written under the flood");
    while started.elapsed() < Duration::from_secs(8) {
        peak = peak.max(vm_kib(da.pid(), "VmRSS"));
        std::thread::sleep(Duration::from_millis(100));
    }
    peak = peak.max(vm_kib(da.pid(), "VmRSS"));
    stop.store(true, Ordering::Relaxed);
    let kept = flooder.join().expect("the flooder");
    assert!(during, "A -> B under the flood\nA: {}", da.log_text());

    let bound_kib = (MAX_CONNECTIONS_PER_DEVICE
        * (CONN_RECEIVE_WINDOW as usize + PEER_FRAME_BUDGET)) as u64
        >> 10;
    let grew = peak.saturating_sub(rss_before);
    eprintln!(
        "A's resident memory: {rss_before} KiB before, peak {peak} KiB under the flood \
         (+{grew} KiB; documented bound per member device {bound_kib} KiB)"
    );
    // The bound, plus room for the allocator and the decoded requests of 512 streams.
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
        l.contains(&hostile.fmt_short()) && (l.contains("stream:") || l.contains("too many"))
    });
    assert!(named, "A's log does not name the offender:\n{log}");
    assert!(synced("after.txt", b"after"), "B: {}", db.log_text());
}
