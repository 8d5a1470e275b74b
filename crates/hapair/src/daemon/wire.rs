//! Messages between the nodes' supervisors and with the witness. They
//! travel as QUIC datagrams on mutually authenticated connections (see
//! `link`), encoded with postcard; a message that does not decode, or comes
//! from the wrong name, is dropped and logged.

use hapair_supervisor::{Heartbeat, WitnessRelease, WitnessReply, WitnessRequest};
use serde::{Deserialize, Serialize};

/// ALPN of the heartbeat connections between the two nodes.
pub const ALPN_HEARTBEAT: &[u8] = b"hapair-hb/1";
/// ALPN of the connections between a node and the witness.
pub const ALPN_WITNESS: &[u8] = b"hapair-witness/1";

/// Node to node.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum PeerMsg {
    Heartbeat(Heartbeat),
    /// The sender's daemon stopped and released everything.
    Stopping {
        from: String,
    },
}

/// Node to witness.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ToWitness {
    Request(WitnessRequest),
    Release(WitnessRelease),
}

/// Witness to node.
pub type FromWitness = WitnessReply;

pub fn encode<T: Serialize>(m: &T) -> Option<bytes::Bytes> {
    match postcard::to_allocvec(m) {
        Ok(v) if v.len() <= super::link::MAX_DATAGRAM_BYTES => Some(v.into()),
        Ok(v) => {
            tracing::error!(len = v.len(), "message too large for a datagram: not sent");
            None
        }
        Err(e) => {
            tracing::error!("cannot encode a message: {e}");
            None
        }
    }
}

pub fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(b)
}
