//! A minimal rtnetlink client: just the address and link messages the VIP needs.
//!
//! Encoding and decoding are plain functions on byte slices (tested without
//! privileges); [`NlSocket`] is the thin I/O part. Constants are written out
//! here rather than taken from `libc` because they are stable kernel ABI and
//! their presence in `libc` varies between versions and targets.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

// Netlink message types and flags (linux/netlink.h).
const NLMSG_HDR_LEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
// Flags the kernel sets on NLMSG_ERROR replies.
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

// rtnetlink (linux/rtnetlink.h, if_addr.h, if_link.h).
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_CACHEINFO: u16 = 6;
const IFA_FLAGS: u16 = 8;
pub(crate) const IFA_F_NODAD: u32 = 0x02;
const IFA_F_DADFAILED: u32 = 0x08;
const IFA_F_TENTATIVE: u32 = 0x40;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFADDRMSG_LEN: usize = 8;
const IFINFOMSG_LEN: usize = 16;
/// The kernel's "forever" lifetime.
pub(crate) const INFINITY_LIFE_TIME: u32 = u32::MAX;

/// Receive buffer: larger than any single datagram the kernel sends for an
/// address or link dump (it sizes dump datagrams to at most 32 KiB).
const RECV_BUF_LEN: usize = 64 * 1024;
/// Upper bound on messages read for one request, so a misbehaving peer or a
/// huge table cannot keep us looping forever.
const MAX_MESSAGES_PER_REQUEST: usize = 100_000;
/// A netlink request to the local kernel answers in microseconds; this only
/// guards against a hang.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// A dump interrupted by concurrent changes is retried this many times.
const MAX_DUMP_ATTEMPTS: usize = 5;

/// Why a netlink exchange failed.
#[derive(Debug)]
pub(crate) enum NlFailure {
    /// The kernel refused the request with this errno (positive), and maybe
    /// an extended-ack message explaining why.
    Errno { errno: i32, message: Option<String> },
    /// The socket itself failed (open, send, receive, timeout).
    Io(io::Error),
    /// The reply did not parse as the netlink we expect.
    Protocol(String),
}

impl From<io::Error> for NlFailure {
    fn from(e: io::Error) -> Self {
        NlFailure::Io(e)
    }
}

/// What the kernel told us about an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkInfo {
    pub index: u32,
    /// ARPHRD_* hardware type.
    pub hw_type: u16,
    pub hw_addr: Vec<u8>,
}

/// One address as listed by an RTM_GETADDR dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AddrEntry {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub flags: u32,
    /// Remaining seconds; `INFINITY_LIFE_TIME` means forever. Absent when the
    /// kernel sent no IFA_CACHEINFO.
    pub valid_lft: Option<u32>,
    pub preferred_lft: Option<u32>,
}

impl AddrEntry {
    pub fn tentative(&self) -> bool {
        self.flags & IFA_F_TENTATIVE != 0
    }
    pub fn dad_failed(&self) -> bool {
        self.flags & IFA_F_DADFAILED != 0
    }
}

// ---------------------------------------------------------------------------
// Encoding

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    // Attributes we build are tiny (at most 16 bytes of payload).
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

/// Wraps a request body in a netlink header.
pub(crate) fn encode_message(msg_type: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&msg_type.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    // Port id 0 addresses the kernel.
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(body);
    out
}

fn family_of(addr: &IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn addr_bytes(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn ifaddrmsg(family: u8, prefix_len: u8, flags: u8, index: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(IFADDRMSG_LEN);
    // Scope 0 = RT_SCOPE_UNIVERSE: the VIP is a global address.
    b.extend_from_slice(&[family, prefix_len, flags, 0]);
    b.extend_from_slice(&index.to_ne_bytes());
    b
}

/// Body of RTM_GETLINK looking an interface up by name.
pub(crate) fn getlink_body(ifname: &str) -> Vec<u8> {
    let mut b = vec![0u8; IFINFOMSG_LEN];
    let mut name = ifname.as_bytes().to_vec();
    name.push(0);
    push_attr(&mut b, IFLA_IFNAME, &name);
    b
}

/// Body of RTM_NEWADDR adding or refreshing `addr` with a finite lifetime.
pub(crate) fn newaddr_body(
    index: u32,
    addr: &IpAddr,
    prefix_len: u8,
    lifetime_secs: u32,
    flags: u32,
) -> Vec<u8> {
    // The low 8 flag bits go in the header too, for kernels that predate IFA_FLAGS.
    let mut b = ifaddrmsg(family_of(addr), prefix_len, (flags & 0xff) as u8, index);
    let bytes = addr_bytes(addr);
    push_attr(&mut b, IFA_LOCAL, &bytes);
    push_attr(&mut b, IFA_ADDRESS, &bytes);
    let mut ci = Vec::with_capacity(16);
    ci.extend_from_slice(&lifetime_secs.to_ne_bytes()); // ifa_prefered
    ci.extend_from_slice(&lifetime_secs.to_ne_bytes()); // ifa_valid
    ci.extend_from_slice(&0u32.to_ne_bytes()); // cstamp (ignored on input)
    ci.extend_from_slice(&0u32.to_ne_bytes()); // tstamp (ignored on input)
    push_attr(&mut b, IFA_CACHEINFO, &ci);
    push_attr(&mut b, IFA_FLAGS, &flags.to_ne_bytes());
    b
}

/// Body of RTM_DELADDR removing `addr` from interface `index`.
pub(crate) fn deladdr_body(index: u32, addr: &IpAddr, prefix_len: u8) -> Vec<u8> {
    let mut b = ifaddrmsg(family_of(addr), prefix_len, 0, index);
    let bytes = addr_bytes(addr);
    push_attr(&mut b, IFA_LOCAL, &bytes);
    // IPv4 deletion matches on IFA_LOCAL alone (whatever the prefix); IPv6
    // matches address and prefix length and reads IFA_ADDRESS when IFA_LOCAL
    // is absent, so IFA_LOCAL is enough for both.
    b
}

/// Body of an RTM_GETADDR dump for one address family.
pub(crate) fn getaddr_dump_body(family: u8) -> Vec<u8> {
    ifaddrmsg(family, 0, 0, 0)
}

// ---------------------------------------------------------------------------
// Decoding

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn read_i32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// One netlink message in a datagram.
#[derive(Debug)]
pub(crate) struct RawMessage<'a> {
    pub msg_type: u16,
    pub flags: u16,
    pub seq: u32,
    pub port: u32,
    pub payload: &'a [u8],
}

/// Splits a datagram into its netlink messages.
pub(crate) fn split_messages(mut buf: &[u8]) -> Result<Vec<RawMessage<'_>>, NlFailure> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDR_LEN {
        let bad = || NlFailure::Protocol("truncated netlink header".into());
        let len = read_u32(buf, 0).ok_or_else(bad)? as usize;
        if len < NLMSG_HDR_LEN || len > buf.len() {
            return Err(NlFailure::Protocol(format!(
                "netlink message length {len} out of range (datagram has {} bytes left)",
                buf.len()
            )));
        }
        out.push(RawMessage {
            msg_type: read_u16(buf, 4).ok_or_else(bad)?,
            flags: read_u16(buf, 6).ok_or_else(bad)?,
            seq: read_u32(buf, 8).ok_or_else(bad)?,
            port: read_u32(buf, 12).ok_or_else(bad)?,
            payload: &buf[NLMSG_HDR_LEN..len],
        });
        buf = buf.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Iterates over the route attributes in `b` as (type, payload) pairs,
/// stopping at the first malformed one.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = read_u16(b, 0)? as usize;
        let kind = read_u16(b, 2)?;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = b.get(align4(len)..).unwrap_or(&[]);
        // The top two bits are NLA_F_NESTED / NLA_F_NET_BYTEORDER.
        Some((kind & 0x3fff, payload))
    })
}

/// Decodes the payload of an NLMSG_ERROR message: `Ok(())` for an ACK,
/// otherwise the errno and the extended-ack message if any.
pub(crate) fn decode_error(flags: u16, payload: &[u8]) -> Result<(), NlFailure> {
    let code =
        read_i32(payload, 0).ok_or_else(|| NlFailure::Protocol("truncated NLMSG_ERROR".into()))?;
    if code == 0 {
        return Ok(());
    }
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // After the errno comes the request's header, and its body unless
        // the kernel capped it.
        let orig_len = if flags & NLM_F_CAPPED != 0 {
            NLMSG_HDR_LEN
        } else {
            read_u32(payload, 4).unwrap_or(NLMSG_HDR_LEN as u32) as usize
        };
        if let Some(tlvs) = payload.get(4 + align4(orig_len)..) {
            for (kind, value) in attrs(tlvs) {
                if kind == NLMSGERR_ATTR_MSG {
                    let text = value.split(|&c| c == 0).next().unwrap_or(&[]);
                    let text = String::from_utf8_lossy(text).trim().to_string();
                    if !text.is_empty() {
                        message = Some(text);
                    }
                }
            }
        }
    }
    Err(NlFailure::Errno {
        errno: code.saturating_neg(),
        message,
    })
}

/// Decodes an RTM_NEWLINK payload.
pub(crate) fn decode_link(payload: &[u8]) -> Result<LinkInfo, NlFailure> {
    let bad = || NlFailure::Protocol("truncated ifinfomsg".into());
    let hw_type = read_u16(payload, 2).ok_or_else(bad)?;
    let index = read_i32(payload, 4).ok_or_else(bad)?;
    let index = u32::try_from(index)
        .map_err(|_| NlFailure::Protocol(format!("negative interface index {index}")))?;
    let mut hw_addr = Vec::new();
    for (kind, value) in attrs(payload.get(IFINFOMSG_LEN..).unwrap_or(&[])) {
        if kind == IFLA_ADDRESS {
            hw_addr = value.to_vec();
        }
    }
    Ok(LinkInfo {
        index,
        hw_type,
        hw_addr,
    })
}

fn ip_from(family: u8, b: &[u8]) -> Option<IpAddr> {
    match (i32::from(family), b.len()) {
        (libc::AF_INET, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        (libc::AF_INET6, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

/// Decodes an RTM_NEWADDR payload; `None` for families or shapes we do not use.
pub(crate) fn decode_addr(payload: &[u8]) -> Option<AddrEntry> {
    let family = *payload.first()?;
    let prefix_len = *payload.get(1)?;
    let mut flags = u32::from(*payload.get(2)?);
    let index = read_u32(payload, 4)?;
    let (mut local, mut address) = (None, None);
    let (mut valid_lft, mut preferred_lft) = (None, None);
    for (kind, value) in attrs(payload.get(IFADDRMSG_LEN..)?) {
        match kind {
            IFA_LOCAL => local = ip_from(family, value),
            IFA_ADDRESS => address = ip_from(family, value),
            IFA_FLAGS => flags = read_u32(value, 0).unwrap_or(flags),
            IFA_CACHEINFO => {
                preferred_lft = read_u32(value, 0);
                valid_lft = read_u32(value, 4);
            }
            _ => {}
        }
    }
    // IFA_LOCAL is the address on this host when present (it differs from
    // IFA_ADDRESS only for point-to-point peers); IPv6 usually sends only
    // IFA_ADDRESS.
    Some(AddrEntry {
        index,
        addr: local.or(address)?,
        prefix_len,
        flags,
        valid_lft,
        preferred_lft,
    })
}

// ---------------------------------------------------------------------------
// I/O

/// A NETLINK_ROUTE socket in the calling thread's network namespace.
pub(crate) struct NlSocket {
    fd: OwnedFd,
    seq: u32,
    port: u32,
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub(crate) fn set_recv_timeout(fd: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the pointer and length describe a live timeval.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl NlSocket {
    pub fn open() -> io::Result<NlSocket> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        set_recv_timeout(&fd, RECV_TIMEOUT)?;
        // Extended acks give the kernel's own explanation of a refusal;
        // capped acks keep error replies small. Both are best effort: older
        // kernels without them still work, with plainer errors.
        let _ = setsockopt_int(&fd, SOL_NETLINK, NETLINK_EXT_ACK, 1);
        let _ = setsockopt_int(&fd, SOL_NETLINK, NETLINK_CAP_ACK, 1);

        // SAFETY: an all-zero sockaddr_nl is valid (port 0 = kernel assigns).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let mut sa_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: the pointer and length describe a live sockaddr_nl.
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                sa_len,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the pointer and length describe a live sockaddr_nl.
        if unsafe {
            libc::getsockname(
                fd.as_raw_fd(),
                (&mut sa as *mut libc::sockaddr_nl).cast(),
                &mut sa_len,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(NlSocket {
            fd,
            // Any start works: replies are matched on (seq, port).
            seq: std::process::id(),
            port: sa.nl_pid,
        })
    }

    fn send(&mut self, msg_type: u16, flags: u16, body: &[u8]) -> Result<u32, NlFailure> {
        self.seq = self.seq.wrapping_add(1);
        let msg = encode_message(msg_type, flags, self.seq, body);
        // SAFETY: an all-zero sockaddr_nl addresses the kernel.
        let mut dst: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        dst.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: the buffers and lengths describe live memory.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&dst as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error().into());
        }
        if n as usize != msg.len() {
            return Err(NlFailure::Protocol(format!(
                "short netlink send: {n} of {} bytes",
                msg.len()
            )));
        }
        Ok(self.seq)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, NlFailure> {
        loop {
            // MSG_TRUNC makes recv report the real datagram size, so a
            // truncated reply is detected instead of half-parsed.
            // SAFETY: the buffer and its length describe live memory.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Err(NlFailure::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no netlink reply within {RECV_TIMEOUT:?}"),
                    )));
                }
                return Err(e.into());
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(NlFailure::Protocol(format!(
                    "netlink datagram of {n} bytes exceeds the {}-byte buffer",
                    buf.len()
                )));
            }
            return Ok(n);
        }
    }

    /// Sends a request and collects the payloads of the replies of type
    /// `reply_type` until the kernel's ACK (for a plain request) or
    /// NLMSG_DONE (for a dump).
    fn transact(
        &mut self,
        msg_type: u16,
        flags: u16,
        body: &[u8],
        reply_type: Option<u16>,
    ) -> Result<Vec<Vec<u8>>, NlFailure> {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let seq = self.send(msg_type, flags, body)?;
        let mut buf = vec![0u8; RECV_BUF_LEN];
        let mut out = Vec::new();
        let mut seen = 0usize;
        loop {
            let n = self.recv(&mut buf)?;
            for m in split_messages(&buf[..n])? {
                seen += 1;
                if seen > MAX_MESSAGES_PER_REQUEST {
                    return Err(NlFailure::Protocol(format!(
                        "more than {MAX_MESSAGES_PER_REQUEST} netlink messages in one reply"
                    )));
                }
                // Stale replies to an earlier, timed-out request are skipped.
                if m.seq != seq || (m.port != self.port && m.port != 0) {
                    continue;
                }
                match m.msg_type {
                    NLMSG_NOOP => {}
                    NLMSG_ERROR => {
                        decode_error(m.flags, m.payload)?;
                        // A zero error is the ACK that ends a plain request.
                        if !dump {
                            return Ok(out);
                        }
                    }
                    NLMSG_DONE => {
                        if m.flags & NLM_F_DUMP_INTR != 0 {
                            return Err(NlFailure::Errno {
                                errno: libc::EINTR,
                                message: Some("dump interrupted by a concurrent change".into()),
                            });
                        }
                        // NLMSG_DONE carries the dump's final status.
                        if let Some(code) = read_i32(m.payload, 0) {
                            if code < 0 {
                                return Err(NlFailure::Errno {
                                    errno: code.saturating_neg(),
                                    message: None,
                                });
                            }
                        }
                        return Ok(out);
                    }
                    NLMSG_OVERRUN => {
                        return Err(NlFailure::Protocol("netlink overrun".into()));
                    }
                    t if Some(t) == reply_type => out.push(m.payload.to_vec()),
                    _ => {}
                }
            }
        }
    }

    /// Looks an interface up by name. ENODEV means no such interface.
    pub fn get_link(&mut self, ifname: &str) -> Result<LinkInfo, NlFailure> {
        let replies = self.transact(
            RTM_GETLINK,
            NLM_F_REQUEST | NLM_F_ACK,
            &getlink_body(ifname),
            Some(RTM_NEWLINK),
        )?;
        let first = replies
            .first()
            .ok_or_else(|| NlFailure::Protocol("RTM_GETLINK answered without a link".into()))?;
        decode_link(first)
    }

    /// Adds the address or, if present, replaces its lifetimes.
    pub fn new_addr(
        &mut self,
        index: u32,
        addr: &IpAddr,
        prefix_len: u8,
        lifetime_secs: u32,
        flags: u32,
    ) -> Result<(), NlFailure> {
        self.transact(
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &newaddr_body(index, addr, prefix_len, lifetime_secs, flags),
            None,
        )
        .map(|_| ())
    }

    pub fn del_addr(&mut self, index: u32, addr: &IpAddr, prefix_len: u8) -> Result<(), NlFailure> {
        self.transact(
            RTM_DELADDR,
            NLM_F_REQUEST | NLM_F_ACK,
            &deladdr_body(index, addr, prefix_len),
            None,
        )
        .map(|_| ())
    }

    /// Lists the addresses of one family, retrying a dump that a concurrent
    /// change interrupted.
    pub fn dump_addrs(&mut self, family: u8) -> Result<Vec<AddrEntry>, NlFailure> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.transact(
                RTM_GETADDR,
                NLM_F_REQUEST | NLM_F_DUMP,
                &getaddr_dump_body(family),
                Some(RTM_NEWADDR),
            ) {
                Ok(payloads) => {
                    return Ok(payloads.iter().filter_map(|p| decode_addr(p)).collect())
                }
                Err(NlFailure::Errno { errno, .. })
                    if errno == libc::EINTR && attempt < MAX_DUMP_ATTEMPTS => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn newaddr_v4_layout() {
        let a = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 100));
        let b = newaddr_body(7, &a, 24, 30, 0);
        assert_eq!(&b[..4], &[libc::AF_INET as u8, 24, 0, 0]);
        assert_eq!(read_u32(&b, 4), Some(7));
        let got: Vec<(u16, Vec<u8>)> = attrs(&b[8..]).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(got[0], (IFA_LOCAL, vec![10, 77, 0, 100]));
        assert_eq!(got[1], (IFA_ADDRESS, vec![10, 77, 0, 100]));
        assert_eq!(got[2].0, IFA_CACHEINFO);
        assert_eq!(read_u32(&got[2].1, 0), Some(30));
        assert_eq!(read_u32(&got[2].1, 4), Some(30));
        assert_eq!(got[3], (IFA_FLAGS, 0u32.to_ne_bytes().to_vec()));
        assert_eq!(got.len(), 4);
        // Every attribute is 4-aligned, so the body is too.
        assert_eq!(b.len() % 4, 0);
    }

    #[test]
    fn newaddr_v6_sets_nodad_in_both_flag_fields() {
        let a = IpAddr::V6("fd77::100".parse::<Ipv6Addr>().unwrap());
        let b = newaddr_body(3, &a, 64, 10, IFA_F_NODAD);
        assert_eq!(b[0], libc::AF_INET6 as u8);
        assert_eq!(u32::from(b[2]), IFA_F_NODAD);
        let flags = attrs(&b[8..])
            .find(|(k, _)| *k == IFA_FLAGS)
            .map(|(_, v)| v.to_vec());
        assert_eq!(flags, Some(IFA_F_NODAD.to_ne_bytes().to_vec()));
    }

    #[test]
    fn message_roundtrip_through_split() {
        let body = getlink_body("veth0");
        let mut dgram = encode_message(RTM_GETLINK, NLM_F_REQUEST, 42, &body);
        dgram.extend(encode_message(NLMSG_DONE, 0, 43, &0i32.to_ne_bytes()));
        let msgs = split_messages(&dgram).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].msg_type, RTM_GETLINK);
        assert_eq!(msgs[0].seq, 42);
        assert_eq!(msgs[0].payload, &body[..]);
        assert_eq!(msgs[1].msg_type, NLMSG_DONE);
        let name: Vec<_> = attrs(&msgs[0].payload[IFINFOMSG_LEN..]).collect();
        assert_eq!(name, vec![(IFLA_IFNAME, &b"veth0\0"[..])]);
    }

    #[test]
    fn split_rejects_bad_lengths() {
        let mut dgram = encode_message(NLMSG_DONE, 0, 1, &[0; 4]);
        dgram[0] = 200; // claims more bytes than the datagram has
        assert!(matches!(
            split_messages(&dgram),
            Err(NlFailure::Protocol(_))
        ));
        let mut dgram = encode_message(NLMSG_DONE, 0, 1, &[0; 4]);
        dgram[..4].copy_from_slice(&3u32.to_ne_bytes()); // shorter than a header
        assert!(matches!(
            split_messages(&dgram),
            Err(NlFailure::Protocol(_))
        ));
    }

    #[test]
    fn error_with_extended_ack_message() {
        // errno, capped original header, then NLMSGERR_ATTR_MSG.
        let mut p = (-libc::EINVAL).to_ne_bytes().to_vec();
        p.extend(encode_message(RTM_NEWADDR, NLM_F_REQUEST, 1, &[]));
        push_attr(&mut p, NLMSGERR_ATTR_MSG, b"Invalid lifetime\0");
        match decode_error(NLM_F_CAPPED | NLM_F_ACK_TLVS, &p) {
            Err(NlFailure::Errno { errno, message }) => {
                assert_eq!(errno, libc::EINVAL);
                assert_eq!(message.as_deref(), Some("Invalid lifetime"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(decode_error(0, &0i32.to_ne_bytes()).is_ok());
        assert!(matches!(
            decode_error(0, &[1, 2]),
            Err(NlFailure::Protocol(_))
        ));
    }

    #[test]
    fn decode_addr_v4_and_v6() {
        let mut p = ifaddrmsg(libc::AF_INET as u8, 24, 0, 9);
        push_attr(&mut p, IFA_ADDRESS, &[10, 0, 0, 1]);
        push_attr(&mut p, IFA_LOCAL, &[10, 0, 0, 2]);
        let mut ci = 20u32.to_ne_bytes().to_vec();
        ci.extend(25u32.to_ne_bytes());
        ci.extend([0; 8]);
        push_attr(&mut p, IFA_CACHEINFO, &ci);
        push_attr(&mut p, IFA_FLAGS, &IFA_F_TENTATIVE.to_ne_bytes());
        let e = decode_addr(&p).unwrap();
        assert_eq!(e.addr, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!((e.index, e.prefix_len), (9, 24));
        assert_eq!((e.preferred_lft, e.valid_lft), (Some(20), Some(25)));
        assert!(e.tentative() && !e.dad_failed());

        let v6: Ipv6Addr = "fd77::1".parse().unwrap();
        let mut p = ifaddrmsg(libc::AF_INET6 as u8, 64, IFA_F_DADFAILED as u8, 2);
        push_attr(&mut p, IFA_ADDRESS, &v6.octets());
        let e = decode_addr(&p).unwrap();
        assert_eq!(e.addr, IpAddr::V6(v6));
        assert!(e.dad_failed());
        assert_eq!(e.valid_lft, None);
        // Wrong-length address: ignored, not misread.
        let mut p = ifaddrmsg(libc::AF_INET as u8, 24, 0, 9);
        push_attr(&mut p, IFA_LOCAL, &[1, 2, 3]);
        assert_eq!(decode_addr(&p), None);
    }

    #[test]
    fn decode_link_reads_index_type_and_mac() {
        let mut p = vec![0u8; IFINFOMSG_LEN];
        p[2..4].copy_from_slice(&1u16.to_ne_bytes());
        p[4..8].copy_from_slice(&5i32.to_ne_bytes());
        push_attr(&mut p, IFLA_IFNAME, b"v0\0");
        push_attr(&mut p, IFLA_ADDRESS, &[2, 0, 0, 0, 0, 1]);
        let l = decode_link(&p).unwrap();
        assert_eq!(
            l,
            LinkInfo {
                index: 5,
                hw_type: 1,
                hw_addr: vec![2, 0, 0, 0, 0, 1]
            }
        );
        assert!(decode_link(&p[..6]).is_err());
    }
}
