//! pvfs-tools: the `pvfs` daemon and the `pvfs-admin` client.
//!
//! The binaries in `bin/` only parse arguments; the work is here: `config` (the TOML config
//! and the data directory layout), `identity` (the device key), `daemon` (init, mount,
//! signals, backgrounding), `control` (the admin protocol over the data directory's Unix
//! socket) and `admin` (what each admin command does and prints).

#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

pub mod admin;
pub mod config;
pub mod control;
pub mod daemon;
pub mod identity;
pub mod network;

/// Sets up logging to stderr; `RUST_LOG` chooses what is shown (default: info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // With RUST_LOG=pvfs_fs=debug every FUSE request's span is printed when it closes,
    // with its duration.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a log file (`--background`, a service) gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
