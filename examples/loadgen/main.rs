//! Whole-system figures for `shared/design/quality.md`: B1 (`/node` throughput and latency at
//! 1k/10k/100k registrations), B2 (long-poll convergence), B3 over HTTP (durable registrations
//! per second), B5 (a steady wake with 500 initialisers), B4/B7 (idle cost and start-up of
//! the release binary), B8 (`rollout`: a policy change reaching 5 000 watchers, with and
//! without waves), B9 (`preview`: a policy diff against 10 000 registrations) and B10
//! (`drill`: three servers on a three-member etcd, a server and a member killed mid-change).
//!
//! ```sh
//! cargo build --release
//! cargo run --release --example loadgen -- all          # or: b1 b2 b3 b5 b8 b9 drill idle
//! BOOTSYNC_IDLE_SECS=600 cargo run --release --example loadgen -- idle   # the full B4 window
//! ```
//! Each part prints its figures; the summary goes to `target/bench/loadgen.json`. B6 runs B1
//! and B3 on another store: `BOOTSYNC_LOADGEN_STORE=etcd:http://127.0.0.1:2379,... loadgen b1 b3`;
//! each server it starts there gets a key prefix of its own, so runs never see each other's keys.

mod drill;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bootsync::bootstrap::{Engine, EngineOptions, HttpGate, Outcome, Registry, Spec};
use bootsync::cfgsync::{Policy, install, state};
use bootsync::client::{ApiClient, RemoteStore};
use bootsync::metrics::Metrics;
use bootsync::server::{self, AppState, ServerOptions};
use bootsync::store::memory::MemoryStore;
use bootsync::store::sqlite::{SqliteOptions, SqliteStore};
use bootsync::store::{
    Batch, CFGSYNC_NAMESPACE, DynStore, Key, Limits, Listing, NamespaceTree, Revision, Store,
    Watch, WatchFilter,
};
use serde_json::{Value, json};

const CONCURRENCY: usize = 64;
const WINDOW: Duration = Duration::from_secs(5);

async fn start_server(store: DynStore) -> String {
    let mut options = ServerOptions::default();
    options.cfgsync.admission.max_registrations = usize::MAX;
    let state = AppState::new(store, options, Arc::new(Metrics::new()))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Runs for the rest of the process: the handle is not kept.
    let running = server::spawn(state, listener, None, Default::default()).unwrap();
    running.url().to_string()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn registration(i: usize) -> Value {
    json!({"identifier": format!("node-{i:06}"), "ip": format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255), "metadata": {"port": 3000}})
}

/// Registers `n` nodes straight into the store, in batches, as if they had called /register.
async fn seed_registrations(store: &DynStore, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut batch = Batch::new();
        for &i in chunk {
            let reg = registration(i);
            let record = json!({"identifier": reg["identifier"], "ip": reg["ip"], "metadata": reg["metadata"], "first_seen_ms": 0, "last_seen_ms": 0});
            batch = batch.put(
                Key::new(
                    CFGSYNC_NAMESPACE,
                    state::REGISTRATION,
                    reg["identifier"].as_str().unwrap(),
                ),
                record,
            );
        }
        store.apply(batch).await.unwrap();
    }
}

/// B1s and its shared-file variant: `/node` throughput and latency with `n` registered nodes
/// and a small per-node file (identifier, index, peer count), in process on the memory store.
async fn b1s(n: usize, peer_list: bool) -> Value {
    let store: DynStore = Arc::new(MemoryStore::new(Limits {
        max_value_bytes: 64 << 20,
        ..Limits::default()
    }));
    let shared = if peer_list {
        "{% for p in nodes %}{{ p.ip }}\n{% endfor %}"
    } else {
        "nodes: {{ nodes | length }}"
    };
    let policy: Policy = serde_json::from_value(json!({
        "expect_nodes": n,
        "files": [{"path": "/config.yaml", "template": "id: {{ node.identifier }}\nindex: {{ index }}\npeers: {{ peers | length }}\n"}],
        "shared_files": [{"path": "peers.txt", "template": shared}],
    }))
    .unwrap();
    seed_registrations(&store, n).await;
    let started = Instant::now();
    install::install_policy(store.as_ref(), &policy, true)
        .await
        .unwrap();
    let url = start_server(store).await;
    let http = bootsync::tls::plain_client();
    // Ready once the materialisation finished.
    loop {
        let r = http
            .post(format!("{url}/node"))
            .json(&registration(0))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let materialise = started.elapsed();
    let deadline = Instant::now() + WINDOW;
    let mut tasks = Vec::new();
    for c in 0..CONCURRENCY {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = c;
            while Instant::now() < deadline {
                let t = Instant::now();
                fetch(&http, &url, i % n).await;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                i += CONCURRENCY;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let throughput = all.len() as f64 / WINDOW.as_secs_f64();
    let (p50, p99) = (percentile(&all, 0.5), percentile(&all, 0.99));
    println!(
        "B1s n={n:>6} shared_peer_file={peer_list:<5}: {throughput:>8.0} req/s  p50 {p50:.2} ms  p99 {p99:.2} ms  (first payload after {:.2?})",
        materialise
    );
    json!({"n": n, "shared_peer_file": peer_list, "requests_per_sec": throughput, "p50_ms": p50, "p99_ms": p99, "first_payload_ms": materialise.as_millis()})
}

/// How a per-node file lists its peers.
#[derive(Debug, Clone, Copy)]
enum PeerForm {
    /// A template loop: `{% for p in peers %}"{{ p.ip }}"...{% endfor %}`.
    Loop,
    /// The native helper: `{{ peer_ips }}`.
    Helper,
}

impl PeerForm {
    fn name(self) -> &'static str {
        match self {
            PeerForm::Loop => "loop",
            PeerForm::Helper => "peer_ips",
        }
    }

    fn template(self) -> &'static str {
        match self {
            PeerForm::Loop => {
                "id: {{ node.identifier }}\nindex: {{ index }}\npeers: [{% for p in peers %}\"{{ p.ip }}\"{% if not loop.last %}, {% endif %}{% endfor %}]\n"
            }
            PeerForm::Helper => {
                "id: {{ node.identifier }}\nindex: {{ index }}\npeers: {{ peer_ips }}\n"
            }
        }
    }
}

/// The release binary serving `policy` on a fresh SQLite store, as a user runs it.
struct Server {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

/// `url` with a key prefix of its own for this run: runs on one etcd never read each other's
/// keys (a 1 000-node run once measured the 10 000 registrations a previous run left).
fn isolated(url: &str) -> String {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let Some(endpoints) = url.strip_prefix("etcd:") else {
        return url.to_string();
    };
    let run = format!(
        "{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    );
    match endpoints.split_once("?prefix=") {
        Some((hosts, prefix)) => format!(
            "etcd:{hosts}?prefix={}/loadgen-{run}/",
            prefix.trim_end_matches('/')
        ),
        None => format!("etcd:{endpoints}?prefix=/loadgen-{run}/"),
    }
}

impl Server {
    async fn start(policy: &Value) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let policy_path = dir.path().join("policy.json");
        std::fs::write(&policy_path, serde_json::to_vec(policy).unwrap()).unwrap();
        let store = match std::env::var("BOOTSYNC_LOADGEN_STORE") {
            Ok(url) => isolated(&url),
            Err(_) => format!("sqlite:{}/store.db", dir.path().display()),
        };
        let log = std::env::temp_dir().join(format!(
            "bootsync-loadgen-{}.log",
            dir.path().file_name().unwrap().to_string_lossy()
        ));
        let policy_arg = policy_path.display().to_string();
        // The benchmarks register far more nodes than the default cap admits.
        let args = ["serve", "--store", &store, "--policy", &policy_arg];
        let (child, url, _) = start_binary(
            &[&args[..], &["--max-registrations", "10000000"]].concat(),
            std::fs::File::create(log).unwrap().into(),
            Duration::from_secs(30),
        )
        .await;
        Server {
            child,
            url,
            _dir: dir,
        }
    }

    /// Peak resident memory so far, in MB.
    fn peak_rss_mb(&self) -> f64 {
        peak_rss_mb(self.child.id())
    }
}

/// A process's peak resident memory so far, in MB.
fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Node `i`'s answer to `POST url+path`, which must have `status`.
async fn node_request(
    http: &reqwest::Client,
    url: &str,
    path: &str,
    i: usize,
    status: u16,
) -> bytes::Bytes {
    let r = http
        .post(format!("{url}{path}"))
        .json(&registration(i))
        .send()
        .await
        .unwrap();
    let got = r.status();
    let body = r.bytes().await.unwrap();
    assert_eq!(got, status, "{path}: {}", String::from_utf8_lossy(&body));
    body
}

/// Node `i`'s `/node` answer, which must be 200.
async fn fetch(http: &reqwest::Client, url: &str, i: usize) -> bytes::Bytes {
    node_request(http, url, "/node", i, 200).await
}

/// Registers node `i` through `/register`, which must answer 202.
async fn register(http: &reqwest::Client, url: &str, i: usize) {
    node_request(http, url, "/register", i, 202).await;
}

/// Registers nodes `0..n` through `/register` with 64 concurrent registrants; returns the
/// rate in registrations per second.
async fn storm(http: &reqwest::Client, url: &str, n: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (http, url, next) = (http.clone(), url.to_string(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                register(&http, &url, i).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// One of 64 registrants: registers nodes `first`, `first + 64`, ... until `deadline`,
/// counting each 202.
fn registrant(
    http: reqwest::Client,
    url: String,
    first: usize,
    deadline: Instant,
    counter: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = first;
        while Instant::now() < deadline {
            register(&http, &url, i).await;
            counter.fetch_add(1, Ordering::Relaxed);
            i += CONCURRENCY;
        }
    })
}

/// A loopback port free at the moment of asking, for a child server's `--listen`.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Polls `url/healthz` every millisecond until it answers 200; panics once `limit` has passed
/// since `started`.
async fn wait_healthy(http: &reqwest::Client, url: &str, started: Instant, limit: Duration) {
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(started.elapsed() < limit, "no /healthz after {limit:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Starts the release binary with `args` and `--listen 127.0.0.1:PORT`; returns it, its URL
/// and the moment it was started, once `/healthz` answers (panics after `limit`).
async fn start_binary(
    args: &[&str],
    stderr: std::process::Stdio,
    limit: Duration,
) -> (std::process::Child, String, Instant) {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let child = std::process::Command::new(release_binary())
        .args(args)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    wait_healthy(&bootsync::tls::plain_client(), &url, started, limit).await;
    (child, url, started)
}

/// The release binary the benchmarks run, as a user runs it.
fn release_binary() -> PathBuf {
    // `BOOTSYNC_LOADGEN_BIN`: another build (a previous release) for a side-by-side run.
    let binary = std::env::var_os("BOOTSYNC_LOADGEN_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/bootsync"),
        PathBuf::from,
    );
    assert!(binary.exists(), "build it first: cargo build --release");
    binary
}

/// A pool for `n` concurrent clients. Like the seed's clients, they do not ask for gzip.
fn http_pool(n: usize) -> reqwest::Client {
    bootsync::tls::install_crypto_provider();
    reqwest::Client::builder()
        .pool_max_idle_per_host(n)
        .no_gzip()
        .build()
        .unwrap()
}

/// Whether B1's fetchers ask for gzip, as bootsync's own client does
/// (`BOOTSYNC_LOADGEN_GZIP=1`: a variant, reported under its own name).
fn gzip_fetchers() -> bool {
    std::env::var_os("BOOTSYNC_LOADGEN_GZIP").is_some_and(|v| v == "1")
}

/// Node `i`'s `/node` answer asked with `Accept-Encoding: gzip`: its bytes on the wire, and
/// the payload decoded from them.
async fn fetch_gzip(http: &reqwest::Client, url: &str, i: usize) -> (usize, Vec<u8>) {
    use std::io::Read as _;
    let r = http
        .post(format!("{url}/node"))
        .header("accept-encoding", "gzip")
        .json(&registration(i))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let gzipped = r.headers().get("content-encoding").is_some();
    let wire = r.bytes().await.unwrap();
    if !gzipped {
        return (wire.len(), wire.to_vec());
    }
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&wire[..])
        .read_to_end(&mut plain)
        .unwrap();
    (wire.len(), plain)
}

/// B1: n nodes, each node's own file listing all its peers. 64 registrants register the n
/// nodes (the set is ready at the last one), then 64 fetchers fetch every node once.
async fn b1(n: usize, form: PeerForm) -> Value {
    let policy = json!({
        "expect_nodes": n,
        "files": [{"path": "/config.yaml", "template": form.template()}],
    });
    let server = Server::start(&policy).await;
    let http = http_pool(CONCURRENCY);
    let storm_rate = storm(&http, &server.url, n).await;
    let last_registration = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let bytes = Arc::new(AtomicUsize::new(0));
    let wire = Arc::new(AtomicUsize::new(0));
    let gzip = gzip_fetchers();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (http, url, next, bytes, wire) = (
            http.clone(),
            server.url.clone(),
            next.clone(),
            bytes.clone(),
            wire.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return latencies;
                }
                let t = Instant::now();
                let (on_wire, payload) = if gzip {
                    fetch_gzip(&http, &url, i).await
                } else {
                    let body = fetch(&http, &url, i).await;
                    (body.len(), body.to_vec())
                };
                bytes.fetch_add(payload.len(), Ordering::Relaxed);
                wire.fetch_add(on_wire, Ordering::Relaxed);
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let all_served = last_registration.elapsed();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99) = (percentile(&all, 0.5), percentile(&all, 0.99));
    let rss = server.peak_rss_mb();
    let mean_kb = bytes.load(Ordering::Relaxed) as f64 / n as f64 / 1024.0;
    let wire_mb = wire.load(Ordering::Relaxed) as f64 / (1 << 20) as f64;
    println!(
        "B1 n={n:>6} peers={:<8}{}: every node served {:.2} s after the last registration; fetch p50 {p50:.2} ms p99 {p99:.2} ms; peak RSS {rss:.0} MB; storm {storm_rate:.0} registrations/s; {mean_kb:.0} KiB per payload, {wire_mb:.0} MB on the wire",
        form.name(),
        if gzip { " (gzip fetchers)" } else { "" },
        all_served.as_secs_f64()
    );
    json!({"n": n, "form": form.name(), "gzip_fetchers": gzip, "all_served_s": all_served.as_secs_f64(), "fetch_p50_ms": p50, "fetch_p99_ms": p99, "peak_rss_mb": rss, "storm_registrations_per_sec": storm_rate, "payload_kib": mean_kb, "wire_mb": wire_mb})
}

/// The issue's table: `expect_nodes: 1`, each node's file loops over every node's IP, nodes
/// registering one after another over one keep-alive connection (the set ready from the
/// first), then 60 `/node` fetches. Also: how long after its 202 the last node is served.
async fn seed_table(n: usize) -> Value {
    let policy = json!({
        "expect_nodes": 1,
        "files": [{"path": "/config.yaml", "template": "id: {{ node.identifier }}\npeers:\n{% for p in nodes %}  - {{ p.ip }}\n{% endfor %}"}],
    });
    let server = Server::start(&policy).await;
    let http = http_pool(1);
    for i in 0..n {
        register(&http, &server.url, i).await;
    }
    let registered = Instant::now();
    let body = fetch(&http, &server.url, n - 1).await;
    let last_served = registered.elapsed().as_secs_f64() * 1000.0;
    let mut latencies = Vec::new();
    for k in 0..60 {
        let t = Instant::now();
        let r = http
            .post(format!("{}/node", server.url))
            .json(&registration(k * (n / 60)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = percentile(&latencies, 0.5);
    let rss = server.peak_rss_mb();
    println!(
        "seed table n={n}: last node served {last_served:.1} ms after its registration; 60 fetches median {median:.2} ms (max {:.2}); peak RSS {rss:.0} MB; payload {} KiB",
        latencies.last().unwrap(),
        body.len() / 1024
    );
    json!({"n": n, "last_served_ms": last_served, "fetch_median_ms": median, "fetch_max_ms": latencies.last().unwrap(), "peak_rss_mb": rss, "payload_bytes": body.len()})
}

/// The cost per peer of each way a template can list peers, rendering one node's file at
/// `n` members (in process, one thread): what `specs/cfgsync.md` quotes.
fn template_forms(n: usize) -> Value {
    use bootsync::cfgsync::template::Scope;
    let forms = [
        (
            "loop over peers, p.ip",
            "{% for p in peers %}\"{{ p.ip }}\"{% if not loop.last %}, {% endif %}{% endfor %}",
        ),
        (
            "loop over peers, metadata field",
            "{% for p in peers %}{{ p.ip }}:{{ p.metadata.port }}\n{% endfor %}",
        ),
        (
            "peers | map(attribute='ip') | join",
            "{{ peers | map(attribute='ip') | join(', ') }}",
        ),
        ("peer_ips | join", "{{ peer_ips | join(', ') }}"),
        ("peer_ips | tojson", "{{ peer_ips | tojson }}"),
        ("{{ peer_ips }}", "{{ peer_ips }}"),
    ];
    let members: Vec<_> = (0..n)
        .map(|i| {
            let r = registration(i);
            (
                r["identifier"].as_str().unwrap().to_string(),
                r["ip"]
                    .as_str()
                    .unwrap()
                    .parse::<std::net::IpAddr>()
                    .unwrap(),
                r["metadata"].clone(),
            )
        })
        .collect();
    let mut out = Vec::new();
    for (name, template) in forms {
        // A scope of its own: its first render includes the epoch's once-only work (a
        // spliced loop's two renders), the later ones are what each further node costs.
        let scope = Scope::new(members.iter().map(|(id, ip, m)| (id.as_str(), *ip, m)));
        let policy: Policy = serde_json::from_value(json!({
            "expect_nodes": 1,
            "files": [{"path": "/config.yaml", "template": template}],
        }))
        .unwrap();
        let compiled = policy.compile().unwrap();
        let started = Instant::now();
        compiled.render_node(&scope, 0, usize::MAX).unwrap();
        let first_ms = started.elapsed().as_secs_f64() * 1000.0;
        let rounds = 20;
        let started = Instant::now();
        let mut bytes = 0;
        for round in 1..=rounds {
            let files = compiled.render_node(&scope, round % n, usize::MAX).unwrap();
            bytes = files[0].content.len();
        }
        let per_peer_ns = started.elapsed().as_secs_f64() * 1e9 / rounds as f64 / (n - 1) as f64;
        println!(
            "template form {name:<38} at {n} members: {per_peer_ns:>6.1} ns per peer per node ({bytes} bytes); the epoch's first render {first_ms:.2} ms"
        );
        out.push(json!({"form": name, "members": n, "ns_per_peer": per_peer_ns, "first_render_ms": first_ms, "bytes": bytes}));
    }
    Value::Array(out)
}

/// Registration throughput while a large ready set is fetched: a named set of `n` nodes is
/// ready and being fetched by 64 clients (each payload lists every peer) while 64 registrants
/// register other nodes for 5 s.
async fn b3_under_fetch(n: usize) -> Value {
    let members: Vec<String> = (0..n).map(|i| format!("node-{i:06}")).collect();
    let policy = json!({
        "expect_identifiers": members,
        "files": [{"path": "/config.yaml", "template": PeerForm::Helper.template()}],
    });
    let server = Server::start(&policy).await;
    let http = http_pool(2 * CONCURRENCY);
    storm(&http, &server.url, n).await;
    let deadline = Instant::now() + WINDOW;
    let (fetched, registered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let http_reg = http.clone();
    let mut tasks = Vec::new();
    for c in 0..CONCURRENCY {
        let (http, url, fetched) = (http.clone(), server.url.clone(), fetched.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while Instant::now() < deadline {
                fetch(&http, &url, i % n).await;
                fetched.fetch_add(1, Ordering::Relaxed);
                i += CONCURRENCY;
            }
        }));
        tasks.push(registrant(
            http_reg.clone(),
            server.url.clone(),
            n + c,
            deadline,
            registered.clone(),
        ));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = WINDOW.as_secs_f64();
    let (reg_rate, fetch_rate) = (
        registered.load(Ordering::Relaxed) as f64 / secs,
        fetched.load(Ordering::Relaxed) as f64 / secs,
    );
    println!(
        "B3 during B1 fetches (n={n} named set, peer lists): {reg_rate:.0} durable registrations/s beside {fetch_rate:.0} fetches/s; peak RSS {:.0} MB",
        server.peak_rss_mb()
    );
    json!({"n": n, "registrations_per_sec": reg_rate, "fetches_per_sec": fetch_rate, "peak_rss_mb": server.peak_rss_mb()})
}

/// B7 with state: a restart on a SQLite file holding `n` registrations and the peer-list
/// policy; process start to `/healthz` 200, and to the last node's payload.
async fn restart(n: usize) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    {
        let store: DynStore =
            Arc::new(SqliteStore::open(db.clone(), SqliteOptions::default()).unwrap());
        seed_registrations(&store, n).await;
        let policy: Policy = serde_json::from_value(json!({
            "expect_nodes": n,
            "files": [{"path": "/config.yaml", "template": PeerForm::Loop.template()}],
        }))
        .unwrap();
        install::install_policy(store.as_ref(), &policy, true)
            .await
            .unwrap();
    }
    let db_arg = format!("sqlite:{}", db.display());
    let (mut child, url, started) = start_binary(
        &["serve", "--store", &db_arg],
        std::process::Stdio::null(),
        Duration::from_secs(60),
    )
    .await;
    let http = bootsync::tls::plain_client();
    let healthy = started.elapsed();
    let r = http
        .post(format!("{url}/node?wait=60"))
        .json(&registration(n - 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    let served = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "B7 restart with {n} registrations and the peer-list policy: /healthz after {:.1} ms; first payload after {:.1} ms",
        healthy.as_secs_f64() * 1000.0,
        served.as_secs_f64() * 1000.0
    );
    json!({"n": n, "healthz_ms": healthy.as_secs_f64() * 1000.0, "first_payload_ms": served.as_secs_f64() * 1000.0})
}

/// B2: n nodes register and long-poll together; latency from the last 202 to each payload.
async fn b2(n: usize) -> Value {
    let store: DynStore = Arc::new(MemoryStore::new(Limits::default()));
    let policy: Policy = serde_json::from_value(json!({
        "expect_nodes": n,
        "files": [{"path": "/config.yaml", "template": "id: {{ node.identifier }}\npeers: [{% for p in peers %}{{ p.ip }},{% endfor %}]\n"}],
    }))
    .unwrap();
    install::install_policy(store.as_ref(), &policy, true)
        .await
        .unwrap();
    let url = start_server(store).await;
    bootsync::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .no_gzip()
        .pool_max_idle_per_host(n)
        .build()
        .unwrap();
    let last_registered = Arc::new(std::sync::Mutex::new(Instant::now()));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (http, url, last) = (http.clone(), url.clone(), last_registered.clone());
        tasks.push(tokio::spawn(async move {
            let me = registration(i);
            register(&http, &url, i).await;
            {
                let mut last = last.lock().unwrap();
                *last = (*last).max(Instant::now());
            }
            loop {
                let r = http
                    .post(format!("{url}/node?wait=30"))
                    .json(&me)
                    .send()
                    .await
                    .unwrap();
                if r.status() == 200 {
                    let _ = r.bytes().await.unwrap();
                    return Instant::now();
                }
            }
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    let last = *last_registered.lock().unwrap();
    let mut latencies: Vec<f64> = done
        .iter()
        .map(|d| d.saturating_duration_since(last).as_secs_f64() * 1000.0)
        .collect();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99, max) = (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        *latencies.last().unwrap(),
    );
    println!(
        "B2 n={n}: from the last registration to every payload: p50 {p50:.1} ms  p99 {p99:.1} ms  max {max:.1} ms"
    );
    json!({"n": n, "p50_ms": p50, "p99_ms": p99, "max_ms": max})
}

/// One simulated watcher of B8: fetches, reports ok, and holds `?wait&after` for the next
/// epoch, for ever; counts its first report of a version newer than the first it got.
async fn watcher(
    http: reqwest::Client,
    url: String,
    token: &'static str,
    i: usize,
    reached: Arc<AtomicUsize>,
) {
    let me = registration(i);
    let mut after: Option<u64> = None;
    let mut first: Option<u64> = None;
    let mut last: Option<(Value, Option<u64>)> = None;
    let mut counted = false;
    loop {
        let path = match after {
            Some(epoch) => format!("{url}/node?wait=55&after={epoch}"),
            None => format!("{url}/node?wait=55"),
        };
        let Ok(answer) = http.post(path).bearer_auth(token).json(&me).send().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if answer.status() != 200 {
            continue;
        }
        let payload: Value = answer.json().await.unwrap();
        let (epoch, version) = (payload["epoch"].as_u64(), payload["version"].as_u64());
        // As `client --watch`: the same files and version at a new epoch are not applied
        // again, nor reported.
        if last.as_ref() == Some(&(payload["files"].clone(), version)) {
            after = epoch;
            continue;
        }
        last = Some((payload["files"].clone(), version));
        let report = json!({"identifier": me["identifier"], "epoch": epoch, "version": version, "result": "ok"});
        // A pooled connection the server closed meanwhile fails the send: try again, as the
        // watcher does.
        let mut tries = 0;
        loop {
            let sent = http
                .post(format!("{url}/report"))
                .bearer_auth(token)
                .json(&report)
                .send()
                .await;
            match sent {
                Ok(r) if r.status() == 202 => break,
                Ok(r) => {
                    let status = r.status();
                    panic!(
                        "a report was refused: {status} {}",
                        r.text().await.unwrap_or_default()
                    );
                }
                Err(err) if tries < 5 => {
                    tries += 1;
                    let _ = err;
                }
                Err(err) => panic!("a report could not be sent: {err}"),
            }
        }
        let first = *first.get_or_insert(version.unwrap_or_default());
        if !counted && version.is_some_and(|v| v > first) {
            counted = true;
            reached.fetch_add(1, Ordering::AcqRel);
        }
        after = epoch;
    }
}

/// The value of one metric line in a `/metrics` answer.
async fn metric(http: &reqwest::Client, url: &str, name: &str) -> f64 {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// B8: a policy change reaching `n` watching nodes (simulated: they write nothing and report
/// ok), with or without `waves: ["1%", "10%", "100%"]` and pause 0: the time from the install
/// to every node reporting the new version, report writes per store commit, server RSS.
async fn b8(n: usize, waves: bool) -> Value {
    const TOKEN: &str = "b8-join-token";
    let file = |marker: &str| json!({"path": "/config.yaml", "template": format!("id: {{{{ node.identifier }}}}\nindex: {{{{ index }}}}\n{marker}\n")});
    let v1 = json!({"expect_nodes": n, "files": [file("v1")]});
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("join.token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let policy_path = dir.path().join("policy.json");
    std::fs::write(&policy_path, v1.to_string()).unwrap();
    let store = format!("sqlite:{}/store.db", dir.path().display());
    let (token_arg, policy_arg) = (
        token_file.display().to_string(),
        policy_path.display().to_string(),
    );
    let (child, url, _) = start_binary(
        &[
            "serve",
            "--store",
            &store,
            "--policy",
            &policy_arg,
            "--join-token-file",
            &token_arg,
            // 5 000 nodes from one address: the per-source cap on connections that have not
            // shown a token yet is lifted, as 5 000 real nodes come from 5 000 addresses.
            "--max-connections-per-source",
            "0",
        ],
        std::fs::File::create(std::env::temp_dir().join("bootsync-b8-server.log"))
            .unwrap()
            .into(),
        Duration::from_secs(30),
    )
    .await;
    let server = Server {
        child,
        url: url.clone(),
        _dir: dir,
    };
    let http = reqwest::Client::builder()
        .no_gzip()
        .pool_max_idle_per_host(n + 64)
        .build()
        .unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(CONCURRENCY) {
        let all = chunk.iter().map(|&i| {
            http.post(format!("{url}/register"))
                .bearer_auth(TOKEN)
                .json(&registration(i))
                .send()
        });
        for r in futures_util::future::join_all(all).await {
            assert_eq!(r.unwrap().status(), 202);
        }
    }
    let reached = Arc::new(AtomicUsize::new(0));
    let watchers: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(watcher(
                http.clone(),
                url.clone(),
                TOKEN,
                i,
                reached.clone(),
            ))
        })
        .collect();
    // Every node on v1 first: its report written.
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric(
        &http,
        &url,
        "bootsync_cfgsync_nodes{version=\"1\",result=\"ok\"}",
    )
    .await
        < n as f64
    {
        assert!(Instant::now() < deadline, "the fleet did not settle on v1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut v2 = json!({"expect_nodes": n, "files": [file("v2")]});
    if waves {
        v2["rollout"] = json!({"waves": ["1%", "10%", "100%"], "pause": "0s"});
    }
    let (written0, commits0) = (
        metric(&http, &url, "bootsync_cfgsync_reports_written_total").await,
        metric(&http, &url, "bootsync_cfgsync_report_commits_total").await,
    );
    let installed_at = Instant::now();
    let answer = http
        .put(format!("{url}/v1/cfgsync/policy"))
        .json(&v2)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "the install was refused");
    let deadline = Instant::now() + Duration::from_secs(300);
    while reached.load(Ordering::Acquire) < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} reached v2",
            reached.load(Ordering::Acquire)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = installed_at.elapsed();
    // Reports of the change still in flight are written within a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = metric(&http, &url, "bootsync_cfgsync_reports_written_total").await - written0;
    let commits = metric(&http, &url, "bootsync_cfgsync_report_commits_total").await - commits0;
    let rss = server.peak_rss_mb();
    for w in watchers {
        w.abort();
    }
    let name = if waves {
        "waves [1%, 10%, 100%], pause 0"
    } else {
        "no waves"
    };
    println!(
        "B8 n={n} {name}: every node reported the new version {:.2} s after the install; {written:.0} report writes in {commits:.0} commits ({:.1} per commit); server peak RSS {rss:.0} MB",
        took.as_secs_f64(),
        written / commits.max(1.0)
    );
    json!({"n": n, "waves": waves, "install_to_all_reported_s": took.as_secs_f64(), "report_writes": written, "report_commits": commits, "writes_per_commit": written / commits.max(1.0), "server_peak_rss_mb": rss})
}

/// B9: `policy diff` of a change to the B1 policy (each node's file lists all its peers,
/// native helper) against `n` registrations, through `POST /v1/cfgsync/preview`.
async fn b9(n: usize, form: PeerForm) -> Value {
    let policy = json!({"expect_nodes": n, "files": [{"path": "/config.yaml", "template": form.template()}]});
    let server = Server::start(&policy).await;
    let http = http_pool(CONCURRENCY);
    storm(&http, &server.url, n).await;
    let candidate = json!({"expect_nodes": n, "files": [{"path": "/config.yaml", "template": format!("{}port: 8080\n", form.template())}]});
    let started = Instant::now();
    let body: Value = http
        .post(format!("{}/v1/cfgsync/preview", server.url))
        .json(&json!({"policy": candidate}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(body["changed"], n, "{body}");
    let rss = server.peak_rss_mb();
    println!(
        "B9 n={n} peers={}: preview summary ({} of {n} would change, with 3 diffs) in {:.2} s (server {} ms); server peak RSS {rss:.0} MB",
        form.name(),
        body["changed"],
        took.as_secs_f64(),
        body["elapsed_ms"]
    );
    json!({"n": n, "form": form.name(), "preview_s": took.as_secs_f64(), "server_ms": body["elapsed_ms"], "peak_rss_mb": rss})
}

/// B3 over HTTP: durable registrations per second with 64 registrants on SQLite.
async fn b3() -> Value {
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore =
        Arc::new(SqliteStore::open(dir.path().join("b3.db"), SqliteOptions::default()).unwrap());
    let policy: Policy = serde_json::from_value(
        json!({"expect_nodes": 10_000_000, "files": [{"path": "a", "template": "x"}]}),
    )
    .unwrap();
    install::install_policy(store.as_ref(), &policy, true)
        .await
        .unwrap();
    let url = start_server(store).await;
    let http = bootsync::tls::plain_client();
    let deadline = Instant::now() + WINDOW;
    let counter = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..CONCURRENCY {
        tasks.push(registrant(
            http.clone(),
            url.clone(),
            c,
            deadline,
            counter.clone(),
        ));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let per_sec = counter.load(Ordering::Relaxed) as f64 / WINDOW.as_secs_f64();
    println!(
        "B3 (HTTP /register, SQLite, {CONCURRENCY} registrants): {per_sec:.0} durable registrations/s"
    );
    json!({"registrants": CONCURRENCY, "registrations_per_sec": per_sec})
}

/// Counts `list` round trips, to show a steady wake reads the flags once.
struct Counting {
    inner: DynStore,
    lists: AtomicUsize,
    calls: AtomicUsize,
}

#[async_trait]
impl Store for Counting {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn revision(&self) -> Result<Revision, bootsync::store::Error> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.revision().await
    }
    async fn get(
        &self,
        key: &Key,
    ) -> Result<Option<bootsync::store::Entry>, bootsync::store::Error> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.get(key).await
    }
    async fn list(&self, ns: &str, kind: &str) -> Result<Listing, bootsync::store::Error> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.lists.fetch_add(1, Ordering::Relaxed);
        self.inner.list(ns, kind).await
    }
    async fn namespace(&self, ns: &str) -> Result<NamespaceTree, bootsync::store::Error> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.namespace(ns).await
    }
    async fn namespaces(&self) -> Result<Vec<String>, bootsync::store::Error> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.namespaces().await
    }
    async fn apply(&self, batch: Batch) -> Result<Revision, bootsync::store::Error> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.apply(batch).await
    }
    async fn watch(
        &self,
        from: Revision,
        filter: WatchFilter,
    ) -> Result<Watch, bootsync::store::Error> {
        self.inner.watch(from, filter).await
    }
}

/// B5: a steady-state wake with 500 initialisers at their flag, through the real HTTP API.
async fn b5() -> Value {
    let backing: DynStore = Arc::new(MemoryStore::new(Limits::default()));
    let url = start_server(backing.clone()).await;
    let n = 500;
    let entries: Vec<Value> = (0..n)
        .map(|i| json!({"class": "exec", "name": format!("step-{i}"), "flag": "v1", "params": {"command": ["true"]}}))
        .collect();
    let spec = Spec::from_value(
        &json!({"initialisers": entries}),
        ".".into(),
        &Registry::collect().unwrap(),
    )
    .unwrap();
    let mut batch = Batch::new();
    for i in 0..n {
        batch = batch.put(
            Key::new("__system__", "init-state", format!("step-{i}")),
            json!("v1"),
        );
    }
    backing.apply(batch).await.unwrap();
    let counting = Arc::new(Counting {
        inner: Arc::new(RemoteStore::new(ApiClient::new(&url))),
        lists: AtomicUsize::new(0),
        calls: AtomicUsize::new(0),
    });
    let http = bootsync::tls::plain_client();
    let gate = Arc::new(HttpGate::one(url.clone(), http.clone()));
    let options = EngineOptions {
        holder: "bench".into(),
        lease_ttl: Duration::from_secs(15),
        server_url: url,
        http,
        history_len: bootsync::api::system::DEFAULT_HISTORY_LEN,
    };
    let mut engine = Engine::new(spec, counting.clone(), gate, options, None);
    assert_eq!(
        engine.wake().await,
        Outcome::Converged,
        "first wake writes the spec record"
    );
    let mut times = Vec::new();
    let rounds = 200;
    let (calls_before, lists_before) = (
        counting.calls.load(Ordering::Relaxed),
        counting.lists.load(Ordering::Relaxed),
    );
    for _ in 0..rounds {
        let t = Instant::now();
        assert_eq!(engine.wake().await, Outcome::Converged);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let calls = (counting.calls.load(Ordering::Relaxed) - calls_before) as f64 / rounds as f64;
    let lists = (counting.lists.load(Ordering::Relaxed) - lists_before) as f64 / rounds as f64;
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
    println!(
        "B5 steady wake, {n} initialisers at their flag: p50 {p50:.2} ms  p99 {p99:.2} ms; store round trips per wake: {calls} ({lists} flag read)"
    );
    json!({"initialisers": n, "p50_ms": p50, "p99_ms": p99, "store_calls_per_wake": calls, "flag_reads_per_wake": lists})
}

fn proc_stat(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // USER_HZ is 100 on Linux.
    (rss_kb, ticks / 100.0)
}

/// B7 and B4: start-up to /healthz of the release binary, then its idle RSS and CPU.
async fn idle() -> Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let binary = release_binary();
    let window = Duration::from_secs(
        std::env::var("BOOTSYNC_IDLE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    // `BOOTSYNC_IDLE_WATCHERS=3`: that many `client --watch` nodes stay connected throughout.
    let watchers: usize = std::env::var("BOOTSYNC_IDLE_WATCHERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let dir = tempfile::tempdir().unwrap();
    let mut spec = root.join("examples/quickstart.yaml");
    if watchers > 0 {
        // The quickstart, with a policy expecting exactly the watching nodes.
        let copy = dir.path().join("quickstart");
        std::fs::create_dir_all(&copy).unwrap();
        for file in ["template.yaml", "policy.yaml"] {
            let text =
                std::fs::read_to_string(root.join("examples/quickstart").join(file)).unwrap();
            let text = text.replace("expect_nodes: 2", &format!("expect_nodes: {watchers}"));
            std::fs::write(copy.join(file), text).unwrap();
        }
        spec = dir.path().join("quickstart.yaml");
        std::fs::copy(root.join("examples/quickstart.yaml"), &spec).unwrap();
    }
    let spec_arg = spec.display().to_string();
    let store_arg = format!("sqlite:{}/store.db", dir.path().display());
    let (mut child, url, started) = start_binary(
        &["run", "--spec", &spec_arg, "--store", &store_arg],
        std::process::Stdio::null(),
        Duration::from_secs(30),
    )
    .await;
    let http = bootsync::tls::plain_client();
    let startup = started.elapsed();
    loop {
        let status: Value = http
            .get(format!("{url}/v1/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["converged"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut nodes = Vec::new();
    for i in 0..watchers {
        let out = dir.path().join(format!("node-{i}"));
        nodes.push(
            std::process::Command::new(&binary)
                .args([
                    "client",
                    "--server",
                    &url,
                    "--identifier",
                    &format!("node-{i}"),
                ])
                .args(["--ip", &format!("10.0.0.{}", i + 1), "--watch", "--quiet"])
                .args(["--output-dir", &out.display().to_string()])
                .args([
                    "--route",
                    &format!("/config.yaml={}/config.yaml", out.display()),
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    for i in 0..watchers {
        let written = dir.path().join(format!("node-{i}/config.yaml"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !written.exists() {
            if Instant::now() >= deadline {
                // Stop what was started before saying so.
                for node in nodes.iter_mut().chain([&mut child]) {
                    let _ = node.kill();
                    let _ = node.wait();
                }
                panic!("node-{i} never wrote its files");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Let start-up settle, then measure only the idle window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, cpu_before) = proc_stat(child.id());
    let nodes_before: Vec<f64> = nodes.iter().map(|n| proc_stat(n.id()).1).collect();
    let mut peak_rss = 0;
    let idle_started = Instant::now();
    while idle_started.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_rss = peak_rss.max(proc_stat(child.id()).0);
    }
    let (rss, cpu_after) = proc_stat(child.id());
    let node_stats: Vec<(u64, f64)> = nodes.iter().map(|n| proc_stat(n.id())).collect();
    let node_rss = node_stats.iter().map(|(rss, _)| *rss).max().unwrap_or(0);
    let node_cpu = node_stats
        .iter()
        .zip(&nodes_before)
        .map(|((_, after), before)| after - before)
        .fold(0.0, f64::max);
    for mut node in nodes {
        let _ = node.kill();
        let _ = node.wait();
    }
    let _ = child.kill();
    let _ = child.wait();
    let cpu = cpu_after - cpu_before;
    if watchers > 0 {
        println!(
            "B4 with {watchers} watching nodes: each watcher RSS {:.1} MB, CPU {node_cpu:.2} s at most",
            node_rss as f64 / 1024.0
        );
    }
    println!(
        "B7 start-up to /healthz: {:.1} ms;  B4 idle over {window:?}: RSS {:.1} MB (peak {:.1} MB), CPU {cpu:.2} s",
        startup.as_secs_f64() * 1000.0,
        rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    json!({"startup_ms": startup.as_secs_f64() * 1000.0, "idle_secs": window.as_secs(), "rss_mb": rss as f64 / 1024.0, "peak_rss_mb": peak_rss as f64 / 1024.0, "cpu_secs": cpu, "watchers": watchers, "watcher_rss_mb": node_rss as f64 / 1024.0, "watcher_cpu_secs": node_cpu})
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let which: Vec<String> = std::env::args().skip(1).collect();
    let want = |name: &str| which.is_empty() || which.iter().any(|w| w == name || w == "all");
    let mut summary = BTreeMap::new();
    let sizes = |default: &[usize]| -> Vec<usize> {
        std::env::var("BOOTSYNC_B1_NODES")
            .ok()
            .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
            .unwrap_or_else(|| default.to_vec())
    };
    if want("b1") {
        let mut runs = Vec::new();
        for form in [PeerForm::Loop, PeerForm::Helper] {
            for n in sizes(&[1_000, 10_000]) {
                runs.push(b1(n, form).await);
            }
        }
        summary.insert("b1", Value::Array(runs));
    }
    if want("b1-100k") {
        summary.insert("b1_100k", b1(100_000, PeerForm::Helper).await);
    }
    if want("seed-table") {
        let mut runs = Vec::new();
        for n in sizes(&[1_000, 5_000]) {
            runs.push(seed_table(n).await);
        }
        summary.insert("seed_table", Value::Array(runs));
    }
    if want("templates") {
        summary.insert("templates", template_forms(10_000));
    }
    if want("b3-under-fetch") {
        summary.insert("b3_under_fetch", b3_under_fetch(10_000).await);
    }
    if want("restart") {
        let mut runs = Vec::new();
        for n in sizes(&[2_000, 10_000]) {
            runs.push(restart(n).await);
        }
        summary.insert("b7_restart", Value::Array(runs));
    }
    if want("b1s") || want("b1s-small") {
        let mut runs = Vec::new();
        // `b1s-small` alone: the B1s row without its shared-peer-file variant.
        let variants: &[bool] = if want("b1s") {
            &[false, true]
        } else {
            &[false]
        };
        for &peer_list in variants {
            for n in sizes(&[1_000, 10_000, 100_000]) {
                runs.push(b1s(n, peer_list).await);
            }
        }
        summary.insert("b1s", Value::Array(runs));
    }
    if want("b2") {
        summary.insert("b2", b2(1_000).await);
    }
    if want("b3") {
        summary.insert("b3_http", b3().await);
    }
    if want("b5") {
        summary.insert("b5", b5().await);
    }
    if want("b8") || want("rollout") {
        let n = sizes(&[5_000])[0];
        let mut runs = Vec::new();
        for waves in [false, true] {
            runs.push(b8(n, waves).await);
        }
        summary.insert("b8_rollout", Value::Array(runs));
    }
    if want("b9") || want("preview") {
        let mut runs = Vec::new();
        for form in [PeerForm::Helper, PeerForm::Loop] {
            runs.push(b9(10_000, form).await);
        }
        summary.insert("b9_preview", Value::Array(runs));
    }
    if want("drill") {
        summary.insert("b10_drill", drill::drill(1_000, 200).await);
    }
    if want("idle") {
        summary.insert("b4_b7", idle().await);
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("loadgen.json"),
        serde_json::to_string_pretty(&summary).unwrap(),
    )
    .unwrap();
    println!("summary written to {}", out.join("loadgen.json").display());
}
