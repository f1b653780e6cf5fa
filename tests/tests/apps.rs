//! `../shared/fstests/apps.sh` (git, tar, sqlite, rsync, editors' atomic saves, a 256 MiB
//! copy, mmap, rm -rf) against a real pvfs mount.

use std::process::Command;

use pvfs_tests::{assert_fsck_clean, shared, Daemon, Scratch};

#[test]
fn apps_sh_passes_on_a_pvfs_mount() {
    let s = Scratch::new();
    let d = Daemon::start(&s.data(), &s.mnt());
    let scratch = s.dir.path().join("apps-scratch");
    let out = Command::new("bash")
        .arg(shared().join("fstests/apps.sh"))
        .arg(s.mnt())
        .env("APPS_SCRATCH", &scratch)
        .output()
        .expect("run apps.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let summary = stdout.lines().last().unwrap_or_default().to_string();
    assert!(
        out.status.success() && summary == "12 passed, 0 failed",
        "apps.sh: {summary}\n{}",
        d.log_text()
    );
    drop(d);
    assert_fsck_clean(&s.data());
}
