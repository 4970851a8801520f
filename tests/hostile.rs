//! Hostile input against the real server: each test reproduces an attack and asserts the
//! answer the server gives now (see the security table in `specs/security.md`).

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn node(identifier: &str, metadata: Value) -> Value {
    json!({"identifier": identifier, "ip": "10.0.0.1", "metadata": metadata})
}

async fn post(url: &str, body: &Value) -> reqwest::Response {
    bootsync::tls::plain_client()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn an_open_admin_api_on_the_network_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("join"), "join-token-0123456789abcdef").unwrap();
    let (code, _, stderr) = support::run_cli(
        &[
            "serve",
            "--store",
            "memory:",
            "--listen",
            "0.0.0.0:0",
            "--join-token-file",
            "join",
        ],
        dir.path(),
    );
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("--admin-token-file"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
}

/// Templates that run forever, write without end or read a peer's bad data fail their own
/// node's payload promptly; the others are served, memory stays bounded, SIGTERM works and a
/// restart listens at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_templates_fail_only_their_own_node() {
    let dir = tempfile::tempdir().unwrap();
    let template = r#"{% if node.identifier == "spin" %}{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}{% elif node.identifier == "flood" %}{% for a in range(100000) %}{% for b in range(100000) %}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx{% endfor %}{% endfor %}{% elif node.identifier == "bad" %}{{ node.metadata.port + 1 }}{% elif node.identifier == "nosy" %}{{ debug() }}{% endif %}ok {{ node.identifier }}"#;
    let policy = json!({
        "expect_identifiers": ["bad", "flood", "good", "nosy", "spin"],
        "files": [{"path": "f.txt", "template": template}],
    });
    std::fs::write(dir.path().join("policy.json"), policy.to_string()).unwrap();
    let args = [
        "serve",
        "--store",
        "sqlite:store.db",
        "--policy",
        "policy.json",
        "--render-fuel",
        "2000000",
        "--render-max-file-bytes",
        "4000000",
    ];
    let mut server = support::Proc::spawn(&args, dir.path());
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
        rss_kb(server.pid()) < 200 * 1024,
        "RSS {} kB after the flood",
        rss_kb(server.pid())
    );
    let status: Value = support::get(format!("{url}/v1/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["cfgsync"]["render_failures"], 4, "{status}");
    assert!(
        status["cfgsync"]["last_render_failure"]["reason"].is_string(),
        "{status}"
    );
    let metrics = support::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("bootsync_cfgsync_render_failures_total 4"),
        "{metrics}"
    );

    server.signal("TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(15)), Some(0));
    let started = Instant::now();
    let again = support::Proc::spawn(&args, dir.path());
    assert!(started.elapsed() < Duration::from_secs(10));
    let good = post(
        &format!("{}/node?wait=10", again.url),
        &node("good", json!({})),
    )
    .await;
    assert_eq!(good.status(), 200);
}

/// Every distinct method token used to become a permanent metric series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_odd_methods_leaves_the_metrics_small() {
    let dir = tempfile::tempdir().unwrap();
    let server = support::Proc::spawn(&["serve", "--store", "memory:"], dir.path());
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
    let metrics = support::get(format!("{}/metrics", server.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.len() < 64 * 1024, "{} bytes", metrics.len());
    assert!(metrics.contains("method=\"other\""), "{metrics}");
    assert!(!metrics.contains("M9999"));
}

/// A bundle written straight into the store through `/v1` is checked as a bundle file would
/// be before anything of it is served.
#[tokio::test]
async fn a_bundle_written_through_v1_with_a_hostile_path_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = support::Proc::spawn(&["serve", "--store", "memory:"], dir.path());
    let url = &server.url;
    let bundle = json!({"nodes": [{"identifier": "n1", "files": [{"path": "..\\..\\x", "content": "evil"}]}]});
    let put = bootsync::tls::plain_client()
        .put(format!("{url}/v1/config/__cfgsync__/bundle/current"))
        .json(&bundle)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let fine =
        json!({"nodes": [{"identifier": "n2", "files": [{"path": "ok.txt", "content": "fine"}]}]});
    // `/node` catches its view up with the store first, so this sees the bundle just written.
    let r = post(&format!("{url}/node"), &node("n1", json!({}))).await;
    assert_ne!(r.status(), 200, "the hostile bundle was served");
    let put = bootsync::tls::plain_client()
        .put(format!("{url}/v1/config/__cfgsync__/bundle/current"))
        .json(&fine)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    support::wait_for(
        Duration::from_secs(10),
        "the valid bundle served",
        || async {
            let r = post(&format!("{url}/node"), &node("n2", json!({}))).await;
            (r.status() == 200).then_some(())
        },
    )
    .await;
}
