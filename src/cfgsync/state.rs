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
//! | `rollout` | `current` | [`RolloutRecord`]: the rollout under way (or the last one) |
//! | `previous` | `current` | [`Previous`]: the stable version kept during a rollout |
//! | `wave` | wave number | when that wave was reached (its mod revision is the epoch) |

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bundle::NodeArtifactsBundle;
use super::policy::Policy;
use super::rollout::{
    self, Previous, RolloutPlan, RolloutRecord, Stored, VersionKind, previous_key, rollout_key,
};
use crate::api::cfgsync::MAX_METADATA_BYTES;
use crate::store::{
    self, Batch, CFGSYNC_NAMESPACE, Key, Op, Precondition, Revision, Store, WatchFilter,
};

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

/// What an install did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    /// The version installed: the revision it was stored at (or the stored one, unchanged).
    pub version: Revision,
    /// Whether it started a rollout (its `rollout:` section, and a version to roll from).
    pub rollout: bool,
    /// Whether the same content was installed already, so nothing was written.
    pub unchanged: bool,
}

/// Why an install did not happen.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A rollout is under way; installing another version would abandon it.
    #[error(
        "a rollout of {kind} version {target} is {state} at wave {wave} of {waves}; wait for it to complete, end it with `bootsync rollout promote` or `rollback`, or force the install"
    )]
    RolloutInProgress {
        /// What it rolls out.
        kind: &'static str,
        /// Its target version.
        target: Revision,
        /// Its state's name.
        state: &'static str,
        /// The wave reached (1-based).
        wave: usize,
        /// Its waves.
        waves: usize,
    },
    /// The installed version kept changing under the install.
    #[error("the installed {0} kept changing while this install was decided; try again")]
    KeptRacing(&'static str),
    /// The rollout of this version halted or was rolled back.
    #[error("the rollout of {kind} version {version} was {state}: {reason}")]
    RolloutFailed {
        /// What was rolled out.
        kind: &'static str,
        /// The version.
        version: Revision,
        /// `halted` or `rolled back`.
        state: &'static str,
        /// Why.
        reason: String,
    },
    /// Another install replaced this version before its rollout ended.
    #[error("{0} version {1} was replaced by another install before its rollout ended")]
    Superseded(&'static str, Revision),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// Installs a bundle, replacing any previous one as a whole (in waves when it has a
/// `rollout:` section; see [`install`]).
pub async fn install_bundle(
    store: &dyn Store,
    bundle: &NodeArtifactsBundle,
    force: bool,
) -> Result<Installed, InstallError> {
    let value = serde_json::to_value(bundle)
        .map_err(|e| store::Error::backend("encoding the bundle", e))?;
    install(
        store,
        VersionKind::Bundle,
        value,
        bundle.rollout.as_ref(),
        force,
    )
    .await
}

/// Installs a registration policy, replacing any previous one (in waves when it has a
/// `rollout:` section; see [`install`]).
pub async fn install_policy(
    store: &dyn Store,
    policy: &Policy,
    force: bool,
) -> Result<Installed, InstallError> {
    let value = serde_json::to_value(policy)
        .map_err(|e| store::Error::backend("encoding the policy", e))?;
    install(
        store,
        VersionKind::Policy,
        value,
        policy.rollout.as_ref(),
        force,
    )
    .await
}

/// SHA-256 (hex) of a value's stored JSON.
pub fn digest(value: &Value) -> String {
    use sha2::Digest as _;
    let bytes = serde_json::to_vec(value).expect("a JSON value serialises");
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Installs `value` as the `kind`'s version, in one batch guarded by what it read.
///
/// - The same content as installed writes nothing (a rollout of it goes on).
/// - While a rollout is under way, another version is refused unless `force`: a forced
///   install ends that rollout (a new rollout keeps its stable version, the only one known
///   good; without a plan, the new version goes to every node).
/// - With a `plan` and a version to roll from, the batch also keeps the previous version and
///   writes the rollout record, so the version and its rollout are one commit.
pub async fn install(
    store: &dyn Store,
    kind: VersionKind,
    value: Value,
    plan: Option<&RolloutPlan>,
    force: bool,
) -> Result<Installed, InstallError> {
    for _ in 0..8 {
        let current = store.get(&kind.key()).await?;
        if let Some(entry) = &current
            && entry.value == value
        {
            return Ok(Installed {
                version: entry.mod_revision,
                rollout: false,
                unchanged: true,
            });
        }
        let rollout = store.get(&rollout_key()).await?;
        let stored = rollout.as_ref().and_then(|entry| {
            let record = serde_json::from_value(entry.value.clone()).ok()?;
            Some(Stored {
                record,
                mod_revision: entry.mod_revision,
            })
        });
        let mut active = None;
        if let Some(stored) = stored {
            let installed = if stored.record.kind == kind {
                current.as_ref().map(|e| e.mod_revision)
            } else {
                store
                    .get(&stored.record.kind.key())
                    .await?
                    .map(|e| e.mod_revision)
            };
            if stored.is_active(installed) {
                if !force {
                    return Err(InstallError::RolloutInProgress {
                        kind: stored.record.kind.name(),
                        target: stored.target(),
                        state: rollout::state_name(stored.record.state),
                        wave: stored.record.wave + 1,
                        waves: stored.record.plan.waves.len(),
                    });
                }
                active = Some(stored);
            }
        }
        let guard = |entry: &Option<store::Entry>| {
            entry.as_ref().map_or(Precondition::Absent, |e| {
                Precondition::ModRevision(e.mod_revision)
            })
        };
        let mut batch = Batch::new()
            .check(kind.key(), guard(&current))
            .check(rollout_key(), guard(&rollout))
            .put(kind.key(), value.clone());
        batch = rollout::clear_waves(batch);
        let previous = match (&active, &current) {
            // Forced over a rollout of this kind: roll from its stable version.
            (Some(active), _) if active.record.kind == kind => {
                let kept = store.get(&previous_key()).await?;
                batch = batch.check(previous_key(), guard(&kept));
                kept.and_then(|e| serde_json::from_value::<Previous>(e.value).ok())
            }
            (_, Some(entry)) => Some(Previous {
                kind,
                version: entry.mod_revision,
                value: entry.value.clone(),
            }),
            (_, None) => None,
        };
        let starts = match (plan, previous) {
            (Some(plan), Some(previous)) => {
                let now = crate::clock::now_ms();
                let record =
                    RolloutRecord::new(kind, previous.version, digest(&value), plan.clone(), now);
                batch = batch
                    .put(
                        previous_key(),
                        serde_json::to_value(&previous).expect("a version serialises"),
                    )
                    .put(
                        rollout_key(),
                        serde_json::to_value(&record).expect("a record serialises"),
                    );
                true
            }
            _ => {
                if rollout.is_some() && (active.is_some() || stored_kind(&rollout) == Some(kind)) {
                    batch = batch.delete(rollout_key()).delete(previous_key());
                }
                false
            }
        };
        match store.apply(batch).await {
            Ok(version) => {
                return Ok(Installed {
                    version,
                    rollout: starts,
                    unchanged: false,
                });
            }
            Err(store::Error::Conflict { .. }) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Err(InstallError::KeptRacing(kind.name()))
}

/// Waits until the rollout of `version` ends: `Ok` once it completed (or when `version` had
/// no rollout), else why it did not — halted, rolled back, or ended by another install.
pub async fn wait_for_rollout(
    store: &dyn Store,
    kind: VersionKind,
    version: Revision,
) -> Result<(), InstallError> {
    let mut backoff = crate::backoff::Backoff::new(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(5),
    );
    loop {
        let revision = store.revision().await?;
        let installed = store.get(&kind.key()).await?.map(|e| e.mod_revision);
        let stored = store.get(&rollout_key()).await?.and_then(|entry| {
            Some(Stored {
                record: serde_json::from_value(entry.value).ok()?,
                mod_revision: entry.mod_revision,
            })
        });
        let ours = stored.filter(|s| s.target() == version && s.record.kind == kind);
        match ours {
            None if installed == Some(version) => return Ok(()),
            None => return Err(InstallError::Superseded(kind.name(), version)),
            Some(s) if s.record.state == rollout::RolloutState::Complete => return Ok(()),
            Some(s)
                if matches!(
                    s.record.state,
                    rollout::RolloutState::Halted | rollout::RolloutState::RolledBack
                ) =>
            {
                return Err(InstallError::RolloutFailed {
                    kind: kind.name(),
                    version,
                    state: rollout::state_name(s.record.state),
                    reason: s.record.reason.unwrap_or_default(),
                });
            }
            Some(_) => {}
        }
        // Woken by the next change to `__cfgsync__`, or after a backoff if the watch fails.
        match store
            .watch(
                revision + 1,
                WatchFilter::Namespace(CFGSYNC_NAMESPACE.into()),
            )
            .await
        {
            Ok(mut watch) => {
                let _ = watch.next().await;
                backoff.reset();
            }
            Err(_) => tokio::time::sleep(backoff.fail()).await,
        }
    }
}

/// The kind a stored rollout record rolls out, if it decodes.
fn stored_kind(entry: &Option<store::Entry>) -> Option<VersionKind> {
    let value = &entry.as_ref()?.value;
    serde_json::from_value(value.get("kind")?.clone()).ok()
}

/// Checks a batch written straight into the store (through `/v1`) as the server would check
/// the same things loaded from files, and guards what it bypasses: a bundle or policy is
/// validated whole, a registration must decode, name its own key and keep its metadata within
/// the limit, and the ledger is the server's alone. A batch that touches registrations also
/// marks the ledger stale in the same commit, so caps keep holding. Every problem is listed.
pub fn guard_direct_write(batch: Batch) -> Result<Batch, Vec<String>> {
    let mut problems = Vec::new();
    let mut touches_registrations = false;
    for op in &batch.ops {
        let key = op.key();
        if key.namespace != CFGSYNC_NAMESPACE {
            continue;
        }
        if key.kind == ADMISSION {
            problems.push(format!(
                "{key}: the admission ledger is kept by the server; write the registrations and it is counted afresh"
            ));
            continue;
        }
        if [rollout::ROLLOUT, rollout::PREVIOUS, rollout::WAVE].contains(&key.kind.as_str()) {
            problems.push(format!(
                "{key}: the rollout's state is kept by the server; use `/v1/rollout` or `bootsync rollout`"
            ));
            continue;
        }
        if key.kind == super::report::REPORT {
            problems.push(format!(
                "{key}: reports are written by the nodes themselves (`POST /report`)"
            ));
            continue;
        }
        touches_registrations |= key.kind == REGISTRATION;
        if let Op::Put { key, value } = op
            && let Err(mut found) = check_value(key, value)
        {
            problems.append(&mut found);
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(if touches_registrations {
        batch.put(ledger_key(), Ledger::stale())
    } else {
        batch
    })
}

/// Checks one value bound for `__cfgsync__` (see [`guard_direct_write`]).
fn check_value(key: &Key, value: &Value) -> Result<(), Vec<String>> {
    fn decode<T: serde::de::DeserializeOwned>(key: &Key, value: &Value) -> Result<T, Vec<String>> {
        serde_json::from_value(value.clone()).map_err(|err| vec![format!("{key}: {err}")])
    }
    match key.kind.as_str() {
        BUNDLE => decode::<NodeArtifactsBundle>(key, value)?.validate(),
        POLICY => decode::<Policy>(key, value)?.compile().map(|_| ()),
        REGISTRATION => {
            let record: RegistrationRecord = decode(key, value)?;
            let mut problems = Vec::new();
            if record.identifier != key.key {
                problems.push(format!(
                    "{key}: the record names {:?}, not its own key",
                    record.identifier
                ));
            }
            let size = metadata_bytes(Some(&record.metadata));
            if size > MAX_METADATA_BYTES as u64 {
                problems.push(format!(
                    "{key}: metadata is {size} bytes, over the limit of {MAX_METADATA_BYTES}"
                ));
            }
            if problems.is_empty() {
                Ok(())
            } else {
                Err(problems)
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn record(id: &str, metadata: Value) -> Value {
        json!({"identifier": id, "ip": "10.0.0.1", "metadata": metadata,
               "first_seen_ms": 1, "last_seen_ms": 1})
    }

    #[test]
    fn a_direct_registration_write_marks_the_ledger_stale_in_the_same_batch() {
        let batch = Batch::new().put(registration_key("a"), record("a", json!({})));
        let guarded = guard_direct_write(batch).unwrap();
        let ledger = guarded.ops.iter().find(|op| op.key() == &ledger_key());
        assert!(
            matches!(ledger, Some(Op::Put { value, .. }) if value["stale"] == true),
            "{guarded:?}"
        );
        let unrelated = Batch::new().put(Key::new("prod", "cfg", "a"), json!(1));
        assert_eq!(guard_direct_write(unrelated).unwrap().ops.len(), 1);
    }

    #[test]
    fn the_ledger_cannot_be_written_or_deleted_directly() {
        for batch in [
            Batch::new().put(ledger_key(), json!({"registrations": 0})),
            Batch::new().delete(ledger_key()),
        ] {
            let problems = guard_direct_write(batch).unwrap_err();
            assert!(problems[0].contains("kept by the server"), "{problems:?}");
        }
    }

    #[test]
    fn every_problem_of_a_direct_write_is_listed() {
        let big = json!({"blob": "x".repeat(MAX_METADATA_BYTES)});
        let batch = Batch::new()
            .put(registration_key("a"), record("b", json!({})))
            .put(registration_key("c"), record("c", big))
            .put(policy_key(), json!({"expect_nodes": 0}));
        let problems = guard_direct_write(batch).unwrap_err();
        for expected in ["names \"b\"", "over the limit", "at least 1"] {
            let listed = problems.iter().any(|p| p.contains(expected));
            assert!(listed, "{expected}: {problems:?}");
        }
    }
}
