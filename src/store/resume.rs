//! A change stream that outlives its failures: it re-opens a broken watch from the last event
//! it delivered, starts over from a fresh read when history is gone, and spaces its retries
//! with [`Backoff`]. The reconciler's `__system__` watcher and cfgsync's view both read the
//! store through it.

use futures_util::FutureExt;

use super::{ChangeEvent, DynStore, Error, NamespaceTree, Revision, Watch, WatchFilter};
use crate::backoff::Backoff;

/// What a resumable watch yields.
#[derive(Debug)]
pub enum Resumed {
    /// The watch (re)started at `revision` from a fresh read: anything before it may have been
    /// missed. Always the first item, and again after the history the watch needed was
    /// compacted. `tree` is the snapshot namespace read at `revision`, when one was asked for.
    Reset {
        /// Where the watch now starts.
        revision: Revision,
        /// The snapshot namespace at `revision`.
        tree: Option<NamespaceTree>,
    },
    /// The next change.
    Event(ChangeEvent),
}

/// A watch over `filter` that never ends and never fails; see the module documentation.
pub struct ResumableWatch {
    store: DynStore,
    filter: WatchFilter,
    snapshot: Option<String>,
    backoff: Backoff,
    what: &'static str,
    /// The revision delivered last; `None` until a reset has been delivered.
    from: Option<Revision>,
    stream: Option<Watch>,
}

debug_fields!(ResumableWatch { what, from });

impl ResumableWatch {
    /// A watch of `filter` on `store`. With `snapshot`, every reset reads that namespace whole
    /// and hands it over. `what` names the watcher in the warnings its failures log.
    pub fn new(
        store: DynStore,
        filter: WatchFilter,
        snapshot: Option<String>,
        backoff: Backoff,
        what: &'static str,
    ) -> Self {
        Self {
            store,
            filter,
            snapshot,
            backoff,
            what,
            from: None,
            stream: None,
        }
    }

    /// The next item. Failures are logged and retried after the backoff's pause; dropping the
    /// future (on shutdown, say) loses nothing.
    pub async fn next(&mut self) -> Resumed {
        loop {
            let Some(from) = self.from else {
                match self.reset().await {
                    Ok(reset) => return reset,
                    Err(err) => {
                        self.pause(&err).await;
                        continue;
                    }
                }
            };
            if self.stream.is_none() {
                match self.store.watch(from, self.filter.clone()).await {
                    Ok(stream) => self.stream = Some(stream),
                    Err(err) => {
                        self.pause(&err).await;
                        continue;
                    }
                }
            }
            let stream = self.stream.as_mut().expect("opened above");
            match stream.next().await {
                Some(Ok(event)) => return self.deliver(event),
                Some(Err(err)) => self.pause(&err).await,
                None => {
                    self.stream = None;
                    let ended = Error::Unavailable("the change stream ended".into());
                    self.pause(&ended).await;
                }
            }
        }
    }

    /// A change already waiting, without waiting for one (to take a burst in one go). A
    /// failure is left for [`ResumableWatch::next`] to handle.
    pub fn try_next(&mut self) -> Option<ChangeEvent> {
        let stream = self.stream.as_mut()?;
        match stream.next().now_or_never()? {
            Some(Ok(event)) => match self.deliver(event) {
                Resumed::Event(event) => Some(event),
                Resumed::Reset { .. } => unreachable!("deliver yields events"),
            },
            Some(Err(err)) => {
                tracing::warn!(watcher = self.what, error = %err, "watch failed; resuming");
                self.forget(&err);
                None
            }
            None => {
                self.stream = None;
                None
            }
        }
    }

    fn deliver(&mut self, event: ChangeEvent) -> Resumed {
        self.from = Some(event.revision);
        self.backoff.reset();
        Resumed::Event(event)
    }

    async fn reset(&mut self) -> Result<Resumed, Error> {
        let (revision, tree) = match &self.snapshot {
            Some(namespace) => {
                let tree = self.store.namespace(namespace).await?;
                (tree.revision, Some(tree))
            }
            None => (self.store.revision().await?, None),
        };
        self.from = Some(revision);
        self.stream = None;
        self.backoff.reset();
        Ok(Resumed::Reset { revision, tree })
    }

    /// Drops the broken stream. Compacted history, or a change the backend cannot decode (a
    /// foreign value written under the store's root, say), also drops the position: reading
    /// the same events again would fail the same way, so the next item is a fresh read.
    fn forget(&mut self, err: &Error) {
        self.stream = None;
        if matches!(err, Error::Compacted { .. } | Error::Backend { .. }) {
            self.from = None;
        }
    }

    async fn pause(&mut self, err: &Error) {
        self.forget(err);
        if matches!(err, Error::Compacted { .. }) {
            // Nothing to wait for: history is gone, read afresh at once.
            tracing::info!(watcher = self.what, error = %err, "history compacted; starting over");
            return;
        }
        let pause = self.backoff.fail();
        tracing::warn!(watcher = self.what, error = %err, retry_in = ?pause, "watch failed; retrying");
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{Key, Limits, StoreExt};

    fn watch_of(store: DynStore, snapshot: Option<String>) -> ResumableWatch {
        ResumableWatch::new(
            store,
            WatchFilter::Namespace("ns".into()),
            snapshot,
            Backoff::new(Duration::from_millis(10), Duration::from_millis(50)),
            "test",
        )
    }

    #[tokio::test]
    async fn it_starts_with_a_reset_then_streams_changes_in_order() {
        let store: DynStore = Arc::new(MemoryStore::new(Limits::default()));
        store.put(Key::new("ns", "t", "a"), 1.into()).await.unwrap();
        let mut watch = watch_of(store.clone(), Some("ns".into()));
        let Resumed::Reset { revision, tree } = watch.next().await else {
            panic!("the first item is a reset");
        };
        assert_eq!(revision, 1);
        assert!(tree.unwrap().types["t"].contains_key("a"));
        let second = store.put(Key::new("ns", "t", "b"), 2.into()).await.unwrap();
        let Resumed::Event(event) = watch.next().await else {
            panic!("then changes");
        };
        assert_eq!(event.revision, second);
        assert!(watch.try_next().is_none(), "nothing else is waiting");
    }

    #[tokio::test]
    async fn compacted_history_starts_over_from_a_fresh_read() {
        let store: DynStore = Arc::new(MemoryStore::new(Limits::default()));
        let mut watch = watch_of(store.clone(), None);
        assert!(matches!(
            watch.next().await,
            Resumed::Reset { revision: 0, .. }
        ));
        // The stream reports the loss of history, as a lagging watcher does.
        watch.forget(&Error::Compacted {
            requested: 0,
            compacted: 5,
        });
        let latest = store.put(Key::new("ns", "t", "a"), 1.into()).await.unwrap();
        let Resumed::Reset { revision, .. } = watch.next().await else {
            panic!("a reset after compaction");
        };
        assert_eq!(revision, latest);
    }
}
