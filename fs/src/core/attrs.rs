//! Attribute operations: setattr, statfs, extended attributes, access.
//!
//! Owns: the `user.*` extended attribute namespace (stored) and `user.pvfs.*` (computed,
//! read-only: placement and identity of a node).
//! Must not: store attributes outside `user.*`; other namespaces are not supported.

use crate::fs_err;
use pvfs_store::{FileKind, Ino, SetAttrs, SetTime, XattrMode};

use super::io::MAX_FILE_SIZE;
use super::{Attr, Caller, Fs};
use crate::error::{Result, StoreResultExt};

/// What a `setattr` changes.
#[derive(Clone, Debug, Default)]
pub struct SetAttrRequest {
    /// Permission bits.
    pub perm: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Size (regular files).
    pub size: Option<u64>,
    /// Access time.
    pub atime: Option<SetTime>,
    /// Modification time.
    pub mtime: Option<SetTime>,
}

/// Filesystem capacity, as `statfs` reports it.
#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Blocks available to users.
    pub bavail: u64,
    /// Nodes in use.
    pub files: u64,
    /// Nodes that could still be made.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Longest name.
    pub namelen: u32,
}

const PVFS_XATTR_PREFIX: &[u8] = b"user.pvfs.";

/// `perm` without setuid, and without setgid if group-execute is set.
fn killed(perm: u32) -> u32 {
    let mut p = perm & !libc::S_ISUID;
    if p & libc::S_IXGRP != 0 {
        p &= !libc::S_ISGID;
    }
    p
}

fn check_xattr_name(name: &[u8]) -> Result<()> {
    if !name.starts_with(b"user.") || name.len() <= 5 {
        return Err(fs_err!(
            EOPNOTSUPP,
            "only user.* extended attributes are supported"
        ));
    }
    if name.len() > pvfs_store::NAME_MAX {
        return Err(fs_err!(ERANGE, "extended attribute name too long"));
    }
    Ok(())
}

impl Fs {
    /// Clears setuid, and setgid if group-execute is set, like Linux does when an
    /// unprivileged process writes or truncates, or anyone changes the owner.
    pub(crate) fn kill_suidgid(&self, ino: Ino) -> Result<()> {
        let n = self.node(ino)?;
        let perm = killed(n.perm);
        if n.kind != FileKind::Dir && perm != n.perm {
            let changes = SetAttrs {
                perm: Some(perm),
                ..Default::default()
            };
            self.store
                .commit(false, |tx| tx.setattr(ino, &changes))
                .fs()?;
        }
        Ok(())
    }

    /// Changes attributes and/or size; returns the new attributes.
    pub fn setattr(&self, ino: Ino, req: &SetAttrRequest, caller: Caller) -> Result<Attr> {
        let file = self.inodes.file(ino);
        let owner_change = req.uid.is_some() || req.gid.is_some();
        if (req.size.is_some() && caller.uid != 0) || (owner_change && req.perm.is_none()) {
            self.kill_suidgid(ino)?;
        }
        if let Some(size) = req.size {
            let n = self.node(ino)?;
            match n.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(fs_err!(EISDIR, "cannot set the size of a directory")),
                _ => return Err(fs_err!(EINVAL, "cannot set the size of a {:?}", n.kind)),
            }
            if size > MAX_FILE_SIZE {
                return Err(fs_err!(EFBIG, "size {size} is too large"));
            }
            match &file {
                Some(f) => f.truncate(&self.store, size)?,
                None => {
                    self.remote.retrying(&self.store, ino, || {
                        self.store.commit(false, |tx| tx.truncate(ino, size)).fs()
                    })?;
                }
            }
        }
        let changes = SetAttrs {
            perm: req.perm,
            uid: req.uid,
            gid: req.gid,
            atime: req.atime,
            mtime: req.mtime,
        };
        if changes.perm.is_some()
            || changes.uid.is_some()
            || changes.gid.is_some()
            || changes.atime.is_some()
            || changes.mtime.is_some()
        {
            if let (Some(f), true) = (&file, changes.mtime.is_some()) {
                // Buffered writes carry their own mtime: commit them first so that the time
                // set explicitly is the one that stays.
                f.flush(&self.store, true)?;
            }
            self.store
                .commit(false, |tx| tx.setattr(ino, &changes))
                .fs()?;
        }
        self.getattr(ino)
    }

    /// Capacity of the disk under the data directory and the number of nodes.
    pub fn statfs(&self) -> Result<StatFs> {
        let space = self.store.space().fs()?;
        let bsize = 4096u64;
        let nodes = self.store.stats().nodes;
        Ok(StatFs {
            blocks: space.total / bsize,
            bfree: space.free / bsize,
            bavail: space.available / bsize,
            files: nodes,
            ffree: u64::from(u32::MAX).saturating_sub(nodes),
            bsize: bsize as u32,
            namelen: pvfs_store::NAME_MAX as u32,
        })
    }

    /// `setxattr`: `flags` are `XATTR_CREATE` / `XATTR_REPLACE`.
    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        check_xattr_name(name)?;
        if name.starts_with(PVFS_XATTR_PREFIX) {
            return Err(fs_err!(EPERM, "user.pvfs.* attributes are read-only"));
        }
        let mode = match flags {
            0 => XattrMode::Any,
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => return Err(fs_err!(EINVAL, "bad setxattr flags {flags:#x}")),
        };
        self.store
            .commit(false, |tx| tx.set_xattr(ino, name, value, mode))
            .fs()
    }

    /// `getxattr`.
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        if let Some(key) = name.strip_prefix(PVFS_XATTR_PREFIX) {
            return self.pvfs_xattr(ino, key);
        }
        if !name.starts_with(b"user.") {
            self.node(ino)?;
            return Err(fs_err!(ENODATA, "no such attribute"));
        }
        self.store
            .xattr(ino, name)
            .fs()?
            .ok_or_else(|| fs_err!(ENODATA, "no such attribute"))
    }

    /// The read-only `user.pvfs.*` attributes.
    fn pvfs_xattr(&self, ino: Ino, key: &[u8]) -> Result<Vec<u8>> {
        let n = self.node(ino)?;
        let text = match key {
            b"id" => n.id.to_string(),
            b"version" => n
                .version
                .map(|v| format!("{}:{}", v.device.fmt_short(), v.seq))
                .unwrap_or_default(),
            b"chunks" | b"local_bytes" if n.kind == FileKind::File => {
                let extents = self.store.extents(ino, 0, u64::MAX).fs()?;
                if key == b"chunks" {
                    extents.len().to_string()
                } else {
                    let mut local = 0u64;
                    for (_, e) in &extents {
                        if self.store.has_chunk(&e.chunk).fs()? {
                            local += u64::from(e.len);
                        }
                    }
                    local.to_string()
                }
            }
            _ => return Err(fs_err!(ENODATA, "no such pvfs attribute")),
        };
        Ok(text.into_bytes())
    }

    /// `listxattr`: NUL-terminated names. The computed `user.pvfs.*` attributes are not
    /// listed, so copying tools do not try to copy them.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<u8>> {
        self.node(ino)?;
        let mut out = Vec::new();
        for name in self.store.xattr_names(ino).fs()? {
            out.extend_from_slice(&name);
            out.push(0);
        }
        Ok(out)
    }

    /// `removexattr`.
    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        check_xattr_name(name)?;
        if name.starts_with(PVFS_XATTR_PREFIX) {
            return Err(fs_err!(EPERM, "user.pvfs.* attributes are read-only"));
        }
        self.store
            .commit(false, |tx| tx.remove_xattr(ino, name))
            .fs()
    }

    /// `access`: checks `mask` (R_OK/W_OK/X_OK) against the mode bits for `caller`.
    pub fn access(&self, ino: Ino, mask: i32, caller: Caller) -> Result<()> {
        let n = self.node(ino)?;
        let mask = (mask & 0o7) as u32;
        if mask == 0 {
            return Ok(());
        }
        if caller.uid == 0 {
            if mask & 1 != 0 && n.kind != FileKind::Dir && n.perm & 0o111 == 0 {
                return Err(fs_err!(EACCES, "no execute bit set"));
            }
            return Ok(());
        }
        let bits = if caller.uid == n.uid {
            n.perm >> 6
        } else if caller.gid == n.gid {
            n.perm >> 3
        } else {
            n.perm
        } & 0o7;
        if bits & mask == mask {
            Ok(())
        } else {
            Err(fs_err!(EACCES, "access denied"))
        }
    }
}
