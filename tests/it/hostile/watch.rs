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

/// Installs `policy` as the server's current one (a server without tokens).
async fn put_policy(url: &str, policy: &serde_json::Value) {
    let at = format!("{url}/v1/config/__cfgsync__/policy/current");
    let put = bootsync::tls::plain_client()
        .put(at)
        .json(policy)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200, "the policy was not installed");
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
    put_policy(&server.url, &policy(&["keep.txt"])).await;
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

/// A long list of changed paths must not keep the hook from starting (an environment past
/// ~128 KiB cannot start a program): the list is always in the file
/// `BOOTSYNC_CHANGED_PATHS_FILE` names, and in `BOOTSYNC_CHANGED_PATHS` only while short.
#[it::test(multi_thread)]
async fn a_hook_gets_a_long_list_of_changed_paths_from_a_file() {
    let names: Vec<String> = (0..400)
        .map(|i| format!("many/{}-{i:04}.txt", "p".repeat(150)))
        .collect();
    let first = policy(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let dir = support::dir_with(&[("policy.json", &first.to_string())]);
    let server = Proc::start(dir.path(), "serve --store memory: --policy policy.json");
    // Each run copies the file and notes whether the variable was set, by epoch.
    let hook = r#"cp "$BOOTSYNC_CHANGED_PATHS_FILE" "seen-$BOOTSYNC_EPOCH"; if [ -n "${BOOTSYNC_CHANGED_PATHS+set}" ]; then printf %s "$BOOTSYNC_CHANGED_PATHS" > "env-$BOOTSYNC_EPOCH"; fi; echo $BOOTSYNC_EPOCH >> epochs"#;
    let _watch = watcher(dir.path(), &server.url, hook);
    let d = dir.path().to_path_buf();
    let first_epoch: u64 = support::wait_for(Duration::from_secs(30), "the first hook run", || {
        let d = d.clone();
        async move {
            let epochs = std::fs::read_to_string(d.join("epochs")).ok()?;
            epochs.lines().next()?.trim().parse().ok()
        }
    })
    .await;
    let seen = std::fs::read_to_string(d.join(format!("seen-{first_epoch}"))).unwrap();
    let listed: Vec<&str> = seen.lines().collect();
    assert!(
        seen.len() > 32 << 10,
        "the list is long: {} bytes",
        seen.len()
    );
    assert_eq!(listed.len(), names.len(), "every written file is listed");
    for name in &names {
        let dest = d.join("out").join(name).display().to_string();
        assert!(listed.contains(&dest.as_str()), "{dest} is not listed");
    }
    assert!(
        !d.join(format!("env-{first_epoch}")).exists(),
        "a list this long is not put in the environment"
    );

    // One file changes: a short list, in the file and in the variable alike.
    let mut second = first.clone();
    second["files"][0]["template"] = json!("changed");
    put_policy(&server.url, &second).await;
    let next_epoch: u64 = support::wait_for(Duration::from_secs(30), "the second hook run", || {
        let d = d.clone();
        async move {
            let epochs = std::fs::read_to_string(d.join("epochs")).ok()?;
            epochs.lines().nth(1)?.trim().parse().ok()
        }
    })
    .await;
    let changed = d.join("out").join(&names[0]).display().to_string();
    let seen = std::fs::read_to_string(d.join(format!("seen-{next_epoch}"))).unwrap();
    assert_eq!(seen.trim_end(), changed);
    let env = std::fs::read_to_string(d.join(format!("env-{next_epoch}"))).unwrap();
    assert_eq!(env, changed);
}
