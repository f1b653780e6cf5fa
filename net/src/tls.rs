//! Mutual TLS between the member devices of a namespace.
//!
//! Owns: the device certificate (self-signed, made with rcgen from the device's Ed25519 key),
//! the mapping from a peer certificate to a `DeviceId`, and rustls configurations whose
//! verifiers accept a peer only if its device is a current member, in both directions.
//! Must not: accept anything on the strength of a CA, a name or a date. Membership is the
//! only trust: an unpaired device with a well-formed certificate gets no connection.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{self, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use pvfs_store::DeviceId;

use crate::error::{NetError, Result};
use crate::wire::ALPN;

/// The TLS server name every device presents and expects; identity comes from the key.
pub const SERVER_NAME: &str = "pvfs";

/// OID of Ed25519 public keys (RFC 8410).
const ED25519_OID: &str = "1.3.101.112";

/// Who belongs to the namespace, as the verifiers see it. Answers must reflect revocations at
/// once: a revoked device is refused on its next handshake.
pub trait Members: Send + Sync + fmt::Debug {
    /// True if `device` is a current member.
    fn is_member(&self, device: &DeviceId) -> bool;
}

/// A device's TLS credentials.
pub struct DeviceCert {
    cert: CertificateDer<'static>,
    key_der: Vec<u8>,
    device: DeviceId,
    /// The same key, for signing membership changes.
    signing: ring::signature::Ed25519KeyPair,
}

impl fmt::Debug for DeviceCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCert")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl DeviceCert {
    /// Makes the self-signed certificate of the Ed25519 key in `key_pem` (PKCS#8 PEM).
    pub fn from_key_pem(key_pem: &str) -> Result<DeviceCert> {
        let key = rcgen::KeyPair::from_pem(key_pem)
            .map_err(|e| NetError::Tls(format!("device key: {e}")))?;
        if key.algorithm() != &rcgen::PKCS_ED25519 {
            return Err(NetError::Tls("device key is not Ed25519".into()));
        }
        let device = DeviceId::from_public_key(key.public_key_raw());
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(|e| NetError::Tls(format!("certificate parameters: {e}")))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("pvfs device {device}"));
        let cert = params
            .self_signed(&key)
            .map_err(|e| NetError::Tls(format!("signing the device certificate: {e}")))?;
        let key_der = key.serialize_der();
        let signing = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&key_der)
            .map_err(|e| NetError::Tls(format!("device key: {e}")))?;
        Ok(DeviceCert {
            cert: cert.der().clone(),
            key_der,
            device,
            signing,
        })
    }

    /// The device these credentials belong to.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

impl pvfs_store::Signer for DeviceCert {
    fn public_key(&self) -> Vec<u8> {
        ring::signature::KeyPair::public_key(&self.signing)
            .as_ref()
            .to_vec()
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.signing.sign(msg).as_ref().to_vec()
    }
}

/// The device a certificate speaks for: derived from its Ed25519 public key, as the device
/// id always is. Certificates with other key types are refused.
pub fn device_of_cert(cert: &CertificateDer<'_>) -> Result<DeviceId> {
    let (rest, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| NetError::Tls(format!("peer certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(NetError::Tls("peer certificate has trailing bytes".into()));
    }
    let spki = parsed.public_key();
    if spki.algorithm.algorithm.to_id_string() != ED25519_OID {
        return Err(NetError::Tls("peer certificate key is not Ed25519".into()));
    }
    let raw = spki.subject_public_key.data.as_ref();
    if raw.len() != 32 {
        return Err(NetError::Tls(
            "peer Ed25519 key has the wrong length".into(),
        ));
    }
    Ok(DeviceId::from_public_key(raw))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(crypto::ring::default_provider())
}

/// Accepts a peer certificate (either side) iff its device is a member; the handshake
/// signature is still checked, so the peer must hold the key.
#[derive(Debug)]
struct MemberVerifier {
    members: Arc<dyn Members>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl MemberVerifier {
    fn new(members: Arc<dyn Members>) -> MemberVerifier {
        MemberVerifier {
            members,
            algorithms: provider().signature_verification_algorithms,
        }
    }

    fn check(&self, cert: &CertificateDer<'_>) -> std::result::Result<(), rustls::Error> {
        let bad = |what: &str| {
            tracing::warn!("refusing a peer: {what}");
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        };
        let device = device_of_cert(cert).map_err(|e| bad(&e.to_string()))?;
        if self.members.is_member(&device) {
            Ok(())
        } else {
            Err(bad(&format!("device {device} is not a member")))
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

/// The only signature scheme devices use.
const SCHEMES: [SignatureScheme; 1] = [SignatureScheme::ED25519];

/// QUIC is TLS 1.3 only: a TLS 1.2 signature never comes, and is refused if it does.
fn no_tls12() -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls13RequiredForQuic,
    ))
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

impl ClientCertVerifier for MemberVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

fn tls_err(e: rustls::Error) -> NetError {
    NetError::Tls(e.to_string())
}

/// The server side: TLS 1.3 only, a client certificate required, members only.
pub fn server_config(cert: &DeviceCert, members: Arc<dyn Members>) -> Result<rustls::ServerConfig> {
    let verifier = Arc::new(MemberVerifier::new(members));
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert.cert.clone()], cert.key())
        .map_err(tls_err)?;
    // No resumption: a resumed session skips the verifier, so a revoked device could come
    // back with an old ticket.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The client side: TLS 1.3 only, presents the device certificate, members only.
pub fn client_config(cert: &DeviceCert, members: Arc<dyn Members>) -> Result<rustls::ClientConfig> {
    let verifier = Arc::new(MemberVerifier::new(members));
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert.cert.clone()], cert.key())
        .map_err(tls_err)?;
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh device certificate.
    pub(crate) fn new_cert() -> DeviceCert {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        DeviceCert::from_key_pem(&key.serialize_pem()).expect("certificate")
    }

    #[test]
    fn a_certificate_speaks_for_the_device_of_its_key() {
        let c = new_cert();
        assert_eq!(device_of_cert(&c.cert).unwrap(), c.device());
    }

    #[test]
    fn other_key_types_and_garbage_are_refused() {
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(DeviceCert::from_key_pem(&p256.serialize_pem()).is_err());
        let params = rcgen::CertificateParams::new(vec!["x".into()]).unwrap();
        let cert = params.self_signed(&p256).unwrap();
        assert!(device_of_cert(cert.der()).is_err());
        assert!(device_of_cert(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
    }
}
