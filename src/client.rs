//! HTTP clients of the bootsync server: [`ApiClient`] for the `/v1` routes, and
//! [`RemoteStore`], the [`Store`] trait spoken over that API — so the reconciler runs the same
//! code in-process (`run`, through the real listener) and remote (`bootstrap --server`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::Token;
use crate::api::cfgsync::{NodesBody, ReplaceRequest};
use crate::api::config::{ChangesBody, EntryBody, NamespaceBody, Namespaces, TypeBody, Written};
use crate::api::rollout::{Command, PreviewBody, PreviewRequest, RolloutStatus, VersionKind};
use crate::api::status::HistoryBody;
use crate::api::{ErrorBody, ErrorCode};
use crate::servers::{Endpoint, Failover, Servers};
use crate::store::{
    self, Batch, ChangeEvent, Entry, Key, Listing, NamespaceTree, Revision, Store, Watch,
    WatchFilter,
};

/// Everything that can go wrong talking to a bootsync server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server could not be reached or the connection broke.
    #[error("cannot reach {url}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status and the JSON error shape.
    #[error("{url} answered {status}: {} ({})", body.message, body.code)]
    Status {
        /// The URL asked.
        url: String,
        /// The HTTP status.
        status: StatusCode,
        /// The error body: code, message and details.
        body: ErrorBody,
    },
    /// The server's answer did not decode.
    #[error("unexpected answer from {url}")]
    Decode {
        /// The URL asked.
        url: String,
        /// Why it did not decode.
        #[source]
        source: reqwest::Error,
    },
}

impl Error {
    /// Whether another server should be asked: the request never reached this one, or
    /// (`repeatable`, a request that says the same when sent twice) it got no answer or a 5xx
    /// other than 500 (an error the request would meet on every server of the store).
    pub fn fails_over(&self, repeatable: bool) -> bool {
        match self {
            Error::Unreachable { source, .. } => repeatable || source.is_connect(),
            Error::Status { status, .. } => {
                repeatable
                    && status.is_server_error()
                    && *status != StatusCode::INTERNAL_SERVER_ERROR
            }
            Error::Decode { .. } => false,
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of a bootsync server's `/v1` API, or of several sharing one store: it moves to
/// the next server when the one in use does not answer or answers 5xx. A request that may
/// not be sent twice (a batch, a rollout command) moves only when it never reached a server.
#[derive(Debug, Clone)]
pub struct ApiClient {
    failover: Arc<Failover>,
    admin_token: Option<Token>,
}

/// How long one ordinary API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl ApiClient {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:4400`).
    pub fn new(base: impl Into<String>) -> Self {
        let http = crate::tls::http_client(&[], reqwest::Client::builder())
            .expect("a client without extra roots always builds");
        Self::with_http_client(base, http)
    }

    /// A client of the server at `base` over an existing HTTP client (its TLS settings and
    /// pool), so one process can share one: each rustls client loads the system's roots.
    pub fn with_http_client(base: impl Into<String>, http: reqwest::Client) -> Self {
        Self::with_servers(Servers::one(base, http))
    }

    /// A client of these servers, preferred in the listed order.
    pub fn with_servers(servers: Servers) -> Self {
        Self {
            failover: Arc::new(Failover::new(servers)),
            admin_token: None,
        }
    }

    /// Trusts these CA certificates beside the system's (for a server with a private CA).
    pub fn with_ca_certs(mut self, certs: &[reqwest::Certificate]) -> Result<Self, reqwest::Error> {
        let servers = self.failover.servers().trusting(certs)?;
        self.failover = Arc::new(self.failover.rebuilt(servers));
        Ok(self)
    }

    /// Sends the admin token with every request.
    pub fn with_admin_token(mut self, token: Option<Token>) -> Self {
        self.admin_token = token;
        self
    }

    /// The base URL of the server in use.
    pub fn base_url(&self) -> String {
        let failover = &self.failover;
        failover.servers().get(failover.in_use()).target.url.clone()
    }

    /// The servers it may use.
    pub fn servers(&self) -> Servers {
        self.failover.servers()
    }

    /// Sends `method path` (with `body`, if any) to the server in use, moving on as the type
    /// comment says, and decodes a successful answer.
    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&dyn erased::Body>,
        timeout: Duration,
    ) -> Result<T, Error> {
        // A GET or a PUT says the same when sent twice; a POST may not, and a DELETE sent
        // again after it was done answers 404.
        let repeatable = method == Method::GET || method == Method::PUT;
        let ask = |endpoint: &Endpoint| {
            let url = format!("{}{path}", endpoint.target.url);
            let mut builder = endpoint.http.request(method.clone(), &url).timeout(timeout);
            if let Some(token) = &self.admin_token {
                builder = builder.bearer_auth(token.expose());
            }
            if let Some(body) = body {
                builder = body.attach(builder);
            }
            async move {
                let response = builder.send().await.map_err(|source| Error::Unreachable {
                    url: url.clone(),
                    source,
                })?;
                let status = response.status();
                if !status.is_success() {
                    let text = response.text().await.unwrap_or_default();
                    let body = ErrorBody::from_answer(status, &text);
                    return Err(Error::Status { url, status, body });
                }
                response
                    .json::<T>()
                    .await
                    .map_err(|source| Error::Decode { url, source })
            }
        };
        self.failover
            .call(ask, |err: &Error| err.fails_over(repeatable))
            .await
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.send(Method::GET, path, None, REQUEST_TIMEOUT).await
    }

    /// `GET /healthz`: whether the process answers.
    pub async fn healthz(&self) -> Result<(), Error> {
        self.get_json::<Value>("/healthz").await.map(|_| ())
    }

    /// One entry, or `None` when absent.
    pub async fn get(&self, key: &Key) -> Result<Option<EntryBody>, Error> {
        let path = entry_path(key);
        match self.get_json::<EntryBody>(&path).await {
            Ok(body) => Ok(Some(body)),
            Err(Error::Status { body, .. }) if body.code == ErrorCode::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Puts one value.
    pub async fn put(&self, key: &Key, value: &Value) -> Result<Revision, Error> {
        let path = entry_path(key);
        let written: Written = self
            .send(Method::PUT, &path, Some(&value), REQUEST_TIMEOUT)
            .await?;
        Ok(written.revision)
    }

    /// Deletes one value (404 when absent).
    pub async fn delete(&self, key: &Key) -> Result<Revision, Error> {
        let path = entry_path(key);
        let written: Written = self
            .send(Method::DELETE, &path, None, REQUEST_TIMEOUT)
            .await?;
        Ok(written.revision)
    }

    /// Every entry of a type.
    pub async fn list(&self, namespace: &str, kind: &str) -> Result<Listing, Error> {
        let path = format!("/v1/config/{}/{}", segment(namespace), segment(kind));
        let body: TypeBody = self.get_json(&path).await?;
        Ok(Listing {
            revision: body.revision,
            entries: body.entries,
        })
    }

    /// A whole namespace.
    pub async fn namespace(&self, namespace: &str) -> Result<NamespaceTree, Error> {
        let path = format!("/v1/config/{}", segment(namespace));
        let body: NamespaceBody = self.get_json(&path).await?;
        Ok(NamespaceTree {
            revision: body.revision,
            types: body.types,
        })
    }

    /// Every namespace (reserved ones only with the admin token) and the store revision.
    pub async fn namespaces(&self) -> Result<(Revision, Vec<String>), Error> {
        let body: Namespaces = self.get_json("/v1/config").await?;
        Ok((body.revision, body.namespaces))
    }

    /// Commits an atomic batch.
    pub async fn apply(&self, batch: &Batch) -> Result<Revision, Error> {
        let written: Written = self
            .send(Method::POST, "/v1/config", Some(batch), REQUEST_TIMEOUT)
            .await?;
        Ok(written.revision)
    }

    /// `GET /v1/status`.
    pub async fn status<T: DeserializeOwned>(&self) -> Result<T, Error> {
        self.get_json("/v1/status").await
    }

    /// `GET /v1/nodes`: every registered node.
    pub async fn nodes(&self) -> Result<NodesBody, Error> {
        self.get_json("/v1/nodes").await
    }

    /// `DELETE /v1/nodes/{id}`: removes a node.
    pub async fn remove_node(&self, identifier: &str) -> Result<Revision, Error> {
        let path = format!("/v1/nodes/{}", segment(identifier));
        let written: Written = self
            .send(Method::DELETE, &path, None, REQUEST_TIMEOUT)
            .await?;
        Ok(written.revision)
    }

    /// `POST /v1/nodes/{old}/replace`: `new` takes `old`'s place.
    pub async fn replace_node(
        &self,
        old: &str,
        new: &str,
        ip: Option<std::net::IpAddr>,
    ) -> Result<Revision, Error> {
        let path = format!("/v1/nodes/{}/replace", segment(old));
        let request = ReplaceRequest {
            identifier: new.to_string(),
            ip,
        };
        let written: Written = self
            .send(Method::POST, &path, Some(&request), REQUEST_TIMEOUT)
            .await?;
        Ok(written.revision)
    }

    /// `GET /v1/rollout`: the rollout under way, or the last one.
    pub async fn rollout(&self) -> Result<RolloutStatus, Error> {
        self.get_json("/v1/rollout").await
    }

    /// `POST /v1/rollout/{command}`: pause, resume, promote or roll back.
    pub async fn rollout_command(&self, command: Command) -> Result<RolloutStatus, Error> {
        let path = format!("/v1/rollout/{}", command.name());
        self.send(Method::POST, &path, None, REQUEST_TIMEOUT).await
    }

    /// `PUT /v1/cfgsync/policy` (or `bundle`): installs a version; `force` installs even
    /// during a rollout. Answers `{version, rollout, unchanged}`.
    pub async fn install(
        &self,
        kind: VersionKind,
        value: &Value,
        force: bool,
    ) -> Result<Value, Error> {
        let path = format!("/v1/cfgsync/{}?force={force}", kind.name());
        self.send(Method::PUT, &path, Some(value), REQUEST_TIMEOUT)
            .await
    }

    /// `POST /v1/cfgsync/preview`: a candidate policy against the current registrations.
    pub async fn preview(&self, request: &PreviewRequest) -> Result<PreviewBody, Error> {
        let path = "/v1/cfgsync/preview";
        self.send(Method::POST, path, Some(request), REQUEST_TIMEOUT)
            .await
    }

    /// `GET /v1/history`, or one initialiser's with `name`.
    pub async fn history(&self, name: Option<&str>) -> Result<HistoryBody, Error> {
        let path = match name {
            Some(name) => format!("/v1/history?name={}", segment(name)),
            None => "/v1/history".to_string(),
        };
        self.get_json(&path).await
    }

    /// One long-poll of `/v1/changes`: events after `from`, held up to `wait`.
    pub async fn changes<E: DeserializeOwned>(
        &self,
        from: Revision,
        wait: Duration,
        internal: bool,
    ) -> Result<ChangesBody<E>, Error> {
        let path = format!(
            "/v1/changes?from={from}&timeout={}&internal={internal}",
            wait.as_secs()
        );
        self.send(Method::GET, &path, None, wait + REQUEST_TIMEOUT)
            .await
    }
}

/// A request body of any serialisable type, behind a reference the request futures share.
mod erased {
    /// Attaches itself as a JSON body.
    pub(super) trait Body: Sync {
        fn attach(&self, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder;
    }

    impl<T: serde::Serialize + Sync> Body for T {
        fn attach(&self, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
            builder.json(self)
        }
    }
}

/// Every byte but the unreserved ones (RFC 3986: letters, digits, `-`, `_`, `.`, `~`) is
/// percent-encoded in a path segment.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes one path segment.
fn segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, SEGMENT).to_string()
}

fn entry_path(key: &Key) -> String {
    format!(
        "/v1/config/{}/{}/{}",
        segment(&key.namespace),
        segment(&key.kind),
        segment(&key.key)
    )
}

/// The [`Store`] trait over a bootsync server's `/v1` API.
#[derive(Debug, Clone)]
pub struct RemoteStore {
    client: ApiClient,
    /// How long each `/v1/changes` long-poll of a watch is held.
    poll: Duration,
}

impl RemoteStore {
    /// A store backed by the server `client` talks to.
    pub fn new(client: ApiClient) -> Self {
        Self {
            client,
            poll: Duration::from_secs(30),
        }
    }

    /// Sets how long each watch long-poll is held.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// The client underneath.
    pub fn client(&self) -> &ApiClient {
        &self.client
    }
}

impl From<Error> for store::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Unreachable { url, source } => {
                store::Error::Unavailable(format!("cannot reach {url}: {source}"))
            }
            Error::Status { status, body, .. } => body.into_store_error(status),
            err @ Error::Decode { .. } => {
                store::Error::backend("decoding the server's answer", err)
            }
        }
    }
}

#[async_trait]
impl Store for RemoteStore {
    fn backend(&self) -> &'static str {
        "http"
    }

    async fn revision(&self) -> Result<Revision, store::Error> {
        Ok(self.client.namespaces().await?.0)
    }

    async fn get(&self, key: &Key) -> Result<Option<Entry>, store::Error> {
        key.validate()?;
        Ok(self.client.get(key).await?.map(|body| body.entry))
    }

    async fn list(&self, namespace: &str, kind: &str) -> Result<Listing, store::Error> {
        store::validate_namespace(namespace)?;
        store::validate_type(kind)?;
        Ok(self.client.list(namespace, kind).await?)
    }

    async fn namespace(&self, namespace: &str) -> Result<NamespaceTree, store::Error> {
        store::validate_namespace(namespace)?;
        Ok(self.client.namespace(namespace).await?)
    }

    async fn namespaces(&self) -> Result<Vec<String>, store::Error> {
        Ok(self.client.namespaces().await?.1)
    }

    async fn apply(&self, batch: Batch) -> Result<Revision, store::Error> {
        match self.client.apply(&batch).await {
            Ok(revision) => Ok(revision),
            // The whole request was over the server's body limit, before any value was
            // weighed: name the batch's largest value, as a local store would.
            Err(Error::Status { body, .. })
                if body.code == ErrorCode::TooLarge && body.details.key.is_none() =>
            {
                let (key, size) = batch
                    .ops
                    .iter()
                    .filter_map(|op| match op {
                        store::Op::Put { key, value } => {
                            Some((key.clone(), store::encoded_len(value)))
                        }
                        store::Op::Delete { .. } => None,
                    })
                    .max_by_key(|(_, size)| *size)
                    .unwrap_or_else(|| (Key::new("", "", ""), 0));
                let limit = body.details.limit.unwrap_or_default() as usize;
                Err(store::Error::TooLarge { key, size, limit })
            }
            Err(err) => Err(err.into()),
        }
    }

    async fn watch(&self, from: Revision, filter: WatchFilter) -> Result<Watch, store::Error> {
        // Fail early (e.g. compacted, unauthorised) rather than on the first poll.
        let first: ChangesBody<ChangeEvent> =
            self.client.changes(from, Duration::ZERO, true).await?;
        let state = PollState {
            client: self.client.clone(),
            poll: self.poll,
            filter,
            next_from: from,
            pending: first.events.into(),
            done: false,
        };
        Ok(Watch::new(stream::unfold(state, PollState::step)))
    }
}

struct PollState {
    client: ApiClient,
    poll: Duration,
    filter: WatchFilter,
    /// The newest revision delivered (or skipped by the filter) so far.
    next_from: Revision,
    pending: std::collections::VecDeque<ChangeEvent>,
    done: bool,
}

impl PollState {
    async fn step(mut self) -> Option<(Result<ChangeEvent, store::Error>, Self)> {
        if self.done {
            return None;
        }
        loop {
            while let Some(event) = self.pending.pop_front() {
                self.next_from = self.next_from.max(event.revision);
                if let Some(event) = self.filter.apply(&event) {
                    return Some((Ok(event), self));
                }
            }
            match self
                .client
                .changes::<ChangeEvent>(self.next_from, self.poll, true)
                .await
            {
                Ok(body) => self.pending = body.events.into(),
                Err(err) => {
                    self.done = true;
                    return Some((Err(err.into()), self));
                }
            }
        }
    }
}
