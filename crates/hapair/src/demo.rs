//! `hapair demo`: a local two-node cluster in network namespaces, showing
//! replication, a failover after `kill -9` of the primary, the resync of the
//! returning node and a planned swap back, while a client keeps writing
//! fsynced records through the VIP; at the end it checks that no record the
//! application acknowledged was lost. Everything it creates (namespaces,
//! processes, mounts, files) is removed when it ends, also on error or
//! Ctrl-C.
//!
//! Layout: namespaces `hpd-sw` (a bridge), `hpd-n1`, `hpd-n2`, `hpd-w`
//! (the witness) and `hpd-c` (the client), on 10.77.0.0/24; the VIP is
//! 10.77.0.100, the application `hapair demo-app` on port 8080. The daemons
//! change only their network namespace, so their mounts are visible here.

use crate::daemon::admin::{self, Request, Response};
use anyhow::{bail, Context};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NS: [&str; 5] = ["hpd-sw", "hpd-n1", "hpd-n2", "hpd-w", "hpd-c"];
const VIP: &str = "10.77.0.100";
const PORT: u16 = 8080;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn step(s: &str) {
    println!("\n\x1b[1m== {s}\x1b[0m");
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let o = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (install iproute2)")?;
    if !o.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

fn netns_exec(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut a = vec!["netns", "exec", ns];
    a.extend_from_slice(args);
    ip(&a)
}

/// Everything the demo created, removed on drop.
struct Demo {
    work: PathBuf,
    bin: PathBuf,
    cfg: PathBuf,
    daemons: [Option<Child>; 2],
    witness: Option<Child>,
    data: [PathBuf; 2],
    state: [PathBuf; 2],
    keep: bool,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for c in self.daemons.iter_mut().flatten() {
            // SAFETY: signalling a child we spawned and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        for c in self.daemons.iter_mut().flatten() {
            let end = Instant::now() + Duration::from_secs(15);
            while Instant::now() < end && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(w) = &mut self.witness {
            let _ = w.kill();
            let _ = w.wait();
        }
        // The fencing guards end with their daemons; give them a moment.
        std::thread::sleep(Duration::from_millis(300));
        for d in &self.data {
            let _ = nix::mount::umount2(d.as_path(), nix::mount::MntFlags::MNT_DETACH);
        }
        for ns in NS {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        if self.keep {
            println!("kept {} (logs in it)", self.work.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

impl Demo {
    fn start_daemon(&mut self, i: usize) -> anyhow::Result<()> {
        let node = ["n1", "n2"][i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.join(format!("{node}.log")))?;
        use std::os::unix::process::CommandExt;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", NS[1 + i]))
            .arg(&self.bin)
            .args(["daemon", "-c"])
            .arg(&self.cfg)
            .args(["--node", node])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting a daemon (nsenter from util-linux)")?;
        self.daemons[i] = Some(child);
        Ok(())
    }

    fn status(&self, i: usize) -> Option<serde_json::Value> {
        match admin::call(&admin::socket_path(&self.state[i]), &Request::Status) {
            Ok(Response::Status(v)) => Some(v),
            _ => None,
        }
    }

    fn wait(
        &self,
        i: usize,
        what: &str,
        within: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            check_interrupt()?;
            if let Some(v) = self.status(i) {
                if pred(&v) {
                    return Ok(v);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "n{}: {what} not reached within {within:?} (logs in {})",
            i + 1,
            self.work.display()
        );
    }

    fn show(&self) {
        for i in 0..2 {
            match self.status(i) {
                Some(v) => {
                    for l in crate::cli::human_status(&v).lines().take(5) {
                        println!("  {l}");
                    }
                }
                None => println!("  n{}: not running", i + 1),
            }
        }
    }

    fn vip_on(&self, i: usize) -> bool {
        Command::new("ip")
            .args(["-n", NS[1 + i], "-4", "-o", "addr", "show", "dev", "eth0"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {VIP}/")))
            .unwrap_or(false)
    }

    fn records(&self, i: usize) -> Vec<u64> {
        std::fs::read_to_string(crate::demo_app::log_path(&self.data[i]))
            .unwrap_or_default()
            .lines()
            .filter_map(crate::demo_app::parse_record)
            .map(|(n, _)| n)
            .collect()
    }
}

/// The client: writes records through the VIP, one at a time, resending
/// after any error, from a thread inside the client namespace.
struct Client {
    acked: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    fn start() -> anyhow::Result<Client> {
        let ns =
            std::fs::File::open(format!("/run/netns/{}", NS[4])).context("client namespace")?;
        let (acked, stop) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let t0 = Instant::now();
        let (a, s) = (acked.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a namespace fd; it affects only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return;
            }
            let addr: SocketAddr = match format!("{VIP}:{PORT}").parse() {
                Ok(a) => a,
                Err(_) => return,
            };
            let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
            let mut n = 1u64;
            // Bounded: at most a million records or ten minutes.
            while !s.load(Ordering::SeqCst)
                && n <= 1_000_000
                && t0.elapsed() < Duration::from_secs(600)
            {
                if conn.is_none() {
                    match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                        Ok(c) => {
                            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                            match c.try_clone() {
                                Ok(r) => conn = Some((c, BufReader::new(r))),
                                Err(_) => continue,
                            }
                        }
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    }
                }
                let Some((w, r)) = conn.as_mut() else {
                    continue;
                };
                let mut line = String::new();
                let ok = w
                    .write_all(format!("PUT {n} demo-record-{n}\n").as_bytes())
                    .is_ok()
                    && r.read_line(&mut line).is_ok_and(|k| k > 0)
                    && line.trim_end() == format!("OK {n}");
                if ok {
                    a.lock().unwrap_or_else(|p| p.into_inner()).push(n);
                    n += 1;
                    std::thread::sleep(Duration::from_millis(10));
                } else {
                    conn = None;
                }
            }
        });
        Ok(Client {
            acked,
            stop,
            handle: Some(handle),
        })
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.acked.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn setup_network() -> anyhow::Result<()> {
    for ns in NS {
        if Path::new(&format!("/run/netns/{ns}")).exists() {
            bail!("network namespace {ns} exists: another demo runs, or a previous one was killed (remove it: ip netns del {ns})");
        }
    }
    for ns in NS {
        ip(&["netns", "add", ns])?;
        netns_exec(ns, &["ip", "link", "set", "lo", "up"])?;
    }
    netns_exec(NS[0], &["ip", "link", "add", "br0", "type", "bridge"])?;
    netns_exec(NS[0], &["ip", "link", "set", "br0", "up"])?;
    for (ns, addr) in [
        (NS[1], "10.77.0.1"),
        (NS[2], "10.77.0.2"),
        (NS[3], "10.77.0.3"),
        (NS[4], "10.77.0.10"),
    ] {
        let short = &ns[4..];
        let (a, b) = (format!("hpd{short}a"), format!("hpd{short}b"));
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
        ip(&["link", "set", &a, "netns", ns])?;
        ip(&["link", "set", &b, "netns", NS[0]])?;
        netns_exec(ns, &["ip", "link", "set", &a, "name", "eth0"])?;
        netns_exec(NS[0], &["ip", "link", "set", &b, "master", "br0", "up"])?;
        netns_exec(
            ns,
            &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"],
        )?;
        netns_exec(ns, &["ip", "link", "set", "eth0", "up"])?;
        netns_exec(
            ns,
            &["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"],
        )?;
    }
    Ok(())
}

pub fn run(keep: bool) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("hapair demo needs root (network namespaces, FUSE, the VIP)");
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
    let bin = std::env::current_exe().context("locating the hapair binary")?;
    let work = PathBuf::from(format!("/tmp/hapair-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let mut d = Demo {
        cfg: work.join("hapair.toml"),
        data: [work.join("n1/data"), work.join("n2/data")],
        state: [work.join("n1/state"), work.join("n2/state")],
        work,
        bin,
        daemons: [None, None],
        witness: None,
        keep,
    };
    step(
        "network: a switch, two nodes, a witness and a client in network namespaces (10.77.0.0/24)",
    );
    setup_network()?;
    for p in d.data.iter().chain(&d.state) {
        std::fs::create_dir_all(p)?;
    }
    let tls = d.work.join("tls");
    hapair_transport::tls_init(&tls, &["n1".into(), "n2".into(), "witness".into()], false)?;
    std::fs::write(
        &d.cfg,
        format!(
            r#"[cluster]
name = "demo"
tls_dir = "tls"

[[node]]
name = "n1"
address = "10.77.0.1"
dirs = ["{d1}"]
state_dir = "{s1}"

[[node]]
name = "n2"
address = "10.77.0.2"
dirs = ["{d2}"]
state_dir = "{s2}"

[replication]
dirs = ["/srv/app/data"]

[heartbeat]
interval_ms = 100
timeout_ms = 1000

[vip]
address = "{VIP}/24"
interface = "eth0"

[witness]
address = "10.77.0.3:7702"

[app]
start = "exec {bin} demo-app --dir \"$HAPAIR_DIRS\" --listen {VIP}:{PORT}"

[[check]]
kind = "tcp"
address = "{VIP}:{PORT}"
interval_ms = 300
"#,
            d1 = d.data[0].display(),
            d2 = d.data[1].display(),
            s1 = d.state[0].display(),
            s2 = d.state[1].display(),
            bin = d.bin.display(),
        ),
    )?;
    println!("configuration: {}", d.cfg.display());

    step("start the witness and both daemons");
    let wlog = std::fs::File::create(d.work.join("witness.log"))?;
    {
        use std::os::unix::process::CommandExt;
        d.witness = Some(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", NS[3]))
                .arg(&d.bin)
                .args(["witness", "-c"])
                .arg(&d.cfg)
                .arg("--state-dir")
                .arg(d.work.join("witness"))
                .stdin(Stdio::null())
                .stdout(wlog.try_clone()?)
                .stderr(wlog)
                .process_group(0)
                .spawn()?,
        );
    }
    d.start_daemon(0)?;
    d.start_daemon(1)?;
    let settle = Duration::from_secs(30);
    let prim_of = |v: &serde_json::Value| {
        v["state"] == "PRIM" && v["peer"]["in_sync"] == true && v["app"]["state"] == "up"
    };
    let t = Instant::now();
    let (p, s) = loop {
        check_interrupt()?;
        if d.status(0).is_some_and(|v| prim_of(&v)) {
            break (0, 1);
        }
        if d.status(1).is_some_and(|v| prim_of(&v)) {
            break (1, 0);
        }
        if t.elapsed() > settle {
            bail!(
                "the pair did not settle within {settle:?} (logs in {})",
                d.work.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    d.show();

    step("a client writes records through the VIP; each is fsynced before it is acknowledged");
    let client = Client::start()?;
    let t = Instant::now();
    while client.count() < 100 {
        check_interrupt()?;
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the client got no acknowledgements through the VIP");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "{} records acknowledged by n{} (the mirror on n{} holds {})",
        client.count(),
        p + 1,
        s + 1,
        d.records(s).len()
    );

    step(&format!("kill -9 the primary's daemon (n{})", p + 1));
    let before = client.count();
    let t0 = Instant::now();
    if let Some(c) = &mut d.daemons[p] {
        let _ = c.kill();
        let _ = c.wait();
    }
    let mut vip_gone = None;
    let mut vip_moved = None;
    while vip_moved.is_none() && t0.elapsed() < settle {
        check_interrupt()?;
        if vip_gone.is_none() && !d.vip_on(p) {
            vip_gone = Some(t0.elapsed());
        }
        if d.vip_on(s) {
            vip_moved = Some(t0.elapsed());
        }
        if d.vip_on(p) && d.vip_on(s) {
            bail!("the VIP is on both nodes");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let vip_moved = vip_moved.context("the VIP did not move")?;
    println!(
        "VIP removed from n{} by its fencing guard after {:?}; on n{} after {:?}",
        p + 1,
        vip_gone.unwrap_or_default(),
        s + 1,
        vip_moved
    );
    let mut resumed = None;
    while client.count() < before + 50 && t0.elapsed() < settle {
        check_interrupt()?;
        if resumed.is_none() && client.count() > before + 1 {
            resumed = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let resumed = resumed.context("the client did not resume writing")?;
    println!("the client goes on: {} records acknowledged; the first new acknowledgement came {resumed:?} after the kill", client.count());
    d.show();

    step(&format!(
        "restart n{}: it comes back as secondary and is resynced while the client writes",
        p + 1
    ));
    d.start_daemon(p)?;
    d.wait(p, "SECOND in sync", settle, |v| {
        v["state"] == "SECOND" && v["in_sync"] == true
    })?;
    d.wait(s, "PRIM", settle, |v| {
        v["state"] == "PRIM" && v["peer"]["in_sync"] == true
    })?;
    d.show();

    step(&format!(
        "planned failback: hapair swap (the service returns to n{})",
        p + 1
    ));
    let t0 = Instant::now();
    match admin::call(&admin::socket_path(&d.state[s]), &Request::Swap)? {
        Response::Ok { message } => println!("n{}: {message}", s + 1),
        Response::Refused { reason, .. } => bail!("swap refused: {reason}"),
        other => bail!("swap: {other:?}"),
    }
    d.wait(p, "PRIM with the application", settle, |v| {
        v["state"] == "PRIM" && v["app"]["state"] == "up"
    })?;
    println!("n{} serves again after {:?}", p + 1, t0.elapsed());
    d.wait(s, "SECOND in sync", settle, |v| {
        v["state"] == "SECOND" && v["in_sync"] == true
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let acked = client.finish();
    d.show();

    step("check: every acknowledged record is on both nodes, intact");
    for i in [p, s] {
        let have: std::collections::HashSet<u64> = d.records(i).into_iter().collect();
        let lost: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|n| !have.contains(n))
            .collect();
        if !lost.is_empty() {
            bail!(
                "n{}: {} acknowledged records missing (first {:?})",
                i + 1,
                lost.len(),
                &lost[..lost.len().min(10)]
            );
        }
        println!(
            "n{}: all {} acknowledged records present ({} in its log)",
            i + 1,
            acked.len(),
            have.len()
        );
    }
    println!("\ndemo finished: failover after kill -9, resync, and failback without losing an acknowledged write");
    drop(d);
    Ok(())
}
