//! What each admin command computes and how it is printed.
//!
//! Owns: the JSON shape of every admin answer (stable: scripts parse `--json`) and its
//! human-readable form. Answers come from a running daemon (`Node`) or, for `stats` and
//! `fsck` when no daemon runs, from the store opened directly.

use std::path::PathBuf;
use std::time::Instant;

use pvfs_store::Store;
use serde_json::{json, Value};

use crate::control::Request;

/// What a running daemon exposes to admin requests.
#[derive(Debug)]
pub struct Node {
    /// The store.
    pub store: Store,
    /// Device name.
    pub name: String,
    /// Where the filesystem is mounted.
    pub mountpoint: PathBuf,
    /// When the daemon started.
    pub started: Instant,
    /// The network, once started.
    pub network: std::sync::OnceLock<crate::network::Network>,
}

impl Node {
    fn network(&self) -> anyhow::Result<&crate::network::Network> {
        self.network
            .get()
            .ok_or_else(|| anyhow::anyhow!("the network is not running yet"))
    }
}

/// Answers a request (on a blocking thread: it may scan the whole store).
pub fn answer(node: &Node, req: &Request) -> anyhow::Result<Value> {
    match req {
        Request::Status => Ok(json!({
            "device": node.store.device().to_string(),
            "name": node.name,
            "namespace": hex(&node.store.namespace()),
            "mountpoint": node.mountpoint,
            "pid": std::process::id(),
            "uptime_secs": node.started.elapsed().as_secs(),
            "online_only": node.store.is_online_only(),
            "stats": stats(&node.store),
            "equivocating": equivocating(&node.store)?,
        })),
        Request::Stats => Ok(stats(&node.store)),
        Request::Fsck => fsck(&node.store),
        Request::Peers => Ok(node.network()?.peers()),
        Request::Devices => {
            let connected: Vec<_> = node
                .network
                .get()
                .map(|n| n.net.peers())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| p.device.parse().ok())
                .collect();
            crate::network::devices(&node.store, &connected)
        }
        Request::RemoveDevice { name } => {
            let n = node.network()?;
            let (device, v) = crate::network::remove_device(&node.store, name)?;
            n.disconnect(device);
            Ok(v)
        }
        Request::Invite { ttl_secs } => node.network()?.invite(std::time::Duration::from_secs(
            ttl_secs
                .unwrap_or(crate::network::INVITE_TTL.as_secs())
                .clamp(1, 7 * 86_400),
        )),
        Request::Where { path } => node
            .network()?
            .where_held(&node.store, &node.mountpoint, path),
    }
}

/// How long ago a Unix time was, for people.
fn ago(unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{}s", now.saturating_sub(unix))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `stats`: files, logical bytes, stored bytes, dedup ratio.
pub fn stats(store: &Store) -> Value {
    let s = store.stats();
    let logs = store.log_bytes().unwrap_or_else(|e| {
        tracing::warn!("measuring the logs: {e}");
        Default::default()
    });
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    json!({
        "files": s.files,
        "dirs": s.dirs,
        "nodes": s.nodes,
        "logical_bytes": s.logical_bytes,
        "referenced_bytes": s.referenced_bytes,
        "chunks": s.chunks,
        "chunk_bytes": s.chunk_bytes,
        "stored_bytes": s.stored_bytes,
        "dedup_ratio": ratio(s.referenced_bytes, s.chunk_bytes),
        "compression_ratio": ratio(s.chunk_bytes, s.stored_bytes),
        "op_log_bytes": logs.op_log,
        "move_log_bytes": logs.move_log,
        "checkpoint_bytes": logs.kept,
    })
}

/// `fsck`: the report; an error if it is not clean.
pub fn fsck(store: &Store) -> anyhow::Result<Value> {
    let r = store.fsck()?;
    Ok(serde_json::to_value(&r)?)
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {} ({b} B)", UNITS[u])
    }
}

/// Prints an answer for people.
pub fn print_human(req: &Request, v: &Value) {
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    match req {
        Request::Stats => {
            println!("files              {}", u("files"));
            println!("directories        {}", u("dirs"));
            println!("logical bytes      {}", human_bytes(u("logical_bytes")));
            println!("referenced bytes   {}", human_bytes(u("referenced_bytes")));
            println!(
                "unique chunk bytes {} in {} chunks",
                human_bytes(u("chunk_bytes")),
                u("chunks")
            );
            println!("stored bytes       {}", human_bytes(u("stored_bytes")));
            println!(
                "dedup ratio        {:.3}",
                v["dedup_ratio"].as_f64().unwrap_or(1.0)
            );
            println!(
                "compression ratio  {:.3}",
                v["compression_ratio"].as_f64().unwrap_or(1.0)
            );
            println!("op log             {}", human_bytes(u("op_log_bytes")));
            println!("move log           {}", human_bytes(u("move_log_bytes")));
            println!("checkpoint         {}", human_bytes(u("checkpoint_bytes")));
        }
        Request::Status => {
            for k in [
                "device",
                "name",
                "namespace",
                "mountpoint",
                "pid",
                "uptime_secs",
                "online_only",
            ] {
                println!(
                    "{k:<12} {}",
                    v[k].as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v[k].to_string())
                );
            }
            for e in v["equivocating"].as_array().cloned().unwrap_or_default() {
                println!(
                    "WARNING      device {} signed two different ops as {} (evidence kept)",
                    e["device"].as_str().unwrap_or_default(),
                    e["op"].as_str().unwrap_or_default()
                );
            }
        }
        Request::Invite { .. } => println!("{}", v["token"].as_str().unwrap_or_default()),
        Request::Peers => {
            let rows = v.as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                println!("no device connected");
            }
            for p in rows {
                let holds = p["holds_chunks"]
                    .as_u64()
                    .map_or_else(|| "holds ?".to_string(), |n| format!("holds {n} chunks"));
                let sync = match p["behind_ops"].as_u64().unwrap_or(0) {
                    0 => p["sync"].as_str().unwrap_or_default().to_string(),
                    n => format!(
                        "{} ({n} ops behind)",
                        p["sync"].as_str().unwrap_or_default()
                    ),
                };
                println!(
                    "{}  {:<21}  {sync}  rtt {:>7.2} ms  fetched {:>12}  {:>8.1} MB/s  served {:>12}  {holds}  last seen {} ago",
                    &p["device"].as_str().unwrap_or_default()
                        [..8.min(p["device"].as_str().unwrap_or_default().len())],
                    p["addr"].as_str().unwrap_or_default(),
                    p["rtt_ms"].as_f64().unwrap_or(0.0),
                    human_bytes(p["fetched_bytes"].as_u64().unwrap_or(0)),
                    p["throughput_mbs"].as_f64().unwrap_or(0.0),
                    human_bytes(p["served_bytes"].as_u64().unwrap_or(0)),
                    ago(p["last_seen"].as_u64().unwrap_or(0)),
                );
                if let Some(e) = p["last_error"].as_str() {
                    println!("    last refused: {e}");
                }
            }
        }
        Request::Devices => {
            for d in v.as_array().cloned().unwrap_or_default() {
                let state = if d["removed"].as_bool().unwrap_or(false) {
                    "removed"
                } else if d["this_device"].as_bool().unwrap_or(false) {
                    "this device"
                } else if d["connected"].as_bool().unwrap_or(false) {
                    "connected"
                } else {
                    "not connected"
                };
                println!(
                    "{}  {:<24} {state}",
                    d["device"].as_str().unwrap_or_default(),
                    d["name"].as_str().unwrap_or_default()
                );
            }
        }
        Request::RemoveDevice { .. } => println!(
            "removed {} ({}); it is refused from now on",
            v["name"].as_str().unwrap_or_default(),
            v["removed"].as_str().unwrap_or_default()
        ),
        Request::Where { .. } => {
            let total = u("bytes");
            for d in v["devices"].as_array().cloned().unwrap_or_default() {
                let b = d["bytes"].as_u64().unwrap_or(0);
                let pct = if total == 0 {
                    100.0
                } else {
                    b as f64 * 100.0 / total as f64
                };
                let me = if d["this_device"].as_bool().unwrap_or(false) {
                    " (this device)"
                } else {
                    ""
                };
                println!(
                    "{}{me}  {} of {} ({pct:.0}%)",
                    d["device"].as_str().unwrap_or_default(),
                    human_bytes(b),
                    human_bytes(total)
                );
            }
        }
        Request::Fsck => {
            println!(
                "checked {} nodes, {} entries, {} extents, {} chunks ({}), {} ops; {} open unlinked",
                u("nodes"),
                u("dirents"),
                u("extents"),
                u("chunks"),
                human_bytes(u("chunk_bytes")),
                u("ops"),
                u("orphans"),
            );
            let problems = v["problems"].as_array().cloned().unwrap_or_default();
            if problems.is_empty() {
                println!("clean");
            }
            for p in problems {
                println!("problem: {}", p.as_str().unwrap_or_default());
            }
        }
    }
}

/// True if an fsck answer reports no problems.
pub fn fsck_clean(v: &Value) -> bool {
    v["problems"].as_array().is_some_and(|p| p.is_empty())
}

/// Devices caught signing two different ops under one id, with the op id.
fn equivocating(store: &pvfs_store::Store) -> anyhow::Result<Value> {
    let rows: Vec<Value> = store
        .evidence()?
        .into_iter()
        .map(|(d, e)| json!({ "device": d.to_string(), "op": e.held.id.fmt_short() }))
        .collect();
    Ok(Value::Array(rows))
}
