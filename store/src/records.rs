//! On-disk records and key encodings.
//!
//! Owns: the serde structs stored in each column family, the op log's record format, and the
//! byte layout of every key (big-endian integers so that RocksDB's order is numeric order).
//! Must not: contain logic beyond encoding; these types change only with a format version bump.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::types::{ChunkId, DeviceId, FileKind, Hlc, Ino, NodeId, OpId, Timestamp, Writer};

/// The on-disk format version written to `meta/format`.
pub(crate) const FORMAT_VERSION: u32 = 4;

/// A node (file, directory, symlink, special file) as stored in `Cf::Nodes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The global id.
    pub id: NodeId,
    /// What kind of object this is.
    pub kind: FileKind,
    /// Permission bits including setuid/setgid/sticky (no `S_IFMT` bits).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number of character/block device nodes.
    pub rdev: u32,
    /// Number of names (directories: 2 + subdirectories).
    pub nlink: u32,
    /// Size in bytes (files: logical size including holes; symlinks: target length).
    pub size: u64,
    /// Last access, as set by the user (pvfs does not update it on read).
    pub atime: Timestamp,
    /// Last content change.
    pub mtime: Timestamp,
    /// Last change of content or attributes.
    pub ctime: Timestamp,
    /// Creation time.
    pub btime: Timestamp,
    /// Directories: the parent directory's ino (the root is its own parent). Others: 0.
    pub parent: Ino,
    /// The op that last changed the content, the base of the next edit (for conflict detection).
    pub version: Option<OpId>,
    /// When each attribute register was last set (last writer wins between devices).
    pub stamps: Stamps,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
}

/// The clocks of a node's last-writer-wins registers. Between devices the later clock wins;
/// on equal clocks the larger value, so every device picks the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamps {
    /// Permission bits.
    pub mode: Hlc,
    /// Owner and group.
    pub owner: Hlc,
    /// Access time.
    pub atime: Hlc,
    /// Modification time.
    pub mtime: Hlc,
    /// Unused: each extended attribute has a register of its own (`Cf::XattrRegs`); kept
    /// so that records of format 4 still decode.
    pub xattrs: Hlc,
}

/// A directory entry as stored in `Cf::Dirents`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirentRecord {
    /// The child.
    pub ino: Ino,
    /// The child's kind, so that readdir needs no node lookups.
    pub kind: FileKind,
    /// The entry's global id: the node's id for its first name (and for every directory),
    /// a fresh id for each further hard link.
    pub entry: NodeId,
}

/// Where an entry (one name of a node) is, in `Cf::Entries`: the replicated tree's edge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRecord {
    /// The directory.
    pub parent: NodeId,
    /// The name in it (after conflict renaming).
    pub name: Vec<u8>,
    /// The node named.
    pub node: NodeId,
}

/// Where a node came from, in `Cf::Born`: kept after the node is deleted, so that a late op
/// that brings the node back can rebuild it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BornRecord {
    /// The `Create` op.
    pub created: OpId,
    /// The content version the node had when it was last deleted.
    pub version: Option<OpId>,
    /// Its attribute registers while it is deleted here (`None`: as its `Create` op made
    /// them): ops that change them go on applying, so that a node a late op brings back
    /// has the attributes it has everywhere else.
    pub attrs: Option<Attrs>,
}

/// The last-writer-wins attributes of a node, kept in `BornRecord` while it is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Attrs {
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub stamps: Stamps,
}

impl Attrs {
    pub(crate) fn of(n: &NodeRecord) -> Attrs {
        Attrs {
            perm: n.perm,
            uid: n.uid,
            gid: n.gid,
            atime: n.atime,
            mtime: n.mtime,
            stamps: n.stamps,
        }
    }

    pub(crate) fn apply_to(&self, n: &mut NodeRecord) {
        n.perm = self.perm;
        n.uid = self.uid;
        n.gid = self.gid;
        n.atime = self.atime;
        n.mtime = self.mtime;
        n.stamps = self.stamps;
    }
}

/// A member device of the namespace, in `Cf::Meta` under `member/<device>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Its name.
    pub name: String,
    /// Whether a member ever added it (a removal alone does not make a device known).
    pub added: bool,
    /// Removed devices stay removed: they are refused from then on.
    pub removed: bool,
}

/// The last checkpoint of the logs (`crate::compact`), in `Cf::Meta` under `checkpoint`:
/// every op with a clock before `horizon` is compacted (gone from the op log and the move
/// log; what later ops may still need of it is kept in a `Compacted` record).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CheckpointRecord {
    /// No op before this clock is applied any more.
    pub horizon: Hlc,
    /// Per writer, its last compacted op: sequence number and hash (where its chain in the
    /// op log resumes).
    pub cut: std::collections::BTreeMap<Writer, (u64, [u8; 32])>,
}

impl CheckpointRecord {
    /// True if `id` is at or before its writer's cut (gone from the op log, or about to be).
    pub(crate) fn covers(&self, id: OpId) -> bool {
        self.cut
            .get(&id.writer())
            .is_some_and(|&(seq, _)| id.seq <= seq)
    }
}

/// What is kept of a compacted op that later ops may still need, in `Cf::Meta` under
/// `compacted/<op id>`: the `Create` of a node that still exists, or the whole content of a
/// file version that later edits build on (a `Content` op from offset 0 with no base).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CompactedOp {
    /// The op's clock.
    pub hlc: Hlc,
    /// Its change (for content: the whole version).
    pub kind: OpKind,
}

/// A place in the tree: directory and name.
pub type Loc = (NodeId, Vec<u8>);

/// One entry move in the move log (`Cf::Moves`), keyed by the op's clock, device, sequence
/// number and the move's index within the op: what undo and redo need.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MoveRecord {
    /// The entry moved.
    pub entry: NodeId,
    /// The node it names.
    pub node: NodeId,
    /// The node's kind.
    pub kind: FileKind,
    /// Where the op asked the entry to go (`None`: out of the tree).
    pub target: Option<Loc>,
    /// Where the entry was before the op (`None`: not in the tree).
    pub from: Option<Loc>,
    /// Where the op put it (equals `from` when the move was skipped).
    pub to: Option<Loc>,
    /// For moves out of the tree: the content version the op's device saw, so that an edit
    /// it did not see survives the delete.
    pub seen: Option<OpId>,
}

/// One piece of a file's content: the chunk that holds bytes `[offset, offset + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentRecord {
    /// The chunk.
    pub chunk: ChunkId,
    /// The chunk's length.
    pub len: u32,
}

/// Reference count and sizes of a stored chunk, in `Cf::Refs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RefRecord {
    /// Number of extents, in all files, that use this chunk.
    pub count: u64,
    /// Plaintext length.
    pub len: u32,
    /// Encoded (possibly compressed) length as stored.
    pub stored: u32,
}

/// Running totals kept with every commit, checked by fsck.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsRecord {
    /// Nodes of every kind.
    pub nodes: u64,
    /// Regular files.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Sum of the sizes of regular files (each hard-linked file once).
    pub logical_bytes: u64,
    /// Sum of the lengths of all extents (bytes that are data, not holes).
    pub referenced_bytes: u64,
    /// Distinct chunks stored.
    pub chunks: u64,
    /// Their plaintext bytes.
    pub chunk_bytes: u64,
    /// Their stored (encoded) bytes.
    pub stored_bytes: u64,
}

/// One change to the namespace, as recorded in the op log and sent between devices.
///
/// The ops of one writer form a hash chain (`prev`), and each carries its author's Ed25519
/// signature of its hash (`crate::auth`): whoever relays an op, it is the author's, and a
/// second, different op under the same id is evidence of a misbehaving device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    /// Device, incarnation and sequence number.
    pub id: OpId,
    /// Hybrid logical clock when the op was made.
    pub hlc: Hlc,
    /// The hash of the writer's previous op (`auth::GENESIS` for its first).
    pub prev: [u8; 32],
    /// What changed.
    pub kind: OpKind,
    /// The author's Ed25519 signature of the op's hash (`auth::sign_message`), 64 bytes.
    pub sig: Vec<u8>,
}

/// The kinds of namespace change. Names are raw bytes (validated on apply).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpKind {
    /// A new node under a name.
    Create {
        /// The new node.
        node: NodeId,
        /// Its directory.
        parent: NodeId,
        /// Its name.
        name: Vec<u8>,
        /// Its kind.
        kind: FileKind,
        /// Permission bits.
        perm: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
        /// Device number for device nodes.
        rdev: u32,
        /// Symlink target.
        target: Option<Vec<u8>>,
        /// Creation time.
        time: Timestamp,
    },
    /// A further name for an existing node.
    Link {
        /// The node.
        node: NodeId,
        /// The new entry.
        entry: NodeId,
        /// The directory of the new name.
        parent: NodeId,
        /// The new name.
        name: Vec<u8>,
        /// When.
        time: Timestamp,
    },
    /// A name removed (the node goes when its last name and last open handle are gone).
    Unlink {
        /// The node the name pointed to.
        node: NodeId,
        /// The entry removed.
        entry: NodeId,
        /// The node's content version when it was removed.
        seen: Option<OpId>,
        /// The directory.
        parent: NodeId,
        /// The name.
        name: Vec<u8>,
        /// When.
        time: Timestamp,
    },
    /// A name moved (and possibly a name replaced, or two names swapped).
    Rename {
        /// The node moved.
        node: NodeId,
        /// The entry moved.
        entry: NodeId,
        /// Old directory.
        from_parent: NodeId,
        /// Old name.
        from_name: Vec<u8>,
        /// New directory.
        to_parent: NodeId,
        /// New name.
        to_name: Vec<u8>,
        /// The node and entry that had the new name: replaced, or moved to the old name on
        /// exchange; with the content version of the replaced node.
        other: Option<(NodeId, NodeId, Option<OpId>)>,
        /// Whether the two names were swapped.
        exchange: bool,
        /// When.
        time: Timestamp,
    },
    /// Attributes changed.
    SetAttr {
        /// The node.
        node: NodeId,
        /// New permission bits.
        perm: Option<u32>,
        /// New owner.
        uid: Option<u32>,
        /// New group.
        gid: Option<u32>,
        /// New access time.
        atime: Option<Timestamp>,
        /// New modification time.
        mtime: Option<Timestamp>,
        /// The resulting change time.
        ctime: Timestamp,
    },
    /// An extended attribute set (`Some`) or removed (`None`).
    SetXattr {
        /// The node.
        node: NodeId,
        /// Attribute name.
        name: Vec<u8>,
        /// New value.
        value: Option<Vec<u8>>,
    },
    /// A device joined the namespace (`added`) or was removed from it, for good. Only a
    /// member's op can change membership.
    Member {
        /// The device.
        device: DeviceId,
        /// Its name.
        name: String,
        /// Added or removed.
        added: bool,
    },
    /// File content changed: extents in `[start, end)` replaced by `extents`, size set.
    Content {
        /// The file.
        node: NodeId,
        /// The version this edit was based on.
        base: Option<OpId>,
        /// Start of the replaced range.
        start: u64,
        /// End of the replaced range.
        end: u64,
        /// New extents (offset, chunk, length) inside `[start, end)`; gaps are holes.
        extents: Vec<(u64, ChunkId, u32)>,
        /// The file size afterwards.
        size: u64,
        /// The modification time afterwards.
        mtime: Timestamp,
    },
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("serializing plain data into a Vec cannot fail")
}

pub(crate) fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::corrupt(format!("{what}: {e}")))
}

pub(crate) mod key {
    //! Key layouts.
    use super::*;

    pub(crate) fn ino(ino: Ino) -> [u8; 8] {
        ino.to_be_bytes()
    }

    pub(crate) fn ino_of(key: &[u8]) -> Result<Ino> {
        let b: [u8; 8] = key
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| StoreError::corrupt("short key"))?;
        Ok(Ino::from_be_bytes(b))
    }

    pub(crate) fn node_id(id: NodeId) -> [u8; 16] {
        id.0.to_be_bytes()
    }

    pub(crate) fn dirent(parent: Ino, name: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(8 + name.len());
        k.extend_from_slice(&parent.to_be_bytes());
        k.extend_from_slice(name);
        k
    }

    pub(crate) fn extent(ino: Ino, offset: u64) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&ino.to_be_bytes());
        k[8..].copy_from_slice(&offset.to_be_bytes());
        k
    }

    pub(crate) fn extent_offset(key: &[u8]) -> Result<(Ino, u64)> {
        if key.len() != 16 {
            return Err(StoreError::corrupt("extent key length"));
        }
        let ino = ino_of(key)?;
        let off = u64::from_be_bytes(key[8..16].try_into().expect("length checked above"));
        Ok((ino, off))
    }

    pub(crate) fn xattr(ino: Ino, name: &[u8]) -> Vec<u8> {
        dirent(ino, name)
    }

    /// The register of extended attribute `name` of `node` (`Cf::XattrRegs`).
    pub(crate) fn xattr_reg(node: NodeId, name: &[u8]) -> Vec<u8> {
        let mut k = node_id(node).to_vec();
        k.extend_from_slice(name);
        k
    }

    pub(crate) fn pending(id: &ChunkId, token: u64) -> [u8; 40] {
        let mut k = [0u8; 40];
        k[..32].copy_from_slice(&id.0);
        k[32..].copy_from_slice(&token.to_be_bytes());
        k
    }

    /// An upper bound of the pending-marker keys of `id` (they start with `id.0`).
    pub(crate) fn pending_end(id: &ChunkId) -> Vec<u8> {
        let mut end = id.0.to_vec();
        end.extend_from_slice(&[0xff; 9]);
        end
    }

    /// Length of a move-log key.
    pub(crate) const MV_LEN: usize = 41;

    /// Move-log key: clock, device, incarnation, sequence number, index of the move within
    /// the op; the order is the total order in which ops are applied.
    pub(crate) fn mv(hlc: Hlc, op: OpId, idx: u8) -> [u8; MV_LEN] {
        let mut k = [0u8; MV_LEN];
        k[..8].copy_from_slice(&hlc.0.to_be_bytes());
        k[8..40].copy_from_slice(&op_id(op));
        k[40] = idx;
        k
    }

    /// The device and clock of the op a move-log key belongs to.
    pub(crate) fn mv_origin(k: &[u8]) -> Result<(DeviceId, Hlc)> {
        if k.len() != MV_LEN {
            return Err(StoreError::corrupt("move key length"));
        }
        let hlc = Hlc(u64::from_be_bytes(
            k[..8].try_into().expect("length checked"),
        ));
        let dev = DeviceId(k[8..24].try_into().expect("length checked"));
        Ok((dev, hlc))
    }

    /// The writer prefix of op-log keys.
    pub(crate) fn writer(w: Writer) -> [u8; 24] {
        let mut k = [0u8; 24];
        k[..16].copy_from_slice(&w.device.0);
        k[16..].copy_from_slice(&w.incarnation.to_be_bytes());
        k
    }

    /// Op-log key: writer, then sequence number.
    pub(crate) fn op_id(id: OpId) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[..24].copy_from_slice(&writer(id.writer()));
        k[24..].copy_from_slice(&id.seq.to_be_bytes());
        k
    }

    /// The op id an op-log key names.
    pub(crate) fn op_id_of(k: &[u8]) -> Result<OpId> {
        let k: &[u8; 32] = k
            .try_into()
            .map_err(|_| StoreError::corrupt("op key length"))?;
        Ok(OpId {
            device: DeviceId(k[..16].try_into().expect("16 of 32 bytes")),
            incarnation: u64::from_be_bytes(k[16..24].try_into().expect("8 of 32 bytes")),
            seq: u64::from_be_bytes(k[24..].try_into().expect("8 of 32 bytes")),
        })
    }

    pub(crate) const META_FORMAT: &[u8] = b"format";
    pub(crate) const META_DEVICE: &[u8] = b"device";
    pub(crate) const META_NAMESPACE: &[u8] = b"namespace";
    pub(crate) const META_NEXT_INO: &[u8] = b"next_ino";
    pub(crate) const META_NEXT_SEQ: &[u8] = b"next_seq";
    pub(crate) const META_HLC: &[u8] = b"hlc";
    pub(crate) const META_STATS: &[u8] = b"stats";
    pub(crate) const META_INCARNATION: &[u8] = b"incarnation";
    pub(crate) const META_LAST_HASH: &[u8] = b"last_hash";
    pub(crate) const META_HEADS: &[u8] = b"heads";
    pub(crate) const META_MEMBER: &[u8] = b"member/";
    pub(crate) const META_MEMBER_OP: &[u8] = b"member_op/";
    pub(crate) const META_KEY: &[u8] = b"key/";
    pub(crate) const META_EVIDENCE: &[u8] = b"evidence/";
    pub(crate) const META_CHECKPOINT: &[u8] = b"checkpoint";
    pub(crate) const META_COMPACTED: &[u8] = b"compacted/";

    pub(crate) fn compacted(id: OpId) -> Vec<u8> {
        let mut k = META_COMPACTED.to_vec();
        k.extend_from_slice(&op_id(id));
        k
    }

    pub(crate) fn member_op(id: OpId) -> Vec<u8> {
        let mut k = META_MEMBER_OP.to_vec();
        k.extend_from_slice(&op_id(id));
        k
    }

    pub(crate) fn device_key(device: &DeviceId) -> Vec<u8> {
        let mut k = META_KEY.to_vec();
        k.extend_from_slice(&device.0);
        k
    }

    pub(crate) fn evidence(device: &DeviceId) -> Vec<u8> {
        let mut k = META_EVIDENCE.to_vec();
        k.extend_from_slice(&device.0);
        k
    }

    pub(crate) fn member(device: &DeviceId) -> Vec<u8> {
        let mut k = META_MEMBER.to_vec();
        k.extend_from_slice(&device.0);
        k
    }
}
