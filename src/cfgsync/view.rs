//! The serving view: what one store revision of `__cfgsync__` means for `/node`. The
//! watcher's [`View`] keeps the raw records and applies change events incrementally; each
//! rebuild publishes a [`Serving`], an immutable snapshot shared by every request.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

use super::bundle::NodeArtifactsBundle;
use super::epoch::{Epoch, Registrations, Source};
use super::materialize::{NodeArtifactsCatalog, RegistrationSnapshotMaterializer};
use super::payload::{Body, Prepared, prepare_catalog};
use super::policy::{CompiledPolicy, Policy, RenderLimits};
use super::state::{BUNDLE, CURRENT, POLICY, REGISTRATION, REMOVED, RegistrationRecord, Removal};
use crate::store::{CFGSYNC_NAMESPACE, ChangeEvent, NamespaceTree, Revision};

/// The registration-backed catalog's state.
#[derive(Debug, Clone, Default)]
pub(super) enum Readiness {
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
    pub(super) registrations: Registrations,
    /// Registered members of the policy's named set.
    named: usize,
    pub(super) bundle: Option<Arc<HashMap<String, Prepared>>>,
    pub(super) bundle_epoch: Revision,
    pub(super) policy: Option<CompiledPolicy>,
    pub(super) readiness: Readiness,
    /// Identifiers removed by an operator (whether or not registered again since), and for
    /// each whether it was replaced by another node.
    pub(super) removed: Arc<BTreeMap<Arc<str>, bool>>,
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

    /// Whether an operator removed `identifier` (it may have registered again since).
    pub fn was_removed(&self, identifier: &str) -> bool {
        self.removed.contains_key(identifier)
    }

    /// Whether the bundle names `identifier`; `None` when no bundle is installed.
    pub fn bundle_has(&self, identifier: &str) -> Option<bool> {
        self.bundle.as_ref().map(|b| b.contains_key(identifier))
    }
}

/// The watcher's working state: raw records, rebuilt into a [`Serving`] after changes.
pub(super) struct View {
    revision: Revision,
    registrations: Registrations,
    removed: Arc<BTreeMap<Arc<str>, bool>>,
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
    pub(super) fn new(
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

    pub(super) fn load(&mut self, tree: &NamespaceTree) {
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
                        .map(|(id, e)| (Arc::from(id.as_str()), Removal::says_replaced(&e.value)))
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

    pub(super) fn apply(&mut self, event: &ChangeEvent) {
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
                        .is_none_or(|old| !old.looks_the_same_as(&record));
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
                        .insert(Arc::from(key.key.as_str()), Removal::says_replaced(value));
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
    pub(super) fn rebuild(&mut self) -> Serving {
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
                (Some(source), Some(true)) => Readiness::Epoch(Arc::new(Epoch::new(
                    self.revision,
                    source,
                    registrations.clone(),
                ))),
                (Some(_), _) => Readiness::NotReady,
                (None, _) => Readiness::Absent,
            };
            self.dirty_catalog = false;
        }
        next.named = self.named_present;
        self.last = next.clone();
        next
    }
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::{Change, Entry, Key};

    fn record(id: &str, ip: &str, metadata: Value) -> Value {
        json!({"identifier": id, "ip": ip, "metadata": metadata,
               "first_seen_ms": 1, "last_seen_ms": 1})
    }

    fn put(kind: &str, key: &str, value: Value) -> Change {
        Change {
            key: Key::new(CFGSYNC_NAMESPACE, kind, key),
            value: Some(value),
        }
    }

    fn event(revision: Revision, changes: Vec<Change>) -> ChangeEvent {
        ChangeEvent { revision, changes }
    }

    fn policy(extra: Value) -> Value {
        let mut policy = json!({"files": [{"path": "a", "template": "{{ node.ip }}"}]});
        policy
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        policy
    }

    /// A count policy for `n` installed at revision 2, and node `a` registered at 3.
    fn count_policy_and_a(n: usize) -> Vec<ChangeEvent> {
        vec![
            event(
                2,
                vec![put(POLICY, CURRENT, policy(json!({"expect_nodes": n})))],
            ),
            event(
                3,
                vec![put(REGISTRATION, "a", record("a", "10.0.0.1", json!({})))],
            ),
        ]
    }

    /// A view loaded from an empty store, then fed `events` one at a time.
    fn fed(events: Vec<ChangeEvent>) -> (View, Serving) {
        let mut view = View::new(None, RenderLimits::default());
        view.load(&NamespaceTree {
            revision: 1,
            types: BTreeMap::new(),
        });
        let mut serving = view.rebuild();
        for event in events {
            view.apply(&event);
            serving = view.rebuild();
        }
        (view, serving)
    }

    #[test]
    fn the_set_is_ready_at_the_count_and_its_epoch_is_that_registration() {
        let (mut view, serving) = fed(count_policy_and_a(2));
        assert!(!serving.is_ready());
        assert_eq!(serving.epoch(), None);
        view.apply(&event(
            4,
            vec![put(REGISTRATION, "b", record("b", "10.0.0.2", json!({})))],
        ));
        let serving = view.rebuild();
        assert!(serving.is_ready());
        assert_eq!(serving.epoch(), Some(4));
        assert_eq!(serving.registrations(), 2);
    }

    #[test]
    fn a_heartbeat_keeps_the_epoch_and_a_change_a_template_sees_moves_it() {
        let (mut view, serving) = fed(vec![
            event(
                2,
                vec![put(POLICY, CURRENT, policy(json!({"expect_nodes": 1})))],
            ),
            event(
                3,
                vec![put(
                    REGISTRATION,
                    "a",
                    record("a", "10.0.0.1", json!({"z": 1})),
                )],
            ),
        ]);
        assert_eq!(serving.epoch(), Some(3));
        let mut heartbeat = record("a", "10.0.0.1", json!({"z": 1}));
        heartbeat["last_seen_ms"] = json!(99);
        view.apply(&event(4, vec![put(REGISTRATION, "a", heartbeat)]));
        let serving = view.rebuild();
        assert_eq!(serving.epoch(), Some(3), "a heartbeat renders nothing new");
        assert_eq!(serving.revision, 4, "but the view follows the store");
        view.apply(&event(
            5,
            vec![put(
                REGISTRATION,
                "a",
                record("a", "10.0.0.1", json!({"z": 2})),
            )],
        ));
        assert_eq!(
            view.rebuild().epoch(),
            Some(5),
            "new metadata is a new epoch"
        );
    }

    #[test]
    fn a_named_set_is_ready_when_complete_and_ignores_strangers() {
        let named = policy(json!({"expect_identifiers": ["a", "b"], "freeze_on_ready": true}));
        let (mut view, serving) = fed(vec![
            event(2, vec![put(POLICY, CURRENT, named)]),
            event(
                3,
                vec![put(REGISTRATION, "a", record("a", "10.0.0.1", json!({})))],
            ),
            event(
                4,
                vec![put(REGISTRATION, "x", record("x", "10.0.0.9", json!({})))],
            ),
        ]);
        assert!(!serving.is_ready(), "a stranger does not complete the set");
        view.apply(&event(
            5,
            vec![put(REGISTRATION, "b", record("b", "10.0.0.2", json!({})))],
        ));
        let serving = view.rebuild();
        assert_eq!(serving.epoch(), Some(5));
        view.apply(&event(
            6,
            vec![put(REGISTRATION, "y", record("y", "10.0.0.8", json!({})))],
        ));
        let serving = view.rebuild();
        assert_eq!(
            serving.epoch(),
            Some(5),
            "a stranger's registration renders nothing"
        );
    }

    #[test]
    fn removals_and_replacements_are_known_until_the_node_registers_again() {
        let (mut view, _) = fed(count_policy_and_a(1));
        let marker = json!({"removed_ms": 1, "replaced_by": "b"});
        view.apply(&event(
            4,
            vec![
                Change {
                    key: Key::new(CFGSYNC_NAMESPACE, REGISTRATION, "a"),
                    value: None,
                },
                put(REMOVED, "a", marker),
                put(REGISTRATION, "b", record("b", "10.0.0.1", json!({}))),
            ],
        ));
        let serving = view.rebuild();
        assert!(serving.was_replaced("a"));
        assert!(!serving.was_replaced("b"));
        assert_eq!(serving.registrations(), 1);
        assert_eq!(serving.epoch(), Some(4));
    }

    #[test]
    fn a_load_reads_every_kind_and_skips_what_does_not_decode() {
        let entry = |value: Value| Entry {
            value,
            create_revision: 5,
            mod_revision: 5,
        };
        let mut types = BTreeMap::new();
        types.insert(
            REGISTRATION.to_string(),
            BTreeMap::from([
                ("a".to_string(), entry(record("a", "10.0.0.1", json!({})))),
                ("bad".to_string(), entry(json!({"identifier": "bad"}))),
            ]),
        );
        types.insert(
            POLICY.to_string(),
            BTreeMap::from([(
                CURRENT.to_string(),
                entry(policy(json!({"expect_nodes": 1}))),
            )]),
        );
        let mut view = View::new(None, RenderLimits::default());
        view.load(&NamespaceTree { revision: 7, types });
        let serving = view.rebuild();
        assert!(serving.loaded);
        assert_eq!(
            serving.registrations(),
            1,
            "the malformed record is skipped"
        );
        assert_eq!(serving.epoch(), Some(7));
    }
}
