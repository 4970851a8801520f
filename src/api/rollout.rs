//! Rollouts and applied-state reports on the wire: what a watching node reports (`POST
//! /report`), how a rollout stands (`GET /v1/rollout`), the operator's commands, and the
//! preview of a candidate policy (`POST /v1/cfgsync/preview`).

use serde::{Deserialize, Serialize};

use crate::store::Revision;

/// Longest stderr tail a report keeps, in bytes.
pub const MAX_STDERR_TAIL: usize = 2048;

/// How applying a payload went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Written, and the hook (if any) succeeded.
    Ok,
    /// Not written, or the hook failed.
    Failed,
}

/// What a node did with one payload: the part of a report the node sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Applied {
    /// The epoch of the payload applied.
    pub epoch: Revision,
    /// Its version (the policy or bundle revision), when the server named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Revision>,
    /// How it went.
    pub result: Outcome,
    /// The hook's exit status, when it exited with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// The end of the hook's stderr (or why nothing was written), at most 2 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_tail: Option<String>,
    /// How long the write and the hook took, ms.
    #[serde(default)]
    pub duration_ms: u64,
}

impl Applied {
    /// Whether it says the payload was applied.
    pub fn is_ok(&self) -> bool {
        self.result == Outcome::Ok
    }

    /// A failure in one line: the exit status and the stderr tail.
    pub fn describe_failure(&self) -> String {
        let status = self
            .exit_status
            .map_or_else(|| "failed".to_string(), |s| format!("exit {s}"));
        match self.stderr_tail.as_deref().map(str::trim) {
            Some(tail) if !tail.is_empty() => format!("{status}: {tail}"),
            _ => status,
        }
    }

    /// Whether `next` tells nothing this one does not (its duration aside): a repeated report
    /// is not written.
    pub fn same_as(&self, next: &Applied) -> bool {
        Self {
            duration_ms: next.duration_ms,
            ..self.clone()
        } == *next
    }
}

/// The body of `POST /report`. Unknown fields are ignored, as in the other node bodies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportBody {
    /// The node.
    pub identifier: String,
    /// What it did.
    #[serde(flatten)]
    pub applied: Applied,
}

/// A stored report (`__cfgsync__/report/<identifier>`): what the node sent, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Report {
    /// What the node did.
    #[serde(flatten)]
    pub applied: Applied,
    /// When the server took it, Unix ms.
    pub reported_ms: u64,
}

/// Which installed thing a rollout changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VersionKind {
    /// The registration policy (`__cfgsync__/policy/current`).
    Policy,
    /// The bundle (`__cfgsync__/bundle/current`).
    Bundle,
}

impl VersionKind {
    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::Bundle => "bundle",
        }
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Waves advance as they become healthy.
    Running,
    /// An operator paused it: no wave starts, no failure stops it.
    Paused,
    /// Stopped by failures or the progress deadline; an operator resumes, promotes or rolls
    /// back.
    Halted,
    /// Every node has the target version.
    Complete,
    /// Every node got the stable version back.
    RolledBack,
}

impl RolloutState {
    /// Whether the rollout is still under way (installs are refused, commands apply).
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Paused | Self::Halted)
    }
}

/// A node that failed on the target version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Failure {
    /// The node.
    pub identifier: String,
    /// The epoch it failed at (0 for a node that went silent).
    pub epoch: Revision,
    /// Its hook's exit status, when it ran and exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// The end of its hook's stderr, or why it failed.
    pub reason: String,
}

/// An operator's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Start no further wave.
    Pause,
    /// Go on after a pause or a halt (failures so far are forgiven).
    Resume,
    /// Give every node the target now.
    Promote,
    /// Give every node the stable version back.
    Rollback,
}

impl Command {
    /// Its name, as in `bootsync rollout NAME` and `POST /v1/rollout/NAME`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Promote => "promote",
            Self::Rollback => "rollback",
        }
    }
}

/// A state's name as the CLI and messages show it.
pub fn state_name(state: RolloutState) -> &'static str {
    match state {
        RolloutState::Running => "running",
        RolloutState::Paused => "paused",
        RolloutState::Halted => "halted",
        RolloutState::Complete => "complete",
        RolloutState::RolledBack => "rolled back",
    }
}

/// One wave as `rollout status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WaveStatus {
    /// As the plan writes it (`1`, `"25%"`).
    #[schema(value_type = Object)]
    pub size: serde_json::Value,
    /// Members it covers, cumulative.
    pub cutoff: usize,
    /// Whether it has been reached.
    pub reached: bool,
}

/// The body of `GET /v1/rollout` and of the commands' answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutStatus {
    /// What is rolled out.
    pub kind: VersionKind,
    /// Where it is.
    pub state: RolloutState,
    /// The version nodes had before.
    pub stable: Revision,
    /// The version rolled out.
    pub target: Revision,
    /// The last wave reached (1-based).
    pub wave: usize,
    /// Every wave.
    pub waves: Vec<WaveStatus>,
    /// Members in all.
    pub members: usize,
    /// Members of the waves reached that reported ok on the target.
    pub ok: usize,
    /// Watching members of the waves reached not yet ok on the target.
    pub pending: Vec<String>,
    /// Members of the waves reached that never reported (they do not hold a wave).
    pub silent: usize,
    /// Nodes that failed on the target, with their stderr tails.
    pub failures: Vec<Failure>,
    /// Why it halted, was rolled back or promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix ms it started.
    pub started_ms: u64,
    /// Unix ms the current wave started.
    pub wave_started_ms: u64,
    /// Unix ms of its last change.
    pub updated_ms: u64,
}

/// The body of `POST /v1/cfgsync/preview`: a candidate policy, and which nodes to show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    /// The candidate policy, as its file would hold it.
    #[schema(value_type = Object)]
    pub policy: serde_json::Value,
    /// Show the diff of this node only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Diffs shown for at most this many changed nodes (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show: Option<usize>,
}

/// One node's change in a preview.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeDiff {
    /// The node.
    pub identifier: String,
    /// A unified diff per changed file (`--- a/PATH`, `+++ b/PATH`).
    pub diff: String,
}

/// A node the candidate could not render for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PreviewFailure {
    /// The node.
    pub identifier: String,
    /// Why.
    pub reason: String,
}

/// The body a preview answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PreviewBody {
    /// The installed policy's version it was compared with (none: no policy installed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed: Option<Revision>,
    /// Registered nodes compared.
    pub nodes: usize,
    /// Whether the candidate's set would be ready with these registrations.
    pub ready: bool,
    /// Nodes whose files would change.
    pub changed: usize,
    /// Nodes whose files would stay the same.
    pub unchanged: usize,
    /// Nodes the candidate could not render for.
    pub failed: Vec<PreviewFailure>,
    /// Diffs of the first changed nodes (or of the node asked for).
    pub diffs: Vec<NodeDiff>,
    /// Milliseconds it took.
    pub elapsed_ms: u64,
}
