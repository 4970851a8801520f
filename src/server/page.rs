//! The status page at `/`: one server-rendered HTML document, no scripts or external assets,
//! refreshed by the browser every few seconds. It shows what `/v1/status` holds.

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::status::collect;
use super::{ApiError, AppState};
use crate::api::status::{HistoryBody, InitialiserStatus, StatusBody};
use crate::api::system::State as RunState;
use crate::clock::{now_ms, utc};

/// Registrations listed on the page; the rest are counted.
const MAX_LISTED: usize = 200;
/// Seconds between the browser's reloads.
const REFRESH_SECONDS: u32 = 5;

pub(super) fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(page))
}

/// A human-readable status page (HTML, read-only).
#[utoipa::path(get, path = "/", tag = "status",
    security((), ("admin" = [])),
    responses(
        (status = 200, description = "The page", body = String, content_type = "text/html"),
        (status = 401, description = "An admin token is configured: send it as the Basic-auth password or as a bearer token", body = crate::api::ErrorBody),
    ))]
async fn page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(expected) = state.options.admin_token.as_ref() {
        let presented = crate::api::auth::bearer(&headers)
            .map(str::to_string)
            .or_else(|| super::auth::basic_password(&headers));
        if !presented.is_some_and(|p| expected.matches(&p)) {
            // A browser answers this challenge with a login prompt; any user name will do.
            let mut response = ApiError::unauthorized(
                "the status page needs the admin token (as the password, any user name)",
            )
            .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"bootsync\", charset=\"UTF-8\""),
            );
            return response;
        }
    }
    match collect(&state).await {
        Ok((body, history)) => {
            let serving = state.cfgsync.current();
            let mut registrations: Vec<Registration> = serving
                .registration_records()
                .map(|r| Registration {
                    identifier: r.identifier.clone(),
                    ip: r.ip.to_string(),
                    last_seen_ms: r.last_seen_ms,
                    replaces: r.replaces.clone(),
                })
                .collect();
            registrations.sort_by(|a, b| a.identifier.cmp(&b.identifier));
            Html(render(&body, &history, &registrations, now_ms())).into_response()
        }
        Err(err) => {
            let status = err.status();
            let page = format!(
                "<!doctype html><meta charset=utf-8><title>bootsync: error</title>\
                 <h1>bootsync</h1><p>The status cannot be read: {}</p>",
                escape(err.message())
            );
            (status, Html(page)).into_response()
        }
    }
}

/// One registered node, as the page lists it.
struct Registration {
    identifier: String,
    ip: String,
    last_seen_ms: u64,
    /// The node it replaced (`nodes replace`).
    replaces: Option<String>,
}

/// Escapes text for HTML element content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Runs listed under "Recent runs", newest first.
const RECENT_RUNS: usize = 10;

/// The newest runs of every initialiser, from their histories.
fn recent_runs(out: &mut String, history: &HistoryBody, now: u64) {
    let mut runs: Vec<_> = history
        .initialisers
        .iter()
        .flat_map(|(name, runs)| runs.iter().map(move |run| (name, run)))
        .collect();
    if runs.is_empty() {
        return;
    }
    runs.sort_by_key(|(_, run)| std::cmp::Reverse(run.started_ms));
    out.push_str(
        "<h2>Recent runs</h2><table id=runs><tr><th>Started</th><th>Name</th><th>Flag</th>\
         <th>Result</th><th>Took</th><th>Error</th></tr>",
    );
    for (name, run) in runs.into_iter().take(RECENT_RUNS) {
        let class = if run.result == "succeeded" {
            "ok"
        } else {
            "bad"
        };
        let _ = write!(
            out,
            "<tr><td title=\"{}\">{}</td><td>{}</td><td>{} → {}</td><td class={class}>{}</td>\
             <td>{} ms</td><td>{}</td></tr>",
            utc(run.started_ms),
            ago(run.started_ms, now),
            escape(name),
            escape(run.old_flag.as_deref().unwrap_or("—")),
            escape(&run.flag),
            escape(&run.result),
            run.duration_ms,
            run.error
                .as_deref()
                .map_or(String::new(), |e| format!("<pre>{}</pre>", escape(e))),
        );
    }
    out.push_str("</table>");
}

/// `42 s ago`, `3 min ago`, `2 h ago`, `5 d ago`.
fn ago(ms: u64, now: u64) -> String {
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86_400 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86_400),
    }
}

fn state_label(i: &InitialiserStatus) -> (&'static str, &'static str) {
    match i.last_run.as_ref().map(|r| r.state) {
        Some(RunState::Running) => ("running", "run"),
        Some(RunState::Succeeded) => ("succeeded", "ok"),
        Some(RunState::Failed) => ("failed", "bad"),
        Some(RunState::StateWriteFailed) => ("state write failed", "bad"),
        Some(RunState::NeedsOperator) => ("needs operator", "bad"),
        None if i.pre_gate => ("pre-gate", "ok"),
        None => ("never run", "run"),
    }
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.3em .6em;\
text-align:left;vertical-align:top}th{background:#f3f3f3}.ok{color:#176117}.bad{color:#a31515;\
font-weight:bold}.run{color:#8a5a00}pre{margin:0;white-space:pre-wrap;max-width:60em}td:not(:last-child){white-space:nowrap}\
.badge{padding:.1em .5em;border-radius:.3em;background:#eee}";

/// The whole page.
fn render(
    status: &StatusBody,
    history: &HistoryBody,
    registrations: &[Registration],
    now: u64,
) -> String {
    let cfgsync = &status.cfgsync;
    let mut out = String::with_capacity(8 * 1024);
    let (word, class) = if status.converged {
        ("converged", "ok")
    } else if status.initialisers.is_empty() {
        ("no reconciler yet", "run")
    } else {
        ("converging", "run")
    };
    let _ = write!(
        out,
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta http-equiv=refresh content={REFRESH_SECONDS}>\
         <meta name=viewport content=\"width=device-width\">\
         <title>bootsync: {word}</title><style>{STYLE}</style></head><body>\
         <h1>bootsync <span class=\"badge {class}\" id=converged>{word}</span></h1>\
         <p>Store <b id=backend>{}</b> at revision <b id=revision>{}</b>; \
         this page reloads every {REFRESH_SECONDS} s.</p>",
        escape(&status.backend),
        status.revision,
    );
    out.push_str("<h2>Initialisers</h2>");
    if status.initialisers.is_empty() {
        out.push_str("<p id=no-initialisers>No reconciler has recorded a spec yet.</p>");
    } else {
        out.push_str(
            "<table id=initialisers><tr><th>Name</th><th>Class</th><th>Wanted flag</th>\
             <th>Stored flag</th><th>State</th><th>Attempts</th><th>Last run</th>\
             <th>Last error</th></tr>",
        );
        for i in &status.initialisers {
            let (state, class) = state_label(i);
            let run = i.last_run.as_ref();
            let last_run = run.map_or_else(
                || "—".to_string(),
                |r| {
                    let took = r
                        .duration_ms
                        .map_or(String::new(), |d| format!(", took {d} ms"));
                    format!(
                        "<span title=\"{}\">{}</span>{took}",
                        utc(r.started_ms),
                        ago(r.started_ms, now)
                    )
                },
            );
            let error = run
                .and_then(|r| r.last_error.as_deref())
                .map_or(String::new(), |e| format!("<pre>{}</pre>", escape(e)));
            let _ = write!(
                out,
                "<tr id=\"init-{name}\"><td>{name}</td><td>{class_name}</td><td>{wanted}</td>\
                 <td>{stored}</td><td class={class}>{state}{warn}</td><td>{attempts}</td>\
                 <td>{last_run}</td><td>{error}</td></tr>",
                name = escape(&i.name),
                class_name = escape(&i.class),
                wanted = escape(i.wanted_flag.as_deref().unwrap_or("—")),
                stored = escape(i.stored_flag.as_deref().unwrap_or("—")),
                warn = if i.params_changed_without_flag_bump {
                    " <span class=run title=\"params changed but the flag did not\">(params changed)</span>"
                } else {
                    ""
                },
                attempts = run.map_or(0, |r| r.attempts),
            );
        }
        out.push_str("</table>");
    }
    recent_runs(&mut out, history, now);
    let serving = if cfgsync.policy {
        if cfgsync.ready {
            "ready (policy)"
        } else {
            "waiting for nodes (policy)"
        }
    } else if cfgsync.bundle {
        "serving a bundle"
    } else {
        "nothing to serve yet"
    };
    let _ = write!(
        out,
        "<h2>cfgsync</h2><p><span id=cfgsync-state>{serving}</span>; \
         <b id=registrations>{}</b> node(s) registered.</p>",
        registrations.len()
    );
    if !registrations.is_empty() {
        out.push_str("<table id=nodes><tr><th>Identifier</th><th>IP</th><th>Last seen</th></tr>");
        for r in registrations.iter().take(MAX_LISTED) {
            let _ = write!(
                out,
                "<tr><td>{}{}</td><td>{}</td><td title=\"{}\">{}</td></tr>",
                escape(&r.identifier),
                r.replaces.as_deref().map_or(String::new(), |old| format!(
                    " <span class=run>(replaced {})</span>",
                    escape(old)
                )),
                escape(&r.ip),
                utc(r.last_seen_ms),
                ago(r.last_seen_ms, now)
            );
        }
        out.push_str("</table>");
        if registrations.len() > MAX_LISTED {
            let _ = write!(
                out,
                "<p>… and {} more.</p>",
                registrations.len() - MAX_LISTED
            );
        }
    }
    out.push_str(
        "<p><a href=\"/v1/status\">/v1/status</a> · <a href=\"/v1/openapi.json\">OpenAPI</a> · \
         <a href=\"/metrics\">metrics</a></p></body></html>",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::system::Status;

    fn failed(error: &str) -> InitialiserStatus {
        InitialiserStatus {
            name: "migrate<1>".into(),
            class: "exec".into(),
            wanted_flag: Some("v2".into()),
            stored_flag: Some("v1".into()),
            converged: false,
            last_run: Some(Status {
                state: RunState::Failed,
                class: "exec".into(),
                flag: "v2".into(),
                old_flag: Some("v1".into()),
                attempts: 3,
                consecutive_failures: 3,
                last_error: Some(error.into()),
                started_ms: 1_700_000_000_000,
                finished_ms: Some(1_700_000_000_250),
                duration_ms: Some(250),
                holder: "h".into(),
                succeeded_params_hash: None,
            }),
            params_changed_without_flag_bump: false,
            pre_gate: false,
        }
    }

    #[test]
    fn the_page_escapes_what_it_shows_and_names_the_failure() {
        let status = StatusBody {
            revision: 7,
            backend: "sqlite".into(),
            converged: false,
            initialisers: vec![failed("exit 1: <script>alert(1)</script>")],
            cfgsync: Default::default(),
        };
        let history = HistoryBody {
            revision: 7,
            initialisers: [(
                "migrate<1>".to_string(),
                vec![crate::api::system::HistoryEntry {
                    started_ms: 1_700_000_000_000,
                    finished_ms: 1_700_000_000_250,
                    duration_ms: 250,
                    result: "failed".into(),
                    old_flag: Some("v1".into()),
                    flag: "v2".into(),
                    error: Some("<b>boom</b>".into()),
                    holder: "h".into(),
                }],
            )]
            .into(),
        };
        let html = render(&status, &history, &[], 1_700_000_042_000);
        assert!(html.contains("<table id=runs>"), "{html}");
        assert!(html.contains("&lt;b&gt;boom&lt;/b&gt;"), "{html}");
        assert!(html.contains("v1 → v2"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("exit 1: &lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("migrate&lt;1&gt;"));
        assert!(html.contains("class=bad>failed"));
        assert!(html.contains("42 s ago"));
        assert!(html.contains("2023-11-14 22:13:20 UTC"));
    }
}
