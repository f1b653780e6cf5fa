//! Reference model: random sequences of create/write/truncate/rename/unlink/link/mkdir/rmdir
//! against the filesystem core (over the in-memory store) and against a plain in-memory
//! model of POSIX semantics. Every result (errno or success) and the final tree must agree,
//! and the store must pass fsck.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use pvfs_fs::{Caller, Fs, FsOptions, SetAttrRequest};
use pvfs_store::{FileKind, Ino, RootOwner, Store, ROOT_INO};

const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const ROOT: Caller = Caller { uid: 0, gid: 0 };

#[derive(Clone, Debug)]
enum Op {
    Create {
        dir: usize,
        name: usize,
    },
    Mkdir {
        dir: usize,
        name: usize,
    },
    Write {
        file: usize,
        off: u32,
        len: u32,
        byte: u8,
    },
    Truncate {
        file: usize,
        size: u32,
    },
    Rename {
        from: usize,
        dir: usize,
        name: usize,
    },
    Unlink {
        path: usize,
    },
    Rmdir {
        path: usize,
    },
    Link {
        file: usize,
        dir: usize,
        name: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0..NAMES.len();
    prop_oneof![
        (any::<usize>(), n.clone()).prop_map(|(dir, name)| Op::Create { dir, name }),
        (any::<usize>(), n.clone()).prop_map(|(dir, name)| Op::Mkdir { dir, name }),
        (any::<usize>(), 0..400_000u32, 1..200_000u32, any::<u8>()).prop_map(
            |(file, off, len, byte)| Op::Write {
                file,
                off,
                len,
                byte
            }
        ),
        (any::<usize>(), 0..400_000u32).prop_map(|(file, size)| Op::Truncate { file, size }),
        (any::<usize>(), any::<usize>(), n.clone()).prop_map(|(from, dir, name)| Op::Rename {
            from,
            dir,
            name
        }),
        any::<usize>().prop_map(|path| Op::Unlink { path }),
        any::<usize>().prop_map(|path| Op::Rmdir { path }),
        (any::<usize>(), any::<usize>(), n).prop_map(|(file, dir, name)| Op::Link {
            file,
            dir,
            name
        }),
    ]
}

type Path = Vec<String>;

#[derive(Clone, Debug, PartialEq)]
enum Entry {
    Dir,
    File(u64),
}

/// POSIX as a map from paths to entries, files as byte vectors shared by hard links.
#[derive(Default, Debug)]
struct Model {
    entries: BTreeMap<Path, Entry>,
    files: HashMap<u64, Vec<u8>>,
    next: u64,
}

impl Model {
    fn dirs(&self) -> Vec<Path> {
        let mut v = vec![Vec::new()];
        v.extend(
            self.entries
                .iter()
                .filter(|(_, e)| **e == Entry::Dir)
                .map(|(p, _)| p.clone()),
        );
        v
    }
    fn files(&self) -> Vec<Path> {
        self.entries
            .iter()
            .filter(|(_, e)| matches!(e, Entry::File(_)))
            .map(|(p, _)| p.clone())
            .collect()
    }
    fn paths(&self) -> Vec<Path> {
        self.entries.keys().cloned().collect()
    }
    fn children(&self, dir: &Path) -> Vec<Path> {
        self.entries
            .keys()
            .filter(|p| p.len() == dir.len() + 1 && p.starts_with(dir))
            .cloned()
            .collect()
    }
    fn create(&mut self, p: Path, e: Entry) -> Result<(), i32> {
        if self.entries.contains_key(&p) {
            return Err(libc::EEXIST);
        }
        self.entries.insert(p, e);
        Ok(())
    }
    fn drop_file(&mut self, id: u64) {
        if !self.entries.values().any(|e| *e == Entry::File(id)) {
            self.files.remove(&id);
        }
    }
    fn rename(&mut self, from: &Path, to: Path) -> Result<(), i32> {
        let src = self.entries.get(from).cloned().ok_or(libc::ENOENT)?;
        if *from == to {
            return Ok(());
        }
        if src == Entry::Dir && to.starts_with(from) {
            return Err(libc::EINVAL);
        }
        if let Some(dst) = self.entries.get(&to).cloned() {
            match (&src, &dst) {
                (Entry::Dir, Entry::File(_)) => return Err(libc::ENOTDIR),
                (Entry::File(_), Entry::Dir) => return Err(libc::EISDIR),
                (Entry::Dir, Entry::Dir) if !self.children(&to).is_empty() => {
                    return Err(libc::ENOTEMPTY)
                }
                (Entry::File(a), Entry::File(b)) if a == b => return Ok(()),
                _ => {}
            }
            self.entries.remove(&to);
            if let Entry::File(id) = dst {
                self.drop_file(id);
            }
        }
        let moved: Vec<(Path, Entry)> = self
            .entries
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect();
        for (p, _) in &moved {
            self.entries.remove(p);
        }
        for (p, e) in moved {
            let mut q = to.clone();
            q.extend_from_slice(&p[from.len()..]);
            self.entries.insert(q, e);
        }
        Ok(())
    }
}

struct Real {
    fs: Fs,
}

impl Real {
    fn resolve(&self, p: &Path) -> Result<Ino, i32> {
        let mut ino = ROOT_INO;
        for name in p {
            ino = self
                .fs
                .lookup(ino, name.as_bytes())
                .map_err(|e| e.to_errno())?
                .ino;
        }
        Ok(ino)
    }
    fn parent_and_name<'a>(&self, p: &'a Path) -> Result<(Ino, &'a [u8]), i32> {
        let (name, dir) = p.split_last().expect("not the root");
        Ok((self.resolve(&dir.to_vec())?, name.as_bytes()))
    }
    fn write(&self, p: &Path, off: u64, data: &[u8]) -> Result<(), i32> {
        let ino = self.resolve(p)?;
        let fh = self.fs.open(ino, false).map_err(|e| e.to_errno())?;
        let res = self
            .fs
            .write(fh, off, data, false)
            .map(|_| ())
            .map_err(|e| e.to_errno());
        // Read back through the same handle before the buffer is committed.
        let back = self
            .fs
            .read(fh, off, data.len() as u32)
            .map_err(|e| e.to_errno())?;
        assert_eq!(back, data, "read-your-writes through the buffer");
        self.fs.release(fh).map_err(|e| e.to_errno())?;
        res
    }
    fn read_all(&self, ino: Ino) -> Vec<u8> {
        let fh = self.fs.open(ino, false).expect("open");
        let size = self.fs.getattr(ino).expect("getattr").size;
        let mut out = Vec::new();
        while (out.len() as u64) < size {
            let piece = self.fs.read(fh, out.len() as u64, 1 << 20).expect("read");
            assert!(!piece.is_empty(), "short read at {}", out.len());
            out.extend_from_slice(&piece);
        }
        self.fs.release(fh).expect("release");
        out
    }
}

fn pick<T: Clone>(v: &[T], i: usize) -> Option<T> {
    if v.is_empty() {
        None
    } else {
        Some(v[i % v.len()].clone())
    }
}

fn join(dir: &Path, name: usize) -> Path {
    let mut p = dir.clone();
    p.push(NAMES[name].to_string());
    p
}

fn apply(model: &mut Model, real: &Real, op: &Op) {
    let (want, got): (Result<(), i32>, Result<(), i32>) = match op {
        Op::Create { dir, name } | Op::Mkdir { dir, name } => {
            let p = join(&pick(&model.dirs(), *dir).expect("root"), *name);
            let is_dir = matches!(op, Op::Mkdir { .. });
            let id = model.next;
            let want = model.create(p.clone(), if is_dir { Entry::Dir } else { Entry::File(id) });
            if want.is_ok() && !is_dir {
                model.files.insert(id, Vec::new());
                model.next += 1;
            }
            let (parent, n) = real.parent_and_name(&p).expect("parent exists");
            let got = if is_dir {
                real.fs.mkdir(parent, n, 0o755, 0, ROOT).map(|_| ())
            } else {
                real.fs
                    .create(parent, n, 0o644, 0, ROOT)
                    .and_then(|(_, fh)| real.fs.release(fh))
            };
            (want, got.map_err(|e| e.to_errno()))
        }
        Op::Write {
            file,
            off,
            len,
            byte,
        } => {
            let Some(p) = pick(&model.files(), *file) else {
                return;
            };
            let Some(Entry::File(id)) = model.entries.get(&p).cloned() else {
                unreachable!()
            };
            let data: Vec<u8> = (0..*len)
                .map(|i| byte.wrapping_add((i / 7919) as u8))
                .collect();
            let f = model.files.get_mut(&id).expect("file");
            let end = *off as usize + data.len();
            if f.len() < end {
                f.resize(end, 0);
            }
            f[*off as usize..end].copy_from_slice(&data);
            (Ok(()), real.write(&p, u64::from(*off), &data))
        }
        Op::Truncate { file, size } => {
            let Some(p) = pick(&model.files(), *file) else {
                return;
            };
            let Some(Entry::File(id)) = model.entries.get(&p).cloned() else {
                unreachable!()
            };
            model
                .files
                .get_mut(&id)
                .expect("file")
                .resize(*size as usize, 0);
            let ino = real.resolve(&p).expect("resolve");
            let req = SetAttrRequest {
                size: Some(u64::from(*size)),
                ..Default::default()
            };
            (
                Ok(()),
                real.fs
                    .setattr(ino, &req, ROOT)
                    .map(|_| ())
                    .map_err(|e| e.to_errno()),
            )
        }
        Op::Rename { from, dir, name } => {
            let Some(src) = pick(&model.paths(), *from) else {
                return;
            };
            let dst = join(&pick(&model.dirs(), *dir).expect("root"), *name);
            let (sp, sn) = real.parent_and_name(&src).expect("src parent");
            let (dp, dn) = real.parent_and_name(&dst).expect("dst parent");
            let got = real
                .fs
                .rename(sp, sn, dp, dn, false, false)
                .map_err(|e| e.to_errno());
            (model.rename(&src, dst), got)
        }
        Op::Unlink { path } | Op::Rmdir { path } => {
            let Some(p) = pick(&model.paths(), *path) else {
                return;
            };
            let is_rmdir = matches!(op, Op::Rmdir { .. });
            let want = match (model.entries.get(&p).cloned().expect("entry"), is_rmdir) {
                (Entry::Dir, false) => Err(libc::EISDIR),
                (Entry::File(_), true) => Err(libc::ENOTDIR),
                (Entry::Dir, true) if !model.children(&p).is_empty() => Err(libc::ENOTEMPTY),
                (e, _) => {
                    model.entries.remove(&p);
                    if let Entry::File(id) = e {
                        model.drop_file(id);
                    }
                    Ok(())
                }
            };
            let (parent, n) = real.parent_and_name(&p).expect("parent");
            let got = if is_rmdir {
                real.fs.rmdir(parent, n)
            } else {
                real.fs.unlink(parent, n)
            };
            (want, got.map_err(|e| e.to_errno()))
        }
        Op::Link { file, dir, name } => {
            let Some(src) = pick(&model.files(), *file) else {
                return;
            };
            let dst = join(&pick(&model.dirs(), *dir).expect("root"), *name);
            let e = model.entries.get(&src).cloned().expect("entry");
            let want = model.create(dst.clone(), e);
            let ino = real.resolve(&src).expect("resolve");
            let (dp, dn) = real.parent_and_name(&dst).expect("dst parent");
            (
                want,
                real.fs
                    .link(ino, dp, dn)
                    .map(|_| ())
                    .map_err(|e| e.to_errno()),
            )
        }
    };
    assert_eq!(got, want, "{op:?}");
}

fn compare_trees(model: &Model, real: &Real) {
    let mut seen = Vec::new();
    let mut stack = vec![(Vec::<String>::new(), ROOT_INO)];
    while let Some((path, ino)) = stack.pop() {
        let fh = real.fs.opendir(ino).expect("opendir");
        let (entries, start) = real.fs.readdir(fh, 0).expect("readdir");
        real.fs.releasedir(fh);
        for e in &entries[start..] {
            if e.is_dot() {
                continue;
            }
            let mut p = path.clone();
            p.push(String::from_utf8(e.name.clone()).expect("utf8"));
            match model.entries.get(&p) {
                Some(Entry::Dir) => {
                    assert_eq!(e.kind, FileKind::Dir, "{p:?}");
                    stack.push((p.clone(), e.ino));
                }
                Some(Entry::File(id)) => {
                    assert_eq!(e.kind, FileKind::File, "{p:?}");
                    let got = real.read_all(e.ino);
                    assert!(
                        got == model.files[id],
                        "{p:?}: content differs ({} vs {} bytes)",
                        got.len(),
                        model.files[id].len()
                    );
                    let links = model
                        .entries
                        .values()
                        .filter(|x| **x == Entry::File(*id))
                        .count();
                    assert_eq!(
                        real.fs.getattr(e.ino).expect("attr").nlink as usize,
                        links,
                        "{p:?} nlink"
                    );
                }
                None => panic!("{p:?} exists but the model has no such entry"),
            }
            seen.push(p);
        }
    }
    seen.sort();
    assert_eq!(seen, model.paths());
}

fn small_buffers() -> FsOptions {
    FsOptions {
        commit_threshold: 64 << 10,
        dirty_limit: 256 << 10,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn fs_core_agrees_with_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let key = std::sync::Arc::new(pvfs_store::DeviceKey::from_seed([7; 32]));
        let store = Store::in_memory(key, RootOwner { uid: 0, gid: 0 }).unwrap();
        let real = Real { fs: Fs::new(store.clone(), small_buffers()).unwrap() };
        let mut model = Model::default();
        for op in &ops {
            apply(&mut model, &real, op);
        }
        compare_trees(&model, &real);
        let report = store.fsck().unwrap();
        prop_assert!(report.is_clean(), "fsck: {:?}", report.problems);
    }
}
