//! A watching node (`client --watch`) against what a server or an operator may send it.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::support::{self, Proc};

fn watcher(dir: &Path, url: &str, hook: &str) -> Proc {
    let routed = format!("/routed.txt={}", dir.join("routed.txt").display());
    let extra = ["--route", &routed, "--min-hook-interval", "0s"];
    support::watcher(dir, url, "out", "10.0.0.1", hook, &extra)
}

fn policy(files: &[&str]) -> serde_json::Value {
    let files: Vec<_> = files
        .iter()
        .map(
            |path| json!({"path": path, "template": format!("{path} at {{{{ nodes | length }}}}")}),
        )
        .collect();
    json!({"expect_nodes": 1, "files": files})
}

/// The watcher never deleted files a newer payload dropped, so an operator who stopped
/// serving a file left it on every node. Now it deletes them, beneath its output folder
/// only: a routed file is the operator's.
#[it::test(multi_thread)]
async fn files_a_newer_payload_dropped_are_deleted_beneath_the_output_folder_only() {
    let first = policy(&["keep.txt", "gone/old.txt", "/routed.txt"]);
    let dir = support::dir_with(&[("policy.json", &first.to_string())]);
    let server = Proc::start(dir.path(), "serve --store memory: --policy policy.json");
    let _watch = watcher(dir.path(), &server.url, "echo $BOOTSYNC_EPOCH >> hooks.log");
    let d = dir.path().to_path_buf();
    support::wait_for(Duration::from_secs(20), "the first payload written", || {
        let d = d.clone();
        async move { d.join("out/gone/old.txt").exists().then_some(()) }
    })
    .await;
    let second = policy(&["keep.txt"]);
    let at = format!("{}/v1/config/__cfgsync__/policy/current", server.url);
    let put = bootsync::tls::plain_client()
        .put(at)
        .json(&second)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    support::wait_for(Duration::from_secs(20), "the dropped file deleted", || {
        let d = d.clone();
        async move { (!d.join("out/gone/old.txt").exists()).then_some(()) }
    })
    .await;
    assert!(d.join("out/keep.txt").exists());
    assert!(
        d.join("routed.txt").exists(),
        "a routed file is the operator's"
    );
}

/// SIGTERM was ignored while a hook ran, so a stuck hook held the watcher (and a pod's
/// shutdown) until it finished. The watcher now stops at once and stops the hook too.
#[it::test(multi_thread)]
async fn sigterm_stops_the_watcher_while_its_hook_runs() {
    let dir = support::dir_with(&[("policy.json", &policy(&["a.txt"]).to_string())]);
    let server = Proc::start(dir.path(), "serve --store memory: --policy policy.json");
    let mut watch = watcher(
        dir.path(),
        &server.url,
        "touch hook.started; sleep 60; touch hook.finished",
    );
    let d = dir.path().to_path_buf();
    support::wait_for(Duration::from_secs(20), "the hook to start", || {
        let d = d.clone();
        async move { d.join("hook.started").exists().then_some(()) }
    })
    .await;
    watch.signal("TERM");
    assert_eq!(watch.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        !d.join("hook.finished").exists(),
        "the hook ran on after SIGTERM"
    );
}
