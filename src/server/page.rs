//! The status page at `/`: one server-rendered HTML document, no scripts or external assets,
//! refreshed by the browser every few seconds. It shows what `/v1/status` holds.

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
        Err(err) => (err.status(), Html(error_page(err.message()))).into_response(),
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

/// Runs listed under "Recent runs", newest first.
const RECENT_RUNS: usize = 10;

/// The page's template: minijinja escapes every value for HTML (the name ends in `.html`).
const PAGE: &str = include_str!("page.html");

fn templates() -> &'static minijinja::Environment<'static> {
    static TEMPLATES: std::sync::OnceLock<minijinja::Environment<'static>> =
        std::sync::OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        env.add_template("page.html", PAGE)
            .expect("the page template compiles");
        env.add_template(
            "error.html",
            "<!doctype html><meta charset=utf-8><title>bootsync: error</title>\
             <h1>bootsync</h1><p>The status cannot be read: {{ message }}</p>",
        )
        .expect("the error template compiles");
        env
    })
}

/// The page for a status that cannot be read.
fn error_page(message: &str) -> String {
    templates()
        .get_template("error.html")
        .and_then(|t| t.render(minijinja::context! { message }))
        .unwrap_or_else(|err| format!("the error page failed: {err}"))
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

/// One initialiser's row.
fn initialiser_row(i: &InitialiserStatus, now: u64) -> minijinja::Value {
    let (state, state_class) = state_label(i);
    let run = i.last_run.as_ref();
    minijinja::context! {
        name => i.name,
        class_name => i.class,
        wanted => i.wanted_flag.as_deref().unwrap_or("—"),
        stored => i.stored_flag.as_deref().unwrap_or("—"),
        state, state_class,
        params_changed => i.params_changed_without_flag_bump,
        attempts => run.map_or(0, |r| r.attempts),
        last_run => run.map(|r| minijinja::context! {
            at => utc(r.started_ms), ago => ago(r.started_ms, now), took_ms => r.duration_ms,
        }),
        error => run.and_then(|r| r.last_error.as_deref()),
    }
}

/// The newest runs of every initialiser, from their histories.
fn recent_runs(history: &HistoryBody, now: u64) -> Vec<minijinja::Value> {
    let mut runs: Vec<_> = history
        .initialisers
        .iter()
        .flat_map(|(name, runs)| runs.iter().map(move |run| (name, run)))
        .collect();
    runs.sort_by_key(|(_, run)| std::cmp::Reverse(run.started_ms));
    runs.into_iter()
        .take(RECENT_RUNS)
        .map(|(name, run)| {
            minijinja::context! {
                at => utc(run.started_ms), ago => ago(run.started_ms, now), name,
                old_flag => run.old_flag.as_deref().unwrap_or("—"), flag => run.flag,
                class => if run.result == "succeeded" { "ok" } else { "bad" },
                result => run.result, took_ms => run.duration_ms, error => run.error,
            }
        })
        .collect()
}

/// The whole page.
fn render(
    status: &StatusBody,
    history: &HistoryBody,
    registrations: &[Registration],
    now: u64,
) -> String {
    let cfgsync = &status.cfgsync;
    let (word, class) = if status.converged {
        ("converged", "ok")
    } else if status.initialisers.is_empty() {
        ("no reconciler yet", "run")
    } else {
        ("converging", "run")
    };
    let serving = match (cfgsync.policy, cfgsync.ready, cfgsync.bundle) {
        (true, true, _) => "ready (policy)",
        (true, false, _) => "waiting for nodes (policy)",
        (false, _, true) => "serving a bundle",
        (false, _, false) => "nothing to serve yet",
    };
    let nodes: Vec<minijinja::Value> = registrations
        .iter()
        .take(MAX_LISTED)
        .map(|r| {
            minijinja::context! {
                identifier => r.identifier, replaces => r.replaces, ip => r.ip,
                at => utc(r.last_seen_ms), ago => ago(r.last_seen_ms, now),
            }
        })
        .collect();
    let page = minijinja::context! {
        refresh => REFRESH_SECONDS, word, class, backend => status.backend,
        revision => status.revision,
        initialisers => status.initialisers.iter().map(|i| initialiser_row(i, now)).collect::<Vec<_>>(),
        runs => recent_runs(history, now),
        serving, registered => registrations.len(), nodes,
        applied => cfgsync.applied, rollout => cfgsync.rollout,
        more => registrations.len().saturating_sub(MAX_LISTED),
    };
    templates()
        .get_template("page.html")
        .and_then(|t| t.render(page))
        .unwrap_or_else(|err| error_page(&format!("the page failed to render: {err}")))
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
        // minijinja's HTML escaping also writes `/` as `&#x2f;`.
        assert!(html.contains("&lt;b&gt;boom&lt;&#x2f;b&gt;"), "{html}");
        assert!(html.contains("v1 → v2"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("exit 1: &lt;script&gt;alert(1)&lt;&#x2f;script&gt;"));
        assert!(html.contains("migrate&lt;1&gt;"));
        assert!(html.contains("class=bad>failed"));
        assert!(html.contains("42 s ago"));
        assert!(html.contains("2023-11-14 22:13:20 UTC"));
    }
}
