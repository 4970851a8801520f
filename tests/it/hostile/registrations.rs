//! Registration storms against the real server: a node that keeps changing, and lifecycle
//! changes racing admission.

use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{self, Proc};

fn client(token: &str) -> reqwest::Client {
    bootsync::tls::install_crypto_provider();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// A watching node whose hook appends each epoch it saw to `ID.hook`.
fn watcher(dir: &Path, url: &str, id: &str) -> Proc {
    let hook = format!("echo $BOOTSYNC_EPOCH >> {id}.hook");
    support::watcher(
        dir,
        url,
        id,
        "10.0.0.1",
        &hook,
        &["--join-token-file", "join"],
    )
}

/// Registers `body` at `url` in a task of its own: the answer's status, or 0 when the
/// request failed.
fn spawn_register(http: &reqwest::Client, url: &str, body: Value) -> tokio::task::JoinHandle<u16> {
    let sent = http.post(format!("{url}/register")).json(&body).send();
    tokio::spawn(async move { sent.await.map_or(0, |r| r.status().as_u16()) })
}

/// Waits until every watcher's hook runs satisfy `done`.
async fn every_watcher(dir: &Path, ids: &[&str], what: &str, done: impl Fn(&[u64]) -> bool) {
    support::wait_for(Duration::from_secs(30), what, || {
        let all = ids.iter().all(|id| done(&support::hook_runs(dir, id)));
        async move { all.then_some(()) }
    })
    .await;
}

/// One join-token holder re-registering itself with changing metadata thousands of times must
/// not make every watching node reload as often: a node may change what its peers see a few
/// times a minute, and a watcher coalesces epochs that come faster than its hook may run.
#[it::test(multi_thread)]
async fn nine_thousand_re_registrations_cause_a_handful_of_hook_runs() {
    let template = "{% for p in peers %}{{ p.identifier }}={{ p.metadata | tojson }}\n{% endfor %}";
    let policy = json!({"expect_nodes": 6, "files": [{"path": "peers.txt", "template": template}]});
    let dir = support::dir_with(&[
        ("policy.json", &policy.to_string()),
        ("join", "join-token-0123456789"),
        ("admin", "admin-token-0123456789"),
    ]);
    let server = Proc::start(
        dir.path(),
        "serve --store sqlite:s.db --policy policy.json --join-token-file join --admin-token-file admin",
    );
    let ids = ["w1", "w2", "w3", "w4", "w5"];
    let watchers: Vec<Proc> = ids
        .iter()
        .map(|id| watcher(dir.path(), &server.url, id))
        .collect();
    // One client for the whole storm: its connections are reused, as a real one's would be.
    let http = client("join-token-0123456789");
    let register = |n: u64| {
        let body = json!({"identifier": "noisy", "ip": "10.0.0.9", "metadata": {"n": n}});
        spawn_register(&http, &server.url, body)
    };
    assert_eq!(register(0).await.unwrap(), 202);
    let first = |runs: &[u64]| !runs.is_empty();
    every_watcher(dir.path(), &ids, "every watcher's first hook", first).await;
    // The storm: 9 000 re-registrations, each with new metadata, 24 at a time.
    let mut answers = std::collections::BTreeMap::<u16, usize>::new();
    let storm = std::time::Instant::now();
    for round in 0..375u64 {
        let batch: Vec<_> = (0..24).map(|i| register(1 + round * 24 + i)).collect();
        for answer in batch {
            *answers.entry(answer.await.unwrap()).or_default() += 1;
        }
    }
    let storm = storm.elapsed();
    eprintln!("9 000 re-registrations in {storm:?} answered {answers:?}");
    assert!(
        answers.get(&429).copied().unwrap_or(0) > 8_900,
        "the changes were not limited: {answers:?}"
    );
    // Every watcher ends on the server's final epoch.
    let admin = Some("admin-token-0123456789");
    let nodes = format!("{}/v1/nodes", server.url);
    let epoch = support::call(Method::GET, &nodes, admin, None).await.1["epoch"]
        .as_u64()
        .unwrap();
    let last = |runs: &[u64]| runs.last() == Some(&epoch);
    every_watcher(dir.path(), &ids, "every watcher on the last epoch", last).await;
    // The first write's run, a burst of three changes, one more per 20 s of storm (three a
    // minute), and the change that may land as the storm ends.
    let allowed = 1 + 3 + storm.as_secs().div_ceil(20) as usize + 1;
    for id in ids {
        let runs = support::hook_runs(dir.path(), id);
        eprintln!("{id}: the hook ran {} times: epochs {runs:?}", runs.len());
        assert!(
            runs.len() <= allowed,
            "{id} ran its hook {} times (at most {allowed})",
            runs.len()
        );
    }
    drop(watchers);
}

/// `nodes remove` racing a registration's recount stored a ledger above the real count, so
/// new nodes got 409 with room left. The ledger is never deleted now: bypassing writes mark
/// it stale with a put, and every guard on it is a mod revision.
#[it::test(multi_thread)]
async fn a_ledger_race_storm_ends_with_the_ledger_equal_to_the_stored_count_20_times() {
    let dir = support::dir_with(&[(
        "policy.json",
        &json!({"expect_nodes": 1000, "files": [{"path": "f", "template": "x"}]}).to_string(),
    )]);
    for run in 0..20 {
        let server = Proc::start(
            dir.path(),
            &format!("serve --store sqlite:ledger-{run}.db --policy policy.json"),
        );
        let url = server.url.clone();
        let http = client("none");
        let register =
            |id: String| spawn_register(&http, &url, json!({"identifier": id, "ip": "10.0.0.1"}));
        // A base set, then removals, replacements and `/v1` deletes while others register.
        for i in 0..20 {
            assert_eq!(register(format!("base-{i}")).await.unwrap(), 202);
        }
        let mut racing = Vec::new();
        for i in 0..40 {
            racing.push(register(format!("new-{i}")));
            let (http, url) = (http.clone(), url.clone());
            racing.push(tokio::spawn(async move {
                let r = match i % 4 {
                    0 => http.delete(format!("{url}/v1/nodes/base-{i}")).send().await,
                    1 => {
                        let body = json!({"identifier": format!("swap-{i}")});
                        let at = format!("{url}/v1/nodes/base-{i}/replace");
                        http.post(at).json(&body).send().await
                    }
                    2 => {
                        let at = format!("{url}/v1/config/__cfgsync__/registration/base-{i}");
                        http.delete(at).send().await
                    }
                    _ => return 0,
                };
                r.map(|r| r.status().as_u16()).unwrap_or(0)
            }));
        }
        for task in racing {
            let status = task.await.unwrap();
            assert!(status == 0 || status < 300 || status == 404, "{status}");
        }
        let ledger_and_count = || async {
            let ledger =
                support::fetch_json(format!("{url}/v1/config/__cfgsync__/admission/current"))
                    .await
                    .unwrap();
            let listed = support::fetch_json(format!("{url}/v1/config/__cfgsync__/registration"))
                .await
                .unwrap();
            let count = listed["entries"].as_object().unwrap().len() as u64;
            (ledger["value"].clone(), count)
        };
        let (ledger, count) = ledger_and_count().await;
        if ledger["stale"] != true {
            assert_eq!(ledger["registrations"], count, "run {run}: {ledger}");
        }
        // Whatever the last write was, the next registration leaves an exact count.
        assert_eq!(register(format!("last-{run}")).await.unwrap(), 202);
        let (ledger, count) = ledger_and_count().await;
        assert_eq!(ledger["registrations"], count, "run {run}: {ledger}");
        assert_ne!(ledger["stale"], true, "run {run}: {ledger}");
    }
}

/// `nodes replace` raced the old node's re-registration and could leave both registered, two
/// nodes in one slot. A registration is now guarded on its removal marker in the same batch,
/// so one that read before the replacement committed decides again, and is refused.
#[it::test(multi_thread)]
async fn a_replacement_racing_the_old_node_never_leaves_both_registered_20_times() {
    let dir = support::dir_with(&[(
        "policy.json",
        &json!({"expect_nodes": 1000, "files": [{"path": "f", "template": "x"}]}).to_string(),
    )]);
    let server = Proc::start(
        dir.path(),
        "serve --store sqlite:replace.db --policy policy.json",
    );
    let url = server.url.clone();
    let http = client("none");
    for run in 0..20 {
        let (old, new) = (format!("old-{run}"), format!("new-{run}"));
        let register = |n: u32| {
            let body = json!({"identifier": old, "ip": "10.0.0.1", "metadata": {"n": n}});
            spawn_register(&http, &url, body)
        };
        assert_eq!(register(0).await.unwrap(), 202);
        let again: Vec<_> = (1..4).map(register).collect();
        let replaced = http
            .post(format!("{url}/v1/nodes/{old}/replace"))
            .json(&json!({"identifier": new}))
            .send()
            .await
            .unwrap()
            .status();
        for registration in again {
            let status = registration.await.unwrap();
            assert!([202, 409, 429].contains(&status), "run {run}: {status}");
        }
        let listed = support::fetch_json(format!("{url}/v1/config/__cfgsync__/registration"))
            .await
            .unwrap();
        let entries = listed["entries"].as_object().unwrap();
        let both = entries.contains_key(&old) && entries.contains_key(&new);
        assert!(
            !both,
            "run {run} (replace {replaced}): {old} and {new} both registered"
        );
    }
}

/// Registrations written through `/v1` skipped the 64 KiB metadata limit of `/register`.
#[it::test]
async fn a_registration_written_through_v1_keeps_the_metadata_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Proc::start(dir.path(), "serve --store memory:");
    let record = json!({"identifier": "big", "ip": "10.0.0.1", "metadata": {"blob": "x".repeat(70_000)},
                        "first_seen_ms": 1, "last_seen_ms": 1});
    let at = format!("{}/v1/config/__cfgsync__/registration/big", server.url);
    let answer = client("none").put(&at).json(&record).send().await.unwrap();
    assert_eq!(answer.status(), 422);
    let body: Value = answer.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("over the limit"),
        "{body}"
    );
    assert_eq!(
        support::get(&at).await.unwrap().status(),
        404,
        "nothing stored"
    );
}
