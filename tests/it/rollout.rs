//! Changes to a running fleet, against the real binary: 20 watching nodes take a policy change
//! in waves `[1, "25%", "100%"]`, report what they applied, and a bad change stops after the
//! first wave and is rolled back.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{self, Proc};

const NODES: usize = 20;

/// Every node writes one file naming the content `marker`; waves as the issue names them.
fn policy(marker: &str, on_failure: &str) -> Value {
    json!({
        "expect_nodes": NODES,
        "files": [{"path": "app.conf", "template": format!("node={{{{ node.identifier }}}} {marker}")}],
        "rollout": {"waves": [1, "25%", "100%"], "on_failure": on_failure, "progress_deadline": "2m"},
    })
}

/// The hook fails (exit 3, "bad config" on stderr) on content marked `bad`.
const HOOK: &str = "echo $BOOTSYNC_EPOCH >> $BOOTSYNC_IDENTIFIER.hook; if grep -q bad $BOOTSYNC_IDENTIFIER/app.conf; then echo 'bad config' >&2; exit 3; fi";

fn fleet(dir: &Path, url: &str) -> Vec<Proc> {
    (0..NODES)
        .map(|i| {
            let id = format!("n{i:02}");
            let ip = format!("10.0.0.{}", i + 1);
            support::watcher(dir, url, &id, &ip, HOOK, &["--min-hook-interval", "0s"])
        })
        .collect()
}

async fn get(url: &str, path: &str) -> (u16, Value) {
    let answer = bootsync::tls::plain_client()
        .get(format!("{url}{path}"))
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

async fn send(
    url: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut request = bootsync::tls::plain_client().request(method, format!("{url}{path}"));
    if let Some(body) = body {
        request = request.json(body);
    }
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

/// Waits until every node reported ok on `version` (or any version, with `None`).
async fn all_applied(url: &str, version: Option<u64>, what: &str) -> Vec<Value> {
    support::wait_for(Duration::from_secs(60), what, || async move {
        let (_, body) = get(url, "/v1/nodes").await;
        let nodes = body["nodes"].as_array()?.clone();
        let done = nodes.len() == NODES
            && nodes.iter().all(|n| {
                n["applied"]["result"] == "ok"
                    && version.is_none_or(|v| n["applied"]["version"] == v)
            });
        done.then_some(nodes)
    })
    .await
}

async fn rollout_state(url: &str, state: &'static str) -> Value {
    support::wait_for(Duration::from_secs(60), state, || async move {
        let (_, body) = get(url, "/v1/rollout").await;
        (body["state"] == state).then_some(body)
    })
    .await
}

fn content(dir: &Path, id: &str) -> String {
    std::fs::read_to_string(dir.join(id).join("app.conf")).unwrap_or_default()
}

#[it::test(multi_thread)]
async fn a_good_change_rolls_out_wave_by_wave_in_slot_order() {
    let (dir, server) = support::serve_policy(&policy("v1", "halt"), "");
    let _fleet = fleet(dir.path(), &server.url);
    all_applied(&server.url, None, "every node applied v1").await;
    let (status, installed) = send(
        &server.url,
        reqwest::Method::PUT,
        "/v1/cfgsync/policy",
        Some(&policy("v2", "halt")),
    )
    .await;
    assert_eq!(status, 200, "{installed}");
    assert_eq!(installed["rollout"], true, "{installed}");
    let version = installed["version"].as_u64().unwrap();
    let nodes = all_applied(&server.url, Some(version), "every node applied v2").await;
    let at = |id: &str| -> u64 {
        let node = nodes.iter().find(|n| n["identifier"] == id).unwrap();
        node["applied"]["reported_ms"].as_u64().unwrap()
    };
    let wave = |range: std::ops::Range<usize>| -> Vec<u64> {
        range.map(|i| at(&format!("n{i:02}"))).collect()
    };
    let (first, second, third) = (wave(0..1), wave(1..5), wave(5..NODES));
    assert!(
        first.iter().max() <= second.iter().min() && second.iter().max() <= third.iter().min(),
        "reports out of wave order: {first:?} {second:?} {third:?}"
    );
    let done = rollout_state(&server.url, "complete").await;
    assert_eq!(done["target"], version);
    // Another install now goes through at once (nothing runs).
    let (status, _) = send(
        &server.url,
        reqwest::Method::PUT,
        "/v1/cfgsync/policy",
        Some(&policy("v3", "halt")),
    )
    .await;
    assert_eq!(status, 200);
}

#[it::test(multi_thread)]
async fn a_bad_change_halts_after_the_first_wave_and_a_rollback_restores_it() {
    let (dir, server) = support::serve_policy(&policy("v1", "halt"), "");
    let _fleet = fleet(dir.path(), &server.url);
    all_applied(&server.url, None, "every node applied v1").await;
    let (status, installed) = send(
        &server.url,
        reqwest::Method::PUT,
        "/v1/cfgsync/policy",
        Some(&policy("bad", "halt")),
    )
    .await;
    assert_eq!(status, 200, "{installed}");
    let halted = rollout_state(&server.url, "halted").await;
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
        let id = format!("n{i:02}");
        assert!(
            !content(dir.path(), &id).contains("bad"),
            "{id} saw the bad files"
        );
    }
    assert!(content(dir.path(), "n00").contains("bad"));
    // Another install is refused while it is halted, unless forced.
    let (status, refused) = send(
        &server.url,
        reqwest::Method::PUT,
        "/v1/cfgsync/policy",
        Some(&policy("v4", "halt")),
    )
    .await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (409, Some("rollout_in_progress")),
        "{refused}"
    );
    let hooks_before = support::hook_runs(dir.path(), "n00").len();
    let (status, rolled) = send(
        &server.url,
        reqwest::Method::POST,
        "/v1/rollout/rollback",
        None,
    )
    .await;
    assert_eq!(status, 200, "{rolled}");
    let d = dir.path().to_path_buf();
    support::wait_for(Duration::from_secs(30), "n00's files restored", || {
        let d = d.clone();
        async move { content(&d, "n00").contains("v1").then_some(()) }
    })
    .await;
    support::wait_for(Duration::from_secs(30), "n00's hook ran again", || {
        let d = d.clone();
        async move { (support::hook_runs(&d, "n00").len() > hooks_before).then_some(()) }
    })
    .await;
    let (status, none) = send(
        &server.url,
        reqwest::Method::POST,
        "/v1/rollout/pause",
        None,
    )
    .await;
    assert_eq!(
        (status, none["code"].as_str()),
        (409, Some("no_rollout")),
        "{none}"
    );
}

#[it::test(multi_thread)]
async fn an_invalid_rollout_section_is_refused_naming_the_field() {
    let (_dir, server) = support::serve_policy(&policy("v1", "halt"), "");
    let mut bad = policy("v2", "halt");
    bad["rollout"]["waves"] = json!([5, 2, "50%"]);
    let (status, body) = send(
        &server.url,
        reqwest::Method::PUT,
        "/v1/cfgsync/policy",
        Some(&bad),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("rollout.waves[1]") && message.contains("rollout.waves[2]"),
        "{message}"
    );
    let (status, _) = get(&server.url, "/v1/rollout").await;
    assert_eq!(status, 409, "nothing was installed, so no rollout is known");
}
