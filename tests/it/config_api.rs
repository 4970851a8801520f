//! The foundation as a user meets it: the real `bootsync serve` on SQLite, the `/v1` API, the
//! change stream, crash durability, bad input and tokens.

use crate::support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{Proc, Setup, TestServer};
use bootsync::store::Key;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn revision(url: &str) -> u64 {
    let (_, body) = support::call(Method::GET, &format!("{url}/v1/config"), None, None).await;
    body["revision"].as_u64().unwrap()
}

#[it::test]
async fn put_then_get_returns_the_value_with_its_revision() {
    let server = TestServer::start().await;
    let path = "/v1/config/prod/flows/main";
    let (_, put) = server
        .call(Method::PUT, path, Some(json!({"enabled": true})))
        .await;
    let written = put["revision"]
        .as_u64()
        .expect("a write answers its revision");
    let got = support::get(format!("{}{path}", server.url()))
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["etag"], format!("\"{written}\"").as_str());
    let body: Value = got.json().await.unwrap();
    assert_eq!(body["value"], json!({"enabled": true}));
    assert_eq!(body["mod_revision"], written);
    assert_eq!(body["create_revision"], written);
    let (_, tree) = server.call(Method::GET, "/v1/config/prod", None).await;
    assert_eq!(tree["types"]["flows"]["main"]["value"]["enabled"], true);
    // The crate's own client reads the same entry back, typed.
    let entry = server
        .api()
        .get(&Key::new("prod", "flows", "main"))
        .await
        .unwrap()
        .expect("present");
    assert_eq!(entry.entry.mod_revision, written);
}

#[it::test]
async fn a_batch_with_a_failed_precondition_is_409_naming_the_key_and_stores_nothing() {
    let server = TestServer::start().await;
    server
        .call(Method::PUT, "/v1/config/prod/cfg/taken", Some(json!(1)))
        .await;
    let before = revision(server.url()).await;
    let batch = json!({
        "checks": [{"namespace": "prod", "type": "cfg", "key": "taken", "expect": "absent"}],
        "ops": [
            {"op": "put", "namespace": "prod", "type": "cfg", "key": "new", "value": 2},
            {"op": "put", "namespace": "other", "type": "cfg", "key": "x", "value": 3}
        ]
    });
    let (status, body) = server.call(Method::POST, "/v1/config", Some(batch)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "conflict");
    assert!(
        body["message"].as_str().unwrap().contains("prod/cfg/taken"),
        "{body}"
    );
    // The key is a typed detail too, not only words in the message.
    assert_eq!(
        body["details"]["key"],
        json!({"namespace": "prod", "type": "cfg", "key": "taken"})
    );
    assert_eq!(
        revision(server.url()).await,
        before,
        "nothing was committed"
    );
    let (missing, _) = server
        .call(Method::GET, "/v1/config/prod/cfg/new", None)
        .await;
    assert_eq!(missing, 404);
}

#[it::test]
async fn reserved_namespaces_never_appear_on_the_public_change_stream() {
    let server = TestServer::start().await;
    let from = revision(server.url()).await;
    server
        .call(
            Method::PUT,
            "/v1/config/__system__/init-state/x",
            Some(json!("v1")),
        )
        .await;
    let (_, visible) = server
        .call(Method::PUT, "/v1/config/prod/flows/main", Some(json!(1)))
        .await;
    let changes_path = format!("/v1/changes?from={from}&timeout=5");
    let (_, changes) = server.call(Method::GET, &changes_path, None).await;
    let events = changes["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "only the public write: {changes}");
    assert_eq!(events[0]["revision"], visible["revision"]);
    assert_eq!(events[0]["changes"], json!({"flows": ["prod"]}));
    assert!(!changes.to_string().contains("__system__"));
    let internal_path = format!("/v1/changes?from={from}&internal=true");
    let (_, internal) = server.call(Method::GET, &internal_path, None).await;
    assert!(
        internal.to_string().contains("__system__"),
        "internal watchers see it: {internal}"
    );
}

#[it::test]
async fn a_long_poll_returns_as_soon_as_a_change_commits() {
    let server = TestServer::start().await;
    let from = revision(server.url()).await;
    let url = format!("{}/v1/changes?from={from}&timeout=60", server.url());
    let poll = tokio::spawn(async move { support::call(Method::GET, &url, None, None).await });
    server
        .call(Method::PUT, "/v1/config/prod/cfg/a", Some(json!(1)))
        .await;
    let (_, body) = tokio::time::timeout(Duration::from_secs(30), poll)
        .await
        .expect("the long-poll was not woken by the write")
        .unwrap();
    assert_eq!(body["events"].as_array().unwrap().len(), 1);
}

#[it::test]
async fn kill_9_then_restart_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}/x.db", dir.path().display());
    let mut server = Proc::start(dir.path(), &format!("serve --store {db}"));
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let http = bootsync::tls::plain_client();
    let mut writers = Vec::new();
    for w in 0..8 {
        let (http, url, acked) = (http.clone(), server.url.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..10_000 {
                let key = format!("w{w}-{i}");
                let sent = http
                    .put(format!("{url}/v1/config/prod/load/{key}"))
                    .json(&i)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => {
                        let body: Value = r.json().await.unwrap();
                        acked
                            .lock()
                            .unwrap()
                            .insert(key, body["revision"].as_u64().unwrap());
                    }
                    _ => return, // the server died mid-request: not acknowledged
                }
            }
        }));
    }
    support::kill9_when(
        &mut server,
        "200 acknowledged writes before the crash",
        || acked.lock().unwrap().len() >= 200,
    )
    .await;
    for writer in writers {
        writer.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let server = Proc::start(dir.path(), &format!("serve --store {db}"));
    let stored = support::fetch_json(format!("{}/v1/config/prod/load", server.url))
        .await
        .unwrap();
    for (key, rev) in &acked {
        assert_eq!(
            stored["entries"][key]["mod_revision"].as_u64(),
            Some(*rev),
            "acknowledged write {key} at revision {rev} lost after kill -9"
        );
    }
}

struct Case {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    token: Option<&'static str>,
    status: u16,
}

fn case(
    what: &'static str,
    method: &'static str,
    path: &'static str,
    body: &str,
    status: u16,
) -> Case {
    Case {
        what,
        method,
        path,
        content_type: Some("application/json"),
        body: body.as_bytes().to_vec(),
        token: Some("admin-secret"),
        status,
    }
}

#[it::test]
async fn bad_input_gets_the_json_error_shape_and_changes_nothing() {
    let mut setup = Setup::default();
    setup.options.admin_token = bootsync::api::Token::new("admin-secret");
    setup.options.body_limit = 65536;
    setup.limits.max_value_bytes = 1024;
    let server = TestServer::with(setup).await;
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let big_value = format!("\"{}\"", "v".repeat(2000));
    let big_body = format!("\"{}\"", "b".repeat(100_000));
    let mut cases = vec![
        case(
            "malformed JSON",
            "PUT",
            "/v1/config/prod/cfg/a",
            "{not json",
            400,
        ),
        case(
            "deeply nested JSON",
            "PUT",
            "/v1/config/prod/cfg/a",
            &deep,
            400,
        ),
        case(
            "namespace with a space",
            "PUT",
            "/v1/config/pr%20od/cfg/a",
            "1",
            400,
        ),
        case(
            "type with a slash",
            "PUT",
            "/v1/config/prod/c%2Ff/a",
            "1",
            400,
        ),
        case(
            "key with a control character",
            "PUT",
            "/v1/config/prod/cfg/a%07b",
            "1",
            400,
        ),
        case(
            "namespace that is only dots",
            "PUT",
            "/v1/config/../cfg/a",
            "1",
            404,
        ),
        case(
            "value over the size limit",
            "PUT",
            "/v1/config/prod/cfg/a",
            &big_value,
            413,
        ),
        case(
            "body over the request limit",
            "PUT",
            "/v1/config/prod/cfg/a",
            &big_body,
            413,
        ),
        case(
            "batch that is not a batch",
            "POST",
            "/v1/config",
            "{\"ops\": 3}",
            422,
        ),
        case("empty batch", "POST", "/v1/config", "{\"ops\": []}", 400),
        case(
            "batch with an unknown op",
            "POST",
            "/v1/config",
            "{\"ops\": [{\"op\": \"zap\"}]}",
            422,
        ),
        case("unknown route", "GET", "/v1/nothing-here", "", 404),
        case("wrong method", "PATCH", "/v1/config/prod/cfg/a", "1", 405),
        case("bad If-Match", "PUT", "/v1/config/prod/cfg/a", "1", 400),
        case(
            "changes with a bad query",
            "GET",
            "/v1/changes?from=abc",
            "",
            400,
        ),
        case(
            "delete of an absent key",
            "DELETE",
            "/v1/config/prod/cfg/absent",
            "",
            404,
        ),
    ];
    cases.extend([
        case("type read with a bad name", "GET", "/v1/config/prod/c%00f", "", 400),
        case("namespace read with a bad name", "GET", "/v1/config/pr%20od", "", 400),
        case("entry read with a bad key", "GET", "/v1/config/prod/cfg/a%07", "", 400),
        case("changes with a bad timeout", "GET", "/v1/changes?timeout=soon", "", 400),
        case("changes with an unknown parameter", "GET", "/v1/changes?since=1", "", 400),
        case(
            "batch checking an invalid name",
            "POST",
            "/v1/config",
            "{\"checks\": [{\"namespace\": \"a b\", \"type\": \"t\", \"key\": \"k\", \"expect\": \"absent\"}], \"ops\": [{\"op\": \"put\", \"namespace\": \"prod\", \"type\": \"t\", \"key\": \"k\", \"value\": 1}]}",
            400,
        ),
        case(
            "batch writing an oversized value",
            "POST",
            "/v1/config",
            &format!("{{\"ops\": [{{\"op\": \"put\", \"namespace\": \"prod\", \"type\": \"t\", \"key\": \"k\", \"value\": {big_value}}}]}}"),
            413,
        ),
        case("batch that is JSON but not an object", "POST", "/v1/config", "[1, 2]", 422),
    ]);
    for (what, method, path) in [
        ("batch without the admin token", "POST", "/v1/config"),
        (
            "delete without the admin token",
            "DELETE",
            "/v1/config/prod/cfg/a",
        ),
        ("status without the admin token", "GET", "/v1/status"),
        ("status page without the admin token", "GET", "/"),
    ] {
        cases.push(Case {
            token: None,
            ..case(what, method, path, "{\"ops\": []}", 401)
        });
    }
    cases.push(Case {
        content_type: Some("text/plain"),
        ..case(
            "wrong content type",
            "PUT",
            "/v1/config/prod/cfg/a",
            "1",
            415,
        )
    });
    cases.push(Case {
        token: None,
        ..case(
            "write without the admin token",
            "PUT",
            "/v1/config/prod/cfg/a",
            "1",
            401,
        )
    });
    cases.push(Case {
        token: Some("wrong"),
        ..case(
            "write with a wrong token",
            "PUT",
            "/v1/config/prod/cfg/a",
            "1",
            401,
        )
    });
    cases.push(Case {
        token: None,
        ..case(
            "reserved read without the token",
            "GET",
            "/v1/config/__system__",
            "",
            401,
        )
    });
    cases.push(Case {
        token: None,
        ..case(
            "internal changes without the token",
            "GET",
            "/v1/changes?internal=true",
            "",
            401,
        )
    });
    let http = bootsync::tls::plain_client();
    let before = revision(server.url()).await;
    for c in &cases {
        let mut request = http
            .request(
                c.method.parse().unwrap(),
                format!("{}{}", server.url(), c.path),
            )
            .body(c.body.clone());
        if let Some(ct) = c.content_type {
            request = request.header("content-type", ct);
        }
        if let Some(token) = c.token {
            request = request.bearer_auth(token);
        }
        if c.what == "bad If-Match" {
            request = request.header("if-match", "\"not-a-number\"");
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.what));
        let status = response.status().as_u16();
        let body: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{}: error body is not JSON: {e}", c.what));
        assert_eq!(status, c.status, "{}: {body}", c.what);
        assert!(
            body["code"].is_string() && body["message"].is_string(),
            "{}: {body}",
            c.what
        );
        let health = http
            .get(format!("{}/healthz", server.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(
            health.status(),
            200,
            "server stopped serving after {}",
            c.what
        );
    }
    assert_eq!(
        revision(server.url()).await,
        before,
        "bad input changed the store"
    );
    let ok = http
        .put(format!("{}/v1/config/__system__/cfg/a", server.url()))
        .bearer_auth("admin-secret")
        .json(&1)
        .send()
        .await
        .unwrap();
    assert_eq!(
        ok.status(),
        200,
        "the admin token opens reserved namespaces"
    );
}

#[it::test]
async fn the_config_cli_puts_gets_lists_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Proc::start(dir.path(), "serve --store memory:");
    let s = server.url.as_str();
    let (code, out, err) = support::run_cli(
        &[
            "config",
            "put",
            "--server",
            s,
            "prod",
            "cfg",
            "a",
            "{\"x\":1}",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let written: Value = serde_json::from_str(&out).unwrap();
    let (code, out, _) = support::cli(dir.path(), &format!("config get --server {s} prod cfg a"));
    assert_eq!(code, 0);
    let got: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["value"], json!({"x": 1}));
    assert_eq!(got["mod_revision"], written["revision"]);
    let (code, _, err) = support::cli(
        dir.path(),
        &format!("config put --server {s} --if-absent prod cfg a 2"),
    );
    assert_eq!(code, 1, "a failed precondition is a runtime failure");
    assert!(err.contains("prod/cfg/a"), "{err}");
    let (code, _, err) = support::run_cli(
        &[
            "config", "put", "--server", s, "prod", "cfg", "b", "not json",
        ],
        dir.path(),
    );
    assert_eq!(code, 2, "bad input is a usage error: {err}");
    let (code, out, _) = support::cli(dir.path(), &format!("config list --server {s} prod cfg"));
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({"a": {"x": 1}})
    );
    let (code, _, _) = support::cli(
        dir.path(),
        &format!("config delete --server {s} prod cfg a"),
    );
    assert_eq!(code, 0);
    let (code, _, err) = support::cli(dir.path(), &format!("config get --server {s} prod cfg a"));
    assert_eq!(code, 1);
    assert!(err.contains("no value"), "{err}");
}
