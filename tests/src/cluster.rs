//! `Cluster`: a real two-node hapair cluster on this machine, for the
//! supervisor's end-to-end tests. Five network namespaces: a switch (a
//! bridge), the two nodes, a witness host and a client, each node linked to
//! the switch by a veth pair. The daemons run with only their network
//! namespace changed (`nsenter --net`), so their FUSE mounts are visible to
//! the test. The application is `hapair demo-app` (records over TCP on the
//! VIP, each fdatasynced before it is acknowledged).
//!
//! Cleanup, also when a test fails: the daemons are killed (their fencing
//! guards then kill the applications and remove the VIP), dead mounts are
//! detached, and the namespaces deleted.

use crate::netns::{ip_ok, Netns};
use crate::proc::Proc;
use crate::tmp::TestDir;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const VIP: &str = "10.77.0.100";
pub const APP_PORT: u16 = 8080;
const NODES: [&str; 2] = ["n1", "n2"];

#[derive(Clone, Debug)]
pub struct ClusterOpts {
    pub witness: bool,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Configure the demo application (and a tcp checker on it).
    pub app: bool,
    pub restart_budget: u32,
    pub preferred: Option<String>,
    /// Appended to the configuration.
    pub extra: String,
    /// A second network (its own switch, 10.78.0.0/24) between the two
    /// nodes, used for heartbeats only.
    pub second_net: bool,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            witness: false,
            interval_ms: 100,
            timeout_ms: 1000,
            app: true,
            restart_budget: 3,
            preferred: None,
            extra: String::new(),
            second_net: false,
        }
    }
}

/// Detaches dead or live FUSE mounts left on the nodes' data directories.
struct MountSweeper {
    dirs: std::sync::Mutex<Vec<PathBuf>>,
}

impl Drop for MountSweeper {
    fn drop(&mut self) {
        for d in self.dirs.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
            let target = d.display().to_string();
            if mounts
                .lines()
                .any(|l| l.split(' ').nth(1) == Some(target.as_str()))
            {
                let _ = nix::mount::umount2(d.as_path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// Fields drop in order: processes first, then mounts, then namespaces,
/// then the directory.
pub struct Cluster {
    pub daemons: [Option<Proc>; 2],
    pub witness: Option<Proc>,
    seen_apps: Vec<u32>,
    _sweeper: MountSweeper,
    pub nodes: [Netns; 2],
    pub wns: Netns,
    pub cns: Netns,
    pub sw: Netns,
    /// The switch of the second network, if configured.
    pub sw2: Option<Netns>,
    pub opts: ClusterOpts,
    pub cfg: PathBuf,
    pub data: [PathBuf; 2],
    pub state: [PathBuf; 2],
    pub logs: PathBuf,
    pub bin: PathBuf,
    pub tmp: TestDir,
    restarts: [u32; 2],
}

impl Cluster {
    pub fn new(name: &str, opts: ClusterOpts) -> Cluster {
        crate::env::require_root_and_fuse();
        let tmp = TestDir::new(name);
        let logs = tmp.mkdir("logs");
        let bin = crate::env::hapair_bin();
        let sw = Netns::new("hcs");
        sw.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        sw.exec_ok(&["ip", "link", "set", "br0", "up"]);
        let mk = |role: &str, addr: &str| -> Netns {
            let ns = Netns::new(&format!("hc{role}"));
            let tag = crate::env::unique_tag();
            let (a, b) = (format!("hca{tag}"), format!("hcb{tag}"));
            ip_ok(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
            ip_ok(&["link", "set", &a, "netns", ns.name()]);
            ip_ok(&["link", "set", &b, "netns", sw.name()]);
            ns.exec_ok(&["ip", "link", "set", &a, "name", "eth0"]);
            sw.exec_ok(&["ip", "link", "set", &b, "name", &format!("p-{role}")]);
            sw.exec_ok(&[
                "ip",
                "link",
                "set",
                &format!("p-{role}"),
                "master",
                "br0",
                "up",
            ]);
            ns.exec_ok(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
            // Same-subnet secondaries must survive the VIP's removal.
            ns.exec_ok(&["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"]);
            ns
        };
        let n1 = mk("n1", "10.77.0.1");
        let n2 = mk("n2", "10.77.0.2");
        let wns = mk("w", "10.77.0.3");
        let cns = mk("c", "10.77.0.10");
        let sw2 = opts.second_net.then(|| {
            let sw2 = Netns::new("hct");
            sw2.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
            sw2.exec_ok(&["ip", "link", "set", "br0", "up"]);
            for (ns, role, addr) in [(&n1, "n1", "10.78.0.1"), (&n2, "n2", "10.78.0.2")] {
                let tag = crate::env::unique_tag();
                let (a, b) = (format!("hcx{tag}"), format!("hcy{tag}"));
                ip_ok(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
                ip_ok(&["link", "set", &a, "netns", ns.name()]);
                ip_ok(&["link", "set", &b, "netns", sw2.name()]);
                ns.exec_ok(&["ip", "link", "set", &a, "name", "eth1"]);
                let port = format!("p-{role}");
                sw2.exec_ok(&["ip", "link", "set", &b, "name", &port]);
                sw2.exec_ok(&["ip", "link", "set", &port, "master", "br0", "up"]);
                ns.exec_ok(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth1"]);
                ns.exec_ok(&["ip", "link", "set", "eth1", "up"]);
            }
            sw2
        });
        let tls = tmp.join("tls");
        let o = Command::new(&bin)
            .args(["tls", "init"])
            .arg(&tls)
            .args(["--nodes", "n1,n2,witness"])
            .output()
            .unwrap_or_else(|e| panic!("hapair tls init: {e}"));
        assert!(
            o.status.success(),
            "tls init: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let data = [tmp.mkdir("n1/data"), tmp.mkdir("n2/data")];
        let state = [tmp.join("n1/state"), tmp.join("n2/state")];
        let cfg = tmp.join("hapair.toml");
        let c = Cluster {
            daemons: [None, None],
            witness: None,
            seen_apps: Vec::new(),
            _sweeper: MountSweeper {
                dirs: std::sync::Mutex::new(data.to_vec()),
            },
            nodes: [n1, n2],
            wns,
            cns,
            sw,
            sw2,
            opts,
            cfg,
            data,
            state,
            logs,
            bin,
            tmp,
            restarts: [0, 0],
        };
        c.write_config();
        c
    }

    pub fn write_config(&self) {
        let o = &self.opts;
        let mut t = format!(
            r#"[cluster]
name = "test"
tls_dir = "tls"

[[node]]
name = "n1"
address = "10.77.0.1"
{h1}dirs = ["{d1}"]
state_dir = "{s1}"

[[node]]
name = "n2"
address = "10.77.0.2"
{h2}dirs = ["{d2}"]
state_dir = "{s2}"

[replication]
dirs = ["/srv/app/data"]
timeout_ms = 2000

[heartbeat]
interval_ms = {iv}
timeout_ms = {to}

[vip]
address = "{VIP}/24"
interface = "eth0"

[failover]
restart_budget = {rb}
restart_window_ms = 600000
"#,
            d1 = self.data[0].display(),
            d2 = self.data[1].display(),
            s1 = self.state[0].display(),
            s2 = self.state[1].display(),
            iv = o.interval_ms,
            to = o.timeout_ms,
            rb = o.restart_budget,
            h1 = if o.second_net {
                "heartbeat = [\"10.77.0.1\", \"10.78.0.1\"]\n"
            } else {
                ""
            },
            h2 = if o.second_net {
                "heartbeat = [\"10.77.0.2\", \"10.78.0.2\"]\n"
            } else {
                ""
            },
        );
        if let Some(p) = &o.preferred {
            t += &format!("preferred = \"{p}\"\n");
        }
        if o.app {
            t += &format!(
                r#"
[app]
start = "exec {bin} demo-app --dir \"$HAPAIR_DIRS\" --listen {VIP}:{APP_PORT}"
stop_timeout_ms = 2000

[[check]]
kind = "tcp"
address = "{VIP}:{APP_PORT}"
interval_ms = 200
timeout_ms = 500
failures = 2
"#,
                bin = self.bin.display()
            );
        }
        if o.witness {
            t += "\n[witness]\naddress = \"10.77.0.3:7702\"\n";
        }
        t += &o.extra;
        std::fs::write(&self.cfg, t).unwrap_or_else(|e| panic!("writing the config: {e}"));
    }

    fn nsenter(&self, ns: &Netns) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", ns.name()))
            .arg(&self.bin);
        c
    }

    /// Starts node `i`'s daemon (0 = n1, 1 = n2).
    pub fn start(&mut self, i: usize) {
        assert!(
            self.daemons[i].as_mut().is_none_or(|p| !p.is_running()),
            "{} already running",
            NODES[i]
        );
        let mut c = self.nsenter(&self.nodes[i]);
        c.arg("daemon")
            .arg("-c")
            .arg(&self.cfg)
            .args(["--node", NODES[i]]);
        self.restarts[i] += 1;
        let name = format!("daemon-{}-{}", NODES[i], self.restarts[i]);
        self.daemons[i] = Some(Proc::spawn(&name, &mut c, &self.logs));
    }

    pub fn start_witness(&mut self) {
        let mut c = self.nsenter(&self.wns);
        c.arg("witness")
            .arg("-c")
            .arg(&self.cfg)
            .arg("--state-dir")
            .arg(self.tmp.join("witness"));
        self.witness = Some(Proc::spawn("witness", &mut c, &self.logs));
    }

    pub fn daemon(&mut self, i: usize) -> &mut Proc {
        self.daemons[i]
            .as_mut()
            .unwrap_or_else(|| panic!("{} was never started", NODES[i]))
    }

    /// SIGKILL to the daemon's process only (its fencing guard and the
    /// application are separate processes, as on a real node).
    pub fn kill9(&mut self, i: usize) {
        let p = self.daemon(i);
        p.signal(libc::SIGKILL);
        p.wait_timeout(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("daemon survived SIGKILL"));
    }

    /// SIGTERM, then waits for the daemon to exit.
    pub fn stop_daemon(&mut self, i: usize, within: Duration) {
        let p = self.daemon(i);
        p.signal(libc::SIGTERM);
        if p.wait_timeout(within).is_none() {
            panic!(
                "{} did not exit within {within:?} of SIGTERM:\n{}",
                NODES[i],
                p.stderr_tail(30)
            );
        }
    }

    /// Runs `hapair ARGS -c CFG --node NODE` in node `i`'s namespace.
    pub fn cli(&self, i: usize, args: &[&str]) -> Output {
        let mut c = self.nsenter(&self.nodes[i]);
        c.args(args)
            .arg("-c")
            .arg(&self.cfg)
            .args(["--node", NODES[i]]);
        c.stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("hapair {args:?}: {e}"))
    }

    /// `hapair status --json` of node `i`, or why it failed.
    pub fn status(&mut self, i: usize) -> Result<Value, String> {
        let o = self.cli(i, &["status", "--json"]);
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
        }
        let v: Value =
            serde_json::from_slice(&o.stdout).map_err(|e| format!("status is not JSON: {e}"))?;
        if let Some(pid) = v["app"]["pid"].as_u64() {
            if !self.seen_apps.contains(&(pid as u32)) {
                self.seen_apps.push(pid as u32);
            }
        }
        Ok(v)
    }

    pub fn state_of(&mut self, i: usize) -> Option<String> {
        self.status(i)
            .ok()
            .and_then(|v| v["state"].as_str().map(str::to_string))
    }

    /// Waits until `pred` holds on node `i`'s status.
    pub fn wait_status(
        &mut self,
        i: usize,
        within: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let end = Instant::now() + within;
        let mut last = Err("never asked".to_string());
        while Instant::now() < end {
            last = self.status(i);
            if let Ok(v) = &last {
                if pred(v) {
                    return v.clone();
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{}: {what} not reached within {within:?}; last status: {last:?}",
            NODES[i]
        );
    }

    pub fn wait_state(&mut self, i: usize, state: &str, within: Duration) -> Value {
        self.wait_status(i, within, &format!("state {state}"), |v| {
            v["state"] == state
        })
    }

    /// The pair settled: `prim` PRIM with its application up, the other
    /// SECOND in sync.
    pub fn wait_pair(&mut self, prim: usize, within: Duration) {
        self.wait_status(1 - prim, within, "SECOND in sync", |v| {
            v["state"] == "SECOND" && v["in_sync"] == true
        });
        // And the primary has heard that from the secondary.
        self.wait_status(
            prim,
            within,
            "PRIM with the application up and the secondary in sync",
            |v| {
                v["state"] == "PRIM"
                    && v["in_sync"] == true
                    && v["peer"]["state"] == "SECOND"
                    && v["peer"]["in_sync"] == true
                    && (v["app"]["state"] == "up" || v["app"]["configured"] == false)
            },
        );
    }

    /// True if the VIP is configured on node `i`'s interface.
    pub fn vip_on(&self, i: usize) -> bool {
        let o = self.nodes[i].exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        String::from_utf8_lossy(&o.stdout).contains(&format!(" {VIP}/"))
    }

    /// Which nodes hold the VIP.
    pub fn vip_holders(&self) -> Vec<usize> {
        (0..2).filter(|&i| self.vip_on(i)).collect()
    }

    /// Takes node `i`'s link to the switch down (or up again): a cable cut.
    pub fn cut(&self, i: usize, cut: bool) {
        self.sw.exec_ok(&[
            "ip",
            "link",
            "set",
            &format!("p-{}", NODES[i]),
            if cut { "down" } else { "up" },
        ]);
    }

    /// Cuts (or restores) node `i`'s link to the second network.
    pub fn cut_second(&self, i: usize, cut: bool) {
        let sw2 = self
            .sw2
            .as_ref()
            .unwrap_or_else(|| panic!("no second network"));
        sw2.exec_ok(&[
            "ip",
            "link",
            "set",
            &format!("p-{}", NODES[i]),
            if cut { "down" } else { "up" },
        ]);
    }

    /// Partitions the two nodes from each other while both still reach
    /// the witness and the client (bridge port isolation).
    pub fn partition_nodes(&self, on: bool) {
        for n in NODES {
            self.sw.exec_ok(&[
                "bridge",
                "link",
                "set",
                "dev",
                &format!("p-{n}"),
                "isolated",
                if on { "on" } else { "off" },
            ]);
        }
    }

    /// The records of the demo application in node `i`'s data directory
    /// (its backing directory: valid whether or not it is mounted).
    pub fn records(&self, i: usize) -> Vec<u64> {
        let p = self.data[i].join("records.log");
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        text.lines().filter_map(parse_record).collect()
    }

    /// Runs `f` on a thread inside the client's network namespace.
    pub fn in_client<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        in_netns(self.cns.name(), f)
    }

    /// PIDs of demo applications seen in status answers and still alive.
    pub fn live_apps(&self) -> Vec<u32> {
        self.seen_apps
            .iter()
            .copied()
            .filter(|&p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                    c.contains("demo-app") && c.contains(&*self.bin.to_string_lossy())
                })
            })
            .collect()
    }

    /// Also detach a mount left on `dir` at the end (a test's own daemons).
    pub fn sweep_mount(&self, dir: &Path) {
        self._sweeper
            .dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dir.to_path_buf());
    }

    pub fn daemon_log(&self, i: usize) -> String {
        let mut s = String::new();
        for r in 1..=self.restarts[i] {
            s +=
                &std::fs::read_to_string(self.logs.join(format!("daemon-{}-{r}.stderr", NODES[i])))
                    .unwrap_or_default();
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for (i, d) in self.daemons.iter_mut().enumerate() {
            if let Some(p) = d {
                if p.is_running() {
                    // A graceful stop first (it stops the application and
                    // unmounts), bounded; the Proc guard kills what is left.
                    p.signal(libc::SIGTERM);
                    let _ = p.wait_timeout(Duration::from_secs(if panicking { 3 } else { 15 }));
                }
                if panicking {
                    eprintln!(
                        "---- {} daemon log tail:\n{}",
                        NODES[i],
                        crate::proc::tail(&p.stderr(), 40)
                    );
                }
            }
        }
        for d in self.daemons.iter_mut() {
            drop(d.take());
        }
        drop(self.witness.take());
        // The guards fence when their daemon is gone: the applications die
        // with them. Anything of ours still alive after that is killed.
        let end = Instant::now() + Duration::from_secs(5);
        while !self.live_apps().is_empty() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        for p in self.live_apps() {
            // SAFETY: a PID we saw as our cluster's application, checked
            // above by its command line.
            unsafe {
                libc::kill(p as i32, libc::SIGKILL);
            }
        }
    }
}

/// Runs `f` on a new thread whose network namespace is `ns` (a thread's
/// namespace can be changed without touching the rest of the process).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace fd; affects this thread only.
        let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Parses one line of the demo application's log (`n text crc`).
pub fn parse_record(line: &str) -> Option<u64> {
    let (body, crc) = line.rsplit_once(' ')?;
    if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(body.as_bytes()) {
        return None;
    }
    body.split_once(' ')?.0.parse().ok()
}

/// What a writing client saw.
#[derive(Debug, Default, Clone)]
pub struct ClientReport {
    /// Records acknowledged by the application (durable by its contract).
    pub acked: Vec<u64>,
    /// The longest time without an acknowledgement while writing.
    pub longest_gap: Duration,
    pub reconnects: u64,
}

/// Writes records `1..=count` to the application on the VIP, one at a time,
/// reconnecting (and resending the same record) after any error, until
/// all are acknowledged or `deadline` passes. Records past `stop_after`
/// acknowledgements are not sent when that flag becomes true.
pub fn write_records(
    count: u64,
    deadline: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> ClientReport {
    let addr: SocketAddr = format!("{VIP}:{APP_PORT}")
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    let mut rep = ClientReport::default();
    let mut last_ack = Instant::now();
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut n = 1;
    while n <= count
        && start.elapsed() < deadline
        && !stop.load(std::sync::atomic::Ordering::SeqCst)
    {
        if conn.is_none() {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_millis(3000)));
                    let r = BufReader::new(s.try_clone().unwrap_or_else(|e| panic!("{e}")));
                    conn = Some((s, r));
                    rep.reconnects += 1;
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
        }
        let Some((s, r)) = conn.as_mut() else {
            continue;
        };
        let mut line = String::new();
        let ok = s
            .write_all(format!("PUT {n} payload-of-record-{n}\n").as_bytes())
            .is_ok()
            && r.read_line(&mut line).is_ok_and(|k| k > 0)
            && line.trim_end() == format!("OK {n}");
        if ok {
            rep.acked.push(n);
            rep.longest_gap = rep.longest_gap.max(last_ack.elapsed());
            last_ack = Instant::now();
            n += 1;
        } else {
            conn = None;
        }
    }
    rep
}

/// Checks that every acknowledged record is in `present` (a node's log).
pub fn missing(acked: &[u64], present: &[u64]) -> Vec<u64> {
    let have: std::collections::HashSet<u64> = present.iter().copied().collect();
    acked
        .iter()
        .copied()
        .filter(|n| !have.contains(n))
        .collect()
}

pub fn node_name(i: usize) -> &'static str {
    NODES[i]
}

pub fn data_path(c: &Cluster, i: usize) -> &Path {
    &c.data[i]
}
