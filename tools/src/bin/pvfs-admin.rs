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
    /// Print a one-time token (one line) with which another device joins: `pvfs join TOKEN`.
    Invite {
        /// How long the token stays valid, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// The devices connected now: address, round-trip time, measured throughput, last seen.
    Peers,
    /// The member devices of the namespace; `devices remove NAME` removes one for good.
    Devices {
        #[command(subcommand)]
        action: Option<DevicesCmd>,
    },
    /// Which devices hold the content of a file or folder, and how much of it.
    Where {
        /// A path below the mount point (or relative to the mount's root).
        path: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum DevicesCmd {
    /// Remove a device: it is refused from then on, by every device.
    Remove {
        /// Its name or device id (or a unique prefix of the id).
        name: String,
    },
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    let data = DataDir::resolve(cli.data)?;
    let req = match cli.cmd {
        Cmd::Status => Request::Status,
        Cmd::Stats => Request::Stats,
        Cmd::Fsck => Request::Fsck,
        Cmd::Invite { ttl } => Request::Invite {
            ttl_secs: Some(ttl),
        },
        Cmd::Peers => Request::Peers,
        Cmd::Devices { action: None } => Request::Devices,
        Cmd::Devices {
            action: Some(DevicesCmd::Remove { name }),
        } => Request::RemoveDevice { name },
        Cmd::Where { path } => Request::Where {
            path: std::path::absolute(&path).unwrap_or(path),
        },
    };
    let value = match control::call(&data.socket(), &req) {
        Ok(v) => v,
        Err(CallError::Failed(e)) => return Err(e),
        Err(CallError::NotRunning) => match req {
            Request::Stats | Request::Fsck => {
                let config = Config::load(&data)?;
                let opts = pvfs_store::StoreOptions {
                    reserve_bytes: config.store.reserve_mb << 20,
                    ..Default::default()
                };
                let store =
                    pvfs_store::Store::open(data.root(), &opts, None).with_context(|| {
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
            _ => anyhow::bail!("no pvfs daemon is running for {}", data.root().display()),
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
