//! A real daemon, a real mount: everyday file operations, restart, and admin commands.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;

use pvfs_tests::{assert_fsck_clean, stats, Daemon, Scratch};

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 9) as u8))
        .collect()
}

#[test]
fn files_dirs_links_survive_a_restart() {
    let s = Scratch::new();
    let d = Daemon::start(&s.data(), &s.mnt());
    let m = s.mnt();
    fs::create_dir_all(m.join("a/b/c")).unwrap();
    let big = pattern(5 << 20, 7);
    fs::write(m.join("a/b/big.bin"), &big).unwrap();
    fs::write(m.join("a/small.txt"), b"hello pvfs\n").unwrap();
    fs::hard_link(m.join("a/small.txt"), m.join("a/b/c/hard.txt")).unwrap();
    std::os::unix::fs::symlink("../small.txt", m.join("a/b/link")).unwrap();
    fs::set_permissions(m.join("a/small.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::rename(m.join("a/b/c"), m.join("a/c2")).unwrap();
    assert_eq!(fs::read(m.join("a/b/big.bin")).unwrap(), big);
    assert_eq!(fs::metadata(m.join("a/small.txt")).unwrap().nlink(), 2);
    assert_eq!(
        fs::read_link(m.join("a/b/link")).unwrap().to_str(),
        Some("../small.txt")
    );
    assert_eq!(fs::read(m.join("a/b/link")).unwrap(), b"hello pvfs\n");
    let mut names: Vec<_> = fs::read_dir(m.join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["b", "c2", "small.txt"]);
    assert!(d.stop(), "clean exit on SIGTERM");

    let d = Daemon::start(&s.data(), &s.mnt());
    assert_eq!(fs::read(m.join("a/b/big.bin")).unwrap(), big);
    assert_eq!(fs::read(m.join("a/c2/hard.txt")).unwrap(), b"hello pvfs\n");
    assert_eq!(
        fs::metadata(m.join("a/small.txt")).unwrap().mode() & 0o7777,
        0o640
    );
    assert_eq!(fs::metadata(m.join("a/c2")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(m.join("a")).unwrap().nlink(), 4);
    let st = stats(&s.data());
    assert_eq!(st["files"].as_u64(), Some(2));
    assert_eq!(st["dirs"].as_u64(), Some(4));
    // The logs' size is reported (the ops above made both grow).
    assert!(st["op_log_bytes"].as_u64().is_some_and(|b| b > 0), "{st}");
    assert!(st["move_log_bytes"].as_u64().is_some_and(|b| b > 0), "{st}");
    drop(d);
    assert_fsck_clean(&s.data());
}

#[test]
fn writes_reads_truncates_and_holes() {
    let s = Scratch::new();
    let _d = Daemon::start(&s.data(), &s.mnt());
    let p = s.mnt().join("f");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    // Overlapping writes, read back through the same handle before any commit.
    f.write_all(&pattern(300_000, 1)).unwrap();
    f.write_all_at(b"XYZ", 1000).unwrap();
    let mut expect = pattern(300_000, 1);
    expect[1000..1003].copy_from_slice(b"XYZ");
    let mut got = vec![0; 300_000];
    f.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(got, expect);
    // A hole and SEEK_DATA / SEEK_HOLE.
    f.write_all_at(b"tail", 10 << 20).unwrap();
    f.sync_all().unwrap();
    assert_eq!(f.metadata().unwrap().len(), (10 << 20) + 4);
    let fd = f.as_raw_fd();
    // SAFETY: lseek on an open fd.
    let data = unsafe { libc::lseek(fd, 400_000, libc::SEEK_DATA) };
    assert!(
        (400_000..=10 << 20).contains(&data),
        "SEEK_DATA gave {data}"
    );
    let hole = unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) };
    assert!((300_000..10 << 20).contains(&hole), "SEEK_HOLE gave {hole}");
    let mut mid = vec![1u8; 4096];
    f.read_exact_at(&mut mid, 5 << 20).unwrap();
    assert!(mid.iter().all(|&b| b == 0));
    // Shrink into the middle of a chunk, then grow.
    f.set_len(150_001).unwrap();
    f.set_len(200_000).unwrap();
    let mut all = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut all).unwrap();
    assert_eq!(all.len(), 200_000);
    assert_eq!(&all[..150_001], &expect[..150_001]);
    assert!(all[150_001..].iter().all(|&b| b == 0));
    // Punch a hole.
    // SAFETY: fallocate on an open fd.
    let r = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            10,
            100_000,
        )
    };
    assert_eq!(r, 0);
    let mut back = vec![0; 200_000];
    f.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(&back[..10], &expect[..10]);
    assert!(back[10..100_010].iter().all(|&b| b == 0));
    assert_eq!(&back[100_010..150_001], &expect[100_010..150_001]);
    drop(f);
    drop(_d);
    assert_fsck_clean(&s.data());
}

#[test]
fn unlinked_open_file_keeps_its_content() {
    let s = Scratch::new();
    let _d = Daemon::start(&s.data(), &s.mnt());
    let p = s.mnt().join("doomed");
    fs::write(&p, pattern(200_000, 3)).unwrap();
    let mut f = fs::File::open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    assert!(!p.exists());
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert_eq!(got, pattern(200_000, 3));
    drop(f);
    // After the last close the node and its chunks are gone.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let st = stats(&s.data());
    assert_eq!(st["files"].as_u64(), Some(0));
    assert_eq!(st["chunks"].as_u64(), Some(0));
}

#[test]
fn xattrs_and_pvfs_attributes() {
    let s = Scratch::new();
    let _d = Daemon::start(&s.data(), &s.mnt());
    let p = s.mnt().join("x");
    fs::write(&p, b"data").unwrap();
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let set = |name: &str, v: &[u8]| {
        let n = std::ffi::CString::new(name).unwrap();
        // SAFETY: valid C strings and buffer.
        unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) }
    };
    let get = |name: &str| -> Result<Vec<u8>, i32> {
        let n = std::ffi::CString::new(name).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: valid C strings and buffer.
        let r =
            unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap())
        } else {
            buf.truncate(r as usize);
            Ok(buf)
        }
    };
    assert_eq!(set("user.color", b"blue"), 0);
    assert_eq!(get("user.color"), Ok(b"blue".to_vec()));
    assert_eq!(get("user.none"), Err(libc::ENODATA));
    assert_eq!(get("user.pvfs.chunks"), Ok(b"1".to_vec()));
    assert_eq!(get("user.pvfs.id").map(|v| v.len()), Ok(32));
    assert_eq!(set("user.pvfs.chunks", b"9"), -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );
    assert_eq!(set("trusted.x", b"1"), -1);
}

#[test]
fn copy_file_range_shares_chunks() {
    let s = Scratch::new();
    let _d = Daemon::start(&s.data(), &s.mnt());
    let src = s.mnt().join("src");
    fs::write(&src, pattern(20 << 20, 9)).unwrap();
    let before = stats(&s.data());
    let a = fs::File::open(&src).unwrap();
    let b = fs::File::create(s.mnt().join("dst")).unwrap();
    let mut left = 20usize << 20;
    while left > 0 {
        // SAFETY: copy_file_range on open fds with null offsets.
        let n = unsafe {
            libc::copy_file_range(
                a.as_raw_fd(),
                std::ptr::null_mut(),
                b.as_raw_fd(),
                std::ptr::null_mut(),
                left,
                0,
            )
        };
        assert!(
            n > 0,
            "copy_file_range: {}",
            std::io::Error::last_os_error()
        );
        left -= n as usize;
    }
    drop(b);
    assert_eq!(fs::read(s.mnt().join("dst")).unwrap(), pattern(20 << 20, 9));
    let after = stats(&s.data());
    assert_eq!(
        after["stored_bytes"], before["stored_bytes"],
        "no new chunk data"
    );
    assert_eq!(after["chunks"], before["chunks"]);
}

#[test]
fn a_dead_mount_is_cleaned_at_the_next_start() {
    let s = Scratch::new();
    let d = Daemon::start(&s.data(), &s.mnt());
    fs::write(s.mnt().join("kept"), b"still here").unwrap();
    d.crash_leaving_mount();
    let err = fs::metadata(s.mnt()).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOTCONN),
        "a dead mount: {err}"
    );
    let d = Daemon::start(&s.data(), &s.mnt());
    assert_eq!(fs::read(s.mnt().join("kept")).unwrap(), b"still here");
    assert!(d.stop());
    assert_fsck_clean(&s.data());
}

#[test]
fn sigterm_on_a_busy_mount_detaches_and_exits_when_files_close() {
    let s = Scratch::new();
    let mut d = Daemon::start(&s.data(), &s.mnt());
    fs::write(s.mnt().join("open"), pattern(100_000, 5)).unwrap();
    let f = fs::File::open(s.mnt().join("open")).unwrap();
    d.terminate();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while d.is_mounted() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!d.is_mounted(), "the busy mount is detached");
    let mut got = vec![0u8; 100_000];
    f.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(
        got,
        pattern(100_000, 5),
        "open files keep working after the detach"
    );
    drop(f);
    let exit = d.wait_exit(std::time::Duration::from_secs(20));
    assert_eq!(
        exit,
        Some(true),
        "exits cleanly once the last file closes; its log:\n{}",
        d.log_text()
    );
}
