//! What the convergence test and the simulation share: random namespace changes on a
//! replica, delivery of ops between replicas, and the checks of a converged tree (same
//! tree everywhere, no lost file version).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use pvfs_store::{
    ChunkId, FileKind, Ino, NewExtent, NewNode, NodeId, OpId, OpKind, OpRecord, PreparedChunk,
    RenameFlags, SetAttrs, SetTime, Store, Timestamp, Version, XattrMode, ROOT_INO,
};

pub const NAMES: [&str; 4] = ["a", "b.txt", "c", "d.txt"];
/// Extended attribute names the changes use.
pub const XATTRS: [&str; 3] = ["user.a", "user.b", "user.c"];

#[derive(Clone, Debug)]
pub enum Act {
    Create {
        dir: usize,
        name: usize,
        is_dir: bool,
    },
    Write {
        file: usize,
        seed: u8,
        len: u16,
    },
    Append {
        file: usize,
        seed: u8,
        len: u16,
    },
    Rename {
        src: usize,
        dir: usize,
        name: usize,
    },
    Remove {
        node: usize,
    },
    Link {
        file: usize,
        dir: usize,
        name: usize,
    },
    /// chmod and utimes of any node (the root included).
    SetAttr {
        node: usize,
        perm: u16,
        secs: u16,
    },
    /// Sets (or, with `None`, removes) one of a few extended attributes of any node.
    Xattr {
        node: usize,
        name: usize,
        value: Option<u8>,
    },
}

/// Every name in the tree: (parent ino, name, ino, kind), directories first-found order.
pub fn walk(s: &Store) -> Vec<(Ino, Vec<u8>, Ino, FileKind)> {
    let mut out = Vec::new();
    let mut dirs = vec![ROOT_INO];
    while let Some(d) = dirs.pop() {
        for (name, e) in s.list_dir(d).unwrap() {
            if e.kind == FileKind::Dir {
                dirs.push(e.ino);
            }
            out.push((d, name, e.ino, e.kind));
        }
    }
    out
}

pub fn content(seed: u8, len: u16) -> Bytes {
    (0..len as usize)
        .map(|i| seed.wrapping_add((i / 7) as u8))
        .collect::<Vec<u8>>()
        .into()
}

pub fn run(s: &Store, a: &Act) {
    let all = walk(s);
    let dirs: Vec<Ino> = std::iter::once(ROOT_INO)
        .chain(all.iter().filter(|x| x.3 == FileKind::Dir).map(|x| x.2))
        .collect();
    let files: Vec<Ino> = all
        .iter()
        .filter(|x| x.3 == FileKind::File)
        .map(|x| x.2)
        .collect();
    let pick = |v: &[Ino], i: usize| (!v.is_empty()).then(|| v[i % v.len()]);
    let no_open = |_: Ino| false;
    // Local errors (name taken, directory not empty, cycles) are expected and ignored.
    let _ = match a {
        Act::Create { dir, name, is_dir } => s
            .commit(false, |tx| {
                let kind = if *is_dir {
                    FileKind::Dir
                } else {
                    FileKind::File
                };
                let new = NewNode {
                    kind,
                    perm: 0o755,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    target: None,
                };
                tx.create(dirs[dir % dirs.len()], NAMES[*name].as_bytes(), new)
                    .map(|_| ())
            })
            .map(|_| ()),
        Act::Write { file, seed, len } | Act::Append { file, seed, len } => {
            let Some(ino) = pick(&files, *file) else {
                return;
            };
            let append = matches!(a, Act::Append { .. });
            let data = content(*seed, *len);
            s.commit(false, |tx| {
                let size = tx.node_req(ino)?.size;
                let start = if append { size } else { 0 };
                let end = if append {
                    size + data.len() as u64
                } else {
                    size.max(data.len() as u64)
                };
                let chunk = PreparedChunk::new(data.clone(), true);
                let new = [NewExtent {
                    offset: start,
                    chunk,
                }];
                tx.replace_extents(
                    ino,
                    (start, end),
                    &new,
                    start + data.len() as u64,
                    Timestamp::now(),
                )
                .map(|_| ())
            })
        }
        Act::Rename { src, dir, name } => {
            if all.is_empty() {
                return;
            }
            let (sp, sn, _, _) = &all[src % all.len()];
            s.commit(false, |tx| {
                tx.rename(
                    *sp,
                    sn,
                    dirs[dir % dirs.len()],
                    NAMES[*name].as_bytes(),
                    RenameFlags::default(),
                    &no_open,
                )
            })
        }
        Act::SetAttr { node, perm, secs } => {
            let inos: Vec<Ino> = std::iter::once(ROOT_INO)
                .chain(all.iter().map(|x| x.2))
                .collect();
            let ino = inos[node % inos.len()];
            let attrs = SetAttrs {
                perm: Some(u32::from(*perm) & 0o777),
                mtime: Some(SetTime::At(Timestamp {
                    sec: i64::from(*secs),
                    nsec: 0,
                })),
                ..SetAttrs::default()
            };
            s.commit(false, |tx| tx.setattr(ino, &attrs).map(|_| ()))
        }
        Act::Xattr { node, name, value } => {
            let inos: Vec<Ino> = std::iter::once(ROOT_INO)
                .chain(all.iter().map(|x| x.2))
                .collect();
            let ino = inos[node % inos.len()];
            let name = XATTRS[name % XATTRS.len()].as_bytes();
            s.commit(false, |tx| match value {
                Some(v) => tx.set_xattr(ino, name, &[*v; 3], XattrMode::Any),
                None => tx.remove_xattr(ino, name),
            })
        }
        Act::Remove { node } => {
            if all.is_empty() {
                return;
            }
            let (p, n, _, kind) = &all[node % all.len()];
            s.commit(false, |tx| {
                if *kind == FileKind::Dir {
                    tx.rmdir(*p, n).map(|_| ())
                } else {
                    tx.unlink(*p, n, &no_open).map(|_| ())
                }
            })
        }
        Act::Link { file, dir, name } => {
            let Some(ino) = pick(&files, *file) else {
                return;
            };
            s.commit(false, |tx| {
                tx.link(ino, dirs[dir % dirs.len()], NAMES[*name].as_bytes())
                    .map(|_| ())
            })
        }
    };
}

/// Delivers at most `max` ops that `to` lacks from `from`; returns how many were new.
/// A device that compacted ops `to` lacks sends nothing (`to` needs another source).
pub fn sync(from: &Store, to: &Store, max: usize) -> usize {
    let ops = match from.ops_after(&to.version_vector(), max) {
        Ok(ops) => ops,
        Err(pvfs_store::StoreError::Compacted(_)) => return 0,
        Err(e) => panic!("ops_after: {e}"),
    };
    let keys = from.device_keys(ops.iter().map(|o| o.id.device)).unwrap();
    let applied = to.apply_remote(&ops, &keys, &|_| false).unwrap();
    applied.applied
}

pub type Dump = Vec<(
    Vec<u8>,
    FileKind,
    u64,
    Vec<(u64, ChunkId, u32)>,
    NodeId,
    (Timestamp, u32, Xattrs),
)>;

/// A node's extended attributes, by name.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

fn xattrs(s: &Store, ino: Ino) -> Xattrs {
    let mut names = s.xattr_names(ino).unwrap();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let v = s.xattr(ino, &n).unwrap().unwrap_or_default();
            (n, v)
        })
        .collect()
}

/// The tree by path, with each node's size, extents and modification time.
pub fn dump(s: &Store) -> Dump {
    // Each device made its own root: its time is the same everywhere once an op set it.
    let root = s.node(ROOT_INO).unwrap().unwrap();
    let root_mtime = if root.stamps.mtime == Default::default() {
        Timestamp::default()
    } else {
        root.mtime
    };
    let root_perm = if root.stamps.mode == Default::default() {
        0
    } else {
        root.perm
    };
    let mut out = vec![(
        b"/".to_vec(),
        FileKind::Dir,
        0,
        Vec::new(),
        root.id,
        (root_mtime, root_perm, xattrs(s, ROOT_INO)),
    )];
    let mut dirs = vec![(ROOT_INO, Vec::new())];
    while let Some((d, path)) = dirs.pop() {
        for (name, e) in s.list_dir(d).unwrap() {
            let mut p = path.clone();
            p.push(b'/');
            p.extend_from_slice(&name);
            let n = s.node(e.ino).unwrap().unwrap();
            let ext = s
                .extents(e.ino, 0, u64::MAX)
                .unwrap()
                .into_iter()
                .map(|(o, x)| (o, x.chunk, x.len))
                .collect();
            if e.kind == FileKind::Dir {
                dirs.push((e.ino, p.clone()));
            }
            let xa = xattrs(s, e.ino);
            out.push((p, e.kind, n.size, ext, n.id, (n.mtime, n.perm, xa)));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

pub fn show(d: &Dump) -> String {
    d.iter()
        .map(|(p, k, size, ext, id, (mtime, perm, xa))| {
            let ext: Vec<String> = ext
                .iter()
                .map(|(o, c, l)| format!("{o}+{l}:{}", &c.fmt_short()[..4]))
                .collect();
            let xa: Vec<String> = xa
                .iter()
                .map(|(n, v)| format!("{}={v:?}", String::from_utf8_lossy(n)))
                .collect();
            format!(
                "  {} {k:?} {size} [{}] {} mtime {}.{:09} mode {perm:o} xattrs [{}]",
                String::from_utf8_lossy(p),
                ext.join(" "),
                &id.to_string()[..6],
                mtime.sec,
                mtime.nsec,
                xa.join(" ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Content versions that no later op was based on or saw: each must survive somewhere.
pub fn heads(ops: &[OpRecord]) -> Vec<(NodeId, OpId)> {
    let mut superseded = HashSet::new();
    let mut versions = Vec::new();
    for op in ops {
        match &op.kind {
            OpKind::Content { node, base, .. } => {
                versions.push((*node, op.id));
                superseded.extend(*base);
            }
            OpKind::Unlink { seen, .. } => superseded.extend(*seen),
            OpKind::Rename {
                other: Some((_, _, seen)),
                exchange: false,
                ..
            } => superseded.extend(*seen),
            _ => {}
        }
    }
    versions.retain(|(_, v)| !superseded.contains(v));
    versions
}

pub fn all_ops(s: &Store) -> Vec<OpRecord> {
    s.ops_after(&BTreeMap::new(), usize::MAX).unwrap()
}

/// Checks replicas that exchanged every op: each fsck-clean, all with the same tree (the
/// first's, returned).
pub fn check_same(stores: &[&Store]) -> Result<Dump, String> {
    let first = dump(stores[0]);
    for (i, s) in stores.iter().enumerate() {
        let report = s.fsck().map_err(|e| format!("replica {i} fsck: {e}"))?;
        if !report.is_clean() {
            return Err(format!("replica {i} fsck: {:?}", report.problems));
        }
        let d = dump(s);
        if d != first {
            return Err(format!(
                "replica {i} differs from replica 0:\n{}\n--- vs ---\n{}",
                show(&d),
                show(&first)
            ));
        }
    }
    Ok(first)
}

/// Checks replicas that exchanged every op: each fsck-clean, all with the same tree, and
/// every file version that no later op superseded present in it (or in a conflict copy),
/// of those `owed` says must survive.
pub fn check_converged(stores: &[&Store], owed: &dyn Fn(&OpId) -> bool) -> Result<(), String> {
    let first = check_same(stores)?;
    let ops = all_ops(stores[0]);
    let present: HashSet<Version> = first
        .iter()
        .filter(|x| x.1 == FileKind::File)
        .map(|x| (x.3.clone(), x.2))
        .collect();
    let version = |node, v: OpId| {
        stores[0]
            .version_content(node, v)
            .map_err(|e| format!("version {v:?} of node {node}: {e}"))
    };
    // Conflict copies: a new file whose first content is a whole version of another. A copy
    // may be edited further; its own later versions are then checked as heads in turn.
    let mut copies: HashSet<(NodeId, Version)> = HashSet::new();
    for op in &ops {
        if let OpKind::Content {
            node, base: None, ..
        } = &op.kind
        {
            copies.insert((*node, version(*node, op.id)?));
        }
    }
    for (node, v) in heads(&ops) {
        if !owed(&v) {
            continue;
        }
        let c = version(node, v)?;
        let copied = copies.iter().any(|(n, cc)| *n != node && *cc == c);
        if !(present.contains(&c) || copied) {
            return Err(format!("version {v:?} of node {node} was lost"));
        }
    }
    Ok(())
}
