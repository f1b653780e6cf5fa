//! Crash safety: writers that fsync while the daemon is killed with SIGKILL at random points.
//! After each kill: `fusermount3 -u -z`, an offline `pvfs-admin fsck`, a remount, and every
//! fsynced byte must read back identical.
//!
//! Rounds: `PVFS_CRASH_ROUNDS` (default 20). Seed: `PVFS_CRASH_SEED` (printed).

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pvfs_tests::{assert_fsck_clean, Daemon, Scratch};
use rand::{Rng, RngCore, SeedableRng};

/// The deterministic content stream of a file version.
fn stream(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut out);
    out
}

/// What a file must hold after a crash: content stream `seed`, at least `len` bytes of it.
/// `pending` is a replacement that may or may not have become durable.
#[derive(Clone, Debug, Default)]
struct Expect {
    committed: Option<(u64, usize)>,
    pending: Option<Option<(u64, usize)>>,
}

type Journal = Arc<Mutex<HashMap<String, Expect>>>;

fn check_one(path: &Path, want: Option<(u64, usize)>) -> Result<(), String> {
    match (fs::File::open(path), want) {
        (Err(_), None) => Ok(()),
        (Ok(_), None) => Err("exists but should not".into()),
        (Err(e), Some(_)) => Err(format!("missing: {e}")),
        (Ok(mut f), Some((seed, len))) => {
            let mut got = Vec::new();
            f.read_to_end(&mut got).map_err(|e| format!("read: {e}"))?;
            if got.len() < len {
                return Err(format!("{} bytes, but {len} were fsynced", got.len()));
            }
            // Appends follow the stream, so the whole file must be a prefix of it.
            if got != stream(seed, got.len()) {
                return Err(format!(
                    "content differs from what was written ({} bytes)",
                    got.len()
                ));
            }
            Ok(())
        }
    }
}

fn verify(mnt: &Path, journal: &Journal) {
    let mut j = journal.lock().unwrap();
    for (name, e) in j.iter_mut() {
        let path = mnt.join("crash").join(name);
        let first = check_one(&path, e.committed);
        let res = match (&first, e.pending) {
            (Err(_), Some(p)) => check_one(&path, p).map(|()| e.committed = p),
            _ => first.clone(),
        };
        if let Err(msg) = res {
            panic!("{name}: {msg} (expected {:?})", e);
        }
        e.pending = None;
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Writes until the mount dies; journals every state that an fsync made durable.
fn writer(dir: PathBuf, journal: Journal, seed: u64) -> std::io::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    loop {
        let name = format!("f{}", rng.random_range(0..4));
        let path = dir.join(&name);
        let cur = journal.lock().unwrap().get(&name).and_then(|e| e.committed);
        match (cur, rng.random_range(0..10)) {
            (Some((s, len)), 0..=6) if len < (24 << 20) => {
                // Append the next piece of the stream and fsync it.
                let add = rng.random_range(1..(2 << 20));
                let data = stream(s, len + add);
                let mut f = fs::OpenOptions::new().write(true).open(&path)?;
                let on_disk = f.metadata()?.len() as usize;
                use std::io::Seek;
                f.seek(std::io::SeekFrom::Start(on_disk.min(len + add) as u64))?;
                f.write_all(&data[on_disk.min(len + add)..])?;
                f.sync_all()?;
                journal.lock().unwrap().entry(name).or_default().committed = Some((s, len + add));
            }
            (Some(_), 7) => {
                // Delete, then make the delete durable.
                journal
                    .lock()
                    .unwrap()
                    .entry(name.clone())
                    .or_default()
                    .pending = Some(None);
                fs::remove_file(&path)?;
                fsync_dir(&dir)?;
                let mut j = journal.lock().unwrap();
                let e = j.entry(name).or_default();
                e.committed = None;
                e.pending = None;
            }
            _ => {
                // Editor-style atomic save of a new version.
                let s = rng.random();
                let len = rng.random_range(0..(3 << 20));
                let tmp = dir.join(format!(".{name}.tmp"));
                let mut f = fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .mode(0o644)
                    .open(&tmp)?;
                f.write_all(&stream(s, len))?;
                f.sync_all()?;
                drop(f);
                journal
                    .lock()
                    .unwrap()
                    .entry(name.clone())
                    .or_default()
                    .pending = Some(Some((s, len)));
                fs::rename(&tmp, &path)?;
                fsync_dir(&dir)?;
                let mut j = journal.lock().unwrap();
                let e = j.entry(name).or_default();
                e.committed = Some((s, len));
                e.pending = None;
            }
        }
    }
}

#[test]
fn fsynced_data_survives_sigkill() {
    let rounds: usize = std::env::var("PVFS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("PVFS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("PVFS_CRASH_SEED={seed} rounds={rounds}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let s = Scratch::new();
    let journal: Journal = Arc::default();
    for round in 0..rounds {
        let d = Daemon::start(&s.data(), &s.mnt());
        let dir = s.mnt().join("crash");
        fs::create_dir_all(&dir).unwrap();
        verify(&s.mnt(), &journal);
        let (j, wseed) = (journal.clone(), rng.random());
        let w = std::thread::spawn(move || writer(dir, j, wseed));
        std::thread::sleep(Duration::from_millis(rng.random_range(30..1500)));
        d.kill();
        let res = w.join().expect("writer thread");
        assert!(res.is_err(), "the writer stops when the daemon dies");
        assert_fsck_clean(&s.data());
        println!("round {round}: killed; fsck clean");
    }
    let d = Daemon::start(&s.data(), &s.mnt());
    verify(&s.mnt(), &journal);
    let n = journal
        .lock()
        .unwrap()
        .values()
        .filter(|e| e.committed.is_some())
        .count();
    println!("{n} files verified after {rounds} crashes");
    drop(d);
}
