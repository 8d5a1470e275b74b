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
//! a bounded time instead of letting its thread go idle (see `Polling`).

use hapair_mirror::Applier;
use hapair_proto::{FromMirror, Op, PooledBuf, Seq, ToMirror};
use hapair_transport::FrameReader;
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::error;

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
/// How long the reader polls for the next operation before it parks (see
/// `Polling`).
const POLL_FOR: Duration = Duration::from_micros(500);
/// See `Polling`.
const POLL_MISSES: u32 = 2;

/// When the reader polls for the next operation instead of parking its
/// thread. Waking an idle thread costs a wake-up of an idle CPU, 25-50 µs
/// on a virtual machine, and an application that fsyncs often waits for the
/// mirror's reader once per durability point. So after acknowledging a
/// durability point, the reader polls for the next operation (yielding the
/// CPU to any other thread that wants it, then to the runtime's other
/// tasks, which are what move received packets into the stream) for up to
/// `POLL_FOR`. It stops after `POLL_MISSES` such polls in a row found
/// nothing, and starts again once an operation follows a durability point
/// within `POLL_FOR`: rare durability points cost at most `POLL_MISSES`
/// polls, and a bulk stream (few durability points) none.
///
/// It polls only while the host gives this machine its CPUs (`Steal`): on a
/// virtual machine whose host is busy, a polling CPU is taken from the
/// machine's other threads, and b fell by half (1,456 to 805 IOPS, 1,876 to
/// 953) in such stretches with polling that did not look.
struct Polling {
    /// The last thing done was acknowledging a durability point.
    after_commit: bool,
    /// Waits after a durability point in a row that lasted `POLL_FOR` or
    /// more.
    misses: u32,
    steal: Steal,
}

impl Polling {
    fn new() -> Polling {
        Polling {
            after_commit: false,
            misses: 0,
            steal: Steal::new(),
        }
    }

    /// How long to poll before parking, for the next wait.
    fn budget(&mut self, now: Instant) -> Duration {
        if self.after_commit && self.misses < POLL_MISSES && self.steal.calm(now) {
            POLL_FOR
        } else {
            Duration::ZERO
        }
    }

    /// The next operation came after `waited`.
    fn arrived(&mut self, waited: Duration) {
        if std::mem::take(&mut self.after_commit) {
            if waited < POLL_FOR {
                self.misses = 0;
            } else {
                self.misses = self.misses.saturating_add(1);
            }
        }
    }

    /// What the reader did before its next wait: acknowledged a durability
    /// point, or not.
    fn done(&mut self, committed: bool) {
        self.after_commit = committed;
    }
}

/// How often `Steal` reads the machine's CPU times.
const STEAL_EVERY: Duration = Duration::from_millis(250);
/// Most `STEAL_EVERY` periods without polling after stolen time was seen.
const STEAL_HOLD_MAX: u32 = 32;

/// Whether the host lets this machine run: the CPU time stolen from it (by
/// the hypervisor, for other guests) from `/proc/stat`, read at most once
/// per `STEAL_EVERY`. A period in which more than 2 % of the CPU time was
/// stolen is busy, and so are the `hold` periods after it; `hold` doubles
/// with each busy period in a row that is seen (up to `STEAL_HOLD_MAX`,
/// 8 s), since polling can itself make the host take CPU time back, and is
/// halved by a calm one. A machine whose `/proc/stat` cannot be read counts
/// as busy (no polling), a machine that is not virtual as calm.
struct Steal {
    checked: Option<Instant>,
    /// (total, steal) CPU time at the last check, in clock ticks.
    last: Option<(u64, u64)>,
    /// Periods still to pass without polling.
    hold: u32,
    /// The hold the next busy period gets.
    backoff: u32,
    calm: bool,
}

impl Steal {
    fn new() -> Steal {
        Steal {
            checked: None,
            last: None,
            hold: 0,
            backoff: 1,
            calm: false,
        }
    }

    fn calm(&mut self, now: Instant) -> bool {
        if self
            .checked
            .is_some_and(|t| now.saturating_duration_since(t) < STEAL_EVERY)
        {
            return self.calm;
        }
        self.checked = Some(now);
        let times = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| cpu_times(&s));
        self.observe(times);
        self.calm
    }

    /// A new reading of the machine's (total, steal) CPU times, if any.
    fn observe(&mut self, times: Option<(u64, u64)>) {
        let low = match (self.last, times) {
            (Some((t0, s0)), Some((t1, s1))) => {
                Some(steal_is_low(t1.saturating_sub(t0), s1.saturating_sub(s0)))
            }
            _ => None,
        };
        self.last = times;
        match low {
            None => self.calm = false,
            Some(false) => {
                self.hold = self.backoff;
                self.backoff = (self.backoff * 2).min(STEAL_HOLD_MAX);
                self.calm = false;
            }
            Some(true) if self.hold > 0 => {
                self.hold -= 1;
                self.calm = false;
            }
            Some(true) => {
                self.backoff = (self.backoff / 2).max(1);
                self.calm = true;
            }
        }
    }
}

/// At most 2 % of `total` CPU time was stolen (and some time passed).
fn steal_is_low(total: u64, steal: u64) -> bool {
    total > 0 && steal.saturating_mul(50) <= total
}

/// The machine's total and stolen CPU time, in clock ticks, from the
/// `cpu` line of `/proc/stat` (user nice system idle iowait irq softirq
/// steal ...; guest time is already counted in user and nice).
fn cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 8 {
        return None;
    }
    Some((v.iter().sum(), v[7]))
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
            // The CPU goes first to any thread that is ready to run on it
            // (on the mirror's machine: anything else it runs), then to this
            // runtime's other tasks.
            std::thread::yield_now();
            tokio::task::yield_now().await;
        }
    }
    let r = reader.next_body().await;
    polling.arrived(start.elapsed());
    r
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Steal` that has seen a calm period and is past any hold.
    fn calm_steal() -> Steal {
        let mut s = Steal::new();
        s.observe(Some((1000, 0)));
        s.observe(Some((1050, 0)));
        assert!(s.calm);
        s
    }

    #[test]
    fn cpu_times_reads_the_cpu_line() {
        let stat = "cpu  1781335 102 593197 6365755 227959 0 54130 324213 0 0\n\
                    cpu0 898816 41 302684 3157746 132094 0 18745 161487 0 0\n\
                    intr 1 2 3\n";
        let total = 1781335 + 102 + 593197 + 6365755 + 227959 + 54130 + 324213;
        assert_eq!(cpu_times(stat), Some((total, 324213)));
        // Kernels before steal was counted, and garbage: no reading.
        assert_eq!(cpu_times("cpu  1 2 3 4 5 6 7\n"), None);
        assert_eq!(cpu_times("cpu  1 2 x 4 5 6 7 8\n"), None);
        assert_eq!(cpu_times("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(cpu_times(""), None);
        // The one on this machine can be read.
        let here = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
        assert!(cpu_times(&here).is_some(), "{here}");
    }

    #[test]
    fn steal_is_low_up_to_two_percent() {
        assert!(steal_is_low(50, 0));
        assert!(steal_is_low(50, 1));
        assert!(!steal_is_low(50, 2));
        assert!(steal_is_low(100, 2));
        assert!(!steal_is_low(100, 3));
        assert!(!steal_is_low(0, 0), "no time passed: no evidence");
    }

    #[test]
    fn stolen_time_stops_polling_for_longer_each_time_and_calm_brings_it_back() {
        let mut s = Steal::new();
        assert!(!s.calm, "nothing measured yet");
        s.observe(Some((1000, 0)));
        assert!(!s.calm, "one reading is no period");
        s.observe(Some((1050, 0)));
        assert!(s.calm);
        // A busy period: 1 period of hold, then 2, then 4 (busy in a row).
        s.observe(Some((1100, 10)));
        assert!(!s.calm);
        assert_eq!(s.hold, 1);
        s.observe(Some((1150, 30)));
        assert_eq!((s.calm, s.hold), (false, 2));
        s.observe(Some((1200, 50)));
        assert_eq!((s.calm, s.hold), (false, 4));
        // Calm periods pay the hold off first, then polling resumes.
        let mut t = 1200;
        for left in (0..4).rev() {
            t += 50;
            s.observe(Some((t, 50)));
            assert_eq!((s.calm, s.hold), (false, left));
        }
        t += 50;
        s.observe(Some((t, 50)));
        assert!(s.calm);
        // The back-off is bounded.
        for _ in 0..20 {
            t += 50;
            s.observe(Some((t, t)));
        }
        assert_eq!(s.hold, STEAL_HOLD_MAX);
        // An unreadable /proc/stat: busy, and the next reading starts over.
        let mut s = calm_steal();
        s.observe(None);
        assert!(!s.calm);
        s.observe(Some((5000, 0)));
        assert!(!s.calm);
        s.observe(Some((5050, 0)));
        assert!(s.calm);
    }

    #[test]
    fn polls_only_after_a_durability_point_and_stops_after_misses() {
        let now = Instant::now();
        let mut p = Polling::new();
        p.steal = calm_steal();
        p.steal.checked = Some(now);
        assert_eq!(p.budget(now), Duration::ZERO, "nothing committed yet");
        p.done(false);
        assert_eq!(p.budget(now), Duration::ZERO, "no durability point");
        p.done(true);
        assert_eq!(p.budget(now), POLL_FOR);
        // The next operation came soon: keep polling.
        p.arrived(Duration::from_micros(100));
        p.done(true);
        assert_eq!(p.budget(now), POLL_FOR);
        // Two long waits in a row: stop.
        p.arrived(POLL_FOR * 4);
        p.done(true);
        assert_eq!(p.budget(now), POLL_FOR);
        p.arrived(POLL_FOR * 4);
        p.done(true);
        assert_eq!(p.budget(now), Duration::ZERO);
        // A quick follow-up (seen while parked) brings polling back.
        p.arrived(Duration::from_micros(100));
        p.done(true);
        assert_eq!(p.budget(now), POLL_FOR);
        // A busy host: no polling even right after a durability point.
        p.steal.calm = false;
        assert_eq!(p.budget(now), Duration::ZERO);
    }
}
