//! TLS end to end: a CA and a server certificate made in the test, the real server on HTTPS,
//! and every kind of client trusting it through `--ca-cert` — or refusing it without.

use crate::support;

use std::time::Duration;

use crate::support::Proc;
use crate::support::pki::{Pki, pki};
use serde_json::Value;

fn tls_args(pki: &Pki) -> [&str; 4] {
    [
        "--tls-cert",
        pki.cert.to_str().unwrap(),
        "--tls-key",
        pki.key.to_str().unwrap(),
    ]
}

const BUNDLE: &str =
    "nodes:\n  - identifier: node-a\n    files: [{ path: /config.yaml, content: \"id: a\\n\" }]\n";

#[it::test]
async fn the_cli_and_the_node_client_work_over_https_with_the_ca_and_fail_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    std::fs::write(dir.path().join("bundle.yaml"), BUNDLE).unwrap();
    let mut args = vec!["serve", "--store", "memory:", "--bundle", "bundle.yaml"];
    args.extend(tls_args(&pki));
    let server = Proc::spawn(&args, dir.path());
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    let ca = pki.ca.to_str().unwrap();
    // `bootsync COMMAND --server URL [--ca-cert CA] REST`: exit code, stdout and stderr.
    let with = |command: &str, ca: Option<&str>, rest: &str| {
        let trust = ca.map_or(String::new(), |ca| format!(" --ca-cert {ca}"));
        support::cli(
            dir.path(),
            &format!("{command} --server {}{trust} {rest}", server.url),
        )
    };

    let (code, out, err) = support::run_cli(
        &[
            "config",
            "put",
            "--server",
            &server.url,
            "--ca-cert",
            ca,
            "prod",
            "cfg",
            "a",
            "{\"x\": 1}",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = with("config get", Some(ca), "prod cfg a");
    assert_eq!(code, 0, "{err}");
    let entry: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(entry["value"]["x"], 1);

    let node = "--identifier node-a --ip 10.0.0.1 --output-dir .";
    let (code, _, err) = with(
        "client",
        Some(ca),
        &format!("{node} --route /config.yaml=node.yaml --timeout 20s"),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("node.yaml")).unwrap(),
        "id: a\n"
    );

    // Without the CA the certificate is refused, clearly and within the timeout.
    let (code, _, err) = with("config get", None, "prod cfg a");
    assert_ne!(code, 0);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let (code, _, err) = with("client", None, &format!("{node} --timeout 2s"));
    assert_eq!(code, 3, "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // Plain HTTP to the TLS port gets no answer from the API.
    let plain = server.url.replacen("https://", "http://", 1);
    let answer = bootsync::tls::plain_client()
        .get(format!("{plain}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        answer.as_ref().map_or(true, |r| !r.status().is_success()),
        "plain HTTP was served: {answer:?}"
    );
    // And the server still serves HTTPS after that.
    let (code, _, err) = support::cli(
        dir.path(),
        &format!(
            "config get --server {} --ca-cert {} prod cfg a",
            server.url, ca
        ),
    );
    assert_eq!(code, 0, "{err}");
}

#[it::test]
async fn run_over_https_converges_through_its_own_listener() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    std::fs::write(
        dir.path().join("spec.yaml"),
        "cadence: { gate_backoff: 1s, retry: 1s }\ninitialisers:\n  - { class: exec, name: hello, flag: v1, params: { command: [\"true\"] } }\n",
    )
    .unwrap();
    let db = format!("sqlite:{}/x.db", dir.path().display());
    let mut args = vec!["run", "--spec", "spec.yaml", "--store", &db, "--ca-cert"];
    args.push(pki.ca.to_str().unwrap());
    args.extend(tls_args(&pki));
    let server = Proc::spawn(&args, dir.path());
    eprintln!("server log: {}", dir.path().display());
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.ca).unwrap()).unwrap();
    bootsync::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .tls_certs_merge([ca])
        .build()
        .unwrap();
    support::wait_for(Duration::from_secs(30), "hello stored at v1", || async {
        let body: Value = support::json_of(http.get(format!(
            "{}/v1/config/__system__/init-state/hello",
            server.url
        )))
        .await?;
        (body["value"] == "v1").then_some(())
    })
    .await;
    drop(server);
}

#[it::test]
fn tls_flag_mistakes_are_clear_and_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let cert = pki.cert.to_str().unwrap();
    let (code, _, err) = support::cli(
        dir.path(),
        &format!("serve --store memory: --listen 127.0.0.1:0 --tls-cert {cert}"),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--tls-key"), "{err}");

    std::fs::write(
        dir.path().join("junk.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (code, _, err) = support::run_cli(
        &[
            "serve",
            "--store",
            "memory:",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "junk.pem",
            "--tls-key",
            pki.key.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("junk.pem"), "{err}");

    // A key that is not the certificate's.
    std::fs::write(
        dir.path().join("other.key"),
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let (code, _, err) = support::cli(
        dir.path(),
        &format!(
            "serve --store memory: --listen 127.0.0.1:0 --tls-cert {cert} --tls-key other.key"
        ),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("other.key"), "{err}");
}
