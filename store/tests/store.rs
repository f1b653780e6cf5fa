//! Store behaviour, checked against both backends (RocksDB and in-memory).

use std::sync::Arc;

use bytes::Bytes;
use pvfs_store::{
    Applied, DeviceId, DeviceKey, FileKind, NewExtent, NewNode, OpKind, PreparedChunk, RenameFlags,
    RootOwner, SetAttrs, SetTime, Store, StoreError, StoreOptions, Timestamp, XattrMode, ROOT_INO,
};

const OWNER: RootOwner = RootOwner { uid: 0, gid: 0 };

/// The key of the device under test.
fn key() -> Arc<DeviceKey> {
    Arc::new(DeviceKey::from_seed([1; 32]))
}

/// The device under test.
fn dev() -> DeviceId {
    key().device()
}

/// Applies to `to` every op of `from` that it lacks, with the keys of their authors.
fn pull(to: &Store, from: &Store) -> Applied {
    let ops = from.ops_after(&to.version_vector(), usize::MAX).unwrap();
    let keys = from.device_keys(ops.iter().map(|o| o.id.device)).unwrap();
    to.apply_remote(&ops, &keys, &|_| false).unwrap()
}

/// Runs `check` against a RocksDB store and an in-memory store.
fn both(check: impl Fn(&Store)) {
    let mem = Store::in_memory(key(), OWNER).unwrap();
    check(&mem);
    assert!(
        mem.fsck().unwrap().is_clean(),
        "mem fsck: {:?}",
        mem.fsck().unwrap().problems
    );
    let dir = tempfile::tempdir().unwrap();
    let rocks = Store::create(dir.path(), &StoreOptions::default(), key(), OWNER).unwrap();
    check(&rocks);
    let report = rocks.fsck().unwrap();
    assert!(report.is_clean(), "rocks fsck: {:?}", report.problems);
}

fn file(kind: FileKind) -> NewNode {
    NewNode {
        kind,
        perm: 0o644,
        uid: 1,
        gid: 2,
        rdev: 0,
        target: None,
    }
}

fn mk(s: &Store, parent: u64, name: &str, kind: FileKind) -> u64 {
    s.commit(false, |tx| tx.create(parent, name.as_bytes(), file(kind)))
        .unwrap()
        .0
}

fn err<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
    format!("{:?}", r.unwrap_err())
}

fn chunk(data: &[u8]) -> PreparedChunk {
    PreparedChunk::new(Bytes::copy_from_slice(data), true)
}

fn read(s: &Store, ino: u64) -> Vec<u8> {
    let size = s.node(ino).unwrap().unwrap().size as usize;
    let mut out = vec![0u8; size];
    for (off, e) in s.extents(ino, 0, size as u64).unwrap() {
        let data = s.chunk(&e.chunk, e.len).unwrap();
        out[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    out
}

#[test]
fn names_are_validated() {
    both(|s| {
        for bad in ["", ".", "..", "a/b", "nul\0"] {
            let e = err(s.commit(false, |tx| {
                tx.create(ROOT_INO, bad.as_bytes(), file(FileKind::File))
            }));
            assert!(e.contains("InvalidName"), "{bad:?}: {e}");
        }
        let long = "x".repeat(256);
        assert!(err(s.commit(false, |tx| tx.create(
            ROOT_INO,
            long.as_bytes(),
            file(FileKind::File)
        )))
        .contains("NameTooLong"));
        mk(s, ROOT_INO, &"y".repeat(255), FileKind::File);
    });
}

#[test]
fn tree_operations_follow_posix() {
    both(|s| {
        let a = mk(s, ROOT_INO, "a", FileKind::Dir);
        let b = mk(s, a, "b", FileKind::Dir);
        let f = mk(s, b, "f", FileKind::File);
        assert!(
            err(s.commit(false, |tx| tx.create(b, b"f", file(FileKind::File))))
                .contains("AlreadyExists")
        );
        assert_eq!(s.node(a).unwrap().unwrap().nlink, 3);
        // A directory cannot move below itself.
        let e = err(s.commit(false, |tx| {
            tx.rename(ROOT_INO, b"a", b, b"x", RenameFlags::default(), &|_| false)
        }));
        assert!(e.contains("Invalid"), "{e}");
        assert!(err(s.commit(false, |tx| tx.rmdir(ROOT_INO, b"a"))).contains("NotEmpty"));
        assert!(err(s.commit(false, |tx| tx.unlink(a, b"b", &|_| false))).contains("IsADirectory"));
        // Hard link, then rename one name over the other: nothing happens.
        s.commit(false, |tx| tx.link(f, a, b"g")).unwrap();
        s.commit(false, |tx| {
            tx.rename(a, b"g", b, b"f", RenameFlags::default(), &|_| false)
        })
        .unwrap();
        assert_eq!(s.node(f).unwrap().unwrap().nlink, 2);
        // Exchange a directory and a file in different parents.
        s.commit(false, |tx| {
            tx.rename(
                ROOT_INO,
                b"a",
                b,
                b"f",
                RenameFlags {
                    exchange: true,
                    ..Default::default()
                },
                &|_| false,
            )
        })
        .unwrap_err();
        let c = mk(s, ROOT_INO, "c", FileKind::Dir);
        s.commit(false, |tx| {
            tx.rename(
                ROOT_INO,
                b"c",
                b,
                b"f",
                RenameFlags {
                    exchange: true,
                    ..Default::default()
                },
                &|_| false,
            )
        })
        .unwrap();
        assert_eq!(s.lookup(ROOT_INO, b"c").unwrap().unwrap().ino, f);
        assert_eq!(s.lookup(b, b"f").unwrap().unwrap().ino, c);
        assert_eq!(s.node(c).unwrap().unwrap().parent, b);
        assert_eq!(s.node(b).unwrap().unwrap().nlink, 3);
        // NOREPLACE.
        let e = err(s.commit(false, |tx| {
            tx.rename(
                ROOT_INO,
                b"c",
                a,
                b"g",
                RenameFlags {
                    noreplace: true,
                    ..Default::default()
                },
                &|_| false,
            )
        }));
        assert!(e.contains("AlreadyExists"), "{e}");
        // Both names are the same node: rename does nothing.
        s.commit(false, |tx| {
            tx.rename(ROOT_INO, b"c", a, b"g", RenameFlags::default(), &|_| false)
        })
        .unwrap();
        assert_eq!(s.node(f).unwrap().unwrap().nlink, 2);
        assert!(s.lookup(ROOT_INO, b"c").unwrap().is_some());
        // Replace another file: it goes with its only name.
        let h = mk(s, ROOT_INO, "h", FileKind::File);
        s.commit(false, |tx| {
            tx.rename(
                ROOT_INO,
                b"c",
                ROOT_INO,
                b"h",
                RenameFlags::default(),
                &|_| false,
            )
        })
        .unwrap();
        assert!(s.node(h).unwrap().is_none());
        s.commit(false, |tx| tx.unlink(a, b"g", &|_| false))
            .unwrap();
        assert_eq!(s.node(f).unwrap().unwrap().nlink, 1);
        s.commit(false, |tx| tx.unlink(ROOT_INO, b"h", &|_| false))
            .unwrap();
        assert!(s.node(f).unwrap().is_none());
        s.commit(false, |tx| tx.rmdir(b, b"f")).unwrap();
        s.commit(false, |tx| tx.rmdir(a, b"b")).unwrap();
        s.commit(false, |tx| tx.rmdir(ROOT_INO, b"a")).unwrap();
        assert_eq!(s.node(ROOT_INO).unwrap().unwrap().nlink, 2);
    });
}

#[test]
fn content_edits_keep_references_right() {
    both(|s| {
        let f = mk(s, ROOT_INO, "f", FileKind::File);
        let a = vec![b'a'; 40_000];
        let b: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let now = Timestamp::now();
        let exts = [
            NewExtent {
                offset: 0,
                chunk: chunk(&a),
            },
            NewExtent {
                offset: 40_000,
                chunk: chunk(&b),
            },
        ];
        s.commit(false, |tx| {
            tx.replace_extents(f, (0, 90_000), &exts, 90_000, now)
        })
        .unwrap();
        let mut want = a.clone();
        want.extend_from_slice(&b);
        assert_eq!(read(s, f), want);
        // An edit must not start inside an extent.
        let e = err(s.commit(false, |tx| {
            tx.replace_extents(f, (10, 40_000), &[], 90_000, now)
        }));
        assert!(e.contains("Invalid"), "{e}");
        // Truncate into the middle of the second chunk, then grow with a hole.
        s.commit(false, |tx| tx.truncate(f, 60_000)).unwrap();
        s.commit(false, |tx| tx.truncate(f, 70_000)).unwrap();
        want.truncate(60_000);
        want.resize(70_000, 0);
        assert_eq!(read(s, f), want);
        // Punch a hole across the chunk boundary.
        s.commit(false, |tx| tx.punch_hole(f, 30_000, 45_000))
            .unwrap();
        want[30_000..45_000].fill(0);
        assert_eq!(read(s, f), want);
        // Share the range into a second file, overlapping an existing extent there.
        let g = mk(s, ROOT_INO, "g", FileKind::File);
        s.commit(false, |tx| {
            tx.replace_extents(
                g,
                (0, 5),
                &[NewExtent {
                    offset: 0,
                    chunk: chunk(b"hello"),
                }],
                5,
                now,
            )
        })
        .unwrap();
        let n = s
            .commit(false, |tx| tx.copy_range(f, 0, g, 3, 1 << 20))
            .unwrap();
        assert_eq!(n, 70_000);
        let mut gwant = b"hel".to_vec();
        gwant.extend_from_slice(&want);
        assert_eq!(read(s, g), gwant);
        // Copy within one file, overlapping ranges.
        s.commit(false, |tx| tx.copy_range(f, 0, f, 1000, 20_000))
            .unwrap();
        let mut w2 = want.clone();
        w2[1000..21_000].copy_from_slice(&want[..20_000]);
        assert_eq!(read(s, f), w2);
        // Deleting both files frees every chunk.
        s.commit(false, |tx| tx.unlink(ROOT_INO, b"f", &|_| false))
            .unwrap();
        s.commit(false, |tx| tx.unlink(ROOT_INO, b"g", &|_| false))
            .unwrap();
        let st = s.stats();
        assert_eq!(
            (
                st.chunks,
                st.chunk_bytes,
                st.stored_bytes,
                st.referenced_bytes
            ),
            (0, 0, 0, 0)
        );
    });
}

#[test]
fn open_unlinked_files_become_orphans() {
    both(|s| {
        let f = mk(s, ROOT_INO, "f", FileKind::File);
        let now = Timestamp::now();
        s.commit(false, |tx| {
            tx.replace_extents(
                f,
                (0, 3),
                &[NewExtent {
                    offset: 0,
                    chunk: chunk(b"abc"),
                }],
                3,
                now,
            )
        })
        .unwrap();
        s.commit(false, |tx| tx.unlink(ROOT_INO, b"f", &|ino| ino == f))
            .unwrap();
        assert_eq!(s.orphans().unwrap(), vec![f]);
        assert_eq!(read(s, f), b"abc");
        assert!(s.commit(false, |tx| tx.release_orphan(f)).unwrap());
        assert!(s.orphans().unwrap().is_empty());
        assert!(s.node(f).unwrap().is_none());
    });
}

#[test]
fn attributes_and_xattrs() {
    both(|s| {
        let f = mk(s, ROOT_INO, "f", FileKind::File);
        let t = Timestamp { sec: -100, nsec: 5 };
        let n = s
            .commit(false, |tx| {
                tx.setattr(
                    f,
                    &SetAttrs {
                        perm: Some(0o4755),
                        uid: Some(9),
                        mtime: Some(SetTime::At(t)),
                        ..Default::default()
                    },
                )
            })
            .unwrap();
        assert_eq!((n.perm, n.uid, n.gid, n.mtime), (0o4755, 9, 2, t));
        s.commit(false, |tx| {
            tx.set_xattr(f, b"user.a", b"1", XattrMode::Create)
        })
        .unwrap();
        assert!(err(s.commit(false, |tx| tx.set_xattr(
            f,
            b"user.a",
            b"2",
            XattrMode::Create
        )))
        .contains("AlreadyExists"));
        assert!(err(s.commit(false, |tx| tx.set_xattr(
            f,
            b"user.b",
            b"2",
            XattrMode::Replace
        )))
        .contains("NoAttribute"));
        assert_eq!(s.xattr(f, b"user.a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.xattr_names(f).unwrap(), vec![b"user.a".to_vec()]);
        s.commit(false, |tx| tx.remove_xattr(f, b"user.a")).unwrap();
        assert!(s.xattr(f, b"user.a").unwrap().is_none());
        assert!(err(s.commit(false, |tx| tx.set_xattr(
            f,
            b"user.big",
            &vec![0; 70_000],
            XattrMode::Any
        )))
        .contains("TooLarge"));
    });
}

#[test]
fn every_change_is_an_op_in_a_gap_free_sequence() {
    both(|s| {
        let d = mk(s, ROOT_INO, "d", FileKind::Dir);
        mk(s, d, "f", FileKind::File);
        s.commit(false, |tx| {
            tx.rename(d, b"f", ROOT_INO, b"g", RenameFlags::default(), &|_| false)
        })
        .unwrap();
        // A failed transaction records nothing.
        let _ = s.commit(false, |tx| tx.rmdir(ROOT_INO, b"nope"));
        let ops = s.ops(s.writer(), 1, 100).unwrap();
        assert_eq!(
            ops.iter().map(|o| o.id.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(ops.windows(2).all(|w| w[0].hlc < w[1].hlc));
        assert!(matches!(ops[2].kind, OpKind::Rename { .. }));
        assert_eq!(s.ops(s.writer(), 3, 100).unwrap().len(), 1);
    });
}

#[test]
fn rocksdb_store_persists_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ino = {
        let s = Store::create(dir.path(), &StoreOptions::default(), key(), OWNER).unwrap();
        let f = mk(&s, ROOT_INO, "f", FileKind::File);
        let now = Timestamp::now();
        s.commit(true, |tx| {
            tx.replace_extents(
                f,
                (0, 4),
                &[NewExtent {
                    offset: 0,
                    chunk: chunk(b"data"),
                }],
                4,
                now,
            )
        })
        .unwrap();
        f
    };
    let s = Store::open(dir.path(), &StoreOptions::default(), Some(key())).unwrap();
    assert_eq!(read(&s, ino), b"data");
    assert_eq!(s.device(), dev());
    assert_eq!(s.stats().files, 1);
    // A second opener is refused with a clear error.
    let e = Store::open(dir.path(), &StoreOptions::default(), Some(key()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("in use"), "{e}");
    assert!(s.fsck().unwrap().is_clean());
}

/// Writes `data` as file `name` of `s` in one chunk; `elsewhere`: another device stored it.
fn write_one(s: &Store, name: &str, data: &[u8], elsewhere: bool) -> u64 {
    let f = mk(s, ROOT_INO, name, FileKind::File);
    let mut c = chunk(data);
    c.elsewhere = elsewhere;
    let len = data.len() as u64;
    s.commit(false, |tx| {
        tx.replace_extents(
            f,
            (0, len),
            &[NewExtent {
                offset: 0,
                chunk: c.clone(),
            }],
            len,
            Timestamp::now(),
        )
    })
    .unwrap();
    f
}

#[test]
fn pushed_chunks_are_kept_until_the_op_that_references_them() {
    // Incompressible, so that a whole chunk skips the WAL.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let big: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    both(|a| {
        let kb = Arc::new(DeviceKey::from_seed([2; 32]));
        let bdev = kb.device();
        let b = Store::in_memory_in(kb, OWNER, a.namespace()).unwrap();
        a.commit(false, |tx| tx.set_member(bdev, "b", true))
            .unwrap();
        for data in [&b"small, through the WAL"[..], &big[..262_144]] {
            // A holds the data already, in a file it deletes before B's op comes.
            let mine = write_one(a, "mine", data, false);
            let c = chunk(data);
            let pushed = (c.id, c.encoded.clone().unwrap(), data.len() as u32);
            a.keep_pushed(bdev, vec![pushed]).unwrap();
            a.commit(false, |tx| tx.unlink(ROOT_INO, b"mine", &|_| false))
                .unwrap();
            assert!(a.node(mine).unwrap().is_none());
            // B, online-only, references it as absent: it holds nothing.
            let theirs = write_one(&b, "theirs", data, true);
            assert!(!b.has_chunk(&c.id).unwrap());
            assert_eq!(b.stats().stored_bytes, 0);
            // A serves it before B's op comes, and holds it once it has.
            assert!(a.stored_chunk(&c.id).unwrap().is_some());
            pull(a, &b);
            assert!(a.has_chunk(&c.id).unwrap());
            let on_a = a.lookup(ROOT_INO, b"theirs").unwrap().unwrap().ino;
            assert_eq!(read(a, on_a), data);
            // Deleted on B: gone on A too, data included.
            b.commit(false, |tx| tx.unlink(ROOT_INO, b"theirs", &|_| false))
                .unwrap();
            assert!(b.node(theirs).unwrap().is_none());
            pull(a, &b);
            assert!(a.stored_chunk(&c.id).unwrap().is_none());
        }
        // A chunk whose op has not come is served, and survives until it does.
        let c = chunk(&big[262_144..]);
        let pushed = (c.id, c.encoded.clone().unwrap(), c.plain.len() as u32);
        a.keep_pushed(bdev, vec![pushed]).unwrap();
        assert_eq!(a.stored_chunk(&c.id).unwrap().unwrap().1, 300_000 - 262_144);
        assert!(a.stored_chunk(&c.id).unwrap().is_some());
        write_one(&b, "later", &big[262_144..], true);
        pull(a, &b);
        let on_a = a.lookup(ROOT_INO, b"later").unwrap().unwrap().ino;
        assert_eq!(read(a, on_a), &big[262_144..]);
    });
}

#[test]
fn pushed_chunks_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = chunk(b"pushed before a restart");
    {
        let s = Store::create(dir.path(), &StoreOptions::default(), key(), OWNER).unwrap();
        let pushed = (c.id, c.encoded.clone().unwrap(), c.plain.len() as u32);
        s.keep_pushed(DeviceId([2; 16]), vec![pushed]).unwrap();
    }
    let s = Store::open(dir.path(), &StoreOptions::default(), Some(key())).unwrap();
    let (data, len) = s.stored_chunk(&c.id).unwrap().unwrap();
    assert_eq!(len as usize, c.plain.len());
    assert_eq!(data, c.encoded.unwrap());
    assert!(s.fsck().unwrap().is_clean());
}

#[test]
fn evicted_chunks_stay_referenced_and_orphans_keep_theirs() {
    both(|s| {
        let kept = write_one(s, "open", b"content of a file open without a name", false);
        write_one(s, "gone", b"content another device holds now", false);
        s.commit(false, |tx| tx.unlink(ROOT_INO, b"open", &|ino| ino == kept))
            .unwrap();
        let all: Vec<_> = s.evictable(u64::MAX).unwrap();
        assert_eq!(all.len(), 1, "the orphan's chunk is not offered");
        let before = s.stats().stored_bytes;
        let ids: Vec<_> = all.iter().map(|c| c.0).collect();
        assert_eq!(s.evict(&ids).unwrap(), all[0].1.len() as u64);
        assert_eq!(s.stats().stored_bytes, before - all[0].1.len() as u64);
        assert!(!s.is_stored(&ids[0]).unwrap());
        assert_eq!(s.chunk_len(&ids[0]).unwrap(), Some(32));
        assert_eq!(read(s, kept), b"content of a file open without a name");
        s.commit(false, |tx| tx.release_orphan(kept)).unwrap();
    });
}

/// The logs' size grows with the ops recorded, on both backends (`pvfs-admin stats`).
#[test]
fn log_bytes_grow_with_ops() {
    both(|s| {
        let before = s.log_bytes().unwrap();
        for i in 0..200 {
            mk(s, ROOT_INO, &format!("f{i}"), FileKind::File);
        }
        let after = s.log_bytes().unwrap();
        assert!(
            after.op_log > before.op_log + 200 * 32,
            "{before:?} -> {after:?}"
        );
        assert!(after.move_log > before.move_log, "{before:?} -> {after:?}");
    });
}
