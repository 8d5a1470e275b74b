//! The mount's replication client: the adapter around `hapair_repl_core`.
//!
//! FUSE threads call [`ReplClient`] through the `Replicator` trait: they
//! block on a `std` condition variable (backpressure, strict acks,
//! durability points, a supervised mount held without its mirror); tokio
//! tasks move frames to the mirror and acknowledgements back. All state
//! lives in one mutex, `Shared::inner`; nothing else is locked while it is
//! held except the journal file (which it owns), so there is no lock order
//! to get wrong.
//!
//! # Sessions
//! A client starts either connected ([`ReplClient::replicating`], used by
//! tests of the pipeline) or degraded ([`ReplClient::degraded`]), and joins
//! the mirror with [`ReplClient::resync`]: a new session whose sender and
//! receiver tasks carry the session's number, so that the tasks of an
//! earlier session never touch a later one. While a session resyncs, the
//! caller keeps application mutations paused; when its final barrier is
//! durable the journal is cleared and the pipeline replicates.

use crate::poll::{poll_turn, AckPolling};
use crate::state::{StateDir, Status};
use bytes::Bytes;
use hapair_fs_replica::Completion;
use hapair_proto::{encode_frame_head, FromMirror, Mode, Op, Seq, ToMirror};
use hapair_repl_core::journal::{self, DirtyRecord};
use hapair_repl_core::{Admit, CoreConfig, LinkState, ReplCore, WaitFor};
use hapair_transport::{FrameReader, FrameWriter, InlineRuntime};
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Per-op bytes counted in flight beyond the payload (header estimate).
const OP_OVERHEAD_BYTES: u64 = 128;
/// Most chunks (a frame is one or two) the sender takes from the queue per
/// batch.
const SEND_BATCH_CHUNKS: usize = 256;
/// Payloads up to this size are copied into their frame's first chunk; larger
/// ones travel as a chunk of their own, never copied on the way to QUIC.
const INLINE_PAYLOAD_BYTES: usize = 16 << 10;
/// Most bytes the sender takes from the queue per batch.
const SEND_BATCH_BYTES: usize = 4 << 20;
/// How often the timer task runs: it sends operations nobody waits for yet
/// (see `LAZY_SEND_BYTES`), answers waiters, checks the timeout.
const TICK: Duration = Duration::from_millis(10);
/// Operations nobody waits for (sync and async modes) do not wake the
/// sender: they leave with the next one somebody waits for (a barrier), when
/// this many bytes are queued, or at the next tick. A write and the fsync
/// after it then travel, are applied and acknowledged together, and runs of
/// small operations leave in batches, with one wake-up of each thread on the
/// way instead of one per operation. The mirror's lag grows by at most a tick.
const LAZY_SEND_BYTES: u64 = 256 << 10;
/// Most FUSE requests waiting for the mirror without a thread each (see
/// [`Waiter`]); beyond, callers block their FUSE worker as before. Each is
/// an application thread blocked in a system call, so this is only reached
/// by thousands of threads syncing at once.
const MAX_WAITERS: usize = 4096;

/// A FUSE request whose answer waits for the mirror. It is answered by the
/// code that makes its condition true: the receiver on an acknowledgement,
/// or the timer once the pipeline went degraded.
struct Waiter {
    w: WaitFor,
    /// A durability point: if the pipeline went degraded instead, the
    /// journal must be durable before the request is answered.
    durability: bool,
    done: Completion,
}

struct Inner {
    core: ReplCore,
    /// Encoded frames not yet handed to the sender task, as chunks (a
    /// frame's head, with its payload when small, then a large payload).
    queue: VecDeque<Bytes>,
    /// Bytes in `queue`.
    queued_bytes: u64,
    /// The sender must send what is queued now (someone waits for it, or the
    /// tick came).
    send_now: bool,
    /// What every not-yet-applied operation dirtied, in sequence order, so
    /// that it can be journaled if the mirror goes away.
    unacked: VecDeque<(Seq, Vec<DirtyRecord>)>,
    /// Open while degraded.
    journal: Option<File>,
    journal_records: u64,
    connection: Option<quinn::Connection>,
    /// Number of the current session (0: none yet). Tasks of an older
    /// session stop as soon as they see a different number.
    session: u64,
    /// Set by `shutdown`: the sender stops after draining.
    closing: bool,
    /// Set by `abort`: held and waiting callers fail with EIO (the mount is
    /// being torn down in an emergency; nothing may be acknowledged).
    aborted: bool,
    /// Under the supervisor, a completed resync ends the permission to go
    /// on alone (the supervisor grants it again when the peer is lost).
    supervised: bool,
    /// Requests answered when their condition holds (an acknowledgement, a
    /// permission to go on alone, a completed resync) or failed when the
    /// client is aborted. At most `MAX_WAITERS`.
    waiters: Vec<Waiter>,
    /// Sequence number of the last barrier recorded (0: none): a durability
    /// point with nothing recorded since reuses it instead of adding one.
    last_barrier: Seq,
    /// The last barrier recorded before the application asked for one
    /// (see `Replicator::early_barrier`; 0: none yet), how many were, and
    /// how many durability points found one still the last op recorded.
    early_seq: Seq,
    early_recorded: u64,
    early_reused: u64,
    /// Threads blocked on `Shared::cond` (an acknowledgement wakes them
    /// only if there are any: a wake-up is a system call).
    blocked: u32,
    /// The current session's stream, for sending from the recording thread
    /// (see `send_inline`).
    inline: Option<InlineSend>,
}

/// A handshaken replication stream to the mirror, for a session.
pub struct Link {
    pub conn: quinn::Connection,
    pub writer: FrameWriter,
    pub reader: FrameReader,
    /// The runtime of the connection's endpoint, if FUSE threads may send
    /// through it themselves (see `ReplClient::send_inline`).
    pub inline: Option<Arc<InlineRuntime>>,
}

/// What a FUSE thread needs to send a session's queued frames itself.
#[derive(Clone)]
struct InlineSend {
    session: u64,
    rt: Arc<InlineRuntime>,
    writer: SharedWriter,
}

/// The session's stream writer: whoever sends holds it while it takes
/// frames from the queue and writes them, so frames leave in queue order.
type SharedWriter = Arc<tokio::sync::Mutex<FrameWriter>>;

pub struct Shared {
    inner: Mutex<Inner>,
    cond: Condvar,
    wake_sender: tokio::sync::Notify,
    /// Wakes `ack_poller` when a durability point starts waiting.
    wake_poller: tokio::sync::Notify,
    /// The highest sequence number a durability point waits to see durable
    /// on the mirror, and the mirror's durable sequence number as last
    /// acknowledged: `ack_poller` polls while the first is ahead.
    poll_target: AtomicU64,
    acked_durable: AtomicU64,
    /// Polls `ack_poller` made, and those the acknowledgement ended.
    ack_polls: AtomicU64,
    ack_polls_answered: AtomicU64,
    started: Instant,
    state: StateDir,
    status_base: Status,
    /// The kernel holds the FUSE mount this client serves (see
    /// [`ReplClient::set_serving`]).
    serving: AtomicBool,
}

/// The replication client of one mount.
#[derive(Clone)]
pub struct ReplClient {
    sh: Arc<Shared>,
}

/// Figures for status displays.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ClientStats {
    pub state: String,
    pub alone_allowed: bool,
    pub last_seq: Seq,
    pub applied_seq: Seq,
    pub durable_seq: Seq,
    pub inflight_bytes: u64,
    pub degraded_reason: Option<String>,
    pub journal_records: u64,
    pub early_barriers: u64,
    pub early_barriers_reused: u64,
    pub ack_polls: u64,
    pub ack_polls_answered: u64,
}

impl ReplClient {
    /// A client with no mirror: every operation is journaled. `supervised`:
    /// callers are held (not acknowledged) until [`ReplClient::allow_alone`]
    /// or a completed resync; otherwise they go on alone at once.
    pub fn degraded(
        cfg: CoreConfig,
        state: StateDir,
        status_base: Status,
        reason: String,
        supervised: bool,
    ) -> anyhow::Result<Self> {
        let journal = state.open_journal_append()?;
        let mut core = ReplCore::new_degraded(cfg, reason);
        core.set_alone_allowed(!supervised);
        let c = Self::build(core, state, status_base, Some(journal), None, supervised);
        c.spawn_timer();
        c.write_status();
        Ok(c)
    }

    /// A client replicating over an established, handshaken stream (its
    /// first op is seq 1). Spawns the sender, receiver and timer tasks on
    /// the current tokio runtime.
    #[allow(dead_code)]
    pub fn replicating(
        cfg: CoreConfig,
        state: StateDir,
        status_base: Status,
        conn: quinn::Connection,
        writer: FrameWriter,
        reader: FrameReader,
    ) -> Self {
        let c = Self::build(
            ReplCore::new(cfg),
            state,
            status_base,
            None,
            Some(conn),
            false,
        );
        c.lock().session = 1;
        tokio::spawn(
            c.clone()
                .sender(Arc::new(tokio::sync::Mutex::new(writer)), 1),
        );
        tokio::spawn(c.clone().receiver(reader, 1));
        c.spawn_timer();
        c.write_status();
        c
    }

    fn build(
        core: ReplCore,
        state: StateDir,
        status_base: Status,
        journal: Option<File>,
        connection: Option<quinn::Connection>,
        supervised: bool,
    ) -> Self {
        ReplClient {
            sh: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    core,
                    queue: VecDeque::new(),
                    queued_bytes: 0,
                    send_now: false,
                    unacked: VecDeque::new(),
                    journal,
                    journal_records: 0,
                    connection,
                    session: 0,
                    closing: false,
                    aborted: false,
                    supervised,
                    waiters: Vec::new(),
                    last_barrier: 0,
                    early_seq: 0,
                    early_recorded: 0,
                    early_reused: 0,
                    blocked: 0,
                    inline: None,
                }),
                cond: Condvar::new(),
                wake_sender: tokio::sync::Notify::new(),
                wake_poller: tokio::sync::Notify::new(),
                poll_target: AtomicU64::new(0),
                acked_durable: AtomicU64::new(0),
                ack_polls: AtomicU64::new(0),
                ack_polls_answered: AtomicU64::new(0),
                started: Instant::now(),
                state,
                status_base,
                serving: AtomicBool::new(false),
            }),
        }
    }

    fn spawn_timer(&self) {
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(self.clone().timer());
                h.spawn(self.clone().ack_poller());
            }
            Err(_) => error!("replication client built outside a runtime: no timer"),
        }
    }

    fn now_ms(&self) -> u64 {
        self.sh.started.elapsed().as_millis() as u64
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a thread panicked while holding it; the
        // state it protects is still consistent (every mutation is a
        // single call into the core), so carry on rather than take the
        // whole mount down.
        self.sh.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_degraded(&self) -> bool {
        self.lock().core.state() == LinkState::Degraded
    }

    pub fn link_state(&self) -> LinkState {
        self.lock().core.state()
    }

    /// The next seq this client will hand out (for a session's hello).
    pub fn next_seq(&self) -> Seq {
        self.lock().core.last_seq() + 1
    }

    /// Grants or withdraws the permission to go on without the mirror (see
    /// `ReplCore::set_alone_allowed`). Granting it releases held callers.
    pub fn allow_alone(&self, allowed: bool) {
        let mut g = self.lock();
        g.core.set_alone_allowed(allowed);
        drop(g);
        self.sh.cond.notify_all();
        self.complete_ready();
        self.write_status();
    }

    /// Fails every held or waiting caller with EIO from now on, and drops the
    /// link: the mount is being torn down without a flush.
    pub fn abort(&self) {
        let mut g = self.lock();
        g.aborted = true;
        if g.core.state() != LinkState::Degraded {
            self.go_degraded(&mut g, "aborted");
        }
        let failed = std::mem::take(&mut g.waiters);
        drop(g);
        self.sh.cond.notify_all();
        for w in failed {
            (w.done)(Err(libc::EIO));
        }
    }

    /// Ends the current session with the mirror, if any (everything not yet
    /// applied goes to the journal), so that the next resync starts a new
    /// one. The supervisor asks for a resync when the peer's mirror (re)started:
    /// whatever an older session believes, the mirror may hold less.
    pub fn end_session(&self, reason: &str) {
        let mut g = self.lock();
        if g.core.state() != LinkState::Degraded {
            self.go_degraded(&mut g, reason);
        }
        drop(g);
        self.write_status();
    }

    pub fn stats(&self) -> ClientStats {
        let g = self.lock();
        ClientStats {
            state: state_name(g.core.state()).to_string(),
            alone_allowed: g.core.alone_allowed(),
            last_seq: g.core.last_seq(),
            applied_seq: g.core.applied(),
            durable_seq: g.core.durable(),
            inflight_bytes: g.core.inflight_bytes(),
            degraded_reason: g.core.degraded_reason().map(str::to_string),
            journal_records: g.journal_records,
            early_barriers: g.early_recorded,
            early_barriers_reused: g.early_reused,
            ack_polls: self.sh.ack_polls.load(Ordering::Relaxed),
            ack_polls_answered: self.sh.ack_polls_answered.load(Ordering::Relaxed),
        }
    }

    /// Switches to degraded: everything not yet applied goes to the journal.
    fn go_degraded(&self, g: &mut MutexGuard<'_, Inner>, reason: &str) {
        if g.core.state() != LinkState::Degraded {
            g.core.degrade(reason.to_string());
        }
        if g.journal.is_some() {
            return;
        }
        warn!(
            reason,
            "mirror lost: continuing without it, journaling changes for the resync"
        );
        g.queue.clear();
        g.queued_bytes = 0;
        g.send_now = false;
        if let Some(c) = g.connection.take() {
            c.close(1u32.into(), b"degraded");
        }
        let mut buf = Vec::new();
        let mut n = 0u64;
        for (_, recs) in g.unacked.drain(..) {
            for r in recs {
                journal::encode(&r, &mut buf);
                n += 1;
            }
        }
        g.journal_records += n;
        match self.sh.state.open_journal_append() {
            Ok(mut f) => {
                if let Err(e) = f.write_all(&buf) {
                    error!("cannot write the degraded-mode journal: {e}");
                }
                g.journal = Some(f);
            }
            Err(e) => error!("cannot open the degraded-mode journal: {e:#}"),
        }
        self.sh.cond.notify_all();
        self.sh.wake_sender.notify_one();
    }

    fn journal_append(
        &self,
        g: &mut MutexGuard<'_, Inner>,
        recs: &[DirtyRecord],
    ) -> Result<(), i32> {
        let mut buf = Vec::new();
        for r in recs {
            journal::encode(r, &mut buf);
        }
        g.journal_records += recs.len() as u64;
        match g.journal.as_mut() {
            Some(f) => f.write_all(&buf).map_err(|e| {
                error!("journal append failed: {e}");
                libc::EIO
            }),
            None => {
                error!("degraded without a journal: a change cannot be recorded");
                Err(libc::EIO)
            }
        }
    }

    /// Enqueues one operation (see `Replicator::record`).
    pub fn record_op(&self, op: Op, payload: &[u8]) -> Seq {
        self.record_payload(op, Payload::Borrowed(payload))
    }

    /// Enqueues one operation whose payload is kept as it is (see
    /// `Replicator::record_owned`).
    pub fn record_op_owned(&self, op: Op, payload: Bytes) -> Seq {
        self.record_payload(op, Payload::Owned(payload))
    }

    fn record_payload(&self, op: Op, payload: Payload<'_>) -> Seq {
        let payload_len = payload.len();
        let bytes = payload_len as u64 + OP_OVERHEAD_BYTES;
        let mut g = self.lock();
        loop {
            let now = self.now_ms();
            if g.core.admit(bytes, now) == Admit::Yes {
                break;
            }
            // Waiting for acknowledgements: what is queued must leave first.
            if !g.send_now && !g.queue.is_empty() {
                g.send_now = true;
                self.sh.wake_sender.notify_one();
            }
            g = self.tick_or_wait(g, 10);
        }
        let seq = g.core.push(bytes, self.now_ms());
        let is_barrier = matches!(op, Op::Barrier);
        if is_barrier {
            g.last_barrier = seq;
        }
        let recs = journal::records_for(&op, payload_len);
        match g.core.state() {
            LinkState::Replicating | LinkState::Resyncing => {
                if !self.enqueue(&mut g, seq, op, payload, recs) {
                    return seq;
                }
                // Wake the sender only when someone waits for this operation
                // or enough is queued (see LAZY_SEND_BYTES).
                let wake = is_barrier
                    || g.core.config().mode == Mode::Strict
                    || g.queued_bytes >= LAZY_SEND_BYTES;
                g.send_now |= wake;
                // A barrier someone waits for, behind little: sent from here.
                let inline = is_barrier && g.queued_bytes < LAZY_SEND_BYTES;
                drop(g);
                if wake && !(inline && self.send_inline()) {
                    self.sh.wake_sender.notify_one();
                }
            }
            LinkState::Degraded => {
                let _ = self.journal_append(&mut g, &recs);
            }
        }
        seq
    }

    /// Encodes one recorded operation into the send queue. False: it could
    /// not be encoded (only a bug can do that: sizes are bounded by the FUSE
    /// layer), and the pipeline went degraded, keeping the change in the
    /// journal.
    fn enqueue(
        &self,
        g: &mut MutexGuard<'_, Inner>,
        seq: Seq,
        op: Op,
        payload: Payload<'_>,
        recs: Vec<DirtyRecord>,
    ) -> bool {
        let payload_len = payload.len();
        let inline = payload_len <= INLINE_PAYLOAD_BYTES;
        let mut head = Vec::with_capacity(if inline { payload_len + 64 } else { 64 });
        let msg = ToMirror::Op { seq, op };
        if let Err(e) = encode_frame_head(&msg, payload_len, &mut head) {
            error!("cannot encode op {seq}: {e}; going degraded");
            g.unacked.push_back((seq, recs));
            self.go_degraded(g, "unencodable operation");
            return false;
        }
        g.queued_bytes += (head.len() + payload_len) as u64;
        if inline {
            head.extend_from_slice(payload.as_slice());
            g.queue.push_back(Bytes::from(head));
        } else {
            g.queue.push_back(Bytes::from(head));
            if payload_len > 0 {
                g.queue.push_back(payload.into_bytes());
            }
        }
        g.unacked.push_back((seq, recs));
        true
    }

    /// Records a barrier right after a write that the application is
    /// expected to make durable next (see `Replicator::early_barrier`), in
    /// sync mode while replicating, if the pipeline admits it at once (a
    /// guess never waits). True if it was recorded.
    pub fn early_barrier(&self) -> bool {
        let mut g = self.lock();
        let now = self.now_ms();
        if g.core.config().mode != Mode::Sync
            || g.core.state() != LinkState::Replicating
            || g.core.admit(OP_OVERHEAD_BYTES, now) != Admit::Yes
        {
            return false;
        }
        let seq = g.core.push(OP_OVERHEAD_BYTES, now);
        let recs = journal::records_for(&Op::Barrier, 0);
        if !self.enqueue(&mut g, seq, Op::Barrier, Payload::Borrowed(&[]), recs) {
            return false;
        }
        g.last_barrier = seq;
        g.early_seq = seq;
        g.early_recorded += 1;
        g.send_now = true;
        true
    }

    /// Sends what is queued now: from this thread if it can, else by the
    /// sender task (see `Replicator::send_recorded`).
    pub fn send_recorded(&self) {
        if !self.send_inline() {
            self.sh.wake_sender.notify_one();
        }
    }

    /// One round of a waiting loop: if the oldest unacknowledged op timed
    /// out, the pipeline goes degraded (and the caller looks again at once);
    /// else waits for a change, at most until the next deadline or `max_ms`.
    fn tick_or_wait<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inner>,
        max_ms: u64,
    ) -> MutexGuard<'a, Inner> {
        let now = self.now_ms();
        if g.core.tick(now) {
            let reason = g.core.degraded_reason().unwrap_or("timeout").to_string();
            self.go_degraded(&mut g, &reason);
            return g;
        }
        let wait = g
            .core
            .next_deadline_ms(now)
            .unwrap_or(max_ms)
            .clamp(1, max_ms);
        self.wait_cond(g, Duration::from_millis(wait))
    }

    /// Waits on the condition variable (counted in `blocked`).
    fn wait_cond<'a>(&'a self, mut g: MutexGuard<'a, Inner>, d: Duration) -> MutexGuard<'a, Inner> {
        g.blocked += 1;
        let mut g = self
            .sh
            .cond
            .wait_timeout(g, d)
            .unwrap_or_else(|p| p.into_inner())
            .0;
        g.blocked -= 1;
        g
    }

    /// Blocks until `w` holds (or the pipeline is degraded and allowed to go
    /// on alone). Err(EIO) once the client is aborted.
    fn wait(&self, w: WaitFor) -> Result<(), i32> {
        let mut g = self.lock();
        loop {
            if g.aborted && w != WaitFor::Nothing {
                return Err(libc::EIO);
            }
            if g.core.satisfied(w) {
                if g.core.state() == LinkState::Degraded && g.journal.is_none() {
                    self.go_degraded(&mut g, "degraded");
                }
                return Ok(());
            }
            g = self.tick_or_wait(g, 50);
        }
    }

    pub fn after_mutation(&self, seq: Seq) -> Result<(), i32> {
        let w = self.lock().core.wait_after_mutation(seq);
        self.wait(w)
    }

    /// `after_mutation` answered through `done` (see
    /// `Replicator::after_mutation_then`): the FUSE worker does not block.
    pub fn after_mutation_then(&self, seq: Seq, done: Completion) {
        let w = {
            let mut g = self.lock();
            if g.aborted {
                drop(g);
                return done(Err(libc::EIO));
            }
            let w = g.core.wait_after_mutation(seq);
            if !g.core.satisfied(w) && g.waiters.len() < MAX_WAITERS {
                g.waiters.push(Waiter {
                    w,
                    durability: false,
                    done,
                });
                return;
            }
            w
        };
        done(self.wait(w))
    }

    /// A durability point: a barrier, then wait until the mirror made it
    /// durable (sync and strict modes). Without the mirror, the journal is
    /// made durable instead, once the client may go on alone (a held
    /// supervised client waits for the permission or for its resync).
    pub fn durability_point(&self) -> Result<(), i32> {
        self.durability_point_around(&mut || Ok(()))
    }

    /// What a durability point does, given the pipeline's state: wait for
    /// the mirror to make a barrier durable (recording one unless the last
    /// one still covers everything: concurrent durability points then share
    /// it), make the journal durable (going on alone), wait for the
    /// supervisor (held), or fail (aborted).
    fn plan_durability(&self) -> Durability {
        let g = self.lock();
        if g.aborted {
            return Durability::Fail;
        }
        match g.core.state() {
            LinkState::Replicating => {
                if g.last_barrier != 0 && g.last_barrier == g.core.last_seq() {
                    return Durability::Mirror(g.last_barrier);
                }
                drop(g);
                Durability::Mirror(self.record_op(Op::Barrier, &[]))
            }
            LinkState::Degraded | LinkState::Resyncing if g.core.alone_allowed() => {
                Durability::Journal
            }
            LinkState::Degraded | LinkState::Resyncing => Durability::Hold,
        }
    }

    /// The application asked for a durability point: counts it among the
    /// reuses of an early barrier if one is still the last op recorded
    /// (`plan_durability` then reuses it).
    fn note_durability_point(&self) {
        let mut g = self.lock();
        if g.early_seq != 0 && g.early_seq == g.core.last_seq() {
            g.early_reused += 1;
        }
    }

    /// Carries a durability point through to its end (blocking).
    /// `always_wait`: wait for the mirror even in async mode (unmount).
    fn finish_durability(&self, mut plan: Durability, always_wait: bool) -> Result<(), i32> {
        loop {
            match plan {
                Durability::Fail => return Err(libc::EIO),
                Durability::Journal => return self.sync_journal(),
                Durability::Mirror(seq) => {
                    let w = if always_wait {
                        WaitFor::Durable(seq)
                    } else {
                        self.lock().core.wait_for_durability(seq)
                    };
                    self.wait(w)?;
                    let g = self.lock();
                    if g.core.state() == LinkState::Replicating || g.core.durable() >= seq {
                        return Ok(());
                    }
                    // The mirror went away while we waited: the journal or
                    // the next session covers the barrier.
                }
                Durability::Hold => {
                    // Held: wait for a state or permission change.
                    let g = self.lock();
                    drop(self.wait_cond(g, Duration::from_millis(50)));
                }
            }
            plan = self.plan_durability();
        }
    }

    /// A durability point around a local sync (see
    /// `Replicator::durability_point_around`): the barrier is sent first, so
    /// that the mirror syncs its disk while `local` syncs ours; then waits
    /// for the mirror. The barrier covers everything recorded before it,
    /// which includes every change the local sync covers.
    pub fn durability_point_around(
        &self,
        local: &mut dyn FnMut() -> Result<(), i32>,
    ) -> Result<(), i32> {
        self.note_durability_point();
        let plan = self.plan_durability();
        local()?;
        self.finish_durability(plan, false)
    }

    /// `durability_point_around` answered through `done` (see
    /// `Replicator::durability_point_around_then`): `local` runs on the
    /// calling thread; the wait for the mirror does not block it (except a
    /// held client's, which is rare and waits for the supervisor).
    pub fn durability_point_around_then(
        &self,
        local: &mut dyn FnMut() -> Result<(), i32>,
        done: Completion,
    ) {
        self.note_durability_point();
        let plan = self.plan_durability();
        if let Err(e) = local() {
            return done(Err(e));
        }
        if let Durability::Mirror(seq) = plan {
            let mut g = self.lock();
            let w = g.core.wait_for_durability(seq);
            if !g.aborted && !g.core.satisfied(w) && g.waiters.len() < MAX_WAITERS {
                g.waiters.push(Waiter {
                    w,
                    durability: true,
                    done,
                });
                drop(g);
                if self.sh.poll_target.fetch_max(seq, Ordering::SeqCst) < seq {
                    self.sh.wake_poller.notify_one();
                }
                return;
            }
        }
        done(self.finish_durability(plan, false))
    }

    /// Makes the journal durable, if there is one (what a durability point
    /// relies on without the mirror).
    fn sync_journal(&self) -> Result<(), i32> {
        let g = self.lock();
        if let Some(f) = g.journal.as_ref() {
            f.sync_data().map_err(|e| {
                error!("journal fsync failed: {e}");
                libc::EIO
            })?;
        }
        Ok(())
    }

    /// Answers every waiting request whose condition now holds (an
    /// acknowledgement arrived, or the pipeline may go on alone: then the
    /// durability points among them are answered once the journal is
    /// durable). The answers are sent with no lock held.
    fn complete_ready(&self) {
        let (ready, journal_result) = {
            let mut g = self.lock();
            if g.waiters.is_empty() {
                return;
            }
            let inner = &mut *g;
            let ready = take_ready(&mut inner.waiters, &inner.core);
            if ready.is_empty() {
                return;
            }
            let mut journal_result = Ok(());
            if g.core.state() != LinkState::Replicating && ready.iter().any(|w| w.durability) {
                if g.core.state() == LinkState::Degraded && g.journal.is_none() {
                    self.go_degraded(&mut g, "degraded");
                }
                journal_result = match g.journal.as_ref() {
                    Some(f) => f.sync_data().map_err(|e| {
                        error!("journal fsync failed: {e}");
                        libc::EIO
                    }),
                    None => Ok(()),
                };
            }
            (ready, journal_result)
        };
        for w in ready {
            (w.done)(if w.durability { journal_result } else { Ok(()) });
        }
    }

    /// Joins the mirror over a handshaken stream whose hello announced
    /// `next_seq` (from [`ReplClient::next_seq`], with mutations paused since),
    /// catches it up with `catch_up` (which records the resync's operations
    /// through this client), makes everything durable there, clears the
    /// journal and replicates from then on. The caller keeps application
    /// mutations paused for the whole call. On error the client is degraded
    /// again and the journal keeps everything.
    pub fn resync(
        &self,
        rt: &tokio::runtime::Handle,
        link: Link,
        next_seq: Seq,
        catch_up: impl FnOnce(&ReplClient) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let Link {
            conn,
            writer,
            reader,
            inline,
        } = link;
        let writer: SharedWriter = Arc::new(tokio::sync::Mutex::new(writer));
        let session = {
            let mut g = self.lock();
            anyhow::ensure!(
                g.core.state() == LinkState::Degraded,
                "resync while {}",
                state_name(g.core.state())
            );
            anyhow::ensure!(
                g.core.last_seq() + 1 == next_seq,
                "operations were recorded between the hello and the resync (mutations not paused)"
            );
            anyhow::ensure!(!g.aborted && !g.closing, "the mount is going away");
            // Whatever the journal file holds so far must survive a crash
            // during the resync.
            if let Some(f) = g.journal.as_ref() {
                f.sync_data()
                    .map_err(|e| anyhow::anyhow!("journal fsync failed: {e}"))?;
            }
            g.core.begin_resync();
            g.session += 1;
            g.connection = Some(conn);
            g.queue.clear();
            g.queued_bytes = 0;
            g.send_now = false;
            g.unacked.clear();
            g.inline = inline.map(|rt| InlineSend {
                session: g.session,
                rt,
                writer: writer.clone(),
            });
            g.session
        };
        rt.spawn(self.clone().sender(writer, session));
        rt.spawn(self.clone().receiver(reader, session));
        self.write_status();
        let result = catch_up(self).and_then(|()| {
            let seq = self.record_op(Op::Barrier, &[]);
            let mut g = self.lock();
            loop {
                if g.session != session || g.core.state() != LinkState::Resyncing {
                    anyhow::bail!(
                        "mirror lost during the resync: {}",
                        g.core.degraded_reason().unwrap_or("unknown")
                    );
                }
                if g.core.durable() >= seq {
                    break;
                }
                g = self.tick_or_wait(g, 50);
            }
            // The mirror holds everything: the journal has served.
            self.sh.state.clear_journal()?;
            g.journal = None;
            g.journal_records = 0;
            g.core.end_resync();
            if g.supervised {
                g.core.set_alone_allowed(false);
            }
            Ok(())
        });
        if let Err(e) = &result {
            let mut g = self.lock();
            if g.session == session && g.core.state() != LinkState::Degraded {
                self.go_degraded(&mut g, &format!("resync failed: {e:#}"));
            }
        }
        self.sh.cond.notify_all();
        // Requests held for the resync are answered now (or by the journal).
        self.complete_ready();
        self.write_status();
        result
    }

    /// Final barrier at unmount. Returns true if the mirror holds everything
    /// durably (a clean shutdown). Never held: without the mirror it only
    /// makes the journal durable.
    pub fn shutdown(&self) -> bool {
        if self.link_state() == LinkState::Replicating {
            // In every mode, async included: writes stop here, and the
            // mirror must catch up before the process exits. Bounded by the
            // replication timeout, and never held: if the mirror goes away
            // meanwhile, the journal keeps what it lacks.
            let seq = self.record_op(Op::Barrier, &[]);
            let mut g = self.lock();
            while g.core.state() == LinkState::Replicating && g.core.durable() < seq {
                g = self.tick_or_wait(g, 50);
            }
        }
        let _ = self.sync_journal();
        let mut g = self.lock();
        let clean =
            g.core.state() == LinkState::Replicating && g.core.durable() == g.core.last_seq();
        g.closing = true;
        self.sh.wake_poller.notify_one();
        drop(g);
        self.sh.wake_sender.notify_one();
        self.sh.cond.notify_all();
        self.write_status();
        clean
    }

    /// Records whether the kernel holds the FUSE mount (from the moment the
    /// mount is made, when requests on the directory reach this client,
    /// until it is unmounted) and writes status.json: a script that waits
    /// for "replicating" alone could otherwise write into the directory
    /// underneath, unreplicated, in the moment before the mount is made.
    pub fn set_serving(&self, on: bool) {
        self.sh.serving.store(on, Ordering::SeqCst);
        self.write_status();
    }

    /// Writes status.json (best effort; logs on failure).
    pub fn write_status(&self) {
        let mut s = self.sh.status_base.clone();
        let st = self.stats();
        s.state = st.state;
        s.last_seq = st.last_seq;
        s.applied_seq = st.applied_seq;
        s.durable_seq = st.durable_seq;
        s.inflight_bytes = st.inflight_bytes;
        s.degraded_reason = st.degraded_reason;
        s.journal_records = st.journal_records;
        s.alone_allowed = st.alone_allowed;
        s.serving = self.sh.serving.load(Ordering::SeqCst);
        s.early_barriers = st.early_barriers;
        s.early_barriers_reused = st.early_barriers_reused;
        s.ack_polls = st.ack_polls;
        s.ack_polls_answered = st.ack_polls_answered;
        if let Err(e) = self.sh.state.write_status(&s) {
            warn!("cannot write status: {e:#}");
        }
    }

    /// True while `session` is the client's current session and it carries
    /// operations.
    fn session_live(g: &Inner, session: u64) -> bool {
        g.session == session && g.core.state() != LinkState::Degraded
    }

    /// Takes up to one batch of frames from the queue (the caller holds the
    /// writer). None: the session is over.
    fn take_batch(&self, session: u64, batch: &mut Vec<Bytes>, force: bool) -> Option<bool> {
        let mut g = self.lock();
        if !Self::session_live(&g, session) {
            return None;
        }
        if force || g.send_now || g.closing || g.queued_bytes >= LAZY_SEND_BYTES {
            let mut n = 0;
            while batch.len() < SEND_BATCH_CHUNKS && n < SEND_BATCH_BYTES {
                match g.queue.pop_front() {
                    Some(f) => {
                        g.queued_bytes -= f.len() as u64;
                        n += f.len();
                        batch.push(f);
                    }
                    None => break,
                }
            }
            if g.queue.is_empty() {
                g.send_now = false;
            }
        }
        Some(g.closing)
    }

    /// A write to the stream failed: the session is over.
    fn send_failed(&self, session: u64, e: &anyhow::Error) {
        let mut g = self.lock();
        if g.session == session {
            self.go_degraded(&mut g, &format!("send to mirror failed: {e:#}"));
        }
        drop(g);
        self.complete_ready();
        self.write_status();
    }

    /// Sends what is queued from this thread, if the session's stream is
    /// free and takes it without waiting (see `InlineRuntime`): the packets
    /// leave now, with no wake-up of the network thread. False: the sender
    /// task must do it (it has been told to).
    fn send_inline(&self) -> bool {
        let Some(inl) = self.lock().inline.clone() else {
            return false;
        };
        let Ok(mut w) = inl.writer.try_lock() else {
            return false;
        };
        let done = inl.rt.drive(|| {
            let mut batch = Vec::new();
            match self.take_batch(inl.session, &mut batch, true) {
                None => return true,
                Some(_) if batch.is_empty() => return true,
                Some(_) => {}
            }
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            let mut i = 0;
            // Each round writes at least one byte or stops.
            for _ in 0..=batch.len() {
                if i == batch.len() {
                    break;
                }
                let polled = {
                    let fut = w.stream_mut().write_chunks(&mut batch[i..]);
                    let mut fut = std::pin::pin!(fut);
                    std::future::Future::poll(fut.as_mut(), &mut cx)
                };
                match polled {
                    std::task::Poll::Ready(Ok(written)) => {
                        i += written.chunks;
                        if written.bytes == 0 {
                            break;
                        }
                    }
                    std::task::Poll::Ready(Err(e)) => {
                        self.send_failed(inl.session, &anyhow::Error::new(e));
                        return true;
                    }
                    std::task::Poll::Pending => break,
                }
            }
            if i < batch.len() {
                // Flow control: the rest goes back to the front of the
                // queue, for the sender task, before anyone else sends.
                let mut g = self.lock();
                for c in batch[i..].iter().rev().filter(|c| !c.is_empty()) {
                    g.queued_bytes += c.len() as u64;
                    g.queue.push_front(c.clone());
                }
                g.send_now = true;
                return false;
            }
            true
        });
        drop(w);
        if !done {
            self.sh.wake_sender.notify_one();
        }
        true
    }

    async fn sender(self, writer: SharedWriter, session: u64) {
        let mut batch: Vec<Bytes> = Vec::with_capacity(SEND_BATCH_CHUNKS);
        loop {
            let notified = self.sh.wake_sender.notified();
            batch.clear();
            let mut w = writer.lock().await;
            let Some(closing) = self.take_batch(session, &mut batch, false) else {
                return;
            };
            if batch.is_empty() {
                if closing {
                    let _ = w.stream_mut().finish();
                    return;
                }
                drop(w);
                notified.await;
                continue;
            }
            if let Err(e) = w.send_chunks(&mut batch).await {
                drop(w);
                self.send_failed(session, &e);
                return;
            }
        }
    }

    async fn receiver(self, mut reader: FrameReader, session: u64) {
        let reason = loop {
            let body = match reader.next_body().await {
                Ok(Some(b)) => b,
                Ok(None) => break "mirror closed the stream".to_string(),
                Err(e) => break format!("connection to mirror lost: {e:#}"),
            };
            let frame = match hapair_proto::decode_from_mirror(body) {
                Ok(f) => f,
                Err(e) => break format!("malformed message from mirror: {e}"),
            };
            match frame.header {
                FromMirror::Ack { applied, durable } => {
                    let mut g = self.lock();
                    if !Self::session_live(&g, session) {
                        return;
                    }
                    match g.core.on_ack(applied, durable) {
                        Ok(_) => {
                            self.sh
                                .acked_durable
                                .fetch_max(g.core.durable(), Ordering::SeqCst);
                            while g.unacked.front().is_some_and(|(s, _)| *s <= applied) {
                                g.unacked.pop_front();
                            }
                            if g.blocked > 0 {
                                self.sh.cond.notify_all();
                            }
                            drop(g);
                            self.complete_ready();
                        }
                        Err(e) => {
                            let r = format!("mirror sent an impossible ack: {e}");
                            self.go_degraded(&mut g, &r);
                            drop(g);
                            self.complete_ready();
                            self.write_status();
                            return;
                        }
                    }
                }
                FromMirror::Failed { seq, errno, reason } => {
                    break format!("mirror failed to apply seq {seq} (errno {errno}): {reason}");
                }
                other => break format!("unexpected message from mirror: {other:?}"),
            }
        };
        let mut g = self.lock();
        if g.session != session {
            return;
        }
        if g.closing
            && g.core.state() == LinkState::Replicating
            && g.core.durable() == g.core.last_seq()
        {
            return; // orderly end after shutdown
        }
        self.go_degraded(&mut g, &reason);
        drop(g);
        self.complete_ready();
        self.write_status();
    }

    async fn timer(self) {
        let mut last_status = Instant::now();
        loop {
            tokio::time::sleep(TICK).await;
            let (degraded_now, closing) = {
                let mut g = self.lock();
                if !g.queue.is_empty() && !g.send_now {
                    // Operations nobody waited for: their tick came.
                    g.send_now = true;
                    self.sh.wake_sender.notify_one();
                }
                let now = self.now_ms();
                let d = g.core.tick(now);
                if d {
                    let reason = g.core.degraded_reason().unwrap_or("timeout").to_string();
                    self.go_degraded(&mut g, &reason);
                }
                (d, g.closing)
            };
            // Waiters whose condition became true elsewhere (the pipeline
            // went degraded in a FUSE thread, say) are answered here at the
            // latest.
            self.complete_ready();
            if degraded_now || last_status.elapsed() >= Duration::from_secs(1) {
                self.write_status();
                last_status = Instant::now();
            }
            if degraded_now {
                info!(
                    "replication degraded; journal at {}",
                    self.sh.state.journal_path().display()
                );
            }
            if closing {
                return;
            }
        }
    }

    /// Polls for the mirror's acknowledgement while a durability point
    /// waits for it, as `AckPolling` says, instead of letting this
    /// runtime's thread park: at each turn it yields the CPU to any other
    /// thread, then to this runtime's tasks, whose receiver reads the
    /// acknowledgement and answers the waiting requests. Ends when the
    /// client closes.
    async fn ack_poller(self) {
        let mut policy = AckPolling::new();
        loop {
            self.sh.wake_poller.notified().await;
            if self.lock().closing {
                return;
            }
            let start = Instant::now();
            let budget = policy.budget(start);
            if budget.is_zero() {
                continue;
            }
            let target = self.sh.poll_target.load(Ordering::SeqCst);
            let acked = loop {
                if self.sh.acked_durable.load(Ordering::SeqCst) >= target {
                    break true;
                }
                if start.elapsed() >= budget {
                    break false;
                }
                poll_turn().await;
            };
            policy.ended(acked);
            self.sh.ack_polls.fetch_add(1, Ordering::Relaxed);
            if acked {
                self.sh.ack_polls_answered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Removes and returns the waiters whose own condition holds now (every one
/// once the pipeline may go on alone without the mirror).
fn take_ready(waiters: &mut Vec<Waiter>, core: &ReplCore) -> Vec<Waiter> {
    let (ready, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(waiters)
        .into_iter()
        .partition(|w| core.satisfied(w.w));
    *waiters = rest;
    ready
}

/// What a durability point has to do (see `ReplClient::plan_durability`).
#[derive(Clone, Copy, Debug)]
enum Durability {
    Mirror(Seq),
    Journal,
    Hold,
    Fail,
}

/// The data of an operation being recorded.
enum Payload<'a> {
    Borrowed(&'a [u8]),
    Owned(Bytes),
}

impl Payload<'_> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Borrowed(b) => b,
            Payload::Owned(b) => b,
        }
    }
    fn into_bytes(self) -> Bytes {
        match self {
            Payload::Borrowed(b) => Bytes::copy_from_slice(b),
            Payload::Owned(b) => b,
        }
    }
}

pub fn state_name(s: LinkState) -> &'static str {
    match s {
        LinkState::Replicating => "replicating",
        LinkState::Degraded => "degraded",
        LinkState::Resyncing => "resyncing",
    }
}

impl hapair_fs_replica::Replicator for ReplClient {
    fn record(&self, op: Op, payload: &[u8]) -> Seq {
        self.record_op(op, payload)
    }
    fn record_owned(&self, op: Op, payload: Bytes) -> Seq {
        self.record_op_owned(op, payload)
    }
    fn early_barrier(&self) -> bool {
        ReplClient::early_barrier(self)
    }
    fn send_recorded(&self) {
        ReplClient::send_recorded(self)
    }
    fn waits_for_each_call(&self) -> bool {
        self.lock().core.config().mode == Mode::Strict
    }
    fn after_mutation(&self, seq: Seq) -> Result<(), i32> {
        ReplClient::after_mutation(self, seq)
    }
    fn durability_point(&self) -> Result<(), i32> {
        ReplClient::durability_point(self)
    }
    fn durability_point_around(
        &self,
        local: &mut dyn FnMut() -> Result<(), i32>,
    ) -> Result<(), i32> {
        ReplClient::durability_point_around(self, local)
    }
    fn after_mutation_then(&self, seq: Seq, done: Completion) {
        ReplClient::after_mutation_then(self, seq, done)
    }
    fn durability_point_around_then(
        &self,
        local: &mut dyn FnMut() -> Result<(), i32>,
        done: Completion,
    ) {
        ReplClient::durability_point_around_then(self, local, done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn waiter(w: WaitFor, durability: bool, hits: &Arc<AtomicU32>) -> Waiter {
        let hits = hits.clone();
        Waiter {
            w,
            durability,
            done: Box::new(move |_| {
                hits.fetch_add(1, Ordering::SeqCst);
            }),
        }
    }

    fn fire(ready: Vec<Waiter>) -> Vec<WaitFor> {
        ready
            .into_iter()
            .map(|w| {
                (w.done)(Ok(()));
                w.w
            })
            .collect()
    }

    /// Each waiting request is answered by the first acknowledgement that
    /// covers its own condition, not earlier (not by any acknowledgement, nor
    /// by one covering another request), and exactly once.
    #[test]
    fn waiters_complete_on_their_own_condition_only() {
        let mut core = ReplCore::new(CoreConfig::default());
        for _ in 0..6 {
            core.push(10, 0);
        }
        let hits: Vec<Arc<AtomicU32>> = (0..4).map(|_| Arc::new(AtomicU32::new(0))).collect();
        let mut ws = vec![
            waiter(WaitFor::Durable(2), true, &hits[0]),
            waiter(WaitFor::Applied(4), false, &hits[1]),
            waiter(WaitFor::Durable(5), true, &hits[2]),
            waiter(WaitFor::Applied(1), false, &hits[3]),
        ];
        assert!(fire(take_ready(&mut ws, &core)).is_empty());
        core.on_ack(4, 1).unwrap();
        assert_eq!(
            fire(take_ready(&mut ws, &core)),
            vec![WaitFor::Applied(4), WaitFor::Applied(1)]
        );
        core.on_ack(5, 2).unwrap();
        assert_eq!(fire(take_ready(&mut ws, &core)), vec![WaitFor::Durable(2)]);
        core.on_ack(5, 4).unwrap();
        assert!(fire(take_ready(&mut ws, &core)).is_empty());
        core.on_ack(6, 6).unwrap();
        assert_eq!(fire(take_ready(&mut ws, &core)), vec![WaitFor::Durable(5)]);
        assert!(ws.is_empty());
        for h in &hits {
            assert_eq!(h.load(Ordering::SeqCst), 1, "answered exactly once");
        }
    }

    /// When the pipeline goes degraded, every waiter is released (the
    /// caller relies on the journal instead).
    #[test]
    fn degraded_releases_every_waiter() {
        let mut core = ReplCore::new(CoreConfig::default());
        core.push(10, 0);
        let hits = Arc::new(AtomicU32::new(0));
        let mut ws = vec![
            waiter(WaitFor::Durable(1), true, &hits),
            waiter(WaitFor::Applied(1), false, &hits),
        ];
        assert!(take_ready(&mut ws, &core).is_empty());
        core.degrade("test".into());
        assert_eq!(fire(take_ready(&mut ws, &core)).len(), 2);
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }
}
