//! Changes to a running fleet over HTTP: install a policy or bundle (`PUT /v1/cfgsync/...`),
//! see and steer its rollout (`/v1/rollout`), and preview a candidate policy before installing
//! it (`POST /v1/cfgsync/preview`). Admin token throughout.

use axum::Json;
use axum::extract::{Query, State};
use serde::Deserialize;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Admin;
use super::error::ApiPath;
use super::refusals::{AdminRequired, JsonBodyRefused};
use super::{ApiError, ApiJson, AppState};
use crate::api::ErrorCode;
use crate::api::rollout::{Command, PreviewBody, PreviewRequest, RolloutStatus, VersionKind};
use crate::cfgsync::install::{self, InstallError};
use crate::cfgsync::preview::PreviewError;
use crate::cfgsync::{NodeArtifactsBundle, Policy, RolloutError};

pub(super) fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(command))
        .routes(routes!(install))
        .routes(routes!(preview))
}

impl From<InstallError> for ApiError {
    fn from(err: InstallError) -> Self {
        let message = err.to_string();
        match err {
            InstallError::RolloutInProgress { .. } => {
                ApiError::new(ErrorCode::RolloutInProgress, message)
            }
            InstallError::KeptRacing(_) => ApiError::new(ErrorCode::Conflict, message),
            InstallError::RolloutFailed { .. } | InstallError::Superseded(..) => {
                ApiError::new(ErrorCode::Conflict, message)
            }
            InstallError::Store(err) => err.into(),
        }
    }
}

impl From<RolloutError> for ApiError {
    fn from(err: RolloutError) -> Self {
        let message = err.to_string();
        match err {
            RolloutError::NotRunning(_) => ApiError::new(ErrorCode::NoRollout, message),
            RolloutError::KeptRacing => ApiError::new(ErrorCode::Conflict, message),
            RolloutError::Store(err) => err.into(),
        }
    }
}

/// Query of the install routes.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct InstallQuery {
    /// Install even while a rollout is under way (which ends it).
    #[serde(default)]
    force: bool,
}

/// What an install did.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct InstalledBody {
    /// The version installed (its revision).
    version: u64,
    /// Whether a rollout started.
    rollout: bool,
    /// Whether the same content was installed already (nothing written).
    unchanged: bool,
}

impl From<install::Installed> for InstalledBody {
    fn from(installed: install::Installed) -> Self {
        Self {
            version: installed.version,
            rollout: installed.rollout,
            unchanged: installed.unchanged,
        }
    }
}

/// The rollout under way, or the last one while its version is installed.
#[utoipa::path(get, path = "/v1/rollout", tag = "rollout",
    security((), ("admin" = [])),
    responses(
        (status = 200, description = "The rollout", body = RolloutStatus),
        (status = 409, description = "`no_rollout`: none is known", body = crate::api::ErrorBody),
        AdminRequired,
    ))]
async fn status(State(state): State<AppState>, _: Admin) -> Result<Json<RolloutStatus>, ApiError> {
    let serving = state.cfgsync.current();
    state
        .cfgsync
        .rollout_status(&serving)
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NoRollout,
                "no rollout is known: install a policy or bundle with a `rollout:` section to start one",
            )
        })
}

/// Pause, resume, promote or roll back the rollout under way; answers its status after.
#[utoipa::path(post, path = "/v1/rollout/{command}", tag = "rollout",
    params(("command" = Command, Path, description = "`pause`, `resume`, `promote` or `rollback`")),
    security((), ("admin" = [])),
    responses(
        (status = 200, description = "Done; the rollout as it is now", body = RolloutStatus),
        (status = 409, description = "`no_rollout`: none is running, or the command does not apply in its state", body = crate::api::ErrorBody),
        AdminRequired,
    ))]
async fn command(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(command): ApiPath<Command>,
) -> Result<Json<RolloutStatus>, ApiError> {
    let revision = state.cfgsync.rollout_command(command).await?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let serving = state.cfgsync.caught_up(revision, deadline).await;
    state
        .cfgsync
        .rollout_status(&serving)
        .map(Json)
        .ok_or_else(|| ApiError::unavailable("the rollout changed meanwhile; ask again"))
}

/// Installs a policy or a bundle, checked as its file would be; a `rollout:` section rolls
/// it out in waves.
#[utoipa::path(put, path = "/v1/cfgsync/{kind}", tag = "rollout",
    params(("kind" = VersionKind, Path, description = "`policy` or `bundle`"), InstallQuery),
    request_body(content = Object, content_type = "application/json", description = "The policy or bundle, as its file holds it"),
    security((), ("admin" = [])),
    responses(
        (status = 200, description = "Installed", body = InstalledBody),
        (status = 409, description = "`rollout_in_progress`: a rollout is under way (use `?force=true`)", body = crate::api::ErrorBody),
        (status = 422, description = "Invalid (every problem listed)", body = crate::api::ErrorBody),
        AdminRequired, JsonBodyRefused,
    ))]
async fn install(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(kind): ApiPath<VersionKind>,
    Query(query): Query<InstallQuery>,
    ApiJson(value): ApiJson<Value>,
) -> Result<Json<InstalledBody>, ApiError> {
    let store = state.store.as_ref();
    let installed = match kind {
        VersionKind::Policy => {
            let policy: Policy = decode(value, "policy")?;
            let compiled = policy.compile().map_err(problems)?;
            install::install_policy(store, compiled.policy(), query.force).await?
        }
        VersionKind::Bundle => {
            let bundle: NodeArtifactsBundle = decode(value, "bundle")?;
            bundle.validate().map_err(problems)?;
            install::install_bundle(store, &bundle, query.force).await?
        }
    };
    Ok(Json(installed.into()))
}

/// Renders a candidate policy against the current registrations without installing it: how
/// many nodes would change, stay the same or fail, and a unified diff for the first few.
#[utoipa::path(post, path = "/v1/cfgsync/preview", tag = "rollout",
    request_body(content = PreviewRequest, content_type = "application/json"),
    security((), ("admin" = [])),
    responses(
        (status = 200, description = "The preview", body = PreviewBody),
        (status = 422, description = "The candidate is invalid (every problem listed), or the node is unknown", body = crate::api::ErrorBody),
        (status = 429, description = "Another preview is running", body = crate::api::ErrorBody),
        AdminRequired, JsonBodyRefused,
    ))]
async fn preview(
    State(state): State<AppState>,
    _: Admin,
    ApiJson(request): ApiJson<PreviewRequest>,
) -> Result<Json<PreviewBody>, ApiError> {
    let policy: Policy = decode(request.policy.clone(), "policy")?;
    let body = state
        .cfgsync
        .preview(policy, request.node.as_deref(), request.show.unwrap_or(3))
        .await
        .map_err(|err| match err {
            PreviewError::Invalid(list) => problems(list),
            PreviewError::Busy => ApiError::new(ErrorCode::TooManyRequests, err.to_string()),
        })?;
    Ok(Json(body))
}

fn decode<T: serde::de::DeserializeOwned>(value: Value, what: &str) -> Result<T, ApiError> {
    serde_json::from_value(value)
        .map_err(|err| ApiError::unprocessable(format!("the {what} does not decode: {err}")))
}

fn problems(problems: Vec<String>) -> ApiError {
    ApiError::unprocessable(problems.join("; "))
}
