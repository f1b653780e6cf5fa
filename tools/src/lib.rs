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

/// `mi_option_purge_delay` in mimalloc.h (the same in mimalloc v2 and v3; the bindings of
/// `libmimalloc-sys` do not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the kernel only after this long unused: a write stream frees
/// and allocates tens of MiB per commit, and memory returned at once comes back as freshly
/// faulted, kernel-zeroed pages (measured: 1 GiB random write 171 -> 197 MB/s).
const PURGE_DELAY_MS: std::ffi::c_long = 1000;

/// Allocator settings of the daemon (and of the benchmarks that measure it), to be called
/// first thing in `main`, in a binary whose global allocator is mimalloc.
///
/// RocksDB allocates write batches and memtable blocks of several MiB with the C allocator:
/// keep those in the heap for reuse instead of mapping fresh (kernel-zeroed) pages each time.
/// mimalloc (Rust allocations) keeps freed memory for a while for the same reason.
pub fn tune_malloc() {
    // SAFETY: sets an allocator option; mimalloc reads options atomically.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        // One heap for every thread: glibc gives threads heaps of their own and hands their
        // free tails back to the kernel, so RocksDB's buffer for each chunk read was fresh,
        // faulted-in memory (half the page faults of a fetch; 5.3-5.8 CPU-s per GiB fetched
        // with one heap, 5.4-9.7 without). Local seq, fio and tree figures did not move.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    // No transparent huge pages for this process: mimalloc asks for them, and memory it
    // returns and takes again then comes back as 2 MiB pages zeroed whole by the kernel.
    // Zeroing was 15% of the CPU of a cold read of remote content; without it that read used
    // about 10% less CPU and ran about 15% faster, and local writes and reads were no slower.
    // An error (an old kernel) leaves THP as it was.
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_THP_DISABLE) only sets a flag on this process's memory map.
    unsafe {
        // prctl is variadic and the kernel reads whole `unsigned long` arguments (the unused
        // ones must be 0): pass them at that width, not as `int`s.
        let (on, unused): (libc::c_ulong, libc::c_ulong) = (1, 0);
        libc::prctl(libc::PR_SET_THP_DISABLE, on, unused, unused, unused);
    }
}
