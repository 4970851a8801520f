//! Starting a server in this process: the one place where state, router, listener and TLS are
//! put together, used by `serve` and `run`, by library users and by the tests.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::nodes::{self, NodeRoutes};
use super::{AppState, ServerOptions, router};
use crate::api::Token;
use crate::cfgsync::{RegistrationSnapshotMaterializer, Service, ServiceOptions};
use crate::metrics::Metrics;
use crate::store::{self, DynStore, Limits, memory::MemoryStore};

/// A server running in this process. Dropping it does not stop it; [`RunningServer::stop`]
/// does, or the shutdown token given to [`spawn`].
pub struct RunningServer {
    addr: SocketAddr,
    url: String,
    state: AppState,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

debug_fields!(RunningServer { url });

impl RunningServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` or `https://ADDR`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The state every handler sees (store, options, metrics, cfgsync).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The store it serves.
    pub fn store(&self) -> &DynStore {
        &self.state.store
    }

    /// Waits until the server has stopped (after its shutdown token is cancelled) and drained.
    pub async fn wait(self) -> std::io::Result<()> {
        self.task.await.map_err(std::io::Error::other)?
    }

    /// Stops accepting, drains in-flight requests and waits for the end.
    pub async fn stop(self) -> std::io::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Serves the whole router for `state` on `listener` (over TLS when `tls` is set) until
/// `shutdown` is cancelled, with the connection limits of `state`'s options.
pub fn spawn(
    state: AppState,
    listener: TcpListener,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> std::io::Result<RunningServer> {
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{addr}");
    let limits = state.options.connections;
    let app = router(state.clone(), []);
    let token = shutdown.clone();
    let task = match tls {
        Some(config) => tokio::spawn(super::conn::serve(
            super::conn::tls::TlsListener::new(listener, config)?,
            app,
            token,
            limits,
        )),
        None => tokio::spawn(super::conn::serve(listener, app, token, limits)),
    };
    Ok(RunningServer {
        addr,
        url,
        state,
        shutdown,
        task,
    })
}

/// The `/register` and `/node` routes over `store`, with a library materializer in place of a
/// stored policy (or `None` to serve the stored bundle and policy), for embedding in another
/// axum application.
pub async fn build_cfgsync_router(
    store: DynStore,
    options: ServiceOptions,
    join_token: Option<Token>,
    materializer: Option<Arc<dyn RegistrationSnapshotMaterializer>>,
) -> Result<Router, store::Error> {
    let service = Service::start(store, options, materializer).await?;
    Ok(nodes::routes(NodeRoutes {
        service,
        join_token,
    }))
}

/// Serves registration-backed cfgsync on `127.0.0.1:port` with `materializer`, on an in-memory
/// store, until SIGINT/SIGTERM. The full server (health, metrics, `/v1`) comes with it.
pub async fn serve_snapshot_cfgsync(
    port: u16,
    materializer: impl RegistrationSnapshotMaterializer,
) -> std::io::Result<()> {
    let store: DynStore = Arc::new(MemoryStore::new(Limits::default()));
    let state = AppState::with_materializer(
        store,
        ServerOptions::default(),
        Arc::new(Metrics::new()),
        Some(Arc::new(materializer)),
    )
    .await
    .map_err(std::io::Error::other)?;
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    spawn(state, listener, None, crate::shutdown::on_signals())?
        .wait()
        .await
}
