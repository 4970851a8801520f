//! Admission that holds under concurrency: the registration cap, the metadata budget and a
//! frozen membership are decided against a ledger in the store and written in the same batch
//! as the registrations they admit, never against the server's lagging view.
//!
//! The ledger (`__cfgsync__/admission/current`, see [`Ledger`]) counts registrations, the
//! registered members of a named set, and the bytes of their metadata. One task per server
//! takes registrations as they come, decides each in order against the ledger, and writes the
//! admitted ones with the updated ledger as one batch guarded by the ledger's revision and the
//! policy's. Under a storm one batch carries many registrations, so this costs one store
//! commit per batch. Another server writing meanwhile makes the guard fail; the task then
//! reads the ledger again and decides again, so no cap is ever overshot.

use std::collections::HashSet;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::policy::Policy;
use super::state::{Ledger, REGISTRATION, ledger_key, metadata_bytes, policy_key, removed_key};
use crate::store::{self, Batch, CFGSYNC_NAMESPACE, DynStore, Key, Precondition, Revision};

/// Default cap on registrations when neither the policy nor the operator sets a lower one.
pub const DEFAULT_MAX_REGISTRATIONS: usize = 20_000;
/// Default budget for all registrations' metadata together, in bytes.
pub const DEFAULT_METADATA_BUDGET: usize = 256 << 20;

/// Registrations packed into one batch at most (each needs two checks and a put).
const MAX_PER_BATCH: usize = 300;

/// One registration waiting for admission.
#[derive(Debug)]
pub struct Proposal {
    /// The node's identifier.
    pub identifier: String,
    /// `Absent` for a node the store does not hold, else the revision it was read at.
    pub expect: Precondition,
    /// The node's removal marker as it was read: a replacement committed meanwhile (which
    /// writes the marker) makes the registration decide again instead of slipping past it.
    pub marker: Precondition,
    /// The record to store.
    pub record: Value,
    /// Bytes of the new metadata, and of the metadata it replaces (0 for a new node).
    pub metadata_bytes: (u64, u64),
}

/// Why a registration was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The cap (policy's `max_registrations` or `serve --max-registrations`) is reached.
    Cap(usize),
    /// The metadata budget would be exceeded.
    Budget(usize),
    /// Membership is frozen since the set became ready.
    Frozen,
    /// The registration's own key or marker changed since it was read: decide again.
    Raced,
    /// The store failed.
    Store(String),
}

/// Operator bounds on admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Registrations at most (a policy's `max_registrations` may set it lower).
    pub max_registrations: usize,
    /// Bytes of all metadata together.
    pub metadata_budget: usize,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        Self {
            max_registrations: DEFAULT_MAX_REGISTRATIONS,
            metadata_budget: DEFAULT_METADATA_BUDGET,
        }
    }
}

type Reply = oneshot::Sender<Result<Revision, Refusal>>;

/// The handle registrations are admitted through.
#[derive(Debug, Clone)]
pub struct Admission {
    queue: mpsc::Sender<(Proposal, Reply)>,
}

impl Admission {
    /// Starts the admission task on `store`.
    pub fn start(store: DynStore, limits: AdmissionLimits) -> Self {
        let (queue, proposals) = mpsc::channel(4 * MAX_PER_BATCH);
        tokio::spawn(admit(store, limits, proposals));
        Self { queue }
    }

    /// Admits and stores `proposal`'s registration: the revision it was stored at, or why not.
    pub async fn submit(&self, proposal: Proposal) -> Result<Revision, Refusal> {
        let stopped = || Refusal::Store("the admission task has stopped".into());
        let (reply, answer) = oneshot::channel();
        if self.queue.send((proposal, reply)).await.is_err() {
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// The policy as admission needs it, with the revision that guards it.
#[derive(Debug, Default)]
struct Rules {
    revision: Option<Revision>,
    policy: Option<Policy>,
    /// `expect_identifiers` as a set: asked once per registration.
    named: HashSet<String>,
}

impl Rules {
    fn new(revision: Option<Revision>, policy: Option<Policy>) -> Self {
        let named = policy
            .as_ref()
            .and_then(|p| p.expect_identifiers.clone())
            .unwrap_or_default()
            .into_iter()
            .collect();
        Self {
            revision,
            policy,
            named,
        }
    }

    fn is_named(&self, identifier: &str) -> bool {
        self.named.contains(identifier)
    }

    fn cap(&self, limits: AdmissionLimits) -> usize {
        let policy = self.policy.as_ref().and_then(|p| p.max_registrations);
        policy.map_or(limits.max_registrations, |p| {
            p.min(limits.max_registrations)
        })
    }

    fn frozen(&self, ledger: &Ledger) -> bool {
        self.policy.as_ref().is_some_and(|policy| {
            policy.is_frozen(ledger.registrations as usize, ledger.named as usize)
        })
    }
}

/// What the task knows between batches: the ledger and the rules, with their revisions.
struct Known {
    ledger: Ledger,
    ledger_revision: Option<Revision>,
    rules: Rules,
}

async fn read(store: &DynStore) -> Result<Known, store::Error> {
    let rules = match store.get(&policy_key()).await? {
        Some(entry) => Rules::new(
            Some(entry.mod_revision),
            serde_json::from_value(entry.value).ok(),
        ),
        None => Rules::default(),
    };
    let (ledger, ledger_revision) = match store.get(&ledger_key()).await? {
        Some(entry) => match serde_json::from_value::<Ledger>(entry.value) {
            Ok(ledger) if !ledger.stale && ledger.policy_revision == rules.revision => {
                (ledger, Some(entry.mod_revision))
            }
            // Stale, undecodable, or counted under another policy: count afresh, still guarded
            // by the revision it was read at, so a write racing the count fails the guard.
            _ => (recount(store, &rules).await?, Some(entry.mod_revision)),
        },
        // A store that never had one.
        None => (recount(store, &rules).await?, None),
    };
    Ok(Known {
        ledger,
        ledger_revision,
        rules,
    })
}

async fn recount(store: &DynStore, rules: &Rules) -> Result<Ledger, store::Error> {
    let listing = store.list(CFGSYNC_NAMESPACE, REGISTRATION).await?;
    let mut ledger = Ledger {
        policy_revision: rules.revision,
        ..Ledger::default()
    };
    for (identifier, entry) in &listing.entries {
        ledger.registrations += 1;
        ledger.named += u64::from(rules.is_named(identifier));
        ledger.metadata_bytes += metadata_bytes(entry.value.get("metadata"));
    }
    Ok(ledger)
}

async fn admit(
    store: DynStore,
    limits: AdmissionLimits,
    mut proposals: mpsc::Receiver<(Proposal, Reply)>,
) {
    let mut known: Option<Known> = None;
    let mut pending: Vec<(Proposal, Reply)> = Vec::new();
    loop {
        if pending.is_empty() {
            match proposals.recv().await {
                Some(first) => pending.push(first),
                None => return,
            }
        }
        while pending.len() < MAX_PER_BATCH {
            match proposals.try_recv() {
                Ok(next) => pending.push(next),
                Err(_) => break,
            }
        }
        let (state, fresh) = match known.take() {
            Some(state) => (state, false),
            None => match read(&store).await {
                Ok(state) => (state, true),
                Err(err) => {
                    for (_, reply) in pending.drain(..) {
                        let _ = reply.send(Err(Refusal::Store(err.to_string())));
                    }
                    continue;
                }
            },
        };
        known = decide_and_write(&store, limits, state, fresh, &mut pending).await;
    }
}

/// Decides every pending proposal against `state` and writes the admitted ones. Proposals
/// left in `pending` are retried with a fresh read (the returned state is `None`).
///
/// A refusal is only ever given on `fresh` state, read from the store for this round: the
/// state kept from the last batch may predate an operator raising a cap, changing the
/// policy or removing registrations.
async fn decide_and_write(
    store: &DynStore,
    limits: AdmissionLimits,
    state: Known,
    fresh: bool,
    pending: &mut Vec<(Proposal, Reply)>,
) -> Option<Known> {
    let cap = state.rules.cap(limits) as u64;
    let mut ledger = state.ledger;
    let mut admitted = Vec::new();
    let mut seen = HashSet::new();
    let mut queue = std::mem::take(pending).into_iter();
    while let Some((proposal, reply)) = queue.next() {
        let new = matches!(proposal.expect, Precondition::Absent);
        if !seen.insert(proposal.identifier.clone()) {
            // Two registrations of one node in one batch: the second read its precondition
            // before the first is written, so it would fail the next batch for everyone;
            // its caller reads again and retries instead.
            let _ = reply.send(Err(Refusal::Raced));
            continue;
        }
        let (bytes, replaced) = proposal.metadata_bytes;
        let refusal = if new && ledger.registrations >= cap {
            Some(Refusal::Cap(cap as usize))
        } else if new && state.rules.frozen(&ledger) {
            Some(Refusal::Frozen)
        } else if (ledger.metadata_bytes + bytes).saturating_sub(replaced)
            > limits.metadata_budget as u64
            && bytes > replaced
        {
            Some(Refusal::Budget(limits.metadata_budget))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            if !fresh {
                // Decide again on what the store holds now.
                pending.extend(admitted);
                pending.push((proposal, reply));
                pending.extend(queue);
                return None;
            }
            let _ = reply.send(Err(refusal));
            continue;
        }
        if new {
            ledger.registrations += 1;
            ledger.named += u64::from(state.rules.is_named(&proposal.identifier));
        }
        ledger.metadata_bytes = (ledger.metadata_bytes + bytes).saturating_sub(replaced);
        admitted.push((proposal, reply));
    }
    if admitted.is_empty() {
        return Some(Known { ledger, ..state });
    }
    let guard = |revision: Option<Revision>| {
        revision.map_or(Precondition::Absent, Precondition::ModRevision)
    };
    let mut batch = Batch::new()
        .check(ledger_key(), guard(state.ledger_revision))
        .check(policy_key(), guard(state.rules.revision));
    for (proposal, _) in &admitted {
        let key = super::state::registration_key(&proposal.identifier);
        batch = batch
            .check(key.clone(), proposal.expect)
            .check(removed_key(&proposal.identifier), proposal.marker)
            .put(key, proposal.record.clone());
    }
    let batch = batch.put(
        ledger_key(),
        serde_json::to_value(ledger).expect("the ledger always serialises"),
    );
    match store.apply(batch).await {
        Ok(revision) => {
            for (_, reply) in admitted {
                let _ = reply.send(Ok(revision));
            }
            Some(Known {
                ledger,
                ledger_revision: Some(revision),
                rules: state.rules,
            })
        }
        Err(store::Error::Conflict { key, .. }) => {
            // A registration's own key or marker moved: only that one is decided again by its
            // caller; the ledger or the policy moved: everyone is decided again on a fresh read.
            for (proposal, reply) in admitted {
                if owns(&proposal, &key) {
                    let _ = reply.send(Err(Refusal::Raced));
                } else {
                    pending.push((proposal, reply));
                }
            }
            None
        }
        Err(err) => {
            for (_, reply) in admitted {
                let _ = reply.send(Err(Refusal::Store(err.to_string())));
            }
            None
        }
    }
}

/// Whether `key` is one of the keys `proposal` alone is guarded on.
fn owns(proposal: &Proposal, key: &Key) -> bool {
    key.namespace == CFGSYNC_NAMESPACE
        && key.key == proposal.identifier
        && (key.kind == REGISTRATION || key.kind == super::state::REMOVED)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::cfgsync::state::{Removal, registration_key};
    use crate::store::memory::MemoryStore;
    use crate::store::{Limits, StoreExt};

    fn memory() -> DynStore {
        Arc::new(MemoryStore::new(Limits::default()))
    }

    fn proposal(id: &str, metadata: Value) -> Proposal {
        let bytes = metadata_bytes(Some(&metadata));
        Proposal {
            identifier: id.to_string(),
            expect: Precondition::Absent,
            marker: Precondition::Absent,
            record: json!({"identifier": id, "ip": "10.0.0.1", "metadata": metadata,
                           "first_seen_ms": 1, "last_seen_ms": 1}),
            metadata_bytes: (bytes, 0),
        }
    }

    /// An admission task on a fresh memory store, within `limits`.
    fn started(limits: AdmissionLimits) -> (DynStore, Admission) {
        let store = memory();
        let admission = Admission::start(store.clone(), limits);
        (store, admission)
    }

    async fn ledger(store: &DynStore) -> Ledger {
        let entry = store.get(&ledger_key()).await.unwrap().unwrap();
        serde_json::from_value(entry.value).unwrap()
    }

    #[tokio::test]
    async fn the_cap_admits_exactly_that_many_under_a_storm() {
        let (store, admission) = started(AdmissionLimits {
            max_registrations: 5,
            ..AdmissionLimits::default()
        });
        let answers = futures_util::future::join_all(
            (0..40).map(|i| admission.submit(proposal(&format!("n{i}"), Value::Null))),
        )
        .await;
        let stored = answers.iter().filter(|a| a.is_ok()).count();
        assert_eq!(stored, 5, "{answers:?}");
        assert!(
            answers
                .iter()
                .filter(|a| a.is_err())
                .all(|a| a == &Err(Refusal::Cap(5)))
        );
        let listed = store.list(CFGSYNC_NAMESPACE, REGISTRATION).await.unwrap();
        assert_eq!(listed.entries.len(), 5);
        assert_eq!(ledger(&store).await.registrations, 5);
    }

    #[tokio::test]
    async fn a_count_policy_that_freezes_refuses_new_nodes_once_ready() {
        let store = memory();
        let policy = json!({"expect_nodes": 2, "freeze_on_ready": true,
                            "files": [{"path": "a", "template": "x"}]});
        store.put(policy_key(), policy).await.unwrap();
        let admission = Admission::start(store.clone(), AdmissionLimits::default());
        for id in ["a", "b"] {
            admission.submit(proposal(id, Value::Null)).await.unwrap();
        }
        assert_eq!(
            admission.submit(proposal("c", Value::Null)).await,
            Err(Refusal::Frozen)
        );
    }

    #[tokio::test]
    async fn the_metadata_budget_counts_what_is_stored() {
        let (store, admission) = started(AdmissionLimits {
            metadata_budget: 100,
            ..AdmissionLimits::default()
        });
        let forty = json!("x".repeat(38));
        admission
            .submit(proposal("a", forty.clone()))
            .await
            .unwrap();
        admission
            .submit(proposal("b", forty.clone()))
            .await
            .unwrap();
        assert_eq!(
            admission.submit(proposal("c", forty)).await,
            Err(Refusal::Budget(100))
        );
        assert_eq!(ledger(&store).await.metadata_bytes, 80);
    }

    #[tokio::test]
    async fn a_stale_ledger_is_counted_afresh_and_a_write_during_the_count_fails_its_guard() {
        let store = memory();
        let admission = Admission::start(store.clone(), AdmissionLimits::default());
        for id in ["a", "b", "c"] {
            admission.submit(proposal(id, Value::Null)).await.unwrap();
        }
        // An operator removes two nodes outside admission: the ledger is marked stale.
        let batch = Batch::new()
            .delete(registration_key("a"))
            .delete(registration_key("b"))
            .put(ledger_key(), Ledger::stale());
        store.apply(batch).await.unwrap();
        // A fresh task (as after a restart) counts the one left, then adds one.
        let admission = Admission::start(store.clone(), AdmissionLimits::default());
        admission.submit(proposal("d", Value::Null)).await.unwrap();
        let counted = ledger(&store).await;
        assert_eq!((counted.registrations, counted.stale), (2, false));

        // The guard is the ledger's mod revision: a stale mark put after the count was read
        // makes the batch fail rather than store the count taken before it.
        let known = read(&store).await.unwrap();
        store
            .apply(
                Batch::new()
                    .delete(registration_key("c"))
                    .put(ledger_key(), Ledger::stale()),
            )
            .await
            .unwrap();
        let mut pending = Vec::new();
        let (reply, answer) = oneshot::channel();
        pending.push((proposal("e", Value::Null), reply));
        let next = decide_and_write(
            &store,
            AdmissionLimits::default(),
            known,
            true,
            &mut pending,
        )
        .await;
        assert!(next.is_none(), "decided again on a fresh read");
        assert_eq!(pending.len(), 1, "the proposal waits for that read");
        drop(answer);
        assert!(
            ledger(&store).await.stale,
            "nothing overwrote the stale mark"
        );
    }

    #[tokio::test]
    async fn a_replacement_committed_after_the_read_makes_the_registration_decide_again() {
        let store = memory();
        let admission = Admission::start(store.clone(), AdmissionLimits::default());
        // The registration was read with no marker; a replacement then wrote one.
        let marker = Removal {
            removed_ms: 1,
            replaced_by: Some("z".into()),
        };
        store
            .put(removed_key("old"), serde_json::to_value(marker).unwrap())
            .await
            .unwrap();
        assert_eq!(
            admission.submit(proposal("old", Value::Null)).await,
            Err(Refusal::Raced)
        );
        assert!(
            store.get(&registration_key("old")).await.unwrap().is_none(),
            "the replaced node was not stored again"
        );
    }
}
