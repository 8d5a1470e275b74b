//! A hostile replication client for bad-input tests: it holds a *valid*
//! cluster certificate, does the real QUIC + mutual TLS connection and the
//! real protocol handshake (`Hello` / `HelloOk`), and then sends whatever
//! bytes the test wants, including operations whose paths a `RelPath`
//! cannot represent (`..`, absolute, NUL, empty components). Those are
//! built by encoding a legitimate message with a marker path and splicing
//! hand-made postcard bytes in its place, so nothing on this side validates
//! them.

use hapair_proto::{FromMirror, Op, RelPath, Seq, ToMirror, ALPN_REPLICATION, PROTOCOL_VERSION};
use hapair_transport::{FrameReader, FrameWriter, TlsMaterial};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// A 16-byte path component that marks where a path sits in an encoded
/// header.
pub const MARKER: &[u8] = b"@@HOSTILE-PATH@@";

/// The one-component marker path, for building template messages.
pub fn marker_path() -> RelPath {
    RelPath::from_components(vec![MARKER.to_vec()])
        .unwrap_or_else(|e| panic!("the marker is a valid component: {e}"))
}

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The postcard bytes of a `Vec<Vec<u8>>` (how a `RelPath` travels), built
/// by hand so that no validation runs.
pub fn raw_path(components: &[Vec<u8>]) -> Vec<u8> {
    let mut v = Vec::new();
    varint(components.len(), &mut v);
    for c in components {
        varint(c.len(), &mut v);
        v.extend_from_slice(c);
    }
    v
}

/// A whole frame (length prefix included) for `msg`, with its one marker
/// path replaced by the raw `components`.
pub fn spliced_frame(msg: &ToMirror, payload: &[u8], components: &[Vec<u8>]) -> Vec<u8> {
    let mut frame = Vec::new();
    hapair_proto::encode_frame(msg, payload, &mut frame)
        .unwrap_or_else(|e| panic!("encoding the template {msg:?}: {e}"));
    let hlen = u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]) as usize;
    let header = &frame[8..8 + hlen];
    let needle = raw_path(&[MARKER.to_vec()]);
    let at = header
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("no marker path in the template {msg:?}"));
    let mut h = header[..at].to_vec();
    h.extend_from_slice(&raw_path(components));
    h.extend_from_slice(&header[at + needle.len()..]);
    let total = 4 + h.len() + payload.len();
    let mut out = (total as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&(h.len() as u32).to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
    out
}

/// A correctly encoded frame for `msg`.
pub fn frame(msg: &ToMirror, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    hapair_proto::encode_frame(msg, payload, &mut out)
        .unwrap_or_else(|e| panic!("encoding {msg:?}: {e}"));
    out
}

/// How a session looked from the client's side once the mirror ended it.
#[derive(Debug)]
pub struct SessionEnd {
    pub messages: Vec<FromMirror>,
    /// Why reading stopped: "stream finished", an error, or a timeout.
    pub end: String,
}

impl SessionEnd {
    /// The highest `applied` in the acks received (0 if none).
    pub fn applied(&self) -> Seq {
        self.messages
            .iter()
            .filter_map(|m| match m {
                FromMirror::Ack { applied, .. } => Some(*applied),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// The `Failed` message, if the mirror sent one.
    pub fn failed(&self) -> Option<(Seq, i32, &str)> {
        self.messages.iter().find_map(|m| match m {
            FromMirror::Failed { seq, errno, reason } => Some((*seq, *errno, reason.as_str())),
            _ => None,
        })
    }
}

/// One connection with the real handshake done.
pub struct HostileClient {
    rt: tokio::runtime::Runtime,
    // Kept so the connection lives as long as the client.
    _ep: quinn::Endpoint,
    conn: quinn::Connection,
    writer: Option<FrameWriter>,
    reader: FrameReader,
}

impl HostileClient {
    /// Connects to the mirror at `peer` as `node` (certificate from
    /// `tls_dir`) and completes the hello exchange. Errors say which step
    /// failed.
    pub fn connect(peer: SocketAddr, tls_dir: &Path, node: &str) -> Result<HostileClient, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let tls = TlsMaterial::load(tls_dir, node)
            .map_err(|e| format!("loading {node}'s TLS material: {e:#}"))?;
        let (ep, conn, writer, reader) = rt.block_on(async {
            let ep = hapair_transport::client_endpoint(peer, &tls, ALPN_REPLICATION)
                .map_err(|e| format!("client endpoint: {e:#}"))?;
            let conn = hapair_transport::connect(&ep, peer, None, Duration::from_secs(10))
                .await
                .map_err(|e| format!("connecting to {peer}: {e:#}"))?;
            let (send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| format!("opening the stream: {e}"))?;
            let mut writer = FrameWriter::new(send);
            let mut reader = FrameReader::new(recv);
            writer
                .send(
                    &ToMirror::Hello {
                        version: PROTOCOL_VERSION,
                        node: node.to_string(),
                        mode: hapair_proto::Mode::Sync,
                        // A standalone mirror's directory; the session's
                        // first op is seq 1.
                        dir: String::new(),
                        next_seq: 1,
                    },
                    &[],
                )
                .await
                .map_err(|e| format!("sending hello: {e:#}"))?;
            let body = tokio::time::timeout(Duration::from_secs(10), reader.next_body())
                .await
                .map_err(|_| "no answer to the hello within 10 s".to_string())?
                .map_err(|e| format!("reading the hello answer: {e:#}"))?
                .ok_or("the mirror closed the stream during the handshake")?;
            match hapair_proto::decode_from_mirror(body)
                .map_err(|e| format!("decoding the hello answer: {e}"))?
                .header
            {
                FromMirror::HelloOk { version, .. } if version == PROTOCOL_VERSION => {}
                other => return Err(format!("handshake answered with {other:?}")),
            }
            Ok::<_, String>((ep, conn, writer, reader))
        })?;
        Ok(HostileClient {
            rt,
            _ep: ep,
            conn,
            writer: Some(writer),
            reader,
        })
    }

    /// Writes raw bytes (one or more frames, or garbage) to the stream.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        let w = self.writer.as_mut().ok_or("the stream was finished")?;
        self.rt
            .block_on(w.send_raw(bytes))
            .map_err(|e| format!("sending: {e:#}"))
    }

    /// Sends `ToMirror::Op { seq, op }` correctly encoded.
    pub fn send_op(&mut self, seq: Seq, op: Op, payload: &[u8]) -> Result<(), String> {
        self.send_raw(&frame(&ToMirror::Op { seq, op }, payload))
    }

    /// Reads the mirror's messages until it ends the stream or the
    /// connection, or until `timeout` passes without one.
    pub fn read_until_end(&mut self, timeout: Duration) -> SessionEnd {
        let mut messages = Vec::new();
        let end = self.rt.block_on(async {
            loop {
                match tokio::time::timeout(timeout, self.reader.next_body()).await {
                    Err(_) => return format!("timeout: nothing for {timeout:?}"),
                    Ok(Ok(None)) => return "stream finished".to_string(),
                    Ok(Err(e)) => return format!("error: {e:#}"),
                    Ok(Ok(Some(body))) => match hapair_proto::decode_from_mirror(body) {
                        Ok(f) => messages.push(f.header),
                        Err(e) => return format!("undecodable message: {e}"),
                    },
                }
            }
        });
        SessionEnd { messages, end }
    }

    /// Reads until an ack covers `seq` (or the session ends).
    pub fn wait_applied(&mut self, seq: Seq, timeout: Duration) -> SessionEnd {
        let mut messages = Vec::new();
        let end = self.rt.block_on(async {
            loop {
                match tokio::time::timeout(timeout, self.reader.next_body()).await {
                    Err(_) => return format!("timeout: nothing for {timeout:?}"),
                    Ok(Ok(None)) => return "stream finished".to_string(),
                    Ok(Err(e)) => return format!("error: {e:#}"),
                    Ok(Ok(Some(body))) => match hapair_proto::decode_from_mirror(body) {
                        Ok(f) => {
                            let done =
                                matches!(f.header, FromMirror::Ack { applied, .. } if applied >= seq);
                            messages.push(f.header);
                            if done {
                                return "applied".to_string();
                            }
                        }
                        Err(e) => return format!("undecodable message: {e}"),
                    },
                }
            }
        });
        SessionEnd { messages, end }
    }
}

impl Drop for HostileClient {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"test client done");
        if let Some(w) = self.writer.take() {
            let _ = self.rt.block_on(w.finish());
        }
    }
}
