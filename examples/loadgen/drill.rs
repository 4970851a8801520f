//! B10, the fleet drill: three release-binary servers on a three-member loopback etcd, 1 000
//! watchers spread over them (the library's own watch code, in this process, each given all
//! three servers), 200 seed-style clients joining, a policy change rolled out in waves, and,
//! mid-change, one server and one etcd member killed -9 and brought back later.
//!
//! It prints and returns: the time from the kill to every watcher being served the final
//! version and to every report of it being stored, registrations and reports lost (must be
//! 0), seed clients served, and peak RSS per server. `BOOTSYNC_DRILL_KILL=server|etcd` kills
//! only one of the two (variants, reported under their own names); `RUST_LOG=warn` shows each
//! watcher's move to another server.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bootsync::cfgsync::client::CfgsyncClient;
use bootsync::cfgsync::watch::{Ended, Events, Watch};
use bootsync::cfgsync::{ArtifactOutputMap, NodeRegistration};
use bootsync::servers::{ServerList, Servers};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{free_port, release_binary};

/// One etcd member: its command line, so it can be started again on its data dir.
struct Member {
    args: Vec<String>,
    client_url: String,
    log: PathBuf,
    child: Option<Child>,
}

/// A loopback etcd cluster in a temporary directory; its members are killed on drop.
struct Etcd {
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn start(size: usize) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let client_url = format!("http://127.0.0.1:{client}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                Member {
                    args: vec![
                        format!("--name=m{i}"),
                        format!("--data-dir={}", dir.path().join(format!("m{i}")).display()),
                        format!("--listen-client-urls={client_url}"),
                        format!("--advertise-client-urls={client_url}"),
                        format!("--listen-peer-urls={peer_url}"),
                        format!("--initial-advertise-peer-urls={peer_url}"),
                        format!("--initial-cluster={}", initial.join(",")),
                        "--initial-cluster-state=new".into(),
                        format!("--initial-cluster-token=drill-{}", std::process::id()),
                        "--max-txn-ops=2048".into(),
                        "--heartbeat-interval=50".into(),
                        "--election-timeout=500".into(),
                    ],
                    client_url,
                    log: dir.path().join(format!("m{i}.log")),
                    child: None,
                }
            })
            .collect();
        let mut etcd = Etcd { members, _dir: dir };
        for i in 0..size {
            etcd.spawn(i);
        }
        etcd
    }

    fn spawn(&mut self, i: usize) {
        let member = &mut self.members[i];
        let log = std::fs::File::create(&member.log).unwrap();
        let child = Command::new("etcd")
            .args(&member.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd on PATH (Debian's etcd-server)");
        member.child = Some(child);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn endpoints(&self) -> String {
        let urls: Vec<&str> = self.members.iter().map(|m| m.client_url.as_str()).collect();
        urls.join(",")
    }

    async fn healthy(&self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for member in &self.members {
            loop {
                let url = format!("{}/health", member.client_url);
                if let Ok(r) = http.get(&url).send().await
                    && r.text()
                        .await
                        .is_ok_and(|t| t.contains("\"health\":\"true\""))
                {
                    break;
                }
                assert!(Instant::now() < deadline, "etcd did not become healthy");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// One `bootsync serve` on the shared store.
struct Node {
    child: Child,
    url: String,
    args: Vec<String>,
    log: PathBuf,
}

impl Node {
    async fn start(args: Vec<String>, log: PathBuf, port: u16) -> Node {
        let url = format!("http://127.0.0.1:{port}");
        let child = Command::new(release_binary())
            .args(&args)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        crate::wait_healthy(
            &bootsync::tls::plain_client(),
            &url,
            Instant::now(),
            Duration::from_secs(60),
        )
        .await;
        Node {
            child,
            url,
            args,
            log,
        }
    }

    fn peak_rss_mb(&self) -> f64 {
        crate::peak_rss_mb(self.child.id())
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn restart(&mut self) {
        let port: u16 = self.url.rsplit(':').next().unwrap().parse().unwrap();
        let log = self.log.with_extension("restarted.log");
        self.kill();
        *self = Node::start(self.args.clone(), log, port).await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One write of a watcher: the version it wrote, and when.
type Write = (Option<u64>, Instant);

/// What every watcher wrote.
#[derive(Default)]
struct Seen {
    written: Mutex<HashMap<String, Vec<Write>>>,
    /// Problems the watchers noted, by their first words.
    problems: Mutex<std::collections::BTreeMap<String, usize>>,
}

/// The events of one watcher.
struct Recorder {
    identifier: String,
    seen: Arc<Seen>,
}

impl Events for Recorder {
    fn progress(&self, event: &str, _text: &str, fields: Value) {
        if event == "written" {
            let version = fields["version"].as_u64();
            let mut written = self.seen.written.lock().unwrap();
            let list = written.entry(self.identifier.clone()).or_default();
            list.push((version, Instant::now()));
        }
    }

    fn problem(&self, event: &str, text: &str, _fields: Value) {
        let words: Vec<&str> = text.split_whitespace().take(6).collect();
        let kind = format!("{event}: {}", words.join(" "));
        *self.seen.problems.lock().unwrap().entry(kind).or_default() += 1;
    }
}

fn policy(n: usize, marker: &str) -> Value {
    json!({
        "expect_nodes": n,
        "files": [{"path": "app.conf", "template": format!("id: {{{{ node.identifier }}}}\n{marker}\n")}],
        "rollout": {"waves": ["10%", "50%", "100%"], "pause": "1s", "progress_deadline": "5m"},
    })
}

fn identifier(i: usize) -> String {
    format!("w{i:05}")
}

/// One watcher: registers, is served, and watches until `stop`, through the real client and
/// watch code with every server listed.
async fn watcher(
    i: usize,
    client: Arc<CfgsyncClient>,
    root: PathBuf,
    seen: Arc<Seen>,
    stop: CancellationToken,
) {
    let id = identifier(i);
    let ip = format!("10.1.{}.{}", i / 250, i % 250 + 1);
    let registration = NodeRegistration::new(id.clone(), ip.parse().unwrap());
    let outputs = ArtifactOutputMap::new().with_root(root.join(&id));
    let recorder = Recorder {
        identifier: id.clone(),
        seen: seen.clone(),
    };
    let first = client
        .register_and_wait(&registration, Duration::from_secs(300), false, &|_| {})
        .await
        .expect("every watcher is served");
    let files = outputs.write_all(&first.files).unwrap();
    recorder.progress("written", "", json!({"version": first.version}));
    let watch = Watch {
        client: &client,
        registration: &registration,
        outputs: &outputs,
        on_change: None,
        events: &recorder,
        min_hook_interval: Duration::ZERO,
    };
    assert_eq!(watch.run(first, &files, stop).await, Ended::Shutdown);
}

/// One seed-style client: registers with the one server it knows, then asks for its files
/// without `wait` every 250 ms until they come (retrying a server that is down); the moment
/// it was served.
async fn seed(http: reqwest::Client, url: String, i: usize) -> Instant {
    let me = json!({"identifier": format!("s{i:04}"), "ip": format!("10.2.{}.{}", i / 250, i % 250 + 1)});
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut registered = false;
    loop {
        assert!(Instant::now() < deadline, "seed client {i} was not served");
        if !registered {
            registered = http
                .post(format!("{url}/register"))
                .json(&me)
                .send()
                .await
                .is_ok_and(|r| r.status() == 202);
        }
        if registered
            && let Ok(r) = http.post(format!("{url}/node")).json(&me).send().await
            && r.status() == 200
        {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls until every one of `n` watchers wrote `version`; the moment the last one did.
async fn all_written(seen: &Seen, n: usize, version: u64, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        let last = {
            let written = seen.written.lock().unwrap();
            let at: Vec<Instant> = written
                .values()
                .filter_map(|w| w.iter().find(|(v, _)| *v == Some(version)).map(|(_, t)| *t))
                .collect();
            (at.len() == n).then(|| at.into_iter().max().unwrap())
        };
        if let Some(last) = last {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "not every watcher wrote {version}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn nodes(http: &reqwest::Client, url: &str) -> Value {
    let r = http.get(format!("{url}/v1/nodes")).send().await.unwrap();
    r.json().await.unwrap()
}

/// Polls `url`'s `/v1/nodes` until `n` watchers reported ok on `version`; the moment it saw
/// that, and the listing.
async fn all_reported(
    http: &reqwest::Client,
    url: &str,
    n: usize,
    version: u64,
    limit: Duration,
) -> (Instant, Value) {
    let deadline = Instant::now() + limit;
    loop {
        let listing = nodes(http, url).await;
        let ok = listing["nodes"].as_array().map_or(0, |nodes| {
            nodes
                .iter()
                .filter(|node| {
                    node["identifier"]
                        .as_str()
                        .is_some_and(|id| id.starts_with('w'))
                        && node["applied"]["result"] == "ok"
                        && node["applied"]["version"] == version
                })
                .count()
        });
        if ok == n {
            return (Instant::now(), listing);
        }
        assert!(
            Instant::now() < deadline,
            "{ok} of {n} reports of {version} stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn drill(watchers: usize, seeds: usize) -> Value {
    if std::env::var_os("RUST_LOG").is_some() {
        bootsync::telemetry::init(bootsync::telemetry::LogFormat::Text);
    }
    let http = bootsync::tls::plain_client();
    let mut etcd = Etcd::start(3);
    etcd.healthy(&http).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.json"),
        policy(watchers, "v1").to_string(),
    )
    .unwrap();
    // A fresh prefix per run: runs never read each other's keys.
    let store = format!(
        "etcd:{}?prefix=/drill-{}-{}/",
        etcd.endpoints(),
        std::process::id(),
        free_port()
    );
    let mut servers = Vec::new();
    for k in 0..3 {
        let mut args: Vec<String> = [
            "serve",
            "--store",
            &store,
            "--max-connections-per-source",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if k == 0 {
            args.extend([
                "--policy".into(),
                dir.path().join("policy.json").display().to_string(),
            ]);
        }
        let log = std::env::temp_dir().join(format!("bootsync-drill-server-{k}.log"));
        servers.push(Node::start(args, log, free_port()).await);
    }
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let list: ServerList = urls.join(",").parse().unwrap();
    let shared = Servers::connect(list.targets(), |b| {
        bootsync::tls::http_client(&[], b.pool_max_idle_per_host(watchers + seeds))
    })
    .unwrap();
    let seen = Arc::new(Seen::default());
    let stop = CancellationToken::new();
    let root = dir.path().join("nodes");
    let started = Instant::now();
    let clients: Vec<Arc<CfgsyncClient>> = (0..watchers)
        .map(|i| {
            let client = CfgsyncClient::with_servers(shared.clone())
                .preferring(&identifier(i))
                .with_long_poll(Duration::from_secs(30));
            Arc::new(client)
        })
        .collect();
    let fleet: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, client)| {
            tokio::spawn(watcher(
                i,
                client.clone(),
                root.clone(),
                seen.clone(),
                stop.clone(),
            ))
        })
        .collect();
    // Every watcher on v1 first.
    let v1 = loop {
        let first: Vec<Option<u64>> = {
            let written = seen.written.lock().unwrap();
            written
                .values()
                .filter_map(|w| w.first().map(|(v, _)| *v))
                .collect()
        };
        if first.len() == watchers {
            break first[0].expect("a policy payload carries its version");
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the fleet did not settle on v1"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let settled = started.elapsed();
    // Seed-style clients join meanwhile, each knowing one server, as the seed's client does.
    let seed_tasks: Vec<_> = (0..seeds)
        .map(|i| tokio::spawn(seed(http.clone(), urls[i % 3].clone(), i)))
        .collect();
    let answer = http
        .put(format!("{}/v1/cfgsync/policy", urls[1]))
        .json(&policy(watchers, "v2"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "the install was refused");
    let v2 = answer.json::<Value>().await.unwrap()["version"]
        .as_u64()
        .unwrap();
    let installed = Instant::now();
    // Mid-change: once the first wave wrote v2, server 0 and etcd member 0 die.
    loop {
        let on_v2 = {
            let written = seen.written.lock().unwrap();
            written
                .values()
                .filter(|w| w.iter().any(|(v, _)| *v == Some(v2)))
                .count()
        };
        if on_v2 >= watchers / 10 {
            break;
        }
        assert!(
            installed.elapsed() < Duration::from_secs(120),
            "the first wave did not apply"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The watchers on server 0 when it dies.
    let orphans: Vec<&Arc<CfgsyncClient>> =
        clients.iter().filter(|c| c.server() == urls[0]).collect();
    let orphaned = orphans.len();
    // Whether the member killed leads the cluster (its proposals in flight then time out).
    let status: Value = http
        .post(format!(
            "{}/v3/maintenance/status",
            etcd.members[0].client_url
        ))
        .body("{}")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let leader_killed = status["leader"] == status["header"]["member_id"];
    let rss_before_kill = servers[0].peak_rss_mb();
    let what = std::env::var("BOOTSYNC_DRILL_KILL").unwrap_or_else(|_| "both".into());
    let killed = Instant::now();
    if what == "both" || what == "server" {
        servers[0].kill();
    }
    if what == "both" || what == "etcd" {
        etcd.kill(0);
    }
    // They move at once: their held requests broke.
    let moved = loop {
        if what == "etcd" || orphans.iter().all(|c| c.server() != urls[0]) {
            break Instant::now();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "watchers did not move"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let served = all_written(&seen, watchers, v2, Duration::from_secs(300)).await;
    let (reported, _) = all_reported(&http, &urls[1], watchers, v2, Duration::from_secs(300)).await;
    let change = installed.elapsed();
    // Both come back.
    etcd.spawn(0);
    servers[0].restart().await;
    let restarted = Instant::now();
    let mut seeds_served = 0;
    for task in seed_tasks {
        task.await.expect("every seed client is served");
        seeds_served += 1;
    }
    // Nothing acknowledged is lost: every registration (each was answered 202 before its node
    // was served) and every watcher's last report, on every server, the restarted one too.
    let mut lost_registrations = 0;
    let mut lost_reports = 0;
    for url in &urls {
        let (_, listing) = all_reported(&http, url, watchers, v2, Duration::from_secs(120)).await;
        let listed: std::collections::HashSet<&str> = listing["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["identifier"].as_str())
            .collect();
        let expected = (0..watchers)
            .map(identifier)
            .chain((0..seeds).map(|i| format!("s{i:04}")));
        lost_registrations += expected.filter(|id| !listed.contains(id.as_str())).count();
        lost_reports += listing["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| {
                n["identifier"]
                    .as_str()
                    .is_some_and(|id| id.starts_with('w'))
            })
            .filter(|n| n["applied"]["version"] != v2)
            .count();
    }
    // Each watcher wrote v1 and v2 once: a move to another server rewrote nothing.
    let mut sequences: std::collections::BTreeMap<Vec<Option<u64>>, usize> = Default::default();
    for writes in seen.written.lock().unwrap().values() {
        *sequences
            .entry(writes.iter().map(|(v, _)| *v).collect())
            .or_default() += 1;
    }
    let rewrites: usize = sequences
        .iter()
        .filter(|(sequence, _)| **sequence != [Some(v1), Some(v2)])
        .map(|(_, count)| count)
        .sum();
    println!(
        "  problems the watchers noted: {:?}",
        seen.problems.lock().unwrap()
    );
    if rewrites > 0 {
        println!("  the versions each watcher wrote, and how many wrote them: {sequences:?}");
    }
    // The moved watchers come back to their preferred server over a window (each after a
    // random 15–30 s away, at the end of its held request).
    let mut back: Vec<f64> = Vec::new();
    if what != "etcd" {
        let mut waiting: Vec<&Arc<CfgsyncClient>> = orphans.clone();
        while !waiting.is_empty() && restarted.elapsed() < Duration::from_secs(150) {
            waiting.retain(|c| {
                let home = c.server() == urls[0];
                if home {
                    back.push(restarted.elapsed().as_secs_f64());
                }
                !home
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (first_back, last_back) = (
        back.first().copied().unwrap_or(f64::NAN),
        back.last().copied().unwrap_or(f64::NAN),
    );
    stop.cancel();
    for task in fleet {
        let _ = task.await;
    }
    let rss: Vec<f64> = servers.iter().map(Node::peak_rss_mb).collect();
    let secs = |at: Instant| at.duration_since(killed).as_secs_f64();
    println!(
        "B10 drill: {watchers} watchers on 3 servers (3-member etcd) settled on v1 in {:.1} s; change v{v1}->v{v2} in waves [10%, 50%, 100%], pause 1 s; server 0 and etcd member 0 killed -9 after the first wave",
        settled.as_secs_f64()
    );
    println!(
        "  kill -> the {orphaned} watchers on server 0 all moved to another {:.3} s; every watcher served the final version {:.2} s, every report of it stored {:.2} s; install -> all reported {:.2} s",
        secs(moved),
        secs(served),
        secs(reported),
        change.as_secs_f64()
    );
    println!("  the etcd member killed was the leader: {leader_killed}");
    println!(
        "  lost: {lost_registrations} registrations, {lost_reports} reports (all 3 servers checked); seed clients served {seeds_served}/{seeds}; watchers that wrote anything but v1 then v2: {rewrites}"
    );
    println!(
        "  after server 0's restart, {} of {orphaned} watchers were back on it: the first after {first_back:.1} s, the last after {last_back:.1} s",
        back.len()
    );
    println!(
        "  peak RSS: server 0 {rss_before_kill:.0} MB before the kill ({:.0} MB restarted), server 1 {:.0} MB, server 2 {:.0} MB",
        rss[0], rss[1], rss[2]
    );
    json!({
        "watchers": watchers,
        "seeds": seeds,
        "settled_v1_s": settled.as_secs_f64(),
        "etcd_leader_killed": leader_killed,
        "orphaned_watchers": orphaned,
        "kill_to_orphans_moved_s": secs(moved),
        "kill_to_all_served_final_s": secs(served),
        "kill_to_all_reported_final_s": secs(reported),
        "install_to_all_reported_s": change.as_secs_f64(),
        "lost_registrations": lost_registrations,
        "lost_reports": lost_reports,
        "seeds_served": seeds_served,
        "rewrites": rewrites,
        "returned_to_server0": back.len(),
        "restart_to_first_return_s": first_back,
        "restart_to_last_return_s": last_back,
        "peak_rss_mb": {"server0_before_kill": rss_before_kill, "server0_restarted": rss[0], "server1": rss[1], "server2": rss[2]},
    })
}
