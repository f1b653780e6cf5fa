//! The admin control protocol: one JSON request line, one JSON response line, over the Unix
//! socket `DATA/control.sock` (mode 0600, in a 0700 data directory).
//!
//! Owns: the request/response types, the server task (tokio, one task per connection, store
//! work on blocking threads) and the client call.
//! Must not: be reachable from the network.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::admin::{self, Node};

/// Longest request line the server reads.
const MAX_REQUEST: usize = 64 * 1024;

/// An admin request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Device, namespace, mount point, uptime, totals.
    Status,
    /// Files, bytes, dedup.
    Stats,
    /// Full consistency check.
    Fsck,
    /// Devices connected now.
    Peers,
    /// Member devices.
    Devices,
    /// Removes a member for good.
    RemoveDevice {
        /// Its name or device id (prefix).
        name: String,
    },
    /// A one-time invitation token.
    Invite {
        /// Lifetime in seconds (default one hour).
        #[serde(default)]
        ttl_secs: Option<u64>,
    },
    /// Which devices hold the content of a path.
    Where {
        /// The path (absolute below the mount point, or relative to its root).
        path: std::path::PathBuf,
    },
}

/// The answer to a request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The one-line error, if not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The result.
    #[serde(default)]
    pub data: serde_json::Value,
}

/// Serves admin requests on `path` until the runtime shuts down.
pub async fn serve(path: &Path, node: Arc<Node>) -> anyhow::Result<()> {
    if path.exists() {
        // A live daemon would have answered; the data directory lock guarantees there is none.
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    // Only the owner of the data directory may talk to its daemon, whatever the socket's
    // mode says (a mode can be changed; the kernel's word on the caller cannot).
    let owner = {
        use std::os::unix::fs::MetadataExt;
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::metadata(dir)
            .with_context(|| format!("reading the owner of {}", dir.display()))?
            .uid()
    };
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("control socket accept: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == owner => {}
            Ok(cred) => {
                tracing::warn!(
                    uid = cred.uid(),
                    owner,
                    "refused an admin connection from another user"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!("refused an admin connection: its credentials: {e}");
                continue;
            }
        }
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, node).await {
                tracing::debug!("control connection: {e:#}");
            }
        });
    }
}

async fn handle(stream: tokio::net::UnixStream, node: Arc<Node>) -> anyhow::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let n = tokio::io::AsyncReadExt::take(tokio::io::BufReader::new(rd), MAX_REQUEST as u64)
        .read_line(&mut line)
        .await?;
    let resp = if n == 0 || !line.ends_with('\n') {
        Response {
            ok: false,
            error: Some("request too long or not terminated by a newline".into()),
            data: Default::default(),
        }
    } else {
        match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let span = tracing::info_span!("admin", ?req);
                let res = tokio::task::spawn_blocking(move || {
                    span.in_scope(|| admin::answer(&node, &req))
                })
                .await?;
                match res {
                    Ok(data) => Response {
                        ok: true,
                        error: None,
                        data,
                    },
                    Err(e) => Response {
                        ok: false,
                        error: Some(format!("{e:#}")),
                        data: Default::default(),
                    },
                }
            }
            Err(e) => Response {
                ok: false,
                error: Some(format!("bad request: {e}")),
                data: Default::default(),
            },
        }
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    Ok(())
}

/// Why a call did not reach a daemon.
#[derive(Debug)]
pub enum CallError {
    /// No daemon listens on the socket.
    NotRunning,
    /// The daemon answered with an error, or the exchange failed.
    Failed(anyhow::Error),
}

/// Sends one request to the daemon of a data directory.
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value, CallError> {
    let stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(CallError::NotRunning)
        }
        Err(e) => {
            return Err(CallError::Failed(anyhow::anyhow!(
                "connecting to {}: {e}",
                socket.display()
            )))
        }
    };
    let exchange = || -> anyhow::Result<serde_json::Value> {
        let mut w = &stream;
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        w.write_all(&line)?;
        let mut resp = String::new();
        BufReader::new(&stream).read_line(&mut resp)?;
        let resp: Response =
            serde_json::from_str(&resp).context("the daemon's answer is not valid")?;
        if resp.ok {
            Ok(resp.data)
        } else {
            Err(anyhow::anyhow!(resp
                .error
                .unwrap_or_else(|| "unknown error".into())))
        }
    };
    exchange().map_err(CallError::Failed)
}
