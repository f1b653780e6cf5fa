//! Keep streams: an online-only device's new chunks, stored on another device before the
//! commit that references them.
//!
//! Owns: both ends of a keep stream. The pushing end sends `Keep` messages of up to
//! `KEEP_PART` bytes and waits for one `Kept` per message; the keeping end checks every
//! chunk against its id, stores the message's chunks durably (`Store::keep_pushed`), then
//! answers and announces them to its peers (`Held`), so that others fetch them from it.
//! Must not: trust what it receives (a chunk that does not match its id fails the stream and
//! nothing of that message is stored), store anything on an online-only device, or touch
//! the store on an async worker.

use std::sync::Arc;

use bytes::Bytes;
use pvfs_store::{ChunkId, DeviceId, Store, MAX_CHUNK};
use tokio::sync::broadcast;

use crate::error::{NetError, Result};
use crate::wire::{self, Message, Pushed, MAX_IDS};

/// Most encoded bytes in one `Keep` (a frame holds `wire::MAX_FRAME`).
const KEEP_PART: usize = 4 << 20;

/// Answers the `Keep`s of one stream from device `from`, `first` being the first one's;
/// what it keeps goes to `held`, for the other devices' holdings filters.
pub(crate) async fn serve(
    store: Store,
    held: broadcast::Sender<Arc<Vec<ChunkId>>>,
    from: DeviceId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    first: Vec<Pushed>,
    budget: wire::Budget,
) -> Result<()> {
    let mut next = Some(first);
    loop {
        // Each part holds its share of the peer's frame budget until it is stored.
        let (chunks, _frame) = match next.take() {
            Some(c) => (c, None),
            None => match wire::read_message_within(&mut recv, &budget).await? {
                Some((Message::Keep(c), permit)) => (c, Some(permit)),
                None => break,
                Some((other, _)) => {
                    return Err(NetError::Malformed(format!(
                        "unexpected message on a keep stream: {other:?}"
                    )))
                }
            },
        };
        let store = store.clone();
        let kept = tokio::task::spawn_blocking(move || keep(&store, from, chunks))
            .await
            .map_err(|e| NetError::Connect(format!("keeping chunks: {e}")))?;
        match kept {
            Ok(ids) => {
                tracing::debug!(device = %from.fmt_short(), chunks = ids.len(), "kept pushed chunks");
                wire::write_message(&mut send, &Message::Kept).await?;
                let _ = held.send(Arc::new(ids));
            }
            Err(e) => {
                let text: String = e.to_string().chars().take(wire::MAX_TEXT / 4).collect();
                let _ = wire::write_message(&mut send, &Message::Error(text)).await;
                let _ = send.finish();
                return Err(e);
            }
        }
    }
    let _ = send.finish();
    Ok(())
}

/// Checks and stores one `Keep`; returns the ids it held.
fn keep(store: &Store, from: DeviceId, chunks: Vec<Pushed>) -> Result<Vec<ChunkId>> {
    if store.is_online_only() {
        return Err(NetError::Connect(
            "this device is online-only: it keeps no content".into(),
        ));
    }
    let mut checked = Vec::with_capacity(chunks.len());
    for c in chunks {
        if pvfs_store::decode_fetched(&c.id, &c.data, c.len).is_err() {
            return Err(NetError::Malformed(format!(
                "pushed chunk {} does not match its id",
                c.id.fmt_short()
            )));
        }
        checked.push((c.id, c.data, c.len));
    }
    let ids = checked.iter().map(|c| c.0).collect();
    store.keep_pushed(from, checked)?;
    Ok(ids)
}

/// Stores `chunks` (id, stored encoding, plaintext length) on the device at the other end of
/// `conn`; returns once it has all of them durably.
pub(crate) async fn push(conn: &quinn::Connection, chunks: &[(ChunkId, Bytes, u32)]) -> Result<()> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| NetError::Connect(e.to_string()))?;
    let mut parts = 0usize;
    let mut part: Vec<Pushed> = Vec::new();
    let mut bytes = 0usize;
    for (i, (id, data, len)) in chunks.iter().enumerate() {
        bytes += data.len();
        part.push(Pushed {
            id: *id,
            len: *len,
            data: data.clone(),
        });
        let last = i + 1 == chunks.len();
        if last || part.len() >= MAX_IDS || bytes + MAX_CHUNK > KEEP_PART {
            wire::send_message(&mut send, &Message::Keep(std::mem::take(&mut part))).await?;
            parts += 1;
            bytes = 0;
        }
    }
    let _ = send.finish();
    for _ in 0..parts {
        match wire::read_message(&mut recv).await? {
            Some(Message::Kept) => {}
            Some(Message::Error(text)) => {
                return Err(NetError::Connect(format!("the peer: {text}")))
            }
            other => {
                return Err(NetError::Malformed(format!(
                    "unexpected answer to Keep: {other:?}"
                )))
            }
        }
    }
    Ok(())
}
