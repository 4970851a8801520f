//! bootsync on a real 3-member etcd cluster: member loss, quorum loss and recovery, several
//! servers sharing one cluster, and the reconciler riding out an outage.

#![cfg(feature = "etcd")]

use crate::support;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::Proc;
use crate::support::etcd::EtcdCluster;
use bootsync::store::etcd::EtcdStore;
use bootsync::store::{Key, Limits, Store, StoreExt};
use serde_json::{Value, json};

async fn cluster(size: usize) -> EtcdCluster {
    tokio::task::spawn_blocking(move || EtcdCluster::start(size))
        .await
        .unwrap()
}

#[it::test(multi_thread, needs = etcd)]
async fn one_member_down_fails_nothing_two_down_fails_fast_and_recovery_needs_no_reopen() {
    let mut cluster = cluster(3).await;
    let store = EtcdStore::open(&cluster.store_url("faults"), Limits::default())
        .await
        .unwrap();
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..10 {
        let key = format!("before-{i}");
        acked.insert(
            key.clone(),
            store
                .put(Key::new("prod", "cfg", key), json!(i))
                .await
                .unwrap(),
        );
    }
    cluster.stop_member(0);
    for i in 0..20 {
        let key = format!("one-down-{i}");
        let rev = tokio::time::timeout(
            Duration::from_secs(20),
            store.put(Key::new("prod", "cfg", key.clone()), json!(i)),
        )
        .await
        .expect("a write hung with one member down")
        .unwrap_or_else(|e| panic!("a write failed with one member down: {e}"));
        acked.insert(key, rev);
        store
            .get(&Key::new("prod", "cfg", "before-0"))
            .await
            .expect("a read failed with one member down");
    }
    cluster.stop_member(1);
    let lost = tokio::time::timeout(
        Duration::from_secs(60),
        store.put(Key::new("prod", "cfg", "no-quorum"), json!(1)),
    )
    .await
    .expect("without quorum a write must fail, not hang");
    assert!(lost.is_err(), "a write cannot succeed without quorum");
    cluster.restart_member(0);
    cluster.restart_member(1);
    support::wait_for(
        Duration::from_secs(60),
        "writes succeed again after restarting the members",
        || {
            let store = store.clone();
            async move {
                store
                    .put(Key::new("prod", "cfg", "after"), json!(true))
                    .await
                    .ok()
            }
        },
    )
    .await;
    let listing = store.list("prod", "cfg").await.unwrap();
    for (key, rev) in &acked {
        assert_eq!(
            listing.entries.get(key).map(|e| e.mod_revision),
            Some(*rev),
            "acknowledged {key} lost"
        );
    }
}

/// A store opens (and so a server starts) while a member is down, wherever it is in the list.
#[it::test(multi_thread, needs = etcd)]
async fn a_store_opens_with_one_member_down() {
    let mut cluster = cluster(3).await;
    cluster.stop_member(0);
    for round in 0..5 {
        let store = EtcdStore::open(&cluster.store_url("one-down"), Limits::default())
            .await
            .unwrap_or_else(|e| panic!("open {round} with the first member down: {e}"));
        store
            .put(Key::new("prod", "cfg", format!("k{round}")), json!(round))
            .await
            .unwrap();
    }
}

/// A spec with one `exec` step running `script` per flag, on a fast cadence.
fn exec_spec(name: &str, flag: &str, script: &str) -> String {
    format!(
        "cadence: {{ gate_backoff: 1s, retry: 1s, steady: 300s }}\ninitialisers:\n  - {{ class: exec, name: {name}, flag: {flag}, params: {{ command: [sh, -c, '{script}'] }} }}\n"
    )
}

const POLICY: &str = "expect_nodes: 3\nfiles:\n  - path: peers.txt\n    template: \"{% for p in nodes %}{{ p.identifier }}={{ p.ip }}\\n{% endfor %}\"\n";

#[it::test(multi_thread, needs = etcd)]
async fn two_servers_on_one_etcd_register_through_either_and_serve_identical_payloads() {
    let cluster = cluster(3).await;
    let dir = support::dir_with(&[("policy.yaml", POLICY)]);
    let url = cluster.store_url("shared");
    let a = Proc::start(
        dir.path(),
        &format!("serve --store {url} --policy policy.yaml"),
    );
    let b = Proc::start(dir.path(), &format!("serve --store {url}"));
    for (i, server) in [&a, &b, &a].iter().enumerate() {
        let me = json!({"identifier": format!("n{i}"), "ip": format!("10.0.0.{}", i + 1)});
        assert_eq!(support::post(&server.url, "/register", &me).await.0, 202);
    }
    let mut payloads = Vec::new();
    for server in [&a, &b] {
        for i in 0..3 {
            let me = json!({"identifier": format!("n{i}"), "ip": format!("10.0.0.{}", i + 1)});
            let (status, body) = support::post(&server.url, "/node?wait=20", &me).await;
            assert_eq!(status, 200, "{body}");
            payloads.push((i, body));
        }
    }
    for i in 0..3 {
        let from: Vec<&Value> = payloads
            .iter()
            .filter(|(n, _)| *n == i)
            .map(|(_, p)| p)
            .collect();
        assert_eq!(
            from[0], from[1],
            "n{i} gets the same payload from either server"
        );
        assert_eq!(
            from[0]["files"][0]["content"]
                .as_str()
                .unwrap()
                .lines()
                .count(),
            3
        );
    }
}

#[it::test(multi_thread, needs = etcd)]
async fn the_reconciler_backs_off_without_quorum_and_converges_once_it_returns() {
    let mut cluster = cluster(3).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = |flag: &str| exec_spec("step", flag, "echo $BOOTSYNC_NEW_FLAG >> step.log");
    std::fs::write(dir.path().join("spec.yaml"), spec("v1")).unwrap();
    let server = Proc::spawn(
        &["serve", "--store", &cluster.store_url("reconciler")],
        dir.path(),
    );
    let mut reconciler = Proc::spawn_bootstrap(
        &["bootstrap", "--spec", "spec.yaml", "--server", &server.url],
        dir.path(),
    );
    let flag = |url: String| async move {
        let body = support::fetch_json(format!("{url}/v1/config/__system__/init-state")).await?;
        body["entries"]["step"]["value"]
            .as_str()
            .map(str::to_string)
    };
    let url = server.url.clone();
    let stored = |wanted: &'static str, what: &'static str, seconds: u64| {
        let url = url.clone();
        support::wait_for(Duration::from_secs(seconds), what, move || {
            let url = url.clone();
            async move { (flag(url).await.as_deref() == Some(wanted)).then_some(()) }
        })
    };
    stored("v1", "v1 stored", 60).await;

    cluster.stop_member(0);
    cluster.stop_member(1);
    support::wait_for(
        Duration::from_secs(60),
        "/readyz 503 without quorum",
        || {
            let url = server.url.clone();
            async move {
                let status = support::get(format!("{url}/readyz")).await.ok()?.status();
                (status == 503).then_some(())
            }
        },
    )
    .await;
    std::fs::write(dir.path().join("spec.yaml"), spec("v2")).unwrap();
    reconciler.signal("HUP");
    support::wait_for(
        Duration::from_secs(90),
        "the reconciler reported the store unavailable",
        || async {
            // The server still answers its health check; it is the store that is gone, and
            // the reconciler says so rather than blaming the gate.
            let log = reconciler.stderr();
            (log.contains("the store did not answer") && !log.contains("service gate closed"))
                .then_some(())
        },
    )
    .await;

    cluster.restart_member(0);
    cluster.restart_member(1);
    stored("v2", "v2 stored after quorum returned", 120).await;
    let log = std::fs::read_to_string(dir.path().join("step.log")).unwrap();
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        ["v1", "v2"],
        "each flag ran exactly once"
    );
    assert!(
        reconciler.child_alive(),
        "the reconciler converged without a restart"
    );
}

#[it::test(multi_thread, needs = etcd)]
async fn replicas_across_two_servers_on_etcd_run_each_flag_once_and_hand_over() {
    let cluster = cluster(3).await;
    let dir = tempfile::tempdir().unwrap();
    let script = "echo start $BOOTSYNC_NEW_FLAG >> count.log; if [ $BOOTSYNC_NEW_FLAG = v2 ]; then sleep 4; fi; echo done $BOOTSYNC_NEW_FLAG >> count.log";
    let spec = |flag: &str| exec_spec("counted", flag, script);
    std::fs::write(dir.path().join("spec.yaml"), spec("v1")).unwrap();
    let url = cluster.store_url("replicas");
    let servers = [
        Proc::start(dir.path(), &format!("serve --store {url}")),
        Proc::start(dir.path(), &format!("serve --store {url}")),
    ];
    let mut replicas: Vec<Proc> = (0..3)
        .map(|i| {
            let holder = format!("replica-{i}");
            let server = servers[i % 2].url.clone();
            support::replica(dir.path(), &server, &holder)
        })
        .collect();
    let log = || std::fs::read_to_string(dir.path().join("count.log")).unwrap_or_default();
    let stored = |flag: &'static str| {
        let url = servers[0].url.clone();
        async move {
            let body =
                support::fetch_json(format!("{url}/v1/config/__system__/init-state")).await?;
            (body["entries"]["counted"]["value"] == flag).then_some(())
        }
    };
    support::wait_for(Duration::from_secs(60), "v1 stored", || stored("v1")).await;
    std::fs::write(dir.path().join("spec.yaml"), spec("v2")).unwrap();
    for r in &replicas {
        r.signal("HUP");
    }
    support::wait_for(Duration::from_secs(30), "a replica started v2", || async {
        log().contains("start v2").then_some(())
    })
    .await;
    let lease: Value = support::get(format!(
        "{}/v1/config/__system__/lease/reconciler",
        servers[1].url
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let holder = lease["value"]["holder"]
        .as_str()
        .expect("the lease is held while v2 runs")
        .to_string();
    replicas[holder
        .trim_start_matches("replica-")
        .parse::<usize>()
        .unwrap()]
    .kill9();
    support::wait_for(Duration::from_secs(60), "v2 stored by a standby", || {
        stored("v2")
    })
    .await;
    let log = log();
    assert_eq!(log.matches("done v1").count(), 1, "{log}");
    assert_eq!(
        log.matches("done v2").count(),
        1,
        "v2 completed exactly once across the handover: {log}"
    );
}
