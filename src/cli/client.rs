//! `bootsync client`: the node side — register, wait, fetch, write files safely, exit.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::report::{Output, Reporter};
use super::{EXIT_FAILURE, EXIT_GAVE_UP, EXIT_OK, EXIT_USAGE};
use crate::api::Token;
use crate::bootstrap::duration;
use crate::cfgsync::client::{CfgsyncClient, ClientError};
use crate::cfgsync::node::{NodeError, seed_routes};
use crate::cfgsync::watch::{Ended, Watch};
use crate::cfgsync::{ArtifactOutputMap, NodeRegistration};
use crate::servers::{BuildClient, ServerList, Servers};

/// Flags of `bootsync client` (the seed's `CFG_*` variables work too).
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The cfgsync server (`http://host:port`; a bare `host:port` means http), or several
    /// sharing one store (`A,B,C`): the node moves to the next when one fails, and back to
    /// its preferred one later. Without it, the seed's `CFG_SERVER_ADDR` (one URL) is used.
    #[arg(long, env = "BOOTSYNC_SERVER", value_parser = ServerList::parse)]
    server: Option<ServerList>,
    /// This node's identifier.
    #[arg(long, env = "CFG_HOST_IDENTIFIER")]
    identifier: String,
    /// This node's IP address (IPv4 or IPv6).
    #[arg(long, env = "CFG_HOST_IP")]
    ip: IpAddr,
    /// Registration metadata as JSON.
    #[arg(long, env = "CFG_REGISTRATION_METADATA_JSON")]
    metadata: Option<String>,
    /// Where `/config.yaml` goes.
    #[arg(long, env = "CFG_FILE_PATH")]
    file_path: Option<String>,
    /// Where `deployment-settings.yaml` goes.
    #[arg(long, env = "CFG_DEPLOYMENT_PATH")]
    deployment_path: Option<String>,
    /// Route a payload path to a local file (repeatable): `--route /config.yaml=/etc/node.yaml`.
    #[arg(long = "route", value_name = "SRC=DST")]
    routes: Vec<String>,
    /// Where unrouted relative payload paths go.
    #[arg(long, default_value = ".", env = "BOOTSYNC_OUTPUT_DIR")]
    output_dir: PathBuf,
    /// Give up after this long (exit 3).
    #[arg(long, default_value = "10m", value_parser = duration::parse, env = "BOOTSYNC_CLIENT_TIMEOUT")]
    timeout: Duration,
    /// Largest payload accepted, in bytes; a larger answer is refused and nothing is written.
    #[arg(long, default_value_t = crate::cfgsync::client::DEFAULT_MAX_PAYLOAD_BYTES, env = "BOOTSYNC_CLIENT_MAX_PAYLOAD_BYTES")]
    max_payload_bytes: usize,
    /// File holding the join token.
    #[arg(long, env = "BOOTSYNC_JOIN_TOKEN_FILE")]
    join_token_file: Option<PathBuf>,
    /// PEM file of a CA to trust for an `https://` server, beside the system's roots.
    #[arg(long, env = "BOOTSYNC_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Keep waiting when the server has no config for this node yet (404).
    #[arg(long)]
    retry_missing: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// Output format of the final report on stdout.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// After the first write, keep the files current: wait for each newer epoch, write it
    /// all-or-nothing, and run `--on-change`; runs until SIGTERM.
    #[arg(long)]
    watch: bool,
    /// With --watch: a shell command run after each write that changed files, with
    /// `BOOTSYNC_CHANGED_PATHS_FILE` (a file listing them, one per line; also in
    /// `BOOTSYNC_CHANGED_PATHS` when short), `BOOTSYNC_EPOCH` and `BOOTSYNC_IDENTIFIER`.
    #[arg(long, requires = "watch", value_name = "CMD")]
    on_change: Option<String>,
    /// With --watch: least time between two runs of --on-change; newer epochs that come
    /// sooner are coalesced, and the newest is written.
    #[arg(long, default_value = "2s", value_parser = duration::parse, requires = "watch", env = "BOOTSYNC_MIN_HOOK_INTERVAL")]
    min_hook_interval: Duration,
}

/// The servers from `--server`/`BOOTSYNC_SERVER`, else the seed's `CFG_SERVER_ADDR` (one
/// URL); `None` after saying what is wrong.
fn server_list(flag: Option<ServerList>) -> Option<ServerList> {
    if let Some(list) = flag {
        return Some(list);
    }
    let Ok(seed) = std::env::var("CFG_SERVER_ADDR") else {
        eprintln!(
            "error: name the server: --server URL[,URL...], BOOTSYNC_SERVER or CFG_SERVER_ADDR"
        );
        return None;
    };
    ServerList::single(&seed)
        .map_err(|err| eprintln!("error: CFG_SERVER_ADDR: {err}"))
        .ok()
}

pub(super) async fn run(args: ClientArgs) -> anyhow::Result<u8> {
    let mut registration = NodeRegistration::new(args.identifier.clone(), args.ip);
    if let Some(json) = &args.metadata {
        match serde_json::from_str(json) {
            Ok(metadata) => registration.metadata = metadata,
            Err(err) => {
                eprintln!("error: --metadata is not valid JSON: {err}");
                return Ok(EXIT_USAGE);
            }
        }
    }
    let mut outputs = seed_routes(
        ArtifactOutputMap::new().with_root(&args.output_dir),
        args.file_path.clone(),
        args.deployment_path.clone(),
    );
    for route in &args.routes {
        let Some((src, dst)) = route.split_once('=') else {
            eprintln!("error: --route {route:?} must look like SRC=DST");
            return Ok(EXIT_USAGE);
        };
        outputs = outputs.route(src, dst);
    }
    let token = args
        .join_token_file
        .as_deref()
        .map(Token::from_file)
        .transpose()?;
    let Some(list) = server_list(args.server.clone()) else {
        return Ok(EXIT_USAGE);
    };
    let roots = match &args.ca_cert {
        Some(path) => crate::tls::load_ca(path)?,
        None => Vec::new(),
    };
    let build: BuildClient = Arc::new(move |b| crate::tls::http_client(&roots, b));
    let servers = Servers::resolve(&list, build).await?;
    let client = CfgsyncClient::with_servers(servers)
        .preferring(&args.identifier)
        .with_join_token(token)
        .with_max_payload_bytes(args.max_payload_bytes);
    let server = client.preferred_server();
    let report = Reporter::new(args.output, args.quiet);
    let progress = |p: &crate::cfgsync::client::Progress| {
        report.progress(
            "waiting",
            &format!(
                "waiting for {} ({} s so far): {}",
                p.server,
                p.waited.as_secs(),
                p.last
            ),
            serde_json::json!({
                "server": p.server,
                "waited_ms": p.waited.as_millis() as u64,
                "last": p.last,
            }),
        );
    };
    report.progress(
        "registering",
        &format!(
            "registering {} ({}) with {server}",
            args.identifier, args.ip
        ),
        serde_json::json!({"identifier": args.identifier, "ip": args.ip, "server": server}),
    );
    let result = async {
        let payload = client
            .register_and_wait(&registration, args.timeout, args.retry_missing, &progress)
            .await?;
        let files = outputs.write_all(&payload.files)?;
        Ok::<_, NodeError>((payload, files))
    }
    .await;
    match result {
        Ok((payload, files)) if args.watch => {
            report.progress(
                "written",
                &format!("wrote {} file(s); watching for newer epochs", files.len()),
                serde_json::json!({"epoch": payload.epoch, "files": files.len()}),
            );
            let watch = Watch {
                client: &client,
                registration: &registration,
                outputs: &outputs,
                on_change: args.on_change.as_deref(),
                events: &report,
                min_hook_interval: args.min_hook_interval,
            };
            Ok(
                match watch
                    .run(payload, &files, crate::shutdown::on_signals())
                    .await
                {
                    Ended::Shutdown => EXIT_OK,
                    Ended::Out => EXIT_FAILURE,
                },
            )
        }
        Ok((payload, files)) => {
            match args.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "identifier": args.identifier,
                        "epoch": payload.epoch,
                        "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
                    })
                ),
                Output::Text if !args.quiet => {
                    for file in &files {
                        println!("wrote {}", file.display());
                    }
                }
                Output::Text => {}
            }
            Ok(EXIT_OK)
        }
        Err(NodeError::Client(err @ ClientError::GaveUp { .. })) => {
            report.problem(
                "gave_up",
                &format!("error: {err}"),
                serde_json::json!({"identifier": args.identifier}),
            );
            Ok(EXIT_GAVE_UP)
        }
        Err(err) => {
            report.problem(
                "error",
                &format!("error: {err}"),
                serde_json::json!({"identifier": args.identifier}),
            );
            Ok(EXIT_FAILURE)
        }
    }
}
