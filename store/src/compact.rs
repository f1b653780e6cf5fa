//! Compaction of the logs: checkpoints of causally stable ops.
//!
//! Owns: what members tell each other about what they hold (`Report`), the choice of a
//! checkpoint from those reports (`plan`: pure, state in, a horizon out), and
//! `Store::compact`, which drops every op and every move before the horizon and keeps only
//! what later ops can still need of them (`CompactedOp`: the `Create` of a node that is still
//! here, the whole content of a file version a later edit may build on, and membership
//! changes, for a joiner's welcome).
//! Must not: decide when to compact or talk to peers (the daemon and `net` do), or drop an op
//! that some member may still lack.
//!
//! Why it is safe. A member's report says: every op in its `vv` is durable there, and every
//! op it makes from then on has a clock after its `clock` (a hybrid clock only grows). The
//! horizon is below every current member's reported clock (less `lag`, for a device restored
//! from a backup with its clock behind), and below the first op of every writer that some
//! member lacks; and this device holds every op any member reported. So every op before the
//! horizon is held by every member, and every op that can still arrive has a later clock:
//! no late op undoes a compacted move, and a later edit builds on the latest compacted
//! version of its file or on an op still in the log. An op that breaks the promise (a
//! device that backdates, or was restored with its clock set back by more than the lag) is
//! refused as too late (`Txn::check_clock_order`).
//!
//! Left out (next steps): reports are not yet sent between daemons, so only the simulation
//! and tests compact; a device that lacks compacted ops (a new device, or one restored from a
//! backup older than its last report) needs a snapshot to start from, and its own unshared
//! changes rebased on it; and a member that backdates a name op into the window between two
//! devices' checkpoints makes them decide differently on it (the device past the checkpoint
//! refuses it as too late), which, like equivocation, needs a rebuild from the log to converge.
//!
//! A deleted node is not forgotten: its `Born` record, attribute registers, `Create` and last
//! version stay (a tombstone), because a device restored from a backup older than its last
//! report can still name it, and its op must bring the node back everywhere alike. Forgetting
//! them needs such a device to rebase on a snapshot first (not built yet).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::auth;
use crate::error::Result;
use crate::kv::{self, Cf};
use crate::records::{self, key, CheckpointRecord, CompactedOp, OpKind, OpRecord};
use crate::replica::{version_refs, VersionVector, MAX_CLOCK_SKEW_MS};
use crate::store::Store;
use crate::types::{DeviceId, Hlc, NodeId, OpId, Writer};

/// How far below the lowest reported clock the horizon stays by default: a device restored
/// from a backup makes ops with its wall clock, which may be behind the clock it reported
/// before by up to the skew this device accepts from a peer, and the peer's the other way.
pub const DEFAULT_LAG_MS: u64 = 2 * MAX_CLOCK_SKEW_MS;

/// Keys changed per transaction while compacting (the writer lock is held for one page).
const PAGE: usize = 4096;

/// What a member holds, as it tells the others (signed by it on the wire).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The member.
    pub device: DeviceId,
    /// Every op it makes from now on has a later clock.
    pub clock: Hlc,
    /// Every op it holds durably.
    pub vv: VersionVector,
}

/// A checkpoint to compact to: chosen by `plan`, applied by `Store::compact`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Every op before this clock is held by every member, and none can still arrive.
    pub horizon: Hlc,
}

/// What one compaction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Compaction {
    /// Ops dropped from the op log.
    pub ops: u64,
    /// Moves dropped from the move log.
    pub moves: u64,
    /// Records kept of compacted ops (creates of nodes still here, file versions).
    pub kept: u64,
}

/// The checkpoint that `reports` allow, given this device's version vector `own`: `None`
/// unless every current member in `members` has reported and this device holds every op any
/// of them reported. `first_unstable(writer, seq)` is the clock of an op held here (the
/// first of its writer that some member lacks), `None` if it is not in the log.
pub fn plan(
    members: &BTreeSet<DeviceId>,
    reports: &[Report],
    own: &VersionVector,
    lag_ms: u64,
    mut first_unstable: impl FnMut(Writer, u64) -> Result<Option<Hlc>>,
) -> Result<Option<Checkpoint>> {
    let mut latest: HashMap<DeviceId, &Report> = HashMap::new();
    for r in reports.iter().filter(|r| members.contains(&r.device)) {
        let e = latest.entry(r.device).or_insert(r);
        if r.clock > e.clock {
            *e = r;
        }
    }
    if members.is_empty() || members.iter().any(|m| !latest.contains_key(m)) {
        return Ok(None);
    }
    let held = |w: &Writer| own.get(w).copied().unwrap_or(0);
    if latest
        .values()
        .any(|r| r.vv.iter().any(|(w, &seq)| held(w) < seq))
    {
        return Ok(None);
    }
    let lowest = latest.values().map(|r| r.clock).min().unwrap_or_default();
    let mut horizon = Hlc(lowest.0.saturating_sub(lag_ms << 16));
    for (w, &top) in own {
        let everywhere = latest
            .values()
            .map(|r| r.vv.get(w).copied().unwrap_or(0))
            .min()
            .unwrap_or(0);
        if everywhere >= top {
            continue;
        }
        match first_unstable(*w, everywhere + 1)? {
            Some(c) => horizon = horizon.min(c),
            None => return Ok(None),
        }
    }
    Ok(Some(Checkpoint { horizon }))
}

impl Store {
    /// This device's report to the other members: what it holds, durably (the WAL is synced
    /// after the clock and the version vector are read, so both are on disk).
    pub fn report(&self) -> Result<Report> {
        let state = self.writer_state();
        let vv = self.version_vector();
        self.sync()?;
        Ok(Report {
            device: self.device(),
            clock: state.hlc,
            vv,
        })
    }

    /// The checkpoint the other members' `reports` and this device's own allow (`plan`).
    pub fn plan_checkpoint(&self, reports: &[Report], lag_ms: u64) -> Result<Option<Checkpoint>> {
        let members: BTreeSet<DeviceId> = self
            .members()?
            .into_iter()
            .filter(|(_, m)| m.added && !m.removed)
            .map(|(d, _)| d)
            .collect();
        let me = self.report()?;
        let mut all: Vec<Report> = reports
            .iter()
            .filter(|r| r.device != me.device)
            .cloned()
            .collect();
        all.push(me);
        let own = self.version_vector();
        plan(&members, &all, &own, lag_ms, |w, seq| {
            Ok(self
                .ops(w, seq, 1)?
                .into_iter()
                .find(|o| o.id.seq == seq)
                .map(|o| o.hlc))
        })
    }

    /// The horizon of the last checkpoint (`Hlc(0)`: none).
    pub fn horizon(&self) -> Hlc {
        self.checkpoint().horizon
    }

    /// Compacts the logs to `cp` (see the module docs): a no-op unless its horizon is past
    /// the last one. Runs in pages, each a transaction of its own: the checkpoint is
    /// recorded once everything later ops may need is kept, and only then are ops and moves
    /// dropped, so a crash at any point leaves a consistent store (the next compaction
    /// finishes the job).
    pub fn compact(&self, cp: &Checkpoint) -> Result<Compaction> {
        let _one = self.compact_lock();
        let old = self.checkpoint();
        if cp.horizon <= old.horizon {
            return Ok(Compaction::default());
        }
        let mut out = Compaction::default();

        // 1. Read: where each writer's log is cut, the latest compacted version of each file,
        // and the versions the ops after the horizon (the window) name. The creates of
        // compacted ops are kept as they are read (harmless before the checkpoint: lookups
        // read the log first).
        let mut cut = old.cut.clone();
        let mut latest: HashMap<NodeId, (Hlc, OpId)> = HashMap::new();
        let mut refs: HashMap<OpId, NodeId> = HashMap::new();
        let mut members: Vec<OpRecord> = Vec::new();
        for (&w, &top) in &self.version_vector() {
            let mut next = 1;
            while next <= top {
                let page = self.ops(w, next, PAGE)?;
                let Some(last) = page.last() else { break };
                next = last.id.seq + 1;
                let mut creates: Vec<(OpId, CompactedOp)> = Vec::new();
                for op in page {
                    if op.hlc >= cp.horizon {
                        refs.extend(version_refs(&op.kind).into_iter().map(|(n, v)| (v, n)));
                        continue;
                    }
                    out.ops += 1;
                    cut.insert(w, (op.id.seq, auth::op_hash(&op)));
                    match &op.kind {
                        OpKind::Content { node, .. } => {
                            let e = latest.entry(*node).or_insert((op.hlc, op.id));
                            *e = (*e).max((op.hlc, op.id));
                        }
                        OpKind::Create { .. } => {
                            let (id, hlc) = (op.id, op.hlc);
                            creates.push((id, CompactedOp { hlc, kind: op.kind }));
                        }
                        OpKind::Member { .. } => members.push(op),
                        _ => {}
                    }
                }
                if !creates.is_empty() {
                    out.kept += creates.len() as u64;
                    self.commit(false, |tx| {
                        for (id, c) in &creates {
                            tx.put(Cf::Meta, &key::compacted(*id), records::encode(c));
                        }
                        Ok(())
                    })?;
                }
            }
        }
        let new = CheckpointRecord {
            horizon: cp.horizon,
            cut,
        };
        // What earlier checkpoints kept.
        let mut kept: HashMap<OpId, CompactedOp> = HashMap::new();
        {
            let view = self.snapshot();
            for item in kv::scan_prefix(&*view, Cf::Meta, key::META_COMPACTED) {
                let (k, v) = item?;
                let id = records::key::op_id_of(&k[key::META_COMPACTED.len()..])?;
                kept.insert(id, records::decode("compacted op", &v)?);
            }
        }
        for (id, c) in &kept {
            if let OpKind::Content { node, .. } = &c.kind {
                let e = latest.entry(*node).or_insert((c.hlc, *id));
                *e = (*e).max((c.hlc, *id));
            }
        }
        // The file versions later ops may build on: the latest compacted one of each file,
        // and those the window names.
        let mut versions: BTreeMap<OpId, NodeId> =
            latest.iter().map(|(n, (_, id))| (*id, *n)).collect();
        for (v, n) in &refs {
            if new.covers(*v) {
                versions.insert(*v, *n);
            }
        }

        // 2. Keep the whole content of the versions later ops may build on.
        let wanted: Vec<(OpId, NodeId)> = versions
            .iter()
            .filter(|(id, _)| !kept.contains_key(id))
            .map(|(id, n)| (*id, *n))
            .collect();
        for page in wanted.chunks(256) {
            out.kept += self.commit(false, |tx| {
                let mut n = 0;
                for &(id, node) in page {
                    let Some((hlc, kind)) = tx.kept(id)? else {
                        continue;
                    };
                    let OpKind::Content {
                        node: of, mtime, ..
                    } = kind
                    else {
                        continue;
                    };
                    if node != of {
                        continue;
                    }
                    let (map, size) = tx.materialize(of, Some(id))?;
                    let c = CompactedOp {
                        hlc,
                        kind: OpKind::Content {
                            node: of,
                            base: None,
                            start: 0,
                            end: u64::MAX,
                            extents: map.into_iter().map(|(o, (c, l))| (o, c, l)).collect(),
                            size,
                            mtime,
                        },
                    };
                    tx.put(Cf::Meta, &key::compacted(id), records::encode(&c));
                    n += 1;
                }
                Ok(n)
            })?;
        }
        // Membership changes stay for a joiner's welcome, in their index.
        for page in members.chunks(PAGE) {
            self.commit(false, |tx| {
                for op in page {
                    tx.put(Cf::Meta, &key::member_op(op.id), records::encode(op));
                }
                Ok(())
            })?;
        }

        // 3. The checkpoint: from here on, ops before the horizon are refused.
        let new = Arc::new(new);
        self.commit(true, |tx| {
            tx.put(Cf::Meta, key::META_CHECKPOINT, records::encode(&*new));
            tx.state.checkpoint = new.clone();
            Ok(())
        })?;

        // 4. Drop the compacted ops, the moves before the horizon, and the versions no later
        // op needs any more.
        for (&w, &(seq, _)) in &new.cut {
            let lo = key::op_id(OpId {
                device: w.device,
                incarnation: w.incarnation,
                seq: 0,
            });
            let hi = key::op_id(OpId {
                device: w.device,
                incarnation: w.incarnation,
                seq: seq.saturating_add(1),
            });
            self.delete_range(Cf::Oplog, &lo, &hi)?;
        }
        out.moves = self.delete_range(Cf::Moves, &[], &cp.horizon.0.to_be_bytes())?;
        let stale: Vec<OpId> = kept
            .iter()
            .filter(|(id, c)| match &c.kind {
                OpKind::Create { .. } => false,
                OpKind::Content { .. } => !versions.contains_key(id),
                _ => true,
            })
            .map(|(id, _)| *id)
            .collect();
        for page in stale.chunks(PAGE) {
            self.commit(false, |tx| {
                for id in page {
                    tx.delete(Cf::Meta, &key::compacted(*id));
                }
                Ok(())
            })?;
        }
        self.sync()?;
        tracing::info!(
            horizon = cp.horizon.millis(),
            ops = out.ops,
            moves = out.moves,
            kept = out.kept,
            "compacted the logs"
        );
        Ok(out)
    }

    /// Deletes every key in `[lo, hi)` of `cf`, a page per transaction.
    fn delete_range(&self, cf: Cf, lo: &[u8], hi: &[u8]) -> Result<u64> {
        let mut from = lo.to_vec();
        let mut n = 0u64;
        loop {
            let last = self.commit(false, |tx| {
                let page = tx.scan(cf, &from, hi, PAGE)?;
                for (k, _) in &page {
                    tx.delete(cf, k);
                }
                Ok(page.last().map(|(k, _)| (k.clone(), page.len())))
            })?;
            let Some((k, len)) = last else { return Ok(n) };
            n += len as u64;
            if len < PAGE {
                return Ok(n);
            }
            from = kv::key_after(&k);
        }
    }
}
