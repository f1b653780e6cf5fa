//! The daemon: first-run initialization, mounting, signals, running in the background.
//!
//! Owns: the order of startup (config, identity, store, filesystem, control socket, mount,
//! readiness) and shutdown (SIGINT/SIGTERM unmount; buffers are committed; the socket goes).
//! Must not: touch the mount point through the filesystem it serves (no stat of paths below
//! it from the daemon), or put the data directory inside the mount point.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use pvfs_fs::fuse::{Mount, MountOptions};
use pvfs_fs::{Fs, FsOptions};
use pvfs_store::{RootOwner, Store, StoreOptions};

use crate::admin::Node;
use crate::config::{home, Config, DataDir};
use crate::identity::Identity;
use pvfs_net::tls::DeviceCert;

/// Environment variable through which a backgrounded daemon reports readiness.
const READY_FD_ENV: &str = "PVFS_READY_FD";

/// `pvfs mount` arguments.
#[derive(Clone, Debug, Default)]
pub struct MountArgs {
    /// Mount point (default `~/Pervasive`).
    pub mountpoint: Option<PathBuf>,
    /// Data directory.
    pub data: Option<PathBuf>,
    /// Return once mounted, leaving the daemon running.
    pub background: bool,
    /// FUSE threads (overrides the config).
    pub fuse_threads: Option<usize>,
    /// UDP address for QUIC (overrides the config).
    pub listen: Option<String>,
    /// Devices to connect to, in addition to the config's.
    pub peers: Vec<String>,
}

fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        chunk_cache_bytes: config.store.chunk_cache_mb << 20,
        reserve_bytes: config.store.reserve_mb << 20,
        ..StoreOptions::default()
    }
}

fn make_data_dir(data: &DataDir) -> anyhow::Result<()> {
    let root = data.root();
    if root.exists() && !root.is_dir() {
        anyhow::bail!("data directory {} is not a directory", root.display());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .with_context(|| format!("creating data directory {}", root.display()))?;
    tighten_data_dir(data)
}

/// Makes the data directory private to its owner (it holds the device key and the admin
/// socket): an existing one made with a looser mode is tightened.
fn tighten_data_dir(data: &DataDir) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let root = data.root();
    let mode = std::fs::metadata(root)
        .with_context(|| format!("reading {}", root.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private (mode 0700)", root.display()))?;
        tracing::info!(path = %root.display(), "made the data directory private (mode 0700)");
    }
    Ok(())
}

/// The device name: from the config, else the host name.
pub fn device_name(config: &Config) -> String {
    config.name.clone().unwrap_or_else(|| {
        rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned()
    })
}

/// The device key of `data`, made now if there is none.
fn load_or_create_identity(data: &DataDir) -> anyhow::Result<Identity> {
    if data.identity().exists() {
        return Identity::load(&data.identity());
    }
    let id = Identity::generate()?;
    id.save(&data.identity())?;
    Ok(id)
}

/// A new store in `data` for this device, in `namespace` (`None`: a new namespace); the
/// caller's uid and gid own its root on this device.
fn create_store(
    data: &DataDir,
    config: &Config,
    signer: Arc<DeviceCert>,
    namespace: Option<[u8; 16]>,
) -> anyhow::Result<Store> {
    let owner = RootOwner {
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
    };
    Store::create_in(
        data.root(),
        &store_options(config),
        signer,
        owner,
        namespace,
    )
    .with_context(|| format!("creating the store in {}", data.root().display()))
}

/// `pvfs init`: a new device identity and a new namespace in `data`.
pub fn init(data: &DataDir, name: Option<&str>) -> anyhow::Result<Store> {
    make_data_dir(data)?;
    if Store::exists(data.root()) {
        anyhow::bail!("{} already holds a pvfs store", data.root().display());
    }
    if let Some(name) = name {
        let path = data.config();
        anyhow::ensure!(
            !path.exists(),
            "{} exists; set `name` there instead",
            path.display()
        );
        let text = format!("name = {}\n", toml::Value::String(name.to_string()));
        Config::parse(&text, &path)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let config = Config::load(data)?;
    let identity = load_or_create_identity(data)?;
    let signer = Arc::new(DeviceCert::from_key_pem(&identity.pem())?);
    let store = create_store(data, &config, signer, None)?;
    let name = device_name(&config);
    store.commit(true, |tx| tx.set_member(store.device(), &name, true))?;
    tracing::info!(device = %store.device(), %name, "created a new device and namespace");
    Ok(store)
}

/// `pvfs join`: a new device in the namespace of the invitation `token`.
pub fn join(data: &DataDir, token: &str, name: Option<&str>) -> anyhow::Result<Store> {
    make_data_dir(data)?;
    if Store::exists(data.root()) {
        anyhow::bail!("{} already holds a pvfs store", data.root().display());
    }
    let mut config = Config::load(data)?;
    if let Some(n) = name {
        config.name = Some(n.to_string());
    }
    let name = device_name(&config);
    let identity = load_or_create_identity(data)?;
    let cert = Arc::new(DeviceCert::from_key_pem(&identity.pem())?);
    let (invite, welcome) = crate::network::join(token, &cert, &name)?;
    // The namespace's members as the inviter knows them, each change signed by its author
    // (this device then trusts every member, not only its inviter): checked on a scratch
    // store in memory first, so that a bad list leaves nothing behind and `pvfs join` can
    // be run again with another invitation.
    let seed = |store: &Store| -> anyhow::Result<()> {
        store
            .seed_members(&welcome.members, &welcome.keys)
            .context("the inviting device's member list")?;
        anyhow::ensure!(
            store.is_member(&store.device())? && store.is_member(&invite.inviter)?,
            "the inviting device's member list does not show this device joined"
        );
        Ok(())
    };
    let owner = RootOwner { uid: 0, gid: 0 };
    seed(&Store::in_memory_in(
        cert.clone(),
        owner,
        welcome.namespace,
    )?)?;
    // Remember the inviting device's addresses (and our name) for the next mount.
    let path = data.config();
    let mut table: toml::Table = match std::fs::read_to_string(&path) {
        Ok(t) => toml::from_str(&t).with_context(|| path.display().to_string())?,
        Err(_) => toml::Table::new(),
    };
    table.insert("name".into(), toml::Value::String(name.clone()));
    let net = table
        .entry("net")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(net) = net {
        let mut peers: Vec<toml::Value> = net
            .get("peers")
            .and_then(|p| p.as_array().cloned())
            .unwrap_or_default();
        for p in &invite.peers {
            let v = toml::Value::String(p.to_string());
            if !peers.contains(&v) {
                peers.push(v);
            }
        }
        net.insert("peers".into(), toml::Value::Array(peers));
    }
    let text = toml::to_string(&table)?;
    Config::parse(&text, &path)?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let store = create_store(data, &config, cert, Some(welcome.namespace))?;
    if let Err(e) = seed(&store) {
        drop(store);
        let db = data.root().join("db");
        if let Err(rm) = std::fs::remove_dir_all(&db) {
            tracing::warn!(path = %db.display(), error = %rm, "could not remove a half-made store");
        }
        return Err(e);
    }
    let inviter_name = welcome.inviter_name;
    tracing::info!(device = %store.device(), %name, inviter = %inviter_name, "joined the namespace");
    Ok(store)
}

/// Opens the store of `data` (made private by `make_data_dir`), or makes a new one.
fn open_store(data: &DataDir, config: &Config) -> anyhow::Result<Store> {
    if !Store::exists(data.root()) {
        return init(data, None);
    }
    let identity = Identity::load(&data.identity())?;
    let signer = Arc::new(DeviceCert::from_key_pem(&identity.pem())?);
    let store = Store::open(data.root(), &store_options(config), Some(signer))?;
    anyhow::ensure!(
        store.device() == identity.device_id(),
        "{}: the store belongs to device {} but the key to {}",
        data.root().display(),
        store.device(),
        identity.device_id()
    );
    Ok(store)
}

/// The newest mount at `mountpoint`: its file system type and its device ("major:minor").
fn mount_entry(mountpoint: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.to_str()?;
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.get(4).map(|p| p.replace("\\040", " ")) == Some(want.to_string()) {
            if let (Some(fstype), Some(dev)) = (fields.get(sep + 1), fields.get(2)) {
                found = Some((fstype.to_string(), dev.to_string()));
            }
        }
    }
    found
}

fn mounted_fstype(mountpoint: &Path) -> Option<String> {
    mount_entry(mountpoint).map(|(fstype, _)| fstype)
}

/// Read-ahead the kernel may do on the mount, in KiB (FUSE caps it at `max_readahead`).
const READ_AHEAD_KB: u64 = 1024;

/// Lets the kernel read ahead `READ_AHEAD_KB` on the new mount: FUSE starts every mount at
/// 128 KiB, so a sequential reader sends 128 KiB requests. With 1 MiB, cold sequential reads
/// of 1 GiB ran 4-15% faster (local content) and a cold read of remote content about 5%
/// faster on 4% less CPU. Needs root (it is the mount's backing-device setting in sysfs);
/// otherwise the default stays, which is only slower.
fn raise_read_ahead(mountpoint: &Path) {
    let Some((_, dev)) = mount_entry(mountpoint) else {
        return;
    };
    let knob = Path::new("/sys/class/bdi").join(&dev).join("read_ahead_kb");
    let current = std::fs::read_to_string(&knob)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    if current.is_some_and(|kb| kb >= READ_AHEAD_KB) {
        return;
    }
    if let Err(e) = std::fs::write(&knob, READ_AHEAD_KB.to_string()) {
        tracing::debug!(knob = %knob.display(), "keeping the kernel's read-ahead: {e}");
    }
}

/// Makes `mountpoint` usable: creates it, and cleans a mount left dead by a crashed daemon.
fn prepare_mountpoint(mountpoint: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(mountpoint) {
        Ok(m) if m.is_dir() => {
            if mounted_fstype(mountpoint).is_some_and(|t| t.starts_with("fuse")) {
                anyhow::bail!(
                    "{} is already a mounted FUSE filesystem (is pvfs running?)",
                    mountpoint.display()
                );
            }
            Ok(())
        }
        Ok(_) => anyhow::bail!("mount point {} is not a directory", mountpoint.display()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::warn!(mountpoint = %mountpoint.display(), "cleaning a dead mount left by a previous run");
            lazy_unmount(mountpoint);
            anyhow::ensure!(
                std::fs::metadata(mountpoint).is_ok_and(|m| m.is_dir()),
                "{} is still unusable after unmounting",
                mountpoint.display()
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(mountpoint)
            .with_context(|| format!("creating mount point {}", mountpoint.display())),
        Err(e) => Err(anyhow::anyhow!("mount point {}: {e}", mountpoint.display())),
    }
}

/// `fusermount3 -u -z`, or a detaching unmount(2) when that is not available.
fn lazy_unmount(mountpoint: &Path) {
    let lazy = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mountpoint)
        .stderr(Stdio::null())
        .status();
    if !lazy.is_ok_and(|s| s.success()) {
        if let Err(e) = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH) {
            tracing::error!(mountpoint = %mountpoint.display(), "detaching failed: {e}");
        }
    }
}

fn absolute(p: PathBuf) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// Reports readiness (or the startup error) to a parent waiting in `--background`.
struct Ready(Option<std::fs::File>);

impl Ready {
    fn from_env() -> Ready {
        let fd = std::env::var(READY_FD_ENV)
            .ok()
            .and_then(|v| v.parse::<i32>().ok());
        std::env::remove_var(READY_FD_ENV);
        // SAFETY: the parent passed us the write end of a pipe under this number and nothing
        // else in this process owns it.
        Ready(
            fd.filter(|&fd| fd > 2)
                .map(|fd| std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) })),
        )
    }

    fn send(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = writeln!(f, "{msg}");
        }
    }
}

/// `pvfs mount`: serves the filesystem until unmounted or signalled.
pub fn mount(args: MountArgs) -> anyhow::Result<()> {
    let mut ready = Ready::from_env();
    let res = mount_inner(args, &mut ready);
    if let Err(e) = &res {
        ready.send(&format!("error: {e:#}"));
    }
    res
}

fn mount_inner(args: MountArgs, ready: &mut Ready) -> anyhow::Result<()> {
    let data = DataDir::resolve(args.data.clone())?;
    if args.background {
        return spawn_background(&data);
    }
    make_data_dir(&data)?;
    let config = Config::load(&data)?;
    let mountpoint = absolute(
        args.mountpoint
            .clone()
            .map_or_else(|| home().map(|h| h.join("Pervasive")), Ok)?,
    )?;
    anyhow::ensure!(
        !data.root().starts_with(&mountpoint) && !mountpoint.starts_with(data.root()),
        "the data directory and the mount point must not contain each other"
    );
    prepare_mountpoint(&mountpoint)?;
    let store = open_store(&data, &config)?;
    store.set_online_only(config.store.online_only);
    let fs_opts = FsOptions {
        commit_threshold: (config.store.commit_threshold_mb << 20) as usize,
        dirty_limit: (config.store.commit_threshold_mb << 22) as usize,
    };
    let fs = Arc::new(Fs::new(store.clone(), fs_opts)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pvfs-rt")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let node = Arc::new(Node {
        store: store.clone(),
        name: device_name(&config),
        mountpoint: mountpoint.clone(),
        started: Instant::now(),
        network: std::sync::OnceLock::new(),
    });
    let socket = data.socket();
    {
        let socket = socket.clone();
        let node = node.clone();
        runtime.spawn(async move {
            if let Err(e) = crate::control::serve(&socket, node).await {
                tracing::error!("control socket: {e:#}");
            }
        });
    }
    let threads = args
        .fuse_threads
        .unwrap_or(config.fuse.threads)
        .clamp(1, 64);
    let mount_opts = MountOptions {
        threads,
        allow_other: config.fuse.allow_other,
    };
    let mut mount = Mount::new(
        fs.clone(),
        &mountpoint,
        &mount_opts,
        runtime.handle().clone(),
    )
    .with_context(|| format!("mounting at {}", mountpoint.display()))?;
    raise_read_ahead(&mountpoint);
    let identity = Identity::load(&data.identity())?;
    let cert = Arc::new(DeviceCert::from_key_pem(&identity.pem())?);
    let network = crate::network::start(
        &runtime,
        crate::network::Wiring {
            store: &store,
            cert,
            config: &config,
            listen: args.listen.as_deref(),
            peers: &args.peers,
            fs: &fs,
            invalidator: mount.invalidator(),
            name: &device_name(&config),
            address_book: data.root().join("peers.json"),
        },
    )?;
    let _ = node.network.set(network.clone());
    let mut unmounter = mount.unmounter();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let signal_handle = signals.handle();
    let mp = mountpoint.clone();
    let signal_thread = std::thread::Builder::new().name("pvfs-signals".into()).spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(sig, "signal received: unmounting");
            if let Err(e) = unmounter.unmount() {
                // Busy (open files, a shell inside): detach it now; the files still open keep
                // working and the daemon exits when the last one is closed.
                tracing::warn!("unmount failed ({e}); detaching the mount, serving open files until they close");
                lazy_unmount(&mp);
            }
        }
    })?;
    tracing::info!(mountpoint = %mountpoint.display(), device = %store.device(), data = %data.root().display(), "mounted");
    ready.send("ready");
    let res = mount.run().context("serving the filesystem");
    signal_handle.close();
    let _ = signal_thread.join();
    network.stop_discovery();
    // The network stops in its order (loops, connections, then its tasks end: fetched
    // chunks still in memory go to disk); what is still running after 2 s is dropped.
    network.net.close();
    let net = network.net.clone();
    let ended = runtime.block_on(async move {
        tokio::time::timeout(std::time::Duration::from_secs(2), net.closed()).await
    });
    if ended.is_err() {
        tracing::warn!("network tasks still running after 2 s at shutdown: dropped");
    }
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    let _ = std::fs::remove_file(&socket);
    fs.flush_all()
        .context("committing buffered writes at unmount")?;
    tracing::info!("unmounted");
    res
}

/// Starts the daemon as a detached child and waits until it has mounted (or failed).
fn spawn_background(data: &DataDir) -> anyhow::Result<()> {
    make_data_dir(data)?;
    let (rd, wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    rustix::io::fcntl_setfd(&wr, rustix::io::FdFlags::empty())?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.log())
        .with_context(|| format!("opening {}", data.log().display()))?;
    let args: Vec<_> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--background")
        .collect();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(&args)
        .env(READY_FD_ENV, wr.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            let _ = rustix::process::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the daemon")?;
    drop(wr);
    let mut msg = String::new();
    std::fs::File::from(rd).read_to_string(&mut msg)?;
    let msg = msg.trim();
    if msg == "ready" {
        return Ok(());
    }
    let status = child.wait()?;
    match msg.strip_prefix("error: ") {
        Some(e) => anyhow::bail!("{e}"),
        None => anyhow::bail!(
            "the daemon exited ({status}) before mounting; see {}",
            data.log().display()
        ),
    }
}
