//! Two real `pvfs mount` processes on 127.0.0.1, paired with `pvfs-admin invite` and
//! `pvfs join`, connected by `--peer`: a file written on A is read byte-identical through B's
//! mount (fetched from A on demand); names show on the other side at once; apps.sh passes on
//! B's mount while it syncs with A; a reused token is refused.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use pvfs_tests::{admin, assert_fsck_clean, pvfs, shared, wait_until, Daemon, Scratch};

/// A deterministic pseudo-random stream (xorshift), so that no two chunks are equal.
fn fill(buf: &mut [u8], state: &mut u64) {
    for b in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let v = state.to_le_bytes();
        b.copy_from_slice(&v[..b.len()]);
    }
}

fn hash_file(path: &std::path::Path) -> blake3::Hash {
    let mut f = std::fs::File::open(path).expect("open");
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize()
}

/// Starts A, invites B, joins B and starts it connected to A by `--peer`.
fn pair(a: &Scratch, b: &Scratch) -> (Daemon, Daemon, String) {
    let (da, db, token, _) = pair_with(a, b, "");
    (da, db, token)
}

/// Like `pair`, with extra lines for the `[net]` table of B's config.
fn pair_with(a: &Scratch, b: &Scratch, b_net: &str) -> (Daemon, Daemon, String, String) {
    // Port 0, then the port A got: a port picked here could be taken before A binds it.
    let da = Daemon::try_start(&a.data(), &a.mnt(), &[]).unwrap();
    let listen = da.listen_addr();
    let out = da.admin(&["invite"]);
    assert!(
        out.status.success(),
        "invite: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(token.lines().count(), 1, "one line: {token:?}");
    let data_b = b.data();
    let out = pvfs(&[
        OsStr::new("join"),
        OsStr::new(&token),
        OsStr::new("--data"),
        data_b.as_os_str(),
        OsStr::new("--name"),
        OsStr::new("bee"),
    ]);
    assert!(
        out.status.success(),
        "join: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !b_net.is_empty() {
        // `pvfs join` wrote `[net]` last: these lines go into it.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(b.data().join("config.toml"))
            .unwrap();
        writeln!(f, "{b_net}").unwrap();
    }
    let db = Daemon::try_start(&b.data(), &b.mnt(), &["--peer", &listen]).unwrap();
    (da, db, token, listen)
}

#[test]
fn a_file_written_on_a_reads_identical_through_b() {
    let (a, b) = (Scratch::new(), Scratch::new());
    let (da, db, token) = pair(&a, &b);

    // A used token is refused, and so is garbage.
    let c = Scratch::new();
    let data_c = c.data();
    for t in [token.as_str(), "pvfs1-garbage"] {
        let out = pvfs(&[
            OsStr::new("join"),
            OsStr::new(t),
            OsStr::new("--data"),
            data_c.as_os_str(),
        ]);
        assert!(!out.status.success(), "token {t} accepted twice");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
        let _ = std::fs::remove_dir_all(&data_c);
    }

    // Names: visible on B soon after close() on A.
    let started = Instant::now();
    std::fs::write(a.mnt().join("note.txt"), b"written on A\n").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read(
            b.mnt().join("note.txt")
        )
        .is_ok_and(|d| d == b"written on A\n")),
        "B never saw the file\nA: {}\nB: {}",
        da.log_text(),
        db.log_text()
    );
    println!(
        "name and content visible on B after {:?}",
        started.elapsed()
    );

    // 256 MiB written on A, read through B's mount: fetched from A, identical.
    let size: u64 = 256 << 20;
    let big_a = a.mnt().join("big.bin");
    {
        let mut f = std::fs::File::create(&big_a).unwrap();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut buf = vec![0u8; 4 << 20];
        for _ in 0..size / buf.len() as u64 {
            fill(&mut buf, &mut state);
            f.write_all(&buf).unwrap();
        }
        f.sync_all().unwrap();
    }
    let want = hash_file(&big_a);
    let big_b = b.mnt().join("big.bin");
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::metadata(&big_b)
            .is_ok_and(|m| m.len() == size)),
        "B never saw the whole file"
    );
    let big_b_str = big_b.to_string_lossy().to_string();
    let out = db.admin(&["--json", "where", &big_b_str]);
    assert!(
        out.status.success(),
        "where: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let where_b = String::from_utf8_lossy(&out.stdout).to_string();
    let v: serde_json::Value = serde_json::from_str(&where_b).expect("where json");
    let here = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["this_device"].as_bool() == Some(true))
        .unwrap()["bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(here, 0, "B holds none of it before reading: {where_b}");
    let t = Instant::now();
    assert_eq!(hash_file(&big_b), want, "B read different bytes");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "cold read of 256 MiB through B: {:.2} s, {:.0} MB/s",
        secs,
        size as f64 / secs / 1e6
    );
    let peers = String::from_utf8_lossy(&db.admin(&["peers"]).stdout).to_string();
    println!("pvfs-admin peers on B:\n{peers}");

    // Renames and deletes on B show on A.
    std::fs::rename(b.mnt().join("note.txt"), b.mnt().join("renamed.txt")).unwrap();
    std::fs::remove_file(b.mnt().join("big.bin")).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || {
            a.mnt().join("renamed.txt").exists()
                && !a.mnt().join("note.txt").exists()
                && !a.mnt().join("big.bin").exists()
        }),
        "A never saw B's rename and delete"
    );
    drop(db);
    drop(da);
    assert_fsck_clean(&a.data());
    assert_fsck_clean(&b.data());
}

#[test]
fn apps_sh_passes_on_b_while_it_syncs_with_a() {
    let (a, b) = (Scratch::new(), Scratch::new());
    let (da, db, _) = pair(&a, &b);
    let scratch = b.dir.path().join("apps-scratch");
    let out = Command::new("bash")
        .arg(shared().join("fstests/apps.sh"))
        .arg(b.mnt())
        .env("APPS_SCRATCH", &scratch)
        .env("APPS_KEEP", "1")
        .output()
        .expect("run apps.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    let summary = stdout.lines().last().unwrap_or_default().to_string();
    // With APPS_KEEP the final rm -rf check is skipped: 11 checks.
    assert!(
        out.status.success() && summary == "11 passed, 0 failed",
        "apps.sh on B: {summary}\n{}\nB: {}",
        String::from_utf8_lossy(&out.stderr),
        db.log_text()
    );
    // Everything apps.sh left on B reaches A; A reads it from B's store (A holds none of
    // it): a full tree walk comparing every file's bytes.
    let work = std::fs::read_dir(b.mnt())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("apps-work"))
        .expect("apps.sh work dir kept")
        .file_name();
    let compare = || {
        Command::new("rsync")
            .args([
                "-a",
                "--dry-run",
                "--checksum",
                "--itemize-changes",
                "--delete",
            ])
            .arg(format!("{}/", b.mnt().join(&work).display()))
            .arg(format!("{}/", a.mnt().join(&work).display()))
            .output()
            .expect("rsync")
    };
    let ok = wait_until(Duration::from_secs(60), || {
        let o = compare();
        o.status.success() && o.stdout.is_empty()
    });
    let out = compare();
    assert!(
        ok,
        "A's copy of apps.sh's work differs from B's:\n{}{}\nA: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        da.log_text()
    );
    let _ = admin(&a.data(), &["peers"]);
    drop(db);
    drop(da);
    assert_fsck_clean(&a.data());
    assert_fsck_clean(&b.data());
}

#[test]
fn expired_tokens_unreachable_content_and_removed_devices() {
    let (a, b) = (Scratch::new(), Scratch::new());
    let (da, db, _, listen_a) = pair_with(&a, &b, "fetch_timeout_secs = 3");

    // An expired token is refused.
    let out = da.admin(&["invite", "--ttl", "1"]);
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::thread::sleep(Duration::from_millis(2100));
    let c = Scratch::new();
    let data_c = c.data();
    let out = pvfs(&[
        OsStr::new("join"),
        OsStr::new(&token),
        OsStr::new("--data"),
        data_c.as_os_str(),
    ]);
    assert!(!out.status.success(), "an expired token was accepted");
    println!(
        "expired token: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );

    // Content only A holds: with A gone, B's read fails with EIO after the timeout, and the
    // log says which file and why.
    let mut content = vec![0u8; 3 << 20];
    fill(&mut content, &mut 42u64);
    std::fs::write(a.mnt().join("only-on-a.bin"), &content).unwrap();
    let on_b = b.mnt().join("only-on-a.bin");
    assert!(wait_until(Duration::from_secs(10), || std::fs::metadata(
        &on_b
    )
    .is_ok_and(|m| m.len() == content.len() as u64)));
    drop(da);
    let t = Instant::now();
    let err = std::fs::read(&on_b).expect_err("read of unreachable content succeeded");
    let waited = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        waited >= Duration::from_secs(2),
        "failed before the timeout: {waited:?}"
    );
    let log = db.log_text();
    assert!(
        log.contains("could not be read") && log.contains("ino"),
        "the log names the file and the reason: {log}"
    );
    println!("unreachable content: EIO after {waited:?}");

    // A comes back on the same address: B reconnects by itself and the read succeeds.
    let da = Daemon::try_start(&a.data(), &a.mnt(), &["--listen", &listen_a]).unwrap();
    assert!(
        wait_until(Duration::from_secs(45), || std::fs::read(&on_b)
            .is_ok_and(|d| d == content)),
        "B did not reconnect\n{}",
        db.log_text()
    );

    // A removes B: B is refused from then on and sees nothing new.
    let out = da.admin(&["devices", "remove", "bee"]);
    assert!(
        out.status.success(),
        "remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(a.mnt().join("after-removal.txt"), b"not for B").unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !b.mnt().join("after-removal.txt").exists(),
        "a removed device got new names"
    );
    let peers = String::from_utf8_lossy(&da.admin(&["--json", "peers"]).stdout).to_string();
    assert_eq!(peers.trim(), "[]", "A still has a session with B: {peers}");
    let devices = String::from_utf8_lossy(&da.admin(&["devices"]).stdout).to_string();
    assert!(devices.contains("removed"), "{devices}");
    drop(db);
    drop(da);
    assert_fsck_clean(&a.data());
    assert_fsck_clean(&b.data());
}
