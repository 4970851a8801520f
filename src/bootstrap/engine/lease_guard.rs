//! The lease while a wake holds it: renewed in the background, checked by every flag write,
//! and released when the wake ends (or, should the wake be dropped, when the guard is).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::watcher::OwnWrites;
use crate::backoff::Backoff;
use crate::bootstrap::lease::{self, Acquired};
use crate::clock::now_ms;
use crate::store::{self, DynStore, Revision};

/// What taking the lease found.
pub(super) enum Taken {
    /// This engine holds it.
    Held(LeaseGuard),
    /// Another reconciler holds it until `until`.
    Standby {
        /// Who.
        holder: String,
        /// When its lease lapses unless renewed.
        until: Instant,
    },
}

/// A held lease. Its fence is the lease key's revision, which flag writes check in their batch.
pub(super) struct LeaseGuard {
    store: DynStore,
    fence: Arc<Mutex<Option<Revision>>>,
    renewer: JoinHandle<()>,
    own: OwnWrites,
}

impl LeaseGuard {
    /// Takes the lease for `holder` when it is free, lapsed or already ours.
    pub(super) async fn take(
        store: &DynStore,
        holder: &str,
        ttl: Duration,
        own: &OwnWrites,
    ) -> Result<Taken, store::Error> {
        match lease::acquire(store.as_ref(), holder, ttl).await? {
            Acquired::Standby {
                holder,
                expires_at_ms,
            } => {
                let left = Duration::from_millis(expires_at_ms.saturating_sub(now_ms()));
                Ok(Taken::Standby {
                    holder,
                    until: Instant::now() + left,
                })
            }
            Acquired::Held(revision) => {
                own.remember(revision);
                let fence = Arc::new(Mutex::new(Some(revision)));
                let renewer = tokio::spawn(renew(
                    store.clone(),
                    holder.to_string(),
                    ttl,
                    fence.clone(),
                    own.clone(),
                ));
                Ok(Taken::Held(Self {
                    store: store.clone(),
                    fence,
                    renewer,
                    own: own.clone(),
                }))
            }
        }
    }

    /// The fence, held so no renewal moves it while a flag write checks it; `None` once the
    /// lease is lost.
    pub(super) async fn fence(&self) -> MutexGuard<'_, Option<Revision>> {
        self.fence.lock().await
    }

    /// Whether the lease was lost (another reconciler took it after it lapsed).
    pub(super) async fn lost(&self) -> bool {
        self.fence.lock().await.is_none()
    }

    /// Stops renewing and gives the lease up, so a standby need not wait for it to lapse.
    pub(super) async fn release(self) {
        self.renewer.abort();
        let held = self.fence.lock().await.take();
        if let Some(revision) = held {
            release(self.store.clone(), revision, self.own.clone()).await;
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.renewer.abort();
        // Released already, or a renewal holds the fence (and is aborted): nothing to give up
        // here, the lease lapses at its expiry.
        let held = self
            .fence
            .try_lock()
            .ok()
            .and_then(|mut fence| fence.take());
        if let (Some(revision), Ok(runtime)) = (held, tokio::runtime::Handle::try_current()) {
            runtime.spawn(release(self.store.clone(), revision, self.own.clone()));
        }
    }
}

async fn release(store: DynStore, revision: Revision, own: OwnWrites) {
    match lease::release(store.as_ref(), revision).await {
        Ok(Some(released)) => own.remember(released),
        Ok(None) => {}
        Err(err) => tracing::warn!(error = %err, "cannot release the lease; it will lapse"),
    }
}

/// Renews every third of the lease's life; a failed renewal is retried sooner, with backoff.
async fn renew(
    store: DynStore,
    holder: String,
    ttl: Duration,
    fence: Arc<Mutex<Option<Revision>>>,
    own: OwnWrites,
) {
    let every = ttl / 3;
    let mut backoff = Backoff::new((ttl / 30).max(Duration::from_millis(50)), ttl / 6);
    let mut pause = every;
    loop {
        tokio::time::sleep(pause).await;
        let mut fence = fence.lock().await;
        let Some(held) = *fence else { return };
        match lease::renew(store.as_ref(), &holder, held, ttl).await {
            Ok(Some(revision)) => {
                *fence = Some(revision);
                own.remember(revision);
                backoff.reset();
                pause = every;
            }
            Ok(None) => {
                tracing::warn!("lost the reconciler lease; flag writes are fenced off");
                *fence = None;
                return;
            }
            Err(err) => {
                pause = backoff.fail();
                tracing::warn!(error = %err, retry_in = ?pause, "cannot renew the lease; retrying");
            }
        }
    }
}
