//! The engine, one wake at a time, on paused time and a memory store.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;

use super::*;
use crate::bootstrap::lease;
use crate::bootstrap::spec::{Cadence, Entry, params_hash};
use crate::bootstrap::{InitError, Initialiser};
use crate::store::memory::MemoryStore;
use crate::store::{Key, Limits, Store, StoreExt};

struct Gated(AtomicBool);

#[async_trait]
impl Gate for Gated {
    async fn check(&self) -> Result<(), String> {
        if self.0.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("server down".into())
        }
    }
}

/// Test initialisers: what they do is in their name.
enum Behaviour {
    Ok,
    Fail,
    Hang,
    Panic,
    /// Succeeds only once `prod/cfg/ready` exists.
    NeedsReady,
    /// Writes `prod/cfg/ready`.
    MakesReady,
    /// Changes its own stored flag mid-run, as a concurrent writer would.
    RacesItsFlag,
    /// Takes the lease over mid-run, as a replica would after this one's lease lapsed.
    StealsTheLease,
}

struct Probe {
    behaviour: Behaviour,
    runs: Arc<AtomicUsize>,
    old_flags: Arc<Mutex<Vec<Option<String>>>>,
}

#[async_trait]
impl Initialiser for Probe {
    async fn run(&self, ctx: &InitContext) -> Result<(), InitError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.old_flags
            .lock()
            .unwrap()
            .push(ctx.old_flag().map(str::to_string));
        let ready = Key::new("prod", "cfg", "ready");
        match self.behaviour {
            Behaviour::Ok => Ok(()),
            Behaviour::Fail => Err("deliberate failure".into()),
            Behaviour::Hang => std::future::pending().await,
            Behaviour::Panic => panic!("deliberate panic"),
            Behaviour::NeedsReady => match ctx.store.get(&ready).await? {
                Some(_) => Ok(()),
                None => Err("prerequisite missing".into()),
            },
            Behaviour::MakesReady => {
                ctx.store.put(ready, json!(true)).await?;
                Ok(())
            }
            Behaviour::StealsTheLease => {
                let other = json!({"holder": "other", "expires_at_ms": now_ms() + 60_000});
                ctx.store.put(lease::lease_key(), other).await?;
                Ok(())
            }
            Behaviour::RacesItsFlag => {
                ctx.store
                    .put(status::key(INIT_STATE, &ctx.name), json!("someone-else"))
                    .await?;
                Ok(())
            }
        }
    }
}

type OldFlags = Arc<Mutex<Vec<Option<String>>>>;

struct Harness {
    engine: Engine,
    store: DynStore,
    gate: Arc<Gated>,
    runs: HashMap<String, Arc<AtomicUsize>>,
    old_flags: HashMap<String, OldFlags>,
}

fn entry(name: &str, flag: &str, behaviour: Behaviour) -> (Entry, Arc<AtomicUsize>, OldFlags) {
    let runs = Arc::new(AtomicUsize::new(0));
    let old_flags = Arc::new(Mutex::new(Vec::new()));
    let probe = Probe {
        behaviour,
        runs: runs.clone(),
        old_flags: old_flags.clone(),
    };
    let entry = Entry {
        class: "probe".into(),
        name: name.into(),
        flag: flag.into(),
        timeout: Duration::from_secs(2),
        params: json!({}),
        params_hash: params_hash(&json!({})),
        initialiser: Arc::new(probe),
    };
    (entry, runs, old_flags)
}

fn harness(entries: Vec<(&str, &str, Behaviour)>) -> Harness {
    let store: DynStore = Arc::new(MemoryStore::new(Limits::default()));
    harness_on(store, entries)
}

fn harness_on(store: DynStore, entries: Vec<(&str, &str, Behaviour)>) -> Harness {
    let mut runs = HashMap::new();
    let mut old_flags = HashMap::new();
    let mut built = Vec::new();
    for (name, flag, behaviour) in entries {
        let (e, r, o) = entry(name, flag, behaviour);
        runs.insert(name.to_string(), r);
        old_flags.insert(name.to_string(), o);
        built.push(e);
    }
    let spec = Spec {
        cadence: Cadence::default(),
        entries: built,
        dir: ".".into(),
    };
    let gate = Arc::new(Gated(AtomicBool::new(true)));
    let options = EngineOptions {
        holder: "test".into(),
        lease_ttl: Duration::from_secs(15),
        server_url: "http://127.0.0.1:9".into(),
        http: crate::tls::plain_client(),
        history_len: 3,
    };
    Harness {
        engine: Engine::new(spec, store.clone(), gate.clone(), options, None),
        store,
        gate,
        runs,
        old_flags,
    }
}

impl Harness {
    fn runs(&self, name: &str) -> usize {
        self.runs[name].load(Ordering::SeqCst)
    }

    /// Asserts that `name` ran `runs` times (`why`) and stands at flag `v1`.
    async fn ran_and_stored_v1(&self, name: &str, runs: usize, why: &str) {
        assert_eq!(self.runs(name), runs, "{why}");
        assert_eq!(self.flag(name).await.as_deref(), Some("v1"));
    }

    async fn flag(&self, name: &str) -> Option<String> {
        let entry = self
            .store
            .get(&status::key(INIT_STATE, name))
            .await
            .unwrap()?;
        entry.value.as_str().map(str::to_string)
    }

    async fn status(&self, name: &str) -> Status {
        let entry = self
            .store
            .get(&status::key(INIT_STATUS, name))
            .await
            .unwrap()
            .expect("status recorded");
        serde_json::from_value(entry.value).unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn a_converged_wake_sleeps_steady_and_writes_nothing() {
    let mut h = harness(vec![("a", "v1", Behaviour::Ok), ("b", "v1", Behaviour::Ok)]);
    assert_eq!(h.engine.wake().await, Outcome::Converged);
    assert_eq!(
        (h.flag("a").await.as_deref(), h.flag("b").await.as_deref()),
        (Some("v1"), Some("v1"))
    );
    let cadence = h.engine.spec().cadence.clone();
    assert_eq!(
        next_sleep(&Outcome::Converged, &cadence),
        Duration::from_secs(300)
    );
    let revision = h.store.revision().await.unwrap();
    assert_eq!(h.engine.wake().await, Outcome::Converged);
    assert_eq!(
        h.store.revision().await.unwrap(),
        revision,
        "a steady wake must not write"
    );
    assert_eq!(
        (h.runs("a"), h.runs("b")),
        (1, 1),
        "nothing re-runs at its flag"
    );
    assert!(
        h.store.get(&lease::lease_key()).await.unwrap().is_none(),
        "the lease is released"
    );
}

#[tokio::test(start_paused = true)]
async fn a_closed_gate_runs_nothing_and_sleeps_gate_backoff() {
    let mut h = harness(vec![("a", "v1", Behaviour::Ok)]);
    h.gate.0.store(false, Ordering::SeqCst);
    let outcome = h.engine.wake().await;
    assert!(
        matches!(outcome, Outcome::GateClosed { ref why, .. } if why.contains("server down")),
        "{outcome:?}"
    );
    // The first pause is `gate_backoff` (5 s, with jitter); each closed wake doubles it.
    let first = next_sleep(&outcome, &h.engine.spec().cadence);
    assert!((4..=6).contains(&first.as_secs()), "{first:?}");
    let again = h.engine.wake().await;
    let second = next_sleep(&again, &h.engine.spec().cadence);
    assert!((8..=12).contains(&second.as_secs()), "{second:?}");
    assert_eq!(h.runs("a"), 0);
    h.gate.0.store(true, Ordering::SeqCst);
    assert_eq!(h.engine.wake().await, Outcome::Converged);
}

#[tokio::test(start_paused = true)]
async fn a_dependant_placed_before_its_prerequisite_converges_in_one_wake() {
    let mut h = harness(vec![
        ("dependant", "v1", Behaviour::NeedsReady),
        ("prerequisite", "v1", Behaviour::MakesReady),
    ]);
    assert_eq!(h.engine.wake().await, Outcome::Converged);
    h.ran_and_stored_v1(
        "dependant",
        2,
        "failed once, then succeeded in the extra pass",
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn failing_hanging_and_panicking_initialisers_do_not_stop_the_others() {
    let mut h = harness(vec![
        ("fails", "v1", Behaviour::Fail),
        ("hangs", "v1", Behaviour::Hang),
        ("panics", "v1", Behaviour::Panic),
        ("fine", "v1", Behaviour::Ok),
    ]);
    pending_for(&mut h).await;
    assert_eq!(h.flag("fine").await.as_deref(), Some("v1"));
    for name in ["fails", "hangs", "panics"] {
        assert_eq!(h.flag(name).await, None, "{name} must not store a flag");
        assert_eq!(h.status(name).await.state, State::Failed);
    }
    assert!(
        h.status("fails")
            .await
            .last_error
            .unwrap()
            .contains("deliberate failure")
    );
    assert!(
        h.status("hangs")
            .await
            .last_error
            .unwrap()
            .contains("timed out")
    );
    assert!(
        h.status("panics")
            .await
            .last_error
            .unwrap()
            .contains("deliberate panic")
    );
}

/// Wakes the engine, which must answer pending; returns how long until its next retry.
async fn pending_for(h: &mut Harness) -> std::time::Duration {
    match h.engine.wake().await {
        Outcome::Pending(at) => at - Instant::now(),
        other => panic!("pending, not {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_exponentially_per_initialiser() {
    let mut h = harness(vec![("fails", "v1", Behaviour::Fail)]);
    let delay = pending_for(&mut h).await;
    assert!(
        (12..=18).contains(&delay.as_secs()),
        "first retry near 15s: {delay:?}"
    );
    let early = h.engine.wake().await;
    assert_eq!(
        h.runs("fails"),
        1,
        "not due yet: an early wake does not retry"
    );
    assert!(matches!(early, Outcome::Pending(_)));
    tokio::time::advance(delay).await;
    let delay = pending_for(&mut h).await;
    assert!(
        (24..=36).contains(&delay.as_secs()),
        "second retry near 30s: {delay:?}"
    );
    assert_eq!(h.status("fails").await.attempts, 2);
    assert_eq!(h.status("fails").await.consecutive_failures, 2);
}

#[tokio::test(start_paused = true)]
async fn a_flag_bump_reruns_only_that_initialiser_with_its_old_flag() {
    let mut h = harness(vec![("a", "v1", Behaviour::Ok), ("b", "v1", Behaviour::Ok)]);
    h.engine.wake().await;
    let mut spec = h.engine.spec().clone();
    spec.entries[1].flag = "v2".into();
    h.engine.set_spec(spec);
    assert_eq!(h.engine.wake().await, Outcome::Converged);
    assert_eq!((h.runs("a"), h.runs("b")), (1, 2));
    assert_eq!(
        *h.old_flags["b"].lock().unwrap(),
        vec![None, Some("v1".to_string())]
    );
    assert_eq!(h.flag("b").await.as_deref(), Some("v2"));
}

#[tokio::test(start_paused = true)]
async fn a_flag_changed_by_someone_else_mid_run_is_not_overwritten() {
    let mut h = harness(vec![("racy", "v1", Behaviour::RacesItsFlag)]);
    pending_for(&mut h).await;
    assert_eq!(
        h.flag("racy").await.as_deref(),
        Some("someone-else"),
        "the precondition protected it"
    );
    assert_eq!(h.status("racy").await.state, State::StateWriteFailed);
}

#[tokio::test(start_paused = true)]
async fn a_standby_runs_nothing_while_another_holds_the_lease() {
    let mut h = harness(vec![("a", "v1", Behaviour::Ok)]);
    let held = json!({"holder": "other", "expires_at_ms": now_ms() + 60_000});
    h.store.put(lease::lease_key(), held).await.unwrap();
    let outcome = h.engine.wake().await;
    let Outcome::Standby { ref holder, .. } = outcome else {
        panic!("standby: {outcome:?}");
    };
    assert_eq!(holder, "other");
    assert_eq!(h.runs("a"), 0);
    // It sleeps until the holder's lease lapses, not a fixed retry.
    let sleep = next_sleep(&outcome, &h.engine.spec().cadence);
    assert!((59..=60).contains(&sleep.as_secs()), "{sleep:?}");
}

/// A memory store with two scripted faults: while `down` is set, listing fails as an
/// unreachable etcd does; with `finish_elsewhere` set, another replica stores `a` at v1 (once)
/// in the gap between this replica's read of the flags and its taking of the lease.
struct Scripted {
    inner: MemoryStore,
    down: AtomicBool,
    finish_elsewhere: AtomicBool,
}

impl Default for Scripted {
    fn default() -> Self {
        Self {
            inner: MemoryStore::new(Limits::default()),
            down: AtomicBool::new(false),
            finish_elsewhere: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl Store for Scripted {
    fn backend(&self) -> &'static str {
        "memory"
    }
    async fn revision(&self) -> Result<Revision, crate::store::Error> {
        self.inner.revision().await
    }
    async fn get(&self, key: &Key) -> Result<Option<crate::store::Entry>, crate::store::Error> {
        if *key == lease::lease_key() && self.finish_elsewhere.swap(false, Ordering::SeqCst) {
            let flag = status::key(INIT_STATE, "a");
            self.inner.put(flag, json!("v1")).await?;
        }
        self.inner.get(key).await
    }
    async fn list(
        &self,
        ns: &str,
        kind: &str,
    ) -> Result<crate::store::Listing, crate::store::Error> {
        if self.down.load(Ordering::SeqCst) {
            return Err(crate::store::Error::Unavailable("no leader".into()));
        }
        self.inner.list(ns, kind).await
    }
    async fn namespace(
        &self,
        ns: &str,
    ) -> Result<crate::store::NamespaceTree, crate::store::Error> {
        self.inner.namespace(ns).await
    }
    async fn namespaces(&self) -> Result<Vec<String>, crate::store::Error> {
        self.inner.namespaces().await
    }
    async fn apply(&self, batch: Batch) -> Result<Revision, crate::store::Error> {
        self.inner.apply(batch).await
    }
    async fn watch(
        &self,
        from: Revision,
        filter: crate::store::WatchFilter,
    ) -> Result<crate::store::Watch, crate::store::Error> {
        self.inner.watch(from, filter).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_step_finished_by_another_replica_before_the_lease_was_taken_does_not_run_again() {
    let store: DynStore = Arc::new(Scripted {
        finish_elsewhere: AtomicBool::new(true),
        ..Scripted::default()
    });
    let mut h = harness_on(store, vec![("a", "v1", Behaviour::Ok)]);
    assert_eq!(h.engine.wake().await, Outcome::Converged);
    h.ran_and_stored_v1("a", 0, "the flag read under the lease says v1 is done")
        .await;
}

#[tokio::test(start_paused = true)]
async fn repeated_failures_are_marked_as_needing_an_operator() {
    let mut h = harness(vec![("fails", "v1", Behaviour::Fail)]);
    let mut spec = h.engine.spec().clone();
    spec.cadence.needs_operator_after = 3;
    h.engine.set_spec(spec);
    for _ in 0..3 {
        if let Outcome::Pending(due) = h.engine.wake().await {
            tokio::time::advance(due - Instant::now()).await;
        }
    }
    assert_eq!(h.status("fails").await.state, State::NeedsOperator);
}

#[tokio::test(start_paused = true)]
async fn the_wake_loop_wakes_early_on_a_foreign_change_to_system_and_stops_on_shutdown() {
    let h = harness(vec![("a", "v1", Behaviour::Ok)]);
    let (store, runs) = (h.store.clone(), h.runs["a"].clone());
    let shutdown = CancellationToken::new();
    let (_hup_tx, hup_rx) = tokio::sync::mpsc::channel(1);
    let spec = h.engine.spec().clone();
    let looping = tokio::spawn(
        h.engine
            .run(shutdown.clone(), hup_rx, move || Ok(spec.clone())),
    );
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // An operator resets the flag: the loop must notice long before the 300 s steady sleep.
    store.delete(status::key(INIT_STATE, "a")).await.unwrap();
    let started = Instant::now();
    while runs.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "woken by the watch, not the steady cadence"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), looping)
        .await
        .expect("loop stops on shutdown")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_ends_the_wake_before_anything_else_runs() {
    let mut h = harness(vec![
        ("fails", "v1", Behaviour::Fail),
        ("thief", "v1", Behaviour::StealsTheLease),
        ("after", "v1", Behaviour::Ok),
    ]);
    pending_for(&mut h).await;
    assert_eq!(h.status("thief").await.state, State::StateWriteFailed);
    assert_eq!(h.flag("thief").await, None, "the fence refused its flag");
    assert_eq!(h.runs("after"), 0, "nothing runs once the lease is gone");
    let lease = h.store.get(&lease::lease_key()).await.unwrap().unwrap();
    assert_eq!(
        lease.value["holder"], "other",
        "the new holder's lease is left alone"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unavailable_store_is_not_a_closed_gate_and_does_not_rerun_pre_gate_steps() {
    let flaky = Arc::new(Scripted {
        down: AtomicBool::new(true),
        ..Scripted::default()
    });
    let store: DynStore = flaky.clone();
    let mut h = harness_on(store, vec![("a", "v1", Behaviour::Ok)]);
    let pre_runs = Arc::new(AtomicUsize::new(0));
    let mut spec = h.engine.spec().clone();
    spec.entries.push(pre_gate_entry("early", pre_runs.clone()));
    h.engine.set_spec(spec);
    let outcome = h.engine.wake().await;
    assert!(
        matches!(outcome, Outcome::StoreUnavailable { ref why, .. } if why.contains("no leader")),
        "{outcome:?}"
    );
    let again = h.engine.wake().await;
    assert!(
        matches!(again, Outcome::StoreUnavailable { .. }),
        "{again:?}"
    );
    assert_eq!(
        pre_runs.load(Ordering::SeqCst),
        1,
        "the services are not blamed"
    );
    flaky.down.store(false, Ordering::SeqCst);
    assert_eq!(h.engine.wake().await, Outcome::Converged);
    assert_eq!(h.runs("a"), 1);
}

/// An initialiser that runs before the gate and counts its runs.
struct Early(Arc<AtomicUsize>);

#[async_trait]
impl Initialiser for Early {
    fn phase(&self) -> crate::bootstrap::Phase {
        crate::bootstrap::Phase::BeforeGate
    }
    async fn run(&self, _: &InitContext) -> Result<(), InitError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn pre_gate_entry(name: &str, runs: Arc<AtomicUsize>) -> Entry {
    Entry {
        class: "early".into(),
        name: name.into(),
        flag: "v1".into(),
        timeout: Duration::from_secs(2),
        params: json!({}),
        params_hash: params_hash(&json!({})),
        initialiser: Arc::new(Early(runs)),
    }
}

#[tokio::test(start_paused = true)]
async fn every_run_lands_in_a_bounded_history_with_its_flag_and_status() {
    let mut h = harness(vec![
        ("fails", "v1", Behaviour::Fail),
        ("ok", "v1", Behaviour::Ok),
    ]);
    for _ in 0..5 {
        if let Outcome::Pending(due) = h.engine.wake().await {
            tokio::time::advance(due - Instant::now()).await;
        }
    }
    let history = |name: &'static str| {
        let store = h.store.clone();
        async move {
            let entry = store
                .get(&status::key(INIT_HISTORY, name))
                .await
                .unwrap()
                .expect("a history");
            serde_json::from_value::<History>(entry.value).unwrap().runs
        }
    };
    let failed = history("fails").await;
    let attempts = h.status("fails").await.attempts;
    assert!(
        attempts > 3,
        "more runs ({attempts}) than the history keeps"
    );
    assert_eq!(failed.len(), 3, "the newest three runs");
    assert!(
        failed
            .windows(2)
            .all(|w| w[0].started_ms <= w[1].started_ms)
    );
    assert!(failed.iter().all(|r| r.result == "failed"));
    assert!(
        failed[2]
            .error
            .as_deref()
            .unwrap()
            .contains("deliberate failure")
    );
    let ok = history("ok").await;
    assert_eq!(ok.len(), 1, "it ran once");
    assert_eq!(
        (ok[0].result.as_str(), ok[0].old_flag.as_deref()),
        ("succeeded", None)
    );
    assert_eq!(ok[0].flag, "v1");
}
