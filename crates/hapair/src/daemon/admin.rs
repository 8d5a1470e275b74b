//! The admin socket: a root-only Unix socket in the node's state directory
//! (`STATE_DIR/admin.sock`, mode 0600 in a 0700 directory, and the peer's
//! credentials checked: uid 0 only). One JSON request per connection, one
//! JSON response. The CLI commands `start`, `stop`, `prim`, `second`,
//! `swap` and `status` are its clients.

use super::AdminReq;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// Longest request line accepted.
const MAX_REQUEST_BYTES: usize = 4096;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Start,
    Stop,
    Prim {
        #[serde(default)]
        force: bool,
    },
    Second,
    Swap,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok { message: String },
    Refused { exit_code: u8, reason: String },
    Status(serde_json::Value),
    Error { message: String },
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.sock")
}

/// Binds the socket, refusing if another daemon answers on it.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another hapair daemon for this node is running (it answers on {})",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))?;
    Ok(l)
}

pub async fn serve(l: UnixListener, to_daemon: mpsc::Sender<AdminReq>) {
    loop {
        let (s, _) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("admin socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let tx = to_daemon.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(s, tx).await {
                warn!("admin request: {e:#}");
            }
        });
    }
}

async fn handle(s: UnixStream, tx: mpsc::Sender<AdminReq>) -> anyhow::Result<()> {
    let cred = s.peer_cred().context("reading the caller's credentials")?;
    let (r, mut w) = s.into_split();
    let respond = |resp: Response| {
        let mut line = serde_json::to_vec(&resp).unwrap_or_default();
        line.push(b'\n');
        line
    };
    if cred.uid() != 0 {
        w.write_all(&respond(Response::Error {
            message: "only root may administer hapair".into(),
        }))
        .await?;
        return Ok(());
    }
    let mut line = Vec::new();
    let mut reader = BufReader::new(r).take(MAX_REQUEST_BYTES as u64);
    tokio::time::timeout(Duration::from_secs(5), reader.read_until(b'\n', &mut line))
        .await
        .context("no request within 5 s")??;
    let resp = match serde_json::from_slice::<Request>(&line) {
        Err(e) => Response::Error {
            message: format!("malformed request: {e}"),
        },
        Ok(req) => {
            let (rtx, rrx) = oneshot::channel();
            if tx.send(AdminReq { req, reply: rtx }).await.is_err() {
                Response::Error {
                    message: "the daemon is stopping".into(),
                }
            } else {
                match tokio::time::timeout(Duration::from_secs(30), rrx).await {
                    Ok(Ok(r)) => r,
                    _ => Response::Error {
                        message: "the daemon did not answer within 30 s".into(),
                    },
                }
            }
        }
    };
    w.write_all(&respond(resp)).await?;
    Ok(())
}

/// The CLI side: sends `req` to the daemon at `path`.
pub fn call(path: &Path, req: &Request) -> anyhow::Result<Response> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "the hapair daemon of this node is not running (no answer on {}): start it with `hapair daemon` (or its systemd unit)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(40)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line).context("sending the request")?;
    let mut out = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut out)
        .context("reading the daemon's answer")?;
    serde_json::from_str(&out).with_context(|| format!("malformed answer from the daemon: {out:?}"))
}
