//! Who made an op, and the proof of it.
//!
//! Owns: the hash chain of each writer's ops (an op names the hash of its writer's previous
//! op), the Ed25519 signature of every op by its author's device key, the table of device
//! keys (`key/<device>` in `Cf::Meta`, learnt from any source: a key is only ever stored under
//! the device id it derives), the evidence kept when a device signs two different ops under
//! one id, and `DeviceKey`, a signer for tests and simulations.
//! Must not: decide what an op does (that is `replica`), or hold the daemon's key file (the
//! daemon's identity implements `Signer`).
//!
//! Why a chain and a signature on every op: the signature makes an op the author's whoever
//! relays it; the chain makes a writer's history one sequence, so that a relayed op that does
//! not follow what a device holds is refused, and a second op under a held id is proof of
//! equivocation (both carry the author's signature).

use ring::signature::{self, KeyPair};

use crate::error::{Result, StoreError};
use crate::records::{self, OpKind, OpRecord};
use crate::types::{DeviceId, Hlc, OpId};

/// The hash of an op (BLAKE3 of its fields but the signature).
pub type OpHash = [u8; 32];

/// The `prev` of a writer's first op.
pub const GENESIS: OpHash = [0; 32];

/// Length of an Ed25519 public key.
pub const KEY_LEN: usize = 32;

/// Length of an Ed25519 signature.
pub const SIG_LEN: usize = 64;

/// Signs this device's ops with its device key (`pvfs-store` holds no key files: the
/// daemon's identity implements this).
pub trait Signer: Send + Sync + std::fmt::Debug {
    /// The Ed25519 public key, raw (32 bytes); the device id is derived from it.
    fn public_key(&self) -> Vec<u8>;
    /// An Ed25519 signature of `msg`.
    fn sign(&self, msg: &[u8]) -> Vec<u8>;
}

/// An Ed25519 key held in memory: for tests, simulations and benchmarks (the daemon signs
/// with its device certificate's key).
pub struct DeviceKey(signature::Ed25519KeyPair);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKey({})", self.device())
    }
}

impl DeviceKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<DeviceKey> {
        let seed: [u8; 32] = crate::types::os_random()?;
        Ok(DeviceKey::from_seed(seed))
    }

    /// The key made from `seed` (deterministic: simulations replay a seed).
    pub fn from_seed(seed: [u8; 32]) -> DeviceKey {
        DeviceKey(
            signature::Ed25519KeyPair::from_seed_unchecked(&seed)
                .expect("any 32 bytes are an Ed25519 seed"),
        )
    }

    /// The device id of this key.
    pub fn device(&self) -> DeviceId {
        DeviceId::from_public_key(self.0.public_key().as_ref())
    }
}

impl Signer for DeviceKey {
    fn public_key(&self) -> Vec<u8> {
        self.0.public_key().as_ref().to_vec()
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.0.sign(msg).as_ref().to_vec()
    }
}

/// The hash of `op`: its id, clock, predecessor and change (not its signature).
pub fn op_hash(op: &OpRecord) -> OpHash {
    hash_fields(op.id, op.hlc, &op.prev, &op.kind)
}

pub(crate) fn hash_fields(id: OpId, hlc: Hlc, prev: &OpHash, kind: &OpKind) -> OpHash {
    let bytes = records::encode(&("pvfs op 1", id, hlc, prev, kind));
    *blake3::hash(&bytes).as_bytes()
}

/// What an op's author signs: the op's hash, bound to the namespace.
pub fn sign_message(namespace: &[u8; 16], hash: &OpHash) -> Vec<u8> {
    records::encode(&("pvfs op signature 1", namespace, hash))
}

/// The raw public key of `signer` and the device it derives, if it is a 32-byte key.
pub(crate) fn signer_key(signer: &dyn Signer) -> Result<([u8; KEY_LEN], DeviceId)> {
    let key = signer.public_key();
    let key: [u8; KEY_LEN] = key
        .as_slice()
        .try_into()
        .map_err(|_| StoreError::Invalid("the device key is not an Ed25519 key".into()))?;
    Ok((key, DeviceId::from_public_key(&key)))
}

/// Checks `op`'s signature against its author's `key`; returns the op's hash.
pub fn verify(namespace: &[u8; 16], key: &[u8; KEY_LEN], op: &OpRecord) -> Result<OpHash> {
    if DeviceId::from_public_key(key) != op.id.device {
        return Err(StoreError::Invalid(
            "the key given for the op's author is another device's".into(),
        ));
    }
    let hash = op_hash(op);
    signature::UnparsedPublicKey::new(&signature::ED25519, key)
        .verify(&sign_message(namespace, &hash), &op.sig)
        .map_err(|_| StoreError::Invalid("a bad signature".into()))?;
    Ok(hash)
}

/// Proof that a device signed two different ops under one id.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Evidence {
    /// The op this device held first.
    pub held: OpRecord,
    /// The other op, with the same id and a valid signature.
    pub other: OpRecord,
}

impl Evidence {
    /// True if the two ops share an id, differ, and both carry valid signatures by `key`.
    pub fn proves(&self, namespace: &[u8; 16], key: &[u8; KEY_LEN]) -> bool {
        self.held.id == self.other.id
            && matches!(
                (verify(namespace, key, &self.held), verify(namespace, key, &self.other)),
                (Ok(a), Ok(b)) if a != b
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::NodeId;

    fn op(key: &DeviceKey, ns: &[u8; 16], seq: u64, prev: OpHash, perm: u32) -> OpRecord {
        let mut op = OpRecord {
            id: OpId {
                device: key.device(),
                incarnation: 7,
                seq,
            },
            hlc: Hlc(seq),
            prev,
            kind: OpKind::SetAttr {
                node: NodeId(1 << 20),
                perm: Some(perm),
                uid: None,
                gid: None,
                atime: None,
                mtime: None,
                ctime: Default::default(),
            },
            sig: Vec::new(),
        };
        op.sig = key.sign(&sign_message(ns, &op_hash(&op)));
        op
    }

    #[test]
    fn signatures_bind_every_field_and_the_namespace() {
        let (k, other) = (DeviceKey::from_seed([1; 32]), DeviceKey::from_seed([2; 32]));
        let ns = [9; 16];
        let pk: [u8; 32] = k.public_key().try_into().unwrap();
        let good = op(&k, &ns, 1, GENESIS, 0o644);
        assert_eq!(verify(&ns, &pk, &good).unwrap(), op_hash(&good));
        // Another namespace, another key, or any field changed: refused.
        assert!(verify(&[8; 16], &pk, &good).is_err());
        let opk: [u8; 32] = other.public_key().try_into().unwrap();
        assert!(verify(&ns, &opk, &good).is_err());
        let mut t = good.clone();
        t.prev = [1; 32];
        assert!(verify(&ns, &pk, &t).is_err());
        let mut t = good.clone();
        t.hlc = Hlc(99);
        assert!(verify(&ns, &pk, &t).is_err());
        let mut t = good.clone();
        t.id.incarnation = 8;
        assert!(verify(&ns, &pk, &t).is_err());
        let mut t = good.clone();
        t.sig.truncate(10);
        assert!(verify(&ns, &pk, &t).is_err());
        // Equivocation: two signed ops under one id prove it; one op twice does not.
        let twin = op(&k, &ns, 1, GENESIS, 0o600);
        let e = Evidence {
            held: good.clone(),
            other: twin,
        };
        assert!(e.proves(&ns, &pk));
        let same = Evidence {
            held: good.clone(),
            other: good,
        };
        assert!(!same.proves(&ns, &pk));
    }
}
