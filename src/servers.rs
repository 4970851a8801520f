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

/// A parsed, checked list of server base URLs (one scheme, no path, no duplicates).
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

/// The servers one process talks to, shared by its clients; cheap to clone.
#[derive(Debug, Clone)]
pub struct Servers(Arc<[Endpoint]>);

impl Servers {
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
        Ok(Self(endpoints.into()))
    }

    /// The same servers with clients that trust `certs` beside the system's roots.
    pub fn trusting(&self, certs: &[reqwest::Certificate]) -> reqwest::Result<Self> {
        let targets = self.iter().map(|e| e.target.clone()).collect();
        Self::connect(targets, |b| crate::tls::http_client(certs, b))
    }

    /// One server over an existing client.
    pub fn one(url: impl Into<String>, http: reqwest::Client) -> Self {
        let target = Target {
            url: url.into().trim_end_matches('/').to_string(),
            pinned: None,
        };
        Self(vec![Endpoint { target, http }].into())
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none (never, for a parsed list).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `i`-th endpoint.
    pub fn get(&self, i: usize) -> &Endpoint {
        &self.0[i]
    }

    /// Every endpoint.
    pub fn iter(&self) -> impl Iterator<Item = &Endpoint> {
        self.0.iter()
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
    servers: Servers,
    state: Mutex<Place>,
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

impl Failover {
    /// A client of `servers` that prefers them in the listed order.
    pub fn new(servers: Servers) -> Self {
        let order = (0..servers.len()).collect();
        Self {
            servers,
            state: Mutex::new(Place {
                order,
                at: 0,
                back_at: None,
                stay_away: FIRST_STAY_AWAY,
            }),
        }
    }

    /// The same servers, preferred in the order `key` ranks them (a node's identifier).
    pub fn prefer_for(self, key: &str) -> Self {
        let order = rendezvous_order(key, &self.servers);
        self.place().order = order;
        self
    }

    /// The same servers in this order of preference (indices into the servers).
    pub fn with_order(self, order: Vec<usize>) -> Self {
        if order.len() == self.servers.len() {
            self.place().order = order;
        }
        self
    }

    /// The order of preference.
    pub fn order(&self) -> Vec<usize> {
        self.place().order.clone()
    }

    /// The servers.
    pub fn servers(&self) -> &Servers {
        &self.servers
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
        let mut place = self.place();
        if place.order[place.at] != server {
            // Another request of this client moved on already.
            return;
        }
        if place.at == 0 && self.servers.len() > 1 {
            let stay = place.stay_away.mul_f64(1.0 + fastrand::f64());
            place.back_at = Some(Instant::now() + stay);
            place.stay_away = (place.stay_away * 2).min(LONGEST_STAY_AWAY);
        }
        place.at = (place.at + 1) % place.order.len();
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

    /// Runs `call` against the current server and, while `fails_over` says its error means
    /// "this server cannot answer", against the next ones: each server at most once. The
    /// last error comes back when none answered.
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
        let mut tries = 0;
        loop {
            let server = self.current();
            tries += 1;
            match call(self.servers.get(server)).await {
                Ok(answer) => {
                    self.answered(server);
                    return Ok(answer);
                }
                Err(err) if fails_over(&err) && self.servers.len() > 1 => {
                    self.failed(server);
                    let next = self.servers.get(self.current()).target.label();
                    tracing::warn!(error = %err, next = %next, "moving to the next server");
                    if tries >= self.servers.len() {
                        return Err(err);
                    }
                }
                Err(err) => return Err(err),
            }
        }
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
