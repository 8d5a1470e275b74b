//! The replicated directories under the supervisor: the mounts a primary
//! lays over them, and the mirror a secondary runs into them.
//!
//! The mounts are an actor: `Mount`, `Unmount`, `Resync` and `AllowAlone`
//! are executed one after the other by one task, so a teardown never races
//! a mount or a resync; results come back to the supervisor as events.
//! Unlike a standalone `hapair mount`, a supervised mount never decides by
//! itself to go on without its mirror: when the mirror is lost its callers
//! are held until the supervisor allows it (`AllowAlone`, after it made
//! sure the peer cannot serve) or tears the mount down (then they fail).
//!
//! What `hapair status` shows of them is read from a [`MountsView`] that the
//! actor keeps up to date, never by asking the actor: a mount, an unmount
//! that flushes to the mirror or a resync keeps the actor busy for seconds,
//! and the supervisor's loop, which answers the status, must not wait on
//! that (it pings the fencing guard, which fences after a short silence).

use crate::client::ReplClient;
use crate::mirror_server::{Accept, MirrorDirs};
use crate::mount::{self, LinkCfg};
use crate::state::{StateDir, Status};
use anyhow::Context;
use hapair_fs_replica::MountHandle;
use hapair_repl_core::{CoreConfig, LinkState};
use hapair_supervisor::Event;
use hapair_transport::TlsMaterial;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

/// One replicated directory on this node.
#[derive(Clone, Debug)]
pub struct DirSpec {
    /// The directory as written in the configuration (its key on the
    /// mirror).
    pub key: String,
    /// This node's path of it.
    pub local: PathBuf,
    /// Where its mount keeps status and journal.
    pub state: PathBuf,
}

/// How the mounts reach the peer's mirror.
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub name: String,
    pub tls: TlsMaterial,
}

#[derive(Clone)]
pub struct MountSettings {
    pub core: CoreConfig,
    pub threads: usize,
    /// How long a resync keeps trying to reach the peer's mirror.
    pub join_patience_ms: u64,
}

pub enum MountCmd {
    Mount,
    Unmount { flush: bool },
    Resync { full: bool },
    AllowAlone { gen: u64 },
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DirStatus {
    pub dir: String,
    pub path: String,
    pub mounted: bool,
    pub replication: Option<crate::client::ClientStats>,
    pub last_resync: Option<mount::JoinStats>,
}

/// The mounts as `hapair status` shows them: written by the actor when a
/// mount comes up or goes away and by a resync when it ends, read without
/// waiting for the actor.
#[derive(Clone)]
pub struct MountsView {
    specs: Vec<DirSpec>,
    inner: Arc<Mutex<ViewInner>>,
}

struct ViewInner {
    /// The replication client of each mounted directory.
    clients: Vec<Option<ReplClient>>,
    last_join: Vec<Option<mount::JoinStats>>,
}

impl MountsView {
    fn new(specs: Vec<DirSpec>) -> MountsView {
        let n = specs.len();
        MountsView {
            specs,
            inner: Arc::new(Mutex::new(ViewInner {
                clients: vec![None; n],
                last_join: vec![None; n],
            })),
        }
    }

    fn set_mounted(&self, clients: Option<Vec<ReplClient>>) {
        let mut v = lock(&self.inner);
        let n = v.clients.len();
        v.clients = match clients {
            Some(c) => c.into_iter().map(Some).collect(),
            None => vec![None; n],
        };
        assert_eq!(v.clients.len(), n, "one client per replicated directory");
    }

    fn set_last_join(&self, i: usize, stats: mount::JoinStats) {
        if let Some(slot) = lock(&self.inner).last_join.get_mut(i) {
            *slot = Some(stats);
        }
    }

    /// Each directory's status now. Never waits for a mount, an unmount or
    /// a resync in progress: it takes only this view's lock and each
    /// client's own (held for bookkeeping, and at most across one journal
    /// write or fsync while degraded; never while waiting for the mirror).
    pub fn status(&self) -> Vec<DirStatus> {
        let (clients, joins) = {
            let v = lock(&self.inner);
            (v.clients.clone(), v.last_join.clone())
        };
        self.specs
            .iter()
            .zip(clients.into_iter().zip(joins))
            .map(|(s, (c, j))| DirStatus {
                dir: s.key.clone(),
                path: s.local.display().to_string(),
                mounted: c.is_some(),
                replication: c.map(|c| c.stats()),
                last_resync: j,
            })
            .collect()
    }
}

struct ActiveDir {
    spec: DirSpec,
    client: ReplClient,
    handle: Option<MountHandle>,
    pause: Arc<Mutex<()>>,
    backing: Arc<OwnedFd>,
    state: StateDir,
    /// The previous mount of this directory ended cleanly in sync.
    clean: bool,
}

struct Active {
    dirs: Vec<Arc<Mutex<ActiveDir>>>,
    monitor: tokio::task::JoinHandle<()>,
}

pub fn spawn(
    specs: Vec<DirSpec>,
    peer: Peer,
    settings: MountSettings,
    events: mpsc::Sender<Event>,
) -> (mpsc::Sender<MountCmd>, MountsView) {
    let (tx, mut rx) = mpsc::channel::<MountCmd>(32);
    let view = MountsView::new(specs.clone());
    let view_out = view.clone();
    tokio::spawn(async move {
        let mut active: Option<Active> = None;
        let mut alone: Option<u64> = None;
        let mut join: Option<tokio::task::JoinHandle<()>> = None;
        while let Some(cmd) = rx.recv().await {
            match cmd {
                MountCmd::Mount => {
                    if active.is_some() {
                        let _ = events.send(Event::MountReady).await;
                        continue;
                    }
                    let (s, st, allowed) = (specs.clone(), settings.clone(), alone.is_some());
                    let r = tokio::task::spawn_blocking(move || mount_all(&s, &st, allowed)).await;
                    match r {
                        Ok(Ok(dirs)) => {
                            view.set_mounted(Some(dirs.iter().map(|d| d.client.clone()).collect()));
                            let dirs: Vec<_> =
                                dirs.into_iter().map(|d| Arc::new(Mutex::new(d))).collect();
                            let monitor = tokio::spawn(monitor(dirs.clone(), events.clone()));
                            info!(
                                "mounted {} replicated director{}",
                                dirs.len(),
                                if dirs.len() == 1 { "y" } else { "ies" }
                            );
                            let _ = events.send(Event::MountReady).await;
                            if !allowed {
                                // Not allowed alone: the peer is an in-sync
                                // secondary (a swap); join it at once.
                                join = Some(spawn_join(
                                    dirs.clone(),
                                    peer.clone(),
                                    settings.clone(),
                                    false,
                                    events.clone(),
                                    view.clone(),
                                ));
                            }
                            active = Some(Active { dirs, monitor });
                        }
                        Ok(Err(e)) => {
                            error!("mount failed: {e:#}");
                            let _ = events
                                .send(Event::MountFailed {
                                    reason: format!("{e:#}"),
                                })
                                .await;
                        }
                        Err(e) => {
                            let _ = events
                                .send(Event::MountFailed {
                                    reason: format!("mount task: {e}"),
                                })
                                .await;
                        }
                    }
                }
                MountCmd::Unmount { flush } => {
                    alone = None;
                    if let Some(a) = active.take() {
                        if !flush {
                            for d in &a.dirs {
                                lock(d).client.abort();
                            }
                        }
                        if let Some(j) = join.take() {
                            // Bounded: a resync gives up when its clients are
                            // aborted or after its own timeouts.
                            let _ = j.await;
                        }
                        a.monitor.abort();
                        let dirs = a.dirs;
                        let _ = tokio::task::spawn_blocking(move || unmount_all(dirs, flush)).await;
                        view.set_mounted(None);
                    }
                    let _ = events.send(Event::Unmounted).await;
                }
                MountCmd::Resync { full } => {
                    let Some(a) = &active else {
                        warn!("resync asked while not mounted: ignored");
                        continue;
                    };
                    if join.as_ref().is_some_and(|j| !j.is_finished()) {
                        info!("a resync is already under way");
                        continue;
                    }
                    join = Some(spawn_join(
                        a.dirs.clone(),
                        peer.clone(),
                        settings.clone(),
                        full,
                        events.clone(),
                        view.clone(),
                    ));
                }
                MountCmd::AllowAlone { gen } => {
                    info!(
                        gen,
                        "allowed to serve without the secondary (generation {gen})"
                    );
                    alone = Some(gen);
                    if let Some(a) = &active {
                        for d in &a.dirs {
                            let d = lock(d);
                            d.client.allow_alone(true);
                            // The supervisor allows this only once it judged
                            // the secondary out of sync (lost, or restarted):
                            // the current session, if any, is over, and the
                            // calls waiting on it go on with the journal now
                            // rather than after the replication timeout.
                            d.client
                                .end_session("the supervisor serves without the secondary");
                        }
                    }
                }
            }
        }
    });
    (tx, view_out)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn mount_all(
    specs: &[DirSpec],
    st: &MountSettings,
    allowed: bool,
) -> anyhow::Result<Vec<ActiveDir>> {
    let mut done: Vec<ActiveDir> = Vec::new();
    for s in specs {
        match mount_one(s, st, allowed) {
            Ok(d) => done.push(d),
            Err(e) => {
                // All or nothing: the application needs every directory.
                unmount_all(
                    done.into_iter().map(|d| Arc::new(Mutex::new(d))).collect(),
                    false,
                );
                return Err(e);
            }
        }
    }
    Ok(done)
}

fn mount_one(s: &DirSpec, st: &MountSettings, allowed: bool) -> anyhow::Result<ActiveDir> {
    if hapair_fs_replica::clear_stale_mount(&s.local)? {
        warn!(dir = %s.local.display(), "removed a stale mount left by a crashed process");
    }
    std::fs::create_dir_all(&s.local).with_context(|| format!("creating {}", s.local.display()))?;
    // The directory's write-ahead log: what it holds (this node's copy was
    // a mirror until now, or a mount that crashed) goes into the files
    // before anything reads them; then the mount keeps it.
    let (log, replayed) = hapair_mirror::LocalLog::open(&s.local)
        .with_context(|| format!("opening the write-ahead log of {}", s.local.display()))?;
    if replayed > 0 {
        info!(dir = %s.local.display(), records = replayed, "replayed the write-ahead log");
    }
    let backing = crate::mirror_server::open_dir(&s.local)?;
    let state = StateDir::open(&s.state)?;
    let clean = state.take_clean_marker()?;
    let base = Status {
        state: "degraded".into(),
        mode: st.core.mode.to_string(),
        dir: s.local.display().to_string(),
        peer: String::new(),
        pid: std::process::id(),
        ..Default::default()
    };
    let client = ReplClient::degraded(
        st.core.clone(),
        state.clone(),
        base,
        "not joined to the secondary yet".into(),
        true,
    )?;
    client.allow_alone(allowed);
    let fs = hapair_fs_replica::ReplicaFs::new(backing.try_clone()?, Arc::new(client.clone()))?
        .with_log(Arc::new(log));
    let pause = fs.ordering_lock();
    let opts = hapair_fs_replica::MountOptions {
        n_threads: st.threads,
        fsname: format!("hapair:{}", s.local.display()),
        ..Default::default()
    };
    let handle = hapair_fs_replica::mount_background(fs, &s.local, &opts)?;
    client.set_serving(true);
    Ok(ActiveDir {
        spec: s.clone(),
        client,
        handle: Some(handle),
        pause,
        backing: Arc::new(backing),
        state,
        clean,
    })
}

fn unmount_all(dirs: Vec<Arc<Mutex<ActiveDir>>>, flush: bool) {
    for d in dirs {
        let mut d = lock(&d);
        if let Some(h) = d.handle.take() {
            if let Err(e) = h.unmount() {
                warn!(dir = %d.spec.local.display(), "unmount: {e:#}");
            }
            d.client.set_serving(false);
        }
        let clean = d.client.shutdown();
        if clean && flush {
            if let Err(e) = d.state.set_clean_marker() {
                warn!("cannot write the clean marker: {e:#}");
            }
        }
        info!(dir = %d.spec.local.display(), clean, "unmounted");
    }
}

/// Reports the loss of the mirror (a replicating or resyncing pipeline that
/// degraded) to the supervisor, once per loss.
async fn monitor(dirs: Vec<Arc<Mutex<ActiveDir>>>, events: mpsc::Sender<Event>) {
    let mut was: Vec<LinkState> = dirs.iter().map(|d| lock(d).client.link_state()).collect();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (i, d) in dirs.iter().enumerate() {
            let (now, reason) = {
                let d = lock(d);
                (d.client.link_state(), d.client.stats().degraded_reason)
            };
            if now == LinkState::Degraded && was[i] != LinkState::Degraded {
                let reason = reason.unwrap_or_else(|| "mirror lost".into());
                let _ = events.send(Event::ReplicationDegraded { reason }).await;
            }
            was[i] = now;
        }
    }
}

/// Joins every directory to the peer's mirror, one after the other, trying
/// for at most `join_patience_ms` per directory to reach it.
fn spawn_join(
    dirs: Vec<Arc<Mutex<ActiveDir>>>,
    peer: Peer,
    st: MountSettings,
    full: bool,
    events: mpsc::Sender<Event>,
    view: MountsView,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for (i, d) in dirs.iter().enumerate() {
            let (client, key, backing, state, pause, clean) = {
                let d = lock(d);
                (
                    d.client.clone(),
                    d.spec.key.clone(),
                    d.backing.clone(),
                    d.state.clone(),
                    d.pause.clone(),
                    d.clean,
                )
            };
            // A resync always joins in a new session: an older one may
            // still look alive (a partition hid the mirror's restart) while
            // the mirror holds less than it acknowledged to the old session.
            client.end_session("a resync of the secondary starts a new session");
            let link = LinkCfg {
                peer: peer.addr,
                peer_node: Some(peer.name.clone()),
                tls: peer.tls.clone(),
                mode: st.core.mode,
                dir_key: key.clone(),
                timeout_ms: st.core.timeout_ms,
            };
            let t0 = std::time::Instant::now();
            let dialled = loop {
                match mount::dial(&link).await {
                    Ok(c) => break Ok(c),
                    Err(e) if mount::is_refusal(&e) => break Err(e),
                    Err(e) => {
                        if t0.elapsed() > Duration::from_millis(st.join_patience_ms) {
                            break Err(e);
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            let c = match dialled {
                Ok(c) => c,
                Err(e) => {
                    let reason = format!("cannot reach the secondary's mirror for {key}: {e:#}");
                    warn!("{reason}");
                    let _ = events.send(Event::ReplicationDegraded { reason }).await;
                    return;
                }
            };
            let rt = tokio::runtime::Handle::current();
            let r = tokio::task::spawn_blocking(move || {
                mount::join_mirror(
                    &rt,
                    &client,
                    c,
                    &link,
                    backing.as_fd(),
                    &state,
                    full || !clean,
                    Some(&pause),
                )
            })
            .await;
            match r {
                Ok(Ok(stats)) => {
                    info!(dir = key, ?stats, "secondary caught up");
                    view.set_last_join(i, stats);
                }
                Ok(Err(e)) => {
                    let reason = format!("resync of {key} failed: {e:#}");
                    warn!("{reason}");
                    let _ = events.send(Event::ReplicationDegraded { reason }).await;
                    return;
                }
                Err(e) => {
                    let _ = events
                        .send(Event::ReplicationDegraded {
                            reason: format!("resync task: {e}"),
                        })
                        .await;
                    return;
                }
            }
        }
        let _ = events.send(Event::ResyncDone).await;
    })
}

// ----- the mirror -------------------------------------------------------

/// The secondary's side: a replication server applying into this node's
/// directories, for the peer only.
pub struct Mirror {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Mirror {
    pub fn idle() -> Mirror {
        Mirror {
            stop: None,
            task: None,
        }
    }

    pub fn running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Starts applying into `specs`' directories. `keep_aside`: this node's
    /// data diverged from the primary's; it is moved aside first.
    pub fn start(
        &mut self,
        specs: &[DirSpec],
        listen: SocketAddr,
        tls: TlsMaterial,
        peer: String,
        keep_aside: bool,
    ) {
        if self.running() {
            return;
        }
        let mut dirs = MirrorDirs::new();
        for s in specs {
            if let Err(e) = prepare_mirror_dir(&s.local, keep_aside) {
                error!(dir = %s.local.display(), "cannot prepare the directory for the mirror: {e:#}; the mirror does not start");
                return;
            }
            dirs.insert(s.key.clone(), s.local.clone());
        }
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                match hapair_transport::server_endpoint(
                    listen,
                    &tls,
                    hapair_proto::ALPN_REPLICATION,
                ) {
                    Ok(ep) => {
                        info!(%listen, "mirror receiving from {peer}");
                        let stop = async {
                            let _ = (&mut stop_rx).await;
                        };
                        crate::mirror_server::serve_until(ep, dirs, Accept::Node(peer), stop).await;
                        info!("mirror stopped");
                        return;
                    }
                    Err(e) => {
                        warn!(%listen, "mirror cannot listen: {e:#}; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = &mut stop_rx => return,
                        }
                    }
                }
            }
        });
        self.stop = Some(stop_tx);
        self.task = Some(task);
    }

    /// Stops, and returns once nothing writes into the directories.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Makes `dir` usable by the mirror: no dead mount left over it; with
/// `keep_aside`, its content moved into a sibling directory named
/// `<dir>.kept-aside-<unix time>` (never deleted by hapair).
fn prepare_mirror_dir(dir: &Path, keep_aside: bool) -> anyhow::Result<()> {
    if hapair_fs_replica::clear_stale_mount(dir)? {
        warn!(dir = %dir.display(), "removed a stale mount left by a crashed process");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if !keep_aside {
        return Ok(());
    }
    // What the old copy's log holds belongs to the data kept aside.
    hapair_mirror::recover(dir)
        .with_context(|| format!("replaying the mirror log of {}", dir.display()))?;
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let aside = dir.with_file_name(format!("{name}.kept-aside-{secs}"));
    std::fs::create_dir(&aside).with_context(|| format!("creating {}", aside.display()))?;
    let mut moved = 0u64;
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        std::fs::rename(e.path(), aside.join(e.file_name())).with_context(|| {
            format!(
                "moving {} aside into {} (it must be on the same filesystem)",
                e.path().display(),
                aside.display()
            )
        })?;
        moved += 1;
    }
    std::fs::File::open(&aside).and_then(|f| f.sync_all()).ok();
    std::fs::File::open(dir).and_then(|f| f.sync_all()).ok();
    warn!(dir = %dir.display(), aside = %aside.display(), entries = moved, "diverged data kept aside (split brain): compare it with the primary's and merge by hand");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next_event(rx: &mut mpsc::Receiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("an event from the mounts' actor within 60 s")
            .expect("the actor's event channel is open")
    }

    /// The status must not wait for the actor. Here the actor is held in an
    /// unmount that waits for a resync, whose mirror never answers (a UDP
    /// socket that reads nothing): the status is still answered, and shows
    /// the directory mounted, before the unmount ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_is_answered_while_an_unmount_waits_for_a_resync() {
        hapair_transport::install_crypto_provider();
        let tmp = tempfile::tempdir().expect("a temporary directory");
        let tls_dir = tmp.path().join("tls");
        hapair_transport::tls_init(&tls_dir, &["n1".into(), "n2".into()], false)
            .expect("generating the cluster's certificates");
        let tls = TlsMaterial::load(&tls_dir, "n1").expect("loading n1's certificate");
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("a silent UDP socket");
        let specs = vec![DirSpec {
            key: "/srv/data".into(),
            local: tmp.path().join("data"),
            state: tmp.path().join("state"),
        }];
        let (events_tx, mut events) = mpsc::channel(64);
        let (tx, view) = spawn(
            specs,
            Peer {
                addr: silent.local_addr().expect("its address"),
                name: "n2".into(),
                tls,
            },
            MountSettings {
                core: CoreConfig {
                    timeout_ms: 500,
                    ..Default::default()
                },
                threads: 1,
                join_patience_ms: 3_000,
            },
            events_tx,
        );
        assert!(!view.status()[0].mounted, "nothing mounted yet");
        // Not allowed alone: the mount joins the (silent) mirror at once.
        tx.send(MountCmd::Mount).await.expect("the actor runs");
        assert!(matches!(next_event(&mut events).await, Event::MountReady));
        tx.send(MountCmd::Unmount { flush: true })
            .await
            .expect("the actor runs");
        let s = view.status();
        assert!(
            events.try_recv().is_err(),
            "the unmount must still be waiting for the resync"
        );
        assert!(s[0].mounted, "still mounted while the unmount waits: {s:?}");
        assert_eq!(
            s[0].replication.as_ref().map(|r| r.state.as_str()),
            Some("degraded"),
            "never joined: {s:?}"
        );
        // The resync gives up, then the unmount ends.
        loop {
            match next_event(&mut events).await {
                Event::Unmounted => break,
                Event::ReplicationDegraded { .. } => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
        let s = view.status();
        assert!(!s[0].mounted && s[0].replication.is_none(), "{s:?}");
        drop(silent);
    }
}
