//! Accepting connections within bounds: a header-read (and idle) timeout, a connection cap
//! that keeps `/healthz` answering, and a bounded drain at shutdown.
//!
//! hyper's HTTP/1 timer covers a connection whenever it waits for a request head: a new
//! connection that never sends one, a slow one (slowloris), and a kept-alive one gone quiet
//! between requests. A request being answered, however long it is held (a long-poll), is not
//! waiting for a head, so it is never cut off as idle.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::ApiError;

/// How long in-flight requests may take to finish after shutdown is requested.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Connections past the cap still accepted, to answer `/healthz` (and 503 to the rest) before
/// they are closed; past these too, a connection is closed at once.
const OVERFLOW: usize = 64;

/// Header timeout of an overflow connection.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// File descriptors kept back from the connection cap for the store, logs and outgoing calls.
const RESERVED_FDS: u64 = 128;

/// Bounds on the connections one server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Longest wait for a request's head: on a new connection, on a slow one, and on a
    /// kept-alive one between requests (so also the idle timeout).
    pub header_timeout: Duration,
    /// Longest wait for the next piece of a request body.
    pub body_timeout: Duration,
    /// Connections served at once; more get only `/healthz`.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_connections: default_max_connections(),
        }
    }
}

/// Raises the open-file soft limit to the hard limit (the 1 024 default is easy to exhaust),
/// then leaves room for the store, logs and outgoing calls beside the overflow connections.
pub fn default_max_connections() -> usize {
    let limit = raise_fd_limit();
    usize::try_from(limit.saturating_sub(RESERVED_FDS + OVERFLOW as u64))
        .unwrap_or(usize::MAX)
        .clamp(16, 65_536)
}

/// The open-file soft limit after trying to raise it to the hard limit.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// Marks a request that came on a connection past the cap.
#[derive(Debug, Clone, Copy)]
pub struct Overloaded;

/// Answers 503 to everything but `/healthz` on a connection past the cap, so a probe still
/// sees a live server while the cap holds.
pub async fn shed(request: Request, next: Next) -> Response {
    if request.extensions().get::<Overloaded>().is_some() && request.uri().path() != "/healthz" {
        return ApiError::unavailable("the server is at its connection limit; retry")
            .into_response();
    }
    next.run(request).await
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
    let served = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let overflow = Arc::new(Semaphore::new(OVERFLOW));
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (permit, overloaded) = match served.clone().try_acquire_owned() {
            Ok(permit) => (permit, false),
            Err(_) => match overflow.clone().try_acquire_owned() {
                Ok(permit) => (permit, true),
                Err(_) => {
                    tracing::debug!(%peer, "closing a connection past the cap and its overflow");
                    continue;
                }
            },
        };
        let (app, shutdown) = (app.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(ConnectInfo(peer));
                if overloaded {
                    request.extensions_mut().insert(Overloaded);
                }
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.oneshot(request).await.into_response()) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            // An overflow slot is for a probe's quick request: one held open by a silent
            // client is freed within a second.
            let header_timeout = if overloaded {
                OVERFLOW_HEADER_TIMEOUT.min(limits.header_timeout)
            } else {
                limits.header_timeout
            };
            http.timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                // An overflow connection answers once and closes, freeing its slot.
                .keep_alive(!overloaded);
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
        });
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
