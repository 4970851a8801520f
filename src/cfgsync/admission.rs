//! Admission that holds under concurrency: the registration cap, the metadata budget and a
//! frozen membership are decided against a ledger in the store and written in the same batch
//! as the registrations they admit, never against the server's lagging view.
//!
//! The ledger (`__cfgsync__/admission/current`) counts registrations, the registered members
//! of a named set, and the bytes of their metadata. One task per server takes registrations
//! as they come, decides each in order against the ledger, and writes the admitted ones with
//! the updated ledger as one batch guarded by the ledger's revision and the policy's. Under a
//! storm one batch carries many registrations, so this costs one store commit per batch, as
//! the store's own group commit did. Another server writing meanwhile makes the guard fail;
//! the task then reads the ledger again and decides again, so no cap is ever overshot.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::policy::Policy;
use super::state::{CURRENT, POLICY, REGISTRATION};
use crate::store::{self, Batch, CFGSYNC_NAMESPACE, DynStore, Key, Precondition, Revision};

/// Type of the admission ledger (key [`CURRENT`]).
pub const ADMISSION: &str = "admission";

/// Default cap on registrations when neither the policy nor the operator sets a lower one.
pub const DEFAULT_MAX_REGISTRATIONS: usize = 20_000;
/// Default budget for all registrations' metadata together, in bytes.
pub const DEFAULT_METADATA_BUDGET: usize = 256 << 20;

/// Registrations packed into one batch at most (each needs a check and a put).
const MAX_PER_BATCH: usize = 400;

/// The ledger's key.
pub fn ledger_key() -> Key {
    Key::new(CFGSYNC_NAMESPACE, ADMISSION, CURRENT)
}

/// What the ledger counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Registrations stored.
    pub registrations: u64,
    /// Of those, members of the policy's named set (when it has one).
    pub named: u64,
    /// Bytes of their metadata as stored (compact JSON).
    pub metadata_bytes: u64,
    /// The policy revision `named` was counted under: another policy means another named
    /// set, so the ledger is counted afresh.
    #[serde(default)]
    pub policy_revision: Option<Revision>,
}

/// One registration waiting for admission.
#[derive(Debug)]
pub struct Proposal {
    /// The registration's key.
    pub key: Key,
    /// `Absent` for a node the store does not hold, else the revision it was read at.
    pub expect: Precondition,
    /// The record to store.
    pub record: Value,
    /// Bytes of the new metadata, and of the metadata it replaces (0 for a new node).
    pub metadata_bytes: (u64, u64),
    /// Where the answer goes: the revision the registration was stored at, or why not.
    pub reply: oneshot::Sender<Result<Revision, Refusal>>,
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
    /// The registration's own key changed since it was read: decide again.
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

/// The handle registrations are admitted through.
#[derive(Debug, Clone)]
pub struct Admission {
    queue: mpsc::Sender<Proposal>,
}

impl Admission {
    /// Starts the admission task on `store`.
    pub fn start(store: DynStore, limits: AdmissionLimits) -> Self {
        let (queue, proposals) = mpsc::channel(4 * MAX_PER_BATCH);
        tokio::spawn(admit(store, limits, proposals));
        Self { queue }
    }

    /// Admits and stores `proposal`'s registration, or says why not.
    pub async fn submit(
        &self,
        key: Key,
        expect: Precondition,
        record: Value,
        metadata_bytes: (u64, u64),
    ) -> Result<Revision, Refusal> {
        let (reply, answer) = oneshot::channel();
        let proposal = Proposal {
            key,
            expect,
            record,
            metadata_bytes,
            reply,
        };
        if self.queue.send(proposal).await.is_err() {
            return Err(Refusal::Store("the admission task has stopped".into()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Refusal::Store("the admission task has stopped".into())))
    }
}

/// The policy as admission needs it, with the revision that guards it.
#[derive(Debug, Default)]
struct Rules {
    revision: Option<Revision>,
    max_registrations: Option<usize>,
    /// `Some(n)`: frozen once `n` are registered (count policy with `freeze_on_ready`).
    freeze_at_count: Option<u64>,
    /// The named set, and whether it freezes once complete.
    named: Option<(HashSet<String>, bool)>,
}

impl Rules {
    fn from_policy(revision: Option<Revision>, policy: Option<Policy>) -> Self {
        let Some(policy) = policy else {
            return Self {
                revision,
                ..Self::default()
            };
        };
        let freeze = policy.freeze_on_ready;
        Self {
            revision,
            max_registrations: policy.max_registrations,
            freeze_at_count: policy
                .expect_nodes
                .filter(|_| freeze && policy.expect_identifiers.is_none())
                .map(|n| n as u64),
            named: policy
                .expect_identifiers
                .map(|ids| (ids.into_iter().collect(), freeze)),
        }
    }

    fn is_named(&self, identifier: &str) -> bool {
        self.named
            .as_ref()
            .is_some_and(|(ids, _)| ids.contains(identifier))
    }

    fn frozen(&self, ledger: &Ledger) -> bool {
        if let Some(n) = self.freeze_at_count
            && ledger.registrations >= n
        {
            return true;
        }
        matches!(&self.named, Some((ids, true)) if ledger.named >= ids.len() as u64)
    }
}

/// What the task knows between batches: the ledger and the rules, with their revisions.
struct Known {
    ledger: Ledger,
    ledger_revision: Option<Revision>,
    rules: Rules,
}

async fn read(store: &DynStore) -> Result<Known, store::Error> {
    let policy_entry = store
        .get(&Key::new(CFGSYNC_NAMESPACE, POLICY, CURRENT))
        .await?;
    let rules = match policy_entry {
        Some(entry) => Rules::from_policy(
            Some(entry.mod_revision),
            serde_json::from_value(entry.value).ok(),
        ),
        None => Rules::default(),
    };
    let (ledger, ledger_revision) = match store.get(&ledger_key()).await? {
        Some(entry) => match serde_json::from_value::<Ledger>(entry.value) {
            Ok(ledger) if ledger.policy_revision == rules.revision => {
                (ledger, Some(entry.mod_revision))
            }
            // Undecodable, or counted under another policy: count afresh, still guarded by
            // the revision it was read at.
            _ => (recount(store, &rules).await?, Some(entry.mod_revision)),
        },
        // None yet, or removed by a `/v1` write to the registrations: count them afresh.
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

/// Bytes of metadata as compact JSON (`null` and absent count as nothing).
pub fn metadata_bytes(metadata: Option<&Value>) -> u64 {
    match metadata {
        None | Some(Value::Null) => 0,
        Some(value) => crate::store::encoded_len(value) as u64,
    }
}

async fn admit(store: DynStore, limits: AdmissionLimits, mut proposals: mpsc::Receiver<Proposal>) {
    let mut known: Option<Known> = None;
    let mut pending: Vec<Proposal> = Vec::new();
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
                    for proposal in pending.drain(..) {
                        let _ = proposal.reply.send(Err(Refusal::Store(err.to_string())));
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
    pending: &mut Vec<Proposal>,
) -> Option<Known> {
    let cap = state
        .rules
        .max_registrations
        .map_or(limits.max_registrations, |p| {
            p.min(limits.max_registrations)
        });
    let mut ledger = state.ledger;
    let mut admitted = Vec::new();
    let mut seen = HashSet::new();
    let mut queue = std::mem::take(pending).into_iter();
    while let Some(proposal) = queue.next() {
        let new = matches!(proposal.expect, Precondition::Absent);
        let identifier = proposal.key.key.clone();
        if !seen.insert(identifier.clone()) {
            // Two registrations of one node in one batch: the second read its precondition
            // before the first is written, so it would fail the next batch for everyone;
            // its handler reads again and retries instead.
            let _ = proposal.reply.send(Err(Refusal::Raced));
            continue;
        }
        let (bytes, replaced) = proposal.metadata_bytes;
        let refusal = if new && ledger.registrations >= cap as u64 {
            Some(Refusal::Cap(cap))
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
                pending.push(proposal);
                pending.extend(queue);
                return None;
            }
            let _ = proposal.reply.send(Err(refusal));
            continue;
        }
        if new {
            ledger.registrations += 1;
            ledger.named += u64::from(state.rules.is_named(&identifier));
        }
        ledger.metadata_bytes = (ledger.metadata_bytes + bytes).saturating_sub(replaced);
        admitted.push(proposal);
    }
    if admitted.is_empty() {
        return Some(Known { ledger, ..state });
    }
    let mut batch = Batch::new();
    batch = batch.check(
        ledger_key(),
        state
            .ledger_revision
            .map_or(Precondition::Absent, Precondition::ModRevision),
    );
    batch = batch.check(
        Key::new(CFGSYNC_NAMESPACE, POLICY, CURRENT),
        state
            .rules
            .revision
            .map_or(Precondition::Absent, Precondition::ModRevision),
    );
    for proposal in &admitted {
        batch = batch
            .check(proposal.key.clone(), proposal.expect)
            .put(proposal.key.clone(), proposal.record.clone());
    }
    batch = batch.put(
        ledger_key(),
        serde_json::to_value(ledger).expect("the ledger always serialises"),
    );
    match store.apply(batch).await {
        Ok(revision) => {
            for proposal in admitted {
                let _ = proposal.reply.send(Ok(revision));
            }
            Some(Known {
                ledger,
                ledger_revision: Some(revision),
                rules: state.rules,
            })
        }
        Err(store::Error::Conflict { key, .. }) => {
            // A registration's own key moved: only that one is decided again by its handler;
            // the ledger or the policy moved: everyone is decided again on a fresh read.
            for proposal in admitted {
                if proposal.key == key {
                    let _ = proposal.reply.send(Err(Refusal::Raced));
                } else {
                    pending.push(proposal);
                }
            }
            None
        }
        Err(err) => {
            for proposal in admitted {
                let _ = proposal.reply.send(Err(Refusal::Store(err.to_string())));
            }
            None
        }
    }
}
