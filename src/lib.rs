//! bootsync brings a deployment to its configured initial state, keeps it there, and hands every
//! node the files it needs to start.
//!
//! The modules form layers, each using only those below it (`tests/architecture.rs` checks it):
//!
//! - [`store`]: the versioned config store (SQLite, etcd, memory) and its change stream;
//! - [`api`]: the wire contract — every request and response body, the error codes with their
//!   typed details, tokens and header names — shared by the server and both clients;
//! - [`cfgsync`]: node registration and delivery of one payload of files per node;
//! - [`bootstrap`]: the reconciler — the spec, the engine, the lease, the convergence rule and
//!   the registry of initialiser classes;
//! - [`client`]: the `/v1` client, and [`client::RemoteStore`], the store spoken over HTTP;
//! - [`server`]: one HTTP server over all of it, started with [`server::spawn`];
//! - [`cli`]: the `bootsync` command, also the entry point of third-party binaries;
//! - [`plugin`]: what a third-party initialiser needs, re-exported.
//!
//! Below them sit small foundations: [`backoff`], [`clock`], [`files`], [`memory`],
//! [`metrics`], [`shutdown`], [`telemetry`] and [`tls`].
//!
//! No `unsafe` but one, allowed where it stands and justified there: asking the kernel to
//! kill an `exec` step with its reconciler, which only the child can do before it execs.
#![deny(unsafe_code)]

/// `Debug` showing the named fields and saying there are more: for types whose other fields
/// are large (a registration map), secret, or not `Debug` themselves.
macro_rules! debug_fields {
    ($type:ident { $($field:ident),+ $(,)? }) => {
        impl std::fmt::Debug for $type {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($type))
                    $(.field(stringify!($field), &self.$field))+
                    .finish_non_exhaustive()
            }
        }
    };
}

pub mod api;
pub mod backoff;
pub mod bootstrap;
pub mod cfgsync;
pub mod cli;
pub mod client;
pub mod clock;
pub mod duration;
pub mod files;
pub mod memory;
pub mod metrics;
pub mod plugin;
pub mod server;
pub mod servers;
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
