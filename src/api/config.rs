//! The bodies of the `/v1` config API: entries, types, namespaces, writes and the change
//! stream.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::{ChangeEvent, Entry, Key, Revision};

/// Longest a `/v1/changes` long-poll is held.
pub const MAX_CHANGES_WAIT: Duration = Duration::from_secs(60);

/// The answer of `GET /v1/config`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Namespaces {
    /// The store revision of the answer.
    pub revision: Revision,
    /// Every namespace (reserved ones only with the admin token).
    pub namespaces: Vec<String>,
}

/// The answer of `GET /v1/config/{ns}`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NamespaceBody {
    /// The namespace.
    pub namespace: String,
    /// The store revision of the answer.
    pub revision: Revision,
    /// type → key → entry.
    pub types: BTreeMap<String, BTreeMap<String, Entry>>,
}

/// The answer of `GET /v1/config/{ns}/{type}`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TypeBody {
    /// The namespace.
    pub namespace: String,
    /// The type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The store revision of the answer.
    pub revision: Revision,
    /// key → entry.
    pub entries: BTreeMap<String, Entry>,
}

/// One entry with its address, as `GET` answers it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EntryBody {
    /// Where it lives.
    #[serde(flatten)]
    pub key: Key,
    /// The value and its revisions.
    #[serde(flatten)]
    pub entry: Entry,
    /// The store revision at the time of the read.
    pub revision: Revision,
}

/// The answer to every write.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Written {
    /// The revision the write committed at.
    pub revision: Revision,
}

/// Query of `GET /v1/changes`.
#[derive(Debug, Default, Serialize, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ChangesQuery {
    /// Events after this revision.
    #[serde(default)]
    pub from: Revision,
    /// Seconds to hold the request when nothing is new (0 answers at once).
    #[serde(default)]
    pub timeout: u64,
    /// Full events including reserved namespaces (admin only).
    #[serde(default)]
    pub internal: bool,
}

/// One public change notification: which namespaces changed, by type.
#[derive(Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct PublicEvent {
    /// The batch's revision.
    pub revision: Revision,
    /// type → namespaces changed in it (reserved namespaces never appear).
    pub changes: BTreeMap<String, Vec<String>>,
}

impl PublicEvent {
    /// What a public watcher may know of `event`: types and namespaces, no values.
    pub fn from_event(event: &ChangeEvent) -> Self {
        let mut changes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for change in &event.changes {
            let namespaces = changes.entry(change.key.kind.clone()).or_default();
            if !namespaces.contains(&change.key.namespace) {
                namespaces.push(change.key.namespace.clone());
            }
        }
        Self {
            revision: event.revision,
            changes,
        }
    }
}

/// The answer of `GET /v1/changes`: the events, and the revision to ask from next.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChangesBody<E> {
    /// Ask `from` this revision next time.
    pub revision: Revision,
    /// Events after the requested revision, oldest first.
    pub events: Vec<E>,
}
