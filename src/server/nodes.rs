//! The node routes, `POST /register` and `POST /node`, wire-compatible with the seed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{FromRef, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth;
use super::{ApiError, ApiJson};
use crate::api::auth::constant_time_eq;
use crate::api::cfgsync::{
    MAX_METADATA_BYTES, NodeArtifactsPayload, NodeQuery, NodeRegistration, Registered,
    check_identifier,
};
use crate::api::{ErrorBody, ErrorCode, NODE_SECRET_HEADER, Token};
use crate::cfgsync::admission::{self, Refusal};
use crate::cfgsync::service::{NodeAnswer, Service, admission};
use crate::cfgsync::state::{RegistrationRecord, registration_key};
use crate::clock::now_ms;
use crate::store::{Precondition, encoded_len};

/// What the node routes need.
#[derive(Clone)]
pub struct NodeRoutes {
    /// The serving engine.
    pub service: Arc<Service>,
    /// Guards both routes when set.
    pub join_token: Option<Token>,
}

/// The `/register` and `/node` routes.
pub fn routes(state: NodeRoutes) -> Router {
    let (router, _) = api::<NodeRoutes>().split_for_parts();
    router.with_state(state)
}

/// The node routes with their OpenAPI description, in any router whose state holds them.
pub fn api<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    NodeRoutes: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(node))
}

/// Checks a decoded registration as both node routes do: identifier and metadata limits.
pub fn validate_registration(registration: &NodeRegistration) -> Result<(), ApiError> {
    check_identifier(&registration.identifier).map_err(ApiError::unprocessable)?;
    let size = encoded_len(&registration.metadata);
    if size > MAX_METADATA_BYTES {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!("metadata is {size} bytes, over the limit of {MAX_METADATA_BYTES}"),
        ));
    }
    Ok(())
}

/// The address the request came from, when the server records it.
struct Peer(Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn new_secret() -> Result<String, ApiError> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|err| ApiError::internal("reading randomness for a node secret", &err))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Strict mode: the request must carry the secret whose hash is stored.
fn check_secret(record: &RegistrationRecord, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &record.secret_sha256 else {
        return Ok(());
    };
    let presented = headers
        .get(NODE_SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::unauthorized(format!(
                "this node must send its secret in {NODE_SECRET_HEADER}"
            ))
        })?;
    if constant_time_eq(sha256_hex(presented).as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "the node secret does not match this identifier",
        ))
    }
}

/// Whether a registration from `peer` may take over `record`, which has no secret: same IP,
/// sent from the host that registered it. A replacement the operator placed (`nodes replace`,
/// no sender recorded) is taken by the first registration from the IP the operator named.
fn claims(
    record: &RegistrationRecord,
    registration: &NodeRegistration,
    peer: Option<SocketAddr>,
) -> bool {
    let from = |stored: &str| stored.parse::<SocketAddr>().ok().map(|a| a.ip());
    let placed = record.replaces.is_some() && record.peer.is_none();
    let sender = |ip: IpAddr| peer.is_some_and(|peer| peer.ip() == ip);
    record.ip == registration.ip
        && if placed {
            // Only the machine at the IP the operator named, not anyone claiming it.
            sender(record.ip)
        } else {
            record.peer.as_deref().and_then(from).is_some_and(sender)
        }
}

/// Attempts to record a registration before giving up on concurrent writers of the same node.
const REGISTER_ATTEMPTS: usize = 4;

/// Records a node (durably, before answering) with the address it was seen from.
#[utoipa::path(post, path = "/register", tag = "cfgsync",
    request_body(content = NodeRegistration, content_type = "application/json"),
    params(("x-bootsync-node-secret" = Option<String>, Header, description = "Strict mode: the secret given at first registration")),
    security((), ("join" = [])),
    responses(
        (status = 202, description = "Registered", body = Registered),
        (status = 400, description = "Malformed JSON or IP", body = ErrorBody),
        (status = 401, description = "Missing or wrong join token or node secret", body = ErrorBody),
        (status = 403, description = "Strict mode: the node secret belongs to another identifier", body = ErrorBody),
        (status = 409, description = "Refused by the policy (frozen, full, or a new IP with `on_new_ip: reject`), or `replaced` by another node", body = ErrorBody),
        (status = 413, description = "Body or metadata too large", body = ErrorBody),
        (status = 415, description = "Not `application/json`", body = ErrorBody),
        (status = 422, description = "Invalid identifier or a missing field", body = ErrorBody),
    ))]
async fn register(
    State(routes): State<NodeRoutes>,
    Peer(peer): Peer,
    headers: HeaderMap,
    ApiJson(registration): ApiJson<NodeRegistration>,
) -> Result<Response, ApiError> {
    auth::require(routes.join_token.as_ref(), &headers, "join")?;
    validate_registration(&registration)?;
    let service = &routes.service;
    let key = registration_key(&registration.identifier);
    // Admission decides on the loaded state, never on the empty view of a starting server.
    let loaded = service
        .caught_up(0, tokio::time::Instant::now() + LOAD_WAIT)
        .await;
    if !loaded.loaded {
        return Err(ApiError::unavailable(
            "the server is still loading its state; retry",
        ));
    }
    // Its replacement holds its place: registering again would put two nodes in one slot.
    if loaded.was_replaced(&registration.identifier) {
        return Err(ApiError::new(
            ErrorCode::Replaced,
            format!(
                "{:?} was replaced by another node; it cannot register again under this identifier",
                registration.identifier
            ),
        ));
    }
    for attempt in 0..REGISTER_ATTEMPTS {
        // A node the view has never seen is most likely new: try the write on that guess and
        // skip the read. The write's `Absent` check catches a view that was behind, and the
        // next attempt reads the store.
        let guessed = attempt == 0 && loaded.registration(&registration.identifier).is_none();
        let existing = if guessed {
            None
        } else {
            service.store.get(&key).await?
        };
        let existing_record = existing
            .as_ref()
            .and_then(|e| serde_json::from_value::<RegistrationRecord>(e.value.clone()).ok());
        let mut node_secret = None;
        let secret_sha256 = match &existing_record {
            Some(record) if record.secret_sha256.is_some() => {
                check_secret(record, &headers)?;
                record.secret_sha256.clone()
            }
            // A record stored before strict mode was turned on has no secret to check. It
            // is claimed only by the node it describes: from the address it registered from,
            // with its IP unchanged. Anyone else could take the secret and lock it out.
            Some(record)
                if service.options.strict_nodes && !claims(record, &registration, peer) =>
            {
                return Err(ApiError::new(
                    ErrorCode::UnclaimedRecord,
                    format!(
                        "{:?} was registered before strict mode from another address; an operator must remove its record first",
                        registration.identifier
                    ),
                ));
            }
            _ if service.options.strict_nodes => {
                let secret = new_secret()?;
                let hash = sha256_hex(&secret);
                node_secret = Some(secret);
                Some(hash)
            }
            _ => None,
        };
        // After the secret: a caller without it learns nothing of the stored record.
        if let Err(refused) = admission(&service.current(), &registration, existing_record.as_ref())
        {
            // A refusal for a new node (full, frozen) is decided on the store, not a guess:
            // the node may be registered already, which admission treats differently.
            if guessed {
                continue;
            }
            return Err(refused.into());
        }
        let now = now_ms();
        let record = RegistrationRecord {
            identifier: registration.identifier.clone(),
            ip: registration.ip,
            metadata: registration.metadata.clone(),
            first_seen_ms: existing_record.as_ref().map_or(now, |r| r.first_seen_ms),
            last_seen_ms: now,
            peer: peer.map(|p| p.to_string()),
            secret_sha256,
            // A replacement keeps the place it took over.
            slot: existing_record.as_ref().and_then(|r| r.slot.clone()),
            replaces: existing_record.as_ref().and_then(|r| r.replaces.clone()),
        };
        let expect = match &existing {
            Some(entry) => Precondition::ModRevision(entry.mod_revision),
            None => Precondition::Absent,
        };
        let metadata_bytes = (
            admission::metadata_bytes(Some(&record.metadata)),
            existing_record
                .as_ref()
                .map_or(0, |old| admission::metadata_bytes(Some(&old.metadata))),
        );
        let value = serde_json::to_value(&record).expect("records always serialise");
        // The cap, the budget and a frozen set are decided in the same store batch that
        // stores the registration.
        let admitted = service
            .admission
            .submit(key.clone(), expect, value, metadata_bytes)
            .await;
        match admitted {
            Ok(revision) => {
                tracing::debug!(identifier = %registration.identifier, revision, "registered");
                let body = Registered {
                    identifier: registration.identifier,
                    node_secret,
                };
                return Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response());
            }
            // Another request for the same node won the race: decide again on fresh state.
            Err(Refusal::Raced) => continue,
            // Refused as a new node on the view's guess: read the store and decide again.
            Err(Refusal::Cap(_) | Refusal::Budget(_) | Refusal::Frozen) if guessed => continue,
            Err(Refusal::Cap(cap)) => {
                return Err(ApiError::new(
                    ErrorCode::RegistrationCap,
                    format!("at most {cap} registrations are accepted"),
                ));
            }
            Err(Refusal::Budget(budget)) => {
                return Err(ApiError::new(
                    ErrorCode::MetadataBudget,
                    format!("the registrations' metadata may hold at most {budget} bytes in all"),
                ));
            }
            Err(Refusal::Frozen) => {
                return Err(ApiError::new(
                    ErrorCode::Frozen,
                    format!(
                        "membership is frozen since the deployment became ready; {:?} is not a member",
                        registration.identifier
                    ),
                ));
            }
            Err(Refusal::Store(message)) => return Err(ApiError::unavailable(message)),
        }
    }
    Err(ApiError::conflict(
        "the registration kept racing with concurrent registrations of the same identifier; retry",
    ))
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
        (status = 400, description = "Malformed JSON, IP or query", body = ErrorBody),
        (status = 401, description = "Missing or wrong join token or node secret", body = ErrorBody),
        (status = 404, description = "`missing_config`: nothing will be served to this identifier", body = ErrorBody),
        (status = 425, description = "`not_ready`: registered, config not ready yet; retry", body = ErrorBody),
        (status = 500, description = "`internal`: materialisation failed", body = ErrorBody),
    ))]
async fn node(
    State(routes): State<NodeRoutes>,
    headers: HeaderMap,
    query: Result<Query<NodeQuery>, axum::extract::rejection::QueryRejection>,
    ApiJson(registration): ApiJson<NodeRegistration>,
) -> Result<Response, ApiError> {
    auth::require(routes.join_token.as_ref(), &headers, "join")?;
    validate_registration(&registration)?;
    let Query(query) = query?;
    let service = &routes.service;
    let id = &registration.identifier;
    let wait = Duration::from_secs(query.wait.unwrap_or(0)).min(service.options.node_wait_max);
    let now = tokio::time::Instant::now();
    let deadline = now + wait;
    // The server's own waits (start-up, read your writes) last at least a moment even for a
    // client that does not long-poll, and never past the client's own wait or their caps.
    let bounded = |cap: Duration| deadline.max(now + OWN_LAG_WAIT).min(now + cap);
    let mut serving = service.caught_up(0, bounded(LOAD_WAIT)).await;
    let in_view = serving.registration(id).cloned();
    let stored = match in_view {
        Some(_) => None,
        None => service.store.get(&registration_key(id)).await?,
    };
    if service.options.strict_nodes {
        let record = in_view.or_else(|| {
            stored
                .as_ref()
                .and_then(|entry| serde_json::from_value(entry.value.clone()).ok())
        });
        // Every node proves it holds its secret, bundle nodes included: a node that never
        // registered, or whose record predates strict mode, has none to show yet.
        match record {
            Some(record) if record.secret_sha256.is_some() => check_secret(&record, &headers)?,
            Some(_) => {
                return Err(ApiError::unauthorized(
                    "this node's registration predates strict mode: register again to get a node secret",
                ));
            }
            None => {
                return Err(ApiError::unauthorized(
                    "strict mode: register first to get a node secret",
                ));
            }
        }
    }
    if let Some(entry) = stored {
        // Read your writes: a node that got its 202 from this server (or another on the same
        // store) may be ahead of the view; the store is not. Wait, bounded, for the view to
        // reach its registration, so it is never told "not registered" by our own lag.
        serving = service
            .caught_up(entry.mod_revision, bounded(READ_YOUR_WRITES_WAIT))
            .await;
    }
    let gzip = accepts_gzip(&headers);
    let mut synced = false;
    // Subscribed only once an answer has to wait: a served request needs no subscription.
    let mut changes = None;
    loop {
        let answer = service.answer(&serving, id).await;
        match answer {
            NodeAnswer::Ready(body) if query.after.is_some_and(|after| body.epoch <= after) => {
                // The node has this epoch already (`--watch`): hold for a newer one until the
                // wait ends, then say there is nothing new.
                service.note_fetched(id, body.epoch);
                let changes = changes.get_or_insert_with(|| service.subscribe());
                changes.mark_unchanged();
                let newer = changes.wait_for(|s| s.revision > serving.revision);
                match tokio::time::timeout_at(deadline, newer).await {
                    Ok(Ok(next)) => serving = next.clone(),
                    _ => return Ok(StatusCode::NO_CONTENT.into_response()),
                }
            }
            NodeAnswer::Ready(body) => {
                service.note_fetched(id, body.epoch);
                if gzip && let Some(compressed) = service.gzip(id, &body).await {
                    return Ok((
                        [
                            (header::CONTENT_TYPE, "application/json"),
                            (header::CONTENT_ENCODING, "gzip"),
                            (header::VARY, "accept-encoding"),
                        ],
                        compressed,
                    )
                        .into_response());
                }
                return Ok((
                    [
                        (header::CONTENT_TYPE, "application/json"),
                        (header::VARY, "accept-encoding"),
                    ],
                    body.bytes.clone(),
                )
                    .into_response());
            }
            NodeAnswer::Missing => {
                return Err(ApiError::new(
                    ErrorCode::MissingConfig,
                    format!("there is no config for {id:?}"),
                ));
            }
            NodeAnswer::Frozen => {
                return Err(ApiError::new(
                    ErrorCode::Frozen,
                    format!("{id:?} was removed from a frozen set; it is not a member"),
                ));
            }
            NodeAnswer::Failed(_) => {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    "the server could not build this node's config; see the server log",
                ));
            }
            NodeAnswer::NotReady(_) if !synced => {
                // Not ready in the view; perhaps ready in the store, which the view may trail
                // by a moment. Catch up once with the store's revision before saying 425, so a
                // node is never turned away by the server's own lag.
                synced = true;
                let revision = service.store.revision().await?;
                if revision > serving.revision {
                    serving = service
                        .caught_up(revision, bounded(READ_YOUR_WRITES_WAIT))
                        .await;
                }
            }
            NodeAnswer::NotReady(why) => {
                // Only views newer than the one just answered from are worth another look.
                let changes = changes.get_or_insert_with(|| service.subscribe());
                changes.mark_unchanged();
                let newer = changes.wait_for(|s| s.revision > serving.revision);
                match tokio::time::timeout_at(deadline, newer).await {
                    Ok(Ok(next)) => serving = next.clone(),
                    _ => {
                        return Err(ApiError::new(
                            ErrorCode::NotReady,
                            format!("not ready: {why}"),
                        ));
                    }
                }
            }
        }
    }
}

/// How long `/node` without `?wait=` may wait for the server's own lag (loading, or the view
/// reaching the node's registration) before answering 425.
const OWN_LAG_WAIT: Duration = Duration::from_secs(1);
/// Longest a request waits for the server to load its state at start-up.
const LOAD_WAIT: Duration = Duration::from_secs(10);
/// Longest `/node` waits for the view to reach the node's own registration.
const READ_YOUR_WRITES_WAIT: Duration = Duration::from_secs(5);

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
