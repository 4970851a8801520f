//! The reconciler's metric families: runs by class and outcome, run time, gate failures, and
//! how many initialisers are behind their flag.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::metrics::Metrics;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    class: String,
    result: String,
}

fn run_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

/// The families, registered once per engine.
#[derive(Debug, Clone)]
pub(super) struct EngineMetrics {
    runs: Family<RunLabels, Counter>,
    seconds: Family<RunLabels, Histogram, fn() -> Histogram>,
    pub(super) gate_failures: Counter,
    pub(super) store_failures: Counter,
    pub(super) behind: Gauge,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            runs: Family::default(),
            seconds: Family::new_with_constructor(run_histogram),
            gate_failures: Counter::default(),
            store_failures: Counter::default(),
            behind: Gauge::default(),
        }
    }
}

impl EngineMetrics {
    /// Registers the families in `metrics`.
    pub(super) fn register(metrics: &Metrics) -> Self {
        let this = Self::default();
        metrics.register(
            "initialiser_runs",
            "initialiser runs by class and result",
            this.runs.clone(),
        );
        metrics.register(
            "initialiser_run_duration_seconds",
            "initialiser run time",
            this.seconds.clone(),
        );
        metrics.register(
            "gate_failures",
            "wakes whose service gate failed",
            this.gate_failures.clone(),
        );
        metrics.register(
            "store_failures",
            "wakes cut short because the store did not answer",
            this.store_failures.clone(),
        );
        metrics.register(
            "initialisers_behind",
            "initialisers not at their flag",
            this.behind.clone(),
        );
        this
    }

    /// Counts one run of `class` that ended as `result`, begun at `started`.
    pub(super) fn observe(&self, class: &str, result: &str, started: std::time::Instant) {
        let labels = RunLabels {
            class: class.to_string(),
            result: result.to_string(),
        };
        self.runs.get_or_create(&labels).inc();
        self.seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }
}
