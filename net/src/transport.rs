//! The QUIC transport: one endpoint per daemon, serving and dialling member devices.
//!
//! Owns: the quinn endpoint (server and client roles on one UDP socket), its transport
//! parameters (keep-alive, idle timeout, stream limits), and turning a handshake into a
//! `Peer` whose device id comes from the verified certificate. Incoming handshakes run
//! side by side (at most `MAX_HANDSHAKES` at once, each for at most `HANDSHAKE_TIMEOUT`), in
//! a task that lives as long as the endpoint: a stranger that starts handshakes and never
//! finishes them delays no one else's.
//! Must not: decide whom to trust (`tls` does), or interpret streams (sync and fetch do).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;

use pvfs_store::DeviceId;

use crate::error::{NetError, Result};
use crate::tls::{self, DeviceCert, Members};

/// A keep-alive is sent after this long without traffic, so NATs and the idle timer stay open.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A connection without any traffic for this long is dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent bidirectional streams a peer may open.
const MAX_STREAMS: u32 = 256;
/// Bytes a peer may have in flight to this device on one connection, all streams together
/// (quinn's default is unbounded, each stream having its own 1.25 MB window).
pub const CONN_RECEIVE_WINDOW: u32 = 16 << 20;
/// Incoming handshakes under way at once at most; more are refused at once.
pub const MAX_HANDSHAKES: usize = 256;
/// An incoming handshake not done by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections accepted but not yet taken by `accept`.
const ACCEPTED_QUEUE: usize = 64;

/// A QUIC endpoint of this device.
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    members: Arc<dyn Members>,
    accepted: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Peer>>>,
}

/// A connection to a member device, authenticated by its certificate.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The device at the other end.
    pub device: DeviceId,
    /// The connection.
    pub conn: quinn::Connection,
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("the idle timeout fits QUIC's varint"),
    ));
    t.max_concurrent_bidi_streams(MAX_STREAMS.into());
    t.receive_window(CONN_RECEIVE_WINDOW.into());
    t.max_concurrent_uni_streams(0u32.into());
    Arc::new(t)
}

impl Endpoint {
    /// Binds a UDP socket at `bind` (port 0: any) and serves and dials as `cert`, accepting
    /// only `members`. Must be called inside a tokio runtime. Its handshake task holds the
    /// socket until `close` (or the runtime ends): dropping an `Endpoint` does not free it.
    pub fn bind(
        bind: SocketAddr,
        cert: &DeviceCert,
        members: Arc<dyn Members>,
    ) -> Result<Endpoint> {
        let server_tls = tls::server_config(cert, members.clone())?;
        let server_crypto =
            QuicServerConfig::try_from(server_tls).map_err(|e| NetError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport());
        let client_tls = tls::client_config(cert, members.clone())?;
        let client_crypto =
            QuicClientConfig::try_from(client_tls).map_err(|e| NetError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport());
        let mut inner = quinn::Endpoint::server(server, bind)?;
        inner.set_default_client_config(client);
        let (tx, rx) = tokio::sync::mpsc::channel(ACCEPTED_QUEUE);
        tokio::spawn(handshakes(inner.clone(), members.clone(), tx));
        Ok(Endpoint {
            inner,
            members,
            accepted: Arc::new(tokio::sync::Mutex::new(rx)),
        })
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.inner.local_addr()?)
    }

    /// Dials the device at `addr`; fails unless it proves to be a member.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Peer> {
        let connecting = self
            .inner
            .connect(addr, tls::SERVER_NAME)
            .map_err(|e| NetError::Connect(format!("{addr}: {e}")))?;
        let conn = connecting
            .await
            .map_err(|e| NetError::Connect(format!("{addr}: {e}")))?;
        self.peer(conn)
    }

    /// The next incoming connection from a member; `None` once the endpoint is closed.
    /// Handshakes that fail (non-members, garbage, too slow) are logged and skipped.
    pub async fn accept(&self) -> Option<Peer> {
        self.accepted.lock().await.recv().await
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.inner.close(0u32.into(), b"shutting down");
    }

    fn peer(&self, conn: quinn::Connection) -> Result<Peer> {
        member_peer(&*self.members, conn)
    }
}

/// Runs incoming handshakes side by side, bounded in number and time, and queues the
/// members' connections for `Endpoint::accept`; ends when the endpoint closes.
async fn handshakes(
    endpoint: quinn::Endpoint,
    members: Arc<dyn Members>,
    accepted: tokio::sync::mpsc::Sender<Peer>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    while let Some(incoming) = endpoint.accept().await {
        let from = incoming.remote_address();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::info!(%from, "refused an incoming connection: too many handshakes under way");
            incoming.refuse();
            continue;
        };
        let (members, accepted) = (members.clone(), accepted.clone());
        tokio::spawn(async move {
            let res = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => member_peer(&*members, conn),
                Ok(Err(e)) => Err(NetError::Connect(e.to_string())),
                Err(_) => Err(NetError::Connect("the handshake took too long".into())),
            };
            drop(slot);
            match res {
                Ok(p) => {
                    let _ = accepted.send(p).await;
                }
                Err(e) => tracing::info!(%from, "refused an incoming connection: {e}"),
            }
        });
    }
}

/// The verified device at the other end of `conn`. Membership is checked once more, so
/// nothing that slips past a verifier (a resumed session, a revocation racing the handshake)
/// gets a `Peer`.
fn member_peer(members: &dyn Members, conn: quinn::Connection) -> Result<Peer> {
    let certs = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| NetError::Connect("peer presented no certificate".into()))?;
    let cert = certs
        .first()
        .ok_or_else(|| NetError::Connect("peer presented no certificate".into()))?;
    let device = tls::device_of_cert(cert)?;
    if !members.is_member(&device) {
        conn.close(1u32.into(), b"not a member");
        return Err(NetError::Connect(format!(
            "device {device} is not a member"
        )));
    }
    Ok(Peer { device, conn })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use super::*;
    use crate::tls::tests::new_cert;
    use crate::wire::{self, Message};

    /// A member list that tests can change.
    #[derive(Debug, Default)]
    struct Set(Mutex<HashSet<DeviceId>>);

    impl Members for Set {
        fn is_member(&self, d: &DeviceId) -> bool {
            self.0.lock().expect("members lock").contains(d)
        }
    }

    fn set(devices: &[DeviceId]) -> Arc<Set> {
        Arc::new(Set(Mutex::new(devices.iter().copied().collect())))
    }

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// Serves an echo on every stream of every accepted connection; returns the devices it
    /// accepted, in order, through the channel.
    fn echo_server(ep: Endpoint) -> tokio::sync::mpsc::UnboundedReceiver<DeviceId> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(p) = ep.accept().await {
                let _ = tx.send(p.device);
                tokio::spawn(async move {
                    while let Ok((mut send, mut recv)) = p.conn.accept_bi().await {
                        if let Ok(Some(m)) = wire::read_message(&mut recv).await {
                            let _ = wire::write_message(&mut send, &m).await;
                            let _ = send.finish();
                        }
                    }
                });
            }
        });
        rx
    }

    /// True if `ep` can reach `addr` and get an echo back. QUIC may complete the client side
    /// of a handshake before the server's verdict arrives, so only a reply counts.
    async fn talks(ep: &Endpoint, addr: SocketAddr) -> Option<DeviceId> {
        let p = ep.connect(addr).await.ok()?;
        let (mut send, mut recv) = p.conn.open_bi().await.ok()?;
        let ping = Message::Error("ping".into());
        wire::write_message(&mut send, &ping).await.ok()?;
        send.finish().ok()?;
        let pong = wire::read_message(&mut recv).await.ok()??;
        (pong == ping).then_some(p.device)
    }

    #[tokio::test]
    async fn only_members_get_a_connection() {
        let (a, b, stranger) = (new_cert(), new_cert(), new_cert());
        let members = set(&[a.device(), b.device()]);
        let ea = Endpoint::bind(localhost(), &a, members.clone()).unwrap();
        let eb = Endpoint::bind(localhost(), &b, members.clone()).unwrap();
        let es = Endpoint::bind(localhost(), &stranger, set(&[a.device()])).unwrap();
        let addr = ea.local_addr().unwrap();
        let mut accepted = echo_server(ea.clone());

        // Members see each other's device ids, taken from the verified certificates.
        assert_eq!(talks(&eb, addr).await, Some(a.device()));
        assert_eq!(accepted.recv().await, Some(b.device()));

        // A device with a valid certificate that was never paired gets nothing.
        assert_eq!(talks(&es, addr).await, None);

        // A member does not accept a server that is not a member either.
        let _ = echo_server(es.clone());
        assert_eq!(talks(&ea, es.local_addr().unwrap()).await, None);

        // Revocation applies from the next handshake on.
        members.0.lock().unwrap().remove(&b.device());
        assert_eq!(talks(&eb, addr).await, None);
        for e in [ea, eb, es] {
            e.close();
        }
        assert!(accepted.try_recv().is_err(), "only b was ever accepted");
    }

    /// Never answers in time: a client whose handshakes stall on it.
    #[derive(Debug)]
    struct Stuck;

    impl Members for Stuck {
        fn is_member(&self, _: &DeviceId) -> bool {
            std::thread::sleep(Duration::from_secs(120));
            false
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_handshakes_do_not_delay_a_member() {
        let (a, b, stranger) = (new_cert(), new_cert(), new_cert());
        let members = set(&[a.device(), b.device()]);
        let ea = Endpoint::bind(localhost(), &a, members.clone()).unwrap();
        let eb = Endpoint::bind(localhost(), &b, members.clone()).unwrap();
        let addr = ea.local_addr().unwrap();
        let _accepted = echo_server(ea.clone());
        // A stranger starts 100 handshakes from a runtime of its own, then stalls them all:
        // its check of A's certificate never returns.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let es = Endpoint::bind(localhost(), &stranger, Arc::new(Stuck)).unwrap();
                for _ in 0..100 {
                    let es = es.clone();
                    tokio::spawn(async move { es.connect(addr).await });
                }
                tokio::time::sleep(Duration::from_secs(120)).await;
            });
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = std::time::Instant::now();
        assert_eq!(talks(&eb, addr).await, Some(a.device()));
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "a member waited {took:?}");
        ea.close();
        eb.close();
    }
}
