//! Identifiers and small value types shared by every pvfs crate.
//!
//! Owns: `ChunkId`, `NodeId`, `DeviceId`, `Ino`, `OpId`, `Hlc`, `Timestamp`, `FileKind`.
//! Must not: know about RocksDB, FUSE or the network.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The BLAKE3 hash of a chunk's plaintext: its global, content-derived id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Hashes `data` with BLAKE3.
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// The first 8 bytes in hex, for logs.
    pub fn fmt_short(&self) -> String {
        hex(&self.0[..8])
    }

    /// The full id in hex.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.fmt_short())
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A global, device-independent id of a filesystem object (file, directory, symlink, ...).
///
/// FUSE inode numbers are a per-device map onto these (`Ino`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u128);

impl NodeId {
    /// The root directory of every namespace.
    pub const ROOT: NodeId = NodeId(1);

    /// The id made of 16 unique bytes (`Env::unique`), unless it falls among the small
    /// values reserved for well-known nodes.
    pub fn from_unique(bytes: [u8; 16]) -> Option<NodeId> {
        let id = u128::from_le_bytes(bytes);
        (id > 0xffff).then_some(NodeId(id))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({:032x})", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The id of a device: derived from its public key by the identity code in `tools`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(pub [u8; 16]);

impl DeviceId {
    /// The device id belonging to an Ed25519 public key: the first 16 bytes of its BLAKE3 hash.
    pub fn from_public_key(key: &[u8]) -> DeviceId {
        let hash = blake3::hash(key);
        let mut id = [0u8; 16];
        id.copy_from_slice(&hash.as_bytes()[..16]);
        DeviceId(id)
    }

    /// The first 4 bytes in hex, for logs and conflict names.
    pub fn fmt_short(&self) -> String {
        hex(&self.0[..4])
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", hex(&self.0))
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl std::str::FromStr for DeviceId {
    type Err = String;

    /// The 32 hex digits `Display` writes.
    fn from_str(s: &str) -> std::result::Result<DeviceId, String> {
        let bad = || format!("{s:?} is not a device id (32 hex digits)");
        if s.len() != 32 {
            return Err(bad());
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = s
                .get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(bad)?;
        }
        Ok(DeviceId(id))
    }
}

/// A local inode number: stable for the life of a node on this device, never reused.
pub type Ino = u64;

/// The inode number of the root directory.
pub const ROOT_INO: Ino = 1;

/// A hybrid logical clock value: milliseconds since the Unix epoch in the high 48 bits,
/// a logical counter in the low 16 bits.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Hlc(pub u64);

impl Hlc {
    /// The clock value following `self`, given the wall clock `now_ms`.
    pub fn tick(self, now_ms: u64) -> Hlc {
        let wall = now_ms << 16;
        if wall > self.0 {
            Hlc(wall)
        } else {
            Hlc(self.0.saturating_add(1))
        }
    }

    /// The physical part, in milliseconds since the Unix epoch.
    pub fn millis(self) -> u64 {
        self.0 >> 16
    }
}

/// One incarnation of a device's op log: every opening of a store starts a new one, so that a
/// store restored from a backup (or one that lost the tail of its log in a power cut) never
/// makes a second, different op under an id its peers already hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Writer {
    /// The device (the author of every op of this writer).
    pub device: DeviceId,
    /// A random id of one opening of the device's store.
    pub incarnation: u64,
}

impl Writer {
    /// Device and incarnation for logs: `0a1b2c3d/5e6f7a8b`.
    pub fn fmt_short(&self) -> String {
        format!(
            "{}/{}",
            self.device.fmt_short(),
            hex(&self.incarnation.to_be_bytes()[..4])
        )
    }
}

/// The id of an op: its writer (device and incarnation) and its place in that writer's
/// gap-free sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OpId {
    /// The device that made the change (its author).
    pub device: DeviceId,
    /// The incarnation of the device's store that made it.
    pub incarnation: u64,
    /// Its sequence number in that incarnation, starting at 1.
    pub seq: u64,
}

impl OpId {
    /// The writer whose sequence this op belongs to.
    pub fn writer(&self) -> Writer {
        Writer {
            device: self.device,
            incarnation: self.incarnation,
        }
    }

    /// Device, incarnation and sequence number for logs.
    pub fn fmt_short(&self) -> String {
        format!("{}#{}", self.writer().fmt_short(), self.seq)
    }
}

/// A point in time with nanosecond precision; seconds may be negative (before 1970).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub sec: i64,
    /// Nanoseconds, 0..1e9.
    pub nsec: u32,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        Timestamp::from(std::time::SystemTime::now())
    }

    /// Milliseconds since the epoch, saturating at 0 for times before it.
    pub fn millis(self) -> u64 {
        if self.sec < 0 {
            0
        } else {
            (self.sec as u64) * 1000 + u64::from(self.nsec) / 1_000_000
        }
    }
}

impl From<std::time::SystemTime> for Timestamp {
    fn from(t: std::time::SystemTime) -> Timestamp {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Timestamp {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos();
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Timestamp { sec, nsec }
            }
        }
    }
}

impl From<Timestamp> for std::time::SystemTime {
    fn from(t: Timestamp) -> std::time::SystemTime {
        let base = std::time::UNIX_EPOCH;
        if t.sec >= 0 {
            base + std::time::Duration::new(t.sec as u64, t.nsec)
        } else {
            base - std::time::Duration::from_secs(t.sec.unsigned_abs())
                + std::time::Duration::from_nanos(u64::from(t.nsec))
        }
    }
}

/// What kind of object a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    /// A regular file with content.
    File,
    /// A directory.
    Dir,
    /// A symbolic link; its target is stored with the node.
    Symlink,
    /// A named pipe (the kernel implements it; pvfs stores the name and attributes).
    Fifo,
    /// A Unix socket name.
    Socket,
    /// A character device node (never opened through pvfs: the mount is `nodev`).
    CharDevice,
    /// A block device node (never opened through pvfs: the mount is `nodev`).
    BlockDevice,
}

impl FileKind {
    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => libc::S_IFREG,
            FileKind::Dir => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
            FileKind::CharDevice => libc::S_IFCHR,
            FileKind::BlockDevice => libc::S_IFBLK,
        }
    }

    /// The kind named by the `S_IFMT` bits of `mode`, if any.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Some(FileKind::File),
            libc::S_IFDIR => Some(FileKind::Dir),
            libc::S_IFLNK => Some(FileKind::Symlink),
            libc::S_IFIFO => Some(FileKind::Fifo),
            libc::S_IFSOCK => Some(FileKind::Socket),
            libc::S_IFCHR => Some(FileKind::CharDevice),
            libc::S_IFBLK => Some(FileKind::BlockDevice),
            _ => None,
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Random bytes from the operating system, for secrets and keys: an error if the operating
/// system has no random source (never a guessable fallback).
pub fn os_random<const N: usize>() -> crate::Result<[u8; N]> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| {
        crate::StoreError::Io(std::io::Error::other(format!(
            "the operating system's random source failed: {e}"
        )))
    })?;
    Ok(buf)
}

/// Random bytes for ids that must be unique, not secret (node ids, incarnations): from the
/// operating system, or, where it has no random source, a hash of time, pid and a counter.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    if getrandom::fill(&mut buf).is_err() {
        // No kernel entropy source at all: hash time, pid and a counter, unique per process.
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let seed = format!(
            "{t}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        blake3::Hasher::new()
            .update(seed.as_bytes())
            .finalize_xof()
            .fill(&mut buf);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_roundtrips_before_epoch() {
        let t = Timestamp { sec: -5, nsec: 250 };
        let st: std::time::SystemTime = t.into();
        assert_eq!(Timestamp::from(st), t);
    }

    #[test]
    fn hlc_is_monotonic() {
        let a = Hlc::default().tick(100);
        let b = a.tick(100);
        let c = b.tick(50);
        assert!(a < b && b < c);
        assert_eq!(a.millis(), 100);
    }

    #[test]
    fn device_ids_parse_what_they_print() {
        let d = DeviceId([0xab; 16]);
        assert_eq!(d.to_string().parse::<DeviceId>(), Ok(d));
        for bad in ["", "ab", &"zz".repeat(16), &"é".repeat(16)] {
            assert!(bad.parse::<DeviceId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn node_ids_differ() {
        assert_eq!(NodeId::from_unique([0xff; 16]), Some(NodeId(u128::MAX)));
        assert_eq!(NodeId::from_unique([0; 16]), None);
    }
}
