//! The daemon's network side: starting `pvfs-net`, wiring it to the filesystem, and the
//! admin commands that need it (peers, devices, invite, where).
//!
//! Owns: the choice of addresses (listen, static peers, the hosts put in invitations), the
//! hooks from network to filesystem (kernel cache invalidation, open files), and joining.
//! Must not: hold the FUSE session or the store's writer lock while waiting on the network.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pvfs_fs::fuse::Invalidator;
use pvfs_fs::Fs;
use pvfs_net::join::{Invite, Inviter};
use pvfs_net::sync::{Hooks, Net, NetOptions};
use pvfs_net::tls::DeviceCert;
use pvfs_store::{DeviceId, FileKind, Ino, Store, ROOT_INO};
use serde_json::{json, Value};

use crate::config::Config;

/// Default lifetime of an invitation.
pub const INVITE_TTL: Duration = Duration::from_secs(3600);

/// The running network of a daemon.
#[derive(Debug, Clone)]
pub struct Network {
    /// Sessions, sync and fetch.
    pub net: Net,
    inviter: Arc<Inviter>,
    runtime: tokio::runtime::Handle,
    discovery: Arc<std::sync::Mutex<Option<pvfs_net::discovery::Discovery>>>,
}

/// What the network is started with.
#[derive(Debug)]
pub struct Wiring<'a> {
    /// The device's store.
    pub store: &'a Store,
    /// Its TLS credentials.
    pub cert: Arc<DeviceCert>,
    /// The configuration.
    pub config: &'a Config,
    /// `--listen`, overriding the config.
    pub listen: Option<&'a str>,
    /// `--peer`s, added to the config's.
    pub peers: &'a [String],
    /// The filesystem that reads absent content through the network.
    pub fs: &'a Arc<Fs>,
    /// The mount's kernel caches.
    pub invalidator: Invalidator,
    /// This device's name.
    pub name: &'a str,
    /// Where the last known addresses of devices are kept.
    pub address_book: std::path::PathBuf,
}

/// Starts the network: listens, dials the static peers, fetches absent content for the
/// filesystem and tells the kernel what remote ops changed.
pub fn start(runtime: &tokio::runtime::Runtime, w: Wiring<'_>) -> anyhow::Result<Network> {
    let Wiring {
        store,
        cert,
        config,
        listen,
        peers: extra_peers,
        fs,
        invalidator,
        name,
        address_book,
    } = w;
    let address_book = Some(address_book);
    let listen: SocketAddr = listen
        .unwrap_or(&config.net.listen)
        .parse()
        .context("--listen must be an IP address and port")?;
    let opts = NetOptions {
        listen,
        fetch_timeout: Duration::from_secs(config.net.fetch_timeout_secs),
        address_book,
    };
    let open_fs = fs.clone();
    let hooks = Hooks {
        applied: Box::new(move |a| {
            for (dir, name) in &a.names {
                invalidator.entry(*dir, name);
            }
            for ino in &a.nodes {
                invalidator.inode(*ino);
            }
        }),
        is_open: Arc::new(move |ino| open_fs.is_open(ino)),
    };
    let _guard = runtime.enter();
    let net = Net::start(store.clone(), &cert, opts, hooks)
        .with_context(|| format!("listening on {listen}"))?;
    fs.set_remote(Arc::new(net.clone()));
    let mut peers: Vec<&String> = config.net.peers.iter().chain(extra_peers).collect();
    peers.sort();
    peers.dedup();
    for p in peers {
        net.add_peer(p.clone());
    }
    let inviter = Inviter::new(
        store.clone(),
        name.to_string(),
        cert.clone(),
        SocketAddr::new(listen.ip(), 0),
    );
    let addr = net.local_addr()?;
    tracing::info!(%addr, "listening for devices");
    let discovery = if config.net.mdns {
        match pvfs_net::discovery::Discovery::start(&net, addr.port()) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!("mDNS discovery is off: {e}");
                None
            }
        }
    } else {
        None
    };
    Ok(Network {
        net,
        inviter,
        runtime: runtime.handle().clone(),
        discovery: Arc::new(std::sync::Mutex::new(discovery)),
    })
}

/// Addresses of this machine that other devices may reach: the listen address if it is
/// specific, else every non-loopback interface address (loopback if there is no other).
fn reachable_hosts(listen: SocketAddr) -> Vec<IpAddr> {
    if !listen.ip().is_unspecified() {
        return vec![listen.ip()];
    }
    let mut hosts: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !i.is_loopback())
        .map(|i| i.ip())
        .filter(|ip| ip.is_ipv4() == listen.is_ipv4())
        .collect();
    if hosts.is_empty() {
        hosts.push(if listen.is_ipv4() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
        });
    }
    hosts
}

impl Network {
    /// `invite`: a one-time token.
    pub fn invite(&self, ttl: Duration) -> anyhow::Result<Value> {
        let addr = self.net.local_addr()?;
        let hosts = reachable_hosts(addr);
        let inv = self
            .runtime
            .block_on(self.inviter.invite(&hosts, addr.port(), ttl))?;
        Ok(json!({ "token": inv.to_token(), "expires": inv.expires }))
    }

    /// `peers`: the devices connected now.
    pub fn peers(&self) -> Value {
        json!(self.net.peers())
    }

    /// `where`: the devices that hold the content of `path`, in bytes.
    pub fn where_held(
        &self,
        store: &Store,
        mountpoint: &Path,
        path: &Path,
    ) -> anyhow::Result<Value> {
        let ino = resolve(store, mountpoint, path)?;
        let mut extents = Vec::new();
        collect_extents(store, ino, &mut extents, 0)?;
        let total: u64 = extents.iter().map(|(_, len)| u64::from(*len)).sum();
        let mut ids: Vec<pvfs_store::ChunkId> = extents.iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        let mut rows = Vec::new();
        let here: u64 = extents
            .iter()
            .filter(|(id, _)| store.has_chunk(id).unwrap_or(false))
            .map(|(_, len)| u64::from(*len))
            .sum();
        rows.push(
            json!({ "device": store.device().to_string(), "this_device": true, "bytes": here }),
        );
        for (device, held) in self.runtime.block_on(self.net.holders(&ids)) {
            let set: std::collections::HashSet<_> = ids
                .iter()
                .zip(held)
                .filter(|(_, h)| *h)
                .map(|(id, _)| *id)
                .collect();
            let bytes: u64 = extents
                .iter()
                .filter(|(id, _)| set.contains(id))
                .map(|(_, len)| u64::from(*len))
                .sum();
            rows.push(
                json!({ "device": device.to_string(), "this_device": false, "bytes": bytes }),
            );
        }
        Ok(json!({ "path": path, "bytes": total, "devices": rows }))
    }

    /// Stops announcing and browsing.
    pub fn stop_discovery(&self) {
        if let Some(d) = self.discovery.lock().expect("discovery lock").take() {
            d.stop();
        }
    }

    /// Drops live connections of a device (after it was removed).
    pub fn disconnect(&self, device: DeviceId) {
        self.net.disconnect(device);
    }
}

/// The inode of `path`: absolute below the mount point, or relative to the mount's root.
/// Walks the store, never the mount.
pub fn resolve(store: &Store, mountpoint: &Path, path: &Path) -> anyhow::Result<Ino> {
    let rel = path.strip_prefix(mountpoint).unwrap_or(path);
    let mut ino = ROOT_INO;
    for c in rel.components() {
        use std::os::unix::ffi::OsStrExt;
        match c {
            std::path::Component::Normal(name) => {
                let d = store.lookup(ino, name.as_bytes())?.ok_or_else(|| {
                    anyhow::anyhow!("{}: no such file or directory", path.display())
                })?;
                ino = d.ino;
            }
            std::path::Component::RootDir | std::path::Component::CurDir => {}
            _ => anyhow::bail!("{}: use a path without '..'", path.display()),
        }
    }
    Ok(ino)
}

/// Every extent under `ino` (a file, or a directory walked to a bounded depth).
fn collect_extents(
    store: &Store,
    ino: Ino,
    out: &mut Vec<(pvfs_store::ChunkId, u32)>,
    depth: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(depth < 256, "directory tree too deep");
    let n = store
        .node(ino)?
        .ok_or_else(|| anyhow::anyhow!("inode {ino} vanished"))?;
    match n.kind {
        FileKind::File => {
            for (_, e) in store.extents(ino, 0, u64::MAX)? {
                out.push((e.chunk, e.len));
            }
        }
        FileKind::Dir => {
            for (_, d) in store.list_dir(ino)? {
                collect_extents(store, d.ino, out, depth + 1)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `devices`: every member, with its state.
pub fn devices(store: &Store, connected: &[DeviceId]) -> anyhow::Result<Value> {
    let me = store.device();
    let rows: Vec<Value> = store
        .members()?
        .into_iter()
        .map(|(d, m)| {
            json!({
                "device": d.to_string(),
                "name": m.name,
                "removed": m.removed,
                "this_device": d == me,
                "connected": connected.contains(&d),
            })
        })
        .collect();
    Ok(json!(rows))
}

/// `devices remove NAME`: removes a member for good (by name or device id prefix).
pub fn remove_device(store: &Store, which: &str) -> anyhow::Result<(DeviceId, Value)> {
    let members = store.members()?;
    let matches: Vec<_> = members
        .iter()
        .filter(|(d, m)| !m.removed && (m.name == which || d.to_string().starts_with(which)))
        .collect();
    let (device, m) = match matches.as_slice() {
        [one] => *one,
        [] => anyhow::bail!("no current member is called {which:?}"),
        _ => anyhow::bail!("{which:?} names several devices; use the device id"),
    };
    anyhow::ensure!(*device != store.device(), "a device cannot remove itself");
    let (device, name) = (*device, m.name.clone());
    store.commit(true, |tx| tx.set_member(device, &name, false))?;
    Ok((
        device,
        json!({ "removed": device.to_string(), "name": name }),
    ))
}

/// `pvfs join`: redeems `token` as the device `cert`; returns the namespace id and the
/// addresses of the inviting device.
pub fn join(
    token: &str,
    cert: &DeviceCert,
    name: &str,
) -> anyhow::Result<(Invite, pvfs_net::join::Welcome)> {
    let invite = Invite::from_token(token)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let welcome = runtime
        .block_on(pvfs_net::join::join(&invite, cert, name))
        .context("joining")?;
    Ok((invite, welcome))
}
