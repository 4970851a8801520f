//! The task that moves a rollout along: at every view change (a report, a new wave, an
//! operator's command) and when a pause or deadline runs out, it asks [`rollout::assess`] for
//! the next step and writes it guarded by the record's mod revision. Every server runs one;
//! when two write the same step, the guard lets one through and the other sees it in its view.

use super::rollout::{
    self, Command, CommandStep, Fleet, RolloutState, Stored, version_key, wave_health,
};
use super::service::Service;
use super::view::Serving;
use crate::api::rollout::{RolloutStatus, WaveStatus};
use crate::store::{self, Precondition, Revision};

/// Why an operator's command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// No rollout is under way, or the command does not apply in its state.
    #[error("{0}")]
    NotRunning(String),
    /// The record kept changing under the command.
    #[error("the rollout kept changing while the command was decided; try again")]
    KeptRacing,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl Service {
    /// One look at the rollout in `serving`: writes the next step if there is one, and says
    /// when time alone would change the answer.
    pub(super) async fn steer_once(&self, serving: &Serving) -> Option<u64> {
        let stored = serving.record.as_ref()?;
        let split = serving.split.as_ref()?;
        if stored.record.state != RolloutState::Running {
            return None;
        }
        let members: Vec<&str> = split.members.iter().map(|m| m.as_ref()).collect();
        let lookup = |id: &str| serving.report(id);
        let assessment = rollout::assess(
            stored,
            &Fleet {
                members: &members,
                settled: split.settled,
                report: &lookup,
                now_ms: crate::clock::now_ms(),
            },
        );
        if let Some(step) = assessment.step {
            let batch = step
                .batch(stored.mod_revision, serving.previous.as_deref())
                .check(
                    version_key(stored.record.kind),
                    Precondition::ModRevision(stored.target()),
                );
            match self.store.apply(batch).await {
                Ok(revision) => log_step(&step, revision),
                // Another server wrote first, or an install came: the view will show it.
                Err(store::Error::Conflict { .. }) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "could not store the rollout's next step; trying again");
                    return Some(crate::clock::now_ms() + 1000);
                }
            }
        }
        assessment.wake_at_ms
    }

    /// How the rollout stands in `serving` (the running one, or the last one while its
    /// version is installed).
    pub fn rollout_status(&self, serving: &Serving) -> Option<RolloutStatus> {
        let stored = serving.record.as_ref()?;
        let kind = stored.record.kind;
        if !stored.governs(serving.installed(kind))
            && stored.record.state != RolloutState::RolledBack
        {
            return None;
        }
        let members: Vec<&str> = serving
            .split
            .as_ref()
            .map(|split| split.members.iter().map(|m| m.as_ref()).collect())
            .unwrap_or_default();
        let lookup = |id: &str| serving.report(id);
        let fleet = Fleet {
            members: &members,
            settled: serving.split.as_ref().map_or(members.len(), |s| s.settled),
            report: &lookup,
            now_ms: crate::clock::now_ms(),
        };
        let health = wave_health(&stored.record, stored.target(), &fleet);
        let record = &stored.record;
        let mut failures = record.failures.clone();
        for failure in health.failed {
            if !failures.iter().any(|f| f.identifier == failure.identifier) {
                failures.push(failure);
            }
        }
        Some(RolloutStatus {
            kind,
            state: record.state,
            stable: record.stable,
            target: stored.target(),
            wave: record.wave + 1,
            waves: record
                .plan
                .waves
                .iter()
                .enumerate()
                .map(|(k, size)| WaveStatus {
                    size: serde_json::to_value(size).unwrap_or_default(),
                    cutoff: fleet.cutoff(&record.plan, k),
                    reached: k <= record.wave,
                })
                .collect(),
            members: members.len(),
            ok: health.ok,
            pending: health.pending,
            silent: health.silent,
            failures,
            reason: record.reason.clone(),
            started_ms: record.started_ms,
            wave_started_ms: record.wave_started_ms,
            updated_ms: record.updated_ms,
        })
    }

    /// Carries out an operator's command on the rollout under way, read afresh from the
    /// store; returns the revision it was written at.
    pub async fn rollout_command(&self, command: Command) -> Result<Revision, RolloutError> {
        for _ in 0..8 {
            let entry = self.store.get(&rollout::rollout_key()).await?;
            let Some((stored, installed)) = (match entry {
                Some(entry) => match serde_json::from_value(entry.value) {
                    Ok(record) => {
                        let stored = Stored {
                            record,
                            mod_revision: entry.mod_revision,
                        };
                        let key = version_key(stored.record.kind);
                        let installed = self.store.get(&key).await?.map(|e| e.mod_revision);
                        Some((stored, installed))
                    }
                    Err(_) => None,
                },
                None => None,
            }) else {
                return Err(RolloutError::NotRunning(
                    "no rollout is running: install a policy or bundle with a `rollout:` section to start one".into(),
                ));
            };
            if !stored.is_active(installed) {
                return Err(RolloutError::NotRunning(format!(
                    "no rollout is running: the last one, of version {}, is {}",
                    stored.target(),
                    rollout::state_name(stored.record.state)
                )));
            }
            let step = command
                .step(&stored, crate::clock::now_ms())
                .map_err(RolloutError::NotRunning)?;
            let previous = match &step {
                rollout::Step::Rollback(_) => self
                    .store
                    .get(&rollout::previous_key())
                    .await?
                    .and_then(|e| serde_json::from_value(e.value).ok()),
                _ => None,
            };
            let batch = step.batch(stored.mod_revision, previous.as_ref()).check(
                version_key(stored.record.kind),
                Precondition::ModRevision(stored.target()),
            );
            match self.store.apply(batch).await {
                Ok(revision) => {
                    tracing::info!(
                        command = command.name(),
                        revision,
                        "rollout command applied"
                    );
                    log_step(&step, revision);
                    return Ok(revision);
                }
                Err(store::Error::Conflict { .. }) => continue,
                Err(err) => return Err(err.into()),
            }
        }
        Err(RolloutError::KeptRacing)
    }
}

fn log_step(step: &rollout::Step, revision: Revision) {
    match step {
        rollout::Step::Advance { record, .. } => {
            tracing::info!(wave = record.wave + 1, state = ?record.state, revision, "rollout: wave reached");
        }
        rollout::Step::Rollback(record) => {
            tracing::warn!(
                reason = record.reason.as_deref().unwrap_or(""),
                revision,
                "rollout: rolled back"
            );
        }
        rollout::Step::Update(record) => match record.state {
            RolloutState::Halted => {
                tracing::warn!(
                    reason = record.reason.as_deref().unwrap_or(""),
                    revision,
                    "rollout: halted"
                );
            }
            RolloutState::Complete => tracing::info!(revision, "rollout: complete"),
            _ => tracing::debug!(revision, "rollout: record updated"),
        },
    }
}
