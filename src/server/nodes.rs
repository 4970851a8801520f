//! The node routes, `POST /register` and `POST /node`, wire-compatible with the seed. The
//! handlers parse, call cfgsync's [`Service`] and map its answer; every rule is in
//! `cfgsync::registration`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{FromRef, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Join, Tokens};
use super::conn::Caller;
use super::refusals::{JoinRequired, JsonBodyRefused};
use super::{ApiError, ApiJson};
use crate::api::cfgsync::{NodeArtifactsPayload, NodeQuery, NodeRegistration, Registered};
use crate::api::rollout::ReportBody;
use crate::api::{ErrorBody, ErrorCode, ErrorDetails, NODE_SECRET_HEADER, Token};
use crate::cfgsync::intake::{ReportError, Taken};
use crate::cfgsync::registration::RegisterError;
use crate::cfgsync::registration::Served;
use crate::cfgsync::report::ReportRefused;
use crate::cfgsync::service::Service;

/// What the node routes need.
#[derive(Clone)]
pub struct NodeRoutes {
    /// The serving engine.
    pub service: Arc<Service>,
    /// Guards both routes when set.
    pub join_token: Option<Token>,
}

impl Tokens for NodeRoutes {
    fn admin_token(&self) -> Option<&Token> {
        None
    }

    fn join_token(&self) -> Option<&Token> {
        self.join_token.as_ref()
    }
}

/// The `/register` and `/node` routes.
pub fn routes(state: NodeRoutes) -> Router {
    let (router, _) = api::<NodeRoutes>().split_for_parts();
    router.with_state(state)
}

/// The node routes with their OpenAPI description, in any router whose state holds them.
pub fn api<S>() -> OpenApiRouter<S>
where
    S: Tokens + Clone + Send + Sync + 'static,
    NodeRoutes: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(node))
        .routes(routes!(report))
}

impl From<ReportError> for ApiError {
    fn from(err: ReportError) -> Self {
        let message = err.to_string();
        match err {
            ReportError::Node(err) => err.into(),
            ReportError::UnknownNode(_) => ApiError::new(ErrorCode::MissingConfig, message),
            ReportError::FutureEpoch { .. } | ReportError::FutureVersion { .. } => {
                ApiError::unprocessable(message)
            }
            ReportError::TailTooLarge { .. } => ApiError::new(ErrorCode::TooLarge, message),
            ReportError::TooMany {
                retry_after_secs, ..
            } => ApiError::too_many(message, retry_after_secs),
            ReportError::Refused(ReportRefused::Busy) => ApiError::unavailable(message),
            ReportError::Refused(ReportRefused::Store(err)) => err.into(),
        }
    }
}

/// What a watching node did with a payload: stored per node in `__cfgsync__`, shown in
/// `/v1/nodes`, and what a rollout's waves wait for.
#[utoipa::path(post, path = "/report", tag = "cfgsync",
    request_body(content = ReportBody, content_type = "application/json"),
    params(("x-bootsync-node-secret" = Option<String>, Header, description = "Strict mode: the secret given at registration")),
    security((), ("join" = [])),
    responses(
        (status = 202, description = "Stored (or the same as the stored one)"),
        (status = 404, description = "`missing_config`: no such node is registered", body = ErrorBody),
        (status = 413, description = "The stderr tail is over 2 KiB", body = ErrorBody),
        (status = 422, description = "An epoch or version no server has served", body = ErrorBody),
        (status = 429, description = "The node reports too often", body = ErrorBody),
        JoinRequired, JsonBodyRefused,
    ))]
async fn report(
    State(routes): State<NodeRoutes>,
    _: Join,
    NodeSecret(secret): NodeSecret,
    ApiJson(body): ApiJson<ReportBody>,
) -> Result<Response, ApiError> {
    let taken = routes.service.report(body, secret.as_deref()).await?;
    let stored = matches!(taken, Taken::Stored(_));
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({ "stored": stored })),
    )
        .into_response())
}

impl From<RegisterError> for ApiError {
    fn from(err: RegisterError) -> Self {
        let err = match err {
            RegisterError::Store(store) => return store.into(),
            other => other,
        };
        let code = match &err {
            RegisterError::InvalidIdentifier(_) => ErrorCode::Invalid,
            RegisterError::MetadataTooLarge { size, limit } => {
                let details = ErrorDetails {
                    size: Some(*size as u64),
                    limit: Some(*limit as u64),
                    ..ErrorDetails::default()
                };
                let body = ErrorBody::new(ErrorCode::TooLarge, err.to_string());
                return ApiError::from(body.with_details(details));
            }
            RegisterError::Loading | RegisterError::Unavailable(_) => ErrorCode::Unavailable,
            RegisterError::Replaced(_) => ErrorCode::Replaced,
            RegisterError::SecretMissing
            | RegisterError::NotRegistered
            | RegisterError::PredatesStrictMode => ErrorCode::Unauthorized,
            RegisterError::SecretMismatch => ErrorCode::Forbidden,
            RegisterError::UnclaimedRecord(_) => ErrorCode::UnclaimedRecord,
            RegisterError::NotInBundle(_) | RegisterError::MissingConfig(_) => {
                ErrorCode::MissingConfig
            }
            RegisterError::Frozen(_) | RegisterError::RemovedFromFrozenSet(_) => ErrorCode::Frozen,
            RegisterError::IpChanged { .. } => ErrorCode::IpChanged,
            RegisterError::TooManyChanges {
                retry_after_secs, ..
            } => return ApiError::too_many(err.to_string(), *retry_after_secs),
            RegisterError::Cap(_) => ErrorCode::RegistrationCap,
            RegisterError::Budget(_) => ErrorCode::MetadataBudget,
            RegisterError::KeptRacing => ErrorCode::Conflict,
            RegisterError::NotReady(_) => ErrorCode::NotReady,
            RegisterError::RenderFailed | RegisterError::Store(_) => ErrorCode::Internal,
        };
        ApiError::new(code, err.to_string())
    }
}

/// The address the request came from, when the server records it.
struct Peer(Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let connection = parts.extensions.get::<ConnectInfo<SocketAddr>>();
        Ok(Peer(connection.map(|c| c.0)))
    }
}

/// The node secret a request presents (strict mode).
struct NodeSecret(Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for NodeSecret {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let value = parts.headers.get(NODE_SECRET_HEADER);
        Ok(NodeSecret(
            value.and_then(|v| v.to_str().ok()).map(str::to_string),
        ))
    }
}

/// Records a node (durably, before answering) with the address it was seen from.
#[utoipa::path(post, path = "/register", tag = "cfgsync",
    request_body(content = NodeRegistration, content_type = "application/json"),
    params(("x-bootsync-node-secret" = Option<String>, Header, description = "Strict mode: the secret given at first registration")),
    security((), ("join" = [])),
    responses(
        (status = 202, description = "Registered", body = Registered),
        (status = 403, description = "Strict mode: the node secret belongs to another identifier", body = ErrorBody),
        (status = 409, description = "Refused by the policy (frozen, full, or a new IP with `on_new_ip: reject`), or `replaced` by another node", body = ErrorBody),
        (status = 422, description = "Invalid identifier or a missing field", body = ErrorBody),
        (status = 429, description = "The node changed its IP or metadata too often", body = ErrorBody),
        JoinRequired, JsonBodyRefused,
    ))]
async fn register(
    State(routes): State<NodeRoutes>,
    _: Join,
    Peer(peer): Peer,
    NodeSecret(secret): NodeSecret,
    ApiJson(registration): ApiJson<NodeRegistration>,
) -> Result<Response, ApiError> {
    let registered = routes
        .service
        .register(registration, peer, secret.as_deref())
        .await?;
    Ok((StatusCode::ACCEPTED, axum::Json(registered)).into_response())
}

/// This node's files once its config is ready; `?wait=` holds the request until then.
#[utoipa::path(post, path = "/node", tag = "cfgsync",
    request_body(content = NodeRegistration, content_type = "application/json"),
    params(NodeQuery,
        ("x-bootsync-node-secret" = Option<String>, Header, description = "Strict mode: the secret given at registration")),
    security((), ("join" = [])),
    responses(
        (status = 200, description = "The payload", body = NodeArtifactsPayload),
        (status = 204, description = "`?after=EPOCH`: no newer epoch came within the wait"),
        JoinRequired, JsonBodyRefused,
        (status = 404, description = "`missing_config`: nothing will be served to this identifier", body = ErrorBody),
        (status = 425, description = "`not_ready`: registered, config not ready yet; retry", body = ErrorBody),
        (status = 500, description = "`internal`: materialisation failed", body = ErrorBody),
    ))]
async fn node(
    State(routes): State<NodeRoutes>,
    _: Join,
    caller: Caller,
    NodeSecret(secret): NodeSecret,
    headers: HeaderMap,
    query: Result<Query<NodeQuery>, axum::extract::rejection::QueryRejection>,
    ApiJson(registration): ApiJson<NodeRegistration>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let service = &routes.service;
    let id = &registration.identifier;
    // A long-poll holds a connection: without a token, a source holds only its share, and
    // past it the answer comes at once.
    let hold = query
        .wait
        .filter(|wait| *wait > 0)
        .and_then(|_| caller.hold());
    let deadline = service.wait_deadline(hold.as_ref().and(query.wait));
    let serving = service
        .authorize_node(&registration, secret.as_deref(), deadline)
        .await?;
    let body = match service
        .serve_node(serving, id, query.after, deadline)
        .await?
    {
        Served::Unchanged => return Ok(StatusCode::NO_CONTENT.into_response()),
        Served::Payload(body) => body,
    };
    let json = (header::CONTENT_TYPE, "application/json");
    let vary = (header::VARY, "accept-encoding");
    if accepts_gzip(&headers)
        && let Some(compressed) = service.gzip(id, &body).await
    {
        let gzip = (header::CONTENT_ENCODING, "gzip");
        return Ok(([json, gzip, vary], compressed).into_response());
    }
    Ok(([json, vary], body.bytes.clone()).into_response())
}

/// Whether the client takes a gzip body: `gzip` listed with a q-value above zero, or, when
/// `gzip` is not listed, `*` above zero (RFC 9110, section 12.5.3).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    let items = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for item in items {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let mut q = 1.0_f32;
        for param in parts {
            if let Some((name, value)) = param.split_once('=')
                && name.trim().eq_ignore_ascii_case("q")
            {
                q = value.trim().parse().unwrap_or(0.0);
            }
        }
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(q);
        } else if coding == "*" {
            any = Some(q);
        }
    }
    gzip.or(any).is_some_and(|q| q > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_encoding_is_read_as_the_rfc_says() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, v.parse().unwrap());
            accepts_gzip(&h)
        };
        assert!(with("gzip"));
        assert!(with("br, GZIP;q=0.5"));
        assert!(with("*"));
        assert!(!with("gzip;q=0"));
        assert!(!with("gzip;Q=0"));
        assert!(!with("gzip; q = 0"));
        assert!(
            !with("gzip;q=0, *"),
            "an explicit refusal beats the wildcard"
        );
        assert!(!with("*;q=0"));
        assert!(!with("identity"));
        assert!(!with("zstd, br"));
        assert!(
            !accepts_gzip(&HeaderMap::new()),
            "old clients get plain JSON"
        );
    }
}
