//! Memory sized to the limits a deployment runs under.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{self, Proc};

/// The converger's memory limit (bytes) and its `--metadata-budget`, as the Kubernetes
/// example sets them.
fn converger_limits() -> (u64, String) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/deploy/kubernetes/converger.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let mut limit = None;
    let mut budget = None;
    for document in text.split("\n---\n") {
        let value: Value = serde_saphyr::from_str(document).unwrap();
        let containers = &value["spec"]["template"]["spec"]["containers"];
        for container in containers.as_array().into_iter().flatten() {
            if container["name"] != "bootsync" {
                continue;
            }
            let memory = container["resources"]["limits"]["memory"].as_str().unwrap();
            let mib: u64 = memory.strip_suffix("Mi").unwrap().parse().unwrap();
            limit = Some(mib << 20);
            let words: Vec<&str> = container["command"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let at = words.iter().position(|w| *w == "--metadata-budget");
            budget = at.map(|i| words[i + 1].to_string());
        }
    }
    let budget = budget.expect("the converger sets --metadata-budget");
    (limit.expect("the converger has a memory limit"), budget)
}

/// The Kubernetes example's 128 MiB limit was below the default 256 MiB metadata budget: one
/// join-token holder's registrations pushed the converger to 184 MB live and 209 MB after a
/// restart, and it crash-looped. The example now sets a budget that fits its limit, and the
/// server takes an eighth of a cgroup's limit when no budget is given.
#[it::test(multi_thread)]
async fn the_kubernetes_converger_survives_registrations_until_its_budget_and_a_restart() {
    let (limit, budget) = converger_limits();
    let policy =
        json!({"expect_nodes": 1, "files": [{"path": "f", "template": "{{ peers | length }}"}]});
    let dir = support::dir_with(&[("policy.json", &policy.to_string())]);
    let args =
        format!("serve --store sqlite:store.db --policy policy.json --metadata-budget {budget}");
    let mut server = Proc::start(dir.path(), &args);
    let http = bootsync::tls::plain_client();
    let blob = "m".repeat(60_000);
    let mut accepted = 0;
    let refusal = loop {
        let body = json!({"identifier": format!("n{accepted:05}"), "ip": "10.0.0.1",
                          "metadata": {"blob": blob}});
        let (status, answer) = support::post(&server.url, "/register", &body).await;
        if status != 202 {
            break answer;
        }
        accepted += 1;
        assert!(accepted < 10_000, "the budget never refused");
    };
    assert_eq!(refusal["code"], "metadata_budget", "{refusal}");
    let what = format!("through {accepted} registrations of 60 KB until the budget");
    support::assert_peak_under(server.pid(), limit >> 20, &what);

    server.kill9();
    let server = Proc::start(dir.path(), &args);
    let node = json!({"identifier": "n00000", "ip": "10.0.0.1", "metadata": {"blob": blob}});
    support::wait_for(
        Duration::from_secs(30),
        "a node served after the restart",
        || {
            let (http, url, node) = (http.clone(), server.url.clone(), node.clone());
            async move {
                let r = http
                    .post(format!("{url}/node"))
                    .json(&node)
                    .send()
                    .await
                    .ok()?;
                (r.status() == 200).then_some(())
            }
        },
    )
    .await;
    support::assert_peak_under(server.pid(), limit >> 20, "after a restart on them");
}
