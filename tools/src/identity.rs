//! The device identity: an Ed25519 key pair made with rcgen, stored as PKCS#8 PEM.
//!
//! Owns: creating, saving (mode 0600) and loading the key, and deriving the device id from
//! its public key. Certificates for QUIC are made from this key by `net`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use pvfs_store::DeviceId;

/// A device's key pair.
#[derive(Debug)]
pub struct Identity {
    key: rcgen::KeyPair,
}

impl Identity {
    /// A new random identity.
    pub fn generate() -> anyhow::Result<Identity> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .context("generating an Ed25519 key")?;
        Ok(Identity { key })
    }

    /// Loads the identity at `path`.
    pub fn load(path: &Path) -> anyhow::Result<Identity> {
        let pem =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let key = rcgen::KeyPair::from_pem(&pem)
            .with_context(|| format!("{}: not a valid key", path.display()))?;
        anyhow::ensure!(
            key.algorithm() == &rcgen::PKCS_ED25519,
            "{}: not an Ed25519 key",
            path.display()
        );
        Ok(Identity { key })
    }

    /// Writes the identity to `path` (new file, mode 0600).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(self.key.serialize_pem().as_bytes())?;
        f.sync_all()?;
        Ok(())
    }

    /// The key as PKCS#8 PEM (for the TLS certificate).
    pub fn pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The device id: derived from the public key.
    pub fn device_id(&self) -> DeviceId {
        DeviceId::from_public_key(self.key.public_key_raw())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_the_same_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("id.pem");
        let id = Identity::generate().unwrap();
        id.save(&p).unwrap();
        let again = Identity::load(&p).unwrap();
        assert_eq!(id.device_id(), again.device_id());
        assert!(id.save(&p).is_err(), "never overwrites a key");
        std::fs::write(dir.path().join("bad.pem"), "garbage").unwrap();
        assert!(Identity::load(&dir.path().join("bad.pem")).is_err());
    }
}
