//! cfgsync: node registration and delivery of one payload of files per node.
//!
//! The wire contract is the seed's (`POST /register`, `POST /node`); bootsync's additions
//! (long-poll, epochs, per-node secrets) are ignored by old peers. Serving state lives in the
//! reserved `__cfgsync__` namespace of the store.

pub mod admission;
pub mod bundle;
pub mod client;
pub mod direct;
mod epoch;
pub mod gzip;
pub mod install;
pub mod intake;
pub mod isolate;
pub mod lifecycle;
pub mod materialize;
pub mod node;
pub mod output;
pub mod payload;
pub mod plan;
pub mod policy;
pub mod preview;
pub mod rate;
pub mod registration;
pub mod render;
pub mod report;
pub mod rollout;
pub mod service;
mod splice;
pub mod state;
mod steer;
pub mod template;
pub mod text;
pub mod view;
pub mod watch;

pub use crate::api::cfgsync::{ArtifactFile, NodeArtifactsPayload, NodeRegistration};
pub use crate::files::FileError;
pub use bundle::{BundleNode, NodeArtifactsBundle};
pub use client::{CfgsyncClient, ClientError, FetchOutcome};
pub use materialize::{
    CachedSnapshotMaterializer, DynCfgsyncError, NodeArtifacts, NodeArtifactsCatalog,
    NodeArtifactsMaterializer, PerNode, RegistrationSnapshot, RegistrationSnapshotMaterializer,
};
pub use node::{
    fetch_and_write_artifacts, register_and_fetch_artifacts, run_cfgsync_client_from_env,
};
pub use output::{ArtifactOutputMap, OutputError};
pub use policy::{CompiledPolicy, Policy};
pub use registration::{RegisterError, Served};
pub use service::{NodeAnswer, Service, ServiceOptions};
pub use steer::RolloutError;
pub use view::Serving;
