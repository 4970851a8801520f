//! `bootsync run|bootstrap|check|plan|status`: the reconciler's commands.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tokio_util::task::TaskTracker;

use super::config::Remote;
use super::report::{Output, Reporter};
use super::serve::{Preload, ServerArgs, start_server};
use super::{EXIT_GAVE_UP, EXIT_OK, EXIT_USAGE};
use crate::api::Token;
use crate::api::status::StatusBody;
use crate::api::system::DEFAULT_HISTORY_LEN;
use crate::api::system::{INIT_STATE, INIT_STATUS, Status};
use crate::bootstrap::{Engine, EngineOptions, Facts, HttpGate, Registry, Spec, assess, duration};
use crate::client::{ApiClient, RemoteStore};
use crate::servers::{BuildClient, ServerList, Servers};
use crate::store::{DynStore, SYSTEM_NAMESPACE};

/// Flags of the reconciler shared by `run` and `bootstrap`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ReconcilerArgs {
    /// The spec file (YAML or JSON).
    #[arg(long, env = "BOOTSYNC_SPEC")]
    pub(crate) spec: PathBuf,
    /// This reconciler's name in the lease and status records (default: host-pid).
    #[arg(long, env = "BOOTSYNC_HOLDER_ID")]
    pub(crate) holder_id: Option<String>,
    /// How long the reconciler lease lasts without renewal.
    #[arg(long, default_value = "15s", value_parser = duration::parse, env = "BOOTSYNC_LEASE_TTL")]
    pub(crate) lease_ttl: Duration,
    /// Runs kept per initialiser in its history (`bootsync history`).
    #[arg(long, default_value_t = DEFAULT_HISTORY_LEN as u64, value_parser = clap::value_parser!(u64).range(1..=1000), env = "BOOTSYNC_HISTORY_LEN")]
    pub(crate) history_len: u64,
}

/// Flags of `bootsync run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    reconciler: ReconcilerArgs,
    #[command(flatten)]
    server: ServerArgs,
    /// With --tls-cert from a private CA: the CA's PEM, for the reconciler's own connections
    /// (a self-signed certificate is trusted without it).
    #[arg(long, env = "BOOTSYNC_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

/// How the reconciler's HTTP clients verify the server.
#[derive(Debug, Clone, Default)]
struct ClientTls {
    /// CA certificates trusted beside the system's.
    roots: Vec<reqwest::Certificate>,
    /// Skip the host name check: only for `run`, whose reconciler dials its own loopback
    /// listener, where the certificate names the public host rather than 127.0.0.1.
    own_listener: bool,
}

impl ClientTls {
    fn client(&self, builder: reqwest::ClientBuilder) -> reqwest::Result<reqwest::Client> {
        if self.own_listener {
            crate::tls::install_crypto_provider();
            // Only the server's own chain (and --ca-cert) is trusted here, never the system's.
            return builder
                .connect_timeout(Duration::from_secs(5))
                .tls_certs_only(self.roots.iter().cloned())
                .tls_danger_accept_invalid_hostnames(true)
                .build();
        }
        crate::tls::http_client(&self.roots, builder)
    }
}

/// Flags of `bootsync bootstrap`.
#[derive(Debug, Args)]
pub struct BootstrapArgs {
    #[command(flatten)]
    reconciler: ReconcilerArgs,
    #[command(flatten)]
    remote: Remote,
}

/// Flags of `bootsync check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The spec file to validate.
    #[arg(long, env = "BOOTSYNC_SPEC")]
    spec: PathBuf,
}

/// Flags of `bootsync plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The spec file.
    #[arg(long, env = "BOOTSYNC_SPEC")]
    spec: PathBuf,
    #[command(flatten)]
    remote: Remote,
}

/// Flags of `bootsync status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    remote: Remote,
    /// Block until every initialiser is at its flag.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this long (exit 3).
    #[arg(long, default_value = "10m", value_parser = duration::parse)]
    timeout: Duration,
    /// Output format: a table, or the `/v1/status` JSON (progress as JSON lines on stderr).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Print nothing while waiting (giving up is still reported).
    #[arg(long)]
    quiet: bool,
}

/// The spec at `path`, or `None` after printing every problem with it.
fn spec_or_say_why(path: &Path) -> Option<Spec> {
    load_spec(path)
        .map_err(|report| eprintln!("error: {report}"))
        .ok()
}

fn load_spec(path: &Path) -> Result<Spec, String> {
    let registry = Registry::collect()?;
    Spec::load(path, &registry).map_err(|e| e.to_string())
}

fn holder(args: &ReconcilerArgs) -> String {
    args.holder_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "bootsync".into());
        format!("{host}-{}", std::process::id())
    })
}

/// The admin token as a default header of the reconciler's HTTP clients.
fn auth_headers(token: Option<&Token>) -> anyhow::Result<reqwest::header::HeaderMap> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .context("the admin token is not a valid header value")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(headers)
}

/// Runs the reconciler until shutdown, re-reading the spec on SIGHUP.
async fn reconcile(
    args: &ReconcilerArgs,
    spec: Spec,
    list: &ServerList,
    token: Option<Token>,
    tls: &ClientTls,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    // The token is a default header of every client (the store client's own bearer header
    // for the same token takes its place): the store's and the gate's, one per server, and
    // the initialisers'.
    let headers = auth_headers(token.as_ref())?;
    let with_token: BuildClient = {
        let tls = tls.clone();
        Arc::new(move |builder| tls.client(builder.default_headers(headers.clone())))
    };
    let servers = Servers::resolve(list, with_token.clone()).await?;
    let server_url = servers.get(0).target.url.clone();
    let http = with_token(reqwest::Client::builder())?;
    let store: DynStore = Arc::new(RemoteStore::new(
        ApiClient::with_servers(servers.clone()).with_admin_token(token),
    ));
    let gate = Arc::new(HttpGate { servers });
    let options = EngineOptions {
        holder: holder(args),
        lease_ttl: args.lease_ttl,
        // Initialisers are given the preferred server.
        server_url,
        http,
        history_len: args.history_len as usize,
    };
    tracing::info!(holder = %options.holder, initialisers = spec.entries.len(), "reconciler starting");
    let engine = Engine::new(spec, store, gate, options, metrics.as_deref());
    let (hup_tx, hup_rx) = tokio::sync::mpsc::channel(1);
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let hup_shutdown = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = hangups.recv() => { let _ = hup_tx.try_send(()); }
                () = hup_shutdown.cancelled() => return,
            }
        }
    });
    let path = args.spec.clone();
    engine.run(shutdown, hup_rx, move || load_spec(&path)).await;
    Ok(())
}

pub(super) async fn run(args: RunArgs) -> anyhow::Result<u8> {
    let Some(spec) = spec_or_say_why(&args.reconciler.spec) else {
        return Ok(EXIT_USAGE);
    };
    let shutdown = crate::shutdown::on_signals();
    let tracker = TaskTracker::new();
    let running = start_server(&args.server, &Preload::default(), shutdown.clone()).await?;
    let token = args.server.options()?.admin_token;
    let mut tls = ClientTls::default();
    if let Some(cert) = &args.server.tls_cert {
        // Trust the server's own chain (enough for a self-signed certificate) and --ca-cert.
        for der in crate::tls::load_certificates("certificate", cert)? {
            tls.roots.push(reqwest::Certificate::from_der(&der)?);
        }
        if let Some(ca) = &args.ca_cert {
            tls.roots.extend(crate::tls::load_ca(ca)?);
        }
        tls.own_listener = true;
    }
    // The reconciler reaches the server through its real listener, so the gate is honest.
    let reconciler = {
        let (reconciler_args, url, shutdown) = (
            args.reconciler.clone(),
            running.url().to_string(),
            shutdown.clone(),
        );
        let metrics = Some(running.state().metrics.clone());
        tracker.spawn(async move {
            let own = ServerList::single(&url)?;
            reconcile(&reconciler_args, spec, &own, token, &tls, metrics, shutdown).await
        })
    };
    tracker.close();
    let store = running.store().clone();
    let served = running.wait();
    tokio::pin!(served);
    let mut reconciler = reconciler;
    // A reconciler that cannot start (say, a TLS client it cannot build) ends the process
    // instead of leaving a server that never converges.
    let (served, ended) = tokio::select! {
        served = &mut served => {
            shutdown.cancel();
            (served, reconciler.await)
        }
        ended = &mut reconciler => {
            if let Ok(Err(err)) = &ended {
                tracing::error!(error = %format!("{err:#}"), "the reconciler stopped; shutting down");
            }
            shutdown.cancel();
            (served.await, ended)
        }
    };
    ended??;
    tracker.wait().await;
    served?;
    store.close().await?;
    tracing::info!("stopped");
    Ok(EXIT_OK)
}

pub(super) async fn bootstrap(args: BootstrapArgs) -> anyhow::Result<u8> {
    let Some(spec) = spec_or_say_why(&args.reconciler.spec) else {
        return Ok(EXIT_USAGE);
    };
    let token = args
        .remote
        .admin_token_file
        .as_deref()
        .map(Token::from_file)
        .transpose()?;
    let tls = ClientTls {
        roots: args.remote.ca_certs()?,
        own_listener: false,
    };
    let shutdown = crate::shutdown::on_signals();
    reconcile(
        &args.reconciler,
        spec,
        &args.remote.server,
        token,
        &tls,
        None,
        shutdown,
    )
    .await?;
    Ok(EXIT_OK)
}

pub(super) async fn check(args: CheckArgs) -> anyhow::Result<u8> {
    match load_spec(&args.spec) {
        Ok(spec) => {
            println!(
                "{}: ok, {} initialiser(s)",
                args.spec.display(),
                spec.entries.len()
            );
            for (i, e) in spec.entries.iter().enumerate() {
                let gate = if !e.pre_gate() { "" } else { " (pre-gate)" };
                println!("  [{i}] {} ({}) flag {}{gate}", e.name, e.class, e.flag);
            }
            Ok(EXIT_OK)
        }
        Err(report) => {
            println!("{report}");
            Ok(EXIT_USAGE)
        }
    }
}

pub(super) async fn plan(args: PlanArgs) -> anyhow::Result<u8> {
    let Some(spec) = spec_or_say_why(&args.spec) else {
        return Ok(EXIT_USAGE);
    };
    let client = args.remote.client().await?;
    let stored = client.list(SYSTEM_NAMESPACE, INIT_STATE).await?;
    let statuses = client.list(SYSTEM_NAMESPACE, INIT_STATUS).await?;
    for e in &spec.entries {
        let pre_gate = e.pre_gate();
        let current = stored
            .entries
            .get(&e.name)
            .and_then(|s| s.value.as_str().map(str::to_string));
        let last: Option<Status> = statuses
            .entries
            .get(&e.name)
            .and_then(|s| serde_json::from_value(s.value.clone()).ok());
        let assessment = assess(Facts {
            wanted_flag: &e.flag,
            params_hash: &e.params_hash,
            pre_gate,
            stored_flag: current.as_deref(),
            succeeded_params_hash: last
                .as_ref()
                .and_then(|s| s.succeeded_params_hash.as_deref()),
        });
        let line = match (pre_gate, assessment.converged, current.as_deref()) {
            (true, ..) => "pre-gate, runs before the gate on every start".to_string(),
            (false, true, _) if assessment.params_drift => format!(
                "up to date at {} — warning: params changed but the flag did not (bump it to re-run)",
                e.flag
            ),
            (false, true, _) => format!("up to date at {}", e.flag),
            (false, false, Some(old)) => format!("will run, {old} → {}", e.flag),
            (false, false, None) => format!("will run, (none) → {} (first run)", e.flag),
        };
        let line = match (assessment.converged, e.class.as_str()) {
            (false, "cfgsync-policy") => {
                format!(
                    "{line}; {}",
                    policy_effect(&client, &args.spec, &e.params).await
                )
            }
            _ => line,
        };
        println!(
            "{}",
            super::report::printable(&format!("{}: {line}", e.name))
        );
    }
    Ok(EXIT_OK)
}

/// What installing a pending `cfgsync-policy` would change, from the server's preview.
async fn policy_effect(
    client: &crate::client::ApiClient,
    spec: &std::path::Path,
    params: &serde_json::Value,
) -> String {
    let Some(file) = params["policy_file"].as_str() else {
        return "its policy_file is not named".into();
    };
    let path = spec
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(file);
    let policy = match crate::cfgsync::Policy::load(&path) {
        Ok(compiled) => compiled.policy().clone(),
        Err(err) => return format!("its policy does not load: {err}"),
    };
    let request = crate::api::rollout::PreviewRequest {
        policy: serde_json::to_value(&policy).unwrap_or_default(),
        node: None,
        show: Some(0),
    };
    match client.preview(&request).await {
        Ok(p) => format!(
            "the new policy would change {} of {} node(s){}{}",
            p.changed,
            p.nodes,
            if p.failed.is_empty() {
                String::new()
            } else {
                format!(", {} would fail to render", p.failed.len())
            },
            if policy.rollout.is_some() {
                ", rolled out in waves"
            } else {
                ", all at once"
            }
        ),
        Err(err) => format!("no preview: {err}"),
    }
}

fn print_table(body: &StatusBody) {
    println!(
        "{:<20} {:<16} {:<10} {:<10} {:<18} {:>8}  LAST ERROR",
        "NAME", "CLASS", "WANTED", "STORED", "STATE", "ATTEMPTS"
    );
    for i in &body.initialisers {
        let state = i
            .last_run
            .as_ref()
            .map_or("-".to_string(), |r| format!("{:?}", r.state).to_lowercase());
        let attempts = i.last_run.as_ref().map_or(0, |r| r.attempts);
        let error = i
            .last_run
            .as_ref()
            .and_then(|r| r.last_error.clone())
            .unwrap_or_default();
        let line = format!(
            "{:<20} {:<16} {:<10} {:<10} {:<18} {:>8}  {}",
            i.name,
            i.class,
            i.wanted_flag.as_deref().unwrap_or("-"),
            i.stored_flag.as_deref().unwrap_or("-"),
            state,
            attempts,
            error.lines().next().unwrap_or("")
        );
        println!("{}", super::report::printable(&line));
        if i.params_changed_without_flag_bump {
            println!("  warning: {} params changed but its flag did not", i.name);
        }
    }
    println!(
        "cfgsync: {} registration(s), ready: {}; store {} at revision {}; converged: {}",
        body.cfgsync.registrations, body.cfgsync.ready, body.backend, body.revision, body.converged
    );
}

pub(super) async fn status(args: StatusArgs) -> anyhow::Result<u8> {
    let client = args.remote.client().await?;
    let report = Reporter::new(args.output, args.quiet);
    let started = tokio::time::Instant::now();
    let deadline = started + args.timeout;
    loop {
        let body = client.status::<StatusBody>().await;
        match (&body, args.wait) {
            (Ok(body), _) if !args.wait || body.converged => {
                print_status(body, args.output)?;
                return Ok(EXIT_OK);
            }
            (Err(err), false) => anyhow::bail!("{err}"),
            _ => {}
        }
        let (text, waiting_for) = match &body {
            Ok(body) if body.initialisers.is_empty() => {
                ("waiting for: a reconciler to report".to_string(), json!([]))
            }
            Ok(body) => {
                let behind: Vec<_> = body.initialisers.iter().filter(|i| !i.converged).collect();
                let names = behind
                    .iter()
                    .map(|i| {
                        let error = i
                            .last_run
                            .as_ref()
                            .and_then(|r| r.last_error.as_deref())
                            .map(|e| format!(", last error: {}", first_line(e)))
                            .unwrap_or_default();
                        format!(
                            "{} ({} → {}{error})",
                            i.name,
                            i.stored_flag.as_deref().unwrap_or("none"),
                            i.wanted_flag.as_deref().unwrap_or("-")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                let list = behind
                    .iter()
                    .map(|i| {
                        json!({
                            "name": i.name,
                            "stored_flag": i.stored_flag,
                            "wanted_flag": i.wanted_flag,
                            "state": i.last_run.as_ref().map(|r| r.state),
                            "last_error": i.last_run.as_ref().and_then(|r| r.last_error.clone()),
                        })
                    })
                    .collect::<Vec<_>>();
                (format!("waiting for: {names}"), json!(list))
            }
            Err(err) => (format!("waiting for: the server ({err})"), json!([])),
        };
        report.progress(
            "waiting",
            &text,
            json!({"waiting_for": waiting_for, "waited_ms": started.elapsed().as_millis() as u64}),
        );
        if tokio::time::Instant::now() >= deadline {
            report.problem(
                "gave_up",
                &format!("gave up after {:?}; {text}", args.timeout),
                json!({"waiting_for": waiting_for}),
            );
            if let Ok(body) = &body
                && args.output == Output::Json
            {
                print_status(body, args.output)?;
            }
            return Ok(EXIT_GAVE_UP);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn print_status(body: &StatusBody, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(body)?),
        Output::Text => print_table(body),
    }
    Ok(())
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}
