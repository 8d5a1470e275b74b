//! The node supervisor's state machine. See the crate documentation for the
//! safety argument; the comments here say which part of it each rule keeps.

use std::collections::VecDeque;

use crate::types::*;
use crate::witness::{DenyReason, WitnessRelease, WitnessRequest};

/// Transitions kept for `status`.
pub const MAX_TRANSITIONS: usize = 32;
/// Sent heartbeats remembered to turn the peer's echoes into a lease.
/// 64 × 200 ms covers 12.8 s of delay, far beyond any useful timeout.
const MAX_SENT_HEARTBEATS: usize = 64;
/// Witness requests remembered to match late replies.
const MAX_WITNESS_OUTSTANDING: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Stopped,
    Waiting,
    Secondary,
    Primary,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Intent {
    Auto,
    Prim { force: bool },
    Second,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WKind {
    /// Hold or renew the lease for the current data generation.
    Hold,
    /// Register a new generation and take the lease.
    Claim,
}

#[derive(Clone, Copy, Debug)]
struct WitnessOut {
    req: u64,
    sent_ms: u64,
    data_gen: u64,
    kind: WKind,
}

#[derive(Clone, Debug)]
struct PeerView {
    hb: Heartbeat,
    received_ms: u64,
}

#[derive(Clone, Debug)]
struct Handover {
    since_ms: u64,
    reason: String,
}

/// A broken internal invariant: a bug in the core, never the operator's
/// doing. Debug builds panic; release builds log it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("supervisor invariant violated on {node} at {now_ms} ms: {what}")]
pub struct InvariantViolation {
    pub node: String,
    pub now_ms: u64,
    pub what: String,
}

/// One node's supervisor: events in, commands out, no I/O, no clock.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    /// 0 if this node's name sorts first: new generations of this node have
    /// this parity, so the two nodes never mint the same number.
    rank: u64,
    p: PersistedState,
    role: Role,
    intent: Intent,
    detail: String,
    now: u64,
    booted_at: Option<u64>,
    /// Became secondary of the peer since it last served (gates failover
    /// when `auto_failover` is off).
    was_secondary: bool,

    hb_seq: u64,
    next_hb_ms: u64,
    sent: VecDeque<(u64, u64)>,
    peer: Option<PeerView>,
    /// Until then the peer has promised not to seek primacy without us.
    peer_lease_end: u64,
    peer_was_alive: bool,

    witness_lease_end: u64,
    wreq_next: u64,
    wout: VecDeque<WitnessOut>,
    last_wreq_ms: Option<u64>,
    witness_latest: u64,
    witness_reachable: bool,
    last_witness_answer: Option<String>,

    /// Primary: the peer's mirror holds all our data (writes are synchronous).
    peer_in_sync: bool,
    /// Primary: serving without an in-sync secondary in a generation the
    /// peer shares: a new generation must be minted (and, with a witness,
    /// registered) before the replication may acknowledge writes alone.
    pending_mint: bool,
    repl_degraded: bool,
    resync_running: bool,
    last_resync_ms: Option<u64>,
    /// Secondary: in sync with the primary.
    in_sync: bool,
    keep_aside: bool,
    handover: Option<Handover>,
    swap_request_until: u64,
    split_brain_active: bool,
    split_brains: u64,

    /// Tear down resources in failure order (VIP first, no flush).
    emergency: bool,
    res: Resources,
    retry_mount_at: u64,
    app_failures: VecDeque<u64>,
    restarts_total: u64,
    check: CheckStatus,
    not_candidate_until: u64,
    not_candidate_why: String,

    last_state: NodeState,
    pending_reason: Option<String>,
    transitions: VecDeque<Transition>,
    out: Vec<Command>,
}

impl Core {
    /// Creates the core of a node. It increments the boot count; the first
    /// `handle`/`tick` returns the `Persist` for it before anything else.
    pub fn new(cfg: CoreConfig, persisted: PersistedState) -> Result<Core, InitError> {
        cfg.validate()?;
        persisted.validate().map_err(InitError::Persisted)?;
        let mut p = persisted;
        p.boot_count = p.boot_count.saturating_add(1);
        let role = if p.last_state == NodeState::Stop {
            Role::Stopped
        } else {
            Role::Waiting
        };
        let rank = if cfg.me < cfg.peer { 0 } else { 1 };
        let was_secondary = p.last_state == NodeState::Second;
        let last_state = match role {
            Role::Stopped => NodeState::Stop,
            _ => NodeState::Wait,
        };
        let restarts_cap = cfg.restart_budget as usize + 1;
        let mut c = Core {
            cfg,
            rank,
            p,
            role,
            intent: Intent::Auto,
            detail: "starting".into(),
            now: 0,
            booted_at: None,
            was_secondary,
            hb_seq: 0,
            next_hb_ms: 0,
            sent: VecDeque::with_capacity(MAX_SENT_HEARTBEATS),
            peer: None,
            peer_lease_end: 0,
            peer_was_alive: false,
            witness_lease_end: 0,
            wreq_next: 1,
            wout: VecDeque::new(),
            last_wreq_ms: None,
            witness_latest: 0,
            witness_reachable: false,
            last_witness_answer: None,
            peer_in_sync: false,
            pending_mint: false,
            repl_degraded: false,
            resync_running: false,
            last_resync_ms: None,
            in_sync: false,
            keep_aside: false,
            handover: None,
            swap_request_until: 0,
            split_brain_active: false,
            split_brains: 0,
            emergency: false,
            res: Resources {
                app: ResState::Down,
                mount: ResState::Down,
                vip: false,
                mirror: false,
            },
            retry_mount_at: 0,
            app_failures: VecDeque::with_capacity(restarts_cap),
            restarts_total: 0,
            check: CheckStatus {
                last_ok: None,
                last_at_ms: None,
                last_failure: None,
            },
            not_candidate_until: 0,
            not_candidate_why: String::new(),
            last_state,
            pending_reason: None,
            transitions: VecDeque::with_capacity(MAX_TRANSITIONS),
            out: Vec::new(),
        };
        c.p.last_state = last_state;
        c.persist();
        Ok(c)
    }

    // ----- public API -------------------------------------------------

    /// Feeds one event at `now_ms` (a monotonic millisecond counter).
    pub fn handle(&mut self, now_ms: u64, ev: Event) -> Vec<Command> {
        self.advance(now_ms);
        self.on_event(ev);
        self.step();
        self.finish()
    }

    /// Lets time pass: heartbeats, timeouts, lease expiry, retries.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Command> {
        self.advance(now_ms);
        self.step();
        self.finish()
    }

    /// The latest time by which `tick` must be called. Lease ends are
    /// included exactly: a primary must step down at that instant.
    pub fn next_deadline_ms(&self) -> u64 {
        let mut d = self.next_hb_ms;
        let mut consider = |t: u64| {
            if t > self.now && t < d {
                d = t;
            }
        };
        if let Some(v) = &self.peer {
            consider(v.received_ms.saturating_add(self.cfg.timeout_ms));
        }
        if self.role == Role::Primary {
            consider(self.peer_lease_end);
            consider(self.witness_lease_end);
        }
        if let Some(b) = self.booted_at {
            consider(b.saturating_add(self.cfg.timeout_ms));
        }
        consider(self.retry_mount_at);
        d.max(self.now + 1)
    }

    /// The SPEC's state of this node.
    pub fn state(&self) -> NodeState {
        match self.role {
            Role::Stopped => NodeState::Stop,
            Role::Waiting => NodeState::Wait,
            Role::Secondary => NodeState::Second,
            Role::Primary => {
                if self.peer_alive() && self.peer_state() == Some(NodeState::Second) {
                    NodeState::Prim
                } else {
                    NodeState::Alone
                }
            }
        }
    }

    pub fn persisted(&self) -> &PersistedState {
        &self.p
    }

    pub fn resources(&self) -> Resources {
        self.res
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// The witness lease is held at the last `now` seen.
    pub fn holds_witness_lease(&self) -> bool {
        self.witness_lease_end > self.now
    }

    /// Until when the peer has promised not to seek primacy without us.
    pub fn peer_lease_end_ms(&self) -> u64 {
        self.peer_lease_end
    }

    pub fn status(&self) -> Status {
        let peer = self.peer.as_ref();
        let in_window = self.failures_in_window(self.now) as u32;
        Status {
            now_ms: self.now,
            node: self.cfg.me.clone(),
            state: self.state(),
            detail: self.detail.clone(),
            peer: PeerStatus {
                name: self.cfg.peer.clone(),
                state: peer.map(|v| v.hb.state),
                alive: self.peer_alive(),
                last_heard_ms: peer.map(|v| v.received_ms),
                data_gen: peer.map(|v| v.hb.data_gen),
                in_sync: peer.is_some_and(|v| v.hb.in_sync),
                serving: peer.is_some_and(|v| v.hb.serving),
            },
            data_gen: self.p.data_gen,
            known_gen: self.p.known_gen,
            stale: self.is_stale(),
            in_sync: match self.role {
                Role::Primary => self.peer_in_sync,
                Role::Secondary => self.in_sync,
                _ => false,
            },
            resync_running: self.resync_running,
            resources: self.res,
            witness: WitnessStatus {
                configured: self.cfg.witness,
                lease_until_ms: (self.witness_lease_end > self.now)
                    .then_some(self.witness_lease_end),
                reachable: self.witness_reachable,
                last_answer: self.last_witness_answer.clone(),
            },
            split_brain_possible: !self.cfg.witness,
            split_brains_detected: self.split_brains,
            app_check: self.check.clone(),
            restarts: RestartStatus {
                in_window,
                budget: self.cfg.restart_budget,
                total: self.restarts_total,
            },
            transitions: self.transitions.iter().cloned().collect(),
        }
    }

    /// Checks the core's invariants. Called after every `handle`/`tick`
    /// (a violation panics in debug builds, is logged in release builds);
    /// public so that simulations can check after every step.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let fail = |what: String| {
            Err(InvariantViolation {
                node: self.cfg.me.clone(),
                now_ms: self.now,
                what,
            })
        };
        if let Err(e) = self.p.validate() {
            return fail(e);
        }
        let r = self.res;
        if self.role == Role::Primary {
            if self.p.stale {
                return fail("primary with data marked stale".into());
            }
            if self.cfg.witness && !self.may_serve() {
                return fail(format!(
                    "primary without witness lease (ends {}) or peer lease (ends {})",
                    self.witness_lease_end, self.peer_lease_end
                ));
            }
            if self.handover.is_some() {
                return fail("primary while handing over".into());
            }
            if self.intent == Intent::Second {
                return fail("primary while told `second`".into());
            }
        } else if matches!(r.app, ResState::Up | ResState::Starting) {
            return fail(format!("{:?} with the application {:?}", self.role, r.app));
        }
        if r.mirror && r.serving() {
            return fail(format!("mirror running while serving: {r:?}"));
        }
        if matches!(r.app, ResState::Up | ResState::Starting) && r.mount != ResState::Up {
            return fail(format!("application {:?} without the mount: {r:?}", r.app));
        }
        if self.transitions.len() > MAX_TRANSITIONS
            || self.sent.len() > MAX_SENT_HEARTBEATS
            || self.wout.len() > MAX_WITNESS_OUTSTANDING
            || self.app_failures.len() > self.cfg.restart_budget as usize + 1
        {
            return fail("a bounded queue exceeded its bound".into());
        }
        Ok(())
    }

    // ----- plumbing ---------------------------------------------------

    fn advance(&mut self, now_ms: u64) {
        // Time never goes backwards for the core; an adapter feeding an
        // older value gets the last one.
        self.now = self.now.max(now_ms);
        if self.booted_at.is_none() {
            self.booted_at = Some(self.now);
            self.next_hb_ms = self.now;
            self.detail = format!("waiting for peer {}", self.cfg.peer);
        }
    }

    fn finish(&mut self) -> Vec<Command> {
        if let Err(e) = self.check_invariants() {
            debug_assert!(false, "{e}");
            self.log(Level::Error, e.to_string());
        }
        std::mem::take(&mut self.out)
    }

    fn emit(&mut self, c: Command) {
        self.out.push(c);
    }

    fn log(&mut self, level: Level, msg: String) {
        self.out.push(Command::Log { level, msg });
    }

    fn persist(&mut self) {
        self.out.push(Command::Persist(self.p.clone()));
    }

    fn reply(&mut self, id: u64, r: Result<String, String>) {
        let reply = match r {
            Ok(message) => Reply::Ok { message },
            Err(reason) => Reply::Refused {
                exit_code: 3,
                reason,
            },
        };
        self.emit(Command::Reply { id, reply });
    }

    fn guard_ms(&self) -> u64 {
        self.cfg.interval_ms
    }

    fn peer_alive(&self) -> bool {
        self.peer
            .as_ref()
            .is_some_and(|v| self.now < v.received_ms.saturating_add(self.cfg.timeout_ms))
    }

    fn peer_state(&self) -> Option<NodeState> {
        self.peer.as_ref().map(|v| v.hb.state)
    }

    /// The peer's last heartbeat, if it is alive.
    fn live_peer(&self) -> Option<&Heartbeat> {
        if self.peer_alive() {
            self.peer.as_ref().map(|v| &v.hb)
        } else {
            None
        }
    }

    fn may_serve(&self) -> bool {
        self.witness_lease_end > self.now || self.peer_lease_end > self.now
    }

    fn is_stale(&self) -> bool {
        self.p.stale || self.p.data_gen < self.p.known_gen
    }

    /// Could become primary now, as far as this node alone is concerned.
    fn is_candidate(&self) -> bool {
        if self.role == Role::Stopped || self.handover.is_some() {
            return false;
        }
        match self.intent {
            Intent::Second => false,
            Intent::Prim { force: true } => true,
            _ => !self.is_stale() && self.now >= self.not_candidate_until,
        }
    }

    fn next_gen(&self) -> u64 {
        let base = self
            .p
            .known_gen
            .max(self.p.data_gen)
            .max(self.witness_latest)
            + 1;
        if base % 2 == self.rank {
            base
        } else {
            base + 1
        }
    }

    fn set_role(&mut self, role: Role, reason: impl Into<String>) {
        let reason = reason.into();
        if role != self.role {
            self.role = role;
            self.pending_reason = Some(reason.clone());
        }
        self.detail = reason;
    }

    fn wait(&mut self, reason: impl Into<String>) {
        self.set_role(Role::Waiting, reason);
    }

    fn failures_in_window(&self, now: u64) -> usize {
        let from = now.saturating_sub(self.cfg.restart_window_ms);
        self.app_failures.iter().filter(|&&t| t >= from).count()
    }

    // ----- events -----------------------------------------------------

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Heartbeat(hb) => self.on_heartbeat(hb),
            Event::PeerSaysStop { from } => {
                if from != self.cfg.peer {
                    self.log(
                        Level::Warn,
                        format!("stop notice from unknown node {from:?} dropped"),
                    );
                    return;
                }
                if let Some(v) = &mut self.peer {
                    v.hb.state = NodeState::Stop;
                    v.hb.serving = false;
                    v.hb.handover = false;
                    v.hb.candidate = false;
                    v.received_ms = self.now;
                }
                self.mark_peer_link_broken("peer stopped");
            }
            Event::Admin { id, cmd } => self.on_admin(id, cmd),
            Event::WitnessGranted { req, gen, lease_ms } => self.on_grant(req, gen, lease_ms),
            Event::WitnessDenied {
                req,
                reason,
                latest_gen,
            } => self.on_deny(req, reason, latest_gen),
            Event::WitnessLost => {
                self.witness_reachable = false;
                self.last_witness_answer = Some("connection lost".into());
            }
            Event::AppStarted => {
                if self.res.app == ResState::Starting {
                    self.res.app = ResState::Up;
                }
            }
            Event::AppStopped => match self.res.app {
                ResState::Stopping => self.res.app = ResState::Down,
                ResState::Up | ResState::Starting => {
                    self.res.app = ResState::Down;
                    self.local_failure("application exited".into());
                }
                ResState::Down => {}
            },
            Event::AppCheckOk => {
                self.check.last_ok = Some(true);
                self.check.last_at_ms = Some(self.now);
            }
            Event::AppCheckFailed { reason } => {
                self.check.last_ok = Some(false);
                self.check.last_at_ms = Some(self.now);
                self.check.last_failure = Some(reason.clone());
                if self.role == Role::Primary && self.res.app == ResState::Up {
                    self.local_failure(format!("application check failed: {reason}"));
                }
            }
            Event::MountReady => {
                if self.res.mount == ResState::Starting {
                    self.res.mount = ResState::Up;
                }
            }
            Event::MountFailed { reason } => {
                if matches!(self.res.mount, ResState::Starting | ResState::Up) {
                    self.res.mount = ResState::Down;
                    self.retry_mount_at = self.now + self.cfg.interval_ms;
                    self.local_failure(format!("mount failed: {reason}"));
                } else if self.res.mount == ResState::Stopping {
                    self.res.mount = ResState::Down;
                }
            }
            Event::Unmounted => match self.res.mount {
                ResState::Stopping => self.res.mount = ResState::Down,
                ResState::Up | ResState::Starting => {
                    self.res.mount = ResState::Down;
                    self.local_failure("the mount went away".into());
                }
                ResState::Down => {}
            },
            Event::ResyncDone => {
                if self.role == Role::Primary && self.resync_running {
                    self.resync_running = false;
                    self.peer_in_sync = true;
                    self.log(
                        Level::Info,
                        format!("resync of {} complete: in sync", self.cfg.peer),
                    );
                }
            }
            Event::ReplicationDegraded { reason } => {
                if self.role == Role::Primary {
                    self.repl_degraded = true;
                    self.resync_running = false;
                    self.mark_peer_link_broken(&format!("replication degraded: {reason}"));
                }
            }
        }
    }

    /// The peer's mirror no longer holds everything we write.
    fn mark_peer_link_broken(&mut self, why: &str) {
        if self.role == Role::Primary && self.peer_in_sync {
            self.peer_in_sync = false;
            self.pending_mint = true;
            self.log(Level::Warn, format!("{} out of sync: {why}", self.cfg.peer));
        }
    }

    fn on_heartbeat(&mut self, hb: Heartbeat) {
        if hb.from != self.cfg.peer {
            self.log(
                Level::Warn,
                format!(
                    "heartbeat from unknown node {:?} dropped (peer is {:?})",
                    hb.from, self.cfg.peer
                ),
            );
            return;
        }
        let shape = PersistedState {
            last_state: hb.state,
            data_gen: hb.data_gen,
            gen_history: hb.gen_history.clone(),
            known_gen: hb.known_gen,
            stale: hb.stale,
            boot_count: hb.boot,
        };
        if let Err(e) = shape.validate() {
            self.log(
                Level::Warn,
                format!("malformed heartbeat from {} dropped: {e}", hb.from),
            );
            return;
        }
        let alive = self.peer_alive();
        let mut new_boot = false;
        if let Some(v) = &self.peer {
            let older = hb.boot < v.hb.boot || (hb.boot == v.hb.boot && hb.seq <= v.hb.seq);
            // A reordered or duplicated heartbeat must not roll the view
            // back; a lower boot is believed only once the old view died
            // (the peer's state file was recreated).
            if older && alive {
                return;
            }
            new_boot = hb.boot != v.hb.boot;
        }
        if let Some(e) = hb.echo {
            if e.boot == self.p.boot_count {
                if let Some(&(_, sent)) = self.sent.iter().find(|(s, _)| *s == e.seq) {
                    let end = (sent + self.cfg.timeout_ms).saturating_sub(self.guard_ms());
                    self.peer_lease_end = self.peer_lease_end.max(end);
                }
            }
        }
        let k = hb.known_gen.max(hb.data_gen);
        if k > self.p.known_gen {
            self.p.known_gen = k;
            self.persist();
        }
        self.peer = Some(PeerView {
            hb,
            received_ms: self.now,
        });
        if new_boot {
            self.mark_peer_link_broken("peer restarted");
        }
    }

    fn on_grant(&mut self, req: u64, gen: u64, lease_ms: u64) {
        self.witness_reachable = true;
        self.last_witness_answer = Some(format!("granted generation {gen}"));
        let w = match self.wout.iter().position(|w| w.req == req) {
            Some(pos) => self.wout.remove(pos),
            None => None,
        };
        // A reply to a request we no longer remember earns no lease: we do
        // not know when it was sent.
        let end = w.map(|w| (w.sent_ms + lease_ms).saturating_sub(self.guard_ms()));
        let base = w.map_or(self.p.data_gen, |w| w.data_gen);
        match self.role {
            Role::Primary => {
                if let Some(end) = end.filter(|&e| e > self.now) {
                    self.witness_lease_end = self.witness_lease_end.max(end);
                }
                if gen > self.p.data_gen {
                    // Registering a generation is harmless while we serve
                    // legitimately; not adopting it would leave the witness
                    // believing in data nobody has.
                    self.mint(gen, "the witness registered the new generation");
                }
            }
            Role::Waiting | Role::Secondary => {
                let peer_serving = self
                    .live_peer()
                    .is_some_and(|h| h.state.is_primary() || h.serving);
                let usable = w
                    .is_some_and(|w| w.kind == WKind::Claim && w.data_gen == self.p.data_gen)
                    && gen > self.p.data_gen
                    && end.is_some_and(|e| e > self.now)
                    && self.is_candidate()
                    && !peer_serving;
                if let (true, Some(end)) = (usable, end) {
                    self.witness_lease_end = self.witness_lease_end.max(end);
                    self.become_primary(
                        Some(gen),
                        false,
                        format!("the witness granted generation {gen}"),
                    );
                } else {
                    let revert = (gen > self.p.data_gen && gen > base).then_some(base);
                    self.release_witness(gen, revert);
                }
            }
            Role::Stopped => {
                let revert = (gen > self.p.data_gen && gen > base).then_some(base);
                self.release_witness(gen, revert);
            }
        }
    }

    fn on_deny(&mut self, req: u64, reason: DenyReason, latest_gen: u64) {
        self.witness_reachable = true;
        self.last_witness_answer = Some(format!(
            "denied: {reason:?} (latest generation {latest_gen})"
        ));
        let Some(pos) = self.wout.iter().position(|w| w.req == req) else {
            return;
        };
        self.wout.remove(pos);
        // Remembered only to claim above it: the latest registration may
        // be unused (its owner crashed before serving), so it does not make
        // our data stale; the witness judges that.
        self.witness_latest = self.witness_latest.max(latest_gen);
        if self.role != Role::Primary {
            self.detail =
                format!("the witness refused: {reason:?} (latest generation {latest_gen})");
            if matches!(
                reason,
                DenyReason::StaleData | DenyReason::GenerationTaken | DenyReason::HeldByPeer
            ) {
                // Let the peer win the next election: it may be the node
                // the witness is waiting for.
                self.not_candidate_until = self.now + self.cfg.timeout_ms;
                self.not_candidate_why =
                    format!("the witness refused: {reason:?} (latest generation {latest_gen})");
            }
            return;
        }
        let definitive = match reason {
            // A newer generation exists: someone else served newer data.
            DenyReason::StaleData | DenyReason::GenerationTaken => true,
            // The peer holds the lease: it serves, unless it is provably in
            // contact and not serving (a lease left over from a handover).
            DenyReason::HeldByPeer => self.pending_mint || self.peer_lease_end <= self.now,
            DenyReason::Restarting | DenyReason::Malformed => false,
        };
        if definitive || self.is_stale() {
            self.step_down_emergency(format!("the witness refused this primary: {reason:?}"));
        }
    }

    fn on_admin(&mut self, id: u64, cmd: AdminCmd) {
        let st = self.state();
        let peer = self.cfg.peer.clone();
        let r = match cmd {
            AdminCmd::Start => {
                if self.role == Role::Stopped {
                    self.intent = Intent::Auto;
                    self.handover = None;
                    self.wait("started by the operator");
                    Ok("starting".to_string())
                } else {
                    Ok(format!("already started ({st})"))
                }
            }
            AdminCmd::Stop => {
                if self.role == Role::Stopped {
                    Ok("already stopped".to_string())
                } else if self.role == Role::Primary {
                    if self.handover_possible() {
                        self.start_handover(true, "stopped by the operator");
                        Ok(format!("stopping: the service moves to {peer}"))
                    } else {
                        self.set_role(Role::Stopped, "stopped by the operator");
                        self.intent = Intent::Auto;
                        Ok(format!("stopping: {peer} is not an in-sync secondary, the service stops"))
                    }
                } else {
                    self.set_role(Role::Stopped, "stopped by the operator");
                    self.intent = Intent::Auto;
                    Ok("stopping".to_string())
                }
            }
            AdminCmd::Prim { force } => self.admin_prim(force),
            AdminCmd::Second => match self.role {
                Role::Primary => Err(format!(
                    "second refused: this node is {st}; use `hapair swap` for a planned role change (needs an in-sync pair) or `hapair stop`"
                )),
                Role::Secondary => Ok("already SECOND".to_string()),
                Role::Stopped | Role::Waiting => {
                    self.intent = Intent::Second;
                    self.wait("told to become secondary");
                    Ok(format!("waiting for {peer} to be primary, then SECOND"))
                }
            },
            AdminCmd::Swap => self.admin_swap(),
        };
        if let Err(reason) = &r {
            self.log(Level::Warn, reason.clone());
        }
        self.reply(id, r);
    }

    fn admin_prim(&mut self, force: bool) -> Result<String, String> {
        let st = self.state();
        let peer = self.cfg.peer.clone();
        if self.role == Role::Primary {
            return Ok(format!("already {st}"));
        }
        if let Some(h) = &self.handover {
            // Taking the service back in the middle of a handover could
            // make both nodes take it: let the handover finish first.
            return Err(format!(
                "prim refused: this node is {st} and handing the service over to {peer} ({}); wait until {peer} is primary, then use `hapair swap` to move it back",
                h.reason
            ));
        }
        if let Some(h) = self.live_peer() {
            if h.state.is_primary() || h.serving {
                return Err(format!(
                    "prim refused: this node is {st} and {peer} is {}; use `hapair swap` to move the service here (needs an in-sync pair)",
                    h.state
                ));
            }
        }
        if !force && self.is_stale() {
            return Err(format!(
                "prim refused: this node is {st} with stale data (generation {}, newest known {}); wait for the resync to complete, or run `hapair prim --force` to serve this data and set newer changes aside",
                self.p.data_gen, self.p.known_gen
            ));
        }
        if force && self.is_stale() {
            self.log(
                Level::Warn,
                format!(
                    "prim --force: serving generation {} although generation {} exists",
                    self.p.data_gen, self.p.known_gen
                ),
            );
        }
        self.intent = Intent::Prim { force };
        self.was_secondary = false;
        self.not_candidate_until = 0;
        self.handover = None;
        if self.role == Role::Stopped {
            self.wait("told to become primary");
        }
        Ok("becoming primary".to_string())
    }

    fn admin_swap(&mut self) -> Result<String, String> {
        let st = self.state();
        let peer = self.cfg.peer.clone();
        match self.role {
            Role::Primary => {
                if self.handover_possible() {
                    self.start_handover(false, "swap requested by the operator");
                    Ok(format!("swapping: the service moves to {peer}"))
                } else {
                    Err(format!(
                        "swap refused: this node is {st} and {peer} is not an in-sync secondary; wait until `hapair status` shows it SECOND in-sync"
                    ))
                }
            }
            Role::Secondary if self.in_sync && self.live_peer().is_some_and(|h| h.state.is_primary()) => {
                self.swap_request_until = self.now + self.cfg.timeout_ms;
                Ok(format!("swap requested from {peer}"))
            }
            _ => Err(format!(
                "swap refused: this node is {st}; swap needs a PRIM and an in-sync SECOND (run it on either when `hapair status` shows them)"
            )),
        }
    }

    /// A primary may hand the service to the peer: it is an in-sync
    /// secondary and could serve.
    fn handover_possible(&self) -> bool {
        self.role == Role::Primary
            && self.peer_in_sync
            && !self.pending_mint
            && self.live_peer().is_some_and(|h| {
                h.state == NodeState::Second
                    && h.in_sync
                    && h.candidate
                    && h.data_gen == self.p.data_gen
            })
    }

    fn local_failure(&mut self, what: String) {
        let now = self.now;
        let from = now.saturating_sub(self.cfg.restart_window_ms);
        while self.app_failures.front().is_some_and(|&t| t < from) {
            self.app_failures.pop_front();
        }
        if self.app_failures.len() > self.cfg.restart_budget as usize {
            self.app_failures.pop_front();
        }
        self.app_failures.push_back(now);
        if self.role != Role::Primary {
            self.log(Level::Warn, format!("{what} (not primary, ignored)"));
            return;
        }
        let n = self.app_failures.len();
        if n <= self.cfg.restart_budget as usize {
            self.restarts_total += 1;
            self.log(
                Level::Warn,
                format!(
                    "{what}: restart {n} of {} in the window",
                    self.cfg.restart_budget
                ),
            );
            if self.res.app == ResState::Up {
                self.emit(Command::RestartApp);
            }
            return;
        }
        if self.cfg.auto_failover && self.handover_possible() {
            self.not_candidate_until = now + 10 * self.cfg.timeout_ms;
            self.not_candidate_why = format!("{what}: failed over");
            self.start_handover(
                false,
                format!("{what}: restart budget exhausted, failing over"),
            );
        } else {
            self.restarts_total += 1;
            self.log(
                Level::Error,
                format!("{what}: restart budget exhausted and no in-sync secondary to fail over to; restarting again"),
            );
            if self.res.app == ResState::Up {
                self.emit(Command::RestartApp);
            }
        }
    }

    // ----- decisions --------------------------------------------------

    fn step(&mut self) {
        let alive = self.peer_alive();
        if alive != self.peer_was_alive {
            self.peer_was_alive = alive;
            let msg = if alive {
                format!("peer {} reachable", self.cfg.peer)
            } else {
                format!(
                    "peer {} silent for {} ms",
                    self.cfg.peer, self.cfg.timeout_ms
                )
            };
            self.log(Level::Info, msg);
            if !alive {
                self.mark_peer_link_broken("peer silent");
            }
        }
        if self.swap_request_until <= self.now {
            self.swap_request_until = 0;
        }
        if let Some(h) = &self.handover {
            if self.now >= h.since_ms + 2 * self.cfg.timeout_ms {
                let msg = format!(
                    "handover ({}) abandoned: {} did not take over",
                    h.reason, self.cfg.peer
                );
                self.handover = None;
                self.log(Level::Warn, msg);
            }
        }
        match self.role {
            Role::Primary => self.primary_duties(),
            Role::Waiting | Role::Secondary => self.follower_duties(),
            Role::Stopped => {
                self.detail = "stopped".into();
            }
        }
        self.reconcile();
        self.record_transition();
        if self.now >= self.next_hb_ms {
            self.send_heartbeat();
        }
    }

    fn primary_duties(&mut self) {
        let now = self.now;
        let peer = self.live_peer().cloned();
        // Two primaries in contact (only possible without a witness, or
        // after `prim --force`): the one with the newer generation stays;
        // the other stops serving and keeps its data aside.
        if let Some(h) = &peer {
            if h.state.is_primary() {
                if !self.split_brain_active {
                    self.split_brain_active = true;
                    self.split_brains += 1;
                    self.log(
                        Level::Error,
                        format!(
                            "split brain: {} is also primary (generation {} here, {} there)",
                            self.cfg.peer, self.p.data_gen, h.data_gen
                        ),
                    );
                }
                if !self.wins_split_brain(h) {
                    self.step_down_emergency(format!(
                        "split brain resolved in favour of {} (generation {})",
                        self.cfg.peer, h.data_gen
                    ));
                    return;
                }
            } else {
                self.split_brain_active = false;
            }
        }
        if peer.is_none() || peer.as_ref().is_some_and(|h| h.state == NodeState::Stop) {
            self.mark_peer_link_broken("peer gone");
        }
        // A generation newer than ours exists (we are the winner of a split
        // brain, or the peer learned one): move above it before serving on.
        if self.p.data_gen < self.p.known_gen {
            self.pending_mint = true;
            self.peer_in_sync = false;
        }
        if self.pending_mint {
            if !self.cfg.witness {
                let g = self.next_gen();
                self.mint(g, "serving without an in-sync secondary");
            } else if self.may_send_witness() {
                self.send_witness(WKind::Claim, false);
            }
        }
        if self.cfg.witness {
            if !self.may_serve() {
                self.step_down_emergency("lost the peer and the witness lease: stopping service (another node may take over)".into());
                return;
            }
            let half = self.cfg.timeout_ms / 2;
            let need = self.peer_lease_end < now + half;
            if need
                && !self.pending_mint
                && self.witness_lease_end < now + half
                && self.may_send_witness()
            {
                self.send_witness(WKind::Hold, false);
            }
        }
        if let Some(h) = &peer {
            if h.swap_request && self.handover_possible() {
                self.start_handover(false, format!("swap requested by {}", self.cfg.peer));
                return;
            }
            let prefers_peer = self.cfg.preferred.as_deref() == Some(self.cfg.peer.as_str());
            if prefers_peer && self.res.app == ResState::Up && self.handover_possible() {
                self.start_handover(
                    false,
                    format!("failback to preferred node {}", self.cfg.peer),
                );
                return;
            }
            let recent = self
                .last_resync_ms
                .is_some_and(|t| now < t + self.cfg.timeout_ms);
            if h.state == NodeState::Second
                && !self.peer_in_sync
                && !self.pending_mint
                && !self.resync_running
                && !recent
                && self.res.mount == ResState::Up
            {
                let full = h.data_gen == 0 || !self.p.contains_gen(h.data_gen);
                self.resync_running = true;
                self.repl_degraded = false;
                self.last_resync_ms = Some(now);
                self.emit(Command::StartResync { full });
            }
        }
        self.detail = match (self.pending_mint, self.peer_in_sync) {
            (true, _) => "serving; writes held until a new generation is registered".into(),
            (false, true) => format!("serving, {} in sync", self.cfg.peer),
            (false, false) if self.resync_running => {
                format!("serving, resyncing {}", self.cfg.peer)
            }
            _ => "serving alone, changes journaled".into(),
        };
    }

    fn wins_split_brain(&self, h: &Heartbeat) -> bool {
        if self.p.data_gen != h.data_gen {
            return self.p.data_gen > h.data_gen;
        }
        self.tie_break()
    }

    /// Preferred node first, then the name that sorts first.
    fn tie_break(&self) -> bool {
        match self.cfg.preferred.as_deref() {
            Some(p) if p == self.cfg.me => true,
            Some(p) if p == self.cfg.peer => false,
            _ => self.rank == 0,
        }
    }

    /// Both nodes are candidates and in contact: the same answer on both
    /// sides from the same two heartbeats.
    fn wins_election(&self, h: &Heartbeat) -> bool {
        let mine = matches!(self.intent, Intent::Prim { .. });
        if mine != h.intent_prim {
            return mine;
        }
        if self.p.data_gen != h.data_gen {
            return self.p.data_gen > h.data_gen;
        }
        self.tie_break()
    }

    fn follower_duties(&mut self) {
        let now = self.now;
        if let Some(h) = self.live_peer().cloned() {
            if h.state.is_primary() {
                if self.role != Role::Secondary {
                    self.become_secondary(&h);
                }
                self.sync_with_primary(&h);
                return;
            }
            let mine_ok = self.p.data_gen == h.data_gen && !self.is_stale();
            if h.handover && !h.serving && self.role == Role::Secondary && self.in_sync && mine_ok {
                if h.state == NodeState::Stop {
                    // The peer leaves: we will be alone, in a new generation.
                    self.try_promote(format!("{} stopped and handed over", self.cfg.peer));
                } else {
                    self.become_primary(
                        None,
                        true,
                        format!("{} handed over (swap)", self.cfg.peer),
                    );
                }
                return;
            }
            if h.serving {
                self.detail = format!("waiting for {} to release the service", self.cfg.peer);
                return;
            }
            if self.handover.is_some() {
                self.detail = format!("handed over; waiting for {} to take over", self.cfg.peer);
                return;
            }
            if self.was_secondary
                && !self.cfg.auto_failover
                && !matches!(self.intent, Intent::Prim { .. })
            {
                self.wait(format!(
                    "{} is {} and automatic failover is off: run `hapair prim` here to serve",
                    self.cfg.peer, h.state
                ));
                return;
            }
            if !self.is_candidate() {
                let why = self.not_candidate_reason();
                self.wait(why);
                return;
            }
            if !h.candidate || self.wins_election(&h) {
                self.try_promote(format!(
                    "elected primary ({} is {})",
                    self.cfg.peer, h.state
                ));
            } else {
                self.wait(format!("{} is elected primary", self.cfg.peer));
            }
            return;
        }
        // The peer is silent.
        if self.role == Role::Secondary {
            // Nothing to receive any more; the data stays as it is.
            self.wait(format!("primary {} lost", self.cfg.peer));
        }
        if self
            .booted_at
            .is_some_and(|b| now < b + self.cfg.timeout_ms)
        {
            self.detail = format!("waiting for peer {}", self.cfg.peer);
            return;
        }
        if self.handover.is_some() {
            self.detail = format!("handed over; waiting for {}", self.cfg.peer);
            return;
        }
        if self.was_secondary
            && !self.cfg.auto_failover
            && !matches!(self.intent, Intent::Prim { .. })
        {
            self.wait(format!(
                "{} lost and automatic failover is off: run `hapair prim` here to serve",
                self.cfg.peer
            ));
            return;
        }
        if !self.is_candidate() {
            let why = self.not_candidate_reason();
            self.wait(why);
            return;
        }
        self.try_promote(format!(
            "{} silent for {} ms",
            self.cfg.peer, self.cfg.timeout_ms
        ));
    }

    fn not_candidate_reason(&self) -> String {
        if self.intent == Intent::Second {
            format!("told `second`: waiting for {} to be primary", self.cfg.peer)
        } else if self.is_stale() {
            format!(
                "stale data (generation {}, newest known {}): waiting for {} to resync this node, or `hapair prim --force`",
                self.p.data_gen, self.p.known_gen, self.cfg.peer
            )
        } else {
            format!("{}; not a candidate for now", self.not_candidate_why)
        }
    }

    fn try_promote(&mut self, reason: String) {
        if self.cfg.witness {
            if self.may_send_witness() {
                let force = self.intent == Intent::Prim { force: true };
                self.send_witness(WKind::Claim, force);
            }
            self.detail = format!("asking the witness: {reason}");
        } else {
            let g = self.next_gen();
            self.become_primary(Some(g), false, reason);
        }
    }

    fn become_primary(&mut self, gen: Option<u64>, peer_in_sync: bool, reason: String) {
        self.set_role(Role::Primary, reason.clone());
        self.intent = Intent::Auto;
        self.was_secondary = false;
        self.handover = None;
        self.emergency = false;
        self.split_brain_active = false;
        self.peer_in_sync = peer_in_sync;
        self.pending_mint = false;
        self.repl_degraded = false;
        self.resync_running = false;
        self.last_resync_ms = None;
        self.in_sync = false;
        self.app_failures.clear();
        if let Some(g) = gen {
            self.mint(g, &reason);
        }
    }

    /// Starts a new generation: from now on this node's data holds writes
    /// that the peer does not have.
    fn mint(&mut self, g: u64, why: &str) {
        debug_assert!(g > self.p.data_gen);
        if g <= self.p.data_gen {
            return;
        }
        if self.p.gen_history.len() >= MAX_GEN_HISTORY {
            self.p.gen_history.remove(0);
        }
        self.p.gen_history.push(self.p.data_gen);
        self.p.data_gen = g;
        self.p.known_gen = self.p.known_gen.max(g);
        self.p.stale = false;
        self.pending_mint = false;
        self.peer_in_sync = false;
        self.persist();
        self.log(Level::Info, format!("generation {g}: {why}"));
        self.emit(Command::AllowAlone { gen: g });
    }

    fn become_secondary(&mut self, h: &Heartbeat) {
        // Our data is a prefix of the primary's lineage, or it diverged
        // (split brain): then it is kept aside before the resync.
        let diverged = self.p.data_gen != 0
            && h.data_gen != self.p.data_gen
            && !h.gen_history.contains(&self.p.data_gen);
        self.keep_aside = diverged;
        if diverged {
            self.log(
                Level::Warn,
                format!(
                    "local generation {} diverged from {}'s {}: kept aside",
                    self.p.data_gen, self.cfg.peer, h.data_gen
                ),
            );
        }
        self.was_secondary = true;
        self.in_sync = false;
        self.handover = None;
        self.intent = Intent::Auto;
        self.set_role(Role::Secondary, format!("{} is {}", self.cfg.peer, h.state));
    }

    fn sync_with_primary(&mut self, h: &Heartbeat) {
        if h.data_gen == self.p.data_gen && !self.keep_aside {
            self.in_sync = h.in_sync && self.res.mirror;
            if self.in_sync && self.p.stale {
                self.p.stale = false;
                self.persist();
            }
        } else if h.in_sync && self.res.mirror && h.known_gen >= self.p.known_gen {
            // The primary's resync into our mirror completed: our data is
            // now its generation, with its lineage.
            self.p.data_gen = h.data_gen;
            self.p.gen_history = h.gen_history.clone();
            self.p.known_gen = self.p.known_gen.max(h.known_gen).max(h.data_gen);
            self.p.stale = false;
            self.keep_aside = false;
            self.in_sync = true;
            self.persist();
            self.log(
                Level::Info,
                format!(
                    "in sync with {} at generation {}",
                    self.cfg.peer, h.data_gen
                ),
            );
        } else {
            self.in_sync = false;
            if !self.p.stale && self.res.mirror {
                // A resync into our data is under way: it is no longer a
                // state of any generation until it completes.
                self.p.stale = true;
                self.persist();
            }
        }
        self.detail = if self.in_sync {
            format!("in sync with {}", self.cfg.peer)
        } else {
            format!("resyncing from {}", self.cfg.peer)
        };
    }

    fn start_handover(&mut self, to_stop: bool, reason: impl Into<String>) {
        let reason = reason.into();
        self.handover = Some(Handover {
            since_ms: self.now,
            reason: reason.clone(),
        });
        self.emergency = false;
        self.peer_in_sync = false;
        self.pending_mint = false;
        self.intent = Intent::Auto;
        let role = if to_stop {
            Role::Stopped
        } else {
            Role::Waiting
        };
        self.set_role(role, reason.clone());
        self.log(
            Level::Info,
            format!("handing the service over to {}: {reason}", self.cfg.peer),
        );
    }

    fn step_down_emergency(&mut self, reason: String) {
        self.log(Level::Warn, reason.clone());
        self.emergency = true;
        self.peer_in_sync = false;
        self.pending_mint = false;
        self.resync_running = false;
        self.witness_lease_end = 0;
        self.wait(reason);
    }

    fn may_send_witness(&self) -> bool {
        self.last_wreq_ms
            .is_none_or(|t| self.now >= t + self.cfg.interval_ms)
    }

    fn send_witness(&mut self, kind: WKind, force: bool) {
        let req = self.wreq_next;
        self.wreq_next += 1;
        let data_gen = self.p.data_gen;
        let new_gen = match kind {
            WKind::Hold => data_gen,
            WKind::Claim => self.next_gen(),
        };
        if self.wout.len() >= MAX_WITNESS_OUTSTANDING {
            self.wout.pop_front();
        }
        self.wout.push_back(WitnessOut {
            req,
            sent_ms: self.now,
            data_gen,
            kind,
        });
        self.last_wreq_ms = Some(self.now);
        self.emit(Command::RequestWitness(WitnessRequest {
            from: self.cfg.me.clone(),
            req,
            data_gen,
            new_gen,
            force,
            lease_ms: self.cfg.timeout_ms,
        }));
    }

    fn release_witness(&mut self, gen: u64, revert_to: Option<u64>) {
        self.emit(Command::ReleaseWitness(WitnessRelease {
            from: self.cfg.me.clone(),
            gen,
            revert_to,
        }));
    }

    // ----- resources --------------------------------------------------

    /// Drives the resources towards what the role needs, one ordered step
    /// at a time: acquire VIP → mount → app; release app → unmount (flush)
    /// → VIP, or in an emergency VIP first and everything at once.
    fn reconcile(&mut self) {
        let mut cmds = Vec::new();
        let r = &mut self.res;
        if self.role == Role::Primary {
            if r.mirror {
                cmds.push(Command::StopMirror);
                r.mirror = false;
            }
            if r.app == ResState::Stopping || r.mount == ResState::Stopping {
                // Wait for the previous teardown to finish.
            } else if r.mount == ResState::Down && r.app != ResState::Down {
                cmds.push(Command::StopApp);
                r.app = ResState::Stopping;
            } else {
                if !r.vip {
                    cmds.push(Command::TakeVip);
                    r.vip = true;
                }
                if r.mount == ResState::Down && self.now >= self.retry_mount_at {
                    cmds.push(Command::Mount);
                    r.mount = ResState::Starting;
                } else if r.mount == ResState::Up && r.app == ResState::Down {
                    cmds.push(Command::StartApp);
                    r.app = ResState::Starting;
                }
            }
        } else {
            let emergency = self.emergency;
            if emergency && r.vip {
                cmds.push(Command::ReleaseVip);
                r.vip = false;
            }
            if matches!(r.app, ResState::Up | ResState::Starting) {
                cmds.push(Command::StopApp);
                r.app = ResState::Stopping;
            }
            if (emergency || r.app == ResState::Down)
                && matches!(r.mount, ResState::Up | ResState::Starting)
            {
                cmds.push(Command::Unmount { flush: !emergency });
                r.mount = ResState::Stopping;
            }
            if r.app == ResState::Down && r.mount == ResState::Down && r.vip {
                cmds.push(Command::ReleaseVip);
                r.vip = false;
            }
            if !r.serving() {
                self.emergency = false;
                if self.role == Role::Secondary && !r.mirror {
                    cmds.push(Command::StartMirror {
                        keep_aside: self.keep_aside,
                    });
                    r.mirror = true;
                } else if self.role != Role::Secondary && r.mirror {
                    cmds.push(Command::StopMirror);
                    r.mirror = false;
                }
            }
        }
        let released = !self.res.serving();
        self.out.extend(cmds);
        // A node that handed over gives its witness lease back so that the
        // peer does not wait for it to expire.
        if released && self.role != Role::Primary && self.witness_lease_end > self.now {
            self.witness_lease_end = 0;
            let g = self.p.data_gen;
            self.release_witness(g, None);
        }
    }

    // ----- output -----------------------------------------------------

    fn record_transition(&mut self) {
        let st = self.state();
        if st == self.last_state {
            self.pending_reason = None;
            return;
        }
        let reason = self.pending_reason.take().unwrap_or_else(|| match st {
            NodeState::Alone => format!("{} no longer secondary", self.cfg.peer),
            NodeState::Prim => format!("{} is SECOND", self.cfg.peer),
            _ => self.detail.clone(),
        });
        if self.transitions.len() >= MAX_TRANSITIONS {
            self.transitions.pop_front();
        }
        self.transitions.push_back(Transition {
            at_ms: self.now,
            from: self.last_state,
            to: st,
            reason: reason.clone(),
        });
        self.log(
            Level::Info,
            format!("{} -> {st}: {reason}", self.last_state),
        );
        self.last_state = st;
        self.p.last_state = st;
        self.persist();
        // Tell the peer at once rather than at the next period.
        self.next_hb_ms = self.now;
    }

    fn send_heartbeat(&mut self) {
        self.hb_seq += 1;
        if self.sent.len() >= MAX_SENT_HEARTBEATS {
            self.sent.pop_front();
        }
        self.sent.push_back((self.hb_seq, self.now));
        self.next_hb_ms = self.now + self.cfg.interval_ms;
        let hb = Heartbeat {
            from: self.cfg.me.clone(),
            boot: self.p.boot_count,
            seq: self.hb_seq,
            echo: self.peer.as_ref().map(|v| Echo {
                boot: v.hb.boot,
                seq: v.hb.seq,
            }),
            state: self.state(),
            serving: self.res.serving(),
            data_gen: self.p.data_gen,
            gen_history: self.p.gen_history.clone(),
            known_gen: self.p.known_gen,
            in_sync: match self.role {
                Role::Primary => self.peer_in_sync,
                Role::Secondary => self.in_sync,
                _ => false,
            },
            stale: self.is_stale(),
            candidate: self.is_candidate(),
            intent_prim: matches!(self.intent, Intent::Prim { .. }),
            handover: self.handover.is_some(),
            swap_request: self.swap_request_until > self.now,
        };
        self.emit(Command::SendHeartbeat(hb));
    }
}
