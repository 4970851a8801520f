//! The records the reconciler keeps in `__system__`: `init-state` (the flag, as the seed stores
//! it), `init-status` (what happened last) and `init-spec` (what the running spec wants).

use serde::{Deserialize, Serialize};

use crate::store::{Key, SYSTEM_NAMESPACE};

/// Type of the stored flags (key = instance name, value = the flag string).
pub const INIT_STATE: &str = "init-state";
/// Type of the status records (key = instance name).
pub const INIT_STATUS: &str = "init-status";
/// Type of the wanted-flags record (key [`SPEC_KEY`]).
pub const INIT_SPEC: &str = "init-spec";
/// Key of the wanted-flags record.
pub const SPEC_KEY: &str = "current";

/// Where an initialiser stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Running now.
    Running,
    /// Last run succeeded and its flag is stored.
    Succeeded,
    /// Last run failed; it will be retried.
    Failed,
    /// It succeeded but the flag could not be recorded; it runs again.
    StateWriteFailed,
    /// It has failed so often that a person should look (still retried, slowly).
    NeedsOperator,
}

/// The `init-status` record of one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Status {
    /// Where it stands.
    pub state: State,
    /// Its class.
    pub class: String,
    /// The flag the run was for.
    pub flag: String,
    /// The flag stored before the run (`None` on a first run).
    #[serde(default)]
    pub old_flag: Option<String>,
    /// Runs of this flag so far.
    pub attempts: u32,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// The last error with its cause chain.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When the last run started, Unix ms.
    pub started_ms: u64,
    /// When it finished, Unix ms.
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// How long it took.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// The reconciler that ran it.
    pub holder: String,
    /// Hash of the params it last succeeded with.
    #[serde(default)]
    pub succeeded_params_hash: Option<String>,
}

/// One wanted initialiser, as the running spec says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wanted {
    /// Instance name.
    pub name: String,
    /// Class.
    pub class: String,
    /// Wanted flag.
    pub flag: String,
    /// Hash of the params in the spec.
    pub params_hash: String,
    /// Whether it runs before the gate.
    pub pre_gate: bool,
}

/// The `init-spec` record: what the reconciler is converging to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WantedSpec {
    /// The reconciler that wrote it.
    pub holder: String,
    /// In spec order.
    pub initialisers: Vec<Wanted>,
}

/// The key of a record type for an instance.
pub fn key(kind: &str, name: &str) -> Key {
    Key::new(SYSTEM_NAMESPACE, kind, name)
}
