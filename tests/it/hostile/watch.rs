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

/// A file a newer payload drops is deleted from the node, so an operator can stop serving one;
/// beneath the output folder only: a routed file is the operator's.
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

/// A stuck hook must not hold the watcher (and a pod's shutdown): on SIGTERM the watcher
/// stops at once, and stops the hook's whole process group with it.
#[it::test(multi_thread)]
async fn sigterm_stops_the_watcher_while_its_hook_runs() {
    let dir = support::dir_with(&[("policy.json", &policy(&["a.txt"]).to_string())]);
    let server = Proc::start(dir.path(), "serve --store memory: --policy policy.json");
    let mut watch = watcher(
        dir.path(),
        &server.url,
        "sleep 60 & echo $! > sleep.pid; echo $$ > hook.pid; wait",
    );
    let d = dir.path().to_path_buf();
    let pids = support::wait_for(Duration::from_secs(20), "the hook to start", || {
        let d = d.clone();
        async move {
            let read = |name| {
                std::fs::read_to_string(d.join(name))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            };
            Some([read("hook.pid")?, read("sleep.pid")?])
        }
    })
    .await;
    let pids: [u32; 2] = pids;
    watch.signal("TERM");
    assert_eq!(watch.wait_exit(Duration::from_secs(10)), Some(0));
    // The hook's shell and the process it started are both gone (or only wait to be reaped).
    support::wait_for(
        Duration::from_secs(10),
        "the hook's processes to end",
        || async move { pids.iter().all(|pid| !running(*pid)).then_some(()) },
    )
    .await;
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}
