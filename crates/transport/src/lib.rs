//! hapair's transport: cluster certificates, QUIC with mutual TLS between
//! the nodes, and frame I/O over QUIC streams.
//!
//! - [`tls_init`] writes a cluster CA and one certificate per node;
//!   [`TlsMaterial::load`] reads what one node needs.
//! - [`server_endpoint`], [`client_endpoint`] and [`connect`] build QUIC
//!   endpoints where both sides must present a certificate of the cluster CA
//!   (TLS 1.3, ring). [`peer_node_name`] tells who the peer is.
//! - [`FrameWriter`] and [`FrameReader`] move hapair-proto frames over a
//!   stream.

mod certs;
mod frames;
mod inline;
mod quic;

pub use certs::{
    tls_init, validate_node_name, TlsMaterial, CA_CERT_FILE, CA_KEY_FILE, MAX_NODE_NAME,
};
pub use frames::{FrameReader, FrameWriter};
pub use inline::InlineRuntime;
pub(crate) use quic::provider;
pub use quic::{
    client_endpoint, client_endpoint_inline, client_endpoint_with, connect,
    install_crypto_provider, is_authentication_failure, peer_node_name, server_endpoint,
    server_endpoint_with, TransportTuning,
};
