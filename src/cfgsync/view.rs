//! The serving view: what one store revision of `__cfgsync__` means for `/node`. The
//! watcher's [`View`] keeps the raw records and applies change events incrementally; each
//! rebuild publishes a [`Serving`], an immutable snapshot shared by every request.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

use super::bundle::NodeArtifactsBundle;
use super::epoch::{Epoch, Registrations, Source};
use super::materialize::{NodeArtifactsCatalog, RegistrationSnapshotMaterializer};
use super::payload::{Body, Prepared, Stamp, prepare_catalog};
use super::policy::{CompiledPolicy, Policy, RenderLimits};
use super::report::{REPORT, Report};
use super::rollout::{PREVIOUS, Previous, ROLLOUT, Stored, VersionKind, WAVE};
use super::state::{
    BUNDLE, CURRENT, FETCHED, Fetched, POLICY, REGISTRATION, REMOVED, RegistrationRecord, Removal,
};
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
    /// The installed policy's version (its revision), even when it does not compile.
    pub(super) policy_version: Option<Revision>,
    pub(super) readiness: Readiness,
    /// Identifiers removed by an operator (whether or not registered again since), and for
    /// each whether it was replaced by another node.
    pub(super) removed: Arc<BTreeMap<Arc<str>, bool>>,
    /// The revision of the last change that can change a `/node` answer: reports and other
    /// namespaces do not, so they wake no held request.
    pub served_revision: Revision,
    /// Each node's latest applied-state report.
    pub(super) reports: Reports,
    /// The newest epoch a server handed each node that does not report.
    pub(super) fetched: Fetches,
    /// The rollout record as stored (running, or the last one).
    pub(super) record: Option<Stored>,
    /// The stable version kept during a rollout.
    pub(super) previous: Option<Arc<Previous>>,
    /// Who gets which version while a rollout governs what is served.
    pub(super) split: Option<Arc<Split>>,
}

/// Reports by identifier (persistent, as registrations are).
pub(super) type Reports = imbl::OrdMap<Arc<str>, Arc<Report>>;
/// Node → the newest epoch a server handed it (stored fetched records).
pub(super) type Fetches = imbl::OrdMap<Arc<str>, Revision>;

/// Who gets which version while a rollout governs what is served: members in slot order, the
/// waves reached (each a cumulative cutoff and the epoch its nodes got the target at), and the
/// stable version for everyone past them.
#[derive(Debug)]
pub(super) struct Split {
    pub(super) kind: VersionKind,
    pub(super) target: Revision,
    pub(super) stable_version: Revision,
    /// The target's members in wave order (see [`super::rollout::Fleet`]).
    pub(super) members: Vec<Arc<str>>,
    /// How many of them registered before the rollout started.
    pub(super) settled: usize,
    positions: HashMap<Arc<str>, usize>,
    /// Members that reported applying the target, with the epoch they reported: they keep it
    /// whatever the cutoffs do meanwhile (a removal can move one).
    kept: HashMap<Arc<str>, Revision>,
    /// Per wave reached: how many members it covers (cumulative), and the epoch its nodes
    /// got the target at.
    reached: Vec<(usize, Revision)>,
    /// The stable version, while the rollout is under way.
    pub(super) stable: Option<StableVersion>,
}

/// The stable version, ready to serve.
#[derive(Debug)]
pub(super) enum StableVersion {
    /// A policy's epoch (rendered on demand, as the target's).
    Policy(Readiness),
    /// A bundle, prepared.
    Bundle(Arc<HashMap<String, Prepared>>),
}

/// Which version a node gets during a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Assigned {
    /// The target, at an epoch no older than `floor`.
    Target { floor: Revision },
    /// The stable version.
    Stable,
}

impl Split {
    /// Which version `identifier` gets.
    pub(super) fn assign(&self, identifier: &str) -> Assigned {
        let target = Assigned::Target { floor: self.target };
        let Some(&position) = self.positions.get(identifier) else {
            return target;
        };
        if let Some(&floor) = self.kept.get(identifier) {
            return Assigned::Target { floor };
        }
        for &(cutoff, floor) in &self.reached {
            if position < cutoff {
                return Assigned::Target { floor };
            }
        }
        if self.stable.is_some() {
            Assigned::Stable
        } else {
            target
        }
    }
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

    /// The split when it concerns `kind`.
    fn split_of(&self, kind: VersionKind) -> Option<&Split> {
        self.split.as_deref().filter(|split| split.kind == kind)
    }

    /// A bundle node's prepared payload and its stamp (the stable bundle's, before its wave).
    pub(super) fn bundle_route(&self, identifier: &str) -> Option<(&Prepared, Stamp)> {
        let prepared = self.bundle.as_ref()?.get(identifier)?;
        let epoch = self.bundle_epoch;
        let target = |floor: Revision| {
            let stamp = Stamp {
                epoch: epoch.max(floor),
                version: Some(epoch),
            };
            Some((prepared, stamp))
        };
        let Some(split) = self.split_of(VersionKind::Bundle) else {
            return target(epoch);
        };
        match (split.assign(identifier), &split.stable) {
            (Assigned::Stable, Some(StableVersion::Bundle(stable))) => match stable.get(identifier)
            {
                Some(old) => Some((
                    old,
                    Stamp {
                        epoch,
                        version: Some(split.stable_version),
                    },
                )),
                None => target(epoch),
            },
            (Assigned::Target { floor }, _) => target(floor),
            _ => target(epoch),
        }
    }

    /// The epoch that serves `identifier` at `target` (the ready policy epoch), and its stamp.
    pub(super) fn policy_route<'a>(
        &'a self,
        target: &'a Arc<Epoch>,
        identifier: &str,
    ) -> (&'a Arc<Epoch>, Stamp) {
        let stamp = |epoch: &Epoch, floor: Revision| Stamp {
            epoch: target.revision.max(floor),
            version: epoch.version,
        };
        let Some(split) = self.split_of(VersionKind::Policy) else {
            return (target, stamp(target, 0));
        };
        match (split.assign(identifier), &split.stable) {
            (Assigned::Stable, Some(StableVersion::Policy(Readiness::Epoch(stable)))) => {
                (stable, stamp(stable, 0))
            }
            (Assigned::Target { floor }, _) => (target, stamp(target, floor)),
            _ => (target, stamp(target, 0)),
        }
    }

    /// What `identifier` is served now (epoch and version), without rendering anything.
    pub fn served_stamp(&self, identifier: &str) -> Option<Stamp> {
        if let Some((_, stamp)) = self.bundle_route(identifier) {
            return Some(stamp);
        }
        match &self.readiness {
            Readiness::Epoch(epoch) if self.registrations.contains_key(identifier) => {
                Some(self.policy_route(epoch, identifier).1)
            }
            _ => None,
        }
    }

    /// The newest epoch any server handed `identifier`, as stored (a report counts too).
    pub fn fetched(&self, identifier: &str) -> Option<Revision> {
        let stored = self.fetched.get(identifier).copied();
        let reported = self.report(identifier).map(|r| r.applied.epoch);
        stored.max(reported)
    }

    /// A node's latest applied-state report.
    pub fn report(&self, identifier: &str) -> Option<&Report> {
        self.reports.get(identifier).map(Arc::as_ref)
    }

    /// The installed policy's version.
    pub fn policy_version(&self) -> Option<Revision> {
        self.policy_version
    }

    /// The rollout record as stored, if any.
    pub fn rollout(&self) -> Option<&Stored> {
        self.record.as_ref()
    }

    /// The installed version of `kind`.
    pub fn installed(&self, kind: VersionKind) -> Option<Revision> {
        match kind {
            VersionKind::Policy => self.policy_version,
            VersionKind::Bundle => {
                (self.bundle.is_some() || self.bundle_epoch > 0).then_some(self.bundle_epoch)
            }
        }
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
    /// The revision each registration was created at (a rollout's waves are cut from the
    /// nodes registered before it started).
    created: imbl::OrdMap<Arc<str>, Revision>,
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
    reports: Reports,
    fetched: Fetches,
    rollout: Option<Stored>,
    previous: Option<Arc<Previous>>,
    /// Wave markers: wave number → the revision it was reached at.
    waves: BTreeMap<usize, Revision>,
    /// Set when who gets which version may have changed.
    dirty_split: bool,
    served_revision: Revision,
    /// The stable version compiled or prepared, kept while its version is the same.
    stable_cache: Option<(Revision, StableSource)>,
    last: Serving,
}

/// A stable version decoded once.
#[derive(Clone)]
enum StableSource {
    Policy(CompiledPolicy),
    Bundle(Arc<HashMap<String, Prepared>>),
}

impl View {
    pub(super) fn new(
        custom: Option<Arc<dyn RegistrationSnapshotMaterializer>>,
        limits: RenderLimits,
    ) -> Self {
        Self {
            revision: 0,
            registrations: Registrations::new(),
            created: imbl::OrdMap::new(),
            removed: Arc::default(),
            bundle: None,
            policy: None,
            custom,
            limits,
            dirty_catalog: true,
            dirty_bundle: true,
            named_present: 0,
            recount: true,
            reports: Reports::new(),
            fetched: Fetches::new(),
            rollout: None,
            previous: None,
            waves: BTreeMap::new(),
            dirty_split: true,
            served_revision: 0,
            stable_cache: None,
            last: Serving::default(),
        }
    }

    pub(super) fn load(&mut self, tree: &NamespaceTree) {
        self.revision = tree.revision;
        let mut registrations = Registrations::new();
        let mut created = imbl::OrdMap::new();
        if let Some(records) = tree.types.get(REGISTRATION) {
            for (id, entry) in records {
                if let Some(record) = decode_registration(id, &entry.value) {
                    registrations.insert(Arc::from(id.as_str()), record);
                    created.insert(Arc::from(id.as_str()), entry.create_revision);
                }
            }
        }
        self.registrations = registrations;
        self.created = created;
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
        self.reports = tree
            .types
            .get(REPORT)
            .map(|reports| {
                reports
                    .iter()
                    .filter_map(|(id, e)| Some((Arc::from(id.as_str()), decode_report(&e.value)?)))
                    .collect()
            })
            .unwrap_or_default();
        self.fetched = tree
            .types
            .get(FETCHED)
            .map(|fetched| {
                fetched
                    .iter()
                    .filter_map(|(id, e)| Some((Arc::from(id.as_str()), decode_fetched(&e.value)?)))
                    .collect()
            })
            .unwrap_or_default();
        self.rollout = tree
            .types
            .get(ROLLOUT)
            .and_then(|t| t.get(CURRENT))
            .and_then(|e| decode_rollout(&e.value, e.mod_revision));
        self.previous = tree
            .types
            .get(PREVIOUS)
            .and_then(|t| t.get(CURRENT))
            .and_then(|e| decode_previous(&e.value));
        self.waves = tree
            .types
            .get(WAVE)
            .map(|waves| {
                waves
                    .iter()
                    .filter_map(|(k, e)| Some((k.parse().ok()?, e.mod_revision)))
                    .collect()
            })
            .unwrap_or_default();
        self.served_revision = tree.revision;
        self.dirty_catalog = true;
        self.dirty_bundle = true;
        self.dirty_split = true;
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
            if key.kind != REPORT && key.kind != FETCHED {
                self.served_revision = event.revision;
            }
            match (key.kind.as_str(), &change.value) {
                (REPORT, Some(value)) => {
                    if let Some(report) = decode_report(value) {
                        self.reports.insert(Arc::from(key.key.as_str()), report);
                    }
                }
                (REPORT, None) => {
                    self.reports.remove(key.key.as_str());
                }
                (FETCHED, Some(value)) => {
                    if let Some(epoch) = decode_fetched(value) {
                        self.fetched.insert(Arc::from(key.key.as_str()), epoch);
                    }
                }
                (FETCHED, None) => {
                    self.fetched.remove(key.key.as_str());
                }
                (ROLLOUT, value) if key.key == CURRENT => {
                    self.rollout = value
                        .as_ref()
                        .and_then(|v| decode_rollout(v, event.revision));
                    self.dirty_split = true;
                }
                (PREVIOUS, value) if key.key == CURRENT => {
                    self.previous = value.as_ref().and_then(decode_previous);
                    self.dirty_split = true;
                }
                (WAVE, value) => {
                    if let Ok(k) = key.key.parse() {
                        match value {
                            Some(_) => self.waves.insert(k, event.revision),
                            None => self.waves.remove(&k),
                        };
                        self.dirty_split = true;
                    }
                }
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
                    if before.is_none() {
                        self.created
                            .insert(Arc::from(key.key.as_str()), event.revision);
                        if visible {
                            self.named_present += 1;
                        }
                    }
                }
                (REGISTRATION, None) if self.registrations.contains_key(key.key.as_str()) => {
                    self.registrations.remove(key.key.as_str());
                    self.created.remove(key.key.as_str());
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
                    self.dirty_split = true;
                    // A node moved between the bundle and the policy must see a newer epoch,
                    // never an older one (a watcher waits for a newer one).
                    self.dirty_catalog = true;
                }
                (POLICY, value) if key.key == CURRENT => {
                    self.policy = value.clone().map(|v| (v, event.revision));
                    self.dirty_catalog = true;
                    self.dirty_split = true;
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
        next.served_revision = self.served_revision;
        next.loaded = true;
        next.registrations = self.registrations.clone();
        next.removed = self.removed.clone();
        next.reports = self.reports.clone();
        next.fetched = self.fetched.clone();
        next.record = self.rollout.clone();
        next.previous = self.previous.clone();
        next.policy_version = self.policy.as_ref().map(|(_, revision)| *revision);
        // Membership moves waves' cutoffs; a new epoch moves the stable version's too.
        self.dirty_split |= self.dirty_catalog || self.dirty_bundle;
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
                (Some(source), Some(true)) => {
                    let version = match &source {
                        Source::Policy(_) => self.policy.as_ref().map(|(_, revision)| *revision),
                        Source::Custom(_) => None,
                    };
                    Readiness::Epoch(Arc::new(Epoch::new(
                        self.revision,
                        version,
                        source,
                        registrations.clone(),
                    )))
                }
                (Some(_), _) => Readiness::NotReady,
                (None, _) => Readiness::Absent,
            };
            self.dirty_catalog = false;
        }
        next.named = self.named_present;
        if self.dirty_split {
            next.split = self.split(&next).map(Arc::new);
            self.dirty_split = false;
        }
        self.last = next.clone();
        next
    }

    /// Who gets which version, when a rollout governs what `next` serves.
    fn split(&mut self, next: &Serving) -> Option<Split> {
        let stored = self.rollout.clone()?;
        let kind = stored.record.kind;
        if !stored.governs(next.installed(kind)) {
            return None;
        }
        let record = &stored.record;
        let (members, settled): (Vec<Arc<str>>, usize) = match kind {
            VersionKind::Policy => {
                let policy = next.policy.as_ref()?;
                // Those registered by the rollout's install keep their slot order; those that
                // joined since come after them, first come first.
                let created = |id: &str| self.created.get(id).copied().unwrap_or(0);
                let (mut settled, mut joined): (Vec<_>, Vec<_>) =
                    super::epoch::members(&self.registrations, policy)
                        .into_iter()
                        .partition(|r| created(&r.identifier) <= stored.target());
                joined.sort_by(|a, b| {
                    (created(&a.identifier), &a.identifier)
                        .cmp(&(created(&b.identifier), &b.identifier))
                });
                let count = settled.len();
                settled.append(&mut joined);
                let ids = settled
                    .into_iter()
                    .map(|r| Arc::from(r.identifier.as_str()))
                    .collect();
                (ids, count)
            }
            VersionKind::Bundle => {
                let mut ids: Vec<Arc<str>> = next
                    .bundle
                    .as_ref()?
                    .keys()
                    .map(|id| Arc::from(id.as_str()))
                    .collect();
                ids.sort();
                let count = ids.len();
                (ids, count)
            }
        };
        let target = stored.target();
        let reached = (0..=record.wave.min(record.plan.last_wave()))
            .map(|k| {
                let floor = match k {
                    0 => target,
                    k => self.waves.get(&k).copied().unwrap_or(stored.mod_revision),
                };
                (record.plan.cutoff_of(k, settled, members.len()), floor)
            })
            .collect();
        let kept = self
            .reports
            .iter()
            .filter(|(_, report)| report.applied.version == Some(target))
            .map(|(id, report)| (id.clone(), report.applied.epoch))
            .collect();
        let stable = match self.previous.clone() {
            Some(previous)
                if record.state.is_active()
                    && previous.kind == kind
                    && previous.version == record.stable =>
            {
                self.stable_version(&previous, next)
            }
            _ => None,
        };
        let positions = members
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        Some(Split {
            kind,
            target,
            stable_version: record.stable,
            members,
            settled,
            positions,
            kept,
            reached,
            stable,
        })
    }

    /// The stable version ready to serve beside `next`'s target (compiled or prepared once
    /// per version; its epoch shares the target's revision).
    fn stable_version(&mut self, previous: &Previous, next: &Serving) -> Option<StableVersion> {
        let source = match &self.stable_cache {
            Some((version, source)) if *version == previous.version => source.clone(),
            _ => {
                let source = match previous.kind {
                    VersionKind::Policy => {
                        StableSource::Policy(compile_policy(&previous.value, self.limits)?)
                    }
                    VersionKind::Bundle => StableSource::Bundle(prepare_bundle(&previous.value)?),
                };
                self.stable_cache = Some((previous.version, source.clone()));
                source
            }
        };
        Some(match source {
            StableSource::Bundle(prepared) => StableVersion::Bundle(prepared),
            StableSource::Policy(policy) => {
                let Readiness::Epoch(target) = &next.readiness else {
                    return None;
                };
                // The same epoch object while neither epoch nor version moved, so what it
                // computed once (member list, shared files) is kept.
                if let Some(StableVersion::Policy(Readiness::Epoch(kept))) =
                    self.last.split.as_ref().and_then(|s| s.stable.as_ref())
                    && kept.revision == target.revision
                    && kept.version == Some(previous.version)
                {
                    return Some(StableVersion::Policy(Readiness::Epoch(kept.clone())));
                }
                let named = self
                    .registrations
                    .keys()
                    .filter(|id| policy.serves(id))
                    .count();
                if !policy.is_ready(self.registrations.len(), named) {
                    return Some(StableVersion::Policy(Readiness::NotReady));
                }
                StableVersion::Policy(Readiness::Epoch(Arc::new(Epoch::new(
                    target.revision,
                    Some(previous.version),
                    Source::Policy(policy),
                    self.registrations.clone(),
                ))))
            }
        })
    }
}

fn decode_fetched(value: &Value) -> Option<Revision> {
    serde_json::from_value::<Fetched>(value.clone())
        .ok()
        .map(|f| f.epoch)
}

fn decode_report(value: &Value) -> Option<Arc<Report>> {
    serde_json::from_value(value.clone()).ok().map(Arc::new)
}

fn decode_rollout(value: &Value, mod_revision: Revision) -> Option<Stored> {
    match serde_json::from_value(value.clone()) {
        Ok(record) => Some(Stored {
            record,
            mod_revision,
        }),
        Err(err) => {
            tracing::error!(error = %err, "the stored rollout record does not decode; ignoring it");
            None
        }
    }
}

fn decode_previous(value: &Value) -> Option<Arc<Previous>> {
    serde_json::from_value(value.clone()).ok().map(Arc::new)
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

    /// Nodes b, c, d registered under policy v1 (revision 2); at revision 10 a v2 with waves
    /// `[1, "100%"]` is installed.
    fn a_rollout_in_its_first_wave() -> (View, Serving) {
        let registered = |id: &str, ip: &str| put(REGISTRATION, id, record(id, ip, json!({})));
        let v1 = policy(json!({"expect_nodes": 1}));
        let mut v2 = policy(json!({"expect_nodes": 1, "rollout": {"waves": [1, "100%"]}}));
        v2["files"][0]["template"] = json!("v2 {{ node.ip }}");
        let plan = serde_json::from_value(json!({"waves": [1, "100%"]})).unwrap();
        let rollout = super::super::rollout::RolloutRecord::new(
            VersionKind::Policy,
            2,
            "digest".into(),
            plan,
            100,
        );
        let previous = json!({"kind": "policy", "version": 2, "value": v1});
        fed(vec![
            event(2, vec![put(POLICY, CURRENT, v1)]),
            event(
                3,
                vec![registered("b", "10.0.0.2"), registered("c", "10.0.0.3")],
            ),
            event(4, vec![registered("d", "10.0.0.4")]),
            event(
                10,
                vec![
                    put(POLICY, CURRENT, v2),
                    put(PREVIOUS, CURRENT, previous),
                    put(ROLLOUT, CURRENT, serde_json::to_value(rollout).unwrap()),
                ],
            ),
        ])
    }

    #[test]
    fn a_node_that_joins_a_rollout_never_pushes_another_out_of_its_wave() {
        let (mut view, serving) = a_rollout_in_its_first_wave();
        let split = serving.split.clone().unwrap();
        assert!(matches!(split.assign("b"), Assigned::Target { floor: 10 }));
        assert_eq!(split.assign("c"), Assigned::Stable);
        // `a` sorts before `b` but registered after the install (its clock said earlier): it
        // queues behind.
        let joined = record("a", "10.0.0.1", json!({}));
        view.apply(&event(11, vec![put(REGISTRATION, "a", joined)]));
        let split = view.rebuild().split.unwrap();
        assert!(
            matches!(split.assign("b"), Assigned::Target { .. }),
            "b keeps v2"
        );
        assert_eq!(split.assign("a"), Assigned::Stable);
        assert_eq!((split.settled, split.members.len()), (3, 4));
        assert_eq!(&*split.members[3], "a");
    }

    #[test]
    fn a_node_that_reported_the_target_keeps_it_when_a_cutoff_moves() {
        let (mut view, _) = a_rollout_in_its_first_wave();
        // d applied the target (promoted by hand, say), then b is removed: the first wave's
        // one member is now c, and d, past the cutoff, keeps what it applied.
        let report =
            json!({"epoch": 12, "version": 10, "result": "ok", "duration_ms": 1, "reported_ms": 1});
        view.apply(&event(12, vec![put(REPORT, "d", report)]));
        view.apply(&event(
            13,
            vec![Change {
                key: Key::new(CFGSYNC_NAMESPACE, REGISTRATION, "b"),
                value: None,
            }],
        ));
        let split = view.rebuild().split.unwrap();
        assert!(
            matches!(split.assign("c"), Assigned::Target { floor: 10 }),
            "the first wave's member"
        );
        assert!(
            matches!(split.assign("d"), Assigned::Target { floor: 12 }),
            "d reported the target at epoch 12 and keeps it"
        );
    }

    #[test]
    fn fetched_records_are_listed_and_wake_nobody() {
        let (mut view, serving) = fed(count_policy_and_a(1));
        let woken = serving.served_revision;
        assert_eq!(serving.fetched("a"), None);
        view.apply(&event(
            4,
            vec![put(FETCHED, "a", json!({"epoch": 3, "fetched_ms": 7}))],
        ));
        let serving = view.rebuild();
        assert_eq!(serving.fetched("a"), Some(3));
        assert_eq!(serving.served_revision, woken, "no held /node wakes for it");
        let report = json!({"epoch": 9, "result": "ok", "duration_ms": 1, "reported_ms": 1});
        view.apply(&event(5, vec![put(REPORT, "a", report)]));
        assert_eq!(
            view.rebuild().fetched("a"),
            Some(9),
            "a report counts as fetched"
        );
        view.apply(&event(
            6,
            vec![Change {
                key: Key::new(CFGSYNC_NAMESPACE, FETCHED, "a"),
                value: None,
            }],
        ));
        assert_eq!(view.rebuild().fetched.get("a"), None);
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
