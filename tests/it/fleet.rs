//! One fleet, several servers, against the real binary: `client --watch --server A,B,C` nodes
//! follow a policy change while the server most of them use is killed -9, and every server
//! lists the same nodes; a bad server list is a usage error.

use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use bootsync::servers::{ServerList, Servers, rendezvous_order};

use crate::support::{self, Proc};

/// Every node writes one file naming `marker`, rolled out to one node first, then to all.
fn policy(marker: &str) -> Value {
    json!({
        "expect_nodes": 5,
        "files": [{"path": "app.conf", "template": format!("node={{{{ node.identifier }}}} {marker}")}],
        "rollout": {"waves": [1, "100%"], "pause": "2s", "progress_deadline": "2m"},
    })
}

/// Appends the version the node's file names to `ID.versions`: one line per hook run.
const HOOK: &str =
    "grep -o 'v[0-9]' $BOOTSYNC_IDENTIFIER/app.conf >> $BOOTSYNC_IDENTIFIER.versions";

fn versions(dir: &Path, id: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("{id}.versions")))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The server (by index in `list`) a node called `id` tries first.
fn first_choice(list: &str, id: &str) -> usize {
    let list: ServerList = list.parse().unwrap();
    let servers = Servers::connect(list.targets(), |b| bootsync::tls::http_client(&[], b)).unwrap();
    rendezvous_order(id, &servers)[0]
}

/// Five identifiers: four that prefer the same server of `list` (the one to kill, by index),
/// and one that prefers another.
fn pick_nodes(list: &str) -> (usize, Vec<String>) {
    let first = |id: &str| first_choice(list, id);
    let candidates: Vec<String> = (0..200).map(|i| format!("n{i:03}")).collect();
    let busy = first(&candidates[0]);
    let mut on_busy: Vec<String> = candidates
        .iter()
        .filter(|id| first(id) == busy)
        .take(4)
        .cloned()
        .collect();
    let other = candidates.iter().find(|id| first(id) != busy).unwrap();
    on_busy.push(other.clone());
    (busy, on_busy)
}

async fn nodes(url: &str) -> Value {
    let (_, body) = support::call(Method::GET, &format!("{url}/v1/nodes"), None, None).await;
    body
}

/// Waits until every one of `ids` reported ok on a file naming `marker`.
async fn all_on(dir: &Path, ids: &[String], marker: &str) {
    support::wait_for(Duration::from_secs(60), marker, || async move {
        ids.iter()
            .all(|id| versions(dir, id).last().map(String::as_str) == Some(marker))
            .then_some(())
    })
    .await;
}

#[cfg(feature = "etcd")]
#[it::test(multi_thread, needs = etcd)]
async fn watchers_given_three_servers_follow_a_change_through_a_kill_9_of_the_busiest() {
    let cluster = tokio::task::spawn_blocking(|| support::etcd::EtcdCluster::start(1))
        .await
        .unwrap();
    let store = cluster.store_url("fleet");
    let dir = support::dir_with(&[("policy.json", &policy("v1").to_string())]);
    let mut servers: Vec<Proc> = vec![Proc::start(
        dir.path(),
        &format!("serve --store {store} --policy policy.json"),
    )];
    for _ in 0..2 {
        servers.push(Proc::start(dir.path(), &format!("serve --store {store}")));
    }
    let list = servers
        .iter()
        .map(|s| s.url.clone())
        .collect::<Vec<_>>()
        .join(",");
    let (busy, ids) = pick_nodes(&list);
    let fleet: Vec<Proc> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            support::watcher(
                dir.path(),
                &list,
                id,
                &format!("10.0.0.{}", i + 1),
                HOOK,
                &["--min-hook-interval", "0s"],
            )
        })
        .collect();
    all_on(dir.path(), &ids, "v1").await;
    let survivor = servers[(busy + 1) % 3].url.clone();
    let (status, installed) = support::call(
        Method::PUT,
        &format!("{survivor}/v1/cfgsync/policy"),
        None,
        Some(policy("v2")),
    )
    .await;
    assert_eq!(status, 200, "{installed}");
    // Mid-change: the first wave's node applied v2, the others wait out the pause.
    support::wait_for(Duration::from_secs(60), "the first wave applied", || {
        let dir = dir.path();
        let ids = &ids;
        async move {
            ids.iter()
                .any(|id| versions(dir, id).last().map(String::as_str) == Some("v2"))
                .then_some(())
        }
    })
    .await;
    servers[busy].kill9();
    all_on(dir.path(), &ids, "v2").await;
    for id in &ids {
        assert_eq!(
            versions(dir.path(), id),
            ["v1", "v2"],
            "{id}: its hook runs once per version, whichever server it used"
        );
    }
    // The four that preferred it moved, and said where; the fifth never moved.
    for (id, watcher) in ids.iter().zip(&fleet) {
        let moved = watcher.stderr().contains("moving to the next server");
        assert_eq!(moved, id != &ids[4], "{id}: {}", watcher.stderr());
    }
    // Every surviving server lists the same nodes, fetched and applied state included.
    let alive: Vec<&Proc> = (0..3).filter(|&i| i != busy).map(|i| &servers[i]).collect();
    let listed = support::wait_for(Duration::from_secs(30), "the same list on both", || async {
        let (a, b) = (nodes(&alive[0].url).await, nodes(&alive[1].url).await);
        (a["nodes"] == b["nodes"] && a["nodes"].as_array().is_some_and(|n| n.len() == 5))
            .then_some(a)
    })
    .await;
    for node in listed["nodes"].as_array().unwrap() {
        assert_eq!(node["state"], "applied", "{node}");
        assert_eq!(node["current"], true, "{node}");
    }
}

#[it::test]
async fn a_bad_server_list_is_a_usage_error_naming_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let client = |list: &str| {
        support::run_cli(
            &[
                "client",
                "--server",
                list,
                "--identifier",
                "n1",
                "--ip",
                "10.0.0.1",
            ],
            dir.path(),
        )
    };
    let (code, _, err) = client("");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no server given"), "{err}");
    let (code, _, err) = client("127.0.0.1:1,,127.0.0.1:2");
    assert_eq!(
        (code, err.contains("server entry 2 is empty")),
        (2, true),
        "{err}"
    );
    let (code, _, err) = client("http://127.0.0.1:1,https://127.0.0.1:2");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("mix http and https"), "{err}");
    let (code, _, err) = client("http://127.0.0.1:99999");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("\"http://127.0.0.1:99999\" is not a URL"),
        "{err}"
    );
    for command in [
        &["status"][..],
        &["nodes", "list"],
        &["rollout", "status"],
        &["history"],
    ] {
        let mut args = command.to_vec();
        args.extend(["--server", "ftp://127.0.0.1:1"]);
        let (code, _, err) = support::run_cli(&args, dir.path());
        assert_eq!(code, 2, "{command:?}: {err}");
        assert!(err.contains("must be http or https"), "{command:?}: {err}");
    }
    // The seed's variable names one server, never a list.
    let seed = std::process::Command::new(support::bin())
        .args(["client", "--identifier", "n1", "--ip", "10.0.0.1"])
        .env("CFG_SERVER_ADDR", "http://127.0.0.1:1,http://127.0.0.1:2")
        .env_remove("BOOTSYNC_SERVER")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&seed.stderr);
    assert_eq!(seed.status.code(), Some(2), "{err}");
    assert!(err.contains("CFG_SERVER_ADDR"), "{err}");
}

#[it::test(multi_thread)]
async fn a_one_shot_client_is_served_by_the_next_server_when_the_first_is_down() {
    let (dir, server) = support::serve_policy(
        &json!({"expect_nodes": 1, "files": [{"path": "id.txt", "template": "{{ node.identifier }}"}]}),
        "",
    );
    // A port nothing listens on: bound, then closed.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let list = format!("{dead_url},{}", server.url);
    let id = (0..100)
        .map(|i| format!("n{i}"))
        .find(|id| first_choice(&list, id) == 0)
        .unwrap();
    let out = dir.path().join("out");
    let (code, _, err) = support::run_cli(
        &[
            "client",
            "--server",
            &list,
            "--identifier",
            &id,
            "--ip",
            "10.0.0.1",
            "--output-dir",
            out.to_str().unwrap(),
            "--timeout",
            "20s",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(out.join("id.txt")).unwrap(), id);
    // Operator commands (which prefer the first listed) move on the same way.
    let (code, out, err) = support::run_cli(&["nodes", "list", "--server", &list], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id), "{out}");
}

#[it::test(multi_thread)]
async fn a_reconciler_given_a_dead_server_first_converges_through_the_next() {
    let dir = support::dir_with(&[(
        "spec.yaml",
        "cadence: { gate_backoff: 1s, retry: 1s, steady: 300s, max_backoff: 2s }\ninitialisers:\n  - { class: exec, name: mark, flag: v1, params: { command: [sh, -c, 'echo ran >> mark.log'] } }\n",
    )]);
    let server = Proc::start(dir.path(), "serve --store memory:");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let list = format!("{dead_url},{}", server.url);
    let _reconciler = Proc::spawn_bootstrap(
        &["bootstrap", "--spec", "spec.yaml", "--server", &list],
        dir.path(),
    );
    let (code, out, err) = support::run_cli(
        &["status", "--server", &list, "--wait", "--timeout", "60s"],
        dir.path(),
    );
    assert_eq!(code, 0, "{out}{err}");
    let (_, body) = support::call(
        Method::GET,
        &format!("{}/v1/config/__system__/init-state/mark", server.url),
        None,
        None,
    )
    .await;
    assert_eq!(body["value"], "v1", "{body}");
    let ran = std::fs::read_to_string(dir.path().join("mark.log")).unwrap();
    assert_eq!(ran, "ran\n", "the step ran once");
}
