//! The node side in one call: register, wait, fetch and write files — from code, or from the
//! seed's `CFG_*` environment variables.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::client::{CfgsyncClient, ClientError, Progress};
use super::output::{ArtifactOutputMap, OutputError};
use super::{NodeArtifactsPayload, NodeRegistration};

/// Why the node side failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Talking to the server failed or timed out.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The payload could not be written (nothing was).
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The environment does not describe a node.
    #[error("environment: {0}")]
    Env(String),
}

/// How long the helpers wait by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// What a successful run wrote.
#[derive(Debug, Clone)]
pub struct Written {
    /// The payload received.
    pub payload: NodeArtifactsPayload,
    /// The local files written.
    pub files: Vec<PathBuf>,
}

/// Registers, waits up to `timeout`, fetches and writes the files.
pub async fn register_and_fetch_artifacts(
    client: &CfgsyncClient,
    registration: &NodeRegistration,
    outputs: &ArtifactOutputMap,
    timeout: Duration,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<Written, NodeError> {
    let payload = client
        .register_and_wait(registration, timeout, false, progress)
        .await?;
    let files = outputs.write_all(&payload.files)?;
    Ok(Written { payload, files })
}

/// The seed's convenience: a client for `server`, default timeout, quiet.
pub async fn fetch_and_write_artifacts(
    registration: &NodeRegistration,
    server: &str,
    outputs: &ArtifactOutputMap,
) -> Result<Written, NodeError> {
    let client = CfgsyncClient::new(server);
    register_and_fetch_artifacts(&client, registration, outputs, DEFAULT_TIMEOUT, &|_| {}).await
}

/// Runs the node side from the seed's variables: `CFG_SERVER_ADDR`, `CFG_HOST_IDENTIFIER`,
/// `CFG_HOST_IP`, `CFG_REGISTRATION_METADATA_JSON`, `CFG_FILE_PATH` (routes `/config.yaml`),
/// `CFG_DEPLOYMENT_PATH` (routes `deployment-settings.yaml`).
pub async fn run_cfgsync_client_from_env() -> Result<Written, NodeError> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let server = var("CFG_SERVER_ADDR")
        .ok_or_else(|| NodeError::Env("CFG_SERVER_ADDR is not set".into()))?;
    let identifier = var("CFG_HOST_IDENTIFIER")
        .ok_or_else(|| NodeError::Env("CFG_HOST_IDENTIFIER is not set".into()))?;
    let ip: IpAddr = var("CFG_HOST_IP")
        .ok_or_else(|| NodeError::Env("CFG_HOST_IP is not set".into()))?
        .parse()
        .map_err(|e| NodeError::Env(format!("CFG_HOST_IP is not an IP address: {e}")))?;
    let mut registration = NodeRegistration::new(identifier, ip);
    if let Some(json) = var("CFG_REGISTRATION_METADATA_JSON") {
        registration.metadata = serde_json::from_str(&json).map_err(|e| {
            NodeError::Env(format!("CFG_REGISTRATION_METADATA_JSON is not JSON: {e}"))
        })?;
    }
    let outputs = seed_routes(
        ArtifactOutputMap::new(),
        var("CFG_FILE_PATH"),
        var("CFG_DEPLOYMENT_PATH"),
    );
    let server = if server.contains("://") {
        server
    } else {
        format!("http://{server}")
    };
    fetch_and_write_artifacts(&registration, &server, &outputs).await
}

/// Adds the seed's two well-known routes when their variables are set.
pub fn seed_routes(
    mut outputs: ArtifactOutputMap,
    file: Option<String>,
    deployment: Option<String>,
) -> ArtifactOutputMap {
    if let Some(path) = file {
        outputs = outputs.route("/config.yaml", path);
    }
    if let Some(path) = deployment {
        outputs = outputs.route("deployment-settings.yaml", path);
    }
    outputs
}
