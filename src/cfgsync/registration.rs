//! A node's requests, decided in one place: who may register (the bundle, a frozen set, a
//! replaced node, a new IP, the cap and the budget, strict mode's secrets and the claim of a
//! record stored before it), and whether a `/node` request may be answered.
//!
//! The HTTP handlers only parse, call [`Service::register`] or [`Service::authorize_node`]
//! and [`Service::serve_node`], and map a [`RegisterError`] to its answer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::admission::{Proposal, Refusal};
use super::payload::Body;
use super::policy::OnNewIp;
use super::service::{NodeAnswer, Service};
use super::state::{RegistrationRecord, Removal, metadata_bytes, registration_key, removed_key};
use super::view::Serving;
use crate::api::NODE_SECRET_HEADER;
use crate::api::auth::constant_time_eq;
use crate::api::cfgsync::{MAX_METADATA_BYTES, NodeRegistration, Registered, check_identifier};
use crate::clock::now_ms;
use crate::store::{self, Precondition, Revision};

/// How long `/node` without `?wait=` may wait for the server's own lag (loading, or the view
/// reaching the node's registration) before answering 425.
pub(super) const OWN_LAG_WAIT: Duration = Duration::from_secs(1);
/// Longest a request waits for the server to load its state at start-up.
const LOAD_WAIT: Duration = Duration::from_secs(10);
/// Longest `/node` waits for the view to reach the node's own registration.
pub(super) const READ_YOUR_WRITES_WAIT: Duration = Duration::from_secs(5);
/// Attempts to record a registration before giving up on concurrent writers of the same node.
const REGISTER_ATTEMPTS: usize = 4;

/// The server's own waits (start-up, read your writes) last at least a moment even for a
/// client that does not long-poll, and never past the client's own wait or `cap`.
pub(super) fn own_lag_deadline(deadline: Instant, cap: Duration) -> Instant {
    let now = Instant::now();
    deadline.max(now + OWN_LAG_WAIT).min(now + cap)
}

/// Why a node's request was refused; nothing was stored. Each variant is one answer on the
/// wire (the server maps them in one place).
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The identifier is not acceptable.
    #[error("{0}")]
    InvalidIdentifier(String),
    /// The metadata is over its limit.
    #[error("metadata is {size} bytes, over the limit of {limit}")]
    MetadataTooLarge {
        /// Its size as compact JSON.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The server has not read its state yet.
    #[error("the server is still loading its state; retry")]
    Loading,
    /// An operator replaced this node by another, which holds its place.
    #[error("{0:?} was replaced by another node; it cannot register again under this identifier")]
    Replaced(String),
    /// Strict mode: the request carries no node secret.
    #[error("this node must send its secret in {NODE_SECRET_HEADER}")]
    SecretMissing,
    /// Strict mode: the secret is not this identifier's.
    #[error("the node secret does not match this identifier")]
    SecretMismatch,
    /// Strict mode: the node never registered, so it has no secret yet.
    #[error("strict mode: register first to get a node secret")]
    NotRegistered,
    /// Strict mode: the node's record predates strict mode and holds no secret.
    #[error("this node's registration predates strict mode: register again to get a node secret")]
    PredatesStrictMode,
    /// Strict mode: a record stored before strict mode, claimed from another address.
    #[error(
        "{0:?} was registered before strict mode from another address; an operator must remove its record first"
    )]
    UnclaimedRecord(String),
    /// Only a bundle is installed, and it has no config for this identifier.
    #[error("the bundle has no config for {0:?}")]
    NotInBundle(String),
    /// Membership is frozen and this node is not a member.
    #[error("membership is frozen since the deployment became ready; {0:?} is not a member")]
    Frozen(String),
    /// The policy keeps the first IP a node registered with.
    #[error("{identifier:?} registered with {ip}; the policy refuses a new IP")]
    IpChanged {
        /// The node.
        identifier: String,
        /// The IP it registered with first.
        ip: IpAddr,
    },
    /// The node changed what peers see (its IP or metadata) too often.
    #[error(
        "{identifier:?} changed its IP or metadata more than {per_minute} times a minute; the change is refused (retry in {retry_after_secs} s)"
    )]
    TooManyChanges {
        /// The node.
        identifier: String,
        /// The rate it may change at.
        per_minute: u32,
        /// When the next change would be taken.
        retry_after_secs: u64,
    },
    /// The registration cap is reached.
    #[error("at most {0} registrations are accepted")]
    Cap(usize),
    /// The metadata budget is spent.
    #[error("the registrations' metadata may hold at most {0} bytes in all")]
    Budget(usize),
    /// Concurrent registrations of the same identifier kept winning.
    #[error(
        "the registration kept racing with concurrent registrations of the same identifier; retry"
    )]
    KeptRacing,
    /// The store could not take the registration now.
    #[error("{0}")]
    Unavailable(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// `/node`: registered, but the config is not ready yet.
    #[error("not ready: {0}")]
    NotReady(&'static str),
    /// `/node`: nothing will be served to this identifier.
    #[error("there is no config for {0:?}")]
    MissingConfig(String),
    /// `/node`: an operator removed this node from a frozen set.
    #[error("{0:?} was removed from a frozen set; it is not a member")]
    RemovedFromFrozenSet(String),
    /// `/node`: the payload could not be built (the reason is in the server's log).
    #[error("the server could not build this node's config; see the server log")]
    RenderFailed,
}

/// Checks what both node routes take: the identifier and the metadata's size.
pub fn check(registration: &NodeRegistration) -> Result<(), RegisterError> {
    check_identifier(&registration.identifier).map_err(RegisterError::InvalidIdentifier)?;
    let size = store::encoded_len(&registration.metadata);
    if size > MAX_METADATA_BYTES {
        return Err(RegisterError::MetadataTooLarge {
            size,
            limit: MAX_METADATA_BYTES,
        });
    }
    Ok(())
}

/// SHA-256 of a node secret, hex: what is stored in place of the secret.
fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new node secret: 32 random bytes, hex.
fn new_secret() -> Result<String, RegisterError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|err| {
        RegisterError::Unavailable(format!("no randomness for a node secret: {err}"))
    })?;
    Ok(hex::encode(bytes))
}

/// Strict mode: the request must carry the secret whose hash `record` holds.
fn check_secret(record: &RegistrationRecord, presented: Option<&str>) -> Result<(), RegisterError> {
    let Some(expected) = &record.secret_sha256 else {
        return Ok(());
    };
    let presented = presented.ok_or(RegisterError::SecretMissing)?;
    if constant_time_eq(sha256_hex(presented).as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(RegisterError::SecretMismatch)
    }
}

/// Whether a registration from `peer` may take over `record`, which has no secret: same IP,
/// sent from the host that registered it. A replacement the operator placed (`nodes replace`,
/// no sender recorded) is taken by the first registration from the IP the operator named.
fn claims(
    record: &RegistrationRecord,
    registration: &NodeRegistration,
    peer: Option<SocketAddr>,
) -> bool {
    let from = |stored: &str| stored.parse::<SocketAddr>().ok().map(|a| a.ip());
    let placed = record.replaces.is_some() && record.peer.is_none();
    let sender = |ip: IpAddr| peer.is_some_and(|peer| peer.ip() == ip);
    record.ip == registration.ip
        && if placed {
            // Only the machine at the IP the operator named, not anyone claiming it.
            sender(record.ip)
        } else {
            record.peer.as_deref().and_then(from).is_some_and(sender)
        }
}

/// The rules the view can decide before anything is written: the bundle, and the policy's
/// `on_new_ip`. The cap, the budget and a frozen set are decided by admission, in the store
/// batch that stores the registration.
fn rules(
    serving: &Serving,
    registration: &NodeRegistration,
    existing: Option<&RegistrationRecord>,
) -> Result<(), RegisterError> {
    let id = &registration.identifier;
    if !serving.has_materializer() && serving.bundle_has(id) == Some(false) {
        return Err(RegisterError::NotInBundle(id.clone()));
    }
    if let (Some(policy), Some(old)) = (serving.policy(), existing)
        && policy.on_new_ip == OnNewIp::Reject
        && old.ip != registration.ip
    {
        return Err(RegisterError::IpChanged {
            identifier: id.clone(),
            ip: old.ip,
        });
    }
    Ok(())
}

/// A node's registration and removal marker as the store holds them.
struct Stored {
    record: Option<RegistrationRecord>,
    expect: Precondition,
    marker: Precondition,
    replaced: bool,
}

impl Stored {
    /// What the view suggests for a node it has never seen: most likely new, so the write is
    /// tried on that guess without a read; the batch's preconditions catch a view that was
    /// behind, and the next attempt reads the store.
    fn guessed() -> Self {
        Self {
            record: None,
            expect: Precondition::Absent,
            marker: Precondition::Absent,
            replaced: false,
        }
    }
}

impl Service {
    /// The view once the stored state is loaded (a starting server's view is empty).
    async fn loaded(&self) -> Result<Arc<Serving>, RegisterError> {
        let serving = self.caught_up(0, Instant::now() + LOAD_WAIT).await;
        if serving.loaded {
            Ok(serving)
        } else {
            Err(RegisterError::Loading)
        }
    }

    async fn stored(&self, identifier: &str) -> Result<Stored, RegisterError> {
        let entry = self.store.get(&registration_key(identifier)).await?;
        let marker = self.store.get(&removed_key(identifier)).await?;
        let at = |revision: Option<Revision>| {
            revision.map_or(Precondition::Absent, Precondition::ModRevision)
        };
        Ok(Stored {
            record: entry
                .as_ref()
                .and_then(|e| serde_json::from_value(e.value.clone()).ok()),
            expect: at(entry.as_ref().map(|e| e.mod_revision)),
            marker: at(marker.as_ref().map(|m| m.mod_revision)),
            replaced: entry.is_none() && marker.is_some_and(|m| Removal::says_replaced(&m.value)),
        })
    }

    /// Strict mode's secret for the record to store: the one it holds, or a new one (shown
    /// once, in the answer), after checking what the request presents.
    fn secret_for(
        &self,
        existing: Option<&RegistrationRecord>,
        registration: &NodeRegistration,
        peer: Option<SocketAddr>,
        presented: Option<&str>,
    ) -> Result<(Option<String>, Option<String>), RegisterError> {
        match existing {
            Some(record) if record.secret_sha256.is_some() => {
                check_secret(record, presented)?;
                Ok((record.secret_sha256.clone(), None))
            }
            // A record stored before strict mode was turned on has no secret to check. It
            // is claimed only by the node it describes: from the address it registered from,
            // with its IP unchanged. Anyone else could take the secret and lock it out.
            Some(record) if self.options.strict_nodes && !claims(record, registration, peer) => {
                Err(RegisterError::UnclaimedRecord(
                    registration.identifier.clone(),
                ))
            }
            _ if self.options.strict_nodes => {
                let secret = new_secret()?;
                Ok((Some(sha256_hex(&secret)), Some(secret)))
            }
            _ => Ok((None, None)),
        }
    }

    /// Records a node (durably, before answering) with the address it was seen from, or says
    /// why not. In strict mode a new node's secret comes back in the answer, once.
    pub async fn register(
        &self,
        registration: NodeRegistration,
        peer: Option<SocketAddr>,
        presented: Option<&str>,
    ) -> Result<Registered, RegisterError> {
        check(&registration)?;
        let id = registration.identifier.clone();
        let mut charged = false;
        let registered = self
            .write_registration(registration, peer, presented, &mut charged)
            .await;
        // A change that was refused does not cost the node one; a store error may have
        // come after the write committed, so that change stays counted.
        if charged
            && matches!(&registered, Err(err) if !matches!(err, RegisterError::Unavailable(_)))
        {
            self.changes.give_back(&id);
        }
        registered
    }

    /// [`Self::register`]'s decide-and-write, retried on races; `charged` says whether a
    /// change was taken from the node's rate.
    async fn write_registration(
        &self,
        registration: NodeRegistration,
        peer: Option<SocketAddr>,
        presented: Option<&str>,
        charged: &mut bool,
    ) -> Result<Registered, RegisterError> {
        let id = &registration.identifier;
        // Admission decides on the loaded state, never on the empty view of a starting server.
        let loaded = self.loaded().await?;
        for attempt in 0..REGISTER_ATTEMPTS {
            let guessed =
                attempt == 0 && loaded.registration(id).is_none() && !loaded.was_removed(id);
            let stored = if guessed {
                Stored::guessed()
            } else {
                self.stored(id).await?
            };
            // Its replacement holds its place: registering again would put two nodes in one
            // slot.
            if stored.replaced {
                return Err(RegisterError::Replaced(id.clone()));
            }
            let existing = stored.record.as_ref();
            let (secret_sha256, node_secret) =
                self.secret_for(existing, &registration, peer, presented)?;
            // After the secret: a caller without it learns nothing of the stored record.
            rules(&self.current(), &registration, existing)?;
            // A change peers see renders every node's files again: at a bounded rate, charged
            // once per registration however often its write is retried.
            if !*charged
                && existing.is_some_and(|old| {
                    old.ip != registration.ip || old.metadata != registration.metadata
                })
            {
                self.changes.take(id).map_err(|retry_after_secs| {
                    RegisterError::TooManyChanges {
                        identifier: id.clone(),
                        per_minute: self.changes.per_minute(),
                        retry_after_secs,
                    }
                })?;
                *charged = true;
            }
            let now = now_ms();
            let record = RegistrationRecord {
                identifier: id.clone(),
                ip: registration.ip,
                metadata: registration.metadata.clone(),
                first_seen_ms: existing.map_or(now, |r| r.first_seen_ms),
                last_seen_ms: now,
                peer: peer.map(|p| p.to_string()),
                secret_sha256,
                // A replacement keeps the place it took over.
                slot: existing.and_then(|r| r.slot.clone()),
                replaces: existing.and_then(|r| r.replaces.clone()),
            };
            let proposal = Proposal {
                identifier: id.clone(),
                expect: stored.expect,
                marker: stored.marker,
                metadata_bytes: (
                    metadata_bytes(Some(&record.metadata)),
                    existing.map_or(0, |old| metadata_bytes(Some(&old.metadata))),
                ),
                record: serde_json::to_value(&record).expect("records always serialise"),
            };
            match self.admission.submit(proposal).await {
                Ok(revision) => {
                    tracing::debug!(identifier = %id, revision, "registered");
                    return Ok(Registered {
                        identifier: registration.identifier,
                        node_secret,
                    });
                }
                // Another request for the same node won the race: decide again on fresh state.
                Err(Refusal::Raced) => continue,
                // Refused as a new node on the view's guess: the node may be registered
                // already, which admission treats differently; read the store and decide again.
                Err(Refusal::Cap(_) | Refusal::Budget(_) | Refusal::Frozen) if guessed => continue,
                Err(Refusal::Cap(cap)) => return Err(RegisterError::Cap(cap)),
                Err(Refusal::Budget(budget)) => return Err(RegisterError::Budget(budget)),
                Err(Refusal::Frozen) => return Err(RegisterError::Frozen(id.clone())),
                Err(Refusal::Store(message)) => return Err(RegisterError::Unavailable(message)),
            }
        }
        Err(RegisterError::KeptRacing)
    }

    /// Checks a `/node` request before it is answered, and returns the view to answer from:
    /// in strict mode the node must prove it holds its secret (bundle nodes included), and a
    /// node that got its 202 from any server on this store is never told "not registered" by
    /// this server's lag: the view is caught up with its registration first (bounded).
    pub async fn authorize_node(
        &self,
        registration: &NodeRegistration,
        presented: Option<&str>,
        deadline: Instant,
    ) -> Result<Arc<Serving>, RegisterError> {
        check(registration)?;
        let id = &registration.identifier;
        let serving = self
            .caught_up(0, own_lag_deadline(deadline, LOAD_WAIT))
            .await;
        let in_view = serving.registration(id).cloned();
        let stored = match in_view {
            Some(_) => None,
            None => self.store.get(&registration_key(id)).await?,
        };
        if self.options.strict_nodes {
            let record = in_view.or_else(|| {
                stored
                    .as_ref()
                    .and_then(|entry| serde_json::from_value(entry.value.clone()).ok())
            });
            match record {
                Some(record) if record.secret_sha256.is_some() => {
                    check_secret(&record, presented)?;
                }
                Some(_) => return Err(RegisterError::PredatesStrictMode),
                None => return Err(RegisterError::NotRegistered),
            }
        }
        Ok(match stored {
            // Read your writes: the store holds a registration the view has not reached yet.
            Some(entry) => {
                self.caught_up(
                    entry.mod_revision,
                    own_lag_deadline(deadline, READ_YOUR_WRITES_WAIT),
                )
                .await
            }
            None => serving,
        })
    }

    /// Serves `identifier` from `serving` on: its payload, held until `deadline` while it is
    /// not ready, or (with `after`) until an epoch newer than `after` exists.
    pub async fn serve_node(
        &self,
        mut serving: Arc<Serving>,
        identifier: &str,
        after: Option<Revision>,
        deadline: Instant,
    ) -> Result<Served, RegisterError> {
        // An epoch past this store's revision is from another store (a list of servers that
        // do not share one, or a store started afresh): the node is answered at once with
        // what this store serves, rather than held for an epoch that may never come.
        let after = match after {
            Some(epoch) if epoch > serving.revision && epoch > self.store.revision().await? => None,
            after => after,
        };
        let mut synced = false;
        // Subscribed only once an answer has to wait: a served request needs no subscription.
        let mut changes = None;
        loop {
            let why = match self.answer(&serving, identifier).await {
                NodeAnswer::Ready(body) => {
                    self.note_fetched(&serving, identifier, body.epoch);
                    if after.is_none_or(|after| body.epoch > after) {
                        return Ok(Served::Payload(body));
                    }
                    // The node has this epoch already (`--watch`): hold for a newer one.
                    None
                }
                NodeAnswer::NotReady(_) | NodeAnswer::Unregistered if !synced => {
                    // Not ready in the view; perhaps ready in the store, which the view may
                    // trail by a moment. Catch up once with the store's revision before saying
                    // 425, so a node is never turned away by the server's own lag.
                    synced = true;
                    let revision = self.store.revision().await?;
                    if revision > serving.revision {
                        let until = own_lag_deadline(deadline, READ_YOUR_WRITES_WAIT);
                        serving = self.caught_up(revision, until).await;
                    }
                    continue;
                }
                NodeAnswer::NotReady(why) => Some(why),
                // Nothing to hold for: a node that registered through this store would be in
                // the view by now (read your writes), and an unknown identifier must not hold
                // a slot for a registration that may never come.
                NodeAnswer::Unregistered => {
                    return Err(RegisterError::NotReady(
                        "this identifier has not registered",
                    ));
                }
                NodeAnswer::Missing => {
                    return Err(RegisterError::MissingConfig(identifier.to_string()));
                }
                NodeAnswer::Frozen => {
                    return Err(RegisterError::RemovedFromFrozenSet(identifier.to_string()));
                }
                NodeAnswer::Failed(_) => return Err(RegisterError::RenderFailed),
            };
            // Only views newer than the one just answered from are worth another look.
            let changes = changes.get_or_insert_with(|| self.subscribe());
            changes.mark_unchanged();
            // Reports and other namespaces change no answer: they wake nobody.
            let newer = changes.wait_for(|s| s.served_revision > serving.served_revision);
            match tokio::time::timeout_at(deadline, newer).await {
                Ok(Ok(next)) => serving = next.clone(),
                _ => {
                    return match why {
                        Some(why) => Err(RegisterError::NotReady(why)),
                        None => Ok(Served::Unchanged),
                    };
                }
            }
        }
    }
}

/// What a node's fetch comes to.
#[derive(Debug, Clone)]
pub enum Served {
    /// Its payload.
    Payload(Arc<Body>),
    /// `after` named the newest epoch, and no newer one came within the wait.
    Unchanged,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn record(ip: &str, peer: Option<&str>, replaces: Option<&str>) -> RegistrationRecord {
        RegistrationRecord {
            identifier: "n".into(),
            ip: ip.parse().unwrap(),
            metadata: json!(null),
            first_seen_ms: 1,
            last_seen_ms: 1,
            peer: peer.map(str::to_string),
            secret_sha256: None,
            slot: None,
            replaces: replaces.map(str::to_string),
        }
    }

    fn from(ip: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(ip.parse().unwrap(), 5000))
    }

    #[test]
    fn a_pre_strict_record_is_claimed_only_from_its_own_host_with_its_own_ip() {
        let stored = record("10.0.0.1", Some("192.168.1.5:4000"), None);
        let same = NodeRegistration::new("n", "10.0.0.1".parse().unwrap());
        let moved = NodeRegistration::new("n", "10.0.0.2".parse().unwrap());
        assert!(claims(&stored, &same, from("192.168.1.5")));
        assert!(!claims(&stored, &same, from("192.168.1.6")), "another host");
        assert!(!claims(&stored, &moved, from("192.168.1.5")), "another IP");
        assert!(!claims(&stored, &same, None), "no sender known");
    }

    #[test]
    fn a_placed_replacement_is_claimed_from_the_ip_the_operator_named() {
        let placed = record("10.0.0.7", None, Some("old"));
        let node = NodeRegistration::new("n", "10.0.0.7".parse().unwrap());
        assert!(claims(&placed, &node, from("10.0.0.7")));
        assert!(!claims(&placed, &node, from("10.0.0.8")));
    }

    #[test]
    fn secrets_are_checked_in_constant_time_against_their_hash() {
        let mut stored = record("10.0.0.1", None, None);
        assert!(check_secret(&stored, None).is_ok(), "no secret to check");
        let secret = new_secret().unwrap();
        assert_eq!(secret.len(), 64);
        stored.secret_sha256 = Some(sha256_hex(&secret));
        assert!(check_secret(&stored, Some(&secret)).is_ok());
        assert!(matches!(
            check_secret(&stored, Some("guess")),
            Err(RegisterError::SecretMismatch)
        ));
        assert!(matches!(
            check_secret(&stored, None),
            Err(RegisterError::SecretMissing)
        ));
    }

    #[test]
    fn identifiers_and_metadata_are_checked_before_anything_else() {
        let bad = NodeRegistration::new("a/b", "10.0.0.1".parse().unwrap());
        assert!(matches!(
            check(&bad),
            Err(RegisterError::InvalidIdentifier(_))
        ));
        let big = NodeRegistration::new("a", "10.0.0.1".parse().unwrap())
            .with_metadata(&json!({"x": "y".repeat(MAX_METADATA_BYTES)}))
            .unwrap();
        assert!(matches!(
            check(&big),
            Err(RegisterError::MetadataTooLarge { .. })
        ));
    }
}
