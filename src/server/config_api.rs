//! The `/v1` config API: entries, types, namespaces, atomic batches and the change stream.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Admin, IsAdmin};
use super::conn::Caller;
use super::error::{ApiPath, ApiQuery};
use super::refusals::{AdminRequired, JsonBodyRefused, ReadRefused, WriteRefused};
use super::{ApiError, ApiJson, AppState};
use crate::api::ErrorCode;
use crate::api::REVISION_HEADER;
use crate::api::config::{
    ChangesBody, ChangesQuery, EntryBody, MAX_CHANGES_WAIT, NamespaceBody, Namespaces, PublicEvent,
    TypeBody, Written,
};
use crate::store::{Batch, ChangeEvent, Key, Precondition, Revision, WatchFilter, is_reserved};

pub(super) fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_namespaces, apply_batch))
        .routes(routes!(get_namespace))
        .routes(routes!(get_type))
        .routes(routes!(get_entry, put_entry, delete_entry))
        .routes(routes!(changes))
}

fn with_revision(revision: Revision, body: impl Serialize) -> Response {
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(REVISION_HEADER, HeaderValue::from(revision));
    response
}

/// Reserved namespaces are readable and writable only with the admin token.
fn guard_namespace(admin: IsAdmin, namespace: &str) -> Result<(), ApiError> {
    if is_reserved(namespace) {
        admin.require()?;
    }
    Ok(())
}

/// Every namespace (reserved ones only with the admin token).
#[utoipa::path(get, path = "/v1/config", tag = "config",
    security((), ("admin" = [])),
    responses((status = 200, description = "Namespaces", body = Namespaces, headers(("x-bootsync-revision" = u64, description = "Store revision of the answer")))))]
async fn list_namespaces(
    State(state): State<AppState>,
    IsAdmin(admin): IsAdmin,
) -> Result<Response, ApiError> {
    let revision = state.store.revision().await?;
    let mut namespaces = state.store.namespaces().await?;
    // Without the admin token the reserved namespaces are not even named.
    if !admin {
        namespaces.retain(|ns| !is_reserved(ns));
    }
    Ok(with_revision(
        revision,
        Namespaces {
            revision,
            namespaces,
        },
    ))
}

/// A whole namespace as `{type: {key: entry}}`.
#[utoipa::path(get, path = "/v1/config/{ns}", tag = "config",
    params(("ns" = String, Path, description = "Namespace (reserved ones, starting with `_`, need the admin token)")),
    security((), ("admin" = [])),
    responses(
        (status = 200, description = "The namespace", body = NamespaceBody, headers(("x-bootsync-revision" = u64, description = "Store revision of the answer"))),
        ReadRefused,
    ))]
async fn get_namespace(
    State(state): State<AppState>,
    admin: IsAdmin,
    ApiPath(ns): ApiPath<String>,
) -> Result<Response, ApiError> {
    guard_namespace(admin, &ns)?;
    let tree = state.store.namespace(&ns).await?;
    Ok(with_revision(
        tree.revision,
        NamespaceBody {
            namespace: ns,
            revision: tree.revision,
            types: tree.types,
        },
    ))
}

/// Every entry of one type.
#[utoipa::path(get, path = "/v1/config/{ns}/{type}", tag = "config",
    params(("ns" = String, Path, description = "Namespace (reserved ones, starting with `_`, need the admin token)"), ("type" = String, Path, description = "Type within the namespace")),
    security((), ("admin" = [])),
    responses(
        (status = 200, description = "The entries", body = TypeBody, headers(("x-bootsync-revision" = u64, description = "Store revision of the answer"))),
        ReadRefused,
    ))]
async fn get_type(
    State(state): State<AppState>,
    admin: IsAdmin,
    ApiPath((ns, kind)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    guard_namespace(admin, &ns)?;
    let listing = state.store.list(&ns, &kind).await?;
    Ok(with_revision(
        listing.revision,
        TypeBody {
            namespace: ns,
            kind,
            revision: listing.revision,
            entries: listing.entries,
        },
    ))
}

/// One entry with its revisions; `ETag` is its mod revision.
#[utoipa::path(get, path = "/v1/config/{ns}/{type}/{key}", tag = "config",
    params(("ns" = String, Path, description = "Namespace (reserved ones, starting with `_`, need the admin token)"), ("type" = String, Path, description = "Type within the namespace"), ("key" = String, Path, description = "Key within the type")),
    security((), ("admin" = [])),
    responses(
        (status = 200, description = "The entry", body = EntryBody,
            headers(("x-bootsync-revision" = u64, description = "Store revision of the answer"),
                    ("etag" = String, description = "The entry's mod revision, quoted"))),
        ReadRefused,
        (status = 404, description = "No value at this key", body = crate::api::ErrorBody),
    ))]
async fn get_entry(
    State(state): State<AppState>,
    admin: IsAdmin,
    ApiPath((ns, kind, key)): ApiPath<(String, String, String)>,
) -> Result<Response, ApiError> {
    guard_namespace(admin, &ns)?;
    let key = Key::new(ns, kind, key);
    let revision = state.store.revision().await?;
    let entry = state
        .store
        .get(&key)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no value at {key}")))?;
    let etag = HeaderValue::from_str(&format!("\"{}\"", entry.mod_revision))
        .expect("digits are a valid header");
    let revision = revision.max(entry.mod_revision);
    let mut response = with_revision(
        revision,
        EntryBody {
            key,
            entry,
            revision,
        },
    );
    response.headers_mut().insert(header::ETAG, etag);
    Ok(response)
}

/// Reads `If-Match: "<rev>"` / `If-None-Match: *` into a precondition.
fn precondition(headers: &HeaderMap) -> Result<Option<Precondition>, ApiError> {
    if let Some(value) = headers.get(header::IF_NONE_MATCH) {
        return match value.to_str().map(str::trim) {
            Ok("*") => Ok(Some(Precondition::Absent)),
            _ => Err(ApiError::bad_request(
                "If-None-Match supports only '*' (the key must be absent)",
            )),
        };
    }
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::bad_request("If-Match is not valid text"))?
        .trim()
        .trim_matches('"');
    let revision = text.parse::<Revision>().map_err(|_| {
        ApiError::bad_request(format!("If-Match {text:?} is not a revision number"))
    })?;
    Ok(Some(Precondition::ModRevision(revision)))
}

/// Creates or replaces a value; `If-Match: "<rev>"` or `If-None-Match: *` make it conditional.
#[utoipa::path(put, path = "/v1/config/{ns}/{type}/{key}", tag = "config",
    params(("ns" = String, Path, description = "Namespace (reserved ones, starting with `_`, need the admin token)"), ("type" = String, Path, description = "Type within the namespace"), ("key" = String, Path, description = "Key within the type"),
        ("if-match" = Option<String>, Header, description = "Write only if the entry is at this mod revision"),
        ("if-none-match" = Option<String>, Header, description = "`*`: write only if the key is absent")),
    request_body(content = Object, description = "Any JSON value", content_type = "application/json"),
    security(("admin" = [])),
    responses(
        (status = 200, description = "Committed", body = Written, headers(("x-bootsync-revision" = u64, description = "Store revision of the answer"))),
        WriteRefused, AdminRequired, JsonBodyRefused,
    ))]
async fn put_entry(
    State(state): State<AppState>,
    _: Admin,
    headers: HeaderMap,
    ApiPath((ns, kind, key)): ApiPath<(String, String, String)>,
    ApiJson(value): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let key = Key::new(ns, kind, key);
    let mut batch = Batch::new();
    if let Some(expect) = precondition(&headers)? {
        batch = batch.check(key.clone(), expect);
    }
    let revision = state.store.apply(guarded(batch.put(key, value))?).await?;
    Ok(with_revision(revision, Written { revision }))
}

/// Removes a value; 404 when it is absent.
#[utoipa::path(delete, path = "/v1/config/{ns}/{type}/{key}", tag = "config",
    params(("ns" = String, Path, description = "Namespace (reserved ones, starting with `_`, need the admin token)"), ("type" = String, Path, description = "Type within the namespace"), ("key" = String, Path, description = "Key within the type"),
        ("if-match" = Option<String>, Header, description = "Delete only if the entry is at this mod revision")),
    security(("admin" = [])),
    responses(
        (status = 200, description = "Committed", body = Written, headers(("x-bootsync-revision" = u64, description = "Store revision of the answer"))),
        (status = 404, description = "No value at this key", body = crate::api::ErrorBody),
        WriteRefused, AdminRequired,
    ))]
async fn delete_entry(
    State(state): State<AppState>,
    _: Admin,
    headers: HeaderMap,
    ApiPath((ns, kind, key)): ApiPath<(String, String, String)>,
) -> Result<Response, ApiError> {
    let key = Key::new(ns, kind, key);
    // Delete only what exists: the precondition makes "absent" a clean 404 without a race.
    let expect = match precondition(&headers)? {
        Some(expect) => expect,
        None => match state.store.get(&key).await? {
            Some(entry) => Precondition::ModRevision(entry.mod_revision),
            None => return Err(ApiError::not_found(format!("no value at {key}"))),
        },
    };
    let batch = Batch::new().check(key.clone(), expect).delete(key);
    let revision = state.store.apply(guarded(batch)?).await?;
    Ok(with_revision(revision, Written { revision }))
}

/// An atomic batch: every check must hold, then every op commits under one revision.
#[utoipa::path(post, path = "/v1/config", tag = "config",
    request_body(content = crate::store::Batch, content_type = "application/json"),
    security(("admin" = [])),
    responses(
        (status = 200, description = "Committed", body = Written, headers(("x-bootsync-revision" = u64, description = "Store revision of the answer"))),
        WriteRefused, AdminRequired, JsonBodyRefused,
    ))]
async fn apply_batch(
    State(state): State<AppState>,
    _: Admin,
    ApiJson(batch): ApiJson<Batch>,
) -> Result<Response, ApiError> {
    let revision = state.store.apply(guarded(batch)?).await?;
    Ok(with_revision(revision, Written { revision }))
}

/// A batch written into `__cfgsync__` is checked as files would be (422 listing every problem),
/// so nothing the server would refuse to serve gets stored, and one that writes registrations
/// marks the admission ledger stale in the same commit, so caps keep holding.
fn guarded(batch: Batch) -> Result<Batch, ApiError> {
    crate::cfgsync::direct::guard_direct_write(batch)
        .map_err(|problems| ApiError::unprocessable(problems.join("; ")))
}

/// Most events returned by one long-poll answer.
const MAX_EVENTS: usize = 1000;

/// Long-poll of the change stream: events after `from`, held up to `timeout` seconds.
#[utoipa::path(get, path = "/v1/changes", tag = "config",
    params(ChangesQuery),
    security((), ("admin" = [])),
    responses(
        (status = 200, description = "Public events: which namespaces changed, by type (full events with `internal=true`)",
            body = ChangesBody<PublicEvent>, headers(("x-bootsync-revision" = u64, description = "Store revision of the answer"))),
        (status = 400, description = "Malformed query", body = crate::api::ErrorBody),
        (status = 401, description = "`internal=true` without the admin token", body = crate::api::ErrorBody),
        (status = 410, description = "`from` is older than the compacted history; list and restart from the current revision", body = crate::api::ErrorBody),
        (status = 429, description = "Without a token, this source holds as many long-polls as it may", body = crate::api::ErrorBody),
    ))]
async fn changes(
    State(state): State<AppState>,
    admin: IsAdmin,
    caller: Caller,
    ApiQuery(query): ApiQuery<ChangesQuery>,
) -> Result<Response, ApiError> {
    if query.internal {
        admin.require()?;
    }
    // A long-poll holds a connection: without a token, a source holds only its share.
    let _hold = match query.timeout {
        0 => None,
        _ => Some(caller.hold().ok_or_else(|| {
            ApiError::new(
                ErrorCode::TooManyRequests,
                "this address holds as many long-polls as it may without a token; retry later",
            )
        })?),
    };
    let filter = if query.internal {
        WatchFilter::All
    } else {
        WatchFilter::Public
    };
    let current = state.store.revision().await?;
    let mut watch = state.store.watch(query.from, filter).await?;
    let wait = Duration::from_secs(query.timeout).min(MAX_CHANGES_WAIT);
    let mut events: Vec<ChangeEvent> = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    // Take what is already there without waiting, then hold only if nothing was found.
    loop {
        let until = if events.is_empty() {
            deadline
        } else {
            tokio::time::Instant::now()
        };
        match tokio::time::timeout_at(until, watch.next()).await {
            Ok(Some(Ok(event))) => {
                events.push(event);
                if events.len() >= MAX_EVENTS {
                    break;
                }
            }
            Ok(Some(Err(err))) => return Err(err.into()),
            Ok(None) | Err(_) => break,
        }
        if events.last().is_some_and(|e| e.revision >= current) {
            // Caught up with everything committed before the request: answer now.
            break;
        }
    }
    let revision = events
        .last()
        .map_or(current.max(query.from), |e| e.revision);
    if query.internal {
        return Ok(with_revision(revision, ChangesBody { revision, events }));
    }
    let events = events.iter().map(PublicEvent::from_event).collect();
    Ok(with_revision(revision, ChangesBody { revision, events }))
}
