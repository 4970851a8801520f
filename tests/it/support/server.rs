//! An in-process server on an ephemeral loopback port, started through the library's
//! `server::spawn` (the composition the binary uses), handing out the crate's own clients.

use std::sync::Arc;

use bootsync::api::Token;
use bootsync::cfgsync::CfgsyncClient;
use bootsync::cfgsync::install::{install_bundle, install_policy};
use bootsync::cfgsync::{NodeArtifactsBundle, Policy};
use bootsync::client::{ApiClient, RemoteStore};
use bootsync::metrics::Metrics;
use bootsync::server::{self, AppState, RunningServer, ServerOptions};
use bootsync::store::sqlite::{SqliteOptions, SqliteStore};
use bootsync::store::{DynStore, Limits};
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// What [`TestServer::with`] starts a server with.
#[derive(Debug, Default)]
pub struct Setup {
    /// Tokens and limits.
    pub options: ServerOptions,
    /// The store's limits.
    pub limits: Limits,
    /// A policy file's YAML.
    pub policy: Option<String>,
    /// A bundle file's YAML.
    pub bundle: Option<String>,
}

impl Setup {
    /// A server serving `policy`.
    pub fn policy(yaml: &str) -> Self {
        Self {
            policy: Some(yaml.to_string()),
            ..Self::default()
        }
    }

    /// A server serving `bundle`.
    pub fn bundle(yaml: &str) -> Self {
        Self {
            bundle: Some(yaml.to_string()),
            ..Self::default()
        }
    }
}

/// A server running in the test's runtime; [`TestServer::stop`] drains it.
pub struct TestServer {
    running: RunningServer,
    admin_token: Option<Token>,
    join_token: Option<Token>,
    /// Holds the SQLite file while the server runs.
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// A server with default options on SQLite, the default store.
    pub async fn start() -> Self {
        Self::with_options(ServerOptions::default()).await
    }

    /// A server with `options` on a fresh SQLite file.
    pub async fn with_options(options: ServerOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: DynStore = Arc::new(
            SqliteStore::open(dir.path().join("store.db"), SqliteOptions::default()).unwrap(),
        );
        let mut server = Self::spawn(store, options).await;
        server._dir = Some(dir);
        server
    }

    /// A server with default options on `store`.
    pub async fn on_store(store: DynStore) -> Self {
        Self::spawn(store, ServerOptions::default()).await
    }

    /// A server as `setup` says, on a fresh SQLite file: as `serve --policy`/`--bundle`
    /// would start, the files are checked and installed before it answers.
    pub async fn with(setup: Setup) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions {
            limits: setup.limits,
            ..SqliteOptions::default()
        };
        let store: DynStore =
            Arc::new(SqliteStore::open(dir.path().join("store.db"), options).unwrap());
        if let Some(yaml) = &setup.policy {
            let policy: Policy = serde_saphyr::from_str(yaml).expect("the policy parses");
            let compiled = policy.compile().expect("the policy is valid");
            install_policy(store.as_ref(), compiled.policy(), false)
                .await
                .unwrap();
        }
        if let Some(yaml) = &setup.bundle {
            let bundle: NodeArtifactsBundle =
                serde_saphyr::from_str(yaml).expect("the bundle parses");
            bundle.validate().expect("the bundle is valid");
            install_bundle(store.as_ref(), &bundle, false)
                .await
                .unwrap();
        }
        let mut server = Self::spawn(store, setup.options).await;
        server._dir = Some(dir);
        server
    }

    async fn spawn(store: DynStore, options: ServerOptions) -> Self {
        let admin_token = options.admin_token.clone();
        let join_token = options.join_token.clone();
        let state = AppState::new(store, options, Arc::new(Metrics::new()))
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = server::spawn(state, listener, None, Default::default()).unwrap();
        Self {
            running,
            admin_token,
            join_token,
            _dir: None,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        self.running.url()
    }

    /// The store the server serves, for checks behind its back.
    pub fn store(&self) -> &DynStore {
        self.running.store()
    }

    /// A `/v1` client holding the admin token, if the server has one.
    pub fn api(&self) -> ApiClient {
        ApiClient::new(self.url()).with_admin_token(self.admin_token.clone())
    }

    /// The store trait over the `/v1` API.
    pub fn remote_store(&self) -> RemoteStore {
        RemoteStore::new(self.api()).with_poll(std::time::Duration::from_secs(5))
    }

    /// A cfgsync client holding the join token, if the server has one.
    pub fn cfgsync(&self) -> CfgsyncClient {
        CfgsyncClient::new(self.url()).with_join_token(self.join_token.clone())
    }

    /// One request with an optional JSON body, sent without any token.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        super::call(method, &format!("{}{path}", self.url()), None, body).await
    }

    /// One request sent with the admin token.
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let token = self.admin_token.as_ref().map(|t| t.expose().to_string());
        super::call(
            method,
            &format!("{}{path}", self.url()),
            token.as_deref(),
            body,
        )
        .await
    }

    /// Stops accepting and drains in-flight requests.
    pub async fn stop(self) {
        self.running.stop().await.unwrap();
    }
}
