//! `Netns` (a network namespace deleted on drop) and `Veth` (a veth pair
//! between the host namespace and one `Netns`, whose host end can be set
//! down to cut the link).
//!
//! Note: `ip netns exec` also gives the command a private mount namespace,
//! so FUSE mounts must be made from the host namespace; only network
//! servers (the mirror) are run inside.

use std::process::{Command, Output, Stdio};

pub(crate) fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e} (is iproute2 installed?)"))
}

pub(crate) fn ip_ok(args: &[&str]) {
    let o = ip(args);
    assert!(
        o.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr).trim()
    );
}

pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a unique name built from `prefix` (keep it
    /// short) and brings its loopback up.
    pub fn new(prefix: &str) -> Netns {
        let name = format!("{prefix}-{}", crate::env::unique_tag());
        ip_ok(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace and returns its output.
    pub fn exec(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {argv:?}: {e}", self.name))
    }

    /// Like `exec`, panicking unless the command succeeds.
    pub fn exec_ok(&self, argv: &[&str]) -> Output {
        let o = self.exec(argv);
        assert!(
            o.status.success(),
            "ip netns exec {} {argv:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&o.stderr).trim()
        );
        o
    }

    /// A `Command` that runs `program` inside the namespace (for `Proc`).
    /// `ip netns exec` execs the program, so the PID stays the program's.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let o = ip(&["netns", "del", &self.name]);
        if !o.status.success() {
            eprintln!(
                "Netns guard: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
    }
}

/// A veth pair: `host_if` in the host namespace with `host_addr`, its peer
/// inside `ns` with `ns_addr` (both /30 CIDR strings, e.g. "10.200.7.1/30").
pub struct Veth {
    host_if: String,
    ns_name: String,
    ns_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

impl Veth {
    /// Creates the pair on a /30 subnet of 10.200.0.0/16 chosen from `subnet`
    /// (0..16383). The addresses exist only on this host and inside `ns`.
    pub fn new(ns: &Netns, subnet: u16) -> Veth {
        let tag = crate::env::unique_tag();
        // Interface names are limited to 15 bytes.
        let host_if = format!("hph{tag}");
        let ns_if = format!("hpn{tag}");
        assert!(host_if.len() <= 15, "interface name too long: {host_if}");
        let base = u32::from(subnet % 16384) * 4;
        let (o3, o4) = (base / 256, base % 256);
        let host_ip = format!("10.200.{o3}.{}", o4 + 1);
        let ns_ip = format!("10.200.{o3}.{}", o4 + 2);
        ip_ok(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        let v = Veth {
            host_if,
            ns_name: ns.name().to_string(),
            ns_if,
            host_ip,
            ns_ip,
        };
        ip_ok(&["link", "set", &v.ns_if, "netns", ns.name()]);
        ip_ok(&[
            "addr",
            "add",
            &format!("{}/30", v.host_ip),
            "dev",
            &v.host_if,
        ]);
        ip_ok(&["link", "set", &v.host_if, "up"]);
        ns.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", v.ns_ip),
            "dev",
            &v.ns_if,
        ]);
        ns.exec_ok(&["ip", "link", "set", &v.ns_if, "up"]);
        v
    }

    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// Sets the host end down (cuts the link both ways) or up again.
    pub fn set_up(&self, up: bool) {
        ip_ok(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }

    /// Sets the namespace end down or up.
    pub fn set_ns_end_up(&self, up: bool) {
        ip_ok(&[
            "-n",
            &self.ns_name,
            "link",
            "set",
            &self.ns_if,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting one end deletes the pair; it may already be gone with
        // its namespace, hence no complaint.
        let _ = ip(&["link", "del", &self.host_if]);
    }
}
