//! The serving engine: one watcher task keeps an in-memory view of `__cfgsync__`, materialises
//! payloads once per change of the registered set, and publishes the result; requests only
//! look it up.
//!
//! Materialisation happens in exactly one place (the watcher), so it is single-flight by
//! construction: a storm of requests never renders twice. Each node's files and the shared
//! files are kept pre-serialised separately, so memory stays linear in the cluster size even
//! when a shared file lists every peer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::watch;

use super::bundle::NodeArtifactsBundle;
use super::materialize::{
    NodeArtifacts, NodeArtifactsCatalog, RegistrationSnapshot, RegistrationSnapshotMaterializer,
};
use super::policy::{CompiledPolicy, OnNewIp, Policy};
use super::state::{BUNDLE, CURRENT, POLICY, REGISTRATION, RegistrationRecord};
use super::{ArtifactFile, NodeRegistration};
use crate::store::{CFGSYNC_NAMESPACE, ChangeEvent, DynStore, Revision, WatchFilter};

/// Knobs of the cfgsync service.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Strict mode: each registration gets a secret that later calls must present.
    pub strict_nodes: bool,
    /// Longest a `/node?wait=` long-poll is held.
    pub node_wait_max: Duration,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            strict_nodes: false,
            node_wait_max: Duration::from_secs(60),
        }
    }
}

/// A node's payload, pre-serialised: its own files as JSON objects joined by commas.
#[derive(Debug, Clone)]
struct Prepared {
    files: Arc<str>,
    shared: Arc<str>,
    epoch: Revision,
}

impl Prepared {
    /// The `200` body: `{"schema_version":1,"files":[...],"epoch":N}`.
    fn body(&self) -> String {
        let mut out = String::with_capacity(self.files.len() + self.shared.len() + 64);
        out.push_str("{\"schema_version\":1,\"files\":[");
        out.push_str(&self.files);
        if !self.files.is_empty() && !self.shared.is_empty() {
            out.push(',');
        }
        out.push_str(&self.shared);
        out.push_str("],\"epoch\":");
        out.push_str(&self.epoch.to_string());
        out.push('}');
        out
    }
}

fn join_files(files: &[ArtifactFile]) -> Arc<str> {
    let parts: Vec<String> = files
        .iter()
        .map(|f| serde_json::to_string(f).expect("files always serialise"))
        .collect();
    Arc::from(parts.join(","))
}

/// The registration-backed catalog's state.
#[derive(Debug, Clone, Default)]
enum Catalog {
    /// No policy or materializer is installed.
    #[default]
    Absent,
    /// Installed, but the registered set is not ready.
    NotReady,
    /// Ready: the member set and their payloads.
    Ready {
        members: Arc<HashSet<String>>,
        payloads: Arc<HashMap<String, Prepared>>,
    },
    /// Materialisation failed; the reason is logged and nodes get 500.
    Failed,
}

/// One consistent view of the serving state.
#[derive(Debug, Clone, Default)]
pub struct Serving {
    /// The store revision this view reflects.
    pub revision: Revision,
    registrations: Arc<HashMap<String, RegistrationRecord>>,
    bundle: Option<Arc<HashMap<String, Prepared>>>,
    policy: Option<CompiledPolicy>,
    catalog: Catalog,
}

/// What `/node` answers for one identifier.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeAnswer {
    /// 200 with this body.
    Ready(String),
    /// 425: not ready yet, with why.
    NotReady(&'static str),
    /// 404: no config for this identifier.
    Missing,
    /// 500: materialisation failed (details in the server log).
    Failed,
}

impl Serving {
    /// How many nodes registered.
    pub fn registrations(&self) -> usize {
        self.registrations.len()
    }

    /// Every registration, in no particular order.
    pub fn registration_records(&self) -> impl Iterator<Item = &RegistrationRecord> {
        self.registrations.values()
    }

    /// Whether a bundle is installed.
    pub fn has_bundle(&self) -> bool {
        self.bundle.is_some()
    }

    /// A stored registration.
    pub fn registration(&self, identifier: &str) -> Option<&RegistrationRecord> {
        self.registrations.get(identifier)
    }

    /// Whether registration-backed serving is ready.
    pub fn is_ready(&self) -> bool {
        matches!(self.catalog, Catalog::Ready { .. })
    }

    /// The policy in force, if any.
    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_ref().map(CompiledPolicy::policy)
    }

    /// Whether a registration source (policy or materializer) is installed.
    pub fn has_materializer(&self) -> bool {
        !matches!(self.catalog, Catalog::Absent)
    }

    /// Whether the bundle names `identifier`; `None` when no bundle is installed.
    pub fn bundle_has(&self, identifier: &str) -> Option<bool> {
        self.bundle.as_ref().map(|b| b.contains_key(identifier))
    }

    /// Whether membership is frozen and `identifier` is not a member.
    pub fn frozen_out(&self, identifier: &str) -> bool {
        let freeze = self
            .policy
            .as_ref()
            .is_some_and(|p| p.policy().freeze_on_ready);
        match &self.catalog {
            Catalog::Ready { members, .. } if freeze => !members.contains(identifier),
            _ => false,
        }
    }

    /// The answer to `/node` for `identifier`, by the rules of the serving models.
    pub fn answer(&self, identifier: &str) -> NodeAnswer {
        if let Some(prepared) = self.bundle.as_ref().and_then(|b| b.get(identifier)) {
            return NodeAnswer::Ready(prepared.body());
        }
        match &self.catalog {
            Catalog::Absent if self.bundle.is_some() => NodeAnswer::Missing,
            Catalog::Absent => NodeAnswer::NotReady("no bundle or policy is installed yet"),
            _ if !self.registrations.contains_key(identifier) => {
                NodeAnswer::NotReady("this identifier has not registered")
            }
            Catalog::NotReady => NodeAnswer::NotReady("waiting for the expected nodes to register"),
            Catalog::Failed => NodeAnswer::Failed,
            Catalog::Ready { payloads, .. } => match payloads.get(identifier) {
                Some(prepared) => NodeAnswer::Ready(prepared.body()),
                None => NodeAnswer::Missing,
            },
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
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Loads the serving state and starts the watcher that keeps it current. `custom` replaces
    /// the stored policy with a library materializer (as `serve_snapshot_cfgsync` does).
    pub async fn start(
        store: DynStore,
        options: ServiceOptions,
        custom: Option<Arc<dyn RegistrationSnapshotMaterializer>>,
    ) -> Result<Arc<Self>, crate::store::Error> {
        let mut view = View::new(custom);
        let tree = store.namespace(CFGSYNC_NAMESPACE).await?;
        view.load(&tree);
        let first = Arc::new(view.rebuild().await);
        let (tx, rx) = watch::channel(first);
        tokio::spawn(watcher(store.clone(), view, tx));
        Ok(Arc::new(Self {
            store,
            options,
            current: rx,
        }))
    }

    /// The current view.
    pub fn current(&self) -> Arc<Serving> {
        self.current.borrow().clone()
    }

    /// A receiver of view changes (for long-polls: borrow, decide, then await `changed`).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Serving>> {
        self.current.clone()
    }
}

/// The watcher's working state: raw records, rebuilt into a [`Serving`] after changes.
struct View {
    revision: Revision,
    registrations: HashMap<String, RegistrationRecord>,
    bundle: Option<(Value, Revision)>,
    policy: Option<(Value, Revision)>,
    custom: Option<Arc<dyn RegistrationSnapshotMaterializer>>,
    /// Set when the registered set or the source changed since the last materialisation.
    dirty_catalog: bool,
    dirty_bundle: bool,
    last: Serving,
}

impl View {
    fn new(custom: Option<Arc<dyn RegistrationSnapshotMaterializer>>) -> Self {
        Self {
            revision: 0,
            registrations: HashMap::new(),
            bundle: None,
            policy: None,
            custom,
            dirty_catalog: true,
            dirty_bundle: true,
            last: Serving::default(),
        }
    }

    fn load(&mut self, tree: &crate::store::NamespaceTree) {
        self.revision = tree.revision;
        self.registrations.clear();
        if let Some(records) = tree.types.get(REGISTRATION) {
            for (id, entry) in records {
                self.put_registration(id, &entry.value);
            }
        }
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
    }

    fn put_registration(&mut self, id: &str, value: &Value) {
        match serde_json::from_value::<RegistrationRecord>(value.clone()) {
            Ok(record) => {
                self.registrations.insert(id.to_string(), record);
            }
            Err(err) => {
                tracing::warn!(identifier = id, error = %err, "ignoring a malformed registration record")
            }
        }
    }

    fn apply(&mut self, event: &ChangeEvent) {
        self.revision = event.revision;
        for change in &event.changes {
            let key = &change.key;
            match (key.kind.as_str(), &change.value) {
                (REGISTRATION, Some(value)) => {
                    let before = self
                        .registrations
                        .get(&key.key)
                        .map(|r| (r.ip, r.metadata.clone()));
                    self.put_registration(&key.key, value);
                    let after = self
                        .registrations
                        .get(&key.key)
                        .map(|r| (r.ip, r.metadata.clone()));
                    // A re-registration that changes nothing a template sees renders nothing.
                    self.dirty_catalog |= before != after;
                }
                (REGISTRATION, None) => {
                    self.dirty_catalog |= self.registrations.remove(&key.key).is_some();
                }
                (BUNDLE, value) if key.key == CURRENT => {
                    self.bundle = value.clone().map(|v| (v, event.revision));
                    self.dirty_bundle = true;
                }
                (POLICY, value) if key.key == CURRENT => {
                    self.policy = value.clone().map(|v| (v, event.revision));
                    self.dirty_catalog = true;
                }
                _ => {}
            }
        }
    }

    /// Rebuilds what changed (bundle payloads, policy, catalog) and returns the new view.
    async fn rebuild(&mut self) -> Serving {
        let mut next = self.last.clone();
        next.revision = self.revision;
        if self.dirty_bundle {
            next.bundle = self
                .bundle
                .as_ref()
                .and_then(|(value, epoch)| prepare_bundle(value, *epoch));
            self.dirty_bundle = false;
        }
        if self.dirty_catalog {
            next.registrations = Arc::new(self.registrations.clone());
            next.policy = self
                .policy
                .as_ref()
                .and_then(|(value, _)| compile_policy(value));
            let materializer: Option<Arc<dyn RegistrationSnapshotMaterializer>> = match &self.custom
            {
                Some(custom) => Some(custom.clone()),
                None => next
                    .policy
                    .clone()
                    .map(|p| Arc::new(p) as Arc<dyn RegistrationSnapshotMaterializer>),
            };
            next.catalog = match materializer {
                None => Catalog::Absent,
                Some(materializer) => {
                    materialize(materializer, &self.registrations, self.revision).await
                }
            };
            self.dirty_catalog = false;
        }
        self.last = next.clone();
        next
    }
}

fn prepare_bundle(value: &Value, epoch: Revision) -> Option<Arc<HashMap<String, Prepared>>> {
    let bundle: NodeArtifactsBundle = match serde_json::from_value(value.clone()) {
        Ok(bundle) => bundle,
        Err(err) => {
            tracing::error!(error = %err, "the stored bundle does not decode; serving none");
            return None;
        }
    };
    // A bundle is a catalog that was computed ahead of time.
    let nodes = bundle
        .nodes
        .into_iter()
        .map(|node| NodeArtifacts {
            identifier: node.identifier,
            files: node.files,
        })
        .collect();
    let catalog = NodeArtifactsCatalog::new(nodes).with_shared_files(bundle.shared_files);
    Some(Arc::new(prepare_catalog(&catalog, epoch)))
}

fn compile_policy(value: &Value) -> Option<CompiledPolicy> {
    let policy: Policy = match serde_json::from_value(value.clone()) {
        Ok(policy) => policy,
        Err(err) => {
            tracing::error!(error = %err, "the stored policy does not decode; serving none");
            return None;
        }
    };
    match policy.compile() {
        Ok(compiled) => Some(compiled),
        Err(problems) => {
            tracing::error!(problems = ?problems, "the stored policy is invalid; serving none");
            None
        }
    }
}

async fn materialize(
    materializer: Arc<dyn RegistrationSnapshotMaterializer>,
    registrations: &HashMap<String, RegistrationRecord>,
    revision: Revision,
) -> Catalog {
    let nodes: Vec<NodeRegistration> = registrations
        .values()
        .map(|r| NodeRegistration {
            identifier: r.identifier.clone(),
            ip: r.ip,
            metadata: r.metadata.clone(),
        })
        .collect();
    let snapshot = RegistrationSnapshot::new(nodes, revision);
    let started = std::time::Instant::now();
    // Rendering is CPU work that grows with the cluster: keep it off the request threads.
    let result =
        tokio::task::spawn_blocking(move || materializer.materialize_snapshot(&snapshot)).await;
    let catalog = match result {
        Ok(Ok(Some(catalog))) => catalog,
        Ok(Ok(None)) => return Catalog::NotReady,
        Ok(Err(err)) => {
            tracing::error!(error = %err, revision, "materialisation failed");
            return Catalog::Failed;
        }
        Err(err) => {
            tracing::error!(error = %err, revision, "materialisation panicked");
            return Catalog::Failed;
        }
    };
    let payloads = prepare_catalog(&catalog, revision);
    tracing::info!(
        nodes = payloads.len(),
        revision,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "materialised node payloads"
    );
    Catalog::Ready {
        members: Arc::new(payloads.keys().cloned().collect()),
        payloads: Arc::new(payloads),
    }
}

fn prepare_catalog(catalog: &NodeArtifactsCatalog, epoch: Revision) -> HashMap<String, Prepared> {
    let shared = join_files(&catalog.shared_files);
    catalog
        .nodes
        .iter()
        .map(|node| {
            let prepared = Prepared {
                files: join_files(&node.files),
                shared: shared.clone(),
                epoch,
            };
            (node.identifier.clone(), prepared)
        })
        .collect()
}

/// Keeps the view current from the store's change stream; reloads after a stream error.
async fn watcher(store: DynStore, mut view: View, tx: watch::Sender<Arc<Serving>>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut stream = match store
            .watch(
                view.revision,
                WatchFilter::Namespace(CFGSYNC_NAMESPACE.into()),
            )
            .await
        {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "cfgsync cannot watch the store; retrying");
                if !sleep_or_closed(&tx, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                if let Ok(tree) = store.namespace(CFGSYNC_NAMESPACE).await {
                    view.load(&tree);
                    let _ = tx.send(Arc::new(view.rebuild().await));
                }
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                () = tx.closed() => return,
            };
            match next {
                Some(Ok(event)) => {
                    backoff = Duration::from_millis(100);
                    view.apply(&event);
                    // Coalesce a storm: take every event already waiting before rebuilding.
                    while let Some(Some(Ok(event))) = stream.next().now_or_never() {
                        view.apply(&event);
                    }
                    let serving = view.rebuild().await;
                    let _ = tx.send(Arc::new(serving));
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "cfgsync change stream broke; reloading");
                    break;
                }
                None => {
                    if !sleep_or_closed(&tx, backoff).await {
                        return;
                    }
                    break;
                }
            }
        }
        match store.namespace(CFGSYNC_NAMESPACE).await {
            Ok(tree) => {
                view.load(&tree);
                let _ = tx.send(Arc::new(view.rebuild().await));
            }
            Err(err) => {
                tracing::warn!(error = %err, "cfgsync cannot reload its state; retrying");
                if !sleep_or_closed(&tx, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Sleeps, returning `false` early when every reader of the view is gone (server dropped).
async fn sleep_or_closed(tx: &watch::Sender<Arc<Serving>>, pause: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(pause) => true,
        () = tx.closed() => false,
    }
}

/// Whether `policy` allows `registration` given the stored `existing` record and the view.
pub(crate) fn admission(
    serving: &Serving,
    registration: &NodeRegistration,
    existing: Option<&RegistrationRecord>,
) -> Result<(), (u16, &'static str, String)> {
    let id = &registration.identifier;
    let bundle_only = !serving.has_materializer();
    if bundle_only && serving.bundle_has(id) == Some(false) {
        return Err((
            404,
            "missing_config",
            format!("the bundle has no config for {id:?}"),
        ));
    }
    if existing.is_none() && serving.frozen_out(id) {
        return Err((
            409,
            "frozen",
            format!(
                "membership is frozen since the deployment became ready; {id:?} is not a member"
            ),
        ));
    }
    if let Some(policy) = serving.policy() {
        if existing.is_none()
            && let Some(cap) = policy.max_registrations
            && serving.registrations() >= cap
        {
            return Err((
                409,
                "registration_cap",
                format!("the policy accepts at most {cap} registrations"),
            ));
        }
        if policy.on_new_ip == OnNewIp::Reject
            && let Some(old) = existing
            && old.ip != registration.ip
        {
            return Err((
                409,
                "ip_changed",
                format!(
                    "{id:?} registered with {}; the policy refuses a new IP",
                    old.ip
                ),
            ));
        }
    }
    Ok(())
}
