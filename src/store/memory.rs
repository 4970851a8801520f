//! The in-memory backend: same semantics as the durable ones, no durability. For unit tests
//! and throwaway runs.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{
    Batch, Change, ChangeEvent, ChangeHub, Entry, Error, Key, Limits, Listing, NamespaceTree, Op,
    Precondition, Revision, Store, Watch, WatchFilter, validate_namespace, validate_type,
};

type Tree = BTreeMap<String, BTreeMap<String, BTreeMap<String, Entry>>>;

/// A store held in process memory.
#[derive(Debug)]
pub struct MemoryStore {
    state: Mutex<State>,
    hub: ChangeHub,
    limits: Limits,
}

#[derive(Debug, Default)]
struct State {
    revision: Revision,
    tree: Tree,
}

/// How many committed batches the in-memory history keeps for watchers.
const HISTORY: usize = 10_000;

impl MemoryStore {
    /// An empty store.
    pub fn new(limits: Limits) -> Self {
        Self {
            state: Mutex::new(State::default()),
            hub: ChangeHub::new(HISTORY, 0),
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("memory store lock poisoned")
    }
}

impl State {
    fn entry(&self, key: &Key) -> Option<&Entry> {
        self.tree.get(&key.namespace)?.get(&key.kind)?.get(&key.key)
    }
}

/// Checks one precondition against the current entry; shared wording for every backend.
pub(crate) fn check_precondition(
    key: &Key,
    expect: Precondition,
    current: Option<Revision>,
) -> Result<(), Error> {
    let reason = match (expect, current) {
        (Precondition::Absent, None) => return Ok(()),
        (Precondition::ModRevision(want), Some(have)) if want == have => return Ok(()),
        (Precondition::Absent, Some(have)) => {
            format!("expected absent, found modified at revision {have}")
        }
        (Precondition::ModRevision(want), None) => {
            format!("expected modified at revision {want}, found absent")
        }
        (Precondition::ModRevision(want), Some(have)) => {
            format!("expected modified at revision {want}, found modified at revision {have}")
        }
    };
    Err(Error::Conflict {
        key: key.clone(),
        reason,
    })
}

#[async_trait]
impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn revision(&self) -> Result<Revision, Error> {
        Ok(self.lock().revision)
    }

    async fn get(&self, key: &Key) -> Result<Option<Entry>, Error> {
        key.validate()?;
        Ok(self.lock().entry(key).cloned())
    }

    async fn list(&self, namespace: &str, kind: &str) -> Result<Listing, Error> {
        validate_namespace(namespace)?;
        validate_type(kind)?;
        let state = self.lock();
        let entries = state
            .tree
            .get(namespace)
            .and_then(|types| types.get(kind))
            .cloned()
            .unwrap_or_default();
        Ok(Listing {
            revision: state.revision,
            entries,
        })
    }

    async fn namespace(&self, namespace: &str) -> Result<NamespaceTree, Error> {
        validate_namespace(namespace)?;
        let state = self.lock();
        Ok(NamespaceTree {
            revision: state.revision,
            types: state.tree.get(namespace).cloned().unwrap_or_default(),
        })
    }

    async fn namespaces(&self) -> Result<Vec<String>, Error> {
        Ok(self.lock().tree.keys().cloned().collect())
    }

    async fn apply(&self, batch: Batch) -> Result<Revision, Error> {
        batch.validate(&self.limits)?;
        let mut state = self.lock();
        for check in &batch.checks {
            let current = state.entry(&check.key).map(|e| e.mod_revision);
            check_precondition(&check.key, check.expect, current)?;
        }
        let revision = state.revision + 1;
        let mut changes = Vec::with_capacity(batch.ops.len());
        for op in batch.ops {
            match op {
                Op::Put { key, value } => {
                    let keys = state
                        .tree
                        .entry(key.namespace.clone())
                        .or_default()
                        .entry(key.kind.clone())
                        .or_default();
                    let create_revision =
                        keys.get(&key.key).map_or(revision, |e| e.create_revision);
                    keys.insert(
                        key.key.clone(),
                        Entry {
                            value: value.clone(),
                            create_revision,
                            mod_revision: revision,
                        },
                    );
                    changes.push(Change {
                        key,
                        value: Some(value),
                    });
                }
                Op::Delete { key } => {
                    if let Some(types) = state.tree.get_mut(&key.namespace) {
                        if let Some(keys) = types.get_mut(&key.kind) {
                            keys.remove(&key.key);
                            if keys.is_empty() {
                                types.remove(&key.kind);
                            }
                        }
                        if types.is_empty() {
                            state.tree.remove(&key.namespace);
                        }
                    }
                    changes.push(Change { key, value: None });
                }
            }
        }
        state.revision = revision;
        self.hub.publish(ChangeEvent { revision, changes });
        Ok(revision)
    }

    async fn watch(&self, from: Revision, filter: WatchFilter) -> Result<Watch, Error> {
        self.hub.watch(from, filter)
    }
}
