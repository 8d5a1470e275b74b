//! The witness (`hapair witness`): the arbitrator that gives a two-node
//! pair a quorum. Sans-IO like the node core: requests in, replies out.
//!
//! It grants one lease at a time and remembers the latest data generation
//! it registered. A node may serve without its peer only while it holds the
//! lease, so two nodes never serve at once; and a lease is granted only to a
//! node whose data is at least as new as the latest registered generation,
//! so a primary always has the freshest data.
//!
//! Lease timing: the witness counts a lease from when it *received* the
//! request; the node counts it from when it *sent* it, minus a guard, so
//! the node's lease always ends first (clock rates are assumed to differ by
//! far less than the guard over one lease).

use serde::{Deserialize, Serialize};

/// Ask for the lease. `new_gen == data_gen`: hold or renew the lease for
/// the current data. `new_gen > data_gen`: also register a new generation
/// (the node is about to serve without an in-sync peer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessRequest {
    pub from: String,
    pub req: u64,
    pub data_gen: u64,
    pub new_gen: u64,
    /// `prim --force`: skip the freshness check (never the one-holder check).
    pub force: bool,
    pub lease_ms: u64,
}

/// Give the lease back. `revert_to`: the grant for `gen` was never used
/// (the node did not serve in it), so the registered generation goes back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessRelease {
    pub from: String,
    pub gen: u64,
    pub revert_to: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DenyReason {
    /// The witness restarted recently and waits out leases it may have
    /// granted before.
    Restarting,
    /// The other node holds a live lease.
    HeldByPeer,
    /// The requester's data is older than the latest registered generation.
    StaleData,
    /// The requested new generation is not above the latest registered one.
    GenerationTaken,
    /// Not from a cluster node, or inconsistent numbers.
    Malformed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WitnessAnswer {
    Granted { gen: u64, lease_ms: u64 },
    Denied { reason: DenyReason, latest_gen: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessReply {
    pub to: String,
    pub req: u64,
    pub answer: WitnessAnswer,
}

/// What the witness keeps on disk (written durably before a grant that
/// changed it is sent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessPersisted {
    pub latest_gen: u64,
    pub latest_owner: Option<String>,
    /// The generation `latest_gen` was registered from.
    pub latest_base: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessConfig {
    /// The two cluster nodes; requests from other names are refused.
    pub nodes: [String; 2],
    /// Longest lease granted (requests are clamped to it). Also how long a
    /// restarted witness refuses everything.
    pub max_lease_ms: u64,
}

/// Output of one witness call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WitnessOutput {
    pub reply: WitnessReply,
    /// Write this durably before sending the reply.
    pub persist: Option<WitnessPersisted>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Holder {
    node: String,
    until_ms: u64,
}

#[derive(Clone, Debug)]
pub struct WitnessCore {
    cfg: WitnessConfig,
    p: WitnessPersisted,
    holder: Option<Holder>,
    quiet_until_ms: u64,
}

impl WitnessCore {
    /// A witness starting at `now_ms`. It refuses every request for
    /// `max_lease_ms`: leases it granted before a restart are unknown but
    /// expire within that time.
    pub fn new(cfg: WitnessConfig, persisted: WitnessPersisted, now_ms: u64) -> Self {
        let quiet_until_ms = now_ms.saturating_add(cfg.max_lease_ms);
        WitnessCore {
            cfg,
            p: persisted,
            holder: None,
            quiet_until_ms,
        }
    }

    pub fn persisted(&self) -> &WitnessPersisted {
        &self.p
    }

    /// The current holder and the end of its lease, if live at `now_ms`.
    pub fn holder(&self, now_ms: u64) -> Option<(&str, u64)> {
        self.holder
            .as_ref()
            .filter(|h| now_ms < h.until_ms)
            .map(|h| (h.node.as_str(), h.until_ms))
    }

    pub fn handle_request(&mut self, now_ms: u64, r: &WitnessRequest) -> WitnessOutput {
        let deny = |reason, latest| WitnessOutput {
            reply: WitnessReply {
                to: r.from.clone(),
                req: r.req,
                answer: WitnessAnswer::Denied {
                    reason,
                    latest_gen: latest,
                },
            },
            persist: None,
        };
        let latest = self.p.latest_gen;
        if !self.cfg.nodes.contains(&r.from) || r.new_gen < r.data_gen || r.lease_ms == 0 {
            return deny(DenyReason::Malformed, latest);
        }
        if now_ms < self.quiet_until_ms {
            return deny(DenyReason::Restarting, latest);
        }
        if let Some(h) = &self.holder {
            if h.node != r.from && now_ms < h.until_ms {
                return deny(DenyReason::HeldByPeer, latest);
            }
        }
        // The owner of the latest registration claims again from the same
        // base: it never persisted (so never served in) the generation, e.g.
        // it crashed before the reply arrived. Give it the same generation
        // again, or nobody could ever serve.
        let own_retry = r.new_gen > r.data_gen
            && latest > self.p.latest_base
            && r.data_gen == self.p.latest_base
            && self.p.latest_owner.as_deref() == Some(r.from.as_str());
        if own_retry {
            let again = WitnessRequest {
                new_gen: latest,
                ..r.clone()
            };
            return self.grant(now_ms, &again);
        }
        if !r.force && r.data_gen < latest {
            return deny(DenyReason::StaleData, latest);
        }
        if r.new_gen > r.data_gen && r.new_gen <= latest {
            return deny(DenyReason::GenerationTaken, latest);
        }
        if r.force && r.new_gen == r.data_gen && r.data_gen < latest {
            // A forced node must register a new generation above the latest.
            return deny(DenyReason::GenerationTaken, latest);
        }
        self.grant(now_ms, r)
    }

    fn grant(&mut self, now_ms: u64, r: &WitnessRequest) -> WitnessOutput {
        let lease_ms = r.lease_ms.min(self.cfg.max_lease_ms);
        self.holder = Some(Holder {
            node: r.from.clone(),
            until_ms: now_ms.saturating_add(lease_ms),
        });
        let mut persist = None;
        if r.new_gen > self.p.latest_gen {
            self.p.latest_base = r.data_gen;
            self.p.latest_gen = r.new_gen;
            self.p.latest_owner = Some(r.from.clone());
            persist = Some(self.p.clone());
        }
        WitnessOutput {
            reply: WitnessReply {
                to: r.from.clone(),
                req: r.req,
                answer: WitnessAnswer::Granted {
                    gen: r.new_gen,
                    lease_ms,
                },
            },
            persist,
        }
    }

    /// Returns the state to persist if the release changed it.
    pub fn handle_release(&mut self, r: &WitnessRelease) -> Option<WitnessPersisted> {
        if self.holder.as_ref().is_some_and(|h| h.node == r.from) {
            self.holder = None;
        }
        match r.revert_to {
            Some(old)
                if self.p.latest_gen == r.gen
                    && old < r.gen
                    && self.p.latest_owner.as_deref() == Some(r.from.as_str()) =>
            {
                self.p.latest_gen = old;
                Some(self.p.clone())
            }
            _ => None,
        }
    }
}
