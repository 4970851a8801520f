//! `/v1/nodes`: list the registered nodes, remove one, or replace one by another that takes its
//! place. Admin token; each change is one store batch (`cfgsync::lifecycle`).

use axum::Json;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Admin;
use super::error::ApiPath;
use super::refusals::{AdminRequired, JsonBodyRefused};
use super::{ApiError, ApiJson, AppState};
use crate::api::cfgsync::{NodesBody, ReplaceRequest};
use crate::api::config::Written;
use crate::api::{ErrorCode, ErrorDetails};
use crate::cfgsync::lifecycle::{self, LifecycleError};
use crate::cfgsync::state::registration_key;

pub(super) fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(remove))
        .routes(routes!(replace))
}

impl From<LifecycleError> for ApiError {
    fn from(err: LifecycleError) -> Self {
        let message = err.to_string();
        match err {
            LifecycleError::Unknown(id) => ApiError::from(
                crate::api::ErrorBody::new(ErrorCode::NotFound, message).with_details(
                    ErrorDetails {
                        key: Some(registration_key(&id)),
                        ..ErrorDetails::default()
                    },
                ),
            ),
            LifecycleError::Exists(id) => ApiError::from(
                crate::api::ErrorBody::new(ErrorCode::Conflict, message).with_details(
                    ErrorDetails {
                        key: Some(registration_key(&id)),
                        ..ErrorDetails::default()
                    },
                ),
            ),
            LifecycleError::Invalid(_) => ApiError::unprocessable(message),
            LifecycleError::Store(err) => err.into(),
        }
    }
}

/// Every registered node in member order: IP, index, first and last seen, and whether it
/// fetched the current epoch.
#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    security((), ("admin" = [])),
    responses(
        (status = 200, description = "The nodes", body = NodesBody),
        AdminRequired,
    ))]
async fn list(State(state): State<AppState>, _: Admin) -> Result<Json<NodesBody>, ApiError> {
    let serving = state.cfgsync.current();
    Ok(Json(state.cfgsync.nodes(&serving)))
}

/// Removes a node: its registration goes, in one batch with a marker that makes `/node`
/// answer it 404 `missing_config` (409 `frozen` in a frozen set) until it registers again.
#[utoipa::path(delete, path = "/v1/nodes/{id}", tag = "nodes",
    params(("id" = String, Path, description = "The node's identifier")),
    security(("admin" = [])),
    responses(
        (status = 200, description = "Removed", body = Written),
        AdminRequired,
        (status = 404, description = "No such node; nothing changed", body = crate::api::ErrorBody),
    ))]
async fn remove(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Written>, ApiError> {
    let revision = lifecycle::remove(state.store.as_ref(), &id).await?;
    tracing::info!(identifier = %id, revision, "node removed");
    Ok(Json(Written { revision }))
}

/// Replaces a node by a new identifier that takes its place: the same index and position in
/// every peer list, even in a frozen set; the other nodes see one new epoch.
#[utoipa::path(post, path = "/v1/nodes/{id}/replace", tag = "nodes",
    params(("id" = String, Path, description = "The identifier to replace")),
    request_body(content = ReplaceRequest, content_type = "application/json"),
    security(("admin" = [])),
    responses(
        (status = 200, description = "Replaced", body = Written),
        AdminRequired,
        (status = 404, description = "No such node; nothing changed", body = crate::api::ErrorBody),
        (status = 409, description = "The new identifier is registered; nothing changed", body = crate::api::ErrorBody),
        (status = 422, description = "An invalid new identifier; nothing changed", body = crate::api::ErrorBody),
        JsonBodyRefused,
    ))]
async fn replace(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<ReplaceRequest>,
) -> Result<Json<Written>, ApiError> {
    let revision =
        lifecycle::replace(state.store.as_ref(), &id, &request.identifier, request.ip).await?;
    tracing::info!(old = %id, new = %request.identifier, revision, "node replaced");
    Ok(Json(Written { revision }))
}
