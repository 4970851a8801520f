//! Loops over the member list rendered once per epoch and spliced into each node's file, so
//! the loop users write first costs what the native `peer_ips` helper costs.
//!
//! For node k, a loop over `peers` runs the items before k at the positions they hold in the
//! whole list, and the items after k one position earlier. Each run is a contiguous part of
//! one of two renders made once per epoch: the loop as the last member sees it (every other
//! item at its own position) and as the first member sees it (every other item one position
//! earlier). Node k's output is the first render up to item k, then the second from item
//! k + 1. A loop over `nodes` is the same for every node and renders once. The rest of the
//! template still renders per node, with each such loop replaced by its spliced text.
//!
//! The loop text itself is what minijinja renders in both epoch renders, so the output is the
//! same byte for byte as long as an iteration's output depends only on its item, its position
//! and the list's length. [`plan`] checks that on the syntax tree and keeps anything it is not
//! sure of on the per-node render; the tests compare both ways over generated templates.

use std::ops::Range;
use std::sync::Arc;

use minijinja::machinery::ast::{self, CallArg, Expr, Stmt};
use minijinja::machinery::{WhitespaceConfig, parse};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Object, ObjectRepr, Value};
use minijinja::{Error, ErrorKind, State};

use super::text::{EpochText, Ledger};

/// What generated templates call; a template that mentions the prefix is not spliced, so its
/// own names can never meet these.
const PREFIX: &str = "__bootsync";
/// The per-node object outer templates splice from.
pub(super) const LOOPS: &str = "__bootsync_loops";
/// The object loop templates mark each iteration's start with.
pub(super) const MARKS: &str = "__bootsync_marks";
/// The render temp counting the instructions spliced loops have been charged: the render
/// fails once they and its own pass the fuel.
pub(super) const CHARGED: &str = "__bootsync_charged";

/// Variables whose value depends on the node being rendered.
const PER_NODE: [&str; 4] = ["node", "index", "peers", "peer_ips"];
/// What of `loop` depends only on the iteration's position and the list's length.
const POSITION: [&str; 9] = [
    "index",
    "index0",
    "revindex",
    "revindex0",
    "first",
    "last",
    "length",
    "depth",
    "depth0",
];

/// Which list a spliced loop runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Over {
    /// `nodes` or `node_ips`: the same for every node.
    All,
    /// `peers` or `peer_ips`: every member but the node.
    Peers,
}

/// How one per-node template is rendered with its loops spliced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    /// The template with loop k replaced by `{{ __bootsync_loops.splice(k) }}`, trimming
    /// whitespace as the loop's tags did and holding as many line breaks, so errors name the
    /// same lines.
    pub(super) outer: String,
    /// Each loop's own text; a `Peers` loop marks the start of every iteration.
    pub(super) loops: Vec<(Over, String)>,
}

/// The plan of `source`, or `None` when no loop can be spliced.
///
/// `source` must assign nothing (`template::growth` passes it): a loop then sees the context's
/// names alone, so reading none of the node's is enough.
pub(super) fn plan(source: &str) -> Option<Plan> {
    if source.contains(PREFIX) {
        return None;
    }
    let tree = parse(
        source,
        "template",
        SyntaxConfig,
        WhitespaceConfig::default(),
    )
    .ok()?;
    let Stmt::Template(template) = &tree else {
        return None;
    };
    let mut found = Vec::new();
    candidates(&template.children, &mut found);
    found.sort_by_key(|(f, _)| f.span().start_offset);
    let mut outer = String::with_capacity(source.len());
    let mut loops = Vec::new();
    let mut copied = 0;
    for (f, over) in found {
        let Some(text) = LoopText::find(source, f) else {
            continue;
        };
        let k = loops.len();
        outer.push_str(&source[copied..text.start]);
        outer.push_str(if text.trim_before { "{{-" } else { "{{" });
        outer.push_str(&format!(" {LOOPS}.splice({k})"));
        let lines = source[text.start..text.end].matches('\n').count();
        outer.push_str(&"\n".repeat(lines));
        outer.push_str(if text.trim_after { " -}}" } else { " }}" });
        copied = text.end;
        let mut own = source[text.start..text.header_end].to_string();
        if over == Over::Peers {
            // After the header, carrying its trim: `-%}` trims the body's leading whitespace,
            // which now follows the mark.
            let close = if text.trim_body { "-}}" } else { "}}" };
            own.push_str(&format!("{{{{ {MARKS}.mark() {close}"));
        }
        own.push_str(&source[text.header_end..text.end]);
        loops.push((over, own));
    }
    if loops.is_empty() {
        return None;
    }
    outer.push_str(&source[copied..]);
    Some(Plan { outer, loops })
}

/// Loops that can be spliced: not inside another loop or an autoescape block (their output
/// would depend on it), and reading nothing of the node.
fn candidates<'a>(body: &'a [Stmt<'a>], out: &mut Vec<(&'a ast::Spanned<ast::ForLoop<'a>>, Over)>) {
    for stmt in body {
        match stmt {
            Stmt::ForLoop(f) => {
                if let Some(over) = spliceable(f) {
                    out.push((f, over));
                }
            }
            Stmt::IfCond(i) => {
                candidates(&i.true_body, out);
                candidates(&i.false_body, out);
            }
            _ => {}
        }
    }
}

/// Whether the loop's output for one item depends only on the item, its position and the
/// list's length (so not on the node, nor on neighbouring items).
fn spliceable(f: &ast::ForLoop<'_>) -> Option<Over> {
    if f.recursive || f.filter_expr.is_some() {
        return None;
    }
    let Expr::Var(target) = &f.target else {
        return None;
    };
    let Expr::Var(iter) = &f.iter else {
        return None;
    };
    let over = match iter.id {
        "nodes" | "node_ips" => Over::All,
        "peers" | "peer_ips" => Over::Peers,
        _ => return None,
    };
    if target.id == "loop" {
        return None;
    }
    // The else branch runs only on an empty list; splicing needs at least one item.
    let mut bound = vec![target.id];
    stmts_ok(&f.body, &mut bound, true).then_some(over)
}

/// Whether `body` reads nothing of the node; `own` says whether `loop` is the spliced loop's.
fn stmts_ok<'a>(body: &[Stmt<'a>], bound: &mut Vec<&'a str>, own: bool) -> bool {
    body.iter().all(|stmt| match stmt {
        Stmt::EmitRaw(_) => true,
        Stmt::EmitExpr(e) => expr_ok(&e.expr, bound, own),
        Stmt::IfCond(i) => {
            expr_ok(&i.expr, bound, own)
                && stmts_ok(&i.true_body, bound, own)
                && stmts_ok(&i.false_body, bound, own)
        }
        Stmt::AutoEscape(a) => expr_ok(&a.enabled, bound, own) && stmts_ok(&a.body, bound, own),
        Stmt::ForLoop(f) => {
            let Expr::Var(target) = &f.target else {
                return false;
            };
            if f.recursive || !expr_ok(&f.iter, bound, own) {
                return false;
            }
            // The else branch sees the outer names only.
            if !stmts_ok(&f.else_body, bound, own) {
                return false;
            }
            let depth = bound.len();
            bound.push(target.id);
            let ok = f
                .filter_expr
                .as_ref()
                .is_none_or(|e| expr_ok(e, bound, own))
                && stmts_ok(&f.body, bound, false);
            bound.truncate(depth);
            ok
        }
        _ => false,
    })
}

fn expr_ok<'a>(node: &Expr<'a>, bound: &[&'a str], own: bool) -> bool {
    let all = |list: &[Expr<'a>]| list.iter().all(|e| expr_ok(e, bound, own));
    let own_loop = |e: &Expr<'_>| own && matches!(e, Expr::Var(v) if v.id == "loop");
    match node {
        Expr::Var(v) if v.id == "loop" => !own,
        Expr::Var(v) => bound.contains(&v.id) || !PER_NODE.contains(&v.id),
        Expr::Const(_) => true,
        Expr::GetAttr(g) if own_loop(&g.expr) => POSITION.contains(&g.name),
        Expr::GetAttr(g) => expr_ok(&g.expr, bound, own),
        Expr::Call(c) => {
            let callee = match &c.expr {
                Expr::GetAttr(g) if own_loop(&g.expr) => g.name == "cycle",
                callee => expr_ok(callee, bound, own),
            };
            callee && args_ok(&c.args, bound, own)
        }
        Expr::Slice(s) => {
            expr_ok(&s.expr, bound, own)
                && [&s.start, &s.stop, &s.step]
                    .into_iter()
                    .flatten()
                    .all(|e| expr_ok(e, bound, own))
        }
        Expr::UnaryOp(u) => expr_ok(&u.expr, bound, own),
        Expr::BinOp(b) => expr_ok(&b.left, bound, own) && expr_ok(&b.right, bound, own),
        Expr::Compare(c) => {
            expr_ok(&c.expr, bound, own) && c.ops.iter().all(|op| expr_ok(&op.expr, bound, own))
        }
        Expr::IfExpr(i) => {
            expr_ok(&i.test_expr, bound, own)
                && expr_ok(&i.true_expr, bound, own)
                && i.false_expr.as_ref().is_none_or(|e| expr_ok(e, bound, own))
        }
        Expr::Filter(f) => {
            f.expr.as_ref().is_none_or(|e| expr_ok(e, bound, own)) && args_ok(&f.args, bound, own)
        }
        Expr::Test(t) => expr_ok(&t.expr, bound, own) && args_ok(&t.args, bound, own),
        Expr::GetItem(g) => expr_ok(&g.expr, bound, own) && expr_ok(&g.subscript_expr, bound, own),
        Expr::List(l) => all(&l.items),
        Expr::Map(m) => all(&m.keys) && all(&m.values),
    }
}

fn args_ok<'a>(args: &[CallArg<'a>], bound: &[&'a str], own: bool) -> bool {
    args.iter().all(|arg| match arg {
        CallArg::Pos(e) | CallArg::Kwarg(_, e) => expr_ok(e, bound, own),
        CallArg::PosSplat(_) | CallArg::KwargSplat(_) => false,
    })
}

/// Where a loop's text lies: from its `{%` to the `%}` after `endfor`, where its header
/// ends, and which of its tags trim whitespace.
struct LoopText {
    start: usize,
    header_end: usize,
    end: usize,
    trim_before: bool,
    trim_body: bool,
    trim_after: bool,
}

impl LoopText {
    /// The loop's text, or `None` when its tags are not the plain `{% … %}` looked for.
    fn find(source: &str, f: &ast::Spanned<ast::ForLoop<'_>>) -> Option<Self> {
        let bytes = source.as_bytes();
        let span = f.span();
        let (start, trim_before) = tag_open(bytes, span.start_offset as usize)?;
        let (header_end, trim_body) = tag_close(bytes, f.iter.span().end_offset as usize)?;
        let (end, trim_after) = tag_close(bytes, span.end_offset as usize)?;
        Some(Self {
            start,
            header_end,
            end,
            trim_before,
            trim_body,
            trim_after,
        })
    }
}

/// The `{%` a tag whose first word starts at `at` opens with, and whether it is `{%-`.
fn tag_open(bytes: &[u8], at: usize) -> Option<(usize, bool)> {
    let mut i = at;
    while i > 0 && bytes[i - 1].is_ascii_whitespace() {
        i -= 1;
    }
    let mut trim = false;
    if i > 0 && matches!(bytes[i - 1], b'-' | b'+') {
        trim = bytes[i - 1] == b'-';
        i -= 1;
    }
    (i >= 2 && &bytes[i - 2..i] == b"{%").then_some((i - 2, trim))
}

/// The end of the `%}` that closes a tag whose last word ends at `at`, and whether it is `-%}`.
fn tag_close(bytes: &[u8], at: usize) -> Option<(usize, bool)> {
    let mut i = at;
    while i < bytes.len() && bytes[i].is_ascii_whitespace() {
        i += 1;
    }
    let mut trim = false;
    if i < bytes.len() && matches!(bytes[i], b'-' | b'+') {
        trim = bytes[i] == b'-';
        i += 1;
    }
    (bytes.get(i..i + 2) == Some(b"%}")).then_some((i + 2, trim))
}

/// One render of a loop for the epoch: its text, and where each iteration started in it and
/// how many instructions the render had taken by then.
#[derive(Debug)]
pub(super) struct Run {
    pub(super) text: String,
    pub(super) marks: Vec<(usize, u64)>,
    pub(super) fuel: u64,
}

/// A [`Run`] kept for the epoch: its text shared, its marks split.
#[derive(Debug)]
pub(super) struct Kept {
    text: Arc<EpochText>,
    at: Vec<usize>,
    fuel_at: Vec<u64>,
    fuel: u64,
}

impl Kept {
    fn new(run: Run) -> Self {
        let (at, fuel_at) = run.marks.into_iter().unzip();
        Self {
            text: EpochText::new(run.text),
            at,
            fuel_at,
            fuel: run.fuel,
        }
    }

    /// Where item `i`'s output starts (the end when there is none), and the instructions
    /// taken before it.
    fn before(&self, i: usize) -> (usize, u64) {
        match (self.at.get(i), self.fuel_at.get(i)) {
            (Some(&at), Some(&fuel)) => (at, fuel),
            _ => (self.text.raw().len(), self.fuel),
        }
    }

    /// Bytes held in the text's escaped copy.
    fn escaped_weight(&self) -> usize {
        self.text.escaped_bytes().len()
    }
}

/// One spliced loop as rendered for an epoch.
#[derive(Debug)]
pub(super) enum LoopOutput {
    /// A loop over `nodes`: the same text for every node.
    All(Kept),
    /// A loop over `peers`: `upto` as the last member renders it, `from` as the first does.
    /// Item j < n - 1 is mark j of `upto`; item j > 0 is mark j - 1 of `from`.
    Peers { upto: Kept, from: Kept },
}

impl LoopOutput {
    /// A loop over `nodes`, rendered once.
    pub(super) fn all(run: Run) -> Self {
        Self::All(Kept::new(run))
    }

    /// A `Peers` loop's output from its two renders, once the marks are checked: one per
    /// member but one in each, in order, within the text.
    pub(super) fn peers(members: usize, upto: Run, from: Run) -> Option<Self> {
        let fits = |run: &Run| {
            run.marks.len() + 1 == members
                && run.marks.windows(2).all(|w| w[0] <= w[1])
                && run.marks.iter().all(|&(at, fuel)| {
                    at <= run.text.len() && run.text.is_char_boundary(at) && fuel <= run.fuel
                })
        };
        (fits(&upto) && fits(&from)).then(|| Self::Peers {
            upto: Kept::new(upto),
            from: Kept::new(from),
        })
    }

    /// Bytes held for the epoch in escaped copies of the texts.
    pub(super) fn escaped_weight(&self) -> usize {
        match self {
            Self::All(kept) => kept.escaped_weight(),
            Self::Peers { upto, from } => upto.escaped_weight() + from.escaped_weight(),
        }
    }

    /// The instructions the loop takes for the member at `index`: its items before the
    /// member as the last member's render took them, and those after as the first's did.
    fn fuel(&self, index: usize) -> u64 {
        match self {
            Self::All(kept) => kept.fuel,
            Self::Peers { upto, from } => {
                let (_, head) = upto.before(index);
                let (_, tail) = from.before(index);
                head + from.fuel.saturating_sub(tail)
            }
        }
    }

    /// The loop's output for the member at `index`: two slices of the epoch's texts.
    fn parts(&self, index: usize) -> [(&Arc<EpochText>, Range<usize>); 2] {
        match self {
            Self::All(kept) => [(&kept.text, 0..kept.text.raw().len()), (&kept.text, 0..0)],
            Self::Peers { upto, from } => {
                let (head, _) = upto.before(index);
                let (tail, _) = from.before(index);
                [
                    (&upto.text, 0..head),
                    (&from.text, tail..from.text.raw().len()),
                ]
            }
        }
    }
}

/// `{{ __bootsync_marks.mark() }}` in a loop's epoch render: notes where an iteration starts.
#[derive(Debug)]
pub(super) struct Marks(pub(super) Arc<Ledger>);

impl Object for Marks {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn call_method(
        self: &Arc<Self>,
        state: &State<'_, '_>,
        method: &str,
        _args: &[Value],
    ) -> Result<Value, Error> {
        if method != "mark" {
            return Err(Error::from(ErrorKind::UnknownMethod));
        }
        self.0.mark(state.fuel_levels().map_or(0, |(used, _)| used));
        Ok(Value::from(""))
    }
}

/// The spliced loops of one file for one node: `{{ __bootsync_loops.splice(k) }}` writes
/// loop k's output, charging the render the instructions the loop took.
#[derive(Debug)]
pub(super) struct NodeLoops {
    pub(super) loops: Arc<[LoopOutput]>,
    pub(super) index: usize,
    /// Told which parts of the output are slices of the epoch's texts.
    pub(super) ledger: Option<Arc<Ledger>>,
}

impl Object for NodeLoops {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn call_method(
        self: &Arc<Self>,
        state: &State<'_, '_>,
        method: &str,
        args: &[Value],
    ) -> Result<Value, Error> {
        let k = match (method, args) {
            ("splice", [k]) => k.as_usize(),
            _ => None,
        };
        let Some((k, output)) = k.and_then(|k| Some((k, self.loops.get(k)?))) else {
            return Err(Error::from(ErrorKind::UnknownMethod));
        };
        // Fuel bounds the spliced loop as it bounded the loop: a render is charged the
        // instructions each loop took once per epoch.
        if let Some((_, remaining)) = state.fuel_levels() {
            let charged = state
                .get_temp(CHARGED)
                .and_then(|v| v.as_usize())
                .unwrap_or(0) as u64;
            let charged = charged.saturating_add(output.fuel(self.index));
            if charged > remaining {
                return Err(Error::new(ErrorKind::OutOfFuel, "a spliced loop"));
            }
            state.set_temp(CHARGED, Value::from(charged));
        }
        Ok(Value::from_object(Spliced {
            node: self.clone(),
            k,
        }))
    }
}

/// One loop's output for one node, written as two slices of the epoch's texts.
#[derive(Debug)]
struct Spliced {
    node: Arc<NodeLoops>,
    k: usize,
}

impl Object for Spliced {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write_slices(
            f,
            self.node.loops[self.k].parts(self.node.index),
            self.node.ledger.as_deref(),
        )
    }
}

/// Writes slices of epoch texts, telling `ledger` (when there is one) what they are.
pub(super) fn write_slices<'a>(
    f: &mut std::fmt::Formatter<'_>,
    slices: impl IntoIterator<Item = (&'a Arc<EpochText>, Range<usize>)>,
    ledger: Option<&Ledger>,
) -> std::fmt::Result {
    for (text, range) in slices {
        if let Some(ledger) = ledger {
            ledger.span(text, range.clone());
        }
        f.write_str(&text.raw()[range])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loops_users_write_are_planned_and_the_rest_is_kept() {
        let source = "id: {{ node.identifier }}\npeers: [{% for p in peers %}\"{{ p.ip }}\"{% if not loop.last %}, {% endif %}{% endfor %}]\n";
        let plan = plan(source).expect("the issue's loop is spliced");
        assert_eq!(
            plan.outer,
            "id: {{ node.identifier }}\npeers: [{{ __bootsync_loops.splice(0) }}]\n"
        );
        assert_eq!(
            plan.loops,
            vec![(
                Over::Peers,
                "{% for p in peers %}{{ __bootsync_marks.mark() }}\"{{ p.ip }}\"{% if not loop.last %}, {% endif %}{% endfor %}".to_string()
            )]
        );
        let seed = "peers:\n{% for p in nodes %}  - {{ p.ip }}\n{% endfor %}";
        assert_eq!(plan_of(seed), vec![Over::All]);
    }

    fn plan_of(source: &str) -> Vec<Over> {
        plan(source).map_or_else(Vec::new, |p| p.loops.into_iter().map(|l| l.0).collect())
    }

    #[test]
    fn trims_and_line_breaks_are_carried_to_the_outer_template() {
        let source = "a\n  {%- for p in peers -%}\n  {{ p.ip }}\n{%- endfor -%}\n b";
        let plan = plan(source).unwrap();
        assert_eq!(
            plan.outer,
            "a\n  {{- __bootsync_loops.splice(0)\n\n -}}\n b"
        );
        assert_eq!(
            plan.loops[0].1,
            "{%- for p in peers -%}{{ __bootsync_marks.mark() -}}\n  {{ p.ip }}\n{%- endfor -%}"
        );
    }

    #[test]
    fn loops_that_read_the_node_or_neighbours_are_not_spliced() {
        for source in [
            "{% for p in peers %}{{ node.ip }}{% endfor %}",
            "{% for p in peers %}{{ index }}{% endfor %}",
            "{% for p in nodes %}{{ peers | length }}{% endfor %}",
            "{% for p in peers %}{{ loop.previtem }}{% endfor %}",
            "{% for p in peers %}{{ loop.changed(p) }}{% endfor %}",
            "{% for p in peers %}{{ loop }}{% endfor %}",
            "{% for p in peers if p.ip %}{{ p.ip }}{% endfor %}",
            "{% for p in peers %}{% for q in peer_ips %}{{ q }}{% endfor %}{% endfor %}",
            "{% for n in nodes %}{% for p in peers %}{{ p.ip }}{% endfor %}{% endfor %}",
            "{% autoescape true %}{% for p in peers %}{{ p.ip }}{% endfor %}{% endautoescape %}",
            "{% for p in peers | reverse %}{{ p.ip }}{% endfor %}",
            "{{ __bootsync_loops }}{% for p in peers %}{{ p.ip }}{% endfor %}",
        ] {
            assert_eq!(plan_of(source), vec![], "{source}");
        }
    }

    #[test]
    fn position_nested_loops_and_shadowing_names_are_spliced() {
        for (source, over) in [
            (
                "{% for p in peers %}{{ loop.index }}/{{ loop.length }}{{ loop.cycle('a', 'b') }}{% endfor %}",
                Over::Peers,
            ),
            (
                "{% for node in peers %}{{ node.ip }}{% endfor %}",
                Over::Peers,
            ),
            (
                "{% for ip in peer_ips %}{% for q in nodes %}{{ loop.previtem }}{{ q.ip }}{% endfor %}{{ ip }}{% endfor %}",
                Over::Peers,
            ),
            (
                "{% if index > 0 %}{% for ip in node_ips %}{{ ip }}{% else %}{{ node.ip }}{% endfor %}{% endif %}",
                Over::All,
            ),
        ] {
            assert_eq!(plan_of(source), vec![over], "{source}");
        }
    }

    mod differential {
        //! Spliced renders against the per-node render they replace, over generated templates
        //! and member sets: the same bytes, or the same error, for every node.

        use std::sync::atomic::{AtomicUsize, Ordering};

        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};

        use crate::api::cfgsync::ArtifactFile;
        use crate::cfgsync::payload::{Body, Shared, Stamp, join_files, write_laid_files};
        use crate::cfgsync::template::{Laid, RenderLimits, Scope, Templates};

        /// Text outside loops: raw text, the node's own values, and a guard around a loop.
        const OUTER: &[&str] = &[
            "",
            "a",
            "\n",
            "  ",
            "x: ",
            " \n  ",
            "{{ node.identifier }}",
            "{{ index }}",
            "{{ node.ip }}",
            "{{ peers | length }}",
            "{{ 60 // node.metadata.zero }}",
            "{# note #}",
            "{{ peer_ips }}",
            "{{ node_ips }}",
            "{{ peer_ips | tojson }}",
        ];

        /// Pieces of loop bodies, node-independent or not, position-dependent or not.
        const BODY: &[&str] = &[
            "\n",
            "  - ",
            ", ",
            "\"",
            "{{ p.ip }}",
            "{{ p.identifier }}",
            "{{ p }}",
            "{{ p.metadata.port + loop.index }}",
            "{% if not loop.last %}, {% endif %}",
            "{% if loop.first %}[{% endif %}",
            "{{ loop.index0 }}",
            "{{ loop.revindex }}/{{ loop.revindex0 }}",
            "{{ loop.length }}",
            "{{ loop.cycle('a', 'b', 'c') }}",
            "{{- p.ip -}}",
            " {{ p.metadata.role | upper }} ",
            "{{ loop.previtem }}",
            "{{ loop.nextitem }}",
            "{{ loop.changed(p.metadata.role) }}",
            "{{ node.identifier }}",
            "{{ index }}",
            "{% for q in nodes %}{{ q.ip }};{% endfor %}",
            "{% for q in peer_ips %}{{ q }}{% endfor %}",
            "{% for q in range(loop.index) %}{{ loop.index }}{% endfor %}",
            "{{ 60 // p.metadata.zero }}",
            "{{ 'db' if p.metadata.role == 'db' else 'other' }}",
        ];

        fn one_of(list: &'static [&'static str]) -> impl Strategy<Value = String> {
            proptest::sample::select(list).prop_map(str::to_string)
        }

        fn trim() -> impl Strategy<Value = &'static str> {
            proptest::sample::select(&["", "-", "+"][..])
        }

        fn a_loop() -> impl Strategy<Value = String> {
            (
                (trim(), trim(), trim(), trim()),
                proptest::sample::select(&["peers", "nodes", "peer_ips", "node_ips"][..]),
                proptest::collection::vec(one_of(BODY), 0..5),
                proptest::option::of(one_of(OUTER)),
                any::<bool>(),
            )
                .prop_map(|((a, b, c, d), iter, body, otherwise, guarded)| {
                    let otherwise = otherwise.map_or(String::new(), |o| format!("{{% else %}}{o}"));
                    let text = format!(
                        "{{%{a} for p in {iter} {b}%}}{}{otherwise}{{%{c} endfor {d}%}}",
                        body.concat()
                    );
                    if guarded {
                        format!("{{% if index is even %}}{text}{{% else %}}odd{{% endif %}}")
                    } else {
                        text
                    }
                })
        }

        fn template() -> impl Strategy<Value = String> {
            proptest::collection::vec(prop_oneof![one_of(OUTER), a_loop()], 1..6)
                .prop_map(|parts| parts.concat())
        }

        /// Members in identifier order: (identifier, IP, metadata).
        fn members() -> impl Strategy<Value = Vec<(String, std::net::IpAddr, serde_json::Value)>> {
            proptest::collection::vec((any::<[u8; 2]>(), any::<bool>(), 0u8..100, 0u8..4), 1..8)
                .prop_map(|list| {
                    list.into_iter()
                        .enumerate()
                        .map(|(i, ([a, b], db, port, zero))| {
                            let ip = std::net::IpAddr::from([10, 0, a, b]);
                            let role = if db { "db" } else { "web" };
                            let metadata =
                                serde_json::json!({"role": role, "port": port, "zero": zero});
                            (format!("n{i:02}"), ip, metadata)
                        })
                        .collect()
                })
        }

        fn templates(source: &str, limits: RenderLimits, spliced: bool) -> Templates {
            let mut templates = Templates::new(limits);
            let name = "files/0".to_string();
            let added = if spliced {
                templates.add_per_node(name, source.to_string())
            } else {
                templates.add(name, source.to_string())
            };
            added.expect("generated templates compile");
            templates
        }

        /// A member: identifier, IP, metadata.
        type Member = (String, std::net::IpAddr, serde_json::Value);

        /// `n` members, `n00000` on, at `10.1.x.y`, with the metadata `meta` gives each.
        fn member_set(n: u32, meta: impl Fn(u32) -> serde_json::Value) -> Vec<Member> {
            (0..n)
                .map(|i| {
                    let [_, _, a, b] = i.to_be_bytes();
                    (
                        format!("n{i:05}"),
                        std::net::IpAddr::from([10, 1, a, b]),
                        meta(i),
                    )
                })
                .collect()
        }

        fn scope_of(members: &[Member]) -> Scope {
            Scope::new(
                members
                    .iter()
                    .map(|(id, ip, meta)| (id.as_str(), *ip, meta)),
            )
        }

        #[test]
        fn spliced_renders_are_byte_for_byte_the_per_node_renders() {
            let cases = 1500;
            let planned = AtomicUsize::new(0);
            let mut runner = TestRunner::new(Config {
                cases,
                failure_persistence: None,
                ..Config::default()
            });
            let limit = proptest::sample::select(&[16 << 20, 40, 150, 600][..]);
            runner
                .run(
                    &(template(), members(), limit),
                    |(source, members, limit)| {
                        let limits = RenderLimits {
                            max_file_bytes: limit,
                            ..RenderLimits::default()
                        };
                        let spliced = templates(&source, limits, true);
                        let plain = templates(&source, limits, false);
                        if spliced.spliced() > 0 {
                            planned.fetch_add(1, Ordering::Relaxed);
                        }
                        let (a, b) = (scope_of(&members), scope_of(&members));
                        let paths = ["/f".to_string()];
                        for k in 0..members.len() {
                            let render = |t: &Templates, s: &Scope| {
                                t.render_files("files", &paths, s, Some(k), usize::MAX)
                                    .map(|f| f[0].content.clone())
                                    .map_err(|e| e.to_string())
                            };
                            prop_assert_eq!(render(&spliced, &a), render(&plain, &b), "node {}", k);
                            let laid =
                                spliced.render_laid("files", &paths, &a, Some(k), usize::MAX, true);
                            if let Ok(laid) = laid {
                                let (body, plain) = bodies(laid);
                                prop_assert_eq!(&body.bytes, &plain, "node {}", k);
                                prop_assert_eq!(gunzip(&body.gzip()), plain);
                            }
                        }
                        Ok(())
                    },
                )
                .unwrap();
            // The generator must exercise the splice, not only the templates it declines.
            let planned = planned.load(Ordering::Relaxed);
            assert!(
                planned * 4 > cases as usize,
                "{planned} of {cases} templates spliced"
            );
        }

        /// The answer body made from `laid` (shared texts copied escaped), and the one made
        /// by escaping the same files whole.
        fn bodies(laid: Vec<Laid>) -> (Body, bytes::Bytes) {
            let stamp = Stamp {
                epoch: 7,
                version: Some(3),
            };
            let shared = Shared::new(&[ArtifactFile::new("s", "shared \"text\"")]);
            let files: Vec<ArtifactFile> = laid.iter().map(|l| l.file.clone()).collect();
            let body = Body::assemble(|out| write_laid_files(out, &laid), shared.clone(), stamp);
            let plain = Body::new(&join_files(&files), shared, stamp);
            (body, plain.bytes)
        }

        fn gunzip(data: &[u8]) -> bytes::Bytes {
            use std::io::Read as _;
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .expect("valid gzip");
            out.into()
        }

        #[test]
        fn answers_for_large_sets_copy_and_compress_the_shared_texts_exactly() {
            // Past several compressed blocks: node k's slices start and end inside blocks.
            let source = "id: {{ node.identifier }}\npeers: [{% for p in peers %}\"{{ p.ip }}\"{% if not loop.last %}, {% endif %}{% endfor %}]\nips: {{ peer_ips }}\nall: {% for p in nodes %}{{ p.identifier }}\t{% endfor %}\n";
            let members = member_set(3000, |_| serde_json::json!({}));
            let limits = RenderLimits::default();
            let spliced = templates(source, limits, true);
            let plain = templates(source, limits, false);
            assert_eq!(spliced.spliced(), 1);
            let (a, b) = (scope_of(&members), scope_of(&members));
            let paths = ["/config.yaml".to_string()];
            for k in [0, 1, 2, 511, 1500, 2047, 2998, 2999] {
                let laid = spliced
                    .render_laid("files", &paths, &a, Some(k), usize::MAX, true)
                    .unwrap();
                // The loop's two slices (one at either end), the list's two, the `nodes` loop.
                // The loop's two slices, the list's two, the `nodes` loop: a slice too short
                // to record (a lone bracket, one item) at either end is escaped in place.
                let spans = laid[0].spans.len();
                assert!((3..=5).contains(&spans), "node {k}: {spans} spans");
                let expected = plain
                    .render_files("files", &paths, &b, Some(k), usize::MAX)
                    .unwrap();
                assert_eq!(laid[0].file.content, expected[0].content, "node {k}");
                let (body, whole) = bodies(laid);
                assert_eq!(body.bytes, whole, "node {k}");
                let gz = body.gzip();
                assert_eq!(gunzip(&gz), whole, "node {k}");
                assert!(
                    gz.len() * 4 < whole.len(),
                    "node {k}: {} of {}",
                    gz.len(),
                    whole.len()
                );
            }
        }

        #[test]
        fn each_node_is_charged_its_own_loop_s_instructions() {
            // Items of very different cost: node k's loop costs everything but item k.
            let source = "{% for p in peers %}{% if p.metadata.big %}{% for x in range(300) %}{{ x }}{% endfor %}{% endif %}.{% endfor %}";
            let members = member_set(6, |i| serde_json::json!({"big": ([0, 2, 5].contains(&i))}));
            let scope = || scope_of(&members);
            let paths = ["/f".to_string()];
            let render = |fuel: u64, spliced: bool, k: usize| {
                let limits = RenderLimits {
                    fuel,
                    ..RenderLimits::default()
                };
                templates(source, limits, spliced)
                    .render_files("files", &paths, &scope(), Some(k), usize::MAX)
                    .is_ok()
            };
            for k in 0..members.len() {
                let (mut low, mut high) = (1u64, 1_000_000u64);
                while low < high {
                    let mid = (low + high) / 2;
                    if render(mid, false, k) {
                        high = mid
                    } else {
                        low = mid + 1
                    }
                }
                assert!(
                    !render(low * 9 / 10, true, k),
                    "node {k}: {} instructions are too few",
                    low * 9 / 10
                );
                assert!(
                    render(low * 11 / 10, true, k),
                    "node {k}: {} instructions are enough",
                    low * 11 / 10
                );
            }
        }

        #[test]
        fn a_list_made_into_a_value_over_and_over_leaves_no_pile_of_records() {
            let source = "{% for a in range(2000) %}x{% if peer_ips ~ '' %}{% endif %}{% endfor %}{{ peer_ips }}";
            let members = member_set(40, |_| serde_json::json!({}));
            let scope = scope_of(&members);
            let templates = templates(source, RenderLimits::default(), true);
            let laid = templates
                .render_laid(
                    "files",
                    &["/f".to_string()],
                    &scope,
                    Some(3),
                    usize::MAX,
                    true,
                )
                .unwrap();
            assert_eq!(
                laid[0].spans.len(),
                2,
                "only the list written at the end: its two slices"
            );
            let (body, plain) = bodies(laid);
            assert_eq!(body.bytes, plain);
        }

        #[test]
        fn fuel_bounds_a_node_s_render_with_its_spliced_loop_counted() {
            // The loop alone fits the fuel, the node's own loop alone too, both do not.
            let source = "{% for p in peers %}{{ p.ip }},{% endfor %}{% for x in range(300) %}{{ x }}{% endfor %}";
            let members = member_set(200, |_| serde_json::json!({}));
            let scope = || scope_of(&members);
            let paths = ["/f".to_string()];
            let render = |fuel: u64, spliced: bool| {
                let limits = RenderLimits {
                    fuel,
                    ..RenderLimits::default()
                };
                let templates = templates(source, limits, spliced);
                assert_eq!(templates.spliced(), usize::from(spliced));
                templates
                    .render_files("files", &paths, &scope(), Some(5), usize::MAX)
                    .map(|f| f[0].content.len())
                    .map_err(|e| e.to_string())
            };
            let whole = render(100_000, false).expect("renders under ample fuel");
            assert_eq!(render(100_000, true), Ok(whole));
            // Find the least fuel the per-node render needs, then check the spliced one fails
            // just below what the loop and the rest need together.
            let (mut low, mut high) = (1u64, 100_000u64);
            while low < high {
                let mid = (low + high) / 2;
                if render(mid, false).is_ok() {
                    high = mid
                } else {
                    low = mid + 1
                }
            }
            let needed = low;
            let failed = render(needed / 2 + needed / 4, true).expect_err("the loop is charged");
            assert!(failed.contains("instructions"), "{failed}");
            assert!(render(needed * 2, true).is_ok());
        }
    }
}
