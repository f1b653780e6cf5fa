//! Name operations: lookup, create, mknod, mkdir, symlink, link, unlink, rmdir, rename,
//! readlink.
//!
//! Owns: ownership of new nodes (caller's uid; group from a setgid parent or the caller) and
//! the kernel lookup count taken by each operation that returns an entry.
//! Must not: check permissions the kernel already checked (`default_permissions`).

use crate::fs_err;
use pvfs_store::{ChunkId, FileKind, Ino, NewNode, RenameFlags};

use super::{Attr, Caller, Fs};
use crate::error::{Result, StoreResultExt};

impl Fs {
    /// Looks `name` up in `parent` and counts a kernel reference to the result.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        if name.len() > pvfs_store::NAME_MAX {
            return Err(fs_err!(ENAMETOOLONG, "name of {} bytes", name.len()));
        }
        let d = self.store.lookup(parent, name).fs()?.ok_or_else(|| {
            fs_err!(
                ENOENT,
                "{:?} not found in {parent}",
                String::from_utf8_lossy(name)
            )
        })?;
        let a = self.getattr(d.ino)?;
        self.remember(d.ino);
        Ok(a)
    }

    fn new_node(
        &self,
        parent: Ino,
        caller: Caller,
        kind: FileKind,
        mode: u32,
        umask: u32,
    ) -> Result<NewNode> {
        let p = self.node(parent)?;
        let setgid_parent = p.perm & libc::S_ISGID != 0;
        let mut perm = mode & 0o7777 & !umask;
        if kind == FileKind::Dir && setgid_parent {
            perm |= libc::S_ISGID;
        }
        Ok(NewNode {
            kind,
            perm,
            uid: caller.uid,
            gid: if setgid_parent { p.gid } else { caller.gid },
            rdev: 0,
            target: None,
        })
    }

    fn make(&self, parent: Ino, name: &[u8], new: NewNode) -> Result<Attr> {
        let (ino, rec) = self
            .store
            .commit(false, |tx| tx.create(parent, name, new))
            .fs()?;
        self.remember(ino);
        Ok(Attr::from_node(ino, &rec))
    }

    /// `mknod`: regular files, fifos, sockets and device nodes.
    pub fn mknod(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
        caller: Caller,
    ) -> Result<Attr> {
        let kind = FileKind::from_mode(mode)
            .ok_or_else(|| fs_err!(EINVAL, "unknown file type in mode {mode:o}"))?;
        if kind == FileKind::Dir || kind == FileKind::Symlink {
            return Err(fs_err!(EINVAL, "mknod cannot make a {kind:?}"));
        }
        let mut new = self.new_node(parent, caller, kind, mode, umask)?;
        if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) {
            new.rdev = rdev;
        }
        self.make(parent, name, new)
    }

    /// `mkdir`.
    pub fn mkdir(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        caller: Caller,
    ) -> Result<Attr> {
        let new = self.new_node(parent, caller, FileKind::Dir, mode, umask)?;
        self.make(parent, name, new)
    }

    /// `symlink`: `name` in `parent` pointing at `target`.
    pub fn symlink(&self, parent: Ino, name: &[u8], target: &[u8], caller: Caller) -> Result<Attr> {
        if target.len() > pvfs_store::SYMLINK_MAX {
            return Err(fs_err!(
                ENAMETOOLONG,
                "symlink target of {} bytes",
                target.len()
            ));
        }
        let mut new = self.new_node(parent, caller, FileKind::Symlink, 0o777, 0)?;
        new.perm = 0o777;
        new.target = Some(target.to_vec());
        self.make(parent, name, new)
    }

    /// `create`: a new regular file, opened. Returns its attributes and the handle.
    pub fn create(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        caller: Caller,
    ) -> Result<(Attr, u64)> {
        let new = self.new_node(parent, caller, FileKind::File, mode, umask)?;
        let attr = self.make(parent, name, new)?;
        let fh = self.open_new(attr.ino);
        Ok((attr, fh))
    }

    /// `link`: a new name for `ino`.
    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr> {
        if self.node(ino)?.kind == FileKind::Dir {
            return Err(fs_err!(EPERM, "hard links to directories are not allowed"));
        }
        self.store
            .commit(false, |tx| tx.link(ino, parent, name))
            .fs()?;
        let a = self.getattr(ino)?;
        self.remember(ino);
        Ok(a)
    }

    /// `unlink`: removes a non-directory name.
    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.keep_open_victim(parent, name);
        let inodes = &self.inodes;
        self.store
            .commit(false, |tx| {
                tx.unlink(parent, name, &|ino| inodes.is_open(ino))
            })
            .fs()?;
        Ok(())
    }

    /// `rmdir`: removes an empty directory.
    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.store.commit(false, |tx| tx.rmdir(parent, name)).fs()?;
        Ok(())
    }

    /// `rename` with `RENAME_NOREPLACE` and `RENAME_EXCHANGE`.
    pub fn rename(
        &self,
        sp: Ino,
        sn: &[u8],
        dp: Ino,
        dn: &[u8],
        noreplace: bool,
        exchange: bool,
    ) -> Result<()> {
        if noreplace && exchange {
            return Err(fs_err!(
                EINVAL,
                "RENAME_NOREPLACE and RENAME_EXCHANGE together"
            ));
        }
        if !exchange {
            self.keep_open_victim(dp, dn);
        }
        let inodes = &self.inodes;
        let flags = RenameFlags {
            noreplace,
            exchange,
        };
        self.store
            .commit(false, |tx| {
                tx.rename(sp, sn, dp, dn, flags, &|ino| inodes.is_open(ino))
            })
            .fs()
    }

    /// True if removing `name` from `parent` (by unlink or a rename over it) first fetches
    /// content made elsewhere: it is the last name of a file open here. The FUSE layer runs
    /// such a removal where waiting is allowed.
    pub fn removal_fetches(&self, parent: Ino, name: &[u8]) -> bool {
        let Ok(Some(ino)) = self.open_victim(parent, name) else {
            return false;
        };
        // Stops at the first chunk not stored here: one lookup per chunk at most.
        self.store.extents(ino, 0, u64::MAX).is_ok_and(|exts| {
            exts.iter()
                .any(|(_, e)| !self.store.is_stored(&e.chunk).unwrap_or(true))
        })
    }

    /// Before the last name of a file open here goes: its content that is not on this
    /// device's disk is fetched and stored here, so that the open file stays readable after
    /// the devices holding that content delete it (they do once the op reaches them). Where
    /// that cannot be done, the name goes anyway and the log says why.
    fn keep_open_victim(&self, parent: Ino, name: &[u8]) {
        let Ok(Some(ino)) = self.open_victim(parent, name) else {
            return;
        };
        let res = self.not_stored(ino).and_then(|chunks| {
            let missing: Vec<(ChunkId, u32)> = chunks
                .iter()
                .copied()
                .filter(|(id, _)| !self.store.is_readable(id).unwrap_or(false))
                .collect();
            self.remote.fetch_wait(ino, &missing)?;
            self.store.keep_here(&chunks).fs()
        });
        if let Err(e) = res {
            tracing::warn!(
                ino,
                "an open file loses its last name and its content stays on other devices: {e:#}"
            );
        }
    }

    /// The file `parent/name`, if that is its last name and it is open here.
    fn open_victim(&self, parent: Ino, name: &[u8]) -> Result<Option<Ino>> {
        let Some(d) = self.store.lookup(parent, name).fs()? else {
            return Ok(None);
        };
        if !self.inodes.is_open(d.ino) {
            return Ok(None);
        }
        let n = self.node(d.ino)?;
        Ok((n.kind == FileKind::File && n.nlink <= 1).then_some(d.ino))
    }

    /// The chunks of `ino` that are not on this device's disk, each once.
    fn not_stored(&self, ino: Ino) -> Result<Vec<(ChunkId, u32)>> {
        let mut chunks: Vec<(ChunkId, u32)> = Vec::new();
        for (_, e) in self.store.extents(ino, 0, u64::MAX).fs()? {
            if !self.store.is_stored(&e.chunk).fs()? {
                chunks.push((e.chunk, e.len));
            }
        }
        chunks.sort_unstable_by_key(|c| c.0);
        chunks.dedup();
        Ok(chunks)
    }

    /// `readlink`.
    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let n = self.node(ino)?;
        n.target
            .ok_or_else(|| fs_err!(EINVAL, "inode {ino} is not a symlink"))
    }
}
