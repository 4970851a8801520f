//! The reconcile loop. One wake runs the pre-gate initialisers, checks the gate, reads every
//! stored flag in one round trip, and runs what is behind its flag under the lease; it ends in
//! an explicit [`Outcome`], from which the next wake is computed.
//!
//! Each mechanism has its own file: `gate` (are the services up), `lease_guard` (the lease
//! while a wake holds it), `run` (one initialiser under its timeout, panics caught), `watcher`
//! (wakes the loop when someone else changes `__system__`) and `metrics`.

mod gate;
mod lease_guard;
mod metrics;
mod run;
#[cfg(test)]
mod tests;
mod watcher;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use gate::{Gate, HttpGate};
use lease_guard::{LeaseGuard, Taken};
use metrics::EngineMetrics;
pub use run::RunOutcome;
use watcher::{OwnWrites, watch_system};

use super::InitContext;
use super::assess::{Facts, assess};
use super::spec::{Cadence, Entry, Spec};
use crate::api::system::{
    self as status, History, HistoryEntry, INIT_HISTORY, INIT_SPEC, INIT_STATE, INIT_STATUS,
    SPEC_KEY, State, Status, Wanted, WantedSpec, error_tail,
};
use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::metrics::Metrics;
use crate::store::{self, Batch, DynStore, Precondition, Revision, SYSTEM_NAMESPACE};

/// What one wake found; the next wake is computed from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The gate failed (why): pre-gate initialisers run again, and the next wake comes after
    /// `retry_in`, which grows from the cadence's `gate_backoff` while the gate stays closed.
    GateClosed {
        /// The gate's reason.
        why: String,
        /// The pause before the next wake.
        retry_in: Duration,
    },
    /// The store did not answer (a read or the lease): retried after `retry_in`, with the
    /// same backoff as a closed gate, but the services are not blamed.
    StoreUnavailable {
        /// What failed.
        why: String,
        /// The pause before the next wake.
        retry_in: Duration,
    },
    /// Another reconciler holds the lease until `until`; wake then (or when it releases it).
    Standby {
        /// The holder.
        holder: String,
        /// When its lease lapses unless renewed.
        until: Instant,
    },
    /// Something is not at its flag; the earliest retry is due at this instant.
    Pending(Instant),
    /// Everything is at its flag: sleep `steady`.
    Converged,
}

/// The sleep an outcome calls for (at least 100 ms, so a loop never spins).
pub fn next_sleep(outcome: &Outcome, cadence: &Cadence) -> Duration {
    let floor = Duration::from_millis(100);
    match outcome {
        Outcome::GateClosed { retry_in, .. } | Outcome::StoreUnavailable { retry_in, .. } => {
            (*retry_in).max(floor)
        }
        Outcome::Standby { until, .. } => {
            until.saturating_duration_since(Instant::now()).max(floor)
        }
        Outcome::Pending(due) => due.saturating_duration_since(Instant::now()).max(floor),
        Outcome::Converged => cadence.steady,
    }
}

/// Per-instance retry bookkeeping, kept across wakes.
#[derive(Debug)]
struct Track {
    flag: String,
    attempts: u32,
    backoff: Backoff,
    due: Instant,
}

/// Who the engine is and how it reaches the server.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// This reconciler's name in the lease and status records.
    pub holder: String,
    /// How long the lease lasts without renewal.
    pub lease_ttl: Duration,
    /// Base URL of the server (given to initialisers).
    pub server_url: String,
    /// HTTP client for initialisers (carries the admin token when configured).
    pub http: reqwest::Client,
    /// Runs kept per initialiser in `__system__/init-history`.
    pub history_len: usize,
}

/// The reconciler.
pub struct Engine {
    spec: Spec,
    store: DynStore,
    gate: Arc<dyn Gate>,
    options: EngineOptions,
    pre_done: HashSet<String>,
    tracks: HashMap<String, Track>,
    spec_written: bool,
    own: OwnWrites,
    /// Spaces the wakes while the gate is closed or the store does not answer.
    outage: Backoff,
    metrics: EngineMetrics,
}

/// The stored flags, with the revision each was written at.
type Stored = HashMap<String, (String, Revision)>;

/// The longest pause after a closed gate, in multiples of `gate_backoff`: a gate that opens
/// again is noticed within this, however long it was closed.
const OUTAGE_CAP_FACTOR: u32 = 8;

fn outage_backoff(cadence: &Cadence) -> Backoff {
    let cap = cadence
        .max_backoff
        .min(cadence.gate_backoff * OUTAGE_CAP_FACTOR);
    Backoff::new(cadence.gate_backoff, cap)
}

impl Engine {
    /// An engine for `spec` over `store`, gated by `gate`.
    pub fn new(
        spec: Spec,
        store: DynStore,
        gate: Arc<dyn Gate>,
        options: EngineOptions,
        metrics: Option<&Metrics>,
    ) -> Self {
        Self {
            outage: outage_backoff(&spec.cadence),
            spec,
            store,
            gate,
            options,
            pre_done: HashSet::new(),
            tracks: HashMap::new(),
            spec_written: false,
            own: OwnWrites::default(),
            metrics: metrics.map(EngineMetrics::register).unwrap_or_default(),
        }
    }

    /// Replaces the spec (after SIGHUP); retry state survives for unchanged flags.
    pub fn set_spec(&mut self, spec: Spec) {
        self.tracks.retain(|name, track| {
            spec.entries
                .iter()
                .any(|e| &e.name == name && e.flag == track.flag)
        });
        self.pre_done.clear();
        self.outage = outage_backoff(&spec.cadence);
        self.spec = spec;
        self.spec_written = false;
    }

    /// The spec in force.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    async fn write(&self, batch: Batch) -> Result<Revision, store::Error> {
        let revision = self.store.apply(batch).await?;
        self.own.remember(revision);
        Ok(revision)
    }

    async fn put_status(&self, name: &str, status: &Status) {
        self.record(name, Batch::new(), status).await;
    }

    /// Writes `status` (and whatever `batch` already holds) in one batch.
    async fn record(&self, name: &str, batch: Batch, status: &Status) {
        let batch = batch.put(status::key(INIT_STATUS, name), json!(status));
        if let Err(err) = self.write(batch).await {
            tracing::warn!(initialiser = name, error = %err, "cannot record status");
        }
    }

    /// `batch` with the run that `status` records appended to `name`'s history, so the history
    /// changes in the same batch as the flag and the status. A history that cannot be read is
    /// left alone rather than replaced by this one run.
    async fn with_history(&self, batch: Batch, name: &str, status: &Status, result: &str) -> Batch {
        let key = status::key(INIT_HISTORY, name);
        let mut history: History = match self.store.get(&key).await {
            Ok(None) => History::default(),
            Ok(Some(stored)) => match serde_json::from_value(stored.value) {
                Ok(history) => history,
                Err(err) => {
                    tracing::warn!(initialiser = name, error = %err, "the stored run history does not decode; this run is not added to it");
                    return batch;
                }
            },
            Err(err) => {
                tracing::warn!(initialiser = name, error = %err, "cannot read the run history; this run is not added to it");
                return batch;
            }
        };
        let finished_ms = status.finished_ms.unwrap_or(status.started_ms);
        history.push(
            HistoryEntry {
                started_ms: status.started_ms,
                finished_ms,
                duration_ms: status.duration_ms.unwrap_or_default(),
                result: result.to_string(),
                old_flag: status.old_flag.clone(),
                flag: status.flag.clone(),
                error: status.last_error.as_deref().map(error_tail),
                holder: status.holder.clone(),
            },
            self.options.history_len,
        );
        batch.put(key, json!(history))
    }

    /// The initialisers that wait for the gate, in spec order.
    fn post_gate(&self) -> Vec<Entry> {
        self.spec
            .entries
            .iter()
            .filter(|e| !e.pre_gate())
            .cloned()
            .collect()
    }

    /// Whether `entry` is behind its flag, by the one convergence rule.
    fn behind(stored: &Stored, entry: &Entry) -> bool {
        assess(Facts {
            wanted_flag: &entry.flag,
            params_hash: &entry.params_hash,
            pre_gate: false,
            stored_flag: stored.get(&entry.name).map(|(flag, _)| flag.as_str()),
            succeeded_params_hash: None,
        })
        .behind()
    }

    /// One wake, as `bootstrap.md` "One wake" describes. The outage backoff grows with each
    /// wake the gate or the store cuts short, and starts over after one that was not.
    pub async fn wake(&mut self) -> Outcome {
        let outcome = self.wake_once().await;
        if !matches!(
            outcome,
            Outcome::GateClosed { .. } | Outcome::StoreUnavailable { .. }
        ) {
            self.outage.reset();
        }
        outcome
    }

    async fn wake_once(&mut self) -> Outcome {
        self.run_pre_gate().await;
        if let Err(why) = self.gate.check().await {
            return self.gate_closed(why);
        }
        // The gate's store round trip is also the one read of every stored flag.
        let mut stored = match self.read_stored().await {
            Ok(stored) => stored,
            Err(err) => return self.store_unavailable("reading the stored flags", &err),
        };
        if !self.spec_written {
            self.write_wanted().await;
        }
        let post = self.post_gate();
        let lagging = post.iter().filter(|e| Self::behind(&stored, e)).count();
        self.metrics.behind.set(lagging as i64);
        if lagging == 0 {
            return Outcome::Converged;
        }
        let now = Instant::now();
        let eligible: HashSet<String> = post
            .iter()
            .filter(|e| Self::behind(&stored, e))
            .filter(|e| {
                self.tracks
                    .get(&e.name)
                    .is_none_or(|t| t.flag != e.flag || t.due <= now)
            })
            .map(|e| e.name.clone())
            .collect();
        if eligible.is_empty() {
            return self.pending(&post, &stored);
        }

        let ttl = self.options.lease_ttl;
        let guard = match LeaseGuard::take(&self.store, &self.options.holder, ttl, &self.own).await
        {
            Ok(Taken::Held(guard)) => guard,
            Ok(Taken::Standby { holder, until }) => {
                tracing::debug!(%holder, "standing by: another reconciler holds the lease");
                return Outcome::Standby { holder, until };
            }
            Err(err) => return self.store_unavailable("taking the lease", &err),
        };
        // The flags above were read before the lease was ours: a holder that released it in
        // between may have stored some of them. Read them again under the lease, or a step
        // that just finished elsewhere would run a second time.
        match self.read_stored().await {
            Ok(fresh) => stored = fresh,
            Err(err) => {
                guard.release().await;
                return self.store_unavailable("reading the stored flags", &err);
            }
        }

        // Passes: a dependant placed before its prerequisite converges in this same wake.
        'passes: for _ in 0..post.len().max(1) {
            let (mut progressed, mut failed) = (false, false);
            for entry in &post {
                if !Self::behind(&stored, entry) || !eligible.contains(&entry.name) {
                    continue;
                }
                let previous = stored.get(&entry.name).cloned();
                match self.run_post(entry, previous.as_ref(), &guard).await {
                    RunOutcome::Succeeded(revision) => {
                        progressed = true;
                        stored.insert(entry.name.clone(), (entry.flag.clone(), revision));
                    }
                    _ => failed = true,
                }
                if guard.lost().await {
                    // Another reconciler took over: nothing more runs in this wake.
                    break 'passes;
                }
            }
            if !(progressed && failed) {
                break;
            }
        }

        guard.release().await;
        self.pending(&post, &stored)
    }

    /// Every stored flag with its revision, in one round trip.
    async fn read_stored(&self) -> Result<Stored, store::Error> {
        let listing = self.store.list(SYSTEM_NAMESPACE, INIT_STATE).await?;
        Ok(listing
            .entries
            .into_iter()
            .filter_map(|(name, e)| {
                e.value
                    .as_str()
                    .map(|flag| (name, (flag.to_string(), e.mod_revision)))
            })
            .collect())
    }

    fn gate_closed(&mut self, why: String) -> Outcome {
        let retry_in = self.outage.fail();
        tracing::warn!(reason = %why, ?retry_in, "service gate closed; backing off");
        self.metrics.gate_failures.inc();
        // Pre-gate initialisers run again after a failed gate: they may be what it needs.
        self.pre_done.clear();
        Outcome::GateClosed { why, retry_in }
    }

    fn store_unavailable(&mut self, doing: &str, err: &store::Error) -> Outcome {
        let retry_in = self.outage.fail();
        let why = format!("{doing}: {err}");
        tracing::warn!(reason = %why, ?retry_in, "the store did not answer; backing off");
        self.metrics.store_failures.inc();
        Outcome::StoreUnavailable { why, retry_in }
    }

    fn pending(&self, post: &[Entry], stored: &Stored) -> Outcome {
        let lagging: Vec<&Entry> = post.iter().filter(|e| Self::behind(stored, e)).collect();
        self.metrics.behind.set(lagging.len() as i64);
        if lagging.is_empty() {
            return Outcome::Converged;
        }
        let fallback = Instant::now() + self.spec.cadence.retry;
        let due = lagging
            .iter()
            .map(|e| self.tracks.get(&e.name).map_or(fallback, |t| t.due))
            .min()
            .unwrap_or(fallback);
        Outcome::Pending(due)
    }

    async fn run_pre_gate(&mut self) {
        let pre: Vec<Entry> = self
            .spec
            .entries
            .iter()
            .filter(|e| e.pre_gate() && !self.pre_done.contains(&e.name))
            .cloned()
            .collect();
        for entry in pre {
            let started = std::time::Instant::now();
            match self.run_guarded(&entry, None).await {
                Ok(()) => {
                    self.metrics.observe(&entry.class, "succeeded", started);
                    self.pre_done.insert(entry.name.clone());
                }
                Err(outcome) => {
                    self.metrics.observe(&entry.class, outcome.label(), started);
                    let error = outcome.error().unwrap_or_default();
                    tracing::warn!(initialiser = %entry.name, %error, "pre-gate initialiser failed");
                }
            }
        }
    }

    async fn write_wanted(&mut self) {
        let wanted = WantedSpec {
            holder: self.options.holder.clone(),
            initialisers: self
                .spec
                .entries
                .iter()
                .map(|e| Wanted {
                    name: e.name.clone(),
                    class: e.class.clone(),
                    flag: e.flag.clone(),
                    params_hash: e.params_hash.clone(),
                    pre_gate: e.pre_gate(),
                })
                .collect(),
        };
        let key = status::key(INIT_SPEC, SPEC_KEY);
        let value = json!(wanted);
        // Writing only on change keeps a converged reconciler silent on the store.
        let unchanged = matches!(self.store.get(&key).await, Ok(Some(e)) if e.value == value);
        if unchanged || self.write(Batch::new().put(key, value)).await.is_ok() {
            self.spec_written = true;
        }
    }

    /// Runs one post-gate initialiser under the lease and records how it ended.
    async fn run_post(
        &mut self,
        entry: &Entry,
        previous: Option<&(String, Revision)>,
        guard: &LeaseGuard,
    ) -> RunOutcome {
        let cadence = self.spec.cadence.clone();
        let fresh = || Track {
            flag: entry.flag.clone(),
            attempts: 0,
            backoff: Backoff::new(cadence.retry, cadence.max_backoff),
            due: Instant::now(),
        };
        let track = self.tracks.entry(entry.name.clone()).or_insert_with(fresh);
        if track.flag != entry.flag {
            *track = fresh();
        }
        track.attempts += 1;
        let attempts = track.attempts;
        let consecutive = track.backoff.failures();
        let old_flag = previous.map(|(flag, _)| flag.clone());
        let span = tracing::info_span!("run", initialiser = %entry.name, class = %entry.class);
        let mut status = Status {
            state: State::Running,
            class: entry.class.clone(),
            flag: entry.flag.clone(),
            old_flag: old_flag.clone(),
            attempts,
            consecutive_failures: consecutive,
            last_error: None,
            started_ms: now_ms(),
            finished_ms: None,
            duration_ms: None,
            holder: self.options.holder.clone(),
            succeeded_params_hash: None,
        };
        self.put_status(&entry.name, &status).await;
        tracing::info!(parent: &span, old = old_flag.as_deref().unwrap_or("-"), new = %entry.flag, attempt = attempts, "running");
        let started = std::time::Instant::now();
        let ran = self
            .run_guarded(entry, old_flag.as_deref())
            .instrument(span.clone())
            .await;
        status.finished_ms = Some(now_ms());
        status.duration_ms = Some(started.elapsed().as_millis() as u64);
        let outcome = match ran {
            Ok(()) => {
                status.state = State::Succeeded;
                status.consecutive_failures = 0;
                status.succeeded_params_hash = Some(entry.params_hash.clone());
                let history = self
                    .with_history(Batch::new(), &entry.name, &status, "succeeded")
                    .await;
                match self
                    .store_flag(entry, previous, &status, history, guard)
                    .await
                {
                    Ok(revision) => RunOutcome::Succeeded(revision),
                    Err(err) => RunOutcome::StateWriteFailed(err.to_string()),
                }
            }
            Err(outcome) => outcome,
        };
        self.metrics.observe(&entry.class, outcome.label(), started);
        match &outcome {
            RunOutcome::Succeeded(_) => {
                tracing::info!(parent: &span, old = old_flag.as_deref().unwrap_or("-"), new = %entry.flag, "succeeded");
                if let Some(track) = self.tracks.get_mut(&entry.name) {
                    track.backoff.reset();
                }
                return outcome;
            }
            RunOutcome::StateWriteFailed(_) => {
                status.state = State::StateWriteFailed;
            }
            _ => {
                status.consecutive_failures = consecutive + 1;
                status.state = if status.consecutive_failures >= cadence.needs_operator_after {
                    State::NeedsOperator
                } else {
                    State::Failed
                };
            }
        }
        status.last_error = outcome.error();
        tracing::warn!(parent: &span, result = outcome.label(), error = status.last_error.as_deref().unwrap_or(""), attempt = attempts, "did not converge; it runs again");
        let history = self
            .with_history(Batch::new(), &entry.name, &status, outcome.label())
            .await;
        self.record(&entry.name, history, &status).await;
        if let Some(track) = self.tracks.get_mut(&entry.name) {
            track.due = Instant::now() + track.backoff.fail();
        }
        outcome
    }

    /// Stores the flag only if nobody changed it since it was read and the lease is still ours.
    async fn store_flag(
        &self,
        entry: &Entry,
        previous: Option<&(String, Revision)>,
        status: &Status,
        history: Batch,
        guard: &LeaseGuard,
    ) -> Result<Revision, store::Error> {
        let mut fence = guard.fence().await;
        let Some(lease_revision) = *fence else {
            return Err(store::Error::Conflict {
                key: super::lease::lease_key(),
                reason: "this reconciler no longer holds the lease".into(),
            });
        };
        let state_key = status::key(INIT_STATE, &entry.name);
        let expect = match previous {
            Some((_, revision)) => Precondition::ModRevision(*revision),
            None => Precondition::Absent,
        };
        // The lease check first: when both fail, the conflict names the lease, and the wake
        // learns it lost the lease rather than only that the flag moved.
        let batch = history
            .check(
                super::lease::lease_key(),
                Precondition::ModRevision(lease_revision),
            )
            .check(state_key.clone(), expect)
            .put(state_key, json!(entry.flag))
            .put(status::key(INIT_STATUS, &entry.name), json!(status));
        let written = self.write(batch).await;
        if let Err(store::Error::Conflict { key, .. }) = &written
            && *key == super::lease::lease_key()
        {
            // Someone took the lease: this wake runs nothing more.
            *fence = None;
        }
        written
    }

    /// Runs an initialiser under its timeout with panics caught.
    async fn run_guarded(&self, entry: &Entry, old_flag: Option<&str>) -> run::Ran {
        run::run_guarded(entry, |cancel| InitContext {
            name: entry.name.clone(),
            span: tracing::Span::current(),
            store: self.store.clone(),
            server_url: self.options.server_url.clone(),
            http: self.options.http.clone(),
            cancel,
            spec_dir: self.spec.dir.clone(),
            old_flag: old_flag.map(str::to_string),
            new_flag: entry.flag.clone(),
        })
        .await
    }

    /// Wakes forever: after each wake it sleeps as the outcome says, or until SIGHUP (the
    /// `reload` callback re-reads the spec), a change to `__system__` made by someone else, or
    /// shutdown.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
        mut hup: tokio::sync::mpsc::Receiver<()>,
        reload: impl Fn() -> Result<Spec, String> + Send,
    ) {
        let poke = Arc::new(tokio::sync::Notify::new());
        let watcher = tokio::spawn(watch_system(
            self.store.clone(),
            self.own.clone(),
            poke.clone(),
            shutdown.clone(),
        ));
        loop {
            let span = tracing::info_span!("wake");
            let outcome = self.wake().instrument(span).await;
            let sleep = next_sleep(&outcome, &self.spec.cadence);
            tracing::debug!(?outcome, ?sleep, "next wake");
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = poke.notified() => tracing::debug!("woken by a change to __system__"),
                Some(()) = hup.recv() => match reload() {
                    Ok(spec) => {
                        tracing::info!(initialisers = spec.entries.len(), "spec reloaded");
                        self.set_spec(spec);
                    }
                    Err(err) => tracing::error!(error = %err, "the new spec is invalid; keeping the old one"),
                },
                () = shutdown.cancelled() => break,
            }
        }
        watcher.abort();
    }
}
