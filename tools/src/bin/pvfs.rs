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
        /// The invitation token.
        token: String,
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
        Cmd::Join { token, data, name } => {
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

fn main() {
    pvfs_tools::tune_malloc();
    pvfs_tools::init_logging();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("pvfs: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}
