//! The application: started, stopped and restarted on the supervisor's
//! commands, watched by checkers. The start command runs in the foreground
//! under `sh -c`, in a process group of its own, so that stopping it (or the
//! guard fencing it) reaches everything it started.

use super::guard_client::Guard;
use crate::config::{AppCfg, CheckCfg, CheckKind};
use hapair_supervisor::Event;
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

#[derive(Debug, Clone, Copy)]
pub enum AppCmd {
    Start,
    Stop,
    Restart,
}

/// Handle on the application actor.
pub struct AppCtl {
    tx: mpsc::Sender<AppCmd>,
    /// The application's main process while it runs.
    pub pid: watch::Receiver<Option<u32>>,
}

impl AppCtl {
    pub fn command(&self, c: AppCmd) {
        if self.tx.try_send(c).is_err() {
            warn!(?c, "application command queue full: command dropped");
        }
    }
}

fn signal_group(pgid: u32, sig: i32) {
    // SAFETY: plain syscall; a negative pid addresses the process group.
    unsafe {
        libc::kill(-(pgid as i32), sig);
    }
}

fn group_alive(pgid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(-(pgid as i32), 0) == 0 }
}

struct Running {
    child: tokio::process::Child,
    pid: u32,
}

/// Starts the actor. `env` is added to the application's environment
/// (which node, which directories).
pub fn spawn(
    cfg: AppCfg,
    env: Vec<(String, String)>,
    events: mpsc::Sender<Event>,
    guard: Arc<Guard>,
) -> AppCtl {
    let (tx, mut rx) = mpsc::channel::<AppCmd>(16);
    let (pid_tx, pid_rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut running: Option<Running> = None;
        loop {
            let exited = async {
                match running.as_mut() {
                    Some(r) => r.child.wait().await.ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    match cmd {
                        AppCmd::Start => {
                            if running.is_none() {
                                running = start(&cfg, &env, &guard);
                                let _ = pid_tx.send(running.as_ref().map(|r| r.pid));
                                let ev = if running.is_some() { Event::AppStarted } else { Event::AppStopped };
                                let _ = events.send(ev).await;
                            }
                        }
                        AppCmd::Stop => {
                            if let Some(r) = running.take() {
                                stop(&cfg, r, &guard).await;
                            }
                            let _ = pid_tx.send(None);
                            let _ = events.send(Event::AppStopped).await;
                        }
                        AppCmd::Restart => {
                            if let Some(r) = running.take() {
                                stop(&cfg, r, &guard).await;
                            }
                            running = start(&cfg, &env, &guard);
                            let _ = pid_tx.send(running.as_ref().map(|r| r.pid));
                            let ev = if running.is_some() { Event::AppStarted } else { Event::AppStopped };
                            let _ = events.send(ev).await;
                        }
                    }
                }
                status = exited => {
                    if let Some(r) = running.take() {
                        warn!(pid = r.pid, ?status, "the application exited by itself");
                        // Whatever it left in its group goes too.
                        signal_group(r.pid, libc::SIGKILL);
                        guard.clear_app();
                    }
                    let _ = pid_tx.send(None);
                    let _ = events.send(Event::AppStopped).await;
                }
            }
        }
    });
    AppCtl { tx, pid: pid_rx }
}

fn shell(
    cmd: &str,
    cfg: &AppCfg,
    env: &[(String, String)],
) -> std::io::Result<tokio::process::Command> {
    let mut c = std::process::Command::new("/bin/sh");
    c.arg("-c")
        .arg(cmd)
        .envs(env.iter().cloned())
        .stdin(std::process::Stdio::null());
    if let Some(u) = &cfg.user {
        let user = nix::unistd::User::from_name(u)
            .ok()
            .flatten()
            .ok_or_else(|| std::io::Error::other(format!("no user {u:?}")))?;
        c.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        c.env("HOME", &user.dir).env("USER", u);
    }
    crate::fdlimit::restore_for_children(&mut c);
    let mut c = tokio::process::Command::from(c);
    c.process_group(0).kill_on_drop(false);
    Ok(c)
}

fn start(cfg: &AppCfg, env: &[(String, String)], guard: &Guard) -> Option<Running> {
    match shell(&cfg.start, cfg, env).and_then(|mut c| c.spawn()) {
        Ok(child) => {
            let pid = child.id().unwrap_or(0);
            if pid == 0 {
                warn!("the application exited at once");
                return None;
            }
            guard.set_app(pid);
            info!(pid, cmd = cfg.start, "application started");
            Some(Running { child, pid })
        }
        Err(e) => {
            warn!(cmd = cfg.start, "cannot start the application: {e}");
            None
        }
    }
}

async fn stop(cfg: &AppCfg, mut r: Running, guard: &Guard) {
    let grace = Duration::from_millis(cfg.stop_timeout_ms);
    if let Some(cmd) = &cfg.stop {
        match shell(cmd, cfg, &[]).and_then(|mut c| c.spawn()) {
            Ok(mut c) => {
                if tokio::time::timeout(grace, c.wait()).await.is_err() {
                    warn!(cmd, "the stop command did not finish in time");
                    let _ = c.kill().await;
                }
            }
            Err(e) => warn!(cmd, "cannot run the stop command: {e}"),
        }
    }
    if tokio::time::timeout(Duration::from_millis(10), r.child.wait())
        .await
        .is_err()
    {
        signal_group(r.pid, libc::SIGTERM);
        if tokio::time::timeout(grace, r.child.wait()).await.is_err() {
            warn!(pid = r.pid, "the application ignored SIGTERM: killing it");
            signal_group(r.pid, libc::SIGKILL);
            let _ = r.child.wait().await;
        }
    }
    // Stragglers of its process group.
    if group_alive(r.pid) {
        signal_group(r.pid, libc::SIGTERM);
        for _ in 0..50 {
            if !group_alive(r.pid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        signal_group(r.pid, libc::SIGKILL);
    }
    guard.clear_app();
    info!(pid = r.pid, "application stopped");
}

/// Runs one checker for as long as the daemon lives: every interval while
/// the application runs; `failures` consecutive failures are reported as
/// one `AppCheckFailed`.
pub fn spawn_check(
    check: CheckCfg,
    pid: watch::Receiver<Option<u32>>,
    events: mpsc::Sender<Event>,
    env: Vec<(String, String)>,
) {
    tokio::spawn(async move {
        let mut failed = 0u32;
        loop {
            tokio::time::sleep(Duration::from_millis(check.interval_ms)).await;
            let Some(app_pid) = *pid.borrow() else {
                failed = 0;
                continue;
            };
            let r = tokio::time::timeout(
                Duration::from_millis(check.timeout_ms),
                run_check(&check.kind, app_pid, &env),
            )
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", check.timeout_ms)));
            // The application may have stopped while the check ran.
            if pid.borrow().is_none() {
                failed = 0;
                continue;
            }
            match r {
                Ok(()) => {
                    failed = 0;
                    let _ = events.try_send(Event::AppCheckOk);
                }
                Err(why) => {
                    failed += 1;
                    if failed >= check.failures {
                        failed = 0;
                        let reason = format!("{}: {why}", describe(&check.kind));
                        warn!("application check failed: {reason}");
                        let _ = events.send(Event::AppCheckFailed { reason }).await;
                    }
                }
            }
        }
    });
}

fn describe(k: &CheckKind) -> String {
    match k {
        CheckKind::Process { name: None } => {
            "process check (the application's main process)".into()
        }
        CheckKind::Process { name: Some(n) } => format!("process check ({n})"),
        CheckKind::Tcp { address } => format!("tcp check ({address})"),
        CheckKind::Command { command } => format!("command check ({command})"),
    }
}

/// `env`: the application's environment (a command checker gets it too).
async fn run_check(k: &CheckKind, app_pid: u32, env: &[(String, String)]) -> Result<(), String> {
    match k {
        CheckKind::Process { name: None } => {
            // SAFETY: signal 0 only checks for existence.
            if unsafe { libc::kill(app_pid as i32, 0) } == 0 {
                Ok(())
            } else {
                Err(format!("process {app_pid} is gone"))
            }
        }
        CheckKind::Process { name: Some(n) } => {
            let n = n.clone();
            tokio::task::spawn_blocking(move || process_named(&n))
                .await
                .map_err(|e| e.to_string())?
        }
        CheckKind::Tcp { address } => tokio::net::TcpStream::connect(address)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        CheckKind::Command { command } => {
            let mut c = std::process::Command::new("/bin/sh");
            c.arg("-c")
                .arg(command)
                .envs(env.iter().cloned())
                .stdin(std::process::Stdio::null());
            crate::fdlimit::restore_for_children(&mut c);
            let st = tokio::process::Command::from(c)
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| e.to_string())?;
            if st.success() {
                Ok(())
            } else {
                Err(format!("exited with {st}"))
            }
        }
    }
}

/// Whether a process whose command name (`/proc/PID/comm`) is `name` exists.
fn process_named(name: &str) -> Result<(), String> {
    let rd = std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))?;
    for e in rd.flatten().take(1 << 20) {
        let f = e.file_name();
        let Some(s) = f.to_str() else { continue };
        if !s.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) {
            if comm.trim_end() == name {
                return Ok(());
            }
        }
    }
    Err(format!("no process named {name:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checkers_see_what_they_check() {
        let me = std::process::id();
        let check = |k: CheckKind, pid: u32| async move { run_check(&k, pid, &[]).await };
        assert!(check(CheckKind::Process { name: None }, me).await.is_ok());
        // A PID that cannot exist (above pid_max's hard ceiling).
        let gone = check(CheckKind::Process { name: None }, 4_194_305).await;
        assert!(gone.is_err_and(|e| e.contains("gone")));
        let comm = std::fs::read_to_string(format!("/proc/{me}/comm")).unwrap_or_default();
        let name = Some(comm.trim().to_string());
        assert!(check(CheckKind::Process { name }, 0).await.is_ok());
        let name = Some("no-such-process-x".to_string());
        assert!(check(CheckKind::Process { name }, 0).await.is_err());
        let ok = CheckKind::Command {
            command: "exit 0".into(),
        };
        assert!(check(ok, 0).await.is_ok());
        let seven = CheckKind::Command {
            command: "exit 7".into(),
        };
        assert!(check(seven, 0).await.is_err_and(|e| e.contains('7')));
        // A command checker gets the application's environment.
        let env = [("HAPAIR_NODE".to_string(), "n9".to_string())];
        let k = CheckKind::Command {
            command: "test \"$HAPAIR_NODE\" = n9".into(),
        };
        assert!(run_check(&k, 0, &env).await.is_ok());
        assert!(run_check(&k, 0, &[]).await.is_err());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let address = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        assert!(run_check(&CheckKind::Tcp { address }, 0, &[]).await.is_ok());
        drop(l);
        assert!(
            run_check(&CheckKind::Tcp { address }, 0, &[])
                .await
                .is_err(),
            "nothing listens any more"
        );
    }

    #[tokio::test]
    async fn consecutive_failures_are_reported_once_per_budget() {
        let (pid_tx, pid_rx) = watch::channel(Some(std::process::id()));
        let (tx, mut rx) = mpsc::channel(16);
        spawn_check(
            CheckCfg {
                kind: CheckKind::Command {
                    command: "exit 1".into(),
                },
                interval_ms: 50,
                timeout_ms: 1000,
                failures: 3,
            },
            pid_rx,
            tx,
            Vec::new(),
        );
        let t0 = std::time::Instant::now();
        let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(
            matches!(ev, Ok(Some(Event::AppCheckFailed { .. }))),
            "{ev:?}"
        );
        assert!(
            t0.elapsed() >= Duration::from_millis(150),
            "three failures, 50 ms apart, before the report"
        );
        // While the application is down, nothing is checked or reported.
        let _ = pid_tx.send(None);
        while rx.try_recv().is_ok() {}
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            rx.try_recv().is_err(),
            "no report while the application is down"
        );
    }
}
