//! hapair's supervisor: the role/state machine of one node of a two-node
//! cluster (STOP, WAIT, ALONE, PRIM, SECOND), and the witness that gives the
//! pair a quorum. Sans-IO: events and `now_ms` in, [`Command`]s out; no
//! clock, socket, thread or file. The daemon's adapters execute commands in
//! order and feed back what happened.
//!
//! # Safety argument
//!
//! **One primary (with a witness).** A node is PRIM/ALONE only while it
//! holds a lease: the *witness lease* (granted to one node at a time,
//! counted by the node from when it sent the request, minus a guard) or the
//! *peer lease*: each heartbeat echoes the latest heartbeat received from
//! the peer, which promises not to seek primacy without us until it has not
//! heard from us for `timeout_ms`; the echoed heartbeat's send time plus
//! `timeout_ms` minus a guard bounds it. A node that restarts waits
//! `timeout_ms` before seeking primacy without contact, so the promise
//! survives crashes. When both leases end, a primary stops serving at once
//! (VIP first) and WAITs. Every promotion other than a swap asks the
//! witness; a swap happens only after the old primary released everything.
//!
//! **Freshest data.** Data carries a generation. A new one is minted (with
//! the parity of the node's rank, so the two nodes never mint the same
//! number) whenever a primary is about to acknowledge writes its peer does
//! not get: at promotion, and when the secondary drops out, before
//! [`Command::AllowAlone`]. With a witness the new generation is registered
//! there first, and the witness grants a lease only to a node whose data is
//! at least the latest registered generation. A secondary adopts the
//! primary's generation only when the primary says the resync completed.
//!
//! Without a witness two nodes may both serve under a partition
//! (`split_brain_possible` in the status); on reconnection the node with the
//! older generation steps down, and keeps its data aside (`StartMirror {
//! keep_aside: true }`).

mod core;
mod types;
pub mod witness;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

pub use crate::core::{Core, InvariantViolation, MAX_TRANSITIONS};
pub use crate::types::*;
pub use crate::witness::{
    DenyReason, WitnessAnswer, WitnessConfig, WitnessCore, WitnessOutput, WitnessPersisted,
    WitnessRelease, WitnessReply, WitnessRequest,
};
