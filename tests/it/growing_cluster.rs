//! Serving while the set grows: old clients that give up after about a second are served, a
//! restart with many registrations listens before it has read them, and a gzip client gets the
//! same payload compressed.

use crate::support;

use crate::support::{Setup, TestServer};
use bootsync::cfgsync::NodeRegistration;
use futures_util::StreamExt;

use std::io::Read;
use std::time::Duration;

use serde_json::{Value, json};

/// Each node's file lists every node's IP, and the set is ready from its first node: every
/// registration changes every node's file.
const GROWING: &str = r#"
expect_nodes: 1
files:
  - path: /config.yaml
    template: |
      id: {{ node.identifier }}
      peers: {{ node_ips }}
"#;

fn registration(i: usize) -> Value {
    json!({"identifier": format!("node-{i:04}"), "ip": format!("10.0.{}.{}", i / 250, i % 250 + 1)})
}

/// What the seed's client does: up to 5 tries, 250 ms apart, on any failure, for the
/// registration and then for the payload; it gives up after about a second.
async fn seed_style_client(http: reqwest::Client, url: String, me: Value) -> Result<Value, String> {
    let mut registered = false;
    for _ in 0..5 {
        match http.post(format!("{url}/register")).json(&me).send().await {
            Ok(r) if r.status() == 202 => {
                registered = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    if !registered {
        return Err("registration failed 5 times".into());
    }
    let mut last = String::new();
    for _ in 0..5 {
        match http.post(format!("{url}/node")).json(&me).send().await {
            Ok(r) if r.status() == 200 => return r.json().await.map_err(|e| e.to_string()),
            Ok(r) => last = format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(err) => last = err.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!("gave up after 5 tries; last answer: {last}"))
}

#[it::test(multi_thread)]
async fn old_clients_that_give_up_after_a_second_are_all_served_in_a_growing_cluster() {
    let proc = TestServer::with(Setup::policy(GROWING)).await;
    let http = bootsync::tls::plain_client();
    let mut clients = Vec::new();
    let n = 300;
    for i in 0..n {
        let handle = tokio::spawn(seed_style_client(
            http.clone(),
            proc.url().to_string(),
            registration(i),
        ));
        clients.push(handle);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut failures = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        match client.await.unwrap() {
            Ok(payload) => {
                let content = payload["files"][0]["content"].as_str().unwrap().to_string();
                let me = registration(i);
                let ip = me["ip"].as_str().unwrap();
                // Read your writes: the node's own registration is in what it got.
                assert!(
                    content.contains(&format!("id: node-{i:04}"))
                        && content.contains(&format!("\"{ip}\"")),
                    "node {i}: {content}"
                );
            }
            Err(err) => failures.push(format!("node {i}: {err}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} old clients were not served:\n{}",
        failures.len(),
        failures.join("\n"),
    );
}

#[it::test]
async fn a_gzip_client_gets_the_same_payload_compressed_and_an_old_client_gets_plain_json() {
    let policy = r#"
expect_nodes: 3
files:
  - path: /config.yaml
    template: "id: {{ node.identifier }} peers: {{ peer_ips | tojson }}"
shared_files:
  - path: peers.txt
    template: "{{ node_ips | join('\n') }}{% for i in range(400) %}\nfiller line {{ i }}{% endfor %}"
"#;
    let proc = TestServer::with(Setup::policy(policy)).await;
    // What is on the wire: a client that neither asks for gzip nor decodes it by itself.
    bootsync::tls::install_crypto_provider();
    let http = reqwest::Client::builder().no_gzip().build().unwrap();
    for i in 0..3 {
        let r = http
            .post(format!("{}/register", proc.url()))
            .json(&registration(i))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let fetch = |gzip: bool, i: usize| {
        let (http, url) = (http.clone(), proc.url().to_string());
        async move {
            let mut request = http.post(format!("{url}/node")).json(&registration(i));
            if gzip {
                request = request.header("accept-encoding", "gzip");
            }
            let r = request.send().await.unwrap();
            assert_eq!(r.status(), 200);
            let encoding = r
                .headers()
                .get("content-encoding")
                .map(|v| v.to_str().unwrap().to_string());
            (encoding, r.bytes().await.unwrap())
        }
    };
    for i in 0..3 {
        let (plain_encoding, plain) = fetch(false, i).await;
        assert_eq!(plain_encoding, None, "no Accept-Encoding, no compression");
        let (encoding, compressed) = fetch(true, i).await;
        assert_eq!(encoding.as_deref(), Some("gzip"));
        assert!(
            compressed.len() < plain.len() / 2,
            "{} vs {}",
            compressed.len(),
            plain.len()
        );
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(
            decoded, plain,
            "node {i}: the gzip body decodes to the plain one"
        );
        let payload: Value = serde_json::from_slice(&plain).unwrap();
        assert_eq!(payload["files"][1]["path"], "peers.txt");
        assert!(
            payload["files"][0]["content"]
                .as_str()
                .unwrap()
                .starts_with(&format!("id: node-{i:04} peers: [\"10.0.0."))
        );
    }
}

/// A loop over the peers and the `peer_ips` helper, at a size where the shared texts span
/// several compressed blocks: every node gets exactly its own list, plain and gzip alike.
#[it::test]
async fn spliced_peer_lists_reach_each_node_exactly_plain_and_gzip() {
    let n = 1_500;
    let policy = format!(
        r#"
expect_nodes: {n}
files:
  - path: /config.yaml
    template: |
      id: {{{{ node.identifier }}}}
      loop: [{{% for p in peers %}}"{{{{ p.ip }}}}"{{% if not loop.last %}}, {{% endif %}}{{% endfor %}}]
      helper: {{{{ peer_ips }}}}
"#
    );
    let proc = TestServer::with(Setup::policy(&policy)).await;
    bootsync::tls::install_crypto_provider();
    let http = reqwest::Client::builder().no_gzip().build().unwrap();
    let url = proc.url().to_string();
    futures_util::stream::iter(0..n)
        .for_each_concurrent(32, |i| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http
                    .post(format!("{url}/register"))
                    .json(&registration(i))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
            }
        })
        .await;
    let ips: Vec<String> = (0..n)
        .map(|i| registration(i)["ip"].as_str().unwrap().to_string())
        .collect();
    for i in [0, 1, 733, n - 2, n - 1] {
        let fetch = |gzip: bool| {
            let mut request = http.post(format!("{url}/node")).json(&registration(i));
            if gzip {
                request = request.header("accept-encoding", "gzip");
            }
            async move {
                let r = request.send().await.unwrap();
                assert_eq!(r.status(), 200);
                let gzipped = r.headers().get("content-encoding").is_some();
                (gzipped, r.bytes().await.unwrap())
            }
        };
        let (gzipped, plain) = fetch(false).await;
        assert!(!gzipped);
        let (gzipped, compressed) = fetch(true).await;
        assert!(gzipped, "node {i}: a gzip answer");
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, plain, "node {i}: gzip decodes to the plain body");
        let payload: Value = serde_json::from_slice(&plain).unwrap();
        let list: Vec<String> = ips
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, ip)| format!("\"{ip}\""))
            .collect();
        let list = list.join(", ");
        // minijinja drops the template's last newline.
        let expected = format!("id: node-{i:04}\nloop: [{list}]\nhelper: [{list}]");
        let content = payload["files"][0]["content"].as_str().unwrap();
        let differs = content
            .bytes()
            .zip(expected.bytes())
            .position(|(a, b)| a != b);
        assert!(
            content == expected,
            "node {i}: {} bytes, {} expected, first difference at {differs:?}",
            content.len(),
            expected.len()
        );
    }
}

#[it::test]
async fn a_restart_with_many_registrations_serves_every_one_of_them() {
    let dir = support::dir_with(&[("policy.yaml", GROWING)]);
    let db = format!("sqlite:{}/store.db", dir.path().display());
    let n = 2_000;
    {
        let proc = support::Proc::start(
            dir.path(),
            &format!("serve --store {db} --policy policy.yaml"),
        );
        // Sixteen at a time, each through the node client bootsync's own nodes use.
        let client = bootsync::cfgsync::CfgsyncClient::new(&proc.url);
        futures_util::stream::iter(0..n)
            .for_each_concurrent(16, |i| {
                let node: NodeRegistration = serde_json::from_value(registration(i)).unwrap();
                let client = &client;
                async move { client.register_node(&node).await.unwrap() }
            })
            .await;
    }
    // Restarted on the same file: the server listens before it has read the registrations
    // (start-up time is a benchmark figure, B7); a long-poll waits for the state.
    let proc = support::Proc::start(
        dir.path(),
        &format!("serve --store {db} --policy policy.yaml"),
    );
    let (status, payload) = support::post(&proc.url, "/node?wait=10", &registration(n - 1)).await;
    assert_eq!(status, 200);
    let content = payload["files"][0]["content"].as_str().unwrap();
    assert_eq!(
        content.matches("\"10.0.").count(),
        n,
        "every registration survived the restart and is listed"
    );
}
