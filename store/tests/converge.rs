//! Convergence of replicas: random concurrent changes on 3-5 devices, delivered in random
//! order, partial batches and with partitions, always end in identical trees with no cycles
//! and no lost file version.

use std::sync::Arc;

use proptest::prelude::*;
use pvfs_store::{DeviceKey, RootOwner, Store};

mod common;
use common::*;

#[derive(Clone, Debug)]
enum Step {
    Do(usize, Act),
    /// Deliver at most `max` of the ops `to` lacks from `from`.
    Sync {
        from: usize,
        to: usize,
        max: usize,
    },
    /// Cut a replica off (or reconnect it).
    Cut(usize, bool),
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        3 => (any::<usize>(), 0..NAMES.len(), any::<bool>())
            .prop_map(|(dir, name, is_dir)| Act::Create { dir, name, is_dir }),
        3 => (any::<usize>(), any::<u8>(), 1..3000u16)
            .prop_map(|(file, seed, len)| Act::Write { file, seed, len }),
        1 => (any::<usize>(), any::<u8>(), 1..3000u16)
            .prop_map(|(file, seed, len)| Act::Append { file, seed, len }),
        2 => (any::<usize>(), any::<usize>(), 0..NAMES.len())
            .prop_map(|(src, dir, name)| Act::Rename { src, dir, name }),
        2 => any::<usize>().prop_map(|node| Act::Remove { node }),
        1 => (any::<usize>(), any::<usize>(), 0..NAMES.len())
            .prop_map(|(file, dir, name)| Act::Link { file, dir, name }),
        2 => (any::<usize>(), any::<u16>(), any::<u16>())
            .prop_map(|(node, perm, secs)| Act::SetAttr { node, perm, secs }),
        2 => (any::<usize>(), 0..XATTRS.len(), prop::option::of(any::<u8>()))
            .prop_map(|(node, name, value)| Act::Xattr { node, name, value }),
    ]
}

fn step(n: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..n, act()).prop_map(|(r, a)| Step::Do(r, a)),
        4 => (0..n, 0..n, 1..40usize).prop_map(|(from, to, max)| Step::Sync { from, to, max }),
        1 => (0..n, any::<bool>()).prop_map(|(r, cut)| Step::Cut(r, cut)),
    ]
}

fn check(n: usize, steps: &[Step]) -> Result<(), TestCaseError> {
    let keys: Vec<Arc<DeviceKey>> = (0..n)
        .map(|i| Arc::new(DeviceKey::from_seed([i as u8 + 1; 32])))
        .collect();
    let stores: Vec<Store> = keys
        .iter()
        .map(|k| {
            let s = Store::in_memory_in(k.clone(), RootOwner { uid: 0, gid: 0 }, [7; 16]).unwrap();
            s.commit(false, |tx| {
                for (i, m) in keys.iter().enumerate() {
                    tx.set_member(m.device(), &format!("dev{i}"), true)?;
                }
                Ok(())
            })
            .unwrap();
            s
        })
        .collect();
    let mut cut = vec![false; n];
    let trace = std::env::var_os("CONVERGE_TRACE").is_some();
    for s in steps {
        if trace {
            eprintln!("step {s:?}");
        }
        match s {
            Step::Do(r, a) => {
                run(&stores[*r], a);
                if trace {
                    eprintln!("  replica {r} now:\n{}", show(&dump(&stores[*r])));
                }
            }
            Step::Sync { from, to, max } => {
                if from != to && !cut[*from] && !cut[*to] {
                    if trace {
                        let ops = stores[*from]
                            .ops_after(&stores[*to].version_vector(), *max)
                            .unwrap();
                        for o in &ops {
                            eprintln!(
                                "    deliver {}#{} hlc {} {:?}",
                                o.id.device.0[0],
                                o.id.seq,
                                o.hlc.0 & 0xffffff,
                                o.kind
                            );
                        }
                    }
                    let n = sync(&stores[*from], &stores[*to], *max);
                    if trace {
                        eprintln!(
                            "  {n} ops; replica {to} now:\n{}",
                            show(&dump(&stores[*to]))
                        );
                    }
                }
            }
            Step::Cut(r, c) => cut[*r] = *c,
        }
    }
    // Heal every partition and deliver everything, until nothing new arrives (conflict
    // copies are new ops too).
    for round in 0.. {
        prop_assert!(round < 20, "no quiescence after 20 rounds");
        let mut moved = 0;
        for a in 0..n {
            for b in 0..n {
                if a != b {
                    moved += sync(&stores[a], &stores[b], usize::MAX);
                }
            }
        }
        if moved == 0 {
            break;
        }
    }
    if trace {
        for o in all_ops(&stores[0]) {
            eprintln!(
                "  final op {}#{} hlc {} {:?}",
                o.id.device.0[0],
                o.id.seq,
                o.hlc.0 & 0xffffff,
                o.kind
            );
        }
    }
    let refs: Vec<&Store> = stores.iter().collect();
    check_converged(&refs, &|_| true).map_err(TestCaseError::fail)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge(n in 3..=5usize, steps in prop::collection::vec(step(5), 1..120)) {
        let steps: Vec<Step> = steps
            .into_iter()
            .map(|s| match s {
                Step::Do(r, a) => Step::Do(r % n, a),
                Step::Sync { from, to, max } => Step::Sync { from: from % n, to: to % n, max },
                Step::Cut(r, c) => Step::Cut(r % n, c),
            })
            .collect();
        check(n, &steps)?;
    }
}
