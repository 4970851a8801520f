//! Progressive rollout: a new policy or bundle reaches the members wave by wave, and a wave
//! that fails stops it (or rolls it back) before the rest of the fleet sees the change.
//!
//! What a node gets is `render(version, membership)`. A *version* is an installed policy or
//! bundle, named by the store revision it was installed at. During a rollout a node gets the
//! *target* version once its wave has been reached and the *stable* one before, both against
//! the current membership. Waves are cumulative slices of the members in slot order, so every
//! server and every restart agrees on them.
//!
//! The rollout's state is in the store (kinds [`ROLLOUT`], [`PREVIOUS`], [`WAVE`] of
//! `__cfgsync__`); every change to it is a batch guarded by the record's mod revision, so any
//! server may advance it and none does so twice. Everything here is pure: the plan, the record,
//! and [`assess`], which says what the next step is from the reports seen; the serving task
//! that writes the steps is in [`super::service`].

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use super::plan::{MAX_WAVES, OnFailure, RolloutPlan, WaveSize};
pub use super::state::{PREVIOUS, ROLLOUT, WAVE, previous_key, rollout_key, version_key, wave_key};
pub use crate::api::rollout::{Command, Failure, Report, RolloutState, VersionKind, state_name};
use crate::store::{Batch, Precondition, Revision};

/// The rollout record (`__cfgsync__/rollout/current`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutRecord {
    /// What is rolled out.
    pub kind: VersionKind,
    /// The version nodes keep until their wave is reached.
    pub stable: Revision,
    /// The version rolled out. Absent in the record the install writes (which is committed
    /// with the version, so the record's own mod revision is the target then); every later
    /// write fills it in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Revision>,
    /// SHA-256 of the target's stored JSON, so an installer can tell its own rollout.
    pub digest: String,
    /// The plan, from the target's `rollout:` section.
    #[schema(value_type = Object)]
    pub plan: RolloutPlan,
    /// The last wave reached (0: the first).
    pub wave: usize,
    /// Where it is.
    pub state: RolloutState,
    /// Unix ms it started, the current wave started, and of the last change.
    pub started_ms: u64,
    /// When the current wave started (Unix ms).
    pub wave_started_ms: u64,
    /// When the current wave became healthy (Unix ms): its pause runs from then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_since_ms: Option<u64>,
    /// Nodes that failed on the target.
    #[serde(default)]
    pub failures: Vec<Failure>,
    /// Why it halted, was rolled back or was forced on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix ms of the last change.
    pub updated_ms: u64,
}

impl RolloutRecord {
    /// A new rollout of a version with `plan`, from `stable`.
    pub fn new(
        kind: VersionKind,
        stable: Revision,
        digest: String,
        plan: RolloutPlan,
        now_ms: u64,
    ) -> Self {
        Self {
            kind,
            stable,
            target: None,
            digest,
            plan,
            wave: 0,
            state: RolloutState::Running,
            started_ms: now_ms,
            wave_started_ms: now_ms,
            healthy_since_ms: None,
            failures: Vec::new(),
            reason: None,
            updated_ms: now_ms,
        }
    }

    /// The target version, given the record's own mod revision.
    pub fn target_at(&self, mod_revision: Revision) -> Revision {
        self.target.unwrap_or(mod_revision)
    }
}

/// A stored rollout record with its mod revision (the guard of every change to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The record.
    pub record: RolloutRecord,
    /// Its mod revision.
    pub mod_revision: Revision,
}

impl Stored {
    /// The target version.
    pub fn target(&self) -> Revision {
        self.record.target_at(self.mod_revision)
    }

    /// Whether the record governs what is served now: its target is the installed version.
    pub fn governs(&self, installed: Option<Revision>) -> bool {
        installed == Some(self.target())
            && (self.record.state.is_active() || self.record.state == RolloutState::Complete)
    }

    /// Whether it is under way for the installed version.
    pub fn is_active(&self, installed: Option<Revision>) -> bool {
        self.governs(installed) && self.record.state.is_active()
    }
}

/// The stable version kept during a rollout (`__cfgsync__/previous/current`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Previous {
    /// Policy or bundle.
    pub kind: VersionKind,
    /// Its version (the revision it was installed at).
    pub version: Revision,
    /// Its stored JSON.
    pub value: Value,
}

/// A write to the rollout's state.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Store the record as it is now.
    Update(RolloutRecord),
    /// Store the record, and mark waves `from..=to` reached (their nodes get the target).
    Advance {
        /// The record after.
        record: RolloutRecord,
        /// The first wave newly reached.
        from: usize,
    },
    /// Give every node the stable version back.
    Rollback(RolloutRecord),
}

impl Step {
    /// The batch that makes the step, guarded by the record's mod revision. A rollback puts
    /// `previous`'s value back as the installed version, so the store says what is served.
    pub fn batch(&self, guard: Revision, previous: Option<&Previous>) -> Batch {
        let batch = Batch::new().check(rollout_key(), Precondition::ModRevision(guard));
        let encode =
            |record: &RolloutRecord| serde_json::to_value(record).expect("a record serialises");
        match self {
            Self::Update(record) => batch.put(rollout_key(), encode(record)),
            Self::Advance { record, from } => (*from..=record.wave)
                .fold(batch, |batch, k| {
                    batch.put(
                        wave_key(k),
                        serde_json::json!({"started_ms": record.updated_ms}),
                    )
                })
                .put(rollout_key(), encode(record)),
            Self::Rollback(record) => {
                let mut batch = batch.put(rollout_key(), encode(record));
                if let Some(previous) = previous {
                    batch = batch
                        .put(version_key(previous.kind), previous.value.clone())
                        .delete(previous_key());
                }
                clear_waves(batch)
            }
        }
    }
}

/// Deletes every wave marker (a new version starts without any).
pub fn clear_waves(batch: Batch) -> Batch {
    (1..MAX_WAVES).fold(batch, |batch, k| batch.delete(wave_key(k)))
}

/// What [`assess`] sees of the fleet.
pub struct Fleet<'a> {
    /// The members in wave order: those registered before the rollout started in slot order,
    /// then those that joined since, first come first.
    pub members: &'a [&'a str],
    /// How many of `members` registered before the rollout started. Waves are cut from them,
    /// so a node that joins never pushes one out of a wave it reached; the last wave covers
    /// every member.
    pub settled: usize,
    /// A member's latest report.
    pub report: &'a dyn Fn(&str) -> Option<&'a Report>,
    /// Unix ms now.
    pub now_ms: u64,
}

/// What the rollout should do next, and when to look again if nothing changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    /// The write to make, if any.
    pub step: Option<Step>,
    /// Unix ms at which time alone changes the answer (a pause ends, a deadline passes).
    pub wake_at_ms: Option<u64>,
}

/// How the current wave stands.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WaveHealth {
    /// Members of the waves reached.
    pub reached: usize,
    /// Of those, reported ok on the target.
    pub ok: usize,
    /// Watching members not yet ok on the target.
    pub pending: Vec<String>,
    /// Members that never reported (seed or one-shot clients): they do not hold a wave.
    pub silent: usize,
    /// Members that reported a failure on the target.
    pub failed: Vec<Failure>,
}

impl Fleet<'_> {
    /// How many members waves `0..=wave` of `plan` cover.
    pub fn cutoff(&self, plan: &RolloutPlan, wave: usize) -> usize {
        plan.cutoff_of(wave, self.settled, self.members.len())
    }
}

/// How the waves reached so far stand, from the reports.
pub fn wave_health(record: &RolloutRecord, target: Revision, fleet: &Fleet<'_>) -> WaveHealth {
    let reached = fleet.cutoff(&record.plan, record.wave);
    let mut health = WaveHealth {
        reached,
        ..WaveHealth::default()
    };
    for identifier in &fleet.members[..reached] {
        match (fleet.report)(identifier).map(|r| &r.applied) {
            None => health.silent += 1,
            Some(report) if report.version == Some(target) && report.is_ok() => health.ok += 1,
            Some(report) if report.version == Some(target) => health.failed.push(Failure {
                identifier: identifier.to_string(),
                epoch: report.epoch,
                exit_status: report.exit_status,
                reason: report.describe_failure(),
            }),
            Some(_) => health.pending.push(identifier.to_string()),
        }
    }
    health
}

/// The next step of a rollout from the reports: record new failures, stop it, or start the
/// next wave once the current one is healthy and its pause has passed.
pub fn assess(stored: &Stored, fleet: &Fleet<'_>) -> Assessment {
    let record = &stored.record;
    let idle = Assessment {
        step: None,
        wake_at_ms: None,
    };
    if record.state != RolloutState::Running {
        return idle;
    }
    let target = stored.target();
    let now = fleet.now_ms;
    let health = wave_health(record, target, fleet);
    let mut next = record.clone();
    next.target = Some(target);
    next.updated_ms = now;
    // Failures are kept as they are found, so `status` names them while the wave goes on.
    let mut found_new = false;
    for failure in &health.failed {
        if !next
            .failures
            .iter()
            .any(|f| f.identifier == failure.identifier)
        {
            next.failures.push(failure.clone());
            found_new = true;
        }
    }
    let deadline = record
        .wave_started_ms
        .saturating_add(record.plan.progress_deadline().as_millis() as u64);
    let stop = |mut next: RolloutRecord, reason: String| {
        next.reason = Some(reason);
        Some(match record.plan.on_failure {
            OnFailure::Halt => {
                next.state = RolloutState::Halted;
                Step::Update(next)
            }
            OnFailure::Rollback => {
                next.state = RolloutState::RolledBack;
                Step::Rollback(next)
            }
        })
    };
    if next.failures.len() > record.plan.max_failures as usize {
        let names: Vec<String> = next
            .failures
            .iter()
            .map(|f| format!("{} ({})", f.identifier, f.reason))
            .collect();
        let reason = format!(
            "{} node(s) failed on version {target}, more than max_failures {}: {}",
            next.failures.len(),
            record.plan.max_failures,
            names.join("; ")
        );
        return Assessment {
            step: stop(next, reason),
            wake_at_ms: None,
        };
    }
    if !health.pending.is_empty() {
        if now >= deadline {
            let shown: Vec<&str> = health.pending.iter().take(10).map(String::as_str).collect();
            let more = health.pending.len().saturating_sub(shown.len());
            let reason = format!(
                "wave {} was not healthy within the progress deadline of {}: {} node(s) did not report ok on version {target}: {}{}",
                record.wave + 1,
                humanize(record.plan.progress_deadline()),
                health.pending.len(),
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            );
            for identifier in &health.pending {
                next.failures.push(Failure {
                    identifier: identifier.clone(),
                    epoch: 0,
                    exit_status: None,
                    reason: "did not report ok on the new version by the progress deadline".into(),
                });
            }
            return Assessment {
                step: stop(next, reason),
                wake_at_ms: None,
            };
        }
        return Assessment {
            step: found_new.then_some(Step::Update(next)),
            wake_at_ms: Some(deadline),
        };
    }
    // Healthy: every watching member of the waves reached is ok on the target.
    let pause = record.plan.pause().as_millis() as u64;
    let healthy_since = record.healthy_since_ms.unwrap_or(now);
    if now < healthy_since.saturating_add(pause) {
        let changed = found_new || record.healthy_since_ms.is_none();
        next.healthy_since_ms = Some(healthy_since);
        return Assessment {
            step: changed.then_some(Step::Update(next)),
            wake_at_ms: Some(healthy_since.saturating_add(pause)),
        };
    }
    if record.wave >= record.plan.last_wave() {
        next.state = RolloutState::Complete;
        next.healthy_since_ms = None;
        return Assessment {
            step: Some(Step::Update(next)),
            wake_at_ms: None,
        };
    }
    // The next wave: skip waves that add no member (a small fleet), so none waits for itself.
    let mut wave = record.wave + 1;
    while wave < record.plan.last_wave()
        && fleet.cutoff(&record.plan, wave) <= fleet.cutoff(&record.plan, record.wave)
    {
        wave += 1;
    }
    next.wave = wave;
    next.wave_started_ms = now;
    next.healthy_since_ms = None;
    Assessment {
        step: Some(Step::Advance {
            record: next,
            from: record.wave + 1,
        }),
        wake_at_ms: None,
    }
}

/// What a command does to a rollout.
pub trait CommandStep {
    /// The step the command makes of `stored`, or why it does not apply.
    fn step(self, stored: &Stored, now_ms: u64) -> Result<Step, String>;
}

impl CommandStep for Command {
    fn step(self, stored: &Stored, now_ms: u64) -> Result<Step, String> {
        let record = &stored.record;
        let state = record.state;
        let mut next = record.clone();
        next.target = Some(stored.target());
        next.updated_ms = now_ms;
        let refuse = |what: &str| {
            Err(format!(
                "the rollout of version {} is {}; {what}",
                stored.target(),
                state_name(state)
            ))
        };
        match self {
            Self::Pause if state == RolloutState::Running => {
                next.state = RolloutState::Paused;
                Ok(Step::Update(next))
            }
            Self::Pause => refuse("only a running rollout can be paused"),
            Self::Resume if matches!(state, RolloutState::Paused | RolloutState::Halted) => {
                next.state = RolloutState::Running;
                next.wave_started_ms = now_ms;
                next.healthy_since_ms = None;
                if state == RolloutState::Halted {
                    next.failures.clear();
                    next.reason = None;
                }
                Ok(Step::Update(next))
            }
            Self::Resume => refuse("only a paused or halted rollout can be resumed"),
            Self::Promote if state.is_active() => {
                let from = record.wave + 1;
                next.wave = record.plan.last_wave();
                next.state = RolloutState::Complete;
                next.reason = Some("promoted by an operator".into());
                Ok(if from <= next.wave {
                    Step::Advance { record: next, from }
                } else {
                    Step::Update(next)
                })
            }
            Self::Rollback if state.is_active() => {
                next.state = RolloutState::RolledBack;
                next.reason = Some("rolled back by an operator".into());
                Ok(Step::Rollback(next))
            }
            Self::Promote | Self::Rollback => refuse("there is nothing to change"),
        }
    }
}

fn humanize(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs >= 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else if duration.subsec_millis() == 0 {
        format!("{secs}s")
    } else {
        format!("{}ms", duration.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn plan(waves: serde_json::Value) -> RolloutPlan {
        serde_json::from_value(serde_json::json!({"waves": waves})).unwrap()
    }

    fn report(version: Revision, ok: bool) -> Report {
        Report {
            applied: crate::api::rollout::Applied {
                epoch: version,
                version: Some(version),
                result: if ok {
                    super::super::report::Outcome::Ok
                } else {
                    super::super::report::Outcome::Failed
                },
                exit_status: (!ok).then_some(3),
                stderr_tail: (!ok).then(|| "bad config".into()),
                duration_ms: 1,
            },
            reported_ms: 1,
        }
    }

    struct Scene {
        names: Vec<String>,
        reports: HashMap<String, Report>,
    }

    impl Scene {
        fn new(n: usize) -> Self {
            Self {
                names: (0..n).map(|i| format!("n{i:02}")).collect(),
                reports: HashMap::new(),
            }
        }

        fn assess(&self, stored: &Stored, now_ms: u64) -> Assessment {
            let members: Vec<&str> = self.names.iter().map(String::as_str).collect();
            let lookup = |id: &str| self.reports.get(id);
            assess(
                stored,
                &Fleet {
                    members: &members,
                    settled: members.len(),
                    report: &lookup,
                    now_ms,
                },
            )
        }
    }

    fn stored(plan: RolloutPlan) -> Stored {
        Stored {
            record: RolloutRecord::new(VersionKind::Policy, 5, "d".into(), plan, 1_000),
            mod_revision: 10,
        }
    }

    #[test]
    fn wave_sizes_are_cumulative_and_round_up() {
        let p = plan(serde_json::json!([1, "25%", "100%"]));
        assert!(p.problems().is_empty(), "{:?}", p.problems());
        assert_eq!(
            (0..3).map(|w| p.cutoff(w, 20)).collect::<Vec<_>>(),
            [1, 5, 20]
        );
        assert_eq!(p.cutoff(1, 3), 1, "25% of 3 rounds up to 1");
        let p = plan(serde_json::json!(["1%", "10%", "100%"]));
        assert_eq!(
            (0..3).map(|w| p.cutoff(w, 5000)).collect::<Vec<_>>(),
            [50, 500, 5000]
        );
        assert_eq!(p.cutoff(0, 0), 0);
    }

    #[test]
    fn every_problem_of_a_plan_is_named() {
        let p: RolloutPlan = serde_json::from_value(serde_json::json!({
            "waves": [0, "150%", "x", 5, 2, "50%"],
            "pause": "soon",
            "progress_deadline": "0s",
        }))
        .unwrap();
        let problems = p.problems().join("\n");
        for expected in [
            "rollout.waves[0]: a wave has at least 1",
            "rollout.waves[1]: \"150%\" must be above 0% and at most 100%",
            "rollout.waves[2]: \"x\" is neither",
            "rollout.waves[4]: 2 is smaller than an earlier wave (5)",
            "rollout.waves[5]: the last wave must be \"100%\"",
            "rollout.pause: bad duration",
            "rollout.progress_deadline: must be more than 0",
        ] {
            assert!(problems.contains(expected), "{expected}:\n{problems}");
        }
    }

    #[test]
    fn a_healthy_wave_starts_the_next_and_the_last_completes() {
        let mut scene = Scene::new(20);
        let mut s = stored(plan(serde_json::json!([1, "25%", "100%"])));
        scene.reports.insert("n00".into(), report(5, true));
        assert_eq!(
            scene.assess(&s, 2_000).step,
            None,
            "n00 watches and has not reported the new version"
        );
        scene.reports.insert("n00".into(), report(10, true));
        let Some(Step::Advance { record, from }) = scene.assess(&s, 2_000).step else {
            panic!("the first wave is healthy");
        };
        assert_eq!((record.wave, from, record.target), (1, 1, Some(10)));
        s.record = record;
        // n01..n04 are in wave 2; two watch and have the old version, two never reported.
        scene.reports.insert("n01".into(), report(5, true));
        scene.reports.insert("n02".into(), report(5, true));
        let waiting = scene.assess(&s, 3_000);
        assert_eq!(waiting.step, None);
        assert_eq!(waiting.wake_at_ms, Some(2_000 + 600_000), "the deadline");
        scene.reports.insert("n01".into(), report(10, true));
        scene.reports.insert("n02".into(), report(10, true));
        let Some(Step::Advance { record, .. }) = scene.assess(&s, 3_000).step else {
            panic!("silent members do not hold a wave");
        };
        s.record = record;
        assert_eq!(s.record.wave, 2);
        let Some(Step::Update(done)) = scene.assess(&s, 4_000).step else {
            panic!("the last wave completes");
        };
        assert_eq!(done.state, RolloutState::Complete);
    }

    #[test]
    fn a_pause_is_kept_from_the_moment_the_wave_is_healthy() {
        let mut scene = Scene::new(4);
        let mut p = plan(serde_json::json!([1, "100%"]));
        p.pause = Some("30s".into());
        let mut s = stored(p);
        scene.reports.insert("n00".into(), report(10, true));
        let first = scene.assess(&s, 5_000);
        let Some(Step::Update(record)) = first.step else {
            panic!("the healthy moment is stored");
        };
        assert_eq!(record.healthy_since_ms, Some(5_000));
        assert_eq!(first.wake_at_ms, Some(35_000));
        s.record = record;
        assert_eq!(scene.assess(&s, 20_000).step, None);
        assert!(matches!(
            scene.assess(&s, 35_000).step,
            Some(Step::Advance { .. })
        ));
    }

    #[test]
    fn failures_past_the_limit_halt_or_roll_back_naming_the_node() {
        let mut scene = Scene::new(20);
        scene.reports.insert("n00".into(), report(10, false));
        let s = stored(plan(serde_json::json!([1, "100%"])));
        let Some(Step::Update(halted)) = scene.assess(&s, 2_000).step else {
            panic!("halts");
        };
        assert_eq!(halted.state, RolloutState::Halted);
        let reason = halted.reason.unwrap();
        assert!(
            reason.contains("n00") && reason.contains("bad config"),
            "{reason}"
        );
        let mut p = plan(serde_json::json!([1, "100%"]));
        p.on_failure = OnFailure::Rollback;
        p.max_failures = 1;
        let s = stored(p.clone());
        let tolerated = scene.assess(&s, 2_000);
        assert!(
            matches!(&tolerated.step, Some(Step::Advance { record, .. }) if record.failures.len() == 1 && record.state == RolloutState::Running),
            "a tolerated failure does not hold the wave: {tolerated:?}"
        );
        scene.reports.insert("n00".into(), report(10, false));
        let mut s = stored(p);
        s.record.wave = 1;
        scene.reports.insert("n05".into(), report(10, false));
        assert!(matches!(
            scene.assess(&s, 2_000).step,
            Some(Step::Rollback(r)) if r.state == RolloutState::RolledBack
        ));
    }

    #[test]
    fn a_watching_node_that_goes_silent_fails_the_wave_at_its_deadline() {
        let mut scene = Scene::new(3);
        scene.reports.insert("n00".into(), report(5, true));
        let s = stored(plan(serde_json::json!([1, "100%"])));
        assert_eq!(scene.assess(&s, 600_999).step, None);
        let Some(Step::Update(halted)) = scene.assess(&s, 601_000).step else {
            panic!("halts at the deadline");
        };
        assert!(
            halted.reason.as_deref().unwrap().contains("n00"),
            "{halted:?}"
        );
    }

    #[test]
    fn commands_apply_only_where_they_make_sense() {
        let s = stored(plan(serde_json::json!([1, "25%", "100%"])));
        let Ok(Step::Update(paused)) = Command::Pause.step(&s, 9) else {
            panic!()
        };
        assert_eq!(paused.state, RolloutState::Paused);
        let err = Command::Resume.step(&s, 9).unwrap_err();
        assert!(err.contains("is running"), "{err}");
        let Ok(Step::Advance { record, from }) = Command::Promote.step(&s, 9) else {
            panic!()
        };
        assert_eq!(
            (from, record.wave, record.state),
            (1, 2, RolloutState::Complete)
        );
        let batch = Step::Advance { record, from }.batch(10, None);
        let waves: Vec<String> = batch
            .ops
            .iter()
            .filter(|op| op.key().kind == WAVE)
            .map(|op| op.key().key.clone())
            .collect();
        assert_eq!(waves, ["1", "2"]);
        let mut done = s.clone();
        done.record.state = RolloutState::Complete;
        assert!(Command::Rollback.step(&done, 9).is_err());
    }
}
