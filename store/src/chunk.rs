//! Content-defined chunking (FastCDC v2020) and the stored encoding of a chunk.
//!
//! Owns: chunk size parameters, cut-point search over a buffer that starts at a chunk
//! boundary, and per-chunk zstd (skipped for incompressible data).
//! Must not: touch the database. Callers run this on blocking threads, never on async workers.

use bytes::Bytes;

use crate::error::{Result, StoreError};
use crate::types::ChunkId;

/// Smallest chunk FastCDC cuts (except at the end of a file).
pub const MIN_CHUNK: usize = 16 * 1024;
/// Average chunk size.
pub const AVG_CHUNK: usize = 64 * 1024;
/// Largest chunk.
pub const MAX_CHUNK: usize = 256 * 1024;

const ZSTD_LEVEL: i32 = 1;
const SAMPLE: usize = 4096;

/// Lengths of the chunks of `data`, which must start at a chunk boundary.
///
/// With `eof`, the whole buffer is cut (the last chunk ends at the end of `data`). Without it,
/// only chunks whose end is decided by the content are returned: a trailing piece that more data
/// could still extend is left out, so feeding a stream in pieces gives the same cuts as feeding
/// it whole.
pub fn cut(data: &[u8], eof: bool) -> Vec<usize> {
    let mut lens = Vec::with_capacity(data.len() / AVG_CHUNK + 1);
    for c in fastcdc::v2020::FastCDC::new(data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
        let at_end = c.offset + c.length == data.len();
        if at_end && !eof && c.length < MAX_CHUNK {
            break;
        }
        lens.push(c.length);
    }
    lens
}

thread_local! {
    /// One zstd context per thread: creating one per chunk costs more than compressing.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok());
}

fn compress(data: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| c.borrow_mut().as_mut().and_then(|c| c.compress(data).ok()))
}

/// The stored form of a chunk: its zstd frame where that saves at least a ninth, otherwise
/// the plaintext itself (shared, not copied). The length tells them apart: a stored chunk as
/// long as its plaintext is raw, a shorter one is compressed.
pub(crate) fn encode(plain: &Bytes) -> Bytes {
    if looks_compressible(plain) {
        if let Some(z) = compress(plain) {
            if z.len() + z.len() / 8 < plain.len() {
                return Bytes::from(z);
            }
        }
    }
    plain.clone()
}

fn looks_compressible(plain: &[u8]) -> bool {
    if plain.len() <= SAMPLE * 2 {
        return true;
    }
    // A sample from the middle: random-looking data costs one small zstd call, not a full one.
    let mid = plain.len() / 2;
    let sample = &plain[mid - SAMPLE / 2..mid + SAMPLE / 2];
    compress(sample).is_some_and(|z| z.len() < SAMPLE * 15 / 16)
}

/// The plaintext of a stored chunk of plaintext length `len`.
pub(crate) fn decode(stored: &[u8], len: usize) -> Result<Vec<u8>> {
    decode_owned(stored.to_vec(), len).map(|b| b.to_vec())
}

/// Like `decode`, but takes the stored bytes by value: raw chunks are not copied again.
pub(crate) fn decode_owned(stored: Vec<u8>, len: usize) -> Result<Bytes> {
    match stored.len().cmp(&len) {
        std::cmp::Ordering::Equal => Ok(Bytes::from(stored)),
        std::cmp::Ordering::Less => {
            let out = zstd::bulk::decompress(&stored, len)
                .map_err(|e| StoreError::corrupt(format!("chunk does not decompress: {e}")))?;
            if out.len() != len {
                return Err(StoreError::corrupt(
                    "decompressed chunk has the wrong length",
                ));
            }
            Ok(Bytes::from(out))
        }
        std::cmp::Ordering::Greater => Err(StoreError::corrupt(
            "stored chunk is longer than its plaintext",
        )),
    }
}

/// Decodes and checks a stored chunk against its id.
pub(crate) fn decode_verified(id: &ChunkId, stored: Vec<u8>, len: usize) -> Result<Bytes> {
    verified(id, decode_owned(stored, len)?)
}

/// `plain` if it hashes to `id`.
pub(crate) fn verified(id: &ChunkId, plain: Bytes) -> Result<Bytes> {
    if ChunkId::of(&plain) != *id {
        return Err(StoreError::corrupt(format!(
            "chunk {} fails its hash check",
            id.fmt_short()
        )));
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; n];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    #[test]
    fn streaming_cuts_equal_whole_cuts() {
        let data = random(3 << 20, 1);
        let whole = cut(&data, true);
        assert_eq!(whole.iter().sum::<usize>(), data.len());
        // Feed in uneven pieces, carrying the undecided tail forward.
        let mut lens = Vec::new();
        let mut start = 0;
        let mut fed = 0;
        for piece in [100_000, 700_001, 1 << 20, 3 << 20] {
            fed = (fed + piece).min(data.len());
            let eof = fed == data.len();
            for l in cut(&data[start..fed], eof) {
                lens.push(l);
                start += l;
            }
        }
        assert_eq!(lens, whole);
    }

    #[test]
    fn chunk_sizes_are_bounded() {
        let data = random(4 << 20, 2);
        let lens = cut(&data, true);
        let (last, rest) = lens.split_last().unwrap();
        assert!(rest.iter().all(|&l| (MIN_CHUNK..=MAX_CHUNK).contains(&l)));
        assert!(*last <= MAX_CHUNK);
    }

    #[test]
    fn encode_roundtrips_and_skips_random_data() {
        let text = Bytes::from(b"hello pvfs ".repeat(10_000));
        let enc = encode(&text);
        assert!(enc.len() < text.len() / 4);
        assert_eq!(
            decode_verified(&ChunkId::of(&text), enc.to_vec(), text.len()).unwrap(),
            text
        );
        let rnd = Bytes::from(random(64 << 10, 3));
        let enc = encode(&rnd);
        assert_eq!(enc, rnd, "incompressible chunks are stored as they are");
        assert_eq!(enc.as_ptr(), rnd.as_ptr(), "and not copied");
        assert_eq!(decode(&enc, rnd.len()).unwrap(), rnd);
    }

    #[test]
    fn decode_rejects_garbage() {
        assert!(decode(&[7, 1, 2], 2).is_err(), "longer than the plaintext");
        assert!(decode(&[1, 2, 3], 10).is_err(), "not a zstd frame");
        let text = Bytes::from(b"abc".repeat(100));
        let enc = encode(&text).to_vec();
        assert!(decode_verified(&ChunkId::of(b"other"), enc, text.len()).is_err());
    }
}
