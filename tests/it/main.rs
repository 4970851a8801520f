//! bootsync's integration tests: one binary, a module per surface, one support layer.
//!
//! Contract tests drive the in-process server (`support::TestServer`) with the crate's typed
//! clients; the real binary is spawned where the process itself matters: signals, kill -9,
//! TLS, exit codes and the command line. `harness` runs them all.

mod harness;
mod support;

mod architecture;
mod cfgsync_client;
mod cfgsync_server;
mod config_api;
mod deploy_examples;
mod etcd;
mod etcd_stubs;
mod fleet;
mod fuzz_seeds;
mod growing_cluster;
mod hostile;
mod node_lifecycle;
mod openapi;
mod reconciler;
mod remote_errors;
mod rollout;
mod schema;
mod serve_smoke;
mod status_page;
mod store_conformance;
mod tls;

fn main() -> std::process::ExitCode {
    harness::main()
}
