//! The HTTP server: one axum router for the config API, cfgsync, health, readiness and metrics.

pub mod auth;
pub mod config_api;
pub mod conn;
pub mod error;
mod health;
mod lifecycle;
pub mod nodes;
pub mod openapi;
mod page;
mod refusals;
mod rollout;
mod spawn;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use crate::api::Token;
use crate::cfgsync::{RegistrationSnapshotMaterializer, Service, ServiceOptions};
use crate::metrics::Metrics;
use crate::store::{self, DynStore};
pub use conn::{ConnectionLimits, DRAIN_DEADLINE, serve as serve_with};
pub use error::{ApiError, ApiJson};
use nodes::NodeRoutes;
pub use spawn::{RunningServer, build_cfgsync_router, serve_snapshot_cfgsync, spawn};

/// Default listen address: loopback only, unless the operator says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4400";
/// Default largest request body, in bytes.
pub const DEFAULT_BODY_LIMIT: usize = 2 * 1024 * 1024;

/// Knobs of the server that are not the store itself.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Guards config writes and every reserved namespace.
    pub admin_token: Option<Token>,
    /// Guards the cfgsync node routes.
    pub join_token: Option<Token>,
    /// Largest request body.
    pub body_limit: usize,
    /// cfgsync knobs (strict mode, long-poll cap).
    pub cfgsync: ServiceOptions,
    /// Timeouts and the cap on connections.
    pub connections: ConnectionLimits,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            admin_token: None,
            join_token: None,
            body_limit: DEFAULT_BODY_LIMIT,
            cfgsync: ServiceOptions::default(),
            connections: ConnectionLimits::default(),
        }
    }
}

impl axum::extract::FromRef<AppState> for NodeRoutes {
    fn from_ref(state: &AppState) -> Self {
        NodeRoutes {
            service: state.cfgsync.clone(),
            join_token: state.options.join_token.clone(),
        }
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The config store.
    pub store: DynStore,
    /// Tokens and limits.
    pub options: Arc<ServerOptions>,
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// The cfgsync serving engine.
    pub cfgsync: Arc<Service>,
    http: Arc<HttpMetrics>,
    /// `bootsync_cfgsync_nodes`, set at each scrape.
    nodes: Family<NodeLabels, Gauge>,
    /// The budget and pace every request body is held to.
    body_rules: conn::body::BodyRules,
    /// When the server state was built.
    pub started: Instant,
}

impl AppState {
    /// State for a server on `store`: starts cfgsync on the stored bundle and policy, and
    /// registers the HTTP metric families in `metrics`.
    pub async fn new(
        store: DynStore,
        options: ServerOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Self, store::Error> {
        Self::with_materializer(store, options, metrics, None).await
    }

    /// As [`AppState::new`], with a library materializer in place of a stored policy.
    pub async fn with_materializer(
        store: DynStore,
        options: ServerOptions,
        metrics: Arc<Metrics>,
        materializer: Option<Arc<dyn RegistrationSnapshotMaterializer>>,
    ) -> Result<Self, store::Error> {
        let cfgsync = Service::start(store.clone(), options.cfgsync.clone(), materializer).await?;
        let http = Arc::new(HttpMetrics::register(&metrics));
        metrics.register(
            "cfgsync_render_failures",
            "Payload renders that failed (template error, fuel, deadline or output limit)",
            cfgsync.render_failures().count.clone(),
        );
        metrics.register(
            "cfgsync_reports_written",
            "Applied-state reports stored",
            cfgsync.report_counts().written.clone(),
        );
        metrics.register(
            "cfgsync_report_commits",
            "Store commits the reports took (reports come in batches)",
            cfgsync.report_counts().commits.clone(),
        );
        let nodes = Family::<NodeLabels, Gauge>::default();
        metrics.register(
            "cfgsync_nodes",
            "Registered nodes by the version they last reported (installed, stable, other or none) and its result",
            nodes.clone(),
        );
        Ok(Self {
            store,
            body_rules: options.connections.body_rules(),
            options: Arc::new(options),
            metrics,
            cfgsync,
            http,
            nodes,
            started: Instant::now(),
        })
    }

    /// Sets `bootsync_cfgsync_nodes` from the current view (called at each scrape). A version
    /// label names the installed or the stable version only, so a node reporting odd
    /// versions cannot grow the label set.
    pub(crate) fn refresh_node_gauges(&self) {
        let serving = self.cfgsync.current();
        let live: Vec<u64> = [
            serving.policy_version(),
            serving.rollout().map(|r| r.record.stable),
            serving.installed(crate::api::rollout::VersionKind::Bundle),
        ]
        .into_iter()
        .flatten()
        .collect();
        self.nodes.clear();
        for count in self.cfgsync.applied_versions(&serving) {
            let version = match count.version {
                None => "none".to_string(),
                Some(v) if live.contains(&v) => v.to_string(),
                Some(_) => "other".to_string(),
            };
            let labels = NodeLabels {
                version,
                result: count.result,
            };
            self.nodes.get_or_create(&labels).inc_by(count.nodes as i64);
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    version: String,
    result: String,
}

impl auth::Tokens for AppState {
    fn admin_token(&self) -> Option<&Token> {
        self.options.admin_token.as_ref()
    }

    fn join_token(&self) -> Option<&Token> {
        self.options.join_token.as_ref()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug)]
struct HttpMetrics {
    requests: Family<RouteLabels, Counter>,
    seconds: Family<RouteLabels, Histogram>,
}

impl HttpMetrics {
    fn register(metrics: &Metrics) -> Self {
        let requests = Family::<RouteLabels, Counter>::default();
        let seconds = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 4.0, 10))
        });
        metrics.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        metrics.register(
            "http_request_duration_seconds",
            "HTTP request handling time",
            seconds.clone(),
        );
        Self { requests, seconds }
    }
}

/// The method as a metric label: any token outside the standard methods is `other`, since
/// each distinct label value is a series kept for the life of the process.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

async fn record_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method()).to_string();
    // Matched routes keep the label set bounded; unknown paths share one label.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    let labels = RouteLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    state.http.requests.get_or_create(&labels).inc();
    state
        .http
        .seconds
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The whole router (config API, cfgsync, health, metrics); `extra` routers are merged in.
pub fn router(state: AppState, extra: impl IntoIterator<Item = Router>) -> Router {
    let (documented, _) = openapi::api().split_for_parts();
    let mut app = documented.with_state(state.clone());
    for part in extra {
        app = app.merge(part);
    }
    app.fallback(error::not_found_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), record_request))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path())
        }))
        // Before any handler reads a body: tokens prove the connection, probation is enforced
        // and the body is held to the budget and pace.
        .layer(middleware::from_fn_with_state(state.clone(), admit))
        .layer(DefaultBodyLimit::max(state.options.body_limit))
        .layer(axum::Extension(error::BodyLimit(state.options.body_limit)))
}

async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let tokens = [
        state.options.admin_token.as_ref(),
        state.options.join_token.as_ref(),
    ];
    conn::admit(tokens, &state.body_rules, request, next).await
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then drains in-flight requests;
/// connections are bounded by the default [`ConnectionLimits`].
pub async fn serve<L>(listener: L, app: Router, shutdown: CancellationToken) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    conn::serve(listener, app, shutdown, ConnectionLimits::default()).await
}
