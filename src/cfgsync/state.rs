//! cfgsync's serving state in the reserved `__cfgsync__` namespace: every kind, key and record
//! lives here. Everything a server knows is stored, so restarts lose nothing and several
//! servers on one store agree.
//!
//! | kind | key | record |
//! | --- | --- | --- |
//! | `registration` | node identifier | [`RegistrationRecord`] |
//! | `removed` | node identifier | [`Removal`] (an operator removed or replaced the node) |
//! | `bundle` | `current` | [`NodeArtifactsBundle`] |
//! | `policy` | `current` | [`Policy`] |
//! | `admission` | `current` | [`Ledger`], kept by the server's admission task |
//! | `report` | node identifier | [`Report`](super::report::Report): what the node applied |
//! | `fetched` | node identifier | [`Fetched`]: the newest epoch a server handed the node |
//! | `rollout` | `current` | [`RolloutRecord`]: the rollout under way (or the last one) |
//! | `previous` | `current` | [`Previous`]: the stable version kept during a rollout |
//! | `wave` | wave number | when that wave was reached (its mod revision is the epoch) |

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::rollout::VersionKind;
use crate::store::{self, CFGSYNC_NAMESPACE, Key, Revision};

/// Kind of registration records (key = node identifier).
pub const REGISTRATION: &str = "registration";
/// Kind of removal markers (key = the removed identifier).
pub const REMOVED: &str = "removed";
/// Kind of the installed bundle (key [`CURRENT`]).
pub const BUNDLE: &str = "bundle";
/// Kind of the installed policy (key [`CURRENT`]).
pub const POLICY: &str = "policy";
/// Kind of the admission ledger (key [`CURRENT`]).
pub const ADMISSION: &str = "admission";
/// The key of the one installed bundle, policy or ledger.
pub const CURRENT: &str = "current";

/// The key of a node's registration.
pub fn registration_key(identifier: &str) -> Key {
    Key::new(CFGSYNC_NAMESPACE, REGISTRATION, identifier)
}

/// The key of `identifier`'s removal marker.
pub fn removed_key(identifier: &str) -> Key {
    Key::new(CFGSYNC_NAMESPACE, REMOVED, identifier)
}

/// The key of the installed policy.
pub fn policy_key() -> Key {
    Key::new(CFGSYNC_NAMESPACE, POLICY, CURRENT)
}

/// The key of the installed bundle.
pub fn bundle_key() -> Key {
    Key::new(CFGSYNC_NAMESPACE, BUNDLE, CURRENT)
}

/// The key of the admission ledger.
pub fn ledger_key() -> Key {
    Key::new(CFGSYNC_NAMESPACE, ADMISSION, CURRENT)
}

/// Kind of the rollout record (key `current`).
pub const ROLLOUT: &str = "rollout";
/// Kind of the stable version kept during a rollout (key `current`): `{kind, version, value}`.
pub const PREVIOUS: &str = "previous";
/// Kind of the wave markers: key `k` (k ≥ 1) is written when wave `k` is reached, and its
/// mod revision is the epoch the wave's nodes get the target at.
pub const WAVE: &str = "wave";

/// The key of the rollout record.
pub fn rollout_key() -> Key {
    Key::new(CFGSYNC_NAMESPACE, ROLLOUT, CURRENT)
}

/// The key of the stable version kept during a rollout.
pub fn previous_key() -> Key {
    Key::new(CFGSYNC_NAMESPACE, PREVIOUS, CURRENT)
}

/// The key marking that wave `k` was reached.
pub fn wave_key(k: usize) -> Key {
    Key::new(CFGSYNC_NAMESPACE, WAVE, k.to_string())
}

/// Kind of report records (key = node identifier).
pub const REPORT: &str = "report";

/// The key of a node's report.
pub fn report_key(identifier: &str) -> Key {
    Key::new(CFGSYNC_NAMESPACE, REPORT, identifier)
}

/// Kind of fetched records (key = node identifier).
pub const FETCHED: &str = "fetched";

/// The key of a node's fetched record.
pub fn fetched_key(identifier: &str) -> Key {
    Key::new(CFGSYNC_NAMESPACE, FETCHED, identifier)
}

/// The newest epoch any server handed a node, so every server lists the same. Written for
/// nodes that do not report (seed and one-shot clients); a report says it for the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fetched {
    /// The epoch.
    pub epoch: Revision,
    /// When, Unix ms.
    pub fetched_ms: u64,
}

/// The key `kind`'s versions are installed at.
pub fn version_key(kind: VersionKind) -> Key {
    match kind {
        VersionKind::Policy => policy_key(),
        VersionKind::Bundle => bundle_key(),
    }
}

/// A stored registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationRecord {
    /// The node identifier.
    pub identifier: String,
    /// The IP the node registered with.
    pub ip: IpAddr,
    /// Its metadata (`null` when none).
    #[serde(default)]
    pub metadata: Value,
    /// First registration, Unix milliseconds.
    pub first_seen_ms: u64,
    /// Latest registration, Unix milliseconds.
    pub last_seen_ms: u64,
    /// The address the registration request came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// SHA-256 (hex) of the node's secret in strict mode; the secret itself is never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_sha256: Option<String>,
    /// Where the node sorts among the members, when it is not its identifier: a replacement
    /// takes the place (and so the `index`) of the node it replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// The node this one replaced (`bootsync nodes replace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

impl RegistrationRecord {
    /// The key members are ordered by: the slot it took over, else its identifier.
    pub fn order(&self) -> &str {
        self.slot.as_deref().unwrap_or(&self.identifier)
    }

    /// Whether templates would see a difference between this record and `other`.
    pub fn looks_the_same_as(&self, other: &RegistrationRecord) -> bool {
        self.ip == other.ip && self.metadata == other.metadata
    }
}

/// A removal marker: `/node` answers such a node 404 `missing_config` (409 `frozen` in a
/// frozen set) until it registers again; a replaced node cannot register again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    /// When, Unix ms.
    pub removed_ms: u64,
    /// The node that took its place, for a replacement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
}

impl Removal {
    /// Whether a stored marker says its node was replaced by another.
    pub fn says_replaced(marker: &Value) -> bool {
        marker.get("replaced_by").is_some_and(|by| !by.is_null())
    }
}

/// What the admission ledger counts. It is never deleted: a write that changes registrations
/// outside the admission task marks it [`stale`](Ledger::stale) with a put, so every guard on
/// it is a mod revision and a recount racing such a write fails its guard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Registrations stored.
    pub registrations: u64,
    /// Of those, members of the policy's named set (when it has one).
    pub named: u64,
    /// Bytes of their metadata as stored (compact JSON).
    pub metadata_bytes: u64,
    /// The policy revision `named` was counted under: another policy means another named
    /// set, so the ledger is counted afresh.
    #[serde(default)]
    pub policy_revision: Option<Revision>,
    /// Set by writes that bypass admission (node removal and replacement, `/v1`): the counts
    /// are unknown and must be taken afresh.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
}

impl Ledger {
    /// The marker a bypassing write puts: count afresh.
    pub fn stale() -> Value {
        serde_json::to_value(Ledger {
            stale: true,
            ..Ledger::default()
        })
        .expect("the ledger always serialises")
    }
}

/// Bytes of metadata as compact JSON (`null` and absent count as nothing).
pub fn metadata_bytes(metadata: Option<&Value>) -> u64 {
    match metadata {
        None | Some(Value::Null) => 0,
        Some(value) => store::encoded_len(value) as u64,
    }
}
