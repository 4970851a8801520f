//! `/healthz` (the process answers), `/readyz` (the store answers) and `/metrics`.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Value, json};

use super::{ApiError, AppState};

/// How long `/readyz` waits for the store before calling it unavailable.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) fn routes(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    match tokio::time::timeout(READY_TIMEOUT, state.store.revision()).await {
        Ok(Ok(revision)) => Ok(Json(json!({
            "status": "ready",
            "backend": state.store.backend(),
            "revision": revision,
        }))),
        Ok(Err(err)) => Err(ApiError::unavailable(format!("store not ready: {err}"))),
        Err(_) => Err(ApiError::unavailable(format!(
            "store did not answer within {READY_TIMEOUT:?}"
        ))),
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
