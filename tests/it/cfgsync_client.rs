//! `bootsync client` and the library client against an old seed-style server (no long-poll, no
//! epoch, plain-text errors) and against bootsync itself.

use crate::support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bootsync::cfgsync::client::WatchOutcome;
use bootsync::cfgsync::{
    ArtifactOutputMap, CfgsyncClient, ClientError, NodeRegistration, fetch_and_write_artifacts,
};
use serde_json::{Value, json};

/// A server that speaks only the seed's protocol: 202 with an empty body, 425 in plain text
/// until `expected` nodes registered, then 200; it knows nothing of `?wait=` or epochs.
#[derive(Clone)]
struct SeedServer {
    expected: usize,
    registered: Arc<Mutex<BTreeSet<String>>>,
    files: Value,
    /// How many `/node` requests it answered.
    asked: Arc<std::sync::atomic::AtomicUsize>,
}

async fn seed_register(State(s): State<SeedServer>, Json(body): Json<Value>) -> StatusCode {
    s.registered
        .lock()
        .unwrap()
        .insert(body["identifier"].as_str().unwrap().to_string());
    StatusCode::ACCEPTED
}

async fn seed_node(State(s): State<SeedServer>, Json(body): Json<Value>) -> Response {
    s.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let registered = s.registered.lock().unwrap();
    if registered.len() < s.expected || !registered.contains(body["identifier"].as_str().unwrap()) {
        return (StatusCode::TOO_EARLY, "config not ready").into_response();
    }
    Json(json!({"schema_version": 1, "files": s.files})).into_response()
}

async fn seed_server(expected: usize, files: Value) -> String {
    seed_server_counting(expected, files).await.0
}

/// A seed server, and the count of `/node` requests it answered.
async fn seed_server_counting(
    expected: usize,
    files: Value,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let state = SeedServer {
        expected,
        registered: Arc::default(),
        files,
        asked: asked.clone(),
    };
    let app = axum::Router::new()
        .route("/register", post(seed_register))
        .route("/node", post(seed_node))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, asked)
}

fn client_args<'a>(server: &'a str, id: &'a str, out: &'a str, timeout: &'a str) -> Vec<&'a str> {
    vec![
        "client",
        "--server",
        server,
        "--identifier",
        id,
        "--ip",
        "10.0.0.1",
        "--output-dir",
        out,
        "--timeout",
        timeout,
        "--quiet",
    ]
}

#[it::test]
async fn the_library_client_gets_files_from_a_seed_server() {
    let url = seed_server(1, json!([{"path": "/config.yaml", "content": "id: a"}, {"path": "deployment-settings.yaml", "content": "n: 1"}])).await;
    let dir = tempfile::tempdir().unwrap();
    let outputs = ArtifactOutputMap::new()
        .route("/config.yaml", dir.path().join("node.yaml"))
        .with_root(dir.path().join("shared"));
    let registration = NodeRegistration::new("a", "10.0.0.1".parse().unwrap());
    let written = fetch_and_write_artifacts(&registration, &url, &outputs)
        .await
        .unwrap();
    assert_eq!(written.payload.epoch, None, "an old server sends no epoch");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("node.yaml")).unwrap(),
        "id: a"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("shared/deployment-settings.yaml")).unwrap(),
        "n: 1"
    );
}

#[it::test]
async fn the_binary_writes_routed_files_from_a_seed_server_and_exits_0() {
    let url = seed_server(1, json!([{"path": "/config.yaml", "content": "id: a"}, {"path": "peers/list.txt", "content": "a"}])).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (code, stdout, stderr) = tokio::task::spawn_blocking({
        let (url, out, dir) = (
            url.clone(),
            out.display().to_string(),
            dir.path().to_path_buf(),
        );
        move || {
            let mut args = client_args(&url, "a", &out, "30s");
            args.extend(["--route", "/config.yaml=node.yaml", "--output", "json"]);
            support::run_cli(&args, &dir)
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("node.yaml")).unwrap(),
        "id: a"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("peers/list.txt")).unwrap(),
        "a"
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["files"].as_array().unwrap().len(), 2);
}

#[it::test]
async fn the_binary_gives_up_with_exit_3_against_a_server_that_is_never_ready() {
    let url = seed_server(99, json!([])).await;
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        let url = url.clone();
        move || {
            let mut args = client_args(&url, "a", ".", "2s");
            args.retain(|a| *a != "--quiet");
            support::run_cli(&args, &dir)
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("gave up"), "{stderr}");
    assert!(
        stderr.contains("not ready"),
        "says what it waited for: {stderr}"
    );

    // The same wait as JSON lines, and with --quiet only the final problem.
    let run = |extra: &'static [&'static str]| {
        let url = url.clone();
        let dir = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut args = client_args(&url, "a", ".", "2s");
            args.retain(|a| *a != "--quiet");
            args.extend(extra);
            support::run_cli(&args, &dir)
        })
    };
    let (code, stdout, stderr) = run(&["--output", "json"]).await.unwrap();
    assert_eq!(code, 3, "{stderr}");
    assert!(stdout.is_empty(), "no result on stdout: {stdout}");
    let events: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"registering"), "{stderr}");
    assert!(kinds.contains(&"waiting"), "{stderr}");
    assert_eq!(kinds.last(), Some(&"gave_up"), "{stderr}");
    let waiting = events.iter().find(|e| e["event"] == "waiting").unwrap();
    assert!(
        waiting["last"].as_str().unwrap().contains("not ready"),
        "{waiting}"
    );

    let (code, _, stderr) = run(&["--output", "json", "--quiet"]).await.unwrap();
    assert_eq!(code, 3);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("\"gave_up\""), "{stderr}");
}

#[it::test]
async fn a_hostile_payload_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(outside.path(), out.join("link")).unwrap();
    for hostile in [
        "../escape.txt",
        "/etc/bootsync-test-passwd",
        "link/escaped.txt",
    ] {
        let url = seed_server(
            1,
            json!([{"path": "fine.txt", "content": "ok"}, {"path": hostile, "content": "evil"}]),
        )
        .await;
        let (code, _, stderr) = tokio::task::spawn_blocking({
            let (dir, out) = (dir.path().to_path_buf(), out.display().to_string());
            move || support::run_cli(&client_args(&url, "a", &out, "30s"), &dir)
        })
        .await
        .unwrap();
        assert_eq!(code, 1, "{hostile}: {stderr}");
        assert!(
            stderr.contains("refusing payload path"),
            "{hostile}: {stderr}"
        );
        assert!(
            !out.join("fine.txt").exists(),
            "{hostile}: part of the payload was written"
        );
        assert!(!dir.path().join("escape.txt").exists());
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }
}

#[it::test(multi_thread)]
async fn two_clients_started_far_apart_both_succeed() {
    let (url, asked) =
        seed_server_counting(2, json!([{"path": "a.txt", "content": "ready"}])).await;
    let dir = tempfile::tempdir().unwrap();
    let first = tokio::task::spawn_blocking({
        let (url, dir) = (url.clone(), dir.path().to_path_buf());
        move || support::run_cli(&client_args(&url, "first", "first", "120s"), &dir)
    });
    // An old server cannot long-poll: the first client must keep polling with backoff, past
    // the seed client's five tries in about a second, without giving up. Its fifth ask comes
    // after about 3.75 s of backoff (250 ms doubling, give or take a fifth).
    let started = std::time::Instant::now();
    support::wait_for(
        Duration::from_secs(60),
        "five polls by the first client",
        || {
            let asked = asked.load(std::sync::atomic::Ordering::SeqCst);
            async move { (asked >= 5).then_some(()) }
        },
    )
    .await;
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "five asks within {:?}: no backoff",
        started.elapsed()
    );
    assert!(
        !first.is_finished(),
        "the first client finished before the set was complete"
    );
    let second = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || support::run_cli(&client_args(&url, "second", "second", "60s"), &dir)
    })
    .await
    .unwrap();
    assert_eq!(second.0, 0, "{}", second.2);
    let first = tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .expect("the first client never noticed readiness")
        .unwrap();
    assert_eq!(first.0, 0, "{}", first.2);
    assert!(dir.path().join("first/a.txt").exists() && dir.path().join("second/a.txt").exists());
}

#[it::test]
async fn fifty_client_processes_get_all_fifty_peers_from_a_policy_server() {
    let dir = support::dir_with(&[("policy.yaml", &support::peers_policy(50))]);
    let server = support::Proc::start(dir.path(), "serve --store memory: --policy policy.yaml");
    let mut children = Vec::new();
    for i in 0..50 {
        let out = dir.path().join(format!("node-{i}"));
        let child = std::process::Command::new(support::bin())
            .args([
                "client",
                "--server",
                &server.url,
                "--identifier",
                &format!("node-{i:02}"),
                "--ip",
                &format!("10.2.0.{}", i + 1),
            ])
            .args([
                "--output-dir",
                &out.display().to_string(),
                "--timeout",
                "60s",
                "--quiet",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        children.push((out, child));
    }
    for (out, child) in children {
        let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let peers = std::fs::read_to_string(out.join("peers.txt")).unwrap();
        assert_eq!(peers.lines().count(), 50);
    }
}

#[it::test]
async fn the_library_client_long_polls_a_bootsync_server_and_sees_the_epoch() {
    let dir = support::dir_with(&[(
        "policy.yaml",
        "expect_nodes: 2\nfiles:\n  - path: a.txt\n    template: \"{{ index }}\"\n",
    )]);
    let server = support::Proc::start(dir.path(), "serve --store memory: --policy policy.yaml");
    let client = Arc::new(CfgsyncClient::new(&server.url).with_long_poll(Duration::from_secs(20)));
    let waiting = tokio::spawn({
        let client = client.clone();
        async move {
            let me = NodeRegistration::new("a", "10.0.0.1".parse().unwrap());
            client
                .register_and_wait(&me, Duration::from_secs(60), false, &|_| {})
                .await
                .unwrap()
        }
    });
    let other = CfgsyncClient::new(&server.url);
    let b = NodeRegistration::new("b", "10.0.0.2".parse().unwrap());
    support::wait_for(Duration::from_secs(10), "node a registered", || async {
        let body: Value = support::get(format!("{}/v1/status", server.url))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (body["cfgsync"]["registrations"] == 1).then_some(())
    })
    .await;
    other.register_node(&b).await.unwrap();
    let payload = tokio::time::timeout(Duration::from_secs(15), waiting)
        .await
        .expect("the long-poll did not return after readiness")
        .unwrap();
    assert!(payload.epoch.is_some());
    assert_eq!(payload.files[0].content, "0");
}

/// A watch's epoch from another store (a list of servers that do not share one, a store
/// started afresh) is past this store's revision: the node is answered at once with what this
/// store serves, while an epoch this store reached is held until a newer one.
#[it::test]
async fn an_epoch_past_the_store_s_revision_is_answered_at_once() {
    let dir = support::dir_with(&[(
        "policy.yaml",
        "expect_nodes: 1\nfiles:\n  - path: a.txt\n    template: \"{{ index }}\"\n",
    )]);
    let server = support::Proc::start(dir.path(), "serve --store memory: --policy policy.yaml");
    let client = CfgsyncClient::new(&server.url);
    let me = NodeRegistration::new("a", "10.0.0.1".parse().unwrap());
    let served = client
        .register_and_wait(&me, Duration::from_secs(30), false, &|_| {})
        .await
        .unwrap();
    let epoch = served.epoch.unwrap();
    let asked = std::time::Instant::now();
    let foreign = client
        .fetch_newer(&me, Some(epoch + 1_000_000), Duration::from_secs(20))
        .await
        .unwrap();
    match foreign {
        WatchOutcome::Payload(payload) => assert_eq!(payload.epoch, Some(epoch)),
        other => panic!("expected the current payload, got {other:?}"),
    }
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "held for a foreign epoch"
    );
    let held = client
        .fetch_newer(&me, Some(epoch), Duration::from_secs(1))
        .await
        .unwrap();
    assert!(matches!(held, WatchOutcome::Unchanged), "{held:?}");
}

/// Staging symlinks planted under the names the client once used cannot redirect its write:
/// the client waits (the set is not ready), the attacker plants links for its PID, then the
/// set becomes ready.
#[it::test]
async fn planted_staging_symlinks_change_nothing_outside_the_output_folder() {
    let url = seed_server(2, json!([{"path": "fine.txt", "content": "ours"}])).await;
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut child = std::process::Command::new(support::bin())
        .args(client_args(&url, "a", &out.display().to_string(), "30s"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for n in 0..4 {
        let planted = out.join(format!(".fine.txt.bootsync-{}-{n}", child.id()));
        std::os::unix::fs::symlink(&victim, planted).unwrap();
    }
    // The second node makes the set ready.
    let registered = bootsync::tls::plain_client()
        .post(format!("{url}/register"))
        .json(&json!({"identifier": "b", "ip": "10.0.0.2"}))
        .send()
        .await
        .unwrap();
    assert!(registered.status().is_success());
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the client never exited"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    let written = std::fs::symlink_metadata(out.join("fine.txt")).unwrap();
    assert!(written.file_type().is_file(), "a regular file, not a link");
    assert_eq!(
        std::fs::read_to_string(out.join("fine.txt")).unwrap(),
        "ours"
    );
}

#[it::test]
async fn an_oversized_payload_writes_nothing() {
    let big = "x".repeat(2 << 20);
    let url = seed_server(
        1,
        json!([{"path": "small.txt", "content": "ok"}, {"path": "big.txt", "content": big}]),
    )
    .await;
    refused_as_too_large(url).await;
}

/// Runs `client --max-payload-bytes 1000000` against `url`, and checks the answer was refused
/// as too large and nothing was written.
async fn refused_as_too_large(url: String) {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || {
            let mut args = client_args(&url, "a", "out", "30s");
            args.extend(["--max-payload-bytes", "1000000"]);
            support::run_cli(&args, &dir)
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("larger than 1000000 bytes"), "{stderr}");
    assert!(!dir.path().join("out").exists(), "nothing was written");
}

/// A gzip bomb: 64 MiB of payload in ~64 KiB on the wire. The client asks for gzip, and the
/// payload limit counts the bytes once decompressed: refused, nothing written.
#[it::test]
async fn a_gzip_bomb_is_refused_by_its_decompressed_size_and_writes_nothing() {
    use std::io::Write as _;
    let mut inner = br#"[{"path":"a.txt","content":""#.to_vec();
    inner.resize(inner.len() + (64 << 20), b'x');
    inner.extend_from_slice(br#""}]"#);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(br#"{"files":"#).unwrap();
    gz.write_all(&inner).unwrap();
    gz.write_all(b"}").unwrap();
    let bomb = Arc::new(gz.finish().unwrap());
    assert!(bomb.len() < 1 << 20, "{} bytes on the wire", bomb.len());
    let asked_gzip = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let app = axum::Router::new()
        .route("/register", post(|| async { StatusCode::ACCEPTED }))
        .route(
            "/node",
            post({
                let (bomb, asked_gzip) = (bomb.clone(), asked_gzip.clone());
                move |headers: axum::http::HeaderMap| async move {
                    let accepts = headers
                        .get(axum::http::header::ACCEPT_ENCODING)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.contains("gzip"));
                    asked_gzip.store(accepts, std::sync::atomic::Ordering::SeqCst);
                    (
                        [
                            (axum::http::header::CONTENT_ENCODING, "gzip"),
                            (axum::http::header::CONTENT_TYPE, "application/json"),
                        ],
                        bomb.as_ref().clone(),
                    )
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    refused_as_too_large(url).await;
    assert!(
        asked_gzip.load(std::sync::atomic::Ordering::SeqCst),
        "the client asks for gzip"
    );
}

/// A server that accepts connections and never answers cannot hold the client past
/// `--timeout`.
#[it::test]
async fn the_timeout_holds_against_a_server_that_never_answers() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let (code, _, stderr) = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || support::run_cli(&client_args(&url, "a", ".", "2s"), &dir)
    })
    .await
    .unwrap();
    let took = started.elapsed();
    held.abort();
    assert_eq!(code, 3, "{stderr}");
    assert!(took < Duration::from_secs(4), "gave up after {took:?}");
}

/// A redirect to another origin is refused, so the registration (and a strict-mode secret)
/// never reaches a host the operator did not name.
#[it::test]
async fn a_redirect_to_another_host_is_refused() {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let elsewhere = {
        let hits = hits.clone();
        let app = axum::Router::new().fallback(move || {
            hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { StatusCode::ACCEPTED }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    };
    let redirector = {
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let to = format!("{elsewhere}{}", uri.path());
            async move {
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(axum::http::header::LOCATION, to)],
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    };
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || support::run_cli(&client_args(&redirector, "a", ".", "2s"), &dir)
    })
    .await
    .unwrap();
    assert_ne!(code, 0, "{stderr}");
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the other host was reached"
    );
}

/// An old server cannot hold a request or tell epochs apart: `--watch` must not spin on it.
#[it::test]
async fn watch_backs_off_against_a_server_that_answers_at_once() {
    use std::sync::atomic::Ordering;
    let (url, asked) =
        seed_server_counting(1, json!([{"path": "a.txt", "content": "old server"}])).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    let mut args = client_args(&url, "node-a", &out, "30s");
    args.push("--watch");
    let mut watch = support::Proc::spawn_bootstrap(&args, dir.path());
    support::wait_for(Duration::from_secs(30), "the first write", || async {
        dir.path().join("a.txt").exists().then_some(())
    })
    .await;
    let at_write = asked.load(Ordering::SeqCst);
    let window = tokio::time::Instant::now();
    support::wait_for(Duration::from_secs(30), "it keeps asking", || async {
        (asked.load(Ordering::SeqCst) >= at_write + 3).then_some(())
    })
    .await;
    // Pauses of at least 0.8 s, 1.6 s, 3.2 s, … (1 s doubling, ±20 %): few asks in the window.
    let asks = asked.load(Ordering::SeqCst) - at_write;
    let elapsed = window.elapsed().as_secs_f64();
    assert!(
        elapsed >= 0.8 * 1.0 + 0.8 * 2.0 - 0.1,
        "three asks took {elapsed:.2} s"
    );
    assert!(asks <= 4, "{asks} asks in {elapsed:.2} s");
    assert!(watch.child_alive(), "it keeps watching");
    watch.signal("TERM");
    assert_eq!(watch.wait_exit(Duration::from_secs(15)), Some(0));
}

/// A server that is busy (503), paces the caller (429) or times a body out (408) says to
/// retry: the one-shot client does, on either route, and gets its files instead of giving up
/// at once; a refused fetch registers again first.
#[it::test]
async fn the_client_retries_what_the_server_says_to_retry() {
    type Refusals = Arc<Mutex<(Vec<(u16, &'static str)>, usize)>>;
    // Each route answers its own refusals in turn (last first), then serves; both count calls.
    let route =
        |refusals: Vec<(u16, &'static str)>| -> Refusals { Arc::new(Mutex::new((refusals, 0))) };
    let refuse = |route: &Refusals| {
        let mut route = route.lock().unwrap();
        route.1 += 1;
        route.0.pop().map(|(status, code)| {
            let body = json!({"code": code, "message": "retry"});
            (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
        })
    };
    let registers = route(vec![(429, "too_many_requests"), (408, "timeout")]);
    let nodes = route(vec![(503, "unavailable")]);
    let register = {
        let registers = registers.clone();
        move || async move { refuse(&registers).unwrap_or_else(|| StatusCode::ACCEPTED.into_response()) }
    };
    let node = {
        let nodes = nodes.clone();
        move || async move {
            refuse(&nodes).unwrap_or_else(|| {
                Json(
                    json!({"schema_version": 1, "files": [{"path": "a.txt", "content": "served"}]}),
                )
                .into_response()
            })
        }
    };
    let app = axum::Router::new()
        .route("/register", post(register))
        .route("/node", post(node));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = tempfile::tempdir().unwrap();
    let outputs = ArtifactOutputMap::new().with_root(dir.path());
    let registration = NodeRegistration::new("a", "10.0.0.1".parse().unwrap());
    fetch_and_write_artifacts(&registration, &url, &outputs)
        .await
        .expect("served after the refusals that said to retry");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("a.txt")).unwrap(),
        "served"
    );
    // 408, 429, accepted; the fetch refused with 503; registered again, then served.
    assert_eq!(registers.lock().unwrap().1, 4, "registrations");
    assert_eq!(nodes.lock().unwrap().1, 2, "fetches");
}

/// A server's `Retry-After` reaches the caller with the refusal, so the client waits at least
/// that long rather than sending a refused change again at its own pace; and never past its
/// own timeout, however long the server asks.
#[it::test]
async fn a_refusal_carries_the_server_s_retry_after() {
    async fn refusing(retry_after: &'static str) -> String {
        let refuse = move || async move {
            let body = json!({"code": "too_many_requests", "message": "changing too often"});
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(axum::http::header::RETRY_AFTER, retry_after)],
                Json(body),
            )
                .into_response()
        };
        let app = axum::Router::new().route("/register", post(refuse));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }
    let registration = NodeRegistration::new("a", "10.0.0.1".parse().unwrap());
    let url = refusing("17").await;
    let err = CfgsyncClient::new(&url)
        .register_node(&registration)
        .await
        .expect_err("refused");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(17)), "{err:?}");

    let url = refusing("18446744073709551615").await;
    let gave_up = CfgsyncClient::new(&url)
        .register_and_wait(&registration, Duration::from_millis(300), false, &|_| {})
        .await;
    assert!(
        matches!(gave_up, Err(ClientError::GaveUp { .. })),
        "{gave_up:?}"
    );
}
