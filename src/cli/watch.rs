//! `bootsync client --watch`: after the first write, keep the node's files current. One
//! request is held at the server until a newer epoch exists; the new set is written
//! all-or-nothing, then `--on-change` runs with the changed paths in its environment.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::report::Reporter;
use super::{EXIT_FAILURE, EXIT_OK};
use crate::api::ErrorCode;
use crate::backoff::Backoff;
use crate::cfgsync::client::{CfgsyncClient, ClientError, WatchOutcome};
use crate::cfgsync::{ArtifactFile, ArtifactOutputMap, NodeArtifactsPayload, NodeRegistration};

/// How long each watch request asks the server to hold it (servers cap it, 60 s by default).
const HOLD: Duration = Duration::from_secs(55);

/// What the watch needs besides the client.
pub(super) struct Watch<'a> {
    pub(super) client: &'a CfgsyncClient,
    pub(super) registration: &'a NodeRegistration,
    pub(super) outputs: &'a ArtifactOutputMap,
    pub(super) on_change: Option<&'a str>,
    pub(super) report: &'a Reporter,
}

impl Watch<'_> {
    /// Watches from `first` (just written to `written`) until `shutdown`. The hook runs for the
    /// first write too, so a watcher that restarted reloads what it may have changed.
    pub(super) async fn run(
        &self,
        first: NodeArtifactsPayload,
        written: &[PathBuf],
        shutdown: CancellationToken,
    ) -> u8 {
        let mut current = first;
        // Spaces the requests to a server that does not hold them, or that is not there.
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut register = false;
        // After registering again, the server may be a new one whose epochs started over:
        // its current payload is taken as it is, whatever its epoch.
        let mut resync = false;
        // Files changed since the hook last succeeded: a failed hook sees them again.
        let mut pending: BTreeSet<String> =
            written.iter().map(|p| p.display().to_string()).collect();
        self.hook(&mut pending, current.epoch.unwrap_or_default())
            .await;
        loop {
            resync |= register;
            let step = async {
                if register {
                    self.client.register_node(self.registration).await?;
                }
                let after = if resync { None } else { current.epoch };
                let asked = tokio::time::Instant::now();
                let outcome = self
                    .client
                    .fetch_newer(self.registration, after, HOLD)
                    .await?;
                Ok::<_, ClientError>((outcome, asked.elapsed()))
            };
            let result = tokio::select! {
                result = step => result,
                () = shutdown.cancelled() => return EXIT_OK,
            };
            let pause = match result {
                Ok((WatchOutcome::Payload(next), _))
                    if newer(&current, &next) || (resync && differs(&current, &next)) =>
                {
                    register = false;
                    backoff.reset();
                    if self.apply(&current, &next, &mut pending).await {
                        current = next;
                        resync = false;
                        None
                    } else {
                        // Not written: the same epoch is asked for again, after a pause.
                        Some(backoff.fail())
                    }
                }
                Ok((WatchOutcome::Payload(_), _)) if resync => {
                    // Back in step with the new server: hold requests again.
                    register = false;
                    resync = false;
                    None
                }
                // A server that ignores `after` answers at once with what the node has.
                Ok((WatchOutcome::Payload(_), took)) if took < Duration::from_secs(1) => {
                    register = false;
                    Some(backoff.fail())
                }
                // A 204 that came at once: a server that will not hold (`--node-wait-max 0`).
                Ok((WatchOutcome::Unchanged, took)) if took < Duration::from_secs(1) => {
                    register = false;
                    Some(backoff.fail())
                }
                Ok((WatchOutcome::Payload(_) | WatchOutcome::Unchanged, _)) => {
                    register = false;
                    backoff.reset();
                    None
                }
                // A server that restarted on an empty store no longer knows the node.
                Ok((WatchOutcome::NotReady(message), _)) => {
                    self.note("waiting", &format!("not ready: {message}"));
                    register = true;
                    Some(backoff.fail())
                }
                Err(ClientError::Refused {
                    code: ErrorCode::MissingConfig,
                    message,
                    ..
                }) => {
                    self.note("registering", &format!("registering again: {message}"));
                    register = true;
                    Some(backoff.fail())
                }
                // Out for good: replaced by another node, or removed from a frozen set.
                Err(
                    err @ ClientError::Refused {
                        code: ErrorCode::Replaced | ErrorCode::Frozen,
                        ..
                    },
                ) => {
                    self.note("error", &format!("error: {err}; no longer watching"));
                    return EXIT_FAILURE;
                }
                Err(err @ ClientError::Unreachable { .. }) => {
                    self.note("waiting", &crate::telemetry::error_chain(&err));
                    register = true;
                    Some(backoff.fail())
                }
                Err(err) => {
                    self.note("error", &format!("error: {err}"));
                    Some(backoff.fail())
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shutdown.cancelled() => return EXIT_OK,
                }
            }
        }
    }

    fn note(&self, event: &str, text: &str) {
        let identifier = &self.registration.identifier;
        self.report
            .problem(event, text, json!({"identifier": identifier}));
    }

    /// Writes `next` all-or-nothing and runs the hook for what changed; `false` when nothing
    /// could be written.
    async fn apply(
        &self,
        current: &NodeArtifactsPayload,
        next: &NodeArtifactsPayload,
        pending: &mut BTreeSet<String>,
    ) -> bool {
        let written = match self.outputs.write_all(&next.files) {
            Ok(written) => written,
            Err(err) => {
                self.note(
                    "error",
                    &format!("error: the new files were not written: {err}"),
                );
                return false;
            }
        };
        let changed = changed_paths(&current.files, &next.files, &written);
        let epoch = next.epoch.unwrap_or_default();
        self.report.progress(
            "written",
            &format!("epoch {epoch}: {} file(s) changed", changed.len()),
            json!({"epoch": epoch, "changed": changed}),
        );
        pending.extend(changed);
        self.hook(pending, epoch).await;
        true
    }

    /// Runs the hook for `pending` (when there is a hook and anything is pending), and forgets
    /// them once it succeeded.
    async fn hook(&self, pending: &mut BTreeSet<String>, epoch: u64) {
        let Some(command) = self.on_change else {
            pending.clear();
            return;
        };
        if pending.is_empty() {
            return;
        }
        let paths: Vec<String> = pending.iter().cloned().collect();
        if self.run_hook(command, &paths, epoch).await {
            pending.clear();
        }
    }

    /// Runs `command` with `sh -c`; a failure is reported and the hook runs again at the next
    /// epoch (the files stay written).
    async fn run_hook(&self, command: &str, changed: &[String], epoch: u64) -> bool {
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .env("BOOTSYNC_CHANGED_PATHS", changed.join("\n"))
            .env("BOOTSYNC_EPOCH", epoch.to_string())
            .env("BOOTSYNC_IDENTIFIER", &self.registration.identifier)
            .status()
            .await;
        match status {
            Ok(status) if status.success() => return true,
            Ok(status) => self.note(
                "hook_failed",
                &format!("--on-change {status}; the files stay written and it runs again at the next epoch"),
            ),
            Err(err) => self.note("hook_failed", &format!("--on-change could not start: {err}")),
        }
        false
    }
}

/// Whether `next` is a payload the node does not have: a newer epoch, or, from a server
/// without epochs, other files.
fn newer(current: &NodeArtifactsPayload, next: &NodeArtifactsPayload) -> bool {
    match (current.epoch, next.epoch) {
        (Some(have), Some(got)) => got > have,
        _ => current.files != next.files,
    }
}

/// Whether `next` differs from `current` at all (after a server lost its state).
fn differs(current: &NodeArtifactsPayload, next: &NodeArtifactsPayload) -> bool {
    current.epoch != next.epoch || current.files != next.files
}

/// The destinations (as written) of the files whose content is new or changed.
fn changed_paths(
    before: &[ArtifactFile],
    after: &[ArtifactFile],
    written: &[PathBuf],
) -> Vec<String> {
    let old: BTreeMap<&str, &str> = before
        .iter()
        .map(|f| (f.path.as_str(), f.content.as_str()))
        .collect();
    after
        .iter()
        .zip(written)
        .filter(|(file, _)| old.get(file.path.as_str()) != Some(&file.content.as_str()))
        .map(|(_, dest)| dest.display().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(epoch: Option<u64>, files: &[(&str, &str)]) -> NodeArtifactsPayload {
        let mut p = NodeArtifactsPayload::new(
            files
                .iter()
                .map(|(p, c)| ArtifactFile::new(*p, *c))
                .collect(),
        );
        p.epoch = epoch;
        p
    }

    #[test]
    fn only_a_newer_epoch_or_other_files_count_as_a_change() {
        let have = payload(Some(7), &[("a", "1")]);
        assert!(newer(&have, &payload(Some(8), &[("a", "1")])));
        assert!(
            !newer(&have, &payload(Some(7), &[("a", "2")])),
            "same epoch"
        );
        let seed = payload(None, &[("a", "1")]);
        assert!(!newer(&seed, &payload(None, &[("a", "1")])));
        assert!(newer(&seed, &payload(None, &[("a", "2")])));
    }

    #[test]
    fn changed_paths_name_new_and_changed_files_by_destination() {
        let before = [
            ArtifactFile::new("peers", "a"),
            ArtifactFile::new("id", "1"),
        ];
        let after = [
            ArtifactFile::new("peers", "a b"),
            ArtifactFile::new("id", "1"),
            ArtifactFile::new("extra", "x"),
        ];
        let written = [
            PathBuf::from("/etc/peers"),
            PathBuf::from("/etc/id"),
            PathBuf::from("/etc/extra"),
        ];
        assert_eq!(
            changed_paths(&before, &after, &written),
            ["/etc/peers", "/etc/extra"]
        );
    }
}
