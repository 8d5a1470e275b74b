//! What the transport alone costs on a link: the round trip of a 4 KiB
//! message and a small answer over hapair's QUIC (mutual TLS, one stream,
//! the tuning `hapair mount` uses) beside the same round trip in plain UDP
//! datagrams, and a bulk transfer's throughput and CPU time per GiB on both
//! ends. bench/run.sh runs it on the bench's veth to show how much of a
//! replicated write is the transport's, whatever hapair does around it.
//!
//!   quic_floor server TLS_DIR NODE BIND_ADDR
//!       QUIC on BIND_ADDR, plain UDP echo on the next port; runs until
//!       killed or until a client's bulk phase ends.
//!   quic_floor client TLS_DIR NODE SERVER_ADDR SERVER_NODE ROUNDS BULK_MIB
//!       prints one JSON object: udp_rtt_us and quic_rtt_us (p50, p99),
//!       bulk_mib_s, and bulk CPU seconds per GiB of client and server.
//!
//! Exit status 2 on bad usage, 1 on any failure (with the reason).

use anyhow::{anyhow, bail, Context, Result};
use hapair_proto::{decode_body, ALPN_REPLICATION};
use hapair_transport::{
    client_endpoint, connect, install_crypto_provider, server_endpoint, FrameReader, FrameWriter,
    TlsMaterial,
};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

const MSG_BYTES: usize = 4096;
const REPLY_BYTES: usize = 60;
const BULK_FRAME: usize = 1 << 20;
const MAX_ROUNDS: u64 = 1_000_000;
const MAX_BULK_MIB: u64 = 64 << 10;
const T: Duration = Duration::from_secs(30);

#[derive(serde::Serialize, serde::Deserialize, Debug)]
enum Msg {
    /// Answer with a `REPLY_BYTES` payload.
    Echo(u64),
    /// Consume.
    Bulk(u64),
    /// The bulk phase is over: answer with the CPU time used since
    /// `BulkStart`.
    BulkEnd,
    BulkStart,
    /// Server's answers.
    Reply(u64),
    Cpu(f64),
}

fn cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return f64::NAN;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn next(r: &mut FrameReader) -> Result<(Msg, usize)> {
    let body = tokio::time::timeout(T, r.next_body())
        .await
        .context("no answer within 30 s")??
        .ok_or_else(|| anyhow!("the stream ended"))?;
    let f = decode_body::<Msg>(body)?;
    Ok((f.header, f.payload.len()))
}

fn udp_echo(sock: UdpSocket) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            return;
        };
        if n >= 16 {
            let _ = sock.send_to(&buf[..REPLY_BYTES.min(n)], from);
        }
    }
}

async fn server(tls: TlsMaterial, bind: SocketAddr) -> Result<()> {
    let udp = UdpSocket::bind(SocketAddr::new(bind.ip(), bind.port() + 1))
        .with_context(|| format!("binding the UDP echo next to {bind}"))?;
    std::thread::spawn(move || udp_echo(udp));
    let ep = server_endpoint(bind, &tls, ALPN_REPLICATION)?;
    eprintln!("quic_floor: listening on {bind}");
    loop {
        let Some(incoming) = ep.accept().await else {
            return Ok(());
        };
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("quic_floor: handshake failed: {e}");
                continue;
            }
        };
        let (send, recv) = conn.accept_bi().await?;
        let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
        let mut cpu0 = cpu_s();
        let reply = vec![0u8; REPLY_BYTES];
        loop {
            match next(&mut r).await?.0 {
                Msg::Echo(n) => w.send(&Msg::Reply(n), &reply).await?,
                Msg::Bulk(_) => {}
                Msg::BulkStart => cpu0 = cpu_s(),
                Msg::BulkEnd => {
                    w.send(&Msg::Cpu(cpu_s() - cpu0), &[]).await?;
                    // One client per run: done once it has its answer.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return Ok(());
                }
                other => bail!("unexpected message {other:?}"),
            }
        }
    }
}

fn udp_rtts(server: SocketAddr, rounds: u64) -> Result<Vec<f64>> {
    let to = SocketAddr::new(server.ip(), server.port() + 1);
    let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .map_err(|e| anyhow!("{e}"))?;
    let sock = UdpSocket::bind(bind)?;
    sock.connect(to)?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let msg = vec![0x42u8; MSG_BYTES + 16];
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::with_capacity(rounds as usize);
    for _ in 0..rounds {
        let t = Instant::now();
        sock.send(&msg)?;
        sock.recv(&mut buf)
            .context("the UDP echo did not answer within 2 s")?;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}

async fn client(
    tls: TlsMaterial,
    server: SocketAddr,
    server_node: &str,
    rounds: u64,
    bulk_mib: u64,
) -> Result<serde_json::Value> {
    let udp = tokio::task::spawn_blocking(move || udp_rtts(server, rounds)).await??;
    let ep = client_endpoint(server, &tls, ALPN_REPLICATION)?;
    let conn = connect(&ep, server, Some(server_node), T).await?;
    let (send, recv) = conn.open_bi().await?;
    let (mut w, mut r) = (FrameWriter::new(send), FrameReader::new(recv));
    let msg = vec![0x42u8; MSG_BYTES];
    // A few rounds first: path MTU discovery and congestion window settle.
    let warm = (rounds / 10).clamp(1, 200);
    let mut quic = Vec::with_capacity(rounds as usize);
    for i in 0..warm + rounds {
        let t = Instant::now();
        w.send(&Msg::Echo(i), &msg).await?;
        match next(&mut r).await? {
            (Msg::Reply(n), REPLY_BYTES) if n == i => {}
            other => bail!("unexpected answer {other:?} to echo {i}"),
        }
        if i >= warm {
            quic.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    w.send(&Msg::BulkStart, &[]).await?;
    let payload = vec![0x5au8; BULK_FRAME];
    let (cpu0, t0) = (cpu_s(), Instant::now());
    for n in 0..bulk_mib {
        w.send(&Msg::Bulk(n), &payload).await?;
    }
    w.send(&Msg::BulkEnd, &[]).await?;
    let server_cpu = match next(&mut r).await? {
        (Msg::Cpu(s), _) => s,
        other => bail!("unexpected answer {other:?} to the end of the bulk phase"),
    };
    let secs = t0.elapsed().as_secs_f64();
    let client_cpu = cpu_s() - cpu0;
    let gib = bulk_mib as f64 / 1024.0;
    let stats = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        serde_json::json!({"p50": percentile(&v, 0.5), "p99": percentile(&v, 0.99), "n": v.len()})
    };
    Ok(serde_json::json!({
        "msg_bytes": MSG_BYTES,
        "reply_bytes": REPLY_BYTES,
        "udp_rtt_us": stats(udp),
        "quic_rtt_us": stats(quic),
        "bulk_mib": bulk_mib,
        "bulk_mib_s": bulk_mib as f64 / secs,
        "bulk_cpu_s_per_gib": {"client": client_cpu / gib, "server": server_cpu / gib},
    }))
}

fn usage() -> ! {
    eprintln!(
        "usage: quic_floor server TLS_DIR NODE BIND_ADDR\n       \
         quic_floor client TLS_DIR NODE SERVER_ADDR SERVER_NODE ROUNDS BULK_MIB"
    );
    std::process::exit(2)
}

fn parse<T: std::str::FromStr>(s: &str, what: &str) -> T {
    s.parse().unwrap_or_else(|_| {
        eprintln!("quic_floor: {what} '{s}' is not valid");
        usage()
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, rest) = match args.split_first() {
        Some((m, r)) => (m.as_str(), r),
        None => usage(),
    };
    install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("quic_floor: cannot start a runtime: {e}");
            std::process::exit(1)
        });
    let load = |dir: &str, node: &str| {
        TlsMaterial::load(Path::new(dir), node).unwrap_or_else(|e| {
            eprintln!("quic_floor: {e:#}");
            std::process::exit(2)
        })
    };
    let result = match (mode, rest) {
        ("server", [dir, node, bind]) => {
            let tls = load(dir, node);
            let bind = parse(bind, "address");
            // On the runtime's thread, with quinn's drivers, as in the
            // mirror: no hand-off between threads per message.
            rt.block_on(async { tokio::spawn(server(tls, bind)).await })
                .map_err(|e| anyhow!("the server task failed: {e}"))
                .and_then(|r| r)
                .map(|()| None)
        }
        ("client", [dir, node, addr, server_node, rounds, mib]) => {
            let tls = load(dir, node);
            let rounds: u64 = parse(rounds, "round count");
            let mib: u64 = parse(mib, "bulk size in MiB");
            if !(1..=MAX_ROUNDS).contains(&rounds) || !(1..=MAX_BULK_MIB).contains(&mib) {
                eprintln!("quic_floor: ROUNDS must be 1-{MAX_ROUNDS}, BULK_MIB 1-{MAX_BULK_MIB}");
                usage()
            }
            let (addr, server_node) = (parse(addr, "address"), server_node.clone());
            rt.block_on(async {
                tokio::spawn(async move { client(tls, addr, &server_node, rounds, mib).await })
                    .await
            })
            .map_err(|e| anyhow!("the client task failed: {e}"))
            .and_then(|r| r)
            .map(Some)
        }
        _ => usage(),
    };
    match result {
        Ok(Some(v)) => println!("{v}"),
        Ok(None) => {}
        Err(e) => {
            eprintln!("quic_floor: {e:#}");
            std::process::exit(1)
        }
    }
}
