//! Finding devices on the local network with mDNS (DNS-SD).
//!
//! Owns: announcing this device as `_pvfs._udp.local.` (instance: the device id; TXT: the
//! device id, a hash of the namespace id, the port) and browsing for other devices of the
//! same namespace, whose addresses go to the session layer to dial.
//! Must not: trust what it hears: an announcement is only a hint where to dial; identity and
//! membership are proven by the TLS handshake.

use std::net::{IpAddr, SocketAddr};

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};

use crate::error::{NetError, Result};
use crate::sync::Net;

/// The DNS-SD service type of pvfs.
pub const SERVICE: &str = "_pvfs._udp.local.";

/// The TXT value naming a namespace: the first 8 bytes of its hash, in hex (enough to tell
/// namespaces apart on one network, without publishing the namespace id).
fn ns_tag(namespace_hash: &[u8; 32]) -> String {
    namespace_hash[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A running announcement and browse.
pub struct Discovery {
    daemon: ServiceDaemon,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Discovery")
    }
}

impl Discovery {
    /// Announces this device (listening on `port`) and dials every device of the same
    /// namespace that announces itself. Must be called inside the network's runtime.
    pub fn start(net: &Net, port: u16) -> Result<Discovery> {
        let err = |e: mdns_sd::Error| NetError::Connect(format!("mDNS: {e}"));
        let daemon = ServiceDaemon::new().map_err(err)?;
        let device = net.device();
        let tag = ns_tag(&net.namespace_hash());
        let me = device.to_string();
        let host = format!("pvfs-{}.local.", device.fmt_short());
        let props = [
            ("device", me.as_str()),
            ("ns", tag.as_str()),
            ("port", &port.to_string()),
        ];
        let info = ServiceInfo::new(SERVICE, &me, &host, "", port, &props[..])
            .map_err(err)?
            .enable_addr_auto();
        daemon.register(info).map_err(err)?;
        let events = daemon.browse(SERVICE).map_err(err)?;
        let me = net.clone();
        net.spawn_loop(async move {
            let net = me;
            while let Ok(ev) = events.recv_async().await {
                let ServiceEvent::ServiceResolved(info) = ev else {
                    continue;
                };
                if info.get_property_val_str("ns") != Some(tag.as_str()) {
                    continue;
                }
                let Some(other) = info
                    .get_property_val_str("device")
                    .and_then(|d| d.parse::<pvfs_store::DeviceId>().ok())
                else {
                    continue;
                };
                if other == device {
                    continue;
                }
                let port = info.get_port();
                let addrs: Vec<SocketAddr> = info
                    .get_addresses_v4()
                    .into_iter()
                    .map(|ip| SocketAddr::new(IpAddr::V4(ip), port))
                    .collect();
                tracing::debug!(device = %other.fmt_short(), ?addrs, "mDNS: found a device");
                net.discovered(other, addrs).await;
            }
        });
        tracing::info!(service = SERVICE, port, "announcing this device with mDNS");
        Ok(Discovery { daemon })
    }

    /// Withdraws the announcement.
    pub fn stop(self) {
        let _ = self.daemon.shutdown();
    }
}
