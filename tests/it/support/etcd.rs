//! Real etcd for tests: members started from the `etcd` binary on PATH on free loopback ports,
//! each with a temp data dir, stopped by PID.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A cluster of real etcd members, killed by PID when dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

struct Member {
    args: Vec<String>,
    client_url: String,
    log: PathBuf,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal HTTP/1.0 GET on loopback (no client crate in the harness's blocking code).
fn http_get(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}

impl EtcdCluster {
    /// Starts `size` members. A test that calls this declares `needs = etcd`, so the harness
    /// ignores it where etcd is missing (unless CI requires etcd: then this fails). A start
    /// that fails (a port taken in the meantime) is retried with fresh ports.
    pub fn start(size: usize) -> Self {
        assert!(
            crate::harness::etcd_available(),
            "etcd not found on PATH (install etcd-server)"
        );
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(size) {
                Ok(cluster) => return cluster,
                Err(why) => last = why,
            }
        }
        panic!("{last}");
    }

    fn try_start(size: usize) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let token = format!("bootsync-test-{}-{}", std::process::id(), free_port());
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let client_url = format!("http://127.0.0.1:{client}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let args = vec![
                    format!("--name=m{i}"),
                    format!("--data-dir={}", dir.path().join(format!("m{i}")).display()),
                    format!("--listen-client-urls={client_url}"),
                    format!("--advertise-client-urls={client_url}"),
                    format!("--listen-peer-urls={peer_url}"),
                    format!("--initial-advertise-peer-urls={peer_url}"),
                    format!("--initial-cluster={}", initial.join(",")),
                    format!("--initial-cluster-token={token}"),
                    "--initial-cluster-state=new".to_string(),
                    "--max-txn-ops=2048".to_string(),
                    "--heartbeat-interval=50".to_string(),
                    "--election-timeout=500".to_string(),
                ];
                Member {
                    args,
                    client_url,
                    log: dir.path().join(format!("m{i}.log")),
                    child: None,
                }
            })
            .collect();
        let mut cluster = EtcdCluster { members, _dir: dir };
        for i in 0..size {
            cluster.spawn(i);
        }
        for i in 0..size {
            cluster.wait_healthy(i)?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) {
        let member = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log)
            .unwrap();
        let mut command = Command::new("etcd");
        command
            .args(&member.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl in the forked child before exec; touches no shared memory. The member
        // dies with the test process even if the test is killed.
        unsafe {
            command.pre_exec(|| {
                use rustix::process::{Signal, set_parent_process_death_signal};
                set_parent_process_death_signal(Some(Signal::KILL)).map_err(std::io::Error::from)
            });
        }
        member.child = Some(command.spawn().expect("start etcd"));
    }

    fn wait_healthy(&self, i: usize) -> Result<(), String> {
        let url = format!("{}/health", self.members[i].client_url);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if http_get(&url).is_some_and(|body| body.contains("\"health\":\"true\"")) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
        Err(format!(
            "etcd member m{i} not healthy within 30 s; log tail:\n{}",
            &log[log.len().saturating_sub(2000)..]
        ))
    }

    /// The client URLs, comma-separated, as `--store etcd:` wants them.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A store URL with its own key prefix, so tests sharing a cluster stay independent.
    pub fn store_url(&self, prefix: &str) -> String {
        format!("etcd:{}?prefix=/{prefix}/", self.endpoints())
    }

    /// Kills member `i` (SIGKILL, by PID).
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data dir.
    pub fn restart_member(&mut self, i: usize) {
        self.spawn(i);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
