//! Hostile input against the real server: each test reproduces an attack and asserts the
//! answer the server gives now (see the security table in `specs/security.md`).

use crate::support;

mod client;
mod memory;
mod network;
mod registrations;
mod reports;
mod steps;
mod templates;
mod watch;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn node(identifier: &str, metadata: Value) -> Value {
    json!({"identifier": identifier, "ip": "10.0.0.1", "metadata": metadata})
}

/// `method url` with a JSON body, through a fresh client.
async fn send(method: reqwest::Method, url: &str, body: &Value) -> reqwest::Response {
    let request = bootsync::tls::plain_client()
        .request(method, url)
        .json(body);
    request.send().await.unwrap()
}

async fn post(url: &str, body: &Value) -> reqwest::Response {
    send(reqwest::Method::POST, url, body).await
}

async fn put(url: &str, body: &Value) -> reqwest::Response {
    send(reqwest::Method::PUT, url, body).await
}

async fn get_json(url: String) -> Value {
    support::get(url).await.unwrap().json().await.unwrap()
}

async fn get_text(url: String) -> String {
    support::get(url).await.unwrap().text().await.unwrap()
}

#[it::test]
fn an_open_admin_api_on_the_network_is_refused() {
    let dir = support::dir_with(&[("join", "join-token-0123456789abcdef")]);
    let (code, _, stderr) = support::cli(
        dir.path(),
        "serve --store memory: --listen 0.0.0.0:0 --join-token-file join",
    );
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("--admin-token-file"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
}

/// Templates that run forever, write without end or read a peer's bad data fail their own
/// node's payload promptly; the others are served, memory stays bounded, SIGTERM works and a
/// restart listens at once.
#[it::test(multi_thread)]
async fn hostile_templates_fail_only_their_own_node() {
    let dir = tempfile::tempdir().unwrap();
    let template = r#"{% if node.identifier == "spin" %}{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}{% elif node.identifier == "flood" %}{% for a in range(100000) %}{% for b in range(100000) %}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}{% endfor %}{% elif node.identifier == "bad" %}{{ node.metadata.port + 1 }}{% elif node.identifier == "nosy" %}{{ debug() }}{% endif %}ok {{ node.identifier }}"#;
    let policy = json!({
        "expect_identifiers": ["bad", "flood", "good", "nosy", "spin"],
        "files": [{"path": "f.txt", "template": template}],
    });
    std::fs::write(dir.path().join("policy.json"), policy.to_string()).unwrap();
    let line = format!(
        "{} --render-fuel 2000000 --render-max-file-bytes 4000000",
        support::SERVE_POLICY
    );
    let mut server = support::Proc::start(dir.path(), &line);
    let url = server.url.clone();
    for id in ["bad", "flood", "good", "nosy", "spin"] {
        let metadata = if id == "bad" {
            json!({"port": "abc"})
        } else {
            json!({"port": 1})
        };
        let r = post(&format!("{url}/register"), &node(id, metadata)).await;
        assert_eq!(r.status(), 202, "{id}");
    }
    for (id, why) in [
        ("spin", "instructions"),
        ("flood", "limit of 4000000 bytes"),
        ("bad", "f.txt"),
        ("nosy", "f.txt"),
    ] {
        let started = Instant::now();
        let r = post(&format!("{url}/node?wait=10"), &node(id, json!({}))).await;
        assert_eq!(r.status(), 500, "{id}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{id} took {:?}",
            started.elapsed()
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "internal", "{id}: {body}");
        // The reason is in the server's log, never in the answer to the node.
        support::wait_for(Duration::from_secs(5), "the reason in the log", || {
            let log = server.stderr();
            async move { (log.contains(id) && log.contains(why)).then_some(()) }
        })
        .await;
        let good = post(&format!("{url}/node"), &node("good", json!({}))).await;
        assert_eq!(good.status(), 200, "good is served beside {id}");
        let body: Value = good.json().await.unwrap();
        assert_eq!(body["files"][0]["content"], "ok good");
    }
    assert!(
        support::rss_kb(server.pid()) < 200 * 1024,
        "RSS {} kB after the flood",
        support::rss_kb(server.pid())
    );
    let status: Value = get_json(format!("{url}/v1/status")).await;
    assert_eq!(status["cfgsync"]["render_failures"], 4, "{status}");
    assert!(
        status["cfgsync"]["last_render_failure"]["reason"].is_string(),
        "{status}"
    );
    let metrics = get_text(format!("{url}/metrics")).await;
    assert!(
        metrics.contains("bootsync_cfgsync_render_failures_total 4"),
        "{metrics}"
    );

    server.signal("TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(15)), Some(0));
    let started = Instant::now();
    let again = support::Proc::start(dir.path(), &line);
    assert!(started.elapsed() < Duration::from_secs(10));
    let good = post(
        &format!("{}/node?wait=10", again.url),
        &node("good", json!({})),
    )
    .await;
    assert_eq!(good.status(), 200);
}

/// Odd method tokens must not each become a permanent metric series.
#[it::test(multi_thread)]
async fn a_flood_of_odd_methods_leaves_the_metrics_small() {
    let dir = tempfile::tempdir().unwrap();
    let server = support::Proc::start(dir.path(), "serve --store memory:");
    let http = bootsync::tls::plain_client();
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let (http, url) = (http.clone(), server.url.clone());
        tasks.push(tokio::spawn(async move {
            for i in (worker..10_000).step_by(16) {
                let method = reqwest::Method::from_bytes(format!("M{i}").as_bytes()).unwrap();
                let r = http
                    .request(method, format!("{url}/healthz"))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_client_error(), "{}", r.status());
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let metrics = get_text(format!("{}/metrics", server.url)).await;
    assert!(metrics.len() < 64 * 1024, "{} bytes", metrics.len());
    assert!(metrics.contains("method=\"other\""), "{metrics}");
    assert!(!metrics.contains("M9999"));
}

/// A bundle written straight into the store through `/v1` is checked as a bundle file would
/// be: a hostile path is refused with every problem listed, and nothing is stored or served.
#[it::test]
async fn a_bundle_written_through_v1_with_a_hostile_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = support::Proc::start(dir.path(), "serve --store memory:");
    let url = &server.url;
    let at = format!("{url}/v1/config/__cfgsync__/bundle/current");
    let bundle = json!({"nodes": [{"identifier": "n1", "files": [{"path": "..\\..\\x", "content": "evil"}, {"path": "./a", "content": "x"}]}]});
    let answer = put(&at, &bundle).await;
    assert_eq!(answer.status(), 422);
    let body: Value = answer.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("backslash") && message.contains("canonical"),
        "{message}"
    );
    assert_eq!(
        support::get(&at).await.unwrap().status(),
        404,
        "nothing was stored"
    );
    let r = post(&format!("{url}/node"), &node("n1", json!({}))).await;
    assert_ne!(r.status(), 200, "the hostile bundle was served");
    // A policy that does not compile, and a registration filed under another node's key,
    // are refused the same way.
    let policy = json!({"expect_nodes": 1, "files": [{"path": "f", "template": "{% for %}"}]});
    let forged =
        json!({"identifier": "victim", "ip": "10.0.0.9", "first_seen_ms": 0, "last_seen_ms": 0});
    for (at, value) in [("policy/current", policy), ("registration/other", forged)] {
        let answer = put(&format!("{url}/v1/config/__cfgsync__/{at}"), &value).await;
        assert_eq!(answer.status(), 422, "{at}");
    }
    let fine =
        json!({"nodes": [{"identifier": "n2", "files": [{"path": "ok.txt", "content": "fine"}]}]});
    let answer = put(&at, &fine).await;
    assert!(answer.status().is_success(), "{}", answer.status());
    let r = post(&format!("{url}/node"), &node("n2", json!({}))).await;
    assert_eq!(r.status(), 200);
}

/// Reads until the server closes the connection, failing after `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((started + within).into(), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => panic!("the connection was still open after {within:?}"),
        }
    }
}

/// Slowloris, silent and body-less connections are closed after their timeout, while a
/// long-poll held longer than that timeout completes.
#[it::test(multi_thread)]
async fn stalled_connections_are_closed_and_long_polls_are_not() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let policy = json!({"expect_nodes": 2, "files": [{"path": "f", "template": "x"}]});
    std::fs::write(dir.path().join("policy.json"), policy.to_string()).unwrap();
    let server = support::Proc::start(
        dir.path(),
        "serve --store memory: --policy policy.json --header-timeout 1s --body-timeout 1s",
    );
    let addr = server.url.trim_start_matches("http://").to_string();
    let connect = || tokio::net::TcpStream::connect(addr.clone());

    let mut slow = connect().await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut silent = connect().await.unwrap();
    let mut bodiless = connect().await.unwrap();
    bodiless
        .write_all(
            b"PUT /v1/config/app/cfg/k HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
        )
        .await
        .unwrap();
    // A long-poll of a registered node for a set that is not ready, held three times the
    // header timeout.
    let registered = post(&format!("{}/register", server.url), &node("a", json!({}))).await;
    assert_eq!(registered.status(), 202);
    let url = server.url.clone();
    let poll = tokio::spawn(async move {
        let started = Instant::now();
        let r = post(&format!("{url}/node?wait=3"), &node("a", json!({}))).await;
        (r.status(), started.elapsed())
    });
    // Each is closed within 5 s (at a 1 s timeout), or `closed_within` fails the test.
    for stream in [&mut slow, &mut silent, &mut bodiless] {
        closed_within(stream, Duration::from_secs(5)).await;
    }
    let (status, took) = poll.await.unwrap();
    assert_eq!(status, 425, "the long-poll completed with its answer");
    assert!(took >= Duration::from_millis(2900), "held {took:?}");
    // Nothing was stored from the body that never came.
    let at = format!("{}/v1/config/app/cfg/k", server.url);
    assert_eq!(support::get(&at).await.unwrap().status(), 404, "stored");
}

/// With every connection slot held by idle connections, `/healthz` still answers and other
/// routes say 503.
#[it::test(multi_thread)]
async fn at_the_connection_cap_healthz_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = support::Proc::start(
        dir.path(),
        "serve --store memory: --max-connections 20 --header-timeout 60s",
    );
    let addr = server.url.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..30 {
        idle.push(tokio::net::TcpStream::connect(addr.clone()).await.unwrap());
    }
    // The server accepts them in order; wait until the cap is reached.
    support::wait_for(Duration::from_secs(10), "the cap to be reached", || async {
        let r = support::get(format!("{}/v1/status", server.url))
            .await
            .ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
    let health = support::get(format!("{}/healthz", server.url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    drop(idle);
    support::wait_for(
        Duration::from_secs(10),
        "service after the idle ones left",
        || async {
            let r = support::get(format!("{}/v1/status", server.url))
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        },
    )
    .await;
}

async fn stored_ids(url: &str) -> Vec<String> {
    let listing = get_json(format!("{url}/v1/config/__cfgsync__/registration")).await;
    listing["entries"]
        .as_object()
        .unwrap_or_else(|| panic!("{listing}"))
        .keys()
        .cloned()
        .collect()
}

async fn stored_registrations(url: &str) -> usize {
    stored_ids(url).await.len()
}

/// Registers `n` new nodes at once and asserts that exactly `admitted` were accepted and
/// stored, and every other one was refused with `code`.
async fn storm_admits(url: &str, n: usize, admitted: usize, code: &str) {
    let (accepted, refused) = storm(url, "node", n).await;
    assert_eq!(accepted, admitted, "{refused:?}");
    assert!(refused.iter().all(|c| c == code), "{refused:?}");
    assert_eq!(stored_registrations(url).await, admitted);
}

/// Registers `n` nodes `{prefix}-NNNN` at once; returns how many got 202, and the codes of the
/// refusals.
async fn storm(url: &str, prefix: &str, n: usize) -> (usize, Vec<String>) {
    let http = bootsync::tls::plain_client();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (http, url) = (http.clone(), url.to_string());
        let id = format!("{prefix}-{i:04}");
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(format!("{url}/register"))
                .json(&node(&id, json!({})))
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (
                status,
                body["code"].as_str().unwrap_or_default().to_string(),
            )
        }));
    }
    let (mut accepted, mut refused) = (0, Vec::new());
    for task in tasks {
        let (status, code) = task.await.unwrap();
        if status == 202 {
            accepted += 1;
        } else {
            assert_eq!(status, 409, "{code}");
            refused.push(code);
        }
    }
    (accepted, refused)
}

/// Caps and freeze are decided in the store batch that stores the registration, so a storm
/// of concurrent registrations cannot slip past them while the server's view lags.
#[it::test(multi_thread)]
async fn caps_and_freeze_hold_under_a_storm_of_concurrent_registrations() {
    let dir = tempfile::tempdir().unwrap();
    let capped = json!({"expect_nodes": 5000, "max_registrations": 100, "files": [{"path": "f", "template": "{% for p in peers %}{{ p.ip }}{% endfor %}"}]});
    std::fs::write(dir.path().join("capped.json"), capped.to_string()).unwrap();
    let server = support::Proc::start(
        dir.path(),
        "serve --store sqlite:capped.db --policy capped.json",
    );
    storm_admits(&server.url, 1000, 100, "registration_cap").await;

    // Removing registrations through `/v1` frees their places, and raising the cap in the
    // policy admits more: admission reads the store again before it refuses.
    let http = bootsync::tls::plain_client();
    let stored = stored_ids(&server.url).await;
    for id in &stored[..10] {
        let r = http
            .delete(format!(
                "{}/v1/config/__cfgsync__/registration/{id}",
                server.url
            ))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
    let (accepted, _) = storm(&server.url, "second", 1000).await;
    assert_eq!(accepted, 10, "the ten freed places, no more");
    assert_eq!(stored_registrations(&server.url).await, 100);
    let mut raised = capped.clone();
    raised["max_registrations"] = json!(105);
    let r = put(
        &format!("{}/v1/config/__cfgsync__/policy/current", server.url),
        &raised,
    )
    .await;
    assert!(r.status().is_success(), "{}", r.status());
    let (accepted, _) = storm(&server.url, "third", 1000).await;
    assert_eq!(accepted, 5, "the raised cap");
    assert_eq!(stored_registrations(&server.url).await, 105);
    drop(server);

    let frozen = json!({"expect_nodes": 2, "freeze_on_ready": true, "files": [{"path": "f", "template": "x"}]});
    std::fs::write(dir.path().join("frozen.json"), frozen.to_string()).unwrap();
    let server = support::Proc::start(dir.path(), "serve --store memory: --policy frozen.json");
    storm_admits(&server.url, 8, 2, "frozen").await;
    drop(server);

    // The operator's default cap and metadata budget apply with no policy at all.
    let server = support::Proc::start(dir.path(), "serve --store memory: --max-registrations 30");
    storm_admits(&server.url, 60, 30, "registration_cap").await;
    drop(server);

    let server = support::Proc::start(dir.path(), "serve --store memory: --metadata-budget 100000");
    let big = json!({"blob": "x".repeat(30_000)});
    let mut outcomes = Vec::new();
    for id in ["a", "a", "b", "c", "d", "e"] {
        let r = post(&format!("{}/register", server.url), &node(id, big.clone())).await;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        outcomes.push((
            status,
            body["code"].as_str().unwrap_or_default().to_string(),
        ));
    }
    let ok = (202, String::new());
    let over = (409, "metadata_budget".to_string());
    assert_eq!(
        outcomes,
        [ok.clone(), ok.clone(), ok.clone(), ok, over.clone(), over],
        "30 000-byte blobs fill a 100 000-byte budget at three; a re-registration replaces its own"
    );
}

fn client_from(local: &str) -> reqwest::Client {
    bootsync::tls::install_crypto_provider();
    reqwest::Client::builder()
        .local_address(local.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
}

async fn register_from(http: &reqwest::Client, url: &str, id: &str, ip: &str) -> (u16, Value) {
    let r = http
        .post(format!("{url}/register"))
        .json(&json!({"identifier": id, "ip": ip}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Strict mode covers bundle nodes that never registered, and records stored before it was
/// turned on cannot be taken over from another address or with another IP.
#[it::test(multi_thread)]
async fn strict_mode_covers_bundle_nodes_and_records_from_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let bundle =
        "nodes:\n  - identifier: n1\n    files:\n      - path: a.txt\n        content: one\n";
    std::fs::write(dir.path().join("bundle.yaml"), bundle).unwrap();
    let plain = support::Proc::start(
        dir.path(),
        "serve --store sqlite:store.db --bundle bundle.yaml",
    );
    let home = client_from("127.0.0.1");
    assert_eq!(
        register_from(&home, &plain.url, "n1", "10.0.0.1").await.0,
        202
    );
    drop(plain);

    let strict = support::Proc::start(dir.path(), "serve --store sqlite:store.db --strict-nodes");
    let url = &strict.url;
    // The bundle node with a pre-strict record, and one that never registered: no payload
    // without a secret.
    for id in ["n1", "n2"] {
        let r = post(&format!("{url}/node"), &node(id, json!({}))).await;
        assert_eq!(r.status(), 401, "{id}");
    }
    // Someone else takes neither the identifier nor its secret: not from another host, not
    // with another IP.
    let (status, body) = register_from(&client_from("127.0.0.2"), url, "n1", "10.0.0.1").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("unclaimed_record")),
        "{body}"
    );
    let (status, body) = register_from(&home, url, "n1", "10.6.6.6").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("unclaimed_record")),
        "{body}"
    );
    // The real node claims it and is served with its secret.
    let (status, body) = register_from(&home, url, "n1", "10.0.0.1").await;
    assert_eq!(status, 202, "{body}");
    let secret = body["node_secret"].as_str().unwrap().to_string();
    let r = bootsync::tls::plain_client()
        .post(format!("{url}/node"))
        .header("x-bootsync-node-secret", secret)
        .json(&node("n1", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Memory follows what is stored: registrations with large metadata cost the server a small
/// multiple of their stored size, before and after a restart.
#[it::test(multi_thread)]
async fn memory_per_registration_stays_near_its_stored_size() {
    let policy = json!({"expect_nodes": 1, "files": [{"path": "f", "template": "{{ node.identifier }} of {{ nodes | length }}"}]});
    let (dir, server) = support::serve_policy(&policy, "");
    let baseline = support::rss_kb(server.pid());
    let http = bootsync::tls::plain_client();
    let (nodes, blob) = (600, 50_000);
    for i in 0..nodes {
        let metadata = json!({"blob": format!("{i:06}{}", "m".repeat(blob))});
        let r = http
            .post(format!("{}/register", server.url))
            .json(&node(&format!("node-{i:04}"), metadata))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let r = post(
        &format!("{}/node?wait=10", server.url),
        &node("node-0000", json!({})),
    )
    .await;
    assert_eq!(r.status(), 200);
    let stored_kb = (nodes * blob / 1024) as u64;
    let grown = support::rss_kb(server.pid()).saturating_sub(baseline);
    eprintln!("stored {stored_kb} kB of metadata; RSS grew {grown} kB");
    assert!(
        grown < 6 * stored_kb,
        "RSS grew {grown} kB for {stored_kb} kB stored"
    );
    drop(server);
    let again = support::Proc::start(dir.path(), support::SERVE_POLICY);
    let r = post(
        &format!("{}/node?wait=10", again.url),
        &node("node-0000", json!({})),
    )
    .await;
    assert_eq!(r.status(), 200);
    let after = support::rss_kb(again.pid());
    eprintln!("after a restart: RSS {after} kB");
    assert!(
        after < 6 * stored_kb + baseline,
        "RSS {after} kB after a restart"
    );
}
