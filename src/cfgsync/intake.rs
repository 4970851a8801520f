//! Taking a watching node's report (`POST /report`): checked as a `/node` request is, bounded,
//! then handed to the report task ([`super::report`]).

use std::net::IpAddr;

use super::registration::RegisterError;
use super::report::{MAX_STDERR_TAIL, Report, ReportBody, ReportRefused};
use super::service::Service;
use crate::api::cfgsync::NodeRegistration;
use crate::store::Revision;

/// Why a report was refused; nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The request's identifier, secret or registration check failed.
    #[error(transparent)]
    Node(#[from] RegisterError),
    /// No such node is registered or in the bundle.
    #[error("{0:?} is not a registered node: register before reporting")]
    UnknownNode(String),
    /// The epoch is newer than anything served.
    #[error("epoch {epoch} is newer than the store's revision {revision}: no server has served it")]
    FutureEpoch {
        /// The epoch reported.
        epoch: Revision,
        /// The store's revision.
        revision: Revision,
    },
    /// The version is newer than the epoch it came with.
    #[error(
        "version {version} is newer than epoch {epoch}: a payload's version is at most its epoch"
    )]
    FutureVersion {
        /// The version reported.
        version: Revision,
        /// The epoch reported.
        epoch: Revision,
    },
    /// The stderr tail is over its limit.
    #[error("stderr_tail is {size} bytes, over the limit of {MAX_STDERR_TAIL}")]
    TailTooLarge {
        /// Its size.
        size: usize,
    },
    /// The node reports faster than a watcher can.
    #[error(
        "{identifier:?} reported more than {per_minute} times a minute (retry in {retry_after_secs} s)"
    )]
    TooMany {
        /// The node.
        identifier: String,
        /// The limit.
        per_minute: u32,
        /// When one would be taken.
        retry_after_secs: u64,
    },
    /// The report queue is full, or the store failed.
    #[error(transparent)]
    Refused(#[from] ReportRefused),
}

/// What became of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Stored at this revision.
    Stored(Revision),
    /// Nothing new (the same as the stored one, or older): not written.
    Kept,
}

impl Service {
    /// Takes a watching node's report: checks it as a `/node` request is checked (the join
    /// token is the router's; the node secret here, in strict mode), bounds it, and stores
    /// it with the next batch.
    pub async fn report(
        &self,
        body: ReportBody,
        secret: Option<&str>,
    ) -> Result<Taken, ReportError> {
        let ReportBody {
            identifier,
            applied,
        } = body;
        if let Some(tail) = &applied.stderr_tail
            && tail.len() > MAX_STDERR_TAIL
        {
            return Err(ReportError::TailTooLarge { size: tail.len() });
        }
        if let Some(version) = applied.version
            && version > applied.epoch
        {
            return Err(ReportError::FutureVersion {
                version,
                epoch: applied.epoch,
            });
        }
        let probe = NodeRegistration::new(identifier.clone(), IpAddr::from([0, 0, 0, 0]));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut serving = self.authorize_node(&probe, secret, deadline).await?;
        let id = &identifier;
        if serving.registration(id).is_none() && serving.bundle_has(id) != Some(true) {
            return Err(ReportError::UnknownNode(id.clone()));
        }
        if applied.epoch > serving.revision {
            let revision = self.store.revision().await.map_err(ReportRefused::from)?;
            if applied.epoch > revision {
                return Err(ReportError::FutureEpoch {
                    epoch: applied.epoch,
                    revision,
                });
            }
            serving = self.caught_up(applied.epoch, deadline).await;
        }
        if let Some(stored) = serving.report(id)
            && (stored.applied.same_as(&applied) || stored.applied.epoch > applied.epoch)
        {
            return Ok(Taken::Kept);
        }
        self.report_rate
            .take(id)
            .map_err(|retry_after_secs| ReportError::TooMany {
                identifier: id.clone(),
                per_minute: self.report_rate.per_minute(),
                retry_after_secs,
            })?;
        let report = Report {
            applied,
            reported_ms: crate::clock::now_ms(),
        };
        Ok(Taken::Stored(
            self.reports.submit(identifier, report).await?,
        ))
    }
}
