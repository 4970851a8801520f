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

/// Type of the run histories (key = instance name, value = [`History`]).
pub const INIT_HISTORY: &str = "init-history";
/// Runs kept per initialiser unless the reconciler is told otherwise (`--history-len`).
pub const DEFAULT_HISTORY_LEN: usize = 50;
/// The longest error kept in a history entry, in bytes (its tail: the cause is at the end).
pub const HISTORY_ERROR_BYTES: usize = 2048;
/// The most a history may hold, as JSON bytes: the oldest runs go first past it, so the record
/// always fits the store's value limit (1 MiB by default) and its batch with the flag succeeds.
pub const HISTORY_MAX_BYTES: usize = 256 * 1024;

/// One finished run of an initialiser.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    /// When it started, Unix ms.
    pub started_ms: u64,
    /// When it ended, Unix ms.
    pub finished_ms: u64,
    /// How long it took.
    pub duration_ms: u64,
    /// How it ended: `succeeded`, `failed`, `timed_out`, `panicked` or `state_write_failed`.
    pub result: String,
    /// The flag stored before the run (`None` on a first run).
    pub old_flag: Option<String>,
    /// The flag it ran for.
    pub flag: String,
    /// The tail of its error, when it did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The reconciler that ran it.
    pub holder: String,
}

/// The `init-history` record of one instance: its last runs, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct History {
    /// The runs, oldest first, at most the reconciler's history length.
    pub runs: Vec<HistoryEntry>,
}

impl History {
    /// Appends `entry`, keeping the newest `len` runs, and fewer when they would pass
    /// [`HISTORY_MAX_BYTES`].
    pub fn push(&mut self, entry: HistoryEntry, len: usize) {
        self.runs.push(entry);
        let excess = self.runs.len().saturating_sub(len.max(1));
        self.runs.drain(..excess);
        let size = |r: &HistoryEntry| serde_json::to_vec(r).map_or(0, |v| v.len() + 1);
        let mut total: usize = self.runs.iter().map(size).sum();
        while total > HISTORY_MAX_BYTES && self.runs.len() > 1 {
            total -= size(&self.runs.remove(0));
        }
    }
}

/// The tail of `error` that fits in [`HISTORY_ERROR_BYTES`], cut at a character boundary.
pub fn error_tail(error: &str) -> String {
    if error.len() <= HISTORY_ERROR_BYTES {
        return error.to_string();
    }
    let mut start = error.len() - HISTORY_ERROR_BYTES;
    while !error.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &error[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(n: u64) -> HistoryEntry {
        HistoryEntry {
            started_ms: n,
            finished_ms: n + 1,
            duration_ms: 1,
            result: "failed".into(),
            old_flag: None,
            flag: "v1".into(),
            error: None,
            holder: "h".into(),
        }
    }

    #[test]
    fn a_history_keeps_the_newest_runs_in_order() {
        let mut history = History::default();
        for n in 0..7 {
            history.push(run(n), 3);
        }
        let kept: Vec<u64> = history.runs.iter().map(|r| r.started_ms).collect();
        assert_eq!(kept, [4, 5, 6]);
    }

    #[test]
    fn a_history_stays_under_its_byte_bound_whatever_its_length() {
        let mut history = History::default();
        for n in 0..500 {
            let mut entry = run(n);
            entry.error = Some(error_tail(&"e".repeat(5000)));
            history.push(entry, 1000);
        }
        let bytes = serde_json::to_vec(&history).unwrap().len();
        assert!(bytes <= HISTORY_MAX_BYTES + 64, "{bytes}");
        assert_eq!(
            history.runs.last().unwrap().started_ms,
            499,
            "the newest kept"
        );
    }

    #[test]
    fn an_error_tail_keeps_the_end_on_a_character_boundary() {
        let long = format!("{}é cause", "x".repeat(HISTORY_ERROR_BYTES));
        let tail = error_tail(&long);
        assert!(tail.ends_with("é cause"));
        assert!(tail.len() <= HISTORY_ERROR_BYTES + "…".len());
        assert_eq!(error_tail("short"), "short");
    }
}
