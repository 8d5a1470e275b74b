//! `Harness`: one test's world — a temp dir with DIR (the replicated
//! directory), MIRROR, the mount's state dir, TLS material and logs — and
//! the real `hapair mirror` / `hapair mount` processes, all torn down in a
//! safe order on drop: mount process, FUSE mount, mirror, veth, netns,
//! files.

use crate::env;
use crate::fuse::FuseMount;
use crate::netns::{Netns, Veth};
use crate::proc::{describe, Proc};
use crate::tmp::TestDir;
use crate::treediff::{tree_diff_with, DiffOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

/// Options of `hapair mount`.
#[derive(Clone, Debug)]
pub struct MountOpts {
    pub mode: Option<String>,
    pub timeout_ms: Option<u64>,
    /// Serve this directory's content at DIR (`--backing`).
    pub backing: Option<PathBuf>,
    /// TLS directory to use instead of the harness's own.
    pub tls: Option<PathBuf>,
    pub extra: Vec<String>,
    /// How long to wait for the mount to appear (it full-syncs first).
    pub ready_timeout: Duration,
}

impl Default for MountOpts {
    fn default() -> Self {
        MountOpts {
            mode: None,
            timeout_ms: None,
            backing: None,
            tls: None,
            extra: Vec::new(),
            ready_timeout: Duration::from_secs(60),
        }
    }
}

impl MountOpts {
    pub fn mode(m: &str) -> MountOpts {
        MountOpts {
            mode: Some(m.to_string()),
            ..Default::default()
        }
    }
}

pub struct Harness {
    // Drop order matters and is written out in `Drop`; fields are Options
    // so that `Drop` can take them one by one.
    pub mount: Option<Proc>,
    pub fuse: Option<FuseMount>,
    pub mirror: Option<Proc>,
    pub veth: Option<Veth>,
    pub netns: Option<Netns>,
    /// The replicated directory (the mount point).
    pub dir: PathBuf,
    pub mirror_dir: PathBuf,
    pub state_dir: PathBuf,
    pub tls: PathBuf,
    pub logs: PathBuf,
    pub peer: Option<SocketAddr>,
    pub bin: PathBuf,
    pub name: String,
    mounts_started: u32,
    pub tmp: Option<TestDir>,
}

impl Harness {
    /// Checks root and /dev/fuse, finds the binary, creates the dirs and
    /// the TLS material for nodes n1 (mount) and n2 (mirror).
    pub fn new(name: &str) -> Harness {
        env::require_root_and_fuse();
        let bin = env::hapair_bin();
        let tmp = TestDir::new(name);
        let h = Harness {
            mount: None,
            fuse: None,
            mirror: None,
            veth: None,
            netns: None,
            dir: tmp.mkdir("dir"),
            mirror_dir: tmp.mkdir("mirror"),
            state_dir: tmp.join("state"),
            tls: tmp.join("tls"),
            logs: tmp.mkdir("logs"),
            peer: None,
            bin,
            name: name.to_string(),
            mounts_started: 0,
            tmp: Some(tmp),
        };
        h.tls_init(&h.tls, &["n1", "n2"]);
        h
    }

    pub fn tmp(&self) -> &TestDir {
        self.tmp
            .as_ref()
            .unwrap_or_else(|| panic!("harness temp dir already dropped"))
    }

    /// A `Command` for the hapair binary.
    pub fn hapair(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env(
            "HAPAIR_LOG",
            std::env::var("HAPAIR_LOG").unwrap_or_else(|_| "info".into()),
        );
        c
    }

    /// Runs `hapair tls init DIR --nodes ...`, asserting success.
    pub fn tls_init(&self, dir: &Path, nodes: &[&str]) {
        let o = self
            .hapair()
            .args(["tls", "init"])
            .arg(dir)
            .arg("--nodes")
            .arg(nodes.join(","))
            .output()
            .unwrap_or_else(|e| panic!("running hapair tls init: {e}"));
        assert!(
            o.status.success(),
            "hapair tls init {} failed ({}): {}",
            dir.display(),
            describe(&o.status),
            String::from_utf8_lossy(&o.stderr)
        );
        for f in ["ca.pem"].iter().map(|s| s.to_string()).chain(
            nodes
                .iter()
                .flat_map(|n| [format!("{n}.pem"), format!("{n}.key")]),
        ) {
            assert!(
                dir.join(&f).is_file(),
                "hapair tls init did not write {}",
                dir.join(&f).display()
            );
        }
    }

    /// Starts `hapair mirror` on 127.0.0.1 (a free port) into MIRROR.
    pub fn start_mirror(&mut self) {
        let port = env::free_udp_port("127.0.0.1");
        let addr: SocketAddr = format!("127.0.0.1:{port}")
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut c = self.hapair();
        let tls = self.tls.clone();
        c.arg("mirror")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--tls")
            .arg(&tls)
            .args(["--node", "n2"])
            .arg(&self.mirror_dir);
        self.spawn_mirror(c, addr);
    }

    /// Creates a netns with a veth pair to the host and starts the mirror
    /// inside it, listening on the namespace's address.
    pub fn start_mirror_in_netns(&mut self) {
        let ns = Netns::new("hpt");
        let subnet = (std::process::id() as u16)
            .wrapping_mul(7)
            .wrapping_add(self.mounts_started as u16)
            % 16384;
        let veth = Veth::new(&ns, subnet);
        let addr: SocketAddr = format!("{}:7700", veth.ns_ip)
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut c = ns.command(&self.bin);
        c.env(
            "HAPAIR_LOG",
            std::env::var("HAPAIR_LOG").unwrap_or_else(|_| "info".into()),
        );
        c.arg("mirror")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--tls")
            .arg(&self.tls)
            .args(["--node", "n2"])
            .arg(&self.mirror_dir);
        self.netns = Some(ns);
        self.veth = Some(veth);
        self.spawn_mirror(c, addr);
    }

    fn spawn_mirror(&mut self, mut c: Command, addr: SocketAddr) {
        let mut p = Proc::spawn("mirror", &mut c, &self.logs);
        wait_udp_bound(&mut p, addr.port(), Duration::from_secs(20));
        self.mirror = Some(p);
        self.peer = Some(addr);
    }

    /// The mirror's guard (panics if not started).
    pub fn mirror(&mut self) -> &mut Proc {
        self.mirror
            .as_mut()
            .unwrap_or_else(|| panic!("mirror not started"))
    }

    /// The command line of `hapair mount` for `opts`.
    pub fn mount_command(&self, opts: &MountOpts) -> Command {
        let peer = self
            .peer
            .unwrap_or_else(|| panic!("start the mirror before the mount"));
        let mut c = self.hapair();
        c.arg("mount").arg("--peer").arg(peer.to_string());
        c.arg("--tls")
            .arg(opts.tls.as_ref().unwrap_or(&self.tls))
            .args(["--node", "n1"]);
        c.arg("--state-dir").arg(&self.state_dir);
        if let Some(m) = &opts.mode {
            c.arg("--mode").arg(m);
        }
        if let Some(t) = opts.timeout_ms {
            c.arg("--timeout-ms").arg(t.to_string());
        }
        if let Some(b) = &opts.backing {
            c.arg("--backing").arg(b);
        }
        c.args(&opts.extra);
        c.arg(&self.dir);
        c
    }

    /// Starts `hapair mount` without waiting for it.
    pub fn spawn_mount(&mut self, opts: &MountOpts) -> &mut Proc {
        assert!(self.mount.is_none(), "a mount process is already running");
        let mut c = self.mount_command(opts);
        self.mounts_started += 1;
        let p = Proc::spawn(&format!("mount{}", self.mounts_started), &mut c, &self.logs);
        self.fuse = Some(FuseMount::new(&self.dir));
        self.mount.insert(p)
    }

    /// Starts `hapair mount` and waits until DIR is a `fuse.hapair` mount.
    pub fn mount(&mut self, opts: &MountOpts) {
        self.spawn_mount(opts);
        self.wait_mounted(opts);
    }

    /// Waits until the kernel holds the FUSE mount that `spawn_mount`
    /// started (as its status does once it says `serving`).
    pub fn wait_mounted(&mut self, opts: &MountOpts) {
        let (fuse, mount) = (self.fuse.as_ref(), self.mount.as_mut());
        let (Some(fuse), Some(mount)) = (fuse, mount) else {
            panic!("wait_mounted without a mount started by spawn_mount")
        };
        if let Err(e) = fuse.wait_mounted("fuse.hapair", opts.ready_timeout, mount) {
            panic!("hapair mount did not come up: {e}");
        }
    }

    /// SIGTERM to the mount: it must flush, unmount and exit 0 within
    /// `timeout`. Returns its status.
    pub fn stop_mount(&mut self, timeout: Duration) -> ExitStatus {
        let mut p = self
            .mount
            .take()
            .unwrap_or_else(|| panic!("no mount running"));
        p.signal(libc::SIGTERM);
        let s = match p.wait_timeout(timeout) {
            Some(s) => s,
            None => panic!(
                "hapair mount did not exit within {timeout:?} of SIGTERM; stderr tail:\n{}",
                p.stderr_tail(40)
            ),
        };
        assert!(
            s.code() == Some(0),
            "hapair mount exited with {} after SIGTERM (want exit 0); stderr tail:\n{}",
            describe(&s),
            p.stderr_tail(40)
        );
        if let Some(f) = &self.fuse {
            assert!(
                f.wait_unmounted(Duration::from_secs(5)),
                "hapair mount exited 0 but {} is still mounted",
                self.dir.display()
            );
        }
        self.fuse = None;
        s
    }

    /// kill -9 of the mount process, then unmount what it left.
    pub fn kill_mount(&mut self) -> ExitStatus {
        let mut p = self
            .mount
            .take()
            .unwrap_or_else(|| panic!("no mount running"));
        let s = p.kill9();
        if let Some(f) = self.fuse.take() {
            assert!(
                f.unmount(),
                "could not unmount {} after killing the mount",
                self.dir.display()
            );
        }
        s
    }

    /// The mount's status.json.
    pub fn status(&self) -> Result<serde_json::Value, String> {
        let p = self.state_dir.join("status.json");
        let t = std::fs::read_to_string(&p).map_err(|e| format!("reading {}: {e}", p.display()))?;
        serde_json::from_str(&t).map_err(|e| format!("parsing {}: {e}: {t:?}", p.display()))
    }

    /// Polls status.json until `pred` holds, up to `timeout`.
    pub fn wait_status(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, String> {
        let end = Instant::now() + timeout;
        let mut last = Err("status.json never read".to_string());
        while Instant::now() < end {
            last = self.status();
            if let Ok(v) = &last {
                if pred(v) {
                    return Ok(v.clone());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "status condition not met within {timeout:?}; last: {last:?}"
        ))
    }

    /// Asserts that `src` (default DIR) and MIRROR are identical.
    pub fn assert_trees_equal(&self, src: Option<&Path>, opts: &DiffOptions) {
        let src = src.unwrap_or(&self.dir);
        let r = tree_diff_with(src, &self.mirror_dir, opts);
        for i in &r.info {
            eprintln!("tree_diff info: {i}");
        }
        assert!(
            r.diffs.is_empty(),
            "{} and the mirror {} differ ({} entries compared):\n{}",
            src.display(),
            self.mirror_dir.display(),
            r.entries,
            r.diffs.join("\n")
        );
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Order: stop the FUSE daemon, unmount, stop the mirror, then the
        // network, then the files.
        drop(self.mount.take());
        drop(self.fuse.take());
        drop(self.mirror.take());
        drop(self.veth.take());
        drop(self.netns.take());
        drop(self.tmp.take());
    }
}

/// Waits until process `p` has a UDP socket bound to `port` (read from
/// /proc/<pid>/net/udp{,6}, which show the process's own network namespace).
pub fn wait_udp_bound(p: &mut Proc, port: u16, timeout: Duration) {
    let end = Instant::now() + timeout;
    let want = format!(":{port:04X}");
    loop {
        if let Some(s) = p.try_wait() {
            panic!(
                "{} exited ({}) before listening on UDP port {port}; stderr tail:\n{}",
                p.name(),
                describe(&s),
                p.stderr_tail(30)
            );
        }
        for f in ["udp", "udp6"] {
            let t =
                std::fs::read_to_string(format!("/proc/{}/net/{f}", p.pid())).unwrap_or_default();
            // Columns: sl local_address rem_address ...
            if t.lines().skip(1).any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|a| a.ends_with(&want))
            }) {
                return;
            }
        }
        if Instant::now() >= end {
            panic!(
                "{} not listening on UDP port {port} after {timeout:?}; stderr tail:\n{}",
                p.name(),
                p.stderr_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
