//! A deterministic simulation of sync, in the style of FoundationDB's and ZeroFS's: several
//! replicas on the in-memory backend, driven by one seeded scheduler on virtual time.
//!
//! Each seed runs four honest devices, one Byzantine member and one stranger. Every step
//! picks an event: a local change, an anti-entropy exchange (a `Hello` with the asker's
//! version vector, answered by the ops it lacks: what `pvfs-net` sends), a WAL sync, a power
//! cut that drops a random part of a device's unsynced tail, a backup, a restore from an
//! older backup, a partition, or an attack of the Byzantine member (forged, backdated,
//! far-future, malformed and equivocating ops, a stranger's ops relayed). The network drops,
//! duplicates, delays and reorders messages. After every step: no op in any log is forged,
//! from a non-member or one the devices must refuse, and no op id names two different ops
//! anywhere. At quiescence: every replica fsck-clean, identical trees, no lost version.
//! On even seeds devices 1.. also gossip reports of what they hold and compact their logs
//! (`Store::compact`) at random steps and after quiescence, then go on; device 0 keeps every
//! op (for the lost-version check, and to serve devices that lack compacted ops).
//!
//! `PVFS_SIM_SEEDS=n` runs n seeds (default 1,000), `PVFS_SIM_SEED=s` one seed, and
//! `PVFS_SIM_TRACE=1` prints every step. A failing seed prints the command that replays it.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use parking_lot::Mutex;
use pvfs_store::{
    op_hash, sign_message, verify_op, DeviceId, DeviceKey, Env, Hlc, OpHash, OpId, OpKind,
    OpRecord, Report, RootOwner, Signer, Store, StoreError, StoreOptions, Timestamp, VersionVector,
    Writer, MAX_CLOCK_SKEW_MS,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Honest devices; the Byzantine member is `HONEST`, the stranger `HONEST + 1`.
const HONEST: usize = 4;
const BYZ: usize = HONEST;
const STRANGER: usize = HONEST + 1;
const STEPS: usize = 160;
const NAMESPACE: [u8; 16] = [7; 16];
/// Virtual time starts here (milliseconds since the epoch, in 2027).
const START_MS: u64 = 1_800_000_000_000;
/// Devices' clocks are off by up to this much (milliseconds, either way).
const SKEW_MS: i64 = 2000;
/// The checkpoint stays this far below the lowest reported clock: more than two skews, for
/// a device restored with its clock behind (`pvfs_store::DEFAULT_LAG_MS` in the daemon).
const LAG_MS: u64 = 2 * SKEW_MS as u64 + 1000;

/// Virtual time and seeded ids for one device.
#[derive(Debug)]
struct SimEnv {
    clock: Arc<AtomicU64>,
    /// This device's clock error, in milliseconds (within the allowed skew).
    skew: i64,
    ids: Mutex<StdRng>,
}

impl Env for SimEnv {
    fn now(&self) -> Timestamp {
        let ms = self.clock.load(Ordering::Relaxed) as i64 + self.skew;
        Timestamp {
            sec: ms.div_euclid(1000),
            nsec: (ms.rem_euclid(1000) * 1_000_000) as u32,
        }
    }
    fn unique(&self) -> [u8; 16] {
        self.ids.lock().random()
    }
}

#[derive(Clone, Debug)]
enum Payload {
    /// "Here is what I hold": answered with the ops the asker lacks.
    Hello(VersionVector),
    Ops {
        ops: Vec<OpRecord>,
        keys: Vec<[u8; 32]>,
    },
    /// The sender's report and every report it has of the others (gossip, so that devices
    /// that never meet still learn what each other holds).
    Reports(Vec<Report>),
}

#[derive(Debug)]
struct Msg {
    at: u64,
    n: u64,
    from: usize,
    to: usize,
    payload: Payload,
    /// The epochs of sender and receiver when it was sent.
    epochs: (u64, u64),
    /// An equivocation: delivered only to a device that holds this other op under the id
    /// (see "Left out" in the module docs of the issue: a device that first receives the
    /// second branch keeps it, and no rule makes the two sides converge yet).
    only_if_held: Option<(OpId, OpHash)>,
}

struct Device {
    store: Store,
    key: Arc<DeviceKey>,
    backup: Option<Store>,
    /// Incremented by a power cut or restore: connections (messages in flight) die with it.
    epoch: u64,
    /// Highest sequence number per writer whose ops the step checks have seen.
    checked: HashMap<Writer, u64>,
    /// The latest report of each member this device has heard.
    reports: HashMap<DeviceId, Report>,
}

struct Sim {
    rng: StdRng,
    clock: Arc<AtomicU64>,
    devs: Vec<Device>,
    net: Vec<Msg>,
    sent: u64,
    cut: Vec<bool>,
    trace: bool,
    /// Ops no device may ever hold (forged, far-future, malformed, second branches).
    never: HashSet<OpHash>,
    /// Every op id seen in any log, with its hash.
    ids: HashMap<OpId, OpHash>,
    /// Op hashes whose signature has been verified already.
    verified: HashSet<OpHash>,
    keys: HashMap<DeviceId, [u8; 32]>,
    members: HashSet<DeviceId>,
    honest: HashSet<DeviceId>,
    /// The writers the Byzantine member crafted ops under.
    crafted: HashSet<Writer>,
    steps: u64,
    /// Events switched off (`PVFS_SIM_OFF=crash,restore,attack,compact,...`), to narrow
    /// down a failure.
    off: Vec<String>,
    /// Ops dropped by compactions.
    compacted: u64,
    /// Whether devices 1.. compact their logs (even seeds).
    compaction: bool,
}

fn key_bytes(k: &DeviceKey) -> [u8; 32] {
    k.public_key().try_into().expect("an Ed25519 key")
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let clock = Arc::new(AtomicU64::new(START_MS));
        let mut devs = Vec::new();
        let keys: Vec<Arc<DeviceKey>> = (0..=STRANGER)
            .map(|i| {
                let mut s = [0u8; 32];
                s[..8].copy_from_slice(&seed.to_le_bytes());
                s[8] = i as u8 + 1;
                Arc::new(DeviceKey::from_seed(s))
            })
            .collect();
        for (i, key) in keys.iter().enumerate() {
            let env = SimEnv {
                clock: clock.clone(),
                skew: rng.random_range(-SKEW_MS..=SKEW_MS),
                ids: Mutex::new(StdRng::seed_from_u64(seed ^ ((i as u64 + 1) << 56))),
            };
            let opts = StoreOptions {
                env: Arc::new(env),
                ..StoreOptions::default()
            };
            let store =
                Store::in_memory_with(&opts, key.clone(), RootOwner { uid: 0, gid: 0 }, NAMESPACE)
                    .expect("in-memory store");
            // The members add each other; the stranger only knows itself.
            store
                .commit(true, |tx| {
                    if i == STRANGER {
                        return tx.set_member(key.device(), "stranger", true);
                    }
                    for (j, m) in keys.iter().enumerate().take(BYZ + 1) {
                        tx.set_member(m.device(), &format!("dev{j}"), true)?;
                    }
                    Ok(())
                })
                .expect("membership");
            if std::env::var_os("PVFS_SIM_TRACE").is_some() {
                eprintln!("dev{i} is {}", key.device().fmt_short());
            }
            devs.push(Device {
                store,
                key: key.clone(),
                backup: None,
                epoch: 0,
                checked: HashMap::new(),
                reports: HashMap::new(),
            });
        }
        Sim {
            rng,
            clock,
            cut: vec![false; devs.len()],
            members: keys.iter().take(BYZ + 1).map(|k| k.device()).collect(),
            honest: keys.iter().take(HONEST).map(|k| k.device()).collect(),
            crafted: HashSet::new(),
            keys: keys.iter().map(|k| (k.device(), key_bytes(k))).collect(),
            devs,
            net: Vec::new(),
            sent: 0,
            trace: std::env::var_os("PVFS_SIM_TRACE").is_some(),
            never: HashSet::new(),
            ids: HashMap::new(),
            verified: HashSet::new(),
            steps: 0,
            compacted: 0,
            compaction: seed.is_multiple_of(2),
            off: std::env::var("PVFS_SIM_OFF")
                .unwrap_or_default()
                .split(',')
                .map(str::to_string)
                .collect(),
        }
    }

    fn on(&self, what: &str) -> bool {
        !self.off.iter().any(|o| o == what)
    }

    fn now(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{:>6}] {}", self.now() - START_MS, what());
        }
    }

    /// Puts a message on the network: maybe dropped, maybe twice, always after a delay.
    fn send(
        &mut self,
        from: usize,
        to: usize,
        payload: Payload,
        only_if_held: Option<(OpId, OpHash)>,
    ) {
        if self.rng.random_bool(0.05) {
            return;
        }
        let copies = if self.rng.random_bool(0.05) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if self.rng.random_bool(0.05) {
                self.rng.random_range(500..3000)
            } else {
                self.rng.random_range(1..100)
            };
            self.sent += 1;
            self.net.push(Msg {
                at: self.now() + delay,
                n: self.sent,
                from,
                to,
                payload: payload.clone(),
                epochs: (self.devs[from].epoch, self.devs[to].epoch),
                only_if_held,
            });
        }
    }

    fn random_act(&mut self) -> Act {
        let r = &mut self.rng;
        let n = NAMES.len();
        match r.random_range(0..16) {
            0..=2 => Act::Create {
                dir: r.random::<u32>() as usize,
                name: r.random_range(0..n),
                is_dir: r.random_bool(0.3),
            },
            3..=5 => Act::Write {
                file: r.random::<u32>() as usize,
                seed: r.random(),
                len: r.random_range(1..3000),
            },
            6 => Act::Append {
                file: r.random::<u32>() as usize,
                seed: r.random(),
                len: r.random_range(1..3000),
            },
            7 | 8 => Act::Rename {
                src: r.random::<u32>() as usize,
                dir: r.random::<u32>() as usize,
                name: r.random_range(0..n),
            },
            9 | 10 => Act::Remove {
                node: r.random::<u32>() as usize,
            },
            11 => Act::Link {
                file: r.random::<u32>() as usize,
                dir: r.random::<u32>() as usize,
                name: r.random_range(0..n),
            },
            14 | 15 => Act::Xattr {
                node: r.random::<u32>() as usize,
                name: r.random_range(0..XATTRS.len()),
                value: r.random_bool(0.7).then(|| r.random()),
            },
            _ => Act::SetAttr {
                node: r.random::<u32>() as usize,
                perm: r.random(),
                secs: r.random(),
            },
        }
    }

    fn step(&mut self) -> Result<(), String> {
        self.steps += 1;
        let members = BYZ + 1;
        match self.rng.random_range(0..110) {
            0..=29 => {
                let d = self.rng.random_range(0..members);
                let act = self.random_act();
                self.log(|| format!("dev{d} {act:?}"));
                run(&self.devs[d].store, &act);
            }
            30..=64 => {
                let a = self.rng.random_range(0..members);
                let b = self.rng.random_range(0..members);
                if a != b {
                    let vv = self.devs[a].store.version_vector();
                    self.send(a, b, Payload::Hello(vv), None);
                }
            }
            65..=71 => {
                let d = self.rng.random_range(0..members);
                self.devs[d]
                    .store
                    .sync()
                    .map_err(|e| format!("sync: {e}"))?;
            }
            72..=74 => {
                let d = self.rng.random_range(0..HONEST);
                let unsynced = self.devs[d].store.unsynced_writes();
                let keep = self.rng.random_range(0..=unsynced);
                if !self.on("crash") {
                    return Ok(());
                }
                self.log(|| {
                    format!("dev{d} power cut: keeps {keep} of {unsynced} unsynced writes")
                });
                let s = self.devs[d]
                    .store
                    .crashed_copy(keep)
                    .map_err(|e| format!("crash: {e}"))?;
                self.devs[d].store = s.expect("in memory");
                self.devs[d].epoch += 1;
                self.devs[d].checked.clear();
                self.devs[d].reports.clear();
            }
            75..=77 => {
                let d = self.rng.random_range(0..HONEST);
                self.log(|| format!("dev{d} backed up"));
                self.devs[d].backup = self.devs[d]
                    .store
                    .restored_copy()
                    .map_err(|e| format!("backup: {e}"))?;
            }
            78 | 79 => {
                let d = self.rng.random_range(0..HONEST);
                // Once devices compacted, a device restored from a backup older than its last
                // report may hold ops (or lack ops) the others compacted past: it must rebase
                // on a snapshot, which is not built yet (see `compact`'s docs). Restores then
                // happen only before the first compaction.
                if !self.on("restore") || (self.compaction && self.compacted > 0) {
                    return Ok(());
                }
                if let Some(b) = self.devs[d].backup.take() {
                    self.log(|| format!("dev{d} restored from its backup"));
                    self.devs[d].store = b;
                    self.devs[d].epoch += 1;
                    self.devs[d].checked.clear();
                    self.devs[d].reports.clear();
                }
            }
            80..=82 => {
                let d = self.rng.random_range(0..members);
                self.cut[d] = !self.cut[d];
                self.log(|| format!("dev{d} cut off: {}", self.cut[d]));
            }
            100..=104 => {
                let a = self.rng.random_range(0..members);
                let b = self.rng.random_range(0..members);
                if a != b {
                    let reports = self.reports_of(a)?;
                    self.send(a, b, Payload::Reports(reports), None);
                }
            }
            105..=109 => {
                // Device 0 never compacts: it keeps every op, for the check that no
                // version was lost and to serve devices that lack compacted ops (where a
                // daemon would send a snapshot).
                let d = self.rng.random_range(1..HONEST);
                if self.compaction {
                    self.compact(d)?;
                }
            }
            _ => self.attack()?,
        }
        let advance = self.rng.random_range(0..200);
        self.clock.fetch_add(advance, Ordering::Relaxed);
        self.deliver(false)?;
        self.check_logs()
    }

    /// Delivers every message due by now (`all`: every message, as time passes).
    fn deliver(&mut self, all: bool) -> Result<(), String> {
        loop {
            let now = self.now();
            let Some(i) = self
                .net
                .iter()
                .enumerate()
                .filter(|(_, m)| all || m.at <= now)
                .min_by_key(|(_, m)| (m.at, m.n))
                .map(|(i, _)| i)
            else {
                return Ok(());
            };
            let m = self.net.swap_remove(i);
            if all && m.at > now {
                self.clock.store(m.at, Ordering::Relaxed);
            }
            let epochs = (self.devs[m.from].epoch, self.devs[m.to].epoch);
            if self.cut[m.from] || self.cut[m.to] || m.epochs != epochs {
                continue;
            }
            self.receive(m)?;
        }
    }

    /// Device `d`'s own report (which syncs its WAL) and the latest it has of the others.
    fn reports_of(&mut self, d: usize) -> Result<Vec<Report>, String> {
        let own = self.devs[d]
            .store
            .report()
            .map_err(|e| format!("report: {e}"))?;
        let mut all: Vec<Report> = self.devs[d]
            .reports
            .values()
            .filter(|r| r.device != own.device)
            .cloned()
            .collect();
        all.push(own);
        Ok(all)
    }

    /// Device `d` compacts its logs as far as the reports it has allow.
    fn compact(&mut self, d: usize) -> Result<(), String> {
        let store = self.devs[d].store.clone();
        let reports: Vec<Report> = self.devs[d].reports.values().cloned().collect();
        let Some(cp) = store
            .plan_checkpoint(&reports, LAG_MS)
            .map_err(|e| format!("dev{d} plan: {e}"))?
        else {
            return Ok(());
        };
        let before = store.horizon();
        let c = store
            .compact(&cp)
            .map_err(|e| format!("dev{d} compact: {e}"))?;
        self.compacted += c.ops;
        self.log(|| {
            format!(
                "dev{d} compacts to {:x} (was {:x}): {c:?}",
                cp.horizon.0, before.0
            )
        });
        Ok(())
    }

    fn receive(&mut self, m: Msg) -> Result<(), String> {
        let to = self.devs[m.to].store.clone();
        match m.payload {
            Payload::Reports(reports) => {
                let known = &mut self.devs[m.to].reports;
                for r in reports {
                    if !self.members.contains(&r.device) {
                        continue;
                    }
                    if known.get(&r.device).is_none_or(|k| k.clock < r.clock) {
                        known.insert(r.device, r);
                    }
                }
            }
            Payload::Hello(vv) => {
                let limit = self.rng.random_range(1..=64);
                let ops = match to.ops_after(&vv, limit) {
                    Ok(ops) => ops,
                    // It lacks ops compacted here: another device must serve it.
                    Err(StoreError::Compacted(why)) => {
                        self.log(|| format!("dev{} cannot serve dev{}: {why}", m.to, m.from));
                        return Ok(());
                    }
                    Err(e) => return Err(format!("ops_after: {e}")),
                };
                if ops.is_empty() {
                    return Ok(());
                }
                let keys = to
                    .device_keys(ops.iter().map(|o| o.id.device))
                    .map_err(|e| format!("device_keys: {e}"))?;
                self.send(m.to, m.from, Payload::Ops { ops, keys }, None);
            }
            Payload::Ops { ops, keys } => {
                if let Some((id, hash)) = m.only_if_held {
                    let held = to.ops(id.writer(), id.seq, 1).map_err(|e| e.to_string())?;
                    if held.first().map(op_hash) != Some(hash) {
                        return Ok(());
                    }
                }
                let applied = to.apply_remote(&ops, &keys, &|_| false).map_err(|e| {
                    format!(
                        "dev{} failed to apply a batch from dev{}: {e}",
                        m.to, m.from
                    )
                })?;
                self.log(|| {
                    let ids: Vec<String> = ops.iter().map(|o| o.id.fmt_short()).collect();
                    format!(
                        "dev{} <- dev{}: {} ops [{}], {} applied, {} refused {:?}",
                        m.to,
                        m.from,
                        ops.len(),
                        ids.join(" "),
                        applied.applied,
                        applied.refused.len(),
                        applied.refused.first().map(|r| &r.reason)
                    )
                });
                // An honest device's op may be refused for a while (out of order, or after
                // an op it depends on that was refused), never as unauthentic (unless it is
                // a forgery from the Byzantine member).
                for r in &applied.refused {
                    if m.from != BYZ && self.honest.contains(&r.op.device) {
                        let reason = &r.reason;
                        if ["signature", "member", "fork", "clock", "key"]
                            .iter()
                            .any(|w| reason.contains(w))
                        {
                            return Err(format!(
                                "dev{} refused dev{}'s op {}: {}",
                                m.to,
                                m.from,
                                r.op.fmt_short(),
                                r.reason
                            ));
                        }
                    }
                }
                if m.only_if_held.is_some() {
                    let byz = self.devs[BYZ].key.device();
                    let ev = to.evidence().map_err(|e| e.to_string())?;
                    if !ev.iter().any(|(d, _)| *d == byz) {
                        return Err(format!(
                            "dev{} got an equivocation and kept no evidence",
                            m.to
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// New ops of the Byzantine member's own making, from a scratch copy of its store (a
    /// fresh incarnation, so they are validly chained and signed).
    fn scratch_ops(&mut self, dev: usize) -> Result<Vec<OpRecord>, String> {
        let scratch = self.devs[dev]
            .store
            .restored_copy()
            .map_err(|e| e.to_string())?
            .expect("in memory");
        for _ in 0..8 {
            let act = self.random_act();
            run(&scratch, &act);
            let ops = scratch
                .ops(scratch.writer(), 1, usize::MAX)
                .map_err(|e| e.to_string())?;
            if !ops.is_empty() {
                return Ok(ops);
            }
        }
        Ok(Vec::new())
    }

    /// Re-chains `ops` as the writer `writer` from `prev` and signs them with `key`.
    fn resign(ops: &mut [OpRecord], writer: Writer, key: &DeviceKey, mut prev: OpHash) {
        for (i, op) in ops.iter_mut().enumerate() {
            op.id = OpId {
                device: writer.device,
                incarnation: writer.incarnation,
                seq: i as u64 + 1,
            };
            op.prev = prev;
            let hash = op_hash(op);
            op.sig = key.sign(&sign_message(&NAMESPACE, &hash));
            prev = hash;
        }
    }

    fn attack(&mut self) -> Result<(), String> {
        let to = self.rng.random_range(0..HONEST);
        let byz_key = self.devs[BYZ].key.clone();
        let byz_keys = vec![key_bytes(&byz_key)];
        let kind = self.rng.random_range(0..6);
        let mut ops = self.scratch_ops(BYZ)?;
        if ops.is_empty() {
            return Ok(());
        }
        if !self.on("attack") || !self.on(&format!("attack{kind}")) {
            return Ok(());
        }
        let fresh = Writer {
            device: byz_key.device(),
            incarnation: self.rng.random(),
        };
        let genesis = [0u8; 32];
        self.crafted.insert(fresh);
        match kind {
            0 => {
                // Forged: ops in an honest device's name, signed by the Byzantine key.
                let victim = self.devs[self.rng.random_range(0..HONEST)].store.writer();
                Self::resign(&mut ops, victim, &byz_key, genesis);
                self.log(|| {
                    format!(
                        "attack: {} ops forged as {} to dev{to}",
                        ops.len(),
                        victim.fmt_short()
                    )
                });
                self.never.extend(ops.iter().map(op_hash));
            }
            1 => {
                // Backdated by up to a year: valid, and must converge like any late op.
                // Where devices compact, only into the window above the checkpoints: a name
                // op backdated past a checkpoint is refused by the devices past it and
                // applied by those not yet past it (see "Left out" in `compact`'s docs).
                let most = if self.compaction {
                    1000
                } else {
                    365 * 24 * 3600 * 1000u64
                };
                let back = self.rng.random_range(1..most);
                for op in &mut ops {
                    op.hlc = Hlc(op.hlc.0.saturating_sub(back << 16));
                }
                Self::resign(&mut ops, fresh, &byz_key, genesis);
                self.log(|| {
                    format!(
                        "attack: {} ops backdated by {back} ms to dev{to}",
                        ops.len()
                    )
                });
            }
            2 => {
                // From the far future: refused (and so is what follows them).
                let ahead = MAX_CLOCK_SKEW_MS + self.rng.random_range(60_000..10_000_000);
                for op in &mut ops {
                    op.hlc = Hlc(op.hlc.0.saturating_add(ahead << 16));
                }
                Self::resign(&mut ops, fresh, &byz_key, genesis);
                self.log(|| format!("attack: {} ops {ahead} ms ahead to dev{to}", ops.len()));
                self.never.extend(ops.iter().map(op_hash));
            }
            3 => {
                // Malformed but validly signed: bad names, a bad signature, a broken chain.
                let i = self.rng.random_range(0..ops.len());
                let how = self.rng.random_range(0..4);
                let bad: &[u8] = match self.rng.random_range(0..4) {
                    0 => b"a/b",
                    1 => b"",
                    2 => b"x\0y",
                    _ => &[b'n'; 300],
                };
                match (&mut ops[i].kind, how) {
                    (OpKind::Create { name, .. }, 0)
                    | (OpKind::Link { name, .. }, 0)
                    | (OpKind::Rename { to_name: name, .. }, 0) => *name = bad.to_vec(),
                    _ => {}
                }
                Self::resign(&mut ops, fresh, &byz_key, genesis);
                match how {
                    1 => ops[i].sig = vec![7; 64],
                    2 => ops[i].sig.truncate(3),
                    3 => ops[i].prev = [9; 32],
                    _ => {}
                }
                if how == 0
                    && !matches!(
                        ops[i].kind,
                        OpKind::Create { .. } | OpKind::Link { .. } | OpKind::Rename { .. }
                    )
                {
                    // Nothing to break in this op: it is a valid one.
                } else {
                    self.never.extend(ops[i..].iter().map(op_hash));
                }
                self.log(|| {
                    format!(
                        "attack: malformed op {i} ({how}) of {} to dev{to}",
                        ops.len()
                    )
                });
            }
            4 => {
                // Equivocation: a second op under an id the target holds from the member.
                let held = self.devs[to]
                    .store
                    .version_vector()
                    .into_iter()
                    .filter(|(w, seq)| w.device == byz_key.device() && *seq > 0)
                    .collect::<Vec<_>>();
                if held.is_empty() {
                    return Ok(());
                }
                let (w, top) = held[self.rng.random_range(0..held.len())];
                let seq = self.rng.random_range(1..=top);
                let Some(orig) = self.devs[to]
                    .store
                    .ops(w, seq, 1)
                    .map_err(|e| e.to_string())?
                    .pop()
                else {
                    return Ok(());
                };
                let mut other = orig.clone();
                other.hlc = Hlc(other.hlc.0 + 1);
                other.sig = byz_key.sign(&sign_message(&NAMESPACE, &op_hash(&other)));
                self.log(|| format!("attack: equivocation on {} to dev{to}", orig.id.fmt_short()));
                self.never.insert(op_hash(&other));
                let held = Some((orig.id, op_hash(&orig)));
                self.send(
                    BYZ,
                    to,
                    Payload::Ops {
                        ops: vec![other],
                        keys: byz_keys,
                    },
                    held,
                );
                return Ok(());
            }
            _ => {
                // A stranger's ops, relayed by the member.
                let act = self.random_act();
                run(&self.devs[STRANGER].store, &act);
                let ops = self.devs[STRANGER]
                    .store
                    .ops_after(&BTreeMap::new(), 64)
                    .map_err(|e| e.to_string())?;
                let keys = vec![key_bytes(&self.devs[STRANGER].key)];
                self.log(|| format!("attack: {} stranger ops relayed to dev{to}", ops.len()));
                self.send(BYZ, to, Payload::Ops { ops, keys }, None);
                return Ok(());
            }
        }
        self.send(
            BYZ,
            to,
            Payload::Ops {
                ops,
                keys: byz_keys,
            },
            None,
        );
        Ok(())
    }

    /// The invariants of every step, over the ops each member's log gained since the last.
    fn check_logs(&mut self) -> Result<(), String> {
        for d in 0..=BYZ {
            let store = self.devs[d].store.clone();
            for (w, top) in store.version_vector() {
                let from = self.devs[d].checked.get(&w).copied().unwrap_or(0) + 1;
                if from > top {
                    continue;
                }
                for op in store.ops(w, from, usize::MAX).map_err(|e| e.to_string())? {
                    let hash = op_hash(&op);
                    let id = op.id.fmt_short();
                    if self.never.contains(&hash) {
                        return Err(format!(
                            "dev{d} holds op {id}, which every device must refuse"
                        ));
                    }
                    if !self.members.contains(&op.id.device) {
                        return Err(format!("dev{d} holds op {id} of a non-member"));
                    }
                    if let Some(h) = self.ids.insert(op.id, hash) {
                        if h != hash {
                            return Err(format!("op id {id} names two different ops"));
                        }
                    }
                    if self.verified.insert(hash) {
                        let key = self.keys[&op.id.device];
                        verify_op(&NAMESPACE, &key, &op).map_err(|e| {
                            format!("dev{d} holds op {id} that its author did not sign: {e}")
                        })?;
                    }
                }
                self.devs[d].checked.insert(w, top);
            }
        }
        Ok(())
    }

    /// Heals the network, delivers what is in flight, and lets every member sync with every
    /// other until nothing new moves; then checks the converged trees.
    fn quiesce(&mut self) -> Result<(), String> {
        self.cut.iter_mut().for_each(|c| *c = false);
        self.deliver(true)?;
        for round in 0.. {
            if round >= 20 {
                return Err("no quiescence after 20 rounds".into());
            }
            let mut moved = 0;
            for a in 0..=BYZ {
                for b in 0..=BYZ {
                    if a != b {
                        let n = sync(&self.devs[a].store, &self.devs[b].store, usize::MAX);
                        self.log(|| format!("quiesce: dev{b} <- dev{a}: {n} ops applied"));
                        moved += n;
                    }
                }
            }
            self.check_logs()?;
            if moved == 0 {
                break;
            }
        }
        let stores: Vec<&Store> = self.devs[..=BYZ].iter().map(|d| &d.store).collect();
        // The Byzantine member's crafted versions are not owed a conflict copy: its own
        // device never made them.
        let crafted = &self.crafted;
        let res = check_converged(&stores, &|v| !crafted.contains(&v.writer()));
        if res.is_err() && self.trace {
            for op in all_ops(stores[0]) {
                eprintln!(
                    "  op {} hlc {:x} {:?}",
                    op.id.fmt_short(),
                    op.hlc.0,
                    op.kind
                );
            }
        }
        res
    }
}

/// Runs one seed; returns the steps taken and the ops compacted.
fn run_seed(seed: u64) -> Result<(u64, u64), String> {
    let mut sim = Sim::new(seed);
    sim.compaction &= sim.on("compact");
    for _ in 0..STEPS {
        sim.step()?;
    }
    sim.quiesce()?;
    if sim.compaction {
        // Past the lag, every report goes everywhere and the devices compact all they
        // can; then more changes, and the devices must converge again.
        sim.clock.fetch_add(2 * LAG_MS, Ordering::Relaxed);
        for _ in 0..2 {
            for a in 0..=BYZ {
                let reports = sim.reports_of(a)?;
                for b in 0..=BYZ {
                    if a != b {
                        sim.send(a, b, Payload::Reports(reports.clone()), None);
                    }
                }
            }
            sim.deliver(true)?;
        }
        for d in 1..HONEST {
            sim.compact(d)?;
        }
        sim.quiesce()?;
        for _ in 0..STEPS / 4 {
            sim.step()?;
        }
        sim.quiesce()?;
    }
    Ok((sim.steps, sim.compacted))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn sim_seeds() {
    let seeds: Vec<u64> = match env_u64("PVFS_SIM_SEED") {
        Some(s) => vec![s],
        None => (0..env_u64("PVFS_SIM_SEEDS").unwrap_or(1000)).collect(),
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = std::time::Instant::now();
    let failures = Mutex::new(Vec::new());
    let steps = AtomicU64::new(0);
    let compacted = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (seeds, failures, steps, compacted) = (&seeds, &failures, &steps, &compacted);
            scope.spawn(move || {
                for &seed in seeds.iter().skip(t).step_by(threads) {
                    match std::panic::catch_unwind(|| run_seed(seed)) {
                        Ok(Ok((n, c))) => {
                            steps.fetch_add(n, Ordering::Relaxed);
                            compacted.fetch_add(c, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => failures.lock().push((seed, e)),
                        Err(p) => {
                            let msg = p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            failures.lock().push((seed, format!("panic: {msg}")));
                        }
                    }
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let steps = steps.load(Ordering::Relaxed);
    let compacted = compacted.load(Ordering::Relaxed);
    eprintln!(
        "{} seeds, {steps} steps in {secs:.1} s: {:.0} steps/s; {compacted} ops compacted",
        seeds.len(),
        steps as f64 / secs
    );
    let mut failures = failures.into_inner();
    failures.sort();
    for (seed, e) in &failures {
        eprintln!(
            "seed {seed} failed: {e}\n  replay: PVFS_SIM_SEED={seed} PVFS_SIM_TRACE=1 \
             cargo nextest run --release --workspace -E 'test(sim_seeds)' --no-capture"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed (first: seed {})",
        failures.len(),
        seeds.len(),
        failures[0].0
    );
}

/// Two devices that are members of each other's namespace, on the in-memory backend.
fn two_devices() -> (Store, Store) {
    let keys: Vec<Arc<DeviceKey>> = (0..2)
        .map(|i| Arc::new(DeviceKey::from_seed([i + 40; 32])))
        .collect();
    let mut stores = keys.iter().map(|k| {
        let s = Store::in_memory_in(k.clone(), RootOwner { uid: 0, gid: 0 }, NAMESPACE).unwrap();
        s.commit(true, |tx| {
            for (i, m) in keys.iter().enumerate() {
                tx.set_member(m.device(), &format!("dev{i}"), true)?;
            }
            Ok(())
        })
        .unwrap();
        s
    });
    (stores.next().unwrap(), stores.next().unwrap())
}

fn new_file(s: &Store, name: &[u8]) -> pvfs_store::Ino {
    use pvfs_store::{FileKind, NewNode, ROOT_INO};
    s.commit(false, |tx| {
        let new = NewNode {
            kind: FileKind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: None,
        };
        tx.create(ROOT_INO, name, new).map(|(ino, _)| ino)
    })
    .unwrap()
}

/// Writes `data` at the start of file `ino`, or after its end (`append`).
fn write(s: &Store, ino: pvfs_store::Ino, data: &[u8], append: bool) {
    use pvfs_store::{NewExtent, PreparedChunk};
    s.commit(false, |tx| {
        let size = tx.node_req(ino)?.size;
        let start = if append { size } else { 0 };
        let end = start + data.len() as u64;
        let chunk = PreparedChunk::new(bytes::Bytes::copy_from_slice(data), true);
        let new = [NewExtent {
            offset: start,
            chunk,
        }];
        tx.replace_extents(ino, (start, end.max(size)), &new, end, Timestamp::now())
            .map(|_| ())
    })
    .unwrap()
}

fn unlink(s: &Store, name: &[u8]) {
    s.commit(false, |tx| {
        tx.unlink(pvfs_store::ROOT_INO, name, &|_| false)
            .map(|_| ())
    })
    .unwrap();
}

fn sync_both_ways(a: &Store, b: &Store) {
    for _ in 0..3 {
        sync(a, b, usize::MAX);
        sync(b, a, usize::MAX);
    }
}

/// Found by the simulation (seed 401): a device restored from a backup edits a file that its
/// earlier self, after the backup, replaced by a rename; when that rename comes back from a
/// peer, the edit it never saw survives as a conflict copy.
#[test]
fn restored_edit_of_a_file_replaced_after_the_backup_survives() {
    use pvfs_store::{RenameFlags, ROOT_INO};
    let (a, b) = two_devices();
    let n = new_file(&a, b"a");
    write(&a, n, b"first", false);
    new_file(&a, b"c");
    sync(&a, &b, usize::MAX);
    let backup = a.restored_copy().unwrap().unwrap();
    a.commit(false, |tx| {
        tx.rename(
            ROOT_INO,
            b"c",
            ROOT_INO,
            b"a",
            RenameFlags::default(),
            &|_| false,
        )
    })
    .unwrap();
    sync(&a, &b, usize::MAX);
    let a = backup;
    write(&a, n, b" and more", true);
    sync_both_ways(&a, &b);
    check_converged(&[&a, &b], &|_| true).unwrap();
}

/// Two devices sharing file `a`; then A is backed up and edits the file again. Returns A,
/// A's backup (restored: a new incarnation without the edit), B, and the file's ino on A.
fn an_edit_after_a_backup() -> (Store, Store, Store, pvfs_store::Ino) {
    let (a, b) = two_devices();
    let n = new_file(&a, b"a");
    write(&a, n, b"first", false);
    sync(&a, &b, usize::MAX);
    let backup = a.restored_copy().unwrap().unwrap();
    write(&a, n, b" and more", true);
    (a, backup, b, n)
}

/// Found by the simulation (seed 757): a device restored from a backup deletes a file that
/// its earlier self edited after the backup; when that edit comes back from a peer, it
/// survives as a conflict copy.
#[test]
fn edit_lost_by_a_restore_survives_the_restored_device_deleting_it() {
    let (a, backup, b, _) = an_edit_after_a_backup();
    sync(&a, &b, usize::MAX);
    let a = backup;
    unlink(&a, b"a");
    sync_both_ways(&a, &b);
    check_converged(&[&a, &b], &|_| true).unwrap();
}

/// The shape of seed 757: a device restored from a backup deletes a file whose edit its
/// earlier self made after the backup, while another device, which never saw that edit,
/// edits and deletes it too.
#[test]
fn edit_lost_by_a_restore_survives_deletes_on_both_devices() {
    use pvfs_store::ROOT_INO;
    let (a, backup, b, _) = an_edit_after_a_backup();
    // B edits and deletes the file without having seen A's second edit.
    let bn = b.lookup(ROOT_INO, b"a").unwrap().unwrap().ino;
    write(&b, bn, b"b's", true);
    unlink(&b, b"a");
    // A's second edit reaches B only now.
    sync(&a, &b, usize::MAX);
    let a = backup;
    unlink(&a, b"a");
    sync_both_ways(&a, &b);
    check_converged(&[&a, &b], &|_| true).unwrap();
}

/// Compacts both devices as far as their reports allow (no lag: these stores share the
/// machine's clock).
fn compact_both(a: &Store, b: &Store) {
    let (ra, rb) = (a.report().unwrap(), b.report().unwrap());
    for (s, other) in [(a, &rb), (b, &ra)] {
        let cp = s
            .plan_checkpoint(std::slice::from_ref(other), 0)
            .unwrap()
            .expect("both hold everything");
        s.compact(&cp).unwrap();
    }
}

#[test]
fn compaction_bounds_the_logs_by_the_live_tree_and_later_edits_still_apply() {
    let (a, b) = two_devices();
    let files: Vec<pvfs_store::Ino> = (0..40)
        .map(|i| new_file(&a, format!("f{i}").as_bytes()))
        .collect();
    for round in 0..50u32 {
        for (i, &ino) in files.iter().enumerate() {
            let data = content((round as u8).wrapping_mul(7).wrapping_add(i as u8), 1500);
            write(&a, ino, &data, round % 3 == 0);
        }
    }
    sync_both_ways(&a, &b);
    // A fresh namespace holding the same final tree: one create and one write per file.
    let (fresh, _) = two_devices();
    for (i, &ino) in files.iter().enumerate() {
        let n = a.node(ino).unwrap().unwrap();
        let f = new_file(&fresh, format!("f{i}").as_bytes());
        let (ext, _) = a.version_content(n.id, n.version.unwrap()).unwrap();
        let data: Vec<u8> = ext
            .iter()
            .flat_map(|(_, c, l)| a.chunk(c, *l).unwrap().to_vec())
            .collect();
        write(&fresh, f, &data, false);
    }
    let total = |l: pvfs_store::LogBytes| l.op_log + l.move_log + l.kept;
    let before = total(a.log_bytes().unwrap());
    let bound = total(fresh.log_bytes().unwrap());
    compact_both(&a, &b);
    let after = a.log_bytes().unwrap();
    eprintln!(
        "logs: {before} bytes before compaction, {after:?} after; a fresh namespace: {bound}"
    );
    assert!(before > 10 * bound, "the workload makes long logs");
    assert!(
        total(after) <= bound,
        "after compaction the logs ({after:?}) are no larger than a fresh namespace's ({bound})"
    );
    // Edits after the checkpoint, on both sides and concurrent, still apply: their bases are
    // versions the checkpoint kept whole.
    write(&a, files[0], b"after the checkpoint", true);
    let on_b = b.lookup(pvfs_store::ROOT_INO, b"f1").unwrap().unwrap().ino;
    write(&b, on_b, b"edited on b", false);
    let on_a = files[1];
    write(&a, on_a, b"edited on a at the same time", false);
    unlink(&b, b"f2");
    sync_both_ways(&a, &b);
    sync_both_ways(&a, &b);
    check_same(&[&a, &b]).unwrap();
    // A device that lacks compacted ops is told so (it needs a snapshot).
    let err = a.ops_after(&Default::default(), 10).unwrap_err();
    assert!(matches!(err, StoreError::Compacted(_)), "{err}");
    // A second compaction later drops what the first kept and no longer needs.
    compact_both(&a, &b);
    check_same(&[&a, &b]).unwrap();
}
