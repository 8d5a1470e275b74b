//! Failover benchmark: hapair beside keepalived, in the same run, on the same
//! topology (a switch, two nodes, a client in network namespaces; VIP
//! 10.77.0.100). Not a test: it prints figures.
//!
//! Both systems serve a TCP responder on the VIP that answers `WHO` with
//! its node's name (`hapair demo-app`, which for hapair is the replicated
//! application and for keepalived a plain responder on each node). A probe
//! in the client namespace asks every 10 ms (fresh connection each time,
//! 50 ms connect timeout) and records who answered; the VIP's presence on
//! both nodes is sampled every 10 ms. For each way of losing the primary
//! (node crash = every process of the node killed and its link cut at the
//! same instant; kill -9 of the HA daemon only; clean stop; swap for
//! hapair), it reports the time from the event to the first answer from
//! the other node, answers from the old node after the event, and whether
//! the VIP was ever on both nodes.

use hapair_tests::cluster::{Cluster, ClusterOpts, APP_PORT, VIP};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Crash,
    Kill9,
    Stop,
    Swap,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Crash => "node crash (all killed + link down)",
            Mode::Kill9 => "kill -9 of the HA daemon",
            Mode::Stop => "clean stop",
            Mode::Swap => "swap",
        }
    }
}

#[derive(Default, Clone)]
struct Trial {
    first_backup_s: Option<f64>,
    old_answers_after: usize,
    vip_on_both_samples: usize,
}

/// Probes the VIP and samples the VIP holders until stopped.
struct Probe {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<(Instant, String)>>>,
    both: Arc<Mutex<Vec<Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Probe {
    fn start(c: &Cluster) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let both = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), answers.clone());
        let t1 = c.in_client(move || {
            let addr: SocketAddr = format!("{VIP}:{APP_PORT}")
                .parse()
                .unwrap_or_else(|e| panic!("{e}"));
            let end = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::SeqCst) && Instant::now() < end {
                let t = Instant::now();
                if let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_millis(50)) {
                    let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
                    let mut line = String::new();
                    if c.write_all(b"WHO\n").is_ok() {
                        if let Ok(r) = c.try_clone() {
                            if BufReader::new(r).read_line(&mut line).is_ok_and(|n| n > 0) {
                                a.lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push((t, line.trim().to_string()));
                            }
                        }
                    }
                }
                let spent = t.elapsed();
                if spent < Duration::from_millis(10) {
                    std::thread::sleep(Duration::from_millis(10) - spent);
                }
            }
        });
        let names: Vec<String> = c.nodes.iter().map(|n| n.name().to_string()).collect();
        let (s, b) = (stop.clone(), both.clone());
        let t2 = std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::SeqCst) && Instant::now() < end {
                let on = names.iter().filter(|ns| vip_in(ns)).count();
                if on > 1 {
                    b.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Probe {
            stop,
            answers,
            both,
            threads: vec![t1, t2],
        }
    }

    fn finish(self, tk: Instant, old: &str, new: &str) -> Trial {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        let answers = self
            .answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let both = self.both.lock().unwrap_or_else(|p| p.into_inner()).len();
        Trial {
            first_backup_s: answers
                .iter()
                .find(|(t, w)| *t >= tk && w == new)
                .map(|(t, _)| (*t - tk).as_secs_f64()),
            old_answers_after: answers.iter().filter(|(t, w)| *t > tk && w == old).count(),
            vip_on_both_samples: both,
        }
    }

    fn has_answer_from(&self, who: &str, since: Instant) -> bool {
        self.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(t, w)| *t >= since && w == who)
    }
}

fn vip_in(ns: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {VIP}/")))
        .unwrap_or(false)
}

fn wait_answer(p: &Probe, who: &str, since: Instant, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if p.has_answer_from(who, since) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(st) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
                if let Some((_, rest)) = st.rsplit_once(") ") {
                    if rest.split(' ').nth(1).and_then(|x| x.parse::<u32>().ok()) == Some(pid) {
                        v.push(p);
                    }
                }
            }
        }
    }
    v
}

fn kill9(pids: &[u32]) {
    for &p in pids {
        // SAFETY: PIDs of processes this benchmark started (directly or as
        // the children of the daemons it started).
        unsafe {
            libc::kill(p as i32, libc::SIGKILL);
        }
    }
}

fn hapair_trial(label: &str, interval_ms: u64, timeout_ms: u64, mode: Mode) -> Trial {
    let mut c = Cluster::new(
        &format!("fbench-{label}"),
        ClusterOpts {
            interval_ms,
            timeout_ms,
            ..Default::default()
        },
    );
    c.start(0);
    std::thread::sleep(Duration::from_millis(300));
    c.start(1);
    c.wait_pair(0, Duration::from_secs(30));
    let probe = Probe::start(&c);
    if !wait_answer(
        &probe,
        "n1",
        Instant::now() - Duration::from_secs(1),
        Duration::from_secs(10),
    ) {
        eprintln!("hapair {label}: the application never answered on the VIP");
    }
    std::thread::sleep(Duration::from_millis(500));
    let daemon = c.daemon(0).pid();
    let app = c
        .status(0)
        .ok()
        .and_then(|v| v["app"]["pid"].as_u64())
        .map(|p| p as u32);
    let everything: Vec<u32> = std::iter::once(daemon)
        .chain(children_of(daemon))
        .chain(app)
        .collect();
    let tk = Instant::now();
    match mode {
        Mode::Crash => {
            kill9(&everything);
            c.cut(0, true);
        }
        Mode::Kill9 => kill9(&[daemon]),
        Mode::Stop => {
            let _ = c.cli(0, &["stop"]);
        }
        Mode::Swap => {
            let _ = c.cli(0, &["swap"]);
        }
    }
    wait_answer(&probe, "n2", tk, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let t = probe.finish(tk, "n1", "n2");
    if mode == Mode::Crash {
        c.cut(0, false);
    }
    t
}

fn keepalived_conf(
    dir: &Path,
    node: &str,
    prio: u32,
    src: &str,
    peer: &str,
    advert: &str,
) -> std::path::PathBuf {
    let p = dir.join(format!("{node}.conf"));
    let text = format!(
        "global_defs {{\n  router_id {node}\n  vrrp_version 3\n  vrrp_garp_master_delay 0\n  vrrp_garp_master_repeat 3\n}}\n\
         vrrp_instance VI_1 {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 77\n  priority {prio}\n  advert_int {advert}\n\
         \x20 unicast_src_ip {src}\n  unicast_peer {{\n    {peer}\n  }}\n  virtual_ipaddress {{\n    {VIP}/24 dev eth0\n  }}\n}}\n"
    );
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("{e}"));
    p
}

/// A process started in a namespace, killed by PID on drop.
struct Bg(std::process::Child);
impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_in(ns: &str, args: &[&str], env: &[(&str, &str)], log: &Path) -> Bg {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("{e}"));
    let c = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap_or_else(|e| panic!("{e}")))
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    Bg(c)
}

fn keepalived_trial(advert: &str, mode: Mode) -> Trial {
    // The same topology; hapair's daemons are not started.
    let c = Cluster::new("fbench-ka", ClusterOpts::default());
    let bin = hapair_tests::env::hapair_bin();
    let dir = c.tmp.join("ka");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let bins = bin.to_string_lossy().into_owned();
    let mut responders = Vec::new();
    for (i, n) in ["n1", "n2"].iter().enumerate() {
        let d = dir.join(format!("app-{n}"));
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        let ds = d.to_string_lossy().into_owned();
        responders.push(spawn_in(
            c.nodes[i].name(),
            &[
                &bins,
                "demo-app",
                "--dir",
                &ds,
                "--listen",
                &format!("0.0.0.0:{APP_PORT}"),
            ],
            &[("HAPAIR_NODE", n)],
            &dir.join(format!("app-{n}.log")),
        ));
    }
    let mut ka = Vec::new();
    for (i, (n, prio, src, peer)) in [
        ("n1", 150, "10.77.0.1", "10.77.0.2"),
        ("n2", 100, "10.77.0.2", "10.77.0.1"),
    ]
    .iter()
    .enumerate()
    {
        let conf = keepalived_conf(&dir, n, *prio, src, peer, advert);
        let pid = dir.join(format!("{n}.pid"));
        let vpid = dir.join(format!("{n}.vrrp.pid"));
        ka.push(spawn_in(
            c.nodes[i].name(),
            &[
                "keepalived",
                "-n",
                "-l",
                "-D",
                "-P",
                "-f",
                &conf.to_string_lossy(),
                "-p",
                &pid.to_string_lossy(),
                "-r",
                &vpid.to_string_lossy(),
                "-i",
                n,
            ],
            &[],
            &dir.join(format!("{n}.log")),
        ));
    }
    let probe = Probe::start(&c);
    if !wait_answer(&probe, "n1", Instant::now(), Duration::from_secs(15)) {
        eprintln!("keepalived: n1 never answered on the VIP");
    }
    std::thread::sleep(Duration::from_secs(1));
    let main_pid = ka[0].0.id();
    let vrrp = std::fs::read_to_string(dir.join("n1.vrrp.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let tk = Instant::now();
    match mode {
        Mode::Crash => {
            kill9(
                &std::iter::once(main_pid)
                    .chain(vrrp)
                    .chain(std::iter::once(responders[0].0.id()))
                    .collect::<Vec<_>>(),
            );
            c.cut(0, true);
        }
        Mode::Kill9 => kill9(&std::iter::once(main_pid).chain(vrrp).collect::<Vec<_>>()),
        Mode::Stop | Mode::Swap => {
            // SAFETY: the keepalived we started.
            unsafe {
                libc::kill(main_pid as i32, libc::SIGTERM);
            }
        }
    }
    wait_answer(&probe, "n2", tk, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let t = probe.finish(tk, "n1", "n2");
    if mode == Mode::Crash {
        c.cut(0, false);
    }
    // keepalived leaves the VIP behind when killed: remove it before the
    // namespaces go (they go anyway; this keeps the logs quiet).
    for n in &c.nodes {
        let _ = Command::new("ip")
            .args([
                "-n",
                n.name(),
                "addr",
                "del",
                &format!("{VIP}/24"),
                "dev",
                "eth0",
            ])
            .stderr(Stdio::null())
            .status();
    }
    drop(ka);
    drop(responders);
    t
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

fn row(system: &str, cfg: &str, mode: Mode, trials: &[Trial]) -> String {
    let mut firsts: Vec<f64> = trials.iter().filter_map(|t| t.first_backup_s).collect();
    let all: Vec<String> = trials
        .iter()
        .map(|t| {
            t.first_backup_s
                .map_or("none".into(), |s| format!("{s:.3}"))
        })
        .collect();
    let failed = trials.iter().filter(|t| t.first_backup_s.is_none()).count();
    format!(
        "| {system} | {cfg} | {} | {} | {} | {} | {} |",
        mode.name(),
        median(&mut firsts).map_or("-".into(), |m| format!("{m:.3}")),
        all.join(" "),
        trials
            .iter()
            .map(|t| t.old_answers_after.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        if trials.iter().any(|t| t.vip_on_both_samples > 0) {
            format!(
                "YES ({} samples)",
                trials.iter().map(|t| t.vip_on_both_samples).sum::<usize>()
            )
        } else if failed > 0 {
            format!("no ({failed} trials never failed over)")
        } else {
            "no".into()
        }
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let reps: usize = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });
    let with_ka = !args.iter().any(|a| a == "--no-keepalived");
    println!(
        "failover benchmark: {reps} repetition(s) per line{}",
        if quick { " (--quick)" } else { "" }
    );
    let mut rows = Vec::new();
    for (cfg, iv, to) in [
        ("defaults (200/3000 ms)", 200, 3000),
        ("interval 50, timeout 300 ms", 50, 300),
    ] {
        for mode in [Mode::Crash, Mode::Kill9, Mode::Stop, Mode::Swap] {
            let trials: Vec<Trial> = (0..reps)
                .map(|_| hapair_trial(&format!("{iv}"), iv, to, mode))
                .collect();
            let r = row("hapair", cfg, mode, &trials);
            println!("{r}");
            rows.push(r);
        }
    }
    if with_ka {
        if Command::new("keepalived")
            .arg("--version")
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            println!("keepalived is not installed (apt-get install keepalived): skipped");
        } else {
            for (cfg, adv) in [
                ("advert_int 1 s (default)", "1"),
                ("advert_int 0.01 s", "0.01"),
            ] {
                for mode in [Mode::Crash, Mode::Kill9, Mode::Stop] {
                    let trials: Vec<Trial> =
                        (0..reps).map(|_| keepalived_trial(adv, mode)).collect();
                    let r = row("keepalived", cfg, mode, &trials);
                    println!("{r}");
                    rows.push(r);
                }
            }
        }
    }
    println!("\n| system | configuration | event | first answer from the other node (median s) | all trials s | answers from the old node after the event | VIP on both nodes |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}
