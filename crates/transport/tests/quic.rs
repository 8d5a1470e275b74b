//! Real QUIC over loopback: mutual TLS, refusals, frames, robustness.

use anyhow::{anyhow, Context, Result};
use hapair_proto::{decode_body, encode_frame, Frame, ALPN_REPLICATION, MAX_FRAME_BYTES};
use hapair_transport::{
    client_endpoint, client_endpoint_with, connect, install_crypto_provider,
    is_authentication_failure, peer_node_name, server_endpoint, server_endpoint_with, tls_init,
    FrameReader, FrameWriter, TlsMaterial, TransportTuning,
};
use rand::{Rng, RngCore, SeedableRng};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
enum Msg {
    Ping(u64),
    Data { seq: u64, note: String },
}

fn cluster(dir: &Path, nodes: &[&str]) -> Vec<TlsMaterial> {
    let names: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
    tls_init(dir, &names, false).unwrap();
    nodes
        .iter()
        .map(|n| TlsMaterial::load(dir, n).unwrap())
        .collect()
}

/// Asserts that `r` failed with an error whose text contains `what` (so a
/// refusal test cannot pass on an unrelated failure such as a timeout).
fn assert_has<T>(r: &Result<T>, what: &str) {
    match r {
        Ok(_) => panic!("expected an error containing {what:?}"),
        Err(e) => {
            let text = format!("{e:#}");
            assert!(text.contains(what), "expected {what:?} in: {text}");
        }
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn accept_one(ep: &quinn::Endpoint) -> Result<quinn::Connection> {
    let incoming = tokio::time::timeout(T, ep.accept())
        .await
        .context("no incoming connection")?
        .ok_or_else(|| anyhow!("endpoint closed"))?;
    let conn = tokio::time::timeout(T, incoming)
        .await
        .context("handshake timed out")??;
    Ok(conn)
}

async fn recv(r: &mut FrameReader) -> Result<Frame<Msg>> {
    let body = tokio::time::timeout(T, r.next_body())
        .await
        .context("read timed out")??
        .ok_or_else(|| anyhow!("unexpected end of stream"))?;
    Ok(decode_body::<Msg>(body)?)
}

/// Connects `client_ep` to `server` while the server accepts (quinn only
/// completes a handshake once the server has accepted the incoming
/// connection). Returns (client side, server side).
async fn pair(
    server: &quinn::Endpoint,
    client_ep: &quinn::Endpoint,
    expected: Option<&str>,
) -> Result<(quinn::Connection, quinn::Connection)> {
    let addr = server.local_addr()?;
    let (c, s) = tokio::join!(connect(client_ep, addr, expected, T), accept_one(server));
    Ok((c?, s?))
}

/// Client opens a stream, says Ping(0), server answers Ping(1).
async fn ping_pong(client: &quinn::Connection, server_conn: &quinn::Connection) -> Result<()> {
    let (send, recv_s) = client.open_bi().await?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv_s));
    w.send(&Msg::Ping(0), b"").await?;
    let (ssend, srecv) = tokio::time::timeout(T, server_conn.accept_bi()).await??;
    let (mut sw, mut sr) = (FrameWriter::new(ssend), FrameReader::new(srecv));
    assert_eq!(recv(&mut sr).await?.header, Msg::Ping(0));
    sw.send(&Msg::Ping(1), b"").await?;
    assert_eq!(recv(&mut r).await?.header, Msg::Ping(1));
    Ok(())
}

#[tokio::test]
async fn two_nodes_exchange_frames_both_ways() {
    install_crypto_provider();
    install_crypto_provider(); // idempotent
    let tmp = tempfile::tempdir().unwrap();
    let m = cluster(tmp.path(), &["alpha", "beta"]);
    let server = server_endpoint(loopback(), &m[1], ALPN_REPLICATION).unwrap();
    let addr = server.local_addr().unwrap();
    let client_ep = client_endpoint(addr, &m[0], ALPN_REPLICATION).unwrap();

    let server_task = {
        let server = server.clone();
        tokio::spawn(async move {
            let conn = accept_one(&server).await?;
            assert_eq!(peer_node_name(&conn).as_deref(), Some("alpha"));
            let (send, recv_s) = conn.accept_bi().await?;
            let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv_s));
            // Echo every frame back, with seq + 1, until the client finishes.
            let mut n = 0u64;
            while let Some(body) = r.next_body().await? {
                let f: Frame<Msg> = decode_body(body)?;
                let reply = match f.header {
                    Msg::Ping(x) => Msg::Ping(x + 1),
                    Msg::Data { seq, note } => Msg::Data { seq: seq + 1, note },
                };
                w.send(&reply, &f.payload).await?;
                n += 1;
            }
            w.finish().await?;
            // Keep the connection until the client has read everything.
            conn.closed().await;
            anyhow::Ok(n)
        })
    };

    let conn = connect(&client_ep, addr, Some("beta"), T).await.unwrap();
    assert_eq!(peer_node_name(&conn).as_deref(), Some("beta"));
    let (send, recv_s) = conn.open_bi().await.unwrap();
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv_s));

    // One 1 MiB payload (the largest write).
    let mut big = vec![0u8; hapair_proto::MAX_WRITE_PAYLOAD];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut big);
    w.send(
        &Msg::Data {
            seq: 1,
            note: "big".into(),
        },
        &big,
    )
    .await
    .unwrap();
    let f = recv(&mut r).await.unwrap();
    assert_eq!(
        f.header,
        Msg::Data {
            seq: 2,
            note: "big".into()
        }
    );
    assert!(f.payload[..] == big[..], "1 MiB payload came back intact");
    // Read where the mirror can write it to the disk directly from.
    assert!(f.payload.is_aligned(), "the large payload starts aligned");

    // Many small frames pipelined: a writer task and a reader in parallel,
    // half of them sent as pre-encoded batches with send_raw.
    const N: u64 = 20_000;
    let writer = tokio::spawn(async move {
        // Alternate runs of single frames and runs of batched frames; a
        // batch is flushed before the next single frame to keep the order.
        let mut batch = Vec::new();
        for i in 0..N {
            let payload = i.to_le_bytes();
            if (i / 100) % 2 == 0 {
                if !batch.is_empty() {
                    w.send_raw(&batch).await?;
                    batch.clear();
                }
                w.send(&Msg::Ping(i), &payload).await?;
            } else {
                encode_frame(&Msg::Ping(i), &payload, &mut batch)?;
            }
        }
        w.send_raw(&batch).await?;
        w.finish().await?;
        anyhow::Ok(())
    });
    let mut seen = 0u64;
    while let Some(body) = tokio::time::timeout(T, r.next_body())
        .await
        .unwrap()
        .unwrap()
    {
        let f: Frame<Msg> = decode_body(body).unwrap();
        // One stream is one ordered byte sequence: frames, single or
        // batched, come back in the order they were sent.
        let Msg::Ping(x) = f.header else {
            panic!("unexpected {:?}", f.header)
        };
        assert_eq!(x, seen + 1);
        assert_eq!(f.payload[..], seen.to_le_bytes());
        seen += 1;
    }
    assert_eq!(seen, N);
    writer.await.unwrap().unwrap();
    conn.close(0u32.into(), b"done");
    assert_eq!(server_task.await.unwrap().unwrap(), N + 1);
    client_ep.wait_idle().await;
}

#[tokio::test]
async fn connect_without_expected_name_accepts_any_cluster_node() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let m = cluster(tmp.path(), &["alpha", "beta"]);
    let server = server_endpoint(loopback(), &m[1], ALPN_REPLICATION).unwrap();
    let addr = server.local_addr().unwrap();
    let client_ep = client_endpoint(addr, &m[0], ALPN_REPLICATION).unwrap();
    let (conn, server_conn) = pair(&server, &client_ep, None).await.unwrap();
    assert_eq!(peer_node_name(&conn).as_deref(), Some("beta"));
    ping_pong(&conn, &server_conn).await.unwrap();
    assert_eq!(peer_node_name(&server_conn).as_deref(), Some("alpha"));
}

#[tokio::test]
async fn wrong_expected_name_is_refused_by_the_client() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let m = cluster(tmp.path(), &["alpha", "beta", "gamma"]);
    let server = server_endpoint(loopback(), &m[1], ALPN_REPLICATION).unwrap();
    let addr = server.local_addr().unwrap();
    let client_ep = client_endpoint(addr, &m[0], ALPN_REPLICATION).unwrap();
    let (server_res, client_res) = tokio::join!(
        accept_one(&server),
        connect(&client_ep, addr, Some("gamma"), T)
    );
    assert!(server_res.is_err());
    let err = client_res.unwrap_err();
    assert_has(&server_res, "not valid for name");
    assert!(format!("{err:#}").contains("gamma"), "{err:#}");
    assert!(is_authentication_failure(&err), "{err:#}");
    // An IP-looking expected name is refused up front.
    assert!(connect(&client_ep, addr, Some("127.0.0.1"), T)
        .await
        .is_err());
}

#[tokio::test]
async fn client_from_another_ca_is_refused_by_the_server() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ours = cluster(&tmp.path().join("ours"), &["alpha", "beta"]);
    let theirs = cluster(&tmp.path().join("theirs"), &["alpha", "beta"]);
    let server = server_endpoint(loopback(), &ours[1], ALPN_REPLICATION).unwrap();
    let addr = server.local_addr().unwrap();
    // The intruder trusts our CA (so it accepts our server) but its own
    // certificate, a perfectly valid "alpha", comes from another CA.
    let theirs_dir = tmp.path().join("theirs");
    let intruder = raw_client(
        &tmp.path().join("ours/ca.pem"),
        Some((&theirs_dir.join("alpha.pem"), &theirs_dir.join("alpha.key"))),
    );
    let (server_res, client_res) =
        tokio::join!(accept_one(&server), raw_round_trip(&intruder, addr));
    assert!(
        server_res.is_err(),
        "server must refuse a client of another CA"
    );
    assert!(client_res.is_err(), "client must not get through");
    assert_has(&server_res, "invalid peer certificate");
    drop(theirs);

    // The server still serves legitimate clients afterwards.
    let good_ep = client_endpoint(addr, &ours[0], ALPN_REPLICATION).unwrap();
    let (conn, server_conn) = pair(&server, &good_ep, Some("beta")).await.unwrap();
    ping_pong(&conn, &server_conn).await.unwrap();
}

#[tokio::test]
async fn server_from_another_ca_is_refused_by_the_client() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ours = cluster(&tmp.path().join("ours"), &["alpha", "beta"]);
    let theirs = cluster(&tmp.path().join("theirs"), &["alpha", "beta"]);
    let server = server_endpoint(loopback(), &theirs[1], ALPN_REPLICATION).unwrap();
    let addr = server.local_addr().unwrap();
    let client_ep = client_endpoint(addr, &ours[0], ALPN_REPLICATION).unwrap();
    let (server_res, client_res) = tokio::join!(
        accept_one(&server),
        connect(&client_ep, addr, Some("beta"), T)
    );
    assert!(
        client_res.is_err(),
        "client must refuse a server of another CA"
    );
    assert!(server_res.is_err());
    assert_has(&client_res, "invalid peer certificate");
    assert!(
        is_authentication_failure(client_res.as_ref().unwrap_err()),
        "a refused server certificate is an authentication failure"
    );
    // Also without an expected name: the chain is still checked.
    let (_, client_res) = tokio::join!(accept_one(&server), connect(&client_ep, addr, None, T));
    assert!(
        client_res.is_err(),
        "chain check applies without a name too"
    );
    assert_has(&client_res, "invalid peer certificate");
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let m = cluster(tmp.path(), &["alpha", "beta"]);
    let server = server_endpoint(loopback(), &m[1], ALPN_REPLICATION).unwrap();
    let addr = server.local_addr().unwrap();

    // A well-behaved TLS client that trusts our CA but has no certificate.
    let ep = raw_client(&tmp.path().join("ca.pem"), None);
    let client = raw_round_trip(&ep, addr);
    let (server_res, client_res) = tokio::join!(accept_one(&server), client);
    assert!(
        server_res.is_err(),
        "server must require a client certificate"
    );
    assert!(client_res.is_err());
    assert_has(&server_res, "certificate");
}

#[tokio::test]
async fn raw_client_with_a_cluster_cert_is_accepted() {
    // Control for the refusal tests above: the same raw client, with a
    // certificate of our CA, gets through.
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let m = cluster(tmp.path(), &["alpha", "beta"]);
    let server = server_endpoint(loopback(), &m[1], ALPN_REPLICATION).unwrap();
    let addr = server.local_addr().unwrap();
    let ep = raw_client(
        &tmp.path().join("ca.pem"),
        Some((&tmp.path().join("alpha.pem"), &tmp.path().join("alpha.key"))),
    );
    let serve = async {
        let conn = accept_one(&server).await?;
        let (ss, sr) = tokio::time::timeout(T, conn.accept_bi()).await??;
        let (mut sw, mut sr) = (FrameWriter::new(ss), FrameReader::new(sr));
        recv(&mut sr).await?;
        sw.send(&Msg::Ping(1), b"").await?;
        let name = peer_node_name(&conn);
        // Hold the connection until the client has read the reply.
        let _ = tokio::time::timeout(T, conn.closed()).await;
        anyhow::Ok(name)
    };
    let client = async {
        let r = raw_round_trip(&ep, addr).await;
        ep.close(0u32.into(), b"");
        r
    };
    let (name, res) = tokio::join!(serve, client);
    res.unwrap();
    assert_eq!(name.unwrap().as_deref(), Some("alpha"));
}

#[tokio::test]
async fn wrong_alpn_is_refused() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let m = cluster(tmp.path(), &["alpha", "beta"]);
    let server = server_endpoint(loopback(), &m[1], ALPN_REPLICATION).unwrap();
    let addr = server.local_addr().unwrap();
    let client_ep = client_endpoint(addr, &m[0], b"something-else/1").unwrap();
    let (server_res, client_res) = tokio::join!(
        accept_one(&server),
        connect(&client_ep, addr, Some("beta"), T)
    );
    assert!(server_res.is_err());
    assert!(client_res.is_err());
    assert_has(&server_res, "protocol");
    assert!(is_authentication_failure(client_res.as_ref().unwrap_err()));
}

#[tokio::test]
async fn refusal_by_the_server_is_seen_by_the_client_and_silence_is_not() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ours = cluster(&tmp.path().join("ours"), &["alpha", "beta"]);
    let theirs = cluster(&tmp.path().join("theirs"), &["alpha", "beta"]);
    // The client trusts the server (same CA) but presents a certificate of
    // another CA: with TLS 1.3 its handshake completes, and the server's
    // refusal arrives on the first stream operation.
    let theirs_dir = tmp.path().join("theirs");
    let server = server_endpoint(loopback(), &ours[1], ALPN_REPLICATION).unwrap();
    let addr = server.local_addr().unwrap();
    let intruder = raw_client(
        &tmp.path().join("ours/ca.pem"),
        Some((&theirs_dir.join("alpha.pem"), &theirs_dir.join("alpha.key"))),
    );
    let client = raw_round_trip(&intruder, addr);
    drop(theirs);
    let (server_res, client_res) = tokio::join!(accept_one(&server), client);
    assert!(server_res.is_err());
    let err = client_res.unwrap_err();
    assert!(
        is_authentication_failure(&err),
        "the server's refusal must be recognised: {err:#}"
    );
    // Nobody listening: a timeout, not an authentication failure.
    let silent = std::net::UdpSocket::bind(loopback()).unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let ep = client_endpoint(silent_addr, &ours[0], ALPN_REPLICATION).unwrap();
    let err = connect(&ep, silent_addr, None, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(!is_authentication_failure(&err), "{err:#}");
}

#[tokio::test]
async fn garbage_datagrams_do_not_hurt_the_server() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let m = cluster(tmp.path(), &["alpha", "beta"]);
    let server = server_endpoint(loopback(), &m[1], ALPN_REPLICATION).unwrap();
    let addr = server.local_addr().unwrap();

    let sock = UdpSocket::bind(loopback()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for i in 0..3000 {
        let len = match i % 3 {
            0 => rng.random_range(1..64),
            1 => rng.random_range(64..1500),
            _ => 1200, // the size of a real Initial packet
        };
        let mut buf = vec![0u8; len];
        rng.fill_bytes(&mut buf);
        if i % 4 == 0 && len >= 7 {
            // Make it look like a QUIC v1 long-header Initial with random
            // connection IDs, to get past the first parsing step.
            buf[0] = 0xc0 | (buf[0] & 0x0f);
            buf[1..5].copy_from_slice(&1u32.to_be_bytes());
            buf[5] = (buf[5] % 21).min((len - 7) as u8);
        }
        sock.send_to(&buf, addr).unwrap();
    }

    // A real client still gets through.
    let client_ep = client_endpoint(addr, &m[0], ALPN_REPLICATION).unwrap();
    let client = connect(&client_ep, addr, Some("beta"), T);
    let accept = async {
        // The garbage may have produced handshake attempts that fail; skip them.
        loop {
            let incoming = tokio::time::timeout(T, server.accept())
                .await?
                .ok_or_else(|| anyhow!("closed"))?;
            if let Ok(conn) = incoming.await {
                return anyhow::Ok(conn);
            }
        }
    };
    let (server_conn, conn) = tokio::join!(accept, client);
    let (server_conn, conn) = (server_conn.unwrap(), conn.unwrap());
    assert_eq!(peer_node_name(&server_conn).as_deref(), Some("alpha"));
    let (send, recv_s) = conn.open_bi().await.unwrap();
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv_s));
    w.send(&Msg::Ping(5), b"x").await.unwrap();
    let (ss, sr) = tokio::time::timeout(T, server_conn.accept_bi())
        .await
        .unwrap()
        .unwrap();
    let (mut sw, mut sr) = (FrameWriter::new(ss), FrameReader::new(sr));
    assert_eq!(recv(&mut sr).await.unwrap().header, Msg::Ping(5));
    sw.send(&Msg::Ping(6), b"").await.unwrap();
    assert_eq!(recv(&mut r).await.unwrap().header, Msg::Ping(6));
}

/// Client and server joined by one stream, for the framing tests.
async fn stream_pair() -> (
    tempfile::TempDir,
    quinn::Connection,
    quinn::Connection,
    quinn::SendStream,
    FrameReader,
) {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let m = cluster(tmp.path(), &["alpha", "beta"]);
    let server = server_endpoint(loopback(), &m[1], ALPN_REPLICATION).unwrap();
    let addr = server.local_addr().unwrap();
    let client_ep = client_endpoint(addr, &m[0], ALPN_REPLICATION).unwrap();
    let (conn, server_conn) = pair(&server, &client_ep, Some("beta")).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    // A stream is announced to the peer by its first byte; send a valid frame.
    let mut first = Vec::new();
    encode_frame(&Msg::Ping(0), b"", &mut first).unwrap();
    send.write_all(&first).await.unwrap();
    let (_ss, sr) = tokio::time::timeout(T, server_conn.accept_bi())
        .await
        .unwrap()
        .unwrap();
    let mut reader = FrameReader::new(sr);
    assert_eq!(recv(&mut reader).await.unwrap().header, Msg::Ping(0));
    (tmp, conn, server_conn, send, reader)
}

#[tokio::test]
async fn oversized_length_prefix_is_refused() {
    let (_tmp, _c, _s, mut send, mut reader) = stream_pair().await;
    // Claim a frame just over the limit, and send no body at all: the
    // reader must refuse on the prefix alone rather than wait for (or
    // allocate) the body.
    send.write_all(&((MAX_FRAME_BYTES + 1) as u32).to_be_bytes())
        .await
        .unwrap();
    let err = tokio::time::timeout(T, reader.next_body())
        .await
        .expect("must not wait for a body")
        .unwrap_err();
    assert!(format!("{err:#}").contains("exceeds"), "{err:#}");
    // The error is sticky: the stream is out of step.
    assert!(tokio::time::timeout(T, reader.next_body())
        .await
        .unwrap()
        .is_err());

    let (_tmp, _c, _s, mut send, mut reader) = stream_pair().await;
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert!(tokio::time::timeout(T, reader.next_body())
        .await
        .unwrap()
        .is_err());
}

#[tokio::test]
async fn clean_end_truncation_and_cancel_safety() {
    // Clean end between frames: Ok(None).
    let (_tmp, _c, _s, mut send, mut reader) = stream_pair().await;
    send.finish().unwrap();
    assert!(tokio::time::timeout(T, reader.next_body())
        .await
        .unwrap()
        .unwrap()
        .is_none());

    // End inside a frame: an error.
    let (_tmp, _c, _s, mut send, mut reader) = stream_pair().await;
    let mut frame = Vec::new();
    encode_frame(&Msg::Ping(9), &[7u8; 100], &mut frame).unwrap();
    send.write_all(&frame[..50]).await.unwrap();
    send.finish().unwrap();
    let err = tokio::time::timeout(T, reader.next_body())
        .await
        .unwrap()
        .unwrap_err();
    assert!(format!("{err:#}").contains("inside a frame"), "{err:#}");

    // End inside the length prefix: an error.
    let (_tmp, _c, _s, mut send, mut reader) = stream_pair().await;
    send.write_all(&frame[..2]).await.unwrap();
    send.finish().unwrap();
    assert!(tokio::time::timeout(T, reader.next_body())
        .await
        .unwrap()
        .is_err());

    // A frame arriving in pieces, with next_body cancelled in between (by a
    // timeout), still comes out whole.
    let (_tmp, _c, _s, mut send, mut reader) = stream_pair().await;
    for cut in [2usize, 6, 40, frame.len()] {
        let start = [0usize, 2, 6, 40]
            .into_iter()
            .filter(|s| *s < cut)
            .max()
            .unwrap();
        send.write_all(&frame[start..cut]).await.unwrap();
        if cut < frame.len() {
            let r = tokio::time::timeout(Duration::from_millis(100), reader.next_body()).await;
            assert!(r.is_err(), "no full frame yet at {cut} bytes");
        }
    }
    let f = recv(&mut reader).await.unwrap();
    assert_eq!(f.header, Msg::Ping(9));
    assert_eq!(f.payload[..], [7u8; 100]);
}

#[tokio::test]
async fn keepalive_holds_an_idle_connection_and_tuning_is_checked() {
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let m = cluster(tmp.path(), &["alpha", "beta"]);
    let tuning = TransportTuning {
        keep_alive_interval: Duration::from_millis(200),
        max_idle_timeout: Duration::from_millis(800),
        ..TransportTuning::default()
    };
    let server = server_endpoint_with(loopback(), &m[1], ALPN_REPLICATION, &tuning).unwrap();
    let addr = server.local_addr().unwrap();
    let client_ep = client_endpoint_with(addr, &m[0], ALPN_REPLICATION, &tuning).unwrap();
    let (conn, server_conn) = pair(&server, &client_ep, Some("beta")).await.unwrap();
    ping_pong(&conn, &server_conn).await.unwrap();
    // Silent for more than twice the idle timeout: keep-alives hold it open.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    assert!(server_conn.close_reason().is_none());

    let bad = TransportTuning {
        keep_alive_interval: Duration::from_secs(20),
        ..TransportTuning::default()
    };
    assert!(server_endpoint_with(loopback(), &m[1], ALPN_REPLICATION, &bad).is_err());
    assert!(client_endpoint_with(addr, &m[0], ALPN_REPLICATION, &bad).is_err());

    // QUIC packets are at least 1,200 bytes: a smaller UDP payload limit
    // is refused with a message naming the range.
    let small = TransportTuning {
        max_udp_payload_bytes: 1000,
        ..TransportTuning::default()
    };
    let e = server_endpoint_with(loopback(), &m[1], ALPN_REPLICATION, &small).unwrap_err();
    assert!(format!("{e:#}").contains("1200-65527"), "{e:#}");
    assert!(client_endpoint_with(addr, &m[0], ALPN_REPLICATION, &small).is_err());
}

/// A plain rustls/quinn client endpoint, built without this crate: it trusts
/// the CA in `ca_pem` and presents `client_cert` (certificate and key PEM
/// files) if given.
fn raw_client(ca_pem: &Path, client_cert: Option<(&Path, &Path)>) -> quinn::Endpoint {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client_cert {
        Some((cert, key)) => {
            let chain: Vec<_> = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap())
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN_REPLICATION.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut ep = quinn::Endpoint::client(loopback()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    ep
}

/// Connects with a raw client and tries one round trip. With TLS 1.3 the
/// client may finish its side of the handshake before the server refuses
/// its certificate; then the first stream operation fails.
async fn raw_round_trip(ep: &quinn::Endpoint, addr: SocketAddr) -> Result<()> {
    let conn = tokio::time::timeout(T, ep.connect(addr, "beta")?).await??;
    let (send, recv_s) = conn.open_bi().await?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv_s));
    w.send(&Msg::Ping(0), b"").await?;
    tokio::time::timeout(T, r.next_body()).await??;
    Ok(())
}

#[tokio::test]
async fn bulk_transfer_of_maximal_frames_completes() {
    // 64 MiB in 1 MiB frames, written as fast as the stream takes them while
    // the other side reads: exercises the flow-control windows and the
    // default MTU (a large initial MTU once hung such transfers).
    install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let m = cluster(tmp.path(), &["alpha", "beta"]);
    let server = server_endpoint(loopback(), &m[1], ALPN_REPLICATION).unwrap();
    let client_ep = client_endpoint(server.local_addr().unwrap(), &m[0], ALPN_REPLICATION).unwrap();
    let (conn, server_conn) = pair(&server, &client_ep, Some("beta")).await.unwrap();
    let (send, _r) = conn.open_bi().await.unwrap();
    let mut w = FrameWriter::new(send);
    const FRAMES: u64 = 64;
    let writer = tokio::spawn(async move {
        let payload = vec![0xa5u8; hapair_proto::MAX_WRITE_PAYLOAD];
        for i in 0..FRAMES {
            w.send(&Msg::Ping(i), &payload).await?;
        }
        w.finish().await?;
        anyhow::Ok(())
    });
    let start = std::time::Instant::now();
    let (_ss, sr) = tokio::time::timeout(T, server_conn.accept_bi())
        .await
        .unwrap()
        .unwrap();
    let mut r = FrameReader::new(sr);
    let mut n = 0u64;
    while let Some(body) = tokio::time::timeout(T, r.next_body())
        .await
        .unwrap()
        .unwrap()
    {
        let f: Frame<Msg> = decode_body(body).unwrap();
        assert_eq!(f.header, Msg::Ping(n));
        assert_eq!(f.payload.len(), hapair_proto::MAX_WRITE_PAYLOAD);
        n += 1;
    }
    assert_eq!(n, FRAMES);
    writer.await.unwrap().unwrap();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "bulk: {FRAMES} MiB in {secs:.2} s ({:.0} MiB/s)",
        FRAMES as f64 / secs
    );
}

#[tokio::test]
async fn ipv6_loopback_works() {
    install_crypto_provider();
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: no IPv6 loopback on this machine");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let m = cluster(tmp.path(), &["alpha", "beta"]);
    let server = server_endpoint("[::1]:0".parse().unwrap(), &m[1], ALPN_REPLICATION).unwrap();
    let addr = server.local_addr().unwrap();
    let client_ep = client_endpoint(addr, &m[0], ALPN_REPLICATION).unwrap();
    assert!(client_ep.local_addr().unwrap().is_ipv6());
    for expected in [Some("beta"), None] {
        let (conn, server_conn) = pair(&server, &client_ep, expected).await.unwrap();
        ping_pong(&conn, &server_conn).await.unwrap();
    }
}
