//! Whole-store consistency check.
//!
//! Owns: the list of invariants a store must satisfy and the code that verifies them on a
//! RocksDB snapshot: every chunk's hash, every manifest (extent map), reference counts, the
//! tree (names, link counts, parents, reachability, no cycles), the id map, the op log and the
//! running statistics.
//! Must not: repair anything; it reports.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde::Serialize;

use crate::auth::{self, OpHash, GENESIS, KEY_LEN};
use crate::chunk;
use crate::error::Result;
use crate::kv::{Cf, ReadView};
use crate::records::{
    self, key, DirentRecord, EntryRecord, ExtentRecord, NodeRecord, OpRecord, RefRecord,
    StatsRecord,
};
use crate::store::Store;
use crate::types::{ChunkId, FileKind, Ino, NodeId, Writer, ROOT_INO};

const MAX_PROBLEMS: usize = 1000;

/// The result of `Store::fsck`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FsckReport {
    /// Nodes checked.
    pub nodes: u64,
    /// Directory entries checked.
    pub dirents: u64,
    /// Extents checked.
    pub extents: u64,
    /// Chunks whose hash was verified.
    pub chunks: u64,
    /// Plaintext bytes hashed.
    pub chunk_bytes: u64,
    /// Ops in the log.
    pub ops: u64,
    /// Open-but-unlinked nodes (normal while the daemon runs; purged at the next start).
    pub orphans: u64,
    /// Chunks staged for a commit in progress (normal while the daemon runs).
    pub staged: u64,
    /// Chunks referenced here but stored only on other devices.
    pub absent: u64,
    /// Every violated invariant, one line each (at most 1000).
    pub problems: Vec<String>,
}

impl FsckReport {
    /// True if no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, p: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(p);
        }
    }
}

fn all(view: &dyn ReadView, cf: Cf) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + '_ {
    view.scan_from(cf, &[])
}

impl Store {
    /// Checks every invariant of the store on a consistent snapshot.
    pub fn fsck(&self) -> Result<FsckReport> {
        let snap = self.snapshot();
        let view: &dyn ReadView = &*snap;
        let mut r = FsckReport::default();

        // Nodes and the id map.
        let mut nodes: HashMap<Ino, NodeRecord> = HashMap::new();
        let mut stats = StatsRecord::default();
        for item in all(view, Cf::Nodes) {
            let (k, v) = item?;
            let ino = key::ino_of(&k)?;
            match records::decode::<NodeRecord>("node", &v) {
                Ok(n) => {
                    stats.nodes += 1;
                    match n.kind {
                        FileKind::Dir => stats.dirs += 1,
                        FileKind::File => {
                            stats.files += 1;
                            stats.logical_bytes += n.size;
                        }
                        FileKind::Symlink
                            if n.target.as_ref().is_none_or(|t| t.len() as u64 != n.size) =>
                        {
                            r.problem(format!("symlink {ino}: target missing or size wrong"));
                        }
                        _ => {}
                    }
                    match view.get(Cf::Ids, &key::node_id(n.id))? {
                        Some(i) if key::ino_of(&i)? == ino => {}
                        _ => r.problem(format!("node {ino}: id {} does not map back to it", n.id)),
                    }
                    nodes.insert(ino, n);
                }
                Err(e) => r.problem(format!("node {ino}: {e}")),
            }
        }
        r.nodes = nodes.len() as u64;
        for item in all(view, Cf::Ids) {
            let (_, v) = item?;
            let ino = key::ino_of(&v)?;
            if !nodes.contains_key(&ino) {
                r.problem(format!("id map points at missing node {ino}"));
            }
        }
        if nodes.get(&ROOT_INO).is_none_or(|n| n.kind != FileKind::Dir) {
            r.problem("the root directory is missing".into());
        }

        // Directory entries: names per node, subdirectories per directory, the tree.
        let mut names: HashMap<Ino, u32> = HashMap::new();
        let mut subdirs: HashMap<Ino, u32> = HashMap::new();
        let mut children: HashMap<Ino, Vec<Ino>> = HashMap::new();
        for item in all(view, Cf::Dirents) {
            let (k, v) = item?;
            r.dirents += 1;
            let parent = key::ino_of(&k)?;
            let name = &k[8..];
            let d: DirentRecord = match records::decode("dirent", &v) {
                Ok(d) => d,
                Err(e) => {
                    r.problem(format!("dirent in {parent}: {e}"));
                    continue;
                }
            };
            if crate::ns::validate_name(name).is_err() {
                r.problem(format!(
                    "dirent in {parent}: invalid name {:?}",
                    String::from_utf8_lossy(name)
                ));
            }
            match nodes.get(&parent) {
                Some(p) if p.kind == FileKind::Dir => {}
                _ => r.problem(format!(
                    "dirent {:?} in {parent}: parent is not a directory",
                    String::from_utf8_lossy(name)
                )),
            }
            let Some(child) = nodes.get(&d.ino) else {
                r.problem(format!(
                    "dirent {:?} in {parent}: points at missing node {}",
                    String::from_utf8_lossy(name),
                    d.ino
                ));
                continue;
            };
            let want = EntryRecord {
                parent: nodes.get(&parent).map_or(NodeId(0), |p| p.id),
                name: name.to_vec(),
                node: child.id,
            };
            match view.get(Cf::Entries, &key::node_id(d.entry))? {
                Some(b) if records::decode::<EntryRecord>("entry", &b).ok() == Some(want) => {}
                _ => r.problem(format!(
                    "dirent {:?} in {parent}: entry {} missing or elsewhere",
                    String::from_utf8_lossy(name),
                    d.entry
                )),
            }
            if child.kind != d.kind {
                r.problem(format!(
                    "dirent {:?} in {parent}: kind differs from node {}",
                    String::from_utf8_lossy(name),
                    d.ino
                ));
            }
            if child.kind == FileKind::Dir {
                *subdirs.entry(parent).or_default() += 1;
                if child.parent != parent {
                    r.problem(format!(
                        "directory {}: parent pointer {} but named in {parent}",
                        d.ino, child.parent
                    ));
                }
            }
            *names.entry(d.ino).or_default() += 1;
            children.entry(parent).or_default().push(d.ino);
        }
        let entries = all(view, Cf::Entries).count() as u64;
        if entries != r.dirents {
            r.problem(format!("{entries} entries but {} dirents", r.dirents));
        }
        let mut orphans: HashSet<Ino> = HashSet::new();
        for item in all(view, Cf::Orphans) {
            orphans.insert(key::ino_of(&item?.0)?);
        }
        r.orphans = orphans.len() as u64;
        for (&ino, n) in &nodes {
            let count = names.get(&ino).copied().unwrap_or(0);
            if n.kind == FileKind::Dir {
                let want = 2 + subdirs.get(&ino).copied().unwrap_or(0);
                if n.nlink != want {
                    r.problem(format!(
                        "directory {ino}: nlink {} but {} expected",
                        n.nlink, want
                    ));
                }
                let want_names = if ino == ROOT_INO { 0 } else { 1 };
                if count != want_names {
                    r.problem(format!("directory {ino}: {count} names"));
                }
            } else if n.nlink != count {
                r.problem(format!("node {ino}: nlink {} but {count} names", n.nlink));
            } else if count == 0 && !orphans.contains(&ino) {
                r.problem(format!("node {ino}: no names and not an orphan"));
            }
        }
        for &o in &orphans {
            if nodes.get(&o).is_none_or(|n| n.nlink != 0) {
                r.problem(format!(
                    "orphan mark on {o}, which is missing or still named"
                ));
            }
        }
        // Reachability from the root; a directory seen twice means a cycle or a second name.
        let mut seen: HashSet<Ino> = HashSet::new();
        let mut queue = VecDeque::from([ROOT_INO]);
        while let Some(dir) = queue.pop_front() {
            if !seen.insert(dir) {
                r.problem(format!("directory {dir} is reached twice (cycle)"));
                continue;
            }
            for &c in children.get(&dir).map(Vec::as_slice).unwrap_or(&[]) {
                if nodes.get(&c).is_some_and(|n| n.kind == FileKind::Dir) {
                    queue.push_back(c);
                } else {
                    seen.insert(c);
                }
            }
        }
        for &ino in nodes.keys() {
            if !seen.contains(&ino) && !orphans.contains(&ino) {
                r.problem(format!("node {ino} is not reachable from the root"));
            }
        }

        // Extents: order, bounds, and the references they hold.
        let mut counted: HashMap<ChunkId, u64> = HashMap::new();
        let mut last: Option<(Ino, u64)> = None;
        for item in all(view, Cf::Extents) {
            let (k, v) = item?;
            r.extents += 1;
            let (ino, off) = key::extent_offset(&k)?;
            let e: ExtentRecord = match records::decode("extent", &v) {
                Ok(e) => e,
                Err(err) => {
                    r.problem(format!("extent {ino}@{off}: {err}"));
                    continue;
                }
            };
            stats.referenced_bytes += u64::from(e.len);
            *counted.entry(e.chunk).or_default() += 1;
            let end = off + u64::from(e.len);
            match nodes.get(&ino) {
                Some(n) if n.kind == FileKind::File => {
                    if end > n.size {
                        r.problem(format!(
                            "extent {ino}@{off}+{} beyond size {}",
                            e.len, n.size
                        ));
                    }
                }
                _ => r.problem(format!("extent {ino}@{off} of a missing or non-file node")),
            }
            if e.len == 0 {
                r.problem(format!("extent {ino}@{off} is empty"));
            }
            if let Some((li, lend)) = last {
                if li == ino && off < lend {
                    r.problem(format!("extents of {ino} overlap at {off}"));
                }
            }
            last = Some((ino, end));
        }

        // Chunks: reference counts, presence, hashes.
        let mut refs: HashMap<ChunkId, RefRecord> = HashMap::new();
        let mut referenced: HashSet<ChunkId> = HashSet::new();
        for item in all(view, Cf::Refs) {
            let (k, v) = item?;
            let Ok(id) = k.as_slice().try_into().map(ChunkId) else {
                r.problem("refs key of the wrong length".into());
                continue;
            };
            match records::decode::<RefRecord>("chunk ref", &v) {
                Ok(rec) => {
                    let want = counted.get(&id).copied().unwrap_or(0);
                    if rec.count != want {
                        r.problem(format!(
                            "chunk {}: refcount {} but {} references",
                            id.fmt_short(),
                            rec.count,
                            want
                        ));
                    }
                    if rec.stored == 0 {
                        // Content made elsewhere and not fetched yet.
                        r.absent += 1;
                    } else {
                        stats.chunks += 1;
                        stats.chunk_bytes += u64::from(rec.len);
                        stats.stored_bytes += u64::from(rec.stored);
                        refs.insert(id, rec);
                    }
                    referenced.insert(id);
                }
                Err(e) => r.problem(format!("chunk {}: {e}", id.fmt_short())),
            }
        }
        for id in counted.keys() {
            if !referenced.contains(id) {
                r.problem(format!(
                    "chunk {} is referenced but has no refs entry",
                    id.fmt_short()
                ));
            }
        }
        let mut staged: HashSet<ChunkId> = HashSet::new();
        for item in all(view, Cf::Pending) {
            let (k, _) = item?;
            match k.get(..32).and_then(|b| b.try_into().ok()) {
                Some(id) => {
                    staged.insert(ChunkId(id));
                }
                None => r.problem("pending marker key of the wrong length".into()),
            }
        }
        r.staged = staged.len() as u64;
        let mut data_seen = 0u64;
        for item in all(view, Cf::Chunks) {
            let (k, v) = item?;
            data_seen += 1;
            let Ok(id) = k.as_slice().try_into().map(ChunkId) else {
                r.problem("chunk key of the wrong length".into());
                continue;
            };
            let Some(rec) = refs.get(&id) else {
                // A fetch that a crash cut between writing the data and recording it: the
                // chunk still counts as absent and the next fetch overwrites it.
                if !staged.contains(&id) && !referenced.contains(&id) {
                    r.problem(format!(
                        "chunk {} is stored but unreferenced (garbage)",
                        id.fmt_short()
                    ));
                }
                data_seen -= 1;
                continue;
            };
            if v.len() != rec.stored as usize {
                r.problem(format!(
                    "chunk {}: stored length {} but {} recorded",
                    id.fmt_short(),
                    v.len(),
                    rec.stored
                ));
            }
            match chunk::decode_verified(&id, v, rec.len as usize) {
                Ok(plain) => {
                    r.chunks += 1;
                    r.chunk_bytes += plain.len() as u64;
                }
                Err(e) => r.problem(format!("chunk {}: {e}", id.fmt_short())),
            }
        }
        if data_seen != refs.len() as u64 {
            r.problem(format!(
                "{} refs entries but {} stored chunks",
                refs.len(),
                data_seen
            ));
        }

        // Extended attributes belong to nodes, each with the value its register holds.
        for item in all(view, Cf::Xattrs) {
            let (k, v) = item?;
            let ino = key::ino_of(&k)?;
            let Some(n) = nodes.get(&ino) else {
                r.problem(format!("extended attribute of missing node {ino}"));
                continue;
            };
            let name = &k[8..];
            let reg = view
                .get(Cf::XattrRegs, &key::xattr_reg(n.id, name))?
                .map(|b| {
                    records::decode::<(crate::types::Hlc, Option<Vec<u8>>)>("xattr register", &b)
                })
                .transpose()?;
            if reg.and_then(|(_, value)| value).as_ref() != Some(&v) {
                r.problem(format!(
                    "extended attribute {} of node {ino} differs from its register",
                    String::from_utf8_lossy(name)
                ));
            }
        }
        // ... and every set register of a live node is one of its extended attributes.
        for item in all(view, Cf::XattrRegs) {
            let (k, v) = item?;
            let (_, value): (crate::types::Hlc, Option<Vec<u8>>) =
                records::decode("xattr register", &v)?;
            let Some(id) = k.get(..16).and_then(|b| <[u8; 16]>::try_from(b).ok()) else {
                r.problem("an xattr register with a short key".to_string());
                continue;
            };
            let Some(ino) = view
                .get(Cf::Ids, &id)?
                .map(|v| key::ino_of(&v))
                .transpose()?
            else {
                continue;
            };
            if value.is_some() && nodes.contains_key(&ino) {
                let held = view.get(Cf::Xattrs, &key::xattr(ino, &k[16..]))?;
                if held.is_none() {
                    r.problem(format!(
                        "node {ino} lacks extended attribute {} its register holds",
                        String::from_utf8_lossy(&k[16..])
                    ));
                }
            }
        }

        // Every writer's ops are gap-free from 1 and form one hash chain, which ends where
        // the store says it holds that writer (its heads, or this device's counters), and
        // whose last op carries its author's signature (which vouches for the chain).
        let mut ends = match crate::store::stored_heads(view, self.device()) {
            Ok(heads) => heads,
            Err(e) => {
                r.problem(format!("the store's heads: {e}"));
                BTreeMap::new()
            }
        };
        let namespace = self.namespace();
        // A checkpoint cut each writer's log: its chain resumes after the cut.
        let checkpoint: records::CheckpointRecord =
            match view.get(Cf::Meta, key::META_CHECKPOINT)? {
                Some(b) => records::decode("checkpoint", &b).unwrap_or_else(|e| {
                    r.problem(e.to_string());
                    Default::default()
                }),
                None => Default::default(),
            };
        let mut chain: Option<(Writer, u64, OpHash, Option<OpRecord>)> = None;
        let mut finish =
            |r: &mut FsckReport, chain: Option<(Writer, u64, OpHash, Option<OpRecord>)>| {
                let Some((w, seq, hash, last)) = chain else {
                    return;
                };
                match ends.remove(&w) {
                    Some(end) if end == (seq, hash) => {}
                    end => r.problem(format!(
                        "ops of {} end at #{seq}, the store says {:?}",
                        w.fmt_short(),
                        end.map(|e| e.0)
                    )),
                }
                let key = match view.get(Cf::Meta, &key::device_key(&w.device)) {
                    Ok(k) => k.and_then(|k| <[u8; KEY_LEN]>::try_from(k).ok()),
                    Err(e) => {
                        r.problem(format!("reading the key of {}: {e}", w.device.fmt_short()));
                        return;
                    }
                };
                match (key, last) {
                    (Some(key), Some(op)) => {
                        if let Err(e) = auth::verify(&namespace, &key, &op) {
                            r.problem(format!("last op of {}: {e}", w.fmt_short()));
                        }
                    }
                    _ => r.problem(format!("no key for the author of {}", w.fmt_short())),
                }
            };
        for item in all(view, Cf::Oplog) {
            let (k, v) = item?;
            r.ops += 1;
            let op = match records::decode::<OpRecord>("op", &v) {
                Ok(op) => op,
                Err(e) => {
                    r.problem(format!("op: {e}"));
                    continue;
                }
            };
            if k != key::op_id(op.id) {
                r.problem(format!("op {} stored under another key", op.id.fmt_short()));
            }
            let w = op.id.writer();
            if chain.as_ref().is_none_or(|c| c.0 != w) {
                finish(&mut r, chain.take());
                let (seq, hash) = match checkpoint.cut.get(&w) {
                    // What is left of the compacted part (a compaction was cut short) is
                    // checked from its first op on, and must lead to the cut.
                    Some(&(cut, _)) if op.id.seq > 1 && op.id.seq <= cut => {
                        (op.id.seq - 1, op.prev)
                    }
                    Some(&cut) if op.id.seq > 1 => cut,
                    _ => (0, GENESIS),
                };
                chain = Some((w, seq, hash, None));
            }
            let c = chain.as_mut().expect("set above");
            if op.id.seq != c.1 + 1 {
                r.problem(format!(
                    "op log gap: {} where #{} expected",
                    op.id.fmt_short(),
                    c.1 + 1
                ));
            }
            if op.prev != c.2 {
                r.problem(format!(
                    "op {} breaks its writer's hash chain",
                    op.id.fmt_short()
                ));
            }
            c.1 = op.id.seq;
            c.2 = auth::op_hash(&op);
            if let Some(&(cut, hash)) = checkpoint.cut.get(&w) {
                if c.1 == cut && c.2 != hash {
                    r.problem(format!(
                        "ops of {} do not lead to the checkpoint's cut",
                        w.fmt_short()
                    ));
                }
            }
            c.3 = Some(op);
        }
        finish(&mut r, chain.take());
        for (w, (seq, hash)) in ends {
            if checkpoint.cut.get(&w) == Some(&(seq, hash)) {
                // Compacted to its last op.
                continue;
            }
            r.problem(format!(
                "the store says it holds {} up to #{seq}, its log has none",
                w.fmt_short()
            ));
        }
        match view.get(Cf::Meta, key::META_STATS)? {
            Some(b) => {
                let stored: StatsRecord = records::decode("stats", &b)?;
                if stored != stats {
                    r.problem(format!("statistics {stored:?} but recount gives {stats:?}"));
                }
            }
            None => r.problem("statistics missing".into()),
        }
        if let Some(next_ino) = meta(view, key::META_NEXT_INO)? {
            if nodes.keys().any(|&i| i >= next_ino) {
                r.problem("a node's ino is not below the ino counter".into());
            }
        }
        Ok(r)
    }
}

fn meta(view: &dyn ReadView, k: &[u8]) -> Result<Option<u64>> {
    Ok(view
        .get(Cf::Meta, k)?
        .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes)))
}
