//! Rendering on demand: a byte-bounded cache of rendered payloads with single-flight per key,
//! and the bounded pool renders run on.
//!
//! A node's payload is rendered when that node asks for it at an epoch, not when the set
//! changes, so rendering work follows the fetches that happen. Concurrent askers for one key
//! wait for one render; a later fetch of the same epoch is a lookup until the byte budget
//! evicts it (least recently used first).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::{OnceCell, Semaphore};

/// Default budget of [`RenderCache`]: enough for hundreds of peer-list payloads at 10 000
/// nodes, small beside the registrations themselves.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Something that knows its size in memory, for the cache's byte budget.
pub trait Weigh {
    /// Bytes this value holds.
    fn weight(&self) -> usize;
}

impl Weigh for bytes::Bytes {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl<T: Weigh, E> Weigh for Result<T, E> {
    fn weight(&self) -> usize {
        // A cached failure is a short reason; count it as a small constant.
        self.as_ref().map_or(64, Weigh::weight)
    }
}

enum Slot<V> {
    /// A render is running or about to; everyone who asks waits on the same cell.
    Pending(Arc<OnceCell<V>>),
    /// Rendered, with the recency stamp that orders eviction.
    Ready { value: V, stamp: u64, weight: usize },
}

struct Inner<K, V> {
    slots: HashMap<K, Slot<V>>,
    /// Recency stamp → key, oldest first.
    order: BTreeMap<u64, K>,
    used: usize,
    next_stamp: u64,
}

/// Byte-bounded LRU cache with single-flight fills.
pub struct RenderCache<K, V> {
    budget: usize,
    inner: Mutex<Inner<K, V>>,
}

impl<K, V> std::fmt::Debug for RenderCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenderCache")
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl<K, V> RenderCache<K, V>
where
    K: Clone + Eq + Hash,
    V: Clone + Weigh,
{
    /// A cache that holds at most `budget` bytes of values.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                order: BTreeMap::new(),
                used: 0,
                next_stamp: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K, V>> {
        // The lock guards plain bookkeeping that no panic leaves half-done.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.lock().used
    }

    /// Entries held now (rendered or being rendered).
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value for `key`: a lookup when present; otherwise `render` runs once however many
    /// callers ask at the same time, and its result is kept within the budget. If the caller
    /// running the render is cancelled, a waiting caller takes the render over.
    pub async fn get_or_render<F, Fut>(&self, key: K, render: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let stamp = inner.next_stamp;
            match inner.slots.get_mut(&key) {
                Some(Slot::Ready {
                    value, stamp: old, ..
                }) => {
                    let value = value.clone();
                    let old = std::mem::replace(old, stamp);
                    inner.next_stamp += 1;
                    inner.order.remove(&old);
                    inner.order.insert(stamp, key);
                    return value;
                }
                Some(Slot::Pending(cell)) => cell.clone(),
                None => {
                    let cell = Arc::new(OnceCell::new());
                    inner.slots.insert(key.clone(), Slot::Pending(cell.clone()));
                    cell
                }
            }
        };
        let value = cell.get_or_init(render).await.clone();
        self.settle(key, &cell, &value);
        value
    }

    /// Turns a finished pending slot into a cached value, evicting the oldest past the budget.
    fn settle(&self, key: K, cell: &Arc<OnceCell<V>>, value: &V) {
        let mut inner = self.lock();
        let ours = matches!(inner.slots.get(&key), Some(Slot::Pending(c)) if Arc::ptr_eq(c, cell));
        if !ours {
            // Another waiter settled it first, or the key was invalidated meanwhile.
            return;
        }
        let weight = value.weight();
        if weight > self.budget {
            inner.slots.remove(&key);
            return;
        }
        while inner.used + weight > self.budget {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            if let Some(Slot::Ready { weight, .. }) = inner.slots.remove(&oldest) {
                inner.used -= weight;
            }
        }
        let stamp = inner.next_stamp;
        inner.next_stamp += 1;
        inner.order.insert(stamp, key.clone());
        inner.used += weight;
        inner.slots.insert(
            key,
            Slot::Ready {
                value: value.clone(),
                stamp,
                weight,
            },
        );
    }

    /// Drops every entry whose key fails `keep` (a new epoch makes the older ones dead weight).
    pub fn retain(&self, mut keep: impl FnMut(&K) -> bool) {
        let mut inner = self.lock();
        let Inner {
            slots, order, used, ..
        } = &mut *inner;
        slots.retain(|key, slot| {
            if keep(key) {
                return true;
            }
            if let Slot::Ready { stamp, weight, .. } = slot {
                order.remove(stamp);
                *used -= *weight;
            }
            false
        });
    }
}

/// The bounded pool renders run on: blocking threads, at most `permits` at a time, so renders
/// never occupy the async workers that answer registrations, `/healthz` and `/v1`.
#[derive(Debug, Clone)]
pub struct RenderPool {
    permits: Arc<Semaphore>,
}

impl RenderPool {
    /// A pool of `threads` concurrent renders (at least one).
    pub fn new(threads: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(threads.max(1))),
        }
    }

    /// One less than the cores (at least one): a core stays free for the request path.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .saturating_sub(1)
            .max(1)
    }

    /// Runs `work` on a blocking thread once a permit is free. A panic comes back as `Err`.
    pub async fn run<T, F>(&self, work: F) -> Result<T, String>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| "the render pool is closed".to_string())?;
        // The permit travels with the work: a caller that goes away does not free a slot
        // while its render still runs.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|err| format!("the render panicked: {err}"))
    }
}

impl Default for RenderPool {
    fn default() -> Self {
        Self::new(Self::default_threads())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;

    use super::*;

    fn bytes(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[tokio::test]
    async fn the_byte_budget_holds_and_the_least_recently_used_goes_first() {
        let cache: RenderCache<u32, Bytes> = RenderCache::new(300);
        for key in 0..3 {
            cache.get_or_render(key, || async { bytes(100) }).await;
        }
        assert_eq!(cache.used(), 300);
        // Touch 0, so 1 is now the oldest.
        let renders = AtomicUsize::new(0);
        cache
            .get_or_render(0, || async {
                renders.fetch_add(1, Ordering::SeqCst);
                bytes(100)
            })
            .await;
        assert_eq!(renders.load(Ordering::SeqCst), 0, "0 was a lookup");
        cache.get_or_render(3, || async { bytes(100) }).await;
        assert_eq!(cache.used(), 300, "the budget is never exceeded");
        assert_eq!(cache.len(), 3);
        // 1 was evicted: asking again renders; 0 and 2 are still there... until 1 returns.
        cache
            .get_or_render(1, || async {
                renders.fetch_add(1, Ordering::SeqCst);
                bytes(100)
            })
            .await;
        assert_eq!(renders.load(Ordering::SeqCst), 1, "1 had been evicted");
        cache
            .get_or_render(0, || async {
                renders.fetch_add(1, Ordering::SeqCst);
                bytes(100)
            })
            .await;
        assert_eq!(
            renders.load(Ordering::SeqCst),
            1,
            "0 was recently used and stayed"
        );
        assert!(cache.used() <= 300);
    }

    #[tokio::test]
    async fn a_value_larger_than_the_budget_is_served_but_not_kept() {
        let cache: RenderCache<u32, Bytes> = RenderCache::new(50);
        cache.get_or_render(1, || async { bytes(10) }).await;
        let big = cache.get_or_render(2, || async { bytes(100) }).await;
        assert_eq!(big.len(), 100);
        assert_eq!(
            cache.used(),
            10,
            "the small entry stays, the big one is not kept"
        );
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test]
    async fn concurrent_askers_of_one_key_share_one_render() {
        let cache = Arc::new(RenderCache::<(String, u64), Bytes>::new(1 << 20));
        let renders = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (cache, renders, gate) = (cache.clone(), renders.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_render(("node-1".to_string(), 7), || async move {
                        renders.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        bytes(10)
                    })
                    .await
            }));
        }
        // Wait (bounded) until the one render started, then let it finish.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while renders.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no render started");
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for task in tasks {
            assert_eq!(task.await.unwrap().len(), 10);
        }
        assert_eq!(renders.load(Ordering::SeqCst), 1, "single flight per key");
        // Another epoch of the same node is another key.
        cache
            .get_or_render(("node-1".to_string(), 8), || async {
                renders.fetch_add(1, Ordering::SeqCst);
                bytes(10)
            })
            .await;
        assert_eq!(renders.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_new_epoch_invalidates_the_older_ones() {
        let cache: RenderCache<(u32, u64), Bytes> = RenderCache::new(1 << 20);
        for node in 0..4 {
            cache.get_or_render((node, 1), || async { bytes(10) }).await;
        }
        cache.get_or_render((0, 2), || async { bytes(20) }).await;
        cache.retain(|(_, epoch)| *epoch >= 2);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.used(), 20);
        let renders = AtomicUsize::new(0);
        cache
            .get_or_render((1, 1), || async {
                renders.fetch_add(1, Ordering::SeqCst);
                bytes(10)
            })
            .await;
        assert_eq!(
            renders.load(Ordering::SeqCst),
            1,
            "the old epoch was dropped"
        );
    }

    #[tokio::test]
    async fn a_panicking_render_is_an_error_not_a_crash() {
        let pool = RenderPool::new(1);
        let result: Result<(), String> = pool.run(|| panic!("boom")).await;
        assert!(result.unwrap_err().contains("panicked"));
        assert_eq!(pool.run(|| 2 + 2).await, Ok(4), "the pool still works");
    }
}
