//! `hapair mount`: the replicated mount of one directory, and the link to
//! its mirror that the supervisor's mounts use too.
//!
//! Start-up order: open the directory's write-ahead log, replaying what it
//! holds (the mount's last run, or the mirror this copy was), open the
//! backing directory (before mounting over it),
//! connect and handshake with the mirror, bring the mirror to the same tree
//! (synchronisation), and only then mount FUSE and serve. If the mirror
//! cannot be reached, the mount serves alone (degraded), journals that a full
//! compare is needed, and keeps trying to rejoin the mirror in the
//! background: when it answers again, mutations pause while the mirror is
//! caught up, then replication goes on.

use crate::client::ReplClient;
use crate::state::{StateDir, Status};
use anyhow::{bail, Context};
use hapair_proto::{
    FromMirror, ManifestEntry, Mode, Seq, ToMirror, ALPN_REPLICATION, PROTOCOL_VERSION,
};
use hapair_repl_core::journal::DirtyRecord;
use hapair_repl_core::CoreConfig;
use hapair_transport::{FrameReader, FrameWriter, TlsMaterial};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{error, info, warn};

pub struct MountArgs {
    pub dir: PathBuf,
    pub backing: Option<PathBuf>,
    pub link: LinkCfg,
    pub timeout_ms: u64,
    pub max_lag_ms: u64,
    pub state_dir: PathBuf,
    pub threads: usize,
    /// How often a degraded mount tries to rejoin its mirror.
    pub reconnect_ms: u64,
}

/// How a mount reaches its mirror.
#[derive(Clone)]
pub struct LinkCfg {
    pub peer: SocketAddr,
    /// The mirror's expected certificate name (None: any cluster node).
    pub peer_node: Option<String>,
    pub tls: TlsMaterial,
    pub mode: Mode,
    /// The directory's key on the mirror (empty for a standalone mirror).
    pub dir_key: String,
    /// Handshake and answer timeout.
    pub timeout_ms: u64,
}

pub struct Connected {
    conn: quinn::Connection,
    writer: FrameWriter,
    reader: FrameReader,
    inline: std::sync::Arc<hapair_transport::InlineRuntime>,
}

/// Opens an authenticated QUIC connection and the replication stream. The
/// handshake proper ([`hello`]) comes later, once mutations are paused.
pub async fn dial(l: &LinkCfg) -> anyhow::Result<Connected> {
    let timeout = Duration::from_millis(l.timeout_ms);
    let (ep, inline) = hapair_transport::client_endpoint_inline(l.peer, &l.tls, ALPN_REPLICATION)?;
    let conn = hapair_transport::connect(&ep, l.peer, l.peer_node.as_deref(), timeout).await?;
    let (send, recv) = tokio::time::timeout(timeout, conn.open_bi())
        .await
        .context("opening the replication stream timed out")?
        .context("opening the replication stream")?;
    Ok(Connected {
        conn,
        writer: FrameWriter::new(send),
        reader: FrameReader::new(recv),
        inline,
    })
}

/// The replication handshake: this session's first op is `next_seq`.
async fn hello(c: &mut Connected, l: &LinkCfg, next_seq: Seq) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(l.timeout_ms);
    c.writer
        .send(
            &ToMirror::Hello {
                version: PROTOCOL_VERSION,
                node: l.tls.node().to_string(),
                mode: l.mode,
                dir: l.dir_key.clone(),
                next_seq,
            },
            &[],
        )
        .await?;
    let body = tokio::time::timeout(timeout, c.reader.next_body())
        .await
        .context("mirror did not answer the hello")??
        .context("mirror closed the stream during the handshake")?;
    match hapair_proto::decode_from_mirror(body)?.header {
        FromMirror::HelloOk { version, .. } if version == PROTOCOL_VERSION => Ok(()),
        FromMirror::Refused { reason } => Err(RefusedByMirror(reason).into()),
        other => bail!("unexpected handshake answer from the mirror: {other:?}"),
    }
}

async fn fetch_manifest(c: &mut Connected, hash: bool) -> anyhow::Result<Vec<ManifestEntry>> {
    c.writer
        .send(&ToMirror::ManifestRequest { hash_content: hash }, &[])
        .await?;
    let mut all = Vec::new();
    loop {
        let body = c
            .reader
            .next_body()
            .await?
            .context("mirror closed the stream while listing")?;
        match hapair_proto::decode_from_mirror(body)?.header {
            FromMirror::Manifest { entries, last } => {
                all.extend(entries);
                if last {
                    return Ok(all);
                }
            }
            FromMirror::Failed { reason, .. } => bail!("mirror could not list its tree: {reason}"),
            other => bail!("unexpected message while listing: {other:?}"),
        }
    }
}

/// The mirror answered the handshake with an explicit refusal (protocol
/// version, node name, unknown directory): a configuration error, not an
/// outage.
#[derive(Debug)]
struct RefusedByMirror(String);
impl std::fmt::Display for RefusedByMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the mirror refused this mount: {}", self.0)
    }
}
impl std::error::Error for RefusedByMirror {}

/// True when the connection failed because the two sides do not accept each
/// other (TLS certificates, ALPN, or an explicit refusal), as opposed to the
/// mirror being unreachable. Carrying on alone would hide a wrong cluster,
/// node or port behind a "degraded" status.
pub fn is_refusal(e: &anyhow::Error) -> bool {
    hapair_transport::is_authentication_failure(e)
        || e.chain()
            .any(|c| c.downcast_ref::<RefusedByMirror>().is_some())
}

/// What a resync did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct JoinStats {
    pub hashed: bool,
    pub entries_local: usize,
    pub entries_mirror: usize,
    pub plan: String,
    pub took_ms: u64,
}

/// Joins the mirror over a dialled connection and catches it up: with
/// `pause` held (the mount's ordering lock, when mounted) the hello
/// announces the next seq, both trees are listed (with content hashes when
/// `full`, after an unclean stop or a degraded period), what differs is sent,
/// and the final barrier made durable. Blocking: call it from a thread that
/// may block, with `rt` the runtime the connection lives on.
pub fn join_mirror(
    rt: &tokio::runtime::Handle,
    client: &ReplClient,
    mut c: Connected,
    l: &LinkCfg,
    backing: BorrowedFd<'_>,
    state: &StateDir,
    full: bool,
    pause: Option<&Mutex<()>>,
) -> anyhow::Result<JoinStats> {
    let t0 = std::time::Instant::now();
    let _paused = pause.map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
    let next_seq = client.next_seq();
    rt.block_on(hello(&mut c, l, next_seq))?;
    let dirty = state.dirty_set()?;
    let hash = full || !dirty.is_empty();
    info!(hash, next_seq, "comparing trees with the mirror");
    let remote = rt.block_on(fetch_manifest(&mut c, hash))?;
    let local = hapair_mirror::scan_tree_vec(backing, hash)?;
    let mut stats = JoinStats {
        hashed: hash,
        entries_local: local.len(),
        entries_mirror: remote.len(),
        ..Default::default()
    };
    let link = crate::client::Link {
        conn: c.conn,
        writer: c.writer,
        reader: c.reader,
        inline: Some(c.inline),
    };
    client.resync(rt, link, next_seq, |cl| {
        let s = crate::sync::synchronise(cl, backing, &local, &remote, &dirty)?;
        stats.plan = format!("{s:?}");
        Ok(())
    })?;
    stats.took_ms = t0.elapsed().as_millis() as u64;
    info!(?stats, "mirror caught up: replicating");
    Ok(stats)
}

fn status_base(a: &MountArgs) -> Status {
    Status {
        state: "syncing".into(),
        mode: a.link.mode.to_string(),
        dir: a.dir.display().to_string(),
        peer: a.link.peer.to_string(),
        pid: std::process::id(),
        ..Default::default()
    }
}

pub fn run(a: MountArgs) -> anyhow::Result<()> {
    let cleared = hapair_fs_replica::clear_stale_mount(&a.dir)?;
    if cleared {
        warn!(
            "removed a stale mount left at {} by a crashed process",
            a.dir.display()
        );
    }
    let backing_path = a.backing.clone().unwrap_or_else(|| a.dir.clone());
    // The directory's write-ahead log: what it holds (acknowledged writes
    // of this mount's last run, or of the mirror this copy was) goes into
    // the files before anything reads them; then the mount keeps it.
    let (log, replayed) = hapair_mirror::LocalLog::open(&backing_path)
        .with_context(|| format!("opening the write-ahead log of {}", backing_path.display()))?;
    let log = Arc::new(log);
    if replayed > 0 {
        info!(
            records = replayed,
            "replayed the write-ahead log of the directory"
        );
    }
    let backing = crate::mirror_server::open_dir(&backing_path)?;
    let state = StateDir::open(&a.state_dir)?;
    // One network thread: the QUIC driver, the sender and the receiver
    // then wake each other on one core, with no cross-thread wake-ups on
    // the acknowledgement path (measured on a 2-core machine: 4 KiB
    // write+fsync from about 840 to 1,200 IOPS). Blocking work goes to
    // spawn_blocking threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("hapair-net")
        .build()
        .context("starting the runtime")?;
    // SIGTERM and SIGINT are caught from here on: one that arrives during
    // the start (the first status below says "connecting") is answered
    // with a clean unmount as soon as the mount serves.
    let stop = {
        let _rt = rt.enter();
        crate::mirror_server::shutdown_signal()
    };
    let cfg = CoreConfig {
        mode: a.link.mode,
        timeout_ms: a.timeout_ms,
        max_lag_ms: a.max_lag_ms,
        ..Default::default()
    };
    state.write_status(&status_base(&a))?;
    // On a refusal nothing is consumed: the clean marker and the journal
    // stay as they were, for the mount that will be started correctly.
    let dialled = match rt.block_on(dial(&a.link)) {
        Err(e) if is_refusal(&e) => {
            return Err(e.context(format!(
                "the mirror at {} and this mount do not accept each other: check --tls, \
                 --node, --peer-node and --peer",
                a.link.peer
            )))
        }
        other => other,
    };
    let clean = state.take_clean_marker()?;
    let client = {
        let _rt = rt.enter();
        ReplClient::degraded(
            cfg,
            state.clone(),
            status_base(&a),
            "not connected yet".into(),
            false,
        )?
    };
    match dialled {
        Ok(c) => {
            let r = join_mirror(
                rt.handle(),
                &client,
                c,
                &a.link,
                backing.as_fd(),
                &state,
                !clean,
                None,
            );
            match r {
                Ok(_) => info!("mirror in sync"),
                Err(e) if is_refusal(&e) => {
                    return Err(
                        e.context(format!("the mirror at {} refused this mount", a.link.peer))
                    )
                }
                Err(e) => {
                    error!("synchronisation failed: {e:#}; serving alone (degraded)");
                    state.append_journal(&[DirtyRecord::Full])?;
                }
            }
        }
        Err(e) => {
            warn!(
                "mirror {} unreachable: {e:#}; serving alone (degraded)",
                a.link.peer
            );
            state.append_journal(&[DirtyRecord::Full])?;
        }
    }
    client.write_status();

    let fs = hapair_fs_replica::ReplicaFs::new(backing.try_clone()?, Arc::new(client.clone()))?
        .with_log(log);
    let pause = fs.ordering_lock();
    let dir = a.dir.clone();
    let asked_to_unmount = Arc::new(AtomicBool::new(false));
    let asked = asked_to_unmount.clone();
    // Unmounting before the kernel holds the mount would do nothing, and the
    // mount would then serve on: a signal waits for it.
    let (mounted_tx, mounted_rx) = tokio::sync::oneshot::channel::<()>();
    rt.spawn(async move {
        stop.await;
        if mounted_rx.await.is_err() {
            return; // mounting failed: the process is ending anyway
        }
        info!("signal received: unmounting {}", dir.display());
        asked.store(true, Ordering::SeqCst);
        crate::unmount(&dir);
    });
    rt.spawn(rejoin_loop(
        client.clone(),
        a.link.clone(),
        backing.try_clone()?,
        state.clone(),
        pause,
        a.reconnect_ms,
    ));
    let opts = hapair_fs_replica::MountOptions {
        n_threads: a.threads,
        fsname: format!("hapair:{}", backing_path.display()),
        ..Default::default()
    };
    info!(dir = %a.dir.display(), mode = %a.link.mode, "serving");
    let serving = client.clone();
    let mounted = move || {
        serving.set_serving(true);
        let _ = mounted_tx.send(());
    };
    let served = hapair_fs_replica::mount_blocking_then(fs, &a.dir, &opts, mounted).or_else(|e| {
        // Unmounting while requests are in flight can end a FUSE worker's
        // read with ECONNABORTED instead of ENODEV: after our own unmount
        // that is the end we asked for, not a failure.
        if asked_to_unmount.load(Ordering::SeqCst) && is_errno(&e, libc::ECONNABORTED) {
            info!("FUSE connection ended by the unmount ({e:#})");
            Ok(())
        } else {
            Err(e)
        }
    });
    client.set_serving(false);
    let clean = rt.block_on(async {
        let c = client.clone();
        tokio::task::spawn_blocking(move || c.shutdown())
            .await
            .unwrap_or(false)
    });
    if clean {
        state.set_clean_marker()?;
        info!("unmounted; mirror holds everything durably");
    } else {
        warn!("unmounted while degraded; the journal keeps what the mirror lacks");
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    served
}

/// Whether an OS error with this errno is somewhere in `e`'s chain.
fn is_errno(e: &anyhow::Error, errno: i32) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(errno))
    })
}

/// While the mount is degraded, tries every `every_ms` to rejoin the mirror.
/// A refusal is logged and retried too (the operator may be fixing it).
async fn rejoin_loop(
    client: ReplClient,
    link: LinkCfg,
    backing: OwnedFd,
    state: StateDir,
    pause: Arc<Mutex<()>>,
    every_ms: u64,
) {
    let backing = Arc::new(backing);
    loop {
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
        if !client.is_degraded() {
            continue;
        }
        let c = match dial(&link).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("mirror still unreachable: {e:#}");
                continue;
            }
        };
        info!("mirror {} answers again: catching it up", link.peer);
        let (cl, l, b, st, p) = (
            client.clone(),
            link.clone(),
            backing.clone(),
            state.clone(),
            pause.clone(),
        );
        let rt = tokio::runtime::Handle::current();
        let r = tokio::task::spawn_blocking(move || {
            join_mirror(&rt, &cl, c, &l, b.as_fd(), &st, false, Some(&p))
        })
        .await;
        match r {
            Ok(Ok(_)) => info!("mirror {} rejoined", link.peer),
            Ok(Err(e)) => warn!("rejoining the mirror failed: {e:#}"),
            Err(e) => error!("rejoin task failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_errno;
    use anyhow::Context;

    #[test]
    fn finds_an_errno_below_the_context() {
        let io = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        let e = Err::<(), _>(io)
            .context("serving the FUSE mount")
            .unwrap_err();
        assert!(is_errno(&e, libc::ECONNABORTED));
        assert!(!is_errno(&e, libc::ENODEV));
        assert!(!is_errno(
            &anyhow::anyhow!("no OS error here"),
            libc::ECONNABORTED
        ));
    }
}
