//! The `bootsync` command line: flag parsing and dispatch. Each subcommand lives in its own
//! file; [`main`] is the entry point of the `bootsync` binary and of third-party binaries.

mod bootstrap;
mod client;
mod completions;
mod config;
mod history;
mod nodes;
mod report;
mod rollout;
mod schema;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::telemetry::{self, LogFormat};

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: a runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status: bad usage or invalid input (bad flags, an invalid spec).
pub const EXIT_USAGE: u8 = 2;
/// Exit status: gave up waiting (`client`, `status --wait`).
pub const EXIT_GAVE_UP: u8 = 3;

/// bootsync: bootstrap reconciler, config store and cfgsync server.
#[derive(Debug, Parser)]
#[command(name = "bootsync", version, about, propagate_version = true)]
pub struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "BOOTSYNC_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the config API and cfgsync on the chosen store.
    Serve(serve::ServeArgs),
    /// Serve on the embedded store and run the reconciler against it (the sidecar default).
    Run(bootstrap::RunArgs),
    /// Run the reconciler alone against a remote server.
    Bootstrap(bootstrap::BootstrapArgs),
    /// Validate a spec file and print every problem.
    Check(bootstrap::CheckArgs),
    /// Show which initialisers would run now and why.
    Plan(bootstrap::PlanArgs),
    /// Show initialisers, registrations and readiness; optionally wait until converged.
    Status(bootstrap::StatusArgs),
    /// Each initialiser's last runs: when, which flags, how it ended, why it failed.
    History(history::HistoryArgs),
    /// Node side: register, wait, fetch and write this node's files.
    Client(client::ClientArgs),
    /// The registered nodes: list, remove, replace.
    #[command(subcommand)]
    Nodes(nodes::NodesCommand),
    /// See and steer the rollout of a policy or bundle change on a running server.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// Preview (`diff`) or install a policy on a running server.
    #[command(subcommand)]
    Policy(rollout::PolicyCommand),
    /// Operate the config store from a shell.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Print the JSON Schema of the spec, bundle or policy file (for editors and CI).
    Schema(schema::SchemaArgs),
    /// Print a shell completion script (`source <(bootsync completions bash)`).
    Completions(completions::CompletionsArgs),
    /// A render process of the server (started by it, not by people).
    #[command(name = "render-worker", hide = true)]
    RenderWorker(RenderWorkerArgs),
}

/// Flags of the hidden `render-worker` command.
#[derive(Debug, clap::Args)]
pub struct RenderWorkerArgs {
    /// Address space the process may use, in bytes.
    #[arg(long)]
    memory: u64,
}

/// Parses the process arguments, runs the command and returns its exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::RenderWorker(args) = &cli.command {
        // No runtime, no logging: a loop over stdin under its own memory limit.
        return crate::cfgsync::isolate::worker_main(args.memory);
    }
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {}", report::printable(&format!("{err:#}")));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Serve(args) => serve::run(args).await,
        Command::Run(args) => bootstrap::run(args).await,
        Command::Bootstrap(args) => bootstrap::bootstrap(args).await,
        Command::Check(args) => bootstrap::check(args).await,
        Command::Plan(args) => bootstrap::plan(args).await,
        Command::Status(args) => bootstrap::status(args).await,
        Command::History(args) => history::run(args).await,
        Command::Client(args) => client::run(args).await,
        Command::Nodes(command) => nodes::run(command).await,
        Command::Rollout(command) => rollout::run_rollout(command).await,
        Command::Policy(command) => rollout::run_policy(command).await,
        Command::Config(command) => config::run(command).await,
        Command::Schema(args) => schema::run(args),
        Command::Completions(args) => Ok(completions::run(args)),
        Command::RenderWorker(_) => unreachable!("handled before the runtime starts"),
    }
}
