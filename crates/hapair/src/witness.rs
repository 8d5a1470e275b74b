//! `hapair witness`: the arbitrator that gives the two-node pair a quorum.
//! A thin adapter around `hapair_supervisor::WitnessCore`: requests arrive
//! as datagrams on authenticated QUIC connections from the two nodes, the
//! core decides, its state is written durably before a reply that depends
//! on it leaves.

use crate::daemon::link;
use crate::daemon::wire::{self, FromWitness, ToWitness, ALPN_WITNESS};
use anyhow::Context;
use hapair_supervisor::{WitnessConfig, WitnessCore, WitnessPersisted};
use hapair_transport::TlsMaterial;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tracing::{info, warn};

pub struct WitnessArgs {
    pub listen: SocketAddr,
    pub tls: TlsMaterial,
    pub nodes: [String; 2],
    pub state_dir: PathBuf,
    /// Longest lease granted; also how long a restarted witness refuses.
    pub max_lease_ms: u64,
    pub interval_ms: u64,
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("witness.json")
}

fn load(dir: &Path) -> anyhow::Result<WitnessPersisted> {
    let p = state_file(dir);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| {
            format!(
                "{} is not a witness state file (inspect it; remove it only if the two nodes' data is known)",
                p.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(WitnessPersisted::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

pub fn run(a: WitnessArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("creating {}", a.state_dir.display()))?;
    let persisted = load(&a.state_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(serve(a, persisted))
}

async fn serve(a: WitnessArgs, persisted: WitnessPersisted) -> anyhow::Result<()> {
    let tuning = link::tuning(a.interval_ms, a.max_lease_ms);
    let ep = hapair_transport::server_endpoint_with(a.listen, &a.tls, ALPN_WITNESS, &tuning)
        .with_context(|| format!("listening on {}", a.listen))?;
    let started = Instant::now();
    let mut core = WitnessCore::new(
        WitnessConfig {
            nodes: a.nodes.clone(),
            max_lease_ms: a.max_lease_ms,
        },
        persisted,
        0,
    );
    let mut stop = std::pin::pin!(crate::mirror_server::shutdown_signal());
    info!(listen = %a.listen, nodes = ?a.nodes, latest_gen = core.persisted().latest_gen, "witness listening");
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(link::serve("witness", ep.clone(), a.nodes.to_vec(), tx));
    loop {
        let r = tokio::select! {
            r = rx.recv() => r,
            _ = &mut stop => break,
        };
        let Some(r) = r else { break };
        let now = started.elapsed().as_millis() as u64;
        let msg: ToWitness = match wire::decode(&r.data) {
            Ok(m) => m,
            Err(e) => {
                warn!(from = r.from, "malformed witness message dropped: {e}");
                continue;
            }
        };
        let (reply, persist): (Option<FromWitness>, _) = match msg {
            ToWitness::Request(req) => {
                if req.from != r.from {
                    warn!(
                        from = r.from,
                        claimed = req.from,
                        "request naming another node dropped"
                    );
                    continue;
                }
                let out = core.handle_request(now, &req);
                info!(from = r.from, req = req.req, new_gen = req.new_gen, answer = ?out.reply.answer, "request");
                (Some(out.reply), out.persist)
            }
            ToWitness::Release(rel) => {
                if rel.from != r.from {
                    warn!(
                        from = r.from,
                        claimed = rel.from,
                        "release naming another node dropped"
                    );
                    continue;
                }
                info!(from = r.from, gen = rel.gen, revert = ?rel.revert_to, "release");
                (None, core.handle_release(&rel))
            }
        };
        if let Some(p) = persist {
            let body = serde_json::to_vec_pretty(&p).context("encoding witness state")?;
            // A reply that depends on the new state leaves only once the
            // state is on disk; a failure here must not grant anything.
            if let Err(e) = crate::daemon::persist::write_durably(&state_file(&a.state_dir), &body)
            {
                warn!("cannot persist the witness state: {e:#}; not answering");
                continue;
            }
        }
        if let Some(reply) = reply {
            if let Some(b) = wire::encode(&reply) {
                let _ = r.conn.send_datagram(b);
            }
        }
    }
    ep.close(0u32.into(), b"witness stopping");
    info!("witness stopping");
    Ok(())
}
