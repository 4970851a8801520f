//! The OpenAPI 3.1 description of every route, generated from the handlers' annotations and
//! served at `/v1/openapi.json`. The router is built from the same registrations, so a route
//! cannot be served without being described.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;

/// The parts of the document no handler carries: title, tags and the two bearer tokens.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "bootsync",
        description = "Config store API (`/v1`), cfgsync node protocol (`/register`, `/node`), \
                       reconciler status, health and metrics of one bootsync server."
    ),
    tags(
        (name = "config", description = "The config store: entries, namespaces, batches, changes"),
        (name = "cfgsync", description = "The node protocol, wire-compatible with cfgsync"),
        (name = "status", description = "Reconciler and cfgsync state"),
        (name = "nodes", description = "Registered nodes: list, remove, replace"),
        (name = "rollout", description = "Changes to a running fleet: install, rollout, preview"),
        (name = "health", description = "Liveness, readiness and metrics"),
        (name = "meta", description = "This description"),
    ),
    modifiers(&Tokens)
)]
struct ApiDoc;

/// Declares the admin and join tokens as bearer schemes.
struct Tokens;

impl Modify for Tokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            (
                "admin",
                "The admin token (`--admin-token-file`): config writes, reserved namespaces, status",
            ),
            (
                "join",
                "The join token (`--join-token-file`): the node routes",
            ),
        ] {
            let mut scheme = Http::new(HttpAuthScheme::Bearer);
            scheme.description = Some(what.to_string());
            components.add_security_scheme(name, SecurityScheme::Http(scheme));
        }
    }
}

/// Every documented route of the server, without state.
pub(super) fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(super::health::api())
        .merge(super::config_api::api())
        .merge(super::status::api())
        .merge(super::page::api())
        .merge(super::nodes::api())
        .merge(super::lifecycle::api())
        .merge(super::rollout::api())
        .routes(routes!(openapi_json))
}

/// The whole OpenAPI document, as `/v1/openapi.json` serves it.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = api().into_openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 description of this server",
        body = Object, content_type = "application/json")))]
async fn openapi_json() -> impl IntoResponse {
    // Built once: it depends only on the code.
    static JSON: OnceLock<String> = OnceLock::new();
    let body = JSON.get_or_init(|| {
        document()
            .to_pretty_json()
            .expect("the OpenAPI document always serialises")
    });
    ([(header::CONTENT_TYPE, "application/json")], body.as_str())
}
