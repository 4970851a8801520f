//! Shared support for integration tests: the real `bootsync` binary on an ephemeral loopback
//! port, waiting on conditions with deadlines, and cleanup by PID.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The path of the binary under test: this build's, or `BOOTSYNC_BIN` to run the tests
/// against another build (an older release, to show a test fails where a fix is missing).
pub fn bin() -> PathBuf {
    std::env::var_os("BOOTSYNC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_bootsync")))
}

/// A running `bootsync` process, killed (by PID) when dropped.
pub struct Proc {
    pub child: Child,
    /// `http://127.0.0.1:PORT` once the process announced its listener.
    pub url: String,
    stderr_path: PathBuf,
}

impl Proc {
    /// Starts `bootsync ARGS...` and waits (up to 30 s) for its `bootsync listening on URL`
    /// line. `--listen 127.0.0.1:0` is added when `args` has no `--listen`.
    pub fn spawn(args: &[&str], dir: &Path) -> Proc {
        Self::spawn_env(args, dir, &[])
    }

    /// As [`Proc::spawn`], with extra environment variables.
    pub fn spawn_env(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Proc {
        let mut all: Vec<&str> = args.to_vec();
        let is_server = matches!(args.first(), Some(&"serve") | Some(&"run"));
        if is_server && !args.contains(&"--listen") {
            all.extend(["--listen", "127.0.0.1:0"]);
        }
        let stderr_path = dir.join(format!("stderr-{}.log", unique()));
        let stderr = std::fs::File::create(&stderr_path).expect("create stderr log");
        let mut cmd = Command::new(bin());
        cmd.args(&all)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn bootsync");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("bootsync listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                panic!("bootsync {all:?} did not announce a listener within 30 s; stderr:\n{log}");
            }
        };
        Proc {
            child,
            url,
            stderr_path,
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal by PID (`TERM`, `HUP`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// Waits (with a deadline) for the process to exit and returns its status code.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<i32> {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "bootsync (pid {}) did not exit within {deadline:?}",
            self.pid()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` until it returns `Some`, failing with `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs `bootsync ARGS...` to completion and returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run bootsync");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Proc {
    /// Starts a process that announces no listener (e.g. `bootsync bootstrap`); killed on drop.
    pub fn spawn_bootstrap(args: &[&str], dir: &Path) -> Proc {
        let stderr_path = dir.join(format!("stderr-{}.log", unique()));
        let stderr = std::fs::File::create(&stderr_path).expect("create stderr log");
        let child = Command::new(bin())
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .env("RUST_LOG", "info")
            .spawn()
            .expect("spawn bootsync");
        Proc {
            child,
            url: String::new(),
            stderr_path,
        }
    }
}
pub mod etcd;
pub mod pki;
pub mod store_suite;

impl Proc {
    /// Whether the process is still running.
    pub fn child_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// `GET url` with a plain client (rustls's provider installed first, as bootsync's own clients do).
pub async fn get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    bootsync::tls::plain_client().get(url).send().await
}

pub mod server;
#[allow(unused_imports)] // not every test file starts an in-process server
pub use server::{Setup, TestServer};

/// One request to `url` with an optional bearer token and JSON body; answers the status and
/// the body as JSON (`Null` when the body is empty or not JSON).
pub async fn call(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (reqwest::StatusCode, serde_json::Value) {
    request(&bootsync::tls::plain_client(), method, url, token, body).await
}

/// As [`call`], with `http` (whose connections are reused from one request to the next).
pub async fn request(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (reqwest::StatusCode, serde_json::Value) {
    let mut request = http.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("the server answers");
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or_default())
}

/// `POST base+path` with a JSON body; the status and the body (`Null` when not JSON).
pub async fn post(
    base: &str,
    path: &str,
    body: &serde_json::Value,
) -> (reqwest::StatusCode, serde_json::Value) {
    call(
        reqwest::Method::POST,
        &format!("{base}{path}"),
        None,
        Some(body.clone()),
    )
    .await
}

/// The JSON answer to `request`; `None` on any failure, for conditions polled with
/// [`wait_for`].
pub async fn json_of(request: reqwest::RequestBuilder) -> Option<serde_json::Value> {
    request.send().await.ok()?.json().await.ok()
}

/// `GET url` as JSON; `None` on any failure.
pub async fn fetch_json(url: impl reqwest::IntoUrl) -> Option<serde_json::Value> {
    json_of(bootsync::tls::plain_client().get(url)).await
}

/// Runs `bootsync` with `line` split on whitespace (no quoting: arguments with spaces go
/// through [`run_cli`]); answers (exit code, stdout, stderr).
pub fn cli(dir: &Path, line: &str) -> (i32, String, String) {
    run_cli(&line.split_whitespace().collect::<Vec<_>>(), dir)
}

impl Proc {
    /// [`Proc::spawn`] with `line` split on whitespace.
    pub fn start(dir: &Path, line: &str) -> Proc {
        Proc::spawn(&line.split_whitespace().collect::<Vec<_>>(), dir)
    }
}

/// A temporary directory holding `files` (name, text).
pub fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write a test file");
    }
    dir
}

/// A policy for `n` nodes whose one file, `peers.txt`, lists every node's identifier.
pub fn peers_policy(n: usize) -> String {
    format!(
        "expect_nodes: {n}\nfiles:\n  - path: peers.txt\n    template: \"{{% for p in nodes %}}{{{{ p.identifier }}}}\\n{{% endfor %}}\"\n"
    )
}

/// Waits (up to 30 s) until `ready` holds, then kills `server` with SIGKILL: a crash at a
/// moment when acknowledged work is known to exist.
pub async fn kill9_when(server: &mut Proc, what: &str, ready: impl Fn() -> bool) {
    wait_for(Duration::from_secs(30), what, || {
        let done = ready();
        async move { done.then_some(()) }
    })
    .await;
    server.kill9();
}

/// Every `.rs` file below `dir`.
pub fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A `bootsync bootstrap` replica of `spec.yaml` in `dir` against `server`, named `holder`, on a
/// 2 s lease (so a standby takes over quickly).
pub fn replica(dir: &Path, server: &str, holder: &str) -> Proc {
    let line =
        format!("bootstrap --spec spec.yaml --server {server} --holder-id {holder} --lease-ttl 2s");
    Proc::spawn_bootstrap(&line.split_whitespace().collect::<Vec<_>>(), dir)
}

/// What a server wrote on `stream` before it closed or `deadline` passed, as text.
pub async fn read_answer(stream: &mut tokio::net::TcpStream, deadline: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(deadline, async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// A process's resident memory in kB now (`VmRSS`) or at its peak (`VmHWM`).
pub fn memory_kb(pid: u32, field: Memory) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let name = match field {
        Memory::Now => "VmRSS:",
        Memory::Peak => "VmHWM:",
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Which resident memory [`memory_kb`] reads.
#[derive(Debug, Clone, Copy)]
pub enum Memory {
    /// Resident now.
    Now,
    /// The most it has been resident.
    Peak,
}

/// A process's peak resident memory in kB.
pub fn peak_rss_kb(pid: u32) -> u64 {
    memory_kb(pid, Memory::Peak)
}

/// A process's resident memory in kB now.
pub fn rss_kb(pid: u32) -> u64 {
    memory_kb(pid, Memory::Now)
}

/// A `client --watch` node `id` at `ip` against `url`, writing beneath `dir/ID` and running
/// `hook` on each change, with `extra` flags; killed (by PID) when dropped.
pub fn watcher(dir: &Path, url: &str, id: &str, ip: &str, hook: &str, extra: &[&str]) -> Proc {
    let out = dir.join(id).display().to_string();
    let mut args = vec![
        "client",
        "--server",
        url,
        "--identifier",
        id,
        "--ip",
        ip,
        "--output-dir",
        &out,
        "--watch",
        "--on-change",
        hook,
    ];
    args.extend_from_slice(extra);
    Proc::spawn_bootstrap(&args, dir)
}

/// The epochs a watcher's `echo $BOOTSYNC_EPOCH >> ID.hook` hook saw, in order.
pub fn hook_runs(dir: &Path, id: &str) -> Vec<u64> {
    std::fs::read_to_string(dir.join(format!("{id}.hook")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Prints a process's peak resident memory beside `what`, and fails past `limit_mb`.
pub fn assert_peak_under(pid: u32, limit_mb: u64, what: &str) {
    let peak = peak_rss_kb(pid);
    eprintln!("peak RSS {what}: {} MB (limit {limit_mb} MB)", peak / 1024);
    assert!(peak < limit_mb * 1024, "peak RSS {peak} kB {what}");
}

/// `bootsync serve` on `store.db` with the policy in `policy.json`, as [`serve_policy`] starts
/// it (and a test restarts it).
pub const SERVE_POLICY: &str = "serve --store sqlite:store.db --policy policy.json";

/// A new directory holding `policy` as `policy.json`, and [`SERVE_POLICY`] there with `extra`
/// flags.
pub fn serve_policy(policy: &serde_json::Value, extra: &str) -> (tempfile::TempDir, Proc) {
    let dir = dir_with(&[("policy.json", &policy.to_string())]);
    let server = Proc::start(dir.path(), &format!("{SERVE_POLICY} {extra}"));
    (dir, server)
}
