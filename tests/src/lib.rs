//! Harness for integration tests: daemons as real processes with real FUSE mounts.
//!
//! Every mount lives under its own temporary directory and is always unmounted, also when a
//! test fails (`fusermount3 -u -z` on drop). Binaries come from the workspace target
//! directory (`cargo build --release --bins` first; the README test command does).

#![warn(missing_docs, missing_debug_implementations)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where `pvfs` and `pvfs-admin` are: `$PVFS_BIN_DIR`, else next to the test binary.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("PVFS_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir layout");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo build --release --bins` first",
        p.display()
    );
    p
}

/// The shared fixtures directory: `$PVFS_SHARED`, else the first `shared/` with an
/// `fstests/` folder beside the repository or one of its ancestors.
pub fn shared() -> PathBuf {
    if let Some(p) = std::env::var_os("PVFS_SHARED") {
        return PathBuf::from(p);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let found = repo
        .ancestors()
        .map(|a| a.join("shared"))
        .find(|p| p.join("fstests").is_dir());
    found.unwrap_or_else(|| {
        panic!(
            "shared fixtures (shared/fstests) not found beside {} (set PVFS_SHARED)",
            repo.display()
        )
    })
}

/// True if this process runs as root (needed for allow_other mounts by other uids, tmpfs,
/// network namespaces).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn mounted(mountpoint: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = mountpoint.to_string_lossy().replace(' ', "\\040");
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4) == Some(&want.as_str()) && l.contains(" - fuse")
    })
}

/// Lazily unmounts `mountpoint` (ignores errors: it may not be mounted).
pub fn force_unmount(mountpoint: &Path) {
    let _ = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mountpoint)
        .stderr(Stdio::null())
        .status();
}

/// A pvfs daemon serving a mount, as a child process.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    /// The mount point.
    pub mnt: PathBuf,
    /// The data directory.
    pub data: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `pvfs mount MNT --data DATA` and waits until the mount is live.
    pub fn start(data: &Path, mnt: &Path) -> Daemon {
        Daemon::try_start(data, mnt, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like `start`, with extra arguments; returns the daemon's output if it fails.
    pub fn try_start(data: &Path, mnt: &Path, extra: &[&str]) -> Result<Daemon, String> {
        Daemon::try_start_in(None, data, mnt, extra)
    }

    /// Like `try_start`, inside the network namespace `netns` (if any).
    pub fn try_start_in(
        netns: Option<&str>,
        data: &Path,
        mnt: &Path,
        extra: &[&str],
    ) -> Result<Daemon, String> {
        // A dead mount left by a crash makes create_dir_all fail with EEXIST: pvfs cleans it.
        if let Err(e) = std::fs::create_dir_all(mnt) {
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::AlreadyExists,
                "create mount point: {e}"
            );
        }
        let log = data.with_extension("log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        // Tests run side by side: each daemon listens on a port of its own.
        let listen: &[&str] = if extra.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let mut cmd = match netns {
            Some(ns) => {
                // Only the network namespace: `ip netns exec` would also give the daemon a
                // mount namespace of its own, hiding its mount from the test.
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(bin("pvfs"));
                c
            }
            None => Command::new(bin("pvfs")),
        };
        let child = cmd
            .arg("mount")
            .arg(mnt)
            .arg("--data")
            .arg(data)
            .args(listen)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .expect("spawn pvfs");
        let mut d = Daemon {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            data: data.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // A dead mount from a crash is listed too, but cannot be stat'ed.
            if mounted(mnt) && std::fs::metadata(mnt).is_ok() {
                return Ok(d);
            }
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                d.child = None;
                return Err(format!(
                    "pvfs exited with {status} before mounting:\n{}",
                    d.log_text()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("pvfs did not mount within 60 s:\n{}", d.log_text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The address the daemon listens on for devices, from its log (it may have been asked
    /// for port 0).
    pub fn listen_addr(&self) -> String {
        let mut found = None;
        wait_until(Duration::from_secs(30), || {
            found = self.log_text().lines().find_map(|l| {
                let rest = l.split("listening for devices").nth(1)?;
                let addr = rest.split("addr=").nth(1)?.split_whitespace().next()?;
                Some(addr.to_string())
            });
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no listening address in the log:\n{}", self.log_text()))
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Sends SIGTERM and waits for a clean exit; returns whether it exited with status 0.
    pub fn stop(mut self) -> bool {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            force_unmount(&self.mnt);
            return false;
        };
        // SAFETY: kill with a valid pid and signal.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        let ok = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break false;
                }
            }
        };
        force_unmount(&self.mnt);
        if !ok {
            eprintln!(
                "the daemon did not exit cleanly on SIGTERM; its log:\n{}",
                self.log_text()
            );
        }
        ok
    }

    /// Kills the daemon with SIGKILL (a crash), then lazily unmounts the dead mount.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        force_unmount(&self.mnt);
    }

    /// Kills the daemon with SIGKILL and leaves its dead mount behind (as a crash would).
    pub fn crash_leaving_mount(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        std::mem::forget(self);
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            // SAFETY: kill with a valid pid and signal.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
    }

    /// Waits up to `timeout` for the daemon to exit; returns whether it exited with status 0.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<bool> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status.success());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// True while the mount point is a mounted FUSE filesystem.
    pub fn is_mounted(&self) -> bool {
        mounted(&self.mnt)
    }

    /// Runs `pvfs-admin --data DATA ARGS...`.
    pub fn admin(&self, args: &[&str]) -> Output {
        admin(&self.data, args)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop_inner();
        }
        force_unmount(&self.mnt);
    }
}

/// Runs `pvfs-admin --data DATA ARGS...`.
pub fn admin(data: &Path, args: &[&str]) -> Output {
    Command::new(bin("pvfs-admin"))
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .expect("run pvfs-admin")
}

/// Runs `pvfs-admin --json ... fsck` and panics with the report unless it is clean.
pub fn assert_fsck_clean(data: &Path) {
    let out = admin(data, &["--json", "fsck"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fsck failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).expect("fsck json");
    assert_eq!(
        v["problems"].as_array().map(Vec::len),
        Some(0),
        "fsck problems: {text}"
    );
}

/// `pvfs-admin --json stats` as JSON.
pub fn stats(data: &Path) -> serde_json::Value {
    let out = admin(data, &["--json", "stats"]);
    assert!(
        out.status.success(),
        "stats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stats json")
}

/// A small LAN of network namespaces: `n` hosts, each with a veth link to one bridge that
/// lives in a namespace of its own. Created and removed by the test (needs root and `ip`).
#[derive(Debug)]
pub struct Lan {
    tag: String,
    n: usize,
    subnet: u8,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lan {
    /// Creates the LAN; `Err` says why it cannot be made here (not root, no `ip`).
    pub fn new(n: usize) -> Result<Lan, String> {
        if !is_root() {
            return Err("network namespaces need root".into());
        }
        let pid = std::process::id();
        let lan = Lan {
            tag: format!("pvfs{}", pid % 100_000),
            n,
            subnet: (pid % 200 + 20) as u8,
        };
        let br = lan.bridge_ns();
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        for i in 1..=n {
            let h = lan.host(i);
            ip(&["netns", "add", &h])?;
            ip(&["-n", &h, "link", "set", "lo", "up"])?;
            let (inner, outer) = (format!("eth{i}"), format!("port{i}"));
            ip(&[
                "-n", &h, "link", "add", &inner, "type", "veth", "peer", "name", &outer, "netns",
                &br,
            ])?;
            ip(&["-n", &br, "link", "set", &outer, "master", "br0"])?;
            ip(&["-n", &br, "link", "set", &outer, "up"])?;
            let addr = format!("{}/24", lan.addr(i));
            ip(&["-n", &h, "addr", "add", &addr, "dev", &inner])?;
            ip(&["-n", &h, "link", "set", &inner, "multicast", "on"])?;
            ip(&["-n", &h, "link", "set", &inner, "up"])?;
        }
        Ok(lan)
    }

    fn bridge_ns(&self) -> String {
        format!("{}-br", self.tag)
    }

    /// The namespace of host `i` (1-based).
    pub fn host(&self, i: usize) -> String {
        format!("{}-h{i}", self.tag)
    }

    /// The IPv4 address of host `i`.
    pub fn addr(&self, i: usize) -> String {
        format!("10.{}.0.{i}", self.subnet)
    }

    /// Cuts (or restores) host `i`'s link to the bridge.
    pub fn set_link(&self, i: usize, up: bool) {
        let port = format!("port{i}");
        ip(&[
            "-n",
            &self.bridge_ns(),
            "link",
            "set",
            &port,
            if up { "up" } else { "down" },
        ])
        .expect("set link");
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for i in 1..=self.n {
            let _ = ip(&["netns", "del", &self.host(i)]);
        }
        let _ = ip(&["netns", "del", &self.bridge_ns()]);
    }
}

/// Runs `pvfs ARGS...`.
pub fn pvfs(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(bin("pvfs"))
        .args(args)
        .output()
        .expect("run pvfs")
}

/// Makes a one-time token on `inviter` and joins the device of `data` with it as `name`
/// (`pvfs join TOKEN`); panics with both commands' output if either fails.
pub fn join_through(inviter: &Daemon, data: &Path, name: &str) {
    let out = inviter.admin(&["invite"]);
    assert!(out.status.success(), "invite: {out:?}");
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = pvfs(&[
        std::ffi::OsStr::new("join"),
        std::ffi::OsStr::new(&token),
        std::ffi::OsStr::new("--data"),
        data.as_os_str(),
        std::ffi::OsStr::new("--name"),
        std::ffi::OsStr::new(name),
    ]);
    assert!(out.status.success(), "join: {out:?}");
}

/// Polls `check` every 20 ms for up to `timeout`; true once it holds.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

/// A temporary directory with `data/` and `mnt/` for one daemon.
#[derive(Debug)]
pub struct Scratch {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
}

impl Scratch {
    /// A new scratch directory under `$TMPDIR`.
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("pvfs-test.")
            .tempdir()
            .expect("tempdir");
        // Other users (pjdfstest's uid switches) must be able to reach the mount point.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        Scratch { dir }
    }
    /// The data directory path.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    /// The mount point path.
    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}
