//! Recent change history plus live fan-out, shared by the backends that commit in-process.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures_util::stream;
use tokio::sync::broadcast;

use super::{ChangeEvent, Error, Revision, Watch, WatchFilter};

/// Keeps the last `capacity` committed events and broadcasts new ones.
///
/// Backends call [`ChangeHub::publish`] while still holding their write lock, so events enter
/// in revision order and a watcher that subscribes under the hub's lock sees no gap between
/// the replayed history and the live tail.
#[derive(Debug)]
pub struct ChangeHub {
    inner: Mutex<HubInner>,
}

#[derive(Debug)]
struct HubInner {
    history: VecDeque<Arc<ChangeEvent>>,
    capacity: usize,
    /// The newest revision whose event is no longer in `history`.
    compacted: Revision,
    live: broadcast::Sender<Arc<ChangeEvent>>,
}

/// How many live events a slow watcher may fall behind before it is told to re-read.
const LIVE_BUFFER: usize = 4096;

impl ChangeHub {
    /// A hub whose history starts after `compacted` (events up to it are gone).
    pub fn new(capacity: usize, compacted: Revision) -> Self {
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        Self {
            inner: Mutex::new(HubInner {
                history: VecDeque::with_capacity(capacity.min(1024)),
                capacity: capacity.max(1),
                compacted,
                live,
            }),
        }
    }

    /// Records a committed event and sends it to live watchers.
    pub fn publish(&self, event: ChangeEvent) {
        let event = Arc::new(event);
        let mut inner = self.inner.lock().expect("change hub lock poisoned");
        if inner.history.len() == inner.capacity
            && let Some(old) = inner.history.pop_front()
        {
            inner.compacted = old.revision;
        }
        inner.history.push_back(event.clone());
        // No receivers is fine: nobody is watching.
        let _ = inner.live.send(event);
    }

    /// Changes after `from` that pass `filter`: replayed history, then live events.
    pub fn watch(&self, from: Revision, filter: WatchFilter) -> Result<Watch, Error> {
        let inner = self.inner.lock().expect("change hub lock poisoned");
        if from < inner.compacted {
            return Err(Error::Compacted {
                requested: from,
                compacted: inner.compacted,
            });
        }
        let replay: VecDeque<Arc<ChangeEvent>> = inner
            .history
            .iter()
            .filter(|e| e.revision > from)
            .cloned()
            .collect();
        let live = inner.live.subscribe();
        drop(inner);

        let state = WatchState {
            replay,
            live,
            filter,
            last: from,
            done: false,
        };
        Ok(Watch::new(stream::unfold(state, WatchState::step)))
    }
}

struct WatchState {
    replay: VecDeque<Arc<ChangeEvent>>,
    live: broadcast::Receiver<Arc<ChangeEvent>>,
    filter: WatchFilter,
    last: Revision,
    done: bool,
}

impl WatchState {
    async fn step(mut self) -> Option<(Result<ChangeEvent, Error>, Self)> {
        if self.done {
            return None;
        }
        loop {
            let event = match self.replay.pop_front() {
                Some(event) => event,
                None => match self.live.recv().await {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Closed) => return None,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // The watcher fell too far behind: it must re-read, as after compaction.
                        self.done = true;
                        let requested = self.last;
                        return Some((
                            Err(Error::Compacted {
                                requested,
                                compacted: requested + 1,
                            }),
                            self,
                        ));
                    }
                },
            };
            // Live events already replayed from history are skipped.
            if event.revision <= self.last {
                continue;
            }
            self.last = event.revision;
            if let Some(filtered) = self.filter.apply(&event) {
                return Some((Ok(filtered), self));
            }
        }
    }
}
