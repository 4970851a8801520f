//! Accepting connections within bounds, so that no one who can merely reach the port can take
//! the server down: slots counted per source ([`gate`]), bodies within a byte budget and a
//! rate ([`body`]), a head deadline, and a bounded drain at shutdown.
//!
//! hyper's HTTP/1 timer covers a connection whenever it waits for a request head: a new
//! connection that never sends one, a slow one (slowloris), and a kept-alive one gone quiet
//! between requests. A request being answered, however long it is held (a long-poll), is not
//! waiting for a head, so it is never cut off as idle; how many a source may hold is the
//! gate's business.

pub mod body;
pub mod gate;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use self::body::BodyRules;
use self::gate::{Conn, Gate, GateLimits, Hold};
use super::ApiError;
use crate::api::Token;
use crate::api::auth::bearer;

/// How long in-flight requests may take to finish after shutdown is requested.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Head deadline of a connection on probation: a probe's request comes at once.
const PROBATION_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// File descriptors kept back from the connection cap for the store, logs and outgoing calls.
const RESERVED_FDS: u64 = 128;

/// Most bytes hyper buffers for one connection's request head (8 KiB is its minimum): a
/// client that sends a huge head slowly holds no more than this.
const MAX_HEAD_BUFFER: usize = 16 << 10;

/// Bounds on the connections and requests one server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Longest wait for a request's head: on a new connection, on a slow one, and on a
    /// kept-alive one between requests (so also the idle timeout).
    pub header_timeout: Duration,
    /// Longest wait for the next piece of a request body.
    pub body_timeout: Duration,
    /// Bytes per second a body must average once its first `body_timeout` has passed.
    pub min_body_rate: u64,
    /// From a request's head to its last body byte.
    pub request_deadline: Duration,
    /// Bytes of request bodies held at once, all connections together.
    pub body_budget: usize,
    /// Connections served at once (a quarter of them kept for requests with a token).
    pub max_connections: usize,
    /// Connections one source address (an IPv6 /64) may hold before any of its requests
    /// showed a token; 0 for no cap.
    pub per_source: usize,
    /// Requests one source may hold open (long-polls) without a token; 0 for no cap.
    pub holds_per_source: usize,
}

/// Default of [`ConnectionLimits::holds_per_source`]: half the connections a source may hold
/// (at least one, since 0 would mean no cap), and no cap when those have none.
pub fn default_holds_per_source(per_source: usize) -> usize {
    if per_source == 0 {
        0
    } else {
        (per_source / 2).max(1)
    }
}

/// Default of [`ConnectionLimits::per_source`] for `max_connections`: an eighth of them, so
/// one source takes at most that share and several are needed to fill the slots a request
/// without a token may use; at least 64.
pub fn default_per_source(max_connections: usize) -> usize {
    (max_connections / 8).max(64)
}

/// Default of [`ConnectionLimits::body_budget`].
pub const DEFAULT_BODY_BUDGET: usize = 64 << 20;

impl Default for ConnectionLimits {
    fn default() -> Self {
        let max_connections = default_max_connections();
        let per_source = default_per_source(max_connections);
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            min_body_rate: 16 << 10,
            request_deadline: Duration::from_secs(60),
            body_budget: DEFAULT_BODY_BUDGET,
            max_connections,
            per_source,
            holds_per_source: default_holds_per_source(per_source),
        }
    }
}

impl ConnectionLimits {
    /// The gate's part of these limits.
    fn gate(&self) -> GateLimits {
        GateLimits {
            max_connections: self.max_connections,
            per_source: self.per_source,
            holds_per_source: self.holds_per_source,
        }
    }

    /// The body rules these limits ask for.
    pub fn body_rules(&self) -> BodyRules {
        BodyRules::new(
            self.body_budget,
            self.body_timeout,
            self.min_body_rate,
            self.request_deadline,
        )
    }
}

/// Raises the open-file soft limit to the hard limit (the 1 024 default is easy to exhaust),
/// then leaves room for the store, logs and outgoing calls beside the probation slots.
pub fn default_max_connections() -> usize {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    usize::try_from(limit.saturating_sub(RESERVED_FDS + 256))
        .unwrap_or(usize::MAX)
        .clamp(16, 65_536)
}

/// What a request knows of its connection: whether it showed a token, and the connection's
/// place in the gate (absent when the router is served by something else).
#[derive(Debug, Clone)]
pub struct Caller {
    /// A configured token (join or admin) came with the request.
    pub proven: bool,
    conn: Option<Arc<Conn>>,
}

impl Caller {
    /// A permit to hold this request open (a long-poll), or `None`: answer now.
    pub fn hold(&self) -> Option<Hold> {
        match &self.conn {
            Some(conn) => conn.hold(self.proven),
            None => Some(Hold::unlimited()),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Caller>().cloned().unwrap_or(Caller {
            proven: false,
            conn: None,
        }))
    }
}

/// What a connection on probation may still ask without a token: the liveness and readiness
/// probes, so an orchestrator keeps seeing a healthy server while outsiders fill the slots.
const PROBES: [&str; 2] = ["/healthz", "/readyz"];

/// Per request, before anything is read: notes whether it carries one of `tokens` (which
/// proves its connection), turns away what a connection on probation may not ask, and holds
/// its body to the server's [`BodyRules`].
pub async fn admit(
    tokens: [Option<&Token>; 2],
    rules: &BodyRules,
    request: Request,
    next: Next,
) -> Response {
    let presented = bearer(request.headers());
    let proven = presented.is_some_and(|presented| {
        tokens
            .into_iter()
            .flatten()
            .any(|token| token.matches(presented))
    });
    let conn = request.extensions().get::<Arc<Conn>>().cloned();
    if let Some(conn) = &conn {
        if proven {
            conn.prove();
        } else if conn.on_probation() && !PROBES.contains(&request.uri().path()) {
            return ApiError::unavailable(
                "the server is at its connection limit for requests without a token; retry",
            )
            .into_response();
        }
    }
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(Caller { proven, conn });
    let (body, ended) = rules.guard(body);
    let mut response = next.run(Request::from_parts(parts, body)).await;
    // Answered before its body was read (a refusal from the head, a body over its limit):
    // the connection closes after this answer, and the client is told, so it does not send
    // its next request down a connection that is going away.
    if !ended.load(std::sync::atomic::Ordering::Relaxed) {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// Serves one accepted connection until it ends, or until `shutdown` (then gracefully).
async fn serve_connection<Io>(
    io: Io,
    peer: SocketAddr,
    conn: Arc<Conn>,
    app: Router,
    shutdown: CancellationToken,
    limits: ConnectionLimits,
) where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let probation = conn.on_probation();
    let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
        let mut request = request.map(axum::body::Body::new);
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(conn.clone());
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.oneshot(request).await.into_response()) }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    let header_timeout = if probation {
        PROBATION_HEADER_TIMEOUT.min(limits.header_timeout)
    } else {
        limits.header_timeout
    };
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD_BUFFER)
        // A probation connection answers once and closes, freeing its slot.
        .keep_alive(!probation);
    let connection = http.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let finished = tokio::select! {
        result = connection.as_mut() => Some(result),
        () = shutdown.cancelled() => None,
    };
    let result = match finished {
        Some(result) => result,
        None => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%peer, error = %err, "connection ended");
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown` is cancelled, then lets
/// in-flight requests finish (at most [`DRAIN_DEADLINE`]).
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    shutdown: CancellationToken,
    limits: ConnectionLimits,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let tracker = TaskTracker::new();
    let gate = Gate::new(limits.gate());
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let Some(conn) = gate.admit(peer) else {
            tracing::debug!(%peer, "closing a connection past its source's share and the probation slots");
            continue;
        };
        tracker.spawn(serve_connection(
            io,
            peer,
            conn,
            app.clone(),
            shutdown.clone(),
            limits,
        ));
    }
    // No new connections while the old ones drain: they are refused at once, not queued.
    drop(listener);
    tracker.close();
    if tokio::time::timeout(DRAIN_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(deadline = ?DRAIN_DEADLINE, "in-flight requests did not finish in time; closing");
    }
    Ok(())
}
