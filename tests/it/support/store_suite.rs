//! The store conformance suite: every backend must pass every case unchanged.
//!
//! Each case takes a fresh, empty store. `store_conformance.rs` stamps the cases per
//! backend with `conformance!`, so a failing test is named `backend::case`.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::BTreeSet;
use std::time::Duration;

use bootsync::store::{Batch, DynStore, Error, Key, Precondition, StoreExt, WatchFilter};
use serde_json::json;

fn k(ns: &str, ty: &str, key: &str) -> Key {
    Key::new(ns, ty, key)
}

/// Generates one test per case for a backend, given an async factory expression:
/// `conformance!(name, factory())`, or `conformance!(name, factory(), needs = etcd)` for a
/// backend that needs a program the harness checks for.
#[macro_export]
macro_rules! conformance {
    ($backend:ident, $factory:expr $(, needs = $need:ident)?) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            $crate::conformance!(@cases ($($need)?) $factory;
                put_then_get_returns_value_and_revisions,
                modify_keeps_create_revision_and_bumps_mod_revision,
                delete_removes_and_bumps_revision,
                list_namespace_and_namespaces_see_every_entry,
                revisions_strictly_increase_under_concurrent_writers,
                batch_spans_namespaces_atomically,
                failed_precondition_changes_nothing_and_names_the_key,
                absent_and_mod_revision_preconditions_hold,
                watch_replays_from_a_revision_then_streams_live,
                public_filter_never_shows_reserved_namespaces,
                namespace_filter_shows_one_namespace,
                invalid_writes_change_nothing,
                json_values_round_trip
            );
        }
    };
    (@cases () $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[it::test]
            async fn $case() {
                let store: bootsync::store::DynStore = ($factory).await;
                $crate::conformance!(@run store, $case);
            }
        )*
    };
    (@cases ($need:ident) $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[it::test(needs = $need)]
            async fn $case() {
                let store: bootsync::store::DynStore = ($factory).await;
                $crate::conformance!(@run store, $case);
            }
        )*
    };
    (@run $store:ident, $case:ident) => {
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            $crate::support::store_suite::$case($store),
        )
        .await
        .expect(concat!(stringify!($case), " hung: a store call never answered"))
    };
}

pub async fn put_then_get_returns_value_and_revisions(store: DynStore) {
    let before = store.revision().await.unwrap();
    let rev = store
        .put(k("prod", "cfg", "a"), json!({"x": 1}))
        .await
        .unwrap();
    assert!(rev > before, "a commit gets a new revision");
    let entry = store
        .get(&k("prod", "cfg", "a"))
        .await
        .unwrap()
        .expect("entry present");
    assert_eq!(entry.value, json!({"x": 1}));
    assert_eq!(entry.create_revision, rev);
    assert_eq!(entry.mod_revision, rev);
    assert_eq!(store.revision().await.unwrap(), rev);
    assert!(
        store
            .get(&k("prod", "cfg", "missing"))
            .await
            .unwrap()
            .is_none()
    );
}

pub async fn modify_keeps_create_revision_and_bumps_mod_revision(store: DynStore) {
    let r1 = store.put(k("prod", "cfg", "a"), json!(1)).await.unwrap();
    let r2 = store.put(k("prod", "cfg", "a"), json!(2)).await.unwrap();
    assert!(r2 > r1);
    let entry = store.get(&k("prod", "cfg", "a")).await.unwrap().unwrap();
    assert_eq!(
        (entry.value, entry.create_revision, entry.mod_revision),
        (json!(2), r1, r2)
    );
}

pub async fn delete_removes_and_bumps_revision(store: DynStore) {
    let r1 = store.put(k("prod", "cfg", "a"), json!(1)).await.unwrap();
    let r2 = store.delete(k("prod", "cfg", "a")).await.unwrap();
    assert!(r2 > r1);
    assert!(store.get(&k("prod", "cfg", "a")).await.unwrap().is_none());
    assert!(store.list("prod", "cfg").await.unwrap().entries.is_empty());
}

pub async fn list_namespace_and_namespaces_see_every_entry(store: DynStore) {
    let batch = Batch::new()
        .put(k("prod", "cfg", "b"), json!("B"))
        .put(k("prod", "cfg", "a"), json!("A"))
        .put(k("prod", "flows", "f/1"), json!({"on": true}))
        .put(k("__template__", "cfg", "t"), json!(0));
    let rev = store.apply(batch).await.unwrap();
    let listing = store.list("prod", "cfg").await.unwrap();
    assert_eq!(listing.revision, rev);
    assert_eq!(
        listing.entries.keys().cloned().collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(store.keys("prod", "flows").await.unwrap(), ["f/1"]);
    let tree = store.namespace("prod").await.unwrap();
    assert_eq!(tree.revision, rev);
    let values = tree.values();
    assert_eq!(values["cfg"]["a"], json!("A"));
    assert_eq!(values["flows"]["f/1"], json!({"on": true}));
    assert_eq!(values.len(), 2);
    let namespaces = store.namespaces().await.unwrap();
    assert_eq!(namespaces, ["__template__", "prod"]);
    assert!(store.namespace("empty").await.unwrap().types.is_empty());
}

pub async fn revisions_strictly_increase_under_concurrent_writers(store: DynStore) {
    let writers = 32;
    let per_writer = 10;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..per_writer {
                let key = k("load", "w", &format!("{w}-{i}"));
                revs.push((key.clone(), store.put(key, json!(i)).await.unwrap()));
            }
            revs
        }));
    }
    let mut seen = BTreeSet::new();
    for task in tasks {
        for (key, rev) in task.await.unwrap() {
            assert!(seen.insert(rev), "revision {rev} was handed out twice");
            let entry = store
                .get(&key)
                .await
                .unwrap()
                .expect("acknowledged write visible");
            assert_eq!(entry.mod_revision, rev);
        }
    }
    assert_eq!(seen.len(), writers * per_writer);
    assert_eq!(
        store.list("load", "w").await.unwrap().entries.len(),
        writers * per_writer
    );
}

pub async fn batch_spans_namespaces_atomically(store: DynStore) {
    let rev = store
        .apply(
            Batch::new()
                .put(k("a", "t", "1"), json!(1))
                .put(k("b", "t", "2"), json!(2))
                .put(k("__system__", "init-state", "x"), json!("v1")),
        )
        .await
        .unwrap();
    for key in [
        k("a", "t", "1"),
        k("b", "t", "2"),
        k("__system__", "init-state", "x"),
    ] {
        assert_eq!(
            store.get(&key).await.unwrap().unwrap().mod_revision,
            rev,
            "{key}"
        );
    }
}

pub async fn failed_precondition_changes_nothing_and_names_the_key(store: DynStore) {
    store
        .put(k("prod", "cfg", "taken"), json!(1))
        .await
        .unwrap();
    let before = store.revision().await.unwrap();
    let err = store
        .apply(
            Batch::new()
                .check(k("prod", "cfg", "free"), Precondition::Absent)
                .check(k("prod", "cfg", "taken"), Precondition::Absent)
                .put(k("prod", "cfg", "free"), json!("new"))
                .put(k("other", "cfg", "x"), json!("new")),
        )
        .await
        .expect_err("precondition must fail");
    match err {
        Error::Conflict { key, .. } => assert_eq!(key, k("prod", "cfg", "taken")),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        store.revision().await.unwrap(),
        before,
        "a failed batch commits nothing"
    );
    assert!(
        store
            .get(&k("prod", "cfg", "free"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.get(&k("other", "cfg", "x")).await.unwrap().is_none());
}

pub async fn absent_and_mod_revision_preconditions_hold(store: DynStore) {
    let key = k("prod", "cfg", "cas");
    // Puts `value` at `key` on the condition that `checked` meets `precondition`.
    let put_if = |checked: Key, precondition: Precondition, value: i64| {
        let store = store.clone();
        let batch = Batch::new()
            .check(checked, precondition)
            .put(key.clone(), json!(value));
        async move { store.apply(batch).await }
    };
    let conflict = |r: Result<u64, Error>| matches!(r, Err(Error::Conflict { .. }));
    let r1 = put_if(key.clone(), Precondition::Absent, 1).await.unwrap();
    let again = put_if(key.clone(), Precondition::Absent, 9).await;
    assert!(conflict(again), "absent fails once present");
    let r2 = put_if(key.clone(), Precondition::ModRevision(r1), 2)
        .await
        .unwrap();
    let stale = put_if(key.clone(), Precondition::ModRevision(r1), 3).await;
    assert!(conflict(stale), "a stale revision fails");
    let missing = put_if(k("prod", "cfg", "nope"), Precondition::ModRevision(r2), 4).await;
    assert!(conflict(missing), "mod_revision on an absent key fails");
    assert_eq!(store.get(&key).await.unwrap().unwrap().value, json!(2));
}

pub async fn watch_replays_from_a_revision_then_streams_live(store: DynStore) {
    let start = store.revision().await.unwrap();
    let r1 = store.put(k("prod", "cfg", "a"), json!(1)).await.unwrap();
    let r2 = store.put(k("prod", "cfg", "b"), json!(2)).await.unwrap();

    let mut from_start = store.watch(start, WatchFilter::All).await.unwrap();
    let mut from_middle = store.watch(r1, WatchFilter::All).await.unwrap();
    let e1 = next_event(&mut from_start).await;
    assert_eq!(e1.revision, r1);
    assert_eq!(e1.changes[0].key, k("prod", "cfg", "a"));
    assert_eq!(e1.changes[0].value, Some(json!(1)));
    assert_eq!(next_event(&mut from_start).await.revision, r2);
    assert_eq!(
        next_event(&mut from_middle).await.revision,
        r2,
        "resume skips what was seen"
    );

    let r3 = store
        .apply(
            Batch::new()
                .put(k("prod", "cfg", "c"), json!(3))
                .delete(k("prod", "cfg", "a")),
        )
        .await
        .unwrap();
    let live = next_event(&mut from_start).await;
    assert_eq!(live.revision, r3);
    assert_eq!(
        live.changes.len(),
        2,
        "one event per batch, with every change"
    );
    assert_eq!(live.changes[1].value, None, "a delete carries no value");
    assert_eq!(next_event(&mut from_middle).await.revision, r3);
}

pub async fn public_filter_never_shows_reserved_namespaces(store: DynStore) {
    let start = store.revision().await.unwrap();
    let mut public = store.watch(start, WatchFilter::Public).await.unwrap();
    let mut all = store.watch(start, WatchFilter::All).await.unwrap();
    let hidden = store
        .put(k("__system__", "init-state", "x"), json!("v1"))
        .await
        .unwrap();
    let mixed = store
        .apply(
            Batch::new()
                .put(k("__cfgsync__", "scratch", "n1"), json!({}))
                .put(k("prod", "cfg", "a"), json!(1)),
        )
        .await
        .unwrap();
    let first_public = next_event(&mut public).await;
    assert_eq!(
        first_public.revision, mixed,
        "the reserved-only batch is skipped"
    );
    assert_eq!(first_public.changes.len(), 1);
    assert_eq!(first_public.changes[0].key.namespace, "prod");
    let first_all = next_event(&mut all).await;
    assert_eq!(
        first_all.revision, hidden,
        "internal watchers see reserved namespaces"
    );
}

pub async fn namespace_filter_shows_one_namespace(store: DynStore) {
    let start = store.revision().await.unwrap();
    let mut watch = store
        .watch(start, WatchFilter::Namespace("__system__".into()))
        .await
        .unwrap();
    store.put(k("prod", "cfg", "a"), json!(1)).await.unwrap();
    let rev = store
        .put(k("__system__", "init-state", "x"), json!("v1"))
        .await
        .unwrap();
    let event = next_event(&mut watch).await;
    assert_eq!(event.revision, rev);
    assert!(
        event
            .changes
            .iter()
            .all(|c| c.key.namespace == "__system__")
    );
}

pub async fn invalid_writes_change_nothing(store: DynStore) {
    let before = store.revision().await.unwrap();
    let bad_names = [
        k("", "t", "k"),
        k("a/b", "t", "k"),
        k("ns", "t y", "k"),
        k("ns", "t", ""),
        k("ns", "t", "a\u{7}b"),
    ];
    for key in bad_names {
        let err = store
            .put(key.clone(), json!(1))
            .await
            .expect_err("invalid name accepted");
        assert!(matches!(err, Error::Invalid { .. }), "{key:?}: {err:?}");
    }
    let empty = store
        .apply(Batch::new())
        .await
        .expect_err("empty batch accepted");
    assert!(matches!(empty, Error::Invalid { .. }));
    let huge = json!("x".repeat(2 * 1024 * 1024));
    let err = store
        .put(k("ns", "t", "big"), huge)
        .await
        .expect_err("oversized value accepted");
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    assert_eq!(store.revision().await.unwrap(), before);
    assert!(store.namespaces().await.unwrap().is_empty());
}

pub async fn json_values_round_trip(store: DynStore) {
    let value = json!({
        "nested": {"list": [1, 2.5, -3, null, true, "é ✓ 日本"], "empty": {}},
        "big": 9_007_199_254_740_993_u64,
        "neg": -12,
        "s": "line\nbreak \"quoted\""
    });
    for (key, value) in [("v", value), ("scalar", json!(null))] {
        store
            .put(k("prod", "cfg", key), value.clone())
            .await
            .unwrap();
        let stored = store.get(&k("prod", "cfg", key)).await.unwrap().unwrap();
        assert_eq!(stored.value, value, "{key}");
    }
}

async fn next_event(watch: &mut bootsync::store::Watch) -> bootsync::store::ChangeEvent {
    tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("watch delivered nothing: event lost or stream stalled")
        .expect("stream ended")
        .expect("watch error")
}
