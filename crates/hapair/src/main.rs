//! `hapair`: one binary for the supervisor, its admin commands, the
//! witness, the replicated mount and its mirror. Exit codes: 0 success,
//! 1 failure, 2 usage or configuration error, 3 refused in the current
//! state.

mod cli;
mod client;
mod config;
mod daemon;
mod demo;
mod demo_app;
mod fdlimit;
mod guard;
mod mirror_apply;
mod mirror_server;
mod mount;
mod poll;
mod state;
mod sync;
mod witness;

use clap::{Parser, Subcommand};
use hapair_proto::Mode;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "hapair",
    version,
    about = "Software-only high-availability pair: replicated mount, mirror, supervisor"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options every cluster command takes.
#[derive(clap::Args, Clone)]
struct ClusterOpts {
    /// The cluster configuration file.
    #[arg(short = 'c', long = "config", default_value = config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// This node's name (default: the node whose address is on this host).
    #[arg(long)]
    node: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run this node's supervisor (foreground).
    Daemon {
        #[command(flatten)]
        c: ClusterOpts,
    },
    /// Start this node's module (after `hapair stop`).
    Start {
        #[command(flatten)]
        c: ClusterOpts,
    },
    /// Stop this node's module (a primary hands the service over to an in-sync secondary).
    Stop {
        #[command(flatten)]
        c: ClusterOpts,
    },
    /// Make this node primary (first start, or the peer is gone).
    Prim {
        #[command(flatten)]
        c: ClusterOpts,
        /// Serve this node's data even if it is stale (newer changes elsewhere are set aside).
        #[arg(long)]
        force: bool,
    },
    /// Make this node secondary (it receives the primary's data).
    Second {
        #[command(flatten)]
        c: ClusterOpts,
    },
    /// Swap roles with the peer (planned failback): needs an in-sync pair.
    Swap {
        #[command(flatten)]
        c: ClusterOpts,
    },
    /// Both nodes' states, replication, VIP holder, witness, checks, transitions.
    Status {
        #[command(flatten)]
        c: ClusterOpts,
        /// One JSON object (see the README for its fields).
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration file.
    CheckConfig {
        #[command(flatten)]
        c: ClusterOpts,
    },
    /// Run the witness (the arbitrator of the pair) on a third host.
    Witness {
        #[command(flatten)]
        c: ClusterOpts,
        /// Address to listen on (default: [witness] address of the configuration).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Where the witness keeps its state (default /var/lib/hapair/<cluster>/witness).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// A local two-node cluster in network namespaces: replication, failover after kill -9, resync, swap.
    Demo {
        /// Keep the work directory (logs) at the end.
        #[arg(long)]
        keep: bool,
    },
    /// The demo's application: appends records sent over TCP to DIR/records.log, fsynced (internal).
    #[command(hide = true)]
    DemoApp {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        listen: SocketAddr,
    },
    /// The fencing helper started by the daemon (internal).
    #[command(hide = true)]
    Guard {
        #[arg(long)]
        deadline_ms: u64,
    },
    /// Certificates for the cluster.
    Tls {
        #[command(subcommand)]
        cmd: TlsCmd,
    },
    /// Receive a mount's operations and apply them into MIRROR_DIR.
    Mirror {
        /// Address to listen on (UDP, QUIC), e.g. 0.0.0.0:7700.
        #[arg(long)]
        listen: SocketAddr,
        /// Directory written by `hapair tls init`.
        #[arg(long)]
        tls: PathBuf,
        /// This node's name (its certificate).
        #[arg(long)]
        node: String,
        mirror_dir: PathBuf,
    },
    /// Mount a FUSE filesystem over DIR that replicates every change to a mirror.
    Mount {
        /// The mirror's address, e.g. 10.0.0.2:7700.
        #[arg(long)]
        peer: SocketAddr,
        /// The mirror's node name, checked against its certificate (default: any node of the cluster).
        #[arg(long)]
        peer_node: Option<String>,
        #[arg(long)]
        tls: PathBuf,
        #[arg(long)]
        node: String,
        /// sync (default): durability points wait for the mirror's disk; strict: every call waits; async: nothing waits.
        #[arg(long, default_value = "sync")]
        mode: Mode,
        /// How long a call blocked on the mirror waits before the mount goes on alone (degraded).
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
        timeout_ms: u64,
        /// Most the mirror may lag between durability points.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        max_lag_ms: u64,
        /// Where status.json and the degraded-mode journal live (default /var/lib/hapair/mounts/<dir>).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Serve SRC's content at DIR instead of DIR's own.
        #[arg(long)]
        backing: Option<PathBuf>,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
        threads: u64,
        /// While degraded, how often to try to rejoin the mirror.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
        reconnect_ms: u64,
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TlsCmd {
    /// Write a cluster CA and one certificate and key per node into DIR.
    Init {
        dir: PathBuf,
        /// Comma-separated node names, e.g. n1,n2.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// An error the operator must fix in the command line or configuration
/// (exit code 2).
#[derive(Debug)]
struct UsageError(String);
impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

pub(crate) fn usage(msg: String) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg))
}

/// Unmounts a FUSE mount: a plain unmount first, a lazy one if it is busy.
pub fn unmount(dir: &Path) {
    let ok = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        let _ = std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(dir)
            .status();
    }
}

fn check_dir(flag: &str, p: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(usage(format!("{flag} {}: not a directory", p.display()))),
        // ENOTCONN: a mount left by a crashed process; `mount` clears it.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        Err(e) => Err(usage(format!("{flag} {}: {e}", p.display()))),
    }
}

fn load_tls(dir: &Path, node: &str) -> anyhow::Result<hapair_transport::TlsMaterial> {
    hapair_transport::install_crypto_provider();
    hapair_transport::TlsMaterial::load(dir, node)
        .map_err(|e| usage(format!("--tls {}: {e:#}", dir.display())))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Daemon { c } => {
            let (cfg, node) = cli::load(&c.config, c.node.as_deref())?;
            fdlimit::raise();
            daemon::run(cfg, node)
        }
        Cmd::Start { c } => cli::admin(&c.config, c.node.as_deref(), daemon::admin::Request::Start),
        Cmd::Stop { c } => cli::admin(&c.config, c.node.as_deref(), daemon::admin::Request::Stop),
        Cmd::Prim { c, force } => cli::admin(
            &c.config,
            c.node.as_deref(),
            daemon::admin::Request::Prim { force },
        ),
        Cmd::Second { c } => {
            cli::admin(&c.config, c.node.as_deref(), daemon::admin::Request::Second)
        }
        Cmd::Swap { c } => cli::admin(&c.config, c.node.as_deref(), daemon::admin::Request::Swap),
        Cmd::Status { c, json } => cli::status(&c.config, c.node.as_deref(), json),
        Cmd::CheckConfig { c } => cli::check_config(&c.config, c.node.as_deref()),
        Cmd::Witness {
            c,
            listen,
            state_dir,
        } => cli::witness(&c.config, c.node.as_deref(), listen, state_dir),
        Cmd::Guard { deadline_ms } => guard::run(deadline_ms),
        Cmd::DemoApp { dir, listen } => demo_app::run(dir, listen),
        Cmd::Demo { keep } => demo::run(keep),
        Cmd::Tls {
            cmd: TlsCmd::Init { dir, nodes, force },
        } => {
            let written = hapair_transport::tls_init(&dir, &nodes, force)
                .map_err(|e| usage(format!("{e:#}")))?;
            for p in written {
                println!("wrote {}", p.display());
            }
            Ok(())
        }
        Cmd::Mirror {
            listen,
            tls,
            node,
            mirror_dir,
        } => {
            check_dir("MIRROR_DIR", &mirror_dir)?;
            let tls = load_tls(&tls, &node)?;
            // One network thread: the QUIC driver, the sender and the receiver
            // then wake each other on one core, with no cross-thread wake-ups on
            // the acknowledgement path (measured on a 2-core machine: 4 KiB
            // write+fsync from about 840 to 1,200 IOPS). Blocking work goes to
            // spawn_blocking threads.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(mirror_server::serve(listen, tls, mirror_dir))
        }
        Cmd::Mount {
            peer,
            peer_node,
            tls,
            node,
            mode,
            timeout_ms,
            max_lag_ms,
            state_dir,
            backing,
            threads,
            reconnect_ms,
            dir,
        } => {
            check_dir("DIR", &dir)?;
            if let Some(b) = &backing {
                check_dir("--backing", b)?;
            }
            let dir = std::path::absolute(&dir).map_err(|e| usage(format!("DIR: {e}")))?;
            let tls = load_tls(&tls, &node)?;
            fdlimit::raise();
            let state_dir = state_dir.unwrap_or_else(|| state::StateDir::default_for(&dir));
            let src = backing.as_deref().unwrap_or(&dir);
            if let (Ok(s), Ok(src)) = (std::path::absolute(&state_dir), std::path::absolute(src)) {
                if s.starts_with(&src) {
                    return Err(usage(format!(
                        "--state-dir {} lies inside the replicated directory: choose a path outside it",
                        state_dir.display()
                    )));
                }
            }
            mount::run(mount::MountArgs {
                dir,
                backing,
                link: mount::LinkCfg {
                    peer,
                    peer_node,
                    tls,
                    mode,
                    dir_key: String::new(),
                    timeout_ms,
                },
                timeout_ms,
                max_lag_ms,
                state_dir,
                threads: threads as usize,
                reconnect_ms,
            })
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HAPAIR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hapair: error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some()
                || e.downcast_ref::<config::ConfigError>().is_some()
            {
                ExitCode::from(2)
            } else if let Some(r) = e.downcast_ref::<cli::Refused>() {
                ExitCode::from(r.exit_code)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
