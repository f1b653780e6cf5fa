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

/// `mi_option_purge_delay` in mimalloc.h (the same in mimalloc v2 and v3; the bindings of
/// `libmimalloc-sys` do not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the kernel only after this long unused: a write stream frees
/// and allocates tens of MiB per commit, and memory returned at once comes back as freshly
/// faulted, kernel-zeroed pages (measured: 1 GiB random write 171 -> 197 MB/s).
const PURGE_DELAY_MS: std::ffi::c_long = 1000;

/// RocksDB allocates write batches and memtable blocks of several MiB with the C allocator:
/// keep those in the heap for reuse instead of mapping fresh (kernel-zeroed) pages each time.
/// mimalloc (Rust allocations) keeps freed memory for a while for the same reason.
fn tune_malloc() {
    // SAFETY: sets an allocator option; mimalloc reads options atomically.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
    // No transparent huge pages for this process: mimalloc asks for them, and memory it
    // returns and takes again then comes back as 2 MiB pages zeroed whole by the kernel.
    // Zeroing was 15% of the CPU of a cold read of remote content; without it that read used
    // about 10% less CPU and ran about 15% faster, and local writes and reads were no slower.
    // An error (an old kernel) leaves THP as it was.
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_THP_DISABLE) only sets a flag on this process's memory map.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
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
    tune_malloc();
    pvfs_tools::init_logging();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("pvfs: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}
