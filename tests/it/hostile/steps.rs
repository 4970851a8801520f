//! What a step (an `exec` initialiser) can do to the reconciler and to the operator's
//! terminal, with the real binary.

use std::time::Duration;

use serde_json::Value;

use crate::support::{self, Proc};

/// `run` of `spec` on a memory store, once its status satisfies `done`.
async fn running(
    spec: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> (tempfile::TempDir, Proc) {
    let dir = support::dir_with(&[("spec.yaml", spec)]);
    let server = Proc::start(dir.path(), "run --spec spec.yaml --store memory:");
    support::wait_for(Duration::from_secs(60), what, || async {
        let status = support::fetch_json(format!("{}/v1/status", server.url)).await?;
        done(&status).then_some(())
    })
    .await;
    (dir, server)
}

/// A step writing 1.5 GB to stdout took `bootsync run` to 1.47 GB: `exec` held all of it.
/// Its output is streamed now, and only the tail is kept.
#[it::test(multi_thread)]
async fn a_step_that_writes_one_and_a_half_gigabytes_leaves_run_small() {
    let spec = "initialisers:\n  - class: exec\n    name: chatty\n    flag: v1\n    params: { command: [sh, -c, 'head -c 1500000000 /dev/zero; head -c 300000000 /dev/zero >&2'] }\n";
    let (_dir, server) = running(spec, "the chatty step to converge", |s| {
        s["converged"] == true
    })
    .await;
    support::assert_peak_under(server.pid(), 50, "of run beside a 1.8 GB chatty step");
}

/// `bootsync history` printed a step's stderr raw, terminal escapes included: whoever
/// controls a step's output could clear, recolour or retitle the operator's terminal. Text
/// output shows control characters as escapes.
#[it::test(multi_thread)]
async fn terminal_escapes_in_a_step_error_are_shown_not_obeyed() {
    let spec = "initialisers:\n  - class: exec\n    name: rude\n    flag: v1\n    params: { command: [sh, -c, 'printf \"\\033[2J\\033]0;owned\\007broke\" >&2; exit 1'] }\n";
    let (dir, server) = running(spec, "the rude step to fail", |s| {
        s["initialisers"][0]["last_run"]["state"] == "failed"
    })
    .await;
    for line in [
        format!("history --server {}", server.url),
        format!("status --server {}", server.url),
    ] {
        let (code, out, err) = support::cli(dir.path(), &line);
        assert_eq!(code, 0, "{line}: {err}");
        assert!(out.contains("broke"), "{line}: {out}");
        assert!(
            !out.contains('\u{1b}') && !out.contains('\u{7}'),
            "{line}: {out:?}"
        );
        assert!(out.contains("\\u{1b}[2J"), "{line}: {out}");
    }
}
