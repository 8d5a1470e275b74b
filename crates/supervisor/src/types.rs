//! The vocabulary of the supervisor core: configuration, persisted state,
//! the heartbeat message, events in, commands out, admin replies.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::witness::{DenyReason, WitnessRelease, WitnessRequest};

/// Most generations remembered as ancestors of the local data. Enough to
/// tell "the peer is just behind me" from "the peer diverged" across the
/// handful of failovers that can happen while one node is away; beyond it
/// the answer is "diverged", which is the safe one (full resync, keep aside).
pub const MAX_GEN_HISTORY: usize = 16;

/// A node's state, with the names SafeKit users know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum NodeState {
    /// hapair stopped on this node: no app, no VIP, no mount.
    Stop,
    /// Running, but may not serve (waiting for the peer, resync, witness,
    /// or holding stale data).
    Wait,
    /// Primary without a secondary.
    Alone,
    /// Primary with an up-to-date (or resyncing) secondary.
    Prim,
    /// Secondary: receives replication.
    Second,
}

impl NodeState {
    /// PRIM or ALONE: this node serves (or is acquiring what it needs to).
    pub fn is_primary(self) -> bool {
        matches!(self, NodeState::Prim | NodeState::Alone)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Stop => "STOP",
            NodeState::Wait => "WAIT",
            NodeState::Alone => "ALONE",
            NodeState::Prim => "PRIM",
            NodeState::Second => "SECOND",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The supervisor's configuration (from the cluster TOML, already parsed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreConfig {
    /// This node's name.
    pub me: String,
    /// The other node's name.
    pub peer: String,
    /// Heartbeat period.
    pub interval_ms: u64,
    /// A peer unheard for this long is considered gone.
    pub timeout_ms: u64,
    /// A witness (arbitrator) is configured: a node may serve without its
    /// peer only while it holds the witness lease.
    pub witness: bool,
    /// A secondary takes over by itself when its primary is lost.
    pub auto_failover: bool,
    /// Preferred primary: when it is back and in sync, the service moves
    /// back to it (automatic failback).
    pub preferred: Option<String>,
    /// Application restarts allowed within `restart_window_ms` before the
    /// service fails over to the peer.
    pub restart_budget: u32,
    /// Window over which application failures are counted.
    pub restart_window_ms: u64,
}

impl CoreConfig {
    /// A configuration with the documented defaults: heartbeat every 200 ms,
    /// timeout 3 s, no witness, automatic failover, no preferred node,
    /// 3 restarts per 10 minutes.
    pub fn new(me: impl Into<String>, peer: impl Into<String>) -> Self {
        CoreConfig {
            me: me.into(),
            peer: peer.into(),
            interval_ms: 200,
            timeout_ms: 3000,
            witness: false,
            auto_failover: true,
            preferred: None,
            restart_budget: 3,
            restart_window_ms: 600_000,
        }
    }

    /// Checks the values a core relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.me.is_empty() || self.peer.is_empty() {
            return Err(ConfigError::EmptyName);
        }
        if self.me == self.peer {
            return Err(ConfigError::SameName(self.me.clone()));
        }
        if self.interval_ms == 0 {
            return Err(ConfigError::IntervalZero);
        }
        // Three heartbeats per timeout at least: one lost heartbeat must not
        // look like a dead peer.
        if self.timeout_ms < 3 * self.interval_ms {
            return Err(ConfigError::TimeoutTooShort {
                timeout_ms: self.timeout_ms,
                interval_ms: self.interval_ms,
            });
        }
        if let Some(p) = &self.preferred {
            if p != &self.me && p != &self.peer {
                return Err(ConfigError::PreferredUnknown(p.clone()));
            }
        }
        Ok(())
    }
}

/// A configuration the core cannot run with. The operator must fix the
/// cluster configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("node names must not be empty")]
    EmptyName,
    #[error("this node and its peer are both named {0:?}: the two node names must differ")]
    SameName(String),
    #[error("heartbeat interval_ms must be greater than 0")]
    IntervalZero,
    #[error(
        "heartbeat timeout_ms ({timeout_ms}) must be at least 3 × interval_ms ({interval_ms})"
    )]
    TimeoutTooShort { timeout_ms: u64, interval_ms: u64 },
    #[error("preferred node {0:?} is neither this node nor its peer")]
    PreferredUnknown(String),
}

/// Why a core could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitError {
    #[error("invalid supervisor configuration: {0}")]
    Config(#[from] ConfigError),
    /// The persisted state file is inconsistent (edited by hand, or written
    /// by a buggy version): the operator must inspect it.
    #[error("invalid persisted supervisor state: {0}")]
    Persisted(String),
}

/// What survives a restart of the daemon. The adapter writes it durably
/// (write + fsync + rename) when it executes [`Command::Persist`], before it
/// executes any command that follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    /// The state at the last persist. STOP is kept across restarts (the
    /// operator stopped the node); any other state restarts in WAIT.
    pub last_state: NodeState,
    /// The generation of the local data: the number of the last history
    /// step this node's data fully contains. A new generation is minted
    /// whenever a primary starts serving without an in-sync secondary.
    pub data_gen: u64,
    /// Ancestors of `data_gen`, oldest first, at most [`MAX_GEN_HISTORY`].
    pub gen_history: Vec<u64>,
    /// The highest generation this node has heard of (its epoch): local
    /// data with `data_gen < known_gen` is stale.
    pub known_gen: u64,
    /// The local data is not a state of any generation (a resync into it
    /// started and has not completed), or is known to be behind.
    pub stale: bool,
    /// Incremented at each start of the core, so heartbeat sequence numbers
    /// of different runs never mix.
    pub boot_count: u64,
}

impl Default for PersistedState {
    fn default() -> Self {
        PersistedState {
            last_state: NodeState::Wait,
            data_gen: 0,
            gen_history: Vec::new(),
            known_gen: 0,
            stale: false,
            boot_count: 0,
        }
    }
}

impl PersistedState {
    /// Checks the relations that a correct writer keeps.
    pub fn validate(&self) -> Result<(), String> {
        if self.data_gen > self.known_gen {
            return Err(format!(
                "data_gen {} is greater than known_gen {}",
                self.data_gen, self.known_gen
            ));
        }
        if self.gen_history.len() > MAX_GEN_HISTORY {
            return Err(format!(
                "gen_history has {} entries, at most {MAX_GEN_HISTORY} allowed",
                self.gen_history.len()
            ));
        }
        let mut prev: Option<u64> = None;
        for &g in &self.gen_history {
            if g >= self.data_gen || prev.is_some_and(|p| p >= g) {
                return Err(format!(
                    "gen_history {:?} must be strictly increasing and below data_gen {}",
                    self.gen_history, self.data_gen
                ));
            }
            prev = Some(g);
        }
        Ok(())
    }

    /// True if generation `g` is the local data's generation or one of its
    /// remembered ancestors.
    pub fn contains_gen(&self, g: u64) -> bool {
        g == self.data_gen || self.gen_history.contains(&g)
    }
}

/// A heartbeat's echo: the latest heartbeat received from the addressee.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    pub boot: u64,
    pub seq: u64,
}

/// The heartbeat, sent every `interval_ms` on every heartbeat network.
/// By echoing the peer's latest heartbeat a node promises not to seek
/// primacy without the peer until it has not heard from the peer for
/// `timeout_ms`; the peer turns that promise into a lease (see `Core`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub from: String,
    /// The sender's boot count (a new run restarts `seq`).
    pub boot: u64,
    /// Strictly increasing within one boot.
    pub seq: u64,
    pub echo: Option<Echo>,
    pub state: NodeState,
    /// The sender holds (or is still releasing) the app, mount or VIP.
    pub serving: bool,
    pub data_gen: u64,
    pub gen_history: Vec<u64>,
    /// The epoch: highest generation the sender knows of.
    pub known_gen: u64,
    /// Primary: it considers the peer in sync. Secondary: it is in sync.
    pub in_sync: bool,
    pub stale: bool,
    /// The sender could become primary now (started, data not stale, not
    /// told `second`, no recent local failure).
    pub candidate: bool,
    /// The operator asked the sender to become primary (`prim`).
    pub intent_prim: bool,
    /// A primary hands the service over to the addressee (swap, stop,
    /// failback, application failure).
    pub handover: bool,
    /// A secondary asks its primary for a swap.
    pub swap_request: bool,
}

/// An operator's command (`hapair start|stop|prim|second|swap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminCmd {
    Start,
    Stop,
    Prim { force: bool },
    Second,
    Swap,
}

/// The answer to an admin command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Ok {
        message: String,
    },
    /// Refused in the current state; `exit_code` is 3 (see the SPEC) and
    /// `reason` names the state and what to do.
    Refused {
        exit_code: u8,
        reason: String,
    },
}

/// Something that happened, reported by an adapter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A heartbeat from the peer (already authenticated by the transport).
    Heartbeat(Heartbeat),
    /// The peer announced that it stopped and released everything.
    PeerSaysStop {
        from: String,
    },
    /// An admin command; answered by `Command::Reply { id, .. }`.
    Admin {
        id: u64,
        cmd: AdminCmd,
    },
    WitnessGranted {
        req: u64,
        gen: u64,
        lease_ms: u64,
    },
    WitnessDenied {
        req: u64,
        reason: DenyReason,
        latest_gen: u64,
    },
    /// The connection to the witness dropped (status only: leases expire by
    /// themselves).
    WitnessLost,
    AppStarted,
    /// The application exited (after StopApp, or by itself).
    AppStopped,
    AppCheckOk,
    AppCheckFailed {
        reason: String,
    },
    MountReady,
    MountFailed {
        reason: String,
    },
    Unmounted,
    /// The primary's catch-up of the secondary completed. The adapter
    /// reports it at the moment its replication is synchronous again: from
    /// then on it acknowledges nothing the mirror has not applied, and a
    /// permission from an earlier `AllowAlone` has ended.
    ResyncDone,
    /// The primary's replication stopped reaching the mirror: writes are
    /// held until `AllowAlone` (or the mount is torn down).
    ReplicationDegraded {
        reason: String,
    },
}

/// Severity of a `Command::Log`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// Something for an adapter to do. Commands of one call are executed in
/// order; `Persist` must be durable before the next command runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    SendHeartbeat(Heartbeat),
    RequestWitness(WitnessRequest),
    ReleaseWitness(WitnessRelease),
    /// Lay the replicated mount over the data directories (and connect the
    /// replication to the peer's mirror if it is there).
    Mount,
    /// Remove the mount; `flush`: first let everything written reach the
    /// mirror (planned), else drop the link at once (failure).
    Unmount {
        flush: bool,
    },
    TakeVip,
    ReleaseVip,
    StartApp,
    StopApp,
    RestartApp,
    /// Receive replication; `keep_aside`: this node's data diverged (split
    /// brain), move it aside before anything is applied.
    StartMirror {
        keep_aside: bool,
    },
    StopMirror,
    /// Catch the secondary up; `full`: compare everything, the journal
    /// cannot describe the difference.
    StartResync {
        full: bool,
    },
    /// The replication may acknowledge writes without the mirror (journal
    /// them), in generation `gen`, until the end of this mount session or
    /// the next `ResyncDone`. Without it, writes the mirror cannot take are
    /// held (sync mode) and `ReplicationDegraded` is reported.
    AllowAlone {
        gen: u64,
    },
    Persist(PersistedState),
    Log {
        level: Level,
        msg: String,
    },
    Reply {
        id: u64,
        reply: Reply,
    },
}

/// A state change, kept in a bounded ring for `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub at_ms: u64,
    pub from: NodeState,
    pub to: NodeState,
    pub reason: String,
}

/// State of one resource the supervisor drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResState {
    Down,
    Starting,
    Up,
    Stopping,
}

impl ResState {
    /// Up, or on its way up or down: not yet known to be gone.
    pub fn present(self) -> bool {
        self != ResState::Down
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub app: ResState,
    pub mount: ResState,
    pub vip: bool,
    pub mirror: bool,
}

impl Resources {
    pub fn serving(&self) -> bool {
        self.app.present() || self.mount.present() || self.vip
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerStatus {
    pub name: String,
    /// Last reported state; None if never heard since this daemon started.
    pub state: Option<NodeState>,
    pub alive: bool,
    pub last_heard_ms: Option<u64>,
    pub data_gen: Option<u64>,
    pub in_sync: bool,
    pub serving: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WitnessStatus {
    pub configured: bool,
    /// This node holds the witness lease until then (None: not held).
    pub lease_until_ms: Option<u64>,
    pub reachable: bool,
    pub last_answer: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckStatus {
    pub last_ok: Option<bool>,
    pub last_at_ms: Option<u64>,
    pub last_failure: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RestartStatus {
    pub in_window: u32,
    pub budget: u32,
    pub total: u64,
}

/// A snapshot for `hapair status [--json]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Status {
    pub now_ms: u64,
    pub node: String,
    pub state: NodeState,
    /// Why the node waits, or what it is doing.
    pub detail: String,
    pub peer: PeerStatus,
    pub data_gen: u64,
    pub known_gen: u64,
    pub stale: bool,
    /// Primary: the secondary is in sync. Secondary: this node is.
    pub in_sync: bool,
    pub resync_running: bool,
    pub resources: Resources,
    pub witness: WitnessStatus,
    /// No witness is configured: under a partition both nodes may serve.
    pub split_brain_possible: bool,
    pub split_brains_detected: u64,
    pub app_check: CheckStatus,
    pub restarts: RestartStatus,
    pub transitions: Vec<Transition>,
}
