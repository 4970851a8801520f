//! The serving engine's façade: one watcher task keeps the [`Serving`] view of `__cfgsync__`
//! current, and a node's answer is rendered on demand, once per epoch, and cached.
//!
//! A change of the registered set costs the watcher a map update and a readiness check, never
//! a render: readiness is a count or a named set. A node's files are rendered when that node
//! asks at an epoch (the revision its set was last changed at), once however many ask at the
//! same time, on a bounded pool off the async workers, and kept in a byte-bounded cache. What
//! every node shares is rendered, serialised and compressed once per epoch. Registration and
//! the checks on a node's requests are in [`super::registration`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use super::admission::{Admission, AdmissionLimits};
use super::epoch::{Rendered, Renderers, Source};
use super::isolate::Workers;
use super::materialize::RegistrationSnapshotMaterializer;
use super::payload::{Body, Stamp};
use super::policy::RenderLimits;
use super::rate::ChangeRate;
use super::render::{DEFAULT_CACHE_BYTES, RenderCache, RenderFailures, RenderPool, Weigh};
use super::report::Reports;
use super::view::{Readiness, Serving, View};
use crate::api::cfgsync::{NodeInfo, NodeState, NodesBody};
use crate::api::status::VersionCount;
use crate::backoff::Backoff;
use crate::store::{CFGSYNC_NAMESPACE, DynStore, ResumableWatch, Resumed, Revision, WatchFilter};

/// Knobs of the cfgsync service.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Strict mode: each registration gets a secret that later calls must present.
    pub strict_nodes: bool,
    /// Longest a `/node?wait=` long-poll is held.
    pub node_wait_max: Duration,
    /// Bytes of rendered payloads kept for repeated fetches of one epoch.
    pub render_cache_bytes: usize,
    /// Renders running at once (blocking threads).
    pub render_threads: usize,
    /// Fuel, deadline and output bounds of every render.
    pub render_limits: RenderLimits,
    /// The registration cap and the metadata budget.
    pub admission: AdmissionLimits,
    /// How many times a minute one node may change its IP or metadata (0: no limit).
    pub node_changes_per_minute: u32,
    /// Render processes for policies whose templates could build values without bound.
    /// `None` renders them in this process too, where only fuel and the output limit bound
    /// them: a library embedding the server sets it to a program that runs
    /// [`cli::main`](crate::cli::main) (whose `render-worker` command they run as).
    pub isolation: Option<super::isolate::Isolation>,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            strict_nodes: false,
            node_wait_max: Duration::from_secs(60),
            render_cache_bytes: DEFAULT_CACHE_BYTES,
            render_threads: RenderPool::default_threads(),
            render_limits: RenderLimits::default(),
            admission: AdmissionLimits::default(),
            node_changes_per_minute: DEFAULT_NODE_CHANGES_PER_MINUTE,
            isolation: None,
        }
    }
}

/// Reports one node may make a minute (bursts of as many): a watcher reports once per
/// payload it applies, and applies at most one every `--min-hook-interval` (2 s).
pub const REPORTS_PER_MINUTE: u32 = 60;

/// Default of [`ServiceOptions::node_changes_per_minute`]: a node that re-registers with
/// changing metadata makes every watching node reload, so a few changes a minute at most.
pub const DEFAULT_NODE_CHANGES_PER_MINUTE: u32 = 3;

/// What `/node` answers for one identifier in one view.
#[derive(Debug, Clone)]
pub enum NodeAnswer {
    /// 200 with this body.
    Ready(Arc<Body>),
    /// 425: not ready yet, with why.
    NotReady(&'static str),
    /// 425: this identifier has not registered; the answer is not held for it.
    Unregistered,
    /// 404: no config for this identifier.
    Missing,
    /// 409: an operator removed this node from a frozen set.
    Frozen,
    /// 500: this node's payload could not be built (the reason is logged).
    Failed(Arc<str>),
}

/// A cached gzip answer (`None`: compressing failed; the plain body is sent).
#[derive(Debug, Clone)]
struct Gzipped(Option<Bytes>);

impl Weigh for Gzipped {
    fn weight(&self) -> usize {
        self.0.as_ref().map_or(0, Bytes::len)
    }
}

/// Bodies smaller than this go out uncompressed: gzip would not pay for itself.
const GZIP_MIN_BYTES: usize = 1024;

/// The cfgsync service shared by the HTTP handlers.
pub struct Service {
    pub(super) store: DynStore,
    pub(super) options: ServiceOptions,
    current: watch::Receiver<Arc<Serving>>,
    pub(super) renderers: Renderers,
    rendered: RenderCache<(Arc<str>, Stamp), Rendered>,
    gzipped: RenderCache<(Arc<str>, Stamp, bool), Gzipped>,
    pub(super) reports: Reports,
    /// How often each node may report (a watcher reports at most once per hook interval).
    pub(super) report_rate: ChangeRate,
    /// One preview at a time (each renders the whole fleet on every core).
    pub(super) previewing: tokio::sync::Semaphore,
    /// Stops the rollout's steering task with the service.
    steering: std::sync::OnceLock<tokio_util::sync::DropGuard>,
    pub(super) admission: Admission,
    pub(super) changes: ChangeRate,
    /// The newest epoch this process noted for each node (so each is written once).
    fetched: std::sync::Mutex<HashMap<String, Revision>>,
}

debug_fields!(Service { options });

impl Service {
    /// Starts the watcher that loads and keeps the serving state current, and returns at once:
    /// nothing is read or rendered before the server can listen. Until the state is loaded,
    /// `/node` and `/register` wait for it (bounded), then answer 425 or 503. `custom`
    /// replaces the stored policy with a library materializer (as `serve_snapshot_cfgsync`
    /// does).
    pub async fn start(
        store: DynStore,
        options: ServiceOptions,
        custom: Option<Arc<dyn RegistrationSnapshotMaterializer>>,
    ) -> Result<Arc<Self>, crate::store::Error> {
        let (tx, rx) = watch::channel(Arc::new(Serving::default()));
        let budget = options.render_cache_bytes;
        let admission = Admission::start(store.clone(), options.admission);
        let changes = ChangeRate::new(options.node_changes_per_minute);
        let renderers = Renderers {
            pool: RenderPool::new(options.render_threads),
            workers: options
                .isolation
                .clone()
                .map(|isolation| Arc::new(Workers::new(isolation, options.render_threads))),
            failures: Arc::default(),
        };
        let service = Arc::new(Self {
            store: store.clone(),
            renderers,
            options,
            current: rx,
            // Plain and gzip answers share the budget, half each.
            rendered: RenderCache::new(budget / 2),
            gzipped: RenderCache::new(budget / 2),
            admission,
            changes,
            reports: Reports::start(store.clone()),
            report_rate: ChangeRate::new(REPORTS_PER_MINUTE),
            steering: std::sync::OnceLock::new(),
            previewing: tokio::sync::Semaphore::new(1),
            fetched: Default::default(),
        });
        let _ = service.steering.set(start_steering(&service));
        tokio::spawn(watcher(
            store,
            View::new(custom, service.options.render_limits),
            tx,
            Arc::downgrade(&service),
        ));
        Ok(service)
    }

    /// The knobs it runs with.
    pub fn options(&self) -> &ServiceOptions {
        &self.options
    }

    /// The current view.
    pub fn current(&self) -> Arc<Serving> {
        self.current.borrow().clone()
    }

    /// A receiver of view changes (for long-polls: borrow, decide, then await `changed`).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Serving>> {
        self.current.clone()
    }

    /// Waits until the view has read the stored state and reflects at least `revision`, or
    /// until `deadline`; returns the view then.
    pub async fn caught_up(&self, revision: Revision, deadline: Instant) -> Arc<Serving> {
        let current = self.current();
        if current.loaded && current.revision >= revision {
            // The common case needs no subscription.
            return current;
        }
        let mut changes = self.subscribe();
        let waited = tokio::time::timeout_at(
            deadline,
            changes.wait_for(|s| s.loaded && s.revision >= revision),
        )
        .await;
        match waited {
            Ok(Ok(serving)) => serving.clone(),
            _ => self.current(),
        }
    }

    /// Drops cached payloads of epochs older than `epoch`.
    fn forget_before(&self, epoch: Revision) {
        self.rendered.retain(|(_, stamp)| stamp.epoch >= epoch);
        self.gzipped
            .retain(|(_, stamp, from_bundle)| *from_bundle || stamp.epoch >= epoch);
    }

    /// Failed renders: their count and the last one.
    pub fn render_failures(&self) -> &RenderFailures {
        &self.renderers.failures
    }

    /// Bytes of rendered payloads held.
    pub fn cached_bytes(&self) -> usize {
        self.rendered.used() + self.gzipped.used()
    }

    /// The deadline of a `/node?wait=SECONDS`, within the server's cap.
    pub fn wait_deadline(&self, wait: Option<u64>) -> Instant {
        Instant::now() + Duration::from_secs(wait.unwrap_or(0)).min(self.options.node_wait_max)
    }

    /// The answer to `/node` for `identifier` in `serving`, rendering it if this is the
    /// first ask at its epoch.
    pub async fn answer(&self, serving: &Serving, identifier: &str) -> NodeAnswer {
        if !serving.loaded {
            return NodeAnswer::NotReady("the server is still loading its state");
        }
        if let Some((prepared, stamp)) = serving.bundle_route(identifier) {
            return NodeAnswer::Ready(prepared.body(stamp, true));
        }
        let epoch = match &serving.readiness {
            Readiness::Absent if serving.bundle.is_some() => return NodeAnswer::Missing,
            Readiness::Absent => {
                return NodeAnswer::NotReady("no bundle or policy is installed yet");
            }
            // Removed by an operator: never a stale payload, and no wait for a registration
            // that is not coming.
            _ if !serving.registrations.contains_key(identifier)
                && serving.removed.contains_key(identifier) =>
            {
                let freezes = serving.policy().is_some_and(|p| p.freeze_on_ready);
                return if freezes {
                    NodeAnswer::Frozen
                } else {
                    NodeAnswer::Missing
                };
            }
            _ if !serving.registrations.contains_key(identifier) => {
                return NodeAnswer::Unregistered;
            }
            Readiness::NotReady => {
                return NodeAnswer::NotReady("waiting for the expected nodes to register");
            }
            Readiness::Epoch(epoch) => epoch.clone(),
        };
        match &epoch.source {
            Source::Policy(policy) => {
                if !policy.serves(identifier) {
                    return NodeAnswer::Missing;
                }
                // The view's own key, shared rather than copied: a hit allocates nothing.
                let Some((registered, _)) = serving.registrations.get_key_value(identifier) else {
                    return NodeAnswer::Unregistered;
                };
                // During a rollout, a node before its wave gets the stable version.
                let (epoch, stamp) = serving.policy_route(&epoch, identifier);
                let Source::Policy(policy) = &epoch.source else {
                    return NodeAnswer::Failed(Arc::from("a rollout's version is not a policy"));
                };
                let key = (registered.clone(), stamp);
                let render = epoch.clone().render(
                    policy.clone(),
                    registered.clone(),
                    self.renderers.clone(),
                    stamp.epoch,
                );
                match self.rendered.get_or_render(key, || render).await {
                    Ok(body) => NodeAnswer::Ready(body),
                    Err(reason) => NodeAnswer::Failed(reason),
                }
            }
            Source::Custom(materializer) => {
                match epoch.catalog(materializer, &self.renderers.pool).await {
                    Ok(None) => NodeAnswer::NotReady("waiting for the expected nodes to register"),
                    Ok(Some(payloads)) => match payloads.get(identifier) {
                        Some(prepared) => {
                            let stamp = Stamp {
                                epoch: epoch.revision,
                                version: None,
                            };
                            NodeAnswer::Ready(prepared.body(stamp, false))
                        }
                        None => NodeAnswer::Missing,
                    },
                    Err(reason) => NodeAnswer::Failed(reason.clone()),
                }
            }
        }
    }

    /// The gzip form of a body for `identifier`, compressed once per epoch and kept within
    /// the budget; `None` when it is not worth it (a small body) or could not be made.
    pub async fn gzip(&self, identifier: &str, body: &Arc<Body>) -> Option<Bytes> {
        if body.bytes.len() < GZIP_MIN_BYTES {
            return None;
        }
        let stamp = Stamp {
            epoch: body.epoch,
            version: body.version,
        };
        let key = (Arc::from(identifier), stamp, body.from_bundle);
        let pool = self.renderers.pool.clone();
        let body = body.clone();
        let gzipped = self
            .gzipped
            .get_or_render(key, || async move {
                Gzipped(pool.run(move || body.gzip()).await.ok())
            })
            .await;
        gzipped.0
    }

    /// Notes that `identifier` was served its payload of `epoch`, in the store, so every
    /// server lists it: once per node and epoch, and not for a node that reports (its report
    /// says what it got).
    pub(super) fn note_fetched(&self, serving: &Serving, identifier: &str, epoch: Revision) {
        if serving.report(identifier).is_some()
            || serving
                .fetched(identifier)
                .is_some_and(|stored| stored >= epoch)
        {
            return;
        }
        let mut noted = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
        if noted.get(identifier).is_some_and(|last| *last >= epoch) {
            return;
        }
        let record = super::state::Fetched {
            epoch,
            fetched_ms: crate::clock::now_ms(),
        };
        // Noted only once queued: a record the queue had no room for is noted at the next
        // fetch.
        if self.reports.note_fetched(identifier, record) {
            noted.insert(identifier.to_string(), epoch);
        }
    }

    /// Registered nodes by the version they last reported and its result, most first.
    pub fn applied_versions(&self, serving: &Serving) -> Vec<VersionCount> {
        let mut counts: std::collections::BTreeMap<(Option<Revision>, &'static str), usize> =
            Default::default();
        for record in serving.registration_records() {
            let key = match serving.report(&record.identifier) {
                Some(report) if report.applied.is_ok() => (report.applied.version, "ok"),
                Some(report) => (report.applied.version, "failed"),
                None => (None, "not_reporting"),
            };
            *counts.entry(key).or_default() += 1;
        }
        let mut list: Vec<VersionCount> = counts
            .into_iter()
            .map(|((version, result), nodes)| VersionCount {
                version,
                result: result.to_string(),
                nodes,
            })
            .collect();
        list.sort_by_key(|count| std::cmp::Reverse(count.nodes));
        list
    }

    /// What the report task wrote.
    pub fn report_counts(&self) -> &super::report::ReportCounts {
        self.reports.counts()
    }

    /// Every registered node in member order, with its index in the current epoch and the
    /// epoch it was last served.
    pub fn nodes(&self, serving: &Serving) -> NodesBody {
        let scope = match &serving.readiness {
            Readiness::Epoch(epoch) => match &epoch.source {
                Source::Policy(policy) => Some(epoch.scope(policy)),
                Source::Custom(_) => None,
            },
            _ => None,
        };
        let current = serving.epoch();
        let mut nodes: Vec<NodeInfo> = serving
            .registration_records()
            .map(|r| {
                let id = r.identifier.as_str();
                let fetched_epoch = serving.fetched(id);
                let served = serving.served_stamp(id);
                let applied = serving.report(id).cloned();
                let state = match (&applied, served) {
                    (Some(report), _) if !report.applied.is_ok() => NodeState::Failed,
                    // The same version counts too: a node that got the same files at a new
                    // epoch writes and reports nothing.
                    (Some(report), Some(stamp))
                        if report.applied.epoch >= stamp.epoch
                            || (stamp.version.is_some()
                                && report.applied.version == stamp.version) =>
                    {
                        NodeState::Applied
                    }
                    (Some(_), _) => NodeState::Applying,
                    (None, Some(_)) => NodeState::NotReporting,
                    (None, None) => NodeState::Waiting,
                };
                NodeInfo {
                    identifier: r.identifier.clone(),
                    ip: r.ip.to_string(),
                    index: scope.as_ref().and_then(|s| s.index_of(id)),
                    first_seen_ms: r.first_seen_ms,
                    last_seen_ms: r.last_seen_ms,
                    fetched_epoch,
                    current: served.is_some_and(|s| fetched_epoch == Some(s.epoch)),
                    replaces: r.replaces.clone(),
                    served_epoch: served.map(|s| s.epoch),
                    served_version: served.and_then(|s| s.version),
                    applied,
                    state,
                }
            })
            .collect();
        nodes.sort_by_key(|n| (n.index.unwrap_or(usize::MAX), n.identifier.clone()));
        NodesBody {
            revision: serving.revision,
            epoch: current,
            nodes,
            removed: serving
                .removed
                .keys()
                .filter(|id| !serving.registrations.contains_key(id.as_ref()))
                .map(|id| id.to_string())
                .collect(),
        }
    }
}

/// Publishes a view, and drops cached payloads of epochs the new view left behind (only when
/// the epoch moved: most changes, such as a heartbeat re-registration, keep it).
fn publish(tx: &watch::Sender<Arc<Serving>>, service: &std::sync::Weak<Service>, serving: Serving) {
    let before = tx.borrow().epoch();
    if let Some(epoch) = serving.epoch()
        && before != Some(epoch)
        && let Some(service) = service.upgrade()
    {
        service.forget_before(epoch);
    }
    let _ = tx.send(Arc::new(serving));
}

/// Loads the stored state, then keeps the view current from the store's change stream;
/// reloads after a stream error.
async fn watcher(
    store: DynStore,
    mut view: View,
    tx: watch::Sender<Arc<Serving>>,
    service: std::sync::Weak<Service>,
) {
    let mut changes = ResumableWatch::new(
        store,
        // Every namespace, not only `__cfgsync__`: a change elsewhere still advances the
        // view's revision, so `/node` can tell "the view has caught up with the store" by
        // comparing it with the store's revision.
        WatchFilter::All,
        Some(CFGSYNC_NAMESPACE.to_string()),
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
        "cfgsync",
    );
    loop {
        let next = tokio::select! {
            next = changes.next() => next,
            () = tx.closed() => return,
        };
        match next {
            Resumed::Reset { tree, .. } => {
                view.load(&tree.expect("a snapshot watch resets with its namespace"));
            }
            Resumed::Event(event) => {
                view.apply(&event);
                // Coalesce a storm: take every event already waiting before publishing.
                while let Some(waiting) = changes.try_next() {
                    view.apply(&waiting);
                }
            }
        }
        publish(&tx, &service, view.rebuild());
    }
}

/// Runs until `stop` is cancelled (the service is dropped) or the service is gone.
async fn steer(service: std::sync::Weak<Service>, stop: tokio_util::sync::CancellationToken) {
    let Some(mut changes) = service.upgrade().map(|s| s.subscribe()) else {
        return;
    };
    loop {
        let serving = changes.borrow_and_update().clone();
        let wake_at_ms = match service.upgrade() {
            Some(service) => service.steer_once(&serving).await,
            None => return,
        };
        let sleep = async {
            match wake_at_ms {
                Some(at) => {
                    let wait = at.saturating_sub(crate::clock::now_ms());
                    tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = sleep => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Keeps the service's steering task alive as long as the service.
fn start_steering(service: &Arc<Service>) -> tokio_util::sync::DropGuard {
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(steer(Arc::downgrade(service), stop.clone()));
    stop.drop_guard()
}
