//! The supervisor end to end: two real daemons in network namespaces, a
//! witness, the VIP, the demo application and a client writing fsynced
//! records through the VIP. After every failure: exactly one node serves
//! the VIP, the application runs there, and no acknowledged record is
//! missing from its data.

use hapair_tests::cluster::{self, missing, write_records, Cluster, ClusterOpts};
use hapair_tests::env;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SETTLE: Duration = Duration::from_secs(20);

/// A client writing records through the VIP on a thread of the client's
/// namespace until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<cluster::ClientReport>,
}

impl Writer {
    fn start(c: &Cluster) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = c.in_client(move || write_records(1_000_000, Duration::from_secs(90), s));
        Writer { stop, handle }
    }

    fn finish(self) -> cluster::ClientReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .unwrap_or_else(|_| panic!("the client thread panicked"))
    }
}

/// Waits until node `i`'s data holds at least `n` records.
fn wait_records(c: &Cluster, i: usize, n: usize, within: Duration) {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if c.records(i).len() >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{} holds {} records after {within:?}, want {n}",
        cluster::node_name(i),
        c.records(i).len()
    );
}

/// Samples the VIP holders and the serving states for `d`; panics if two
/// nodes ever hold the VIP at once.
fn never_two_vips(c: &Cluster, d: Duration) {
    let end = Instant::now() + d;
    let mut samples = 0;
    while Instant::now() < end {
        let h = c.vip_holders();
        assert!(h.len() <= 1, "the VIP is on both nodes");
        samples += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("VIP sampled {samples} times: never on both nodes");
}

fn assert_no_loss(c: &Cluster, i: usize, rep: &cluster::ClientReport) {
    let present = c.records(i);
    let lost = missing(&rep.acked, &present);
    assert!(
        lost.is_empty(),
        "{} acknowledged records missing on {} (of {} acked, {} present): first {:?}",
        lost.len(),
        cluster::node_name(i),
        rep.acked.len(),
        present.len(),
        &lost[..lost.len().min(10)]
    );
    eprintln!(
        "{}: all {} acknowledged records present ({} in the log); longest gap without an ack {:?}, {} connections",
        cluster::node_name(i),
        rep.acked.len(),
        present.len(),
        rep.longest_gap,
        rep.reconnects
    );
}

fn started(name: &str, opts: ClusterOpts) -> Cluster {
    let mut c = Cluster::new(name, opts);
    if c.opts.witness {
        c.start_witness();
    }
    c.start(0);
    c.start(1);
    c.wait_pair(0, SETTLE);
    assert_eq!(c.vip_holders(), vec![0], "the VIP is on the primary only");
    c
}

#[test]
fn kill9_of_the_primary_daemon_fails_over_without_losing_acked_records() {
    let _s = env::serial();
    let mut c = started("ha-kill9", ClusterOpts::default());
    let st = c.status(0).unwrap_or_else(|e| panic!("{e}"));
    // The status shows both nodes, replication, VIP holder, witness, checks
    // and timestamped transitions.
    assert_eq!(st["node"], "n1");
    assert_eq!(st["peer"]["name"], "n2");
    assert_eq!(st["peer"]["state"], "SECOND");
    assert_eq!(st["vip"]["holder"], "n1");
    assert_eq!(st["witness"]["configured"], false);
    assert_eq!(st["split_brain_possible"], true);
    assert_eq!(
        st["replication"]["dirs"][0]["replication"]["state"],
        "replicating"
    );
    assert!(st["transitions"].as_array().is_some_and(|t| !t.is_empty() && t[0]["at"].as_str().is_some_and(|a| a.ends_with('Z'))), "{st}");
    let w = Writer::start(&c);
    wait_records(&c, 1, 50, Duration::from_secs(20));
    let app_pid = st["app"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no app pid: {st}")) as u32;
    let t0 = Instant::now();
    c.kill9(0);
    // The guard fences at once: VIP gone, application killed.
    let end = Instant::now() + Duration::from_secs(2);
    while c.vip_on(0) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!c.vip_on(0), "the VIP stayed on the killed primary");
    eprintln!("VIP gone from the killed primary after {:?}", t0.elapsed());
    let alive = |p: u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    };
    while alive(app_pid) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !alive(app_pid),
        "the killed primary's application still runs"
    );
    eprintln!("application killed after {:?}", t0.elapsed());
    never_two_vips(&c, Duration::from_millis(500));
    c.wait_status(1, SETTLE, "ALONE with the application up", |v| {
        v["state"] == "ALONE" && v["app"]["state"] == "up"
    });
    eprintln!("n2 serves {:?} after the kill", t0.elapsed());
    assert_eq!(c.vip_holders(), vec![1]);
    wait_records(&c, 1, c.records(1).len() + 20, Duration::from_secs(20));
    let rep = w.finish();
    assert_no_loss(&c, 1, &rep);
    // The old primary comes back as secondary and is resynced.
    c.start(0);
    c.wait_pair(1, SETTLE);
    assert_eq!(c.vip_holders(), vec![1]);
    assert_no_loss(&c, 0, &rep);
}

#[test]
fn link_cut_with_a_witness_moves_the_service_once() {
    let _s = env::serial();
    let mut c = started(
        "ha-cut",
        ClusterOpts {
            witness: true,
            ..Default::default()
        },
    );
    let w = Writer::start(&c);
    wait_records(&c, 1, 50, Duration::from_secs(20));
    c.cut(0, true);
    let t0 = Instant::now();
    // n1 lost its peer and the witness: it stops serving; n2 takes over.
    never_two_vips(&c, Duration::from_secs(3));
    c.wait_status(1, SETTLE, "ALONE", |v| {
        v["state"] == "ALONE" && v["app"]["state"] == "up"
    });
    eprintln!("n2 serves {:?} after the cut", t0.elapsed());
    let s0 = c.wait_status(0, SETTLE, "WAIT without resources", |v| {
        v["state"] == "WAIT" && v["vip"]["held_here"] == false && v["app"]["state"] == "down"
    });
    assert!(s0["detail"].as_str().is_some_and(|d| !d.is_empty()), "{s0}");
    assert_eq!(c.vip_holders(), vec![1]);
    wait_records(&c, 1, c.records(1).len() + 20, Duration::from_secs(20));
    let rep = w.finish();
    assert_no_loss(&c, 1, &rep);
    c.cut(0, false);
    c.wait_pair(1, SETTLE);
    assert_no_loss(&c, 0, &rep);
}

#[test]
fn partition_with_a_witness_never_gives_two_primaries() {
    let _s = env::serial();
    let mut c = started(
        "ha-part-w",
        ClusterOpts {
            witness: true,
            ..Default::default()
        },
    );
    let w = Writer::start(&c);
    wait_records(&c, 0, 50, Duration::from_secs(20));
    c.partition_nodes(true);
    let end = Instant::now() + Duration::from_secs(6);
    let mut both = 0;
    while Instant::now() < end {
        assert!(c.vip_holders().len() <= 1, "the VIP is on both nodes");
        let s: Vec<_> = (0..2).map(|i| c.state_of(i).unwrap_or_default()).collect();
        if s.iter().all(|x| x == "PRIM" || x == "ALONE") {
            both += 1;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(both, 0, "both nodes reported serving states");
    let holders = c.vip_holders();
    assert_eq!(holders.len(), 1, "one node serves during the partition");
    let prim = holders[0];
    eprintln!(
        "{} kept the service during the partition",
        cluster::node_name(prim)
    );
    c.partition_nodes(false);
    c.wait_pair(prim, SETTLE);
    let rep = w.finish();
    assert_no_loss(&c, prim, &rep);
    assert_no_loss(&c, 1 - prim, &rep);
}

#[test]
fn partition_without_a_witness_keeps_the_losers_changes_aside() {
    let _s = env::serial();
    let mut c = started(
        "ha-part",
        ClusterOpts {
            app: false,
            ..Default::default()
        },
    );
    c.partition_nodes(true);
    // Without a witness both sides serve (the documented split brain).
    c.wait_state(0, "ALONE", SETTLE);
    c.wait_state(1, "ALONE", SETTLE);
    let st = c.status(1).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st["split_brain_possible"], true);
    std::fs::write(
        c.data[0].join("only-on-n1.txt"),
        b"written on n1 during the split",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        c.data[1].join("only-on-n2.txt"),
        b"written on n2 during the split",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let g: Vec<u64> = (0..2)
        .map(|i| {
            c.status(i)
                .ok()
                .and_then(|v| v["data_gen"].as_u64())
                .unwrap_or(0)
        })
        .collect();
    c.partition_nodes(false);
    // The newer generation wins; the other steps down, keeps its data
    // aside, and becomes an in-sync secondary.
    let winner = if g[0] > g[1] { 0 } else { 1 };
    let loser = 1 - winner;
    eprintln!(
        "generations {g:?}: {} should win",
        cluster::node_name(winner)
    );
    c.wait_pair(winner, SETTLE);
    let st = c.status(winner).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        st["split_brains_detected"].as_u64().unwrap_or(0) >= 1
            || c.status(loser)
                .ok()
                .and_then(|v| v["split_brains_detected"].as_u64())
                .unwrap_or(0)
                >= 1,
        "the split brain was not reported: {st}"
    );
    assert_eq!(c.vip_holders(), vec![winner]);
    let loser_file = format!("only-on-{}.txt", cluster::node_name(loser));
    let winner_file = format!("only-on-{}.txt", cluster::node_name(winner));
    let parent = c.data[loser]
        .parent()
        .unwrap_or_else(|| panic!("no parent"))
        .to_path_buf();
    let aside: Vec<_> = std::fs::read_dir(&parent)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("data.kept-aside-")
        })
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "one kept-aside copy next to the loser's data"
    );
    let kept = aside[0].path().join(&loser_file);
    assert_eq!(
        std::fs::read(&kept).unwrap_or_else(|e| panic!("{}: {e}", kept.display())),
        format!("written on {} during the split", cluster::node_name(loser)).into_bytes()
    );
    // The loser's directory now holds the winner's data.
    c.wait_status(loser, SETTLE, "in sync", |v| v["in_sync"] == true);
    assert!(
        c.data[loser].join(&winner_file).exists(),
        "the winner's data reached the loser"
    );
    assert!(
        !c.data[loser].join(&loser_file).exists(),
        "the loser's split-brain change is only in the kept-aside copy"
    );
}

#[test]
fn clean_stop_and_swap_move_the_service_without_loss() {
    let _s = env::serial();
    let mut c = started("ha-swap", ClusterOpts::default());
    let w = Writer::start(&c);
    wait_records(&c, 1, 50, Duration::from_secs(20));
    let t0 = Instant::now();
    let o = c.cli(0, &["stop"]);
    assert!(
        o.status.success(),
        "stop: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    c.wait_status(1, SETTLE, "ALONE with the app", |v| {
        v["state"] == "ALONE" && v["app"]["state"] == "up"
    });
    eprintln!("clean stop: n2 serves after {:?}", t0.elapsed());
    c.wait_state(0, "STOP", SETTLE);
    assert_eq!(c.vip_holders(), vec![1]);
    // A stopped node refuses what needs it started.
    let o = c.cli(0, &["swap"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "swap on a stopped node: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("STOP"),
        "the refusal names the state"
    );
    let o = c.cli(0, &["start"]);
    assert!(
        o.status.success(),
        "start: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    c.wait_pair(1, SETTLE);
    let t0 = Instant::now();
    let o = c.cli(1, &["swap"]);
    assert!(
        o.status.success(),
        "swap: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    c.wait_status(0, SETTLE, "PRIM with the app", |v| {
        v["state"] == "PRIM" && v["app"]["state"] == "up"
    });
    eprintln!("swap: n1 serves after {:?}", t0.elapsed());
    c.wait_pair(0, SETTLE);
    assert_eq!(c.vip_holders(), vec![0]);
    // Swap asked on the secondary.
    let o = c.cli(1, &["swap"]);
    assert!(
        o.status.success(),
        "swap from the secondary: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    c.wait_pair(1, SETTLE);
    wait_records(&c, 1, c.records(1).len() + 20, Duration::from_secs(20));
    let rep = w.finish();
    assert_no_loss(&c, 1, &rep);
    assert_no_loss(&c, 0, &rep);
    // A SIGTERM of the primary's daemon hands over too, and the node starts
    // again as a member (not stopped) with the next daemon.
    c.stop_daemon(1, SETTLE);
    c.wait_status(0, SETTLE, "ALONE", |v| v["state"] == "ALONE");
    c.start(1);
    c.wait_pair(0, SETTLE);
}

#[test]
fn application_failures_restart_it_then_fail_over() {
    let _s = env::serial();
    let mut c = started(
        "ha-app",
        ClusterOpts {
            restart_budget: 1,
            ..Default::default()
        },
    );
    let kill_app = |c: &mut Cluster| {
        let st = c.status(0).unwrap_or_else(|e| panic!("{e}"));
        let pid = st["app"]["pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("no app: {st}"));
        // SAFETY: the PID of our cluster's application, from its status.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        pid
    };
    let first = kill_app(&mut c);
    let st = c.wait_status(0, SETTLE, "application restarted", |v| {
        v["app"]["state"] == "up"
            && v["app"]["pid"].as_u64().is_some_and(|p| p != first)
            && v["app"]["restarts"]["total"] == 1
    });
    assert_eq!(
        st["state"], "PRIM",
        "one failure within the budget: restarted in place"
    );
    let _ = kill_app(&mut c);
    // Budget exhausted: the service fails over to the in-sync secondary.
    c.wait_status(1, SETTLE, "PRIM/ALONE with the app", |v| {
        (v["state"] == "PRIM" || v["state"] == "ALONE") && v["app"]["state"] == "up"
    });
    never_two_vips(&c, Duration::from_millis(500));
    assert_eq!(c.vip_holders(), vec![1]);
}

#[test]
fn hosts_without_the_cluster_keys_change_nothing() {
    let _s = env::serial();
    let mut c = started("ha-intruder", ClusterOpts::default());
    let before: Vec<_> = (0..2)
        .map(|i| c.status(i).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    // Another cluster's CA, with the same node names.
    let other = c.tmp.join("intruder");
    std::fs::create_dir_all(other.join("data")).unwrap_or_else(|e| panic!("{e}"));
    c.sweep_mount(&other.join("data"));
    let o = std::process::Command::new(&c.bin)
        .args(["tls", "init"])
        .arg(other.join("tls"))
        .args(["--nodes", "n1,n2"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(o.status.success());
    // An intruder daemon in the client's namespace posing as n1, talking
    // to the real n2 with a primary's heartbeats of its own.
    let cfg = other.join("hapair.toml");
    std::fs::write(
        &cfg,
        format!(
            "[cluster]\nname = \"test\"\ntls_dir = \"tls\"\n[[node]]\nname = \"n1\"\naddress = \"10.77.0.10\"\ndirs = [\"{d}\"]\nstate_dir = \"{s}\"\n[[node]]\nname = \"n2\"\naddress = \"10.77.0.2\"\n[replication]\ndirs = [\"/srv/app/data\"]\n[heartbeat]\ninterval_ms = 100\ntimeout_ms = 1000\n",
            d = other.join("data").display(),
            s = other.join("state").display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", c.cns.name()))
        .arg(&c.bin)
        .arg("daemon")
        .arg("-c")
        .arg(&cfg)
        .args(["--node", "n1"]);
    let mut intruder = hapair_tests::Proc::spawn("intruder", &mut cmd, &c.logs);
    // A mount of that cluster trying to replicate into n2's mirror.
    let mut m = std::process::Command::new("nsenter");
    m.arg(format!("--net=/run/netns/{}", c.cns.name()))
        .arg(&c.bin)
        .args(["mount", "--peer", "10.77.0.2:7700", "--node", "n1", "--tls"])
        .arg(other.join("tls"))
        .arg("--state-dir")
        .arg(other.join("mstate"))
        .arg(other.join("data"));
    let (ms, mp) =
        hapair_tests::proc::run_bounded("intruder-mount", &mut m, &c.logs, Duration::from_secs(30));
    assert!(
        !ms.success(),
        "a mount with another cluster's keys must be refused:\n{}",
        mp.stderr_tail(10)
    );
    // Garbage datagrams on the heartbeat and replication ports.
    let h = c.in_client(|| {
        let s = std::net::UdpSocket::bind("10.77.0.10:0").unwrap_or_else(|e| panic!("{e}"));
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..2000u32 {
            let len = 1 + (i as usize * 37) % 1300;
            let b: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            for port in [7700u16, 7701] {
                for host in ["10.77.0.1", "10.77.0.2"] {
                    let _ = s.send_to(&b, (host, port));
                }
            }
        }
    });
    h.join().unwrap_or_else(|_| panic!("garbage thread"));
    // Let the intruder try for longer than the heartbeat timeout.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        intruder.is_running(),
        "the intruder daemon should still be trying"
    );
    intruder.kill9();
    for (i, before) in before.iter().enumerate() {
        let now = c.status(i).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            now["state"],
            before["state"],
            "{}'s state changed",
            cluster::node_name(i)
        );
        assert_eq!(
            now["data_gen"],
            before["data_gen"],
            "{}'s generation changed",
            cluster::node_name(i)
        );
        assert_eq!(
            now["transitions"].as_array().map(|t| t.len()),
            before["transitions"].as_array().map(|t| t.len()),
            "{} had a transition",
            cluster::node_name(i)
        );
    }
    assert_eq!(c.vip_holders(), vec![0]);
    assert!(!c.data[1].join("records.log").exists() || c.records(1) == c.records(0));
    let log = c.daemon_log(1);
    assert!(
        log.contains("refused connection"),
        "n2 logs the refused connections"
    );
}

/// The README's main command: the demo runs to its end (failover after
/// kill -9, resync, swap back, no acknowledged record lost) and removes
/// what it created.
#[test]
fn the_demo_runs_to_completion_and_cleans_up() {
    let _s = env::serial();
    env::require_root_and_fuse();
    let mut cmd = std::process::Command::new(env::hapair_bin());
    cmd.arg("demo");
    let logs = hapair_tests::TestDir::new("demo");
    let (st, p) =
        hapair_tests::proc::run_bounded("demo", &mut cmd, logs.path(), Duration::from_secs(240));
    let out = p.stdout();
    assert!(
        st.success(),
        "hapair demo failed:\n{}\n{}",
        hapair_tests::proc::tail(&out, 40),
        p.stderr_tail(20)
    );
    assert!(out.contains("demo finished"), "{out}");
    assert!(
        out.contains("all") && out.contains("acknowledged records present"),
        "{out}"
    );
    let ns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !String::from_utf8_lossy(&ns.stdout).contains("hpd-"),
        "the demo left namespaces behind"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    assert!(
        !mounts.contains("/tmp/hapair-demo-"),
        "the demo left mounts behind"
    );
}

/// The secondary dies while the client writes: the primary's held writes
/// go on once it serves alone (ALONE, new generation), nothing the client
/// saw acknowledged is lost, and the returning node is resynced with all
/// of it while the client keeps writing.
#[test]
fn loss_of_the_secondary_is_survived_and_it_is_resynced_on_return() {
    let _s = env::serial();
    let mut c = started("ha-lose2", ClusterOpts::default());
    let w = Writer::start(&c);
    wait_records(&c, 0, 50, Duration::from_secs(20));
    let gen = c.status(0).ok().and_then(|v| v["data_gen"].as_u64());
    let t0 = Instant::now();
    c.kill9(1);
    let st = c.wait_status(0, SETTLE, "ALONE", |v| v["state"] == "ALONE");
    eprintln!("n1 ALONE {:?} after the secondary's kill", t0.elapsed());
    assert_ne!(
        st["data_gen"].as_u64(),
        gen,
        "serving alone starts a new generation"
    );
    let n = c.records(0).len();
    wait_records(&c, 0, n + 50, Duration::from_secs(20));
    assert_eq!(c.vip_holders(), vec![0]);
    c.start(1);
    c.wait_pair(0, SETTLE);
    wait_records(&c, 0, c.records(0).len() + 20, Duration::from_secs(20));
    let rep = w.finish();
    assert_no_loss(&c, 0, &rep);
    // The resynced secondary holds every acknowledged record too.
    c.wait_status(1, SETTLE, "in sync", |v| v["in_sync"] == true);
    std::thread::sleep(Duration::from_millis(300));
    assert_no_loss(&c, 1, &rep);
}

/// A command checker that starts failing on the primary: the application
/// is restarted in place within the budget, then the service fails over to
/// the secondary (where the check passes). The failure is in the status.
#[test]
fn a_failing_checker_restarts_the_application_then_fails_over() {
    let _s = env::serial();
    let flags = hapair_tests::TestDir::new("flags");
    let extra = format!(
        "\n[[check]]\nkind = \"command\"\ncommand = \"test ! -e {}/fail-$HAPAIR_NODE\"\ninterval_ms = 100\nfailures = 2\n",
        flags.path().display()
    );
    let mut c = started(
        "ha-check",
        ClusterOpts {
            restart_budget: 1,
            extra,
            ..Default::default()
        },
    );
    let first = c
        .status(0)
        .ok()
        .and_then(|v| v["app"]["pid"].as_u64())
        .unwrap_or_else(|| panic!("no application pid"));
    std::fs::write(flags.join("fail-n1"), b"").unwrap_or_else(|e| panic!("{e}"));
    let st = c.wait_status(0, SETTLE, "a restart after the failed check", |v| {
        v["app"]["restarts"]["total"] == 1 && v["app"]["pid"].as_u64().is_some_and(|p| p != first)
    });
    assert!(
        st["app"]["check"]["last_failure"]
            .as_str()
            .is_some_and(|f| f.contains("command check")),
        "the failure is shown: {st}"
    );
    // Still failing after the restart: the budget is spent, n2 takes over.
    c.wait_status(1, SETTLE, "serving with the application", |v| {
        (v["state"] == "PRIM" || v["state"] == "ALONE") && v["app"]["state"] == "up"
    });
    never_two_vips(&c, Duration::from_millis(500));
    assert_eq!(c.vip_holders(), vec![1]);
    let s0 = c.wait_status(0, SETTLE, "not serving", |v| v["app"]["state"] == "down");
    eprintln!("n1 after the failover: {} — {}", s0["state"], s0["detail"]);
}

/// Heartbeats go over every configured network: losing one network is not
/// losing the peer. The heartbeat-only network cut changes nothing; the
/// main network cut (replication and VIP) makes the primary serve alone,
/// but the secondary never takes over while it still hears the primary.
#[test]
fn redundant_heartbeat_networks_survive_the_loss_of_one() {
    let _s = env::serial();
    let mut c = started(
        "ha-2nets",
        ClusterOpts {
            second_net: true,
            ..Default::default()
        },
    );
    let transitions = |c: &mut Cluster, i: usize| {
        c.status(i)
            .ok()
            .and_then(|v| v["transitions"].as_array().map(|t| t.len()))
            .unwrap_or(0)
    };
    let before = (transitions(&mut c, 0), transitions(&mut c, 1));
    c.cut_second(0, true);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        (transitions(&mut c, 0), transitions(&mut c, 1)),
        before,
        "a heartbeat network cut changed states"
    );
    assert_eq!(c.state_of(0).as_deref(), Some("PRIM"));
    assert_eq!(c.state_of(1).as_deref(), Some("SECOND"));
    c.cut_second(0, false);
    std::thread::sleep(Duration::from_millis(500));
    // The main network: replication is lost, heartbeats are not.
    c.cut(0, true);
    let end = Instant::now() + Duration::from_secs(4);
    while Instant::now() < end {
        let s1 = c.state_of(1).unwrap_or_default();
        assert!(
            s1 != "PRIM" && s1 != "ALONE",
            "n2 took over while it could still hear n1"
        );
        assert!(c.vip_holders().len() <= 1);
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still primary (PRIM: its secondary is there, being resynced), its
    // secondary out of sync, and writes go on without it.
    let s0 = c.wait_status(0, SETTLE, "serving without an in-sync secondary", |v| {
        v["state"] == "PRIM" && v["in_sync"] == false && v["peer"]["alive"] == true
    });
    eprintln!(
        "n1 with the main network cut: {} — {}",
        s0["state"], s0["detail"]
    );
    assert_eq!(c.vip_holders(), vec![0]);
    c.cut(0, false);
    c.wait_pair(0, SETTLE);
}
