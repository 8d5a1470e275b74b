//! `hapair mirror`: receives a mount's operations over QUIC and applies them
//! into the mirror directory.
//!
//! One session at a time: a new authenticated connection from the mount
//! (after a restart of the mount, say) closes the previous one and waits for
//! its applier to finish, so two streams never interleave their operations.
//! Each session has a reader task and an applier thread, which apply the
//! operations in order (see `mirror_apply`), and a writer task
//! (acknowledgements, manifests, failures).

use anyhow::Context;
use hapair_mirror::Applier;
use hapair_proto::{FromMirror, Seq, ToMirror, ALPN_REPLICATION, PROTOCOL_VERSION};
use hapair_transport::{FrameReader, FrameWriter, TlsMaterial};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Mutex};
use tracing::{info, warn};

/// Longest wait, at the end of a session, for the peer to receive the last
/// frames.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

pub fn open_dir(dir: &Path) -> anyhow::Result<OwnedFd> {
    let f = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    if !f
        .metadata()
        .with_context(|| format!("stat {}", dir.display()))?
        .is_dir()
    {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    Ok(f.into())
}

/// The directories a mirror applies into, by the key a mount names in its
/// hello (the directory as written in the cluster configuration; `""` for
/// a standalone `hapair mirror`).
pub type MirrorDirs = std::collections::BTreeMap<String, PathBuf>;

/// Who may replicate into this mirror.
#[derive(Clone, Debug)]
pub enum Accept {
    /// Any node of the cluster (standalone `hapair mirror`).
    AnyNode,
    /// Only this node (the supervisor: the pair's other node).
    Node(String),
}

/// `hapair mirror`: serves `dir` until SIGTERM or SIGINT.
pub async fn serve(listen: SocketAddr, tls: TlsMaterial, dir: PathBuf) -> anyhow::Result<()> {
    open_dir(&dir)?;
    let stop = shutdown_signal();
    let ep = hapair_transport::server_endpoint(listen, &tls, ALPN_REPLICATION)
        .with_context(|| format!("listening on {listen}"))?;
    info!(%listen, dir = %dir.display(), node = tls.node(), "mirror listening");
    let dirs = MirrorDirs::from([(String::new(), dir)]);
    serve_until(ep, dirs, Accept::AnyNode, async {
        stop.await;
        info!("mirror stopping");
    })
    .await;
    Ok(())
}

/// Serves replication sessions into `dirs` from `ep` until `stop` completes,
/// then closes the endpoint and returns once every session's applier has
/// stopped (nothing writes into the directories any more).
pub async fn serve_until(
    ep: quinn::Endpoint,
    dirs: MirrorDirs,
    accept: Accept,
    stop: impl std::future::Future<Output = ()>,
) {
    let slots: Arc<Slots> = Arc::new(
        dirs.into_iter()
            .map(|(k, d)| {
                let slot = Slot {
                    dir: d,
                    current: std::sync::Mutex::new(None),
                    session: Mutex::new(()),
                };
                (k, Arc::new(slot))
            })
            .collect(),
    );
    let mut sessions = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            incoming = ep.accept() => {
                let Some(incoming) = incoming else { break };
                let (slots, accept) = (slots.clone(), accept.clone());
                // Bounded: finished sessions are reaped below; a flood of
                // connections is bounded by the TLS handshake (only cluster
                // nodes get through) and one session per directory applies.
                sessions.spawn(async move {
                    if let Err(e) = handle(incoming, slots, accept).await {
                        warn!("replication session ended: {e:#}");
                    }
                });
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = &mut stop => break,
        }
    }
    ep.close(0u32.into(), b"mirror stopping");
    for slot in slots.values() {
        if let Some(c) = slot
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            c.close(0u32.into(), b"mirror stopping");
        }
    }
    while sessions.join_next().await.is_some() {}
}

/// One replicated directory: at most one session applies into it at a time.
struct Slot {
    dir: PathBuf,
    current: std::sync::Mutex<Option<quinn::Connection>>,
    session: Mutex<()>,
}
type Slots = std::collections::BTreeMap<String, Arc<Slot>>;

/// Resolves at the first SIGTERM or SIGINT.
///
/// The signals are caught from the call on, not from the first poll: a
/// SIGTERM that arrives after the process said it was ready (a status
/// file, a log line) but before the future was polled would otherwise kill
/// it with the default action, or be dropped once another listener had
/// installed tokio's handler. Call it (inside a runtime) before announcing
/// readiness, and keep the one future.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{signal, SignalKind};
    let streams = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = streams else {
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    }
}

async fn handle(
    incoming: quinn::Incoming,
    slots: Arc<Slots>,
    accept: Accept,
) -> anyhow::Result<()> {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            warn!(%remote, "refused connection: {e}");
            return Ok(());
        }
    };
    let peer = hapair_transport::peer_node_name(&conn).unwrap_or_default();
    let (send, recv) = conn
        .accept_bi()
        .await
        .context("waiting for the replication stream")?;
    let mut writer = FrameWriter::new(send);
    let mut reader = FrameReader::new(recv);
    let first = reader
        .next_body()
        .await?
        .context("stream ended before hello")?;
    let hello = hapair_proto::decode_to_mirror(first).context("malformed hello")?;
    let ToMirror::Hello {
        version,
        node,
        mode,
        dir: key,
        next_seq,
    } = hello.header
    else {
        anyhow::bail!("first message from {remote} was not a hello");
    };
    let slot = slots.get(&key).cloned();
    let refusal = if version != PROTOCOL_VERSION {
        Some(format!(
            "protocol version {version} not supported (this mirror speaks {PROTOCOL_VERSION})"
        ))
    } else if node != peer {
        Some(format!(
            "hello names node '{node}' but the certificate is for '{peer}'"
        ))
    } else if matches!(&accept, Accept::Node(n) if *n != peer) {
        Some(format!(
            "node '{peer}' may not replicate into this node (only its pair may)"
        ))
    } else if slot.is_none() {
        Some(format!(
            "no replicated directory {key:?} here (check [replication] dirs in both nodes' configuration)"
        ))
    } else {
        None
    };
    let (Some(slot), None) = (slot, &refusal) else {
        let reason = refusal.unwrap_or_default();
        warn!(%remote, "{reason}");
        let _ = writer
            .send(
                &FromMirror::Refused {
                    reason: reason.clone(),
                },
                &[],
            )
            .await;
        finish_flushed(writer).await;
        anyhow::bail!(reason);
    };
    let dir = slot.dir.clone();
    // Take over from any previous session, then wait until it has stopped
    // applying.
    if let Some(old) = slot
        .current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .replace(conn.clone())
    {
        old.close(2u32.into(), b"superseded by a new session");
    }
    let _session = slot.session.lock().await;
    info!(%remote, node, %mode, dir = %dir.display(), next_seq, "replication session started");
    writer
        .send(
            &FromMirror::HelloOk {
                version: PROTOCOL_VERSION,
                node: String::new(),
            },
            &[],
        )
        .await?;

    // Opening may replay the write-ahead log, or make it (64 MiB written
    // once): off the runtime's threads.
    let applier = {
        let d = dir.clone();
        tokio::task::spawn_blocking(move || {
            let log = hapair_mirror::log_path_for(&d)?;
            Applier::open_with_log(&d, &log)
        })
        .await
        .context("opening the mirror directory")?
        .with_context(|| format!("opening mirror directory {}", dir.display()))?
    };
    let scan_fd = open_dir(&dir)?;
    let (ack_tx, ack_rx) = watch::channel((next_seq - 1, next_seq - 1));
    let (out_tx, out_rx) = mpsc::channel::<FromMirror>(16);
    let writer_task = tokio::spawn(write_loop(writer, ack_rx, out_rx));
    // Until the stream ends or fails; then the applier has drained what it
    // was given, and the writer sends the last acknowledgements.
    let result = crate::mirror_apply::run(
        applier,
        scan_fd,
        &mut reader,
        ack_tx,
        out_tx,
        &node,
        next_seq,
    )
    .await;
    let _ = writer_task.await;
    conn.close(0u32.into(), b"session over");
    info!(node, "replication session over");
    result
}

async fn write_loop(
    mut writer: FrameWriter,
    mut acks: watch::Receiver<(Seq, Seq)>,
    mut out: mpsc::Receiver<FromMirror>,
) {
    let mut acks_open = true;
    let mut last_sent = (0, 0);
    loop {
        tokio::select! {
            changed = acks.changed(), if acks_open => {
                if changed.is_err() {
                    acks_open = false;
                }
                let (applied, durable) = *acks.borrow_and_update();
                if (applied, durable) != last_sent {
                    last_sent = (applied, durable);
                    if writer.send(&FromMirror::Ack { applied, durable }, &[]).await.is_err() {
                        return;
                    }
                }
            }
            msg = out.recv() => {
                let Some(msg) = msg else {
                    if acks_open { continue_acks(&mut writer, &mut acks, last_sent).await; }
                    break;
                };
                if send_split(&mut writer, msg).await.is_err() {
                    return;
                }
            }
        }
    }
    finish_flushed(writer).await;
}

/// Finishes the stream and waits (bounded) until the peer has received all
/// of it: the connection is closed right after a session ends, which would
/// discard frames still in flight (the last acknowledgement, a `Failed`
/// report, a `Refused` answer).
async fn finish_flushed(mut writer: FrameWriter) {
    let stream = writer.stream_mut();
    if stream.finish().is_ok() {
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, stream.stopped()).await;
    }
}

/// After the applier's output channel closed, flush the final ack.
async fn continue_acks(
    writer: &mut FrameWriter,
    acks: &mut watch::Receiver<(Seq, Seq)>,
    last: (Seq, Seq),
) {
    while acks.changed().await.is_ok() {}
    let (applied, durable) = *acks.borrow();
    if (applied, durable) != last {
        let _ = writer
            .send(&FromMirror::Ack { applied, durable }, &[])
            .await;
    }
}

/// Sends a message; a manifest chunk too large for one frame is split.
async fn send_split(writer: &mut FrameWriter, msg: FromMirror) -> anyhow::Result<()> {
    let mut stack = vec![msg];
    while let Some(m) = stack.pop() {
        match writer.send(&m, &[]).await {
            Ok(()) => {}
            Err(e) => match m {
                FromMirror::Manifest { mut entries, last } if entries.len() > 1 => {
                    let tail = entries.split_off(entries.len() / 2);
                    stack.push(FromMirror::Manifest {
                        entries: tail,
                        last,
                    });
                    stack.push(FromMirror::Manifest {
                        entries,
                        last: false,
                    });
                }
                _ => return Err(e),
            },
        }
    }
    Ok(())
}
