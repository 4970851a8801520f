//! The template runtime of policies: the environment and its helpers, what a template sees
//! (one function builds every variable), the bounded output, and the render limits.
//!
//! A new helper is added here and nowhere else: a filter or function in [`environment`], a
//! variable in [`Scope::context`] (and, if what it builds is bounded by its input, its name
//! in [`BOUNDED_FILTERS`]).
//!
//! Fuel bounds a render's instructions and [`Bounded`] its output, but neither sees text a
//! template builds without writing it (`{% set x = x ~ x %}` doubles a string per
//! instruction). [`growth`] reads a template's syntax tree: one that only reads data, loops
//! and writes (what nearly every policy is) renders in this process; one that assigns,
//! captures, repeats or calls macros renders in a child process under a memory limit
//! (`cfgsync::isolate`).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use minijinja::machinery::ast::{self, CallArg, Expr, Stmt};
use minijinja::machinery::{WhitespaceConfig, parse};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use minijinja::{Environment, context};

use super::ArtifactFile;
use super::materialize::DynCfgsyncError;
use super::splice::{self, LoopOutput, Marks, NodeLoops, Over, Run};
use super::text::{EpochText, Ledger, Span};

/// Bounds on every render, so no template (or node data a template loops over) can pin a
/// core, fill memory or hold a render thread: past any of them the render fails, and only the
/// payload being rendered fails with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Told how much was written after every write, when the render marks where iterations
    /// start (a spliced loop's epoch render) or slices of shared texts (a node's answer).
    ledger: Option<Arc<Ledger>>,
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
        if self.writes.is_multiple_of(64) && Instant::now() > self.deadline {
            self.exceeded = Some("the render passed its deadline".to_string());
            return Err(std::io::Error::other("deadline"));
        }
        self.buf.extend_from_slice(data);
        if let Some(ledger) = &self.ledger {
            ledger.wrote(self.buf.len());
        }
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
    /// The whole list written once per epoch; a node's `peer_ips` is two slices of it.
    json: Arc<OnceLock<IpsJson>>,
    /// Told which parts of the output are slices of the epoch's list.
    ledger: Option<Arc<Ledger>>,
}

/// Every member's IP as one JSON array, and where each item starts in it.
#[derive(Debug)]
struct IpsJson {
    text: Arc<EpochText>,
    starts: Vec<usize>,
}

impl IpsJson {
    fn new(ips: &[Arc<str>]) -> Self {
        let mut out = String::with_capacity(ips.len() * 18 + 2);
        let mut starts = Vec::with_capacity(ips.len());
        out.push('[');
        for (i, ip) in ips.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            starts.push(out.len());
            out.push('"');
            out.push_str(ip);
            out.push('"');
        }
        out.push(']');
        Self {
            text: EpochText::new(out),
            starts,
        }
    }
}

impl IpList {
    fn len(&self) -> usize {
        self.ips.len() - usize::from(self.skip.is_some())
    }

    /// The list as two slices of the epoch's whole list: all of it, or without the node.
    fn slices(&self) -> [(&Arc<EpochText>, std::ops::Range<usize>); 2] {
        let json = self.json.get_or_init(|| IpsJson::new(&self.ips));
        let (text, starts) = (&json.text, &json.starts);
        let whole = text.raw().len();
        match self.skip {
            None => [(text, 0..whole), (text, 0..0)],
            Some(k) => {
                // Without item k: the last item also drops the ", " before it.
                let head = if k + 1 == starts.len() && k > 0 {
                    starts[k] - 2
                } else {
                    starts[k]
                };
                let tail = starts.get(k + 1).copied().unwrap_or(whole - 1);
                [(text, 0..head), (text, tail..whole)]
            }
        }
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
        splice::write_slices(f, self.slices(), self.ledger.as_deref())
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

/// What every template of one epoch sees in common, built once per epoch: the members in
/// identifier order, as template values and as IP strings, and each member's position.
#[derive(Debug)]
pub struct Scope {
    nodes: Arc<Vec<Value>>,
    ips: Arc<Vec<Arc<str>>>,
    index: HashMap<Arc<str>, usize>,
    /// The spliced loops, rendered for this scope on the first node's render, and which
    /// templates they belong to.
    loops: OnceLock<(u64, Arc<EpochLoops>)>,
    /// `node_ips` written once, made on first use.
    ips_json: Arc<OnceLock<IpsJson>>,
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
            loops: OnceLock::new(),
            ips_json: Arc::default(),
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

    /// `templates`' spliced loops rendered for this scope (once), or `None` when it has none.
    fn loops(&self, templates: &Templates) -> Option<Arc<EpochLoops>> {
        if templates.plans.is_empty() {
            return None;
        }
        let (owner, loops) = self
            .loops
            .get_or_init(|| (templates.id, Arc::new(templates.epoch_loops(self))));
        // A scope serves one policy's templates; another set renders node by node.
        (*owner == templates.id).then(|| loops.clone())
    }

    fn nodes(&self, skip: Option<usize>) -> Value {
        Value::from_object(NodeList {
            nodes: self.nodes.clone(),
            skip,
        })
    }

    fn ips(&self, skip: Option<usize>, ledger: Option<&Arc<Ledger>>) -> Value {
        Value::from_object(IpList {
            ips: self.ips.clone(),
            skip,
            json: self.ips_json.clone(),
            ledger: ledger.cloned(),
        })
    }
}

/// The environment every policy's templates compile in: minijinja's built-ins, bootsync's
/// helpers, and the fuel limit.
pub fn environment(limits: RenderLimits) -> Environment<'static> {
    let mut env = Environment::new();
    env.add_filter("tojson", tojson);
    // `debug()` dumps the whole render state, other nodes' metadata included.
    env.remove_global("debug");
    env.set_fuel(Some(limits.fuel));
    env
}

impl Scope {
    /// Every variable a template sees. Per node (`index` set): `node`, `index`, `nodes`,
    /// `peers` (the members but this one), `node_ips` and `peer_ips`. Shared files (`None`):
    /// `nodes` and `node_ips`.
    pub fn context(&self, index: Option<usize>) -> Value {
        self.context_in(index, None)
    }

    /// As [`Scope::context`], with the IP lists telling `ledger` what they write.
    fn context_in(&self, index: Option<usize>, ledger: Option<Arc<Ledger>>) -> Value {
        let ledger = ledger.as_ref();
        match index {
            Some(index) => context! {
                node => self.nodes[index].clone(),
                index => index,
                nodes => self.nodes(None),
                peers => self.nodes(Some(index)),
                node_ips => self.ips(None, ledger),
                peer_ips => self.ips(Some(index), ledger),
            },
            None => context! { nodes => self.nodes(None), node_ips => self.ips(None, ledger) },
        }
    }
}

/// Compiled templates with the limits every render runs under.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
    limits: RenderLimits,
    /// Per-node templates with loops rendered once per epoch (`cfgsync::splice`): each one's
    /// outer template under the same name, so errors read the same, and its loops' templates.
    spliced: Environment<'static>,
    /// Those templates' loops, by template name.
    plans: HashMap<String, Vec<Over>>,
    /// Per-node templates that name an IP list: with those that have spliced loops, the
    /// ones that can write slices of shared texts, whose renders keep a ledger.
    lists: std::collections::HashSet<String>,
    /// Tells a scope's cached loop renders from another set's.
    id: u64,
}

/// A scope's loop renders for one set of templates: each spliced template's loops, by name
/// (absent when one of them could not be rendered once for all).
type EpochLoops = HashMap<String, Arc<[LoopOutput]>>;

impl Templates {
    /// An empty set compiled under `limits`.
    pub fn new(limits: RenderLimits) -> Self {
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            env: environment(limits),
            limits,
            spliced: environment(limits),
            plans: HashMap::new(),
            lists: Default::default(),
            id: IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Compiles `source` under `name`.
    pub fn add(&mut self, name: String, source: String) -> Result<(), minijinja::Error> {
        self.env.add_template_owned(name, source)
    }

    /// Compiles a per-node template under `name`, and its loops over the member list to be
    /// rendered once per epoch and spliced, where they can be.
    pub fn add_per_node(&mut self, name: String, source: String) -> Result<(), minijinja::Error> {
        // Only a template that assigns nothing: see `splice::plan`.
        let plan = growth(&source).ok().and_then(|()| splice::plan(&source));
        if source.contains("node_ips") || source.contains("peer_ips") {
            self.lists.insert(name.clone());
        }
        self.add(name.clone(), source)?;
        let Some(plan) = plan else { return Ok(()) };
        let mut kinds = Vec::new();
        for (k, (over, text)) in plan.loops.into_iter().enumerate() {
            if self
                .spliced
                .add_template_owned(loop_name(&name, k), text)
                .is_err()
            {
                return Ok(());
            }
            kinds.push(over);
        }
        if self
            .spliced
            .add_template_owned(name.clone(), plan.outer)
            .is_ok()
        {
            self.plans.insert(name, kinds);
        }
        Ok(())
    }

    /// Does the work `scope`'s per-node renders share, once: the spliced loops' renders and,
    /// when a template prints an IP list, the list.
    pub fn prepare(&self, scope: &Scope) {
        scope.loops(self);
        if !self.lists.is_empty() {
            scope.ips_json.get_or_init(|| IpsJson::new(&scope.ips));
        }
    }

    /// How many per-node templates have loops spliced.
    pub fn spliced(&self) -> usize {
        self.plans.len()
    }

    /// The limits every render runs under.
    pub fn limits(&self) -> RenderLimits {
        self.limits
    }

    /// Renders template `name` within the limits: at most `budget` bytes, done by `deadline`.
    pub fn render(
        &self,
        name: &str,
        ctx: Value,
        budget: usize,
        deadline: Instant,
    ) -> Result<String, DynCfgsyncError> {
        self.render_in(&self.env, name, ctx, budget, deadline, None)
            .map(|(text, _)| text)
    }

    /// Renders `name` of `env` within the limits, with the instructions it took; `ledger`,
    /// when given, learns how much was written after every write.
    fn render_in(
        &self,
        env: &Environment<'static>,
        name: &str,
        ctx: Value,
        budget: usize,
        deadline: Instant,
        ledger: Option<Arc<Ledger>>,
    ) -> Result<(String, u64), DynCfgsyncError> {
        let template = env.get_template(name)?;
        if Instant::now() > deadline {
            return Err("the render passed its deadline".into());
        }
        let mut out = Bounded {
            buf: Vec::new(),
            limit: budget.min(self.limits.max_file_bytes),
            deadline,
            writes: 0,
            exceeded: None,
            ledger,
        };
        match template.render_captured_to(ctx, &mut out) {
            Ok(captured) => {
                let state = captured.state();
                let fuel = state.fuel_levels().map_or(0, |(used, _)| used)
                    + state
                        .get_temp(splice::CHARGED)
                        .and_then(|v| v.as_usize())
                        .unwrap_or(0) as u64;
                if fuel > self.limits.fuel {
                    return Err(self.out_of_fuel());
                }
                Ok((String::from_utf8(out.buf)?, fuel))
            }
            Err(_) if out.exceeded.is_some() => Err(out.exceeded.unwrap_or_default().into()),
            Err(err) if err.kind() == minijinja::ErrorKind::OutOfFuel => Err(self.out_of_fuel()),
            Err(err) => Err(err.into()),
        }
    }

    fn out_of_fuel(&self) -> DynCfgsyncError {
        format!(
            "the template ran more than its {} instructions",
            self.limits.fuel
        )
        .into()
    }

    /// Renders `files` (named `{section}/{i}`) for the node at `index` of `scope` (or the
    /// shared files, `None`) within `budget` bytes in all and one deadline.
    pub fn render_files(
        &self,
        section: &str,
        paths: &[String],
        scope: &Scope,
        index: Option<usize>,
        budget: usize,
    ) -> Result<Vec<ArtifactFile>, DynCfgsyncError> {
        let laid = self.render_laid(section, paths, scope, index, budget, false)?;
        Ok(laid.into_iter().map(|l| l.file).collect())
    }

    /// As [`Templates::render_files`], saying which parts of each file are slices of texts
    /// shared by the epoch's nodes (a spliced loop, the IP lists) when `spans` is set.
    pub fn render_laid(
        &self,
        section: &str,
        paths: &[String],
        scope: &Scope,
        index: Option<usize>,
        budget: usize,
        spans: bool,
    ) -> Result<Vec<Laid>, DynCfgsyncError> {
        // The epoch's once-only work is not this render's: done before its deadline starts.
        let loops = index.and_then(|_| {
            self.prepare(scope);
            scope.loops(self)
        });
        let deadline = Instant::now() + self.limits.deadline;
        let mut budget = budget.min(self.limits.max_payload_bytes);
        let plain = scope.context_in(index, None);
        let mut files = Vec::with_capacity(paths.len());
        for (i, path) in paths.iter().enumerate() {
            let name = format!("{section}/{i}");
            // Spans are told apart per file: each file that can write any has its own ledger.
            let ledger = (spans && (self.plans.contains_key(&name) || self.lists.contains(&name)))
                .then(|| Arc::new(Ledger::default()));
            let ctx = match &ledger {
                Some(_) => scope.context_in(index, ledger.clone()),
                None => plain.clone(),
            };
            let spliced = loops.as_ref().and_then(|l| l.get(&name)).zip(index);
            let rendered = match spliced {
                Some((loops, index)) => {
                    let node = Value::from_object(NodeLoops {
                        loops: loops.clone(),
                        index,
                        ledger: ledger.clone(),
                    });
                    let ctx =
                        context! { ..Value::from_iter([(splice::LOOPS, node)]), ..ctx.clone() };
                    self.render_in(&self.spliced, &name, ctx, budget, deadline, ledger.clone())
                }
                None => self.render_in(
                    &self.env,
                    &name,
                    ctx.clone(),
                    budget,
                    deadline,
                    ledger.clone(),
                ),
            };
            let content = rendered.map(|(text, _)| text).map_err(|err| match index {
                Some(_) => format!("rendering {path}: {err}"),
                None => format!("rendering shared file {path}: {err}"),
            })?;
            budget -= content.len();
            files.push(Laid {
                file: ArtifactFile::new(path.clone(), content),
                spans: ledger.map_or_else(Vec::new, |l| l.take_spans()),
            });
        }
        Ok(files)
    }
}

/// A rendered file, and which parts of it are slices of texts shared by the epoch's nodes.
#[derive(Debug)]
pub struct Laid {
    /// The file.
    pub file: ArtifactFile,
    /// The shared slices in it, in order.
    pub spans: Vec<Span>,
}

impl Templates {
    /// The spliced templates' loops rendered once for `scope`. A template one of whose loops
    /// cannot be (an error, a limit, too few members) keeps its per-node render, which then
    /// meets the same error or limit itself.
    ///
    /// All of a scope's loop renders share one budget: one deadline, one fuel and one
    /// payload's bytes (each text and its escaped copy), so a policy of many loops costs an
    /// epoch what one node's render may cost, not that many times over.
    fn epoch_loops(&self, scope: &Scope) -> EpochLoops {
        let mut budget = EpochBudget {
            deadline: Instant::now() + self.limits.deadline,
            fuel: self.limits.fuel,
            bytes: self.limits.max_payload_bytes,
        };
        let mut out = EpochLoops::new();
        for (name, kinds) in &self.plans {
            let loops: Option<Vec<LoopOutput>> = kinds
                .iter()
                .enumerate()
                .map(|(k, over)| self.render_loop(&loop_name(name, k), *over, scope, &mut budget))
                .collect();
            if let Some(loops) = loops {
                out.insert(name.clone(), loops.into());
            }
        }
        out
    }

    /// One loop rendered for the epoch within what is left of `budget`: once for a loop over
    /// `nodes`; as the last and as the first member see it for a loop over `peers`.
    fn render_loop(
        &self,
        name: &str,
        over: Over,
        scope: &Scope,
        budget: &mut EpochBudget,
    ) -> Option<LoopOutput> {
        let members = scope.len();
        let mut run = |index: usize| {
            if budget.fuel == 0 || budget.bytes == 0 {
                return None;
            }
            let ledger = Arc::new(Ledger::default());
            let marks = Value::from_object(Marks(ledger.clone()));
            let ctx = context! {
                ..Value::from_iter([(splice::MARKS, marks)]),
                ..scope.context(Some(index))
            };
            let rendered = self.render_in(
                &self.spliced,
                name,
                ctx,
                budget.bytes,
                budget.deadline,
                Some(ledger.clone()),
            );
            let (text, fuel) = rendered.ok()?;
            budget.fuel = budget.fuel.saturating_sub(fuel);
            budget.bytes = budget.bytes.saturating_sub(text.len());
            Some(Run {
                text,
                marks: ledger.take_marks(),
                fuel,
            })
        };
        let output = match over {
            Over::All if members >= 1 => LoopOutput::all(run(0)?),
            Over::Peers if members >= 2 => {
                let upto = run(members - 1)?;
                let from = run(0)?;
                LoopOutput::peers(members, upto, from)?
            }
            _ => return None,
        };
        // The escaped copies count too.
        budget.bytes = budget.bytes.checked_sub(output.escaped_weight())?;
        Some(output)
    }
}

/// What is left for a scope's loop renders.
struct EpochBudget {
    deadline: Instant,
    fuel: u64,
    bytes: usize,
}

/// The name loop `k` of per-node template `name` is compiled under.
fn loop_name(name: &str, k: usize) -> String {
    format!("{name}:loop{k}")
}

/// Filters whose result is no larger than a small multiple of their input and arguments, and
/// which read no further argument that could multiply it (`join` is checked on its own).
pub const BOUNDED_FILTERS: &[&str] = &[
    "abs",
    "attr",
    "bool",
    "capitalize",
    "chain",
    "count",
    "d",
    "default",
    "dictsort",
    "e",
    "escape",
    "first",
    "float",
    "groupby",
    "int",
    "items",
    "last",
    "length",
    "lines",
    "list",
    "lower",
    "max",
    "min",
    "reject",
    "rejectattr",
    "reverse",
    "round",
    "safe",
    "select",
    "selectattr",
    "sort",
    "split",
    "string",
    "sum",
    "title",
    "tojson",
    "trim",
    "unique",
    "upper",
    "zip",
];

/// Why a template could build text without bound without writing it, or `Ok` when every
/// value it builds is bounded by its input and the template's own text.
///
/// Conservative by construction: anything not known to be bounded counts as unbounded
/// (assignments, captured blocks, macros, `*`, a recursive loop, most calls and filters).
pub fn growth(source: &str) -> Result<(), String> {
    let tree = parse(
        source,
        "template",
        SyntaxConfig,
        WhitespaceConfig::default(),
    )
    .map_err(|err| format!("does not parse: {err}"))?;
    stmt(&tree)
}

fn stmts(body: &[Stmt<'_>]) -> Result<(), String> {
    body.iter().try_for_each(stmt)
}

fn stmt(node: &Stmt<'_>) -> Result<(), String> {
    match node {
        Stmt::Template(t) => stmts(&t.children),
        Stmt::EmitExpr(e) => expr(&e.expr),
        Stmt::EmitRaw(_) => Ok(()),
        Stmt::ForLoop(f) if f.recursive => Err("a recursive loop".into()),
        Stmt::ForLoop(f) => {
            expr(&f.target)?;
            expr(&f.iter)?;
            f.filter_expr.as_ref().map_or(Ok(()), expr)?;
            stmts(&f.body)?;
            stmts(&f.else_body)
        }
        Stmt::IfCond(i) => {
            expr(&i.expr)?;
            stmts(&i.true_body)?;
            stmts(&i.false_body)
        }
        Stmt::AutoEscape(a) => {
            expr(&a.enabled)?;
            stmts(&a.body)
        }
        Stmt::Set(_) | Stmt::SetBlock(_) | Stmt::WithBlock(_) => {
            Err("an assignment (`set` or `with`)".into())
        }
        Stmt::FilterBlock(_) => Err("a filter block (it captures its body)".into()),
        Stmt::Macro(_) | Stmt::CallBlock(_) => Err("a macro".into()),
        Stmt::Do(_) => Err("a `do` statement".into()),
        _ => Err("a block, import or include".into()),
    }
}

fn expr(node: &Expr<'_>) -> Result<(), String> {
    match node {
        Expr::Var(_) | Expr::Const(_) => Ok(()),
        Expr::Slice(s) => {
            expr(&s.expr)?;
            for part in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                expr(part)?;
            }
            Ok(())
        }
        Expr::UnaryOp(u) => expr(&u.expr),
        Expr::BinOp(b) if matches!(b.op, ast::BinOpKind::Mul) => {
            Err("`*` (it repeats strings and lists)".into())
        }
        Expr::BinOp(b) => {
            expr(&b.left)?;
            expr(&b.right)
        }
        Expr::Compare(c) => {
            expr(&c.expr)?;
            c.ops.iter().try_for_each(|op| expr(&op.expr))
        }
        Expr::IfExpr(i) => {
            expr(&i.test_expr)?;
            expr(&i.true_expr)?;
            i.false_expr.as_ref().map_or(Ok(()), expr)
        }
        Expr::Filter(f) => {
            filter(f.name, &f.args)?;
            f.expr.as_ref().map_or(Ok(()), expr)?;
            args(&f.args)
        }
        Expr::Test(t) => {
            expr(&t.expr)?;
            args(&t.args)
        }
        Expr::GetAttr(g) => expr(&g.expr),
        Expr::GetItem(g) => {
            expr(&g.expr)?;
            expr(&g.subscript_expr)
        }
        Expr::Call(c) => {
            call(&c.expr)?;
            args(&c.args)
        }
        Expr::List(l) => l.items.iter().try_for_each(expr),
        Expr::Map(m) => {
            m.keys.iter().try_for_each(expr)?;
            m.values.iter().try_for_each(expr)
        }
    }
}

fn args(list: &[CallArg<'_>]) -> Result<(), String> {
    list.iter().try_for_each(|arg| match arg {
        CallArg::Pos(e) | CallArg::Kwarg(_, e) => expr(e),
        CallArg::PosSplat(_) | CallArg::KwargSplat(_) => Err("a splatted argument".into()),
    })
}

fn filter(name: &str, arguments: &[CallArg<'_>]) -> Result<(), String> {
    let constant_text = |arg: &CallArg<'_>| {
        matches!(arg, CallArg::Pos(Expr::Const(c)) | CallArg::Kwarg(_, Expr::Const(c))
            if c.value.as_str().is_some())
    };
    let bounded = match name {
        // A separator from the data could be repeated once per item.
        "join" => arguments.iter().all(constant_text),
        // `map` applies another filter: only by attribute, or an argument-free bounded one.
        "map" => match arguments {
            [CallArg::Pos(Expr::Const(c))] => c
                .value
                .as_str()
                .is_some_and(|f| BOUNDED_FILTERS.contains(&f)),
            _ => arguments
                .iter()
                .all(|a| matches!(a, CallArg::Kwarg("attribute" | "default", _))),
        },
        _ => BOUNDED_FILTERS.contains(&name),
    };
    if bounded {
        Ok(())
    } else {
        Err(format!("the filter `{name}` with these arguments"))
    }
}

fn call(callee: &Expr<'_>) -> Result<(), String> {
    match callee {
        // `range` holds at most 100 000 numbers; `dict` what its arguments hold.
        Expr::Var(v) if matches!(v.id, "range" | "dict") => Ok(()),
        Expr::GetAttr(g)
            if matches!(&g.expr, Expr::Var(v) if v.id == "loop")
                && matches!(g.name, "cycle" | "changed") =>
        {
            Ok(())
        }
        Expr::Var(v) => Err(format!("a call of `{}`", v.id)),
        _ => Err("a call".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_that_read_loop_and_write_are_bounded() {
        for source in [
            "id: {{ node.identifier }} index: {{ index }} port: {{ node.metadata.port + 1 }}",
            "peers: [{% for p in peers %}\"{{ p.ip }}\"{% if not loop.last %}, {% endif %}{% endfor %}]",
            "{{ peer_ips }} {{ peer_ips | join(',') }} {{ nodes | tojson }}",
            "{{ peers | map(attribute='ip') | join(', ') }} {{ peers | map('upper') | list }}",
            "{% for x in range(10) if x is even %}{{ loop.cycle('a', 'b') }}{{ x // 2 }}{% else %}none{% endfor %}",
            "{{ {'a': [1, node.ip]} | tojson }} {{ nodes[1:3] | length }} {{ 'x' ~ node.ip ~ 'y' }}",
            "{{ dict(a=1) | items | list }}{% if node.metadata.role == 'db' %}db{% endif %}",
        ] {
            assert_eq!(growth(source), Ok(()), "{source}");
        }
    }

    #[test]
    fn a_template_that_assigns_keeps_its_loops_per_node() {
        // `x` holds the node's IP: a loop reading it differs per node although it reads no
        // per-node name itself.
        let source = "{% set x = node.ip %}{% for p in peers %}{{ x }}/{{ p.ip }} {% endfor %}";
        let mut templates = Templates::new(RenderLimits::default());
        templates
            .add_per_node("files/0".into(), source.into())
            .unwrap();
        assert_eq!(templates.spliced(), 0);
        let meta = serde_json::json!({});
        let ips: Vec<std::net::IpAddr> = (1..=3).map(|i| [10, 0, 0, i].into()).collect();
        let scope = Scope::new(
            ["a", "b", "c"]
                .into_iter()
                .zip(ips)
                .map(|(id, ip)| (id, ip, &meta)),
        );
        let files = templates
            .render_files("files", &["/f".into()], &scope, Some(1), usize::MAX)
            .unwrap();
        assert_eq!(files[0].content, "10.0.0.2/10.0.0.1 10.0.0.2/10.0.0.3 ");
    }

    #[test]
    fn a_scope_s_loop_renders_share_one_budget() {
        // Five loops, each rendering ~6 KB twice: more than a 40 KB payload in all.
        let source =
            "{% for p in peers %}{{ p.ip }}................................{% endfor %}".repeat(5);
        let meta = serde_json::json!({});
        let ids: Vec<String> = (0..150).map(|i| format!("n{i:03}")).collect();
        let scope = Scope::new(
            ids.iter()
                .enumerate()
                .map(|(i, id)| (id.as_str(), [10, 0, 0, i as u8].into(), &meta)),
        );
        let with = |bytes: usize| {
            let limits = RenderLimits {
                max_payload_bytes: bytes,
                ..RenderLimits::default()
            };
            let mut templates = Templates::new(limits);
            templates
                .add_per_node("files/0".into(), source.clone())
                .unwrap();
            assert_eq!(templates.spliced(), 1);
            templates.epoch_loops(&scope).len()
        };
        assert_eq!(with(1 << 20), 1, "an ample budget splices the template");
        assert_eq!(with(40_000), 0, "past the budget it renders per node");
    }

    #[test]
    fn templates_that_could_build_text_without_writing_it_are_not() {
        for (source, why) in [
            (
                "{% set a = 'x' ~ 'x' %}{% set b = a ~ a %}{{ b }}",
                "assignment",
            ),
            (
                "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                "assignment",
            ),
            (
                "{% set x %}{% for i in range(9) %}y{% endfor %}{% endset %}",
                "assignment",
            ),
            ("{{ ([node.metadata.big] * 100000) | join }}", "`*`"),
            ("{{ range(100000) | join(node.metadata.big) }}", "join"),
            (
                "{% macro d(s, n) %}{{ d(s ~ s, n - 1) }}{% endmacro %}{{ d('x', 40) }}",
                "macro",
            ),
            (
                "{% filter upper %}{% for i in range(9) %}x{% endfor %}{% endfilter %}",
                "filter block",
            ),
            (
                "{% for p in peers recursive %}{{ loop(p.children) }}{% endfor %}",
                "recursive",
            ),
            ("{{ node.ip | indent(1000000000) }}", "indent"),
            ("{{ node.ip | replace('.', node.metadata.big) }}", "replace"),
            ("{{ namespace(a=1) }}", "namespace"),
            ("{% include 'other' %}", "include"),
        ] {
            let reason = growth(source).expect_err(source);
            assert!(reason.contains(why), "{source}: {reason}");
        }
    }
}
