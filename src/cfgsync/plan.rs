//! A rollout plan, the `rollout:` section of a policy or bundle: cumulative wave sizes, the
//! pause between waves, how many failures stop it, and what stopping does.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration;

/// Waves a plan may have at most.
pub const MAX_WAVES: usize = 16;

/// Default `progress_deadline`.
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);

/// One wave's cumulative size: a count of members, or a percentage of them (`"25%"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum WaveSize {
    /// This many members (at least 1).
    Count(u64),
    /// This share of the members, rounded up: `"10%"`, `"0.5%"`, `"100%"`.
    Percent(String),
}

impl WaveSize {
    /// The percentage a `Percent` names, or why it does not.
    fn percent(text: &str) -> Result<f64, String> {
        let number = text
            .trim()
            .strip_suffix('%')
            .ok_or_else(|| format!("{text:?} is neither a count nor a percentage like \"25%\""))?;
        let value: f64 = number
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not a percentage like \"25%\""))?;
        if !(value > 0.0 && value <= 100.0) {
            return Err(format!("{text:?} must be above 0% and at most 100%"));
        }
        Ok(value)
    }

    /// How many of `members` this wave covers (cumulative; at least 1 when there are any).
    pub fn of(&self, members: usize) -> usize {
        match self {
            Self::Count(count) => (*count as usize).min(members),
            Self::Percent(text) => {
                let percent = Self::percent(text).unwrap_or(100.0);
                ((members as f64 * percent / 100.0).ceil() as usize)
                    .clamp(1, members.max(1))
                    .min(members)
            }
        }
    }
}

/// What a failed rollout does.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop where it is: nodes that got the new version keep it, the rest keep the previous.
    #[default]
    Halt,
    /// Give every node the previous version back, as a new epoch (their hooks run again).
    Rollback,
}

/// The `rollout:` section of a policy or bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutPlan {
    /// Cumulative wave sizes, counts or percentages of the members: `[1, "10%", "100%"]`. The
    /// last must be `"100%"`.
    pub waves: Vec<WaveSize>,
    /// How long a healthy wave is watched before the next starts (`30s`, `5m`; default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration::schema")]
    pub pause: Option<String>,
    /// Failed nodes tolerated before the rollout stops (default 0: the first failure stops it).
    #[serde(default)]
    pub max_failures: u32,
    /// How long a wave may take to become healthy (default `10m`); a watching node that has
    /// not reported ok on the new version by then fails the wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration::schema")]
    pub progress_deadline: Option<String>,
    /// What a failure does: `halt` (default) or `rollback`.
    #[serde(default)]
    pub on_failure: OnFailure,
}

impl RolloutPlan {
    /// Every problem of the plan, each naming its field under `rollout.`.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.waves.is_empty() {
            problems.push("rollout.waves: name at least one wave, the last \"100%\"".into());
        }
        if self.waves.len() > MAX_WAVES {
            problems.push(format!(
                "rollout.waves: {} waves, more than the {MAX_WAVES} allowed",
                self.waves.len()
            ));
        }
        let (mut last_count, mut last_percent) = (0u64, 0f64);
        for (i, wave) in self.waves.iter().enumerate() {
            let at = format!("rollout.waves[{i}]");
            match wave {
                WaveSize::Count(0) => problems.push(format!("{at}: a wave has at least 1 node")),
                WaveSize::Count(n) if *n < last_count => problems.push(format!(
                    "{at}: {n} is smaller than an earlier wave ({last_count}); waves are cumulative"
                )),
                WaveSize::Count(n) => last_count = *n,
                WaveSize::Percent(text) => match WaveSize::percent(text) {
                    Err(why) => problems.push(format!("{at}: {why}")),
                    Ok(p) if p < last_percent => problems.push(format!(
                        "{at}: {text} is smaller than an earlier wave ({last_percent}%); waves are cumulative"
                    )),
                    Ok(p) => last_percent = p,
                },
            }
        }
        if let Some(last) = self.waves.last()
            && !matches!(last, WaveSize::Percent(t) if WaveSize::percent(t) == Ok(100.0))
        {
            problems.push(format!(
                "rollout.waves[{}]: the last wave must be \"100%\", so the rollout reaches every node",
                self.waves.len() - 1
            ));
        }
        for (field, value) in [
            ("pause", &self.pause),
            ("progress_deadline", &self.progress_deadline),
        ] {
            if let Some(text) = value
                && let Err(why) = duration::parse(text)
            {
                problems.push(format!("rollout.{field}: {why}"));
            }
        }
        if self
            .progress_deadline
            .as_deref()
            .and_then(|t| duration::parse(t).ok())
            == Some(Duration::ZERO)
        {
            problems.push("rollout.progress_deadline: must be more than 0".into());
        }
        problems
    }

    /// The pause between a healthy wave and the next.
    pub fn pause(&self) -> Duration {
        self.pause
            .as_deref()
            .and_then(|t| duration::parse(t).ok())
            .unwrap_or_default()
    }

    /// How long a wave may take to become healthy.
    pub fn progress_deadline(&self) -> Duration {
        self.progress_deadline
            .as_deref()
            .and_then(|t| duration::parse(t).ok())
            .unwrap_or(DEFAULT_PROGRESS_DEADLINE)
    }

    /// How many of `members` waves `0..=wave` cover.
    pub fn cutoff(&self, wave: usize, members: usize) -> usize {
        self.waves
            .iter()
            .take(wave + 1)
            .map(|w| w.of(members))
            .max()
            .unwrap_or(0)
    }

    /// How many members waves `0..=wave` cover when the first `settled` of `members` were
    /// there when the rollout started: waves are cut from those, and the last covers all.
    pub fn cutoff_of(&self, wave: usize, settled: usize, members: usize) -> usize {
        if wave >= self.last_wave() {
            members
        } else {
            self.cutoff(wave, settled).min(members)
        }
    }

    /// The index of the last wave.
    pub fn last_wave(&self) -> usize {
        self.waves.len().saturating_sub(1)
    }
}
