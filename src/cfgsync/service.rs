//! The serving engine: one watcher task keeps an in-memory view of `__cfgsync__` current, and
//! `/node` renders what it answers on demand.
//!
//! A change of the registered set costs the watcher a map update and a readiness check, never
//! a render: readiness is a count or a named set. A node's files are rendered when that node
//! asks at an epoch (the revision its set was last changed at), once however many ask at the
//! same time, on a bounded pool off the async workers, and kept in a byte-bounded cache. What
//! every node shares is rendered, serialised and compressed once per epoch.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{OnceCell, watch};

use super::admission::{Admission, AdmissionLimits};
use super::bundle::NodeArtifactsBundle;
use super::escape::push_json_str;
use super::gzip::{self, Piece};
use super::lifecycle::REMOVED;
use super::materialize::{
    NodeArtifactsCatalog, RegistrationSnapshot, RegistrationSnapshotMaterializer,
};
use super::policy::{CompiledPolicy, OnNewIp, Policy, RenderLimits, Scope};
use super::render::{DEFAULT_CACHE_BYTES, RenderCache, RenderPool, Weigh};
use super::state::{BUNDLE, CURRENT, POLICY, REGISTRATION, RegistrationRecord};
use super::{ArtifactFile, NodeRegistration};
use crate::api::cfgsync::{NodeInfo, NodesBody};
use crate::api::status::RenderFailure;
use crate::api::{ErrorBody, ErrorCode};
use crate::backoff::Backoff;
use crate::store::{
    CFGSYNC_NAMESPACE, ChangeEvent, DynStore, ResumableWatch, Resumed, Revision, WatchFilter,
};

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
        }
    }
}

/// Registrations by identifier; sorted, so iterating gives the members in template order.
/// Persistent: a clone is O(1) and an update O(log n), so each published view and epoch keeps
/// its own version of the set without copying it.
type Registrations = imbl::OrdMap<Arc<str>, Arc<RegistrationRecord>>;

/// Files every node of an epoch (or of a bundle) gets: serialised once, compressed once.
#[derive(Debug, Default)]
struct Shared {
    /// The files as JSON objects joined by commas.
    json: Vec<u8>,
    gzip: OnceLock<Piece>,
}

impl Shared {
    fn new(files: &[ArtifactFile]) -> Arc<Self> {
        Arc::new(Self {
            json: join_files(files),
            gzip: OnceLock::new(),
        })
    }

    fn piece(&self) -> &Piece {
        self.gzip.get_or_init(|| Piece::new(&self.json))
    }
}

fn join_files(files: &[ArtifactFile]) -> Vec<u8> {
    let mut out = Vec::new();
    write_files(&mut out, files);
    out
}

/// `files` as JSON objects joined by commas, as serde would write each `ArtifactFile`.
fn write_files(out: &mut Vec<u8>, files: &[ArtifactFile]) {
    let size: usize = files
        .iter()
        .map(|f| f.path.len() + f.content.len() + 24)
        .sum();
    out.reserve(size);
    for (i, file) in files.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"path\":");
        push_json_str(out, &file.path);
        out.extend_from_slice(b",\"content\":");
        push_json_str(out, &file.content);
        out.push(b'}');
    }
}

/// One node's answer body, and where the shared files sit in it.
#[derive(Debug)]
pub struct Body {
    /// `{"schema_version":1,"files":[...],"epoch":N}`.
    pub bytes: Bytes,
    /// The epoch the body carries.
    pub epoch: Revision,
    /// Whether it came from the bundle (whose epoch is the bundle's revision).
    from_bundle: bool,
    /// Length of the part before the shared files.
    head: usize,
    shared: Arc<Shared>,
}

impl Body {
    fn new(node_files: &[u8], shared: Arc<Shared>, epoch: Revision) -> Self {
        Self::assemble(|out| out.extend_from_slice(node_files), shared, epoch)
    }

    /// The body around the node's files, written by `node_files` straight into the one buffer
    /// the answer is served from (a peer list is not copied once more to get there).
    fn assemble(
        node_files: impl FnOnce(&mut Vec<u8>),
        shared: Arc<Shared>,
        epoch: Revision,
    ) -> Self {
        let mut out = Vec::with_capacity(shared.json.len() + 64);
        out.extend_from_slice(b"{\"schema_version\":1,\"files\":[");
        let start = out.len();
        node_files(&mut out);
        if out.len() > start && !shared.json.is_empty() {
            out.push(b',');
        }
        let head = out.len();
        out.extend_from_slice(&shared.json);
        out.extend_from_slice(b"],\"epoch\":");
        write!(out, "{epoch}").expect("writing to memory cannot fail");
        out.push(b'}');
        Self {
            bytes: Bytes::from(out),
            epoch,
            from_bundle: false,
            head,
            shared,
        }
    }

    /// The body gzip-compressed, the shared files' piece compressed once for all nodes.
    pub fn gzip(&self) -> Bytes {
        let tail = self.head + self.shared.json.len();
        gzip::around(
            &self.bytes[..self.head],
            self.shared.piece(),
            &self.bytes[tail..],
        )
    }
}

/// A payload prepared ahead of time (bundles, library catalogs): the node's files serialised.
#[derive(Debug)]
struct Prepared {
    files: Vec<u8>,
    shared: Arc<Shared>,
}

impl Prepared {
    /// The answer body at `epoch`.
    fn body(&self, epoch: Revision, from_bundle: bool) -> NodeAnswer {
        let mut body = Body::new(&self.files, self.shared.clone(), epoch);
        body.from_bundle = from_bundle;
        NodeAnswer::Ready(Arc::new(body))
    }
}

fn prepare_catalog(catalog: &NodeArtifactsCatalog) -> HashMap<String, Prepared> {
    let shared = Shared::new(&catalog.shared_files);
    catalog
        .nodes
        .iter()
        .map(|node| {
            let prepared = Prepared {
                files: join_files(&node.files),
                shared: shared.clone(),
            };
            (node.identifier.clone(), prepared)
        })
        .collect()
}

/// Where the epoch's payloads come from.
#[derive(Clone)]
enum Source {
    /// The stored declarative policy: rendered per node on demand.
    Policy(CompiledPolicy),
    /// A library materializer: the whole catalog, computed once per epoch on first fetch.
    Custom(Arc<dyn RegistrationSnapshotMaterializer>),
}

type Catalog = Result<Option<Arc<HashMap<String, Prepared>>>, Arc<str>>;

/// One state of the registered set that payloads are rendered for. Everything here is
/// computed at most once, and only when a node asks.
pub struct Epoch {
    /// The store revision the set last changed at; payloads carry it as `epoch`.
    pub revision: Revision,
    source: Source,
    registrations: Registrations,
    scope: OnceLock<Arc<Scope>>,
    shared: OnceLock<Result<Arc<Shared>, Arc<str>>>,
    catalog: OnceCell<Catalog>,
    cost: RenderCost,
}

/// What one epoch's per-node renders have cost so far, which decides where the next runs.
///
/// Handing a render to the pool and back costs two thread wake-ups, more than rendering a
/// small file. So once an epoch's renders have shown they are cheap, later ones run on the
/// asking request's own worker, until dear renders pass one in sixteen cheap ones, or a single
/// one takes a millisecond: then the rest of the epoch goes back to the pool. The epoch's
/// one-off work (the member list, the shared files) always runs on the pool.
///
/// A render preempted halfway looks dear once; only a pattern of dear renders counts.
#[derive(Debug, Default)]
struct RenderCost {
    cheap: AtomicU32,
    dear: AtomicU32,
    /// Set by one render far too slow for a worker: the epoch stays on the pool.
    pooled: AtomicBool,
}

impl RenderCost {
    /// A render at most this long counts as cheap: about what answering a request costs.
    const CHEAP: Duration = Duration::from_micros(50);
    /// A render this long sends the epoch to the pool at once.
    const FAR_TOO_DEAR: Duration = Duration::from_millis(1);
    /// Cheap renders measured on the pool before any runs inline.
    const WARM_UP: u32 = 16;

    fn inline(&self) -> bool {
        let cheap = self.cheap.load(Ordering::Relaxed);
        cheap >= Self::WARM_UP
            && self.dear.load(Ordering::Relaxed).saturating_mul(16) < cheap
            && !self.pooled.load(Ordering::Relaxed)
    }

    fn record(&self, took: Duration) {
        if took > Self::FAR_TOO_DEAR {
            self.pooled.store(true, Ordering::Relaxed);
        }
        let counter = if took > Self::CHEAP {
            &self.dear
        } else {
            &self.cheap
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Epoch")
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

impl Epoch {
    /// The members in order (identifier order, except that a replacement takes the place of
    /// the node it replaced), with what templates see of them (built once).
    fn scope(&self, policy: &CompiledPolicy) -> Arc<Scope> {
        self.scope
            .get_or_init(|| {
                let mut members: Vec<&RegistrationRecord> = self
                    .registrations
                    .values()
                    .filter(|r| policy.serves(&r.identifier))
                    .map(Arc::as_ref)
                    .collect();
                if members.iter().any(|r| r.slot.is_some()) {
                    members.sort_by(|a, b| {
                        (a.order(), a.identifier.as_str()).cmp(&(b.order(), b.identifier.as_str()))
                    });
                }
                Arc::new(Scope::new(
                    members
                        .into_iter()
                        .map(|r| (r.identifier.as_str(), r.ip, &r.metadata)),
                ))
            })
            .clone()
    }

    /// The shared files, rendered once per epoch.
    fn shared(&self, policy: &CompiledPolicy, scope: &Scope) -> Result<Arc<Shared>, Arc<str>> {
        self.shared
            .get_or_init(|| {
                policy
                    .render_shared(scope)
                    .map(|files| Shared::new(&files))
                    .map_err(|err| Arc::from(err.to_string()))
            })
            .clone()
    }

    /// Renders one node's answer (on a pool thread).
    fn render_node(&self, policy: &CompiledPolicy, identifier: &str) -> Rendered {
        let scope = self.scope(policy);
        let Some(index) = scope.index_of(identifier) else {
            return Err(Arc::from(format!("{identifier:?} is not a member")));
        };
        let shared = self.shared(policy, &scope)?;
        let started = Instant::now();
        let budget = policy
            .limits()
            .max_payload_bytes
            .saturating_sub(shared.json.len());
        let files = policy
            .render_node(&scope, index, budget)
            .map_err(|err| Arc::from(err.to_string()));
        let body = files.map(|files| {
            Arc::new(Body::assemble(
                |out| write_files(out, &files),
                shared,
                self.revision,
            ))
        });
        self.cost.record(started.elapsed());
        body
    }

    /// A library materializer's catalog, once computed and ready.
    fn custom_members(&self) -> Option<&HashMap<String, Prepared>> {
        match self.catalog.get() {
            Some(Ok(Some(members))) => Some(members),
            _ => None,
        }
    }

    fn snapshot(&self) -> RegistrationSnapshot {
        let nodes = self
            .registrations
            .values()
            .map(|r| NodeRegistration {
                identifier: r.identifier.clone(),
                ip: r.ip,
                metadata: r.metadata.clone(),
            })
            .collect();
        RegistrationSnapshot::new(nodes, self.revision)
    }
}

/// A rendered answer, or why it could not be rendered (kept so a failing node costs one
/// render per epoch, not one per request).
type Rendered = Result<Arc<Body>, Arc<str>>;

impl Weigh for Arc<Body> {
    fn weight(&self) -> usize {
        self.bytes.len()
    }
}

/// A cached gzip answer (`None`: compressing failed; the plain body is sent).
#[derive(Debug, Clone)]
struct Gzipped(Option<Bytes>);

impl Weigh for Gzipped {
    fn weight(&self) -> usize {
        self.0.as_ref().map_or(0, Bytes::len)
    }
}

/// The registration-backed catalog's state.
#[derive(Debug, Clone, Default)]
enum Readiness {
    /// No policy or materializer is installed.
    #[default]
    Absent,
    /// Installed, but the registered set is not ready.
    NotReady,
    /// Ready (a policy) or to be decided at the first fetch (a library materializer).
    Epoch(Arc<Epoch>),
}

/// One consistent view of the serving state.
#[derive(Debug, Clone, Default)]
pub struct Serving {
    /// The store revision this view reflects.
    pub revision: Revision,
    /// Whether the stored state has been read (false only while the server starts).
    pub loaded: bool,
    registrations: Registrations,
    bundle: Option<Arc<HashMap<String, Prepared>>>,
    bundle_epoch: Revision,
    policy: Option<CompiledPolicy>,
    readiness: Readiness,
    /// Identifiers removed by an operator (whether or not registered again since), and for
    /// each whether it was replaced by another node.
    removed: Arc<std::collections::BTreeMap<Arc<str>, bool>>,
}

/// What `/node` answers for one identifier.
#[derive(Debug, Clone)]
pub enum NodeAnswer {
    /// 200 with this body.
    Ready(Arc<Body>),
    /// 425: not ready yet, with why.
    NotReady(&'static str),
    /// 404: no config for this identifier.
    Missing,
    /// 409: an operator removed this node from a frozen set.
    Frozen,
    /// 500: this node's payload could not be built (the reason is logged).
    Failed(Arc<str>),
}

impl Serving {
    /// How many nodes registered.
    pub fn registrations(&self) -> usize {
        self.registrations.len()
    }

    /// Every registration, in identifier order.
    pub fn registration_records(&self) -> impl Iterator<Item = &RegistrationRecord> {
        self.registrations.values().map(|r| r.as_ref())
    }

    /// Whether a bundle is installed.
    pub fn has_bundle(&self) -> bool {
        self.bundle.is_some()
    }

    /// A stored registration.
    pub fn registration(&self, identifier: &str) -> Option<&RegistrationRecord> {
        self.registrations.get(identifier).map(|r| r.as_ref())
    }

    /// Whether registration-backed serving is ready (for a library materializer: whether its
    /// last computed catalog was).
    pub fn is_ready(&self) -> bool {
        match &self.readiness {
            Readiness::Epoch(epoch) => match epoch.source {
                Source::Policy(_) => true,
                Source::Custom(_) => epoch.custom_members().is_some(),
            },
            _ => false,
        }
    }

    /// The epoch payloads are served at, once ready.
    pub fn epoch(&self) -> Option<Revision> {
        match &self.readiness {
            Readiness::Epoch(epoch) => Some(epoch.revision),
            _ => None,
        }
    }

    /// The policy in force, if any.
    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_ref().map(CompiledPolicy::policy)
    }

    /// Whether a registration source (policy or materializer) is installed.
    pub fn has_materializer(&self) -> bool {
        !matches!(self.readiness, Readiness::Absent)
    }

    /// Whether an operator replaced `identifier` by another node (it may not register again).
    pub fn was_replaced(&self, identifier: &str) -> bool {
        self.removed.get(identifier).copied().unwrap_or(false)
            && !self.registrations.contains_key(identifier)
    }

    /// Whether the bundle names `identifier`; `None` when no bundle is installed.
    pub fn bundle_has(&self, identifier: &str) -> Option<bool> {
        self.bundle.as_ref().map(|b| b.contains_key(identifier))
    }

    /// Whether membership is frozen and `identifier` is not a member.
    pub fn frozen_out(&self, identifier: &str) -> bool {
        let Some(policy) = &self.policy else {
            return false;
        };
        let Readiness::Epoch(epoch) = &self.readiness else {
            return false;
        };
        if !policy.policy().freeze_on_ready {
            return false;
        }
        match epoch.source {
            Source::Policy(_) => {
                !(epoch.registrations.contains_key(identifier) && policy.serves(identifier))
            }
            // A library materializer's members are known once it produced a catalog.
            Source::Custom(_) => epoch
                .custom_members()
                .is_some_and(|members| !members.contains_key(identifier)),
        }
    }
}

/// The cfgsync service shared by the HTTP handlers.
pub struct Service {
    /// The store holding `__cfgsync__`.
    pub store: DynStore,
    /// Knobs.
    pub options: ServiceOptions,
    current: watch::Receiver<Arc<Serving>>,
    pool: RenderPool,
    rendered: RenderCache<(Arc<str>, Revision), Rendered>,
    gzipped: RenderCache<(Arc<str>, Revision, bool), Gzipped>,
    failures: Arc<RenderFailures>,
    /// Where registrations are admitted and stored.
    pub admission: Admission,
    /// The epoch each node was last served, since this process started.
    fetched: std::sync::Mutex<HashMap<String, Revision>>,
}

impl Service {
    /// Notes that `identifier` was served its payload of `epoch`.
    pub fn note_fetched(&self, identifier: &str, epoch: Revision) {
        let mut fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
        match fetched.get_mut(identifier) {
            Some(last) => *last = (*last).max(epoch),
            None => {
                fetched.insert(identifier.to_string(), epoch);
            }
        }
    }

    /// Every registered node in member order, with its index in the current epoch and the
    /// epoch it was last served.
    pub fn nodes(&self, serving: &Serving) -> NodesBody {
        let epoch = match &serving.readiness {
            Readiness::Epoch(epoch) => Some(epoch.clone()),
            _ => None,
        };
        let scope = epoch.as_ref().and_then(|e| match &e.source {
            Source::Policy(policy) => Some(e.scope(policy)),
            Source::Custom(_) => None,
        });
        let fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
        let current = serving.epoch();
        let mut nodes: Vec<NodeInfo> = serving
            .registrations
            .values()
            .map(|r| {
                let fetched_epoch = fetched.get(r.identifier.as_str()).copied();
                NodeInfo {
                    identifier: r.identifier.clone(),
                    ip: r.ip.to_string(),
                    index: scope.as_ref().and_then(|s| s.index_of(&r.identifier)),
                    first_seen_ms: r.first_seen_ms,
                    last_seen_ms: r.last_seen_ms,
                    fetched_epoch,
                    current: current.is_some() && fetched_epoch == current,
                    replaces: r.replaces.clone(),
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

/// Renders that failed: a count for `/metrics`, and the last one for `/v1/status`.
#[derive(Debug, Default)]
pub struct RenderFailures {
    /// Failed renders since start (each node and epoch counted once: failures are cached).
    pub count: prometheus_client::metrics::counter::Counter,
    last: std::sync::Mutex<Option<RenderFailure>>,
}

impl RenderFailures {
    fn note(&self, identifier: &str, epoch: Revision, reason: &str) {
        self.count.inc();
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(RenderFailure {
            identifier: identifier.to_string(),
            epoch,
            reason: reason.to_string(),
        });
    }

    /// The most recent failure.
    pub fn last(&self) -> Option<RenderFailure> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Bodies smaller than this go out uncompressed: gzip would not pay for itself.
const GZIP_MIN_BYTES: usize = 1024;

impl Service {
    /// Starts the watcher that loads and keeps the serving state current, and returns at once:
    /// nothing is read or rendered before the server can listen. Until the state is loaded,
    /// `/node` and `/register` wait for it (bounded), then answer 425 or 503. `custom` replaces the stored policy
    /// with a library materializer (as `serve_snapshot_cfgsync` does).
    pub async fn start(
        store: DynStore,
        options: ServiceOptions,
        custom: Option<Arc<dyn RegistrationSnapshotMaterializer>>,
    ) -> Result<Arc<Self>, crate::store::Error> {
        let (tx, rx) = watch::channel(Arc::new(Serving::default()));
        let budget = options.render_cache_bytes;
        let admission = Admission::start(store.clone(), options.admission);
        let service = Arc::new(Self {
            store: store.clone(),
            pool: RenderPool::new(options.render_threads),
            options,
            current: rx,
            // Plain and gzip answers share the budget, half each.
            rendered: RenderCache::new(budget / 2),
            gzipped: RenderCache::new(budget / 2),
            failures: Arc::default(),
            admission,
            fetched: Default::default(),
        });
        tokio::spawn(watcher(
            store,
            View::new(custom, service.options.render_limits),
            tx,
            Arc::downgrade(&service),
        ));
        Ok(service)
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
    pub async fn caught_up(
        &self,
        revision: Revision,
        deadline: tokio::time::Instant,
    ) -> Arc<Serving> {
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
        self.rendered.retain(|(_, e)| *e >= epoch);
        self.gzipped
            .retain(|(_, e, from_bundle)| *from_bundle || *e >= epoch);
    }

    /// Failed renders: their count and the last one.
    pub fn render_failures(&self) -> &RenderFailures {
        &self.failures
    }

    /// Bytes of rendered payloads held.
    pub fn cached_bytes(&self) -> usize {
        self.rendered.used() + self.gzipped.used()
    }

    /// The answer to `/node` for `identifier` in `serving`, rendering it if this is the
    /// first ask at its epoch.
    pub async fn answer(&self, serving: &Serving, identifier: &str) -> NodeAnswer {
        if !serving.loaded {
            return NodeAnswer::NotReady("the server is still loading its state");
        }
        if let Some(prepared) = serving.bundle.as_ref().and_then(|b| b.get(identifier)) {
            return prepared.body(serving.bundle_epoch, true);
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
                let freezes = serving
                    .policy
                    .as_ref()
                    .is_some_and(|p| p.policy().freeze_on_ready);
                return if freezes {
                    NodeAnswer::Frozen
                } else {
                    NodeAnswer::Missing
                };
            }
            _ if !serving.registrations.contains_key(identifier) => {
                return NodeAnswer::NotReady("this identifier has not registered");
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
                    return NodeAnswer::NotReady("this identifier has not registered");
                };
                let key: (Arc<str>, Revision) = (registered.clone(), epoch.revision);
                let rendered = self
                    .rendered
                    .get_or_render(key, || {
                        let (pool, policy, epoch) =
                            (self.pool.clone(), policy.clone(), epoch.clone());
                        let (id, failures) = (registered.clone(), self.failures.clone());
                        let at = epoch.revision;
                        async move {
                            let started = Instant::now();
                            let inline = epoch.cost.inline();
                            let render = move || epoch.render_node(&policy, &id);
                            let result = if inline {
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(render))
                                    .unwrap_or_else(|_| Err(Arc::from("the render panicked")))
                            } else {
                                pool.run(render)
                                    .await
                                    .unwrap_or_else(|err| Err(Arc::from(err)))
                            };
                            tracing::debug!(
                                identifier,
                                elapsed_us = started.elapsed().as_micros() as u64,
                                inline,
                                ok = result.is_ok(),
                                "rendered a payload"
                            );
                            if let Err(reason) = &result {
                                // Logged and counted once: the failure is cached for the epoch.
                                tracing::error!(identifier, epoch = at, %reason, "this node's payload could not be rendered");
                                failures.note(identifier, at, reason);
                            }
                            result
                        }
                    })
                    .await;
                match rendered {
                    Ok(body) => NodeAnswer::Ready(body),
                    Err(reason) => NodeAnswer::Failed(reason),
                }
            }
            Source::Custom(materializer) => {
                let catalog = epoch
                    .catalog
                    .get_or_init(|| {
                        let (pool, materializer, epoch2) =
                            (self.pool.clone(), materializer.clone(), epoch.clone());
                        async move {
                            let snapshot = epoch2.snapshot();
                            let result = pool
                                .run(move || {
                                    materializer
                                        .materialize_snapshot(&snapshot)
                                        .map(|c| c.map(|c| Arc::new(prepare_catalog(&c))))
                                        .map_err(|err| Arc::from(err.to_string()))
                                })
                                .await;
                            result.unwrap_or_else(|err| Err(Arc::from(err)))
                        }
                    })
                    .await;
                match catalog {
                    Ok(None) => NodeAnswer::NotReady("waiting for the expected nodes to register"),
                    Ok(Some(payloads)) => match payloads.get(identifier) {
                        Some(prepared) => prepared.body(epoch.revision, false),
                        None => NodeAnswer::Missing,
                    },
                    Err(reason) => {
                        tracing::error!(epoch = epoch.revision, %reason, "materialisation failed");
                        NodeAnswer::Failed(reason.clone())
                    }
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
        let key = (Arc::from(identifier), body.epoch, body.from_bundle);
        let pool = self.pool.clone();
        let body = body.clone();
        let gzipped = self
            .gzipped
            .get_or_render(key, || async move {
                Gzipped(pool.run(move || body.gzip()).await.ok())
            })
            .await;
        gzipped.0
    }
}

/// The watcher's working state: raw records, rebuilt into a [`Serving`] after changes.
struct View {
    revision: Revision,
    registrations: Registrations,
    removed: Arc<std::collections::BTreeMap<Arc<str>, bool>>,
    bundle: Option<(Value, Revision)>,
    policy: Option<(Value, Revision)>,
    custom: Option<Arc<dyn RegistrationSnapshotMaterializer>>,
    limits: RenderLimits,
    /// Set when the registered set or the source changed since the last rebuild.
    dirty_catalog: bool,
    /// Registered members of the policy's named set, kept as registrations come and go.
    named_present: usize,
    /// Set when `named_present` must be counted afresh (after a load or a policy change).
    recount: bool,
    dirty_bundle: bool,
    last: Serving,
}

impl View {
    fn new(
        custom: Option<Arc<dyn RegistrationSnapshotMaterializer>>,
        limits: RenderLimits,
    ) -> Self {
        Self {
            revision: 0,
            registrations: Registrations::new(),
            removed: Arc::default(),
            bundle: None,
            policy: None,
            custom,
            limits,
            dirty_catalog: true,
            dirty_bundle: true,
            named_present: 0,
            recount: true,
            last: Serving::default(),
        }
    }

    fn load(&mut self, tree: &crate::store::NamespaceTree) {
        self.revision = tree.revision;
        let mut registrations = Registrations::new();
        if let Some(records) = tree.types.get(REGISTRATION) {
            for (id, entry) in records {
                if let Some(record) = decode_registration(id, &entry.value) {
                    registrations.insert(Arc::from(id.as_str()), record);
                }
            }
        }
        self.registrations = registrations;
        self.removed = Arc::new(
            tree.types
                .get(REMOVED)
                .map(|markers| {
                    markers
                        .iter()
                        .map(|(id, e)| (Arc::from(id.as_str()), replaced(&e.value)))
                        .collect()
                })
                .unwrap_or_default(),
        );
        self.bundle = tree
            .types
            .get(BUNDLE)
            .and_then(|t| t.get(CURRENT))
            .map(|e| (e.value.clone(), e.mod_revision));
        self.policy = tree
            .types
            .get(POLICY)
            .and_then(|t| t.get(CURRENT))
            .map(|e| (e.value.clone(), e.mod_revision));
        self.dirty_catalog = true;
        self.dirty_bundle = true;
        self.recount = true;
    }

    fn apply(&mut self, event: &ChangeEvent) {
        self.revision = event.revision;
        for change in &event.changes {
            let key = &change.key;
            // The watch sees every namespace so that the view's revision keeps pace with the
            // store's (see `watcher`); only `__cfgsync__` changes what is served.
            if key.namespace != CFGSYNC_NAMESPACE {
                continue;
            }
            match (key.kind.as_str(), &change.value) {
                (REGISTRATION, Some(value)) => {
                    let Some(record) = decode_registration(&key.key, value) else {
                        continue;
                    };
                    let before = self
                        .registrations
                        .insert(Arc::from(key.key.as_str()), record.clone());
                    // A re-registration that changes nothing a template sees, or a node a
                    // named set does not serve, renders nothing and keeps the epoch.
                    let changed = before
                        .as_ref()
                        .is_none_or(|old| old.ip != record.ip || old.metadata != record.metadata);
                    let visible = self.visible(&key.key);
                    self.dirty_catalog |= changed && visible;
                    if before.is_none() && visible {
                        self.named_present += 1;
                    }
                }
                (REGISTRATION, None) if self.registrations.contains_key(key.key.as_str()) => {
                    self.registrations.remove(key.key.as_str());
                    if self.visible(&key.key) {
                        self.dirty_catalog = true;
                        self.named_present = self.named_present.saturating_sub(1);
                    }
                }
                (REMOVED, Some(value)) => {
                    Arc::make_mut(&mut self.removed)
                        .insert(Arc::from(key.key.as_str()), replaced(value));
                }
                (REMOVED, None) => {
                    Arc::make_mut(&mut self.removed).remove(key.key.as_str());
                }
                (BUNDLE, value) if key.key == CURRENT => {
                    self.bundle = value.clone().map(|v| (v, event.revision));
                    self.dirty_bundle = true;
                    // A node moved between the bundle and the policy must see a newer epoch,
                    // never an older one (a watcher waits for a newer one).
                    self.dirty_catalog = true;
                }
                (POLICY, value) if key.key == CURRENT => {
                    self.policy = value.clone().map(|v| (v, event.revision));
                    self.dirty_catalog = true;
                    self.recount = true;
                }
                _ => {}
            }
        }
    }

    /// Whether templates (or a library materializer) can see `identifier`: a policy with a
    /// named set sees only its members; a policy change re-checks everything anyway.
    fn visible(&self, identifier: &str) -> bool {
        match (&self.custom, &self.last.policy) {
            (None, Some(policy)) => policy.serves(identifier),
            _ => true,
        }
    }

    /// The new view: a map handle, a readiness check and perhaps a new epoch. Nothing is
    /// rendered here.
    fn rebuild(&mut self) -> Serving {
        let mut next = self.last.clone();
        next.revision = self.revision;
        next.loaded = true;
        next.registrations = self.registrations.clone();
        next.removed = self.removed.clone();
        if self.dirty_bundle {
            next.bundle_epoch = self.bundle.as_ref().map_or(0, |(_, epoch)| *epoch);
            next.bundle = self
                .bundle
                .as_ref()
                .and_then(|(value, _)| prepare_bundle(value));
            self.dirty_bundle = false;
        }
        if self.dirty_catalog {
            next.policy = self
                .policy
                .as_ref()
                .and_then(|(value, _)| compile_policy(value, self.limits));
            let source = match (&self.custom, &next.policy) {
                (Some(custom), _) => Some(Source::Custom(custom.clone())),
                (None, Some(policy)) => Some(Source::Policy(policy.clone())),
                (None, None) => None,
            };
            let registrations = &self.registrations;
            let ready = match &source {
                None => None,
                Some(Source::Custom(_)) => Some(!registrations.is_empty()),
                Some(Source::Policy(policy)) => {
                    if self.recount {
                        // Once per load or policy change; registrations keep it current.
                        self.named_present =
                            registrations.keys().filter(|id| policy.serves(id)).count();
                        self.recount = false;
                    }
                    Some(policy.is_ready(registrations.len(), self.named_present))
                }
            };
            next.readiness = match (source, ready) {
                (Some(source), Some(true)) => Readiness::Epoch(Arc::new(Epoch {
                    revision: self.revision,
                    source,
                    registrations: registrations.clone(),
                    scope: OnceLock::new(),
                    shared: OnceLock::new(),
                    catalog: OnceCell::new(),
                    cost: RenderCost::default(),
                })),
                (Some(_), _) => Readiness::NotReady,
                (None, _) => Readiness::Absent,
            };
            self.dirty_catalog = false;
        }
        self.last = next.clone();
        next
    }
}

/// Whether a removal marker says the node was replaced by another.
fn replaced(marker: &Value) -> bool {
    marker.get("replaced_by").is_some_and(|by| !by.is_null())
}

fn decode_registration(id: &str, value: &Value) -> Option<Arc<RegistrationRecord>> {
    match serde_json::from_value::<RegistrationRecord>(value.clone()) {
        Ok(record) => Some(Arc::new(record)),
        Err(err) => {
            tracing::warn!(identifier = id, error = %err, "ignoring a malformed registration record");
            None
        }
    }
}

fn prepare_bundle(value: &Value) -> Option<Arc<HashMap<String, Prepared>>> {
    let bundle: NodeArtifactsBundle = match serde_json::from_value(value.clone()) {
        Ok(bundle) => bundle,
        Err(err) => {
            tracing::error!(error = %err, "the stored bundle does not decode; serving none");
            return None;
        }
    };
    // Whoever wrote it (a `/v1` writer, an older release), a bundle is checked as a file
    // would be before anything of it is served.
    if let Err(problems) = bundle.validate() {
        tracing::error!(problems = ?problems, "the stored bundle is invalid; serving none");
        return None;
    }
    // A bundle is a catalog that was computed ahead of time.
    let nodes = bundle
        .nodes
        .into_iter()
        .map(|node| super::NodeArtifacts {
            identifier: node.identifier,
            files: node.files,
        })
        .collect();
    let catalog = NodeArtifactsCatalog::new(nodes).with_shared_files(bundle.shared_files);
    Some(Arc::new(prepare_catalog(&catalog)))
}

fn compile_policy(value: &Value, limits: RenderLimits) -> Option<CompiledPolicy> {
    let policy: Policy = match serde_json::from_value(value.clone()) {
        Ok(policy) => policy,
        Err(err) => {
            tracing::error!(error = %err, "the stored policy does not decode; serving none");
            return None;
        }
    };
    match policy.compile_with(limits) {
        Ok(compiled) => Some(compiled),
        Err(problems) => {
            tracing::error!(problems = ?problems, "the stored policy is invalid; serving none");
            None
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

/// Whether `policy` allows `registration` given the stored `existing` record and the view.
pub(crate) fn admission(
    serving: &Serving,
    registration: &NodeRegistration,
    existing: Option<&RegistrationRecord>,
) -> Result<(), ErrorBody> {
    let id = &registration.identifier;
    let bundle_only = !serving.has_materializer();
    if bundle_only && serving.bundle_has(id) == Some(false) {
        return Err(ErrorBody::new(
            ErrorCode::MissingConfig,
            format!("the bundle has no config for {id:?}"),
        ));
    }
    // A policy's cap and freeze are decided by the admission ledger, in the store batch;
    // a library materializer's frozen membership is only known to the view.
    if existing.is_none() && serving.policy().is_none() && serving.frozen_out(id) {
        return Err(ErrorBody::new(
            ErrorCode::Frozen,
            format!(
                "membership is frozen since the deployment became ready; {id:?} is not a member"
            ),
        ));
    }
    if let Some(policy) = serving.policy() {
        if policy.on_new_ip == OnNewIp::Reject
            && let Some(old) = existing
            && old.ip != registration.ip
        {
            return Err(ErrorBody::new(
                ErrorCode::IpChanged,
                format!(
                    "{id:?} registered with {}; the policy refuses a new IP",
                    old.ip
                ),
            ));
        }
    }
    Ok(())
}
