//! bootsync brings a deployment to its configured initial state, keeps it there, and hands every
//! node the files it needs to start.
//!
//! The parts, each usable on its own: [`store`] (the versioned config store), [`server`] (one
//! HTTP server for the config API and cfgsync), [`cfgsync`] (node registration and artifact
//! delivery), [`bootstrap`] (the reconciler), [`client`] (HTTP clients of the server's API), and
//! [`cli`] (the `bootsync` command, also the entry point for third-party binaries that link
//! their own initialisers).

pub mod api;
pub mod backoff;
pub mod bootstrap;
pub mod cfgsync;
pub mod cli;
pub mod client;
pub mod clock;
pub mod files;
pub mod metrics;
pub mod plugin;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tls;

// The core initialisers live in the top-level `initialisers/` folder (the design card's layout)
// but compile into this crate, so every binary that links bootsync links them too.
#[path = "../initialisers/mod.rs"]
mod initialisers;

pub use inventory;
/// Re-exported so third-party initialisers can describe their params with the same version
/// (`#[derive(JsonSchema)] #[schemars(crate = "bootsync::schemars")]`).
pub use schemars;
