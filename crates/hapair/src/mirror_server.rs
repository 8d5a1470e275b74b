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
use tokio::sync::{mpsc, watch, Mutex};
use tracing::{info, warn};

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

pub async fn serve(listen: SocketAddr, tls: TlsMaterial, dir: PathBuf) -> anyhow::Result<()> {
    open_dir(&dir)?;
    let ep = hapair_transport::server_endpoint(listen, &tls, ALPN_REPLICATION)
        .with_context(|| format!("listening on {listen}"))?;
    info!(%listen, dir = %dir.display(), node = tls.node(), "mirror listening");
    let current: Arc<std::sync::Mutex<Option<quinn::Connection>>> =
        Arc::new(std::sync::Mutex::new(None));
    let session = Arc::new(Mutex::new(()));
    loop {
        tokio::select! {
            incoming = ep.accept() => {
                let Some(incoming) = incoming else { break };
                let (current, session, dir) = (current.clone(), session.clone(), dir.clone());
                tokio::spawn(async move {
                    if let Err(e) = handle(incoming, current, session, dir).await {
                        warn!("replication session ended: {e:#}");
                    }
                });
            }
            _ = shutdown_signal() => {
                info!("mirror stopping");
                break;
            }
        }
    }
    ep.close(0u32.into(), b"mirror stopping");
    Ok(())
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
}

async fn handle(
    incoming: quinn::Incoming,
    current: Arc<std::sync::Mutex<Option<quinn::Connection>>>,
    session: Arc<Mutex<()>>,
    dir: PathBuf,
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
    } = hello.header
    else {
        anyhow::bail!("first message from {remote} was not a hello");
    };
    if version != PROTOCOL_VERSION || node != peer {
        let reason = if version != PROTOCOL_VERSION {
            format!(
                "protocol version {version} not supported (this mirror speaks {PROTOCOL_VERSION})"
            )
        } else {
            format!("hello names node '{node}' but the certificate is for '{peer}'")
        };
        warn!(%remote, "{reason}");
        let _ = writer
            .send(
                &FromMirror::Refused {
                    reason: reason.clone(),
                },
                &[],
            )
            .await;
        let _ = writer.finish().await;
        anyhow::bail!(reason);
    }
    // Take over from any previous session, then wait until it has stopped
    // applying.
    if let Some(old) = current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .replace(conn.clone())
    {
        old.close(2u32.into(), b"superseded by a new session");
    }
    let _session = session.lock().await;
    info!(%remote, node, %mode, "replication session started");
    writer
        .send(
            &FromMirror::HelloOk {
                version: PROTOCOL_VERSION,
                node: String::new(),
            },
            &[],
        )
        .await?;

    let applier = Applier::open(&dir)
        .with_context(|| format!("opening mirror directory {}", dir.display()))?;
    let scan_fd = open_dir(&dir)?;
    let (ack_tx, ack_rx) = watch::channel((0u64, 0u64));
    let (out_tx, out_rx) = mpsc::channel::<FromMirror>(16);
    let writer_task = tokio::spawn(write_loop(writer, ack_rx, out_rx));
    // Until the stream ends or fails; then the applier has drained what it
    // was given, and the writer sends the last acknowledgements.
    let result =
        crate::mirror_apply::run(applier, scan_fd, &mut reader, ack_tx, out_tx, &node).await;
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
    let _ = writer.finish().await;
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
