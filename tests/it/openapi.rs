//! `/v1/openapi.json`: a valid OpenAPI 3.1 document that describes every route the server has.

use crate::support;

use std::collections::BTreeSet;
use std::path::Path;

use crate::support::TestServer;
use serde_json::Value;

async fn document(server: &TestServer) -> Value {
    let response = support::get(format!("{}/v1/openapi.json", server.url()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.unwrap()
}

/// `(METHOD, /path)` of every operation in the document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

#[it::test]
async fn the_document_is_valid_openapi_3_1_and_every_operation_reaches_a_handler() {
    let server = TestServer::start().await;
    let doc = document(&server).await;

    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/openapi-3.1-schema.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&meta).expect("the OpenAPI meta-schema compiles");
    let problems: Vec<String> = validator
        .iter_errors(&doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(problems.is_empty(), "not valid OpenAPI 3.1: {problems:#?}");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));

    // Every described operation is answered by its handler, not by the router's fallbacks.
    let http = bootsync::tls::plain_client();
    let ops = operations(&doc);
    assert!(ops.len() >= 14, "{ops:?}");
    for (method, path) in &ops {
        let concrete = path
            .replace("{ns}", "probe")
            .replace("{type}", "probe")
            .replace("{key}", "probe");
        let url = format!("{}{concrete}", server.url());
        let request = http
            .request(method.parse().unwrap(), &url)
            .header("content-type", "application/json")
            .body("{}");
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        assert_ne!(
            status, 405,
            "{method} {path} is described but not routed: {body}"
        );
        assert!(
            !(status == 404 && body.contains("no such route")),
            "{method} {path} is described but not routed: {body}"
        );
    }
}

/// `METHOD /path` pairs written in backticks in a spec document.
fn routes_in(markdown: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for chunk in markdown.split('`').skip(1).step_by(2) {
        let mut words = chunk.split_whitespace();
        let (Some(method), Some(path)) = (words.next(), words.next()) else {
            continue;
        };
        if !matches!(method, "GET" | "PUT" | "POST" | "DELETE") || !path.starts_with('/') {
            continue;
        }
        let path = path.split('?').next().unwrap().to_string();
        out.insert((method.to_string(), path));
    }
    out
}

#[it::test]
async fn every_route_the_specs_name_is_described() {
    let server = TestServer::start().await;
    let described = operations(&document(&server).await);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut named = BTreeSet::new();
    for spec in ["specs/api.md", "specs/cfgsync.md", "specs/bootstrap.md"] {
        named.extend(routes_in(
            &std::fs::read_to_string(root.join(spec)).unwrap(),
        ));
    }
    assert!(
        named.len() >= 10,
        "the specs' route tables were not found: {named:?}"
    );
    let missing: Vec<_> = named.difference(&described).collect();
    assert!(
        missing.is_empty(),
        "named in specs/ but not described: {missing:?}"
    );
}

#[it::test]
fn no_route_is_registered_outside_the_described_routers() {
    // Handlers become routes either through `routes!(...)` (described) or through axum's
    // method routers and services (not described). The second kind must not exist.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    support::rust_files(&root.join("src"), &mut files);
    support::rust_files(&root.join("initialisers"), &mut files);
    assert!(files.len() > 20);
    let mut offenders = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap();
            if code.contains("axum::routing")
                || code.contains(".route_service(")
                || code.contains(".nest_service(")
                || code.contains("Router::new().route(")
            {
                offenders.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(offenders.is_empty(), "undescribed routes: {offenders:#?}");
}
