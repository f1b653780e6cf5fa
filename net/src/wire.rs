//! The wire protocol between devices: messages, their encoding, and framing.
//!
//! Owns: the `Message` types, their limits, and the frame format: a 4-byte big-endian
//! length, then the message in postcard's compact binary encoding. Every length is bounded:
//! a frame longer than `MAX_FRAME` is refused before its body is read, and a decoded message
//! is checked against the per-message limits before anyone sees it.
//! Must not: trust a peer. A malformed or oversized frame is an error for the stream that
//! carried it (the caller closes that stream and logs), never a panic; names and other
//! content inside ops are validated again where they are applied (`pvfs-store`).

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use pvfs_store::{ChunkId, DeviceId, OpRecord, Writer, KEY_LEN, MAX_CHUNK};

use crate::error::{NetError, Result};
use crate::holdings::Holdings;

/// The QUIC ALPN protocol name.
pub const ALPN: &[u8] = b"pvfs/1";
/// The protocol version in `Hello`.
pub const PROTOCOL_VERSION: u16 = 3;
/// Largest frame body: a whole chunk fits with room to spare, and so does one op that
/// shares the chunks of a large file (`copy_file_range` of 8 GiB: about 6 MiB of extents).
pub const MAX_FRAME: usize = 8 << 20;
/// Most ops in one `Ops` message.
pub const MAX_OPS: usize = 4096;
/// Most chunk ids in one `Want` or `Missing` message.
pub const MAX_IDS: usize = 1024;
/// Most entries in a version vector (writers: devices of one namespace, times the
/// incarnations of each whose ops are held).
pub const MAX_WRITERS: usize = 4096;
/// Most public keys in one `Ops` message.
pub const MAX_KEYS: usize = 1024;
/// Longest error text.
pub const MAX_TEXT: usize = 1024;

/// How far one device has seen the others' ops: (writer, highest contiguous sequence number).
pub type VersionVector = Vec<(Writer, u64)>;

/// The first message on a connection, in both directions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// `PROTOCOL_VERSION` of the sender.
    pub protocol: u16,
    /// The sender's device id (it must match the certificate of the connection).
    pub device: DeviceId,
    /// BLAKE3 of the namespace id: both ends must be in the same namespace.
    pub namespace: [u8; 32],
    /// The ops the sender has, per device.
    pub have: VersionVector,
}

/// One message on a stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Introduces the sender; first on every connection.
    Hello(Hello),
    /// Ops the receiver lacks, in each writer's sequence order, with the public keys of
    /// their authors (each op carries its author's signature).
    Ops {
        /// Ed25519 public keys of (some of) the ops' authors: each is used only for the
        /// device id it derives.
        keys: Vec<[u8; KEY_LEN]>,
        /// The ops.
        ops: Vec<OpRecord>,
    },
    /// Asks for the plaintext of these chunks.
    Want(Vec<ChunkId>),
    /// One chunk as the sender stores it (the plaintext, or a zstd frame when that is
    /// shorter); the receiver decodes it and checks it against `id` before using it.
    Chunk {
        /// The chunk's BLAKE3 id.
        id: ChunkId,
        /// Its stored encoding.
        data: Bytes,
    },
    /// The sender does not hold these chunks.
    Missing(Vec<ChunkId>),
    /// The sender closes the stream because of this problem.
    Error(String),
    /// Which of these chunks does the receiver hold? (`pvfs-admin where`.)
    Has(Vec<ChunkId>),
    /// The answer to `Has`: one bit per chunk asked about, in order.
    Holding(Vec<u8>),
    /// A new device asks to join, with the secret of an invitation (join endpoint only).
    Join {
        /// The invitation's one-time secret.
        secret: [u8; 16],
        /// The new device's name.
        name: String,
    },
    /// The invitation was good: the new device is a member of this namespace.
    Welcome {
        /// The namespace id.
        namespace: [u8; 16],
        /// The inviting device's name.
        name: String,
        /// Every membership change the inviting device holds, signed by its authors, so
        /// that the new device trusts every member, not only its inviter.
        members: Vec<OpRecord>,
        /// The public keys of their authors.
        keys: Vec<[u8; KEY_LEN]>,
    },
    /// The chunks the sender holds, as a filter (sync stream, once names are in sync).
    Holds(Holdings),
    /// The sender holds these chunks too now (sync stream, after `Holds`).
    Held(Vec<ChunkId>),
    /// Keep these chunks for the sender, which references them in an op of its own next
    /// (an online-only device keeps no content): each is checked against its id first.
    Keep(Vec<Pushed>),
    /// The answer to a `Keep`: every chunk of it is stored durably.
    Kept,
}

/// One chunk of a `Keep`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pushed {
    /// The chunk's BLAKE3 id.
    pub id: ChunkId,
    /// Its plaintext length.
    pub len: u32,
    /// Its stored encoding.
    pub data: Bytes,
}

impl Message {
    /// Checks the per-message limits (the frame limit is checked by the framing).
    pub fn validate(&self) -> Result<()> {
        let over = |what: &str, n: usize, max: usize| {
            if n > max {
                Err(NetError::Malformed(format!(
                    "{what}: {n} entries, at most {max}"
                )))
            } else {
                Ok(())
            }
        };
        match self {
            Message::Hello(h) => {
                over("version vector", h.have.len(), MAX_WRITERS)?;
                let mut writers: Vec<&Writer> = h.have.iter().map(|(w, _)| w).collect();
                writers.sort();
                writers.dedup();
                if writers.len() != h.have.len() {
                    return Err(NetError::Malformed(
                        "version vector names a writer twice".into(),
                    ));
                }
                Ok(())
            }
            Message::Ops { keys, ops } => {
                over("keys", keys.len(), MAX_KEYS)?;
                over("ops", ops.len(), MAX_OPS)?;
                for op in ops {
                    over("signature bytes", op.sig.len(), pvfs_store::SIG_LEN)?;
                }
                Ok(())
            }
            Message::Want(ids) | Message::Missing(ids) => over("chunk ids", ids.len(), MAX_IDS),
            Message::Chunk { data, .. } => over("chunk bytes", data.len(), MAX_CHUNK),
            Message::Error(text) => over("error text bytes", text.len(), MAX_TEXT),
            Message::Has(ids) => over("chunk ids", ids.len(), MAX_IDS),
            Message::Holding(bits) => over("bitmap bytes", bits.len(), MAX_IDS.div_ceil(8)),
            Message::Join { name, .. } => {
                over("name bytes", name.len(), pvfs_store::MEMBER_NAME_MAX)
            }
            Message::Welcome {
                name,
                members,
                keys,
                ..
            } => {
                over("name bytes", name.len(), pvfs_store::MEMBER_NAME_MAX)?;
                over("membership changes", members.len(), MAX_OPS)?;
                over("keys", keys.len(), MAX_KEYS)
            }
            Message::Holds(h) => h.validate(),
            Message::Held(ids) => over("chunk ids", ids.len(), MAX_IDS),
            Message::Keep(chunks) => {
                over("chunks", chunks.len(), MAX_IDS)?;
                for c in chunks {
                    over("chunk bytes", c.data.len(), MAX_CHUNK)?;
                    over("chunk length", c.len as usize, MAX_CHUNK)?;
                }
                Ok(())
            }
            Message::Kept => Ok(()),
        }
    }
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode(msg: &Message) -> Result<Vec<u8>> {
    msg.validate()?;
    let mut out = vec![0u8; 4];
    let mut out = postcard::to_extend(msg, std::mem::take(&mut out))
        .map_err(|e| NetError::Malformed(format!("encoding: {e}")))?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(NetError::TooLarge {
            len: len as u64,
            max: MAX_FRAME as u64,
        });
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes a frame body: exactly one valid message, nothing after it.
pub fn decode(body: &[u8]) -> Result<Message> {
    let (msg, rest): (Message, &[u8]) =
        postcard::take_from_bytes(body).map_err(|e| NetError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(NetError::Malformed(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    msg.validate()?;
    Ok(msg)
}

/// postcard's tag of `Message::Chunk` (its variant index as a one-byte varint): chunk
/// frames are encoded and decoded without copying the chunk (`tests` checks the layout).
const CHUNK_TAG: u8 = 3;

/// Decodes a frame body held in `Bytes`; a `Chunk`'s data is a slice of `body`, not a copy.
pub fn decode_frame(body: Bytes) -> Result<Message> {
    if body.first() != Some(&CHUNK_TAG) {
        return decode(&body);
    }
    let ((id, data), rest): ((ChunkId, &[u8]), &[u8]) =
        postcard::take_from_bytes(&body[1..]).map_err(|e| NetError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(NetError::Malformed(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    let msg = Message::Chunk {
        id,
        data: body.slice_ref(data),
    };
    msg.validate()?;
    Ok(msg)
}

/// Reads the next message; `None` when the stream ends cleanly between frames.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Message>> {
    read_frame(r, None).await.map(|m| m.map(|(m, _)| m))
}

/// Bytes of frames from one peer being read and decoded at once (`read_message_within`):
/// with the connection's receive window, what bounds the memory a peer can make this device
/// hold, however many streams it opens.
pub const PEER_FRAME_BUDGET: usize = 32 << 20;

/// A peer's share of frame memory (`PEER_FRAME_BUDGET`), counted in KiB.
#[derive(Clone, Debug)]
pub struct Budget(std::sync::Arc<tokio::sync::Semaphore>);

impl Default for Budget {
    fn default() -> Budget {
        Budget(std::sync::Arc::new(tokio::sync::Semaphore::new(
            PEER_FRAME_BUDGET >> 10,
        )))
    }
}

/// The part of a `Budget` one frame holds, given back when dropped.
pub type BudgetPermit = tokio::sync::OwnedSemaphorePermit;

/// `read_message`, with the frame's bytes taken from `budget` before its body is read: a
/// frame waits (and so does its sender, by flow control) while the peer's other frames hold
/// the budget. The permit covers the decoded message until the caller drops it.
pub async fn read_message_within<R: AsyncRead + Unpin>(
    r: &mut R,
    budget: &Budget,
) -> Result<Option<(Message, BudgetPermit)>> {
    read_frame(r, Some(budget))
        .await
        .map(|m| m.and_then(|(m, p)| Some((m, p?))))
}

async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    budget: Option<&Budget>,
) -> Result<Option<(Message, Option<BudgetPermit>)>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(NetError::Truncated),
            n => got += n,
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(NetError::TooLarge {
            len: len as u64,
            max: MAX_FRAME as u64,
        });
    }
    let permit = match budget {
        Some(b) => Some(
            b.0.clone()
                .acquire_many_owned(len.div_ceil(1024).max(1) as u32)
                .await
                .map_err(|_| NetError::Connect("the connection is closing".into()))?,
        ),
        None => None,
    };
    // Filled as it arrives rather than zeroed first: a chunk frame is up to 256 KiB.
    let mut body = BytesMut::with_capacity(len);
    while body.len() < len {
        let room = len - body.len();
        if r.read_buf(&mut (&mut body).limit(room)).await? == 0 {
            return Err(NetError::Truncated);
        }
    }
    decode_frame(body.freeze()).map(|m| Some((m, permit)))
}

/// The frame of a `Chunk` up to its data: length prefix, tag, id, data length.
fn chunk_head(id: ChunkId, data: &Bytes) -> Result<Vec<u8>> {
    if data.len() > MAX_CHUNK {
        return Err(NetError::Malformed(format!(
            "chunk bytes: {} entries, at most {MAX_CHUNK}",
            data.len()
        )));
    }
    let empty = Message::Chunk {
        id,
        data: Bytes::new(),
    };
    let mut head = postcard::to_extend(&empty, vec![0u8; 4])
        .map_err(|e| NetError::Malformed(format!("encoding: {e}")))?;
    // The empty data's length (varint 0) becomes the real one.
    head.pop();
    let mut head = postcard::to_extend(&data.len(), head)
        .map_err(|e| NetError::Malformed(format!("encoding: {e}")))?;
    let body = head.len() - 4 + data.len();
    head[..4].copy_from_slice(&(body as u32).to_be_bytes());
    Ok(head)
}

/// Writes one message. A chunk's data is written from where it is, not copied into a frame.
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> Result<()> {
    if let Message::Chunk { id, data } = msg {
        w.write_all(&chunk_head(*id, data)?).await?;
        w.write_all(data).await?;
    } else {
        w.write_all(&encode(msg)?).await?;
    }
    Ok(())
}

/// `write_message` on a QUIC stream: a chunk's data is handed to quinn as it is, where
/// `AsyncWrite` would copy it into quinn's send buffer.
pub async fn send_message(send: &mut quinn::SendStream, msg: &Message) -> Result<()> {
    let Message::Chunk { id, data } = msg else {
        return write_message(send, msg).await;
    };
    let mut parts = [Bytes::from(chunk_head(*id, data)?), data.clone()];
    send.write_all_chunks(&mut parts)
        .await
        .map_err(|e| NetError::Io(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use pvfs_store::{Hlc, OpId, OpKind};

    fn device(n: u8) -> DeviceId {
        DeviceId([n; 16])
    }

    fn writer(n: u8) -> Writer {
        Writer {
            device: device(n),
            incarnation: u64::from(n) << 40,
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                device: device(1),
                namespace: [7; 32],
                have: vec![(writer(1), 10), (writer(2), 0)],
            }),
            Message::Want(vec![ChunkId([3; 32]), ChunkId([4; 32])]),
            Message::Chunk {
                id: ChunkId([5; 32]),
                data: Bytes::from(vec![9u8; MAX_CHUNK]),
            },
            Message::Missing(vec![]),
            Message::Error("no such namespace".into()),
            Message::Has(vec![ChunkId([6; 32])]),
            Message::Holding(vec![1]),
            Message::Join {
                secret: [8; 16],
                name: "laptop".into(),
            },
            Message::Welcome {
                namespace: [9; 16],
                name: "desktop".into(),
                members: Vec::new(),
                keys: vec![[1; 32]],
            },
            Message::Holds({
                let mut h = Holdings::with_capacity(100);
                h.insert(&ChunkId([1; 32]));
                h
            }),
            Message::Held(vec![ChunkId([2; 32])]),
            Message::Keep(vec![Pushed {
                id: ChunkId([3; 32]),
                len: 5,
                data: Bytes::from_static(b"hello"),
            }]),
            Message::Kept,
        ]
    }

    async fn roundtrip(msgs: &[Message]) -> Vec<Message> {
        let (mut a, mut b) = tokio::io::duplex(64 << 10);
        let sent = msgs.to_vec();
        let writer = tokio::spawn(async move {
            for m in &sent {
                write_message(&mut a, m).await.expect("write");
            }
        });
        let mut got = Vec::new();
        while let Some(m) = read_message(&mut b).await.expect("read") {
            got.push(m);
        }
        writer.await.expect("writer");
        got
    }

    #[test]
    fn chunk_frames_match_the_generic_encoding() {
        for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, MAX_CHUNK] {
            let msg = Message::Chunk {
                id: ChunkId([len as u8; 32]),
                data: Bytes::from(vec![7u8; len]),
            };
            let Message::Chunk { id, data } = &msg else {
                unreachable!()
            };
            let mut fast = chunk_head(*id, data).unwrap();
            fast.extend_from_slice(data);
            let generic = encode(&msg).unwrap();
            assert_eq!(fast, generic, "length {len}");
            assert_eq!(generic[4], CHUNK_TAG);
            assert_eq!(
                decode_frame(Bytes::from(generic[4..].to_vec())).unwrap(),
                msg
            );
        }
    }

    #[tokio::test]
    async fn messages_roundtrip_through_frames() {
        let msgs = samples();
        assert_eq!(roundtrip(&msgs).await, msgs);
    }

    #[tokio::test]
    async fn ops_roundtrip() {
        let ops = vec![OpRecord {
            id: OpId {
                device: device(2),
                incarnation: 5,
                seq: 1,
            },
            hlc: Hlc(42),
            prev: [3; 32],
            kind: OpKind::SetXattr {
                node: pvfs_store::NodeId(1),
                name: b"user.a".to_vec(),
                value: Some(b"v".to_vec()),
            },
            sig: vec![4; 64],
        }];
        let msgs = vec![Message::Ops {
            keys: vec![[6; 32]],
            ops,
        }];
        assert_eq!(roundtrip(&msgs).await, msgs);
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_its_body_is_read() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        match read_message(&mut b).await {
            Err(NetError::TooLarge { len, .. }) => assert_eq!(len, u64::from(u32::MAX)),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_cut_frame_is_truncated_not_clean_eof() {
        let frame = encode(&samples()[1]).unwrap();
        for cut in [2, 4, frame.len() - 1] {
            let (mut a, mut b) = tokio::io::duplex(64 << 10);
            a.write_all(&frame[..cut]).await.unwrap();
            drop(a);
            assert!(
                matches!(read_message(&mut b).await, Err(NetError::Truncated)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn limits_are_enforced_both_ways() {
        let too_many = Message::Want(vec![ChunkId([0; 32]); MAX_IDS + 1]);
        assert!(encode(&too_many).is_err());
        let body = postcard::to_stdvec(&too_many).unwrap();
        assert!(matches!(decode(&body), Err(NetError::Malformed(_))));
        let big_chunk = Message::Chunk {
            id: ChunkId([0; 32]),
            data: Bytes::from(vec![0u8; MAX_CHUNK + 1]),
        };
        assert!(decode(&postcard::to_stdvec(&big_chunk).unwrap()).is_err());
        let twice = Message::Hello(Hello {
            protocol: 1,
            device: device(1),
            namespace: [0; 32],
            have: vec![(writer(3), 1), (writer(3), 2)],
        });
        assert!(decode(&postcard::to_stdvec(&twice).unwrap()).is_err());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut body = postcard::to_stdvec(&samples()[3]).unwrap();
        body.push(0);
        assert!(matches!(decode(&body), Err(NetError::Malformed(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Fuzzing the decoder: any bytes give a message or an error, never a panic, and
        /// whatever decodes re-encodes to a frame that decodes to the same message.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(
            mut body in proptest::collection::vec(any::<u8>(), 0..512),
            chunk in any::<bool>(),
        ) {
            // Half the inputs take the chunk fast path.
            if chunk && !body.is_empty() {
                body[0] = CHUNK_TAG;
            }
            let generic = decode(&body);
            let framed = decode_frame(Bytes::from(body.clone()));
            prop_assert_eq!(generic.is_ok(), framed.is_ok());
            if let Ok(msg) = generic {
                prop_assert_eq!(framed.expect("decodes"), msg.clone());
                let frame = encode(&msg).expect("a decoded message encodes");
                prop_assert_eq!(decode(&frame[4..]).expect("re-decodes"), msg);
            }
        }

        /// Mutated valid frames (the interesting inputs for a decoder) never panic either.
        #[test]
        fn mutated_frames_fail_cleanly(
            which in 0usize..5,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let mut body = encode(&samples()[which]).unwrap()[4..].to_vec();
            for (at, byte) in flips {
                let i = at % body.len();
                body[i] = byte;
            }
            let _ = decode(&body);
            let _ = decode_frame(Bytes::from(body));
        }
    }
}
