//! The reconciler lease: only its holder runs initialisers, and its flag writes are fenced by
//! it. Built on store batches with preconditions, so it works on every backend and through the
//! HTTP API.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::clock::now_ms;
use crate::store::{self, Batch, Key, Precondition, Revision, SYSTEM_NAMESPACE, Store};

/// The lease key.
pub fn lease_key() -> Key {
    Key::new(SYSTEM_NAMESPACE, "lease", "reconciler")
}

/// The stored lease value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Who holds it.
    pub holder: String,
    /// When it lapses unless renewed, Unix ms.
    pub expires_at_ms: u64,
}

/// What an acquisition attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// This process holds the lease; flag writes must check the key at this revision.
    Held(Revision),
    /// Someone else holds it until the given time.
    Standby {
        /// The holder.
        holder: String,
        /// Unix ms when it lapses.
        expires_at_ms: u64,
    },
}

/// Takes the lease when it is free, expired or already ours; renews it in that last case.
pub async fn acquire(
    store: &dyn Store,
    holder: &str,
    ttl: Duration,
) -> Result<Acquired, store::Error> {
    let key = lease_key();
    let current = store.get(&key).await?;
    let expect = match &current {
        None => Precondition::Absent,
        Some(entry) => {
            let record: Option<LeaseRecord> = serde_json::from_value(entry.value.clone()).ok();
            match record {
                Some(r) if r.holder != holder && r.expires_at_ms > now_ms() => {
                    return Ok(Acquired::Standby {
                        holder: r.holder,
                        expires_at_ms: r.expires_at_ms,
                    });
                }
                _ => Precondition::ModRevision(entry.mod_revision),
            }
        }
    };
    let value = json!(LeaseRecord {
        holder: holder.to_string(),
        expires_at_ms: now_ms() + ttl.as_millis() as u64,
    });
    match store
        .apply(Batch::new().check(key.clone(), expect).put(key, value))
        .await
    {
        Ok(revision) => Ok(Acquired::Held(revision)),
        // Another replica moved first; report what it holds.
        Err(store::Error::Conflict { .. }) => Ok(Acquired::Standby {
            holder: "another replica".into(),
            expires_at_ms: now_ms() + ttl.as_millis() as u64,
        }),
        Err(err) => Err(err),
    }
}

/// Renews a held lease; `Ok(None)` means it was lost (someone else took it after expiry).
pub async fn renew(
    store: &dyn Store,
    holder: &str,
    held: Revision,
    ttl: Duration,
) -> Result<Option<Revision>, store::Error> {
    let key = lease_key();
    let value = json!(LeaseRecord {
        holder: holder.to_string(),
        expires_at_ms: now_ms() + ttl.as_millis() as u64,
    });
    match store
        .apply(
            Batch::new()
                .check(key.clone(), Precondition::ModRevision(held))
                .put(key, value),
        )
        .await
    {
        Ok(revision) => Ok(Some(revision)),
        Err(store::Error::Conflict { .. }) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Gives the lease up so a standby need not wait for it to lapse; answers the revision of the
/// release, or `None` when the lease had already passed to someone else.
pub async fn release(store: &dyn Store, held: Revision) -> Result<Option<Revision>, store::Error> {
    let key = lease_key();
    match store
        .apply(
            Batch::new()
                .check(key.clone(), Precondition::ModRevision(held))
                .delete(key),
        )
        .await
    {
        Ok(revision) => Ok(Some(revision)),
        Err(store::Error::Conflict { .. }) => Ok(None),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Limits;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn one_holder_at_a_time_and_a_lapsed_lease_can_be_taken() {
        let store = MemoryStore::new(Limits::default());
        let ttl = Duration::from_secs(30);
        let Acquired::Held(rev) = acquire(&store, "a", ttl).await.unwrap() else {
            panic!("free lease")
        };
        assert!(
            matches!(acquire(&store, "b", ttl).await.unwrap(), Acquired::Standby { holder, .. } if holder == "a")
        );
        let renewed = renew(&store, "a", rev, ttl)
            .await
            .unwrap()
            .expect("holder renews");
        assert!(renewed > rev);
        assert_eq!(
            renew(&store, "a", rev, ttl).await.unwrap(),
            None,
            "a stale revision is a lost lease"
        );
        // Expire it by hand: a lapsed lease is free for anyone.
        crate::store::StoreExt::put(
            &store,
            lease_key(),
            json!({"holder": "a", "expires_at_ms": 1}),
        )
        .await
        .unwrap();
        assert!(matches!(
            acquire(&store, "b", ttl).await.unwrap(),
            Acquired::Held(_)
        ));
    }

    #[tokio::test]
    async fn fencing_rejects_a_flag_write_after_the_lease_moved() {
        let store = MemoryStore::new(Limits::default());
        let Acquired::Held(rev) = acquire(&store, "a", Duration::from_secs(30)).await.unwrap()
        else {
            panic!()
        };
        release(&store, rev).await.unwrap();
        let Acquired::Held(_) = acquire(&store, "b", Duration::from_secs(30)).await.unwrap() else {
            panic!()
        };
        let fenced = Batch::new()
            .check(lease_key(), Precondition::ModRevision(rev))
            .put(Key::new(SYSTEM_NAMESPACE, "init-state", "x"), json!("v1"));
        assert!(matches!(
            store.apply(fenced).await,
            Err(store::Error::Conflict { .. })
        ));
    }
}
