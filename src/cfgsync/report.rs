//! Applied-state reports: what each watching node did with the payload it got (`POST /report`).
//!
//! A report is node data like a registration: one record per node in `__cfgsync__/report`,
//! replaced by the node's next report, so every server sees it and a restart keeps it. One
//! task per server takes reports as they come and writes every one waiting as one batch, so a
//! fleet reporting at once costs a few store commits, not one per node. The same task writes
//! the fetched records (the newest epoch a server handed a node that does not report).

use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

pub use super::state::{FETCHED, Fetched, REPORT, fetched_key, report_key};
pub use crate::api::rollout::{MAX_STDERR_TAIL, Outcome, Report, ReportBody};
use serde_json::Value;

use crate::store::{self, Batch, DynStore, Key, Revision};

/// Reports packed into one store commit at most.
const MAX_PER_BATCH: usize = 1000;

/// Reports waiting for a commit at most; past it a report is refused with 503.
const MAX_WAITING: usize = 8 * MAX_PER_BATCH;

/// Keeps the last `MAX_STDERR_TAIL` bytes of `text`, cut at a character boundary.
pub fn tail(text: &str) -> &str {
    if text.len() <= MAX_STDERR_TAIL {
        return text;
    }
    let mut start = text.len() - MAX_STDERR_TAIL;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

type Reply = oneshot::Sender<Result<Revision, String>>;

/// One record to write, and who waits for it (nobody, for a fetched record).
type Waiting = (Key, Value, Option<Reply>);

/// Counts of what the report task wrote (shared with `/metrics`).
#[derive(Debug, Default)]
pub struct ReportCounts {
    /// Reports written.
    pub written: Counter,
    /// Store commits they took.
    pub commits: Counter,
}

/// The handle reports are written through.
#[derive(Debug, Clone)]
pub struct Reports {
    queue: mpsc::Sender<Waiting>,
    counts: Arc<ReportCounts>,
}

/// Why a report was not written.
#[derive(Debug, thiserror::Error)]
pub enum ReportRefused {
    /// Too many reports are waiting for a commit.
    #[error("too many reports are waiting to be stored; retry shortly")]
    Busy,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl Reports {
    /// Starts the report task on `store`.
    pub fn start(store: DynStore) -> Self {
        let (queue, waiting) = mpsc::channel(MAX_WAITING);
        let counts = Arc::new(ReportCounts::default());
        tokio::spawn(write_reports(store, waiting, counts.clone()));
        Self { queue, counts }
    }

    /// Stores `report` for `identifier`: the revision it was stored at.
    pub async fn submit(
        &self,
        identifier: String,
        report: Report,
    ) -> Result<Revision, ReportRefused> {
        let (reply, answer) = oneshot::channel();
        let value = serde_json::to_value(&report).expect("a report serialises");
        self.queue
            .try_send((report_key(&identifier), value, Some(reply)))
            .map_err(|_| ReportRefused::Busy)?;
        let stopped = || "the report task has stopped".to_string();
        let written = answer.await.unwrap_or_else(|_| Err(stopped()));
        Ok(written.map_err(store::Error::Unavailable)?)
    }

    /// Writes `identifier`'s fetched record with a later commit; `false` when too many
    /// records are waiting already (it is an observation, not acknowledged data: the next
    /// fetch notes it again).
    pub fn note_fetched(&self, identifier: &str, fetched: Fetched) -> bool {
        let value = serde_json::to_value(fetched).expect("a fetched record serialises");
        self.queue
            .try_send((fetched_key(identifier), value, None))
            .is_ok()
    }

    /// What was written so far.
    pub fn counts(&self) -> &ReportCounts {
        &self.counts
    }
}

/// Takes every record waiting, writes them as one batch (a node's latest record of a kind
/// wins), and answers each report with the commit's revision.
async fn write_reports(
    store: DynStore,
    mut waiting: mpsc::Receiver<Waiting>,
    counts: Arc<ReportCounts>,
) {
    let mut taken = Vec::with_capacity(MAX_PER_BATCH);
    while waiting.recv_many(&mut taken, MAX_PER_BATCH).await > 0 {
        let mut batch = Batch::new();
        let mut keys = std::collections::HashSet::with_capacity(taken.len());
        let mut reports = 0;
        // Later records of one node replace earlier ones: write the last of each.
        for (key, value, _) in taken.iter().rev() {
            if keys.insert(key) {
                reports += u64::from(key.kind == REPORT);
                batch = batch.put(key.clone(), value.clone());
            }
        }
        let result = store.apply(batch).await.map_err(|err| err.to_string());
        if result.is_ok() {
            counts.written.inc_by(reports);
            counts.commits.inc();
        }
        for (_, _, reply) in taken.drain(..) {
            if let Some(reply) = reply {
                let _ = reply.send(result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{CFGSYNC_NAMESPACE, StoreExt};

    fn report(epoch: Revision) -> Report {
        Report {
            applied: crate::api::rollout::Applied {
                epoch,
                version: Some(epoch),
                result: Outcome::Ok,
                exit_status: None,
                stderr_tail: None,
                duration_ms: 3,
            },
            reported_ms: 1,
        }
    }

    #[test]
    fn a_long_stderr_keeps_its_end_at_a_character_boundary() {
        let text = format!("{}é{}", "a".repeat(10), "b".repeat(MAX_STDERR_TAIL - 1));
        let kept = tail(&text);
        assert!(kept.len() <= MAX_STDERR_TAIL);
        assert!(kept.ends_with('b') && !kept.contains('a'), "{kept}");
        assert_eq!(tail("short"), "short");
    }

    #[tokio::test]
    async fn reports_waiting_together_take_one_commit_and_the_latest_wins() {
        let store: DynStore = Arc::new(MemoryStore::new(Default::default()));
        let reports = Reports::start(store.clone());
        // Polled in order, so they queue in order: node n{k} reports epoch k, then k + 100.
        let submits = (0..200u64).map(|i| reports.submit(format!("n{}", i % 100), report(i)));
        for result in futures_util::future::join_all(submits).await {
            result.unwrap();
        }
        let stored = store.values(CFGSYNC_NAMESPACE, REPORT).await.unwrap();
        assert_eq!(stored.len(), 100);
        for (identifier, value) in &stored {
            let k: u64 = identifier[1..].parse().unwrap();
            assert_eq!(
                value["epoch"],
                k + 100,
                "{identifier}: the latest report wins"
            );
        }
        let commits = reports.counts().commits.get();
        assert!(commits < 200, "{commits} commits for 200 reports");
    }
}
