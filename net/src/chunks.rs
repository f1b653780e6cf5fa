//! Chunk streams between two devices: serving `Want`, and asking for chunks.
//!
//! Owns: both ends of a chunk stream. A stream carries any number of `Want` messages, each
//! of many ids, and the server answers every id in order with one `Chunk` or `Missing`.
//! The server reads a batch from the store on the blocking pool while the chunks before it
//! are being sent. `Requester` is the asking end: one long-lived stream per peer, on which
//! every fetch of that peer is pipelined, so a chunk costs no new stream and no round trip
//! of its own.
//! Must not: trust or store what it receives (the caller checks each chunk against its id
//! before using it), read the store on an async worker, or queue without bound for a peer:
//! a server stops reading `Want`s while `QUEUED_WANTS` batches wait.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use bytes::Bytes;
use pvfs_store::{ChunkId, Store};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::error::{NetError, Result};
use crate::wire::{self, Message, MAX_IDS};

/// `Want` batches a server accepts ahead of the one it is answering.
const QUEUED_WANTS: usize = 4;
/// Answers a server has read from the store ahead of the one it is sending.
const READ_AHEAD: usize = 32;
/// Chunks a peer still has to answer below which a request is sent at once (see `ask`).
const KEEP_BUSY: usize = 16;
/// Requests sent together in one `Want` while the peer is busy.
const WANT_BATCH: usize = 16;
/// Reads of the store under way at once (a disk serves several reads in parallel faster
/// than one at a time).
const READ_PARALLEL: usize = 8;
/// Chunks one read takes in turn: a blocking-pool task per chunk would cost two thread
/// switches per chunk.
const READ_GROUP: usize = 4;

/// What a device served one peer.
#[derive(Debug, Default)]
pub(crate) struct Served {
    /// Chunk bytes sent (stored encoding).
    pub(crate) bytes: AtomicU64,
    /// Chunks asked for and not held here.
    pub(crate) missing: AtomicU64,
}

/// Answers the `Want`s of one stream, `first` being the first one's ids.
pub(crate) async fn serve(
    store: Store,
    served: Arc<Served>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    first: Vec<ChunkId>,
) -> Result<()> {
    let (wants, mut wanted) = mpsc::channel::<Vec<ChunkId>>(QUEUED_WANTS);
    let (answers, mut answered) = mpsc::channel::<Message>(READ_AHEAD);
    let _ = wants.send(first).await;
    // Reads the store, `READ_PARALLEL` chunks at a time, and queues the answers in order;
    // ends when the peer wants nothing more or is gone.
    let reader = tokio::spawn(async move {
        let read = |ids: Vec<ChunkId>| {
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                ids.into_iter()
                    .map(|id| match store.stored_chunk(&id) {
                        Ok(Some((data, _))) => Message::Chunk { id, data },
                        Ok(None) => Message::Missing(vec![id]),
                        Err(e) => {
                            tracing::warn!(chunk = %id.fmt_short(), "serving a chunk: {e}");
                            Message::Missing(vec![id])
                        }
                    })
                    .collect::<Vec<_>>()
            })
        };
        let mut ids = VecDeque::new();
        let mut reading = VecDeque::new();
        loop {
            while reading.len() < READ_PARALLEL {
                if ids.is_empty() {
                    match wanted.try_recv() {
                        Ok(more) => ids.extend(more),
                        Err(_) => break,
                    }
                }
                if ids.is_empty() {
                    break;
                }
                let group = ids.drain(..ids.len().min(READ_GROUP)).collect();
                reading.push_back(read(group));
            }
            let Some(next) = reading.pop_front() else {
                match wanted.recv().await {
                    Some(more) => {
                        ids.extend(more);
                        continue;
                    }
                    None => return,
                }
            };
            let Ok(group) = next.await else { return };
            for m in group {
                if answers.send(m).await.is_err() {
                    return;
                }
            }
        }
    });
    let writer = async {
        while let Some(m) = answered.recv().await {
            match &m {
                Message::Chunk { data, .. } => {
                    served.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                _ => {
                    served.missing.fetch_add(1, Ordering::Relaxed);
                }
            }
            wire::send_message(&mut send, &m).await?;
        }
        let _ = send.finish();
        Ok::<(), NetError>(())
    };
    let requests = async move {
        loop {
            match wire::read_message(&mut recv).await? {
                Some(Message::Want(ids)) => {
                    if wants.send(ids).await.is_err() {
                        return Ok(());
                    }
                }
                // The peer asks no more: the answers still due are sent, then the stream ends.
                None => return Ok::<(), NetError>(()),
                Some(other) => {
                    return Err(NetError::Malformed(format!(
                        "unexpected message on a chunk stream: {other:?}"
                    )))
                }
            }
        }
    };
    let res = tokio::try_join!(writer, requests).map(|_| ());
    reader.abort();
    res
}

/// One chunk asked for, and who waits for the answer.
struct Request {
    id: ChunkId,
    reply: oneshot::Sender<Result<Bytes>>,
}

/// Asks one peer for chunks on one pipelined stream (opened again when it fails).
pub(crate) struct Requester {
    queue: mpsc::Sender<Request>,
    load: Arc<AtomicUsize>,
}

/// Counts a request as outstanding while it lives (a caller that gives up drops it).
struct Outstanding(Arc<AtomicUsize>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Chunk requests queued for one peer's asking task; more wait to be queued.
const QUEUED_REQUESTS: usize = 1024;

impl Requester {
    /// Starts the asking end for `conn`; it ends when the `Requester` is dropped.
    pub(crate) fn new(conn: quinn::Connection) -> Requester {
        let (queue, rx) = mpsc::channel(QUEUED_REQUESTS);
        tokio::spawn(run(conn, rx));
        Requester {
            queue,
            load: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Requests not answered yet.
    pub(crate) fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }

    /// Asks for chunk `id`. The answer is its stored encoding, unverified; an error when the
    /// peer does not hold it or the stream failed.
    pub(crate) async fn get(&self, id: ChunkId) -> Result<Bytes> {
        self.load.fetch_add(1, Ordering::Relaxed);
        let _outstanding = Outstanding(self.load.clone());
        let (reply, answer) = oneshot::channel();
        let gone = || NetError::Connect("the session ended".into());
        self.queue
            .send(Request { id, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// The asking end's task: opens a stream when there is something to ask, sends requests in
/// batches as they come, and hands out the answers in order.
async fn run(conn: quinn::Connection, mut queue: mpsc::Receiver<Request>) {
    while let Some(first) = queue.recv().await {
        let (send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                let _ = first.reply.send(Err(NetError::Connect(e.to_string())));
                continue;
            }
        };
        let pending = Pending::default();
        let res = tokio::select! {
            r = ask(first, &mut queue, send, &pending) => r,
            r = take_answers(recv, &pending) => r,
        };
        let why = match res {
            // Nothing more will be asked.
            Ok(()) => return,
            Err(e) => e.to_string(),
        };
        tracing::debug!(peer = %conn.remote_address(), "chunk stream: {why}");
        for r in pending.asked.lock().drain(..) {
            let _ = r.reply.send(Err(NetError::Connect(why.clone())));
        }
    }
}

/// Requests of one stream that wait for their answers, in the order they were asked.
#[derive(Default)]
struct Pending {
    asked: Mutex<VecDeque<Request>>,
    /// Signalled whenever an answer is taken.
    answered: Notify,
}

impl Pending {
    fn len(&self) -> usize {
        self.asked.lock().len()
    }
}

/// Sends the requests as they come, many ids to a `Want`; `Ok` once no more can come.
///
/// While the peer has `KEEP_BUSY` chunks or more still to answer, new requests are held
/// until `WANT_BATCH` of them are due or it falls below that: it answers in order, so a held
/// request is answered no later, and a `Want` for every chunk of a sequential read would
/// cost both sides a packet and a round of task wakeups per chunk.
async fn ask(
    first: Request,
    queue: &mut mpsc::Receiver<Request>,
    mut send: quinn::SendStream,
    pending: &Pending,
) -> Result<()> {
    let mut next = Some(first);
    loop {
        let first = match next.take() {
            Some(r) => r,
            None => match queue.recv().await {
                Some(r) => r,
                None => return Ok(()),
            },
        };
        let mut batch = vec![first];
        let mut open = true;
        loop {
            while batch.len() < MAX_IDS {
                let Ok(r) = queue.try_recv() else { break };
                batch.push(r);
            }
            if !open || batch.len() >= WANT_BATCH || pending.len() < KEEP_BUSY {
                break;
            }
            let answered = pending.answered.notified();
            tokio::select! {
                r = queue.recv() => match r {
                    Some(r) => batch.push(r),
                    None => open = false,
                },
                () = answered => {}
            }
        }
        let ids = batch.iter().map(|r| r.id).collect();
        pending.asked.lock().extend(batch);
        wire::write_message(&mut send, &Message::Want(ids)).await?;
        if !open {
            return Ok(());
        }
    }
}

/// Reads the answers and hands each to the request it answers (they come in order).
async fn take_answers(mut recv: quinn::RecvStream, pending: &Pending) -> Result<()> {
    let answer = |id: ChunkId, res: Result<Bytes>| -> Result<()> {
        let r = pending
            .asked
            .lock()
            .pop_front()
            .ok_or_else(|| NetError::Malformed("an answer to nothing asked".into()))?;
        pending.answered.notify_one();
        if r.id != id {
            let _ = r
                .reply
                .send(Err(NetError::Malformed("answers out of order".to_string())));
            return Err(NetError::Malformed(format!(
                "answer for chunk {} where {} was due",
                id.fmt_short(),
                r.id.fmt_short()
            )));
        }
        let _ = r.reply.send(res);
        Ok(())
    };
    loop {
        match wire::read_message(&mut recv).await? {
            Some(Message::Chunk { id, data }) => answer(id, Ok(data))?,
            Some(Message::Missing(ids)) => {
                for id in ids {
                    answer(
                        id,
                        Err(NetError::Connect("the peer does not hold it".into())),
                    )?;
                }
            }
            Some(Message::Error(text)) => {
                return Err(NetError::Connect(format!("the peer: {text}")))
            }
            Some(other) => {
                return Err(NetError::Malformed(format!(
                    "unexpected answer to Want: {other:?}"
                )))
            }
            None => return Err(NetError::Connect("the peer ended the chunk stream".into())),
        }
    }
}
