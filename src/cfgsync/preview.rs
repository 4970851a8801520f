//! Preview: a candidate policy rendered against the current registrations, without installing
//! it, and compared node by node with what the installed policy renders — how many nodes would
//! change, stay the same or fail, and a unified diff for the first few.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::epoch::{Registrations, members};
use super::policy::{CompiledPolicy, Policy};
use super::service::Service;
use super::template::Scope;
use crate::api::cfgsync::ArtifactFile;
use crate::api::rollout::{NodeDiff, PreviewBody, PreviewFailure};

/// One policy's view of the members: its scope and its shared files.
struct Side {
    policy: CompiledPolicy,
    scope: Scope,
    shared: Result<Vec<ArtifactFile>, String>,
}

impl Side {
    fn new(policy: CompiledPolicy, registrations: &Registrations) -> Self {
        let scope = Scope::new(
            members(registrations, &policy)
                .into_iter()
                .map(|r| (r.identifier.as_str(), r.ip, &r.metadata)),
        );
        let shared = policy.render_shared(&scope).map_err(|e| e.to_string());
        Self {
            policy,
            scope,
            shared,
        }
    }

    /// The node's whole payload as this policy renders it (none when it does not serve it).
    fn files(&self, identifier: &str) -> Result<Vec<ArtifactFile>, String> {
        let Some(index) = self.scope.index_of(identifier) else {
            return Ok(Vec::new());
        };
        let shared = self.shared.as_ref().map_err(Clone::clone)?;
        let budget = self.policy.limits().max_payload_bytes;
        let mut files = self
            .policy
            .render_node(&self.scope, index, budget)
            .map_err(|e| e.to_string())?;
        files.extend(shared.iter().cloned());
        Ok(files)
    }
}

/// What one thread found for its share of the nodes.
#[derive(Default)]
struct Tally {
    changed: Vec<String>,
    unchanged: usize,
    failed: Vec<PreviewFailure>,
}

/// Why a preview was not made.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    /// The candidate is invalid, or the node asked for is unknown (every problem listed).
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    /// Another preview is running: one renders the whole fleet on every core already.
    #[error("another preview is running; retry when it has finished")]
    Busy,
}

impl Service {
    /// Renders `candidate` for every registered node and compares it with the installed
    /// policy's render; diffs for `node` only, or for the first `show` changed nodes. The
    /// candidate's problems are returned as they would be at install.
    pub async fn preview(
        &self,
        candidate: Policy,
        node: Option<&str>,
        show: usize,
    ) -> Result<PreviewBody, PreviewError> {
        let started = Instant::now();
        let _one = self
            .previewing
            .try_acquire()
            .map_err(|_| PreviewError::Busy)?;
        let candidate = candidate
            .compile_with(self.options.render_limits)
            .map_err(PreviewError::Invalid)?;
        let serving = self.current();
        if let Some(node) = node
            && serving.registration(node).is_none()
        {
            return Err(PreviewError::Invalid(vec![format!(
                "node {node:?} is not registered"
            )]));
        }
        let installed = serving.policy.clone();
        let installed_version = serving.policy_version;
        let registrations = serving.registrations.clone();
        let node = node.map(str::to_string);
        let ready = {
            let named = registrations
                .keys()
                .filter(|id| candidate.serves(id))
                .count();
            candidate.is_ready(registrations.len(), named)
        };
        let nodes = registrations.len();
        let work = move || compare(&registrations, installed, candidate, node.as_deref(), show);
        let (tally, diffs) = self
            .renderers
            .pool
            .run(work)
            .await
            .map_err(|err| PreviewError::Invalid(vec![err]))?;
        Ok(PreviewBody {
            installed: installed_version,
            nodes,
            ready,
            changed: tally.changed.len(),
            unchanged: tally.unchanged,
            failed: tally.failed,
            diffs,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
    }
}

/// Compares every node on all cores, then diffs the nodes to show.
fn compare(
    registrations: &Registrations,
    installed: Option<CompiledPolicy>,
    candidate: CompiledPolicy,
    node: Option<&str>,
    show: usize,
) -> (Tally, Vec<NodeDiff>) {
    let ids: Vec<Arc<str>> = registrations.keys().cloned().collect();
    let (old, new) = std::thread::scope(|s| {
        let old = s.spawn(|| installed.map(|p| Side::new(p, registrations)));
        let new = Side::new(candidate, registrations);
        (old.join().ok().flatten(), new)
    });
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = ids.len().div_ceil(threads).max(1);
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let workers: Vec<_> = ids
            .chunks(chunk)
            .map(|part| {
                let (old, new) = (old.as_ref(), &new);
                s.spawn(move || {
                    let mut tally = Tally::default();
                    for id in part {
                        let candidate = match new.files(id) {
                            Ok(files) => files,
                            Err(reason) => {
                                tally.failed.push(PreviewFailure {
                                    identifier: id.to_string(),
                                    reason,
                                });
                                continue;
                            }
                        };
                        let before = old.map(|o| o.files(id)).unwrap_or(Ok(Vec::new()));
                        if before.as_ref().is_ok_and(|b| *b == candidate) {
                            tally.unchanged += 1;
                        } else {
                            tally.changed.push(id.to_string());
                        }
                    }
                    tally
                })
            })
            .collect();
        workers.into_iter().filter_map(|w| w.join().ok()).collect()
    });
    let mut tally = Tally::default();
    for part in tallies {
        tally.changed.extend(part.changed);
        tally.unchanged += part.unchanged;
        tally.failed.extend(part.failed);
    }
    let shown: Vec<&str> = match node {
        Some(node) => vec![node],
        None => tally
            .changed
            .iter()
            .take(show)
            .map(String::as_str)
            .collect(),
    };
    let diffs = shown
        .into_iter()
        .map(|id| NodeDiff {
            identifier: id.to_string(),
            diff: diff_files(
                &old.as_ref()
                    .map(|o| o.files(id).unwrap_or_default())
                    .unwrap_or_default(),
                &new.files(id).unwrap_or_default(),
            ),
        })
        .collect();
    (tally, diffs)
}

/// A unified diff per file that differs (a file only on one side diffs against nothing).
fn diff_files(before: &[ArtifactFile], after: &[ArtifactFile]) -> String {
    let old: BTreeMap<&str, &str> = before
        .iter()
        .map(|f| (f.path.as_str(), f.content.as_str()))
        .collect();
    let new: BTreeMap<&str, &str> = after
        .iter()
        .map(|f| (f.path.as_str(), f.content.as_str()))
        .collect();
    let mut paths: Vec<&str> = old.keys().chain(new.keys()).copied().collect();
    paths.sort_unstable();
    paths.dedup();
    let mut out = String::new();
    for path in paths {
        let (a, b) = (old.get(path).copied(), new.get(path).copied());
        if a == b {
            continue;
        }
        let text = similar::TextDiff::from_lines(a.unwrap_or(""), b.unwrap_or(""));
        let from = if a.is_some() {
            format!("a/{path}")
        } else {
            "/dev/null".into()
        };
        let to = if b.is_some() {
            format!("b/{path}")
        } else {
            "/dev/null".into()
        };
        out.push_str(&text.unified_diff().header(&from, &to).to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_names_each_changed_file_and_skips_the_same_ones() {
        let before = [
            ArtifactFile::new("peers", "a\nb\n"),
            ArtifactFile::new("id", "1\n"),
            ArtifactFile::new("gone", "x\n"),
        ];
        let after = [
            ArtifactFile::new("peers", "a\nc\n"),
            ArtifactFile::new("id", "1\n"),
        ];
        let diff = diff_files(&before, &after);
        assert!(diff.contains("--- a/peers\n+++ b/peers\n"), "{diff}");
        assert!(diff.contains("-b\n+c\n"), "{diff}");
        assert!(diff.contains("--- a/gone\n+++ /dev/null\n"), "{diff}");
        assert!(!diff.contains("a/id"), "{diff}");
    }
}
