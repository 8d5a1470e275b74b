//! The replication core of the mount side: sequencing, acknowledgements,
//! backpressure, lag bounds, the decision to go degraded, the degraded-mode
//! journal format and the initial-synchronisation planner.
//!
//! Nothing here performs I/O or reads a clock: every call that depends on
//! time takes `now_ms`, a monotonic millisecond counter supplied by the
//! adapter. The adapter (the `hapair` binary's client) owns the sockets, the
//! threads and the journal file, and asks this core what to do.

pub mod early;
pub mod journal;
pub mod plan;

use hapair_proto::{Mode, Seq};
use std::collections::VecDeque;

/// Limits and timers of the replication pipeline.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub mode: Mode,
    /// Most bytes of operations sent or queued but not yet applied by the
    /// mirror. A writer that would exceed it waits (backpressure).
    pub max_inflight_bytes: u64,
    /// Most operations in flight.
    pub max_inflight_ops: usize,
    /// In `sync` and `async` modes, the mirror may lag the mount by at most
    /// this long: a new mutation waits while the oldest unapplied one is
    /// older than this.
    pub max_lag_ms: u64,
    /// A call blocked on the mirror (backpressure, lag, strict ack or a
    /// durability point) waits at most this long; then the mount goes on
    /// alone (degraded).
    pub timeout_ms: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            mode: Mode::Sync,
            // Enough to keep the disk and the link busy (the mirror applies about
            // a MiB per millisecond here); more only costs memory on the mount.
            max_inflight_bytes: 32 << 20,
            max_inflight_ops: 65_536,
            max_lag_ms: 100,
            timeout_ms: 5_000,
        }
    }
}

/// Where the pipeline stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Connected; operations stream to the mirror.
    Replicating,
    /// The mirror is gone or stopped answering: operations are journaled for
    /// a later resync instead of being sent. Whether callers may return
    /// without the mirror depends on the permission to go on alone (see
    /// [`ReplCore::set_alone_allowed`]).
    Degraded,
    /// A new session with the mirror is catching it up (the adapter sends
    /// what the journal and a tree comparison say differs, then a barrier).
    /// Operations are sent as when replicating, but everything recorded
    /// before the session began is covered only once it ends.
    Resyncing,
}

/// What a caller must wait for before it may return to the application.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitFor {
    Nothing,
    /// The mirror applied this sequence number.
    Applied(Seq),
    /// The mirror made this sequence number durable.
    Durable(Seq),
}

/// Answer to "may I enqueue an operation of this size now?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead (as a replicated op, or journaled if degraded).
    Yes,
    /// Wait for acknowledgements (backpressure or lag bound).
    Wait,
}

/// Errors from a misbehaving peer or adapter.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoreError {
    #[error("acknowledgement for seq {ack} beyond the last sent seq {last}")]
    AckBeyondSent { ack: Seq, last: Seq },
    #[error("acknowledgement went backwards ({new} < {old})")]
    AckBackwards { new: Seq, old: Seq },
    #[error("durable seq {durable} beyond applied seq {applied}")]
    DurableBeyondApplied { durable: Seq, applied: Seq },
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    seq: Seq,
    bytes: u64,
    at_ms: u64,
}

/// The state machine. One per mount.
#[derive(Debug)]
pub struct ReplCore {
    cfg: CoreConfig,
    state: LinkState,
    /// Last sequence number handed out (0 = none yet).
    last_seq: Seq,
    applied: Seq,
    durable: Seq,
    inflight: VecDeque<InFlight>,
    inflight_bytes: u64,
    /// Why the pipeline went degraded, for status.
    degraded_reason: Option<String>,
    /// Callers may return without the mirror (their changes are journaled).
    /// Always true for a standalone mount; under the supervisor only while
    /// it allows this node to serve alone.
    alone_allowed: bool,
    /// While resyncing: the last seq recorded before the session began.
    resync_floor: Seq,
}

impl ReplCore {
    pub fn new(cfg: CoreConfig) -> Self {
        assert!(
            cfg.max_inflight_ops > 0 && cfg.max_inflight_bytes > 0,
            "limits must be positive"
        );
        ReplCore {
            cfg,
            state: LinkState::Replicating,
            last_seq: 0,
            applied: 0,
            durable: 0,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            degraded_reason: None,
            alone_allowed: true,
            resync_floor: 0,
        }
    }

    /// A core that starts degraded (the mirror was unreachable at start).
    pub fn new_degraded(cfg: CoreConfig, reason: String) -> Self {
        let mut c = Self::new(cfg);
        c.state = LinkState::Degraded;
        c.degraded_reason = Some(reason);
        c
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }
    pub fn state(&self) -> LinkState {
        self.state
    }
    pub fn last_seq(&self) -> Seq {
        self.last_seq
    }
    pub fn applied(&self) -> Seq {
        self.applied
    }
    pub fn durable(&self) -> Seq {
        self.durable
    }
    pub fn inflight_bytes(&self) -> u64 {
        self.inflight_bytes
    }
    pub fn inflight_ops(&self) -> usize {
        self.inflight.len()
    }
    pub fn degraded_reason(&self) -> Option<&str> {
        self.degraded_reason.as_deref()
    }
    pub fn alone_allowed(&self) -> bool {
        self.alone_allowed
    }

    /// Grants or withdraws the permission to go on without the mirror.
    /// Withdrawn, a degraded pipeline *holds* its callers (their changes are
    /// journaled but their calls do not return) until the permission comes
    /// back or a resync completes: that is how a supervised primary that
    /// lost its secondary waits for the supervisor's decision (a witness
    /// lease, a new generation) instead of acknowledging writes that a
    /// taking-over peer would not have.
    pub fn set_alone_allowed(&mut self, allowed: bool) {
        self.alone_allowed = allowed;
    }

    /// Starts a resync session from the degraded state. The mirror's new
    /// session numbers operations from `last_seq + 1` on; everything recorded
    /// before is covered only when [`ReplCore::end_resync`] is called. The
    /// adapter must not record application mutations during the session
    /// (it pauses them), only the resync's own operations and barrier.
    pub fn begin_resync(&mut self) {
        assert_eq!(
            self.state,
            LinkState::Degraded,
            "a resync starts from the degraded state"
        );
        self.state = LinkState::Resyncing;
        self.resync_floor = self.last_seq;
        self.applied = self.last_seq;
        self.durable = self.last_seq;
        self.check_invariants();
    }

    /// The resync session's final barrier is durable on the mirror: from now
    /// on the pipeline replicates, and every earlier wait is satisfied.
    pub fn end_resync(&mut self) {
        assert_eq!(self.state, LinkState::Resyncing, "no resync under way");
        assert!(
            self.durable > self.resync_floor,
            "a resync ends only after its final barrier is durable"
        );
        self.state = LinkState::Replicating;
        self.degraded_reason = None;
        self.resync_floor = 0;
        self.check_invariants();
    }

    /// The seq below which a resync covers everything (0 when not resyncing).
    pub fn resync_floor(&self) -> Seq {
        self.resync_floor
    }

    /// May an operation of `bytes` be enqueued now? Degraded pipelines never
    /// wait: they journal.
    pub fn admit(&self, bytes: u64, now_ms: u64) -> Admit {
        if self.state == LinkState::Degraded || self.inflight.is_empty() {
            return Admit::Yes;
        }
        if self.inflight.len() >= self.cfg.max_inflight_ops
            || self.inflight_bytes + bytes > self.cfg.max_inflight_bytes
        {
            return Admit::Wait;
        }
        if let Some(oldest) = self.inflight.front() {
            if now_ms.saturating_sub(oldest.at_ms) > self.cfg.max_lag_ms {
                return Admit::Wait;
            }
        }
        Admit::Yes
    }

    /// Hands out the next sequence number for an operation of `bytes`. When
    /// replicating, it is counted in flight until acknowledged. The caller
    /// must have been admitted (or be degraded).
    pub fn push(&mut self, bytes: u64, now_ms: u64) -> Seq {
        self.last_seq += 1;
        if self.state != LinkState::Degraded {
            self.inflight.push_back(InFlight {
                seq: self.last_seq,
                bytes,
                at_ms: now_ms,
            });
            self.inflight_bytes += bytes;
        }
        self.check_invariants();
        self.last_seq
    }

    /// What a mutating call that recorded `seq` must wait for, by mode.
    pub fn wait_after_mutation(&self, seq: Seq) -> WaitFor {
        match self.cfg.mode {
            Mode::Strict => WaitFor::Applied(seq),
            Mode::Sync | Mode::Async => WaitFor::Nothing,
        }
    }

    /// What a durability point whose barrier got `seq` must wait for.
    pub fn wait_for_durability(&self, seq: Seq) -> WaitFor {
        match self.cfg.mode {
            Mode::Strict | Mode::Sync => WaitFor::Durable(seq),
            Mode::Async => WaitFor::Nothing,
        }
    }

    /// True once the wait is over: the condition holds, or the pipeline is
    /// degraded and allowed to go on alone (the caller then relies on the
    /// journal).
    pub fn satisfied(&self, w: WaitFor) -> bool {
        let seq = match w {
            WaitFor::Nothing => return true,
            WaitFor::Applied(s) | WaitFor::Durable(s) => s,
        };
        match self.state {
            LinkState::Degraded => return self.alone_allowed,
            LinkState::Resyncing if seq <= self.resync_floor => return self.alone_allowed,
            LinkState::Resyncing | LinkState::Replicating => {}
        }
        match w {
            WaitFor::Nothing => true,
            WaitFor::Applied(s) => self.applied >= s,
            WaitFor::Durable(s) => self.durable >= s,
        }
    }

    /// Records an acknowledgement from the mirror. Returns the sequence
    /// numbers that left the in-flight window (for the adapter to drop their
    /// journal descriptors).
    pub fn on_ack(&mut self, applied: Seq, durable: Seq) -> Result<Seq, CoreError> {
        if applied > self.last_seq {
            return Err(CoreError::AckBeyondSent {
                ack: applied,
                last: self.last_seq,
            });
        }
        if applied < self.applied {
            return Err(CoreError::AckBackwards {
                new: applied,
                old: self.applied,
            });
        }
        if durable < self.durable {
            return Err(CoreError::AckBackwards {
                new: durable,
                old: self.durable,
            });
        }
        if durable > applied {
            return Err(CoreError::DurableBeyondApplied { durable, applied });
        }
        self.applied = applied;
        self.durable = durable;
        while let Some(f) = self.inflight.front() {
            if f.seq > applied {
                break;
            }
            self.inflight_bytes -= f.bytes;
            self.inflight.pop_front();
        }
        self.check_invariants();
        Ok(applied)
    }

    /// Called by a waiting caller or a timer. Returns true if this call
    /// turned the pipeline degraded because the mirror stopped answering.
    pub fn tick(&mut self, now_ms: u64) -> bool {
        if self.state == LinkState::Degraded {
            return false;
        }
        if let Some(oldest) = self.inflight.front() {
            if now_ms.saturating_sub(oldest.at_ms) > self.cfg.timeout_ms {
                self.degrade(format!(
                    "mirror did not acknowledge seq {} within {} ms",
                    oldest.seq, self.cfg.timeout_ms
                ));
                return true;
            }
        }
        false
    }

    /// Milliseconds until `tick` could degrade (for a waiter's timeout).
    pub fn next_deadline_ms(&self, now_ms: u64) -> Option<u64> {
        if self.state == LinkState::Degraded {
            return None;
        }
        self.inflight
            .front()
            .map(|o| (o.at_ms + self.cfg.timeout_ms + 1).saturating_sub(now_ms))
    }

    /// The connection failed or the mirror refused an operation. Everything
    /// in flight must now be journaled by the adapter (it keeps their
    /// descriptors); from now on operations are journaled, not sent.
    pub fn degrade(&mut self, reason: String) {
        if self.state == LinkState::Degraded {
            return;
        }
        self.state = LinkState::Degraded;
        self.degraded_reason = Some(reason);
        self.resync_floor = 0;
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.check_invariants();
    }

    fn check_invariants(&self) {
        debug_assert!(self.durable <= self.applied && self.applied <= self.last_seq);
        debug_assert!(self.inflight.len() <= self.cfg.max_inflight_ops + 1);
        debug_assert!(
            self.inflight
                .iter()
                .zip(self.inflight.iter().skip(1))
                .all(|(a, b)| a.seq < b.seq),
            "in-flight operations are in sequence order"
        );
        debug_assert_eq!(
            self.inflight.iter().map(|f| f.bytes).sum::<u64>(),
            self.inflight_bytes
        );
        debug_assert!(self.state != LinkState::Degraded || self.inflight.is_empty());
        debug_assert!(self.state == LinkState::Resyncing || self.resync_floor == 0);
    }
}

#[cfg(test)]
mod tests;
