//! Namespace changes: create, link, unlink, rmdir, rename, attributes, extended attributes.
//!
//! Owns: the tree invariants (every name points at a live node; a directory has exactly one
//! name; directory link counts are 2 + subdirectories; no directory is its own ancestor) and
//! the op recorded for each change.
//! Must not: check permissions (the kernel does, with `default_permissions`) or touch content
//! beyond deleting a node's extents when the node goes.

use crate::error::{Result, StoreError};
use crate::kv::Cf;
use crate::records;
use crate::records::{key, BornRecord, DirentRecord, EntryRecord, MoveRecord, NodeRecord, OpKind};
use crate::txn::Txn;
use crate::types::{FileKind, Ino, NodeId, OpId, Timestamp, ROOT_INO};

/// Longest name, in bytes.
pub const NAME_MAX: usize = 255;
/// Most names a node may have.
pub const LINK_MAX: u32 = 65_000;
/// Longest extended attribute value.
pub const XATTR_VALUE_MAX: usize = 64 * 1024;
/// Longest symlink target.
pub const SYMLINK_MAX: usize = 4095;

/// Checks that `name` can be a directory entry: not empty, not `.`/`..`, no `/` or NUL,
/// at most `NAME_MAX` bytes. Applied to every name, local or from a peer.
pub fn validate_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(StoreError::NameTooLong(name.len()));
    }
    if name.is_empty() || name == b"." || name == b".." || name.iter().any(|&b| b == b'/' || b == 0)
    {
        return Err(StoreError::InvalidName(
            String::from_utf8_lossy(name).into_owned(),
        ));
    }
    Ok(())
}

/// What a new node is made of.
#[derive(Clone, Debug)]
pub struct NewNode {
    /// Kind.
    pub kind: FileKind,
    /// Permission bits (the caller applies the umask).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group (the caller applies setgid-directory inheritance).
    pub gid: u32,
    /// Device number for device nodes.
    pub rdev: u32,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
}

/// A time to set: now, or a given instant (`utimensat` semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    /// The transaction's time.
    Now,
    /// This instant.
    At(Timestamp),
}

/// Attribute changes of a `setattr` (size changes go through the content path).
#[derive(Clone, Debug, Default)]
pub struct SetAttrs {
    /// New permission bits.
    pub perm: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New access time.
    pub atime: Option<SetTime>,
    /// New modification time.
    pub mtime: Option<SetTime>,
}

/// Flags of `rename`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RenameFlags {
    /// Fail if the target exists (`RENAME_NOREPLACE`).
    pub noreplace: bool,
    /// Swap the two names (`RENAME_EXCHANGE`).
    pub exchange: bool,
}

/// `setxattr` mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrMode {
    /// Create or replace.
    Any,
    /// Fail if it exists (`XATTR_CREATE`).
    Create,
    /// Fail if it does not exist (`XATTR_REPLACE`).
    Replace,
}

impl<'a> Txn<'a> {
    fn dir_req(&self, ino: Ino) -> Result<NodeRecord> {
        let n = self.node_req(ino)?;
        if n.kind != FileKind::Dir {
            return Err(StoreError::NotADirectory);
        }
        Ok(n)
    }

    fn dirent_req(&self, parent: Ino, name: &[u8]) -> Result<DirentRecord> {
        self.dirent(parent, name)?
            .ok_or_else(|| StoreError::NotFound(String::from_utf8_lossy(name).into_owned()))
    }

    /// Sets a directory's mtime and ctime to now and adjusts its link count. The mtime
    /// register takes the clock of the op about to be recorded, as every device applying the
    /// op does (`Txn::dir_times`), so directory times converge.
    fn touch_dir(&mut self, ino: Ino, nlink_delta: i32) -> Result<()> {
        let mut d = self.node_req(ino)?;
        d.mtime = self.now();
        d.ctime = self.now();
        // The register's clock is that of the op the caller records next.
        d.stamps.mtime = self.next_hlc();
        d.nlink = d.nlink.saturating_add_signed(nlink_delta);
        self.put_node(ino, &d);
        Ok(())
    }

    /// Records, for a local op, that `entry` moved from `from` to `to`: the entry record and
    /// the move log (local ops always go last in clock order, so nothing is undone).
    #[allow(clippy::too_many_arguments)]
    fn moved_local(
        &mut self,
        op: OpId,
        idx: u8,
        entry: NodeId,
        node: NodeId,
        kind: FileKind,
        from: Option<(NodeId, &[u8])>,
        to: Option<(NodeId, &[u8])>,
        seen: Option<OpId>,
    ) {
        let to = to.map(|(p, n)| (p, n.to_vec()));
        match &to {
            Some((parent, name)) => self.put_entry(
                entry,
                &EntryRecord {
                    parent: *parent,
                    name: name.clone(),
                    node,
                },
            ),
            None => self.delete_entry(entry),
        }
        let m = MoveRecord {
            entry,
            node,
            kind,
            target: to.clone(),
            from: from.map(|(p, n)| (p, n.to_vec())),
            to,
            seen,
        };
        self.log_move(op, idx, &m);
    }

    fn node_id(&self, ino: Ino) -> Result<NodeId> {
        Ok(self.node_req(ino)?.id)
    }

    /// Creates `name` in `parent`. Returns the new node's ino and record.
    pub fn create(&mut self, parent: Ino, name: &[u8], new: NewNode) -> Result<(Ino, NodeRecord)> {
        validate_name(name)?;
        let p = self.dir_req(parent)?;
        if self.dirent(parent, name)?.is_some() {
            return Err(StoreError::AlreadyExists(
                String::from_utf8_lossy(name).into_owned(),
            ));
        }
        if let Some(t) = &new.target {
            if t.is_empty() || t.len() > SYMLINK_MAX || t.contains(&0) {
                return Err(StoreError::Invalid("bad symlink target".into()));
            }
        }
        let now = self.now();
        let ino = self.alloc_ino();
        let is_dir = new.kind == FileKind::Dir;
        let rec = NodeRecord {
            id: self.new_id(),
            kind: new.kind,
            perm: new.perm & 0o7777,
            uid: new.uid,
            gid: new.gid,
            rdev: new.rdev,
            nlink: if is_dir { 2 } else { 1 },
            size: new.target.as_ref().map_or(0, |t| t.len() as u64),
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
            parent: if is_dir { parent } else { 0 },
            version: None,
            stamps: Default::default(),
            target: new.target.clone(),
        };
        self.put_node(ino, &rec);
        self.map_id(rec.id, ino);
        self.put_dirent(
            parent,
            name,
            DirentRecord {
                ino,
                kind: new.kind,
                entry: rec.id,
            },
        );
        self.touch_dir(parent, if is_dir { 1 } else { 0 })?;
        let s = &mut self.state.stats;
        s.nodes += 1;
        match new.kind {
            FileKind::Dir => s.dirs += 1,
            FileKind::File => s.files += 1,
            _ => {}
        }
        let op = self.record(OpKind::Create {
            node: rec.id,
            parent: p.id,
            name: name.to_vec(),
            kind: new.kind,
            perm: rec.perm,
            uid: rec.uid,
            gid: rec.gid,
            rdev: rec.rdev,
            target: new.target,
            time: now,
        });
        let born = BornRecord {
            created: op,
            version: None,
            attrs: None,
        };
        self.put(Cf::Born, &key::node_id(rec.id), records::encode(&born));
        self.moved_local(
            op,
            0,
            rec.id,
            rec.id,
            new.kind,
            None,
            Some((p.id, name)),
            None,
        );
        Ok((ino, rec))
    }

    /// Adds the name `name` in `parent` for the existing node `ino`.
    pub fn link(&mut self, ino: Ino, parent: Ino, name: &[u8]) -> Result<NodeRecord> {
        validate_name(name)?;
        let p = self.dir_req(parent)?;
        let mut n = self.node_req(ino)?;
        if n.kind == FileKind::Dir {
            return Err(StoreError::Invalid("hard link to a directory".into()));
        }
        if n.nlink == 0 {
            return Err(StoreError::NotFound(format!(
                "inode {ino} has no names left"
            )));
        }
        if n.nlink >= LINK_MAX {
            return Err(StoreError::TooManyLinks);
        }
        if self.dirent(parent, name)?.is_some() {
            return Err(StoreError::AlreadyExists(
                String::from_utf8_lossy(name).into_owned(),
            ));
        }
        n.nlink += 1;
        n.ctime = self.now();
        self.put_node(ino, &n);
        let entry = self.new_id();
        self.put_dirent(
            parent,
            name,
            DirentRecord {
                ino,
                kind: n.kind,
                entry,
            },
        );
        self.touch_dir(parent, 0)?;
        let time = self.now();
        let op = self.record(OpKind::Link {
            node: n.id,
            entry,
            parent: p.id,
            name: name.to_vec(),
            time,
        });
        self.moved_local(op, 0, entry, n.id, n.kind, None, Some((p.id, name)), None);
        Ok(n)
    }

    /// Drops one name of a node; the node goes with its last name unless `is_open(ino)`,
    /// in which case it stays as an orphan until `release_orphan`.
    fn drop_name(&mut self, ino: Ino, is_open: &dyn Fn(Ino) -> bool) -> Result<()> {
        let mut n = self.node_req(ino)?;
        if n.kind == FileKind::Dir {
            return self.delete_node(ino, &n);
        }
        n.nlink = n.nlink.saturating_sub(1);
        n.ctime = self.now();
        if n.nlink == 0 {
            if is_open(ino) {
                self.put_node(ino, &n);
                self.put(Cf::Orphans, &key::ino(ino), Vec::new());
            } else {
                self.delete_node(ino, &n)?;
            }
        } else {
            self.put_node(ino, &n);
        }
        Ok(())
    }

    /// Deletes a node with everything it owns: id mapping, extents (and chunk references),
    /// extended attributes, orphan mark.
    pub(crate) fn delete_node(&mut self, ino: Ino, n: &NodeRecord) -> Result<()> {
        if ino == ROOT_INO {
            return Err(StoreError::Invalid("the root cannot be deleted".into()));
        }
        for (off, e) in self.extents(ino, 0, u64::MAX)? {
            self.delete_extent(ino, off, &e)?;
        }
        for (k, _) in self.scan(Cf::Xattrs, &key::ino(ino), &key::ino(ino + 1), usize::MAX)? {
            self.delete(Cf::Xattrs, &k);
        }
        self.delete(Cf::Nodes, &key::ino(ino));
        self.delete(Cf::Ids, &key::node_id(n.id));
        self.bury(n)?;
        self.delete(Cf::Orphans, &key::ino(ino));
        let s = &mut self.state.stats;
        s.nodes = s.nodes.saturating_sub(1);
        match n.kind {
            FileKind::Dir => s.dirs = s.dirs.saturating_sub(1),
            FileKind::File => {
                s.files = s.files.saturating_sub(1);
                s.logical_bytes = s.logical_bytes.saturating_sub(n.size);
            }
            _ => {}
        }
        Ok(())
    }

    /// Deletes an orphan (a node with no names) once its last handle is closed.
    pub fn release_orphan(&mut self, ino: Ino) -> Result<bool> {
        let Some(n) = self.node(ino)? else {
            return Ok(false);
        };
        if n.nlink > 0 || n.kind == FileKind::Dir {
            return Ok(false);
        }
        self.delete_node(ino, &n)?;
        Ok(true)
    }

    /// Removes the non-directory `name` from `parent`. Returns the ino it named.
    pub fn unlink(
        &mut self,
        parent: Ino,
        name: &[u8],
        is_open: &dyn Fn(Ino) -> bool,
    ) -> Result<Ino> {
        let p = self.dir_req(parent)?;
        let d = self.dirent_req(parent, name)?;
        if d.kind == FileKind::Dir {
            return Err(StoreError::IsADirectory);
        }
        let n = self.node_req(d.ino)?;
        self.delete_dirent(parent, name);
        self.drop_name(d.ino, is_open)?;
        self.touch_dir(parent, 0)?;
        let time = self.now();
        let op = self.record(OpKind::Unlink {
            node: n.id,
            entry: d.entry,
            seen: n.version,
            parent: p.id,
            name: name.to_vec(),
            time,
        });
        let from = Some((p.id, name));
        self.moved_local(op, 0, d.entry, n.id, n.kind, from, None, n.version);
        Ok(d.ino)
    }

    /// Removes the empty directory `name` from `parent`.
    pub fn rmdir(&mut self, parent: Ino, name: &[u8]) -> Result<Ino> {
        if name == b"." {
            return Err(StoreError::Invalid("rmdir of .".into()));
        }
        if name == b".." {
            return Err(StoreError::NotEmpty);
        }
        let p = self.dir_req(parent)?;
        let d = self.dirent_req(parent, name)?;
        if d.kind != FileKind::Dir {
            return Err(StoreError::NotADirectory);
        }
        if !self.dir_is_empty(d.ino)? {
            return Err(StoreError::NotEmpty);
        }
        let node = self.node_id(d.ino)?;
        self.delete_dirent(parent, name);
        self.drop_name(d.ino, &|_| false)?;
        self.touch_dir(parent, -1)?;
        let time = self.now();
        let op = self.record(OpKind::Unlink {
            node,
            entry: d.entry,
            seen: None,
            parent: p.id,
            name: name.to_vec(),
            time,
        });
        let from = Some((p.id, name));
        self.moved_local(op, 0, d.entry, node, FileKind::Dir, from, None, None);
        Ok(d.ino)
    }

    fn dir_is_empty(&self, ino: Ino) -> Result<bool> {
        Ok(self
            .scan(Cf::Dirents, &key::ino(ino), &key::ino(ino + 1), 1)?
            .is_empty())
    }

    /// True if `dir` is `ancestor` or lies below it.
    fn is_within(&self, mut dir: Ino, ancestor: Ino) -> Result<bool> {
        // Bounded walk: a longer chain than this means the tree is corrupt.
        for _ in 0..100_000 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            dir = self.node_req(dir)?.parent;
        }
        Err(StoreError::corrupt(
            "directory parent chain does not reach the root",
        ))
    }

    /// Renames `(sp, sn)` to `(dp, dn)` with POSIX semantics and the Linux flags.
    pub fn rename(
        &mut self,
        sp: Ino,
        sn: &[u8],
        dp: Ino,
        dn: &[u8],
        flags: RenameFlags,
        is_open: &dyn Fn(Ino) -> bool,
    ) -> Result<()> {
        validate_name(dn)?;
        let sp_rec = self.dir_req(sp)?;
        let dp_rec = self.dir_req(dp)?;
        let src = self.dirent_req(sp, sn)?;
        let dst = self.dirent(dp, dn)?;
        if sp == dp && sn == dn {
            return Ok(());
        }
        let src_id = self.node_id(src.ino)?;
        let src_is_dir = src.kind == FileKind::Dir;
        if flags.exchange {
            let dst =
                dst.ok_or_else(|| StoreError::NotFound(String::from_utf8_lossy(dn).into_owned()))?;
            let dst_is_dir = dst.kind == FileKind::Dir;
            if (src_is_dir && self.is_within(dp, src.ino)?)
                || (dst_is_dir && self.is_within(sp, dst.ino)?)
            {
                return Err(StoreError::Invalid(
                    "a directory cannot move below itself".into(),
                ));
            }
            let dst_node = self.node_req(dst.ino)?;
            self.put_dirent(sp, sn, dst);
            self.put_dirent(dp, dn, src);
            for (d, new_parent) in [(src, dp), (dst, sp)] {
                let mut n = self.node_req(d.ino)?;
                n.ctime = self.now();
                if n.kind == FileKind::Dir {
                    n.parent = new_parent;
                }
                self.put_node(d.ino, &n);
            }
            let (sd, dd) = match (src_is_dir, dst_is_dir) {
                (true, false) if sp != dp => (-1, 1),
                (false, true) if sp != dp => (1, -1),
                _ => (0, 0),
            };
            self.touch_dir(sp, sd)?;
            self.touch_dir(dp, dd)?;
            let time = self.now();
            let op = self.record(OpKind::Rename {
                node: src_id,
                entry: src.entry,
                from_parent: sp_rec.id,
                from_name: sn.to_vec(),
                to_parent: dp_rec.id,
                to_name: dn.to_vec(),
                other: Some((dst_node.id, dst.entry, dst_node.version)),
                exchange: true,
                time,
            });
            // An exchange is four moves: both names out of the tree, then both back in.
            let (s_loc, d_loc) = (Some((sp_rec.id, sn)), Some((dp_rec.id, dn)));
            let (sk, dk) = (src.kind, dst.kind);
            let dn_id = dst_node.id;
            self.moved_local(op, 0, src.entry, src_id, sk, s_loc, None, None);
            self.moved_local(op, 1, dst.entry, dn_id, dk, d_loc, None, None);
            self.moved_local(op, 2, src.entry, src_id, sk, None, d_loc, None);
            self.moved_local(op, 3, dst.entry, dn_id, dk, None, s_loc, None);
            return Ok(());
        }
        // Like Linux: moving a directory below itself is EINVAL before anything else.
        if src_is_dir && self.is_within(dp, src.ino)? {
            return Err(StoreError::Invalid(
                "a directory cannot move below itself".into(),
            ));
        }
        let mut replaced = None;
        if let Some(dst) = dst {
            if flags.noreplace {
                return Err(StoreError::AlreadyExists(
                    String::from_utf8_lossy(dn).into_owned(),
                ));
            }
            if dst.ino == src.ino {
                // Two names of one node: POSIX says rename does nothing.
                return Ok(());
            }
            match (src_is_dir, dst.kind == FileKind::Dir) {
                (true, false) => return Err(StoreError::NotADirectory),
                (false, true) => return Err(StoreError::IsADirectory),
                (true, true) if !self.dir_is_empty(dst.ino)? => return Err(StoreError::NotEmpty),
                _ => {}
            }
            replaced = Some(dst);
        }
        let other = match replaced {
            Some(d) => {
                let n = self.node_req(d.ino)?;
                Some((n.id, d.entry, n.version, n.kind))
            }
            None => None,
        };
        self.delete_dirent(sp, sn);
        self.put_dirent(dp, dn, src);
        let mut dp_delta = 0;
        if let Some(d) = replaced {
            self.drop_name(d.ino, is_open)?;
            if d.kind == FileKind::Dir {
                dp_delta -= 1;
            }
        }
        let mut n = self.node_req(src.ino)?;
        n.ctime = self.now();
        if src_is_dir && sp != dp {
            n.parent = dp;
            dp_delta += 1;
            self.touch_dir(sp, -1)?;
        } else if sp != dp {
            self.touch_dir(sp, 0)?;
        }
        self.put_node(src.ino, &n);
        self.touch_dir(dp, dp_delta)?;
        let time = self.now();
        let op = self.record(OpKind::Rename {
            node: src_id,
            entry: src.entry,
            from_parent: sp_rec.id,
            from_name: sn.to_vec(),
            to_parent: dp_rec.id,
            to_name: dn.to_vec(),
            other: other.map(|(n, e, v, _)| (n, e, v)),
            exchange: false,
            time,
        });
        let d_loc = Some((dp_rec.id, dn));
        if let Some((on, oe, ov, ok)) = other {
            self.moved_local(op, 0, oe, on, ok, d_loc, None, ov);
        }
        let s_loc = Some((sp_rec.id, sn));
        self.moved_local(op, 1, src.entry, src_id, src.kind, s_loc, d_loc, None);
        Ok(())
    }

    /// Changes attributes; ctime becomes now. Returns the new record.
    pub fn setattr(&mut self, ino: Ino, a: &SetAttrs) -> Result<NodeRecord> {
        let mut n = self.node_req(ino)?;
        let now = self.now();
        let resolve = |t: SetTime| match t {
            SetTime::Now => now,
            SetTime::At(ts) => ts,
        };
        if let Some(p) = a.perm {
            n.perm = p & 0o7777;
        }
        if let Some(u) = a.uid {
            n.uid = u;
        }
        if let Some(g) = a.gid {
            n.gid = g;
        }
        let atime = a.atime.map(resolve);
        let mtime = a.mtime.map(resolve);
        if let Some(t) = atime {
            n.atime = t;
        }
        if let Some(t) = mtime {
            n.mtime = t;
        }
        n.ctime = now;
        self.record(OpKind::SetAttr {
            node: n.id,
            perm: a.perm.map(|p| p & 0o7777),
            uid: a.uid,
            gid: a.gid,
            atime,
            mtime,
            ctime: now,
        });
        let hlc = self.state.hlc;
        let st = &mut n.stamps;
        for (set, stamp) in [
            (a.perm.is_some(), &mut st.mode),
            (a.uid.is_some() || a.gid.is_some(), &mut st.owner),
            (atime.is_some(), &mut st.atime),
            (mtime.is_some(), &mut st.mtime),
        ] {
            if set {
                *stamp = hlc;
            }
        }
        self.put_node(ino, &n);
        Ok(n)
    }

    /// Sets an extended attribute.
    pub fn set_xattr(
        &mut self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> Result<()> {
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(StoreError::NameTooLong(name.len()));
        }
        if value.len() > XATTR_VALUE_MAX {
            return Err(StoreError::AttributeTooLarge);
        }
        let mut n = self.node_req(ino)?;
        let k = key::xattr(ino, name);
        let exists = self.get(Cf::Xattrs, &k)?.is_some();
        match mode {
            XattrMode::Create if exists => {
                return Err(StoreError::AlreadyExists(
                    String::from_utf8_lossy(name).into_owned(),
                ))
            }
            XattrMode::Replace if !exists => return Err(StoreError::NoAttribute),
            _ => {}
        }
        self.put(Cf::Xattrs, &k, value.to_vec());
        n.ctime = self.now();
        self.record(OpKind::SetXattr {
            node: n.id,
            name: name.to_vec(),
            value: Some(value.to_vec()),
        });
        self.xattr_register(n.id, name, self.state.hlc, Some(value))?;
        self.put_node(ino, &n);
        Ok(())
    }

    /// Removes an extended attribute.
    pub fn remove_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<()> {
        let mut n = self.node_req(ino)?;
        let k = key::xattr(ino, name);
        if self.get(Cf::Xattrs, &k)?.is_none() {
            return Err(StoreError::NoAttribute);
        }
        self.delete(Cf::Xattrs, &k);
        n.ctime = self.now();
        self.record(OpKind::SetXattr {
            node: n.id,
            name: name.to_vec(),
            value: None,
        });
        self.xattr_register(n.id, name, self.state.hlc, None)?;
        self.put_node(ino, &n);
        Ok(())
    }
}
