//! Every store error crosses the HTTP API and comes back as the same error, details included:
//! the reconciler's lease and flag writes rely on a `Conflict` from a remote store being the
//! conflict the server's store raised.

use std::sync::{Arc, Mutex};

use crate::support::TestServer;
use async_trait::async_trait;
use bootsync::store::memory::MemoryStore;
use bootsync::store::{
    Batch, DynStore, Entry, Error, Key, Limits, Listing, NamespaceTree, Revision, Store, Watch,
    WatchFilter,
};

/// A real store whose next write to `prod`, or watch from [`PLANTED_FROM`], fails with the
/// error the test planted. The server's own readers and writers (cfgsync) are left alone.
struct Planted {
    inner: MemoryStore,
    next: Mutex<Option<Error>>,
}

impl Planted {
    fn take_if(&self, ours: bool) -> Option<Error> {
        if ours {
            self.next.lock().unwrap().take()
        } else {
            None
        }
    }
}

#[async_trait]
impl Store for Planted {
    fn backend(&self) -> &'static str {
        "memory"
    }
    async fn revision(&self) -> Result<Revision, Error> {
        self.inner.revision().await
    }
    async fn get(&self, key: &Key) -> Result<Option<Entry>, Error> {
        self.inner.get(key).await
    }
    async fn list(&self, namespace: &str, kind: &str) -> Result<Listing, Error> {
        self.inner.list(namespace, kind).await
    }
    async fn namespace(&self, namespace: &str) -> Result<NamespaceTree, Error> {
        self.inner.namespace(namespace).await
    }
    async fn namespaces(&self) -> Result<Vec<String>, Error> {
        self.inner.namespaces().await
    }
    async fn apply(&self, batch: Batch) -> Result<Revision, Error> {
        let ours = batch.ops.iter().any(|op| op.key().namespace == "prod");
        match self.take_if(ours) {
            Some(err) => Err(err),
            None => self.inner.apply(batch).await,
        }
    }
    async fn watch(&self, from: Revision, filter: WatchFilter) -> Result<Watch, Error> {
        match self.take_if(from == PLANTED_FROM) {
            Some(err) => Err(err),
            None => self.inner.watch(from, filter).await,
        }
    }
}

/// The revision the test's watches start from.
const PLANTED_FROM: Revision = 4242;

fn key() -> Key {
    Key::new("prod", "flows", "main")
}

/// Each variant a client can act on, with every field set to something recognisable.
fn variants() -> Vec<Error> {
    vec![
        Error::Invalid {
            what: "batch".into(),
            reason: "two operations on prod/flows/main".into(),
        },
        Error::TooLarge {
            key: key(),
            size: 70_000,
            limit: 65_536,
        },
        Error::Conflict {
            key: Key::new("__system__", "lease", "reconciler"),
            reason: "expected mod revision 41, found 42".into(),
        },
        Error::Compacted {
            requested: 7,
            compacted: 1_000,
        },
        Error::Unavailable("etcd: no leader".into()),
    ]
}

async fn server() -> (TestServer, Arc<Planted>) {
    let planted = Arc::new(Planted {
        inner: MemoryStore::new(Limits::default()),
        next: Mutex::new(None),
    });
    let store: DynStore = planted.clone();
    (TestServer::on_store(store).await, planted)
}

#[it::test]
async fn every_store_error_comes_back_equal_from_a_write_and_from_a_watch() {
    let (server, planted) = server().await;
    let remote = server.remote_store();
    // Store errors are not `Clone`: each variant is made twice, once per path.
    for (original, again) in variants().into_iter().zip(variants()) {
        let expected = format!("{original:?}");
        *planted.next.lock().unwrap() = Some(original);
        let batch = Batch::new().put(key(), serde_json::json!(1));
        let err = remote.apply(batch).await.expect_err("the planted error");
        assert_eq!(format!("{err:?}"), expected, "through a write");
        *planted.next.lock().unwrap() = Some(again);
        let Err(err) = remote.watch(PLANTED_FROM, WatchFilter::All).await else {
            panic!("the planted error was not raised by the watch");
        };
        assert_eq!(format!("{err:?}"), expected, "through a watch");
    }
    // Nothing planted: the same write goes through, so the errors above were the store's.
    remote
        .apply(Batch::new().put(key(), serde_json::json!(1)))
        .await
        .unwrap();
    server.stop().await;
}

#[it::test]
async fn a_backend_fault_is_reported_without_its_detail() {
    let (server, planted) = server().await;
    *planted.next.lock().unwrap() = Some(Error::backend(
        "writing",
        "disk /var/lib/secret-path is full",
    ));
    let err = server
        .remote_store()
        .apply(Batch::new().put(key(), serde_json::json!(1)))
        .await
        .expect_err("the planted error");
    // The server logs the cause; the client learns only that the server failed.
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    let text = bootsync::telemetry::error_chain(&err);
    assert!(text.contains("internal"), "{text}");
    assert!(!text.contains("secret-path"), "{text}");
    server.stop().await;
}
