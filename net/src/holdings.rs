//! What other devices hold: compact announcements of stored chunks.
//!
//! Owns: `Holdings`, a Bloom filter of chunk ids and its wire form. A device sends one to
//! each peer once their names are in sync, with room to spare, and adds to it with
//! `Held` as it stores more (chunks it fetched, chunks of its own edits); when the additions
//! fill the spare room it sends a fresh filter. Fetch asks the devices whose filter says
//! "maybe" first. At 10 bits a chunk (7 probes) a filter is 1.25 bytes per held chunk, under
//! 1% false positives: 100 GiB of 64 KiB chunks announce in 2 MiB.
//! Must not: decide correctness. A filter says "maybe" or "no"; a "maybe" can be wrong, and a
//! "no" can be stale, so fetch still falls back to every connected device.

use serde::{Deserialize, Serialize};

use pvfs_store::ChunkId;

use crate::error::{NetError, Result};

/// Filter bits per chunk of capacity.
const BITS_PER_CHUNK: u64 = 10;
/// Probes per chunk (optimal for 10 bits: 10 ln 2).
const PROBES: u8 = 7;
/// Smallest filter, bytes.
const MIN_BYTES: usize = 128;
/// Largest filter, bytes (a frame holds it; about 5 million chunks at full precision, more
/// at a higher false-positive rate).
pub const MAX_BYTES: usize = 6 << 20;

/// A Bloom filter of the chunks one device holds.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holdings {
    /// Probes per chunk.
    probes: u8,
    /// Chunks added (announced count; additions counted too).
    count: u64,
    /// The bit array.
    bits: Vec<u8>,
}

impl std::fmt::Debug for Holdings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holdings")
            .field("probes", &self.probes)
            .field("count", &self.count)
            .field("bytes", &self.bits.len())
            .finish()
    }
}

impl Holdings {
    /// An empty filter with room for `capacity` chunks.
    pub fn with_capacity(capacity: u64) -> Holdings {
        let bytes =
            (capacity.saturating_mul(BITS_PER_CHUNK) / 8).clamp(MIN_BYTES as u64, MAX_BYTES as u64);
        Holdings {
            probes: PROBES,
            count: 0,
            bits: vec![0; bytes as usize],
        }
    }

    /// Chunks this filter has room for at its designed precision.
    pub fn capacity(&self) -> u64 {
        self.bits.len() as u64 * 8 / BITS_PER_CHUNK
    }

    /// Chunks added so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Size of the bit array, bytes.
    pub fn bytes(&self) -> usize {
        self.bits.len()
    }

    /// Checks a filter from a peer before it is used.
    pub fn validate(&self) -> Result<()> {
        if !(1..=16).contains(&self.probes) {
            return Err(NetError::Malformed(format!(
                "holdings filter with {} probes",
                self.probes
            )));
        }
        if !(MIN_BYTES..=MAX_BYTES).contains(&self.bits.len()) {
            return Err(NetError::Malformed(format!(
                "holdings filter of {} bytes",
                self.bits.len()
            )));
        }
        Ok(())
    }

    /// The bit positions of `id`. Chunk ids are BLAKE3 hashes, uniform already: two words of
    /// the id drive double hashing.
    fn positions(&self, id: &ChunkId) -> impl Iterator<Item = usize> {
        let word = |i: usize| {
            u64::from_le_bytes(id.0[i * 8..i * 8 + 8].try_into().expect("8 bytes of 32"))
        };
        let (h1, h2) = (word(0), word(1) | 1);
        let m = self.bits.len() as u64 * 8;
        (0..u64::from(self.probes)).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) % m) as usize)
    }

    /// Records that `id` is held.
    pub fn insert(&mut self, id: &ChunkId) {
        let positions: Vec<usize> = self.positions(id).collect();
        for p in positions {
            self.bits[p / 8] |= 1 << (p % 8);
        }
        self.count += 1;
    }

    /// False if `id` is surely not held; true if it may be.
    pub fn may_hold(&self, id: &ChunkId) -> bool {
        self.positions(id)
            .all(|p| self.bits[p / 8] & (1 << (p % 8)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ChunkId {
        ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let mut h = Holdings::with_capacity(20_000);
        for n in 0..20_000 {
            h.insert(&id(n));
        }
        assert!((0..20_000).all(|n| h.may_hold(&id(n))));
        let false_pos = (1_000_000..1_100_000)
            .filter(|n| h.may_hold(&id(*n)))
            .count();
        // Designed for under 1%; 2% leaves room for chance.
        assert!(false_pos < 2_000, "{false_pos} false positives in 100,000");
        assert_eq!(h.count(), 20_000);
        assert_eq!(h.capacity(), 20_000);
    }

    #[test]
    fn an_empty_filter_holds_nothing_and_sizes_are_bounded() {
        let h = Holdings::with_capacity(0);
        assert!(!h.may_hold(&id(1)));
        assert_eq!(h.bytes(), MIN_BYTES);
        assert_eq!(Holdings::with_capacity(u64::MAX).bytes(), MAX_BYTES);
        h.validate().unwrap();
    }

    #[test]
    fn malformed_filters_are_refused() {
        let mut h = Holdings::with_capacity(10);
        h.probes = 0;
        assert!(h.validate().is_err());
        h.probes = 7;
        h.bits = vec![0; 3];
        assert!(h.validate().is_err());
        h.bits = vec![0; MAX_BYTES + 1];
        assert!(h.validate().is_err());
    }
}
