//! `GET /v1/status`: every initialiser's wanted and stored flag, state and last error, plus
//! cfgsync readiness — read from `__system__`, so the server needs no spec.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Admin;
use super::error::ApiQuery;
use super::refusals::AdminRequired;
use super::{ApiError, AppState};
use crate::api::status::{
    CfgsyncSummary, HistoryBody, HistoryQuery, InitialiserStatus, StatusBody,
};
use crate::api::system::{
    History, INIT_HISTORY, INIT_SPEC, INIT_STATE, INIT_STATUS, SPEC_KEY, Status, WantedSpec,
};
use crate::bootstrap::{Facts, assess};
use crate::store::{Entry, Revision, SYSTEM_NAMESPACE};

pub(super) fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(history))
}

/// Each initialiser's last runs, oldest first (`?name=` for one).
#[utoipa::path(get, path = "/v1/history", tag = "status",
    params(HistoryQuery),
    security((), ("admin" = [])),
    responses(
        (status = 200, description = "The runs", body = HistoryBody),
        AdminRequired,
        (status = 404, description = "`name` has no history", body = crate::api::ErrorBody),
    ))]
async fn history(
    State(state): State<AppState>,
    _: Admin,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> Result<Json<HistoryBody>, ApiError> {
    let body = read_history(&state).await?;
    match query.name {
        None => Ok(Json(body)),
        Some(name) => {
            let runs =
                body.initialisers.get(&name).cloned().ok_or_else(|| {
                    ApiError::not_found(format!("no runs are recorded for {name:?}"))
                })?;
            Ok(Json(HistoryBody {
                revision: body.revision,
                initialisers: BTreeMap::from([(name, runs)]),
            }))
        }
    }
}

/// Every initialiser's history, in one store round trip.
async fn read_history(state: &AppState) -> Result<HistoryBody, ApiError> {
    let listing = state.store.list(SYSTEM_NAMESPACE, INIT_HISTORY).await?;
    Ok(history_of(listing.revision, &listing.entries))
}

/// The histories among `entries` (an `init-history` listing), read at `revision`.
fn history_of(revision: Revision, entries: &BTreeMap<String, Entry>) -> HistoryBody {
    let initialisers = entries
        .iter()
        .filter_map(|(name, entry)| {
            let history: History = serde_json::from_value(entry.value.clone()).ok()?;
            Some((name.clone(), history.runs))
        })
        .collect();
    HistoryBody {
        revision,
        initialisers,
    }
}

/// Every initialiser's wanted and stored flag, state and last run; cfgsync readiness.
#[utoipa::path(get, path = "/v1/status", tag = "status",
    security((), ("admin" = [])),
    responses(
        (status = 200, description = "The reconciler's state", body = StatusBody),
        AdminRequired,
    ))]
async fn status(State(state): State<AppState>, _: Admin) -> Result<Json<StatusBody>, ApiError> {
    Ok(Json(collect(&state).await?.0))
}

/// Reads the status and the run histories from `__system__` (one store round trip), and
/// cfgsync's summary from its view.
pub(super) async fn collect(state: &AppState) -> Result<(StatusBody, HistoryBody), ApiError> {
    let tree = state.store.namespace(SYSTEM_NAMESPACE).await?;
    let empty = BTreeMap::new();
    let kind = |name: &str| tree.types.get(name).unwrap_or(&empty);
    let history = history_of(tree.revision, kind(INIT_HISTORY));
    let wanted: Option<WantedSpec> = kind(INIT_SPEC)
        .get(SPEC_KEY)
        .and_then(|e| serde_json::from_value(e.value.clone()).ok());
    let initialisers = initialisers(wanted.as_ref(), kind(INIT_STATE), kind(INIT_STATUS));
    let converged = wanted.is_some() && initialisers.iter().all(|i| i.converged);
    let status = StatusBody {
        revision: tree.revision,
        backend: state.store.backend().to_string(),
        converged,
        initialisers,
        cfgsync: cfgsync_summary(state),
    };
    Ok((status, history))
}

/// Every initialiser the spec wants, in its order, then any other that has a stored flag.
fn initialisers(
    wanted: Option<&WantedSpec>,
    stored: &BTreeMap<String, Entry>,
    records: &BTreeMap<String, Entry>,
) -> Vec<InitialiserStatus> {
    let record = |name: &str| -> Option<Status> {
        records
            .get(name)
            .and_then(|e| serde_json::from_value(e.value.clone()).ok())
    };
    let stored_flag = |name: &str| {
        stored
            .get(name)
            .and_then(|e| e.value.as_str().map(str::to_string))
    };
    let mut initialisers = Vec::new();
    for w in wanted.map_or(&[][..], |spec| &spec.initialisers[..]) {
        let last_run = record(&w.name);
        let stored_flag = stored_flag(&w.name);
        let assessment = assess(Facts {
            wanted_flag: &w.flag,
            params_hash: &w.params_hash,
            pre_gate: w.pre_gate,
            stored_flag: stored_flag.as_deref(),
            succeeded_params_hash: last_run
                .as_ref()
                .and_then(|r| r.succeeded_params_hash.as_deref()),
        });
        initialisers.push(InitialiserStatus {
            name: w.name.clone(),
            class: w.class.clone(),
            converged: assessment.converged,
            wanted_flag: Some(w.flag.clone()),
            stored_flag,
            last_run,
            params_changed_without_flag_bump: assessment.params_drift,
            pre_gate: w.pre_gate,
        });
    }
    for name in stored.keys() {
        if initialisers.iter().any(|i| &i.name == name) {
            continue;
        }
        let last_run = record(name);
        initialisers.push(InitialiserStatus {
            name: name.clone(),
            class: last_run
                .as_ref()
                .map(|r| r.class.clone())
                .unwrap_or_default(),
            wanted_flag: None,
            stored_flag: stored_flag(name),
            converged: true,
            last_run,
            params_changed_without_flag_bump: false,
            pre_gate: false,
        });
    }
    initialisers
}

/// cfgsync's part of the status, from its current view.
fn cfgsync_summary(state: &AppState) -> CfgsyncSummary {
    let serving = state.cfgsync.current();
    CfgsyncSummary {
        registrations: serving.registrations(),
        ready: serving.is_ready(),
        policy: serving.policy().is_some(),
        bundle: serving.has_bundle(),
        epoch: serving.epoch(),
        render_cache_bytes: state.cfgsync.cached_bytes(),
        render_failures: state.cfgsync.render_failures().count.get(),
        last_render_failure: state.cfgsync.render_failures().last(),
        applied: state.cfgsync.applied_versions(&serving),
        rollout: state.cfgsync.rollout_status(&serving),
    }
}
