//! The reconcile loop: one wake runs pre-gate initialisers, checks the gate, reads every stored
//! flag in one round trip, runs what is behind its flag under the lease, and returns an
//! explicit [`Outcome`] from which the next wake is computed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::InitContext;
use super::lease::{self, Acquired};
use super::spec::{Entry, Spec};
use super::status::{
    self, INIT_SPEC, INIT_STATE, INIT_STATUS, SPEC_KEY, State, Status, Wanted, WantedSpec,
};
use crate::backoff::Backoff;
use crate::cfgsync::state::now_ms;
use crate::metrics::Metrics;
use crate::server::error::error_chain;
use crate::store::{Batch, DynStore, Precondition, Revision, SYSTEM_NAMESPACE, WatchFilter};

/// The service gate: what must answer before post-gate initialisers run.
#[async_trait]
pub trait Gate: Send + Sync + 'static {
    /// `Err` with a reason when the services are not up.
    async fn check(&self) -> Result<(), String>;
}

/// The production gate: the server's `/healthz` answers.
#[derive(Debug, Clone)]
pub struct HttpGate {
    /// `http://host:port` of the bootsync server.
    pub url: String,
    /// The client to ask with.
    pub http: reqwest::Client,
}

#[async_trait]
impl Gate for HttpGate {
    async fn check(&self) -> Result<(), String> {
        let response = self
            .http
            .get(format!("{}/healthz", self.url))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("{}/healthz did not answer: {e}", self.url))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!(
                "{}/healthz answered {}",
                self.url,
                response.status()
            ))
        }
    }
}

/// What one wake found; the next wake is computed from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The gate failed (why): sleep `gate_backoff`.
    GateClosed(String),
    /// Another replica holds the lease: sleep `retry`.
    Standby,
    /// Something is not at its flag; the earliest retry is due at this instant.
    Pending(Instant),
    /// Everything is at its flag: sleep `steady`.
    Converged,
}

/// How a single run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunEnd {
    Succeeded,
    Failed,
}

/// Per-instance retry bookkeeping, kept across wakes.
#[derive(Debug)]
struct Track {
    flag: String,
    attempts: u32,
    backoff: Backoff,
    due: Instant,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    class: String,
    result: String,
}

fn run_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

#[derive(Debug, Clone)]
struct EngineMetrics {
    runs: Family<RunLabels, Counter>,
    seconds: Family<RunLabels, Histogram, fn() -> Histogram>,
    gate_failures: Counter,
    lag: Gauge,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            runs: Family::default(),
            seconds: Family::new_with_constructor(run_histogram),
            gate_failures: Counter::default(),
            lag: Gauge::default(),
        }
    }
}

impl EngineMetrics {
    fn register(metrics: &Metrics) -> Self {
        let this = Self::default();
        metrics.register(
            "initialiser_runs",
            "initialiser runs by class and result",
            this.runs.clone(),
        );
        metrics.register(
            "initialiser_run_duration_seconds",
            "initialiser run time",
            this.seconds.clone(),
        );
        metrics.register(
            "gate_failures",
            "wakes whose service gate failed",
            this.gate_failures.clone(),
        );
        metrics.register(
            "initialisers_behind",
            "initialisers not at their flag",
            this.lag.clone(),
        );
        this
    }
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
    own: Arc<Mutex<VecDeque<Revision>>>,
    fence: Arc<tokio::sync::Mutex<Option<Revision>>>,
    metrics: EngineMetrics,
}

/// How many of its own write revisions the engine remembers to ignore them on its watch.
const OWN_REVISIONS: usize = 1024;

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
            spec,
            store,
            gate,
            options,
            pre_done: HashSet::new(),
            tracks: HashMap::new(),
            spec_written: false,
            own: Arc::new(Mutex::new(VecDeque::new())),
            fence: Arc::new(tokio::sync::Mutex::new(None)),
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
        self.spec = spec;
        self.spec_written = false;
    }

    /// The spec in force.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    fn remember(&self, revision: Revision) {
        let mut own = self.own.lock().expect("own revisions lock poisoned");
        if own.len() == OWN_REVISIONS {
            own.pop_front();
        }
        own.push_back(revision);
    }

    async fn write(&self, batch: Batch) -> Result<Revision, crate::store::Error> {
        let revision = self.store.apply(batch).await?;
        self.remember(revision);
        Ok(revision)
    }

    async fn put_status(&self, name: &str, status: &Status) {
        let batch = Batch::new().put(status::key(INIT_STATUS, name), json!(status));
        if let Err(err) = self.write(batch).await {
            tracing::warn!(initialiser = name, error = %err, "cannot record status");
        }
    }

    /// One wake, as `bootstrap.md` "One wake" describes.
    pub async fn wake(&mut self) -> Outcome {
        self.run_pre_gate().await;
        if let Err(why) = self.gate.check().await {
            return self.gate_closed(why);
        }
        // The gate's store round trip is also the one read of every stored flag.
        let mut stored = match self.read_stored().await {
            Ok(stored) => stored,
            Err(err) => return self.gate_closed(format!("the store did not answer: {err}")),
        };
        if !self.spec_written {
            self.write_wanted().await;
        }
        let post: Vec<Entry> = self
            .spec
            .entries
            .iter()
            .filter(|e| e.initialiser.wait_for_services())
            .cloned()
            .collect();
        let behind = |stored: &HashMap<String, (String, Revision)>, e: &Entry| {
            stored.get(&e.name).map(|(flag, _)| flag.as_str()) != Some(e.flag.as_str())
        };
        let lagging = post.iter().filter(|e| behind(&stored, e)).count();
        self.metrics.lag.set(lagging as i64);
        if lagging == 0 {
            return Outcome::Converged;
        }
        let now = Instant::now();
        let due: Vec<&Entry> = post
            .iter()
            .filter(|e| behind(&stored, e))
            .filter(|e| {
                self.tracks
                    .get(&e.name)
                    .is_none_or(|t| t.flag != e.flag || t.due <= now)
            })
            .collect();
        if due.is_empty() {
            return self.pending(&post, &stored);
        }

        let held = match lease::acquire(
            self.store.as_ref(),
            &self.options.holder,
            self.options.lease_ttl,
        )
        .await
        {
            Ok(Acquired::Held(revision)) => revision,
            Ok(Acquired::Standby { holder, .. }) => {
                tracing::debug!(%holder, "standing by: another reconciler holds the lease");
                return Outcome::Standby;
            }
            Err(err) => return self.gate_closed(format!("cannot take the lease: {err}")),
        };
        self.remember(held);
        *self.fence.lock().await = Some(held);
        let renewer = self.spawn_renewer();
        // The flags above were read before the lease was ours: a holder that released it in
        // between may have stored some of them. Read them again under the lease, or a step
        // that just finished elsewhere would run a second time.
        match self.read_stored().await {
            Ok(fresh) => stored = fresh,
            Err(err) => {
                renewer.abort();
                self.give_up_lease().await;
                return self.gate_closed(format!("the store did not answer: {err}"));
            }
        }

        let eligible: HashSet<String> = due.iter().map(|e| e.name.clone()).collect();
        // Passes: a dependant placed before its prerequisite converges in this same wake.
        for _ in 0..post.len().max(1) {
            let (mut progressed, mut failed) = (false, false);
            for entry in &post {
                if !behind(&stored, entry) || !eligible.contains(&entry.name) {
                    continue;
                }
                let previous = stored.get(&entry.name).cloned();
                match self.run_post(entry, previous.as_ref()).await {
                    (RunEnd::Succeeded, Some(revision)) => {
                        progressed = true;
                        stored.insert(entry.name.clone(), (entry.flag.clone(), revision));
                    }
                    _ => failed = true,
                }
                if self.fence.lock().await.is_none() {
                    // The lease was lost mid-wake: stop; the new holder carries on.
                    break;
                }
            }
            if !(progressed && failed) {
                break;
            }
        }

        renewer.abort();
        self.give_up_lease().await;
        self.pending(&post, &stored)
    }

    /// Every stored flag with its revision, in one round trip.
    async fn read_stored(
        &self,
    ) -> Result<HashMap<String, (String, Revision)>, crate::store::Error> {
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

    /// Releases the lease if this wake still holds it, so a standby need not wait for it to lapse.
    async fn give_up_lease(&self) {
        let mut fence = self.fence.lock().await;
        if let Some(revision) = fence.take()
            && let Err(err) = lease::release(self.store.as_ref(), revision).await
        {
            tracing::warn!(error = %err, "cannot release the lease; it will lapse");
        }
    }

    fn gate_closed(&mut self, why: String) -> Outcome {
        tracing::warn!(reason = %why, "service gate closed; backing off");
        self.metrics.gate_failures.inc();
        // Pre-gate initialisers run again after a failed gate: they may be what it needs.
        self.pre_done.clear();
        Outcome::GateClosed(why)
    }

    fn pending(&self, post: &[Entry], stored: &HashMap<String, (String, Revision)>) -> Outcome {
        let lagging: Vec<&Entry> = post
            .iter()
            .filter(|e| stored.get(&e.name).map(|(f, _)| f.as_str()) != Some(e.flag.as_str()))
            .collect();
        self.metrics.lag.set(lagging.len() as i64);
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
            .filter(|e| !e.initialiser.wait_for_services() && !self.pre_done.contains(&e.name))
            .cloned()
            .collect();
        for entry in pre {
            let started = std::time::Instant::now();
            match self.run_guarded(&entry, None).await {
                Ok(()) => {
                    self.observe(&entry, "succeeded", started);
                    self.pre_done.insert(entry.name.clone());
                }
                Err(err) => {
                    self.observe(&entry, "failed", started);
                    tracing::warn!(initialiser = %entry.name, error = %err, "pre-gate initialiser failed");
                }
            }
        }
    }

    fn observe(&self, entry: &Entry, result: &str, started: std::time::Instant) {
        let labels = RunLabels {
            class: entry.class.clone(),
            result: result.to_string(),
        };
        self.metrics.runs.get_or_create(&labels).inc();
        self.metrics
            .seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
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
                    pre_gate: !e.initialiser.wait_for_services(),
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

    fn spawn_renewer(&self) -> tokio::task::JoinHandle<()> {
        let (store, fence, holder, ttl) = (
            self.store.clone(),
            self.fence.clone(),
            self.options.holder.clone(),
            self.options.lease_ttl,
        );
        let own = self.own.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                let mut fence = fence.lock().await;
                let Some(held) = *fence else { return };
                match lease::renew(store.as_ref(), &holder, held, ttl).await {
                    Ok(Some(revision)) => {
                        *fence = Some(revision);
                        let mut own = own.lock().expect("own revisions lock poisoned");
                        own.push_back(revision);
                        if own.len() > OWN_REVISIONS {
                            own.pop_front();
                        }
                    }
                    Ok(None) => {
                        tracing::warn!("lost the reconciler lease; flag writes are fenced off");
                        *fence = None;
                        return;
                    }
                    Err(err) => tracing::warn!(error = %err, "cannot renew the lease; retrying"),
                }
            }
        })
    }

    /// Runs one post-gate initialiser and records the outcome; returns the flag's revision on success.
    async fn run_post(
        &mut self,
        entry: &Entry,
        previous: Option<&(String, Revision)>,
    ) -> (RunEnd, Option<Revision>) {
        let cadence = self.spec.cadence.clone();
        let track = self
            .tracks
            .entry(entry.name.clone())
            .or_insert_with(|| Track {
                flag: entry.flag.clone(),
                attempts: 0,
                backoff: Backoff::new(cadence.retry, cadence.max_backoff),
                due: Instant::now(),
            });
        if track.flag != entry.flag {
            *track = Track {
                flag: entry.flag.clone(),
                attempts: 0,
                backoff: Backoff::new(cadence.retry, cadence.max_backoff),
                due: Instant::now(),
            };
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
        let result = self
            .run_guarded(entry, old_flag.as_deref())
            .instrument(span.clone())
            .await;
        status.finished_ms = Some(now_ms());
        status.duration_ms = Some(started.elapsed().as_millis() as u64);
        match result {
            Ok(()) => {
                status.state = State::Succeeded;
                status.consecutive_failures = 0;
                status.succeeded_params_hash = Some(entry.params_hash.clone());
                match self.store_flag(entry, previous, &status).await {
                    Ok(revision) => {
                        self.observe(entry, "succeeded", started);
                        tracing::info!(parent: &span, old = old_flag.as_deref().unwrap_or("-"), new = %entry.flag, "succeeded");
                        if let Some(track) = self.tracks.get_mut(&entry.name) {
                            track.backoff.reset();
                        }
                        (RunEnd::Succeeded, Some(revision))
                    }
                    Err(err) => {
                        self.observe(entry, "state_write_failed", started);
                        tracing::warn!(parent: &span, error = %err, "succeeded, but the flag could not be stored; it runs again");
                        status.state = State::StateWriteFailed;
                        status.last_error = Some(format!("the flag could not be stored: {err}"));
                        self.put_status(&entry.name, &status).await;
                        self.schedule_retry(&entry.name);
                        (RunEnd::Failed, None)
                    }
                }
            }
            Err(err) => {
                self.observe(entry, "failed", started);
                tracing::warn!(parent: &span, error = %err, attempt = attempts, "failed");
                status.consecutive_failures = consecutive + 1;
                status.state = if status.consecutive_failures >= cadence.needs_operator_after {
                    State::NeedsOperator
                } else {
                    State::Failed
                };
                status.last_error = Some(err);
                self.put_status(&entry.name, &status).await;
                self.schedule_retry(&entry.name);
                (RunEnd::Failed, None)
            }
        }
    }

    fn schedule_retry(&mut self, name: &str) {
        if let Some(track) = self.tracks.get_mut(name) {
            track.due = Instant::now() + track.backoff.fail();
        }
    }

    /// Stores the flag only if nobody changed it since it was read and the lease is still ours.
    async fn store_flag(
        &self,
        entry: &Entry,
        previous: Option<&(String, Revision)>,
        status: &Status,
    ) -> Result<Revision, crate::store::Error> {
        let fence = self.fence.lock().await;
        let Some(lease_revision) = *fence else {
            return Err(crate::store::Error::Conflict {
                key: lease::lease_key(),
                reason: "this reconciler no longer holds the lease".into(),
            });
        };
        let state_key = status::key(INIT_STATE, &entry.name);
        let expect = match previous {
            Some((_, revision)) => Precondition::ModRevision(*revision),
            None => Precondition::Absent,
        };
        let batch = Batch::new()
            .check(state_key.clone(), expect)
            .check(
                lease::lease_key(),
                Precondition::ModRevision(lease_revision),
            )
            .put(state_key, json!(entry.flag))
            .put(status::key(INIT_STATUS, &entry.name), json!(status));
        let revision = self.store.apply(batch).await?;
        self.remember(revision);
        Ok(revision)
    }

    /// Runs an initialiser under its timeout with panics caught; `Err` carries the whole chain.
    async fn run_guarded(&self, entry: &Entry, old_flag: Option<&str>) -> Result<(), String> {
        let cancel = CancellationToken::new();
        let ctx = InitContext {
            name: entry.name.clone(),
            span: tracing::Span::current(),
            store: self.store.clone(),
            server_url: self.options.server_url.clone(),
            http: self.options.http.clone(),
            cancel: cancel.clone(),
            spec_dir: self.spec.dir.clone(),
        };
        let initialiser = entry.initialiser.clone();
        let (old, new) = (old_flag.map(str::to_string), entry.flag.clone());
        let mut task = tokio::spawn(
            async move {
                initialiser
                    .run(&ctx, old.as_deref(), &new)
                    .await
                    .map_err(|err| error_chain(err.as_ref()))
            }
            .in_current_span(),
        );
        match tokio::time::timeout(entry.timeout, &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) if join.is_panic() => {
                Err(format!("panicked: {}", panic_message(join.into_panic())))
            }
            Ok(Err(_)) => Err("the run was cancelled".into()),
            Err(_) => {
                cancel.cancel();
                task.abort();
                Err(format!("timed out after {:?}", entry.timeout))
            }
        }
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

/// The sleep an outcome calls for.
pub fn next_sleep(outcome: &Outcome, cadence: &super::spec::Cadence) -> Duration {
    match outcome {
        Outcome::GateClosed(_) => cadence.gate_backoff,
        Outcome::Standby => cadence.retry,
        Outcome::Pending(due) => due
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100)),
        Outcome::Converged => cadence.steady,
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Pokes the loop when someone else changes `__system__` (an operator reset, another replica).
async fn watch_system(
    store: DynStore,
    own: Arc<Mutex<VecDeque<Revision>>>,
    poke: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let mut from = None;
    loop {
        let start = match from {
            Some(from) => from,
            None => match store.revision().await {
                Ok(revision) => revision,
                Err(_) => {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                        () = shutdown.cancelled() => return,
                    }
                }
            },
        };
        let mut watch = match store
            .watch(start, WatchFilter::Namespace(SYSTEM_NAMESPACE.into()))
            .await
        {
            Ok(watch) => watch,
            Err(_) => {
                from = None;
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    () = shutdown.cancelled() => return,
                }
            }
        };
        loop {
            let event = tokio::select! {
                event = watch.next() => event,
                () = shutdown.cancelled() => return,
            };
            match event {
                Some(Ok(event)) => {
                    from = Some(event.revision);
                    let mine = own
                        .lock()
                        .expect("own revisions lock poisoned")
                        .contains(&event.revision);
                    if !mine {
                        poke.notify_one();
                    }
                }
                // History gone: start again from the present.
                Some(Err(crate::store::Error::Compacted { .. })) => {
                    from = None;
                    break;
                }
                // A broken stream resumes from the last event seen.
                _ => {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => break,
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::bootstrap::spec::{Cadence, Entry, params_hash};
    use crate::bootstrap::{InitError, Initialiser};
    use crate::store::memory::MemoryStore;
    use crate::store::{Key, Limits, Store, StoreExt};

    struct Gated(AtomicBool);

    #[async_trait]
    impl Gate for Gated {
        async fn check(&self) -> Result<(), String> {
            if self.0.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("server down".into())
            }
        }
    }

    /// Test initialisers: what they do is in their name.
    enum Behaviour {
        Ok,
        Fail,
        Hang,
        Panic,
        /// Succeeds only once `prod/cfg/ready` exists.
        NeedsReady,
        /// Writes `prod/cfg/ready`.
        MakesReady,
        /// Changes its own stored flag mid-run, as a concurrent writer would.
        RacesItsFlag,
    }

    struct Probe {
        behaviour: Behaviour,
        runs: Arc<AtomicUsize>,
        old_flags: Arc<Mutex<Vec<Option<String>>>>,
    }

    #[async_trait]
    impl Initialiser for Probe {
        async fn run(
            &self,
            ctx: &InitContext,
            old: Option<&str>,
            _new: &str,
        ) -> Result<(), InitError> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            self.old_flags.lock().unwrap().push(old.map(str::to_string));
            let ready = Key::new("prod", "cfg", "ready");
            match self.behaviour {
                Behaviour::Ok => Ok(()),
                Behaviour::Fail => Err("deliberate failure".into()),
                Behaviour::Hang => std::future::pending().await,
                Behaviour::Panic => panic!("deliberate panic"),
                Behaviour::NeedsReady => match ctx.store.get(&ready).await? {
                    Some(_) => Ok(()),
                    None => Err("prerequisite missing".into()),
                },
                Behaviour::MakesReady => {
                    ctx.store.put(ready, json!(true)).await?;
                    Ok(())
                }
                Behaviour::RacesItsFlag => {
                    ctx.store
                        .put(status::key(INIT_STATE, &ctx.name), json!("someone-else"))
                        .await?;
                    Ok(())
                }
            }
        }
    }

    type OldFlags = Arc<Mutex<Vec<Option<String>>>>;

    struct Harness {
        engine: Engine,
        store: DynStore,
        gate: Arc<Gated>,
        runs: HashMap<String, Arc<AtomicUsize>>,
        old_flags: HashMap<String, OldFlags>,
    }

    fn entry(name: &str, flag: &str, behaviour: Behaviour) -> (Entry, Arc<AtomicUsize>, OldFlags) {
        let runs = Arc::new(AtomicUsize::new(0));
        let old_flags = Arc::new(Mutex::new(Vec::new()));
        let probe = Probe {
            behaviour,
            runs: runs.clone(),
            old_flags: old_flags.clone(),
        };
        let entry = Entry {
            class: "probe".into(),
            name: name.into(),
            flag: flag.into(),
            timeout: Duration::from_secs(2),
            params: json!({}),
            params_hash: params_hash(&json!({})),
            initialiser: Arc::new(probe),
        };
        (entry, runs, old_flags)
    }

    fn harness(entries: Vec<(&str, &str, Behaviour)>) -> Harness {
        let store: DynStore = Arc::new(MemoryStore::new(Limits::default()));
        harness_on(store, entries)
    }

    fn harness_on(store: DynStore, entries: Vec<(&str, &str, Behaviour)>) -> Harness {
        let mut runs = HashMap::new();
        let mut old_flags = HashMap::new();
        let mut built = Vec::new();
        for (name, flag, behaviour) in entries {
            let (e, r, o) = entry(name, flag, behaviour);
            runs.insert(name.to_string(), r);
            old_flags.insert(name.to_string(), o);
            built.push(e);
        }
        let spec = Spec {
            cadence: Cadence::default(),
            entries: built,
            dir: ".".into(),
        };
        let gate = Arc::new(Gated(AtomicBool::new(true)));
        let options = EngineOptions {
            holder: "test".into(),
            lease_ttl: Duration::from_secs(15),
            server_url: "http://127.0.0.1:9".into(),
            http: crate::tls::plain_client(),
        };
        Harness {
            engine: Engine::new(spec, store.clone(), gate.clone(), options, None),
            store,
            gate,
            runs,
            old_flags,
        }
    }

    impl Harness {
        fn runs(&self, name: &str) -> usize {
            self.runs[name].load(Ordering::SeqCst)
        }

        async fn flag(&self, name: &str) -> Option<String> {
            let entry = self
                .store
                .get(&status::key(INIT_STATE, name))
                .await
                .unwrap()?;
            entry.value.as_str().map(str::to_string)
        }

        async fn status(&self, name: &str) -> Status {
            let entry = self
                .store
                .get(&status::key(INIT_STATUS, name))
                .await
                .unwrap()
                .expect("status recorded");
            serde_json::from_value(entry.value).unwrap()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_converged_wake_sleeps_steady_and_writes_nothing() {
        let mut h = harness(vec![("a", "v1", Behaviour::Ok), ("b", "v1", Behaviour::Ok)]);
        assert_eq!(h.engine.wake().await, Outcome::Converged);
        assert_eq!(
            (h.flag("a").await.as_deref(), h.flag("b").await.as_deref()),
            (Some("v1"), Some("v1"))
        );
        let cadence = h.engine.spec().cadence.clone();
        assert_eq!(
            next_sleep(&Outcome::Converged, &cadence),
            Duration::from_secs(300)
        );
        let revision = h.store.revision().await.unwrap();
        assert_eq!(h.engine.wake().await, Outcome::Converged);
        assert_eq!(
            h.store.revision().await.unwrap(),
            revision,
            "a steady wake must not write"
        );
        assert_eq!(
            (h.runs("a"), h.runs("b")),
            (1, 1),
            "nothing re-runs at its flag"
        );
        assert!(
            h.store.get(&lease::lease_key()).await.unwrap().is_none(),
            "the lease is released"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_gate_runs_nothing_and_sleeps_gate_backoff() {
        let mut h = harness(vec![("a", "v1", Behaviour::Ok)]);
        h.gate.0.store(false, Ordering::SeqCst);
        let outcome = h.engine.wake().await;
        assert!(
            matches!(outcome, Outcome::GateClosed(ref why) if why.contains("server down")),
            "{outcome:?}"
        );
        assert_eq!(
            next_sleep(&outcome, &h.engine.spec().cadence),
            Duration::from_secs(5)
        );
        assert_eq!(h.runs("a"), 0);
        h.gate.0.store(true, Ordering::SeqCst);
        assert_eq!(h.engine.wake().await, Outcome::Converged);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dependant_placed_before_its_prerequisite_converges_in_one_wake() {
        let mut h = harness(vec![
            ("dependant", "v1", Behaviour::NeedsReady),
            ("prerequisite", "v1", Behaviour::MakesReady),
        ]);
        assert_eq!(h.engine.wake().await, Outcome::Converged);
        assert_eq!(
            h.runs("dependant"),
            2,
            "failed once, then succeeded in the extra pass"
        );
        assert_eq!(h.flag("dependant").await.as_deref(), Some("v1"));
    }

    #[tokio::test(start_paused = true)]
    async fn failing_hanging_and_panicking_initialisers_do_not_stop_the_others() {
        let mut h = harness(vec![
            ("fails", "v1", Behaviour::Fail),
            ("hangs", "v1", Behaviour::Hang),
            ("panics", "v1", Behaviour::Panic),
            ("fine", "v1", Behaviour::Ok),
        ]);
        let outcome = h.engine.wake().await;
        assert!(matches!(outcome, Outcome::Pending(_)), "{outcome:?}");
        assert_eq!(h.flag("fine").await.as_deref(), Some("v1"));
        for name in ["fails", "hangs", "panics"] {
            assert_eq!(h.flag(name).await, None, "{name} must not store a flag");
            assert_eq!(h.status(name).await.state, State::Failed);
        }
        assert!(
            h.status("fails")
                .await
                .last_error
                .unwrap()
                .contains("deliberate failure")
        );
        assert!(
            h.status("hangs")
                .await
                .last_error
                .unwrap()
                .contains("timed out")
        );
        assert!(
            h.status("panics")
                .await
                .last_error
                .unwrap()
                .contains("deliberate panic")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_exponentially_per_initialiser() {
        let mut h = harness(vec![("fails", "v1", Behaviour::Fail)]);
        let Outcome::Pending(first) = h.engine.wake().await else {
            panic!("pending")
        };
        let delay = first - Instant::now();
        assert!(
            (12..=18).contains(&delay.as_secs()),
            "first retry near 15s: {delay:?}"
        );
        let early = h.engine.wake().await;
        assert_eq!(
            h.runs("fails"),
            1,
            "not due yet: an early wake does not retry"
        );
        assert!(matches!(early, Outcome::Pending(_)));
        tokio::time::advance(delay).await;
        let Outcome::Pending(second) = h.engine.wake().await else {
            panic!("pending")
        };
        let delay = second - Instant::now();
        assert!(
            (24..=36).contains(&delay.as_secs()),
            "second retry near 30s: {delay:?}"
        );
        assert_eq!(h.status("fails").await.attempts, 2);
        assert_eq!(h.status("fails").await.consecutive_failures, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flag_bump_reruns_only_that_initialiser_with_its_old_flag() {
        let mut h = harness(vec![("a", "v1", Behaviour::Ok), ("b", "v1", Behaviour::Ok)]);
        h.engine.wake().await;
        let mut spec = h.engine.spec().clone();
        spec.entries[1].flag = "v2".into();
        h.engine.set_spec(spec);
        assert_eq!(h.engine.wake().await, Outcome::Converged);
        assert_eq!((h.runs("a"), h.runs("b")), (1, 2));
        assert_eq!(
            *h.old_flags["b"].lock().unwrap(),
            vec![None, Some("v1".to_string())]
        );
        assert_eq!(h.flag("b").await.as_deref(), Some("v2"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flag_changed_by_someone_else_mid_run_is_not_overwritten() {
        let mut h = harness(vec![("racy", "v1", Behaviour::RacesItsFlag)]);
        let outcome = h.engine.wake().await;
        assert!(matches!(outcome, Outcome::Pending(_)), "{outcome:?}");
        assert_eq!(
            h.flag("racy").await.as_deref(),
            Some("someone-else"),
            "the precondition protected it"
        );
        assert_eq!(h.status("racy").await.state, State::StateWriteFailed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_standby_runs_nothing_while_another_holds_the_lease() {
        let mut h = harness(vec![("a", "v1", Behaviour::Ok)]);
        let held = json!({"holder": "other", "expires_at_ms": now_ms() + 60_000});
        h.store.put(lease::lease_key(), held).await.unwrap();
        assert_eq!(h.engine.wake().await, Outcome::Standby);
        assert_eq!(h.runs("a"), 0);
        assert_eq!(
            next_sleep(&Outcome::Standby, &h.engine.spec().cadence),
            Duration::from_secs(15)
        );
    }

    /// A store on which another replica finishes `a` at v1 and releases the lease in the gap
    /// between this replica's read of the flags and its taking of the lease.
    struct FinishedElsewhere {
        inner: MemoryStore,
        done: AtomicBool,
    }

    #[async_trait]
    impl Store for FinishedElsewhere {
        fn backend(&self) -> &'static str {
            "memory"
        }
        async fn revision(&self) -> Result<Revision, crate::store::Error> {
            self.inner.revision().await
        }
        async fn get(&self, key: &Key) -> Result<Option<crate::store::Entry>, crate::store::Error> {
            if *key == lease::lease_key() && !self.done.swap(true, Ordering::SeqCst) {
                let flag = status::key(INIT_STATE, "a");
                self.inner.put(flag, json!("v1")).await?;
            }
            self.inner.get(key).await
        }
        async fn list(
            &self,
            namespace: &str,
            kind: &str,
        ) -> Result<crate::store::Listing, crate::store::Error> {
            self.inner.list(namespace, kind).await
        }
        async fn namespace(
            &self,
            namespace: &str,
        ) -> Result<crate::store::NamespaceTree, crate::store::Error> {
            self.inner.namespace(namespace).await
        }
        async fn namespaces(&self) -> Result<Vec<String>, crate::store::Error> {
            self.inner.namespaces().await
        }
        async fn apply(&self, batch: Batch) -> Result<Revision, crate::store::Error> {
            self.inner.apply(batch).await
        }
        async fn watch(
            &self,
            from: Revision,
            filter: crate::store::WatchFilter,
        ) -> Result<crate::store::Watch, crate::store::Error> {
            self.inner.watch(from, filter).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_finished_by_another_replica_before_the_lease_was_taken_does_not_run_again() {
        let store: DynStore = Arc::new(FinishedElsewhere {
            inner: MemoryStore::new(Limits::default()),
            done: AtomicBool::new(false),
        });
        let mut h = harness_on(store, vec![("a", "v1", Behaviour::Ok)]);
        assert_eq!(h.engine.wake().await, Outcome::Converged);
        assert_eq!(
            h.runs("a"),
            0,
            "the flag read under the lease says v1 is done"
        );
        assert_eq!(h.flag("a").await.as_deref(), Some("v1"));
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_failures_are_marked_as_needing_an_operator() {
        let mut h = harness(vec![("fails", "v1", Behaviour::Fail)]);
        let mut spec = h.engine.spec().clone();
        spec.cadence.needs_operator_after = 3;
        h.engine.set_spec(spec);
        for _ in 0..3 {
            if let Outcome::Pending(due) = h.engine.wake().await {
                tokio::time::advance(due - Instant::now()).await;
            }
        }
        assert_eq!(h.status("fails").await.state, State::NeedsOperator);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wake_loop_wakes_early_on_a_foreign_change_to_system_and_stops_on_shutdown() {
        let h = harness(vec![("a", "v1", Behaviour::Ok)]);
        let (store, runs) = (h.store.clone(), h.runs["a"].clone());
        let shutdown = CancellationToken::new();
        let (_hup_tx, hup_rx) = tokio::sync::mpsc::channel(1);
        let spec = h.engine.spec().clone();
        let looping = tokio::spawn(
            h.engine
                .run(shutdown.clone(), hup_rx, move || Ok(spec.clone())),
        );
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // An operator resets the flag: the loop must notice long before the 300 s steady sleep.
        store.delete(status::key(INIT_STATE, "a")).await.unwrap();
        let started = Instant::now();
        while runs.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "woken by the watch, not the steady cadence"
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), looping)
            .await
            .expect("loop stops on shutdown")
            .unwrap();
    }
}
