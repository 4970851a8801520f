//! Several servers where one is named: the `--server A,B,C` list, and the failover that moves a
//! client to the next server when one stops answering, then back to its preferred one later.
//!
//! Every server in one list shares one store (etcd), so a registration, a node secret and an
//! epoch mean the same on each: a client that moves keeps them. A node prefers the server its
//! identifier ranks first (rendezvous hashing), so a fleet given one list spreads over it, and
//! the nodes of a dead server spread over the others. Operator commands prefer the first listed.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Url;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// Why a server list was not accepted; each names the entry at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerListError {
    /// Nothing was given.
    #[error("no server given: name at least one, e.g. http://127.0.0.1:4400")]
    Empty,
    /// An entry between commas is empty (`A,,B` or a trailing comma).
    #[error("server entry {position} is empty (in {list:?})")]
    EmptyEntry {
        /// 1-based position in the list.
        position: usize,
        /// The whole list.
        list: String,
    },
    /// An entry is not a server URL.
    #[error("server {entry:?} is not a URL: {reason}")]
    BadUrl {
        /// The entry.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `http` and `https` mixed: a client would send its token in clear to some servers.
    #[error("servers mix http and https ({http} and {https}): use one scheme for all")]
    MixedSchemes {
        /// An http entry.
        http: String,
        /// An https entry.
        https: String,
    },
}

/// A parsed, checked list of server base URLs (one scheme, no query, no duplicates; a path
/// is kept as a prefix, for a server behind a proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerList {
    urls: Vec<Url>,
}

impl ServerList {
    /// Parses `A,B,C`; a bare `host:port` means http.
    pub fn parse(list: &str) -> Result<Self, ServerListError> {
        if list.trim().is_empty() {
            return Err(ServerListError::Empty);
        }
        let mut urls: Vec<Url> = Vec::new();
        for (i, entry) in list.split(',').enumerate() {
            let entry = entry.trim();
            if entry.is_empty() {
                return Err(ServerListError::EmptyEntry {
                    position: i + 1,
                    list: list.to_string(),
                });
            }
            let url = parse_one(entry)?;
            // The same server twice would only be tried twice.
            if !urls.contains(&url) {
                urls.push(url);
            }
        }
        let http = urls.iter().find(|u| u.scheme() == "http");
        let https = urls.iter().find(|u| u.scheme() == "https");
        if let (Some(http), Some(https)) = (http, https) {
            return Err(ServerListError::MixedSchemes {
                http: base(http),
                https: base(https),
            });
        }
        Ok(Self { urls })
    }

    /// One server, as the seed's `CFG_SERVER_ADDR` names it (no list).
    pub fn single(url: &str) -> Result<Self, ServerListError> {
        if url.trim().is_empty() {
            return Err(ServerListError::Empty);
        }
        Ok(Self {
            urls: vec![parse_one(url.trim())?],
        })
    }

    /// The base URLs, as listed (without a trailing slash).
    pub fn urls(&self) -> Vec<String> {
        self.urls.iter().map(base).collect()
    }

    /// The servers, each a name and its addresses: a name that resolves to several addresses
    /// is several servers. A name that does not resolve now stays one server, resolved at each
    /// connection.
    pub async fn resolve(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        for url in &self.urls {
            let addresses = match url.domain() {
                Some(name) => {
                    let port = url.port_or_known_default().unwrap_or(80);
                    match tokio::net::lookup_host((name, port)).await {
                        Ok(found) => found.collect(),
                        Err(_) => Vec::new(),
                    }
                }
                None => Vec::new(),
            };
            targets.extend(expand(url, &addresses));
        }
        targets
    }

    /// The servers without looking names up.
    pub fn targets(&self) -> Vec<Target> {
        self.urls.iter().flat_map(|url| expand(url, &[])).collect()
    }
}

impl std::str::FromStr for ServerList {
    type Err = ServerListError;

    fn from_str(list: &str) -> Result<Self, Self::Err> {
        Self::parse(list)
    }
}

impl std::fmt::Display for ServerList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.urls().join(","))
    }
}

fn parse_one(entry: &str) -> Result<Url, ServerListError> {
    let bad = |reason: String| ServerListError::BadUrl {
        entry: entry.to_string(),
        reason,
    };
    let text = if entry.contains("://") {
        entry.to_string()
    } else {
        format!("http://{entry}")
    };
    let url = Url::parse(&text).map_err(|e| bad(e.to_string()))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(bad(format!(
            "the scheme must be http or https, not {}",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it names no host".into()));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(bad(
            "a server is a scheme, a host and a port, no path".into()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "credentials do not go in the URL; use a token file".into()
        ));
    }
    Ok(url)
}

fn base(url: &Url) -> String {
    url.as_str().trim_end_matches('/').to_string()
}

/// One server a client can talk to: a base URL, and the address its name is pinned to when
/// the name stood for several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The base URL requests go to (the name stays, for TLS and the `Host` header).
    pub url: String,
    /// The address the name is pinned to, if the name resolved to several.
    pub pinned: Option<(String, SocketAddr)>,
}

impl Target {
    /// How people see it: the URL, and the address it is pinned to.
    pub fn label(&self) -> String {
        match &self.pinned {
            Some((_, address)) => format!("{} ({})", self.url, address.ip()),
            None => self.url.clone(),
        }
    }
}

/// `url` as one target, or one per address when its name resolved to several.
fn expand(url: &Url, addresses: &[SocketAddr]) -> Vec<Target> {
    let mut unique: Vec<IpAddr> = Vec::new();
    for address in addresses {
        if !unique.contains(&address.ip()) {
            unique.push(address.ip());
        }
    }
    let name = url.host_str().unwrap_or_default().to_string();
    if unique.len() < 2 {
        return vec![Target {
            url: base(url),
            pinned: None,
        }];
    }
    let port = url.port_or_known_default().unwrap_or(80);
    unique
        .into_iter()
        .map(|ip| Target {
            url: base(url),
            pinned: Some((name.clone(), SocketAddr::new(ip, port))),
        })
        .collect()
}

/// A server with its HTTP client (shared by every client of the process that uses it).
#[derive(Debug)]
pub struct Endpoint {
    /// Where it is.
    pub target: Target,
    /// The client that reaches it (pinned to its address, if any).
    pub http: reqwest::Client,
}

/// Builds the HTTP client of one endpoint from a builder that already pins its address.
pub type BuildClient =
    Arc<dyn Fn(reqwest::ClientBuilder) -> reqwest::Result<reqwest::Client> + Send + Sync>;

/// The servers one process talks to, shared by its clients; cheap to clone.
#[derive(Clone)]
pub struct Servers {
    endpoints: Arc<[Endpoint]>,
    /// The list and client builder it was resolved from, when it names hosts: looked up again
    /// when no server answers, as the addresses behind a name change.
    source: Option<(ServerList, BuildClient)>,
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.endpoints.iter().map(|e| e.target.label()))
            .finish()
    }
}

impl Servers {
    /// The servers of `list`, its names looked up now (a name with several addresses is
    /// several servers) and again when none of them answers.
    pub async fn resolve(list: &ServerList, build: BuildClient) -> reqwest::Result<Self> {
        let mut servers = Self::connect(list.resolve().await, |b| build(b))?;
        if list.urls.iter().any(|url| url.domain().is_some()) {
            servers.source = Some((list.clone(), build));
        }
        Ok(servers)
    }

    /// The same servers looked up again, if they name hosts and the addresses changed.
    async fn resolved_again(&self) -> Option<Self> {
        let (list, build) = self.source.clone()?;
        let targets = list.resolve().await;
        let now: Vec<&Target> = self.iter().map(|e| &e.target).collect();
        if targets.iter().collect::<Vec<_>>() == now {
            return None;
        }
        let mut servers = Self::connect(targets, |b| build(b)).ok()?;
        servers.source = Some((list, build));
        Some(servers)
    }

    /// An endpoint per target, its client built by `build` from a builder that already pins
    /// its address.
    pub fn connect<E>(
        targets: Vec<Target>,
        build: impl Fn(reqwest::ClientBuilder) -> Result<reqwest::Client, E>,
    ) -> Result<Self, E> {
        let endpoints = targets
            .into_iter()
            .map(|target| {
                let mut builder = reqwest::Client::builder();
                if let Some((name, address)) = &target.pinned {
                    builder = builder.resolve(name, *address);
                }
                Ok(Endpoint {
                    http: build(builder)?,
                    target,
                })
            })
            .collect::<Result<Vec<_>, E>>()?;
        Ok(Self {
            endpoints: endpoints.into(),
            source: None,
        })
    }

    /// The same servers with clients that trust `certs` beside the system's roots.
    pub fn trusting(&self, certs: &[reqwest::Certificate]) -> reqwest::Result<Self> {
        let targets = self.iter().map(|e| e.target.clone()).collect();
        let certs = certs.to_vec();
        let build: BuildClient = Arc::new(move |b| crate::tls::http_client(&certs, b));
        let mut servers = Self::connect(targets, |b| build(b))?;
        servers.source = self.source.clone().map(|(list, _)| (list, build));
        Ok(servers)
    }

    /// One server over an existing client.
    pub fn one(url: impl Into<String>, http: reqwest::Client) -> Self {
        let target = Target {
            url: url.into().trim_end_matches('/').to_string(),
            pinned: None,
        };
        Self {
            endpoints: vec![Endpoint { target, http }].into(),
            source: None,
        }
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether there are none (never, for a parsed list).
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The `i`-th endpoint.
    pub fn get(&self, i: usize) -> &Endpoint {
        &self.endpoints[i]
    }

    /// Every endpoint.
    pub fn iter(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter()
    }
}

/// The order a node with this `key` tries the servers in: by a hash of key and server
/// (rendezvous hashing), so each node's first choice is stable and the fleet spreads evenly.
pub fn rendezvous_order(key: &str, servers: &Servers) -> Vec<usize> {
    let mut ranked: Vec<(u64, usize)> = servers
        .iter()
        .enumerate()
        .map(|(i, endpoint)| (score(key, &endpoint.target), i))
        .collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked.into_iter().map(|(_, i)| i).collect()
}

fn score(key: &str, target: &Target) -> u64 {
    let mut hash = Sha256::new();
    hash.update(key.as_bytes());
    hash.update([0]);
    hash.update(target.label().as_bytes());
    let digest = hash.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("a digest has 8 bytes"))
}

/// How long a client stays away from its preferred server after leaving it, at first: then
/// twice as long after each failed return, up to [`LONGEST_STAY_AWAY`]. Each stay is
/// stretched by a random 0–100 %, so a restarted server does not get its whole fleet back in
/// one instant.
pub const FIRST_STAY_AWAY: Duration = Duration::from_secs(15);
/// The longest stay away from the preferred server.
pub const LONGEST_STAY_AWAY: Duration = Duration::from_secs(300);

/// One client's place in the list: which server it uses now, and when it tries its preferred
/// one again.
#[derive(Debug)]
pub struct Failover {
    servers: std::sync::RwLock<Servers>,
    /// The key its order of preference is ranked by (a node's identifier), if any.
    key: Option<String>,
    state: Mutex<Place>,
    /// When the servers' names were last looked up again.
    looked_up: Mutex<Option<Instant>>,
}

#[derive(Debug, Clone)]
struct Place {
    /// Server indices, preferred first.
    order: Vec<usize>,
    /// Position in `order` of the server in use.
    at: usize,
    /// When to go back to the preferred server (while away from it).
    back_at: Option<Instant>,
    /// How long the next stay away lasts (before jitter).
    stay_away: Duration,
}

impl Place {
    fn new(order: Vec<usize>) -> Self {
        Self {
            order,
            at: 0,
            back_at: None,
            stay_away: FIRST_STAY_AWAY,
        }
    }
}

/// The least time between two lookups of the servers' names.
const LOOKUP_INTERVAL: Duration = Duration::from_secs(30);

impl Failover {
    /// A client of `servers` that prefers them in the listed order.
    pub fn new(servers: Servers) -> Self {
        let order = (0..servers.len()).collect();
        Self {
            servers: std::sync::RwLock::new(servers),
            key: None,
            state: Mutex::new(Place::new(order)),
            looked_up: Mutex::new(None),
        }
    }

    /// The same servers, preferred in the order `key` ranks them (a node's identifier).
    pub fn prefer_for(mut self, key: &str) -> Self {
        self.place().order = rendezvous_order(key, &self.servers());
        self.key = Some(key.to_string());
        self
    }

    /// A failover over `servers` (the same ones, rebuilt: trusting another CA, say) that
    /// keeps this one's order of preference and key.
    pub fn rebuilt(&self, servers: Servers) -> Self {
        let mut order = self.place().order.clone();
        if order.len() != servers.len() {
            order = (0..servers.len()).collect();
        }
        Self {
            servers: std::sync::RwLock::new(servers),
            key: self.key.clone(),
            state: Mutex::new(Place::new(order)),
            looked_up: Mutex::new(None),
        }
    }

    /// The servers (a cheap handle).
    pub fn servers(&self) -> Servers {
        self.servers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn place(&self) -> std::sync::MutexGuard<'_, Place> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server to ask now: the preferred one again once the stay away is over.
    pub fn current(&self) -> usize {
        let mut place = self.place();
        if place.at != 0 && place.back_at.is_some_and(|at| Instant::now() >= at) {
            place.at = 0;
            place.back_at = None;
        }
        place.order[place.at]
    }

    /// The server the last request went to (or the next goes to, before a return is due):
    /// what a person is told, without moving anything.
    pub fn in_use(&self) -> usize {
        let place = self.place();
        place.order[place.at]
    }

    /// The server clients of this list go to first.
    pub fn preferred(&self) -> usize {
        self.place().order[0]
    }

    /// `server` did not answer (or answered that it cannot serve): the next one in order is
    /// used from now on. A client that leaves its preferred server comes back after a
    /// jittered stay away, longer each time the preferred one is still down.
    pub fn failed(&self, server: usize) {
        let count = self.place().order.len();
        let mut place = self.place();
        if place.order[place.at] != server {
            // Another request of this client moved on already.
            return;
        }
        if place.at == 0 && count > 1 {
            let stay = place.stay_away.mul_f64(1.0 + fastrand::f64());
            place.back_at = Some(Instant::now() + stay);
            place.stay_away = (place.stay_away * 2).min(LONGEST_STAY_AWAY);
        }
        place.at = (place.at + 1) % count;
        if place.at == 0 {
            // Round the whole list: the preferred one is being tried now.
            place.back_at = None;
        }
    }

    /// `server` answered: a preferred server that answers is stayed with, and the next stay
    /// away starts short again.
    pub fn answered(&self, server: usize) {
        let mut place = self.place();
        if place.order[0] == server && place.at == 0 {
            place.stay_away = FIRST_STAY_AWAY;
        }
    }

    /// The servers one call tries, in order: the current one, then the rest of the order
    /// after it, each once.
    fn rotation(&self) -> Vec<usize> {
        let first = self.current();
        let place = self.place();
        let start = place.order.iter().position(|&s| s == first).unwrap_or(0);
        let n = place.order.len();
        (0..n).map(|k| place.order[(start + k) % n]).collect()
    }

    /// Runs `call` against the current server and, while `fails_over` says its error means
    /// "this server cannot answer", against the next ones: each server once. The last error
    /// comes back when none answered, after looking the servers' names up again (at most
    /// every 30 s) in case their addresses changed.
    pub async fn call<T, E, F, Fut>(
        &self,
        mut call: F,
        fails_over: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        E: std::fmt::Display,
        F: FnMut(&Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let servers = self.servers();
        let rotation = self.rotation();
        let mut last = None;
        for (k, &server) in rotation.iter().enumerate() {
            match call(servers.get(server)).await {
                Ok(answer) => {
                    self.answered(server);
                    return Ok(answer);
                }
                Err(err) if fails_over(&err) && servers.len() > 1 => {
                    self.failed(server);
                    if let Some(&next) = rotation.get(k + 1) {
                        let next = servers.get(next).target.label();
                        tracing::warn!(error = %err, next = %next, "moving to the next server");
                    }
                    last = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        self.look_up_again().await;
        Err(last.expect("a list of servers is never empty"))
    }

    /// Looks the servers' names up again, at most every 30 s; new addresses replace the
    /// servers (and the place in them).
    async fn look_up_again(&self) {
        {
            let mut last = self.looked_up.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|at| at.elapsed() < LOOKUP_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let Some(servers) = self.servers().resolved_again().await else {
            return;
        };
        let order = match &self.key {
            Some(key) => rendezvous_order(key, &servers),
            None => (0..servers.len()).collect(),
        };
        tracing::info!(servers = ?servers, "the servers' names resolve to other addresses now");
        *self.servers.write().unwrap_or_else(|e| e.into_inner()) = servers;
        *self.place() = Place::new(order);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(n: usize) -> Servers {
        let list: Vec<String> = (0..n).map(|i| format!("127.0.0.1:{}", 4400 + i)).collect();
        let list = ServerList::parse(&list.join(",")).unwrap();
        Servers::connect(list.targets(), |b| crate::tls::http_client(&[], b)).unwrap()
    }

    #[test]
    fn lists_are_parsed_and_bad_entries_named() {
        let list = ServerList::parse(" a:1 , http://b:2/ ,a:1").unwrap();
        assert_eq!(
            list.urls(),
            ["http://a:1", "http://b:2"],
            "trimmed, deduplicated"
        );
        assert_eq!(ServerList::parse("  "), Err(ServerListError::Empty));
        assert!(matches!(
            ServerList::parse("a:1,,b:2"),
            Err(ServerListError::EmptyEntry { position: 2, .. })
        ));
        assert!(matches!(
            ServerList::parse("a:1,"),
            Err(ServerListError::EmptyEntry { position: 2, .. })
        ));
        let mixed = ServerList::parse("http://a:1,https://b:2").unwrap_err();
        assert_eq!(
            mixed.to_string(),
            "servers mix http and https (http://a:1 and https://b:2): use one scheme for all"
        );
        for bad in [
            "http://a:99999",
            "ftp://a:1",
            "http://a:1/v1",
            "http://u:p@a:1",
            "http://",
        ] {
            assert!(
                matches!(ServerList::parse(bad), Err(ServerListError::BadUrl { ref entry, .. }) if entry == bad),
                "{bad}"
            );
        }
        assert!(
            ServerList::single("http://a:1,http://b:2").is_err(),
            "one URL only"
        );
    }

    #[test]
    fn a_name_with_several_addresses_is_several_servers_pinned_to_each() {
        let url = Url::parse("https://cfg.example:4400").unwrap();
        let found: Vec<SocketAddr> = ["10.0.0.1:4400", "10.0.0.2:4400", "10.0.0.1:4400"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let targets = expand(&url, &found);
        assert_eq!(targets.len(), 2);
        assert!(targets.iter().all(|t| t.url == "https://cfg.example:4400"));
        assert_eq!(targets[1].label(), "https://cfg.example:4400 (10.0.0.2)");
        assert_eq!(
            expand(&url, &found[..1]).len(),
            1,
            "one address: one server"
        );
        assert_eq!(expand(&url, &[])[0].pinned, None);
    }

    #[test]
    fn nodes_spread_over_the_servers_and_each_keeps_its_order() {
        let servers = servers(3);
        let mut first = [0usize; 3];
        for i in 0..3000 {
            let order = rendezvous_order(&format!("node-{i}"), &servers);
            assert_eq!(order, rendezvous_order(&format!("node-{i}"), &servers));
            first[order[0]] += 1;
        }
        for count in first {
            assert!((800..1200).contains(&count), "{first:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_moves_on_and_comes_back_to_its_preferred_server_after_a_stay_away() {
        let failover = Failover::new(servers(3));
        assert_eq!(failover.current(), 0);
        failover.failed(0);
        assert_eq!(failover.current(), 1);
        failover.failed(0);
        assert_eq!(
            failover.current(),
            1,
            "a stale failure does not move it twice"
        );
        tokio::time::advance(FIRST_STAY_AWAY / 2).await;
        assert_eq!(failover.current(), 1, "not back before the stay away");
        tokio::time::advance(FIRST_STAY_AWAY * 2).await;
        assert_eq!(
            failover.current(),
            0,
            "back after at most twice the stay away"
        );
        // Still down: away again, for longer.
        failover.failed(0);
        tokio::time::advance(FIRST_STAY_AWAY * 2 - Duration::from_millis(1)).await;
        assert_eq!(
            failover.current(),
            1,
            "the second stay is at least twice the first"
        );
        tokio::time::advance(FIRST_STAY_AWAY * 3).await;
        assert_eq!(failover.current(), 0);
        failover.answered(0);
        assert_eq!(failover.place().stay_away, FIRST_STAY_AWAY);
    }

    #[test]
    fn a_rebuilt_failover_keeps_its_node_s_order() {
        let servers = servers(3);
        let key = (0..)
            .map(|i| format!("node-{i}"))
            .find(|key| rendezvous_order(key, &servers) != [0, 1, 2])
            .unwrap();
        let failover = Failover::new(servers).prefer_for(&key);
        let order = failover.place().order.clone();
        let rebuilt = failover.rebuilt(failover.servers().trusting(&[]).unwrap());
        assert_eq!(rebuilt.place().order, order);
        assert_eq!(rebuilt.key.as_deref(), Some(key.as_str()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_return_that_comes_due_during_a_call_does_not_ask_a_server_twice() {
        let failover = Failover::new(servers(3));
        failover.failed(0);
        let asked = Mutex::new(Vec::new());
        let result: Result<(), &str> = failover
            .call(
                |endpoint| {
                    let first = {
                        let mut asked = asked.lock().unwrap();
                        asked.push(endpoint.target.url.clone());
                        asked.len() == 1
                    };
                    async move {
                        if first {
                            // The stay away from server 0 ends while server 1 is asked.
                            tokio::time::advance(LONGEST_STAY_AWAY * 3).await;
                        }
                        Err("down")
                    }
                },
                |_| true,
            )
            .await;
        assert_eq!(result, Err("down"));
        let asked = asked.lock().unwrap();
        assert_eq!(
            *asked,
            [
                "http://127.0.0.1:4401",
                "http://127.0.0.1:4402",
                "http://127.0.0.1:4400"
            ]
        );
    }

    #[tokio::test]
    async fn a_call_tries_each_server_once_and_only_for_errors_that_fail_over() {
        let failover = Failover::new(servers(3));
        let asked = Mutex::new(Vec::new());
        let result: Result<(), &str> = failover
            .call(
                |endpoint| {
                    asked.lock().unwrap().push(endpoint.target.url.clone());
                    async { Err("down") }
                },
                |_| true,
            )
            .await;
        assert_eq!(result, Err("down"));
        assert_eq!(asked.lock().unwrap().len(), 3);
        let asked = Mutex::new(0);
        let result: Result<(), &str> = failover
            .call(
                |_| {
                    *asked.lock().unwrap() += 1;
                    async { Err("refused") }
                },
                |_| false,
            )
            .await;
        assert_eq!(result, Err("refused"));
        assert_eq!(*asked.lock().unwrap(), 1, "a refusal is final");
        let answer = failover
            .call(
                |endpoint| {
                    let port = endpoint.target.url.ends_with("4401");
                    async move { if port { Ok("b") } else { Err("down") } }
                },
                |_| true,
            )
            .await;
        assert_eq!(answer, Ok("b"));
    }
}
