//! The store conformance suite on every backend, plus SQLite's durability across reopen.

use crate::support;

use std::sync::Arc;

use bootsync::store::memory::MemoryStore;
use bootsync::store::sqlite::{SqliteOptions, SqliteStore};
use bootsync::store::{DynStore, Error, Key, Limits, Store, StoreExt, WatchFilter};
use serde_json::json;

async fn memory_store() -> DynStore {
    Arc::new(MemoryStore::new(Limits::default()))
}

async fn sqlite_store() -> DynStore {
    // The directory must outlive the store: leak it for the test process's lifetime.
    let dir = tempfile::tempdir().unwrap().keep();
    Arc::new(SqliteStore::open(dir.join("store.db"), SqliteOptions::default()).unwrap())
}

/// The store trait spoken over the real HTTP API, against a server on a memory store.
async fn remote_store() -> DynStore {
    use bootsync::client::{ApiClient, RemoteStore};
    use bootsync::server::{self, AppState, ServerOptions};
    let state = AppState::new(
        memory_store().await,
        ServerOptions::default(),
        Arc::new(bootsync::metrics::Metrics::new()),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // The server lives as long as the test's runtime: the handle is not kept.
    let running = server::spawn(state, listener, None, Default::default()).unwrap();
    let client = ApiClient::new(running.url());
    Arc::new(RemoteStore::new(client).with_poll(std::time::Duration::from_secs(5)))
}

/// A store on its own single-member etcd, which lives exactly as long as the store.
#[cfg(feature = "etcd")]
struct EtcdBacked {
    store: bootsync::store::etcd::EtcdStore,
    _cluster: support::etcd::EtcdCluster,
}

#[cfg(feature = "etcd")]
#[async_trait::async_trait]
impl Store for EtcdBacked {
    fn backend(&self) -> &'static str {
        self.store.backend()
    }
    async fn revision(&self) -> Result<u64, Error> {
        self.store.revision().await
    }
    async fn get(&self, key: &Key) -> Result<Option<bootsync::store::Entry>, Error> {
        self.store.get(key).await
    }
    async fn list(&self, ns: &str, kind: &str) -> Result<bootsync::store::Listing, Error> {
        self.store.list(ns, kind).await
    }
    async fn namespace(&self, ns: &str) -> Result<bootsync::store::NamespaceTree, Error> {
        self.store.namespace(ns).await
    }
    async fn namespaces(&self) -> Result<Vec<String>, Error> {
        self.store.namespaces().await
    }
    async fn apply(&self, batch: bootsync::store::Batch) -> Result<u64, Error> {
        self.store.apply(batch).await
    }
    async fn watch(&self, from: u64, filter: WatchFilter) -> Result<bootsync::store::Watch, Error> {
        self.store.watch(from, filter).await
    }
}

#[cfg(feature = "etcd")]
async fn etcd_store() -> DynStore {
    let cluster = tokio::task::spawn_blocking(|| support::etcd::EtcdCluster::start(1))
        .await
        .unwrap();
    let store = bootsync::store::etcd::EtcdStore::open(
        &cluster.store_url("conformance"),
        Limits::default(),
    )
    .await
    .unwrap();
    Arc::new(EtcdBacked {
        store,
        _cluster: cluster,
    })
}

crate::conformance!(memory, memory_store());
#[cfg(feature = "etcd")]
crate::conformance!(etcd, etcd_store(), needs = etcd);
crate::conformance!(remote, remote_store());
crate::conformance!(sqlite, sqlite_store());

#[it::test]
async fn sqlite_reopen_keeps_every_acknowledged_write_and_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let mut revs = Vec::new();
    for i in 0..20 {
        revs.push(
            store
                .put(Key::new("prod", "cfg", format!("k{i}")), json!(i))
                .await
                .unwrap(),
        );
    }
    store.close().await.unwrap();
    drop(store);

    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(store.revision().await.unwrap(), *revs.last().unwrap());
    for (i, rev) in revs.iter().enumerate() {
        let entry = store
            .get(&Key::new("prod", "cfg", format!("k{i}")))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((entry.value, entry.mod_revision), (json!(i), *rev));
    }
    let next = store
        .put(Key::new("prod", "cfg", "after"), json!(true))
        .await
        .unwrap();
    assert_eq!(
        next,
        revs.last().unwrap() + 1,
        "revisions continue after a reopen"
    );
    let mut watch = store.watch(revs[9], WatchFilter::All).await.unwrap();
    let event = watch.next().await.unwrap().unwrap();
    assert_eq!(event.revision, revs[10], "history survives a reopen");
}

#[it::test]
async fn sqlite_watch_before_the_retained_history_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        history: 5,
        ..Default::default()
    };
    let store = SqliteStore::open(dir.path().join("store.db"), options.clone()).unwrap();
    for i in 0..20 {
        store
            .put(Key::new("prod", "cfg", "k"), json!(i))
            .await
            .unwrap();
    }
    let err = store
        .watch(1, WatchFilter::All)
        .await
        .expect_err("history was pruned");
    assert!(matches!(err, Error::Compacted { .. }), "{err:?}");
    assert!(
        store.watch(18, WatchFilter::All).await.is_ok(),
        "recent history is kept"
    );
    store.close().await.unwrap();
    drop(store);
    let reopened = SqliteStore::open(dir.path().join("store.db"), options).unwrap();
    assert!(matches!(
        reopened.watch(1, WatchFilter::All).await,
        Err(Error::Compacted { .. })
    ));
    assert!(reopened.watch(18, WatchFilter::All).await.is_ok());
}

#[it::test]
async fn a_bad_sqlite_location_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let err = bootsync::store::open(
        &format!("sqlite:{}/sub/store.db", file.display()),
        Limits::default(),
    )
    .await
    .map(|_| ())
    .expect_err("a path under a regular file cannot be opened");
    assert!(err.to_string().contains("plain-file"), "{err}");
}

#[it::test]
async fn a_second_opener_of_one_sqlite_file_is_refused_while_the_first_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let first = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let err = SqliteStore::open(&path, SqliteOptions::default()).expect_err("one process per file");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    first.close().await.unwrap();
    drop(first);
    assert!(
        SqliteStore::open(&path, SqliteOptions::default()).is_ok(),
        "the lock goes with the store"
    );
}
