//! Operational wiring for library users with their own materializer.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;

use super::RegistrationSnapshotMaterializer;
use super::http::{self, NodeRoutes};
use super::service::{Service, ServiceOptions};
use crate::metrics::Metrics;
use crate::server::{self, AppState, ServerOptions, Token};
use crate::store::{DynStore, Limits, memory::MemoryStore};

/// The `/register` and `/node` routes over `store`, with a library materializer in place of a
/// stored policy (or `None` to serve the stored bundle and policy).
pub async fn build_cfgsync_router(
    store: DynStore,
    options: ServiceOptions,
    join_token: Option<Token>,
    materializer: Option<Arc<dyn RegistrationSnapshotMaterializer>>,
) -> Result<Router, crate::store::Error> {
    let service = Service::start(store, options, materializer).await?;
    Ok(http::routes(NodeRoutes {
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
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    server::serve(
        listener,
        server::router(state, []),
        crate::shutdown::on_signals(),
    )
    .await
}
