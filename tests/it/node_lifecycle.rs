//! Living with a deployment: replacing and removing nodes, and `client --watch` keeping a
//! node's files current, with the real binary.

use crate::support;

use std::path::Path;
use std::time::Duration;

use crate::support::Proc;
use serde_json::{Value, json};

const FROZEN_3: &str = "expect_nodes: 3\nfreeze_on_ready: true\nfiles:\n  - path: index.txt\n    template: \"{{ index }}\"\n  - path: peers.txt\n    template: \"{% for p in nodes %}{{ p.identifier }}={{ p.ip }}\\n{% endfor %}\"\n";

/// A policy for `n` nodes whose `peers.txt` names every node, one per line.
fn peer_names(n: usize) -> String {
    format!(
        "expect_nodes: {n}\nfiles:\n  - path: peers.txt\n    template: \"{{% for p in nodes %}}{{{{ p.identifier }}}}\\n{{% endfor %}}\"\n"
    )
}

/// `serve` on a memory store with the [`peer_names`] policy for `n` nodes, in a new directory.
fn serving(n: usize) -> (tempfile::TempDir, Proc) {
    let dir = support::dir_with(&[("policy.yaml", &peer_names(n))]);
    let server = Proc::start(dir.path(), "serve --store memory: --policy policy.yaml");
    (dir, server)
}

/// A node that writes its files once and exits.
fn fetch_once(dir: &Path, url: &str, id: &str, ip: &str) {
    let out = dir.join(id);
    let line = format!(
        "client --server {url} --identifier {id} --ip {ip} --output-dir {} --quiet",
        out.display()
    );
    let (code, _, err) = support::cli(dir, &line);
    assert_eq!(code, 0, "{id}: {err}");
}

/// A node that keeps its files current and appends each epoch its hook saw to `ID.hook`.
fn watcher(dir: &Path, url: &str, id: &str, ip: &str) -> Proc {
    watcher_with(
        dir,
        url,
        id,
        ip,
        &format!("echo $BOOTSYNC_EPOCH >> {id}.hook"),
    )
}

/// A node that keeps its files current and runs `hook` on each change.
fn watcher_with(dir: &Path, url: &str, id: &str, ip: &str, hook: &str) -> Proc {
    support::watcher(dir, url, id, ip, hook, &[])
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_default()
}

async fn nodes(url: &str) -> Value {
    support::fetch_json(format!("{url}/v1/nodes"))
        .await
        .unwrap()
}

async fn revision(url: &str) -> u64 {
    support::fetch_json(format!("{url}/v1/config"))
        .await
        .unwrap()["revision"]
        .as_u64()
        .unwrap()
}

#[it::test]
async fn a_replacement_in_a_frozen_set_keeps_the_index_and_each_survivor_rewrites_once() {
    let dir = support::dir_with(&[("policy.yaml", FROZEN_3)]);
    let d = dir.path();
    let db = format!("sqlite:{}/x.db", d.display());
    let server = Proc::start(d, &format!("serve --store {db} --policy policy.yaml"));
    let url = server.url.clone();
    let b = watcher(d, &url, "node-b", "10.0.0.2");
    let c = watcher(d, &url, "node-c", "10.0.0.3");
    fetch_once(d, &url, "node-a", "10.0.0.1");
    support::wait_for(
        Duration::from_secs(60),
        "both watchers wrote three peers",
        || async {
            let written = ["node-b", "node-c"]
                .iter()
                .all(|id| read(d, &format!("{id}/peers.txt")).lines().count() == 3);
            written.then_some(())
        },
    )
    .await;
    assert_eq!(read(d, "node-a/index.txt"), "0");
    let first_epoch = nodes(&url).await["epoch"].as_u64().unwrap();

    // Bad input first: an unknown node, and an identifier that is taken, change nothing.
    let before = revision(&url).await;
    let (code, _, err) = support::cli(d, &format!("nodes replace --server {url} node-q node-z"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no node \"node-q\" is registered"), "{err}");
    let (code, _, err) = support::cli(d, &format!("nodes replace --server {url} node-b node-c"));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("\"node-c\" is already registered"), "{err}");
    assert_eq!(
        revision(&url).await,
        before,
        "refused changes wrote nothing"
    );

    // node-a failed: node-z takes its place. It sorts last, yet gets index 0.
    let line = format!("nodes replace --server {url} node-a node-z --ip 10.0.0.26");
    let (code, out, err) = support::cli(d, &line);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("node-z replaced node-a"), "{out}");
    fetch_once(d, &url, "node-z", "10.0.0.26");
    assert_eq!(read(d, "node-z/index.txt"), "0", "the old index");
    assert!(read(d, "node-z/peers.txt").starts_with("node-z=10.0.0.26\n"));

    let settled = support::wait_for(
        Duration::from_secs(60),
        "both survivors at the new epoch",
        || async {
            let body = nodes(&url).await;
            let current = body["nodes"]
                .as_array()?
                .iter()
                .filter(|n| n["identifier"] != "node-z")
                .all(|n| n["current"] == true);
            let hooked = ["node-b", "node-c"]
                .iter()
                .all(|id| read(d, &format!("{id}.hook")).lines().count() == 2);
            (current && hooked).then_some(body)
        },
    )
    .await;
    let epoch = settled["epoch"].as_u64().unwrap();
    assert!(epoch > first_epoch);
    let order: Vec<&str> = settled["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["identifier"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        ["node-z", "node-b", "node-c"],
        "member order, by index"
    );
    for id in ["node-b", "node-c"] {
        let peers = read(d, &format!("{id}/peers.txt"));
        assert_eq!(
            peers, "node-z=10.0.0.26\nnode-b=10.0.0.2\nnode-c=10.0.0.3\n",
            "{id}"
        );
        // The first write's run, then one for the one new epoch: node-z's own registration
        // changed nothing peers see.
        let hook = read(d, &format!("{id}.hook"));
        assert_eq!(hook, format!("{first_epoch}\n{epoch}\n"), "{id}");
    }

    // The replaced node is out of a frozen set: 409, never a stale payload; and it cannot
    // register again into the slot its replacement holds.
    let node_a = json!({"identifier": "node-a", "ip": "10.0.0.1"});
    let (status, body) = support::post(&url, "/node", &node_a).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "frozen");
    let (status, body) = support::post(&url, "/register", &node_a).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "replaced");
    drop((b, c));
}

#[it::test]
async fn a_removed_node_gets_404_and_the_list_says_so() {
    let (dir, server) = serving(2);
    let (d, url) = (dir.path(), server.url.clone());
    fetch_once_both(d, &url).await;
    let (code, out, err) = support::cli(d, &format!("nodes remove --server {url} node-b"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed node-b"), "{out}");
    let (status, body) = support::post(
        &url,
        "/node",
        &json!({"identifier": "node-b", "ip": "10.0.0.2"}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "missing_config");
    let listed = nodes(&url).await;
    assert_eq!(listed["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(listed["removed"], json!(["node-b"]));
    let (code, out, _) = support::cli(d, &format!("nodes list --server {url}"));
    assert_eq!(code, 0);
    assert!(out.contains("node-a") && !out.contains("node-b "), "{out}");
    let (code, _, err) = support::cli(d, &format!("nodes remove --server {url} node-b"));
    assert_eq!(code, 1, "removing it twice is refused: {err}");
}

async fn fetch_once_both(d: &Path, url: &str) {
    let (a, b) = (d.to_path_buf(), d.to_path_buf());
    let (ua, ub) = (url.to_string(), url.to_string());
    let ta = tokio::task::spawn_blocking(move || fetch_once(&a, &ua, "node-a", "10.0.0.1"));
    let tb = tokio::task::spawn_blocking(move || fetch_once(&b, &ub, "node-b", "10.0.0.2"));
    ta.await.unwrap();
    tb.await.unwrap();
}

#[it::test]
async fn watch_survives_a_server_restart_and_registers_again() {
    a_watcher_registers_again_after_its_server_lost_its_state("").await;
}

/// In strict mode the restarted server knows no secret for the node (401): the watcher
/// registers again too, and gets a new one.
#[it::test]
async fn in_strict_mode_a_watcher_registers_again_after_its_server_lost_its_state() {
    a_watcher_registers_again_after_its_server_lost_its_state(
        "--join-token-file join.token --strict-nodes",
    )
    .await;
}

async fn a_watcher_registers_again_after_its_server_lost_its_state(flags: &str) {
    let dir = support::dir_with(&[
        ("policy.yaml", &peer_names(1)),
        ("join.token", "j0in-t0ken-j0in-t0ken"),
    ]);
    let d = dir.path();
    let server = Proc::start(
        d,
        &format!("serve --store memory: --policy policy.yaml {flags}"),
    );
    let mut server = server;
    let url = server.url.clone();
    let port = url.rsplit(':').next().unwrap().to_string();
    let token: &[&str] = if flags.is_empty() {
        &[]
    } else {
        &["--join-token-file", "join.token"]
    };
    let mut watch = support::watcher(
        d,
        &url,
        "node-a",
        "10.0.0.1",
        "echo $BOOTSYNC_EPOCH >> node-a.hook",
        token,
    );
    support::wait_for(Duration::from_secs(60), "the first write", || async {
        (read(d, "node-a/peers.txt") == "node-a\n").then_some(())
    })
    .await;

    // The server dies and comes back empty (a memory store): the watcher must register again.
    server.kill9();
    let line =
        format!("serve --store memory: --policy policy.yaml --listen 127.0.0.1:{port} {flags}");
    let server = Proc::start(d, &line);
    support::wait_for(
        Duration::from_secs(90),
        "node-a registered again",
        || async {
            let body = support::fetch_json(format!("{}/v1/nodes", server.url)).await?;
            (body["nodes"][0]["identifier"] == "node-a").then_some(())
        },
    )
    .await;
    // A change after the restart reaches it: a second node joins the peer list.
    let out = d.join("node-b");
    let mut args = vec![
        "client",
        "--server",
        &server.url,
        "--identifier",
        "node-b",
        "--ip",
        "10.0.0.2",
        "--quiet",
        "--output-dir",
    ];
    let out = out.display().to_string();
    args.push(&out);
    args.extend_from_slice(token);
    let (code, _, err) = support::run_cli(&args, d);
    assert_eq!(code, 0, "node-b: {err}");
    support::wait_for(Duration::from_secs(90), "the new peer list", || async {
        (read(d, "node-a/peers.txt") == "node-a\nnode-b\n").then_some(())
    })
    .await;
    support::wait_for(
        Duration::from_secs(30),
        "the hook for the change",
        || async { (read(d, "node-a.hook").lines().count() == 2).then_some(()) },
    )
    .await;
    assert!(watch.child_alive(), "the watcher kept running");
    watch.signal("TERM");
    assert_eq!(
        watch.wait_exit(Duration::from_secs(15)),
        Some(0),
        "SIGTERM ends it cleanly"
    );
}

#[it::test]
async fn a_failing_hook_is_reported_and_runs_again_at_the_next_epoch_with_the_files_written() {
    let (dir, server) = serving(1);
    let (d, url) = (dir.path(), server.url.clone());
    let out = d.join("node-a").display().to_string();
    let watch = Proc::spawn_bootstrap(
        &[
            "client",
            "--server",
            &url,
            "--identifier",
            "node-a",
            "--ip",
            "10.0.0.1",
            "--output-dir",
            &out,
            "--watch",
            "--on-change",
            "echo $BOOTSYNC_EPOCH >> failing.hook; exit 7",
        ],
        d,
    );
    support::wait_for(Duration::from_secs(60), "the first write", || async {
        (read(d, "node-a/peers.txt") == "node-a\n").then_some(())
    })
    .await;
    // The first write ran it once (and it failed); each new epoch runs it again.
    for (joiner, ip, expected, runs) in [
        ("node-b", "10.0.0.2", "node-a\nnode-b\n", 2),
        ("node-c", "10.0.0.3", "node-a\nnode-b\nnode-c\n", 3),
    ] {
        fetch_once(d, &url, joiner, ip);
        support::wait_for(
            Duration::from_secs(60),
            "the rewrite and its hook",
            || async {
                let hooked = read(d, "failing.hook").lines().count() == runs;
                (read(d, "node-a/peers.txt") == expected && hooked).then_some(())
            },
        )
        .await;
    }
    let log = watch.stderr();
    assert!(log.contains("--on-change exit status: 7"), "{log}");
    assert!(log.contains("runs again at the next epoch"), "{log}");
}
