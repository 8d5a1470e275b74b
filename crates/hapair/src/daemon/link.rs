//! Datagram links between cluster members: QUIC connections with mutual TLS
//! (the cluster CA) that carry small unreliable messages — heartbeats
//! between the two nodes, requests and replies between a node and the
//! witness. QUIC gives authentication, encryption and replay protection; a
//! datagram that is lost is simply superseded by the next one, which is what
//! heartbeats and lease requests want (no head-of-line blocking behind a
//! retransmission).
//!
//! A [`Link`] is the client side: one task keeps a connection up to one
//! address (reconnecting after a bounded pause) and sends what it is given;
//! datagrams the server sends back arrive on the link's channel. A
//! [`serve`] task is the server side: it accepts connections from the names
//! it allows and hands every datagram to a channel, with the connection to
//! answer on.

use bytes::Bytes;
use hapair_transport::{TlsMaterial, TransportTuning};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Largest datagram accepted from a peer (the messages are a few hundred
/// bytes; anything larger is hostile or a bug).
pub const MAX_DATAGRAM_BYTES: usize = 1200;

/// QUIC parameters for a datagram link: keep-alives a little slower than
/// the messages, an idle timeout that outlives a declared-dead peer, and
/// small stream windows (no streams are used).
pub fn tuning(interval_ms: u64, timeout_ms: u64) -> TransportTuning {
    let idle = Duration::from_millis((2 * timeout_ms).max(1000));
    let keep = Duration::from_millis((2 * interval_ms).max(50)).min(idle / 3);
    TransportTuning {
        keep_alive_interval: keep,
        max_idle_timeout: idle,
        stream_receive_window_bytes: 64 << 10,
        receive_window_bytes: 128 << 10,
        send_window_bytes: 128 << 10,
        max_concurrent_bidi_streams: 0,
        // Small messages at a steady rate: QUIC's usual acknowledgement
        // pace (the replication's batching tuning does not apply here).
        ack_eliciting_threshold: 1,
        max_ack_delay: Duration::from_millis(25),
        // Small datagrams only: quinn's Ethernet-sized default.
        max_udp_payload_bytes: 1472,
    }
}

/// What a link reports besides datagrams.
#[derive(Debug)]
pub enum LinkEvent {
    Datagram(Bytes),
    Up,
    Down(String),
}

/// The client side of a datagram link.
pub struct Link {
    conn: Arc<Mutex<Option<quinn::Connection>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Keeps a connection to `addr` (whose certificate must be `expected`'s)
    /// until dropped; datagrams from the server and up/down changes go to
    /// `events` (dropped, not queued, when the receiver lags).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        what: String,
        addr: SocketAddr,
        expected: String,
        tls: TlsMaterial,
        alpn: &'static [u8],
        tuning: TransportTuning,
        retry_ms: u64,
        connect_timeout_ms: u64,
        events: Option<mpsc::Sender<LinkEvent>>,
    ) -> Link {
        let conn = Arc::new(Mutex::new(None::<quinn::Connection>));
        let slot = conn.clone();
        let task = tokio::spawn(async move {
            let mut logged_down = false;
            loop {
                let r = async {
                    let ep = hapair_transport::client_endpoint_with(addr, &tls, alpn, &tuning)?;
                    let c = hapair_transport::connect(
                        &ep,
                        addr,
                        Some(&expected),
                        Duration::from_millis(connect_timeout_ms),
                    )
                    .await?;
                    anyhow::Ok((ep, c))
                }
                .await;
                match r {
                    Ok((_ep, c)) => {
                        info!(%addr, "{what}: connected");
                        logged_down = false;
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                        if let Some(ev) = &events {
                            let _ = ev.try_send(LinkEvent::Up);
                        }
                        let why = loop {
                            match c.read_datagram().await {
                                Ok(d) => {
                                    if d.len() > MAX_DATAGRAM_BYTES {
                                        warn!(%addr, len = d.len(), "{what}: oversized datagram dropped");
                                        continue;
                                    }
                                    if let Some(ev) = &events {
                                        let _ = ev.try_send(LinkEvent::Datagram(d));
                                    }
                                }
                                Err(e) => break e.to_string(),
                            }
                        };
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        info!(%addr, "{what}: connection ended: {why}");
                        if let Some(ev) = &events {
                            let _ = ev.try_send(LinkEvent::Down(why));
                        }
                    }
                    Err(e) => {
                        if !logged_down {
                            warn!(%addr, "{what}: cannot connect: {e:#}");
                            logged_down = true;
                        } else {
                            debug!(%addr, "{what}: cannot connect: {e:#}");
                        }
                        if let Some(ev) = &events {
                            let _ = ev.try_send(LinkEvent::Down(format!("{e:#}")));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(retry_ms)).await;
            }
        });
        Link { conn, task }
    }

    /// Sends one datagram if the link is up; returns whether it was handed
    /// to QUIC (which may still lose it).
    pub fn send(&self, data: Bytes) -> bool {
        let c = self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match c {
            Some(c) => c.send_datagram(data).is_ok(),
            None => false,
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(c) = self.conn.lock().unwrap_or_else(|p| p.into_inner()).take() {
            c.close(0u32.into(), b"bye");
        }
    }
}

/// A datagram received by a server, with who sent it and the connection
/// to answer on.
pub struct Received {
    pub from: String,
    pub data: Bytes,
    pub conn: quinn::Connection,
}

/// Accepts connections on `ep` from certificates named in `allowed` and
/// forwards their datagrams to `out` (dropped when `out` is full: a flood
/// cannot grow memory). Runs until the endpoint is closed.
pub async fn serve(
    what: &'static str,
    ep: quinn::Endpoint,
    allowed: Vec<String>,
    out: mpsc::Sender<Received>,
) {
    let allowed = Arc::new(allowed);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            incoming = ep.accept() => {
                let Some(incoming) = incoming else { break };
                if conns.len() >= 64 {
                    // More live connections than any legitimate use; refuse
                    // rather than grow.
                    incoming.refuse();
                    continue;
                }
                let (allowed, out) = (allowed.clone(), out.clone());
                conns.spawn(async move {
                    let remote = incoming.remote_address();
                    let conn = match incoming.await {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(%remote, "{what}: refused connection: {e}");
                            return;
                        }
                    };
                    let from = hapair_transport::peer_node_name(&conn).unwrap_or_default();
                    if !allowed.contains(&from) {
                        warn!(%remote, from, "{what}: certificate of a cluster member that may not talk here; closing");
                        conn.close(3u32.into(), b"not allowed");
                        return;
                    }
                    debug!(%remote, from, "{what}: connection accepted");
                    loop {
                        match conn.read_datagram().await {
                            Ok(d) => {
                                if d.len() > MAX_DATAGRAM_BYTES {
                                    warn!(%remote, from, len = d.len(), "{what}: oversized datagram dropped");
                                    continue;
                                }
                                let _ = out.try_send(Received {
                                    from: from.clone(),
                                    data: d,
                                    conn: conn.clone(),
                                });
                            }
                            Err(e) => {
                                debug!(%remote, from, "{what}: connection ended: {e}");
                                return;
                            }
                        }
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
}
