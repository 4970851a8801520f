//! Changes to a running fleet, against the real binary: 20 watching nodes take a policy change
//! in waves `[1, "25%", "100%"]` and report what they applied; a bad change stops after the
//! first wave and is rolled back; operators pause, resume, promote and force; a kill -9 and a
//! second server on etcd do not lose the rollout; seed-style clients are served by wave and
//! hold none.

use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{self, Proc};

const NODES: usize = 20;

/// Every node writes one file naming `marker`; `extra` is merged into the `rollout:` section.
fn policy_with(marker: &str, extra: Value) -> Value {
    let mut rollout = json!({"waves": [1, "25%", "100%"], "progress_deadline": "2m"});
    rollout
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    json!({
        "expect_nodes": NODES,
        "files": [{"path": "app.conf", "template": format!("node={{{{ node.identifier }}}} {marker}")}],
        "rollout": rollout,
    })
}

fn policy(marker: &str) -> Value {
    policy_with(marker, json!({}))
}

/// The hook fails (exit 3, "bad config" on stderr) on content marked `bad`.
const HOOK: &str = "echo $BOOTSYNC_EPOCH >> $BOOTSYNC_IDENTIFIER.hook; if grep -q bad $BOOTSYNC_IDENTIFIER/app.conf; then echo 'bad config' >&2; exit 3; fi";

fn id(i: usize) -> String {
    format!("n{i:02}")
}

fn ip(i: usize) -> String {
    format!("10.0.0.{}", i + 1)
}

/// A watcher for each of `nodes`, each on the server `url_of(i)` names.
fn watchers(
    dir: &Path,
    nodes: impl Iterator<Item = usize>,
    url_of: impl Fn(usize) -> String,
) -> Vec<Proc> {
    nodes
        .map(|i| {
            support::watcher(
                dir,
                &url_of(i),
                &id(i),
                &ip(i),
                HOOK,
                &["--min-hook-interval", "0s"],
            )
        })
        .collect()
}

fn fleet(dir: &Path, url: &str) -> Vec<Proc> {
    watchers(dir, 0..NODES, |_| url.to_string())
}

async fn call(url: &str, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let (status, body) = support::call(method, &format!("{url}{path}"), None, body).await;
    (status.as_u16(), body)
}

/// Installs `policy` through `PUT /v1/cfgsync/policy`.
async fn install(url: &str, policy: &Value, force: bool) -> (u16, Value) {
    let path = format!("/v1/cfgsync/policy?force={force}");
    call(url, Method::PUT, &path, Some(policy.clone())).await
}

/// Installs `policy`, which must start a rollout; its version.
async fn start_rollout(url: &str, policy: &Value) -> u64 {
    let (status, installed) = install(url, policy, false).await;
    assert_eq!(status, 200, "{installed}");
    assert_eq!(installed["rollout"], true, "{installed}");
    installed["version"].as_u64().unwrap()
}

async fn command(url: &str, name: &str) -> (u16, Value) {
    call(url, Method::POST, &format!("/v1/rollout/{name}"), None).await
}

/// The nodes once every one of `count` reported ok on `version` (or on anything, with `None`).
async fn all_applied(url: &str, count: usize, version: Option<u64>, what: &str) -> Vec<Value> {
    support::wait_for(Duration::from_secs(60), what, || async move {
        let (_, body) = call(url, Method::GET, "/v1/nodes", None).await;
        let nodes = body["nodes"].as_array()?.clone();
        let reporting: Vec<&Value> = nodes.iter().filter(|n| !n["applied"].is_null()).collect();
        let done = reporting.len() == count
            && reporting.iter().all(|n| {
                n["applied"]["result"] == "ok"
                    && version.is_none_or(|v| n["applied"]["version"] == v)
            });
        done.then_some(nodes)
    })
    .await
}

/// The rollout once `done` holds for its status.
async fn rollout_when(url: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    support::wait_for(Duration::from_secs(60), what, || {
        let done = &done;
        async move {
            let (_, body) = call(url, Method::GET, "/v1/rollout", None).await;
            done(&body).then_some(body)
        }
    })
    .await
}

async fn rollout_state(url: &str, state: &'static str) -> Value {
    rollout_when(url, state, |s| s["state"] == state).await
}

fn content(dir: &Path, id: &str) -> String {
    std::fs::read_to_string(dir.join(id).join("app.conf")).unwrap_or_default()
}

/// Asserts from the reports' times that each wave applied before the next began.
fn assert_wave_order(nodes: &[Value]) {
    let at = |i: usize| -> u64 {
        let node = nodes.iter().find(|n| n["identifier"] == id(i)).unwrap();
        node["applied"]["reported_ms"].as_u64().unwrap()
    };
    let wave = |range: std::ops::Range<usize>| -> Vec<u64> { range.map(at).collect() };
    let (first, second, third) = (wave(0..1), wave(1..5), wave(5..NODES));
    assert!(
        first.iter().max() <= second.iter().min() && second.iter().max() <= third.iter().min(),
        "reports out of wave order: {first:?} {second:?} {third:?}"
    );
}

#[it::test(multi_thread)]
async fn a_good_change_rolls_out_wave_by_wave_in_slot_order() {
    let (dir, server) = support::serve_policy(&policy("v1"), "");
    let _fleet = fleet(dir.path(), &server.url);
    all_applied(&server.url, NODES, None, "every node applied v1").await;
    let version = start_rollout(&server.url, &policy("v2")).await;
    let nodes = all_applied(&server.url, NODES, Some(version), "every node applied v2").await;
    assert_wave_order(&nodes);
    let done = rollout_state(&server.url, "complete").await;
    assert_eq!(done["target"], version);
    // The status, the page and the metrics count the nodes by version and result.
    let (_, status) = call(&server.url, Method::GET, "/v1/status", None).await;
    assert_eq!(
        status["cfgsync"]["applied"],
        json!([{"version": version, "result": "ok", "nodes": NODES}]),
        "{status}"
    );
    let page = reqwest::get(format!("{}/", server.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("id=rollout") && page.contains("complete"),
        "{page}"
    );
    let metrics = reqwest::get(format!("{}/metrics", server.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = format!("bootsync_cfgsync_nodes{{version=\"{version}\",result=\"ok\"}} {NODES}");
    assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    let (status, _) = install(&server.url, &policy("v3"), false).await;
    assert_eq!(
        status, 200,
        "nothing runs now: another install goes through"
    );
}

#[it::test(multi_thread)]
async fn a_bad_change_halts_after_the_first_wave_and_a_rollback_restores_it() {
    let (dir, server) = support::serve_policy(&policy("v1"), "");
    let _fleet = fleet(dir.path(), &server.url);
    all_applied(&server.url, NODES, None, "every node applied v1").await;
    start_rollout(&server.url, &policy("bad")).await;
    let halted = rollout_state(&server.url, "halted").await;
    let (_, status) = call(&server.url, Method::GET, "/v1/status", None).await;
    let failed: Vec<&Value> = status["cfgsync"]["applied"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["result"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{status}");
    assert_eq!(failed[0]["nodes"], 1, "{status}");
    let failures = halted["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{halted}");
    assert_eq!(failures[0]["identifier"], "n00");
    assert!(
        failures[0]["reason"]
            .as_str()
            .unwrap()
            .contains("bad config"),
        "the stderr tail is named: {halted}"
    );
    assert_eq!(halted["wave"], 1, "{halted}");
    for i in 1..NODES {
        assert!(
            !content(dir.path(), &id(i)).contains("bad"),
            "{} saw the bad files",
            id(i)
        );
    }
    assert!(content(dir.path(), "n00").contains("bad"));
    let (code, out, err) = support::cli(
        dir.path(),
        &format!("rollout status --server {}", server.url),
    );
    assert_eq!(code, 1, "a halted rollout: {out}{err}");
    assert!(
        out.contains("halted") && out.contains("failed: n00") && out.contains("bad config"),
        "{out}"
    );
    let (status, refused) = install(&server.url, &policy("v4"), false).await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (409, Some("rollout_in_progress")),
        "{refused}"
    );
    let hooks_before = support::hook_runs(dir.path(), "n00").len();
    let (status, rolled) = command(&server.url, "rollback").await;
    assert_eq!(status, 200, "{rolled}");
    let d = dir.path().to_path_buf();
    support::wait_for(
        Duration::from_secs(30),
        "n00's files restored and its hook run again",
        || {
            let d = d.clone();
            async move {
                (content(&d, "n00").contains("v1")
                    && support::hook_runs(&d, "n00").len() > hooks_before)
                    .then_some(())
            }
        },
    )
    .await;
    let (status, none) = command(&server.url, "pause").await;
    assert_eq!(
        (status, none["code"].as_str()),
        (409, Some("no_rollout")),
        "{none}"
    );
}

#[it::test(multi_thread)]
async fn a_rollback_on_failure_restores_the_wave_by_itself() {
    let (dir, server) = support::serve_policy(&policy("v1"), "");
    let _fleet = fleet(dir.path(), &server.url);
    all_applied(&server.url, NODES, None, "every node applied v1").await;
    start_rollout(
        &server.url,
        &policy_with("bad", json!({"on_failure": "rollback"})),
    )
    .await;
    let rolled = rollout_state(&server.url, "rolled_back").await;
    assert!(
        rolled["reason"].as_str().unwrap().contains("n00"),
        "{rolled}"
    );
    let d = dir.path().to_path_buf();
    support::wait_for(Duration::from_secs(30), "n00 back on v1", || {
        let d = d.clone();
        async move { content(&d, "n00").contains("v1").then_some(()) }
    })
    .await;
    // Every node reports the restored version, and only n00 ran its hook for it.
    all_applied(&server.url, NODES, None, "every node ok again").await;
}

#[it::test(multi_thread)]
async fn pause_resume_promote_and_a_forced_install_each_work() {
    let (dir, server) = support::serve_policy(&policy("v1"), "");
    let url = &server.url;
    let _fleet = fleet(dir.path(), url);
    all_applied(url, NODES, None, "every node applied v1").await;
    // A long pause holds the rollout after its first wave.
    let version = start_rollout(url, &policy_with("v2", json!({"pause": "1h"}))).await;
    rollout_when(url, "wave 1 healthy", |s| s["ok"] == 1).await;
    let (status, paused) = command(url, "pause").await;
    assert_eq!(
        (status, paused["state"].as_str()),
        (200, Some("paused")),
        "{paused}"
    );
    let (status, again) = command(url, "pause").await;
    assert_eq!(
        (status, again["code"].as_str()),
        (409, Some("no_rollout")),
        "{again}"
    );
    let (status, resumed) = command(url, "resume").await;
    assert_eq!(
        (status, resumed["state"].as_str()),
        (200, Some("running")),
        "{resumed}"
    );
    assert!(
        !content(dir.path(), "n05").contains("v2"),
        "wave 3 is not reached yet"
    );
    let (status, promoted) = command(url, "promote").await;
    assert_eq!(
        (status, promoted["state"].as_str()),
        (200, Some("complete")),
        "{promoted}"
    );
    all_applied(
        url,
        NODES,
        Some(version),
        "every node applied v2 after the promote",
    )
    .await;
    // A forced install over a running rollout goes to every node at once.
    start_rollout(url, &policy_with("v3", json!({"pause": "1h"}))).await;
    let (status, forced) = install(
        url,
        &json!({
            "expect_nodes": NODES,
            "files": [{"path": "app.conf", "template": "node={{ node.identifier }} v4"}],
        }),
        true,
    )
    .await;
    assert_eq!(
        (status, forced["rollout"].as_bool()),
        (200, Some(false)),
        "{forced}"
    );
    let v4 = forced["version"].as_u64().unwrap();
    all_applied(url, NODES, Some(v4), "every node applied the forced v4").await;
    assert!(content(dir.path(), "n19").contains("v4"));
}

#[it::test(multi_thread)]
async fn a_rollout_goes_on_from_its_wave_after_a_kill_9() {
    let (dir, mut server) = support::serve_policy(&policy("v1"), "");
    let port = server.url.rsplit(':').next().unwrap().to_string();
    let url = server.url.clone();
    let _fleet = fleet(dir.path(), &url);
    all_applied(&url, NODES, None, "every node applied v1").await;
    let version = start_rollout(&url, &policy_with("v2", json!({"pause": "3s"}))).await;
    rollout_when(&url, "wave 2 reached", |s| s["wave"] == 2).await;
    server.kill9();
    let restarted = Proc::start(
        dir.path(),
        &format!("{} --listen 127.0.0.1:{port}", support::SERVE_POLICY),
    );
    let (status, resumed) = call(&restarted.url, Method::GET, "/v1/rollout", None).await;
    assert_eq!(status, 200, "{resumed}");
    assert!(
        resumed["wave"].as_u64() >= Some(2),
        "it starts from the wave it had reached: {resumed}"
    );
    assert_eq!(
        resumed["target"], version,
        "the file it restarted with was not forced over it"
    );
    // (A restarted server serves every node a new epoch, so the nodes report again: the
    // reports' times say nothing of the wave order here.)
    all_applied(&url, NODES, Some(version), "every node applied v2").await;
    rollout_state(&url, "complete").await;
}

/// A seed client's registration (it sends no `wait`, and never reports).
async fn seed_register(url: &str, i: usize) {
    let me = json!({"identifier": id(i), "ip": ip(i)});
    let (status, _) = call(url, Method::POST, "/register", Some(me)).await;
    assert_eq!(status, 202);
}

/// A seed client's fetch, tried again until it is served; the content of its file.
async fn seed_fetch(url: &str, i: usize) -> String {
    let me = json!({"identifier": id(i), "ip": ip(i)});
    support::wait_for(Duration::from_secs(30), "a seed client served", || {
        let me = me.clone();
        async move {
            let (status, payload) = call(url, Method::POST, "/node", Some(me)).await;
            (status == 200).then(|| payload["files"][0]["content"].as_str().unwrap().to_string())
        }
    })
    .await
}

#[it::test(multi_thread)]
async fn seed_clients_are_served_by_wave_and_hold_none() {
    // n00 (wave 1), n02 (wave 2) and n12 (wave 3) are seed clients; the rest watch.
    let seeds = [0, 2, 12];
    let (dir, server) = support::serve_policy(&policy("v1"), "");
    let url = &server.url;
    let _watchers = watchers(
        dir.path(),
        (0..NODES).filter(|i| !seeds.contains(i)),
        |_| url.clone(),
    );
    for i in seeds {
        seed_register(url, i).await;
    }
    for i in seeds {
        assert!(seed_fetch(url, i).await.contains("v1"));
    }
    all_applied(url, NODES - seeds.len(), None, "every watcher applied v1").await;
    let version = start_rollout(url, &policy_with("v2", json!({"pause": "1h"}))).await;
    // Wave 1 is one seed client: it does not report, so it holds nothing.
    let held = rollout_when(url, "wave 1 healthy", |s| s["silent"] == 1).await;
    assert_eq!(held["pending"], json!([]), "{held}");
    assert!(seed_fetch(url, 0).await.contains("v2"), "n00 is in wave 1");
    assert!(
        seed_fetch(url, 2).await.contains("v1"),
        "n02 waits for wave 2"
    );
    let (status, _) = command(url, "resume").await;
    assert_eq!(status, 409, "a running rollout is not resumed");
    let (_, promoted) = command(url, "promote").await;
    assert_eq!(promoted["state"], "complete");
    all_applied(
        url,
        NODES - seeds.len(),
        Some(version),
        "every watcher applied v2",
    )
    .await;
    assert!(seed_fetch(url, 12).await.contains("v2"));
    let (_, nodes) = call(url, Method::GET, "/v1/nodes", None).await;
    let n12 = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["identifier"] == "n12")
        .unwrap();
    assert_eq!(n12["state"], "not_reporting", "{n12}");
}

#[cfg(feature = "etcd")]
#[it::test(multi_thread, needs = etcd)]
async fn two_servers_on_one_etcd_run_one_rollout() {
    let cluster = tokio::task::spawn_blocking(|| support::etcd::EtcdCluster::start(1))
        .await
        .unwrap();
    let store = cluster.store_url("rollout");
    let dir = support::dir_with(&[("policy.json", &policy("v1").to_string())]);
    let a = Proc::start(
        dir.path(),
        &format!("serve --store {store} --policy policy.json"),
    );
    let b = Proc::start(dir.path(), &format!("serve --store {store}"));
    // Even nodes watch through a, odd ones through b.
    let urls = [a.url.clone(), b.url.clone()];
    let _fleet = watchers(dir.path(), 0..NODES, |i| urls[i % 2].clone());
    all_applied(&a.url, NODES, None, "every node applied v1").await;
    let version = start_rollout(&b.url, &policy("v2")).await;
    let nodes = all_applied(&a.url, NODES, Some(version), "every node applied v2").await;
    assert_wave_order(&nodes);
    let on_a = rollout_state(&a.url, "complete").await;
    let on_b = rollout_state(&b.url, "complete").await;
    for field in ["target", "stable", "wave", "started_ms", "updated_ms"] {
        assert_eq!(on_a[field], on_b[field], "{field}: {on_a} vs {on_b}");
    }
}

#[it::test(multi_thread)]
async fn an_invalid_rollout_section_is_refused_naming_the_field() {
    let (_dir, server) = support::serve_policy(&policy("v1"), "");
    let bad = policy_with("v2", json!({"waves": [5, 2, "50%"]}));
    let (status, body) = install(&server.url, &bad, false).await;
    assert_eq!(status, 422, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("rollout.waves[1]") && message.contains("rollout.waves[2]"),
        "{message}"
    );
    let (status, _) = call(&server.url, Method::GET, "/v1/rollout", None).await;
    assert_eq!(status, 409, "nothing was installed, so no rollout is known");
}

/// `wait_for_rollout` (what `cfgsync-policy` runs with `wait_for_rollout: true`) ends with the
/// rollout: an error naming the halt and the node's stderr, or success once it completes.
#[it::test(multi_thread)]
async fn waiting_for_a_rollout_fails_with_its_halt_and_succeeds_with_its_completion() {
    use bootsync::cfgsync::Policy;
    use bootsync::cfgsync::install::{self, InstallError};
    use bootsync::cfgsync::rollout::VersionKind;

    let two = |marker: &str| -> Policy {
        serde_json::from_value(json!({
            "expect_nodes": 2,
            "files": [{"path": "f", "template": marker}],
            "rollout": {"waves": [1, "100%"]},
        }))
        .unwrap()
    };
    let server = support::TestServer::with(support::Setup::policy(
        "expect_nodes: 2\nfiles: [{path: f, template: v1}]\n",
    ))
    .await;
    let url = server.url().to_string();
    let store = server.store().clone();
    let me = |id: &str| json!({"identifier": id, "ip": "10.0.0.1"});
    // Both nodes watch: each fetches and reports what it got.
    let apply = |id: &'static str, after: u64, result: &'static str| {
        let url = url.clone();
        async move {
            let (_, payload) = call(
                &url,
                Method::POST,
                &format!("/node?wait=10&after={after}"),
                Some(me(id)),
            )
            .await;
            let report = json!({"identifier": id, "epoch": payload["epoch"], "version": payload["version"],
                                "result": result, "exit_status": 1, "stderr_tail": "boom at startup"});
            let (status, body) = call(&url, Method::POST, "/report", Some(report)).await;
            assert_eq!(status, 202, "{id} after {after}: {payload} -> {body}");
            payload["epoch"].as_u64().unwrap()
        }
    };
    for id in ["a", "b"] {
        assert_eq!(
            call(&url, Method::POST, "/register", Some(me(id))).await.0,
            202
        );
    }
    let (ea, eb) = (apply("a", 0, "ok").await, apply("b", 0, "ok").await);
    let bad = install::install_policy(store.as_ref(), &two("bad"), false)
        .await
        .unwrap();
    assert!(bad.rollout);
    let waiting = tokio::spawn({
        let store = store.clone();
        async move { install::wait_for_rollout(store.as_ref(), VersionKind::Policy, bad.version).await }
    });
    let ea = apply("a", ea, "failed").await;
    let ended = tokio::time::timeout(Duration::from_secs(30), waiting).await;
    match ended
        .expect("the wait ends when the rollout halts")
        .unwrap()
    {
        Err(err @ InstallError::RolloutFailed { .. }) => {
            let text = err.to_string();
            assert!(
                text.contains("halted") && text.contains("boom at startup"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    let good = install::install_policy(store.as_ref(), &two("good"), true)
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let store = store.clone();
        async move { install::wait_for_rollout(store.as_ref(), VersionKind::Policy, good.version).await }
    });
    // a (wave 1) gets the new version; b keeps the stable one until a reported ok.
    apply("a", ea, "ok").await;
    let mut after = eb;
    for _ in 0..3 {
        after = apply("b", after, "ok").await;
        if after >= good.version && all_ok_on(&url, good.version).await {
            break;
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(30), waiting).await;
    ended
        .expect("the wait ends when the rollout completes")
        .unwrap()
        .expect("the rollout completes");
}

/// Whether both nodes' reports say ok on `version`.
async fn all_ok_on(url: &str, version: u64) -> bool {
    let (_, body) = call(url, Method::GET, "/v1/nodes", None).await;
    body["nodes"].as_array().is_some_and(|nodes| {
        nodes
            .iter()
            .all(|n| n["applied"]["version"] == version && n["applied"]["result"] == "ok")
    })
}

/// `policy diff` and `plan` render a candidate against the live registrations without
/// installing it.
#[it::test(multi_thread)]
async fn a_preview_counts_and_diffs_a_candidate_without_installing_it() {
    let three = |template: &str| {
        json!({"expect_nodes": 3, "files": [{"path": "app.conf", "template": template}]})
            .to_string()
    };
    let candidate = three(
        "{{ node.identifier }} port=8080\n{% if node.identifier == 'n1' %}{{ 1 // 0 }}{% endif %}",
    );
    let spec = "initialisers:\n  - name: policy\n    class: cfgsync-policy\n    flag: v2\n    params: {policy_file: candidate.json}\n";
    let dir = support::dir_with(&[
        ("policy.json", &three("{{ node.identifier }} port=80\n")),
        ("candidate.json", &candidate),
        ("broken.json", &three("{% for %}")),
        ("spec.yaml", spec),
    ]);
    let server = Proc::start(dir.path(), "serve --store memory: --policy policy.json");
    let url = &server.url;
    for i in 0..3 {
        let me = json!({"identifier": id(i).replace("n0", "n"), "ip": ip(i)});
        assert_eq!(call(url, Method::POST, "/register", Some(me)).await.0, 202);
    }
    let (code, out, err) = support::cli(
        dir.path(),
        &format!("policy diff --policy candidate.json --server {url}"),
    );
    assert_eq!(code, 1, "a node fails to render: {out}{err}");
    assert!(
        out.contains("3 node(s): 2 would change, 0 stay the same, 1 fail to render"),
        "{out}"
    );
    assert!(
        out.contains("n1:") && out.contains("--- a/app.conf") && out.contains("+n0 port=8080"),
        "{out}"
    );
    let (_, json_out, _) = support::cli(
        dir.path(),
        &format!("policy diff --policy candidate.json --node n2 --output json --server {url}"),
    );
    let body: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(body["diffs"][0]["identifier"], "n2", "{body}");
    assert!(
        body["diffs"][0]["diff"]
            .as_str()
            .unwrap()
            .contains("-n2 port=80"),
        "{body}"
    );
    let (code, _, err) = support::cli(
        dir.path(),
        &format!("policy diff --policy broken.json --server {url}"),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("broken.json") && err.contains("template error"),
        "{err}"
    );
    let (code, out, err) =
        support::cli(dir.path(), &format!("plan --spec spec.yaml --server {url}"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("the new policy would change 2 of 3 node(s), 1 would fail to render"),
        "{out}"
    );
    // Nothing was installed.
    let fetched = call(
        url,
        Method::POST,
        "/node",
        Some(json!({"identifier": "n0", "ip": ip(0)})),
    )
    .await
    .1;
    assert_eq!(fetched["files"][0]["content"], "n0 port=80", "{fetched}");
}
