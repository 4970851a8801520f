//! The static bundle: per-node file sets plus shared files appended to every payload.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ArtifactFile;
use crate::files::{FileError, check_canonical_payload_path, parse_file};

/// One node's files in a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BundleNode {
    /// The node identifier the files are for.
    pub identifier: String,
    /// Its files.
    #[serde(default)]
    pub files: Vec<ArtifactFile>,
}

/// A precomputed bundle, the seed's format (`nodes`, and `shared_files` of later versions).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NodeArtifactsBundle {
    /// Per-node file sets.
    #[serde(default)]
    pub nodes: Vec<BundleNode>,
    /// Files appended to every node's payload.
    #[serde(default)]
    pub shared_files: Vec<ArtifactFile>,
    /// How a change to this bundle reaches a running fleet: in waves; absent, at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<super::plan::RolloutPlan>,
}

impl NodeArtifactsBundle {
    /// Loads and validates a bundle file (YAML or JSON by extension).
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let bundle: Self = parse_file(path)?;
        bundle.validate().map_err(|problems| FileError {
            path: path.display().to_string(),
            problems,
        })?;
        Ok(bundle)
    }

    /// Every problem: duplicate identifiers, bad or duplicate paths in one node's payload.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = self
            .rollout
            .as_ref()
            .map(super::plan::RolloutPlan::problems)
            .unwrap_or_default();
        let mut shared = BTreeSet::new();
        for (i, file) in self.shared_files.iter().enumerate() {
            let at = format!("shared_files[{i}]");
            check_path(&at, &file.path, &mut shared, &mut problems);
        }
        let mut identifiers = BTreeSet::new();
        for (n, node) in self.nodes.iter().enumerate() {
            let at = format!("nodes[{n}] ({:?})", node.identifier);
            if let Err(p) = crate::api::cfgsync::check_identifier(&node.identifier) {
                problems.push(format!("{at}: {p}"));
            }
            if !identifiers.insert(node.identifier.as_str()) {
                problems.push(format!("{at}: duplicate identifier"));
            }
            let mut paths = BTreeSet::new();
            for (f, file) in node.files.iter().enumerate() {
                let new = check_path(
                    &format!("{at}.files[{f}]"),
                    &file.path,
                    &mut paths,
                    &mut problems,
                );
                if new && shared.contains(file.path.as_str()) {
                    problems.push(format!(
                        "{at}.files[{f}]: path {:?} is also a shared file",
                        file.path
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Reports `path` at `at` when it is not canonical or repeats one in `seen`; answers whether it
/// was new.
fn check_path<'a>(
    at: &str,
    path: &'a str,
    seen: &mut BTreeSet<&'a str>,
    problems: &mut Vec<String>,
) -> bool {
    if let Err(p) = check_canonical_payload_path(path) {
        problems.push(format!("{at}: {p}"));
    }
    let new = seen.insert(path);
    if !new {
        problems.push(format!("{at}: duplicate path {path:?}"));
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_reports_every_problem_with_its_location() {
        let bundle: NodeArtifactsBundle = serde_json::from_value(serde_json::json!({
            "nodes": [
                {"identifier": "n1", "files": [{"path": "/a", "content": ""}, {"path": "/a", "content": ""}]},
                {"identifier": "n1", "files": [{"path": "../etc/x", "content": ""}]},
                {"identifier": "n2", "files": [{"path": "s", "content": ""}]}
            ],
            "shared_files": [{"path": "s", "content": ""}]
        }))
        .unwrap();
        let problems = bundle.validate().unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("nodes[0]") && problems[0].contains("duplicate path"));
        assert!(problems[1].contains("nodes[1]") && problems[1].contains("duplicate identifier"));
        assert!(problems[2].contains(".."));
        assert!(problems[3].contains("also a shared file"));
    }

    #[test]
    fn the_seed_yaml_format_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.yaml");
        std::fs::write(
            &path,
            "nodes:\n  - identifier: node-1\n    files:\n      - path: /config.yaml\n        content: \"id: 1\"\nshared_files:\n  - path: deployment-settings.yaml\n    content: \"n: 1\"\n",
        )
        .unwrap();
        let bundle = NodeArtifactsBundle::load(&path).unwrap();
        assert_eq!(bundle.nodes[0].files[0].content, "id: 1");
        assert_eq!(bundle.shared_files[0].path, "deployment-settings.yaml");
    }
}
