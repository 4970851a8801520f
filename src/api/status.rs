//! The body of `GET /v1/status`: every initialiser's wanted and stored flag and last run, and
//! a summary of cfgsync.

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use super::system::{HistoryEntry, Status};
use crate::store::Revision;

/// One initialiser as `/v1/status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InitialiserStatus {
    /// Instance name.
    pub name: String,
    /// Class.
    pub class: String,
    /// The flag the spec wants (absent when the running spec no longer names it).
    pub wanted_flag: Option<String>,
    /// The flag stored after the last success.
    pub stored_flag: Option<String>,
    /// Whether it is at its wanted flag.
    pub converged: bool,
    /// The last run's record.
    pub last_run: Option<Status>,
    /// The params changed since the last success but the flag did not (probably forgotten).
    pub params_changed_without_flag_bump: bool,
    /// Runs before the gate (no stored flag).
    pub pre_gate: bool,
}

/// The body of `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusBody {
    /// Store revision read.
    pub revision: Revision,
    /// Store backend.
    pub backend: String,
    /// Whether every post-gate initialiser is at its flag (false until a reconciler wrote a spec).
    pub converged: bool,
    /// In spec order, then any stored but no longer wanted.
    pub initialisers: Vec<InitialiserStatus>,
    /// cfgsync: registrations and readiness.
    pub cfgsync: CfgsyncSummary,
}

/// The body of `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// The body of `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Ready {
    /// Always `ready` (an unready store answers 503 with the error body).
    pub status: String,
    /// The store backend.
    pub backend: String,
    /// The store's revision.
    pub revision: Revision,
}

/// cfgsync's part of `/v1/status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CfgsyncSummary {
    /// Nodes registered.
    pub registrations: usize,
    /// Whether the policy's readiness condition holds (or a bundle is served).
    pub ready: bool,
    /// Whether a policy (or a library materializer) is in force.
    pub policy: bool,
    /// Whether a bundle is stored.
    #[serde(default)]
    pub bundle: bool,
    /// The revision where the node set last changed in a way templates can see.
    pub epoch: Option<Revision>,
    /// Bytes held by the render cache.
    pub render_cache_bytes: usize,
    /// Renders that failed since start.
    pub render_failures: u64,
    /// The last failed render.
    pub last_render_failure: Option<RenderFailure>,
    /// Registered nodes by the version they last reported and how it went.
    #[serde(default)]
    pub applied: Vec<VersionCount>,
    /// The rollout under way, or the last one while its version is installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::api::rollout::RolloutStatus>,
}

/// How many registered nodes last reported one version with one result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionCount {
    /// The version they reported (`None`: they never reported, or named none).
    pub version: Option<Revision>,
    /// `ok`, `failed`, or `not_reporting`.
    pub result: String,
    /// How many.
    pub nodes: usize,
}

/// One failed render.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RenderFailure {
    /// The node whose payload failed.
    pub identifier: String,
    /// The epoch it failed at.
    pub epoch: Revision,
    /// Why (a template error, fuel, the deadline or the output limit).
    pub reason: String,
}

/// Query of `GET /v1/history`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Only this initialiser.
    pub name: Option<String>,
}

/// The body of `GET /v1/history`: each initialiser's last runs, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryBody {
    /// Store revision read.
    pub revision: Revision,
    /// Instance name → its runs, oldest first.
    pub initialisers: BTreeMap<String, Vec<HistoryEntry>>,
}
