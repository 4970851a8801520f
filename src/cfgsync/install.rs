//! Installing a version (a policy or bundle) on a running fleet: one batch that refuses to
//! abandon a rollout under way, and starts one when the new version has a `rollout:` section.

use serde_json::Value;

use super::bundle::NodeArtifactsBundle;
use super::policy::Policy;
use super::rollout::{self, Previous, RolloutPlan, RolloutRecord, Stored, VersionKind};
use super::state::{previous_key, rollout_key, version_key};
use crate::store::{self, Batch, CFGSYNC_NAMESPACE, Precondition, Revision, Store, WatchFilter};

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
        let current = store.get(&version_key(kind)).await?;
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
                    .get(&version_key(stored.record.kind))
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
            .check(version_key(kind), guard(&current))
            .check(rollout_key(), guard(&rollout))
            .put(version_key(kind), value.clone());
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

/// What an installer does after an install: says what happened and, when asked, waits for
/// the version's rollout to end (see [`wait_for_rollout`]).
pub async fn settle(
    store: &dyn Store,
    kind: VersionKind,
    installed: Installed,
    wait: bool,
) -> Result<(), InstallError> {
    tracing::info!(
        kind = kind.name(),
        version = installed.version,
        rollout = installed.rollout,
        unchanged = installed.unchanged,
        "installed"
    );
    if wait {
        wait_for_rollout(store, kind, installed.version).await?;
    }
    Ok(())
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
        let installed = store.get(&version_key(kind)).await?.map(|e| e.mod_revision);
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
        // Looked at again when the rollout or the installed version changes (reports, which
        // come by the thousand, do not count), or after a backoff if the watch fails.
        let watched = [rollout_key(), version_key(kind)];
        match store
            .watch(
                revision + 1,
                WatchFilter::Namespace(CFGSYNC_NAMESPACE.into()),
            )
            .await
        {
            Ok(mut watch) => {
                while let Some(Ok(event)) = watch.next().await {
                    if event.changes.iter().any(|c| watched.contains(&c.key)) {
                        break;
                    }
                }
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
