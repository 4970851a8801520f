//! Rendering on demand: a byte-bounded cache of rendered payloads with single-flight per key,
//! and the bounded pool renders run on.
//!
//! A node's payload is rendered when that node asks for it at an epoch, not when the set
//! changes, so rendering work follows the fetches that happen. Concurrent askers for one key
//! wait for one render; a later fetch of the same epoch is a lookup until the byte budget
//! evicts it.

use std::convert::Infallible;
use std::hash::Hash;
use std::sync::Arc;

use crate::api::status::RenderFailure;
use crate::store::Revision;

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

/// Weighs a cached value by [`Weigh`], for quick_cache's byte budget.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByWeight;

impl<K, V: Weigh> quick_cache::Weighter<K, V> for ByWeight {
    fn weight(&self, _: &K, value: &V) -> u64 {
        // Zero-weight entries are never evicted: count everything as at least one byte.
        value.weight().max(1) as u64
    }
}

/// A byte-bounded cache with single-flight fills ([`quick_cache`]): concurrent askers of one
/// key wait for one render, and a waiter takes the render over if its caller goes away.
pub struct RenderCache<K, V> {
    inner: quick_cache::sync::Cache<K, V, ByWeight>,
}

impl<K, V> std::fmt::Debug for RenderCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenderCache").finish_non_exhaustive()
    }
}

impl<K, V> RenderCache<K, V>
where
    K: Clone + Eq + Hash,
    V: Clone + Weigh,
{
    /// A cache that holds at most `budget` bytes of values. One shard: a value may use the
    /// whole budget, and a hit is one lookup under a read lock.
    pub fn new(budget: usize) -> Self {
        let options = quick_cache::OptionsBuilder::new()
            .shards(1)
            .weight_capacity(budget as u64)
            .estimated_items_capacity((budget / (16 << 10)).max(16))
            .build()
            .expect("the cache options are complete");
        Self {
            inner: quick_cache::sync::Cache::with_options(
                options,
                ByWeight,
                Default::default(),
                Default::default(),
            ),
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.inner.weight() as usize
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// The value for `key`: a lookup when present; otherwise `render` runs once however many
    /// callers ask at the same time, and its result is kept within the budget.
    pub async fn get_or_render<F, Fut>(&self, key: K, render: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let rendered = self
            .inner
            .get_or_insert_async(&key, async { Ok::<_, Infallible>(render().await) })
            .await;
        match rendered {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// Drops every entry whose key fails `keep` (a new epoch makes the older ones dead weight).
    pub fn retain(&self, keep: impl Fn(&K) -> bool) {
        self.inner.retain(|key, _| keep(key));
    }
}

/// Renders that failed: a count for `/metrics`, and the last one for `/v1/status`.
#[derive(Debug, Default)]
pub struct RenderFailures {
    /// Failed renders since start (each node and epoch counted once: failures are cached).
    pub count: prometheus_client::metrics::counter::Counter,
    last: std::sync::Mutex<Option<RenderFailure>>,
}

impl RenderFailures {
    pub(super) fn note(&self, identifier: &str, epoch: Revision, reason: &str) {
        self.count.inc();
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(RenderFailure {
            identifier: identifier.to_string(),
            epoch,
            reason: reason.to_string(),
        });
    }

    /// The most recent failure.
    pub fn last(&self) -> Option<RenderFailure> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A render handed to the pool: runs on a render thread and reports back by itself.
type Job = Box<dyn FnOnce() + Send>;

/// The bounded pool renders run on: a fixed set of dedicated threads fed by one queue, so
/// renders never occupy the async workers that answer registrations, `/healthz` and `/v1`.
///
/// Dedicated threads rather than `spawn_blocking`: under a fetch storm the queue stays full and
/// each thread takes the next render without going to sleep and being woken again, and a
/// render that runs long never holds up the runtime's shutdown.
#[derive(Debug, Clone)]
pub struct RenderPool {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl RenderPool {
    /// A pool of `threads` render threads (at least one).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for n in 0..threads {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("bootsync-render-{n}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        // One thread waits on the queue at a time; the others wait for the lock.
                        let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            // Every handle to the pool is gone.
                            Err(_) => return,
                        }
                    }
                });
            if let Err(err) = spawned {
                tracing::error!(error = %err, "could not start a render thread");
            }
        }
        Self { jobs }
    }

    /// One less than the cores (at least one): a core stays free for the request path.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .saturating_sub(1)
            .max(1)
    }

    /// Runs `work` on a render thread. A panic comes back as `Err`, and the thread lives on.
    pub async fn run<T, F>(&self, work: F) -> Result<T, String>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if reply.is_closed() {
                // Whoever asked has gone; a waiter that took the render over queued its own.
                return;
            }
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            // The asker may have gone away; its render is simply dropped.
            let _ = reply.send(outcome);
        });
        self.jobs
            .send(job)
            .map_err(|_| "the render pool has no threads".to_string())?;
        match answer.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(panic)) => Err(format!("the render panicked: {}", panic_message(&*panic))),
            Err(_) => Err("the render pool has no threads".to_string()),
        }
    }
}

/// How much less CPU a busy render thread gets than a busy request worker: at nice 5 the
/// kernel gives it about a third of a worker's share, so a fetch storm that keeps the render
/// threads busy still leaves registrations, `/healthz` and `/v1` their cores.
#[cfg(target_os = "linux")]
const RENDER_NICE: i32 = 5;

/// Lowers the calling thread's scheduling priority (Linux keeps a nice value per thread).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // Linux's PRIO_PROCESS with no pid names the calling thread.
        if let Err(err) = rustix::process::setpriority_process(None, RENDER_NICE) {
            tracing::debug!(error = %err, "render threads keep the normal priority");
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
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
    async fn the_byte_budget_holds_and_a_hit_renders_nothing() {
        let cache: RenderCache<u32, Bytes> = RenderCache::new(300);
        let renders = AtomicUsize::new(0);
        for key in 0..10 {
            cache
                .get_or_render(key, || async {
                    renders.fetch_add(1, Ordering::SeqCst);
                    bytes(100)
                })
                .await;
            assert!(cache.used() <= 300, "used {} of 300", cache.used());
        }
        assert_eq!(renders.load(Ordering::SeqCst), 10);
        let last = cache
            .get_or_render(9, || async {
                renders.fetch_add(1, Ordering::SeqCst);
                bytes(1)
            })
            .await;
        assert_eq!(last.len(), 100, "the newest entry is a lookup");
        assert_eq!(renders.load(Ordering::SeqCst), 10);
    }

    #[test]
    fn renders_run_side_by_side_up_to_the_thread_count() {
        let pool = RenderPool::new(2);
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Each render waits for the other: both finish only if they ran at the same time.
        let (a, b) = runtime.block_on(async {
            let (b1, b2) = (barrier.clone(), barrier.clone());
            let run = |b: Arc<std::sync::Barrier>| pool.run(move || b.wait().is_leader());
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                futures_util::future::join(run(b1), run(b2)),
            )
            .await
            .expect("two renders ran at once")
        });
        assert!(a.is_ok() && b.is_ok());
        assert!(
            a.unwrap() ^ b.unwrap(),
            "exactly one of the two led the barrier"
        );
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
