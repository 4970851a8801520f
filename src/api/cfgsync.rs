//! The cfgsync protocol's bodies, compatible with the seed's clients and servers.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The payload schema version this server speaks.
pub const SCHEMA_VERSION: u32 = 1;

/// Longest identifier, in bytes (a DNS name's length).
pub const MAX_IDENTIFIER_LEN: usize = 253;
/// Largest metadata, as compact JSON bytes.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// A node's registration, the body of both `POST /register` and `POST /node`.
///
/// Unknown fields are ignored, as the seed's server does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRegistration {
    /// Stable node identifier.
    pub identifier: String,
    /// The node's address (IPv4 as in the seed; IPv6 is an addition).
    #[schema(value_type = String, example = "10.0.0.7")]
    pub ip: IpAddr,
    /// Opaque application metadata; `null` or absent means none.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    #[schema(value_type = Object)]
    pub metadata: Value,
}

impl NodeRegistration {
    /// A registration without metadata.
    pub fn new(identifier: impl Into<String>, ip: IpAddr) -> Self {
        Self {
            identifier: identifier.into(),
            ip,
            metadata: Value::Null,
        }
    }

    /// Attaches typed metadata.
    pub fn with_metadata<T: Serialize>(mut self, metadata: &T) -> Result<Self, serde_json::Error> {
        self.metadata = serde_json::to_value(metadata)?;
        Ok(self)
    }

    /// Reads the metadata back as a typed value.
    pub fn metadata_as<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<Option<T>, serde_json::Error> {
        if self.metadata.is_null() {
            return Ok(None);
        }
        serde_json::from_value(self.metadata.clone()).map(Some)
    }
}

/// Query of `POST /node`: unknown parameters are ignored, as the seed's server does.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NodeQuery {
    /// Seconds to hold the request until the payload is ready (an addition).
    pub wait: Option<u64>,
    /// Only a payload of a newer epoch than this: the request is held (up to `wait`) until
    /// there is one, and answers 204 if none came (an addition, for `client --watch`).
    pub after: Option<u64>,
}

/// One registered node, as `GET /v1/nodes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeInfo {
    /// Its identifier.
    pub identifier: String,
    /// The IP it registered with.
    pub ip: String,
    /// Its `index` in the current epoch's member list (`None` before the set is ready, or for a
    /// node a named set does not serve).
    pub index: Option<usize>,
    /// First registration, Unix ms.
    pub first_seen_ms: u64,
    /// Latest registration, Unix ms.
    pub last_seen_ms: u64,
    /// The newest epoch any server on this store handed it (a report counts as fetched).
    pub fetched_epoch: Option<u64>,
    /// Whether it has fetched the current epoch.
    pub current: bool,
    /// The node it replaced, if it was placed by `nodes replace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    /// The epoch it is served now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_epoch: Option<u64>,
    /// The version (policy or bundle revision) it is served now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_version: Option<u64>,
    /// Its latest applied-state report (watching clients report every apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<crate::api::rollout::Report>,
    /// In one word: `applied` (reported ok on what it is served), `failed`, `applying`
    /// (reported an older epoch), `not_reporting` (served, never reported: a seed or one-shot
    /// client), `waiting` (nothing served yet).
    pub state: NodeState,
}

/// Where a node stands, from its reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// It reported ok on the epoch it is served.
    Applied,
    /// Its latest report is a failure.
    Failed,
    /// It reported an older epoch than it is served.
    Applying,
    /// Served, but it never reported (seed and one-shot clients do not).
    NotReporting,
    /// Nothing is served to it yet.
    Waiting,
}

impl NodeState {
    /// Its name as the CLI shows it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Failed => "failed",
            Self::Applying => "applying",
            Self::NotReporting => "served, not reporting",
            Self::Waiting => "waiting",
        }
    }
}

/// The body of `GET /v1/nodes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodesBody {
    /// The store revision the view reflects.
    pub revision: u64,
    /// The current epoch, once the set is ready.
    pub epoch: Option<u64>,
    /// Every registered node, in member order.
    pub nodes: Vec<NodeInfo>,
    /// Identifiers an operator removed that have not registered again.
    pub removed: Vec<String>,
}

/// The body of `POST /v1/nodes/{id}/replace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplaceRequest {
    /// The new node's identifier.
    pub identifier: String,
    /// The new node's IP (default: the old node's), so peers learn it in the same epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub ip: Option<IpAddr>,
}

/// One delivered file.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema,
)]
pub struct ArtifactFile {
    /// Where the node should put it (routed by the client's output map).
    pub path: String,
    /// Its text.
    pub content: String,
}

impl ArtifactFile {
    /// A file from a path and its content.
    pub fn new(path: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            content: content.into(),
        }
    }
}

/// The `200` body of `POST /node`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeArtifactsPayload {
    /// Always [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The node's files, shared files included.
    pub files: Vec<ArtifactFile>,
    /// Addition: the store revision this payload was materialised at (old clients ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Addition: the version (policy or bundle revision) it was rendered from; a watching
    /// client reports it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

impl NodeArtifactsPayload {
    /// A payload of the current schema version.
    pub fn new(files: Vec<ArtifactFile>) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            files,
            epoch: None,
            version: None,
        }
    }
}

/// Checks an identifier: non-empty, bounded, no control characters or path separators.
pub fn check_identifier(identifier: &str) -> Result<(), String> {
    if identifier.is_empty() {
        return Err("identifier must not be empty".into());
    }
    if identifier.len() > MAX_IDENTIFIER_LEN {
        return Err(format!(
            "identifier is {} bytes, over the limit of {MAX_IDENTIFIER_LEN}",
            identifier.len()
        ));
    }
    if identifier
        .chars()
        .any(|c| c.is_control() || c == '/' || c == '\\')
    {
        return Err(format!(
            "identifier {identifier:?} contains a control character or a path separator"
        ));
    }
    Ok(())
}

/// The `202` body: an addition old clients ignore.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Registered {
    /// The identifier registered.
    pub identifier: String,
    /// Strict mode only: the secret later calls must present (shown once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_secret: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_numbers_survive_a_store_round_trip_exactly() {
        // Found by the node_body fuzzer: without exact float parsing, a long decimal read,
        // written and read again came back as a different number.
        let body = br#"{"identifier":"node-1","ip":"fe80::1","metadata":{"n":[11111111111111111,111111111111111111111111111111111111111111111,2]}}"#;
        let first: NodeRegistration = serde_json::from_slice(body).unwrap();
        let stored = serde_json::to_vec(&first).unwrap();
        let second: NodeRegistration = serde_json::from_slice(&stored).unwrap();
        assert_eq!(first, second);
    }
}
