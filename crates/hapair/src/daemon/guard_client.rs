//! The daemon's side of the fencing helper (`hapair guard`, see
//! `crate::guard`): a child process that outlives the daemon and fences the
//! node (kills the application's group, removes the VIP) when the daemon
//! dies or stops pinging.

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use tracing::{error, info};

pub struct Guard {
    inner: Mutex<Option<(Child, ChildStdin)>>,
}

impl Guard {
    /// Starts the guard. It fences if it hears nothing for `deadline_ms`.
    pub fn start(deadline_ms: u64) -> anyhow::Result<Guard> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe()?;
        // Its own process group: a kill of the daemon's group (a crash
        // reaper, a test) must leave the guard alive to fence.
        let mut child = Command::new(exe)
            .process_group(0)
            .arg("guard")
            .arg("--deadline-ms")
            .arg(deadline_ms.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("guard has no stdin"))?;
        info!(pid = child.id(), deadline_ms, "fencing guard started");
        Ok(Guard {
            inner: Mutex::new(Some((child, stdin))),
        })
    }

    /// A guard that does nothing (nothing to fence: a node without VIP and
    /// application, or tests of the daemon's logic).
    pub fn none() -> Guard {
        Guard {
            inner: Mutex::new(None),
        }
    }

    fn line(&self, l: &str) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, stdin)) = g.as_mut() {
            if let Err(e) = writeln!(stdin, "{l}").and_then(|()| stdin.flush()) {
                // The guard is gone: it fenced (we were silent too long) or
                // was killed. A node that was fenced must not go on serving
                // as if nothing happened.
                error!("the fencing guard is gone ({e}): this node was fenced; exiting so that a fresh start rejoins the pair");
                std::process::exit(1);
            }
        }
    }

    pub fn ping(&self) {
        self.line("ping");
    }
    pub fn set_vip(&self, cidr: &str, ifname: &str) {
        self.line(&format!("vip {cidr} {ifname}"));
    }
    pub fn clear_vip(&self) {
        self.line("novip");
    }
    pub fn set_app(&self, pgid: u32) {
        self.line(&format!("app {pgid}"));
    }
    pub fn clear_app(&self) {
        self.line("noapp");
    }

    /// A clean end: the guard exits without fencing.
    pub fn finish(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((mut child, mut stdin)) = g.take() {
            let _ = writeln!(stdin, "exit");
            drop(stdin);
            let _ = child.wait();
        }
    }
}
