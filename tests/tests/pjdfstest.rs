//! POSIX conformance: pjdfstest (the Rust rewrite from crates.io) as root in a 0755 folder
//! inside a pvfs mount, with `../shared/fstests/pjdfstest.toml`.
//!
//! Every test must pass except the deliberate deviations listed in SEMANTICS.md, which are
//! named here with the reason.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use pvfs_tests::{is_root, shared, Daemon, Scratch};

/// Tests pvfs fails on purpose; each is explained in SEMANTICS.md ("pjdfstest deviations").
const DEVIATIONS: &[&str] = &[];

fn pjdfstest() -> std::path::PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")))
        .expect("HOME");
    let p = home.join("bin/pjdfstest");
    if p.exists() {
        p
    } else {
        "pjdfstest".into()
    }
}

#[test]
fn pjdfstest_passes_except_documented_deviations() {
    assert!(is_root(), "pjdfstest must run as root (it switches uids)");
    let s = Scratch::new();
    let d = Daemon::start(&s.data(), &s.mnt());
    let dir = s.mnt().join("pjd");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(pjdfstest())
        .arg("-c")
        .arg(shared().join("fstests/pjdfstest.toml"))
        .arg("-p")
        .arg(&dir)
        .output()
        .expect("run pjdfstest (cargo install pjdfstest)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_end().ends_with("FAILED"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for f in &failed {
        println!("FAILED {f}");
    }
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or("no summary")
        .to_string();
    println!("pjdfstest summary: {summary}");
    let unexpected: Vec<&&str> = failed.iter().filter(|f| !DEVIATIONS.contains(f)).collect();
    assert!(
        unexpected.is_empty(),
        "unexpected pjdfstest failures: {unexpected:?}\n{summary}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        summary.starts_with("Summary:"),
        "no pjdfstest summary:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(d);
}
