//! The service gate: what must answer before post-gate initialisers run.

use std::time::Duration;

use async_trait::async_trait;

/// Whether the services the post-gate initialisers need are up.
#[async_trait]
pub trait Gate: Send + Sync + 'static {
    /// `Err` with a reason when the services are not up.
    async fn check(&self) -> Result<(), String>;
}

/// The production gate: one of the servers' `/healthz` answers (the reconciler's store
/// client moves to that one by itself).
#[derive(Debug, Clone)]
pub struct HttpGate {
    /// The bootsync servers, each with the client to ask it with.
    pub servers: crate::servers::Servers,
}

impl HttpGate {
    /// The gate of one server at `url` (`http://host:port`), asked with `http`.
    pub fn one(url: impl Into<String>, http: reqwest::Client) -> Self {
        Self {
            servers: crate::servers::Servers::one(url, http),
        }
    }
}

#[async_trait]
impl Gate for HttpGate {
    async fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for endpoint in self.servers.iter() {
            let url = &endpoint.target.url;
            let response = endpoint
                .http
                .get(format!("{url}/healthz"))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            match response {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => {
                    problems.push(format!("{url}/healthz answered {}", response.status()))
                }
                Err(e) => problems.push(format!("{url}/healthz did not answer: {e}")),
            }
        }
        Err(problems.join("; "))
    }
}
