//! The virtual IP (VIP) adapter of hapair's supervisor, for Linux.
//!
//! The primary holds the VIP as a *lease*: [`acquire`] adds the address
//! through rtnetlink with a finite valid and preferred lifetime
//! (`IFA_CACHEINFO`), and the supervisor calls [`renew`] well before it runs
//! out. The kernel itself removes an address whose lifetime lapses, so a
//! primary whose hapair process is killed with SIGKILL, frozen, or wedged
//! loses the VIP within `lease_secs` (plus up to about a second of kernel
//! timer rounding) with no helper process involved: nothing on the node has
//! to survive for the removal to happen. A clean demotion calls [`release`].
//! After taking the VIP the new primary calls [`announce`] so that
//! neighbours (and switches) point the address at its MAC at once.
//!
//! IPv4 caveat (kernel behaviour, measured on 6.18): if the VIP is the
//! *first* address of its subnet on the interface, the kernel makes it the
//! subnet's primary and any same-subnet address added later a secondary;
//! when the VIP then lapses or is released, those secondaries are deleted
//! with it unless `net.ipv4.conf.<if>.promote_secondaries=1`. Configure the
//! node's own address before hapair starts, or enable promote_secondaries.
//!
//! Every call is synchronous, opens its own short-lived sockets, and acts in
//! the network namespace of the calling thread. Nothing here shells out.
//! Privileges: changing addresses needs `CAP_NET_ADMIN`, announcing needs
//! `CAP_NET_RAW`; [`is_present`]/[`query`] need none.

mod frames;
mod nl;

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use thiserror::Error;

/// Longest accepted lease. A lease exists so that a dead primary loses the
/// address quickly; a day is already far beyond any sensible failover time.
pub const MAX_LEASE_SECS: u32 = 86_400;
/// Most announcement rounds accepted by one [`announce`] call.
pub const MAX_ANNOUNCE_COUNT: u32 = 100;
/// Pause between announcement rounds in [`announce`]: spreads the rounds so
/// that one lost frame (or a switch port still coming up) does not lose them
/// all, like `arping -c` does.
pub const DEFAULT_ANNOUNCE_INTERVAL: Duration = Duration::from_millis(100);

const ARPHRD_ETHER: u16 = 1;

/// A virtual IP: an address with its prefix, to be held on one interface.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Vip {
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub ifname: String,
}

/// What the kernel reports about the VIP on its interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrState {
    /// Prefix length of the address as configured on the interface.
    pub prefix_len: u8,
    /// Seconds until the kernel removes the address; `None` means forever
    /// (a permanent address, not a lease — someone added it by hand).
    pub valid_lft_secs: Option<u32>,
    /// Seconds until the address is deprecated; `None` means forever.
    pub preferred_lft_secs: Option<u32>,
    /// IPv6 only: duplicate address detection still running (never the case
    /// for addresses added by [`acquire`], which skips DAD).
    pub tentative: bool,
    /// IPv6 only: duplicate address detection found another holder.
    pub dad_failed: bool,
}

/// Why a VIP operation failed. Variants up to `InvalidCount` are mistakes in
/// the configuration or the call (fix the input); the others come from the
/// system at run time.
#[derive(Debug, Error)]
pub enum VipError {
    /// The address/prefix text is not a usable VIP.
    #[error("invalid VIP {input:?}: {reason}")]
    InvalidAddress { input: String, reason: String },
    /// The interface name cannot be a Linux interface name.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidInterfaceName { name: String, reason: String },
    /// The lease is outside `1..=MAX_LEASE_SECS`.
    #[error("invalid VIP lease of {lease_secs} s: must be between 1 and {MAX_LEASE_SECS} seconds")]
    InvalidLease { lease_secs: u32 },
    /// Too many announcement rounds were asked for.
    #[error("invalid announcement count {count}: at most {MAX_ANNOUNCE_COUNT}")]
    InvalidCount { count: u32 },
    /// No interface of that name exists in this network namespace.
    #[error("network interface {ifname:?} not found (check the VIP interface in the configuration, or `ip link`)")]
    InterfaceNotFound { ifname: String },
    /// The interface cannot carry a VIP announcement (e.g. not Ethernet).
    #[error("network interface {ifname:?} is not supported for the VIP: {reason}")]
    UnsupportedInterface { ifname: String, reason: String },
    /// The process lacks the capability the operation needs.
    #[error("permission denied to {op} on {ifname:?}: hapair needs {capability} (run as root or grant the capability)")]
    PermissionDenied {
        op: &'static str,
        ifname: String,
        capability: &'static str,
    },
    /// The kernel refused a netlink request.
    #[error("{op} on {ifname:?} failed: {} (errno {errno}){}", errno_text(*errno), kernel_says(.message))]
    Netlink {
        op: &'static str,
        ifname: String,
        errno: i32,
        /// The kernel's extended-ack explanation, when it gave one.
        message: Option<String>,
    },
    /// A socket operation failed (netlink transport, raw packet send).
    #[error("{op} on {ifname:?} failed: {source}")]
    Io {
        op: &'static str,
        ifname: String,
        #[source]
        source: io::Error,
    },
    /// The kernel's netlink reply was not understood (a bug, or a kernel far
    /// newer/older than expected).
    #[error("{op} on {ifname:?}: unexpected netlink reply: {detail}")]
    Protocol {
        op: &'static str,
        ifname: String,
        detail: String,
    },
}

/// The system's description of an errno, without std's "(os error N)" suffix
/// (the message prints the number itself).
fn errno_text(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn kernel_says(message: &Option<String>) -> String {
    match message {
        Some(m) => format!(" (kernel: {m})"),
        None => String::new(),
    }
}

impl Vip {
    /// Parses `"10.77.0.100/24"` or `"fd77::100/64"` for interface `ifname`.
    /// The prefix is required: it decides the route the kernel adds.
    pub fn parse(cidr: &str, ifname: &str) -> Result<Vip, VipError> {
        let bad = |reason: &str| VipError::InvalidAddress {
            input: cidr.to_string(),
            reason: reason.to_string(),
        };
        let text = cidr.trim();
        let (addr_text, prefix_text) = text.split_once('/').ok_or_else(|| {
            bad("missing prefix length; write it as ADDRESS/PREFIX, e.g. 10.77.0.100/24")
        })?;
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| bad(&format!("{addr_text:?} is not an IPv4 or IPv6 address")))?;
        let prefix_len: u8 = prefix_text
            .parse()
            .map_err(|_| bad(&format!("prefix length {prefix_text:?} is not a number")))?;
        Vip::new(addr, prefix_len, ifname).map_err(|e| match e {
            VipError::InvalidAddress { reason, .. } => VipError::InvalidAddress {
                input: cidr.to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Checks and builds a VIP.
    pub fn new(addr: IpAddr, prefix_len: u8, ifname: &str) -> Result<Vip, VipError> {
        let bad = |reason: String| VipError::InvalidAddress {
            input: format!("{addr}/{prefix_len}"),
            reason,
        };
        match addr {
            IpAddr::V4(a) => check_v4(a, prefix_len).map_err(bad)?,
            IpAddr::V6(a) => check_v6(a, prefix_len).map_err(bad)?,
        }
        check_ifname(ifname)?;
        Ok(Vip {
            addr,
            prefix_len,
            ifname: ifname.to_string(),
        })
    }
}

fn check_v4(a: Ipv4Addr, prefix_len: u8) -> Result<(), String> {
    if prefix_len == 0 || prefix_len > 32 {
        return Err(format!(
            "IPv4 prefix length must be 1..=32, not {prefix_len}"
        ));
    }
    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
        return Err("not a unicast address".into());
    }
    if a.is_loopback() {
        return Err("a loopback address cannot be reached by clients".into());
    }
    // For prefixes up to /30 the all-zeros and all-ones host parts are the
    // network and broadcast addresses (/31 and /32 have no such addresses).
    if prefix_len <= 30 {
        let host_mask = u32::MAX >> prefix_len;
        let host = u32::from(a) & host_mask;
        if host == 0 {
            return Err(format!("this is the network address of the /{prefix_len}"));
        }
        if host == host_mask {
            return Err(format!(
                "this is the broadcast address of the /{prefix_len}"
            ));
        }
    }
    Ok(())
}

fn check_v6(a: Ipv6Addr, prefix_len: u8) -> Result<(), String> {
    if prefix_len == 0 || prefix_len > 128 {
        return Err(format!(
            "IPv6 prefix length must be 1..=128, not {prefix_len}"
        ));
    }
    if a.is_unspecified() || a.is_multicast() {
        return Err("not a unicast address".into());
    }
    if a.is_loopback() {
        return Err("a loopback address cannot be reached by clients".into());
    }
    if a.to_ipv4_mapped().is_some() {
        return Err("an IPv4-mapped IPv6 address; write the IPv4 address instead".into());
    }
    Ok(())
}

/// The kernel's rules for interface names (dev_valid_name).
fn check_ifname(name: &str) -> Result<(), VipError> {
    let bad = |reason: &str| VipError::InvalidInterfaceName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > 15 {
        return Err(bad("longer than 15 bytes (IFNAMSIZ)"));
    }
    if name == "." || name == ".." {
        return Err(bad("not a valid name"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        return Err(bad("contains '/', ':', NUL or whitespace"));
    }
    Ok(())
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} on {}", self.addr, self.prefix_len, self.ifname)
    }
}

// ---------------------------------------------------------------------------
// Error mapping

const CAP_NET_ADMIN: &str = "CAP_NET_ADMIN";
const CAP_NET_RAW: &str = "CAP_NET_RAW";

fn map_nl(op: &'static str, vip: &Vip, e: nl::NlFailure) -> VipError {
    let ifname = vip.ifname.clone();
    match e {
        // rtnetlink answers EPERM when the sender lacks CAP_NET_ADMIN (EACCES
        // means other things, e.g. IPv6 disabled on the interface).
        nl::NlFailure::Errno { errno, .. } if errno == libc::EPERM => VipError::PermissionDenied {
            op,
            ifname,
            capability: CAP_NET_ADMIN,
        },
        nl::NlFailure::Errno { errno, message } => VipError::Netlink {
            op,
            ifname,
            errno,
            message,
        },
        nl::NlFailure::Io(source) => VipError::Io { op, ifname, source },
        nl::NlFailure::Protocol(detail) => VipError::Protocol { op, ifname, detail },
    }
}

fn open_netlink(op: &'static str, vip: &Vip) -> Result<nl::NlSocket, VipError> {
    nl::NlSocket::open().map_err(|source| VipError::Io {
        op,
        ifname: vip.ifname.clone(),
        source,
    })
}

fn lookup_link(sock: &mut nl::NlSocket, vip: &Vip) -> Result<nl::LinkInfo, VipError> {
    sock.get_link(&vip.ifname).map_err(|e| match e {
        nl::NlFailure::Errno { errno, .. } if errno == libc::ENODEV => {
            VipError::InterfaceNotFound {
                ifname: vip.ifname.clone(),
            }
        }
        other => map_nl("look up interface", vip, other),
    })
}

// ---------------------------------------------------------------------------
// Address lease

/// Adds the VIP to its interface, or refreshes it if already there, with
/// valid and preferred lifetime `lease_secs`: unless renewed in time, the
/// kernel removes it by itself. Idempotent (`NLM_F_REPLACE`). If the address
/// was already present as a permanent address, it becomes a lease.
///
/// IPv6 VIPs are added without duplicate address detection (like
/// keepalived): the supervisor decides who holds the VIP, and DAD would keep
/// the address unusable for a second after a failover.
pub fn acquire(vip: &Vip, lease_secs: u32) -> Result<(), VipError> {
    const OP: &str = "add VIP address";
    if lease_secs == 0 || lease_secs > MAX_LEASE_SECS {
        return Err(VipError::InvalidLease { lease_secs });
    }
    // A lease must never turn into a permanent address.
    debug_assert!(lease_secs < nl::INFINITY_LIFE_TIME);
    let mut sock = open_netlink(OP, vip)?;
    let link = lookup_link(&mut sock, vip)?;
    let flags = match vip.addr {
        IpAddr::V4(_) => 0,
        IpAddr::V6(_) => nl::IFA_F_NODAD,
    };
    sock.new_addr(link.index, &vip.addr, vip.prefix_len, lease_secs, flags)
        .map_err(|e| map_nl(OP, vip, e))?;
    tracing::debug!(%vip, lease_secs, "VIP lease set");
    Ok(())
}

/// Extends the lease to `lease_secs` from now (re-adding the address if it
/// lapsed). Call it periodically while primary, e.g. every `lease_secs / 3`.
pub fn renew(vip: &Vip, lease_secs: u32) -> Result<(), VipError> {
    acquire(vip, lease_secs)
}

/// Removes the VIP from its interface. Succeeds if it was not there.
/// Fails with [`VipError::InterfaceNotFound`] if the interface is gone (the
/// address is then certainly not on it, which callers may treat as done).
pub fn release(vip: &Vip) -> Result<(), VipError> {
    const OP: &str = "remove VIP address";
    let mut sock = open_netlink(OP, vip)?;
    let link = lookup_link(&mut sock, vip)?;
    match sock.del_addr(link.index, &vip.addr, vip.prefix_len) {
        Ok(()) => {
            tracing::debug!(%vip, "VIP released");
            Ok(())
        }
        // The kernel answers EADDRNOTAVAIL when no such address is there.
        Err(nl::NlFailure::Errno { errno, .. }) if errno == libc::EADDRNOTAVAIL => {
            tracing::debug!(%vip, "VIP release: address was not present");
            Ok(())
        }
        Err(e) => Err(map_nl(OP, vip, e)),
    }
}

/// The VIP's state on its interface, or `None` if the address is not there
/// (with any prefix length).
pub fn query(vip: &Vip) -> Result<Option<AddrState>, VipError> {
    const OP: &str = "list addresses";
    let mut sock = open_netlink(OP, vip)?;
    let link = lookup_link(&mut sock, vip)?;
    let family = match vip.addr {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    };
    let entries = sock.dump_addrs(family).map_err(|e| map_nl(OP, vip, e))?;
    let finite = |l: Option<u32>| l.filter(|&s| s != nl::INFINITY_LIFE_TIME);
    Ok(entries
        .into_iter()
        .find(|e| e.index == link.index && e.addr == vip.addr)
        .map(|e| AddrState {
            prefix_len: e.prefix_len,
            valid_lft_secs: finite(e.valid_lft),
            preferred_lft_secs: finite(e.preferred_lft),
            tentative: e.tentative(),
            dad_failed: e.dad_failed(),
        }))
}

/// True if the VIP's address is currently on its interface.
pub fn is_present(vip: &Vip) -> Result<bool, VipError> {
    Ok(query(vip)?.is_some())
}

// ---------------------------------------------------------------------------
// Announcement

/// Tells the link that the VIP now lives at this interface's MAC: `count`
/// rounds, [`DEFAULT_ANNOUNCE_INTERVAL`] apart, of a gratuitous ARP request
/// and reply (IPv4) or an unsolicited neighbour advertisement with the
/// override flag (IPv6). Call it after [`acquire`]. Blocks for
/// `(count - 1) * interval`.
pub fn announce(vip: &Vip, count: u32) -> Result<(), VipError> {
    announce_with_interval(vip, count, DEFAULT_ANNOUNCE_INTERVAL)
}

/// [`announce`] with an explicit pause between rounds.
pub fn announce_with_interval(vip: &Vip, count: u32, interval: Duration) -> Result<(), VipError> {
    const OP: &str = "send VIP announcement";
    if count > MAX_ANNOUNCE_COUNT {
        return Err(VipError::InvalidCount { count });
    }
    if count == 0 {
        return Ok(());
    }
    let mut sock = open_netlink(OP, vip)?;
    let link = lookup_link(&mut sock, vip)?;
    drop(sock);
    let mac: frames::Mac = match (link.hw_type, <[u8; 6]>::try_from(link.hw_addr.as_slice())) {
        (ARPHRD_ETHER, Ok(mac)) => mac,
        _ => {
            return Err(VipError::UnsupportedInterface {
                ifname: vip.ifname.clone(),
                reason: format!(
                    "not an Ethernet interface (hardware type {}, address length {}); \
                     ARP and neighbour discovery announcements need Ethernet",
                    link.hw_type,
                    link.hw_addr.len()
                ),
            })
        }
    };
    let (ethertype, dst, round) = match vip.addr {
        IpAddr::V4(ip) => (
            frames::ETHERTYPE_ARP,
            frames::BROADCAST_MAC,
            vec![
                frames::gratuitous_arp(&mac, ip, frames::ARP_REQUEST),
                frames::gratuitous_arp(&mac, ip, frames::ARP_REPLY),
            ],
        ),
        IpAddr::V6(ip) => (
            frames::ETHERTYPE_IPV6,
            frames::ALL_NODES_MAC,
            vec![frames::unsolicited_na(&mac, ip)],
        ),
    };
    let io_err = |source: io::Error| {
        if source.raw_os_error() == Some(libc::EPERM) {
            VipError::PermissionDenied {
                op: OP,
                ifname: vip.ifname.clone(),
                capability: CAP_NET_RAW,
            }
        } else {
            VipError::Io {
                op: OP,
                ifname: vip.ifname.clone(),
                source,
            }
        }
    };
    let sock = PacketSocket::open(link.index, ethertype, dst).map_err(io_err)?;
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(interval);
        }
        for frame in &round {
            sock.send(frame).map_err(io_err)?;
        }
    }
    tracing::debug!(%vip, count, "VIP announced");
    Ok(())
}

/// A send-only AF_PACKET socket for whole Ethernet frames on one interface.
struct PacketSocket {
    fd: OwnedFd,
    dst: libc::sockaddr_ll,
}

impl PacketSocket {
    fn open(ifindex: u32, ethertype: u16, dst_mac: frames::Mac) -> io::Result<PacketSocket> {
        let ifindex = i32::try_from(ifindex).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "interface index too large")
        })?;
        // Protocol 0: the socket receives nothing, so no incoming traffic
        // queues up in it while we only send.
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_ll is valid; fields are set below.
        let mut dst: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        dst.sll_family = libc::AF_PACKET as u16;
        dst.sll_protocol = ethertype.to_be();
        dst.sll_ifindex = ifindex;
        dst.sll_halen = 6;
        dst.sll_addr[..6].copy_from_slice(&dst_mac);
        Ok(PacketSocket { fd, dst })
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: the frame and address buffers are live for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&self.dst as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short packet send: {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_good() {
        let v = Vip::parse("10.77.0.100/24", "eth0").unwrap();
        assert_eq!(v.addr, "10.77.0.100".parse::<IpAddr>().unwrap());
        assert_eq!(v.prefix_len, 24);
        assert_eq!(v.ifname, "eth0");
        assert_eq!(v.to_string(), "10.77.0.100/24 on eth0");
        let v = Vip::parse(" fd77::100/64 ", "veth-a").unwrap();
        assert_eq!(v.prefix_len, 64);
        assert!(Vip::parse("10.0.0.1/32", "eth0").is_ok());
        assert!(Vip::parse("10.0.0.0/31", "eth0").is_ok());
    }

    fn reason(r: Result<Vip, VipError>) -> String {
        match r {
            Err(e) => e.to_string(),
            Ok(v) => panic!("accepted {v:?}"),
        }
    }

    #[test]
    fn parse_bad_cidr_messages() {
        let m = reason(Vip::parse("10.77.0.100", "eth0"));
        assert!(
            m.contains("missing prefix length") && m.contains("\"10.77.0.100\""),
            "{m}"
        );
        let m = reason(Vip::parse("10.77.0.300/24", "eth0"));
        assert!(m.contains("not an IPv4 or IPv6 address"), "{m}");
        let m = reason(Vip::parse("10.77.0.1/33", "eth0"));
        assert!(m.contains("1..=32") && m.contains("10.77.0.1/33"), "{m}");
        let m = reason(Vip::parse("10.77.0.1/x", "eth0"));
        assert!(m.contains("not a number"), "{m}");
        let m = reason(Vip::parse("10.77.0.0/24", "eth0"));
        assert!(m.contains("network address"), "{m}");
        let m = reason(Vip::parse("10.77.0.255/24", "eth0"));
        assert!(m.contains("broadcast address"), "{m}");
        assert!(reason(Vip::parse("224.0.0.1/24", "eth0")).contains("unicast"));
        assert!(reason(Vip::parse("127.0.0.2/8", "eth0")).contains("loopback"));
        assert!(reason(Vip::parse("fd77::1/129", "eth0")).contains("1..=128"));
        assert!(reason(Vip::parse("::/64", "eth0")).contains("unicast"));
        assert!(reason(Vip::parse("::ffff:10.0.0.1/120", "eth0")).contains("IPv4-mapped"));
        assert!(reason(Vip::parse("10.0.0.1/0", "eth0")).contains("1..=32"));
    }

    #[test]
    fn parse_bad_ifname() {
        for name in ["", "a-very-long-interface", "eth0:1", "a b", "..", "x/y"] {
            match Vip::parse("10.0.0.1/24", name) {
                Err(VipError::InvalidInterfaceName { name: n, .. }) => assert_eq!(n, name),
                other => panic!("{name:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn lease_and_count_bounds_checked_before_any_syscall() {
        let v = Vip::parse("10.0.0.1/24", "nonexistent0").unwrap();
        assert!(matches!(
            acquire(&v, 0),
            Err(VipError::InvalidLease { lease_secs: 0 })
        ));
        assert!(matches!(
            renew(&v, MAX_LEASE_SECS + 1),
            Err(VipError::InvalidLease { .. })
        ));
        assert!(matches!(
            announce(&v, MAX_ANNOUNCE_COUNT + 1),
            Err(VipError::InvalidCount { .. })
        ));
        // Zero rounds: nothing to do, nothing looked up.
        assert!(announce(&v, 0).is_ok());
    }

    #[test]
    fn netlink_error_message_names_everything() {
        let e = VipError::Netlink {
            op: "add VIP address",
            ifname: "eth0".into(),
            errno: libc::EINVAL,
            message: Some("Invalid lifetime".into()),
        };
        let m = e.to_string();
        assert!(
            m.contains("add VIP address") && m.contains("\"eth0\""),
            "{m}"
        );
        assert!(
            m.contains("errno 22") && m.contains("kernel: Invalid lifetime"),
            "{m}"
        );
        assert!(!m.contains("os error"), "errno printed once: {m}");
    }
}
