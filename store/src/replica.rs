//! Ops from other devices, applied so that every device converges on the same tree.
//!
//! Owns: the version vector; validation of remote ops; the move log's undo and redo
//! (Kleppmann et al., "A highly-available move operation for replicated trees": moves apply
//! in clock order, a late op undoes the later moves it interacts with, applies, and redoes
//! them; a move that would make a cycle is skipped); conflict names; last-writer-wins
//! attributes; content versions; conflict copies; rebuilding a node that a late op brings
//! back.
//! Must not: talk to the network or choose what to send (that is `net`), or check
//! permissions: a member's ops are authorised by membership.
//!
//! Rules that keep every version (DESIGN.md, "Nothing is lost silently"), each a function of
//! the ops alone, so that every device reaches the same state:
//! - Two entries that end up with one name in one directory: the later move (in clock order)
//!   gets `name (conflict <device> <date>).ext`.
//! - A move into a directory that is gone goes to the root under a conflict name.
//! - Removing a directory that is not empty (a concurrent create landed in it) is skipped.
//! - Concurrent content edits: the later edit (clock, then device) is the file's content. The
//!   device whose own edit lost keeps it as a conflict copy, with ordinary ops of its own, so
//!   the copy reaches every device. The same device restores its edit as a copy when a delete
//!   that had not seen the edit removes the file (decided when the delete, or the file's
//!   version, is new here), and so does a store restored from a backup for the edits of its
//!   earlier incarnations that come back from peers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::auth::{self, Evidence, OpHash, GENESIS, KEY_LEN};
use crate::error::{Result, StoreError};
use crate::kv::{self, Cf};
use crate::ns::{validate_name, NAME_MAX, SYMLINK_MAX, XATTR_VALUE_MAX};
use crate::records::{
    self, key, BornRecord, DirentRecord, EntryRecord, ExtentRecord, Loc, MemberRecord, MoveRecord,
    NodeRecord, OpKind, OpRecord,
};
use crate::store::Store;
use crate::txn::Txn;
use crate::types::{
    ChunkId, DeviceId, FileKind, Hlc, Ino, NodeId, OpId, Timestamp, Writer, ROOT_INO,
};

/// For each writer (device and incarnation), the highest sequence number of its ops that a
/// store holds.
pub type VersionVector = BTreeMap<Writer, u64>;

/// How far into the future (by this device's clock) an op's clock may be: later ones are
/// refused, so that no peer can push the clocks of every device towards overflow.
pub const MAX_CLOCK_SKEW_MS: u64 = 60 * 60 * 1000;

/// A file's content as offset -> (chunk, length).
type ExtentMap = BTreeMap<u64, (ChunkId, u32)>;

/// A file's content as (offset, chunk, length) triples, and its size.
pub type Version = (Vec<(u64, ChunkId, u32)>, u64);

/// Writers refused in one batch at most: past that the batch fails as a whole (each refusal
/// re-runs the batch, so a peer cannot make one batch cost more than this many runs).
pub const MAX_REFUSED_WRITERS: usize = 16;

/// Longest device name, in bytes.
pub const MEMBER_NAME_MAX: usize = 64;

/// Longest base chain followed when rebuilding a version (a bound against corrupt logs).
const MAX_CHAIN: usize = 1 << 20;

/// What applying remote ops changed, for invalidating the kernel's caches.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    /// Ops applied (duplicates excluded).
    pub applied: usize,
    /// Ops already held.
    pub duplicates: usize,
    /// Directory entries added or removed: (directory, name).
    pub names: Vec<(Ino, Vec<u8>)>,
    /// Nodes whose attributes or content changed.
    pub nodes: Vec<Ino>,
    /// Conflict copies made of this device's versions.
    pub conflict_copies: usize,
    /// Moves skipped (cycles, non-empty directories).
    pub skipped_moves: usize,
    /// Devices newly caught signing two different ops under one id (the second op is not
    /// applied; the evidence is kept: `Store::evidence`).
    pub equivocators: Vec<DeviceId>,
    /// Ops refused, each with the ops after it of its writer in this batch (they follow it):
    /// the rest of the batch is applied without them.
    pub refused: Vec<Refused>,
}

/// An op `apply_remote` refused, and why.
#[derive(Clone, Debug)]
pub struct Refused {
    /// The op.
    pub op: OpId,
    /// Why (validation, signature, chain, membership, clock, or an op it depends on).
    pub reason: String,
}

/// For each op, whether it is the last of its writer in `ops` once the ops of `skip` (writer
/// -> first sequence number left out) are left out.
fn run_ends(ops: &[OpRecord], skip: &HashMap<Writer, u64>) -> Vec<bool> {
    let mut last: HashMap<Writer, usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if skip.get(&op.id.writer()).is_none_or(|&s| op.id.seq < s) {
            last.insert(op.id.writer(), i);
        }
    }
    let mut ends = vec![false; ops.len()];
    for i in last.into_values() {
        ends[i] = true;
    }
    ends
}

/// True for errors of this device (its disk, its database) rather than of an op: they fail
/// the whole batch, which is tried again later.
fn is_local_failure(e: &StoreError) -> bool {
    e.is_no_space()
        || matches!(
            e,
            StoreError::Db(_) | StoreError::Io(_) | StoreError::DataDir { .. }
        )
}

/// One entry move requested by an op.
struct Move {
    entry: NodeId,
    node: NodeId,
    kind: FileKind,
    target: Option<Loc>,
    seen: Option<OpId>,
}

/// What a set of moves touches: a later move that touches any of it may end differently
/// once they are applied before it, so it is undone and redone. Other later moves commute.
#[derive(Default)]
struct Interest {
    /// Entries, nodes and the directories of every place involved.
    ids: HashSet<NodeId>,
    /// Places (directory, name) involved.
    slots: HashSet<Loc>,
    /// Whether a directory moves: then every later directory move may change (cycles).
    dirs: bool,
}

impl Interest {
    /// `locs[0]` is the move's target.
    fn add(&mut self, entry: NodeId, node: NodeId, kind: FileKind, locs: &[&Option<Loc>]) {
        self.ids.insert(entry);
        self.ids.insert(node);
        self.dirs |= kind == FileKind::Dir;
        if kind == FileKind::Dir && locs[0].is_none() {
            // Removing a directory sends later moves into it to the root instead.
            self.ids.insert(NodeId::ROOT);
        }
        for l in locs.iter().copied().flatten() {
            self.ids.insert(l.0);
            self.slots.insert(l.clone());
        }
    }

    fn hits(&self, entry: NodeId, node: NodeId, kind: FileKind, locs: &[&Option<Loc>]) -> bool {
        self.ids.contains(&entry)
            || self.ids.contains(&node)
            || (self.dirs && kind == FileKind::Dir)
            || locs
                .iter()
                .copied()
                .flatten()
                .any(|l| self.ids.contains(&l.0) || self.slots.contains(l))
    }
}

/// State of one `apply_remote` call.
#[derive(Default)]
struct Cx {
    out: Applied,
    /// Nodes whose entries changed: settled (deleted or kept) at the end.
    touched: BTreeSet<NodeId>,
    /// Nodes a remote op took out of the tree: (version that op's device saw, last place).
    removed: HashMap<NodeId, (Option<OpId>, Loc)>,
    nodes: BTreeSet<Ino>,
    /// Edits of this device by an earlier incarnation of its store that lost to a newer
    /// one (the store was restored from a backup): the latest per file, kept as a conflict
    /// copy at the end.
    lost_own: BTreeMap<NodeId, OpRecord>,
    /// Files whose content version a remote op changed in this batch.
    versioned: HashSet<NodeId>,
}

impl Cx {
    /// Notes an edit of this device's earlier incarnation that lost here: the latest per
    /// file is kept as a conflict copy when the batch settles.
    fn lost_own(&mut self, node: NodeId, op: &OpRecord) {
        let later = self
            .lost_own
            .get(&node)
            .is_none_or(|o| (o.hlc, o.id) < (op.hlc, op.id));
        if later {
            self.lost_own.insert(node, op.clone());
        }
    }
}

/// A conflict name: `stem (conflict <device> <date>).ext`, within `NAME_MAX`.
pub fn conflict_name(name: &[u8], device: DeviceId, hlc: Hlc, n: u32) -> Vec<u8> {
    let (stem, ext) = match name.iter().rposition(|&b| b == b'.') {
        Some(i) if i > 0 && name.len() - i <= 16 => (&name[..i], &name[i..]),
        _ => (name, &name[name.len()..]),
    };
    let (y, m, d) = civil_date(hlc.millis() / 86_400_000);
    let mut tag = format!(" (conflict {} {y:04}-{m:02}-{d:02}", device.fmt_short());
    if n > 0 {
        tag.push_str(&format!(" {}", n + 1));
    }
    tag.push(')');
    let room = NAME_MAX - tag.len() - ext.len();
    let mut cut = stem.len().min(room);
    // A UTF-8 name is cut between characters, not inside one.
    if let Ok(text) = std::str::from_utf8(stem) {
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
    }
    let mut out = stem[..cut].to_vec();
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(ext);
    out
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_date(days: u64) -> (i64, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn invalid(what: impl Into<String>) -> StoreError {
    StoreError::Invalid(what.into())
}

/// Checks every field of a remote op that could hurt: names, targets, sizes, extents.
/// The nodes an op names (other than the one a `Create` makes): they must exist before it.
fn named_nodes(kind: &OpKind) -> Vec<NodeId> {
    match kind {
        OpKind::Create { parent, .. } => vec![*parent],
        OpKind::Link { node, parent, .. } | OpKind::Unlink { node, parent, .. } => {
            vec![*node, *parent]
        }
        OpKind::Rename {
            node,
            from_parent,
            to_parent,
            other,
            ..
        } => {
            let mut v = vec![*node, *from_parent, *to_parent];
            v.extend(other.map(|o| o.0));
            v
        }
        OpKind::SetAttr { node, .. }
        | OpKind::SetXattr { node, .. }
        | OpKind::Content { node, .. } => vec![*node],
        OpKind::Member { .. } => Vec::new(),
    }
}

/// The content versions an op names, with their files: the base of an edit, the version a
/// delete saw.
pub(crate) fn version_refs(kind: &OpKind) -> Vec<(NodeId, OpId)> {
    match kind {
        OpKind::Unlink { node, seen, .. } => seen.map(|v| (*node, v)).into_iter().collect(),
        OpKind::Rename { other, .. } => other
            .and_then(|(n, _, v)| v.map(|v| (n, v)))
            .into_iter()
            .collect(),
        OpKind::Content { node, base, .. } => base.map(|v| (*node, v)).into_iter().collect(),
        _ => Vec::new(),
    }
}

fn validate(op: &OpRecord) -> Result<()> {
    let check_target = |t: &Option<Vec<u8>>| match t {
        Some(t) if t.is_empty() || t.len() > SYMLINK_MAX || t.contains(&0) => {
            Err(invalid("bad symlink target"))
        }
        _ => Ok(()),
    };
    match &op.kind {
        OpKind::Create {
            node,
            name,
            kind,
            target,
            ..
        } => {
            validate_name(name)?;
            check_target(target)?;
            if (*kind == FileKind::Symlink) != target.is_some() || *node == NodeId::ROOT {
                return Err(invalid("malformed create"));
            }
        }
        OpKind::Link { name, .. } | OpKind::Unlink { name, .. } => validate_name(name)?,
        OpKind::Rename {
            from_name, to_name, ..
        } => {
            validate_name(from_name)?;
            validate_name(to_name)?;
        }
        OpKind::SetAttr { .. } => {}
        OpKind::Member { name, .. } => {
            if name.len() > MEMBER_NAME_MAX || name.chars().any(char::is_control) {
                return Err(invalid("bad device name"));
            }
        }
        OpKind::SetXattr { name, value, .. } => {
            if name.is_empty() || name.len() > NAME_MAX {
                return Err(invalid("bad extended attribute name"));
            }
            if value.as_ref().is_some_and(|v| v.len() > XATTR_VALUE_MAX) {
                return Err(invalid("extended attribute too large"));
            }
        }
        OpKind::Content {
            start,
            end,
            extents,
            size,
            ..
        } => {
            if start > end {
                return Err(invalid("content range reversed"));
            }
            let mut pos = 0u64;
            for &(off, _, len) in extents {
                let stop = off
                    .checked_add(u64::from(len))
                    .ok_or_else(|| invalid("extent overflows"))?;
                if off < pos || len == 0 || len as usize > crate::chunk::MAX_CHUNK || stop > *size {
                    return Err(invalid("extents overlap, are empty or lie beyond the size"));
                }
                pos = stop;
            }
        }
    }
    Ok(())
}

/// Applies a content delta to an extent map: extents overlapping `[start, end)` or reaching
/// past `size` go, the op's extents come in.
fn apply_delta(
    map: &mut ExtentMap,
    start: u64,
    end: u64,
    extents: &[(u64, ChunkId, u32)],
    size: u64,
) {
    map.retain(|&off, &mut (_, len)| {
        let stop = off + u64::from(len);
        let overlaps = off < end && stop > start;
        !overlaps && stop <= size
    });
    for &(off, id, len) in extents {
        map.insert(off, (id, len));
    }
}

impl Store {
    /// The version vector of this store: every writer's highest op held here.
    pub fn version_vector(&self) -> VersionVector {
        let st = self.writer_state();
        let mut vv: VersionVector = st.heads.iter().map(|(w, (seq, _))| (*w, *seq)).collect();
        if st.next_seq > 1 {
            vv.insert(st.writer(), st.next_seq - 1);
        }
        vv
    }

    /// Ops held here that a device with version vector `have` lacks, in clock order (which
    /// respects causality), at most `limit`. This device's own ops leave it only once they
    /// are durable: if some are not, the WAL is synced first (one sync covers every commit
    /// before it, so pushes after a burst of commits share it).
    /// Fails with `StoreError::Compacted` if `have` lacks ops this store has compacted (the
    /// asker needs a snapshot).
    pub fn ops_after(&self, have: &VersionVector, limit: usize) -> Result<Vec<OpRecord>> {
        let own = self.writer_state().writer();
        for (w, &(seq, _)) in &self.checkpoint().cut {
            let held = have.get(w).copied().unwrap_or(0);
            if held < seq {
                return Err(StoreError::Compacted(format!(
                    "it lacks ops of {} up to #{seq} (it holds #{held}), compacted here",
                    w.fmt_short()
                )));
            }
        }
        let mut vv = self.version_vector();
        if let Some(top) = vv.get_mut(&own) {
            if *top > have.get(&own).copied().unwrap_or(0) && self.durable_seq() < *top {
                self.sync()?;
            }
            *top = (*top).min(self.durable_seq());
        }
        let mut all = self.merged_ops(&vv, have, limit)?;
        // The receiver checks the signature of each writer's last op in the batch and the
        // hash chain of the others, so that op must carry a good one: another device's ops
        // were checked that way here, not one by one.
        let reader = self.reader();
        let writers: BTreeSet<Writer> = all
            .iter()
            .map(|o| o.id.writer())
            .filter(|w| *w != own)
            .collect();
        for w in writers {
            let key = reader.device_key(&w.device)?;
            while let Some(last) = all.iter().rposition(|o| o.id.writer() == w) {
                let good = key
                    .is_some_and(|k| auth::verify(&reader.state.namespace, &k, &all[last]).is_ok());
                if good {
                    break;
                }
                tracing::warn!(
                    op = %all[last].id.fmt_short(),
                    "not passing on an op whose signature does not verify (an earlier op of its writer is)"
                );
                all.remove(last);
            }
        }
        Ok(all)
    }

    /// The first `limit` ops in clock order of those held here (`vv`) beyond `have`: a
    /// merge of the writers' logs (each in clock order, its sequence order), read a page at
    /// a time, so that a store with many writers reads about `limit` ops, not `limit` per
    /// writer.
    fn merged_ops(
        &self,
        vv: &VersionVector,
        have: &VersionVector,
        limit: usize,
    ) -> Result<Vec<OpRecord>> {
        use std::cmp::Reverse;
        use std::collections::{BinaryHeap, VecDeque};
        /// One writer's ops not yet merged: those read, then from `next` up to `top`.
        struct Cursor {
            writer: Writer,
            read: VecDeque<OpRecord>,
            next: u64,
            top: u64,
            page: usize,
        }
        impl Cursor {
            fn fill(&mut self, store: &Store) -> Result<()> {
                if self.read.is_empty() && self.next <= self.top {
                    let want = (self.top - self.next + 1).min(self.page as u64) as usize;
                    let ops = store.ops(self.writer, self.next, want)?;
                    self.next = ops.last().map_or(self.top, |o| o.id.seq) + 1;
                    self.read
                        .extend(ops.into_iter().filter(|o| o.id.seq <= self.top));
                    self.page = (self.page * 2).min(1024);
                }
                Ok(())
            }
        }
        let mut cursors = Vec::new();
        let mut heap = BinaryHeap::new();
        for (w, &top) in vv {
            let from = have.get(w).copied().unwrap_or(0);
            if from >= top {
                continue;
            }
            let mut c = Cursor {
                writer: *w,
                read: VecDeque::new(),
                next: from + 1,
                top,
                page: 8.min(limit),
            };
            c.fill(self)?;
            if let Some(op) = c.read.front() {
                heap.push(Reverse(((op.hlc, op.id), cursors.len())));
            }
            cursors.push(c);
        }
        let mut all = Vec::new();
        while all.len() < limit {
            let Some(Reverse((_, i))) = heap.pop() else {
                break;
            };
            let c = &mut cursors[i];
            all.extend(c.read.pop_front());
            c.fill(self)?;
            if let Some(op) = c.read.front() {
                heap.push(Reverse(((op.hlc, op.id), i)));
            }
        }
        Ok(all)
    }

    /// The public keys of `devices` that this store knows (every author of an op it holds),
    /// each once.
    pub fn device_keys(
        &self,
        devices: impl IntoIterator<Item = DeviceId>,
    ) -> Result<Vec<[u8; KEY_LEN]>> {
        let r = self.reader();
        let mut out = Vec::new();
        for d in devices.into_iter().collect::<BTreeSet<_>>() {
            if let Some(k) = r.device_key(&d)? {
                out.push(k);
            }
        }
        Ok(out)
    }

    /// The hash of each op of `ops` marked in `which` whose signature verifies with its
    /// author's key (from `keys` or this store), checked outside the writer lock. `None`
    /// elsewhere (the transaction checks again where it must, and says why).
    fn check_signatures(
        &self,
        ops: &[OpRecord],
        keys: &[[u8; KEY_LEN]],
        which: &[bool],
    ) -> Result<Vec<Option<OpHash>>> {
        let mut table: HashMap<DeviceId, [u8; KEY_LEN]> = keys
            .iter()
            .map(|k| (DeviceId::from_public_key(k), *k))
            .collect();
        let reader = self.reader();
        for op in ops {
            if let std::collections::hash_map::Entry::Vacant(e) = table.entry(op.id.device) {
                if let Some(k) = reader.device_key(&op.id.device)? {
                    e.insert(k);
                }
            }
        }
        let namespace = self.namespace();
        Ok(ops
            .iter()
            .zip(which)
            .map(|(op, &wanted)| {
                let key = table.get(&op.id.device).filter(|_| wanted)?;
                auth::verify(&namespace, key, op).ok()
            })
            .collect())
    }

    /// Every membership change held here (for a joining device's welcome), in clock order.
    pub fn member_ops(&self) -> Result<Vec<OpRecord>> {
        let view = self.snapshot();
        let mut out = Vec::new();
        for item in kv::scan_prefix(&*view, Cf::Meta, key::META_MEMBER_OP) {
            let (k, v) = item?;
            if !v.is_empty() {
                // Compacted: the index keeps the op itself.
                out.push(records::decode::<OpRecord>("op", &v)?);
                continue;
            }
            let op = view
                .get(Cf::Oplog, &k[key::META_MEMBER_OP.len()..])?
                .ok_or_else(|| StoreError::corrupt("a membership op missing from the log"))?;
            out.push(records::decode::<OpRecord>("op", &op)?);
        }
        out.sort_by_key(|o| (o.hlc, o.id));
        Ok(out)
    }

    /// Takes the namespace's membership from the inviting device's welcome (a joining
    /// device, before its first sync): each change must carry its author's signature, and
    /// each author must be a member by the changes before it; the first adds its own author
    /// (the device that made the namespace). The ops themselves come later, with the log.
    pub fn seed_members(&self, ops: &[OpRecord], keys: &[[u8; KEY_LEN]]) -> Result<usize> {
        self.commit(true, |tx| {
            for k in keys {
                tx.learn_key(k)?;
            }
            let mut ops = ops.to_vec();
            ops.sort_by_key(|o| (o.hlc, o.id));
            for (i, op) in ops.iter().enumerate() {
                let OpKind::Member {
                    device,
                    name,
                    added,
                } = &op.kind
                else {
                    return Err(invalid("a welcome carries membership changes only"));
                };
                validate(op)?;
                let key = tx
                    .device_key(&op.id.device)?
                    .ok_or_else(|| invalid("no key for the author of a membership change"))?;
                auth::verify(&tx.state.namespace, &key, op)?;
                let founding = i == 0 && *added && *device == op.id.device;
                if !founding
                    && !tx
                        .member(&op.id.device)?
                        .is_some_and(|m| m.added && !m.removed)
                {
                    return Err(invalid(
                        "a membership change by a device that was no member",
                    ));
                }
                tx.apply_member(*device, name, *added)?;
                tx.state.hlc = tx.state.hlc.max(op.hlc);
            }
            Ok(ops.len())
        })
    }

    /// Devices caught equivocating, with the proof.
    pub fn evidence(&self) -> Result<Vec<(DeviceId, Evidence)>> {
        self.device_records(key::META_EVIDENCE, "evidence")
    }

    /// The extents and size of `node` at content version `version`, rebuilt from the op log
    /// (for conflict resolution, history, and tests).
    pub fn version_content(&self, node: NodeId, version: OpId) -> Result<Version> {
        let mut reader = self.reader();
        reader.state.checkpoint = self.checkpoint();
        let (map, size) = reader.materialize(node, Some(version))?;
        Ok((map.into_iter().map(|(o, (c, l))| (o, c, l)).collect(), size))
    }

    /// Applies ops from other devices, in one transaction. Ops must come in sequence order
    /// per writer and without gaps (as `ops_after` yields them); ops already held are skipped.
    /// `keys` are public keys of their authors (a key is kept only under the device id it
    /// derives; keys already known need not come again). Every op must follow its writer's
    /// hash chain and carry its author's signature, and its author must be a member.
    /// An op that fails is refused with the rest of its writer's ops in the batch, and so is
    /// any op that fails because of it; the others are applied (`Applied::refused`). Only a
    /// failure of this device (its disk) fails the whole batch.
    /// `is_open` says which local inodes are open (an open file that loses its last name
    /// stays until closed).
    pub fn apply_remote(
        &self,
        ops: &[OpRecord],
        keys: &[[u8; KEY_LEN]],
        is_open: &dyn Fn(Ino) -> bool,
    ) -> Result<Applied> {
        let checked = self.check_signatures(ops, keys, &run_ends(ops, &HashMap::new()))?;
        let mut refused = Vec::new();
        // Writer -> the first of its sequence numbers refused in this batch.
        let mut skip: HashMap<Writer, u64> = HashMap::new();
        // Each round refuses one more writer, or ends.
        loop {
            let mut failed = None;
            // The last op of each writer applied in this round vouches for the ones before it
            // (the hash chain): its signature is checked, theirs need not be.
            let ends = run_ends(ops, &skip);
            let res = self.commit(false, |tx| {
                let mut cx = Cx::default();
                for k in keys {
                    tx.learn_key(k)?;
                }
                for (i, op) in ops.iter().enumerate() {
                    if skip.get(&op.id.writer()).is_some_and(|&s| op.id.seq >= s) {
                        continue;
                    }
                    let sig = ends[i].then_some(checked[i]);
                    if let Err(e) = tx.apply_one(op, sig, &mut cx) {
                        if !is_local_failure(&e) {
                            failed = Some(i);
                        }
                        return Err(e);
                    }
                }
                tx.settle(&mut cx, is_open)?;
                cx.out.nodes = cx.nodes.into_iter().collect();
                Ok(cx.out)
            });
            match (res, failed) {
                (Ok(mut applied), _) => {
                    applied.refused = refused;
                    return Ok(applied);
                }
                (Err(e), Some(_)) if refused.len() >= MAX_REFUSED_WRITERS => {
                    return Err(invalid(format!(
                        "more than {MAX_REFUSED_WRITERS} writers refused in one batch, the last: {e}"
                    )));
                }
                (Err(e), Some(i)) => {
                    let op = &ops[i];
                    // The op that vouches for its writer's run failed: none of the run can
                    // be trusted in this batch (each round then refuses a writer for good).
                    let from = if ends[i] {
                        ops.iter()
                            .filter(|o| o.id.writer() == op.id.writer())
                            .map(|o| o.id.seq)
                            .min()
                            .unwrap_or(op.id.seq)
                    } else {
                        op.id.seq
                    };
                    skip.insert(op.id.writer(), from);
                    refused.push(Refused {
                        op: op.id,
                        reason: e.to_string(),
                    });
                }
                (Err(e), None) => return Err(e),
            }
        }
    }
}

impl Txn<'_> {
    fn ino_of_id(&self, id: NodeId) -> Result<Option<Ino>> {
        self.get(Cf::Ids, &key::node_id(id))?
            .map(|v| key::ino_of(&v))
            .transpose()
    }

    fn op_at(&self, id: OpId) -> Result<Option<OpRecord>> {
        self.get(Cf::Oplog, &key::op_id(id))?
            .map(|b| records::decode("op", &b))
            .transpose()
    }

    /// The clock and change of op `id`: from the op log, or, once compacted, what the
    /// checkpoint kept of it (`None` for a compacted op nothing needs any more).
    pub(crate) fn kept(&self, id: OpId) -> Result<Option<(Hlc, OpKind)>> {
        if let Some(op) = self.op_at(id)? {
            return Ok(Some((op.hlc, op.kind)));
        }
        Ok(self
            .get(Cf::Meta, &key::compacted(id))?
            .map(|b| records::decode::<records::CompactedOp>("compacted op", &b))
            .transpose()?
            .map(|c| (c.hlc, c.kind)))
    }

    /// The public key of `device`, if this store knows it.
    pub(crate) fn device_key(&self, device: &DeviceId) -> Result<Option<[u8; KEY_LEN]>> {
        match self.get(Cf::Meta, &key::device_key(device))? {
            None => Ok(None),
            Some(k) => k
                .try_into()
                .map(Some)
                .map_err(|_| StoreError::corrupt("device key length")),
        }
    }

    /// Keeps `key` under the device id it derives (any source will do: the id proves it).
    pub(crate) fn learn_key(&mut self, key: &[u8; KEY_LEN]) -> Result<DeviceId> {
        let device = DeviceId::from_public_key(key);
        if self.device_key(&device)?.is_none() {
            self.put(Cf::Meta, &key::device_key(&device), key.to_vec());
        }
        Ok(device)
    }

    /// The member record of `device`.
    pub(crate) fn member(&self, device: &DeviceId) -> Result<Option<MemberRecord>> {
        self.get(Cf::Meta, &key::member(device))?
            .map(|b| records::decode("member", &b))
            .transpose()
    }

    /// An op whose id is held already: a duplicate, or, if it differs and its author
    /// signed it, proof that the author equivocates (kept, reported, not applied).
    fn held_again(&mut self, op: &OpRecord, cx: &mut Cx) -> Result<()> {
        let Some(held) = self.op_at(op.id)? else {
            cx.out.duplicates += 1;
            return Ok(());
        };
        if auth::op_hash(&held) == auth::op_hash(op) {
            cx.out.duplicates += 1;
            return Ok(());
        }
        let key = self
            .device_key(&op.id.device)?
            .ok_or_else(|| StoreError::corrupt("an op held here whose author has no key"))?;
        auth::verify(&self.state.namespace, &key, op).map_err(|e| {
            invalid(format!(
                "a second op under a held id, not its author's: {e}"
            ))
        })?;
        let k = key::evidence(&op.id.device);
        if self.get(Cf::Meta, &k)?.is_none() {
            let ev = Evidence {
                held,
                other: op.clone(),
            };
            self.put(Cf::Meta, &k, records::encode(&ev));
            cx.out.equivocators.push(op.id.device);
            tracing::error!(
                device = %op.id.device.fmt_short(),
                op = %op.id.fmt_short(),
                "a device signed two different ops under one id: evidence kept, its second op refused"
            );
        }
        Ok(())
    }

    /// Checks that `op` is its author's and follows what this store holds of its writer:
    /// the next sequence number, the hash chain, the author's signature, the author a member,
    /// its clock not too far ahead. Returns the op's hash.
    /// `sig`: `None` if the op's signature need not be checked (a later op of its writer
    /// in the batch, whose hash chain runs through this op, has its checked);
    /// `Some(checked)` if it must be, with its hash if that was done already.
    fn authenticate(
        &self,
        op: &OpRecord,
        head: (u64, OpHash),
        sig: Option<Option<OpHash>>,
    ) -> Result<OpHash> {
        let (have, head_hash) = head;
        if op.id.seq != have + 1 {
            return Err(invalid(format!("gap: expected #{}", have + 1)));
        }
        if op.prev != head_hash {
            return Err(invalid(
                "it does not follow its writer's previous op as held here (a forked history)",
            ));
        }
        let hash = match sig {
            None => auth::op_hash(op),
            Some(Some(hash)) => hash,
            Some(None) => {
                let key = self
                    .device_key(&op.id.device)?
                    .ok_or_else(|| invalid("no key is known for its author"))?;
                auth::verify(&self.state.namespace, &key, op)?
            }
        };
        // Membership is decided by the ops: an author must have been added by a member.
        // (Its ops are kept after a removal: those made before it were valid, and the
        // removal does not yet say how far they go.)
        if !self.member(&op.id.device)?.is_some_and(|m| m.added) {
            return Err(invalid("its author is not a member"));
        }
        if op.hlc.millis() > self.now().millis().saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(invalid(
                "its clock is more than an hour ahead of this device's (refused until then)",
            ));
        }
        Ok(hash)
    }

    /// Refuses an op whose clock is not after that of every op it depends on that is held
    /// here: its writer's previous op, the `Create` of each node it names, the versions it
    /// saw. An honest device's clock is past everything it has seen, so only a backdated op
    /// fails; without this check it would sort before its own causes, and devices that
    /// receive them in different orders would settle differently (clock order must respect
    /// causality for the move log and the attribute registers).
    fn check_clock_order(&self, op: &OpRecord) -> Result<()> {
        let checkpoint = self.state.checkpoint.clone();
        let moves = matches!(
            op.kind,
            OpKind::Create { .. }
                | OpKind::Link { .. }
                | OpKind::Unlink { .. }
                | OpKind::Rename { .. }
        );
        if moves && op.hlc < checkpoint.horizon {
            // Every device had every op before the checkpoint, and promised no later op of
            // its own before it (`compact::plan`); the moves before it are gone, so such an
            // op cannot be put in its place. Only a device that broke the promise makes one,
            // or one restored from a backup holding ops a power cut had taken from it before
            // they were shared. (Attribute and content ops need no move log: registers and
            // versions compare clocks, whatever the order, so they still apply.)
            return Err(invalid(
                "it moves names at a clock before this device's checkpoint of the logs (too late to apply)",
            ));
        }
        let mut causes: Vec<OpId> = version_refs(&op.kind).into_iter().map(|r| r.1).collect();
        if op.id.seq > 1 {
            causes.push(OpId {
                seq: op.id.seq - 1,
                ..op.id
            });
        }
        for node in named_nodes(&op.kind) {
            if node == NodeId::ROOT {
                continue;
            }
            let born = self
                .born(node)?
                .ok_or_else(|| invalid(format!("unknown node {node}")))?;
            causes.push(born.created);
        }
        for cause in causes {
            let hlc = match self.kept(cause)? {
                Some((hlc, _)) => hlc,
                // Compacted: before the horizon, so before this op.
                None if checkpoint.covers(cause) => continue,
                // A cause not held yet: refused until it comes (its author held it, so it
                // is on its way), so that every device decides on the same ops.
                None => {
                    return Err(invalid(format!(
                        "it depends on op {}, not held here yet",
                        cause.fmt_short()
                    )))
                }
            };
            if hlc >= op.hlc {
                return Err(invalid(format!(
                    "its clock is not after that of op {} it depends on (backdated)",
                    cause.fmt_short()
                )));
            }
        }
        Ok(())
    }

    fn apply_one(&mut self, op: &OpRecord, sig: Option<Option<OpHash>>, cx: &mut Cx) -> Result<()> {
        let w = op.id.writer();
        let head = if w == self.state.writer() {
            if op.id.seq < self.state.next_seq {
                return self.held_again(op, cx);
            }
            return Err(invalid("an op of this device that it never made"));
        } else {
            self.state.heads.get(&w).copied().unwrap_or((0, GENESIS))
        };
        if op.id.seq <= head.0 {
            return self.held_again(op, cx);
        }
        let hash = self.authenticate(op, head, sig)?;
        validate(op)?;
        self.check_clock_order(op)?;
        self.state.heads.insert(w, (op.id.seq, hash));
        self.state.heads_changed = true;
        self.state.hlc = self.state.hlc.max(op.hlc);
        self.put_op(op);
        cx.out.applied += 1;
        let moves = match &op.kind {
            OpKind::Create {
                node,
                parent,
                name,
                kind,
                ..
            } => {
                if self.born(*node)?.is_some() || self.ino_of_id(*node)?.is_some() {
                    return Err(invalid(format!("node {node} is created twice")));
                }
                let born = BornRecord {
                    created: op.id,
                    version: None,
                    attrs: None,
                };
                self.put(Cf::Born, &key::node_id(*node), records::encode(&born));
                self.build_node(*node, &op.kind)?;
                vec![Move {
                    entry: *node,
                    node: *node,
                    kind: *kind,
                    target: Some((*parent, name.clone())),
                    seen: None,
                }]
            }
            OpKind::Link {
                node,
                entry,
                parent,
                name,
                ..
            } => {
                let kind = self.kind_of(*node)?;
                if kind == FileKind::Dir {
                    return Err(invalid("a hard link to a directory"));
                }
                vec![Move {
                    entry: *entry,
                    node: *node,
                    kind,
                    target: Some((*parent, name.clone())),
                    seen: None,
                }]
            }
            OpKind::Unlink {
                node, entry, seen, ..
            } => vec![Move {
                entry: *entry,
                node: *node,
                kind: self.kind_of(*node)?,
                target: None,
                seen: *seen,
            }],
            OpKind::Rename {
                node,
                entry,
                from_parent,
                from_name,
                to_parent,
                to_name,
                other,
                exchange,
                ..
            } => {
                let kind = self.kind_of(*node)?;
                let to = Some((*to_parent, to_name.clone()));
                let mut v = Vec::new();
                match other {
                    Some((on, oe, ov)) if *exchange => {
                        let okind = self.kind_of(*on)?;
                        let out = |entry, node, kind| Move {
                            entry,
                            node,
                            kind,
                            target: None,
                            seen: None,
                        };
                        v.push(out(*entry, *node, kind));
                        v.push(out(*oe, *on, okind));
                        v.push(Move {
                            target: to,
                            ..out(*entry, *node, kind)
                        });
                        v.push(Move {
                            target: Some((*from_parent, from_name.clone())),
                            seen: *ov,
                            ..out(*oe, *on, okind)
                        });
                    }
                    Some((on, oe, ov)) => {
                        v.push(Move {
                            entry: *oe,
                            node: *on,
                            kind: self.kind_of(*on)?,
                            target: None,
                            seen: *ov,
                        });
                        v.push(Move {
                            entry: *entry,
                            node: *node,
                            kind,
                            target: to,
                            seen: None,
                        });
                    }
                    None => v.push(Move {
                        entry: *entry,
                        node: *node,
                        kind,
                        target: to,
                        seen: None,
                    }),
                }
                v
            }
            OpKind::SetAttr {
                node,
                perm,
                uid,
                gid,
                atime,
                mtime,
                ctime,
            } => {
                self.remote_setattr(
                    op.hlc,
                    *node,
                    *perm,
                    (*uid, *gid),
                    *atime,
                    *mtime,
                    *ctime,
                    cx,
                )?;
                Vec::new()
            }
            OpKind::SetXattr { node, name, value } => {
                self.remote_xattr(op.hlc, *node, name, value.as_deref(), cx)?;
                Vec::new()
            }
            OpKind::Content { node, .. } => {
                self.remote_content(op, *node, cx)?;
                Vec::new()
            }
            OpKind::Member {
                device,
                name,
                added,
            } => {
                self.apply_member(*device, name, *added)?;
                Vec::new()
            }
        };
        self.dir_times(op, cx)?;
        for m in &moves {
            if m.entry == NodeId::ROOT || m.node == NodeId::ROOT {
                return Err(invalid("the root cannot move"));
            }
            if let Some(e) = self.entry(m.entry)? {
                if e.node != m.node {
                    return Err(invalid(format!("entry {} names another node", m.entry)));
                }
            }
        }
        if !moves.is_empty() {
            self.apply_moves(op, moves, cx)?;
        }
        Ok(())
    }

    /// A name op changes the mtime of the directories it names (as `touch_dir` does where it
    /// is made): a last-writer-wins register by clock, so that every device ends with the
    /// same time whatever the order of ops, undo and redo.
    fn dir_times(&mut self, op: &OpRecord, cx: &mut Cx) -> Result<()> {
        let (dirs, time) = match &op.kind {
            OpKind::Create { parent, time, .. }
            | OpKind::Link { parent, time, .. }
            | OpKind::Unlink { parent, time, .. } => ([*parent, *parent], *time),
            OpKind::Rename {
                from_parent,
                to_parent,
                time,
                ..
            } => ([*from_parent, *to_parent], *time),
            _ => return Ok(()),
        };
        for dir in dirs {
            let Some((ino, mut d)) = self.node_or_ghost(dir)? else {
                continue;
            };
            if d.kind == FileKind::Dir && (op.hlc, time) > (d.stamps.mtime, d.mtime) {
                d.stamps.mtime = op.hlc;
                d.mtime = time;
                self.put_node_or_ghost(ino, &d, cx)?;
            }
        }
        Ok(())
    }

    /// The kind of a node, from its record or, if it is gone here, from its `Create` op.
    fn kind_of(&self, node: NodeId) -> Result<FileKind> {
        if node == NodeId::ROOT {
            return Ok(FileKind::Dir);
        }
        if let Some(ino) = self.ino_of_id(node)? {
            if let Some(n) = self.node(ino)? {
                return Ok(n.kind);
            }
        }
        let born = self
            .born(node)?
            .ok_or_else(|| invalid(format!("unknown node {node}")))?;
        match self.kept(born.created)?.map(|o| o.1) {
            Some(OpKind::Create { kind, .. }) => Ok(kind),
            _ => Err(StoreError::corrupt(format!("node {node}: no create op"))),
        }
    }

    /// Makes the local record of a node from its `Create` op, with no names yet, and the
    /// attributes ops gave it while it was deleted here.
    fn build_node(&mut self, id: NodeId, create: &OpKind) -> Result<Ino> {
        let attrs = self.born(id)?.and_then(|b| b.attrs);
        let rec = revived(id, create, attrs)?;
        let ino = self.alloc_ino();
        self.put_node(ino, &rec);
        self.map_id(id, ino);
        self.restore_xattrs(id, ino)?;
        let s = &mut self.state.stats;
        s.nodes += 1;
        match rec.kind {
            FileKind::Dir => s.dirs += 1,
            FileKind::File => s.files += 1,
            _ => {}
        }
        Ok(ino)
    }

    /// A node deleted here, as it would be if brought back now (`None`: never created here).
    fn ghost(&self, id: NodeId) -> Result<Option<NodeRecord>> {
        let Some(born) = self.born(id)? else {
            return Ok(None);
        };
        let (_, create) = self
            .kept(born.created)?
            .ok_or_else(|| StoreError::corrupt(format!("node {id}: create op missing")))?;
        revived(id, &create, born.attrs).map(Some)
    }

    /// Keeps the attributes (and content version, if any) of `n`, a node deleted here, for
    /// when a late op brings it back.
    pub(crate) fn bury(&mut self, n: &NodeRecord) -> Result<()> {
        if let Some(mut born) = self.born(n.id)? {
            if n.version.is_some() {
                born.version = n.version;
            }
            born.attrs = Some(records::Attrs::of(n));
            self.put(Cf::Born, &key::node_id(n.id), records::encode(&born));
        }
        Ok(())
    }

    /// The node record of a live node, or of one deleted here (its ghost): `(ino, record)`,
    /// with no ino for a ghost.
    fn node_or_ghost(&self, node: NodeId) -> Result<Option<(Option<Ino>, NodeRecord)>> {
        if let Some((ino, n)) = self.remote_node(node)? {
            return Ok(Some((Some(ino), n)));
        }
        Ok(self.ghost(node)?.map(|n| (None, n)))
    }

    /// Stores a record from `node_or_ghost` back where it came from.
    fn put_node_or_ghost(&mut self, ino: Option<Ino>, n: &NodeRecord, cx: &mut Cx) -> Result<()> {
        match ino {
            Some(ino) => {
                self.put_node(ino, n);
                cx.nodes.insert(ino);
                Ok(())
            }
            None => self.bury(n),
        }
    }
}

/// A node's record as its `Create` op made it, with the attribute registers it kept while
/// deleted (if any), and no names yet.
fn revived(id: NodeId, create: &OpKind, attrs: Option<records::Attrs>) -> Result<NodeRecord> {
    let mut rec = record_from_create(id, create)?;
    if let Some(a) = attrs {
        a.apply_to(&mut rec);
    }
    Ok(rec)
}

/// A node's record as its `Create` op made it, with no names yet.
fn record_from_create(id: NodeId, create: &OpKind) -> Result<NodeRecord> {
    let OpKind::Create {
        kind,
        perm,
        uid,
        gid,
        rdev,
        target,
        time,
        ..
    } = create
    else {
        return Err(StoreError::corrupt(format!("node {id}: no create op")));
    };
    let is_dir = *kind == FileKind::Dir;
    Ok(NodeRecord {
        id,
        kind: *kind,
        perm: perm & 0o7777,
        uid: *uid,
        gid: *gid,
        rdev: *rdev,
        nlink: if is_dir { 2 } else { 0 },
        size: target.as_ref().map_or(0, |t| t.len() as u64),
        atime: *time,
        mtime: *time,
        ctime: *time,
        btime: *time,
        parent: 0,
        version: None,
        stamps: Default::default(),
        target: target.clone(),
    })
}

impl Txn<'_> {
    /// The local ino of `node`, rebuilding the node from the log if it was deleted here.
    fn ino_for(&mut self, node: NodeId, cx: &mut Cx) -> Result<Ino> {
        if node == NodeId::ROOT {
            return Ok(ROOT_INO);
        }
        if let Some(ino) = self.ino_of_id(node)? {
            return Ok(ino);
        }
        let born = self
            .born(node)?
            .ok_or_else(|| invalid(format!("unknown node {node}")))?;
        let (_, create) = self
            .kept(born.created)?
            .ok_or_else(|| StoreError::corrupt(format!("node {node}: create op missing")))?;
        let ino = self.build_node(node, &create)?;
        if born.version.is_some() {
            self.set_version(ino, born.version)?;
        }
        cx.touched.insert(node);
        tracing::debug!(%node, "rebuilt a deleted node that a late op brings back");
        Ok(ino)
    }

    /// True if `dir` is a directory in the tree (the root, or a directory with an entry).
    fn is_live_dir(&self, dir: NodeId) -> Result<bool> {
        if dir == NodeId::ROOT {
            return Ok(true);
        }
        Ok(self.entry(dir)?.is_some() && self.kind_of(dir)? == FileKind::Dir)
    }

    /// True if `dir` is `node` or lies below it (following entries up to the root).
    fn is_under(&self, mut dir: NodeId, node: NodeId) -> Result<bool> {
        for _ in 0..100_000 {
            if dir == node {
                return Ok(true);
            }
            match self.entry(dir)? {
                Some(e) => dir = e.parent,
                None => return Ok(false),
            }
        }
        Err(StoreError::corrupt("entry chain does not reach the root"))
    }

    fn has_children(&self, dir: NodeId) -> Result<bool> {
        let Some(ino) = self.ino_of_id(dir)? else {
            return Ok(false);
        };
        Ok(!self
            .scan(Cf::Dirents, &key::ino(ino), &key::ino(ino + 1), 1)?
            .is_empty())
    }

    /// Where a move ends up, given the tree as it is: `None` if it is skipped.
    fn resolve(
        &self,
        m: &Move,
        by: (DeviceId, Hlc),
        from: &Option<Loc>,
    ) -> Result<Option<Option<Loc>>> {
        let Some((parent, name)) = &m.target else {
            if m.kind == FileKind::Dir && self.has_children(m.entry)? {
                return Ok(None);
            }
            return Ok(Some(None));
        };
        // A directory that is gone: the entry goes to the root, under a conflict name.
        let (parent, orphaned) = if self.is_live_dir(*parent)? {
            (*parent, false)
        } else {
            (NodeId::ROOT, true)
        };
        if m.kind == FileKind::Dir && self.is_under(parent, m.entry)? {
            return Ok(None);
        }
        if from
            .as_ref()
            .is_some_and(|(p, n)| *p == parent && n == name)
        {
            return Ok(Some(from.clone()));
        }
        let pino = self
            .ino_of_id(parent)?
            .ok_or_else(|| StoreError::corrupt(format!("live directory {parent} has no inode")))?;
        if !orphaned && self.dirent(pino, name)?.is_none() {
            return Ok(Some(Some((parent, name.clone()))));
        }
        for n in 0..1000u32 {
            let c = conflict_name(name, by.0, by.1, n);
            if self.dirent(pino, &c)?.is_none() {
                return Ok(Some(Some((parent, c))));
            }
        }
        Err(invalid("no free conflict name"))
    }

    /// Moves `entry` of `node` from `from` to `to` in the local tree.
    fn set_loc(
        &mut self,
        entry: NodeId,
        node: NodeId,
        kind: FileKind,
        from: &Option<Loc>,
        to: &Option<Loc>,
        cx: &mut Cx,
    ) -> Result<()> {
        if from == to {
            return Ok(());
        }
        let ino = self.ino_for(node, cx)?;
        let is_dir = kind == FileKind::Dir;
        let now = self.now();
        let dir_delta = |tx: &mut Self, dir: NodeId, delta: i32, cx: &mut Cx| -> Result<Ino> {
            let d = tx.ino_for(dir, cx)?;
            let mut rec = tx.node_req(d)?;
            rec.nlink = rec.nlink.saturating_add_signed(delta);
            rec.ctime = now;
            tx.put_node(d, &rec);
            Ok(d)
        };
        let mut n = self.node_req(ino)?;
        if let Some((p, name)) = from {
            let pino = dir_delta(self, *p, if is_dir { -1 } else { 0 }, cx)?;
            self.delete_dirent(pino, name);
            cx.out.names.push((pino, name.clone()));
            if !is_dir {
                n.nlink = n.nlink.saturating_sub(1);
            }
        }
        match to {
            Some((p, name)) => {
                let pino = dir_delta(self, *p, if is_dir { 1 } else { 0 }, cx)?;
                self.put_dirent(pino, name, DirentRecord { ino, kind, entry });
                self.put_entry(
                    entry,
                    &EntryRecord {
                        parent: *p,
                        name: name.clone(),
                        node,
                    },
                );
                cx.out.names.push((pino, name.clone()));
                if is_dir {
                    n.parent = pino;
                } else {
                    n.nlink += 1;
                }
            }
            None => self.delete_entry(entry),
        }
        n.ctime = now;
        self.put_node(ino, &n);
        cx.touched.insert(node);
        Ok(())
    }

    /// Does the moves of `op` in clock order: later moves that interact with them are undone
    /// first and redone after.
    fn apply_moves(&mut self, op: &OpRecord, moves: Vec<Move>, cx: &mut Cx) -> Result<()> {
        let after = kv::key_after(&key::mv(op.hlc, op.id, u8::MAX));
        let later = self.scan(Cf::Moves, &after, &[0xff; key::MV_LEN + 1], usize::MAX)?;
        let mut later: Vec<(Vec<u8>, MoveRecord)> = later
            .into_iter()
            .map(|(k, v)| Ok((k, records::decode::<MoveRecord>("move", &v)?)))
            .collect::<Result<_>>()?;
        // Which later moves interact with these: same entries or nodes, same directories,
        // same names, or (when a directory moves) any directory move (cycles).
        let mut interest = Interest::default();
        for m in &moves {
            let cur = self.entry(m.entry)?.map(|e| (e.parent, e.name));
            interest.add(m.entry, m.node, m.kind, &[&m.target, &cur]);
            if let Some((p, _)) = &m.target {
                if !self.is_live_dir(*p)? {
                    // The move will land in the root.
                    interest.ids.insert(NodeId::ROOT);
                }
            }
        }
        // A fixpoint: a move selected late in the list can widen the interest so that an
        // earlier one (say, a create in the directory it moves out of) now interacts too.
        let mut selected = vec![false; later.len()];
        loop {
            let mut grew = false;
            for (i, (_, m)) in later.iter().enumerate() {
                let locs = [&m.target, &m.from, &m.to];
                if !selected[i] && interest.hits(m.entry, m.node, m.kind, &locs) {
                    interest.add(m.entry, m.node, m.kind, &locs);
                    selected[i] = true;
                    grew = true;
                }
            }
            if !grew {
                break;
            }
        }
        let mut keep = selected.into_iter();
        later.retain(|_| keep.next().unwrap_or(false));
        for (_, m) in later.iter().rev() {
            self.set_loc(m.entry, m.node, m.kind, &m.to, &m.from, cx)?;
        }
        for (idx, m) in moves.into_iter().enumerate() {
            let rec = self.do_move((op.id.device, op.hlc), m, cx, true)?;
            self.put(
                Cf::Moves,
                &key::mv(op.hlc, op.id, idx as u8),
                records::encode(&rec),
            );
        }
        for (k, m) in later {
            let by = key::mv_origin(&k)?;
            let mv = Move {
                entry: m.entry,
                node: m.node,
                kind: m.kind,
                target: m.target,
                seen: m.seen,
            };
            let rec = self.do_move(by, mv, cx, false)?;
            self.put(Cf::Moves, &k, records::encode(&rec));
        }
        Ok(())
    }

    /// Applies one move to the current tree; returns its move-log record.
    /// `first` is false on a redo: the consequences of a delete (restoring an edit it had not
    /// seen) were drawn when the op was first applied.
    fn do_move(
        &mut self,
        by: (DeviceId, Hlc),
        m: Move,
        cx: &mut Cx,
        first: bool,
    ) -> Result<MoveRecord> {
        let from = self.entry(m.entry)?.map(|e| (e.parent, e.name));
        let to = match self.resolve(&m, by, &from)? {
            Some(to) => to,
            None => {
                cx.out.skipped_moves += 1;
                from.clone()
            }
        };
        self.set_loc(m.entry, m.node, m.kind, &from, &to, cx)?;
        // Every op applied here is another writer's, an earlier incarnation of this device's
        // included: a delete it made never saw this incarnation's edits (a restore).
        if first && to.is_none() {
            if let Some(loc) = &from {
                cx.removed.insert(m.node, (m.seen, loc.clone()));
            }
        }
        Ok(MoveRecord {
            entry: m.entry,
            node: m.node,
            kind: m.kind,
            target: m.target,
            from,
            to,
            seen: m.seen,
        })
    }

    /// After all moves: nodes left without names go (kept while open), directories left
    /// without an entry go; an edit of this device that a remote delete had not seen is
    /// restored as a copy first.
    fn settle(&mut self, cx: &mut Cx, is_open: &dyn Fn(Ino) -> bool) -> Result<()> {
        for op in std::mem::take(&mut cx.lost_own).into_values() {
            let OpKind::Content { node, .. } = &op.kind else {
                continue;
            };
            let loc = self.copy_loc(*node)?;
            self.conflict_copy_of(&op, &loc, cx)?;
        }
        for node in std::mem::take(&mut cx.touched) {
            let Some(ino) = self.ino_of_id(node)? else {
                continue;
            };
            let Some(n) = self.node(ino)? else { continue };
            let dead = if n.kind == FileKind::Dir {
                ino != ROOT_INO && self.entry(node)?.is_none()
            } else {
                n.nlink == 0
            };
            if !dead {
                continue;
            }
            // An edit of this device that the delete had not seen is kept as a copy. Decided
            // when the delete is new here, or the version is (a late op revived the file, an
            // edit arrived, and redone moves took it out again).
            let mine = n.version.filter(|v| v.device == self.state.device);
            if let (Some(v), FileKind::File) = (mine, n.kind) {
                let removal = match cx.removed.get(&node) {
                    Some(r) => Some(r.clone()),
                    None if cx.versioned.contains(&node) => self
                        .last_removal(node)?
                        .and_then(|m| Some((m.seen, m.from?))),
                    None => None,
                };
                if let Some((seen, loc)) = removal {
                    if !self.descends(seen, v)? {
                        self.conflict_copy(ino, &loc, cx)?;
                    }
                }
            }
            if n.kind == FileKind::Dir {
                if self.has_children(node)? {
                    return Err(StoreError::corrupt(format!(
                        "directory {node} left the tree with entries in it"
                    )));
                }
                self.delete_node(ino, &n)?;
            } else if is_open(ino) {
                self.put(Cf::Orphans, &key::ino(ino), Vec::new());
            } else {
                self.delete_node(ino, &n)?;
            }
            cx.nodes.insert(ino);
        }
        Ok(())
    }

    /// Keeps the version `op` made of its file as a new file next to `loc` (a conflict copy
    /// of an edit of this device that lost), with ordinary local ops.
    fn conflict_copy_of(&mut self, op: &OpRecord, loc: &Loc, cx: &mut Cx) -> Result<()> {
        let OpKind::Content { node, mtime, .. } = &op.kind else {
            return Ok(());
        };
        let Some((_, n)) = self.node_or_ghost(*node)? else {
            return Ok(());
        };
        let (map, size) = self.materialize(*node, Some(op.id))?;
        let copy = self.conflict_file(&n, loc, cx)?;
        let extents = map.into_iter().map(|(o, (c, l))| (o, c, l)).collect();
        self.fill_empty(copy, extents, size, *mtime)
    }

    /// Keeps this device's version of file `ino` as a new file next to `loc` (a conflict
    /// copy), with ordinary local ops so that it reaches every device.
    fn conflict_copy(&mut self, ino: Ino, loc: &Loc, cx: &mut Cx) -> Result<()> {
        let n = self.node_req(ino)?;
        let copy = self.conflict_file(&n, loc, cx)?;
        let size = n.size;
        self.copy_range(ino, 0, copy, 0, size)?;
        Ok(())
    }

    /// A new empty file next to `loc` under a conflict name of this device, with the
    /// attributes of `n`.
    fn conflict_file(&mut self, n: &NodeRecord, loc: &Loc, cx: &mut Cx) -> Result<Ino> {
        let (mut parent, name) = loc.clone();
        if !self.is_live_dir(parent)? {
            parent = NodeId::ROOT;
        }
        let pino = self
            .ino_of_id(parent)?
            .ok_or_else(|| StoreError::corrupt("live directory without inode"))?;
        let (device, hlc) = (self.state.device, self.state.hlc);
        let mut copy_name = conflict_name(&name, device, hlc, 0);
        let mut i = 1;
        while self.dirent(pino, &copy_name)?.is_some() {
            copy_name = conflict_name(&name, device, hlc, i);
            i += 1;
            if i > 1000 {
                return Err(invalid("no free conflict name"));
            }
        }
        let new = crate::ns::NewNode {
            kind: FileKind::File,
            perm: n.perm,
            uid: n.uid,
            gid: n.gid,
            rdev: 0,
            target: None,
        };
        let (copy, _) = self.create(pino, &copy_name, new)?;
        cx.out.conflict_copies += 1;
        cx.out.names.push((pino, copy_name.clone()));
        tracing::info!(
            name = %String::from_utf8_lossy(&copy_name),
            "kept this device's version as a conflict copy"
        );
        Ok(copy)
    }

    fn remote_node(&self, node: NodeId) -> Result<Option<(Ino, NodeRecord)>> {
        let Some(ino) = self.ino_of_id(node)? else {
            return Ok(None);
        };
        Ok(self.node(ino)?.map(|n| (ino, n)))
    }

    #[allow(clippy::too_many_arguments)]
    fn remote_setattr(
        &mut self,
        hlc: Hlc,
        node: NodeId,
        perm: Option<u32>,
        owner: (Option<u32>, Option<u32>),
        atime: Option<Timestamp>,
        mtime: Option<Timestamp>,
        ctime: Timestamp,
        cx: &mut Cx,
    ) -> Result<()> {
        // A node deleted here keeps its registers too, for a late op that brings it back.
        let Some((ino, mut n)) = self.node_or_ghost(node)? else {
            return Ok(());
        };
        // Each register: the later clock wins; on a tie, the larger value.
        fn wins<T: Ord>(stamp: &mut Hlc, hlc: Hlc, cur: &T, new: &T) -> bool {
            if hlc > *stamp || (hlc == *stamp && new > cur) {
                *stamp = hlc;
                true
            } else {
                false
            }
        }
        if let Some(p) = perm {
            let p = p & 0o7777;
            if wins(&mut n.stamps.mode, hlc, &n.perm, &p) {
                n.perm = p;
            }
        }
        if owner.0.is_some() || owner.1.is_some() {
            let new = (owner.0.unwrap_or(n.uid), owner.1.unwrap_or(n.gid));
            if wins(&mut n.stamps.owner, hlc, &(n.uid, n.gid), &new) {
                (n.uid, n.gid) = new;
            }
        }
        if let Some(t) = atime {
            if wins(&mut n.stamps.atime, hlc, &n.atime, &t) {
                n.atime = t;
            }
        }
        if let Some(t) = mtime {
            if wins(&mut n.stamps.mtime, hlc, &n.mtime, &t) {
                n.mtime = t;
            }
        }
        n.ctime = n.ctime.max(ctime);
        self.put_node_or_ghost(ino, &n, cx)
    }

    fn remote_xattr(
        &mut self,
        hlc: Hlc,
        node: NodeId,
        name: &[u8],
        value: Option<&[u8]>,
        cx: &mut Cx,
    ) -> Result<()> {
        if !self.xattr_register(node, name, hlc, value)? {
            return Ok(());
        }
        // A node deleted here keeps the register, for a late op that brings it back.
        let Some(ino) = self.ino_of_id(node)? else {
            return Ok(());
        };
        if self.node(ino)?.is_none() {
            return Ok(());
        }
        let k = key::xattr(ino, name);
        match value {
            Some(v) => self.put(Cf::Xattrs, &k, v.to_vec()),
            None => self.delete(Cf::Xattrs, &k),
        }
        cx.nodes.insert(ino);
        Ok(())
    }

    /// Sets the register of extended attribute `name` of `node` to `value` (`None`: removed)
    /// at clock `hlc`, if that wins: the later clock, on a tie the larger value (a removal
    /// the smallest). True if it did.
    pub(crate) fn xattr_register(
        &mut self,
        node: NodeId,
        name: &[u8],
        hlc: Hlc,
        value: Option<&[u8]>,
    ) -> Result<bool> {
        let k = key::xattr_reg(node, name);
        if let Some(b) = self.get(Cf::XattrRegs, &k)? {
            let (held, v): (Hlc, Option<Vec<u8>>) = records::decode("xattr register", &b)?;
            if (hlc, value) <= (held, v.as_deref()) {
                return Ok(false);
            }
        }
        self.put(Cf::XattrRegs, &k, records::encode(&(hlc, value)));
        Ok(true)
    }

    /// Gives a node rebuilt at `ino` the extended attributes its registers hold.
    fn restore_xattrs(&mut self, node: NodeId, ino: Ino) -> Result<()> {
        let prefix = key::node_id(node);
        let end = kv::prefix_end(&prefix).unwrap_or_else(|| vec![0xff; prefix.len() + 1]);
        for (k, v) in self.scan(Cf::XattrRegs, &prefix, &end, usize::MAX)? {
            let (_, value): (Hlc, Option<Vec<u8>>) = records::decode("xattr register", &v)?;
            if let Some(value) = value {
                self.put(Cf::Xattrs, &key::xattr(ino, &k[prefix.len()..]), value);
            }
        }
        Ok(())
    }

    /// Adds or removes a member device. A removal is final: whatever the order of ops, a
    /// removed device stays removed.
    pub(crate) fn apply_member(&mut self, device: DeviceId, name: &str, added: bool) -> Result<()> {
        let k = key::member(&device);
        let old: Option<MemberRecord> = self
            .get(Cf::Meta, &k)?
            .map(|b| records::decode("member", &b))
            .transpose()?;
        let removed = !added || old.as_ref().is_some_and(|m| m.removed);
        let rec = MemberRecord {
            name: name.to_string(),
            added: added || old.as_ref().is_some_and(|m| m.added),
            removed,
        };
        self.put(Cf::Meta, &k, records::encode(&rec));
        Ok(())
    }

    /// Records and applies a membership change made on this device (signed, as every op,
    /// when the transaction commits).
    pub fn set_member(&mut self, device: DeviceId, name: &str, added: bool) -> Result<()> {
        if name.len() > MEMBER_NAME_MAX || name.chars().any(char::is_control) {
            return Err(invalid("bad device name"));
        }
        self.record(OpKind::Member {
            device,
            name: name.to_string(),
            added,
        });
        self.apply_member(device, name, added)
    }

    /// The clock and id of a content version, for ordering concurrent edits.
    fn version_order(&self, v: Option<OpId>) -> Result<(Hlc, Option<OpId>)> {
        match v {
            None => Ok((Hlc(0), None)),
            Some(id) => Ok((self.kept(id)?.map_or(Hlc(0), |o| o.0), Some(id))),
        }
    }

    fn remote_content(&mut self, op: &OpRecord, node: NodeId, cx: &mut Cx) -> Result<()> {
        let OpKind::Content {
            base,
            start,
            end,
            extents,
            size,
            mtime,
            ..
        } = &op.kind
        else {
            return Ok(());
        };
        let Some((ino, n)) = self.remote_node(node)? else {
            // Deleted here (if the delete had not seen this edit, its author restores it).
            // The version still advances, by the same rule, in case a late op revives it.
            if let Some(mut born) = self.born(node)? {
                if *base == born.version
                    || (op.hlc, Some(op.id)) > self.version_order(born.version)?
                {
                    born.version = Some(op.id);
                    self.put(Cf::Born, &key::node_id(node), records::encode(&born));
                }
            }
            // The author is this device, an earlier incarnation of it (the store was
            // restored from a backup): the copy it made then, if the delete had not seen
            // the edit, was lost with it, so this device makes it again.
            if op.id.device == self.state.device {
                let seen = self.last_removal(node)?.and_then(|m| m.seen);
                if !self.descends(seen, op.id)? {
                    cx.lost_own(node, op);
                }
            }
            return Ok(());
        };
        if n.kind != FileKind::File {
            return Err(invalid("content op for a node that is not a file"));
        }
        cx.nodes.insert(ino);
        if *base == n.version {
            let mut map = BTreeMap::new();
            for (off, e) in self.extents(ino, 0, u64::MAX)? {
                map.insert(off, (e.chunk, e.len));
            }
            apply_delta(&mut map, *start, *end, extents, *size);
            cx.versioned.insert(node);
            return self.install(ino, map, *size, (op.id, op.hlc), *mtime);
        }
        // A concurrent edit: the later one is the content.
        let cur = self.version_order(n.version)?;
        if (op.hlc, Some(op.id)) <= cur {
            if op.id.device == self.state.device {
                // This device's own edit, made by an earlier incarnation of its store and
                // coming back from a peer (the store was restored from a backup): it lost,
                // so this device keeps it as a copy, as it would have then; once, for the
                // last such edit of the file.
                cx.lost_own(node, op);
            }
            return Ok(());
        }
        if n.version.is_some_and(|v| {
            v.device == op.id.device
                && v.writer() != op.id.writer()
                && v.device != self.state.device
        }) {
            // Two incarnations of one device edited the file concurrently (it was restored
            // from a backup): that device keeps the losing edit as a copy, and may hold none
            // of its content. The content stays here until its op references it.
            self.keep_for(ino, op.id.device)?;
        }
        if n.version.is_some_and(|v| v.device == self.state.device) {
            let loc = self.copy_loc(node)?;
            self.conflict_copy(ino, &loc, cx)?;
        }
        let (map, size) = self.materialize(node, Some(op.id))?;
        cx.versioned.insert(node);
        self.install(ino, map, size, (op.id, op.hlc), *mtime)
    }

    /// Keeps the content of file `ino` stored here for an op of `author` to reference, as a
    /// chunk `author` pushed here is kept (`Store::keep_pushed`): whatever happens to the
    /// file, the data stays until such an op comes, or for a week.
    fn keep_for(&mut self, ino: Ino, author: DeviceId) -> Result<()> {
        for (_, e) in self.extents(ino, 0, u64::MAX)? {
            let Some(r) = self.refs(&e.chunk)? else {
                continue;
            };
            if r.stored > 0 {
                self.put(
                    Cf::Pending,
                    &key::pending(&e.chunk, crate::txn::pushed_token(author)),
                    crate::txn::pushed_marker(r.stored, r.len),
                );
            }
        }
        Ok(())
    }

    /// Where to put a conflict copy of `node`: next to its first name, or (if only a later
    /// hard link is left, whose entry has an id of its own) in the root.
    fn copy_loc(&self, node: NodeId) -> Result<Loc> {
        if let Some(e) = self.entry(node)? {
            return Ok((e.parent, e.name));
        }
        Ok(self
            .last_removal(node)?
            .and_then(|m| m.from)
            .unwrap_or_else(|| (NodeId::ROOT, b"conflict".to_vec())))
    }

    /// The move that last took `node` out of the tree here, if any. Walks the whole move
    /// log: only an edit of an earlier incarnation of this device for a file deleted here
    /// (after a restore) asks.
    fn last_removal(&self, node: NodeId) -> Result<Option<MoveRecord>> {
        let mut last = None;
        let mut from = Vec::new();
        loop {
            let batch = self.scan(Cf::Moves, &from, &[0xff; key::MV_LEN + 1], 4096)?;
            let Some((k, _)) = batch.last() else {
                return Ok(last);
            };
            from = kv::key_after(k);
            for (_, v) in &batch {
                let m: MoveRecord = records::decode("move", v)?;
                if m.node == node && m.to.is_none() && m.from.is_some() {
                    last = Some(m);
                }
            }
        }
    }

    /// True if content version `v` is `of` or was based on it (follows `v`'s bases).
    fn descends(&self, mut v: Option<OpId>, of: OpId) -> Result<bool> {
        for _ in 0..MAX_CHAIN {
            let Some(id) = v else { return Ok(false) };
            if id == of {
                return Ok(true);
            }
            v = match self.kept(id)?.map(|o| o.1) {
                Some(OpKind::Content { base, .. }) => base,
                _ => None,
            };
        }
        Ok(false)
    }

    /// The extent map and size of `node` at content version `version`, rebuilt from the op
    /// log by following the chain of bases.
    pub(crate) fn materialize(
        &self,
        node: NodeId,
        version: Option<OpId>,
    ) -> Result<(ExtentMap, u64)> {
        let mut chain = Vec::new();
        let mut v = version;
        while let Some(id) = v {
            if chain.len() >= MAX_CHAIN {
                return Err(StoreError::corrupt("content version chain too long"));
            }
            let (_, kind) = match self.kept(id)? {
                Some(k) => k,
                None if self.state.checkpoint.covers(id) => {
                    return Err(invalid(format!(
                        "content version {} was compacted here",
                        id.fmt_short()
                    )))
                }
                None => {
                    return Err(StoreError::corrupt(format!(
                        "content version {id:?} missing"
                    )))
                }
            };
            match kind {
                OpKind::Content {
                    node: n,
                    base,
                    start,
                    end,
                    extents,
                    size,
                    ..
                } if n == node => {
                    chain.push((start, end, extents, size));
                    v = base;
                }
                _ => return Err(StoreError::corrupt("content chain names another op")),
            }
        }
        let mut map = BTreeMap::new();
        let mut size = 0;
        for (start, end, extents, sz) in chain.into_iter().rev() {
            apply_delta(&mut map, start, end, &extents, sz);
            size = sz;
        }
        Ok((map, size))
    }

    /// Makes `map` the content of `ino`: new references first, then old ones dropped.
    fn install(
        &mut self,
        ino: Ino,
        map: ExtentMap,
        size: u64,
        (version, hlc): (OpId, Hlc),
        mtime: Timestamp,
    ) -> Result<()> {
        let old = self.extents(ino, 0, u64::MAX)?;
        for &(id, len) in map.values() {
            self.incref_id(&id, len, version.device)?;
        }
        for (off, e) in old {
            self.delete_extent(ino, off, &e)?;
        }
        for (off, (chunk, len)) in map {
            self.put_extent(ino, off, ExtentRecord { chunk, len });
        }
        let mut n = self.node_req(ino)?;
        let s = &mut self.state.stats;
        s.logical_bytes = s.logical_bytes.saturating_sub(n.size).saturating_add(size);
        n.size = size;
        n.version = Some(version);
        if hlc >= n.stamps.mtime {
            n.stamps.mtime = hlc;
            n.mtime = mtime;
        }
        n.ctime = n.ctime.max(mtime);
        self.put_node(ino, &n);
        Ok(())
    }

    /// Sets the content of a rebuilt node to `version`.
    fn set_version(&mut self, ino: Ino, version: Option<OpId>) -> Result<()> {
        let n = self.node_req(ino)?;
        let (map, size) = self.materialize(n.id, version)?;
        let Some(v) = version else {
            return Ok(());
        };
        let Some((hlc, kind)) = self.kept(v)? else {
            return Ok(());
        };
        let mtime = match &kind {
            OpKind::Content { mtime, .. } => *mtime,
            _ => n.mtime,
        };
        self.install(ino, map, size, (v, hlc), mtime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_names_fit_and_keep_utf8_whole() {
        let dev = DeviceId([0x12; 16]);
        let hlc = Hlc(1_795_400_000_000 << 16);
        let n = conflict_name(b"report.txt", dev, hlc, 0);
        assert_eq!(n, b"report (conflict 12121212 2026-11-23).txt");
        let long = "\u{e9}".repeat(200);
        for i in 0..3 {
            let n = conflict_name(long.as_bytes(), dev, hlc, i);
            assert!(n.len() <= NAME_MAX);
            assert!(std::str::from_utf8(&n).is_ok());
            validate_name(&n).unwrap();
        }
        let raw = vec![0xffu8; 255];
        assert!(conflict_name(&raw, dev, hlc, 5).len() <= NAME_MAX);
    }
}

#[cfg(test)]
mod auth_tests {
    //! Every op is its author's: signed, chained, by a member, with a sane clock.
    use std::sync::Arc;

    use super::*;
    use crate::auth::{op_hash, sign_message, DeviceKey, Signer};
    use crate::RootOwner;

    const NS: [u8; 16] = [5; 16];
    const OWNER: RootOwner = RootOwner { uid: 0, gid: 0 };

    /// Stores of `keys` in one namespace, each knowing the first `members` as members.
    fn stores(keys: &[Arc<DeviceKey>], members: usize) -> Vec<Store> {
        keys.iter()
            .map(|k| {
                let s = Store::in_memory_in(k.clone(), OWNER, NS).unwrap();
                s.commit(false, |tx| {
                    for m in &keys[..members] {
                        tx.set_member(m.device(), "m", true)?;
                    }
                    Ok(())
                })
                .unwrap();
                s
            })
            .collect()
    }

    fn keys(n: u8) -> Vec<Arc<DeviceKey>> {
        (1..=n)
            .map(|i| Arc::new(DeviceKey::from_seed([i; 32])))
            .collect()
    }

    fn public(k: &DeviceKey) -> [u8; KEY_LEN] {
        k.public_key().try_into().unwrap()
    }

    /// Ops of `from` that `to` lacks, and the keys of their authors.
    fn lacking(from: &Store, to: &Store) -> (Vec<OpRecord>, Vec<[u8; KEY_LEN]>) {
        let ops = from.ops_after(&to.version_vector(), usize::MAX).unwrap();
        let keys = from.device_keys(ops.iter().map(|o| o.id.device)).unwrap();
        (ops, keys)
    }

    fn resign(op: &mut OpRecord, key: &DeviceKey) {
        op.sig = key.sign(&sign_message(&NS, &op_hash(op)));
    }

    fn mkdir(s: &Store, name: &str) -> OpRecord {
        let new = crate::ns::NewNode {
            kind: FileKind::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: None,
        };
        s.commit(false, |tx| tx.create(ROOT_INO, name.as_bytes(), new))
            .unwrap();
        let w = s.writer();
        s.ops(w, 1, usize::MAX).unwrap().pop().unwrap()
    }

    /// One op of `ops` (all of one writer) is refused with the reason `why`, and neither it
    /// nor any later op of its writer is applied (earlier ones may be).
    fn refused(to: &Store, ops: &[OpRecord], keys: &[[u8; KEY_LEN]], why: &str) {
        let applied = to.apply_remote(ops, keys, &|_| false).unwrap();
        let rs = &applied.refused;
        // One writer: refused in one or two rounds (its run's last op vouches for the rest).
        assert!((1..=2).contains(&rs.len()), "{rs:?}");
        assert!(
            rs.iter().any(|r| r.reason.contains(why)),
            "expected {why:?}: {rs:?}"
        );
        for r in rs {
            let held = to.version_vector().get(&r.op.writer()).copied();
            assert!(held.unwrap_or(0) < r.op.seq, "{held:?} includes {:?}", r.op);
        }
    }

    #[test]
    fn forged_tampered_and_foreign_ops_are_refused() {
        let k = keys(4);
        let s = stores(&k, 3);
        let (a, b, c, stranger) = (&s[0], &s[1], &s[2], &s[3]);
        let op = mkdir(a, "d");
        let (ops, keys_a) = lacking(a, b);

        // Without its author's key nothing can be checked.
        refused(b, &ops, &[], "no key");
        // A key that is not the author's is never filed under the author.
        refused(b, &ops, &[public(&k[2])], "no key");
        // Any field changed after signing.
        let mut t = ops.clone();
        let last = t.len() - 1;
        if let OpKind::Create { name, .. } = &mut t[last].kind {
            *name = b"e".to_vec();
        }
        refused(b, &t, &keys_a, "bad signature");
        // An op inside the batch changed: the chain to the signed last op breaks.
        let mut t = ops.clone();
        if let OpKind::Member { name, .. } = &mut t[0].kind {
            *name = "mallory".into();
        }
        refused(b, &t, &keys_a, "forked history");
        // A member signing an op in another member's name.
        let mut t = ops.clone();
        resign(&mut t[last], &k[2]);
        refused(b, &t, &keys_a, "bad signature");
        // The genuine ops apply.
        b.apply_remote(&ops, &keys_a, &|_| false).unwrap();
        assert!(b.lookup(ROOT_INO, b"d").unwrap().is_some());

        // An op that does not follow its writer's chain (signed by its author all the same).
        let mut next = op.clone();
        next.id.seq += 1;
        next.prev = [9; 32];
        resign(&mut next, &k[0]);
        refused(b, &[next.clone()], &[], "forked history");
        // A clock far ahead of ours.
        next.prev = op_hash(&op);
        next.hlc = Hlc(op.hlc.0 + ((3 * MAX_CLOCK_SKEW_MS) << 16));
        resign(&mut next, &k[0]);
        refused(b, &[next], &[], "ahead");

        // A device no member added, relayed by a member: refused, even with its key.
        let (ops, keys_x) = lacking(stranger, c);
        let mine: Vec<OpRecord> = ops
            .into_iter()
            .filter(|o| o.id.device == k[3].device())
            .collect();
        refused(c, &mine, &keys_x, "not a member");

        // A refused writer does not hold back the others in its batch.
        let (mut batch, mut batch_keys) = lacking(a, c);
        batch.extend(mine);
        batch_keys.extend(keys_x);
        batch.sort_by_key(|o| (o.hlc, o.id));
        let applied = c.apply_remote(&batch, &batch_keys, &|_| false).unwrap();
        assert_eq!(applied.refused.len(), 1);
        assert_eq!(applied.refused[0].op.device, k[3].device());
        assert!(c.lookup(ROOT_INO, b"d").unwrap().is_some());
    }

    #[test]
    fn only_the_last_op_of_a_run_needs_a_good_signature_and_relays_end_runs_there() {
        let k = keys(3);
        let s = stores(&k, 3);
        let (a, b, c) = (&s[0], &s[1], &s[2]);
        mkdir(a, "x");
        mkdir(a, "y");
        let (mut ops, keys_a) = lacking(a, b);
        // A relay spoilt the signature of an op inside the run: the run's last op, whose
        // chain runs through it, vouches for it.
        let n = ops.len();
        ops[n - 2].sig = vec![0; 64];
        let applied = b.apply_remote(&ops, &keys_a, &|_| false).unwrap();
        assert!(applied.refused.is_empty(), "{:?}", applied.refused);
        assert!(b.lookup(ROOT_INO, b"y").unwrap().is_some());
        // B passes the ops on, but never ends a run at the spoilt one: asked for all but
        // the last, it stops before it.
        // (C is given B's own ops' place in its version vector: only A's run is asked for.)
        let mut have = c.version_vector();
        have.insert(b.writer(), b.version_vector()[&b.writer()]);
        let w = a.writer();
        let first = b.ops_after(&have, n - 1).unwrap();
        assert!(first.iter().all(|o| o.id.writer() == w));
        assert_eq!(first.len(), n - 2, "the run ends before the spoilt op");
        let keys = b.device_keys([k[0].device()]).unwrap();
        assert!(c
            .apply_remote(&first, &keys, &|_| false)
            .unwrap()
            .refused
            .is_empty());
        have = c.version_vector();
        have.insert(b.writer(), b.version_vector()[&b.writer()]);
        let rest = b.ops_after(&have, usize::MAX).unwrap();
        assert!(c
            .apply_remote(&rest, &[], &|_| false)
            .unwrap()
            .refused
            .is_empty());
        assert!(c.lookup(ROOT_INO, b"y").unwrap().is_some());
        assert_eq!(c.version_vector().get(&w), a.version_vector().get(&w));
    }

    #[test]
    fn a_batch_with_too_many_refused_writers_fails_whole() {
        let k = keys(2);
        let s = stores(&k, 2);
        let b = &s[1];
        // A member mints incarnations, each opening with a far-future op: every one is
        // refused, and each refusal would re-run the batch.
        let ops: Vec<OpRecord> = (0..=MAX_REFUSED_WRITERS as u64)
            .map(|inc| {
                let mut op = OpRecord {
                    id: OpId {
                        device: k[0].device(),
                        incarnation: inc,
                        seq: 1,
                    },
                    hlc: Hlc(u64::MAX / 2),
                    prev: GENESIS,
                    kind: OpKind::SetXattr {
                        node: NodeId::ROOT,
                        name: b"user.x".to_vec(),
                        value: None,
                    },
                    sig: Vec::new(),
                };
                resign(&mut op, &k[0]);
                op
            })
            .collect();
        let before = b.version_vector();
        let err = b
            .apply_remote(&ops[1..], &[public(&k[0])], &|_| false)
            .unwrap();
        assert_eq!(err.refused.len(), MAX_REFUSED_WRITERS);
        let err = b
            .apply_remote(&ops, &[public(&k[0])], &|_| false)
            .unwrap_err();
        assert!(err.to_string().contains("writers refused"), "{err}");
        assert_eq!(b.version_vector(), before);
    }

    #[test]
    fn a_second_op_under_a_held_id_is_kept_as_evidence_not_applied() {
        let k = keys(2);
        let s = stores(&k, 2);
        let (a, b) = (&s[0], &s[1]);
        mkdir(a, "first");
        let (ops, keys_a) = lacking(a, b);
        b.apply_remote(&ops, &keys_a, &|_| false).unwrap();
        // A says something else under the id of its last op.
        let mut twin = ops.last().unwrap().clone();
        if let OpKind::Create { name, .. } = &mut twin.kind {
            *name = b"second".to_vec();
        }
        resign(&mut twin, &k[0]);
        let applied = b.apply_remote(&[twin.clone()], &[], &|_| false).unwrap();
        assert_eq!(applied.equivocators, vec![k[0].device()]);
        assert!(b.lookup(ROOT_INO, b"second").unwrap().is_none());
        assert!(b.lookup(ROOT_INO, b"first").unwrap().is_some());
        let ev = b.evidence().unwrap();
        assert_eq!(ev.len(), 1);
        assert!(ev[0].1.proves(&NS, &public(&k[0])));
        // The same op again is a plain duplicate; a forged twin is refused.
        let again = b.apply_remote(&ops, &[], &|_| false).unwrap();
        assert_eq!((again.applied, again.equivocators.len()), (0, 0));
        let mut forged = twin;
        forged.sig = vec![0; 64];
        let applied = b.apply_remote(&[forged], &[], &|_| false).unwrap();
        assert_eq!(applied.refused.len(), 1);
        assert!(applied.refused[0].reason.contains("not its author's"));
        assert_eq!(b.evidence().unwrap().len(), 1, "a forgery is no evidence");
        assert!(b.fsck().unwrap().is_clean());
    }

    #[test]
    fn a_restored_store_makes_ops_under_a_new_incarnation_and_gets_its_lost_ops_back() {
        let k = keys(2);
        let s = stores(&k, 2);
        let (a, b) = (&s[0], &s[1]);
        mkdir(a, "before");
        let backup = a.restored_copy().unwrap().unwrap();
        // After the backup, A goes on and B sees it all.
        mkdir(a, "lost");
        let (ops, keys_a) = lacking(a, b);
        b.apply_remote(&ops, &keys_a, &|_| false).unwrap();
        // A is restored from the backup, and makes changes of its own before it meets B.
        let a = backup;
        assert!(a.lookup(ROOT_INO, b"lost").unwrap().is_none());
        mkdir(&a, "after");
        assert_ne!(a.writer(), s[0].writer(), "a new incarnation");
        let (ops, keys) = lacking(&a, b);
        b.apply_remote(&ops, &keys, &|_| false).unwrap();
        let (ops, keys) = lacking(b, &a);
        a.apply_remote(&ops, &keys, &|_| false).unwrap();
        for st in [&a, b] {
            for name in ["before", "lost", "after"] {
                assert!(
                    st.lookup(ROOT_INO, name.as_bytes()).unwrap().is_some(),
                    "{name}"
                );
            }
            assert!(st.evidence().unwrap().is_empty(), "no op id was reused");
            assert!(
                st.fsck().unwrap().is_clean(),
                "{:?}",
                st.fsck().unwrap().problems
            );
        }
        assert_eq!(a.version_vector(), b.version_vector());
    }
}
