//! `CfgsyncClient`: registers a node and fetches its payload, waiting as long as allowed —
//! long-polling bootsync servers and backing off with jitter against servers that answer at once.

use std::sync::Mutex;
use std::time::Duration;

use reqwest::StatusCode;

use super::{NodeArtifactsPayload, NodeRegistration};
use crate::api::NODE_SECRET_HEADER;
use crate::api::cfgsync::Registered;
use crate::api::rollout::ReportBody;
use crate::api::{ErrorBody, ErrorCode, Token};
use crate::backoff::Backoff;
use crate::servers::{Endpoint, Failover, Servers};

/// Everything that can go wrong talking to a cfgsync server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot reach {url}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The server refused the request.
    #[error("{url} answered {status}: {message}")]
    Refused {
        /// The URL asked.
        url: String,
        /// The status.
        status: StatusCode,
        /// The error code (`missing_config`, `unauthorized`, ...).
        code: ErrorCode,
        /// The server's message.
        message: String,
        /// How long the server asked the client to wait before trying again (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// The payload did not decode.
    #[error("the payload from {url} is not valid")]
    BadPayload {
        /// The URL asked.
        url: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The answer was larger than the client accepts; nothing of it was kept.
    #[error("the answer from {url} is larger than {limit} bytes (--max-payload-bytes)")]
    TooLarge {
        /// The URL asked.
        url: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// The config was not ready within the allowed time.
    #[error("gave up after {waited:?}: {last}")]
    GaveUp {
        /// How long it waited.
        waited: Duration,
        /// The last thing the server said.
        last: String,
    },
}

impl ClientError {
    /// Whether the error says "this server cannot answer now", so another may: no answer, or
    /// a 5xx other than 500 (an error the request meets on every server of the store, such as
    /// a template that fails for this node).
    pub fn fails_over(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Refused { status, .. } => {
                status.is_server_error() && *status != StatusCode::INTERNAL_SERVER_ERROR
            }
            _ => false,
        }
    }

    /// How long the server asked to wait before the request is sent again, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// One answer of `POST /node`.
#[derive(Debug, Clone, PartialEq)]
pub enum FetchOutcome {
    /// The payload.
    Ready(NodeArtifactsPayload),
    /// 425: not ready yet (the server's message).
    NotReady(String),
}

/// What one [`CfgsyncClient::fetch_newer`] found.
#[derive(Debug, Clone)]
pub enum WatchOutcome {
    /// A payload: newer, or (from a server that does not hold) perhaps the same epoch.
    Payload(NodeArtifactsPayload),
    /// 204: nothing newer came within the wait.
    Unchanged,
    /// 425: the set is not ready (the server's message).
    NotReady(String),
}

/// What the client reports while it waits.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The server.
    pub server: String,
    /// How long it has waited.
    pub waited: Duration,
    /// The last thing the server said.
    pub last: String,
}

/// A client of a cfgsync server, or of several sharing one store: it moves to the next one
/// when the server in use does not answer or answers 5xx, and keeps its registration, node
/// secret and epoch across them.
#[derive(Debug)]
pub struct CfgsyncClient {
    failover: Failover,
    join_token: Option<Token>,
    node_secret: Mutex<Option<String>>,
    long_poll: Duration,
    max_payload_bytes: usize,
}

/// Default bound on one payload: far above any real node's files, far below what would hurt.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 64 << 20;
/// Bound on an error or registration answer, which is a short JSON object.
const MAX_SMALL_ANSWER_BYTES: usize = 64 << 10;
/// How long a registration or a report may take.
const SMALL_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl CfgsyncClient {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:4400`).
    pub fn new(base: impl Into<String>) -> Self {
        let http = crate::tls::http_client(&[], reqwest::Client::builder())
            .expect("a client without extra roots always builds");
        Self::with_servers(Servers::one(base, http))
    }

    /// A client of these servers (which share one store), the first listed preferred until
    /// [`Self::preferring`] says otherwise.
    pub fn with_servers(servers: Servers) -> Self {
        Self {
            failover: Failover::new(servers),
            join_token: None,
            node_secret: Mutex::new(None),
            long_poll: Duration::from_secs(30),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }

    /// Prefers the servers in the order `identifier` ranks them, so a fleet given one list
    /// spreads over it (see [`crate::servers`]).
    pub fn preferring(mut self, identifier: &str) -> Self {
        self.failover = self.failover.prefer_for(identifier);
        self
    }

    /// The largest payload accepted; a larger answer is refused before it is decoded, so
    /// nothing is written.
    pub fn with_max_payload_bytes(mut self, limit: usize) -> Self {
        self.max_payload_bytes = limit;
        self
    }

    /// Trusts these CA certificates beside the system's (for a server with a private CA).
    pub fn with_ca_certs(mut self, certs: &[reqwest::Certificate]) -> Result<Self, reqwest::Error> {
        let servers = self.failover.servers().trusting(certs)?;
        self.failover = self.failover.rebuilt(servers);
        Ok(self)
    }

    /// Sends the join token on both routes.
    pub fn with_join_token(mut self, token: Option<Token>) -> Self {
        self.join_token = token;
        self
    }

    /// How long one long-poll asks the server to hold `/node`.
    pub fn with_long_poll(mut self, wait: Duration) -> Self {
        self.long_poll = wait;
        self
    }

    /// The server in use, as people see it (a return to the preferred one shows once its
    /// request is sent).
    pub fn server(&self) -> String {
        let failover = &self.failover;
        failover.servers().get(failover.in_use()).target.label()
    }

    /// The server this client goes back to when it can.
    pub fn preferred_server(&self) -> String {
        let failover = &self.failover;
        failover.servers().get(failover.preferred()).target.label()
    }

    /// POSTs `body` to `path` on the server in use, moving on to the next while one does not
    /// answer or answers 5xx (every request of a node is safe to send again: a registration
    /// and a report replace themselves, a fetch reads). Answers below 500 come back as they
    /// are, with the URL asked.
    async fn post(
        &self,
        path: &str,
        body: &(impl serde::Serialize + Sync),
        timeout: Duration,
    ) -> Result<(String, reqwest::Response), ClientError> {
        let secret = self
            .node_secret
            .lock()
            .expect("secret lock poisoned")
            .clone();
        let send = |endpoint: &Endpoint| {
            let url = format!("{}{path}", endpoint.target.url);
            let mut request = endpoint.http.post(&url).timeout(timeout).json(body);
            if let Some(token) = &self.join_token {
                request = request.bearer_auth(token.expose());
            }
            if let Some(secret) = &secret {
                request = request.header(NODE_SECRET_HEADER, secret);
            }
            async move {
                let response = request.send().await.map_err(unreachable(&url))?;
                if response.status().is_server_error() {
                    return Err(Self::refused(url, response).await);
                }
                Ok((url, response))
            }
        };
        self.failover.call(send, ClientError::fails_over).await
    }

    async fn refused(url: String, response: reqwest::Response) -> ClientError {
        let status = response.status();
        // Seconds only: the HTTP-date form is not sent by bootsync, and a client that cannot
        // read it falls back on its own backoff.
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok()?.trim().parse().ok())
            .map(Duration::from_secs);
        let text = small_text(response).await;
        let body = ErrorBody::from_answer(status, &text);
        ClientError::Refused {
            url,
            status,
            code: body.code,
            message: body.message,
            retry_after,
        }
    }

    /// `POST /register`; keeps the node secret a strict-mode server returns.
    pub async fn register_node(&self, registration: &NodeRegistration) -> Result<(), ClientError> {
        let (url, response) = self
            .post("/register", registration, SMALL_REQUEST_TIMEOUT)
            .await?;
        if !response.status().is_success() {
            return Err(Self::refused(url, response).await);
        }
        // Seed servers answer with an empty body; ours may carry a node secret.
        let text = small_text(response).await;
        if let Ok(Registered {
            node_secret: Some(secret),
            ..
        }) = serde_json::from_str::<Registered>(&text)
        {
            *self.node_secret.lock().expect("secret lock poisoned") = Some(secret);
        }
        Ok(())
    }

    /// `POST /report`: what the node did with a payload. `Ok(false)` when the server does not
    /// take reports (an older bootsync or a seed server answers 404 or 405).
    pub async fn report(&self, report: &ReportBody) -> Result<bool, ClientError> {
        let (url, response) = self.post("/report", report, SMALL_REQUEST_TIMEOUT).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(true);
        }
        let refused = Self::refused(url, response).await;
        // No such route: a seed server (plain text) or an older bootsync (`not_found`).
        let unknown_route = matches!(
            &refused,
            ClientError::Refused { code: ErrorCode::NotFound | ErrorCode::MethodNotAllowed, status, .. }
                if *status == StatusCode::NOT_FOUND || *status == StatusCode::METHOD_NOT_ALLOWED
        );
        if unknown_route {
            return Ok(false);
        }
        Err(refused)
    }

    /// One `POST /node`, held by the server up to `wait` (servers that do not long-poll answer at once).
    pub async fn fetch_node_config_wait(
        &self,
        registration: &NodeRegistration,
        wait: Duration,
    ) -> Result<FetchOutcome, ClientError> {
        let path = if wait.is_zero() {
            "/node".to_string()
        } else {
            format!("/node?wait={}", wait.as_secs())
        };
        Ok(match self.ask_node(&path, registration, wait).await? {
            WatchOutcome::Payload(payload) => FetchOutcome::Ready(payload),
            WatchOutcome::NotReady(message) => FetchOutcome::NotReady(message),
            // Only asked for with `after`; a server that says it anyway has nothing yet.
            WatchOutcome::Unchanged => FetchOutcome::NotReady("nothing to serve yet".into()),
        })
    }

    /// One `POST /node?wait=…&after=EPOCH`: a payload of an epoch newer than `after`, held by
    /// the server up to `wait` until there is one. A server that does not know `after` answers
    /// at once with what it has; the caller tells that apart by the epoch.
    pub async fn fetch_newer(
        &self,
        registration: &NodeRegistration,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<WatchOutcome, ClientError> {
        let mut path = format!("/node?wait={}", wait.as_secs());
        if let Some(epoch) = after {
            path.push_str(&format!("&after={epoch}"));
        }
        self.ask_node(&path, registration, wait).await
    }

    /// One `POST` of `path` (a `/node` query), its answer read within the payload limit.
    async fn ask_node(
        &self,
        path: &str,
        registration: &NodeRegistration,
        wait: Duration,
    ) -> Result<WatchOutcome, ClientError> {
        let (url, response) = self
            .post(path, registration, wait + SMALL_REQUEST_TIMEOUT)
            .await?;
        match response.status() {
            StatusCode::OK => {
                let body = read_limited(&url, response, self.max_payload_bytes).await?;
                serde_json::from_slice::<NodeArtifactsPayload>(&body)
                    .map(WatchOutcome::Payload)
                    .map_err(|source| ClientError::BadPayload { url, source })
            }
            StatusCode::NO_CONTENT => Ok(WatchOutcome::Unchanged),
            StatusCode::TOO_EARLY => {
                let text = small_text(response).await;
                let message = serde_json::from_str::<ErrorBody>(&text).map_or(text, |b| b.message);
                Ok(WatchOutcome::NotReady(message))
            }
            _ => Err(Self::refused(url, response).await),
        }
    }

    /// One `POST /node` without waiting, as the seed's client does.
    pub async fn fetch_node_config(
        &self,
        registration: &NodeRegistration,
    ) -> Result<FetchOutcome, ClientError> {
        self.fetch_node_config_wait(registration, Duration::ZERO)
            .await
    }

    /// Registers, then fetches until ready or `timeout`, calling `progress` now and then.
    /// Connection errors (a server not up yet, a restart) are retried with backoff and lead to
    /// registering again; `missing_config` is final unless `retry_missing`.
    pub async fn register_and_wait(
        &self,
        registration: &NodeRegistration,
        timeout: Duration,
        retry_missing: bool,
        progress: &(dyn Fn(&Progress) + Send + Sync),
    ) -> Result<NodeArtifactsPayload, ClientError> {
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
        let mut registered = false;
        let mut last = String::new();
        let mut reported = started;
        let mut reported_last = String::new();
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                if last.is_empty() {
                    last = "the server never answered".into();
                }
                return Err(ClientError::GaveUp {
                    waited: started.elapsed(),
                    last,
                });
            }
            // Say what changed at once, and remind every 10 s while nothing does.
            let changed = last != reported_last;
            if !last.is_empty()
                && (changed || now.duration_since(reported) >= Duration::from_secs(10))
            {
                progress(&Progress {
                    server: self.server(),
                    waited: started.elapsed(),
                    last: last.clone(),
                });
                reported = now;
                reported_last.clone_from(&last);
            }
            let remaining = deadline - now;
            let attempt = async {
                if !registered {
                    self.register_node(registration).await?;
                }
                self.fetch_node_config_wait(registration, self.long_poll.min(remaining))
                    .await
            };
            let asked = tokio::time::Instant::now();
            // The whole attempt, not only its long-poll, ends at the deadline: a server that
            // accepts and then says nothing cannot keep the client past `timeout`.
            let Ok(outcome) = tokio::time::timeout_at(deadline, attempt).await else {
                if last.is_empty() {
                    last = "the server did not answer in time".into();
                }
                return Err(ClientError::GaveUp {
                    waited: started.elapsed(),
                    last,
                });
            };
            match outcome {
                Ok(FetchOutcome::Ready(payload)) => return Ok(payload),
                Ok(FetchOutcome::NotReady(message)) => {
                    registered = true;
                    last = format!("not ready: {message}");
                    // A server that held the request long-polls: ask again at once. One that
                    // answered immediately is polled with backoff.
                    if asked.elapsed() < Duration::from_secs(1) {
                        self.pause(&mut backoff, deadline).await;
                    } else {
                        backoff.reset();
                    }
                }
                Err(ClientError::Refused { code, message, .. })
                    if code == ErrorCode::MissingConfig && retry_missing =>
                {
                    registered = true;
                    last = format!("no config yet: {message}");
                    self.pause(&mut backoff, deadline).await;
                }
                // Busy, paced or slow: the server said to retry, and the registration is
                // sent again in case it was the one refused.
                Err(ClientError::Refused {
                    code,
                    message,
                    retry_after,
                    ..
                }) if code.is_transient() => {
                    registered = false;
                    last = format!("{code}: {message}");
                    self.pause_at_least(&mut backoff, deadline, retry_after)
                        .await;
                }
                Err(err @ ClientError::Unreachable { .. }) => {
                    registered = false;
                    last = crate::telemetry::error_chain(&err);
                    self.pause(&mut backoff, deadline).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn pause(&self, backoff: &mut Backoff, deadline: tokio::time::Instant) {
        self.pause_at_least(backoff, deadline, None).await;
    }

    /// Waits the next backoff step, or what the server asked (`Retry-After`) when that is
    /// longer; never past `deadline`.
    async fn pause_at_least(
        &self,
        backoff: &mut Backoff,
        deadline: tokio::time::Instant,
        asked: Option<Duration>,
    ) {
        let now = tokio::time::Instant::now();
        // Whatever the server asks, never past the deadline (nor overflowing the clock).
        let pause = backoff
            .fail()
            .max(asked.unwrap_or_default())
            .min(deadline.saturating_duration_since(now));
        let until = now + pause;
        tokio::time::sleep_until(until).await;
    }
}

/// Turns a transport error on `url` into [`ClientError::Unreachable`].
fn unreachable(url: &str) -> impl FnOnce(reqwest::Error) -> ClientError + '_ {
    move |source| ClientError::Unreachable {
        url: url.to_string(),
        source,
    }
}

/// The body of `response`, refused as soon as it passes `limit` bytes (by its declared length
/// or by what arrives), so an endless or huge answer costs at most `limit` bytes of memory.
async fn read_limited(
    url: &str,
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, ClientError> {
    let too_large = || ClientError::TooLarge {
        url: url.to_string(),
        limit,
    };
    if response
        .content_length()
        .is_some_and(|declared| declared > limit as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    loop {
        let chunk = response.chunk().await.map_err(unreachable(url))?;
        let Some(chunk) = chunk else {
            return Ok(body);
        };
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
}

/// A short answer's text (an error, a registration); cut off past a small bound.
async fn small_text(response: reqwest::Response) -> String {
    let url = response.url().to_string();
    match read_limited(&url, response, MAX_SMALL_ANSWER_BYTES).await {
        Ok(body) => String::from_utf8_lossy(&body).into_owned(),
        Err(err) => format!("(an unreadable answer: {err})"),
    }
}
