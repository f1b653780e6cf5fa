//! `pvfs`: create a device, join a namespace, mount.

/// mimalloc keeps freed memory for reuse: large per-commit buffers would otherwise be
/// mapped, zeroed by the kernel and unmapped again on every commit.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use pvfs_tools::config::DataDir;
use pvfs_tools::daemon::{self, MountArgs};

/// pvfs: one personal filesystem across all your devices.
#[derive(Parser, Debug)]
#[command(name = "pvfs", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Mount the namespace (first run creates the device and a new namespace).
    Mount {
        /// Where to mount (default ~/Pervasive).
        mountpoint: Option<PathBuf>,
        /// Data directory (default $PVFS_DATA or ~/.local/share/pvfs).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Return once mounted, leaving the daemon running (log in DATA/pvfs.log).
        #[arg(long)]
        background: bool,
        /// FUSE session threads (default from the config: 4).
        #[arg(long, help_heading = "Tuning")]
        fuse_threads: Option<usize>,
        /// UDP address for QUIC between devices (default from the config: 0.0.0.0:7420).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
        /// Another device to connect to (repeatable; adds to the config's `peers`).
        #[arg(long = "peer", value_name = "ADDR:PORT")]
        peers: Vec<String>,
    },
    /// Join an existing namespace with a token from `pvfs-admin invite` (no mount).
    Join {
        /// The invitation token, or `-` to read it from standard input (a token on the
        /// command line can be read by other local users from /proc until it is used).
        #[arg(required_unless_present = "token_file", conflicts_with = "token_file")]
        token: Option<String>,
        /// Read the invitation token from this file.
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// Data directory (default $PVFS_DATA or ~/.local/share/pvfs).
        #[arg(long)]
        data: Option<PathBuf>,
        /// A name for this device (default: the host name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Create a new device and a new namespace without mounting.
    Init {
        /// Data directory (default $PVFS_DATA or ~/.local/share/pvfs).
        #[arg(long)]
        data: Option<PathBuf>,
        /// A name for this device (default: the host name).
        #[arg(long)]
        name: Option<String>,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Mount {
            mountpoint,
            data,
            background,
            fuse_threads,
            listen,
            peers,
        } => daemon::mount(MountArgs {
            mountpoint,
            data,
            background,
            fuse_threads,
            listen,
            peers,
        }),
        Cmd::Join {
            token,
            token_file,
            data,
            name,
        } => {
            let token = read_token(token, token_file)?;
            let data = DataDir::resolve(data)?;
            let store = daemon::join(&data, &token, name.as_deref())?;
            println!("{}", store.device());
            Ok(())
        }
        Cmd::Init { data, name } => {
            let data = DataDir::resolve(data)?;
            let store = daemon::init(&data, name.as_deref())?;
            println!("{}", store.device());
            Ok(())
        }
    }
}

/// The invitation token: given, from standard input (`-`), or from a file.
fn read_token(token: Option<String>, file: Option<PathBuf>) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::Read;
    // A token is a few hundred bytes: more is not a token (and is not read into memory).
    let read = |r: &mut dyn Read, from: &str| -> anyhow::Result<String> {
        let mut s = String::new();
        r.take(64 << 10)
            .read_to_string(&mut s)
            .with_context(|| format!("reading the token from {from}"))?;
        Ok(s)
    };
    let text = match (token.as_deref(), file) {
        (Some("-"), _) => read(&mut std::io::stdin(), "standard input")?,
        (Some(t), _) => t.to_string(),
        (None, Some(path)) => {
            let from = path.display().to_string();
            let mut f = std::fs::File::open(&path)
                .with_context(|| format!("reading the token from {from}"))?;
            read(&mut f, &from)?
        }
        (None, None) => anyhow::bail!("no invitation token: give it, `-` or --token-file"),
    };
    let token = text.trim();
    anyhow::ensure!(!token.is_empty(), "the invitation token is empty");
    Ok(token.to_string())
}

fn main() {
    pvfs_tools::tune_malloc();
    pvfs_tools::init_logging();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("pvfs: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}
