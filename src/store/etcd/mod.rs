//! The distributed backend on etcd v3: batches as transactions, the change stream from native
//! watch, etcd's global revision as the store's revision.
//!
//! Entries live at `<prefix>e/<namespace>/<type>/<key>`; namespace and type ids cannot contain
//! `/`, so the first two separators split them unambiguously and keys may contain `/`.
//!
//! The gRPC calls go through tonic, over stubs generated from `rpc.proto` beside this file and
//! committed (`tests/etcd_stubs.rs` keeps them current), so the build needs no `protoc`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use async_trait::async_trait;

use crate::backoff::Backoff;
use futures_util::{StreamExt, stream};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

use super::memory::check_precondition;
use super::{
    Batch, Change, ChangeEvent, Entry, Error, Key, Limits, Listing, NamespaceTree, Op,
    Precondition, Revision, Store, Watch, WatchFilter, validate_namespace, validate_type,
};

/// The generated etcd messages and clients.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
mod pb {
    include!("etcdserverpb.rs");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::watch_client::WatchClient;
use pb::{
    Compare, DeleteRangeRequest, KeyValue, PutRequest, RangeRequest, RequestOp, TxnRequest,
    WatchCreateRequest, WatchRequest, WatchResponse,
};

/// Key prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "/bootsync/";
/// Entries read per range request (keeps each answer under gRPC's message limit).
const PAGE: i64 = 1000;
/// Attempts of one operation across members before reporting the store unavailable; with the
/// doubling pause (50 ms → 1.6 s) this rides out a leader election.
const ATTEMPTS: usize = 6;
/// Largest answer accepted from etcd (a page of 1 000 entries of up to 1 MiB stays far below).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// A store on an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    /// Balanced over every endpoint: a dead member is skipped once its connection fails.
    channel: Channel,
    prefix: String,
    limits: Limits,
}

debug_fields!(EtcdStore { prefix });

/// Whether an etcd error means "try again, perhaps on another member". A connection that
/// fails reaches us as `Unavailable` or `Unknown`.
fn transient(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Cancelled | Code::Unknown | Code::DeadlineExceeded | Code::Unavailable
    )
}

fn map_err(context: &'static str, status: tonic::Status) -> Error {
    if transient(&status) {
        return Error::Unavailable(format!(
            "etcd did not answer while {context}: {}",
            status.message()
        ));
    }
    if status
        .message()
        .contains("too many operations in txn request")
    {
        return Error::Invalid {
            what: "batch".into(),
            reason:
                "etcd refused the batch as too large; raise etcd's --max-txn-ops to at least 1024"
                    .into(),
        };
    }
    Error::backend(context, status)
}

/// A range request over `[key, range_end)`.
fn range_request(key: Vec<u8>, range_end: Vec<u8>) -> RangeRequest {
    RangeRequest {
        key,
        range_end,
        ..RangeRequest::default()
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (e.g. `http://127.0.0.1:2379`), keeping every key under `prefix`.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        limits: Limits,
    ) -> Result<Self, Error> {
        let bad = |endpoint: &str, err: &dyn std::fmt::Display| Error::BadUrl {
            url: endpoints.join(","),
            reason: format!("endpoint {endpoint:?}: {err}"),
        };
        let mut list = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let parsed = Endpoint::from_shared(endpoint.clone())
                .map_err(|e| bad(endpoint, &e))?
                .connect_timeout(Duration::from_secs(3))
                .timeout(Duration::from_secs(5))
                .tcp_nodelay(true);
            list.push(parsed);
        }
        // The balanced channel connects lazily; one read proves the cluster answers, so a
        // wrong address fails here rather than at the first request. A read that reached a
        // dead member, or came during an election, is tried again for up to 5 s (the balancer
        // drops a member whose connection failed): a server starts while one member of its
        // cluster is down.
        let channel = Channel::balance_list(list.into_iter());
        let mut last = String::new();
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        for attempt in 0.. {
            if attempt > 0 {
                if tokio::time::Instant::now() >= until {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let probe = KvClient::new(channel.clone())
                .range(RangeRequest {
                    key: b"\0".to_vec(),
                    count_only: true,
                    ..RangeRequest::default()
                })
                .await;
            match probe {
                Ok(_) => {
                    last.clear();
                    break;
                }
                Err(status) => last = status.message().to_string(),
            }
        }
        if !last.is_empty() {
            return Err(Error::Unavailable(format!(
                "cannot connect to etcd at {}: {last}",
                endpoints.join(","),
            )));
        }
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Self {
            channel,
            prefix,
            limits,
        })
    }

    /// Parses `etcd:http://h1:2379,http://h2:2379[?prefix=/p/]` and connects.
    pub async fn open(url: &str, limits: Limits) -> Result<Self, Error> {
        let bad = |reason: &str| Error::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("etcd:")
            .ok_or_else(|| bad("expected etcd:ENDPOINTS"))?;
        let (endpoints, query) = rest.split_once('?').unwrap_or((rest, ""));
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect();
        if endpoints.is_empty() {
            return Err(bad("no endpoints, e.g. etcd:http://127.0.0.1:2379"));
        }
        let mut prefix = DEFAULT_PREFIX.to_string();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("prefix", value)) if value.starts_with('/') => prefix = value.to_string(),
                _ => {
                    return Err(bad(&format!(
                        "unknown or invalid option {pair:?} (known: prefix=/path/)"
                    )));
                }
            }
        }
        Self::connect(&endpoints, &prefix, limits).await
    }

    fn entries_root(&self) -> String {
        format!("{}e/", self.prefix)
    }

    fn entry_key(&self, key: &Key) -> String {
        format!(
            "{}e/{}/{}/{}",
            self.prefix, key.namespace, key.kind, key.key
        )
    }

    fn parse_key(&self, raw: &[u8]) -> Option<Key> {
        let text = std::str::from_utf8(raw).ok()?;
        let rest = text.strip_prefix(&self.entries_root())?;
        let mut parts = rest.splitn(3, '/');
        Some(Key::new(parts.next()?, parts.next()?, parts.next()?))
    }

    fn entry(kv: &KeyValue) -> Result<Entry, Error> {
        Ok(Entry {
            value: serde_json::from_slice(&kv.value)
                .map_err(|e| Error::backend("decoding a stored value", e))?,
            create_revision: kv.create_revision as Revision,
            mod_revision: kv.mod_revision as Revision,
        })
    }

    fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// One range call, retried across members.
    async fn range_once(
        &self,
        context: &'static str,
        request: RangeRequest,
    ) -> Result<pb::RangeResponse, Error> {
        self.retry(context, move |mut kv| {
            let request = request.clone();
            async move { kv.range(request).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Runs an idempotent call, retrying transient failures (another member may answer).
    async fn retry<T, F, Fut>(&self, context: &'static str, mut call: F) -> Result<T, Error>
    where
        F: FnMut(KvClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut last = None;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        for _ in 0..ATTEMPTS {
            match call(self.kv()).await {
                Ok(value) => return Ok(value),
                Err(err) if transient(&err) => {
                    last = Some(err);
                    tokio::time::sleep(backoff.fail()).await;
                }
                Err(err) => return Err(map_err(context, err)),
            }
        }
        Err(map_err(context, last.expect("at least one attempt failed")))
    }

    /// Every key under `prefix` at one revision, page by page; returns the revision too.
    async fn range(&self, prefix: String) -> Result<(Revision, Vec<KeyValue>), Error> {
        let end = prefix_end(prefix.as_bytes());
        let mut out = Vec::new();
        let mut from = prefix.into_bytes();
        let mut at: Option<i64> = None;
        loop {
            let mut request = range_request(from.clone(), end.clone());
            request.limit = PAGE;
            request.revision = at.unwrap_or(0);
            let response = self.range_once("reading a range", request).await?;
            let revision = response.header.as_ref().map_or(0, |h| h.revision);
            let pinned = *at.get_or_insert(revision);
            let more = response.more;
            let last_key = response.kvs.last().map(|kv| kv.key.clone());
            out.extend(response.kvs);
            if !more {
                return Ok((pinned as Revision, out));
            }
            let Some(last) = last_key else {
                return Ok((pinned as Revision, out));
            };
            from = last;
            from.push(0);
        }
    }
}

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A batch may name a key twice; etcd refuses that in one transaction, so keep each key's
/// last operation, in the order of those last operations.
fn last_op_per_key(ops: Vec<Op>) -> Vec<Op> {
    let mut seen = BTreeSet::new();
    let mut kept: Vec<Op> = ops
        .into_iter()
        .rev()
        .filter(|op| seen.insert(op.key().clone()))
        .collect();
    kept.reverse();
    kept
}

#[async_trait]
impl Store for EtcdStore {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    async fn revision(&self) -> Result<Revision, Error> {
        let root = self.entries_root().into_bytes();
        let mut request = range_request(root.clone(), prefix_end(&root));
        request.count_only = true;
        let response = self.range_once("reading the revision", request).await?;
        Ok(response.header.map_or(0, |h| h.revision) as Revision)
    }

    async fn get(&self, key: &Key) -> Result<Option<Entry>, Error> {
        key.validate()?;
        let raw = self.entry_key(key).into_bytes();
        let response = self
            .range_once("reading a key", range_request(raw, Vec::new()))
            .await?;
        response.kvs.first().map(Self::entry).transpose()
    }

    async fn list(&self, namespace: &str, kind: &str) -> Result<Listing, Error> {
        validate_namespace(namespace)?;
        validate_type(kind)?;
        let (revision, kvs) = self
            .range(format!("{}e/{namespace}/{kind}/", self.prefix))
            .await?;
        let mut entries = BTreeMap::new();
        for kv in &kvs {
            if let Some(key) = self.parse_key(&kv.key) {
                entries.insert(key.key, Self::entry(kv)?);
            }
        }
        Ok(Listing { revision, entries })
    }

    async fn namespace(&self, namespace: &str) -> Result<NamespaceTree, Error> {
        validate_namespace(namespace)?;
        let (revision, kvs) = self.range(format!("{}e/{namespace}/", self.prefix)).await?;
        let mut types: BTreeMap<String, BTreeMap<String, Entry>> = BTreeMap::new();
        for kv in &kvs {
            if let Some(key) = self.parse_key(&kv.key) {
                types
                    .entry(key.kind)
                    .or_default()
                    .insert(key.key, Self::entry(kv)?);
            }
        }
        Ok(NamespaceTree { revision, types })
    }

    async fn namespaces(&self) -> Result<Vec<String>, Error> {
        let (_, kvs) = self.range(self.entries_root()).await?;
        let names: BTreeSet<String> = kvs
            .iter()
            .filter_map(|kv| self.parse_key(&kv.key))
            .map(|k| k.namespace)
            .collect();
        Ok(names.into_iter().collect())
    }

    async fn apply(&self, batch: Batch) -> Result<Revision, Error> {
        batch.validate(&self.limits)?;
        let compare: Vec<Compare> = batch
            .checks
            .iter()
            .map(|check| {
                let key = self.entry_key(&check.key).into_bytes();
                let (target, union) = match check.expect {
                    Precondition::Absent => (CompareTarget::Create, TargetUnion::CreateRevision(0)),
                    Precondition::ModRevision(r) => {
                        (CompareTarget::Mod, TargetUnion::ModRevision(r as i64))
                    }
                };
                Compare {
                    result: CompareResult::Equal as i32,
                    target: target as i32,
                    key,
                    target_union: Some(union),
                }
            })
            .collect();
        let mut success = Vec::new();
        for op in last_op_per_key(batch.ops) {
            let request = match op {
                Op::Put { key, value } => {
                    let value = serde_json::to_vec(&value)
                        .map_err(|e| Error::backend("encoding a value", e))?;
                    pb::request_op::Request::RequestPut(PutRequest {
                        key: self.entry_key(&key).into_bytes(),
                        value,
                        lease: 0,
                    })
                }
                Op::Delete { key } => {
                    pb::request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                        key: self.entry_key(&key).into_bytes(),
                        range_end: Vec::new(),
                    })
                }
            };
            success.push(RequestOp {
                request: Some(request),
            });
        }
        let txn = TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        };
        // A retried transaction that had in fact committed fails its preconditions the second
        // time and is reported as a conflict: never a silent double write of guarded keys.
        let response = self
            .retry("committing a batch", move |mut kv| {
                let txn = txn.clone();
                async move { kv.txn(txn).await.map(tonic::Response::into_inner) }
            })
            .await?;
        if response.succeeded {
            return Ok(response.header.map_or(0, |h| h.revision) as Revision);
        }
        for check in &batch.checks {
            let current = self.get(&check.key).await?.map(|e| e.mod_revision);
            check_precondition(&check.key, check.expect, current)?;
        }
        let first = batch
            .checks
            .first()
            .map(|c| c.key.clone())
            .expect("a failed txn had compares");
        Err(Error::Conflict {
            key: first,
            reason: "changed concurrently while the batch was checked".into(),
        })
    }

    async fn watch(&self, from: Revision, filter: WatchFilter) -> Result<Watch, Error> {
        let state = WatchState {
            store: self.clone(),
            filter,
            last: from,
            stream: None,
            pending: VecDeque::new(),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
            done: false,
        };
        let mut state = state;
        // Open the stream now so a compacted start or an unreachable cluster fails the call.
        state.open().await?;
        Ok(Watch::new(stream::unfold(state, WatchState::step)))
    }
}

struct WatchState {
    store: EtcdStore,
    filter: WatchFilter,
    /// The newest revision delivered (or skipped by the filter).
    last: Revision,
    stream: Option<tonic::Streaming<WatchResponse>>,
    pending: VecDeque<ChangeEvent>,
    /// Spaces the re-opens of a broken stream; 20 failures in a row end the watch.
    backoff: Backoff,
    done: bool,
}

impl WatchState {
    async fn open(&mut self) -> Result<(), Error> {
        let root = self.store.entries_root().into_bytes();
        let create = WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    range_end: prefix_end(&root),
                    key: root,
                    start_revision: self.last as i64 + 1,
                    ..WatchCreateRequest::default()
                },
            )),
        };
        // The request stream stays open (pending) for as long as the watch is wanted; dropping
        // the response stream cancels it.
        let requests = stream::iter([create]).chain(stream::pending());
        let mut stream = WatchClient::new(self.store.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .watch(requests)
            .await
            .map_err(|e| map_err("opening a watch", e))?
            .into_inner();
        // The first answer confirms the watch, or reports that the history is compacted.
        match stream.message().await {
            Ok(Some(response)) if response.compact_revision > 0 => {
                return Err(Error::Compacted {
                    requested: self.last,
                    compacted: response.compact_revision as Revision,
                });
            }
            Ok(Some(response)) => self.absorb(&response)?,
            Ok(None) => return Err(Error::Unavailable("etcd closed the watch at once".into())),
            Err(err) => return Err(map_err("opening a watch", err)),
        }
        self.stream = Some(stream);
        Ok(())
    }

    /// Groups a response's events by revision (one per committed transaction).
    fn absorb(&mut self, response: &WatchResponse) -> Result<(), Error> {
        for event in &response.events {
            let Some(kv) = &event.kv else { continue };
            let Some(key) = self.store.parse_key(&kv.key) else {
                continue;
            };
            let revision = kv.mod_revision as Revision;
            let value: Option<Value> = match event.r#type() {
                pb::event::EventType::Put => Some(
                    serde_json::from_slice(&kv.value)
                        .map_err(|e| Error::backend("decoding a watched value", e))?,
                ),
                pb::event::EventType::Delete => None,
            };
            let change = Change { key, value };
            match self.pending.back_mut() {
                Some(last) if last.revision == revision => last.changes.push(change),
                _ => self.pending.push_back(ChangeEvent {
                    revision,
                    changes: vec![change],
                }),
            }
        }
        Ok(())
    }

    async fn step(mut self) -> Option<(Result<ChangeEvent, Error>, Self)> {
        if self.done {
            return None;
        }
        loop {
            while let Some(event) = self.pending.pop_front() {
                if event.revision <= self.last {
                    continue;
                }
                self.last = event.revision;
                if let Some(event) = self.filter.apply(&event) {
                    return Some((Ok(event), self));
                }
            }
            let message = match self.stream.as_mut() {
                Some(stream) => stream.message().await,
                None => Ok(None),
            };
            match message {
                Ok(Some(response)) if response.compact_revision > 0 => {
                    self.done = true;
                    let compacted = response.compact_revision as Revision;
                    return Some((
                        Err(Error::Compacted {
                            requested: self.last,
                            compacted,
                        }),
                        self,
                    ));
                }
                Ok(Some(response)) => {
                    self.backoff.reset();
                    if let Err(err) = self.absorb(&response) {
                        self.done = true;
                        return Some((Err(err), self));
                    }
                }
                // A broken or closed stream resumes from the last revision seen.
                Ok(None) | Err(_) => {
                    self.stream = None;
                    let pause = self.backoff.fail();
                    if self.backoff.failures() > 20 {
                        self.done = true;
                        return Some((
                            Err(Error::Unavailable("the etcd watch keeps failing".into())),
                            self,
                        ));
                    }
                    tokio::time::sleep(pause).await;
                    match self.open().await {
                        Ok(()) => {}
                        Err(err @ Error::Compacted { .. }) => {
                            self.done = true;
                            return Some((Err(err), self));
                        }
                        Err(_) => continue,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
    }

    #[test]
    fn a_key_named_twice_keeps_its_last_operation() {
        let k = |s: &str| Key::new("n", "t", s);
        let ops = vec![
            Op::Put {
                key: k("a"),
                value: Value::from(1),
            },
            Op::Put {
                key: k("b"),
                value: Value::from(2),
            },
            Op::Delete { key: k("a") },
        ];
        let kept = last_op_per_key(ops);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].key(), &k("b"));
        assert!(matches!(&kept[1], Op::Delete { key } if key == &k("a")));
    }
}
