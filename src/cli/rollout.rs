//! `bootsync rollout status|pause|resume|promote|rollback` and `bootsync policy diff|install`:
//! changes to a running fleet, through the server's `/v1` API with the admin token.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::config::Remote;
use super::report::{Output, printable};
use super::{EXIT_FAILURE, EXIT_OK};
use crate::api::rollout::{
    Command, PreviewBody, PreviewRequest, RolloutState, RolloutStatus, VersionKind, state_name,
};
use crate::cfgsync::{NodeArtifactsBundle, Policy};
use crate::clock::utc;

/// `bootsync rollout …`.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// The rollout under way (or the last one): waves, nodes ok, pending and failed.
    Status(OutputArgs),
    /// Start no further wave.
    Pause(OutputArgs),
    /// Go on after a pause or a halt (its failures are forgiven).
    Resume(OutputArgs),
    /// Give every node the new version now.
    Promote(OutputArgs),
    /// Give every node the previous version back (their hooks run again).
    Rollback(OutputArgs),
}

/// Flags shared by the rollout commands.
#[derive(Debug, Args)]
pub struct OutputArgs {
    #[command(flatten)]
    remote: Remote,
    /// Output format: text, or the `/v1/rollout` JSON.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// `bootsync policy …`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Renders a candidate policy against the current registrations, without installing it:
    /// how many nodes would change, stay the same or fail, and a unified diff per changed file.
    Diff(DiffArgs),
    /// Installs a policy (or `--bundle`) on a running server; a `rollout:` section rolls it
    /// out in waves.
    Install(InstallArgs),
}

/// Flags of `bootsync policy diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    #[command(flatten)]
    remote: Remote,
    /// The candidate policy file (YAML or JSON).
    #[arg(long)]
    policy: PathBuf,
    /// Show this node's diff only.
    #[arg(long)]
    node: Option<String>,
    /// Diffs shown for at most this many changed nodes.
    #[arg(long, default_value_t = 3)]
    show: usize,
    /// Output format: text, or the preview JSON.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// Flags of `bootsync policy install`.
#[derive(Debug, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    remote: Remote,
    /// The policy file (YAML or JSON).
    #[arg(long, required_unless_present = "bundle", conflicts_with = "bundle")]
    policy: Option<PathBuf>,
    /// A bundle file instead.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Install even while a rollout is under way (which ends it).
    #[arg(long)]
    force: bool,
}

pub(super) async fn run_rollout(command: RolloutCommand) -> anyhow::Result<u8> {
    let (args, command) = match command {
        RolloutCommand::Status(args) => (args, None),
        RolloutCommand::Pause(args) => (args, Some(Command::Pause)),
        RolloutCommand::Resume(args) => (args, Some(Command::Resume)),
        RolloutCommand::Promote(args) => (args, Some(Command::Promote)),
        RolloutCommand::Rollback(args) => (args, Some(Command::Rollback)),
    };
    let client = args.remote.client().await?;
    let status = match command {
        None => client.rollout().await?,
        Some(command) => client.rollout_command(command).await?,
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Text => print!("{}", printable(&describe(&status))),
    }
    Ok(match status.state {
        RolloutState::Halted | RolloutState::RolledBack => EXIT_FAILURE,
        _ => EXIT_OK,
    })
}

pub(super) async fn run_policy(command: PolicyCommand) -> anyhow::Result<u8> {
    match command {
        PolicyCommand::Diff(args) => {
            // Checked here first, so a broken candidate names its file.
            let compiled = Policy::load(&args.policy)?;
            let request = PreviewRequest {
                policy: serde_json::to_value(compiled.policy())?,
                node: args.node,
                show: Some(args.show),
            };
            let body = args.remote.client().await?.preview(&request).await?;
            match args.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&body)?),
                Output::Text => print!("{}", printable(&describe_preview(&body))),
            }
            Ok(if body.failed.is_empty() {
                EXIT_OK
            } else {
                EXIT_FAILURE
            })
        }
        PolicyCommand::Install(args) => {
            let (kind, value) = match (&args.policy, &args.bundle) {
                (Some(path), _) => (
                    VersionKind::Policy,
                    serde_json::to_value(Policy::load(path)?.policy())?,
                ),
                (None, Some(path)) => (
                    VersionKind::Bundle,
                    serde_json::to_value(NodeArtifactsBundle::load(path)?)?,
                ),
                (None, None) => anyhow::bail!("name --policy or --bundle"),
            };
            let answer = args
                .remote
                .client()
                .await?
                .install(kind, &value, args.force)
                .await?;
            let version = &answer["version"];
            let what = if answer["unchanged"] == true {
                "already installed"
            } else if answer["rollout"] == true {
                "installed; its rollout started (`bootsync rollout status`)"
            } else {
                "installed"
            };
            println!("{} version {version}: {what}", kind.name());
            Ok(EXIT_OK)
        }
    }
}

/// The rollout in a few lines.
fn describe(status: &RolloutStatus) -> String {
    let mut out = format!(
        "{} rollout {} -> {}: {}, wave {} of {}\n",
        status.kind.name(),
        status.stable,
        status.target,
        state_name(status.state),
        status.wave,
        status.waves.len()
    );
    for (k, wave) in status.waves.iter().enumerate() {
        out.push_str(&format!(
            "  wave {}: {} ({} node(s)){}\n",
            k + 1,
            wave.size,
            wave.cutoff,
            if wave.reached { ", reached" } else { "" }
        ));
    }
    out.push_str(&format!(
        "  {} of {} member(s) reached: {} ok, {} pending, {} not reporting, {} failed\n",
        status
            .waves
            .get(status.wave.saturating_sub(1))
            .map_or(0, |w| w.cutoff),
        status.members,
        status.ok,
        status.pending.len(),
        status.silent,
        status.failures.len()
    ));
    if !status.pending.is_empty() {
        out.push_str(&format!("  pending: {}\n", status.pending.join(", ")));
    }
    for failure in &status.failures {
        out.push_str(&format!(
            "  failed: {} (epoch {}): {}\n",
            failure.identifier, failure.epoch, failure.reason
        ));
    }
    if let Some(reason) = &status.reason {
        out.push_str(&format!("  reason: {reason}\n"));
    }
    out.push_str(&format!(
        "  started {}, wave started {}, updated {}\n",
        utc(status.started_ms),
        utc(status.wave_started_ms),
        utc(status.updated_ms)
    ));
    out
}

/// The preview in a few lines, then the diffs.
fn describe_preview(body: &PreviewBody) -> String {
    let mut out = format!(
        "{} node(s): {} would change, {} stay the same, {} fail to render{} (against version {}, {} ms)\n",
        body.nodes,
        body.changed,
        body.unchanged,
        body.failed.len(),
        if body.ready {
            ""
        } else {
            "; the candidate's set would not be ready"
        },
        body.installed.map_or("none".to_string(), |v| v.to_string()),
        body.elapsed_ms
    );
    for failure in &body.failed {
        out.push_str(&format!("  {}: {}\n", failure.identifier, failure.reason));
    }
    for diff in &body.diffs {
        out.push_str(&format!("\n# {}\n", diff.identifier));
        if diff.diff.is_empty() {
            out.push_str("(no change)\n");
        } else {
            out.push_str(&diff.diff);
        }
    }
    out
}
