//! `hapair daemon`: one node's supervisor. The decisions are the sans-IO
//! core's (`hapair_supervisor::Core`); this module is the runtime that feeds
//! it events (heartbeats, witness answers, application and mount reports,
//! admin commands, the passing of time) and executes the commands it
//! returns, in order:
//!
//! | command | adapter |
//! |---|---|
//! | SendHeartbeat | `link`: QUIC datagrams to the peer on every heartbeat network |
//! | Request/ReleaseWitness | `link`: QUIC datagrams to the witness |
//! | Mount, Unmount, StartResync, AllowAlone | `mounts`: the replicated mounts (an actor) |
//! | StartMirror, StopMirror | `mounts::Mirror`: the replication server into this node's dirs |
//! | TakeVip, ReleaseVip | `vipctl`: netlink address lease, announcements, renewals |
//! | StartApp, StopApp, RestartApp | `app`: the application's process group |
//! | Persist | `persist`: written durably before the next command runs |
//!
//! Time: the core gets a monotonic millisecond counter from this daemon's
//! start; it never reads a clock itself. The loop wakes at the core's
//! deadline or at the next event, whichever comes first.

pub mod admin;
pub mod app;
pub mod guard_client;
pub mod link;
pub mod mounts;
pub mod persist;
pub mod vipctl;
pub mod wire;

use crate::config::Config;
use anyhow::Context;
use guard_client::Guard;
use hapair_supervisor::{
    Command as Cmd, Core, CoreConfig, Event, Level, NodeState, Reply, WitnessAnswer,
};
use link::{Link, LinkEvent, Received};
use mounts::{DirSpec, MountCmd};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};
use wire::PeerMsg;

/// An admin request from the Unix socket.
pub struct AdminReq {
    pub req: admin::Request,
    pub reply: oneshot::Sender<admin::Response>,
}

struct Daemon {
    cfg: Config,
    me: String,
    peer: String,
    state_dir: PathBuf,
    core: Core,
    started: Instant,
    started_wall: SystemTime,
    hb_links: Vec<Link>,
    /// Connections the peer opened to our heartbeat servers.
    peer_conns: Vec<quinn::Connection>,
    witness: Option<Link>,
    mounts: mpsc::Sender<MountCmd>,
    mounts_view: mounts::MountsView,
    mirror: mounts::Mirror,
    specs: Vec<DirSpec>,
    vip: Option<vipctl::VipCtl>,
    app: Option<app::AppCtl>,
    events_tx: mpsc::Sender<Event>,
    guard: Arc<Guard>,
    pending: HashMap<u64, oneshot::Sender<admin::Response>>,
    next_admin_id: u64,
    last_ping: Instant,
    /// A stop for SIGTERM is under way: exit once everything is released.
    exiting: Option<ExitPlan>,
}

struct ExitPlan {
    /// The persisted state to restore on the way out (a SIGTERM is not an
    /// operator's `hapair stop`: the node starts again as it was).
    restore_state: NodeState,
    since: Instant,
}

pub fn run(cfg: Config, me: String) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("hapair-daemon")
        .build()
        .context("starting the runtime")?;
    rt.block_on(main(cfg, me))
}

fn dir_specs(cfg: &Config, me: &crate::config::NodeCfg) -> Vec<DirSpec> {
    cfg.dirs
        .iter()
        .zip(&me.dirs)
        .enumerate()
        .map(|(i, (key, local))| DirSpec {
            key: key.clone(),
            local: local.clone(),
            state: me.state_dir.join("mounts").join(i.to_string()),
        })
        .collect()
}

async fn main(cfg: Config, me: String) -> anyhow::Result<()> {
    let (my, peer) = cfg
        .pair(&me)
        .map(|(a, b)| (a.clone(), b.clone()))
        .with_context(|| {
            format!(
                "no node {me:?} in {} (nodes: {})",
                cfg.file.display(),
                cfg.node_names()
            )
        })?;
    std::fs::create_dir_all(&my.state_dir)
        .with_context(|| format!("creating the state directory {}", my.state_dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&my.state_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 700 {}", my.state_dir.display()))?;
    }
    hapair_transport::install_crypto_provider();
    let tls = hapair_transport::TlsMaterial::load(&cfg.tls_dir, &me).with_context(|| {
        format!(
            "loading this node's TLS material from {}",
            cfg.tls_dir.display()
        )
    })?;
    let persisted = persist::load_state(&my.state_dir)?;
    let core_cfg = CoreConfig {
        me: me.clone(),
        peer: peer.name.clone(),
        interval_ms: cfg.hb_interval_ms,
        timeout_ms: cfg.hb_timeout_ms,
        witness: cfg.witness.is_some(),
        auto_failover: cfg.auto_failover,
        preferred: cfg.preferred.clone(),
        restart_budget: cfg.restart_budget,
        restart_window_ms: cfg.restart_window_ms,
    };
    let core = Core::new(core_cfg, persisted).context("starting the supervisor core")?;

    // The admin socket first: a second daemon for the same node stops here.
    let sock_path = admin::socket_path(&my.state_dir);
    let (admin_tx, mut admin_rx) = mpsc::channel::<AdminReq>(16);
    let listener = admin::bind(&sock_path)?;
    tokio::spawn(admin::serve(listener, admin_tx));

    let specs = dir_specs(&cfg, &my);
    for s in &specs {
        if hapair_fs_replica::clear_stale_mount(&s.local).unwrap_or(false) {
            warn!(dir = %s.local.display(), "removed a stale mount left by a crashed process");
        }
    }
    let guard = Arc::new(if cfg.vip.is_some() || cfg.app.is_some() {
        let deadline = cfg
            .hb_timeout_ms
            .saturating_sub(2 * cfg.hb_interval_ms)
            .max(cfg.hb_interval_ms);
        Guard::start(deadline).context("starting the fencing guard")?
    } else {
        Guard::none()
    });

    let (events_tx, mut events_rx) = mpsc::channel::<Event>(1024);

    // Heartbeats: a server on each of our networks, a link to each of the
    // peer's.
    let tuning = link::tuning(cfg.hb_interval_ms, cfg.hb_timeout_ms);
    let (hb_tx, mut hb_rx) = mpsc::channel::<Received>(256);
    for addr in &my.heartbeat {
        let listen = SocketAddr::new(*addr, cfg.hb_port);
        let ep =
            hapair_transport::server_endpoint_with(listen, &tls, wire::ALPN_HEARTBEAT, &tuning)
                .with_context(|| {
                    format!(
                        "listening for heartbeats on {listen} (is {addr} an address of this host?)"
                    )
                })?;
        info!(%listen, "heartbeats: listening");
        tokio::spawn(link::serve(
            "heartbeat",
            ep,
            vec![peer.name.clone()],
            hb_tx.clone(),
        ));
    }
    // Short connection attempts, retried every interval: heartbeats must
    // flow soon after the peer starts listening, well within its timeout.
    let connect_ms = (3 * cfg.hb_interval_ms).clamp(300, cfg.hb_timeout_ms);
    let (hb_link_tx, mut hb_link_rx) = mpsc::channel::<LinkEvent>(256);
    let hb_links: Vec<Link> = peer
        .heartbeat
        .iter()
        .map(|a| {
            Link::spawn(
                format!("heartbeat link to {}", peer.name),
                SocketAddr::new(*a, cfg.hb_port),
                peer.name.clone(),
                tls.clone(),
                wire::ALPN_HEARTBEAT,
                tuning.clone(),
                cfg.hb_interval_ms,
                connect_ms,
                Some(hb_link_tx.clone()),
            )
        })
        .collect();
    let (wit_tx, mut wit_rx) = mpsc::channel::<LinkEvent>(64);
    let witness = cfg.witness.as_ref().map(|w| {
        Link::spawn(
            "witness link".into(),
            w.address,
            w.name.clone(),
            tls.clone(),
            wire::ALPN_WITNESS,
            link::tuning(cfg.hb_interval_ms, cfg.hb_timeout_ms),
            cfg.hb_interval_ms,
            connect_ms,
            Some(wit_tx),
        )
    });

    let (mounts, mounts_view) = mounts::spawn(
        specs.clone(),
        mounts::Peer {
            addr: SocketAddr::new(peer.address, cfg.repl_port),
            name: peer.name.clone(),
            tls: tls.clone(),
        },
        mounts::MountSettings {
            core: hapair_repl_core::CoreConfig {
                mode: cfg.mode,
                timeout_ms: cfg.repl_timeout_ms,
                max_lag_ms: cfg.max_lag_ms,
                ..Default::default()
            },
            threads: 4,
            join_patience_ms: cfg.repl_timeout_ms.max(2 * cfg.hb_timeout_ms),
        },
        events_tx.clone(),
    );
    let vip = match &cfg.vip {
        Some(v) => {
            let ifname = my
                .interface
                .clone()
                .or_else(|| v.interface.clone())
                .context("no interface for the VIP")?;
            let parsed = hapair_vip::Vip::parse(&v.cidr, &ifname)?;
            let lease = (cfg.hb_timeout_ms.div_ceil(1000)).clamp(2, 60) as u32;
            Some(vipctl::VipCtl::new(
                parsed,
                v.cidr.clone(),
                lease,
                guard.clone(),
            ))
        }
        None => None,
    };
    let app_env = vec![
        ("HAPAIR_NODE".to_string(), me.clone()),
        ("HAPAIR_PEER".to_string(), peer.name.clone()),
        (
            "HAPAIR_DIRS".to_string(),
            my.dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        ),
    ];
    let app = cfg
        .app
        .as_ref()
        .map(|a| app::spawn(a.clone(), app_env.clone(), events_tx.clone(), guard.clone()));
    if let Some(a) = &app {
        for c in &cfg.checks {
            app::spawn_check(c.clone(), a.pid.clone(), events_tx.clone(), app_env.clone());
        }
    }
    info!(
        node = me,
        peer = peer.name,
        cluster = cfg.cluster,
        witness = cfg.witness.is_some(),
        "supervisor starting"
    );
    if cfg.witness.is_none() {
        warn!("no [witness] configured: under a network partition both nodes may serve (split brain); the losing side's changes are kept aside on reconnection");
    }

    let mut d = Daemon {
        cfg,
        me,
        peer: peer.name.clone(),
        state_dir: my.state_dir.clone(),
        core,
        started: Instant::now(),
        started_wall: SystemTime::now(),
        hb_links,
        peer_conns: Vec::new(),
        witness,
        mounts,
        mounts_view,
        mirror: mounts::Mirror::idle(),
        specs,
        vip,
        app,
        events_tx,
        guard,
        pending: HashMap::new(),
        next_admin_id: 1,
        last_ping: Instant::now(),
        exiting: None,
    };
    let my_addr = SocketAddr::new(my.address, d.cfg.repl_port);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let cmds = d.core.tick(d.now_ms());
    d.execute(cmds, my_addr, &tls).await;
    loop {
        let deadline = d.started + Duration::from_millis(d.core.next_deadline_ms());
        let ping_at = d.last_ping + Duration::from_millis(d.cfg.hb_interval_ms);
        let wake = deadline.min(ping_at);
        let cmds = tokio::select! {
            ev = events_rx.recv() => {
                let Some(ev) = ev else { break };
                d.core.handle(d.now_ms(), ev)
            }
            r = hb_rx.recv() => {
                let Some(r) = r else { break };
                d.note_peer_connection(&r.conn);
                match d.peer_message(&r.from, &r.data) {
                    Some(ev) => d.core.handle(d.now_ms(), ev),
                    None => Vec::new(),
                }
            }
            l = hb_link_rx.recv() => {
                // The peer's heartbeats sent back over our own connection.
                let from = d.peer.clone();
                match l {
                    Some(LinkEvent::Datagram(b)) => match d.peer_message(&from, &b) {
                        Some(ev) => d.core.handle(d.now_ms(), ev),
                        None => Vec::new(),
                    },
                    _ => Vec::new(),
                }
            }
            w = wit_rx.recv(), if d.witness.is_some() => {
                match w.and_then(|w| d.witness_event(w)) {
                    Some(ev) => d.core.handle(d.now_ms(), ev),
                    None => Vec::new(),
                }
            }
            a = admin_rx.recv() => {
                let Some(a) = a else { break };
                d.admin(a).await
            }
            _ = tokio::time::sleep_until(wake.into()) => d.core.tick(d.now_ms()),
            _ = sigterm.recv() => d.begin_exit("SIGTERM"),
            _ = sigint.recv() => d.begin_exit("SIGINT"),
        };
        d.execute(cmds, my_addr, &tls).await;
        if d.last_ping.elapsed() >= Duration::from_millis(d.cfg.hb_interval_ms) {
            d.guard.ping();
            d.last_ping = Instant::now();
        }
        if d.exit_ready() {
            break;
        }
    }
    d.finish().await;
    Ok(())
}

impl Daemon {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// `cert`: the authenticated name of the sender.
    fn peer_message(&mut self, cert: &str, data: &[u8]) -> Option<Event> {
        match wire::decode::<PeerMsg>(data) {
            Ok(PeerMsg::Heartbeat(hb)) => {
                if hb.from != cert {
                    warn!(
                        cert,
                        claimed = hb.from,
                        "heartbeat naming another node than its certificate: dropped"
                    );
                    return None;
                }
                Some(Event::Heartbeat(hb))
            }
            Ok(PeerMsg::Stopping { from }) => {
                if from != cert {
                    warn!(
                        cert,
                        claimed = from,
                        "stop notice naming another node: dropped"
                    );
                    return None;
                }
                Some(Event::PeerSaysStop { from })
            }
            Err(e) => {
                warn!(cert, "malformed heartbeat dropped: {e}");
                None
            }
        }
    }

    /// Remembers a connection the peer opened to us, to send our own
    /// heartbeats back on it: one working direction is enough for both
    /// nodes to hear each other. Bounded: closed ones are dropped.
    fn note_peer_connection(&mut self, c: &quinn::Connection) {
        self.peer_conns.retain(|x| x.close_reason().is_none());
        if !self
            .peer_conns
            .iter()
            .any(|x| x.stable_id() == c.stable_id())
            && self.peer_conns.len() < 16
        {
            self.peer_conns.push(c.clone());
        }
    }

    fn send_to_peer(&self, b: bytes::Bytes) {
        for l in &self.hb_links {
            l.send(b.clone());
        }
        for c in &self.peer_conns {
            let _ = c.send_datagram(b.clone());
        }
    }

    fn witness_event(&mut self, w: LinkEvent) -> Option<Event> {
        match w {
            LinkEvent::Datagram(b) => match wire::decode::<wire::FromWitness>(&b) {
                Ok(reply) if reply.to == self.me => Some(match reply.answer {
                    WitnessAnswer::Granted { gen, lease_ms } => Event::WitnessGranted {
                        req: reply.req,
                        gen,
                        lease_ms,
                    },
                    WitnessAnswer::Denied { reason, latest_gen } => Event::WitnessDenied {
                        req: reply.req,
                        reason,
                        latest_gen,
                    },
                }),
                Ok(reply) => {
                    warn!(to = reply.to, "witness reply for another node dropped");
                    None
                }
                Err(e) => {
                    warn!("malformed witness reply dropped: {e}");
                    None
                }
            },
            LinkEvent::Up => None,
            LinkEvent::Down(why) => {
                debug!("witness link down: {why}");
                Some(Event::WitnessLost)
            }
        }
    }

    async fn admin(&mut self, a: AdminReq) -> Vec<Cmd> {
        use admin::Request as R;
        let cmd = match a.req {
            R::Status => {
                let s = self.status_json();
                let _ = a.reply.send(admin::Response::Status(s));
                return Vec::new();
            }
            R::Start => hapair_supervisor::AdminCmd::Start,
            R::Stop => hapair_supervisor::AdminCmd::Stop,
            R::Prim { force } => hapair_supervisor::AdminCmd::Prim { force },
            R::Second => hapair_supervisor::AdminCmd::Second,
            R::Swap => hapair_supervisor::AdminCmd::Swap,
        };
        if self.exiting.is_some() {
            let _ = a.reply.send(admin::Response::Refused {
                exit_code: 3,
                reason: "refused: the daemon is shutting down".into(),
            });
            return Vec::new();
        }
        let id = self.next_admin_id;
        self.next_admin_id += 1;
        self.pending.insert(id, a.reply);
        self.core.handle(self.now_ms(), Event::Admin { id, cmd })
    }

    fn begin_exit(&mut self, why: &str) -> Vec<Cmd> {
        if self.exiting.is_some() {
            return Vec::new();
        }
        info!("{why}: stopping this node (a primary hands over to an in-sync secondary)");
        let before = self.core.state();
        self.exiting = Some(ExitPlan {
            restore_state: if before == NodeState::Stop {
                NodeState::Stop
            } else {
                NodeState::Wait
            },
            since: Instant::now(),
        });
        let id = self.next_admin_id;
        self.next_admin_id += 1;
        self.core.handle(
            self.now_ms(),
            Event::Admin {
                id,
                cmd: hapair_supervisor::AdminCmd::Stop,
            },
        )
    }

    /// Everything released (or a bounded wait passed) after a SIGTERM.
    fn exit_ready(&self) -> bool {
        let Some(x) = &self.exiting else { return false };
        let r = self.core.resources();
        let released = !r.serving() && !r.mirror && self.core.state() == NodeState::Stop;
        let waited = x.since.elapsed() > Duration::from_millis(4 * self.cfg.hb_timeout_ms + 30_000);
        if waited && !released {
            warn!("resources not released in time; exiting anyway");
        }
        released || waited
    }

    async fn finish(&mut self) {
        if let Some(b) = wire::encode(&PeerMsg::Stopping {
            from: self.me.clone(),
        }) {
            self.send_to_peer(b);
        }
        // Give the notice a moment to leave.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(x) = &self.exiting {
            let mut p = self.core.persisted().clone();
            p.last_state = x.restore_state;
            if let Err(e) = persist::save_state(&self.state_dir, &p) {
                error!("cannot persist the state on exit: {e:#}");
            }
        }
        self.mirror.stop().await;
        self.guard.finish();
        info!("supervisor stopped");
    }

    async fn execute(
        &mut self,
        cmds: Vec<Cmd>,
        my_addr: SocketAddr,
        tls: &hapair_transport::TlsMaterial,
    ) {
        for c in cmds {
            match c {
                Cmd::SendHeartbeat(hb) => {
                    if let Some(b) = wire::encode(&PeerMsg::Heartbeat(hb)) {
                        self.send_to_peer(b);
                    }
                }
                Cmd::RequestWitness(r) => {
                    if let (Some(w), Some(b)) =
                        (&self.witness, wire::encode(&wire::ToWitness::Request(r)))
                    {
                        w.send(b);
                    }
                }
                Cmd::ReleaseWitness(r) => {
                    if let (Some(w), Some(b)) =
                        (&self.witness, wire::encode(&wire::ToWitness::Release(r)))
                    {
                        w.send(b);
                    }
                }
                Cmd::Mount => self.to_mounts(MountCmd::Mount).await,
                Cmd::Unmount { flush } => self.to_mounts(MountCmd::Unmount { flush }).await,
                Cmd::StartResync { full } => self.to_mounts(MountCmd::Resync { full }).await,
                Cmd::AllowAlone { gen } => self.to_mounts(MountCmd::AllowAlone { gen }).await,
                Cmd::TakeVip => {
                    if let Some(v) = &mut self.vip {
                        v.take();
                    }
                }
                Cmd::ReleaseVip => {
                    if let Some(v) = &mut self.vip {
                        v.release();
                    }
                }
                Cmd::StartApp | Cmd::StopApp | Cmd::RestartApp => match &self.app {
                    Some(a) => a.command(match c {
                        Cmd::StartApp => app::AppCmd::Start,
                        Cmd::StopApp => app::AppCmd::Stop,
                        _ => app::AppCmd::Restart,
                    }),
                    None => {
                        // No application configured: the service is the
                        // replicated data and the VIP.
                        let ev = if matches!(c, Cmd::StopApp) {
                            Event::AppStopped
                        } else {
                            Event::AppStarted
                        };
                        let _ = self.events_tx.send(ev).await;
                    }
                },
                Cmd::StartMirror { keep_aside } => {
                    self.mirror.start(
                        &self.specs,
                        my_addr,
                        tls.clone(),
                        self.peer.clone(),
                        keep_aside,
                    );
                }
                Cmd::StopMirror => self.mirror.stop().await,
                Cmd::Persist(p) => {
                    if let Err(e) = persist::save_state(&self.state_dir, &p) {
                        // Going on would risk acting on a generation that a
                        // restart forgets: stop here (the guard fences).
                        error!("cannot persist the supervisor state: {e:#}; exiting");
                        std::process::exit(1);
                    }
                }
                Cmd::Log { level, msg } => match level {
                    Level::Info => info!("{msg}"),
                    Level::Warn => warn!("{msg}"),
                    Level::Error => error!("{msg}"),
                },
                Cmd::Reply { id, reply } => {
                    if let Some(tx) = self.pending.remove(&id) {
                        let _ = tx.send(match reply {
                            Reply::Ok { message } => admin::Response::Ok { message },
                            Reply::Refused { exit_code, reason } => {
                                admin::Response::Refused { exit_code, reason }
                            }
                        });
                    } else {
                        debug!(id, "reply for an admin request nobody waits for");
                    }
                }
            }
        }
    }

    async fn to_mounts(&self, c: MountCmd) {
        if self.mounts.send(c).await.is_err() {
            error!("the mount actor is gone");
        }
    }

    fn wall(&self, at_ms: u64) -> String {
        rfc3339(self.started_wall + Duration::from_millis(at_ms))
    }

    fn status_json(&self) -> serde_json::Value {
        let s = self.core.status();
        // Not through the mounts' actor: it may be busy for seconds with
        // an unmount or a resync, and this loop must keep pinging the guard.
        let dirs = self.mounts_view.status();
        let now = s.now_ms;
        let peer_primary = s.peer.alive && s.peer.state.is_some_and(|st| st.is_primary());
        let vip_holder = if s.resources.vip {
            Some(self.me.clone())
        } else if peer_primary {
            Some(self.peer.clone())
        } else {
            None
        };
        serde_json::json!({
            "cluster": self.cfg.cluster,
            "node": self.me,
            "state": s.state,
            "detail": s.detail,
            "time": rfc3339(SystemTime::now()),
            "uptime_ms": now,
            "peer": {
                "name": s.peer.name,
                "state": s.peer.state,
                "alive": s.peer.alive,
                "last_heard_ms_ago": s.peer.last_heard_ms.map(|t| now.saturating_sub(t)),
                "data_gen": s.peer.data_gen,
                "in_sync": s.peer.in_sync,
                "serving": s.peer.serving,
            },
            "data_gen": s.data_gen,
            "known_gen": s.known_gen,
            "stale": s.stale,
            "in_sync": s.in_sync,
            "replication": {
                "mode": self.cfg.mode.to_string(),
                "resync_running": s.resync_running,
                "mirror_running": s.resources.mirror,
                "dirs": dirs,
            },
            "vip": {
                "configured": self.vip.as_ref().map(|v| v.describe()),
                "held_here": s.resources.vip,
                "present_here": self.vip.as_ref().and_then(|v| v.present()),
                "holder": vip_holder,
            },
            "witness": {
                "configured": s.witness.configured,
                "address": self.cfg.witness.as_ref().map(|w| w.address.to_string()),
                "lease_held": s.witness.lease_until_ms.is_some(),
                "lease_remaining_ms": s.witness.lease_until_ms.map(|t| t.saturating_sub(now)),
                "reachable": s.witness.reachable,
                "last_answer": s.witness.last_answer,
            },
            "split_brain_possible": s.split_brain_possible,
            "split_brains_detected": s.split_brains_detected,
            "app": {
                "configured": self.app.is_some(),
                "state": s.resources.app,
                "pid": self.app.as_ref().and_then(|a| *a.pid.borrow()),
                "check": {
                    "last_ok": s.app_check.last_ok,
                    "last_at": s.app_check.last_at_ms.map(|t| self.wall(t)),
                    "last_failure": s.app_check.last_failure,
                },
                "restarts": s.restarts,
            },
            "mount": s.resources.mount,
            "transitions": s.transitions.iter().map(|t| serde_json::json!({
                "at": self.wall(t.at_ms),
                "from": t.from,
                "to": t.to,
                "reason": t.reason,
            })).collect::<Vec<_>>(),
        })
    }
}

/// `2026-12-02T09:12:55.123Z`: UTC, milliseconds, no dependency on a
/// calendar crate (the civil-from-days conversion of H. Hinnant).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        let at = |s: u64, ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(s * 1000 + ms);
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(at(1_796_203_594, 245)), "2026-12-02T09:26:34.245Z");
        assert_eq!(rfc3339(at(4_102_444_799, 999)), "2099-12-31T23:59:59.999Z");
    }
}
