//! A device whose data directory is restored from an earlier copy, that then makes changes of
//! its own before it meets its peers again: every change of both histories ends up on both
//! devices (each opening of a store writes its ops under a new incarnation, so the restored
//! device never reuses an op id its peer holds for other content), and fsck is clean.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pvfs_tests::{assert_fsck_clean, join_through, wait_until, Daemon, Scratch};

/// A UDP port that was free a moment ago, so that a device can come back on the same one.
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port()
}

fn start(s: &Scratch, args: &[&str]) -> Daemon {
    Daemon::try_start(&s.data(), &s.mnt(), args).unwrap_or_else(|e| panic!("{e}"))
}

/// Names and contents of the regular files at the top of `mnt`.
fn files(mnt: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(mnt)
        .expect("readdir")
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            Some((name, std::fs::read(e.path()).ok()?))
        })
        .collect();
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp")
        .success();
    assert!(ok, "copying {} failed", from.display());
}

#[test]
fn a_restored_device_keeps_both_histories() {
    let (a, b) = (Scratch::new(), Scratch::new());
    let port_a = free_port().to_string();
    let listen_a = format!("127.0.0.1:{port_a}");
    let da = start(&a, &["--listen", &listen_a]);
    join_through(&da, &b.data(), "bee");
    let db = start(&b, &["--peer", &listen_a]);
    let seen_on_b = |name: &str, content: &[u8]| {
        wait_until(Duration::from_secs(40), || {
            std::fs::read(b.mnt().join(name)).is_ok_and(|d| d == content)
        })
    };

    // History 1, backed up.
    std::fs::write(a.mnt().join("before.txt"), b"v1").unwrap();
    assert!(seen_on_b("before.txt", b"v1"), "B: {}", db.log_text());
    assert!(da.stop(), "A stops cleanly");
    let backup = a.data().with_extension("backup");
    copy_dir(&a.data(), &backup);

    // History 2: A goes on after the backup, and B gets all of it.
    let da = start(&a, &["--listen", &listen_a]);
    let t = std::time::Instant::now();
    std::fs::write(a.mnt().join("lost.txt"), b"made after the backup").unwrap();
    std::fs::write(a.mnt().join("before.txt"), b"v2, after the backup").unwrap();
    assert!(
        seen_on_b("lost.txt", b"made after the backup")
            && seen_on_b("before.txt", b"v2, after the backup"),
        "A: {}\nB: {}",
        da.log_text(),
        db.log_text()
    );
    // (Up to 30 s when B keeps its connection to the stopped A until the idle timeout.)
    println!(
        "A's changes after its restart reached B in {:?}",
        t.elapsed()
    );
    assert!(da.stop());
    assert!(db.stop());

    // A's data directory is restored from the backup, and A makes changes while B is away:
    // a new file, and an edit of the file history 2 edited too.
    copy_dir(&backup, &a.data());
    let da = start(&a, &["--listen", &listen_a]);
    assert_eq!(
        std::fs::read(a.mnt().join("before.txt")).unwrap(),
        b"v1",
        "restored"
    );
    assert!(!a.mnt().join("lost.txt").exists());
    std::fs::write(a.mnt().join("after.txt"), b"made after the restore").unwrap();
    std::fs::write(a.mnt().join("before.txt"), b"v3, after the restore").unwrap();

    // B comes back: both histories end up on both devices.
    let db = start(&b, &["--peer", &listen_a]);
    let complete = |mnt: &Path| {
        let f = files(mnt);
        let has = |name: &str, content: &[u8]| f.iter().any(|(n, c)| n == name && c == content);
        has("before.txt", b"v3, after the restore")
            && has("lost.txt", b"made after the backup")
            && has("after.txt", b"made after the restore")
            && f.iter()
                .any(|(n, c)| n.starts_with("before (conflict") && c == b"v2, after the backup")
    };
    let converged = wait_until(Duration::from_secs(30), || {
        complete(&a.mnt()) && complete(&b.mnt()) && files(&a.mnt()) == files(&b.mnt())
    });
    assert!(
        converged,
        "A: {:?}\nB: {:?}\nA's log: {}\nB's log: {}",
        files(&a.mnt()),
        files(&b.mnt()),
        da.log_text(),
        db.log_text()
    );
    assert!(da.stop());
    assert!(db.stop());
    assert_fsck_clean(&a.data());
    assert_fsck_clean(&b.data());
    let _ = std::fs::remove_dir_all(&backup);
}
