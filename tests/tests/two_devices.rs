//! Two real `pvfs mount` processes on 127.0.0.1, paired with `pvfs-admin invite` and
//! `pvfs join`, connected by `--peer`: a file written on A is read byte-identical through B's
//! mount (fetched from A on demand); names show on the other side at once; B edits content
//! only A holds; apps.sh passes on B's mount while B is online-only, so that A is the only
//! holder of what it reads; a reused token is refused.

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

/// Like `pair`, with lines appended to B's config (inside its `[net]` table, which comes
/// last, unless they start another table).
fn pair_with(a: &Scratch, b: &Scratch, b_extra: &str) -> (Daemon, Daemon, String, String) {
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
    // From a file, as a careful user would: a token on the command line is visible in /proc.
    let token_file = b.mnt().with_extension("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let out = pvfs(&[
        OsStr::new("join"),
        OsStr::new("--token-file"),
        token_file.as_os_str(),
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
    if !b_extra.is_empty() {
        // `pvfs join` wrote `[net]` last.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(b.data().join("config.toml"))
            .unwrap();
        writeln!(f, "{b_extra}").unwrap();
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
    assert_eq!(
        held_bytes(&db, &big_b),
        0,
        "B holds none of it before reading"
    );
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

/// `pvfs-admin --json where PATH` on the device of `d`.
fn where_json(d: &Daemon, path: &std::path::Path) -> serde_json::Value {
    let out = d.admin(&["--json", "where", &path.to_string_lossy()]);
    assert!(
        out.status.success(),
        "where: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("where json")
}

/// Bytes of `path` held by the device `this` says (`this_device`), by `where` on `d`.
fn held_by(d: &Daemon, path: &std::path::Path, this: bool) -> u64 {
    where_json(d, path)["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["this_device"].as_bool() == Some(this))
        .map_or(0, |r| r["bytes"].as_u64().unwrap())
}

/// Bytes of `path` the device of `d` holds.
fn held_bytes(d: &Daemon, path: &std::path::Path) -> u64 {
    held_by(d, path, true)
}

#[test]
fn b_edits_content_only_a_holds() {
    use std::os::unix::fs::FileExt;
    let (a, b) = (Scratch::new(), Scratch::new());
    let (da, db, _) = pair(&a, &b);
    // 8 MiB written on A: B sees its name and extents but holds none of its chunks.
    let mut want = vec![0u8; 8 << 20];
    fill(&mut want, &mut 0x2545_F491_4F6C_DD1Du64);
    std::fs::write(a.mnt().join("edit.bin"), &want).unwrap();
    let on_b = b.mnt().join("edit.bin");
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::metadata(&on_b)
            .is_ok_and(|m| m.len() == want.len() as u64)),
        "B never saw edit.bin"
    );
    assert_eq!(held_bytes(&db, &on_b), 0, "B holds none of it yet");

    // Edits on B that cut into chunks it does not hold: each commit fetches what it keeps of
    // them from A. An overwrite in the middle, one across a chunk edge, a truncation
    // mid-chunk and an extension.
    let f = std::fs::OpenOptions::new().write(true).open(&on_b).unwrap();
    for (off, fill_byte, len) in [(1_000_003u64, 0xA5u8, 10usize), (4_194_000, 0x5A, 70_000)] {
        f.write_all_at(&vec![fill_byte; len], off).unwrap();
        want[off as usize..off as usize + len].fill(fill_byte);
    }
    f.sync_all().unwrap();
    f.set_len(6_000_001).unwrap();
    want.truncate(6_000_001);
    f.write_all_at(b"tail", 6_500_000).unwrap();
    want.resize(6_500_000, 0);
    want.extend_from_slice(b"tail");
    drop(f);
    let held = held_bytes(&db, &on_b);
    assert!(
        held < want.len() as u64 / 2,
        "B fetched only the chunks it edited, not the file: holds {held}"
    );
    assert!(
        std::fs::read(&on_b).unwrap() == want,
        "B reads its edits wrong\nB: {}",
        db.log_text()
    );
    // A sees B's edits (reading the new chunks from B).
    let on_a = a.mnt().join("edit.bin");
    assert!(
        wait_until(Duration::from_secs(20), || std::fs::read(&on_a)
            .is_ok_and(|d| d == want)),
        "A never saw B's edits\nA: {}\nB: {}",
        da.log_text(),
        db.log_text()
    );

    // A file open on B loses its last name there while only A holds its content: B keeps
    // the content first, so the open file still reads right after A has deleted it.
    let mut gone = vec![0u8; 1 << 20];
    fill(&mut gone, &mut 0x1234_5678_9ABC_DEF1u64);
    std::fs::write(a.mnt().join("gone.bin"), &gone).unwrap();
    let gone_b = b.mnt().join("gone.bin");
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::metadata(&gone_b)
            .is_ok_and(|m| m.len() == gone.len() as u64)),
        "B never saw gone.bin"
    );
    let mut open = std::fs::File::open(&gone_b).unwrap();
    std::fs::remove_file(&gone_b).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !a
            .mnt()
            .join("gone.bin")
            .exists()),
        "A never saw the delete"
    );
    let mut got = Vec::new();
    open.read_to_end(&mut got).unwrap();
    assert!(got == gone, "the open file reads wrong after its delete");
    drop(open);
    drop(db);
    drop(da);
    assert_fsck_clean(&a.data());
    assert_fsck_clean(&b.data());
}

#[test]
fn apps_sh_passes_on_b_while_a_holds_all_it_reads() {
    let (a, b) = (Scratch::new(), Scratch::new());
    // B is online-only: what apps.sh writes there is stored on A before close or fsync
    // returns, B keeps none of it on disk, and a read that B's memory cannot answer fetches
    // from A.
    let (da, db, _, _) = pair_with(&a, &b, "[store]\nonline_only = true");
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
    let work = std::fs::read_dir(b.mnt())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("apps-work"))
        .expect("apps.sh work dir kept")
        .file_name();
    // A holds everything apps.sh left, B nothing (what a busy A could not take at once is
    // handed off moments later); B read from A.
    let work_b = b.mnt().join(&work);
    let total = where_json(&db, &work_b)["bytes"].as_u64().unwrap();
    assert!(total > 256 << 20, "apps.sh left {total} bytes");
    assert!(
        wait_until(Duration::from_secs(60), || held_bytes(&db, &work_b) == 0),
        "B holds {} bytes of apps.sh's work\nB: {}",
        held_bytes(&db, &work_b),
        db.log_text()
    );
    assert_eq!(held_by(&db, &work_b, false), total, "A holds all of it");
    let peers: serde_json::Value =
        serde_json::from_slice(&db.admin(&["--json", "peers"]).stdout).expect("peers json");
    let fetched = peers[0]["fetched_bytes"].as_u64().unwrap_or(0);
    println!("B fetched {fetched} bytes from A; apps.sh left {total} bytes, all on A");
    assert!(fetched > 0, "B read nothing from A: {peers}");
    let stats: serde_json::Value =
        serde_json::from_slice(&db.admin(&["--json", "stats"]).stdout).expect("stats json");
    println!("B's store: {stats}");
    // Both views agree: a full tree walk comparing every file's bytes (both read from A).
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

#[test]
fn a_device_joined_through_a_syncs_with_b_when_a_is_gone() {
    let (a, b, d) = (Scratch::new(), Scratch::new(), Scratch::new());
    let (da, db, _, _) = pair_with(&a, &b, "");
    std::fs::write(b.mnt().join("from-b.txt"), b"written on B").unwrap();
    // D joins through A; B hears of D from A.
    pvfs_tests::join_through(&da, &d.data(), "dee");
    assert!(
        wait_until(Duration::from_secs(20), || {
            let v = String::from_utf8_lossy(&db.admin(&["--json", "devices"]).stdout).to_string();
            v.contains("\"dee\"")
        }),
        "B never learnt of D"
    );
    // A goes away before D ever starts: D knows every member from its welcome, so it
    // accepts B, and B (which learnt of D from A) accepts D.
    assert!(da.stop());
    let dd = Daemon::try_start(&d.data(), &d.mnt(), &["--peer", &db.listen_addr()]).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::read(
            d.mnt().join("from-b.txt")
        )
        .is_ok_and(|c| c == b"written on B")),
        "D never synced with B\nD: {}\nB: {}",
        dd.log_text(),
        db.log_text()
    );
    std::fs::write(d.mnt().join("from-d.txt"), b"written on D").unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || std::fs::read(
            b.mnt().join("from-d.txt")
        )
        .is_ok_and(|c| c == b"written on D")),
        "B never saw D's file"
    );
    assert!(dd.stop());
    assert!(db.stop());
    assert_fsck_clean(&b.data());
    assert_fsck_clean(&d.data());
}

/// B is killed (SIGKILL: its connection to A is not closed, A holds it until its idle
/// timeout) and started again: A takes its new connection beside the stale one (or in its
/// place, past `MAX_CONNECTIONS_PER_DEVICE`), and changes flow both ways again well within
/// the 30 s idle timeout; fsck stays clean.
#[test]
fn a_killed_device_reconnects_at_once() {
    let (a, b) = (Scratch::new(), Scratch::new());
    let (da, db, _, listen) = pair_with(&a, &b, "");
    let seen = |path: std::path::PathBuf, content: &[u8]| {
        wait_until(Duration::from_secs(20), || {
            std::fs::read(&path).is_ok_and(|d| d == content)
        })
    };
    std::fs::write(a.mnt().join("one.txt"), b"one").unwrap();
    assert!(
        seen(b.mnt().join("one.txt"), b"one"),
        "B: {}",
        db.log_text()
    );
    db.kill();
    let db = Daemon::try_start(&b.data(), &b.mnt(), &["--peer", &listen]).unwrap();
    let restarted = Instant::now();
    std::fs::write(a.mnt().join("two.txt"), b"two").unwrap();
    assert!(
        seen(b.mnt().join("two.txt"), b"two"),
        "A: {}\nB: {}",
        da.log_text(),
        db.log_text()
    );
    std::fs::write(b.mnt().join("three.txt"), b"three").unwrap();
    assert!(
        seen(a.mnt().join("three.txt"), b"three"),
        "A: {}",
        da.log_text()
    );
    eprintln!(
        "after B's restart, A's change reached B and B's reached A in {:?}",
        restarted.elapsed()
    );
    assert!(db.stop(), "B stops cleanly");
    assert!(da.stop(), "A stops cleanly");
    assert_fsck_clean(&a.data());
    assert_fsck_clean(&b.data());
}
