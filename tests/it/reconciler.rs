//! The reconciler as an operator runs it: `bootsync run` and `bootsync bootstrap` processes,
//! real SQLite, SIGHUP, kill -9, and several replicas on one server.

use crate::support;

use std::path::Path;
use std::time::Duration;

use crate::support::Proc;
use serde_json::Value;

const FAST: &str = "cadence: { gate_backoff: 1s, retry: 1s, steady: 300s, max_backoff: 2s }\n";

async fn get(url: &str, path: &str) -> Value {
    support::get(format!("{url}{path}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn flags(url: &str) -> Value {
    let body = get(url, "/v1/config/__system__/init-state").await;
    let mut out = serde_json::Map::new();
    if let Some(entries) = body["entries"].as_object() {
        for (name, entry) in entries {
            out.insert(name.clone(), entry["value"].clone());
        }
    }
    Value::Object(out)
}

async fn wait_flag(url: &str, name: &str, flag: &str) {
    support::wait_for(
        Duration::from_secs(60),
        &format!("{name} stored at {flag}"),
        || async { (flags(url).await[name] == flag).then_some(()) },
    )
    .await;
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_spec(dir: &Path, body: &str) {
    std::fs::write(dir.join("spec.yaml"), format!("{FAST}{body}")).unwrap();
}

fn record(name: &str, flag: &str) -> String {
    format!(
        "  - class: exec\n    name: {name}\n    flag: {flag}\n    params: {{ command: [sh, -c, 'echo \"$BOOTSYNC_OLD_FLAG>$BOOTSYNC_NEW_FLAG\" >> {name}.log'] }}\n"
    )
}

#[it::test]
async fn run_converges_out_of_order_steps_in_one_wake_and_a_bumped_flag_reruns_only_that_step() {
    let dir = support::dir_with(&[("seed.yaml", "settings:\n  a: 1\n")]);
    let steps = |record_flag: &str| {
        format!(
            "initialisers:\n  - {{ class: namespace-init, name: prod, flag: v1, params: {{ namespace: prod }} }}\n  - {{ class: template-seed, name: template, flag: v1, params: {{ seed_file: seed.yaml }} }}\n{}",
            record("record", record_flag)
        )
    };
    write_spec(dir.path(), &steps("v1"));
    let db = format!("sqlite:{}/x.db", dir.path().display());
    let server = Proc::start(dir.path(), &format!("run --spec spec.yaml --store {db}"));
    // `prod` is first in the spec but converges last, in the same wake's extra pass.
    wait_flag(&server.url, "prod", "v1").await;
    let stored = flags(&server.url).await;
    assert_eq!(
        (stored["prod"].as_str(), stored["template"].as_str()),
        (Some("v1"), Some("v1"))
    );
    let prod_status = get(&server.url, "/v1/config/__system__/init-status/prod").await;
    assert_eq!(
        prod_status["value"]["attempts"], 2,
        "failed once, converged in the extra pass of the same wake"
    );
    let prod = get(&server.url, "/v1/config/prod/settings/a").await;
    assert_eq!(prod["value"], 1);
    let template_run =
        get(&server.url, "/v1/config/__system__/init-status/template").await["value"]["started_ms"]
            .clone();

    write_spec(dir.path(), &steps("v2"));
    server.signal("HUP");
    wait_flag(&server.url, "record", "v2").await;
    assert_eq!(
        lines(&dir.path().join("record.log")),
        [">v1", "v1>v2"],
        "the bumped step sees its old flag"
    );
    let again =
        get(&server.url, "/v1/config/__system__/init-status/template").await["value"]["started_ms"]
            .clone();
    assert_eq!(
        again, template_run,
        "a step whose flag did not change must not re-run"
    );
    let status: Value = get(&server.url, "/v1/status").await;
    assert_eq!(status["converged"], true);
}

#[it::test]
async fn an_invalid_spec_on_sighup_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    write_spec(dir.path(), &format!("initialisers:\n{}", record("a", "v1")));
    let server = Proc::start(dir.path(), "run --spec spec.yaml --store memory:");
    wait_flag(&server.url, "a", "v1").await;
    std::fs::write(
        dir.path().join("spec.yaml"),
        "initialisers: [ { class: nope } ]",
    )
    .unwrap();
    server.signal("HUP");
    support::wait_for(
        Duration::from_secs(20),
        "the reload error in the log",
        || async {
            server
                .stderr()
                .contains("keeping the old one")
                .then_some(())
        },
    )
    .await;
    assert!(
        server.stderr().contains("unknown class \\\"nope\\\"")
            || server.stderr().contains("unknown class")
    );
    let health = support::get(format!("{}/healthz", server.url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[it::test]
async fn a_failing_and_a_hanging_step_do_not_stop_the_others_and_show_in_status() {
    let dir = tempfile::tempdir().unwrap();
    write_spec(
        dir.path(),
        &format!(
            "initialisers:\n  - {{ class: exec, name: broken, flag: v1, params: {{ command: [sh, -c, 'echo migration exploded >&2; exit 7'] }} }}\n  - {{ class: exec, name: stuck, flag: v1, timeout: 1s, params: {{ command: [sleep, '30'] }} }}\n{}",
            record("fine", "v1")
        ),
    );
    let server = Proc::start(dir.path(), "run --spec spec.yaml --store memory:");
    wait_flag(&server.url, "fine", "v1").await;
    let status = support::wait_for(
        Duration::from_secs(30),
        "both failures recorded",
        || async {
            let status = get(&server.url, "/v1/status").await;
            let failed = status["initialisers"]
                .as_array()?
                .iter()
                .filter(|i| i["last_run"]["last_error"].is_string())
                .count();
            (failed == 2).then_some(status)
        },
    )
    .await;
    let find = |name: &str| {
        status["initialisers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .unwrap()
            .clone()
    };
    let broken = find("broken");
    assert!(
        broken["last_run"]["last_error"]
            .as_str()
            .unwrap()
            .contains("migration exploded"),
        "{broken}"
    );
    assert_eq!(broken["stored_flag"], Value::Null);
    assert!(
        find("stuck")["last_run"]["last_error"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
    assert_eq!(status["converged"], false);
    let (code, out, _) = support::cli(dir.path(), &format!("status --server {}", server.url));
    assert_eq!(code, 0);
    assert!(
        out.contains("migration exploded"),
        "the status table shows the error: {out}"
    );
    let (code, _, err) = support::cli(
        dir.path(),
        &format!("status --server {} --wait --timeout 2s", server.url),
    );
    assert_eq!(code, 3, "status --wait gives up while not converged: {err}");
    assert!(err.contains("broken"), "it says what it waits for: {err}");
    assert!(
        err.contains("migration exploded"),
        "and the error it is stuck on: {err}"
    );

    // Machine-readable: progress and giving up as JSON lines on stderr, the status on stdout.
    let wait_json = |extra: &[&str]| {
        let mut args = vec![
            "status",
            "--server",
            &server.url,
            "--wait",
            "--timeout",
            "2s",
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        support::run_cli(&args, dir.path())
    };
    let (code, out, err) = wait_json(&[]);
    assert_eq!(code, 3, "{err}");
    let status: Value = serde_json::from_str(&out).expect("the last status as JSON on stdout");
    assert_eq!(status["converged"], false);
    let events: Vec<Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let waiting = events
        .iter()
        .find(|e| e["event"] == "waiting")
        .expect("a waiting event");
    let broken = waiting["waiting_for"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "broken")
        .expect("broken is waited for");
    assert!(
        broken["last_error"]
            .as_str()
            .unwrap()
            .contains("migration exploded")
    );
    assert_eq!(events.last().unwrap()["event"], "gave_up");
    // Unchanged progress is not repeated every poll: consecutive lines differ.
    let messages: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "waiting")
        .map(|e| &e["message"])
        .collect();
    assert!(messages.windows(2).all(|w| w[0] != w[1]), "{err}");

    // Quiet: only the final problem is said.
    let (code, _, err) = wait_json(&["--quiet"]);
    assert_eq!(code, 3);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("\"gave_up\""), "{err}");
}

#[it::test]
async fn three_replicas_run_each_step_once_per_flag_and_a_standby_takes_over_from_a_killed_holder()
{
    let dir = tempfile::tempdir().unwrap();
    let counted = |flag: &str| {
        format!(
            "initialisers:\n  - class: exec\n    name: counted\n    flag: {flag}\n    params: {{ command: [sh, -c, 'echo \"start $BOOTSYNC_NEW_FLAG\" >> count.log; if [ $BOOTSYNC_NEW_FLAG = v2 ]; then sleep 4; fi; echo \"done $BOOTSYNC_NEW_FLAG\" >> count.log'] }}\n"
        )
    };
    write_spec(dir.path(), &counted("v1"));
    let db = format!("sqlite:{}/x.db", dir.path().display());
    let server = Proc::start(dir.path(), &format!("serve --store {db}"));
    let mut replicas: Vec<Proc> = (0..3)
        .map(|i| {
            let holder = format!("replica-{i}");
            support::replica(dir.path(), &server.url, &holder)
        })
        .collect();
    wait_flag(&server.url, "counted", "v1").await;
    assert_eq!(
        lines(&dir.path().join("count.log")),
        ["start v1", "done v1"],
        "exactly one replica ran v1"
    );

    write_spec(dir.path(), &counted("v2"));
    for r in &replicas {
        r.signal("HUP");
    }
    support::wait_for(Duration::from_secs(30), "a replica started v2", || async {
        lines(&dir.path().join("count.log"))
            .contains(&"start v2".to_string())
            .then_some(())
    })
    .await;
    let lease = get(&server.url, "/v1/config/__system__/lease/reconciler").await;
    let holder = lease["value"]["holder"]
        .as_str()
        .expect("someone holds the lease while v2 runs")
        .to_string();
    let index: usize = holder.trim_start_matches("replica-").parse().unwrap();
    replicas[index].kill9();
    wait_flag(&server.url, "counted", "v2").await;
    let log = lines(&dir.path().join("count.log"));
    assert_eq!(
        log.iter().filter(|l| *l == "done v2").count(),
        1,
        "v2 completed exactly once: {log:?}"
    );
    assert_eq!(log.iter().filter(|l| *l == "done v1").count(), 1, "{log:?}");
    let status = get(&server.url, "/v1/config/__system__/init-status/counted").await;
    assert_ne!(
        status["value"]["holder"], holder,
        "a standby finished the work"
    );
}

#[it::test]
async fn kill_9_during_a_step_stores_no_flag_and_a_restart_runs_it_again() {
    let dir = tempfile::tempdir().unwrap();
    write_spec(
        dir.path(),
        "initialisers:\n  - class: exec\n    name: slow\n    flag: v1\n    params: { command: [sh, -c, 'echo run >> runs.log; if [ $(wc -l < runs.log) -eq 1 ]; then sleep 60; fi'] }\n",
    );
    let db = format!("sqlite:{}/x.db", dir.path().display());
    let args = [
        "run",
        "--spec",
        "spec.yaml",
        "--store",
        db.as_str(),
        "--holder-id",
        "sidecar",
    ];
    let mut first = Proc::spawn(&args, dir.path());
    support::wait_for(Duration::from_secs(30), "the step started", || async {
        (lines(&dir.path().join("runs.log")).len() == 1).then_some(())
    })
    .await;
    assert_eq!(
        flags(&first.url).await["slow"],
        Value::Null,
        "no flag while the step runs"
    );
    first.kill9();
    let second = Proc::spawn(&args, dir.path());
    wait_flag(&second.url, "slow", "v1").await;
    assert_eq!(
        lines(&dir.path().join("runs.log")).len(),
        2,
        "the interrupted step ran again"
    );
}

#[it::test]
fn check_reports_every_problem_and_exits_2() {
    let dir = support::dir_with(&[(
        "bad.yaml",
        "initialisers:\n  - { class: exec, name: a, flag: v1, params: { command: [\"true\"], colour: red } }\n  - { class: nope, name: a, flag: v1 }\n  - { name: c }\n",
    )]);
    let (code, out, _) = support::cli(dir.path(), "check --spec bad.yaml");
    assert_eq!(code, 2, "{out}");
    for expected in [
        "initialisers[0] (a)",
        "colour",
        "unknown class \"nope\"",
        "duplicate name",
        "initialisers[2] (c): missing `class`",
        "missing `flag`",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    std::fs::write(
        dir.path().join("good.yaml"),
        format!("initialisers:\n{}", record("a", "v1")),
    )
    .unwrap();
    let (code, out, _) = support::cli(dir.path(), "check --spec good.yaml");
    assert_eq!(code, 0, "{out}");
}

#[it::test]
async fn plan_shows_what_would_run_and_why() {
    let dir = tempfile::tempdir().unwrap();
    write_spec(
        dir.path(),
        &format!("initialisers:\n{}{}", record("a", "v1"), record("b", "v1")),
    );
    let server = Proc::start(dir.path(), "run --spec spec.yaml --store memory:");
    wait_flag(&server.url, "b", "v1").await;
    write_spec(
        dir.path(),
        &format!(
            "initialisers:\n{}{}{}",
            record("a", "v1"),
            record("b", "v2"),
            record("c", "v1")
        ),
    );
    let (code, out, err) = support::cli(
        dir.path(),
        &format!("plan --spec spec.yaml --server {}", server.url),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("a: up to date at v1"), "{out}");
    assert!(out.contains("b: will run, v1 → v2"), "{out}");
    assert!(out.contains("c: will run, (none) → v1"), "{out}");
}

#[it::test]
async fn the_admin_token_never_reaches_the_logs_even_at_trace_level() {
    let dir = tempfile::tempdir().unwrap();
    let token = "adm1n-t0ken-that-must-not-leak";
    std::fs::write(dir.path().join("admin.token"), format!("{token}\n")).unwrap();
    write_spec(
        dir.path(),
        &format!("initialisers:\n{}", record("step", "v1")),
    );
    let db = format!("sqlite:{}/x.db", dir.path().display());
    for format in ["text", "json"] {
        let server = Proc::spawn_env(
            &[
                "run",
                "--spec",
                "spec.yaml",
                "--store",
                &db,
                "--admin-token-file",
                "admin.token",
                "--log-format",
                format,
            ],
            dir.path(),
            &[("RUST_LOG", "trace")],
        );
        // The reconciler's own requests carry the token; so do these, right and wrong.
        let http = bootsync::tls::plain_client();
        support::wait_for(Duration::from_secs(60), "step stored", || async {
            let body: Value = support::json_of(
                http.get(format!(
                    "{}/v1/config/__system__/init-state/step",
                    server.url
                ))
                .bearer_auth(token),
            )
            .await?;
            (body["value"] == "v1").then_some(())
        })
        .await;
        let wrong = http
            .put(format!("{}/v1/config/prod/cfg/a", server.url))
            .bearer_auth(format!("{token}-but-wrong"))
            .json(&1)
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401);
        let (code, _, _) = support::cli(
            dir.path(),
            &format!(
                "status --server {} --admin-token-file admin.token",
                server.url
            ),
        );
        assert_eq!(code, 0);
        let log = server.stderr();
        assert!(log.len() > 1000, "trace logging produced output: {log}");
        assert!(
            !log.contains("t0ken-that-must-not-leak"),
            "the admin token appears in the {format} log"
        );
    }
}

/// The start times of `name`'s recorded runs, oldest first, and their results.
async fn runs_of(url: &str, name: &str) -> Option<Vec<(u64, String)>> {
    let body = support::fetch_json(format!("{url}/v1/history")).await?;
    let runs = body["initialisers"][name].as_array()?;
    Some(
        runs.iter()
            .map(|r| {
                let started = r["started_ms"].as_u64().unwrap();
                (started, r["result"].as_str().unwrap().to_string())
            })
            .collect(),
    )
}

#[it::test]
async fn the_history_keeps_exactly_n_runs_per_initialiser_in_order_across_kill_9() {
    let spec = "cadence: { retry: 100ms, max_backoff: 200ms }\ninitialisers:\n  - { class: exec, name: flaky, flag: v1, params: { command: [sh, -c, 'echo no such table >&2; exit 3'] } }\n  - { class: exec, name: fine, flag: v1, params: { command: ['true'] } }\n";
    let dir = support::dir_with(&[("spec.yaml", spec)]);
    let db = format!("sqlite:{}/x.db", dir.path().display());
    let line = format!("run --spec spec.yaml --store {db} --history-len 4");
    let mut server = Proc::start(dir.path(), &line);
    // Six failures at least: more runs than the history keeps.
    let status = |url: String| async move {
        let body = support::fetch_json(format!("{url}/v1/status")).await?;
        let flaky = body["initialisers"]
            .as_array()?
            .iter()
            .find(|i| i["name"] == "flaky")?;
        (flaky["last_run"]["attempts"].as_u64()? >= 6).then_some(())
    };
    support::wait_for(Duration::from_secs(60), "six runs of flaky", || {
        status(server.url.clone())
    })
    .await;
    let before = runs_of(&server.url, "flaky").await.unwrap();
    assert_eq!(before.len(), 4, "exactly N runs: {before:?}");
    assert!(
        before.windows(2).all(|w| w[0].0 <= w[1].0),
        "in order: {before:?}"
    );
    assert!(
        before.iter().all(|(_, result)| result == "failed"),
        "{before:?}"
    );
    let fine = runs_of(&server.url, "fine").await.unwrap();
    assert_eq!(fine.len(), 1, "it ran once and converged: {fine:?}");
    assert_eq!(fine[0].1, "succeeded");

    server.kill9();
    let server = Proc::start(dir.path(), &line);
    let newest = before.last().unwrap().0;
    let after = support::wait_for(Duration::from_secs(60), "a run after the restart", || {
        let url = server.url.clone();
        async move {
            let runs = runs_of(&url, "flaky").await?;
            (runs.last()?.0 > newest).then_some(runs)
        }
    })
    .await;
    assert_eq!(after.len(), 4, "still exactly N after kill -9: {after:?}");
    assert!(
        after.windows(2).all(|w| w[0].0 <= w[1].0),
        "in order: {after:?}"
    );
    assert_eq!(
        runs_of(&server.url, "fine").await.unwrap(),
        fine,
        "the converged step did not run again"
    );

    let (code, out, err) = support::cli(
        dir.path(),
        &format!("history --server {} flaky", server.url),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 5, "a header and four runs: {out}");
    assert!(
        out.lines()
            .skip(1)
            .all(|l| l.contains("flaky") && l.contains("failed")),
        "{out}"
    );
    assert!(out.contains("no such table"), "the error's cause: {out}");
}
