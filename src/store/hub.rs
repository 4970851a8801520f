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
    /// Events, each with the bytes it weighs (its keys and values as JSON).
    history: VecDeque<(Arc<ChangeEvent>, usize)>,
    capacity: usize,
    /// Sum of the weights in `history`.
    bytes: usize,
    /// The newest revision whose event is no longer in `history`.
    compacted: Revision,
    live: broadcast::Sender<Arc<ChangeEvent>>,
}

/// How many live events a slow watcher may fall behind before it is told to re-read.
const LIVE_BUFFER: usize = 4096;

/// Bytes of history kept at most (as JSON; parsed values take a few times more in memory),
/// whatever the event count: large values must not turn the history into most of the RSS.
const HISTORY_BYTES: usize = 16 << 20;

impl ChangeHub {
    /// A hub whose history starts after `compacted` (events up to it are gone).
    pub fn new(capacity: usize, compacted: Revision) -> Self {
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        Self {
            inner: Mutex::new(HubInner {
                history: VecDeque::with_capacity(capacity.min(1024)),
                capacity: capacity.max(1),
                bytes: 0,
                compacted,
                live,
            }),
        }
    }

    /// Records a committed event and sends it to live watchers.
    pub fn publish(&self, event: ChangeEvent) {
        let weight: usize = event
            .changes
            .iter()
            .map(|c| {
                let key = &c.key;
                key.namespace.len()
                    + key.kind.len()
                    + key.key.len()
                    + c.value.as_ref().map_or(0, super::encoded_len)
            })
            .sum();
        let event = Arc::new(event);
        let mut inner = self.inner.lock().expect("change hub lock poisoned");
        while !inner.history.is_empty()
            && (inner.history.len() >= inner.capacity || inner.bytes + weight > HISTORY_BYTES)
        {
            if let Some((old, old_weight)) = inner.history.pop_front() {
                inner.compacted = old.revision;
                inner.bytes -= old_weight;
            }
        }
        inner.bytes += weight;
        inner.history.push_back((event.clone(), weight));
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
            .filter(|(e, _)| e.revision > from)
            .map(|(e, _)| e.clone())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Change, Key};

    fn event(revision: Revision, bytes: usize) -> ChangeEvent {
        ChangeEvent {
            revision,
            changes: vec![Change {
                key: Key::new("app", "blob", format!("k{revision}")),
                value: Some(serde_json::Value::String("x".repeat(bytes))),
            }],
        }
    }

    #[test]
    fn large_values_are_held_to_the_byte_bound_not_the_event_count() {
        let hub = ChangeHub::new(10_000, 0);
        // 40 events of 1 MiB: far under the count, far over the byte bound.
        for revision in 1..=40 {
            hub.publish(event(revision, 1 << 20));
        }
        let inner = hub.inner.lock().unwrap();
        assert!(inner.bytes <= HISTORY_BYTES, "{} bytes held", inner.bytes);
        assert!(
            inner.history.len() < 17,
            "{} events held",
            inner.history.len()
        );
        let compacted = inner.compacted;
        drop(inner);
        assert!(
            compacted > 20,
            "the oldest were dropped (compacted at {compacted})"
        );
        assert!(matches!(
            hub.watch(1, WatchFilter::All),
            Err(Error::Compacted { .. })
        ));
        assert!(
            hub.watch(40, WatchFilter::All).is_ok(),
            "recent history is still served"
        );
    }
}
