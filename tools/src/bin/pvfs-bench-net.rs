//! `pvfs-bench-net`: network figures between two devices on 127.0.0.1, in one process, each
//! with its own RocksDB store and QUIC endpoint, against a raw quinn stream measured in the
//! same run.
//!
//! Prints: raw quinn stream MB/s; cold sequential fetch of a file held only by the other
//! device (MB/s and ratio to raw); first chunk of an absent file, p50/p99; time from commit
//! on A to the name being visible on B, p50/p99; initial sync of an N-file namespace to a
//! new device (time, bytes on the wire).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use pvfs_net::sync::{Hooks, Net, NetOptions};
use pvfs_net::tls::DeviceCert;
use pvfs_net::transport::Endpoint;
use pvfs_store::{
    FileKind, NewExtent, NewNode, RootOwner, Store, StoreOptions, Timestamp, ROOT_INO,
};

#[derive(Parser, Debug)]
#[command(
    name = "pvfs-bench-net",
    about = "Network benchmark: pvfs fetch and sync vs raw quinn"
)]
struct Args {
    /// Size of the file read cold, MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Chunks fetched at once (the FUSE read path asks for the next 8 MiB).
    #[arg(long, default_value_t = 128)]
    window: usize,
    /// Files in the namespace synced to a new device.
    #[arg(long, default_value_t = 100_000)]
    files: usize,
    /// Samples for the latency figures.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Where the stores go (default: a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

const NS: [u8; 16] = [7; 16];

fn cert() -> anyhow::Result<DeviceCert> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    Ok(DeviceCert::from_key_pem(&key.serialize_pem())?)
}

struct Dev {
    store: Store,
    net: Net,
    cert: Arc<DeviceCert>,
}

fn device(
    dir: &std::path::Path,
    name: &str,
    members: &[Arc<DeviceCert>],
    me: usize,
) -> anyhow::Result<Dev> {
    let c = members[me].clone();
    let owner = RootOwner { uid: 0, gid: 0 };
    let store = Store::create_in(
        &dir.join(name),
        &StoreOptions::default(),
        c.clone(),
        owner,
        Some(NS),
    )?;
    store.commit(false, |tx| {
        for (i, m) in members.iter().enumerate() {
            tx.set_member(m.device(), &format!("dev{i}"), true)?;
        }
        Ok(())
    })?;
    let opts = NetOptions {
        listen: "127.0.0.1:0".parse()?,
        fetch_timeout: Duration::from_secs(30),
        address_book: None,
    };
    let hooks = Hooks {
        applied: Box::new(|_| {}),
        is_open: Arc::new(|_| false),
    };
    let net = Net::start(store.clone(), &c, opts, hooks)?;
    Ok(Dev {
        store,
        net,
        cert: c,
    })
}

fn new_file() -> NewNode {
    NewNode {
        kind: FileKind::File,
        perm: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
        target: None,
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn random(len: usize, seed: &mut u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for b in out.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        b.copy_from_slice(&seed.to_le_bytes()[..b.len()]);
    }
    out
}

/// Writes a file of `bytes` random bytes on `s`, chunked with FastCDC as the fs does.
fn write_file(
    s: &Store,
    name: &str,
    bytes: u64,
    seed: &mut u64,
) -> anyhow::Result<pvfs_store::Ino> {
    let ino = s.commit(false, |tx| {
        Ok(tx.create(ROOT_INO, name.as_bytes(), new_file())?.0)
    })?;
    let mut off = 0u64;
    while off < bytes {
        let part = (bytes - off).min(64 << 20) as usize;
        let data = Bytes::from(random(part, seed));
        let mut exts = Vec::new();
        let mut pos = 0;
        for len in pvfs_store::cut(&data, true) {
            let chunk = s.prepare(data.slice(pos..pos + len))?;
            exts.push(NewExtent {
                offset: off + pos as u64,
                chunk,
            });
            pos += len;
        }
        let end = off + part as u64;
        s.commit(false, |tx| {
            tx.replace_extents(ino, (off, end), &exts, end, Timestamp::now())
        })?;
        off = end;
    }
    s.sync()?;
    Ok(ino)
}

async fn wait_for<F: Fn() -> bool>(what: &str, f: F) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !f() {
        anyhow::ensure!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(())
}

/// CPU time (user and system) this process has used, in seconds.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return 0.0;
    }
    // SAFETY: zeroed is a valid rusage, and getrusage succeeded.
    let u = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

/// Raw quinn: one stream, `bytes` from server to client, with the same endpoints' config.
async fn raw_quinn(bytes: u64, a: &DeviceCert, b: &DeviceCert) -> anyhow::Result<f64> {
    #[derive(Debug)]
    struct All;
    impl pvfs_net::tls::Members for All {
        fn is_member(&self, _: &pvfs_store::DeviceId) -> bool {
            true
        }
    }
    let server = Endpoint::bind("127.0.0.1:0".parse()?, a, Arc::new(All))?;
    let client = Endpoint::bind("127.0.0.1:0".parse()?, b, Arc::new(All))?;
    let addr = server.local_addr()?;
    let srv = tokio::spawn(async move {
        let p = server.accept().await.context("accept")?;
        let (mut send, mut recv) = p.conn.accept_bi().await?;
        let mut go = [0u8; 1];
        recv.read_exact(&mut go).await?;
        let buf = Bytes::from(vec![0x5au8; 1 << 20]);
        for _ in 0..bytes >> 20 {
            send.write_chunk(buf.clone()).await?;
        }
        send.finish()?;
        p.conn.closed().await;
        anyhow::Ok(())
    });
    let p = client.connect(addr).await?;
    let (mut send, mut recv) = p.conn.open_bi().await?;
    let t = Instant::now();
    send.write_all(&[1]).await?;
    let mut got = 0u64;
    while let Some(c) = recv.read_chunk(1 << 20, true).await? {
        got += c.bytes.len() as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(got == bytes, "raw stream: {got} of {bytes} bytes");
    p.conn.close(0u32.into(), b"done");
    let _ = srv.await;
    Ok(bytes as f64 / secs / 1e6)
}

/// The daemon's allocator and its settings: what is measured is what ships.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    pvfs_tools::tune_malloc();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let certs: Vec<Arc<DeviceCert>> = (0..3)
        .map(|_| cert().map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    let a = device(&dir, "a", &certs, 0)?;
    let b = device(&dir, "b", &certs, 1)?;
    b.net.add_peer(a.net.local_addr()?.to_string());
    let bytes = args.mib << 20;
    let gib = bytes as f64 / f64::from(1u32 << 30);
    let mut seed = 0x1234_5678_9abc_def1u64;

    println!("== raw quinn stream, 127.0.0.1, {} MiB", args.mib);
    let cpu0 = cpu_seconds();
    let raw = raw_quinn(bytes, &a.cert, &b.cert).await?;
    let raw_cpu = (cpu_seconds() - cpu0) / gib;
    println!("raw quinn stream            {raw:>8.0} MB/s  ({raw_cpu:.2} CPU-s per GiB)");

    println!(
        "== cold sequential fetch of a {} MiB file held only by A",
        args.mib
    );
    let s = a.store.clone();
    let ino_a =
        tokio::task::spawn_blocking(move || write_file(&s, "big", bytes, &mut seed)).await??;
    let _ = ino_a;
    wait_for("B sees big", || {
        b.store
            .lookup(ROOT_INO, b"big")
            .ok()
            .flatten()
            .is_some_and(|d| {
                b.store
                    .node(d.ino)
                    .ok()
                    .flatten()
                    .is_some_and(|n| n.size == bytes)
            })
    })
    .await?;
    let ino = b.store.lookup(ROOT_INO, b"big")?.context("big")?.ino;
    let extents = b.store.extents(ino, 0, bytes)?;
    eprintln!("fetching");
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    let mut inflight = tokio::task::JoinSet::new();
    for (_, e) in &extents {
        while inflight.len() >= args.window {
            inflight.join_next().await.context("join")???;
        }
        let net = b.net.clone();
        let (id, len) = (e.chunk, e.len);
        inflight.spawn(async move { anyhow::Ok(net.fetch(id, len).await?) });
    }
    while let Some(r) = inflight.join_next().await {
        r??;
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let fetch = bytes as f64 / secs / 1e6;
    println!(
        "pvfs fetch ({} chunks, window {})  {fetch:>8.0} MB/s  = {:.2}x raw quinn  ({:.2} CPU-s per GiB, both devices)",
        extents.len(),
        args.window,
        fetch / raw,
        cpu / gib
    );

    println!(
        "== first chunk of an absent 4 KiB file ({} samples)",
        args.samples
    );
    let mut firsts = Vec::new();
    for i in 0..args.samples {
        let name = format!("small{i}");
        let s = a.store.clone();
        let mut sd = seed ^ i as u64;
        let n = name.clone();
        tokio::task::spawn_blocking(move || write_file(&s, &n, 4096, &mut sd)).await??;
        wait_for("small visible", || {
            b.store
                .lookup(ROOT_INO, name.as_bytes())
                .ok()
                .flatten()
                .is_some_and(|d| {
                    b.store
                        .node(d.ino)
                        .ok()
                        .flatten()
                        .is_some_and(|n| n.size == 4096)
                })
        })
        .await?;
        let ino = b
            .store
            .lookup(ROOT_INO, name.as_bytes())?
            .context("small")?
            .ino;
        let (_, e) = b.store.extents(ino, 0, 4096)?[0];
        let t = Instant::now();
        b.net.fetch(e.chunk, e.len).await?;
        let _ = b.store.chunk(&e.chunk, e.len)?;
        firsts.push(t.elapsed());
    }
    println!(
        "first byte of 4 KiB           p50 {:?}  p99 {:?}",
        percentile(&mut firsts, 0.5),
        percentile(&mut firsts, 0.99)
    );

    println!(
        "== commit on A -> name visible on B ({} samples)",
        args.samples
    );
    let mut vis = Vec::new();
    for i in 0..args.samples {
        let name = format!("vis{i}");
        let s = a.store.clone();
        let n = name.clone();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || {
            s.commit(false, |tx| {
                tx.create(ROOT_INO, n.as_bytes(), new_file()).map(|_| ())
            })
        })
        .await??;
        wait_for("visible", || {
            b.store
                .lookup(ROOT_INO, name.as_bytes())
                .ok()
                .flatten()
                .is_some()
        })
        .await?;
        vis.push(t.elapsed());
    }
    println!(
        "name visible on B             p50 {:?}  p99 {:?}",
        percentile(&mut vis, 0.5),
        percentile(&mut vis, 0.99)
    );

    println!(
        "== initial sync of a {}-file namespace to a new device",
        args.files
    );
    let s = a.store.clone();
    let files = args.files;
    tokio::task::spawn_blocking(move || {
        let mut made = 0;
        while made < files {
            let n = (files - made).min(1000);
            s.commit(false, |tx| {
                let d = tx
                    .create(
                        ROOT_INO,
                        format!("d{made}").as_bytes(),
                        NewNode {
                            kind: FileKind::Dir,
                            perm: 0o755,
                            ..new_file()
                        },
                    )?
                    .0;
                for j in 0..n {
                    tx.create(d, format!("f{j}").as_bytes(), new_file())?;
                }
                Ok(())
            })?;
            made += n;
        }
        s.sync()
    })
    .await??;
    // What signing and checking ops costs, on one core: A's own ops (creates).
    let sample = a.store.ops(a.store.writer(), 1, 20_000)?;
    let key: [u8; 32] = pvfs_store::Signer::public_key(&*a.cert)
        .try_into()
        .map_err(|_| anyhow::anyhow!("not an Ed25519 key"))?;
    let t = Instant::now();
    for op in &sample {
        let msg = pvfs_store::sign_message(&NS, &pvfs_store::op_hash(op));
        std::hint::black_box(pvfs_store::Signer::sign(&*a.cert, &msg));
    }
    let sign_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for op in &sample {
        pvfs_store::verify_op(&NS, &key, op)?;
    }
    let verify_s = t.elapsed().as_secs_f64();
    println!(
        "op signatures (one core)      sign {:.0} ops/s, hash+verify {:.0} ops/s ({} ops)",
        sample.len() as f64 / sign_s,
        sample.len() as f64 / verify_s,
        sample.len()
    );
    let c = device(&dir, "c", &certs, 2)?;
    let want = a.store.version_vector();
    let t = Instant::now();
    c.net.add_peer(a.net.local_addr()?.to_string());
    wait_for("c caught up", || {
        let have = c.store.version_vector();
        want.iter()
            .all(|(d, s)| have.get(d).is_some_and(|h| h >= s))
    })
    .await?;
    let secs = t.elapsed().as_secs_f64();
    let ops: u64 = want.values().sum();
    let c_dev = c.cert.device().to_string();
    let wire: u64 = a
        .net
        .peers()
        .iter()
        .filter(|p| p.device == c_dev)
        .map(|p| p.bytes_sent)
        .sum();
    println!(
        "initial sync                  {secs:.2} s, {ops} ops, {:.1} MB sent by A ({} files, {:.0} files/s)",
        wire as f64 / 1e6,
        files,
        files as f64 / secs
    );
    let rss = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .map(str::to_string)
        .unwrap_or_default();
    println!("peak resident memory of this process (3 devices): {rss}");
    Ok(())
}
