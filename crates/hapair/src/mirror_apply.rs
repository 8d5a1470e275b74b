//! The mirror's data path for one session: operations read from the stream
//! are applied strictly in sequence order, by one of two hands:
//!
//! - inline, in the reader task, when the applier thread has nothing
//!   pending and the operation is small (a barrier, a small write, a
//!   metadata change): no hand-off between threads on the path of a
//!   durability point, whose latency is what a `sync` mount waits for;
//! - by the applier thread otherwise (large writes, or whenever work is
//!   already queued for it), so that the reader keeps receiving while a
//!   large write goes to the disk.
//!
//! Both apply under one lock (`Applying`) and only when everything handed
//! to the other hand before is done (`queued`, changed only by the reader
//! when it queues and by the thread under the lock when it finishes), so
//! the order is the stream's order. Either hand commits as a group: at a
//! barrier it first applies what has already arrived behind it (bounded),
//! then syncs once and acknowledges all of it as durable.
//!
//! While operations come in quick succession (a durability point every few
//! hundred microseconds), the reader waits for the next one by polling for
//! a bounded time instead of letting its thread go idle (see
//! `crate::poll`).

use hapair_mirror::Applier;
use hapair_proto::{FromMirror, Op, PooledBuf, Seq, ToMirror};
use hapair_transport::FrameReader;
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;
use tokio::sync::{mpsc, watch};
use tracing::error;

use crate::poll::{poll_turn, Polling};

/// Operations queued between the reader and the applier thread
/// (backpressure on the QUIC stream beyond this).
const APPLY_QUEUE: usize = 1024;
/// Acknowledge at least every this many applied operations.
const ACK_EVERY_OPS: u64 = 256;
/// Group commit: at a barrier, at most this many operations (and bytes)
/// that already arrived behind it are applied before the one sync.
const GROUP_COMMIT_OPS: usize = 256;
const GROUP_COMMIT_BYTES: usize = 16 << 20;
/// Operations with payloads up to this size may be applied by the reader.
const INLINE_MAX_PAYLOAD: usize = 64 << 10;

pub(crate) enum Work {
    Manifest {
        hash: bool,
    },
    Op {
        seq: Seq,
        op: Op,
        payload: PooledBuf,
    },
}

/// What the applier has done, under the lock that orders the two hands.
struct Applying {
    applier: Applier,
    applied: Seq,
    durable: Seq,
    acked: Seq,
}

/// The shared parts of a session's data path.
struct Shared {
    state: Mutex<Applying>,
    /// Work items handed to the thread and not finished yet.
    queued: AtomicU64,
    acks: watch::Sender<(Seq, Seq)>,
    out: mpsc::Sender<FromMirror>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Applying> {
        // A panic while applying leaves the counters consistent with what
        // was applied; carry on to report and end the session.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Applies one non-barrier operation; on failure reports it and returns
/// false (the session ends).
fn apply_op(sh: &Shared, st: &mut Applying, seq: Seq, op: &Op, payload: &[u8]) -> bool {
    if let Err(e) = st.applier.apply(op, payload) {
        error!(seq, "cannot apply {}: {e}", op.name());
        let _ = sh.acks.send((st.applied, st.durable));
        let _ = sh.out.try_send(FromMirror::Failed {
            seq,
            errno: e.errno(),
            reason: e.to_string(),
        });
        return false;
    }
    st.applied = seq;
    true
}

/// Syncs everything applied so far and acknowledges it as durable.
fn commit(sh: &Shared, st: &mut Applying) -> bool {
    if let Err(e) = st.applier.make_durable() {
        error!(seq = st.applied, "cannot make the mirror durable: {e}");
        let _ = sh.acks.send((st.applied, st.durable));
        let _ = sh.out.try_send(FromMirror::Failed {
            seq: st.applied,
            errno: e.errno(),
            reason: e.to_string(),
        });
        return false;
    }
    st.durable = st.applied;
    let _ = sh.acks.send((st.applied, st.durable));
    st.acked = st.applied;
    true
}

/// The session's data path: the reader side. Consumes `reader` until the
/// stream ends or fails; the applier thread then drains what it was given.
pub(crate) async fn run(
    applier: Applier,
    scan_fd: OwnedFd,
    reader: &mut FrameReader,
    acks: watch::Sender<(Seq, Seq)>,
    out: mpsc::Sender<FromMirror>,
    node: &str,
    next_seq: Seq,
) -> anyhow::Result<()> {
    // The session's first op is `next_seq` (see the hello): everything
    // before it counts as applied and durable for this session's
    // acknowledgements.
    let base = next_seq - 1;
    let sh = Arc::new(Shared {
        state: Mutex::new(Applying {
            applier,
            applied: base,
            durable: base,
            acked: base,
        }),
        queued: AtomicU64::new(0),
        acks,
        out,
    });
    let (work_tx, work_rx) = mpsc::channel::<Work>(APPLY_QUEUE);
    let thread_sh = sh.clone();
    let thread = std::thread::Builder::new()
        .name("mirror-apply".into())
        .spawn(move || apply_thread(thread_sh, scan_fd, work_rx))
        .map_err(|e| anyhow::anyhow!("spawning the applier thread: {e}"))?;
    let result = read_loop(&sh, reader, work_tx, node, next_seq).await;
    // The reader is done (stream end, error or refusal): the thread drains
    // what it was given.
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    let st = sh.lock();
    let _ = sh.acks.send((st.applied, st.durable));
    result
}

/// Checks and decodes one frame body into work.
fn decode(body: PooledBuf, expected: &mut Seq, node: &str) -> anyhow::Result<Work> {
    let frame = match hapair_proto::decode_to_mirror(body) {
        Ok(f) => f,
        Err(e) => {
            // Hostile or corrupt: refused, logged, never applied. The
            // stream's order can no longer be trusted, so the session ends.
            error!(node, "refused a malformed message: {e}; ending the session");
            anyhow::bail!("malformed message: {e}");
        }
    };
    Ok(match frame.header {
        ToMirror::Hello { .. } => anyhow::bail!("second hello on one session"),
        ToMirror::ManifestRequest { hash_content } => Work::Manifest { hash: hash_content },
        ToMirror::Op { seq, op } => {
            if seq != *expected {
                error!(
                    node,
                    seq,
                    expected = *expected,
                    "refused an out-of-order operation; ending the session"
                );
                anyhow::bail!("operation {seq} out of order (expected {expected})");
            }
            *expected += 1;
            Work::Op {
                seq,
                op,
                payload: frame.payload,
            }
        }
    })
}

fn inline_eligible(w: &Work) -> bool {
    matches!(w, Work::Op { payload, .. } if payload.len() <= INLINE_MAX_PAYLOAD)
}

/// A frame body that has already arrived, without waiting: `Poll::Pending`
/// if none is complete yet. `next_body` is cancel-safe, so the unfinished
/// future may be dropped.
fn body_ready(reader: &mut FrameReader) -> Poll<anyhow::Result<Option<PooledBuf>>> {
    let mut cx = Context::from_waker(Waker::noop());
    std::pin::pin!(reader.next_body()).poll(&mut cx)
}

/// The next frame body, polled for as `polling` says, then awaited.
async fn next_body(
    reader: &mut FrameReader,
    polling: &mut Polling,
) -> anyhow::Result<Option<PooledBuf>> {
    let start = Instant::now();
    let budget = polling.budget(start);
    if !budget.is_zero() {
        loop {
            if let Poll::Ready(r) = body_ready(reader) {
                polling.arrived(start.elapsed());
                return r;
            }
            if start.elapsed() >= budget {
                break;
            }
            poll_turn().await;
        }
    }
    let r = reader.next_body().await;
    polling.arrived(start.elapsed());
    r
}

async fn read_loop(
    sh: &Arc<Shared>,
    reader: &mut FrameReader,
    work: mpsc::Sender<Work>,
    node: &str,
    next_seq: Seq,
) -> anyhow::Result<()> {
    let mut expected: Seq = next_seq;
    let mut next: Option<Work> = None;
    let mut polling = Polling::new();
    loop {
        let w = match next.take() {
            Some(w) => w,
            None => match next_body(reader, &mut polling).await {
                Ok(Some(b)) => decode(b, &mut expected, node)?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.context(format!("reading from {node}"))),
            },
        };
        if !(inline_eligible(&w) && sh.queued.load(Ordering::Acquire) == 0) {
            polling.done(false);
            sh.queued.fetch_add(1, Ordering::AcqRel);
            if work.send(w).await.is_err() {
                return Ok(()); // the thread stopped (it reported why)
            }
            continue;
        }
        // Inline: nothing is pending on the thread (only this task adds to
        // `queued`, and the thread lowers it under the lock when done).
        let mut run = InlineRun {
            cur: Some(w),
            barrier: false,
            ops: 0,
            bytes: 0,
            yielded: false,
        };
        loop {
            // The lock is held only inside this block, never across an await.
            let step = {
                let mut st = sh.lock();
                inline_step(
                    sh,
                    &mut st,
                    reader,
                    &mut run,
                    &mut next,
                    &mut expected,
                    node,
                )?
            };
            match step {
                Step::Yield => tokio::task::yield_now().await,
                Step::Done(None) => break,
                Step::Done(Some(r)) => return r,
            }
        }
        polling.done(run.barrier);
    }
}

/// An inline run of operations (see the module documentation).
struct InlineRun {
    /// The next operation to apply.
    cur: Option<Work>,
    /// A barrier was among them: the run ends with a sync.
    barrier: bool,
    ops: usize,
    bytes: usize,
    /// The run already let the connection's driver run once.
    yielded: bool,
}

enum Step {
    /// Release the lock and let other tasks run, then continue the run.
    Yield,
    /// The run is over (and the stream too, with its outcome, if Some).
    Done(Option<anyhow::Result<()>>),
}

/// Applies `run.cur` and what has already arrived behind it, then syncs (if
/// a barrier was among them) and acknowledges.
fn inline_step(
    sh: &Shared,
    st: &mut Applying,
    reader: &mut FrameReader,
    run: &mut InlineRun,
    next: &mut Option<Work>,
    expected: &mut Seq,
    node: &str,
) -> anyhow::Result<Step> {
    let mut ended = None;
    loop {
        if let Some(Work::Op { seq, op, payload }) = run.cur.take() {
            if matches!(op, Op::Barrier) {
                run.barrier = true;
                st.applied = seq;
            } else if !apply_op(sh, st, seq, &op, &payload) {
                anyhow::bail!("operation {seq} could not be applied");
            }
            run.ops += 1;
            run.bytes += payload.len();
            if run.ops >= GROUP_COMMIT_OPS || run.bytes >= GROUP_COMMIT_BYTES {
                break;
            }
        }
        // Take what has already arrived behind it: one acknowledgement, and
        // for barriers one sync, for all of it (group commit).
        match body_ready(reader) {
            Poll::Pending if run.barrier && !run.yielded => {
                // Packets that came in while this task was applying are only
                // decoded when the connection's driver runs (on this thread):
                // let it, once, before syncing.
                run.yielded = true;
                return Ok(Step::Yield);
            }
            Poll::Pending => break,
            Poll::Ready(Ok(Some(b))) => {
                let w = decode(b, expected, node)?;
                if inline_eligible(&w) {
                    run.cur = Some(w);
                } else {
                    *next = Some(w);
                    break;
                }
            }
            Poll::Ready(Ok(None)) => {
                ended = Some(Ok(()));
                break;
            }
            Poll::Ready(Err(e)) => {
                ended = Some(Err(e.context(format!("reading from {node}"))));
                break;
            }
        }
    }
    if run.barrier {
        if !commit(sh, st) {
            anyhow::bail!("the mirror could not be made durable");
        }
    } else {
        let _ = sh.acks.send((st.applied, st.durable));
        st.acked = st.applied;
    }
    Ok(Step::Done(ended))
}

fn apply_thread(sh: Arc<Shared>, scan_fd: OwnedFd, mut work: mpsc::Receiver<Work>) {
    // Work taken from the queue by a group commit but not applied by it.
    let mut pending: Option<Work> = None;
    while let Some(w) = pending.take().or_else(|| work.blocking_recv()) {
        match w {
            Work::Manifest { hash } => {
                let mut sink = |entries: Vec<hapair_proto::ManifestEntry>| -> anyhow::Result<()> {
                    sh.out
                        .blocking_send(FromMirror::Manifest {
                            entries,
                            last: false,
                        })
                        .map_err(|_| anyhow::anyhow!("session closed"))
                };
                let msg = match hapair_mirror::scan_tree(scan_fd.as_fd(), hash, &mut sink) {
                    Ok(()) => FromMirror::Manifest {
                        entries: vec![],
                        last: true,
                    },
                    Err(e) => FromMirror::Failed {
                        seq: 0,
                        errno: libc::EIO,
                        reason: format!("scan failed: {e:#}"),
                    },
                };
                let _ = sh.out.blocking_send(msg);
                sh.queued.fetch_sub(1, Ordering::AcqRel);
            }
            Work::Op { seq, op, payload } => {
                let mut st = sh.lock();
                let mut done = 1u64;
                if !matches!(op, Op::Barrier) {
                    let ok = apply_op(&sh, &mut st, seq, &op, &payload);
                    if !ok {
                        return;
                    }
                    if work.is_empty() || st.applied - st.acked >= ACK_EVERY_OPS {
                        let _ = sh.acks.send((st.applied, st.durable));
                        st.acked = st.applied;
                    }
                    sh.queued.fetch_sub(done, Ordering::AcqRel);
                    continue;
                }
                // Group commit over what is already queued behind it.
                st.applied = seq;
                let (mut n, mut bytes) = (0, 0);
                while n < GROUP_COMMIT_OPS && bytes < GROUP_COMMIT_BYTES {
                    let Ok(next) = work.try_recv() else { break };
                    let Work::Op { seq, op, payload } = next else {
                        pending = Some(next);
                        break;
                    };
                    done += 1;
                    if matches!(op, Op::Barrier) {
                        st.applied = seq;
                    } else if !apply_op(&sh, &mut st, seq, &op, &payload) {
                        return;
                    }
                    n += 1;
                    bytes += payload.len();
                }
                if !commit(&sh, &mut st) {
                    return;
                }
                sh.queued.fetch_sub(done, Ordering::AcqRel);
            }
        }
    }
}
