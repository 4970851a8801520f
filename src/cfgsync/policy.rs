//! The declarative materializer: wait for a set of nodes, then render each node's files from
//! templates with the node, its index, every node and its peers in scope.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, Value};
use minijinja::{Environment, context};
use serde::{Deserialize, Serialize};

use super::materialize::{
    DynCfgsyncError, NodeArtifacts, NodeArtifactsCatalog, RegistrationSnapshot,
    RegistrationSnapshotMaterializer,
};
use super::{ArtifactFile, NodeRegistration};
use crate::files::{FileError, check_payload_path, parse_file};

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
}

impl Policy {
    /// Loads, validates and compiles a policy file (YAML or JSON by extension).
    pub fn load(path: &Path) -> Result<CompiledPolicy, FileError> {
        let policy: Policy = parse_file(path)?;
        policy.compile().map_err(|problems| FileError {
            path: path.display().to_string(),
            problems,
        })
    }

    /// Validates and compiles every template, reporting all problems at once.
    pub fn compile(self) -> Result<CompiledPolicy, Vec<String>> {
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
                    if let Err(p) = super::http::check_identifier(id) {
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
        if self.files.is_empty() && self.shared_files.is_empty() {
            problems.push("the policy renders no files: add files or shared_files".to_string());
        }
        let mut env = Environment::new();
        let mut paths = BTreeSet::new();
        for (section, list) in [("files", &self.files), ("shared_files", &self.shared_files)] {
            for (i, file) in list.iter().enumerate() {
                if let Err(p) = check_payload_path(&file.path) {
                    problems.push(format!("{section}[{i}]: {p}"));
                }
                if !paths.insert(file.path.clone()) {
                    problems.push(format!("{section}[{i}]: duplicate path {:?}", file.path));
                }
                if let Err(err) =
                    env.add_template_owned(format!("{section}/{i}"), file.template.clone())
                {
                    problems.push(format!(
                        "{section}[{i}] ({}): template error: {err}",
                        file.path
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(CompiledPolicy {
                policy: self,
                env: Arc::new(env),
            })
        } else {
            Err(problems)
        }
    }
}

/// A validated policy with its templates compiled.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    policy: Policy,
    env: Arc<Environment<'static>>,
}

/// `peers` in a template: every node but one, without copying the list per node.
#[derive(Debug)]
struct Peers {
    nodes: Arc<Vec<Value>>,
    skip: usize,
}

impl Object for Peers {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let i = key.as_usize()?;
        let j = if i >= self.skip { i + 1 } else { i };
        self.nodes.get(j).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Seq(self.nodes.len().saturating_sub(1))
    }
}

fn node_value(node: &NodeRegistration) -> Value {
    Value::from_serialize(serde_json::json!({
        "identifier": node.identifier,
        "ip": node.ip.to_string(),
        "metadata": node.metadata,
    }))
}

impl CompiledPolicy {
    /// The policy as written.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The nodes that make up the deployment once ready, or `None` while not ready.
    pub fn members<'a>(
        &self,
        snapshot: &'a RegistrationSnapshot,
    ) -> Option<Vec<&'a NodeRegistration>> {
        match (&self.policy.expect_nodes, &self.policy.expect_identifiers) {
            (Some(n), _) => (snapshot.len() >= *n).then(|| snapshot.iter().collect()),
            (_, Some(ids)) => {
                let members: Vec<&NodeRegistration> = snapshot
                    .iter()
                    .filter(|n| ids.contains(&n.identifier))
                    .collect();
                (members.len() == ids.len()).then_some(members)
            }
            (None, None) => None,
        }
    }

    fn render(&self, name: &str, ctx: Value) -> Result<String, DynCfgsyncError> {
        let template = self.env.get_template(name)?;
        Ok(template.render(ctx)?)
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
        let values: Arc<Vec<Value>> = Arc::new(members.iter().map(|n| node_value(n)).collect());
        let nodes = Value::from_dyn_object(Arc::new(NodesList(values.clone())));
        let mut shared = Vec::with_capacity(self.policy.shared_files.len());
        for (i, file) in self.policy.shared_files.iter().enumerate() {
            let content = self.render(
                &format!("shared_files/{i}"),
                context! { nodes => nodes.clone() },
            )?;
            shared.push(ArtifactFile::new(file.path.clone(), content));
        }
        let mut out = Vec::with_capacity(members.len());
        for (index, member) in members.iter().enumerate() {
            let peers = Value::from_object(Peers {
                nodes: values.clone(),
                skip: index,
            });
            let ctx = context! {
                node => values[index].clone(),
                index => index,
                nodes => nodes.clone(),
                peers => peers,
            };
            let mut files = Vec::with_capacity(self.policy.files.len());
            for (i, file) in self.policy.files.iter().enumerate() {
                let content = self
                    .render(&format!("files/{i}"), ctx.clone())
                    .map_err(|err| {
                        format!("rendering {} for {}: {err}", file.path, member.identifier)
                    })?;
                files.push(ArtifactFile::new(file.path.clone(), content));
            }
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

/// `nodes` in a template: the shared list, built once per materialisation.
#[derive(Debug)]
struct NodesList(Arc<Vec<Value>>);

impl Object for NodesList {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0.get(key.as_usize()?).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Seq(self.0.len())
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
        assert!(
            problems.iter().any(|p| p.contains("at least 1")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("template error")),
            "{problems:?}"
        );
        assert!(problems.iter().any(|p| p.contains("'..'")), "{problems:?}");
        assert!(
            problems.iter().any(|p| p.contains("duplicate path")),
            "{problems:?}"
        );
    }

    #[test]
    fn unknown_policy_fields_are_errors() {
        let err = serde_saphyr::from_str::<Policy>("expect_nodes: 1\nfreeze: true\n").unwrap_err();
        assert!(err.to_string().contains("freeze"), "{err}");
    }
}
