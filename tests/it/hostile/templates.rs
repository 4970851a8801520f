//! Template bombs: text a policy's templates build without writing it.

use std::time::Duration;

use serde_json::json;

use crate::support;

/// Fuel counts instructions and the output limit sees written text, so a template could
/// double a string per instruction, or join a hundred thousand copies of a peer's metadata,
/// and take a server to gigabytes from one `/node` fetch. Such templates now render in a
/// process of their own under an address-space limit: each bomb fails its own node (500),
/// every other node is served, and the server stays small.
#[it::test(multi_thread)]
async fn every_template_bomb_fails_only_its_own_node_and_the_server_stays_small() {
    let doubling_sets: String = (0..40)
        .map(|i| format!("{{% set s{} = s{i} ~ s{i} %}}", i + 1))
        .collect();
    let branches = [
        ("written", "{{ ([node.metadata.blob] * 100000) | join }}".to_string()),
        (
            "namespace",
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}".to_string(),
        ),
        (
            "chain",
            format!("{{% set s0 = 'xxxxxxxx' %}}{doubling_sets}{{{{ s40 | length }}}}"),
        ),
        (
            "macro",
            "{% macro d(s, n) %}{% if n > 0 %}{{ d(s ~ s, n - 1) }}{% else %}{{ s | length }}{% endif %}{% endmacro %}{{ d('xxxxxxxx', 40) }}".to_string(),
        ),
    ];
    let mut template = String::new();
    for (id, bomb) in &branches {
        let keyword = if template.is_empty() { "if" } else { "elif" };
        template.push_str(&format!(
            "{{% {keyword} node.identifier == '{id}' %}}{bomb}"
        ));
    }
    template.push_str("{% endif %}ok {{ node.identifier }}");
    let mut ids: Vec<&str> = branches.iter().map(|(id, _)| *id).collect();
    ids.push("good");
    let policy =
        json!({"expect_identifiers": ids, "files": [{"path": "f.txt", "template": template}]});
    let (_dir, server) = support::serve_policy(&policy, "");
    let url = server.url.clone();
    let blob = "b".repeat(60_000);
    for id in &ids {
        let node = json!({"identifier": id, "ip": "10.0.0.1", "metadata": {"blob": blob}});
        let (status, _) = support::post(&url, "/register", &node).await;
        assert_eq!(status, 202, "{id}");
    }
    let fetch = |id: &'static str| {
        let url = url.clone();
        async move {
            let node = json!({"identifier": id, "ip": "10.0.0.1"});
            let (status, body) = support::post(&url, "/node?wait=30", &node).await;
            (status.as_u16(), body)
        }
    };
    for (id, _) in &branches {
        let id: &'static str = id;
        let (status, body) = fetch(id).await;
        assert_eq!(status, 500, "{id}: {body}");
        assert_eq!(body["code"], "internal", "{id}: {body}");
        let (status, body) = fetch("good").await;
        assert_eq!(status, 200, "good beside {id}: {body}");
        assert_eq!(body["files"][0]["content"], "ok good");
    }
    // Each failure is in the log with its reason: out of memory, in its own process.
    support::wait_for(Duration::from_secs(5), "the reasons in the log", || {
        let log = server.stderr();
        async move {
            let out_of_memory = log.matches("ran out of memory").count();
            (out_of_memory >= 4).then_some(())
        }
    })
    .await;
    support::assert_peak_under(
        server.pid(),
        300,
        "of the server through four template bombs",
    );
}

/// A server whose policy serves `template` as `f.txt` to `count` named nodes (`n00`, ...),
/// all registered.
async fn registered(
    template: &str,
    count: usize,
    flags: &str,
) -> (tempfile::TempDir, support::Proc, Vec<String>) {
    let ids: Vec<String> = (0..count).map(|i| format!("n{i:02}")).collect();
    let policy =
        json!({"expect_identifiers": ids, "files": [{"path": "f.txt", "template": template}]});
    let (dir, server) = support::serve_policy(&policy, flags);
    for id in &ids {
        let node = json!({"identifier": id, "ip": "10.0.0.1"});
        let (status, _) = support::post(&server.url, "/register", &node).await;
        assert_eq!(status, 202, "{id}");
    }
    (dir, server, ids)
}

/// Renders in processes of their own share a few processes among many requests: with more
/// nodes fetching at once than there are render processes, every node is served its own file.
#[it::test(multi_thread)]
async fn concurrent_renders_share_the_render_processes_and_every_node_is_served() {
    // `set` could grow a value without writing it, so this template renders in a process.
    let template = "{% set me = node.identifier %}{{ me }} of {{ peers | length }}";
    let (_dir, server, ids) = registered(template, 40, "--render-threads 2").await;
    let url = server.url.clone();
    let fetches = ids.iter().map(|id| {
        let (url, id) = (url.clone(), id.clone());
        tokio::spawn(async move {
            let node = json!({"identifier": id, "ip": "10.0.0.1"});
            let (status, body) = support::post(&url, "/node?wait=30", &node).await;
            (id, status.as_u16(), body)
        })
    });
    for fetch in fetches.collect::<Vec<_>>() {
        let (id, status, body) = fetch.await.unwrap();
        assert_eq!(status, 200, "{id}: {body}");
        assert_eq!(body["files"][0]["content"], format!("{id} of 39"));
    }
    // The renders ran in render processes, and no more of them than asked for.
    let children = render_processes(server.pid()).len();
    assert!((1..=2).contains(&children), "{children} render processes");
}

/// The live child processes of `pid` (its render processes); one that ended and waits to be
/// reaped is not counted.
fn render_processes(pid: u32) -> std::collections::BTreeSet<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("children")).ok())
        .flat_map(|children| {
            children
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u32>>()
        })
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| !rest.starts_with('Z'))
            })
        })
        .collect()
}

/// A node that hangs up while its render runs must not cost the server its render process:
/// the render finishes and the process serves the next node, rather than being stopped and
/// started again with the whole epoch loaded anew.
#[it::test(multi_thread)]
async fn nodes_hanging_up_mid_render_do_not_restart_the_render_process() {
    // `set` puts the template in a process; the loop makes each render take a while.
    let template = "{% set me = node.identifier %}{% for i in range(1000) %}{% for j in range(400) %}{% endfor %}{% endfor %}{{ me }}";
    let (_dir, server, ids) = registered(template, 12, "--render-threads 1").await;
    let url = server.url.clone();
    let fetch = |id: &str| json!({"identifier": id, "ip": "10.0.0.1"});
    let (status, body) = support::post(&url, "/node", &fetch(&ids[0])).await;
    assert_eq!(status, 200, "{body}");
    let started = render_processes(server.pid());
    assert_eq!(started.len(), 1, "{started:?}");
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(30))
        .build()
        .unwrap();
    for id in &ids[1..11] {
        let asked = impatient
            .post(format!("{url}/node"))
            .json(&fetch(id))
            .send()
            .await;
        assert!(
            asked.is_err(),
            "{id} was answered within 30 ms: the render is too quick to hang up on"
        );
    }
    let (status, body) = support::post(&url, "/node", &fetch(&ids[11])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["files"][0]["content"], "n11");
    assert_eq!(
        render_processes(server.pid()),
        started,
        "the render process was stopped and another started"
    );
}
