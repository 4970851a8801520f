//! `wait-for` (pre-gate): waits, bounded, until TCP endpoints accept and HTTP endpoints answer,
//! so later steps do not fail noisily while their dependencies start.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use crate::bootstrap::{InitContext, InitError, Initialiser, Phase, duration};

/// Params of `wait-for`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "WaitForParams")]
struct Params {
    /// `host:port` endpoints that must accept a TCP connection.
    #[serde(default)]
    tcp: Vec<String>,
    /// URLs that must answer HTTP with a status below 500.
    #[serde(default)]
    http: Vec<String>,
    /// How long to wait in all (default 60s).
    #[serde(
        default = "default_timeout",
        deserialize_with = "duration::deserialize"
    )]
    #[schemars(schema_with = "crate::bootstrap::duration::schema")]
    timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

/// The `wait-for` class: a pre-gate initialiser.
struct WaitFor(Params);

impl WaitFor {
    /// The endpoints that do not answer yet.
    async fn missing(&self, http: &reqwest::Client) -> Vec<String> {
        let mut missing = Vec::new();
        for addr in &self.0.tcp {
            let connect = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(addr.as_str()),
            );
            if !matches!(connect.await, Ok(Ok(_))) {
                missing.push(format!("tcp {addr}"));
            }
        }
        for url in &self.0.http {
            let answer = http.get(url).timeout(Duration::from_secs(5)).send().await;
            if !matches!(answer, Ok(r) if r.status().as_u16() < 500) {
                missing.push(format!("http {url}"));
            }
        }
        missing
    }
}

#[async_trait]
impl Initialiser for WaitFor {
    fn phase(&self) -> Phase {
        Phase::BeforeGate
    }

    async fn run(&self, ctx: &InitContext) -> Result<(), InitError> {
        let deadline = tokio::time::Instant::now() + self.0.timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            let missing = self.missing(&ctx.http).await;
            if missing.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(format!(
                    "not answering after {:?}: {}",
                    self.0.timeout,
                    missing.join(", ")
                )
                .into());
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = ctx.cancel.cancelled() => return Err("cancelled".into()),
            }
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}

crate::register!(
    WaitFor(Params),
    "wait-for",
    "waits for TCP and HTTP endpoints (pre-gate)"
);

#[cfg(test)]
mod tests {
    use super::super::testing::sandbox;
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn succeeds_against_a_listener_and_names_a_closed_port_when_it_gives_up() {
        let (_dir, ctx, _) = sandbox(&[]);
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open_addr = open.local_addr().unwrap().to_string();
        let closed_addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let ok = WaitFor(Params {
            tcp: vec![open_addr.clone()],
            http: vec![],
            timeout: Duration::from_secs(5),
        });
        ok.run(&ctx).await.unwrap();
        let bad = WaitFor(Params {
            tcp: vec![open_addr, closed_addr.clone()],
            http: vec![],
            timeout: Duration::from_millis(300),
        });
        let err = bad.run(&ctx).await.unwrap_err().to_string();
        assert!(err.contains(&closed_addr), "{err}");
    }

    #[test]
    fn it_is_a_pre_gate_initialiser_with_strict_params() {
        assert!(
            super::super::testing::construct::<WaitFor>(json!({"tcp": ["127.0.0.1:1"]}))
                .unwrap()
                .phase()
                == Phase::BeforeGate
        );
        assert!(super::super::testing::construct::<WaitFor>(json!({"timeout": "later"})).is_err());
        assert!(super::super::testing::construct::<WaitFor>(json!({"tpc": []})).is_err());
    }
}
