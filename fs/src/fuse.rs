//! The FUSE shim: `fuser::Filesystem` over `core::Fs`, and mounting.
//!
//! Owns: conversion between fuser types and core types, kernel connection settings
//! (readdirplus, 1 MiB writes and readahead, keep-cache), attribute and entry TTLs, and the
//! per-request tracing span. Every callback replies exactly once; errors are logged at debug
//! (expected: ENOENT, EEXIST, ...) or warn (EIO, ENOSPC) and become their errno.
//! Must not: contain filesystem logic, or be the only place a behaviour can be tested.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use pvfs_store::{FileKind, SetTime, Timestamp};
use tracing::{debug, debug_span, warn};

use crate::core::{Attr, Caller, Fs, SetAttrRequest};
use crate::error::FsError;

/// How long the kernel may cache attributes and names. All changes on this device go
/// through the kernel, which updates its caches itself.
const TTL: Duration = Duration::from_secs(1);

/// A read of content held elsewhere also fetches the absent chunks of this many bytes after
/// it, so that a sequential reader finds them here.
const FETCH_AHEAD: u64 = 8 << 20;

/// Mount settings.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// FUSE session threads.
    pub threads: usize,
    /// Let every user use the mount (`allow_other`; needs root or `user_allow_other`).
    pub allow_other: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: 4,
            allow_other: true,
        }
    }
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime.into(),
        mtime: a.mtime.into(),
        ctime: a.ctime.into(),
        crtime: a.btime.into(),
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 65536,
        flags: 0,
    }
}

fn negative_attr() -> FileAttr {
    let zero = Timestamp::default();
    file_attr(&Attr {
        ino: 0,
        kind: FileKind::File,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        size: 0,
        blocks: 0,
        atime: zero,
        mtime: zero,
        ctime: zero,
        btime: zero,
    })
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => SetTime::At(Timestamp::from(st)),
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn errno(op: &str, e: &FsError) -> Errno {
    if e.is_serious() {
        warn!(op, errno = e.to_errno(), "{e:#}");
    } else {
        debug!(op, errno = e.to_errno(), "{e:#}");
    }
    Errno::from_i32(e.to_errno())
}

/// `fuser::Filesystem` for a `core::Fs`.
#[derive(Debug)]
pub struct FuseFs {
    fs: Arc<Fs>,
    /// Runs the requests that commit content (flush, fsync, release, truncation, range
    /// operations) on blocking threads, so that chunking and hashing never occupy a FUSE
    /// session thread; small commits (`Fs::is_light`) run on the session thread.
    blocking: tokio::runtime::Handle,
    /// Open files whose reads found content held elsewhere, and for each the end of the
    /// range already asked for: their reads keep the next `FETCH_AHEAD` bytes coming.
    remote_reads: parking_lot::Mutex<std::collections::HashMap<u64, u64>>,
}

impl FuseFs {
    /// Wraps the core filesystem.
    pub fn new(fs: Arc<Fs>, blocking: tokio::runtime::Handle) -> FuseFs {
        FuseFs {
            fs,
            blocking,
            remote_reads: Default::default(),
        }
    }

    /// Runs `op` on a blocking thread if it is `heavy`, else here: handing a small commit to
    /// another thread costs about as much as doing it.
    fn run_or_offload(&self, heavy: bool, op: impl FnOnce(&Fs) + Send + 'static) {
        if heavy {
            self.offload(op);
        } else {
            op(&self.fs);
        }
    }

    /// Answers a read whose range holds content stored only on other devices: asks the
    /// remote source for the absent chunks (and those of the next `FETCH_AHEAD` bytes) and
    /// returns at once; the reply is sent from the thread that completes the last fetch.
    fn read_remote(&self, fh: u64, offset: u64, size: u32, reply: ReplyData) {
        let Some(remote) = self.fs.remote() else {
            warn!(
                fh,
                offset, "content is on another device and no network is configured"
            );
            return reply.error(Errno::EIO);
        };
        let (ino, wanted) = match self.fs.absent_chunks(fh, offset, u64::from(size)) {
            Ok(w) => w,
            Err(e) => return reply.error(errno("read", &e)),
        };
        self.remote_reads.lock().entry(fh).or_insert(0);
        self.fetch_ahead(fh, offset + u64::from(size));
        struct Waiting {
            left: usize,
            failed: Option<String>,
            reply: Option<ReplyData>,
        }
        let state = Arc::new(parking_lot::Mutex::new(Waiting {
            left: wanted.len().max(1),
            failed: None,
            reply: Some(reply),
        }));
        let finish = {
            let (fs, blocking, span) = (
                self.fs.clone(),
                self.blocking.clone(),
                tracing::Span::current(),
            );
            move |state: &parking_lot::Mutex<Waiting>, res: pvfs_store::Result<()>| {
                let mut st = state.lock();
                if let Err(e) = res {
                    st.failed.get_or_insert(e.to_string());
                }
                st.left -= 1;
                if st.left > 0 {
                    return;
                }
                let (Some(reply), failed) = (st.reply.take(), st.failed.take()) else {
                    return;
                };
                drop(st);
                if let Some(why) = failed {
                    warn!(
                        ino,
                        offset, "content held by other devices could not be read: {why}"
                    );
                    return reply.error(Errno::EIO);
                }
                let fs = fs.clone();
                let span = span.clone();
                blocking.spawn_blocking(move || {
                    let res = span.in_scope(|| {
                        crate::core::waiting_allowed(|| fs.read_fetching(fh, offset, size))
                    });
                    match res {
                        Ok(data) => reply.data(&data),
                        Err(e) => reply.error(errno("read", &e)),
                    }
                });
            }
        };
        let finish = Arc::new(finish);
        if wanted.is_empty() {
            // Fetched meanwhile: read again, off this thread.
            return finish(&state, Ok(()));
        }
        for (id, len) in wanted {
            let (state, finish) = (state.clone(), finish.clone());
            remote.fetch(id, len, ino, Box::new(move |res| finish(&state, res)));
        }
    }

    /// Asks for the absent chunks of `[from, from + FETCH_AHEAD)`, so that a sequential
    /// reader of content held elsewhere finds it here. What this handle asked for already
    /// is not looked at again: a sequential reader costs one extent lookup per chunk, not
    /// one per chunk of the window on every read.
    fn fetch_ahead(&self, fh: u64, from: u64) {
        let Some(remote) = self.fs.remote() else {
            return;
        };
        let (start, end) = {
            let mut reads = self.remote_reads.lock();
            let Some(asked) = reads.get_mut(&fh) else {
                return;
            };
            let (start, end) = ahead_range(*asked, from);
            *asked = end;
            (start, end)
        };
        if start >= end {
            return;
        }
        if let Ok((ino, ahead)) = self.fs.absent_chunks(fh, start, end - start) {
            for (id, len) in ahead {
                remote.fetch(id, len, ino, Box::new(|_| {}));
            }
        }
    }

    /// After a read served here of a file that has content elsewhere: once the reader is
    /// within half a window of the end of what was asked for, the next part is asked for,
    /// before the reader gets there (files never read remotely skip it).
    fn keep_ahead(&self, fh: u64, end: u64) {
        let due = match self.remote_reads.lock().get(&fh) {
            Some(&asked) => end.saturating_add(FETCH_AHEAD / 2) > asked,
            None => false,
        };
        if due {
            self.fetch_ahead(fh, end);
        }
    }

    /// Runs `op` on a blocking thread; the span goes with it.
    fn offload(&self, op: impl FnOnce(&Fs) + Send + 'static) {
        let fs = self.fs.clone();
        let span = tracing::Span::current();
        self.blocking
            .spawn_blocking(move || span.in_scope(|| crate::core::waiting_allowed(|| op(&fs))));
    }
}

/// The range a handle that has asked for content up to `asked` still has to ask for when
/// its reader is at `from`: the rest of `[from, from + FETCH_AHEAD)`. A reader that stays
/// within the window continues from where the asking stopped; one that jumped (a seek, either
/// way) starts a new window. Empty when everything was asked for already.
fn ahead_range(asked: u64, from: u64) -> (u64, u64) {
    let end = from.saturating_add(FETCH_AHEAD);
    let start = if (from..=end).contains(&asked) {
        asked
    } else {
        from
    };
    (start, end)
}

macro_rules! reply_result {
    ($op:literal, $reply:expr, $res:expr, |$v:pat_param| $ok:expr) => {
        match $res {
            Ok($v) => $ok,
            Err(e) => $reply.error(errno($op, &e)),
        }
    };
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_ASYNC_READ
            // pvfs clears setuid/setgid itself (on write, truncate, chown), so the kernel need
            // not ask for security.capability before every write.
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        let supported = config.capabilities() & wanted;
        let _ = config.add_capabilities(supported);
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.flush_all() {
            warn!("flushing at unmount failed: {e:#}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _s = debug_span!("lookup", parent = parent.0, ?name).entered();
        match self.fs.lookup(parent.0, name.as_bytes()) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            // A negative entry (node id 0): the kernel caches that the name does not exist.
            Err(e) if e.to_errno() == libc::ENOENT => {
                reply.entry(&TTL, &negative_attr(), Generation(0))
            }
            Err(e) => reply.error(errno("lookup", &e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _s = debug_span!("getattr", ino = ino.0).entered();
        reply_result!("getattr", reply, self.fs.getattr(ino.0), |a| reply
            .attr(&TTL, &file_attr(&a)));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _s = debug_span!("setattr", ino = ino.0, ?mode, ?uid, ?gid, ?size).entered();
        let changes = SetAttrRequest {
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
        };
        let caller = caller(req);
        // A new size or mtime commits buffered writes first.
        let commits = changes.size.is_some() || changes.mtime.is_some();
        let heavy = commits && (changes.size.is_some() || !self.fs.is_light(ino.0, None));
        self.run_or_offload(heavy, move |fs: &Fs| {
            reply_result!("setattr", reply, fs.setattr(ino.0, &changes, caller), |a| {
                reply.attr(&TTL, &file_attr(&a))
            })
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _s = debug_span!("readlink", ino = ino.0).entered();
        reply_result!("readlink", reply, self.fs.readlink(ino.0), |t| reply
            .data(&t));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _s = debug_span!("mknod", parent = parent.0, ?name, mode).entered();
        let res = self
            .fs
            .mknod(parent.0, name.as_bytes(), mode, umask, rdev, caller(req));
        reply_result!("mknod", reply, res, |a| reply.entry(
            &TTL,
            &file_attr(&a),
            Generation(0)
        ));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _s = debug_span!("mkdir", parent = parent.0, ?name, mode).entered();
        let res = self
            .fs
            .mkdir(parent.0, name.as_bytes(), mode, umask, caller(req));
        reply_result!("mkdir", reply, res, |a| reply.entry(
            &TTL,
            &file_attr(&a),
            Generation(0)
        ));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _s = debug_span!("unlink", parent = parent.0, ?name).entered();
        let name = name.as_bytes().to_vec();
        let heavy = self.fs.removal_fetches(parent.0, &name);
        self.run_or_offload(heavy, move |fs| {
            reply_result!("unlink", reply, fs.unlink(parent.0, &name), |()| reply.ok())
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _s = debug_span!("rmdir", parent = parent.0, ?name).entered();
        reply_result!(
            "rmdir",
            reply,
            self.fs.rmdir(parent.0, name.as_bytes()),
            |()| reply.ok()
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _s = debug_span!("symlink", parent = parent.0, ?link_name).entered();
        let res = self.fs.symlink(
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            caller(req),
        );
        reply_result!("symlink", reply, res, |a| reply.entry(
            &TTL,
            &file_attr(&a),
            Generation(0)
        ));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _s = debug_span!(
            "rename",
            parent = parent.0,
            ?name,
            newparent = newparent.0,
            ?newname
        )
        .entered();
        let known = RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE;
        if !(flags - known).is_empty() {
            reply.error(Errno::EINVAL);
            return;
        }
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let heavy = !exchange && self.fs.removal_fetches(newparent.0, &newname);
        self.run_or_offload(heavy, move |fs| {
            let res = fs.rename(
                parent.0,
                &name,
                newparent.0,
                &newname,
                flags.contains(RenameFlags::RENAME_NOREPLACE),
                exchange,
            );
            reply_result!("rename", reply, res, |()| reply.ok())
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _s = debug_span!("link", ino = ino.0, newparent = newparent.0, ?newname).entered();
        let res = self.fs.link(ino.0, newparent.0, newname.as_bytes());
        reply_result!("link", reply, res, |a| reply.entry(
            &TTL,
            &file_attr(&a),
            Generation(0)
        ));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _s = debug_span!("open", ino = ino.0, flags = flags.0).entered();
        reply_result!("open", reply, self.fs.open(ino.0, false), |fh| {
            reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _s = debug_span!("read", ino = ino.0, fh = fh.0, offset, size).entered();
        match self.fs.read(fh.0, offset, size) {
            Ok(data) => {
                let end = offset + data.len() as u64;
                reply.data(&data);
                self.keep_ahead(fh.0, end);
            }
            Err(e) if e.is_absent() => self.read_remote(fh.0, offset, size, reply),
            Err(e) => reply.error(errno("read", &e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _s = debug_span!("write", ino = ino.0, fh = fh.0, offset, len = data.len()).entered();
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        reply_result!(
            "write",
            reply,
            self.fs.write(fh.0, offset, data, kill),
            |n| reply.written(n)
        );
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _s = debug_span!("flush", ino = ino.0, fh = fh.0).entered();
        let heavy = !self.fs.is_light(ino.0, Some(fh.0));
        self.run_or_offload(heavy, move |fs| {
            reply_result!("flush", reply, fs.flush(fh.0), |()| reply.ok())
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _s = debug_span!("release", ino = ino.0, fh = fh.0).entered();
        self.remote_reads.lock().remove(&fh.0);
        let heavy = !self.fs.is_light(ino.0, Some(fh.0));
        self.run_or_offload(heavy, move |fs| {
            reply_result!("release", reply, fs.release(fh.0), |()| reply.ok())
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _s = debug_span!("fsync", ino = ino.0, fh = fh.0).entered();
        self.offload(move |fs| reply_result!("fsync", reply, fs.fsync(fh.0), |()| reply.ok()));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _s = debug_span!("opendir", ino = ino.0).entered();
        reply_result!("opendir", reply, self.fs.opendir(ino.0), |fh| reply
            .opened(FileHandle(fh), FopenFlags::empty()));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _s = debug_span!("readdir", ino = ino.0, fh = fh.0, offset).entered();
        match self.fs.readdir(fh.0, offset) {
            Ok((entries, start)) => {
                for e in &entries[start..] {
                    if reply.add(
                        INodeNo(e.ino),
                        e.next,
                        kind(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno("readdir", &e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _s = debug_span!("readdirplus", ino = ino.0, fh = fh.0, offset).entered();
        match self.fs.readdir(fh.0, offset) {
            Ok((entries, start)) => {
                for e in &entries[start..] {
                    // An entry deleted since the listing was taken is skipped.
                    let Ok(a) = self.fs.getattr(e.ino) else {
                        continue;
                    };
                    if reply.add(
                        INodeNo(e.ino),
                        e.next,
                        OsStr::from_bytes(&e.name),
                        &TTL,
                        &file_attr(&a),
                        Generation(0),
                    ) {
                        break;
                    }
                    if !e.is_dot() {
                        self.fs.remember(e.ino);
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno("readdirplus", &e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _s = debug_span!("fsyncdir", ino = ino.0).entered();
        self.offload(move |fs| reply_result!("fsyncdir", reply, fs.fsyncdir(), |()| reply.ok()));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply_result!("statfs", reply, self.fs.statfs(), |s| reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize
        ));
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _s = debug_span!("setxattr", ino = ino.0, ?name).entered();
        reply_result!(
            "setxattr",
            reply,
            self.fs.setxattr(ino.0, name.as_bytes(), value, flags),
            |()| reply.ok()
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _s = debug_span!("getxattr", ino = ino.0, ?name).entered();
        reply_result!(
            "getxattr",
            reply,
            self.fs.getxattr(ino.0, name.as_bytes()),
            |v| xattr_reply(reply, &v, size)
        );
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _s = debug_span!("listxattr", ino = ino.0).entered();
        reply_result!("listxattr", reply, self.fs.listxattr(ino.0), |v| {
            xattr_reply(reply, &v, size)
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _s = debug_span!("removexattr", ino = ino.0, ?name).entered();
        reply_result!(
            "removexattr",
            reply,
            self.fs.removexattr(ino.0, name.as_bytes()),
            |()| reply.ok()
        );
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let _s = debug_span!("access", ino = ino.0).entered();
        reply_result!(
            "access",
            reply,
            self.fs.access(ino.0, mask.bits(), caller(req)),
            |()| reply.ok()
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _s = debug_span!("create", parent = parent.0, ?name, mode, flags).entered();
        if FileKind::from_mode(mode).is_some_and(|k| k != FileKind::File) {
            reply.error(Errno::EINVAL);
            return;
        }
        let res = self
            .fs
            .create(parent.0, name.as_bytes(), mode, umask, caller(req));
        reply_result!("create", reply, res, |(a, fh)| reply.created(
            &TTL,
            &file_attr(&a),
            Generation(0),
            FileHandle(fh),
            FopenFlags::FOPEN_KEEP_CACHE
        ));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _s = debug_span!("fallocate", ino = ino.0, offset, length, mode).entered();
        self.offload(move |fs| {
            reply_result!(
                "fallocate",
                reply,
                fs.fallocate(fh.0, offset, length, mode),
                |()| reply.ok()
            )
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _s = debug_span!("lseek", ino = ino.0, offset, whence).entered();
        let Ok(offset) = u64::try_from(offset) else {
            reply.error(Errno::EINVAL);
            return;
        };
        self.offload(move |fs| {
            reply_result!("lseek", reply, fs.lseek(fh.0, offset, whence), |o| reply
                .offset(o as i64))
        });
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _s = debug_span!(
            "copy_file_range",
            ino_in = ino_in.0,
            ino_out = ino_out.0,
            offset_in,
            offset_out,
            len
        )
        .entered();
        if !flags.is_empty() {
            reply.error(Errno::EINVAL);
            return;
        }
        self.offload(move |fs| {
            let res = fs.copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len);
            reply_result!("copy_file_range", reply, res, |n| reply.written(n as u32))
        });
    }
}

fn xattr_reply(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

/// A mounted, not yet running, FUSE session.
#[derive(Debug)]
pub struct Mount {
    session: fuser::Session<FuseFs>,
    threads: usize,
}

/// Unmounts a running session from another thread (signal handling).
#[derive(Debug)]
pub struct Unmounter(fuser::SessionUnmounter);

impl Unmounter {
    /// Unmounts; the session's `run` then returns.
    pub fn unmount(&mut self) -> io::Result<()> {
        self.0.unmount()
    }
}

/// Tells the kernel that names or content changed behind its back (ops from other devices),
/// so that it drops what it cached. Errors (the kernel never looked the name up) are ignored.
#[derive(Clone)]
pub struct Invalidator(fuser::Notifier);

impl std::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Invalidator")
    }
}

impl Invalidator {
    /// The name `name` in directory `parent` changed.
    pub fn entry(&self, parent: u64, name: &[u8]) {
        let _ = self.0.inval_entry(INodeNo(parent), OsStr::from_bytes(name));
    }

    /// The attributes or content of `ino` changed.
    pub fn inode(&self, ino: u64) {
        let _ = self.0.inval_inode(INodeNo(ino), 0, -1);
    }
}

impl Mount {
    /// A handle that invalidates the kernel's caches of this mount.
    pub fn invalidator(&self) -> Invalidator {
        Invalidator(self.session.notifier())
    }

    /// Mounts `fs` at `mountpoint` (with `default_permissions`, and `allow_other` if asked).
    pub fn new(
        fs: Arc<Fs>,
        mountpoint: &Path,
        opts: &MountOptions,
        blocking: tokio::runtime::Handle,
    ) -> io::Result<Mount> {
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("pvfs".into()),
            MountOption::Subtype("pvfs".into()),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::RW,
        ];
        if opts.allow_other {
            config.acl = fuser::SessionACL::All;
        }
        config.n_threads = Some(opts.threads.max(1));
        // Each session thread reads its own clone of /dev/fuse: replies need no shared lock.
        config.clone_fd = true;
        let session = fuser::Session::new(FuseFs::new(fs, blocking), mountpoint, &config)?;
        Ok(Mount {
            session,
            threads: opts.threads,
        })
    }

    /// A handle that unmounts this session.
    pub fn unmounter(&mut self) -> Unmounter {
        Unmounter(self.session.unmount_callable())
    }

    /// Serves requests until the filesystem is unmounted.
    pub fn run(self) -> io::Result<()> {
        debug!(threads = self.threads, "serving FUSE requests");
        match self.session.run() {
            // A detached (lazily unmounted) mount whose last open file closed: the kernel
            // ends the connection, and a session thread may see it aborted rather than gone.
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
                debug!("the kernel ended the FUSE connection");
                Ok(())
            }
            res => res,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn fetch_ahead_asks_each_range_once_and_starts_again_after_a_seek() {
        // The first remote read asks for a whole window.
        assert_eq!(ahead_range(0, MIB), (MIB, MIB + FETCH_AHEAD));
        // A sequential reader then asks only for what the window gained.
        let asked = MIB + FETCH_AHEAD;
        assert_eq!(ahead_range(asked, 2 * MIB), (asked, 2 * MIB + FETCH_AHEAD));
        // Nothing new when it has not moved.
        let (start, end) = ahead_range(asked, MIB);
        assert!(start >= end);
        // A seek forward past what was asked, or back before the window, starts anew.
        let far = asked + 10 * FETCH_AHEAD;
        assert_eq!(ahead_range(asked, far), (far, far + FETCH_AHEAD));
        let back = ahead_range(10 * FETCH_AHEAD, 0);
        assert_eq!(back, (0, FETCH_AHEAD));
        // The end of the address space does not overflow.
        assert_eq!(ahead_range(0, u64::MAX), (u64::MAX, u64::MAX));
    }
}
