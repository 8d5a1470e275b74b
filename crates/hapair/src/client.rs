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

use crate::state::{StateDir, Status};
use hapair_proto::{encode_frame, FromMirror, Op, Seq, ToMirror};
use hapair_repl_core::journal::{self, DirtyRecord};
use hapair_repl_core::{Admit, CoreConfig, LinkState, ReplCore, WaitFor};
use hapair_transport::{FrameReader, FrameWriter};
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Per-op bytes counted in flight beyond the payload (header estimate).
const OP_OVERHEAD_BYTES: u64 = 128;
/// Most frames the sender takes from the queue per batch.
const SEND_BATCH_FRAMES: usize = 256;
/// Most bytes the sender takes from the queue per batch.
const SEND_BATCH_BYTES: usize = 4 << 20;

struct Inner {
    core: ReplCore,
    /// Encoded frames not yet handed to the sender task.
    queue: VecDeque<Vec<u8>>,
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
}

pub struct Shared {
    inner: Mutex<Inner>,
    cond: Condvar,
    wake_sender: tokio::sync::Notify,
    started: Instant,
    state: StateDir,
    status_base: Status,
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
        tokio::spawn(c.clone().sender(writer, 1));
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
                    unacked: VecDeque::new(),
                    journal,
                    journal_records: 0,
                    connection,
                    session: 0,
                    closing: false,
                    aborted: false,
                    supervised,
                }),
                cond: Condvar::new(),
                wake_sender: tokio::sync::Notify::new(),
                started: Instant::now(),
                state,
                status_base,
            }),
        }
    }

    fn spawn_timer(&self) {
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(self.clone().timer());
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
        drop(g);
        self.sh.cond.notify_all();
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
        let bytes = payload.len() as u64 + OP_OVERHEAD_BYTES;
        let mut g = self.lock();
        loop {
            let now = self.now_ms();
            if g.core.admit(bytes, now) == Admit::Yes {
                break;
            }
            g = self.tick_or_wait(g, 10);
        }
        let seq = g.core.push(bytes, self.now_ms());
        let recs = journal::records_for(&op, payload.len());
        match g.core.state() {
            LinkState::Replicating | LinkState::Resyncing => {
                let mut frame = Vec::with_capacity(payload.len() + 64);
                let msg = ToMirror::Op { seq, op };
                if let Err(e) = encode_frame(&msg, payload, &mut frame) {
                    // Only a bug can produce an unencodable op (sizes are
                    // bounded by the FUSE layer); never lose the change.
                    error!("cannot encode op {seq}: {e}; going degraded");
                    g.unacked.push_back((seq, recs));
                    self.go_degraded(&mut g, "unencodable operation");
                    return seq;
                }
                g.queue.push_back(frame);
                g.unacked.push_back((seq, recs));
                drop(g);
                self.sh.wake_sender.notify_one();
            }
            LinkState::Degraded => {
                let _ = self.journal_append(&mut g, &recs);
            }
        }
        seq
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
        self.sh
            .cond
            .wait_timeout(g, Duration::from_millis(wait))
            .unwrap_or_else(|p| p.into_inner())
            .0
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

    /// A durability point: a barrier, then wait until the mirror made it
    /// durable (sync and strict modes). Without the mirror, the journal is
    /// made durable instead, once the client may go on alone (a held
    /// supervised client waits for the permission or for its resync).
    pub fn durability_point(&self) -> Result<(), i32> {
        self.barrier(false)
    }

    /// A barrier, then (when the mode asks for it, or `always_wait`) the
    /// wait until the mirror made it durable; see `durability_point`.
    fn barrier(&self, always_wait: bool) -> Result<(), i32> {
        loop {
            let (state, allowed) = {
                let g = self.lock();
                if g.aborted {
                    return Err(libc::EIO);
                }
                (g.core.state(), g.core.alone_allowed())
            };
            match state {
                LinkState::Replicating => {
                    let seq = self.record_op(Op::Barrier, &[]);
                    let w = if always_wait {
                        WaitFor::Durable(seq)
                    } else {
                        self.lock().core.wait_for_durability(seq)
                    };
                    self.wait(w)?;
                    // Lost the mirror while waiting and held: go round again
                    // (the journal or the next session covers the barrier).
                    let g = self.lock();
                    if g.core.state() == LinkState::Replicating || g.core.durable() >= seq {
                        return Ok(());
                    }
                }
                LinkState::Degraded | LinkState::Resyncing if allowed => {
                    return self.sync_journal();
                }
                LinkState::Degraded | LinkState::Resyncing => {
                    // Held: wait for a state or permission change.
                    let g = self.lock();
                    let _ = self
                        .sh
                        .cond
                        .wait_timeout(g, Duration::from_millis(50))
                        .unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

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
        conn: quinn::Connection,
        writer: FrameWriter,
        reader: FrameReader,
        next_seq: Seq,
        catch_up: impl FnOnce(&ReplClient) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
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
            g.unacked.clear();
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
        self.write_status();
        result
    }

    /// Final barrier at unmount. Returns true if the mirror holds everything
    /// durably (a clean shutdown). Never held: without the mirror it only
    /// makes the journal durable.
    pub fn shutdown(&self) -> bool {
        if self.link_state() == LinkState::Replicating {
            // In every mode, async included: writes stop here, and the
            // mirror must catch up before the process exits (the wait is
            // bounded by the timeout, after which the journal keeps what it
            // lacks).
            let _ = self.barrier(true);
        } else {
            let _ = self.sync_journal();
        }
        let mut g = self.lock();
        let clean =
            g.core.state() == LinkState::Replicating && g.core.durable() == g.core.last_seq();
        g.closing = true;
        drop(g);
        self.sh.wake_sender.notify_one();
        self.sh.cond.notify_all();
        self.write_status();
        clean
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
        if let Err(e) = self.sh.state.write_status(&s) {
            warn!("cannot write status: {e:#}");
        }
    }

    /// True while `session` is the client's current session and it carries
    /// operations.
    fn session_live(g: &Inner, session: u64) -> bool {
        g.session == session && g.core.state() != LinkState::Degraded
    }

    async fn sender(self, mut writer: FrameWriter, session: u64) {
        let mut batch: Vec<u8> = Vec::with_capacity(SEND_BATCH_BYTES + (1 << 20));
        loop {
            let notified = self.sh.wake_sender.notified();
            batch.clear();
            let (live, closing) = {
                let mut g = self.lock();
                let live = Self::session_live(&g, session);
                let mut n = 0;
                while live && n < SEND_BATCH_FRAMES && batch.len() < SEND_BATCH_BYTES {
                    match g.queue.pop_front() {
                        Some(f) => {
                            batch.extend_from_slice(&f);
                            n += 1;
                        }
                        None => break,
                    }
                }
                (live, g.closing)
            };
            if !live {
                return;
            }
            if batch.is_empty() {
                if closing {
                    let _ = writer.finish().await;
                    return;
                }
                notified.await;
                continue;
            }
            if let Err(e) = writer.send_raw(&batch).await {
                let mut g = self.lock();
                if g.session == session {
                    self.go_degraded(&mut g, &format!("send to mirror failed: {e:#}"));
                }
                drop(g);
                self.write_status();
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
                            while g.unacked.front().is_some_and(|(s, _)| *s <= applied) {
                                g.unacked.pop_front();
                            }
                            self.sh.cond.notify_all();
                        }
                        Err(e) => {
                            let r = format!("mirror sent an impossible ack: {e}");
                            self.go_degraded(&mut g, &r);
                            drop(g);
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
        self.write_status();
    }

    async fn timer(self) {
        let mut last_status = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (degraded_now, closing) = {
                let mut g = self.lock();
                let now = self.now_ms();
                let d = g.core.tick(now);
                if d {
                    let reason = g.core.degraded_reason().unwrap_or("timeout").to_string();
                    self.go_degraded(&mut g, &reason);
                }
                (d, g.closing)
            };
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
    fn after_mutation(&self, seq: Seq) -> Result<(), i32> {
        ReplClient::after_mutation(self, seq)
    }
    fn durability_point(&self) -> Result<(), i32> {
        ReplClient::durability_point(self)
    }
}
