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
            "stats": stats(&node.store),
        })),
        Request::Stats => Ok(stats(&node.store)),
        Request::Fsck => fsck(&node.store),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `stats`: files, logical bytes, stored bytes, dedup ratio.
pub fn stats(store: &Store) -> Value {
    let s = store.stats();
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
        }
        Request::Status => {
            for k in [
                "device",
                "name",
                "namespace",
                "mountpoint",
                "pid",
                "uptime_secs",
            ] {
                println!(
                    "{k:<12} {}",
                    v[k].as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v[k].to_string())
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
