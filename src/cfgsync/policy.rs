//! The declarative materializer: wait for a set of nodes, then render each node's files from
//! templates with the node, its index, every node and its peers in scope.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use minijinja::{Environment, context};
use serde::{Deserialize, Serialize};

use super::materialize::{
    DynCfgsyncError, NodeArtifacts, NodeArtifactsCatalog, RegistrationSnapshot,
    RegistrationSnapshotMaterializer,
};
use super::{ArtifactFile, NodeRegistration};
use crate::files::{FileError, check_canonical_payload_path, parse_file};

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
        if self.files.is_empty() && self.shared_files.is_empty() {
            problems.push("the policy renders no files: add files or shared_files".to_string());
        }
        let mut env = Environment::new();
        add_helpers(&mut env);
        env.set_fuel(Some(limits.fuel));
        let mut paths = BTreeSet::new();
        for (section, list) in [("files", &self.files), ("shared_files", &self.shared_files)] {
            for (i, file) in list.iter().enumerate() {
                if let Err(p) = check_canonical_payload_path(&file.path) {
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
            let named = self
                .expect_identifiers
                .as_ref()
                .map(|ids| Arc::new(ids.iter().cloned().collect()));
            Ok(CompiledPolicy {
                policy: Arc::new(self),
                env: Arc::new(env),
                named,
                limits,
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
    env: Arc<Environment<'static>>,
    /// `expect_identifiers` as a set: membership is asked on every registration.
    named: Option<Arc<std::collections::HashSet<String>>>,
    limits: RenderLimits,
}

/// Bounds on every render, so no template (or node data a template loops over) can pin a
/// core, fill memory or hold a render thread: past any of them the render fails, and only the
/// payload being rendered fails with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderLimits {
    /// Template instructions per file (minijinja's fuel).
    pub fuel: u64,
    /// Wall-clock time for one node's files, or one epoch's shared files.
    pub deadline: Duration,
    /// Bytes one rendered file may hold.
    pub max_file_bytes: usize,
    /// Bytes one node's rendered files may hold in all (its own and the shared ones).
    pub max_payload_bytes: usize,
}

impl Default for RenderLimits {
    fn default() -> Self {
        // Generous for real peer lists (a loop over 100 000 peers renders ~1.7 MB), small
        // enough that a runaway template ends within seconds.
        Self {
            fuel: 200_000_000,
            deadline: Duration::from_secs(10),
            max_file_bytes: 16 << 20,
            max_payload_bytes: 32 << 20,
        }
    }
}

/// The render's output, refused past its byte budget or its deadline.
struct Bounded {
    buf: Vec<u8>,
    limit: usize,
    deadline: Instant,
    writes: u32,
    exceeded: Option<String>,
}

impl std::io::Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.limit {
            self.exceeded = Some(format!(
                "the output passed its limit of {} bytes",
                self.limit
            ));
            return Err(std::io::Error::other("output limit"));
        }
        // The clock is read every 64 writes: cheap, and a loop that writes nothing is
        // stopped by its fuel instead.
        self.writes = self.writes.wrapping_add(1);
        if self.writes % 64 == 0 && Instant::now() > self.deadline {
            self.exceeded = Some("the render passed its deadline".to_string());
            return Err(std::io::Error::other("deadline"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One node as templates see it: `identifier`, `ip` and `metadata`, looked up by field name
/// without a map behind it.
#[derive(Debug)]
struct NodeObject {
    identifier: Value,
    ip: Value,
    metadata: Value,
}

const NODE_FIELDS: [&str; 3] = ["identifier", "ip", "metadata"];

impl Object for NodeObject {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.get_value_by_str(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        match key {
            "identifier" => Some(self.identifier.clone()),
            "ip" => Some(self.ip.clone()),
            "metadata" => Some(self.metadata.clone()),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&NODE_FIELDS)
    }
}

/// `nodes` and `peers` in a template: the epoch's member list, or all of it but one node,
/// without copying the list per node.
#[derive(Debug)]
struct NodeList {
    nodes: Arc<Vec<Value>>,
    skip: Option<usize>,
}

impl NodeList {
    fn len(&self) -> usize {
        self.nodes.len() - usize::from(self.skip.is_some())
    }

    fn position(&self, i: usize) -> usize {
        match self.skip {
            Some(skip) if i >= skip => i + 1,
            _ => i,
        }
    }
}

impl Object for NodeList {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let i = key.as_usize()?;
        (i < self.len()).then(|| self.nodes[self.position(i)].clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Seq(self.len())
    }
}

/// `node_ips` and `peer_ips`: the members' IPs as strings. Printed as is (`{{ peer_ips }}`)
/// or through `tojson`, the list is written in one pass as a JSON array, which is also YAML;
/// `join` works as on any list.
#[derive(Debug)]
struct IpList {
    ips: Arc<Vec<Arc<str>>>,
    skip: Option<usize>,
}

impl IpList {
    fn len(&self) -> usize {
        self.ips.len() - usize::from(self.skip.is_some())
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<str>> {
        self.ips
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != self.skip)
            .map(|(_, ip)| ip)
    }

    /// `["a", "b"]`: IP strings need no escaping.
    fn write_json(&self, out: &mut String) {
        out.reserve(self.len() * 18 + 2);
        out.push('[');
        for (i, ip) in self.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push('"');
            out.push_str(ip);
            out.push('"');
        }
        out.push(']');
    }
}

impl Object for IpList {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let i = key.as_usize()?;
        if i >= self.len() {
            return None;
        }
        let j = match self.skip {
            Some(skip) if i >= skip => i + 1,
            _ => i,
        };
        Some(Value::from(self.ips[j].clone()))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Seq(self.len())
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = String::new();
        self.write_json(&mut out);
        f.write_str(&out)
    }
}

/// The `tojson` filter: one pass for the IP lists, serde for anything else.
fn tojson(value: Value) -> Result<Value, minijinja::Error> {
    if let Some(list) = value.downcast_object_ref::<IpList>() {
        let mut out = String::new();
        list.write_json(&mut out);
        return Ok(Value::from_safe_string(out));
    }
    serde_json::to_string(&value)
        .map(Value::from_safe_string)
        .map_err(|err| {
            minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("cannot write this value as JSON: {err}"),
            )
        })
}

/// The filters the policy's templates get beside minijinja's built-ins.
fn add_helpers(env: &mut Environment<'static>) {
    env.add_filter("tojson", tojson);
    // `debug()` dumps the whole render state, other nodes' metadata included.
    env.remove_global("debug");
}

/// What every template of one epoch sees in common, built once per epoch: the members in
/// identifier order, as template values and as IP strings, and each member's position.
#[derive(Debug)]
pub struct Scope {
    nodes: Arc<Vec<Value>>,
    ips: Arc<Vec<Arc<str>>>,
    index: HashMap<Arc<str>, usize>,
}

impl Scope {
    /// The scope of `members` (identifier, IP, metadata), which must be sorted by identifier.
    pub fn new<'a>(
        members: impl IntoIterator<Item = (&'a str, std::net::IpAddr, &'a serde_json::Value)>,
    ) -> Self {
        let mut nodes = Vec::new();
        let mut ips = Vec::new();
        let mut index = HashMap::new();
        for (i, (identifier, ip, metadata)) in members.into_iter().enumerate() {
            let identifier: Arc<str> = Arc::from(identifier);
            let ip: Arc<str> = Arc::from(ip.to_string());
            nodes.push(Value::from_object(NodeObject {
                identifier: Value::from(identifier.clone()),
                ip: Value::from(ip.clone()),
                metadata: Value::from_serialize(metadata),
            }));
            ips.push(ip);
            index.insert(identifier, i);
        }
        Self {
            nodes: Arc::new(nodes),
            ips: Arc::new(ips),
            index,
        }
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A member's position in `nodes`.
    pub fn index_of(&self, identifier: &str) -> Option<usize> {
        self.index.get(identifier).copied()
    }

    fn nodes(&self, skip: Option<usize>) -> Value {
        Value::from_object(NodeList {
            nodes: self.nodes.clone(),
            skip,
        })
    }

    fn ips(&self, skip: Option<usize>) -> Value {
        Value::from_object(IpList {
            ips: self.ips.clone(),
            skip,
        })
    }
}

impl CompiledPolicy {
    /// The policy as written.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Whether the deployment is ready with `registered` nodes registered, `named` of them in
    /// `expect_identifiers`: a count or a named set, so nothing is rendered to decide it.
    pub fn is_ready(&self, registered: usize, named: usize) -> bool {
        match (&self.policy.expect_nodes, &self.named) {
            (Some(n), _) => registered >= *n,
            (_, Some(ids)) => named == ids.len(),
            (None, None) => false,
        }
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

    /// Renders one file within the limits: at most `budget` bytes, done by `deadline`.
    fn render(
        &self,
        name: &str,
        ctx: Value,
        budget: usize,
        deadline: Instant,
    ) -> Result<String, DynCfgsyncError> {
        let template = self.env.get_template(name)?;
        if Instant::now() > deadline {
            return Err("the render passed its deadline".into());
        }
        let mut out = Bounded {
            buf: Vec::new(),
            limit: budget.min(self.limits.max_file_bytes),
            deadline,
            writes: 0,
            exceeded: None,
        };
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => Ok(String::from_utf8(out.buf)?),
            Err(_) if out.exceeded.is_some() => Err(out.exceeded.unwrap_or_default().into()),
            Err(err) if err.kind() == minijinja::ErrorKind::OutOfFuel => Err(format!(
                "the template ran more than its {} instructions",
                self.limits.fuel
            )
            .into()),
            Err(err) => Err(err.into()),
        }
    }

    /// The limits every render runs under.
    pub fn limits(&self) -> RenderLimits {
        self.limits
    }

    /// The shared files of an epoch (rendered once per epoch by the server).
    pub fn render_shared(&self, scope: &Scope) -> Result<Vec<ArtifactFile>, DynCfgsyncError> {
        let mut shared = Vec::with_capacity(self.policy.shared_files.len());
        let deadline = Instant::now() + self.limits.deadline;
        let mut budget = self.limits.max_payload_bytes;
        for (i, file) in self.policy.shared_files.iter().enumerate() {
            let ctx = context! { nodes => scope.nodes(None), node_ips => scope.ips(None) };
            let content = self
                .render(&format!("shared_files/{i}"), ctx, budget, deadline)
                .map_err(|err| format!("rendering shared file {}: {err}", file.path))?;
            budget -= content.len();
            shared.push(ArtifactFile::new(file.path.clone(), content));
        }
        Ok(shared)
    }

    /// The files of the member at `index` in `scope`, within `budget` bytes in all (what the
    /// payload's limit leaves after its shared files).
    pub fn render_node(
        &self,
        scope: &Scope,
        index: usize,
        budget: usize,
    ) -> Result<Vec<ArtifactFile>, DynCfgsyncError> {
        let deadline = Instant::now() + self.limits.deadline;
        let mut budget = budget.min(self.limits.max_payload_bytes);
        let ctx = context! {
            node => scope.nodes[index].clone(),
            index => index,
            nodes => scope.nodes(None),
            peers => scope.nodes(Some(index)),
            node_ips => scope.ips(None),
            peer_ips => scope.ips(Some(index)),
        };
        let mut files = Vec::with_capacity(self.policy.files.len());
        for (i, file) in self.policy.files.iter().enumerate() {
            let content = self
                .render(&format!("files/{i}"), ctx.clone(), budget, deadline)
                .map_err(|err| format!("rendering {}: {err}", file.path))?;
            budget -= content.len();
            files.push(ArtifactFile::new(file.path.clone(), content));
        }
        Ok(files)
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
        let budget = self.limits.max_payload_bytes.saturating_sub(shared_bytes);
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
