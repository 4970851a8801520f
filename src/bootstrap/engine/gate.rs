//! The service gate: what must answer before post-gate initialisers run.

use std::time::Duration;

use async_trait::async_trait;

/// Whether the services the post-gate initialisers need are up.
#[async_trait]
pub trait Gate: Send + Sync + 'static {
    /// `Err` with a reason when the services are not up.
    async fn check(&self) -> Result<(), String>;
}

/// The production gate: the server's `/healthz` answers.
#[derive(Debug, Clone)]
pub struct HttpGate {
    /// `http://host:port` of the bootsync server.
    pub url: String,
    /// The client to ask with.
    pub http: reqwest::Client,
}

#[async_trait]
impl Gate for HttpGate {
    async fn check(&self) -> Result<(), String> {
        let response = self
            .http
            .get(format!("{}/healthz", self.url))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("{}/healthz did not answer: {e}", self.url))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!(
                "{}/healthz answered {}",
                self.url,
                response.status()
            ))
        }
    }
}
