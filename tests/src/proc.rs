//! `Proc`: a spawned child that is killed (SIGKILL, by its own PID and
//! process group) and reaped when the guard drops, with its stderr and stdout
//! captured to files whose tail is printed if the test is failing.

use std::fs::File;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Proc {
    /// Spawns `cmd` in its own process group, stdin from /dev/null, stdout
    /// and stderr into `log_dir/<name>.{stdout,stderr}` (appended, so a
    /// restarted process keeps the earlier log).
    pub fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> Proc {
        let stdout_path = log_dir.join(format!("{name}.stdout"));
        let stderr_path = log_dir.join(format!("{name}.stderr"));
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap_or_else(|e| panic!("opening log {}: {e}", p.display()))
        };
        let out: File = open(&stdout_path);
        let err: File = open(&stderr_path);
        // Its own process group, so that the guard can also stop the
        // children it forked (fio, stress-ng workers) and nothing else.
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child,
            status: None,
            stdout_path,
            stderr_path,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    /// Sends `sig` to the process (not its group) if it is still running.
    pub fn signal(&mut self, sig: i32) {
        if self.try_wait().is_none() {
            // SAFETY: kill with a PID we spawned and have not reaped yet
            // (try_wait above returned None), so the PID is still ours.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, sig);
            }
        }
    }

    /// SIGKILL to the process and its group, then reap it.
    pub fn kill9(&mut self) -> ExitStatus {
        if self.try_wait().is_none() {
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: the PID (and the group it leads) is ours and unreaped.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
            }
        }
        self.wait_timeout(Duration::from_secs(30))
            .unwrap_or_else(|| {
                panic!(
                    "{} (pid {}) survived SIGKILL for 30 s",
                    self.name,
                    self.pid()
                )
            })
    }

    /// The exit status if the process has ended (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    // No group kill after reaping: the group ID could then
                    // belong to someone else's process.
                    self.status = Some(s);
                }
                Ok(None) => {}
                Err(e) => panic!("waiting for {}: {e}", self.name),
            }
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Waits up to `d` for the process to end.
    pub fn wait_timeout(&mut self, d: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + d;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `d`; past it, kills the process and panics with its log.
    pub fn wait_or_kill(&mut self, d: Duration) -> ExitStatus {
        match self.wait_timeout(d) {
            Some(s) => s,
            None => {
                self.kill9();
                panic!(
                    "{} did not finish within {d:?}; killed. stderr tail:\n{}",
                    self.name,
                    self.stderr_tail(40)
                );
            }
        }
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stdout_path).unwrap_or_default()).into_owned()
    }

    pub fn stderr_tail(&self, lines: usize) -> String {
        tail(&self.stderr(), lines)
    }

    pub fn stdout_tail(&self, lines: usize) -> String {
        tail(&self.stdout(), lines)
    }
}

/// A process stopped with SIGSTOP until the guard drops (SIGCONT), so a
/// failing test never leaves it frozen. Used to show that a call waits for
/// the mirror: while the mirror is stopped it cannot acknowledge anything.
pub struct Stopped {
    pid: libc::pid_t,
}

fn proc_state(pid: libc::pid_t) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ...": comm may hold spaces, so split after ')'.
    s.rsplit_once(')')?.1.trim_start().chars().next()
}

impl Stopped {
    /// Stops `p` and waits until the kernel reports it stopped.
    pub fn new(p: &mut Proc) -> Stopped {
        assert!(p.is_running(), "{} is not running", p.name());
        let pid = p.pid() as libc::pid_t;
        // SAFETY: a PID we spawned and have not reaped (checked above).
        let r = unsafe { libc::kill(pid, libc::SIGSTOP) };
        assert_eq!(
            r,
            0,
            "SIGSTOP {}: {}",
            p.name(),
            std::io::Error::last_os_error()
        );
        let s = Stopped { pid };
        let end = Instant::now() + Duration::from_secs(10);
        while proc_state(pid) != Some('T') {
            assert!(Instant::now() < end, "{} did not stop", p.name());
            std::thread::sleep(Duration::from_millis(5));
        }
        s
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: the PID is ours; the Proc guard reaps it only after
        // killing it, and a SIGCONT to a stopped or dead child is harmless.
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
    }
}

/// The last `lines` lines of `s`.
pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Describes an exit status for messages ("exit 1", "signal 9").
pub fn describe(s: &ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => format!("{s:?}"),
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let was_running = self.try_wait().is_none();
        if was_running {
            self.kill9();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- {} (pid {}, {}) stderr tail ({}):\n{}\n---- {} stdout tail:\n{}\n----",
                self.name,
                self.pid(),
                if was_running {
                    "killed by guard".to_string()
                } else {
                    self.status.map(|s| describe(&s)).unwrap_or_default()
                },
                self.stderr_path.display(),
                self.stderr_tail(40),
                self.name,
                self.stdout_tail(15),
            );
        }
    }
}

/// Runs a command to completion within `timeout` (killing it past that),
/// with output captured to `log_dir/<name>.*`. Returns the status and the
/// guard (already reaped), so the caller can read the output.
pub fn run_bounded(
    name: &str,
    cmd: &mut Command,
    log_dir: &Path,
    timeout: Duration,
) -> (ExitStatus, Proc) {
    let mut p = Proc::spawn(name, cmd, log_dir);
    let s = p.wait_or_kill(timeout);
    (s, p)
}
