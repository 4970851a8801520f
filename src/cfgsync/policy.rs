//! The policy file and the declarative materializer: wait for a set of nodes, then render each
//! node's files from templates with the node, its index, every node and its peers in scope.
//! The template runtime itself is [`super::template`].

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::materialize::{
    DynCfgsyncError, NodeArtifacts, NodeArtifactsCatalog, RegistrationSnapshot,
    RegistrationSnapshotMaterializer,
};
use super::template::{Laid, Scope, Templates};
use super::{ArtifactFile, NodeRegistration};
use crate::files::{FileError, check_canonical_payload_path, parse_file};

pub use super::plan::RolloutPlan;
pub use super::template::RenderLimits;

/// One templated file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateFile {
    /// Payload path of the rendered file.
    pub path: String,
    /// minijinja template source.
    pub template: String,
}

/// What a re-registration with a different IP does.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OnNewIp {
    /// Record the new IP (and re-render everyone's files unless frozen).
    #[default]
    Update,
    /// Refuse with 409: an identifier keeps the IP it first registered with.
    Reject,
}

/// A registration policy, as in `bootsync serve --policy FILE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Ready once this many identifiers registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_nodes: Option<usize>,
    /// Or: ready once every one of these identifiers registered (and only they are served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_identifiers: Option<Vec<String>>,
    /// Once ready, refuse new identifiers (409) instead of changing everyone's files.
    #[serde(default)]
    pub freeze_on_ready: bool,
    /// Most registrations accepted (409 past it); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_registrations: Option<usize>,
    /// What a re-registration with a new IP does.
    #[serde(default)]
    pub on_new_ip: OnNewIp,
    /// Files rendered per node.
    #[serde(default)]
    pub files: Vec<TemplateFile>,
    /// Files rendered once and appended to every node's payload.
    #[serde(default)]
    pub shared_files: Vec<TemplateFile>,
    /// How a change to this policy reaches a running fleet: in waves (see
    /// [`RolloutPlan`]); absent, every node gets it at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutPlan>,
}

impl Policy {
    /// Whether the deployment is ready with `registered` nodes registered, `named` of them in
    /// `expect_identifiers`: a count or a named set, so nothing is rendered to decide it.
    pub fn is_ready(&self, registered: usize, named: usize) -> bool {
        match (&self.expect_nodes, &self.expect_identifiers) {
            (Some(n), _) => registered >= *n,
            (_, Some(ids)) => named >= ids.len(),
            (None, None) => false,
        }
    }

    /// Whether membership is frozen: the one rule, used by admission (on the ledger's counts)
    /// and by the view. A policy that freezes does so once it is ready.
    pub fn is_frozen(&self, registered: usize, named: usize) -> bool {
        self.freeze_on_ready && self.is_ready(registered, named)
    }

    /// Loads, validates and compiles a policy file (YAML or JSON by extension).
    pub fn load(path: &Path) -> Result<CompiledPolicy, FileError> {
        let policy: Policy = parse_file(path)?;
        policy.compile().map_err(|problems| FileError {
            path: path.display().to_string(),
            problems,
        })
    }

    /// Validates and compiles every template under the default [`RenderLimits`], reporting all
    /// problems at once.
    pub fn compile(self) -> Result<CompiledPolicy, Vec<String>> {
        self.compile_with(RenderLimits::default())
    }

    /// As [`Policy::compile`], with these limits on every render.
    pub fn compile_with(self, limits: RenderLimits) -> Result<CompiledPolicy, Vec<String>> {
        let mut problems = Vec::new();
        match (&self.expect_nodes, &self.expect_identifiers) {
            (None, None) => problems.push("set expect_nodes or expect_identifiers".to_string()),
            (Some(_), Some(_)) => {
                problems.push("set only one of expect_nodes and expect_identifiers".to_string())
            }
            (Some(0), _) => problems.push("expect_nodes must be at least 1".to_string()),
            (_, Some(ids)) => {
                let mut seen = BTreeSet::new();
                for (i, id) in ids.iter().enumerate() {
                    if let Err(p) = crate::api::cfgsync::check_identifier(id) {
                        problems.push(format!("expect_identifiers[{i}]: {p}"));
                    }
                    if !seen.insert(id) {
                        problems.push(format!("expect_identifiers[{i}]: duplicate {id:?}"));
                    }
                }
                if ids.is_empty() {
                    problems.push("expect_identifiers must not be empty".to_string());
                }
            }
            _ => {}
        }
        if let Some(plan) = &self.rollout {
            problems.extend(plan.problems());
        }
        if self.files.is_empty() && self.shared_files.is_empty() {
            problems.push("the policy renders no files: add files or shared_files".to_string());
        }
        let mut templates = Templates::new(limits);
        let mut unbounded = None;
        let mut paths = BTreeSet::new();
        for (section, list) in [("files", &self.files), ("shared_files", &self.shared_files)] {
            for (i, file) in list.iter().enumerate() {
                if let Err(p) = check_canonical_payload_path(&file.path) {
                    problems.push(format!("{section}[{i}]: {p}"));
                }
                if !paths.insert(file.path.clone()) {
                    problems.push(format!("{section}[{i}]: duplicate path {:?}", file.path));
                }
                let name = format!("{section}/{i}");
                let added = match section {
                    "files" => templates.add_per_node(name, file.template.clone()),
                    _ => templates.add(name, file.template.clone()),
                };
                if let Err(err) = added {
                    problems.push(format!(
                        "{section}[{i}] ({}): template error: {err}",
                        file.path
                    ));
                } else if unbounded.is_none()
                    && let Err(why) = super::template::growth(&file.template)
                {
                    unbounded = Some(Arc::from(format!(
                        "{section}[{i}] ({}) has {why}",
                        file.path
                    )));
                }
            }
        }
        if problems.is_empty() {
            let named = self
                .expect_identifiers
                .as_ref()
                .map(|ids| Arc::new(ids.iter().cloned().collect()));
            Ok(CompiledPolicy {
                policy: Arc::new(self),
                templates: Arc::new(templates),
                named,
                unbounded,
            })
        } else {
            Err(problems)
        }
    }
}

/// A validated policy with its templates compiled.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    /// Shared: the serving view clones the compiled policy on every change of the set.
    policy: Arc<Policy>,
    templates: Arc<Templates>,
    /// `expect_identifiers` as a set: membership is asked on every registration.
    named: Option<Arc<std::collections::HashSet<String>>>,
    /// Why some template could build values without bound: its renders then run in a
    /// render process under a memory limit. `None`: every render runs in this process.
    unbounded: Option<Arc<str>>,
}

impl CompiledPolicy {
    /// The policy as written.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Whether the deployment is ready with `registered` nodes registered, `named` of them in
    /// `expect_identifiers`: a count or a named set, so nothing is rendered to decide it.
    pub fn is_ready(&self, registered: usize, named: usize) -> bool {
        self.policy.is_ready(registered, named)
    }

    /// Whether `identifier` is served once ready: every registered node, or only the named set.
    pub fn serves(&self, identifier: &str) -> bool {
        self.named
            .as_ref()
            .is_none_or(|ids| ids.contains(identifier))
    }

    /// Whether readiness depends on a named set (so registrations must be counted against it).
    pub fn is_named(&self) -> bool {
        self.named.is_some()
    }

    /// The nodes that make up the deployment once ready, or `None` while not ready.
    pub fn members<'a>(
        &self,
        snapshot: &'a RegistrationSnapshot,
    ) -> Option<Vec<&'a NodeRegistration>> {
        let named = snapshot
            .iter()
            .filter(|n| self.serves(&n.identifier))
            .count();
        let ready = self.is_ready(snapshot.len(), named);
        ready.then(|| {
            snapshot
                .iter()
                .filter(|n| self.serves(&n.identifier))
                .collect()
        })
    }

    /// The limits every render runs under.
    pub fn limits(&self) -> RenderLimits {
        self.templates.limits()
    }

    /// Why some template could build values without bound (its renders then run in a render
    /// process under a memory limit), or `None`.
    pub fn unbounded(&self) -> Option<&str> {
        self.unbounded.as_deref()
    }

    /// The shared files of an epoch (rendered once per epoch by the server).
    pub fn render_shared(&self, scope: &Scope) -> Result<Vec<ArtifactFile>, DynCfgsyncError> {
        let paths: Vec<String> = self
            .policy
            .shared_files
            .iter()
            .map(|f| f.path.clone())
            .collect();
        let budget = self.limits().max_payload_bytes;
        self.templates
            .render_files("shared_files", &paths, scope, None, budget)
    }

    /// The files of the member at `index` in `scope`, within `budget` bytes in all (what the
    /// payload's limit leaves after its shared files).
    pub fn render_node(
        &self,
        scope: &Scope,
        index: usize,
        budget: usize,
    ) -> Result<Vec<ArtifactFile>, DynCfgsyncError> {
        let laid = self.render_node_files(scope, index, budget, false)?;
        Ok(laid.into_iter().map(|l| l.file).collect())
    }

    /// Does the work per-node renders share, once per scope: the spliced loops' renders and
    /// the IP list (later calls are lookups).
    pub fn prepare(&self, scope: &Scope) {
        self.templates.prepare(scope);
    }

    /// As [`CompiledPolicy::render_node`], saying which parts of each file are slices of texts
    /// the epoch's nodes share, for an answer body that copies their escaped bytes and a gzip
    /// answer that reuses their compressed blocks.
    pub fn render_node_laid(
        &self,
        scope: &Scope,
        index: usize,
        budget: usize,
    ) -> Result<Vec<Laid>, DynCfgsyncError> {
        self.render_node_files(scope, index, budget, true)
    }

    fn render_node_files(
        &self,
        scope: &Scope,
        index: usize,
        budget: usize,
        spans: bool,
    ) -> Result<Vec<Laid>, DynCfgsyncError> {
        let paths: Vec<String> = self.policy.files.iter().map(|f| f.path.clone()).collect();
        self.templates
            .render_laid("files", &paths, scope, Some(index), budget, spans)
    }
}

impl RegistrationSnapshotMaterializer for CompiledPolicy {
    fn materialize_snapshot(
        &self,
        registrations: &RegistrationSnapshot,
    ) -> Result<Option<NodeArtifactsCatalog>, DynCfgsyncError> {
        let Some(members) = self.members(registrations) else {
            return Ok(None);
        };
        let scope = Scope::new(
            members
                .iter()
                .map(|m| (m.identifier.as_str(), m.ip, &m.metadata)),
        );
        let shared = self.render_shared(&scope)?;
        let shared_bytes: usize = shared.iter().map(|f| f.content.len()).sum();
        let budget = self.limits().max_payload_bytes.saturating_sub(shared_bytes);
        let mut out = Vec::with_capacity(members.len());
        for (index, member) in members.iter().enumerate() {
            let files = self
                .render_node(&scope, index, budget)
                .map_err(|err| format!("{err} for {}", member.identifier))?;
            out.push(NodeArtifacts {
                identifier: member.identifier.clone(),
                files,
            });
        }
        Ok(Some(
            NodeArtifactsCatalog::new(out).with_shared_files(shared),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Result<CompiledPolicy, Vec<String>> {
        let policy: Policy = serde_saphyr::from_str(yaml).unwrap();
        policy.compile()
    }

    fn snapshot(n: usize) -> RegistrationSnapshot {
        let nodes = (0..n)
            .map(|i| {
                NodeRegistration::new(
                    format!("node-{i}"),
                    format!("10.0.0.{}", i + 1).parse().unwrap(),
                )
                .with_metadata(&serde_json::json!({"port": 3000 + i}))
                .unwrap()
            })
            .collect();
        RegistrationSnapshot::new(nodes, n as u64)
    }

    const THREE: &str = r#"
expect_nodes: 3
files:
  - path: /config.yaml
    template: |
      id: {{ node.identifier }} index: {{ index }} port: {{ node.metadata.port }}
      peers: [{% for p in peers %}"{{ p.ip }}"{% if not loop.last %}, {% endif %}{% endfor %}]
shared_files:
  - path: deployment-settings.yaml
    template: "nodes: {{ nodes | length }}"
"#;

    #[test]
    fn renders_each_node_with_its_index_peers_and_metadata_once_ready() {
        let compiled = policy(THREE).unwrap();
        assert!(
            compiled
                .materialize_snapshot(&snapshot(2))
                .unwrap()
                .is_none(),
            "2 of 3 is not ready"
        );
        let catalog = compiled
            .materialize_snapshot(&snapshot(3))
            .unwrap()
            .unwrap();
        assert_eq!(catalog.nodes.len(), 3);
        let second = &catalog.nodes[1].files[0].content;
        assert!(
            second.contains("id: node-1 index: 1 port: 3001"),
            "{second}"
        );
        assert!(
            second.contains(r#"peers: ["10.0.0.1", "10.0.0.3"]"#),
            "{second}"
        );
        assert_eq!(catalog.shared_files[0].content, "nodes: 3");
    }

    #[test]
    fn expect_identifiers_serves_only_the_named_set() {
        let compiled = policy(
            "expect_identifiers: [node-0, node-2]\nfiles:\n  - path: a\n    template: \"{{ peers | length }}\"\n",
        )
        .unwrap();
        assert!(
            compiled
                .materialize_snapshot(&snapshot(2))
                .unwrap()
                .is_none()
        );
        let catalog = compiled
            .materialize_snapshot(&snapshot(4))
            .unwrap()
            .unwrap();
        let ids: Vec<_> = catalog
            .nodes
            .iter()
            .map(|n| n.identifier.as_str())
            .collect();
        assert_eq!(ids, ["node-0", "node-2"]);
        assert_eq!(catalog.nodes[0].files[0].content, "1");
    }

    #[test]
    fn template_errors_and_mistakes_are_all_reported_at_load() {
        let problems = policy(
            "expect_nodes: 0\nfiles:\n  - path: ../x\n    template: \"{% for %}\"\n  - path: ../x\n    template: ok\n",
        )
        .unwrap_err();
        for expected in ["at least 1", "template error", "'..'", "duplicate path"] {
            let listed = problems.iter().any(|p| p.contains(expected));
            assert!(listed, "{expected}: {problems:?}");
        }
    }

    #[test]
    fn the_native_peer_helpers_render_what_a_loop_would() {
        let compiled = policy(
            r#"
expect_nodes: 3
files:
  - path: bare
    template: "{{ peer_ips }}"
  - path: tojson
    template: "{{ peer_ips | tojson }}"
  - path: join
    template: "{{ peer_ips | join(',') }}"
  - path: loop
    template: "[{% for p in peers %}\"{{ p.ip }}\"{% if not loop.last %}, {% endif %}{% endfor %}]"
  - path: all
    template: "{{ node_ips | length }} {{ node.identifier }} {{ nodes[2].metadata.port }} {{ {'a': [1, 'x']} | tojson }}"
shared_files:
  - path: shared
    template: "{{ node_ips }}"
"#,
        )
        .unwrap();
        let catalog = compiled
            .materialize_snapshot(&snapshot(3))
            .unwrap()
            .unwrap();
        let files = &catalog.nodes[1].files;
        let content = |path: &str| {
            files
                .iter()
                .find(|f| f.path == path)
                .map(|f| f.content.as_str())
                .unwrap()
        };
        assert_eq!(content("bare"), r#"["10.0.0.1", "10.0.0.3"]"#);
        assert_eq!(content("tojson"), content("bare"));
        assert_eq!(
            content("loop"),
            content("bare"),
            "the helper equals the loop"
        );
        assert_eq!(content("join"), "10.0.0.1,10.0.0.3");
        assert_eq!(content("all"), r#"3 node-1 3002 {"a":[1,"x"]}"#);
        assert_eq!(
            catalog.shared_files[0].content,
            r#"["10.0.0.1", "10.0.0.2", "10.0.0.3"]"#
        );
    }

    #[test]
    fn readiness_is_a_count_or_a_named_set_and_only_members_are_served() {
        let count = policy("expect_nodes: 2\nfiles:\n  - path: a\n    template: x\n").unwrap();
        assert!(!count.is_ready(1, 0));
        assert!(count.is_ready(2, 0));
        assert!(count.serves("anyone"));
        let named =
            policy("expect_identifiers: [a, b]\nfiles:\n  - path: a\n    template: x\n").unwrap();
        assert!(!named.is_ready(5, 1), "other nodes do not count");
        assert!(named.is_ready(2, 2));
        assert!(named.serves("a") && !named.serves("c"));
    }

    #[test]
    fn unknown_policy_fields_are_errors() {
        let err = serde_saphyr::from_str::<Policy>("expect_nodes: 1\nfreeze: true\n").unwrap_err();
        assert!(err.to_string().contains("freeze"), "{err}");
    }
}
