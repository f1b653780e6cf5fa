//! `pvfs-admin`: inspect and control the daemon of a data directory.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pvfs_tools::admin;
use pvfs_tools::config::{Config, DataDir};
use pvfs_tools::control::{self, CallError, Request};

/// Inspect and control a running pvfs daemon.
#[derive(Parser, Debug)]
#[command(name = "pvfs-admin", version, about)]
struct Cli {
    /// Data directory of the daemon (default $PVFS_DATA or ~/.local/share/pvfs).
    #[arg(long, global = true)]
    data: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Device, namespace, mount point, uptime.
    Status,
    /// Files, logical and stored bytes, dedup ratio.
    Stats,
    /// Verify every chunk hash, manifest, reference count and the tree; non-zero exit on any
    /// problem. Works with or without a running daemon.
    Fsck,
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    let data = DataDir::resolve(cli.data)?;
    let req = match cli.cmd {
        Cmd::Status => Request::Status,
        Cmd::Stats => Request::Stats,
        Cmd::Fsck => Request::Fsck,
    };
    let value = match control::call(&data.socket(), &req) {
        Ok(v) => v,
        Err(CallError::Failed(e)) => return Err(e),
        Err(CallError::NotRunning) => match req {
            Request::Status => {
                anyhow::bail!("no pvfs daemon is running for {}", data.root().display())
            }
            Request::Stats | Request::Fsck => {
                let config = Config::load(&data)?;
                let opts = pvfs_store::StoreOptions {
                    reserve_bytes: config.store.reserve_mb << 20,
                    ..Default::default()
                };
                let store = pvfs_store::Store::open(data.root(), &opts).with_context(|| {
                    format!(
                        "no daemon is running and the store in {} cannot be opened",
                        data.root().display()
                    )
                })?;
                match req {
                    Request::Fsck => admin::fsck(&store)?,
                    _ => admin::stats(&store),
                }
            }
        },
    };
    if cli.json {
        println!("{value}");
    } else {
        admin::print_human(&req, &value);
    }
    Ok(match req {
        Request::Fsck => admin::fsck_clean(&value),
        _ => true,
    })
}

fn main() {
    pvfs_tools::init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("pvfs-admin: {}", format!("{e:#}").replace('\n', " "));
            std::process::exit(1);
        }
    }
}
