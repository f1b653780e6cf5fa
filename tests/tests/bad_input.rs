//! Bad input: a full disk, malformed config, unusable data directories.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use pvfs_tests::{assert_fsck_clean, bin, is_root, Daemon, Scratch};

fn mount_fails(data: &Path, mnt: &Path) -> String {
    let out = Command::new(bin("pvfs"))
        .arg("mount")
        .arg(mnt)
        .arg("--data")
        .arg(data)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success(), "mount should fail");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one-line error expected, got: {err}"
    );
    err
}

#[test]
fn malformed_config_is_a_one_line_error() {
    let s = Scratch::new();
    fs::create_dir_all(s.data()).unwrap();
    fs::write(s.data().join("config.toml"), "[fuse]\nthreads = = 2\n").unwrap();
    let e = mount_fails(&s.data(), &s.mnt());
    assert!(e.contains("config.toml") && e.contains("line 2"), "{e}");
    fs::write(s.data().join("config.toml"), "[fuse]\nthreds = 2\n").unwrap();
    let e = mount_fails(&s.data(), &s.mnt());
    assert!(e.contains("threds"), "{e}");
    fs::write(s.data().join("config.toml"), "[store]\nreserve_mb = -1\n").unwrap();
    mount_fails(&s.data(), &s.mnt());
}

#[test]
fn unusable_data_dirs_are_one_line_errors() {
    let s = Scratch::new();
    fs::write(s.data(), b"not a directory").unwrap();
    let e = mount_fails(&s.data(), &s.mnt());
    assert!(e.contains("not a directory"), "{e}");
    fs::remove_file(s.data()).unwrap();

    let out = Command::new(bin("pvfs"))
        .arg("init")
        .arg("--data")
        .arg(s.data())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let current = s.data().join("db/CURRENT");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&current)
        .unwrap();
    f.write_all(b"garbage\n").unwrap();
    drop(f);
    mount_fails(&s.data(), &s.mnt());

    let other = Scratch::new();
    let out = Command::new(bin("pvfs"))
        .arg("init")
        .arg("--data")
        .arg(other.data())
        .output()
        .unwrap();
    assert!(out.status.success());
    fs::remove_file(other.data().join("identity.pem")).unwrap();
    mount_fails(&other.data(), &other.mnt());

    let out = Command::new(bin("pvfs-admin"))
        .arg("--data")
        .arg(s.dir.path().join("nowhere"))
        .arg("stats")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
}

struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_gives_enospc_and_loses_nothing() {
    assert!(is_root(), "mounting a small tmpfs needs root");
    let s = Scratch::new();
    let small = s.dir.path().join("small");
    fs::create_dir_all(&small).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=640m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    let _guard = Tmpfs(small.clone());
    let data = small.join("data");
    let mnt = s.mnt();
    let d = Daemon::start(&data, &mnt);
    let keep: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut f = fs::File::create(mnt.join("keep.bin")).unwrap();
    f.write_all(&keep).unwrap();
    f.sync_all().unwrap();
    drop(f);

    // Fill the disk: incompressible data until the writer is refused.
    let mut f = fs::File::create(mnt.join("fill.bin")).unwrap();
    let mut block = vec![0u8; 1 << 20];
    let mut err = None;
    for i in 0..4096u32 {
        for (j, b) in block.iter_mut().enumerate() {
            *b = ((j as u32).wrapping_mul(2_246_822_519) ^ i.wrapping_mul(3_266_489_917))
                .rotate_left(j as u32 % 31) as u8;
        }
        if let Err(e) =
            f.write_all(&block)
                .and_then(|()| if i % 16 == 15 { f.sync_data() } else { Ok(()) })
        {
            err = Some(e);
            break;
        }
    }
    let err = err
        .or_else(|| f.sync_all().err())
        .expect("the disk never filled");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "writer got {err}");
    drop(f);

    // Existing data is intact, deleting works, new small writes work again.
    assert!(fs::read(mnt.join("keep.bin")).unwrap() == keep);
    fs::remove_file(mnt.join("fill.bin")).unwrap();
    fs::write(mnt.join("after.txt"), b"space again").unwrap();
    assert!(d.stop());
    assert_fsck_clean(&data);
    let d = Daemon::start(&data, &mnt);
    assert!(fs::read(mnt.join("keep.bin")).unwrap() == keep);
    assert_eq!(fs::read(mnt.join("after.txt")).unwrap(), b"space again");
    drop(d);
}
