//! An epoch: one state of the registered set that payloads are rendered for, and what its
//! renders have cost so far (which decides whether the next runs inline or on the pool).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use super::NodeRegistration;
use super::materialize::{RegistrationSnapshot, RegistrationSnapshotMaterializer};
use super::payload::{
    Body, Prepared, Shared, Stamp, prepare_catalog, write_files, write_laid_files,
};
use super::policy::CompiledPolicy;

use super::isolate::{Member, Workers, load_message};
use super::render::{RenderFailures, RenderPool};
use super::state::RegistrationRecord;
use super::template::Scope;
use crate::store::Revision;

/// Registrations by identifier; sorted, so iterating gives the members in template order.
/// Persistent: a clone is O(1) and an update O(log n), so each published view and epoch keeps
/// its own version of the set without copying it.
pub(super) type Registrations = imbl::OrdMap<Arc<str>, Arc<RegistrationRecord>>;

/// The members `policy` serves, in order: identifier order, except that a replacement takes
/// the place of the node it replaced. Templates' `index` and rollout waves both follow it.
pub(super) fn members<'a>(
    registrations: &'a Registrations,
    policy: &CompiledPolicy,
) -> Vec<&'a RegistrationRecord> {
    let mut members: Vec<&RegistrationRecord> = registrations
        .values()
        .filter(|r| policy.serves(&r.identifier))
        .map(Arc::as_ref)
        .collect();
    if members.iter().any(|r| r.slot.is_some()) {
        members.sort_by(|a, b| {
            (a.order(), a.identifier.as_str()).cmp(&(b.order(), b.identifier.as_str()))
        });
    }
    members
}

/// Where the epoch's payloads come from.
#[derive(Clone)]
pub(super) enum Source {
    /// The stored declarative policy: rendered per node on demand.
    Policy(CompiledPolicy),
    /// A library materializer: the whole catalog, computed once per epoch on first fetch.
    Custom(Arc<dyn RegistrationSnapshotMaterializer>),
}

pub(super) type Catalog = Result<Option<Arc<HashMap<String, Prepared>>>, Arc<str>>;

/// One state of the registered set that payloads are rendered for. Everything here is
/// computed at most once, and only when a node asks.
pub(super) struct Epoch {
    /// The store revision the set last changed at; payloads carry it as `epoch` (or a later
    /// one: the revision a node's rollout wave was reached at).
    pub revision: Revision,
    /// The version (policy revision) rendered, `None` for a library materializer.
    pub version: Option<Revision>,
    /// What render processes know this epoch by: unique, as two versions of one epoch are
    /// live during a rollout.
    load_id: u64,
    pub(super) source: Source,
    pub(super) registrations: Registrations,
    scope: OnceLock<Arc<Scope>>,
    shared: OnceLock<Result<Arc<Shared>, Arc<str>>>,
    catalog: OnceCell<Catalog>,
    cost: RenderCost,
    /// For a policy that renders in render processes: the epoch as they get it, and the
    /// shared files they rendered.
    isolated: OnceLock<Result<Arc<Vec<u8>>, Arc<str>>>,
    isolated_shared: OnceCell<Result<Arc<Shared>, Arc<str>>>,
}

/// Where an epoch's renders run: the pool of render threads, the render processes (for a
/// policy whose templates could grow without bound), and the failures' count.
#[derive(Debug, Clone)]
pub(super) struct Renderers {
    pub(super) pool: RenderPool,
    pub(super) workers: Option<Arc<Workers>>,
    pub(super) failures: Arc<RenderFailures>,
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
pub(super) struct RenderCost {
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

debug_fields!(Epoch { revision });

impl Epoch {
    /// A ready state of `registrations` at `revision`, served from `source`; nothing is
    /// computed until a node asks.
    pub(super) fn new(
        revision: Revision,
        version: Option<Revision>,
        source: Source,
        registrations: Registrations,
    ) -> Self {
        static LOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            revision,
            version,
            load_id: LOADS.fetch_add(1, Ordering::Relaxed),
            source,
            registrations,
            scope: OnceLock::new(),
            shared: OnceLock::new(),
            catalog: OnceCell::new(),
            cost: RenderCost::default(),
            isolated: OnceLock::new(),
            isolated_shared: OnceCell::new(),
        }
    }

    /// The members in order (see [`members`]).
    fn members(&self, policy: &CompiledPolicy) -> Vec<&RegistrationRecord> {
        members(&self.registrations, policy)
    }

    /// The members with what templates see of them (built once).
    pub(super) fn scope(&self, policy: &CompiledPolicy) -> Arc<Scope> {
        self.scope
            .get_or_init(|| {
                Arc::new(Scope::new(
                    self.members(policy)
                        .into_iter()
                        .map(|r| (r.identifier.as_str(), r.ip, &r.metadata)),
                ))
            })
            .clone()
    }

    /// Renders one node's answer in the render processes, the shared files first (once per
    /// epoch).
    async fn render_isolated(
        &self,
        policy: &CompiledPolicy,
        identifier: &str,
        workers: &Arc<Workers>,
        stamp: Stamp,
    ) -> Rendered {
        let index = self
            .scope(policy)
            .index_of(identifier)
            .ok_or_else(|| Arc::from(format!("{identifier:?} is not a member")))?;
        let load = self
            .isolated
            .get_or_init(|| {
                let members = self
                    .members(policy)
                    .into_iter()
                    .map(|r| Member {
                        identifier: r.identifier.clone(),
                        ip: r.ip,
                        metadata: r.metadata.clone(),
                    })
                    .collect();
                load_message(self.load_id, policy, members).map_err(Arc::from)
            })
            .clone()?;
        let limits = policy.limits();
        let shared = self
            .isolated_shared
            .get_or_init(|| async {
                let budget = limits.max_payload_bytes;
                let files = workers
                    .render(self.load_id, load.clone(), None, budget, limits.deadline)
                    .await;
                files
                    .map(|files| Shared::new(&files))
                    .map_err(|err| Arc::from(format!("rendering the shared files: {err}")))
            })
            .await
            .clone()?;
        let budget = limits.max_payload_bytes.saturating_sub(shared.json.len());
        let files = workers
            .render(self.load_id, load, Some(index), budget, limits.deadline)
            .await
            .map_err(Arc::<str>::from)?;
        Ok(Arc::new(Body::assemble(
            |out| {
                write_files(out, &files);
                Vec::new()
            },
            shared,
            stamp,
        )))
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
    fn render_node(&self, policy: &CompiledPolicy, identifier: &str, stamp: Stamp) -> Rendered {
        let scope = self.scope(policy);
        let Some(index) = scope.index_of(identifier) else {
            return Err(Arc::from(format!("{identifier:?} is not a member")));
        };
        let shared = self.shared(policy, &scope)?;
        // The epoch's once-only work (spliced loops, the IP list) is not this render's cost.
        policy.prepare(&scope);
        let started = Instant::now();
        let budget = policy
            .limits()
            .max_payload_bytes
            .saturating_sub(shared.json.len());
        let files = policy
            .render_node_laid(&scope, index, budget)
            .map_err(|err| Arc::from(err.to_string()));
        let body = files.map(|files| {
            Arc::new(Body::assemble(
                |out| write_laid_files(out, &files),
                shared,
                stamp,
            ))
        });
        self.cost.record(started.elapsed());
        body
    }

    /// A library materializer's catalog, once computed and ready.
    pub(super) fn custom_members(&self) -> Option<&HashMap<String, Prepared>> {
        match self.catalog.get() {
            Some(Ok(Some(members))) => Some(members),
            _ => None,
        }
    }

    /// Renders `identifier`'s answer: on the asking worker once the epoch's renders proved
    /// cheap, else on the pool. Failures are logged and counted here, once per node and epoch
    /// (the caller caches the result).
    pub(super) async fn render(
        self: Arc<Self>,
        policy: CompiledPolicy,
        identifier: Arc<str>,
        renderers: Renderers,
        served: Revision,
    ) -> Rendered {
        let stamp = Stamp {
            epoch: served,
            version: self.version,
        };
        let started = Instant::now();
        let inline = self.cost.inline();
        let epoch = self.revision;
        let id = identifier.clone();
        let failures = renderers.failures.clone();
        let result = match (&renderers.workers, policy.unbounded()) {
            (Some(workers), Some(_)) => self.render_isolated(&policy, &id, workers, stamp).await,
            _ if inline => {
                let render = move || self.render_node(&policy, &id, stamp);
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(render))
                    .unwrap_or_else(|_| Err(Arc::from("the render panicked")))
            }
            _ => {
                let render = move || self.render_node(&policy, &id, stamp);
                renderers
                    .pool
                    .run(render)
                    .await
                    .unwrap_or_else(|err| Err(Arc::from(err)))
            }
        };
        tracing::debug!(
            identifier = &*identifier,
            elapsed_us = started.elapsed().as_micros() as u64,
            inline,
            ok = result.is_ok(),
            "rendered a payload"
        );
        if let Err(reason) = &result {
            tracing::error!(identifier = &*identifier, epoch, %reason, "this node's payload could not be rendered");
            failures.note(&identifier, epoch, reason);
        }
        result
    }

    /// A library materializer's catalog for this epoch, computed once on the pool.
    pub(super) async fn catalog(
        self: &Arc<Self>,
        materializer: &Arc<dyn RegistrationSnapshotMaterializer>,
        pool: &RenderPool,
    ) -> &Catalog {
        self.catalog
            .get_or_init(|| {
                let (pool, materializer, epoch) =
                    (pool.clone(), materializer.clone(), self.clone());
                async move {
                    let snapshot = epoch.snapshot();
                    let result = pool
                        .run(move || {
                            materializer
                                .materialize_snapshot(&snapshot)
                                .map(|c| c.map(|c| Arc::new(prepare_catalog(&c))))
                                .map_err(|err| Arc::from(err.to_string()))
                        })
                        .await;
                    let catalog = result.unwrap_or_else(|err| Err(Arc::from(err)));
                    if let Err(reason) = &catalog {
                        tracing::error!(epoch = epoch.revision, %reason, "materialisation failed");
                    }
                    catalog
                }
            })
            .await
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
pub(super) type Rendered = Result<Arc<Body>, Arc<str>>;
