//! Wakes the loop when someone else changes `__system__` (an operator resetting a flag, a
//! replica finishing or releasing the lease), and ignores the engine's own writes and other
//! holders' lease renewals.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::bootstrap::lease::lease_key;
use crate::store::{
    ChangeEvent, DynStore, ResumableWatch, Resumed, Revision, SYSTEM_NAMESPACE, WatchFilter,
};

/// How many of its own write revisions the engine remembers.
const OWN_REVISIONS: usize = 1024;

/// The revisions of the engine's own recent writes, so its watch can tell them from others'.
#[derive(Debug, Clone, Default)]
pub(super) struct OwnWrites(Arc<Mutex<VecDeque<Revision>>>);

impl OwnWrites {
    /// Notes a revision this engine committed.
    pub(super) fn remember(&self, revision: Revision) {
        let mut own = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if own.len() == OWN_REVISIONS {
            own.pop_front();
        }
        own.push_back(revision);
    }

    fn contains(&self, revision: Revision) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&revision)
    }
}

/// Whether `event` only renews a lease: a standby sleeps until the lease's expiry, and a
/// renewal does not move that any closer.
fn only_renews_the_lease(event: &ChangeEvent) -> bool {
    let lease = lease_key();
    event
        .changes
        .iter()
        .all(|change| change.key == lease && change.value.is_some())
}

/// Pokes `poke` on every change to `__system__` that matters to the loop, until `shutdown`.
/// After the watch had to start over, it pokes too: changes in the gap were not seen.
pub(super) async fn watch_system(
    store: DynStore,
    own: OwnWrites,
    poke: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut watch = ResumableWatch::new(
        store,
        WatchFilter::Namespace(SYSTEM_NAMESPACE.into()),
        None,
        Backoff::new(Duration::from_millis(500), Duration::from_secs(5)),
        "__system__",
    );
    let mut started = false;
    loop {
        let item = tokio::select! {
            item = watch.next() => item,
            () = shutdown.cancelled() => return,
        };
        let wake = match item {
            Resumed::Reset { .. } => std::mem::replace(&mut started, true),
            Resumed::Event(event) => {
                !own.contains(event.revision) && !only_renews_the_lease(&event)
            }
        };
        if wake {
            poke.notify_one();
        }
    }
}
