//! The watch of `bootsync client --watch`: after the first write, keep the node's files
//! current. One request is held at the server until a newer epoch exists; the new set is
//! written all-or-nothing, then the hook (`--on-change`) runs with the changed paths in its
//! environment, and the node reports what it applied. A library type, so a load generator
//! runs the same code for a thousand nodes in one process.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::client::{CfgsyncClient, ClientError, WatchOutcome};
use super::{ArtifactFile, ArtifactOutputMap, NodeArtifactsPayload, NodeRegistration};
use crate::api::ErrorCode;
use crate::api::rollout::{self, MAX_STDERR_TAIL, Outcome, ReportBody};
use crate::backoff::Backoff;

/// How long each watch request asks the server to hold it (servers cap it, 60 s by default):
/// 40–55 s, at random, so the requests of a fleet that one change woke together do not all
/// end, and move to another server, in the same second.
fn hold() -> Duration {
    Duration::from_millis(40_000 + fastrand::u64(0..=15_000))
}

/// The longest pause between two tries, whatever a server's `Retry-After` says.
const LONGEST_PAUSE: Duration = Duration::from_secs(60);

/// Changed paths up to this size also go in `BOOTSYNC_CHANGED_PATHS`; the list is always in
/// the file `BOOTSYNC_CHANGED_PATHS_FILE` names (Linux refuses to start a program with one
/// environment string past 128 KiB, and the whole environment shares the argument space).
const CHANGED_PATHS_ENV_MAX: usize = 32 << 10;

/// Where a watch tells what it does: each event has a name, a line for people and fields for
/// machines (the CLI prints them as text or JSON lines).
pub trait Events: Send + Sync {
    /// Something happened as it should (`written`, `server`, `waiting`).
    fn progress(&self, event: &str, text: &str, fields: serde_json::Value);
    /// Something went wrong (`error`, `hook_failed`, `registering`).
    fn problem(&self, event: &str, text: &str, fields: serde_json::Value);
}

/// How a watch ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown was asked for.
    Shutdown,
    /// The node is out for good: replaced by another, or removed from a frozen set.
    Out,
}

/// What the watch needs besides the client.
pub struct Watch<'a> {
    /// The client of the node's servers.
    pub client: &'a CfgsyncClient,
    /// The node.
    pub registration: &'a NodeRegistration,
    /// Where its files go.
    pub outputs: &'a ArtifactOutputMap,
    /// The shell command run after each write that changed files.
    pub on_change: Option<&'a str>,
    /// Where it tells what it does.
    pub events: &'a dyn Events,
    /// Least time between two runs of the hook: epochs that come faster are coalesced, and
    /// the newest wins.
    pub min_hook_interval: Duration,
}

impl Watch<'_> {
    /// Watches from `first` (just written to `written`) until `shutdown`. The hook runs for the
    /// first write too, so a watcher that restarted reloads what it may have changed.
    pub async fn run(
        &self,
        first: NodeArtifactsPayload,
        written: &[PathBuf],
        shutdown: CancellationToken,
    ) -> Ended {
        let mut current = first;
        // Spaces the requests to a server that does not hold them, or that is not there.
        let mut backoff = Backoff::new(Duration::from_secs(1), LONGEST_PAUSE);
        let mut register = false;
        // After registering again, the server may be a new one whose epochs started over:
        // its current payload is taken as it is, whatever its epoch.
        let mut resync = false;
        // Files changed since the hook last succeeded: a failed hook sees them again.
        let mut pending: BTreeSet<String> =
            written.iter().map(|p| p.display().to_string()).collect();
        let mut last_hook = tokio::time::Instant::now();
        let mut reporting = Reporting {
            enabled: true,
            undelivered: None,
        };
        let mut server = self.client.server();
        let started = std::time::Instant::now();
        let Some(outcome) = self
            .hook(&mut pending, current.epoch.unwrap_or_default(), &shutdown)
            .await
        else {
            return Ended::Shutdown;
        };
        self.report(&current, outcome, started, &mut reporting)
            .await;
        loop {
            // Epochs that come faster than the hook may run are coalesced: the next one is
            // asked for only once the interval has passed, and the server answers with the
            // newest.
            let next_hook = last_hook + self.min_hook_interval;
            tokio::select! {
                () = tokio::time::sleep_until(next_hook) => {}
                () = shutdown.cancelled() => return Ended::Shutdown,
            }
            // A report the server did not get (it restarted, say) is sent again first: a wave
            // waits for it, and the same files at a later epoch are not reported.
            self.deliver(&mut reporting).await;
            resync |= register;
            let step = async {
                if register {
                    self.client.register_node(self.registration).await?;
                }
                let after = if resync { None } else { current.epoch };
                let asked = tokio::time::Instant::now();
                let outcome = self
                    .client
                    .fetch_newer(self.registration, after, hold())
                    .await?;
                Ok::<_, ClientError>((outcome, asked.elapsed()))
            };
            let result = tokio::select! {
                result = step => result,
                () = shutdown.cancelled() => return Ended::Shutdown,
            };
            self.note_server(&mut server);
            let pause = match result {
                // A new epoch with the same files and version (a rollout's wave moved past
                // this node, a peer's heartbeat, another server's view of the same state):
                // nothing to write, run or report.
                Ok((WatchOutcome::Payload(next), _))
                    if takes(&current, &next, resync)
                        && next.files == current.files
                        && next.version == current.version =>
                {
                    register = false;
                    backoff.reset();
                    resync = false;
                    current = next;
                    None
                }
                Ok((WatchOutcome::Payload(next), _)) if takes(&current, &next, resync) => {
                    register = false;
                    backoff.reset();
                    let started = std::time::Instant::now();
                    match self.apply(&current, &next, &mut pending, &shutdown).await {
                        Applied::Written(outcome) => {
                            self.report(&next, outcome, started, &mut reporting).await;
                            current = next;
                            resync = false;
                            last_hook = tokio::time::Instant::now();
                            None
                        }
                        Applied::Stopped => return Ended::Shutdown,
                        // Not written: the same epoch is asked for again, after a pause.
                        Applied::NotWritten(why) => {
                            let outcome = HookOutcome::failed(None, why);
                            self.report(&next, outcome, started, &mut reporting).await;
                            Some(backoff.fail())
                        }
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
                // Not known here (404), or, in strict mode, no record for the node's secret
                // (401): a server whose store started afresh. Registering again fixes both.
                Err(ClientError::Refused {
                    code: ErrorCode::MissingConfig | ErrorCode::Unauthorized,
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
                    return Ended::Out;
                }
                // No server answered. The registration, the secret and the epoch are kept: a
                // server that comes back on the same store knows them, and one that lost them
                // says so (425 or 404), which registers again.
                Err(err @ ClientError::Unreachable { .. }) => {
                    self.note("waiting", &crate::telemetry::error_chain(&err));
                    Some(backoff.fail())
                }
                // Anything else (a 429 for changing too often among them): after a pause at
                // least as long as the server asked for, within the backoff's longest.
                Err(err) => {
                    self.note("error", &format!("error: {err}"));
                    let asked = err.retry_after().unwrap_or_default().min(LONGEST_PAUSE);
                    Some(backoff.fail().max(asked))
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shutdown.cancelled() => return Ended::Shutdown,
                }
            }
        }
    }

    /// Tells the server what became of `payload` (`POST /report`), unless it said it does not
    /// take reports; one not delivered is kept and sent again by [`Self::deliver`].
    async fn report(
        &self,
        payload: &NodeArtifactsPayload,
        outcome: HookOutcome,
        started: std::time::Instant,
        reporting: &mut Reporting,
    ) {
        let Some(epoch) = payload.epoch else {
            return;
        };
        reporting.undelivered = Some(ReportBody {
            identifier: self.registration.identifier.clone(),
            applied: rollout::Applied {
                epoch,
                version: payload.version,
                result: if outcome.ok {
                    Outcome::Ok
                } else {
                    Outcome::Failed
                },
                exit_status: outcome.exit_status,
                stderr_tail: (!outcome.stderr_tail.is_empty())
                    .then(|| super::report::tail(&outcome.stderr_tail).to_string()),
                duration_ms: started.elapsed().as_millis() as u64,
            },
        });
        self.deliver(reporting).await;
    }

    /// Sends the report not yet delivered, if any. It is kept after a failure the server calls
    /// transient (or no answer), and dropped after a refusal, which would not change.
    async fn deliver(&self, reporting: &mut Reporting) {
        let Some(body) = reporting.undelivered.take().filter(|_| reporting.enabled) else {
            return;
        };
        match self.client.report(&body).await {
            Ok(true) => {}
            Ok(false) => reporting.enabled = false,
            Err(err) => {
                self.note("error", &format!("the apply was not reported: {err}"));
                let transient = match &err {
                    ClientError::Refused { code, .. } => code.is_transient(),
                    _ => true,
                };
                if transient {
                    reporting.undelivered = Some(body);
                }
            }
        }
    }

    /// Says which server the watch uses, when it moved to another.
    fn note_server(&self, last: &mut String) {
        let now = self.client.server();
        if now != *last {
            self.events.progress(
                "server",
                &format!("now using {now} (was {last})"),
                json!({"identifier": self.registration.identifier, "server": now, "was": *last}),
            );
            *last = now;
        }
    }

    fn note(&self, event: &str, text: &str) {
        let identifier = &self.registration.identifier;
        self.events
            .problem(event, text, json!({"identifier": identifier}));
    }

    /// Writes `next` all-or-nothing, deletes what it dropped (beneath the output folder),
    /// and runs the hook for what changed.
    async fn apply(
        &self,
        current: &NodeArtifactsPayload,
        next: &NodeArtifactsPayload,
        pending: &mut BTreeSet<String>,
        shutdown: &CancellationToken,
    ) -> Applied {
        let written = match self.outputs.write_all(&next.files) {
            Ok(written) => written,
            Err(err) => {
                self.note(
                    "error",
                    &format!("error: the new files were not written: {err}"),
                );
                return Applied::NotWritten(format!("the new files were not written: {err}"));
            }
        };
        let mut changed = changed_paths(&current.files, &next.files, &written);
        let removed = self.outputs.remove_dropped(&current.files, &next.files);
        changed.extend(removed.iter().map(|p| p.display().to_string()));
        let epoch = next.epoch.unwrap_or_default();
        self.events.progress(
            "written",
            &format!(
                "epoch {epoch}: {} file(s) changed, {} removed",
                changed.len() - removed.len(),
                removed.len()
            ),
            json!({"epoch": epoch, "version": next.version, "changed": changed, "removed": removed}),
        );
        pending.extend(changed);
        match self.hook(pending, epoch, shutdown).await {
            Some(outcome) => Applied::Written(outcome),
            None => Applied::Stopped,
        }
    }

    /// Runs the hook for `pending` (when there is a hook and anything is pending), and forgets
    /// them once it succeeded. `None` when SIGTERM came meanwhile: the hook was stopped.
    async fn hook(
        &self,
        pending: &mut BTreeSet<String>,
        epoch: u64,
        shutdown: &CancellationToken,
    ) -> Option<HookOutcome> {
        let Some(command) = self.on_change else {
            pending.clear();
            return Some(HookOutcome::ok());
        };
        if pending.is_empty() {
            return Some(HookOutcome::ok());
        }
        let paths: Vec<String> = pending.iter().cloned().collect();
        let outcome = self.run_hook(command, &paths, epoch, shutdown).await?;
        if outcome.ok {
            pending.clear();
        }
        Some(outcome)
    }

    /// Runs `command` with `sh -c`, its stderr passed through and its tail kept: how it went
    /// (a failure is noted; it runs again at the next epoch, and the files stay written), or
    /// `None` when SIGTERM came first (the hook is sent SIGTERM too, and not waited for).
    async fn run_hook(
        &self,
        command: &str,
        changed: &[String],
        epoch: u64,
        shutdown: &CancellationToken,
    ) -> Option<HookOutcome> {
        let list = changed.join("\n");
        let file = match changed_paths_file(&list) {
            Ok(file) => file,
            Err(err) => {
                self.note(
                    "hook_failed",
                    &format!("--on-change not run: cannot write the changed paths: {err}"),
                );
                return Some(HookOutcome::failed(
                    None,
                    format!("the changed paths could not be written: {err}"),
                ));
            }
        };
        let mut hook = tokio::process::Command::new("sh");
        hook.arg("-c")
            .arg(command)
            .env("BOOTSYNC_CHANGED_PATHS_FILE", file.path())
            .env("BOOTSYNC_EPOCH", epoch.to_string())
            .env("BOOTSYNC_IDENTIFIER", &self.registration.identifier)
            // Its own process group, so SIGTERM reaches what the hook started too.
            .process_group(0)
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if list.len() <= CHANGED_PATHS_ENV_MAX {
            hook.env("BOOTSYNC_CHANGED_PATHS", &list);
        }
        let mut child = match hook.spawn() {
            Ok(child) => child,
            Err(err) => {
                self.note(
                    "hook_failed",
                    &format!("--on-change could not start: {err}"),
                );
                return Some(HookOutcome::failed(
                    None,
                    format!("--on-change could not start: {err}"),
                ));
            }
        };
        let stderr = child.stderr.take();
        let tail = tokio::spawn(pass_stderr_through(stderr));
        let status = tokio::select! {
            status = child.wait() => status,
            () = shutdown.cancelled() => {
                if let Some(group) = child.id().and_then(|id| rustix::process::Pid::from_raw(id as i32)) {
                    let _ = rustix::process::kill_process_group(group, rustix::process::Signal::TERM);
                }
                return None;
            }
        };
        // The hook has exited; what it left running may hold stderr open, so the tail is
        // waited for only briefly.
        let stderr_tail = tokio::time::timeout(Duration::from_secs(1), tail)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        match status {
            Ok(status) if status.success() => Some(HookOutcome::ok()),
            Ok(status) => {
                self.note(
                    "hook_failed",
                    &format!("--on-change {status}; the files stay written and it runs again at the next epoch"),
                );
                Some(HookOutcome::failed(status.code(), stderr_tail))
            }
            Err(err) => {
                self.note(
                    "hook_failed",
                    &format!("--on-change could not be waited for: {err}"),
                );
                Some(HookOutcome::failed(None, err.to_string()))
            }
        }
    }
}

/// Copies the hook's stderr to ours as it comes, and returns its last 2 KiB.
async fn pass_stderr_through(stderr: Option<tokio::process::ChildStderr>) -> String {
    use std::io::Write as _;
    use tokio::io::AsyncReadExt as _;
    let Some(mut stderr) = stderr else {
        return String::new();
    };
    let ours = std::io::stderr();
    let mut kept: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = stderr.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        let _ = ours.lock().write_all(&chunk[..n]);
        kept.extend_from_slice(&chunk[..n]);
        if kept.len() > 2 * MAX_STDERR_TAIL {
            kept.drain(..kept.len() - MAX_STDERR_TAIL);
        }
    }
    let text = String::from_utf8_lossy(&kept);
    super::report::tail(&text).to_string()
}

/// What the watcher owes the server.
struct Reporting {
    /// Whether the server takes reports (a seed server or an older bootsync does not).
    enabled: bool,
    /// The latest report, until it is delivered.
    undelivered: Option<ReportBody>,
}

/// How the hook went.
struct HookOutcome {
    ok: bool,
    exit_status: Option<i32>,
    stderr_tail: String,
}

impl HookOutcome {
    fn ok() -> Self {
        Self {
            ok: true,
            exit_status: None,
            stderr_tail: String::new(),
        }
    }

    fn failed(exit_status: Option<i32>, stderr_tail: String) -> Self {
        Self {
            ok: false,
            exit_status,
            stderr_tail,
        }
    }
}

/// How applying a payload ended.
enum Applied {
    /// Written, and the hook ran (or was not needed).
    Written(HookOutcome),
    /// Nothing was written, and why.
    NotWritten(String),
    /// SIGTERM came while the hook ran.
    Stopped,
}

/// The changed paths, one per line, in a private temporary file the hook can read; removed
/// when dropped.
fn changed_paths_file(list: &str) -> std::io::Result<ChangedPaths> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = std::env::temp_dir();
    for _ in 0..8 {
        let tag: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(16)
            .collect();
        let path = dir.join(format!("bootsync-changed-{tag}"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut file) => {
                file.write_all(list.as_bytes())?;
                file.write_all(b"\n")?;
                return Ok(ChangedPaths(path));
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err),
        }
    }
    Err(std::io::Error::other(
        "no free name for the changed-paths file",
    ))
}

/// The file of changed paths given to one run of the hook.
struct ChangedPaths(PathBuf);

impl ChangedPaths {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ChangedPaths {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
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

/// Whether the watch takes `next` in place of `current`: a newer payload; after registering
/// again (`resync`), any other one; and an older epoch, which only a server on another store
/// answers with (one on this store holds `after` until a newer epoch), so its epochs are the
/// ones to follow from now on.
fn takes(current: &NodeArtifactsPayload, next: &NodeArtifactsPayload, resync: bool) -> bool {
    let older = matches!((current.epoch, next.epoch), (Some(have), Some(got)) if got < have);
    newer(current, next) || (resync && differs(current, next)) || older
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
    fn an_older_epoch_is_taken_only_as_another_store_answers_it() {
        let have = payload(Some(40), &[("a", "1")]);
        // A server on another store (or a store started afresh) counts from lower epochs.
        assert!(takes(&have, &payload(Some(3), &[("a", "1")]), false));
        assert!(takes(&have, &payload(Some(41), &[("a", "1")]), false));
        assert!(
            !takes(&have, &payload(Some(40), &[("a", "2")]), false),
            "same epoch"
        );
        assert!(
            takes(&have, &payload(Some(40), &[("a", "2")]), true),
            "after registering again"
        );
        assert!(
            !takes(&have, &payload(Some(40), &[("a", "1")]), true),
            "nothing differs"
        );
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
