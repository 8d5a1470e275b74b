//! Real tests of the VIP adapter against the kernel, as root. Every test
//! works in network namespaces of its own (removed by a Drop guard even when
//! the test fails), so the host's interfaces are never touched. The library
//! acts in the namespace of the calling thread, so each body runs in a
//! thread that has entered the test namespace with setns(2). Tests set up
//! interfaces with `ip`; the library itself never shells out.

use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hapair_vip::{
    acquire, announce, announce_with_interval, is_present, query, release, renew, Vip, VipError,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

const MAC_A: &str = "02:aa:00:00:00:01";
const MAC_A_BYTES: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
const STALE_MAC: &str = "02:00:00:00:00:99";

fn run_cmd(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace that exists for the guard's lifetime.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "these tests need root (ip netns, CAP_NET_ADMIN)"
        );
        let name = format!(
            "hapair-vip-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run_cmd(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> args…`, asserting success.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        run_cmd(&all)
    }

    /// Runs `f` in a thread that has entered this namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                let file =
                    std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: a valid namespace fd; this only changes the
                // calling thread, which exists just for `f`.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            });
            match h.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let st = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(st, Ok(s) if s.success()) {
            eprintln!("warning: could not delete netns {}: {st:?}", self.name);
        }
    }
}

/// One namespace with a veth pair v0 (MAC_A) / v1, both up.
fn single_ns() -> Netns {
    let ns = Netns::new();
    ns.ip(&[
        "link", "add", "v0", "address", MAC_A, "type", "veth", "peer", "name", "v1",
    ]);
    ns.ip(&["link", "set", "v0", "up"]);
    ns.ip(&["link", "set", "v1", "up"]);
    ns
}

/// Two namespaces joined by a veth: `a` holds v0 (MAC_A), `b` holds v1 with
/// 10.77.0.2/24 and fd77::2/64.
fn pair() -> (Netns, Netns) {
    let a = Netns::new();
    let b = Netns::new();
    a.ip(&[
        "link", "add", "v0", "address", MAC_A, "type", "veth", "peer", "name", "v1", "netns",
        &b.name,
    ]);
    a.ip(&["link", "set", "v0", "up"]);
    b.ip(&["link", "set", "v1", "up"]);
    b.ip(&["addr", "add", "10.77.0.2/24", "dev", "v1"]);
    b.ip(&["addr", "add", "fd77::2/64", "dev", "v1", "nodad"]);
    (a, b)
}

/// The `ip -o addr show dev` line for `addr`, if any.
fn ip_addr_line(ns: &Netns, dev: &str, addr: &str) -> Option<String> {
    let needle = format!(" {addr}/");
    ns.ip(&["-o", "addr", "show", "dev", dev])
        .lines()
        .find(|l| l.contains(&needle))
        .map(str::to_string)
}

/// Polls `cond` every 100 ms until it holds or `limit` passes.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn check_acquire_release(cidr: &str, addr: &str) {
    let ns = single_ns();
    let vip = Vip::parse(cidr, "v0").unwrap();
    ns.run(|| {
        assert!(!is_present(&vip).unwrap());
        acquire(&vip, 30).unwrap();
        assert!(is_present(&vip).unwrap());
        let st = query(&vip).unwrap().expect("present");
        assert_eq!(st.prefix_len, vip.prefix_len);
        let valid = st.valid_lft_secs.expect("a lease, not forever");
        assert!((1..=30).contains(&valid), "valid_lft {valid}");
        assert!(st.preferred_lft_secs.is_some());
        assert!(!st.tentative && !st.dad_failed, "{st:?}");
        // Idempotent.
        acquire(&vip, 30).unwrap();
        renew(&vip, 30).unwrap();
    });
    let line = ip_addr_line(&ns, "v0", addr).expect("ip lists the VIP");
    assert!(
        line.contains("valid_lft") && !line.contains("valid_lft forever"),
        "{line}"
    );
    assert!(line.contains("sec"), "{line}");
    // Exactly one copy of the address.
    let all = ns.ip(&["-o", "addr", "show", "dev", "v0"]);
    assert_eq!(all.matches(&format!(" {addr}/")).count(), 1, "{all}");

    ns.run(|| {
        release(&vip).unwrap();
        assert!(!is_present(&vip).unwrap());
        // Releasing an absent address is fine.
        release(&vip).unwrap();
    });
    assert_eq!(ip_addr_line(&ns, "v0", addr), None);
}

#[test]
fn acquire_and_release_v4() {
    check_acquire_release("10.77.0.100/24", "10.77.0.100");
}

#[test]
fn acquire_and_release_v6() {
    check_acquire_release("fd77::100/64", "fd77::100");
}

#[test]
fn acquire_replaces_the_lifetime_of_an_existing_address() {
    let ns = single_ns();
    let vip = Vip::parse("10.77.0.100/24", "v0").unwrap();
    ns.run(|| {
        acquire(&vip, 1000).unwrap();
        assert!(query(&vip).unwrap().unwrap().valid_lft_secs.unwrap() > 900);
        acquire(&vip, 5).unwrap();
        assert!(query(&vip).unwrap().unwrap().valid_lft_secs.unwrap() <= 5);
    });
    // A permanent address added by hand becomes a lease too.
    ns.ip(&["addr", "add", "10.77.0.101/24", "dev", "v0"]);
    let manual = Vip::parse("10.77.0.101/24", "v0").unwrap();
    ns.run(|| {
        assert_eq!(query(&manual).unwrap().unwrap().valid_lft_secs, None);
        acquire(&manual, 10).unwrap();
        assert!(query(&manual).unwrap().unwrap().valid_lft_secs.unwrap() <= 10);
    });
}

fn check_lease_lapses(cidr: &str) {
    let ns = single_ns();
    let vip = Vip::parse(cidr, "v0").unwrap();
    let elapsed = ns.run(|| {
        acquire(&vip, 2).unwrap();
        let start = Instant::now();
        assert!(is_present(&vip).unwrap());
        // Not renewed: the kernel must remove it by itself.
        assert!(
            wait_until(Duration::from_secs(10), || !is_present(&vip).unwrap()),
            "{vip} still present 10 s after a 2 s lease"
        );
        start.elapsed()
    });
    eprintln!("{vip}: 2 s lease lapsed after {elapsed:?}");
}

#[test]
fn lease_lapses_without_renewal_v4() {
    check_lease_lapses("10.77.0.100/24");
}

#[test]
fn lease_lapses_without_renewal_v6() {
    check_lease_lapses("fd77::100/64");
}

#[test]
fn renew_keeps_the_address_past_its_first_lease() {
    let ns = single_ns();
    let vip = Vip::parse("10.77.0.100/24", "v0").unwrap();
    ns.run(|| {
        acquire(&vip, 3).unwrap();
        let start = Instant::now();
        // Renew every second for twice the lease; it must stay throughout.
        while start.elapsed() < Duration::from_secs(6) {
            std::thread::sleep(Duration::from_secs(1));
            assert!(
                is_present(&vip).unwrap(),
                "lost after {:?}",
                start.elapsed()
            );
            renew(&vip, 3).unwrap();
        }
        // Then stop renewing: it goes.
        assert!(wait_until(Duration::from_secs(10), || !is_present(&vip).unwrap()));
        // Renewing after a lapse puts it back.
        renew(&vip, 3).unwrap();
        assert!(is_present(&vip).unwrap());
    });
}

/// Kills the child with SIGKILL by PID if the test fails early.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The child side of `address_disappears_after_sigkill`: takes the lease in
/// the namespace it was started in, says so, and waits to be killed. Does
/// nothing in a normal test run.
#[test]
fn sigkill_child_helper() {
    let Ok(cidr) = std::env::var("HAPAIR_VIP_TEST_CHILD_VIP") else {
        return;
    };
    let vip = Vip::parse(&cidr, "v0").unwrap();
    acquire(&vip, 2).unwrap();
    println!("ACQUIRED");
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn address_disappears_after_sigkill() {
    let ns = single_ns();
    let vip = Vip::parse("10.77.0.100/24", "v0").unwrap();
    ns.run(|| {
        // The child is spawned from this thread, so it starts in the test
        // namespace (namespaces are per thread and inherited by fork).
        let exe = std::env::current_exe().unwrap();
        let child = Command::new(exe)
            .args([
                "--exact",
                "sigkill_child_helper",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("HAPAIR_VIP_TEST_CHILD_VIP", "10.77.0.100/24")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut child = ChildGuard(child);
        let mut out = child.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            let mut seen = String::new();
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                if seen.contains("ACQUIRED") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("child acquired the VIP");
        assert!(is_present(&vip).unwrap());
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || !is_present(&vip).unwrap()),
            "VIP survived its SIGKILLed holder"
        );
    });
}

/// Captures frames arriving on one interface (in the namespace of the
/// calling thread).
struct Capture {
    fd: std::os::fd::OwnedFd,
}

impl Capture {
    fn open(ifname: &str) -> Capture {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket call, checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            raw >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fresh fd.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let cname = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: valid C string.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert!(index > 0, "no interface {ifname}");
        // SAFETY: zeroed sockaddr_ll is valid.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = index as i32;
        // SAFETY: live struct of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: live timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Capture { fd }
    }

    /// Frames matching `keep`, until `done` says the set is complete or the
    /// limit passes.
    fn collect(
        &self,
        limit: Duration,
        keep: impl Fn(&[u8]) -> bool,
        done: impl Fn(&[Vec<u8>]) -> bool,
    ) -> Vec<Vec<u8>> {
        let start = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while start.elapsed() < limit && !done(&got) {
            // SAFETY: live buffer.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && keep(&buf[..n as usize]) {
                got.push(buf[..n as usize].to_vec());
            }
        }
        got
    }
}

/// Announces from `a` while capturing on `b`'s v1; returns the kept frames.
fn announce_and_capture(
    a: &Netns,
    b: &Netns,
    vip: &Vip,
    keep: impl Fn(&[u8]) -> bool + Send + Sync,
    done: impl Fn(&[Vec<u8>]) -> bool + Send + Sync,
) -> Vec<Vec<u8>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::scope(|s| {
        let cap = s.spawn(|| {
            b.run(|| {
                let c = Capture::open("v1");
                ready_tx.send(()).unwrap();
                c.collect(Duration::from_secs(5), keep, done)
            })
        });
        ready_rx.recv().unwrap();
        a.run(|| {
            acquire(vip, 30).unwrap();
            announce_with_interval(vip, 2, Duration::from_millis(50)).unwrap();
        });
        match cap.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

fn neigh_mac(ns: &Netns, addr: &str) -> String {
    ns.ip(&["neigh", "show", addr, "dev", "v1"])
}

#[test]
fn gratuitous_arp_reaches_the_peer_and_updates_its_cache() {
    let (a, b) = pair();
    let vip = Vip::parse("10.77.0.100/24", "v0").unwrap();
    // The peer believes the VIP is elsewhere; the announcement must fix it.
    b.ip(&[
        "neigh",
        "replace",
        "10.77.0.100",
        "lladdr",
        STALE_MAC,
        "dev",
        "v1",
        "nud",
        "stale",
    ]);
    let ip = [10, 77, 0, 100];
    let frames = announce_and_capture(
        &a,
        &b,
        &vip,
        |f| f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[28..32] == ip,
        |got| got.len() >= 4,
    );
    let ops: Vec<u16> = frames
        .iter()
        .map(|f| u16::from_be_bytes([f[20], f[21]]))
        .collect();
    assert!(
        ops.contains(&1) && ops.contains(&2),
        "want request and reply, got ops {ops:?}"
    );
    for f in &frames {
        assert_eq!(&f[0..6], &[0xff; 6], "Ethernet broadcast");
        assert_eq!(&f[6..12], &MAC_A_BYTES, "source MAC");
        assert_eq!(&f[22..28], &MAC_A_BYTES, "sender hardware address");
        assert_eq!(&f[28..32], &ip, "sender IP");
        assert_eq!(&f[38..42], &ip, "target IP (gratuitous)");
    }
    assert!(
        wait_until(Duration::from_secs(3), || neigh_mac(&b, "10.77.0.100")
            .contains(MAC_A)),
        "peer cache: {}",
        neigh_mac(&b, "10.77.0.100")
    );
}

#[test]
fn neighbour_advertisement_reaches_the_peer_and_updates_its_cache() {
    let (a, b) = pair();
    let vip = Vip::parse("fd77::100/64", "v0").unwrap();
    b.ip(&[
        "-6",
        "neigh",
        "replace",
        "fd77::100",
        "lladdr",
        STALE_MAC,
        "dev",
        "v1",
        "nud",
        "stale",
    ]);
    let target: std::net::Ipv6Addr = "fd77::100".parse().unwrap();
    let is_na = move |f: &[u8]| {
        f.len() >= 86
            && f[12..14] == [0x86, 0xdd]
            && f[20] == 58
            && f[54] == 136
            && f[62..78] == target.octets()
    };
    let frames = announce_and_capture(&a, &b, &vip, is_na, |got| got.len() >= 2);
    assert!(!frames.is_empty(), "no neighbour advertisement captured");
    for f in &frames {
        assert_eq!(
            &f[0..6],
            &[0x33, 0x33, 0, 0, 0, 1],
            "all-nodes multicast MAC"
        );
        assert_eq!(&f[6..12], &MAC_A_BYTES);
        assert_eq!(f[21], 255, "hop limit");
        assert_eq!(
            &f[38..54],
            &"ff02::1".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(
            f[58] & 0xe0,
            0x20,
            "override set, router and solicited clear"
        );
        assert_eq!(&f[78..80], &[2, 1], "target link-layer address option");
        assert_eq!(&f[80..86], &MAC_A_BYTES);
    }
    // The peer's kernel accepted it (checksum, hop limit, flags) and updated
    // its cache.
    assert!(
        wait_until(Duration::from_secs(3), || neigh_mac(&b, "fd77::100")
            .contains(MAC_A)),
        "peer cache: {}",
        neigh_mac(&b, "fd77::100")
    );
}

#[test]
fn unknown_interface_is_named_in_the_error() {
    let ns = Netns::new();
    let vip = Vip::parse("10.77.0.100/24", "nosuch0").unwrap();
    ns.run(|| {
        let errors = [
            acquire(&vip, 10).unwrap_err(),
            release(&vip).unwrap_err(),
            is_present(&vip).unwrap_err(),
            announce(&vip, 1).unwrap_err(),
        ];
        for e in errors {
            assert!(
                matches!(&e, VipError::InterfaceNotFound { ifname } if ifname == "nosuch0"),
                "{e:?}"
            );
            let m = e.to_string();
            assert!(m.contains("\"nosuch0\"") && m.contains("not found"), "{m}");
        }
    });
}

#[test]
fn announce_refuses_non_ethernet_and_reports_a_down_link() {
    let ns = single_ns();
    let on_lo = Vip::parse("10.77.0.100/24", "lo").unwrap();
    let on_v0 = Vip::parse("10.77.0.100/24", "v0").unwrap();
    ns.ip(&["link", "set", "v0", "down"]);
    ns.run(|| {
        let e = announce(&on_lo, 1).unwrap_err();
        assert!(matches!(e, VipError::UnsupportedInterface { .. }), "{e:?}");
        assert!(e.to_string().contains("not an Ethernet interface"), "{e}");
        let e = announce(&on_v0, 1).unwrap_err();
        match &e {
            VipError::Io { source, .. } => assert_eq!(source.raw_os_error(), Some(libc::ENETDOWN)),
            other => panic!("{other:?}"),
        }
        // An address can still be held on a down link.
        acquire(&on_v0, 10).unwrap();
        assert!(is_present(&on_v0).unwrap());
    });
}

#[test]
fn kernel_refusal_carries_errno() {
    // The kernel refuses IPv6 addresses on an interface with IPv6 disabled:
    // a real refusal whose errno must come through.
    let ns = single_ns();
    run_cmd(&[
        "ip",
        "netns",
        "exec",
        &ns.name,
        "sysctl",
        "-q",
        "-w",
        "net.ipv6.conf.v0.disable_ipv6=1",
    ]);
    let vip = Vip::parse("fd77::100/64", "v0").unwrap();
    let e = ns.run(|| acquire(&vip, 10).unwrap_err());
    match &e {
        VipError::Netlink { errno, ifname, .. } => {
            assert!(*errno > 0);
            assert_eq!(ifname, "v0");
        }
        other => panic!("{other:?}"),
    }
    eprintln!("kernel refusal as reported: {e}");
}

/// Drops capabilities from the effective set of the calling thread only.
fn drop_effective_caps(caps: &[u32]) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: header and two data words, as capget(2) version 3 expects.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
    for &c in caps {
        d[(c / 32) as usize].effective &= !(1 << (c % 32));
    }
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &h as *const Header, d.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

#[test]
fn missing_capabilities_are_reported_as_such() {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_NET_RAW: u32 = 13;
    let ns = single_ns();
    let vip = Vip::parse("10.77.0.100/24", "v0").unwrap();
    ns.run(|| {
        drop_effective_caps(&[CAP_NET_ADMIN, CAP_NET_RAW]);
        let e = acquire(&vip, 10).unwrap_err();
        assert!(
            matches!(
                e,
                VipError::PermissionDenied {
                    capability: "CAP_NET_ADMIN",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
        let e = announce(&vip, 1).unwrap_err();
        assert!(
            matches!(
                e,
                VipError::PermissionDenied {
                    capability: "CAP_NET_RAW",
                    ..
                }
            ),
            "{e:?}"
        );
        // Looking needs no privilege.
        assert!(!is_present(&vip).unwrap());
    });
}
