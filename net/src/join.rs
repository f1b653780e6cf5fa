//! Pairing: one-time invitations and joining a namespace.
//!
//! Owns: the invitation token (what it carries, its text form), the join endpoint (a QUIC
//! endpoint of its own, open only while invitations are outstanding, whose only business is a
//! `Join` with a valid secret: at most `MAX_JOINS` joins at once, each done within
//! `JOIN_TIMEOUT`) and the joining side.
//! Must not: let a joining device do anything but join: it is not a member until the
//! invitation is used, and the main endpoint never accepts it before.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pvfs_store::{DeviceId, Store};
use serde::{Deserialize, Serialize};

use crate::error::{NetError, Result};
use crate::tls::{DeviceCert, Members};
use crate::transport::Endpoint;
use crate::wire::{self, Message};

/// Text in front of every token (and its format version).
const TOKEN_PREFIX: &str = "pvfs1-";

/// Connections the join endpoint serves at once; more are closed at once.
pub const MAX_JOINS: usize = 8;

/// A join not done by then is dropped.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What an invitation carries. The secret is the only credential: keep tokens private.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// The inviting device (the joiner accepts no other at the join address).
    pub inviter: DeviceId,
    /// Addresses of the inviting device's join endpoint.
    pub join: Vec<SocketAddr>,
    /// Addresses of its main endpoint, to sync with after joining.
    pub peers: Vec<SocketAddr>,
    /// One-time secret.
    pub secret: [u8; 16],
    /// Unix time after which the invitation is refused.
    pub expires: u64,
}

impl Invite {
    /// The token text: `pvfs1-` and the invitation in base64url.
    pub fn to_token(&self) -> String {
        let bytes = postcard::to_stdvec(self).expect("serializing plain data cannot fail");
        format!(
            "{TOKEN_PREFIX}{}",
            data_encoding::BASE64URL_NOPAD.encode(&bytes)
        )
    }

    /// Parses a token.
    pub fn from_token(token: &str) -> Result<Invite> {
        let bad = |why: &str| NetError::Malformed(format!("invitation token: {why}"));
        let body = token
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or_else(|| bad("does not start with pvfs1-"))?;
        if body.len() > 4096 {
            return Err(bad("too long"));
        }
        let bytes = data_encoding::BASE64URL_NOPAD
            .decode(body.as_bytes())
            .map_err(|_| bad("not base64url"))?;
        let (invite, rest): (Invite, &[u8]) =
            postcard::take_from_bytes(&bytes).map_err(|_| bad("garbled"))?;
        if !rest.is_empty() || invite.join.len() > 64 || invite.peers.len() > 64 {
            return Err(bad("garbled"));
        }
        Ok(invite)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Any device may knock at the join endpoint; the secret decides.
#[derive(Debug)]
struct Anyone;

impl Members for Anyone {
    fn is_member(&self, _: &DeviceId) -> bool {
        true
    }
}

/// Exactly one device.
#[derive(Debug)]
struct Only(DeviceId);

impl Members for Only {
    fn is_member(&self, d: &DeviceId) -> bool {
        *d == self.0
    }
}

/// The inviting side: outstanding invitations and the endpoint that redeems them.
pub struct Inviter {
    store: Store,
    name: String,
    cert: Arc<DeviceCert>,
    bind: SocketAddr,
    /// Open while invitations are outstanding.
    endpoint: tokio::sync::Mutex<Option<Endpoint>>,
    /// secret -> expiry (unix seconds).
    open: Mutex<HashMap<[u8; 16], u64>>,
    /// Joins under way.
    joins: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Inviter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inviter").finish_non_exhaustive()
    }
}

impl Inviter {
    /// An inviter for `store` whose join endpoint binds `bind` (port 0: any) when the first
    /// invitation is made.
    pub fn new(
        store: Store,
        name: String,
        cert: Arc<DeviceCert>,
        bind: SocketAddr,
    ) -> Arc<Inviter> {
        Arc::new(Inviter {
            store,
            name,
            cert,
            bind,
            endpoint: tokio::sync::Mutex::new(None),
            open: Mutex::new(HashMap::new()),
            joins: Arc::new(tokio::sync::Semaphore::new(MAX_JOINS)),
        })
    }

    /// True if the join endpoint is open (an invitation is outstanding or being redeemed).
    #[cfg(test)]
    pub(crate) async fn is_open(&self) -> bool {
        self.endpoint.lock().await.is_some()
    }

    /// Closes the join endpoint if no invitation is outstanding and no join under way.
    async fn close_if_idle(&self) {
        let mut ep = self.endpoint.lock().await;
        let outstanding = {
            let mut open = self.open.lock();
            prune_expired(&mut open);
            !open.is_empty()
        };
        if outstanding || self.joins.available_permits() < MAX_JOINS {
            return;
        }
        if let Some(e) = ep.take() {
            e.close();
            tracing::debug!("no invitation outstanding: the join endpoint is closed");
        }
    }

    /// Makes an invitation valid for `ttl`, good for one join. `hosts` are this device's
    /// addresses as others can reach them; `main_port` the port of its main endpoint.
    pub async fn invite(
        self: &Arc<Self>,
        hosts: &[std::net::IpAddr],
        main_port: u16,
        ttl: Duration,
    ) -> Result<Invite> {
        let secret: [u8; 16] = pvfs_store::os_random()?;
        let ttl = Duration::from_secs(ttl.as_secs().max(1));
        let expires = unix_now() + ttl.as_secs();
        let port = {
            let mut ep = self.endpoint.lock().await;
            if ep.is_none() {
                let e = Endpoint::bind(self.bind, &self.cert, Arc::new(Anyone))?;
                let me = self.clone();
                let server = e.clone();
                tokio::spawn(async move { me.serve(server).await });
                *ep = Some(e);
            }
            let port = ep.as_ref().expect("set above").local_addr()?.port();
            let mut open = self.open.lock();
            prune_expired(&mut open);
            open.insert(secret, expires);
            port
        };
        // Closed again once this one expires, unless others are outstanding.
        let me = self.clone();
        let ttl = ttl + Duration::from_millis(100);
        tokio::spawn(async move {
            tokio::time::sleep(ttl).await;
            me.close_if_idle().await;
        });
        Ok(Invite {
            inviter: self.cert.device(),
            join: hosts.iter().map(|h| SocketAddr::new(*h, port)).collect(),
            peers: hosts
                .iter()
                .map(|h| SocketAddr::new(*h, main_port))
                .collect(),
            secret,
            expires,
        })
    }

    async fn serve(self: Arc<Self>, endpoint: Endpoint) {
        while let Some(peer) = endpoint.accept().await {
            let Ok(slot) = self.joins.clone().try_acquire_owned() else {
                peer.conn.close(5u32.into(), b"busy");
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(JOIN_TIMEOUT, me.redeem(&peer)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(device = %peer.device.fmt_short(), "join refused: {e}")
                    }
                    Err(_) => {
                        tracing::warn!(device = %peer.device.fmt_short(), "join refused: too slow")
                    }
                }
                // Let the answer reach the joiner before the connection goes.
                tokio::time::sleep(Duration::from_millis(200)).await;
                peer.conn.close(0u32.into(), b"done");
                drop(slot);
                me.close_if_idle().await;
            });
        }
    }

    async fn redeem(&self, peer: &crate::transport::Peer) -> Result<()> {
        // Within `JOIN_TIMEOUT` as a whole (the caller's).
        let (mut send, mut recv) = peer
            .conn
            .accept_bi()
            .await
            .map_err(|e| NetError::Connect(e.to_string()))?;
        let Some(Message::Join { secret, name }) = wire::read_message(&mut recv).await? else {
            return Err(NetError::Malformed("expected Join".into()));
        };
        let valid = {
            let mut open = self.open.lock();
            // One use only, whatever the outcome.
            open.remove(&secret).is_some_and(|exp| exp > unix_now())
        };
        if !valid {
            let msg =
                Message::Error("the invitation was already used, has expired or is unknown".into());
            let _ = wire::write_message(&mut send, &msg).await;
            let _ = send.finish();
            return Err(NetError::Connect(
                "used, expired or unknown invitation".into(),
            ));
        }
        let store = self.store.clone();
        let device = peer.device;
        let n = name.clone();
        let answer = tokio::task::spawn_blocking(move || {
            if store
                .members()?
                .iter()
                .any(|(d, m)| *d == device && m.removed)
            {
                return Ok(Err("this device was removed from the namespace"));
            }
            // The welcome must fit the joiner's limits, checked before the change is made.
            let members = store.member_ops()?;
            let authors =
                store.device_keys(members.iter().map(|o| o.id.device).chain([store.device()]))?;
            if members.len() >= wire::MAX_OPS || authors.len() > wire::MAX_KEYS {
                return Ok(Err("the namespace's member list is too long to send"));
            }
            store.commit(true, |tx| tx.set_member(device, &n, true))?;
            let members = store.member_ops()?;
            let keys = store.device_keys(members.iter().map(|o| o.id.device))?;
            Ok::<_, pvfs_store::StoreError>(Ok((members, keys)))
        })
        .await
        .map_err(|e| NetError::Io(std::io::Error::other(e)))??;
        let (members, keys) = match answer {
            Ok(welcome) => welcome,
            Err(why) => {
                let _ = wire::write_message(&mut send, &Message::Error(why.into())).await;
                let _ = send.finish();
                return Err(NetError::Connect(why.into()));
            }
        };
        tracing::info!(device = %device.fmt_short(), %name, "a new device joined");
        let welcome = Message::Welcome {
            namespace: self.store.namespace(),
            name: self.name.clone(),
            members,
            keys,
        };
        wire::write_message(&mut send, &welcome).await?;
        let _ = send.finish();
        Ok(())
    }
}

/// What a joining device learns from its inviter.
#[derive(Debug)]
pub struct Welcome {
    /// The namespace id.
    pub namespace: [u8; 16],
    /// The inviting device's name.
    pub inviter_name: String,
    /// The namespace's membership changes, signed by their authors (`Store::seed_members`).
    pub members: Vec<pvfs_store::OpRecord>,
    /// The public keys of their authors.
    pub keys: Vec<[u8; pvfs_store::KEY_LEN]>,
}

/// The joining side: redeems `invite` as `cert`.
pub async fn join(invite: &Invite, cert: &DeviceCert, name: &str) -> Result<Welcome> {
    if invite.expires <= unix_now() {
        return Err(NetError::Connect("the invitation has expired".into()));
    }
    let any: SocketAddr = "0.0.0.0:0".parse().expect("literal address");
    let endpoint = Endpoint::bind(any, cert, Arc::new(Only(invite.inviter)))?;
    let mut last = NetError::Connect("the invitation names no address".into());
    for addr in &invite.join {
        let res = async {
            let peer = endpoint.connect(*addr).await?;
            let (mut send, mut recv) = peer
                .conn
                .open_bi()
                .await
                .map_err(|e| NetError::Connect(e.to_string()))?;
            let msg = Message::Join {
                secret: invite.secret,
                name: name.to_string(),
            };
            wire::write_message(&mut send, &msg).await?;
            let _ = send.finish();
            match wire::read_message(&mut recv).await? {
                Some(Message::Welcome {
                    namespace,
                    name,
                    members,
                    keys,
                }) => Ok(Welcome {
                    namespace,
                    inviter_name: name,
                    members,
                    keys,
                }),
                Some(Message::Error(e)) => Err(NetError::Connect(format!("refused: {e}"))),
                other => Err(NetError::Malformed(format!("unexpected answer {other:?}"))),
            }
        };
        match tokio::time::timeout(JOIN_TIMEOUT, res).await {
            Ok(Ok(ok)) => {
                endpoint.close();
                return Ok(ok);
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = NetError::Connect(format!("{addr}: no answer")),
        }
    }
    endpoint.close();
    Err(last)
}

/// Forgets the invitations that have expired.
fn prune_expired(open: &mut HashMap<[u8; 16], u64>) {
    let now = unix_now();
    open.retain(|_, &mut exp| exp > now);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_roundtrip_and_garbage_is_refused() {
        let inv = Invite {
            inviter: DeviceId([1; 16]),
            join: vec!["127.0.0.1:9".parse().unwrap()],
            peers: vec!["127.0.0.1:8".parse().unwrap()],
            secret: [2; 16],
            expires: 99,
        };
        assert_eq!(Invite::from_token(&inv.to_token()).unwrap(), inv);
        for bad in [
            "",
            "pvfs1-",
            "pvfs1-!!!",
            "pvfs2-AAAA",
            "pvfs1-AAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(Invite::from_token(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_join_endpoint_is_open_only_while_an_invitation_is_outstanding() {
        use pvfs_store::{RootOwner, Store};
        let a = Arc::new(crate::tls::tests::new_cert());
        let store = Store::in_memory(a.clone(), RootOwner { uid: 0, gid: 0 }).unwrap();
        store
            .commit(true, |tx| tx.set_member(a.device(), "a", true))
            .unwrap();
        let inviter = Inviter::new(store, "a".into(), a, "127.0.0.1:0".parse().unwrap());
        let localhost = ["127.0.0.1".parse().unwrap()];
        assert!(!inviter.is_open().await);
        // Redeemed: closed once the welcome is out.
        let inv = inviter
            .invite(&localhost, 1, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(inviter.is_open().await);
        let b = crate::tls::tests::new_cert();
        let welcome = join(&inv, &b, "b").await.unwrap();
        assert!(
            welcome.members.len() >= 2,
            "the welcome carries the members"
        );
        for _ in 0..100 {
            if !inviter.is_open().await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !inviter.is_open().await,
            "open after its only invitation was used"
        );
        // Expired: closed too.
        inviter
            .invite(&localhost, 1, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(inviter.is_open().await);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !inviter.is_open().await,
            "open after its only invitation expired"
        );
    }
}
