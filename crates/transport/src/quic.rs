//! QUIC endpoints with mutual TLS between the nodes of one cluster.
//!
//! Both sides authenticate with a certificate signed by the cluster CA
//! (see [`crate::tls_init`]). TLS 1.3 only, ring crypto, no session
//! resumption (connections are rare and long-lived, so every handshake does
//! the full certificate check).

use crate::certs::{validate_node_name, TlsMaterial};
use anyhow::{anyhow, Context, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The ring crypto provider, built once. Configurations name it explicitly
/// so that they do not depend on the process-wide default.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(ring_provider())).clone()
}

/// ring with AES-128-GCM preferred (rustls puts AES-256-GCM first). Every
/// replicated byte is sealed by the primary and opened by the mirror, and
/// AES-GCM was ~11 % of each side's CPU in a sequential write; AES-128 does
/// 10 rounds per block instead of 14. Both are TLS 1.3 suites (AES-128-GCM
/// is the one every implementation must offer); the peer may still pick
/// another one it prefers among those offered.
fn ring_provider() -> CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    let first = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    p.cipher_suites.retain(|s| s.suite() != first.suite());
    p.cipher_suites.insert(0, first);
    p
}

/// Installs ring as the process-wide rustls crypto provider. Idempotent: if
/// a provider is already installed (by an earlier call or by someone else),
/// it is left in place. The configurations built by this crate name ring
/// explicitly, so they work either way.
pub fn install_crypto_provider() {
    let _ = ring_provider().install_default();
}

/// QUIC transport parameters. The defaults suit a pair of nodes on one LAN
/// with a replication pipeline of about 32 MiB in flight; quinn's own
/// defaults are sized for wide-area links and would throttle it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportTuning {
    /// How often an idle connection sends a keep-alive (must be well under
    /// `max_idle_timeout`).
    pub keep_alive_interval: Duration,
    /// A connection that hears nothing from its peer for this long is closed.
    /// The effective value is the smaller of both sides'.
    pub max_idle_timeout: Duration,
    /// How many bytes one stream may have in flight unread by the receiver.
    pub stream_receive_window_bytes: u64,
    /// How many bytes all streams of a connection together may have in flight.
    pub receive_window_bytes: u64,
    /// How many bytes the sender buffers for unacknowledged data.
    pub send_window_bytes: u64,
    /// Most bidirectional streams the peer may open at once.
    pub max_concurrent_bidi_streams: u32,
    /// How many ack-eliciting packets the peer may receive from us before it
    /// must acknowledge them at once (QUIC ACK frequency extension; both
    /// ends are quinn). The default of quinn, 1, makes the mirror answer
    /// every 4 KiB write (several packets) with an ACK-only packet just
    /// before its own acknowledgement: a second wake-up of the mount per
    /// durability point. Replies carry the ACKs instead.
    pub ack_eliciting_threshold: u32,
    /// The longest the peer may delay an acknowledgement (clamped by quinn
    /// to at most the greater of the RTT and 25 ms).
    pub max_ack_delay: Duration,
    /// The largest UDP payload this endpoint accepts and looks for with
    /// path MTU discovery (padded probes, acknowledged or lost: a path with
    /// a smaller MTU costs a few lost probes). Packets start at 1,200 bytes
    /// and grow to what the path carries, up to this.
    pub max_udp_payload_bytes: u16,
}

/// The default [`TransportTuning::max_udp_payload_bytes`]: packets up to
/// this size on a link with jumbo frames. quinn sends up to 10 packets in
/// one GSO send, which must fit in one 64 KiB UDP datagram: 10 × 6,500
/// does; 10 × 8,972 (a 9,000-byte frame) did not, and quinn took the
/// failed sends for a black hole and fell back to 1,200-byte packets.
pub const MAX_UDP_PAYLOAD_BYTES: u16 = 6_500;

impl Default for TransportTuning {
    fn default() -> Self {
        TransportTuning {
            keep_alive_interval: Duration::from_secs(1),
            max_idle_timeout: Duration::from_secs(10),
            // 32 MiB of pipeline plus room for one maximal frame, so that a
            // full pipeline never stalls on the last frame's flow credit.
            stream_receive_window_bytes: 40 << 20,
            receive_window_bytes: 64 << 20,
            send_window_bytes: 64 << 20,
            max_concurrent_bidi_streams: 16,
            ack_eliciting_threshold: 32,
            max_ack_delay: Duration::from_millis(5),
            max_udp_payload_bytes: MAX_UDP_PAYLOAD_BYTES,
        }
    }
}

impl TransportTuning {
    /// Builds quinn's transport configuration. The MTU is left at quinn's
    /// defaults on purpose: a large `initial_mtu` hung bulk transfers on
    /// loopback.
    pub fn transport_config(&self) -> Result<TransportConfig> {
        if self.keep_alive_interval.is_zero() || self.keep_alive_interval >= self.max_idle_timeout {
            anyhow::bail!(
                "keep-alive interval {:?} must be non-zero and shorter than the idle timeout {:?}",
                self.keep_alive_interval,
                self.max_idle_timeout
            );
        }
        let mut t = TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive_interval));
        t.max_idle_timeout(Some(IdleTimeout::try_from(self.max_idle_timeout).map_err(
            |_| anyhow!("idle timeout {:?} is out of range", self.max_idle_timeout),
        )?));
        let varint = |v: u64, what: &str| {
            VarInt::from_u64(v).map_err(|_| anyhow!("{what} {v} is out of range"))
        };
        t.stream_receive_window(varint(
            self.stream_receive_window_bytes,
            "stream receive window",
        )?);
        t.receive_window(varint(self.receive_window_bytes, "receive window")?);
        t.send_window(self.send_window_bytes);
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_bidi_streams));
        // hapair uses bidirectional streams only.
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(VarInt::from_u32(self.ack_eliciting_threshold))
            .max_ack_delay(Some(self.max_ack_delay));
        t.ack_frequency_config(Some(ack));
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload_bytes);
        t.mtu_discovery_config(Some(mtu));
        Ok(t)
    }
}

/// What the UDP sockets ask for as kernel receive and send buffers. The
/// kernel's default receive buffer (net.core.rmem_default, ~208 KiB) holds
/// less than a millisecond of a bulk stream: while the receiving thread
/// waits for a CPU, datagrams are dropped, the sender's congestion control
/// backs off, and bulk throughput falls (measured: ~300 datagrams dropped
/// per GiB streamed on the bench's veth).
/// The kernel caps the request at net.core.rmem_max / wmem_max.
pub const UDP_SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Asks for [`UDP_SOCKET_BUFFER_BYTES`] of receive and send buffer and
/// returns what the kernel granted (receive, send; 0 where it could not be
/// read). Says so once if that is less: not an error, smaller buffers only
/// cost throughput under load.
fn size_socket_buffers(socket: &std::net::UdpSocket, addr: SocketAddr) -> [usize; 2] {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let mut granted = [0; 2];
    for (i, (opt, name, sysctl)) in [
        (libc::SO_RCVBUF, "receive", "net.core.rmem_max"),
        (libc::SO_SNDBUF, "send", "net.core.wmem_max"),
    ]
    .into_iter()
    .enumerate()
    {
        let want = UDP_SOCKET_BUFFER_BYTES as libc::c_int;
        let int_len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: fd is an open socket owned by `socket`; the option value
        // is a c_int of the given size.
        let set = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&want as *const libc::c_int).cast(),
                int_len,
            )
        };
        let mut got: libc::c_int = 0;
        let mut len = int_len;
        // SAFETY: as above; `got` and `len` are valid for writes.
        let read = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut got as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        // The kernel reports twice what it granted (its bookkeeping).
        granted[i] = if read == 0 {
            got.max(0) as usize / 2
        } else {
            0
        };
        if set != 0 || granted[i] < UDP_SOCKET_BUFFER_BYTES {
            static WARNED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    "UDP {name} buffer on {addr} is {} KiB, asked for {} KiB: raise {sysctl} \
                     to at least {} for full replication throughput",
                    granted[i] >> 10,
                    UDP_SOCKET_BUFFER_BYTES >> 10,
                    UDP_SOCKET_BUFFER_BYTES
                );
            }
        }
    }
    granted
}

/// An endpoint over a new UDP socket bound to `addr`.
fn endpoint(
    addr: SocketAddr,
    tuning: &TransportTuning,
    server: Option<quinn::ServerConfig>,
    runtime: Arc<dyn quinn::Runtime>,
) -> Result<quinn::Endpoint> {
    // The largest payload accepted, which is also announced to the peer
    // (its MTU discovery stops there).
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(tuning.max_udp_payload_bytes)
        .map_err(|_| {
            anyhow!(
                "UDP payload size {} is out of range (1200-65527)",
                tuning.max_udp_payload_bytes
            )
        })?;
    let socket = std::net::UdpSocket::bind(addr)
        .with_context(|| format!("cannot bind a UDP socket on {addr}"))?;
    size_socket_buffers(&socket, addr);
    quinn::Endpoint::new(config, server, socket, runtime)
        .with_context(|| format!("cannot start a QUIC endpoint on UDP {addr}"))
}

/// A QUIC server endpoint bound to `addr` with default tuning. See
/// [`server_endpoint_with`].
pub fn server_endpoint(
    addr: SocketAddr,
    tls: &TlsMaterial,
    alpn: &[u8],
) -> Result<quinn::Endpoint> {
    server_endpoint_with(addr, tls, alpn, &TransportTuning::default())
}

/// A QUIC server endpoint bound to `addr`. It presents this node's
/// certificate and requires every client to present a certificate signed by
/// the cluster CA (and usable for client authentication). Clients must offer
/// the ALPN `alpn`.
pub fn server_endpoint_with(
    addr: SocketAddr,
    tls: &TlsMaterial,
    alpn: &[u8],
    tuning: &TransportTuning,
) -> Result<quinn::Endpoint> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(tls.roots.clone(), provider.clone())
        .build()
        .context("cannot build the client certificate verifier")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is not available with the ring provider")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.chain.clone(), tls.key.clone_key())
        .with_context(|| {
            format!(
                "the certificate or key of node '{}' is unusable",
                tls.node()
            )
        })?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    // QUIC requires 0 or u32::MAX here; 0-RTT is not used.
    cfg.max_early_data_size = 0;
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    let quic =
        QuicServerConfig::try_from(cfg).context("the TLS configuration is not usable for QUIC")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(tuning.transport_config()?));
    endpoint(addr, tuning, Some(server), Arc::new(quinn::TokioRuntime))
        .with_context(|| format!("cannot listen on UDP {addr}"))
}

/// A client endpoint with default tuning. See [`client_endpoint_with`].
pub fn client_endpoint(
    peer: SocketAddr,
    tls: &TlsMaterial,
    alpn: &[u8],
) -> Result<quinn::Endpoint> {
    client_endpoint_with(peer, tls, alpn, &TransportTuning::default())
}

/// A client endpoint bound to an ephemeral port of the same address family
/// as `peer`, presenting this node's certificate and offering `alpn`. Use it
/// with [`connect`].
pub fn client_endpoint_with(
    peer: SocketAddr,
    tls: &TlsMaterial,
    alpn: &[u8],
    tuning: &TransportTuning,
) -> Result<quinn::Endpoint> {
    client_endpoint_on(peer, tls, alpn, tuning, Arc::new(quinn::TokioRuntime))
}

/// A client endpoint as [`client_endpoint`] makes, whose connections can
/// send from the thread that writes (see [`crate::InlineRuntime`]). Call it
/// inside a tokio runtime.
pub fn client_endpoint_inline(
    peer: SocketAddr,
    tls: &TlsMaterial,
    alpn: &[u8],
) -> Result<(quinn::Endpoint, Arc<crate::InlineRuntime>)> {
    let rt = crate::InlineRuntime::new(
        tokio::runtime::Handle::try_current().context("no tokio runtime for the endpoint")?,
    );
    let ep = client_endpoint_on(peer, tls, alpn, &TransportTuning::default(), rt.clone())?;
    Ok((ep, rt))
}

fn client_endpoint_on(
    peer: SocketAddr,
    tls: &TlsMaterial,
    alpn: &[u8],
    tuning: &TransportTuning,
    runtime: Arc<dyn quinn::Runtime>,
) -> Result<quinn::Endpoint> {
    let provider = provider();
    let verifier = ClusterServerVerifier {
        roots: tls.roots.clone(),
        algs: provider.signature_verification_algorithms,
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 is not available with the ring provider")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(tls.chain.clone(), tls.key.clone_key())
        .with_context(|| {
            format!(
                "the certificate or key of node '{}' is unusable",
                tls.node()
            )
        })?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_early_data = false;
    let quic =
        QuicClientConfig::try_from(cfg).context("the TLS configuration is not usable for QUIC")?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(tuning.transport_config()?));

    let bind: SocketAddr = match peer {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let mut ep = endpoint(bind, tuning, None, runtime)?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// Connects to `peer` and completes the handshake within `timeout`.
///
/// The server's certificate must chain to the cluster CA. With
/// `expected_node`, it must also be that node's certificate; with `None`,
/// any node certificate of the cluster is accepted (use [`peer_node_name`] to
/// learn which).
///
/// With TLS 1.3 the client finishes its handshake before the server has
/// checked the client's certificate: if the server refuses it, this returns
/// a connection that fails on its first stream operation.
pub async fn connect(
    ep: &quinn::Endpoint,
    peer: SocketAddr,
    expected_node: Option<&str>,
    timeout: Duration,
) -> Result<quinn::Connection> {
    // The verifier checks the name when it is a DNS name. Without an
    // expected node, the peer's IP address is passed instead, which the
    // verifier takes as "any node of the cluster" (node names are never IP
    // addresses, see `validate_node_name`).
    let server_name = match expected_node {
        Some(node) => {
            validate_node_name(node).context("expected peer node name")?;
            node.to_string()
        }
        None => peer.ip().to_string(),
    };
    let connecting = ep
        .connect(peer, &server_name)
        .with_context(|| format!("cannot start a connection to {peer}"))?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context(match expected_node {
            Some(node) => format!("handshake with node '{node}' at {peer} failed"),
            None => format!("handshake with {peer} failed"),
        })),
        Err(_) => Err(anyhow!("connecting to {peer} timed out after {timeout:?}")),
    }
}

/// True when `e` (or any error in its chain) is a QUIC connection that
/// ended on a TLS failure: this side refused the peer's certificate or
/// ALPN, or the peer refused ours. Such a failure is a configuration
/// problem (wrong cluster, wrong node, wrong port), not an outage: retrying
/// or carrying on alone would hide it.
pub fn is_authentication_failure(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<quinn::ConnectionError>()
            .is_some_and(connection_error_is_tls)
    })
}

/// QUIC carries TLS alerts as transport error codes 0x100..=0x1ff (RFC 9001
/// section 4.8), in either direction.
fn connection_error_is_tls(e: &quinn::ConnectionError) -> bool {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => u64::from(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        _ => return false,
    };
    (0x100..=0x1ff).contains(&code)
}

/// The node name of the authenticated peer: the first DNS subject
/// alternative name of its certificate, else its common name. `None` if the
/// peer presented no certificate (which the endpoints of this crate never
/// accept) or it cannot be parsed.
pub fn peer_node_name(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    node_name_of(certs.first()?)
}

fn node_name_of(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(n) = name {
                return Some((*n).to_string());
            }
        }
    }
    let cn = x509.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// Checks a server certificate against the cluster CA: always the chain
/// (signatures, validity dates, serverAuth usage), and the name when the
/// client asked for a DNS name. An IP address as server name means "any node
/// of the cluster" (see [`connect`]).
#[derive(Debug)]
struct ClusterServerVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        match server_name {
            ServerName::DnsName(_) => rustls::client::verify_server_name(&cert, server_name)?,
            ServerName::IpAddress(_) => {}
            _ => {
                return Err(rustls::Error::General(
                    "unsupported server name type".into(),
                ))
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel allows for one option (`/proc/sys/net/core/NAME`).
    fn sysctl(name: &str) -> usize {
        let path = format!("/proc/sys/net/core/{name}");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn aes_128_gcm_is_offered_first_and_the_others_stay() {
        let suites: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let stock: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(suites.len(), stock.len(), "{suites:?} against {stock:?}");
        assert!(stock.iter().all(|s| suites.contains(s)));
    }

    #[test]
    fn sockets_get_the_buffers_the_kernel_allows() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let [recv, send] = size_socket_buffers(&socket, addr);
        // Without the request the socket would have the defaults
        // (rmem_default / wmem_default), usually far below the maxima.
        assert_eq!(recv, UDP_SOCKET_BUFFER_BYTES.min(sysctl("rmem_max")));
        assert_eq!(send, UDP_SOCKET_BUFFER_BYTES.min(sysctl("wmem_max")));
    }
}
