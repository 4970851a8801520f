//! `bootsync serve`: the server alone on the chosen store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use super::{EXIT_OK, EXIT_USAGE};
use crate::api::Token;
use crate::cfgsync;
use crate::cfgsync::policy::RenderLimits;
use crate::metrics::Metrics;
use crate::server::{self, AppState, ServerOptions};
use crate::store::{self, Limits};

/// Flags shared by every command that runs the server (`serve`, `run`).
#[derive(Debug, Clone, Args)]
pub(crate) struct ServerArgs {
    /// Address to listen on; loopback unless told otherwise.
    #[arg(long, default_value = server::DEFAULT_LISTEN, env = "BOOTSYNC_LISTEN")]
    pub(crate) listen: SocketAddr,

    /// Store URL: `sqlite:PATH`, `memory:` or `etcd:http://h1:2379,...`.
    #[arg(
        long,
        default_value = "sqlite:./bootsync-data/store.db",
        env = "BOOTSYNC_STORE"
    )]
    pub(crate) store: String,

    /// File holding the admin token (guards config writes and reserved namespaces).
    #[arg(long, env = "BOOTSYNC_ADMIN_TOKEN_FILE")]
    pub(crate) admin_token_file: Option<PathBuf>,

    /// File holding the join token (guards `/register` and `/node`).
    #[arg(long, env = "BOOTSYNC_JOIN_TOKEN_FILE")]
    pub(crate) join_token_file: Option<PathBuf>,

    /// Allow listening on a non-loopback address without the join and admin tokens.
    #[arg(long, env = "BOOTSYNC_INSECURE")]
    pub(crate) insecure: bool,

    /// Largest request body in bytes.
    #[arg(long, default_value_t = server::DEFAULT_BODY_LIMIT, env = "BOOTSYNC_BODY_LIMIT")]
    pub(crate) body_limit: usize,

    /// Strict mode: each registration gets a secret its later `/node` calls must present.
    #[arg(long, env = "BOOTSYNC_STRICT_NODES")]
    pub(crate) strict_nodes: bool,

    /// Longest a `/node?wait=` long-poll is held, in seconds.
    #[arg(long, default_value_t = 60, env = "BOOTSYNC_NODE_WAIT_MAX")]
    pub(crate) node_wait_max: u64,

    /// Bytes of rendered `/node` payloads kept for repeated fetches of one epoch.
    #[arg(long, default_value_t = crate::cfgsync::render::DEFAULT_CACHE_BYTES, env = "BOOTSYNC_RENDER_CACHE_BYTES")]
    pub(crate) render_cache_bytes: usize,

    /// Payload renders running at once [default: one less than the cores, at least 1].
    #[arg(long, env = "BOOTSYNC_RENDER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) render_threads: Option<u16>,

    /// Template instructions one rendered file may run (minijinja fuel).
    #[arg(long, default_value_t = RenderLimits::default().fuel, env = "BOOTSYNC_RENDER_FUEL")]
    pub(crate) render_fuel: u64,

    /// Longest one node's files may take to render (`500ms`, `10s`).
    #[arg(long, default_value = "10s", value_parser = crate::bootstrap::duration::parse, env = "BOOTSYNC_RENDER_DEADLINE")]
    pub(crate) render_deadline: std::time::Duration,

    /// Largest rendered file, in bytes.
    #[arg(long, default_value_t = RenderLimits::default().max_file_bytes, env = "BOOTSYNC_RENDER_MAX_FILE_BYTES")]
    pub(crate) render_max_file_bytes: usize,

    /// Address space of each render process, in bytes: a policy whose templates could build
    /// text without bound (assignments, captures, macros, `*`) renders there, and a render
    /// past it fails only its own node.
    #[arg(long, default_value_t = crate::cfgsync::isolate::DEFAULT_RENDER_MEMORY, env = "BOOTSYNC_RENDER_MEMORY")]
    pub(crate) render_memory: u64,

    /// Largest rendered payload (a node's files and the shared ones), in bytes.
    #[arg(long, default_value_t = RenderLimits::default().max_payload_bytes, env = "BOOTSYNC_RENDER_MAX_PAYLOAD_BYTES")]
    pub(crate) render_max_payload_bytes: usize,

    /// Registrations accepted at most (a policy's `max_registrations` may set it lower).
    #[arg(long, default_value_t = crate::cfgsync::admission::DEFAULT_MAX_REGISTRATIONS, env = "BOOTSYNC_MAX_REGISTRATIONS")]
    pub(crate) max_registrations: usize,

    /// Bytes all registrations' metadata may hold together [default: 256 MiB, or an eighth
    /// of the memory limit (cgroup) when that is less: the server holds about 3 times the
    /// stored bytes, up to 5 times just after a restart].
    #[arg(long, env = "BOOTSYNC_METADATA_BUDGET")]
    pub(crate) metadata_budget: Option<usize>,

    /// How many times a minute one node may change its IP or metadata (each change makes
    /// every watching node reload); 0 for no limit.
    #[arg(long, default_value_t = crate::cfgsync::service::DEFAULT_NODE_CHANGES_PER_MINUTE, env = "BOOTSYNC_NODE_CHANGES_PER_MINUTE")]
    pub(crate) node_changes_per_minute: u32,

    /// Longest wait for a request's head, on a new or an idle kept-alive connection.
    #[arg(long, default_value = "10s", value_parser = crate::bootstrap::duration::parse, env = "BOOTSYNC_HEADER_TIMEOUT")]
    pub(crate) header_timeout: std::time::Duration,

    /// Longest wait for the next piece of a request body.
    #[arg(long, default_value = "10s", value_parser = crate::bootstrap::duration::parse, env = "BOOTSYNC_BODY_TIMEOUT")]
    pub(crate) body_timeout: std::time::Duration,

    /// Bytes per second a request body must average once its first `--body-timeout` passed.
    #[arg(long, default_value_t = server::ConnectionLimits::default().min_body_rate, env = "BOOTSYNC_MIN_BODY_RATE")]
    pub(crate) min_body_rate: u64,

    /// Longest from a request's head to its last body byte.
    #[arg(long, default_value = "60s", value_parser = crate::bootstrap::duration::parse, env = "BOOTSYNC_REQUEST_DEADLINE")]
    pub(crate) request_deadline: std::time::Duration,

    /// Bytes of request bodies held at once, all connections together [default: 64 MiB, or a
    /// sixteenth of the memory limit (cgroup) when that is less, and at least --body-limit].
    #[arg(long, env = "BOOTSYNC_BODY_BUDGET")]
    pub(crate) body_budget: Option<usize>,

    /// Connections served at once; a quarter is kept for requests with a token, and past it
    /// only `/healthz` is answered [default: the open-file limit, raised to its hard limit,
    /// less a reserve].
    #[arg(long, env = "BOOTSYNC_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_connections: Option<u32>,

    /// Connections one source address (an IPv6 /64) may hold before any of its requests
    /// shows a token; 0 for no cap [default: an eighth of --max-connections, at least 64].
    #[arg(long, env = "BOOTSYNC_MAX_CONNECTIONS_PER_SOURCE")]
    pub(crate) max_connections_per_source: Option<usize>,

    /// Requests one source may hold open (long-polls) without a token; past it they are
    /// answered at once (`/node`) or refused with 429 (`/v1/changes`); 0 for no cap [default:
    /// half its connections, at least 1; no cap when those have none].
    #[arg(long, env = "BOOTSYNC_MAX_HELD_PER_SOURCE")]
    pub(crate) max_held_per_source: Option<usize>,

    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key", env = "BOOTSYNC_TLS_CERT")]
    pub(crate) tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert", env = "BOOTSYNC_TLS_KEY")]
    pub(crate) tls_key: Option<PathBuf>,

    /// Largest stored value in bytes.
    #[arg(long, default_value_t = Limits::default().max_value_bytes, env = "BOOTSYNC_MAX_VALUE_BYTES")]
    pub(crate) max_value_bytes: usize,
}

impl ServerArgs {
    /// Reads the token files and checks the listen address against them.
    pub(crate) fn options(&self) -> anyhow::Result<ServerOptions> {
        let admin_token = self
            .admin_token_file
            .as_deref()
            .map(Token::from_file)
            .transpose()?;
        let join_token = self
            .join_token_file
            .as_deref()
            .map(Token::from_file)
            .transpose()?;
        if !self.listen.ip().is_loopback() && !self.insecure {
            // Off loopback, anyone who reaches the port could otherwise rewrite the policy or
            // bundle every node is served, or forge registrations.
            let missing: Vec<&str> = [
                (join_token.is_none(), "--join-token-file"),
                (admin_token.is_none(), "--admin-token-file"),
            ]
            .into_iter()
            .filter_map(|(absent, flag)| absent.then_some(flag))
            .collect();
            if !missing.is_empty() {
                anyhow::bail!(
                    "refusing to listen on non-loopback {} without {}; \
                     pass --insecure to serve the network unauthenticated",
                    self.listen,
                    missing.join(" and ")
                );
            }
        }
        Ok(ServerOptions {
            admin_token,
            join_token,
            body_limit: self.body_limit,
            cfgsync: crate::cfgsync::ServiceOptions {
                strict_nodes: self.strict_nodes,
                node_wait_max: std::time::Duration::from_secs(self.node_wait_max),
                render_cache_bytes: self.render_cache_bytes,
                render_threads: self.render_threads.map_or_else(
                    crate::cfgsync::render::RenderPool::default_threads,
                    usize::from,
                ),
                render_limits: RenderLimits {
                    fuel: self.render_fuel,
                    deadline: self.render_deadline,
                    max_file_bytes: self.render_max_file_bytes,
                    max_payload_bytes: self.render_max_payload_bytes,
                },
                admission: crate::cfgsync::admission::AdmissionLimits {
                    max_registrations: self.max_registrations,
                    metadata_budget: self.metadata_budget.unwrap_or_else(|| {
                        crate::memory::share(crate::cfgsync::admission::DEFAULT_METADATA_BUDGET, 8)
                    }),
                },
                node_changes_per_minute: self.node_changes_per_minute,
                isolation: crate::cfgsync::isolate::Isolation::this_program(self.render_memory),
            },
            connections: self.connection_limits(),
        })
    }

    /// The connection and request limits these flags ask for.
    fn connection_limits(&self) -> server::ConnectionLimits {
        let max_connections = self
            .max_connections
            .map_or_else(server::conn::default_max_connections, |n| n as usize);
        let per_source = self
            .max_connections_per_source
            .unwrap_or_else(|| server::conn::default_per_source(max_connections));
        server::ConnectionLimits {
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            min_body_rate: self.min_body_rate,
            request_deadline: self.request_deadline,
            body_budget: self
                .body_budget
                .unwrap_or_else(|| crate::memory::share(server::conn::DEFAULT_BODY_BUDGET, 16))
                .max(self.body_limit),
            max_connections,
            per_source,
            holds_per_source: self
                .max_held_per_source
                .unwrap_or_else(|| server::conn::default_holds_per_source(per_source)),
        }
    }

    /// The store limits these flags ask for.
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            max_value_bytes: self.max_value_bytes,
            ..Limits::default()
        }
    }

    /// Opens the store, installs what `preload` carries, and builds the server state.
    pub(crate) async fn state(&self, preload: &Preload) -> anyhow::Result<AppState> {
        let options = self.options()?;
        let store = store::open(&self.store, self.limits())
            .await
            .with_context(|| format!("opening store {}", self.store))?;
        if let Some(bundle) = &preload.bundle {
            keep_rollout(
                cfgsync::install::install_bundle(store.as_ref(), bundle, false).await,
                "bundle",
            )?;
        }
        if let Some(policy) = &preload.policy {
            keep_rollout(
                cfgsync::install::install_policy(store.as_ref(), policy.policy(), false).await,
                "policy",
            )?;
        }
        Ok(AppState::new(store, options, Arc::new(Metrics::new())).await?)
    }
}

/// A server restarted during a rollout serves the rollout it finds: the file it was started
/// with is not forced over it (an operator installs with `bootsync policy install --force`).
fn keep_rollout(
    installed: Result<cfgsync::install::Installed, cfgsync::install::InstallError>,
    what: &str,
) -> anyhow::Result<()> {
    match installed {
        Ok(_) => Ok(()),
        Err(err @ cfgsync::install::InstallError::RolloutInProgress { .. }) => {
            tracing::warn!(error = %err, "the {what} file was not installed; the rollout under way goes on");
            Ok(())
        }
        Err(err) => Err(err).with_context(|| format!("installing the {what}")),
    }
}

/// Serving state installed into the store before the server answers.
#[derive(Debug, Default)]
pub(crate) struct Preload {
    /// A static bundle (`serve --bundle`).
    pub(crate) bundle: Option<cfgsync::NodeArtifactsBundle>,
    /// A registration policy (`serve --policy`).
    pub(crate) policy: Option<cfgsync::CompiledPolicy>,
}

impl Preload {
    /// Loads and validates the files; every problem of each file is reported.
    fn load(
        bundle: Option<&std::path::Path>,
        policy: Option<&std::path::Path>,
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let bundle = bundle.and_then(|p| {
            cfgsync::NodeArtifactsBundle::load(p)
                .map_err(|e| problems.push(e.to_string()))
                .ok()
        });
        let policy = policy.and_then(|p| {
            cfgsync::Policy::load(p)
                .map_err(|e| problems.push(e.to_string()))
                .ok()
        });
        if problems.is_empty() {
            Ok(Self { bundle, policy })
        } else {
            Err(problems)
        }
    }
}

/// Flags of `bootsync serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub(crate) server: ServerArgs,

    /// Load a static artifact bundle (YAML or JSON) into cfgsync at start.
    #[arg(long, env = "BOOTSYNC_BUNDLE")]
    pub(crate) bundle: Option<std::path::PathBuf>,

    /// Load a registration policy (YAML or JSON) into cfgsync at start.
    #[arg(long, env = "BOOTSYNC_POLICY")]
    pub(crate) policy: Option<std::path::PathBuf>,
}

/// Prints the one stdout line scripts and tests wait for, `bootsync listening on URL`, once
/// the listener is bound (so `--listen 127.0.0.1:0` is usable); returns the URL.
pub(crate) fn announce(
    listener: &tokio::net::TcpListener,
    backend: &str,
    tls: bool,
) -> anyhow::Result<String> {
    use std::io::Write;
    let addr = listener.local_addr()?;
    let url = format!("{}://{addr}", if tls { "https" } else { "http" });
    tracing::info!(listen = %addr, store = backend, tls, "serving");
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "bootsync listening on {url}")?;
    stdout.flush()?;
    Ok(url)
}

/// Opens the store, builds the server state, binds, announces the listener and serves until
/// `shutdown`. Shared by `serve` and `run` so both expose the same server.
pub(crate) async fn start_server(
    args: &ServerArgs,
    preload: &Preload,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<server::RunningServer> {
    // Certificate problems are found before anything is opened or bound.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::server_config(cert, key)?),
        _ => None,
    };
    let state = args.state(preload).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    announce(&listener, state.store.backend(), tls.is_some())?;
    Ok(server::spawn(state, listener, tls, shutdown)?)
}

pub(super) async fn run(args: ServeArgs) -> anyhow::Result<u8> {
    let preload = match Preload::load(args.bundle.as_deref(), args.policy.as_deref()) {
        Ok(preload) => preload,
        Err(problems) => {
            for problem in problems {
                eprintln!("error: {problem}");
            }
            return Ok(EXIT_USAGE);
        }
    };
    let shutdown = crate::shutdown::on_signals();
    let running = start_server(&args.server, &preload, shutdown).await?;
    let store = running.store().clone();
    running.wait().await?;
    store.close().await?;
    tracing::info!("stopped");
    Ok(EXIT_OK)
}
