//! `POST /report` against what a stranger or a node gone rogue may send: an unknown node,
//! another node's identifier, epochs no server served, an oversized stderr tail, and a flood.
//! Each is refused with a clear 4xx, and nothing is stored.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{self, Proc};

const POLICY: &str =
    r#"{"expect_nodes": 2, "files": [{"path": "a", "template": "{{ node.ip }}"}]}"#;

fn report(id: &str, epoch: u64, result: &str) -> Value {
    json!({"identifier": id, "epoch": epoch, "result": result})
}

/// Registers `a` and `b` and fetches `a`'s payload: its epoch.
async fn two_nodes(url: &str, token: Option<&str>) -> (u64, [Option<String>; 2]) {
    let mut secrets = [None, None];
    for (i, id) in ["a", "b"].into_iter().enumerate() {
        let me = json!({"identifier": id, "ip": "10.0.0.1"});
        let (status, body) =
            support::call(Method::POST, &format!("{url}/register"), token, Some(me)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        secrets[i] = body["node_secret"].as_str().map(str::to_string);
    }
    let http = bootsync::tls::plain_client();
    let mut fetch = http
        .post(format!("{url}/node?wait=10"))
        .json(&json!({"identifier": "a", "ip": "10.0.0.1"}));
    if let Some(token) = token {
        fetch = fetch.bearer_auth(token);
    }
    if let Some(secret) = &secrets[0] {
        fetch = fetch.header("x-bootsync-node-secret", secret);
    }
    let payload: Value = fetch.send().await.unwrap().json().await.unwrap();
    (payload["epoch"].as_u64().unwrap(), secrets)
}

async fn post(
    url: &str,
    body: Value,
    token: Option<&str>,
    secret: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = bootsync::tls::plain_client()
        .post(format!("{url}/report"))
        .json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(secret) = secret {
        request = request.header("x-bootsync-node-secret", secret);
    }
    let answer = request.send().await.unwrap();
    let status = answer.status();
    (status, answer.json().await.unwrap_or(Value::Null))
}

/// How many report records the store holds.
async fn stored_reports(url: &str) -> usize {
    let at = format!("{url}/v1/config/__cfgsync__/report");
    let (_, body) = support::call(Method::GET, &at, None, None).await;
    body["entries"]
        .as_object()
        .map_or(0, |entries| entries.len())
}

#[it::test(multi_thread)]
async fn reports_that_do_not_fit_are_refused_and_change_nothing() {
    let dir = support::dir_with(&[("policy.json", POLICY)]);
    let server = Proc::start(dir.path(), "serve --store memory: --policy policy.json");
    let url = &server.url;
    let (epoch, _) = two_nodes(url, None).await;
    let code_of = |body: &Value| body["code"].as_str().map(str::to_string);
    let mut too_big = report("a", epoch, "failed");
    too_big["stderr_tail"] = json!("x".repeat(4096));
    let mut future_version = report("a", epoch, "ok");
    future_version["version"] = json!(epoch + 1);
    for (body, status, code) in [
        (report("stranger", epoch, "ok"), 404, "missing_config"),
        (report("a", epoch + 1_000_000, "ok"), 422, "invalid"),
        (future_version, 422, "invalid"),
        (too_big, 413, "too_large"),
        (
            json!({"identifier": "a", "epoch": "soon", "result": "ok"}),
            422,
            "invalid",
        ),
        (
            json!({"identifier": "a", "epoch": epoch, "result": "maybe"}),
            422,
            "invalid",
        ),
    ] {
        let (got, answer) = post(url, body.clone(), None, None).await;
        assert_eq!(
            (got.as_u16(), code_of(&answer).as_deref()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }
    assert_eq!(stored_reports(url).await, 0, "nothing was stored");
    // A flood from one node: each report differs, so each would be a write.
    let mut stored = 0u64;
    let started = std::time::Instant::now();
    let mut refused = 0;
    for i in 0..150 {
        let result = if i % 2 == 0 { "ok" } else { "failed" };
        match post(url, report("a", epoch, result), None, None).await {
            (StatusCode::ACCEPTED, body) if body["stored"] == true => stored += 1,
            // The same as the stored report: nothing to write, nothing charged.
            (StatusCode::ACCEPTED, _) => {}
            (StatusCode::TOO_MANY_REQUESTS, body) => {
                assert!(
                    body["details"]["retry_after_secs"].as_u64() > Some(0),
                    "{body}"
                );
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    eprintln!("flood of 150 reports from one node: {stored} taken, {refused} refused with 429");
    // A burst of 60, then one a second.
    let allowed = 60 + started.elapsed().as_secs() + 1;
    assert!(
        stored <= allowed && refused > 0,
        "{stored} taken (at most {allowed}), {refused} refused"
    );
    assert_eq!(stored_reports(url).await, 1, "one record per node");
}

#[it::test(multi_thread)]
async fn in_strict_mode_a_node_cannot_report_for_another() {
    let dir = support::dir_with(&[("policy.json", POLICY), ("join.token", "join-secret\n")]);
    let server = Proc::start(
        dir.path(),
        "serve --store memory: --policy policy.json --join-token-file join.token --strict-nodes",
    );
    let url = &server.url;
    let token = Some("join-secret");
    let (epoch, [secret_a, secret_b]) = two_nodes(url, token).await;
    let as_a = report("a", epoch, "failed");
    let (status, _) = post(url, as_a.clone(), None, secret_a.as_deref()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no join token");
    let (status, _) = post(url, as_a.clone(), token, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no node secret");
    let (status, body) = post(url, as_a.clone(), token, secret_b.as_deref()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "b's secret for a: {body}");
    let (status, _) = post(url, report("a", epoch, "ok"), token, secret_a.as_deref()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "a's own report");
}
