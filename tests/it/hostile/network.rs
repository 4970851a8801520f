//! Outsiders without a token against the real server: slow bodies and heads, held slots,
//! silent TLS sockets. An outsider is another host: its connections come from other loopback
//! addresses (127.0.0.2 and up) than the nodes' (127.0.0.1), as they would from other
//! machines.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use crate::support::{self, Proc};

/// A TCP connection to `addr` from the loopback address `127.0.0.{host}`.
async fn connect_from(host: u8, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), 0)))?;
    socket.connect(addr).await
}

fn addr_of(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.parse().unwrap()
}

/// Whether reading `stream` would block (it is open and silent).
fn would_block(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// A server with both tokens and a one-node policy; nodes use `join`.
fn guarded_server(dir: &std::path::Path, extra: &str) -> Proc {
    std::fs::write(dir.join("join"), "join-token-0123456789").unwrap();
    std::fs::write(dir.join("admin"), "admin-token-0123456789").unwrap();
    let policy = json!({"expect_nodes": 1, "files": [{"path": "f", "template": "id {{ node.identifier }}"}]});
    std::fs::write(dir.join("policy.json"), policy.to_string()).unwrap();
    Proc::start(
        dir,
        &format!(
            "serve --store sqlite:s.db --policy policy.json --join-token-file join --admin-token-file admin {extra}"
        ),
    )
}

/// A client that opens a new connection for every request, as a probe or a fresh node does.
fn fresh_client() -> reqwest::Client {
    bootsync::tls::install_crypto_provider();
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// A node registers and fetches its files with the join token; returns how long it took.
async fn node_is_served(http: &reqwest::Client, url: &str, id: &str) -> Duration {
    let started = Instant::now();
    let node = json!({"identifier": id, "ip": "10.0.0.1"});
    let token = Some("join-token-0123456789");
    for (path, status) in [("/register", 202), ("/node?wait=5", 200)] {
        let url = format!("{url}{path}");
        let (got, body) =
            support::request(http, Method::POST, &url, token, Some(node.clone())).await;
        assert_eq!(got, status, "{id} at {path}: {body}");
    }
    started.elapsed()
}

/// Slow connections without a token, each trickling a body, must not grow the server: the
/// token is checked on the head, a body without one is never read, heads are buffered at
/// most 16 KiB each, and every body byte counts against one budget.
#[it::test(multi_thread)]
async fn two_thousand_slow_connections_without_a_token_cost_little_and_starve_no_node() {
    let dir = tempfile::tempdir().unwrap();
    let server = guarded_server(dir.path(), "");
    let addr = addr_of(&server.url);
    let mut held = Vec::new();
    for i in 0..2000u32 {
        let host = 2 + (i % 8) as u8;
        let Ok(mut stream) = connect_from(host, addr).await else {
            continue;
        };
        // Half send a whole head announcing 2 MB and start the body; half trickle a head
        // that grows towards its limit.
        let start: &[u8] = if i % 2 == 0 {
            b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n{\"identifier\": \""
        } else {
            b"POST /register HTTP/1.1\r\nHost: x\r\nX-Pad: "
        };
        let _ = stream.write_all(start).await;
        if i == 0 {
            // A body without the token is answered 401 from its head, never read.
            let answer = support::read_answer(&mut stream, Duration::from_secs(5)).await;
            assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
            continue;
        }
        held.push(stream);
    }
    // Keep every one of them trickling while a node is served.
    let trickle = tokio::spawn(async move {
        for _ in 0..10 {
            for stream in &mut held {
                let _ = stream.write_all(&[b'a'; 512]).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        held
    });
    let http = fresh_client();
    let took = node_is_served(&http, &server.url, "node-1").await;
    eprintln!("a node registered and fetched in {took:?} beside 2 000 slow connections");
    assert!(
        took < Duration::from_secs(5),
        "the node waited {took:?}: starved by the slow connections"
    );
    let held = trickle.await.unwrap();
    let what = format!("with {} slow connections", held.len());
    support::assert_peak_under(server.pid(), 150, &what);
}

/// An outsider holding and churning every slot open to it must starve neither the probes nor
/// the nodes: it takes at most its sources' shares, a quarter of the slots waits for
/// requests with a token, and probation slots, which answer the probes, are shared out per
/// source.
#[it::test(multi_thread)]
async fn with_every_slot_an_outsider_can_take_held_probes_and_nodes_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = guarded_server(dir.path(), "--max-connections 200 --header-timeout 60s");
    let addr = addr_of(&server.url);
    // Eight outsider addresses open silent connections, and keep opening them, so every slot
    // they can get is taken again as soon as it frees.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut outsiders = Vec::new();
    for host in 2..10u8 {
        let stop = stop.clone();
        outsiders.push(tokio::spawn(async move {
            let mut held = Vec::new();
            let mut opened = 0u32;
            while !stop.is_cancelled() && opened < 20_000 {
                if let Ok(stream) = connect_from(host, addr).await {
                    held.push(stream);
                }
                opened += 1;
                if held.len() > 100 {
                    held.remove(0);
                }
                tokio::task::yield_now().await;
            }
            opened
        }));
    }
    // Let them fill what they can.
    let http = fresh_client();
    support::wait_for(
        Duration::from_secs(20),
        "the outsiders to fill the slots open to them",
        || {
            let http = http.clone();
            let url = server.url.clone();
            async move {
                let r = http.get(format!("{url}/v1/config")).send().await.ok()?;
                (r.status() == 503).then_some(())
            }
        },
    )
    .await;
    // The liveness and the readiness probe, as an orchestrator asks them: no token.
    let mut answered = [0; 2];
    for (probe, count) in ["/healthz", "/readyz"].iter().zip(&mut answered) {
        for _ in 0..40 {
            let r = http.get(format!("{}{probe}", server.url)).send().await;
            *count += usize::from(r.is_ok_and(|r| r.status() == 200));
        }
    }
    let took = node_is_served(&http, &server.url, "node-1").await;
    stop.cancel();
    for outsider in outsiders {
        outsider.await.unwrap();
    }
    assert_eq!(
        answered,
        [40, 40],
        "/healthz and /readyz answered of 40 each"
    );
    eprintln!("a node with the join token was served in {took:?} beside the outsiders");
}

/// Sockets that send nothing must not hold the handshake slots real clients need: a socket
/// is accepted at once, must say hello within 2 s, and one source holds at most 8 handshake
/// slots.
#[it::test(multi_thread)]
async fn seven_hundred_silent_tls_sockets_delay_no_real_client() {
    let dir = tempfile::tempdir().unwrap();
    let pki = support::pki::pki(dir.path());
    let server = Proc::spawn(
        &[
            "serve",
            "--store",
            "memory:",
            "--tls-cert",
            pki.cert.to_str().unwrap(),
            "--tls-key",
            pki.key.to_str().unwrap(),
        ],
        dir.path(),
    );
    let addr = addr_of(&server.url);
    let connects = (0..700).map(|_| tokio::spawn(connect_from(2, addr)));
    let mut silent = Vec::new();
    for connect in connects {
        if let Ok(stream) = connect.await.unwrap() {
            silent.push(stream);
        }
    }
    // Until the silent sockets past the source's handshake slots are turned away: closed at
    // once by this server, or reset by the kernel when an accept loop stops taking them.
    let pid = server.pid();
    let open_fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    support::wait_for(
        Duration::from_secs(20),
        "the silent sockets to be turned away",
        || {
            let closed = silent.iter().filter(|s| !would_block(s)).count();
            async move { (closed >= 600).then_some(()) }
        },
    )
    .await;
    let held = open_fds();
    assert!(
        held < 64,
        "the server holds {held} descriptors for one silent source"
    );
    let ca = bootsync::tls::load_ca(&pki.ca).unwrap();
    let builder = reqwest::Client::builder().timeout(Duration::from_secs(3));
    let http = bootsync::tls::http_client(&ca, builder).unwrap();
    let clients = (0..9).map(|_| {
        let (http, url) = (http.clone(), server.url.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let answer = http.get(format!("{url}/healthz")).send().await;
            (answer.is_ok_and(|r| r.status() == 200), started.elapsed())
        })
    });
    let mut answered = 0;
    for client in clients {
        let (ok, took) = client.await.unwrap();
        eprintln!("a TLS client beside 700 silent sockets: answered {ok} in {took:?}");
        answered += usize::from(ok);
    }
    assert_eq!(
        answered, 9,
        "{answered} of 9 TLS clients answered within 3 s"
    );
    drop(silent);
}
