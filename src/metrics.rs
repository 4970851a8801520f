//! One Prometheus registry for the process; each component registers its own families.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::{Metric, Registry};

/// The process's metrics registry.
#[derive(Debug, Default)]
pub struct Metrics {
    registry: Mutex<Registry>,
}

impl Metrics {
    /// An empty registry with the `bootsync` prefix.
    pub fn new() -> Self {
        Self {
            registry: Mutex::new(Registry::with_prefix("bootsync")),
        }
    }

    /// Registers one metric family; call once per family at start-up.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry
            .lock()
            .expect("metrics registry lock poisoned")
            .register(name, help, metric);
    }

    /// The Prometheus text exposition of every registered family.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .expect("metrics registry lock poisoned");
        // Encoding into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}
