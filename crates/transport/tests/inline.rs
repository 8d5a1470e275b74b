//! The inline runtime (`InlineRuntime`): what a thread writes and drives
//! leaves from that thread, even while the runtime's own thread cannot run;
//! nothing is lost or reordered when several threads and the runtime send
//! on one stream; and a connection that is never driven inline works as on
//! tokio's runtime.

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use hapair_proto::{decode_body, encode_frame, ALPN_REPLICATION};
use hapair_transport::{
    client_endpoint_inline, connect, install_crypto_provider, server_endpoint, tls_init,
    FrameReader, FrameWriter, InlineRuntime, TlsMaterial,
};
use std::future::Future;
use std::pin::pin;
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

fn cluster(dir: &std::path::Path) -> (TlsMaterial, TlsMaterial) {
    tls_init(dir, &["n1".to_string(), "n2".to_string()], false).unwrap();
    (
        TlsMaterial::load(dir, "n1").unwrap(),
        TlsMaterial::load(dir, "n2").unwrap(),
    )
}

/// A server endpoint on its own runtime (thread), and a client connected to
/// it through an inline runtime on `client_rt`: (server's stream reader,
/// client's writer, client's inline runtime, kept-alive handles).
struct Pair {
    server_rt: tokio::runtime::Runtime,
    reader: FrameReader,
    writer: FrameWriter,
    inline: Arc<InlineRuntime>,
    _keep: (
        quinn::Endpoint,
        quinn::Endpoint,
        quinn::Connection,
        quinn::Connection,
    ),
}

fn pair(client_rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> Pair {
    install_crypto_provider();
    let (n1, n2) = cluster(dir);
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = server_rt
        .block_on(async { server_endpoint("127.0.0.1:0".parse().unwrap(), &n2, ALPN_REPLICATION) })
        .unwrap();
    let addr = server.local_addr().unwrap();
    let accept = {
        let server = server.clone();
        server_rt.spawn(async move {
            let incoming = server
                .accept()
                .await
                .ok_or_else(|| anyhow!("no connection"))?;
            let conn = incoming.await?;
            let (_send, recv) = conn.accept_bi().await?;
            Ok::<_, anyhow::Error>((conn, FrameReader::new(recv)))
        })
    };
    let (client_ep, inline, conn, mut writer) = client_rt.block_on(async {
        let (ep, inline) = client_endpoint_inline(addr, &n1, ALPN_REPLICATION).unwrap();
        let conn = connect(&ep, addr, Some("n2"), T).await.unwrap();
        let (send, _recv) = conn.open_bi().await.unwrap();
        (ep, inline, conn, FrameWriter::new(send))
    });
    // The server sees the stream once something was written on it.
    client_rt.block_on(writer.send(&0u64, b"hello")).unwrap();
    let (server_conn, mut reader) = server_rt.block_on(accept).unwrap().unwrap();
    let first = server_rt.block_on(next(&mut reader)).unwrap();
    assert_eq!(first, (0, b"hello".to_vec()));
    Pair {
        server_rt,
        reader,
        writer,
        inline,
        _keep: (server, client_ep, conn, server_conn),
    }
}

async fn next(r: &mut FrameReader) -> Result<(u64, Vec<u8>)> {
    let body = tokio::time::timeout(T, r.next_body())
        .await
        .context("read timed out")??
        .ok_or_else(|| anyhow!("end of stream"))?;
    let f = decode_body::<u64>(body)?;
    Ok((f.header, f.payload.to_vec()))
}

fn frame(n: u64, payload: &[u8]) -> Bytes {
    let mut b = Vec::new();
    encode_frame(&n, payload, &mut b).unwrap();
    Bytes::from(b)
}

/// Writes `chunk` to the stream without waiting (one poll): true if all
/// of it was taken.
fn write_now(w: &mut FrameWriter, chunk: Bytes) -> bool {
    let mut chunks = [chunk];
    let mut cx = TaskContext::from_waker(Waker::noop());
    let mut fut = pin!(w.send_chunks(&mut chunks));
    matches!(fut.as_mut().poll(&mut cx), Poll::Ready(Ok(())))
}

fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Holds the runtime's only worker thread until the returned sender is
/// dropped or sent to.
fn block_worker(rt: &tokio::runtime::Runtime) -> mpsc::Sender<()> {
    let (release, wait) = mpsc::channel::<()>();
    let (started, running) = mpsc::channel::<()>();
    rt.spawn(async move {
        let _ = started.send(());
        let _ = wait.recv();
    });
    running
        .recv_timeout(T)
        .expect("the worker took the blocking task");
    release
}

#[test]
fn a_frame_written_and_driven_inline_arrives_while_the_runtime_thread_is_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let client_rt = client_runtime();
    let mut p = pair(&client_rt, dir.path());
    // Let the connection settle first (path MTU probes acknowledged, and
    // the acknowledgements taken in by the runtime): with the worker
    // blocked below, acknowledgements are not read, and data still
    // counted in flight could hold a new send back (congestion control).
    std::thread::sleep(Duration::from_millis(300));
    let release = block_worker(&client_rt);

    // Without a drive, nothing leaves: the driver would run on the blocked
    // worker. (The frame goes out with the next drive.)
    assert!(write_now(&mut p.writer, frame(1, b"queued")));
    let early = p.server_rt.block_on(async {
        tokio::time::timeout(Duration::from_millis(300), p.reader.next_body()).await
    });
    assert!(
        early.is_err(),
        "a frame left with the worker blocked and no drive"
    );

    // Driven from this thread: both leave now.
    p.inline
        .drive(|| assert!(write_now(&mut p.writer, frame(2, &[7u8; 3000]))));
    let got = p.server_rt.block_on(async {
        let a = next(&mut p.reader).await?;
        let b = next(&mut p.reader).await?;
        Ok::<_, anyhow::Error>((a, b))
    });
    let (a, b) = got.expect("frames driven inline arrive while the worker is blocked");
    assert_eq!(a, (1, b"queued".to_vec()));
    assert_eq!(b, (2, vec![7u8; 3000]));
    drop(release);
}

#[test]
fn several_threads_and_the_runtime_send_on_one_stream_without_loss_or_reordering() {
    const THREADS: u64 = 4;
    const EACH: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let client_rt = client_runtime();
    let p = pair(&client_rt, dir.path());
    let writer = Arc::new(Mutex::new(p.writer));
    let inline = p.inline.clone();
    let mut reader = p.reader;

    // Thread t sends t*EACH+1 ..= (t+1)*EACH in order, half of them driven
    // inline, half by the runtime's task (a blocking write on its thread);
    // the receiver checks every number arrives once, each thread's in order.
    let deadline = Instant::now() + Duration::from_secs(60);
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let writer = writer.clone();
            let inline = inline.clone();
            let handle = client_rt.handle().clone();
            std::thread::spawn(move || {
                for i in 0..EACH {
                    assert!(Instant::now() < deadline, "thread {t} stuck");
                    let n = t * EACH + i + 1;
                    let f = frame(n, &n.to_le_bytes().repeat(1 + (n % 300) as usize));
                    let mut w = writer.lock().unwrap();
                    if i % 2 == 0 {
                        let mut rest = vec![f];
                        let all = inline.drive(|| {
                            let mut cx = TaskContext::from_waker(Waker::noop());
                            let mut fut = pin!(w.send_chunks(&mut rest));
                            matches!(fut.as_mut().poll(&mut cx), Poll::Ready(Ok(())))
                        });
                        if !all {
                            // Flow control: finish on the runtime.
                            handle.block_on(w.send_chunks(&mut rest)).unwrap();
                        }
                    } else {
                        handle.block_on(w.send_chunks(&mut [f])).unwrap();
                    }
                }
            })
        })
        .collect();
    let mut last = vec![0u64; THREADS as usize];
    p.server_rt.block_on(async {
        for _ in 0..THREADS * EACH {
            let (n, payload) = next(&mut reader).await.expect("every frame arrives");
            let t = ((n - 1) / EACH) as usize;
            assert!(n > last[t], "thread {t}: {n} after {}", last[t]);
            last[t] = n;
            assert_eq!(payload, n.to_le_bytes().repeat(1 + (n % 300) as usize));
        }
    });
    for th in threads {
        th.join().unwrap();
    }
    for (t, l) in last.iter().enumerate() {
        assert_eq!(*l, (t as u64 + 1) * EACH, "thread {t}'s last frame");
    }
}

#[test]
fn a_connection_never_driven_inline_streams_a_bulk_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let client_rt = client_runtime();
    let mut p = pair(&client_rt, dir.path());
    // 64 MiB in 1 MiB frames, through the runtime only: its socket is
    // watched for reading only, so sends must not depend on writability
    // events.
    let payload = vec![0x5au8; 1 << 20];
    let send = client_rt.spawn(async move {
        for n in 1..=64u64 {
            p.writer.send(&n, &payload).await?;
        }
        Ok::<_, anyhow::Error>(p.writer)
    });
    p.server_rt.block_on(async {
        for want in 1..=64u64 {
            let (n, body) = next(&mut p.reader).await.expect("frame");
            assert_eq!(n, want);
            assert!(body.len() == 1 << 20 && body.iter().all(|b| *b == 0x5a));
        }
    });
    client_rt.block_on(send).unwrap().unwrap();
}
