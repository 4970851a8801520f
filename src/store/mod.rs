//! The config store: namespace → type → key → JSON value, versioned by one global revision.
//!
//! Every backend implements [`Store`]; the semantics (atomic batches with preconditions,
//! revisions, a resumable change stream, reserved namespaces) are the same on all of them and
//! are pinned down by the conformance suite in `tests/store_conformance.rs`.

#[cfg(feature = "etcd")]
pub mod etcd;
mod hub;
pub mod memory;
mod names;
mod resume;
pub mod sqlite;

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use hub::ChangeHub;
pub use names::{
    Limits, MAX_ID_LEN, MAX_KEY_LEN, is_reserved, validate_key, validate_namespace, validate_type,
};
pub use resume::{ResumableWatch, Resumed};

/// A global store revision. Each committed batch gets the next one; 0 means "nothing yet".
pub type Revision = u64;

/// The namespace holding reconciler state.
pub const SYSTEM_NAMESPACE: &str = "__system__";
/// The namespace holding factory-default seed config.
pub const TEMPLATE_NAMESPACE: &str = "__template__";
/// The namespace holding cfgsync's serving state.
pub const CFGSYNC_NAMESPACE: &str = "__cfgsync__";

/// The address of one entry.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct Key {
    /// Namespace id; reserved when it starts with `_`.
    pub namespace: String,
    /// Type within the namespace.
    #[serde(rename = "type")]
    pub kind: String,
    /// Key within the type.
    pub key: String,
}

impl Key {
    /// Builds a key from its three parts.
    pub fn new(
        namespace: impl Into<String>,
        kind: impl Into<String>,
        key: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            kind: kind.into(),
            key: key.into(),
        }
    }

    /// Checks all three parts against the naming rules.
    pub fn validate(&self) -> Result<(), Error> {
        validate_namespace(&self.namespace)?;
        validate_type(&self.kind)?;
        validate_key(&self.key)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.kind, self.key)
    }
}

/// A stored value with its revisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Entry {
    /// The JSON value.
    pub value: Value,
    /// Revision of the batch that created this entry.
    pub create_revision: Revision,
    /// Revision of the batch that last modified it.
    pub mod_revision: Revision,
}

/// One write in a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Op {
    /// Create or replace a value.
    Put {
        /// Where.
        #[serde(flatten)]
        key: Key,
        /// What.
        value: Value,
    },
    /// Remove a value (a no-op for an absent key, still part of the batch's revision).
    Delete {
        /// Where.
        #[serde(flatten)]
        key: Key,
    },
}

impl Op {
    /// The key this operation writes.
    pub fn key(&self) -> &Key {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// What a key must look like for a batch to commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Precondition {
    /// The key does not exist.
    Absent,
    /// The key exists and was last modified at exactly this revision.
    ModRevision(Revision),
}

/// A precondition on one key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// The key checked.
    #[serde(flatten)]
    pub key: Key,
    /// What it must look like.
    pub expect: Precondition,
}

/// An atomic group of writes, committed under one revision or not at all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// Preconditions, all of which must hold.
    #[serde(default)]
    pub checks: Vec<Check>,
    /// Writes, applied in order.
    #[serde(default)]
    pub ops: Vec<Op>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put.
    pub fn put(mut self, key: Key, value: Value) -> Self {
        self.ops.push(Op::Put { key, value });
        self
    }

    /// Adds a delete.
    pub fn delete(mut self, key: Key) -> Self {
        self.ops.push(Op::Delete { key });
        self
    }

    /// Adds a precondition.
    pub fn check(mut self, key: Key, expect: Precondition) -> Self {
        self.checks.push(Check { key, expect });
        self
    }

    /// Validates names, sizes and counts before anything is written; every backend calls this.
    pub fn validate(&self, limits: &Limits) -> Result<(), Error> {
        if self.ops.is_empty() {
            return Err(Error::Invalid {
                what: "batch".into(),
                reason: "a batch needs at least one operation".into(),
            });
        }
        let total = self.ops.len() + self.checks.len();
        if total > limits.max_batch_ops {
            return Err(Error::Invalid {
                what: "batch".into(),
                reason: format!(
                    "{total} operations and checks, over the limit of {}",
                    limits.max_batch_ops
                ),
            });
        }
        for check in &self.checks {
            check.key.validate()?;
        }
        for op in &self.ops {
            op.key().validate()?;
            if let Op::Put { key, value } = op {
                let size = encoded_len(value);
                if size > limits.max_value_bytes {
                    return Err(Error::TooLarge {
                        key: key.clone(),
                        size,
                        limit: limits.max_value_bytes,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Length of a value's compact JSON encoding, without allocating the string.
pub fn encoded_len(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a `Value` into an infallible sink cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// The entries of one type, read at one revision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Listing {
    /// The store revision the read saw.
    pub revision: Revision,
    /// key → entry, sorted by key.
    pub entries: BTreeMap<String, Entry>,
}

/// A whole namespace, read at one revision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NamespaceTree {
    /// The store revision the read saw.
    pub revision: Revision,
    /// type → key → entry.
    pub types: BTreeMap<String, BTreeMap<String, Entry>>,
}

impl NamespaceTree {
    /// The tree without revisions, as `{type: {key: value}}`.
    pub fn values(&self) -> BTreeMap<String, BTreeMap<String, Value>> {
        self.types
            .iter()
            .map(|(t, keys)| {
                let keys = keys
                    .iter()
                    .map(|(k, e)| (k.clone(), e.value.clone()))
                    .collect();
                (t.clone(), keys)
            })
            .collect()
    }
}

/// One changed key within a committed batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Change {
    /// The key written.
    #[serde(flatten)]
    pub key: Key,
    /// The new value; `None` for a delete.
    pub value: Option<Value>,
}

/// Everything one committed batch changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChangeEvent {
    /// The batch's revision.
    pub revision: Revision,
    /// The keys it changed, in batch order.
    pub changes: Vec<Change>,
}

/// Which changes a watcher wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum WatchFilter {
    /// Every change, reserved namespaces included (internal watchers).
    #[default]
    All,
    /// Changes outside reserved namespaces only (the public change stream).
    Public,
    /// Changes in one namespace.
    Namespace(String),
}

impl WatchFilter {
    /// Whether a change passes the filter.
    pub fn admits(&self, key: &Key) -> bool {
        match self {
            WatchFilter::All => true,
            WatchFilter::Public => !is_reserved(&key.namespace),
            WatchFilter::Namespace(ns) => &key.namespace == ns,
        }
    }

    /// The event with only the admitted changes, or `None` when nothing is left.
    pub fn apply(&self, event: &ChangeEvent) -> Option<ChangeEvent> {
        let changes: Vec<Change> = event
            .changes
            .iter()
            .filter(|c| self.admits(&c.key))
            .cloned()
            .collect();
        (!changes.is_empty()).then(|| ChangeEvent {
            revision: event.revision,
            changes,
        })
    }
}

/// An ordered stream of change events after a revision.
pub struct Watch {
    inner: Pin<Box<dyn Stream<Item = Result<ChangeEvent, Error>> + Send>>,
}

impl Watch {
    /// Wraps a backend's stream.
    pub fn new(stream: impl Stream<Item = Result<ChangeEvent, Error>> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(stream),
        }
    }

    /// The next event; `None` when the store closed the stream.
    pub async fn next(&mut self) -> Option<Result<ChangeEvent, Error>> {
        self.inner.next().await
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Watch")
    }
}

/// A boxed error from a backend's own library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong at the store boundary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name, batch or value breaks the rules; nothing was written.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was invalid (`namespace`, `key`, `batch`, ...).
        what: String,
        /// Why.
        reason: String,
    },
    /// A value is over the configured size limit; nothing was written.
    #[error("value for {key} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// The key whose value is too large.
        key: Key,
        /// Its encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A precondition did not hold; nothing was written.
    #[error("precondition failed on {key}: {reason}")]
    Conflict {
        /// The first key whose precondition failed.
        key: Key,
        /// What was expected and what was found.
        reason: String,
    },
    /// The history a watcher asked for is gone; it must re-read and watch from the present.
    #[error(
        "history up to revision {compacted} was compacted; watch from {requested} is not possible"
    )]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The newest revision whose history is gone.
        compacted: Revision,
    },
    /// The backend cannot be reached right now; the caller may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A store URL that names no backend or a bad location.
    #[error("bad store url {url:?}: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// Why it is wrong.
        reason: String,
    },
    /// The backend failed in a way the caller cannot fix.
    #[error("store backend failed while {context}")]
    Backend {
        /// What the store was doing.
        context: &'static str,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Wraps a backend error with what the store was doing.
    pub fn backend(context: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            context,
            source: source.into(),
        }
    }
}

/// The operations every backend provides.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The backend's name (`memory`, `sqlite`, `etcd`, `http`).
    fn backend(&self) -> &'static str;

    /// The newest committed revision.
    async fn revision(&self) -> Result<Revision, Error>;

    /// One entry, or `None` when absent.
    async fn get(&self, key: &Key) -> Result<Option<Entry>, Error>;

    /// Every entry of one type.
    async fn list(&self, namespace: &str, kind: &str) -> Result<Listing, Error>;

    /// The whole namespace as `{type: {key: entry}}`.
    async fn namespace(&self, namespace: &str) -> Result<NamespaceTree, Error>;

    /// Every namespace holding at least one entry, sorted.
    async fn namespaces(&self) -> Result<Vec<String>, Error>;

    /// Commits a batch atomically under one new revision, after checking its preconditions.
    /// Returns the revision; a failed precondition is [`Error::Conflict`] and changes nothing.
    async fn apply(&self, batch: Batch) -> Result<Revision, Error>;

    /// Changes with a revision greater than `from`, in order, then live ones.
    async fn watch(&self, from: Revision, filter: WatchFilter) -> Result<Watch, Error>;

    /// Flushes and releases the backend; later calls may fail.
    async fn close(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// Convenience reads and writes built on [`Store`].
#[async_trait]
pub trait StoreExt: Store {
    /// Puts one value unconditionally.
    async fn put(&self, key: Key, value: Value) -> Result<Revision, Error> {
        self.apply(Batch::new().put(key, value)).await
    }

    /// Deletes one key unconditionally.
    async fn delete(&self, key: Key) -> Result<Revision, Error> {
        self.apply(Batch::new().delete(key)).await
    }

    /// The keys of one type, sorted.
    async fn keys(&self, namespace: &str, kind: &str) -> Result<Vec<String>, Error> {
        Ok(self
            .list(namespace, kind)
            .await?
            .entries
            .into_keys()
            .collect())
    }

    /// The values of one type, keyed.
    async fn values(&self, namespace: &str, kind: &str) -> Result<BTreeMap<String, Value>, Error> {
        let listing = self.list(namespace, kind).await?;
        Ok(listing
            .entries
            .into_iter()
            .map(|(k, e)| (k, e.value))
            .collect())
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

/// A shared handle to any backend.
pub type DynStore = Arc<dyn Store>;

/// Opens a store from a URL: `memory:`, `sqlite:PATH`, `etcd:http://h1:2379,http://h2:2379`.
pub async fn open(url: &str, limits: Limits) -> Result<DynStore, Error> {
    let (scheme, rest) = url.split_once(':').ok_or_else(|| Error::BadUrl {
        url: url.to_string(),
        reason: "expected SCHEME:LOCATION, e.g. sqlite:./bootsync-data/store.db or memory:".into(),
    })?;
    match scheme {
        "memory" => Ok(Arc::new(memory::MemoryStore::new(limits))),
        "sqlite" => {
            if rest.is_empty() {
                return Err(Error::BadUrl {
                    url: url.to_string(),
                    reason: "sqlite needs a file path, e.g. sqlite:./bootsync-data/store.db".into(),
                });
            }
            let path = rest.to_string();
            let options = sqlite::SqliteOptions {
                limits,
                ..Default::default()
            };
            let store =
                tokio::task::spawn_blocking(move || sqlite::SqliteStore::open(path, options))
                    .await
                    .map_err(|err| Error::backend("opening the sqlite store", err))??;
            Ok(Arc::new(store))
        }
        #[cfg(feature = "etcd")]
        "etcd" => Ok(Arc::new(etcd::EtcdStore::open(url, limits).await?)),
        #[cfg(not(feature = "etcd"))]
        "etcd" => Err(Error::BadUrl {
            url: url.to_string(),
            reason: "this bootsync was built without etcd support (cargo feature `etcd`)".into(),
        }),
        other => Err(Error::BadUrl {
            url: url.to_string(),
            reason: format!("unknown backend {other:?}; known: memory, sqlite, etcd"),
        }),
    }
}
