//! The configuration file and the data directory layout.
//!
//! Owns: `Config` (TOML, unknown keys rejected, every error reported with its line), the
//! embedded default config, and the paths inside a data directory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// The default configuration as a file: documents every key (a test checks it matches
/// `Config::default()`).
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Device name.
    pub name: Option<String>,
    /// FUSE settings.
    pub fuse: FuseConfig,
    /// Store settings.
    pub store: StoreConfig,
    /// Network settings.
    pub net: NetConfig,
}

/// `[net]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetConfig {
    /// UDP address of the QUIC endpoint.
    pub listen: String,
    /// Devices to connect to, `host:port`.
    pub peers: Vec<String>,
    /// Seconds before a read of content that no reachable device delivers fails.
    pub fetch_timeout_secs: u64,
    /// Find and announce devices on the local network with mDNS.
    pub mdns: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            listen: "0.0.0.0:7420".into(),
            peers: Vec::new(),
            fetch_timeout_secs: 30,
            mdns: true,
        }
    }
}

/// `[fuse]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FuseConfig {
    /// Session threads.
    pub threads: usize,
    /// `allow_other`.
    pub allow_other: bool,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            threads: 4,
            allow_other: true,
        }
    }
}

/// `[store]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Chunk cache, MiB.
    pub chunk_cache_mb: u64,
    /// Reserved free space, MiB.
    pub reserve_mb: u64,
    /// Per-file buffer before a background commit, MiB.
    pub commit_threshold_mb: u64,
    /// Keep no file content on this device's disk.
    pub online_only: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            chunk_cache_mb: 256,
            reserve_mb: 192,
            commit_threshold_mb: 16,
            online_only: false,
        }
    }
}

fn line_of(text: &str, err: &toml::de::Error) -> String {
    match err.span() {
        Some(span) => format!(
            "line {}",
            text[..span.start.min(text.len())].lines().count().max(1)
        ),
        None => "?".into(),
    }
}

impl Config {
    /// Parses a config file's text; missing keys keep their defaults. Errors are one line
    /// and name the line.
    pub fn parse(text: &str, origin: &Path) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e: toml::de::Error| {
            let msg = e.message().replace('\n', " ");
            anyhow::anyhow!(
                "{}: {}: {}",
                origin.display(),
                line_of(text, &e),
                msg.trim()
            )
        })?;
        config
            .validate()
            .with_context(|| origin.display().to_string())?;
        Ok(config)
    }

    /// Loads `DATA/config.toml` if it exists, else the defaults.
    pub fn load(data: &DataDir) -> anyhow::Result<Config> {
        let path = data.config();
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=64).contains(&self.fuse.threads),
            "fuse.threads must be 1..=64"
        );
        anyhow::ensure!(
            self.store.chunk_cache_mb <= 1 << 20,
            "store.chunk_cache_mb is too large"
        );
        anyhow::ensure!(
            self.store.reserve_mb <= 1 << 30,
            "store.reserve_mb is too large"
        );
        anyhow::ensure!(
            (1..=4096).contains(&self.store.commit_threshold_mb),
            "store.commit_threshold_mb must be 1..=4096"
        );
        self.net
            .listen
            .parse::<std::net::SocketAddr>()
            .map_err(|_| anyhow::anyhow!("net.listen must be an IP address and port"))?;
        anyhow::ensure!(
            self.net.peers.len() <= 1024 && self.net.peers.iter().all(|p| p.contains(':')),
            "net.peers must be host:port strings"
        );
        anyhow::ensure!(
            (1..=3600).contains(&self.net.fetch_timeout_secs),
            "net.fetch_timeout_secs must be 1..=3600"
        );
        if let Some(n) = &self.name {
            anyhow::ensure!(
                !n.is_empty() && n.len() <= 64 && !n.contains(['/', '\0', '\n']),
                "name must be 1..=64 characters without '/', NUL or newline"
            );
        }
        Ok(())
    }
}

/// A data directory: where one device keeps everything.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory named by `--data`, else `$PVFS_DATA`, else `~/.local/share/pvfs`.
    pub fn resolve(flag: Option<PathBuf>) -> anyhow::Result<DataDir> {
        let root = match flag.or_else(|| std::env::var_os("PVFS_DATA").map(PathBuf::from)) {
            Some(p) => p,
            None => home()?.join(".local/share/pvfs"),
        };
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir()?.join(root)
        };
        Ok(DataDir { root })
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Optional config file.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// The device key (PKCS#8 PEM, mode 0600).
    pub fn identity(&self) -> PathBuf {
        self.root.join("identity.pem")
    }
    /// The admin control socket (mode 0600).
    pub fn socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }
    /// The daemon's log when it runs in the background.
    pub fn log(&self) -> PathBuf {
        self.root.join("pvfs.log")
    }
}

/// The user's home directory.
pub fn home() -> anyhow::Result<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .context("HOME is not set")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_config_equals_the_defaults() {
        let c = Config::parse(DEFAULT_CONFIG, Path::new("default-config.toml")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn user_values_override_defaults() {
        let c =
            Config::parse("name = \"box\"\n[fuse]\nthreads = 2\n", Path::new("c.toml")).unwrap();
        assert_eq!(c.fuse.threads, 2);
        assert_eq!(c.store.reserve_mb, 192);
        assert_eq!(c.name.as_deref(), Some("box"));
    }

    #[test]
    fn errors_are_one_line_with_a_line_number() {
        let e = Config::parse("[fuse]\nthreads = 2\nthreads = = 3\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml: line 3"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = Config::parse("[fuse]\nthredas = 2\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("thredas"), "{e}");
        let e = format!(
            "{:#}",
            Config::parse("[fuse]\nthreads = 0\n", Path::new("c.toml")).unwrap_err()
        );
        assert!(e.contains("fuse.threads"), "{e}");
        let e = Config::parse("[fuse]\nthreads = \"four\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml: line 2"), "{e}");
    }
}
