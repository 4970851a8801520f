//! cfgsync: node registration and delivery of one payload of files per node.
//!
//! The wire contract is the seed's (`POST /register`, `POST /node`); bootsync's additions
//! (long-poll, epochs, per-node secrets) are ignored by old peers.

pub mod protocol;

pub use protocol::{ArtifactFile, NodeArtifactsPayload, NodeRegistration};
