//! The initialiser contract: what a core or third-party initialiser implements.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::store::DynStore;

/// The error an initialiser returns; its whole `source()` chain lands in the status record.
pub type InitError = Box<dyn std::error::Error + Send + Sync>;

/// When an initialiser runs, relative to the service gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Before the gate: it sets up what the gate depends on. It keeps no flag, runs on every
    /// start until it has succeeded in this process, and must be idempotent.
    BeforeGate,
    /// After the gate (the default): once per flag, under the lease.
    #[default]
    AfterGate,
}

/// One step that brings the deployment towards its initial state.
///
/// `run` is called when the configured flag differs from the one stored after the last success;
/// it must be safe to run again after a flag bump (and after a crash mid-run).
#[async_trait]
pub trait Initialiser: Send + Sync + 'static {
    /// When it runs; after the gate unless it says otherwise.
    fn phase(&self) -> Phase {
        Phase::AfterGate
    }

    /// Does the work; `ctx` says which flag it runs for, and the flag stored before.
    async fn run(&self, ctx: &InitContext) -> Result<(), InitError>;
}

/// What an initialiser can reach while it runs. Built per wake and dropped after it, so an
/// idle reconciler holds no connections.
#[derive(Clone)]
pub struct InitContext {
    /// The instance name from the spec.
    pub name: String,
    /// A span named for the instance; the engine enters it around `run`.
    pub span: tracing::Span,
    /// The config store, reached through the server's HTTP API (or directly in tests).
    pub store: DynStore,
    /// Base URL of the bootsync server (cfgsync routes, health), e.g. `http://127.0.0.1:4400`.
    pub server_url: String,
    /// An HTTP client for the server, carrying the admin token when one is configured.
    pub http: reqwest::Client,
    /// Cancelled when the run times out or the process shuts down.
    pub cancel: CancellationToken,
    /// The spec file's directory; relative paths in params resolve against it.
    pub spec_dir: PathBuf,
    /// The flag stored after the last success; `None` on a first run.
    pub old_flag: Option<String>,
    /// The flag this run is for.
    pub new_flag: String,
}

impl InitContext {
    /// The flag stored after the last success; `None` on a first run.
    pub fn old_flag(&self) -> Option<&str> {
        self.old_flag.as_deref()
    }

    /// The flag this run is for.
    pub fn new_flag(&self) -> &str {
        &self.new_flag
    }

    /// The same context for a run from `old` to `new`.
    pub fn with_flags(&self, old: Option<&str>, new: &str) -> Self {
        Self {
            old_flag: old.map(str::to_string),
            new_flag: new.to_string(),
            ..self.clone()
        }
    }

    /// Resolves a path from params against the spec file's directory.
    pub fn resolve(&self, path: impl AsRef<Path>) -> PathBuf {
        let path = path.as_ref();
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.spec_dir.join(path)
        }
    }
}

#[cfg(any(test, feature = "test-util"))]
impl InitContext {
    /// A context for unit-testing an initialiser: instance name `test`, the given store and
    /// spec directory, a server URL nothing listens on, a fresh cancellation token, and a
    /// first run for flag `v1` (see [`InitContext::with_flags`]).
    /// (Behind the `test-util` feature.)
    pub fn for_test(store: DynStore, spec_dir: impl Into<PathBuf>) -> Self {
        Self {
            name: "test".into(),
            span: tracing::Span::none(),
            store,
            server_url: "http://127.0.0.1:9".into(),
            http: crate::tls::plain_client(),
            cancel: CancellationToken::new(),
            spec_dir: spec_dir.into(),
            old_flag: None,
            new_flag: "v1".into(),
        }
    }

    /// The same context with another server URL (an in-process test server, say).
    pub fn with_server_url(mut self, url: impl Into<String>) -> Self {
        self.server_url = url.into();
        self
    }
}

impl std::fmt::Debug for InitContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitContext")
            .field("name", &self.name)
            .field("server_url", &self.server_url)
            .field("spec_dir", &self.spec_dir)
            .field("old_flag", &self.old_flag)
            .field("new_flag", &self.new_flag)
            .finish_non_exhaustive()
    }
}
