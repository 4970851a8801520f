//! bootsync brings a deployment to its configured initial state, keeps it there, and hands every
//! node the files it needs to start.
//!
//! The parts, each usable on its own: [`store`] (the versioned config store), [`server`] (one
//! HTTP server for the config API and cfgsync), [`cfgsync`] (node registration and artifact
//! delivery), and [`cli`] (the `bootsync` command, also the entry point for third-party
//! binaries that link their own initialisers).

pub mod cfgsync;
pub mod cli;
pub mod metrics;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
