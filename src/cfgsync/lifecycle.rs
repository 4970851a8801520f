//! Node lifecycle: removing a registration, and replacing a node by another that takes its
//! place (its `index` and its position in every peer list). Each is one store batch, which also
//! marks the admission ledger stale so the cap and the budget are counted afresh.

use std::net::IpAddr;

use serde_json::json;

use super::policy::Policy;
use super::state::{
    Ledger, RegistrationRecord, Removal, fetched_key, ledger_key, policy_key, registration_key,
    removed_key, report_key,
};
use crate::api::cfgsync::check_identifier;
use crate::clock::now_ms;
use crate::store::{self, Batch, Precondition, Revision, Store};

/// Why a lifecycle change was refused; nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The node to remove or replace is not registered.
    #[error("no node {0:?} is registered")]
    Unknown(String),
    /// The replacement's identifier is already registered.
    #[error("{0:?} is already registered; a replacement needs an identifier that is not")]
    Exists(String),
    /// The replacement's identifier is not a valid identifier.
    #[error("invalid replacement identifier: {0}")]
    Invalid(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

async fn registered(
    store: &dyn Store,
    identifier: &str,
) -> Result<(RegistrationRecord, Revision), LifecycleError> {
    let entry = store
        .get(&registration_key(identifier))
        .await?
        .ok_or_else(|| LifecycleError::Unknown(identifier.to_string()))?;
    let record = serde_json::from_value(entry.value)
        .map_err(|err| store::Error::backend("decoding a registration", err))?;
    Ok((record, entry.mod_revision))
}

/// Removes `identifier`'s registration, in one batch with its removal marker.
pub async fn remove(store: &dyn Store, identifier: &str) -> Result<Revision, LifecycleError> {
    let (_, revision) = registered(store, identifier).await?;
    let key = registration_key(identifier);
    let marker = Removal {
        removed_ms: now_ms(),
        replaced_by: None,
    };
    let batch = Batch::new()
        .check(key.clone(), Precondition::ModRevision(revision))
        .delete(key)
        // What it applied goes with it: a rollout no longer waits for it.
        .delete(report_key(identifier))
        .delete(fetched_key(identifier))
        .put(removed_key(identifier), json!(marker))
        .put(ledger_key(), Ledger::stale());
    Ok(store.apply(batch).await?)
}

/// Replaces `old` by `new` in one batch: `new` is registered in `old`'s place (its slot, so the
/// same index; its metadata; `ip`, or `old`'s IP), and `old` is removed. `new` takes the record
/// over when it registers from that IP, even in a frozen set, since it is then a member.
pub async fn replace(
    store: &dyn Store,
    old: &str,
    new: &str,
    ip: Option<IpAddr>,
) -> Result<Revision, LifecycleError> {
    check_identifier(new).map_err(LifecycleError::Invalid)?;
    if old == new {
        return Err(LifecycleError::Invalid(format!(
            "{new:?} cannot replace itself"
        )));
    }
    let (record, revision) = registered(store, old).await?;
    let policy = store
        .get(&policy_key())
        .await?
        .and_then(|entry| serde_json::from_value::<Policy>(entry.value).ok());
    if policy.is_some_and(|p| p.expect_identifiers.is_some()) {
        return Err(LifecycleError::Invalid(
            "the policy names its members (`expect_identifiers`): a new identifier is not one of them; change the policy instead".into(),
        ));
    }
    let now = now_ms();
    let replacement = RegistrationRecord {
        identifier: new.to_string(),
        ip: ip.unwrap_or(record.ip),
        metadata: record.metadata.clone(),
        first_seen_ms: now,
        last_seen_ms: now,
        peer: None,
        secret_sha256: None,
        slot: Some(record.order().to_string()),
        replaces: Some(old.to_string()),
    };
    let marker = Removal {
        removed_ms: now,
        replaced_by: Some(new.to_string()),
    };
    let (old_key, new_key) = (registration_key(old), registration_key(new));
    let batch = Batch::new()
        .check(old_key.clone(), Precondition::ModRevision(revision))
        .check(new_key.clone(), Precondition::Absent)
        .delete(old_key)
        .delete(report_key(old))
        .delete(fetched_key(old))
        .put(new_key.clone(), json!(replacement))
        .put(removed_key(old), json!(marker))
        .delete(removed_key(new))
        .put(ledger_key(), Ledger::stale());
    match store.apply(batch).await {
        Ok(revision) => Ok(revision),
        Err(store::Error::Conflict { key, .. }) if key == new_key => {
            Err(LifecycleError::Exists(new.to_string()))
        }
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{DynStore, Limits, StoreExt};

    fn record(id: &str, ip: &str) -> RegistrationRecord {
        RegistrationRecord {
            identifier: id.into(),
            ip: ip.parse().unwrap(),
            metadata: json!({"zone": "a"}),
            first_seen_ms: 1,
            last_seen_ms: 1,
            peer: Some("10.0.0.9:4000".into()),
            secret_sha256: None,
            slot: None,
            replaces: None,
        }
    }

    async fn store_with(ids: &[&str]) -> DynStore {
        let store: DynStore = Arc::new(MemoryStore::new(Limits::default()));
        for id in ids {
            store
                .put(registration_key(id), json!(record(id, "10.0.0.1")))
                .await
                .unwrap();
        }
        store
    }

    #[tokio::test]
    async fn a_replacement_takes_the_old_slot_in_one_batch() {
        let store = store_with(&["node-b", "node-c"]).await;
        let before = store.revision().await.unwrap();
        let revision = replace(
            store.as_ref(),
            "node-b",
            "node-z",
            Some("10.0.0.7".parse().unwrap()),
        )
        .await
        .unwrap();
        assert_eq!(revision, before + 1, "one batch");
        assert!(
            store
                .get(&registration_key("node-b"))
                .await
                .unwrap()
                .is_none()
        );
        let new = store
            .get(&registration_key("node-z"))
            .await
            .unwrap()
            .unwrap();
        let new: RegistrationRecord = serde_json::from_value(new.value).unwrap();
        assert_eq!(new.order(), "node-b", "sorts where node-b did");
        assert_eq!(new.ip.to_string(), "10.0.0.7");
        assert_eq!(new.metadata, json!({"zone": "a"}));
        assert!(store.get(&removed_key("node-b")).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn an_unknown_node_or_a_taken_identifier_changes_nothing() {
        let store = store_with(&["node-b", "node-c"]).await;
        let before = store.revision().await.unwrap();
        let unknown = replace(store.as_ref(), "node-x", "node-z", None).await;
        assert!(matches!(unknown, Err(LifecycleError::Unknown(ref id)) if id == "node-x"));
        let taken = replace(store.as_ref(), "node-b", "node-c", None).await;
        assert!(matches!(taken, Err(LifecycleError::Exists(ref id)) if id == "node-c"));
        let invalid = replace(store.as_ref(), "node-b", "a/b", None).await;
        assert!(matches!(invalid, Err(LifecycleError::Invalid(_))));
        assert!(matches!(
            remove(store.as_ref(), "node-x").await,
            Err(LifecycleError::Unknown(_))
        ));
        assert_eq!(
            store.revision().await.unwrap(),
            before,
            "nothing was written"
        );
    }
}
