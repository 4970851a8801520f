//! `/healthz` (the process answers), `/readyz` (the store answers) and `/metrics`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiError, AppState};
use crate::api::status::{Health, Ready};

/// How long `/readyz` waits for the store before calling it unavailable.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// The process is alive and answering.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive", body = Health, example = json!({"status": "ok"}))))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// The store answered within 2 s.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "The store answers", body = Ready,
            example = json!({"status": "ready", "backend": "sqlite", "revision": 42})),
        (status = 503, description = "The store is not reachable", body = crate::api::ErrorBody),
    ))]
async fn readyz(State(state): State<AppState>) -> Result<Json<Ready>, ApiError> {
    match tokio::time::timeout(READY_TIMEOUT, state.store.revision()).await {
        Ok(Ok(revision)) => Ok(Json(Ready {
            status: "ready".into(),
            backend: state.store.backend().into(),
            revision,
        })),
        Ok(Err(err)) => Err(ApiError::unavailable(format!("store not ready: {err}"))),
        Err(_) => Err(ApiError::unavailable(format!(
            "store did not answer within {READY_TIMEOUT:?}"
        ))),
    }
}

/// Prometheus / OpenMetrics text exposition.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Metrics", body = String,
        content_type = "application/openmetrics-text")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.refresh_node_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
