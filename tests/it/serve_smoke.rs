//! The real binary starts, announces its port, and answers health checks.

use crate::support;

use std::time::Duration;

/// `serve` on a memory store, once `/healthz` has answered 200.
async fn healthy_server(dir: &std::path::Path) -> support::Proc {
    let proc = support::Proc::start(dir, "serve --store memory:");
    let health = support::get(format!("{}/healthz", proc.url)).await.unwrap();
    assert_eq!(health.status(), 200);
    proc
}

#[it::test]
async fn serve_starts_on_an_ephemeral_port_and_is_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let proc = healthy_server(dir.path()).await;
    let ready = support::get(format!("{}/readyz", proc.url)).await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["backend"], "memory");
    let missing = support::get(format!("{}/no/such/route", proc.url))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
}

#[it::test]
async fn sigterm_stops_the_server_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut proc = support::Proc::start(dir.path(), "serve --store memory:");
    proc.signal("TERM");
    assert_eq!(proc.wait_exit(Duration::from_secs(15)), Some(0));
}

#[it::test]
fn a_non_loopback_listen_without_a_join_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = support::cli(dir.path(), "serve --store memory: --listen 0.0.0.0:0");
    assert_ne!(code, 0);
    assert!(stderr.contains("--join-token-file"), "stderr: {stderr}");
}

#[it::test]
async fn log_lines_written_to_a_file_carry_no_colour_escapes() {
    let dir = tempfile::tempdir().unwrap();
    // Proc sends stderr to a file: exactly what journald, `kubectl logs` or CI capture.
    let proc = healthy_server(dir.path()).await;
    let log = proc.stderr();
    assert!(
        log.contains("INFO"),
        "expected text log lines on stderr, got:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "escape bytes in a non-terminal log:\n{log:?}"
    );
}

/// The README's main job: `run --spec examples/quickstart.yaml` on the embedded SQLite store
/// converges every step (its `cfgsync-policy` installs through the server's `/v1`).
#[it::test(multi_thread)]
async fn the_quickstart_main_job_converges() {
    let dir = tempfile::tempdir().unwrap();
    let spec = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart.yaml");
    let server = support::Proc::start(
        dir.path(),
        &format!("run --spec {} --store sqlite:store.db", spec.display()),
    );
    let url = format!("{}/v1/status", server.url);
    let status = support::wait_for(Duration::from_secs(60), "the quickstart converged", || {
        let url = url.clone();
        async move {
            let (_, status) = support::call(reqwest::Method::GET, &url, None, None).await;
            (status["converged"] == true).then_some(status)
        }
    })
    .await;
    let names: Vec<&str> = status["initialisers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"node-policy"), "{status}");
}
