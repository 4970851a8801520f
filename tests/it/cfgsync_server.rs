//! cfgsync as seed-protocol nodes meet it: plain JSON over HTTP, in both serving models, plus
//! crash durability, tokens, strict mode and bad input. The contract runs against the
//! in-process server; crashes and what the process logs, against the real binary.

use crate::support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{Proc, Setup, TestServer};
use serde_json::{Value, json};

const POLICY_3: &str = r#"
expect_nodes: 3
freeze_on_ready: true
files:
  - path: /config.yaml
    template: |
      id: {{ node.identifier }}
      index: {{ index }}
      peers: [{% for p in peers %}"{{ p.ip }}"{% if not loop.last %}, {% endif %}{% endfor %}]
shared_files:
  - path: deployment-settings.yaml
    template: "nodes: {{ nodes | length }}"
"#;

const BUNDLE: &str = r#"
nodes:
  - identifier: node-1
    files:
      - path: /config.yaml
        content: "id: 1"
shared_files:
  - path: deployment-settings.yaml
    content: "shared: true"
"#;

fn reg(id: &str, ip: &str) -> Value {
    json!({"identifier": id, "ip": ip, "metadata": {"port": 3000}})
}

/// Posts node `id`'s registration body to `route` (`/register` or `/node`).
async fn send(u: &str, route: &str, id: &str, ip: &str) -> (reqwest::StatusCode, Value) {
    support::post(u, route, &reg(id, ip)).await
}

#[it::test]
async fn a_seed_node_gets_202_425_404_and_200_in_the_registration_model() {
    let server = TestServer::with(Setup::policy(POLICY_3)).await;
    let u = server.url();
    let (status, body) = send(u, "/node", "node-a", "10.0.0.1").await;
    assert_eq!(status, 425, "not registered: {body}");
    assert_eq!(body["code"], "not_ready");
    let (status, _) = send(u, "/register", "node-a", "10.0.0.1").await;
    assert_eq!(status, 202);
    let (status, body) = send(u, "/node", "node-a", "10.0.0.1").await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (425, Some("not_ready")),
        "registered, not ready"
    );
    send(u, "/register", "node-b", "10.0.0.2").await;
    let (status, _) = support::post(
        u,
        "/register",
        &json!({"identifier": "node-c", "ip": "fd00::3"}),
    )
    .await;
    assert_eq!(status, 202, "IPv6 is accepted");
    let payload = support::wait_for(
        Duration::from_secs(20),
        "node-a's payload once 3 registered",
        || async {
            let (status, body) = send(u, "/node", "node-a", "10.0.0.1").await;
            (status == 200).then_some(body)
        },
    )
    .await;
    assert_eq!(payload["schema_version"], 1);
    let files = payload["files"].as_array().unwrap();
    assert_eq!(files[0]["path"], "/config.yaml");
    let config = files[0]["content"].as_str().unwrap();
    assert!(
        config.contains("id: node-a") && config.contains("index: 0"),
        "{config}"
    );
    assert!(
        config.contains(r#"peers: ["10.0.0.2", "fd00::3"]"#),
        "{config}"
    );
    assert_eq!(
        files[1],
        json!({"path": "deployment-settings.yaml", "content": "nodes: 3"})
    );
    assert!(
        payload["epoch"].as_u64().is_some(),
        "the additive epoch is present"
    );
    let (status, body) = send(u, "/register", "node-late", "10.0.0.9").await;
    assert_eq!(status, 409, "membership is frozen once ready: {body}");
    assert_eq!(body["code"], "frozen");
}

#[it::test]
async fn a_seed_node_gets_its_bundle_without_registering_and_unknown_nodes_get_404() {
    let server = TestServer::with(Setup::bundle(BUNDLE)).await;
    let u = server.url();
    let (status, body) = send(u, "/node", "node-1", "10.0.0.1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["files"],
        json!([{"path": "/config.yaml", "content": "id: 1"}, {"path": "deployment-settings.yaml", "content": "shared: true"}])
    );
    let (status, _) = send(u, "/register", "node-1", "10.0.0.1").await;
    assert_eq!(status, 202);
    let (status, body) = send(u, "/register", "stranger", "10.0.0.2").await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (404, Some("missing_config"))
    );
    let (status, body) = send(u, "/node", "stranger", "10.0.0.2").await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (404, Some("missing_config"))
    );
}

#[it::test]
async fn fifty_nodes_started_together_each_get_all_fifty_peers() {
    let server = TestServer::with(Setup::policy(&support::peers_policy(50))).await;
    let mut nodes = Vec::new();
    for i in 0..50 {
        let url = server.url().to_string();
        nodes.push(tokio::spawn(async move {
            let me = reg(&format!("node-{i:02}"), &format!("10.1.0.{}", i + 1));
            let (status, _) = support::post(&url, "/register", &me).await;
            assert_eq!(status, 202);
            // Long-poll as a bootsync client does; an old client would poll instead.
            let (status, body) = support::post(&url, "/node?wait=30", &me).await;
            assert_eq!(status, 200, "{body}");
            body
        }));
    }
    for node in nodes {
        let body = node.await.unwrap();
        let listed: BTreeSet<&str> = body["files"][0]["content"]
            .as_str()
            .unwrap()
            .lines()
            .collect();
        assert_eq!(listed.len(), 50, "every node lists all 50 peers");
    }
}

#[it::test]
async fn kill_9_during_a_registration_storm_loses_no_acknowledged_registration() {
    let dir = support::dir_with(&[(
        "policy.yaml",
        "expect_nodes: 100000\nfiles:\n  - path: a\n    template: x\n",
    )]);
    let db = format!("sqlite:{}/x.db", dir.path().display());
    let mut server = Proc::start(
        dir.path(),
        &format!("serve --store {db} --policy policy.yaml"),
    );
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (url, acked) = (server.url.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let http = bootsync::tls::plain_client();
            for i in 0..5000 {
                let id = format!("n{w}-{i}");
                let sent = http
                    .post(format!("{url}/register"))
                    .json(&reg(&id, "10.0.0.1"))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 202 => acked.lock().unwrap().push(id),
                    _ => return,
                }
            }
        }));
    }
    support::kill9_when(&mut server, "300 acknowledged registrations", || {
        acked.lock().unwrap().len() >= 300
    })
    .await;
    for task in tasks {
        task.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let server = Proc::start(dir.path(), &format!("serve --store {db}"));
    let stored: Value = support::get(format!("{}/v1/config/__cfgsync__/registration", server.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for id in &acked {
        assert!(
            stored["entries"].get(id).is_some(),
            "registration {id} was answered 202 but is gone"
        );
    }
}

#[it::test]
async fn the_join_token_guards_both_routes_and_strict_mode_keeps_nodes_apart() {
    let dir = support::dir_with(&[
        ("join.token", "join-secret"),
        (
            "policy.yaml",
            &POLICY_3.replace("expect_nodes: 3", "expect_nodes: 2"),
        ),
    ]);
    let server = Proc::start(
        dir.path(),
        "serve --store memory: --policy policy.yaml --join-token-file join.token --strict-nodes",
    );
    let http = bootsync::tls::plain_client();
    let (status, _) = support::post(&server.url, "/register", &reg("a", "10.0.0.1")).await;
    assert_eq!(status, 401, "no join token");
    let register = |id: &'static str| {
        let http = http.clone();
        let url = server.url.clone();
        async move {
            let response = http
                .post(format!("{url}/register"))
                .bearer_auth("join-secret")
                .json(&reg(id, "10.0.0.1"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
            let body: Value = response.json().await.unwrap();
            body["node_secret"]
                .as_str()
                .expect("strict mode returns a secret")
                .to_string()
        }
    };
    let secret_a = register("a").await;
    let secret_b = register("b").await;
    let fetch = |id: &'static str, secret: Option<String>| {
        let http = http.clone();
        let url = server.url.clone();
        async move {
            let mut request = http
                .post(format!("{url}/node?wait=10"))
                .bearer_auth("join-secret")
                .json(&reg(id, "10.0.0.1"));
            if let Some(secret) = secret {
                request = request.header("x-bootsync-node-secret", secret);
            }
            request.send().await.unwrap().status()
        }
    };
    assert_eq!(fetch("a", Some(secret_a.clone())).await, 200);
    assert_eq!(
        fetch("b", Some(secret_a.clone())).await,
        403,
        "node a's secret cannot fetch b's files"
    );
    assert_eq!(fetch("b", None).await, 401);
    assert_eq!(fetch("b", Some(secret_b)).await, 200);
    let stored = std::fs::read_to_string(dir.path().join("join.token")).unwrap();
    assert!(
        !server.stderr().contains(&stored),
        "the join token was logged"
    );
    assert!(
        !server.stderr().contains(&secret_a),
        "a node secret was logged"
    );
}

#[it::test]
async fn bad_node_requests_get_clear_errors_and_change_nothing() {
    let mut setup = Setup::policy(POLICY_3);
    setup.options.body_limit = 200_000;
    let server = TestServer::with(setup).await;
    let revision = || async {
        let body: Value = support::get(format!("{}/v1/config", server.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["revision"].as_u64().unwrap()
    };
    let before = revision().await;
    let http = bootsync::tls::plain_client();
    // Deep nesting where it can hide: inside the opaque metadata.
    let deep = format!(
        "{{\"identifier\": \"n\", \"ip\": \"10.0.0.1\", \"metadata\": {}{}}}",
        "[".repeat(3000),
        "]".repeat(3000)
    );
    let huge_meta = json!({"identifier": "n", "ip": "10.0.0.1", "metadata": "m".repeat(70_000)});
    let cases: Vec<(&str, &str, Option<&str>, String, u16)> = vec![
        (
            "malformed JSON",
            "/register",
            Some("application/json"),
            "{nope".into(),
            400,
        ),
        (
            "deeply nested JSON",
            "/register",
            Some("application/json"),
            deep,
            400,
        ),
        (
            "wrong content type",
            "/register",
            Some("text/plain"),
            reg("n", "10.0.0.1").to_string(),
            415,
        ),
        (
            "missing content type",
            "/node",
            None,
            reg("n", "10.0.0.1").to_string(),
            415,
        ),
        (
            "body over the limit",
            "/register",
            Some("application/json"),
            format!("\"{}\"", "x".repeat(300_000)),
            413,
        ),
        (
            "empty identifier",
            "/register",
            Some("application/json"),
            reg("", "10.0.0.1").to_string(),
            422,
        ),
        (
            "identifier too long",
            "/register",
            Some("application/json"),
            reg(&"x".repeat(300), "10.0.0.1").to_string(),
            422,
        ),
        (
            "identifier with a control character",
            "/register",
            Some("application/json"),
            reg("a\u{1}b", "10.0.0.1").to_string(),
            422,
        ),
        (
            "identifier with a path separator",
            "/node",
            Some("application/json"),
            reg("../etc", "10.0.0.1").to_string(),
            422,
        ),
        (
            "invalid IP",
            "/register",
            Some("application/json"),
            reg("n", "10.0.0.999").to_string(),
            422,
        ),
        (
            "missing IP",
            "/register",
            Some("application/json"),
            json!({"identifier": "n"}).to_string(),
            422,
        ),
        (
            "oversized metadata",
            "/register",
            Some("application/json"),
            huge_meta.to_string(),
            413,
        ),
        (
            "bad wait",
            "/node?wait=soon",
            Some("application/json"),
            reg("n", "10.0.0.1").to_string(),
            400,
        ),
    ];
    for (what, path, content_type, body, want) in cases {
        let mut request = http.post(format!("{}{path}", server.url())).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        assert_eq!(status, want, "{what}: {body}");
        assert!(
            body["code"].is_string() && body["message"].is_string(),
            "{what}: {body}"
        );
    }
    for (method, path) in [("GET", "/register"), ("PUT", "/node"), ("POST", "/nodes")] {
        let response = http
            .request(method.parse().unwrap(), format!("{}{path}", server.url()))
            .send()
            .await
            .unwrap();
        assert!(
            matches!(response.status().as_u16(), 404 | 405),
            "{method} {path}"
        );
        assert!(response.json::<Value>().await.unwrap()["code"].is_string());
    }
    assert_eq!(revision().await, before, "bad input changed the store");
    let (status, _) = support::post(server.url(), "/register", &reg("fine", "10.0.0.1")).await;
    assert_eq!(status, 202, "the server still serves");
}

#[it::test]
fn a_bad_policy_or_bundle_exits_2_listing_every_problem() {
    let dir = support::dir_with(&[
        (
            "policy.yaml",
            "expect_nodes: 0\nfiles:\n  - path: ../x\n    template: \"{% if %}\"\n",
        ),
        (
            "bundle.yaml",
            "nodes:\n  - identifier: a\n    files:\n      - {path: x, content: ''}\n      - {path: x, content: ''}\n",
        ),
    ]);
    let (code, _, stderr) = support::cli(
        dir.path(),
        "serve --store memory: --policy policy.yaml --bundle bundle.yaml",
    );
    assert_eq!(code, 2, "{stderr}");
    for expected in ["at least 1", "'..'", "template error", "duplicate path"] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[it::test]
async fn two_servers_on_one_store_share_registrations_and_payloads() {
    use bootsync::server::{self, AppState, ServerOptions};
    use std::sync::Arc;
    let store: bootsync::store::DynStore = Arc::new(bootsync::store::memory::MemoryStore::new(
        bootsync::store::Limits::default(),
    ));
    let policy: bootsync::cfgsync::Policy = serde_saphyr::from_str(POLICY_3).unwrap();
    bootsync::cfgsync::install::install_policy(store.as_ref(), &policy, false)
        .await
        .unwrap();
    let mut urls = Vec::new();
    for _ in 0..2 {
        let state = AppState::new(
            store.clone(),
            ServerOptions::default(),
            Arc::new(bootsync::metrics::Metrics::new()),
        )
        .await
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        urls.push(format!("http://{}", listener.local_addr().unwrap()));
        tokio::spawn(server::serve(
            listener,
            server::router(state, []),
            Default::default(),
        ));
    }
    for (i, id) in ["n1", "n2", "n3"].iter().enumerate() {
        let (status, _) = support::post(
            &urls[i % 2],
            "/register",
            &reg(id, &format!("10.0.0.{}", i + 1)),
        )
        .await;
        assert_eq!(status, 202);
    }
    let mut payloads = Vec::new();
    for url in &urls {
        let (status, body) = support::post(url, "/node?wait=10", &reg("n1", "10.0.0.1")).await;
        assert_eq!(status, 200, "{body}");
        payloads.push(body);
    }
    assert_eq!(
        payloads[0], payloads[1],
        "both servers serve the same payload for the same node"
    );
}

/// A user's own materializer, one node at a time, as the seed's adapters are written.
struct NeedsTwo;

impl bootsync::cfgsync::NodeArtifactsMaterializer for NeedsTwo {
    fn materialize_node(
        &self,
        node: &bootsync::cfgsync::NodeRegistration,
        all: &bootsync::cfgsync::RegistrationSnapshot,
    ) -> Result<Option<bootsync::cfgsync::NodeArtifacts>, bootsync::cfgsync::DynCfgsyncError> {
        if all.len() < 2 {
            return Ok(None);
        }
        let port = node.metadata["port"]
            .as_u64()
            .ok_or("metadata.port is missing")?;
        Ok(Some(bootsync::cfgsync::NodeArtifacts {
            identifier: node.identifier.clone(),
            files: vec![bootsync::cfgsync::ArtifactFile::new(
                "/config.yaml",
                format!("port: {port}"),
            )],
        }))
    }
}

#[it::test]
async fn a_library_materializer_serves_through_build_cfgsync_router() {
    use std::sync::Arc;
    let store: bootsync::store::DynStore = Arc::new(bootsync::store::memory::MemoryStore::new(
        bootsync::store::Limits::default(),
    ));
    let materializer =
        bootsync::cfgsync::CachedSnapshotMaterializer::new(bootsync::cfgsync::PerNode(NeedsTwo));
    let router = bootsync::server::build_cfgsync_router(
        store,
        Default::default(),
        None,
        Some(Arc::new(materializer)),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .unwrap()
    });
    let (a, b) = (reg("a", "10.0.0.1"), reg("b", "10.0.0.2"));
    assert_eq!(support::post(&url, "/register", &a).await.0, 202);
    let (status, body) = support::post(&url, "/node", &a).await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (425, Some("not_ready"))
    );
    assert_eq!(support::post(&url, "/register", &b).await.0, 202);
    let (status, body) = support::post(&url, "/node?wait=10", &reg("b", "10.0.0.2")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["files"][0],
        json!({"path": "/config.yaml", "content": "port: 3000"})
    );
}

/// A node's change rate counts changes that were stored: a change refused for another reason
/// (here the metadata budget) gives its turn back, so the node is not then paced for changes
/// it never made.
#[it::test]
async fn a_refused_change_does_not_use_up_the_node_s_change_rate() {
    let mut options = bootsync::server::ServerOptions::default();
    options.cfgsync.admission.metadata_budget = 10_000;
    options.cfgsync.node_changes_per_minute = 3;
    let server = TestServer::with_options(options).await;
    let register = |metadata: Value| {
        let server = &server;
        async move {
            let node = json!({"identifier": "n", "ip": "10.0.0.1", "metadata": metadata});
            let (status, body) = server
                .call(reqwest::Method::POST, "/register", Some(node))
                .await;
            (
                status.as_u16(),
                body["code"].as_str().unwrap_or("").to_string(),
            )
        }
    };
    assert_eq!(register(json!({"v": 0})).await.0, 202);
    for _ in 0..3 {
        let too_big = json!({"blob": "x".repeat(20_000)});
        assert_eq!(register(too_big).await, (409, "metadata_budget".into()));
    }
    // The three refusals cost nothing: the burst of three changes is whole.
    for v in 1..=3 {
        assert_eq!(register(json!({"v": v})).await.0, 202, "change {v}");
    }
    assert_eq!(
        register(json!({"v": 4})).await,
        (429, "too_many_requests".into())
    );
    // The refusal says when to come back, in its details and in `Retry-After` (3 a minute:
    // one every 20 s).
    let node = json!({"identifier": "n", "ip": "10.0.0.1", "metadata": {"v": 5}});
    let refused = reqwest::Client::new()
        .post(format!("{}/register", server.url()))
        .json(&node)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    let header = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = refused.json().await.unwrap();
    let secs = body["details"]["retry_after_secs"].as_u64().unwrap();
    assert!((1..=20).contains(&secs), "{body}");
    assert_eq!(header, secs.to_string());
}
