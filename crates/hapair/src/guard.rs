//! `hapair guard`: the fencing helper of a serving node. The daemon starts
//! it as a child process and tells it, line by line on its stdin, what this
//! node holds (the VIP, the application's process group) and that it is
//! alive (`ping`). If the daemon dies (stdin reaches its end: kill -9, a
//! crash) or stops pinging for longer than `--deadline-ms` (frozen,
//! wedged), the guard fences at once: it kills the application's process
//! group and removes the VIP, then exits. So a dead primary never keeps
//! answering on the VIP or writing through its application, even before the
//! VIP's address lease lapses (which remains the backstop if the guard
//! itself is killed).
//!
//! Protocol (one command per line): `vip CIDR IFNAME`, `novip`,
//! `app PGID`, `noapp`, `ping`, `exit` (clean end: nothing to fence).

use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::time::Duration;

#[derive(Default)]
struct Held {
    vip: Option<hapair_vip::Vip>,
    app_pgid: Option<i32>,
}

fn say(msg: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "hapair guard[{}]: {msg}",
        std::process::id()
    );
}

fn fence(h: &Held, why: &str) {
    say(&format!("fencing ({why})"));
    if let Some(pg) = h.app_pgid {
        // SAFETY: plain syscall; a negative pid addresses the process group.
        let r = unsafe { libc::kill(-pg, libc::SIGKILL) };
        say(&format!(
            "killed application process group {pg}: {}",
            if r == 0 {
                "ok".to_string()
            } else {
                std::io::Error::last_os_error().to_string()
            }
        ));
    }
    if let Some(v) = &h.vip {
        match hapair_vip::release(v) {
            Ok(()) => say(&format!(
                "removed VIP {}/{} from {}",
                v.addr, v.prefix_len, v.ifname
            )),
            Err(e) => say(&format!("cannot remove the VIP: {e}")),
        }
    }
}

pub fn run(deadline_ms: u64) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::sync_channel::<Option<String>>(64);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    let mut held = Held::default();
    loop {
        let line = match rx.recv_timeout(Duration::from_millis(deadline_ms)) {
            Ok(Some(l)) => l,
            Ok(None) => {
                fence(&held, "the daemon is gone");
                return Ok(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                fence(
                    &held,
                    &format!("no word from the daemon for {deadline_ms} ms"),
                );
                return Ok(());
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                fence(&held, "the daemon is gone");
                return Ok(());
            }
        };
        let mut w = line.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("ping"), None, None) => {}
            (Some("vip"), Some(cidr), Some(ifname)) => match hapair_vip::Vip::parse(cidr, ifname) {
                Ok(v) => held.vip = Some(v),
                Err(e) => say(&format!("bad vip line ignored: {e}")),
            },
            (Some("novip"), None, None) => held.vip = None,
            (Some("app"), Some(pg), None) => match pg.parse::<i32>() {
                Ok(p) if p > 1 => held.app_pgid = Some(p),
                _ => say(&format!("bad app line ignored: {line:?}")),
            },
            (Some("noapp"), None, None) => held.app_pgid = None,
            (Some("exit"), None, None) => return Ok(()),
            _ => say(&format!("unknown line ignored: {line:?}")),
        }
    }
}
