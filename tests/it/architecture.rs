//! The module layering, checked on the source: every `crate::…` path in a module must point to a
//! module it may depend on, and the modules' dependencies form no cycle.
//!
//! ```text
//! foundation (backoff, clock, files, memory, metrics, servers, shutdown, telemetry, tls)
//!   ← store ← api ← cfgsync, bootstrap, client ← server ← cli
//!                    initialisers (bootstrap, cfgsync)
//! ```

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const FOUNDATION: &[&str] = &[
    "backoff",
    "clock",
    "duration",
    "files",
    "memory",
    "metrics",
    "servers",
    "shutdown",
    "telemetry",
    "tls",
];

/// Each top-level module and the modules (beyond the foundation) it may use.
fn allowed() -> BTreeMap<&'static str, Vec<&'static str>> {
    let mut rules: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for module in FOUNDATION {
        rules.insert(module, vec![]);
    }
    rules.insert("store", vec![]);
    rules.insert("api", vec!["store"]);
    rules.insert("cfgsync", vec!["api", "store"]);
    rules.insert("bootstrap", vec!["api", "store"]);
    rules.insert("client", vec!["api", "store"]);
    rules.insert("initialisers", vec!["api", "store", "bootstrap", "cfgsync"]);
    // Re-exports for third-party initialisers.
    rules.insert("plugin", vec!["store", "bootstrap"]);
    rules.insert("server", vec!["api", "store", "cfgsync", "bootstrap"]);
    rules.insert(
        "cli",
        vec!["api", "store", "cfgsync", "bootstrap", "client", "server"],
    );
    rules
}

/// The top-level module a file belongs to (`None` for the crate root and `main`).
fn owner(root: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(root).unwrap();
    let mut parts = relative.iter().map(|p| p.to_string_lossy().into_owned());
    let first = parts.next()?;
    if first == "initialisers" {
        return Some(first);
    }
    let module = parts.next()?;
    let module = module.strip_suffix(".rs").unwrap_or(&module).to_string();
    (module != "lib" && module != "main").then_some(module)
}

/// Every top-level module named after `crate::` in `line`, including `crate::{a, b::c}`.
fn targets(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        // `bootsync::crate::` cannot occur; `$crate::` in a macro is not this crate's layering.
        let before = &rest[..at];
        rest = &rest[at + "crate::".len()..];
        if before.ends_with('$') || before.ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Only the group's top-level items name modules: `{api::Token, store::{self, Key}}`.
            let (mut depth, mut item) = (0, String::new());
            for c in group.chars().chain([',']) {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.extend(leading_name(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            found.extend(leading_name(&item));
        } else {
            found.extend(leading_name(rest));
        }
    }
    found
}

/// The identifier `text` starts with, unless it is `self` or empty.
fn leading_name(text: &str) -> Option<String> {
    let name: String = text
        .trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty() && name != "self").then_some(name)
}

/// The crate's top-level modules, as `src/lib.rs` declares them (so a path to a macro or a
/// re-exported crate, like `crate::register!`, is not taken for a module).
fn modules(root: &Path) -> BTreeSet<String> {
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    lib.lines()
        .filter_map(|line| {
            let line = line
                .trim_start()
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub ");
            let name = line.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.to_string())
        })
        .collect()
}

/// (line number, module) for every `crate::` path in a file's text, comments skipped. A
/// `use crate::{…}` group that spans lines is read whole, nested groups included.
fn paths_in(text: &str) -> Vec<(usize, String)> {
    let depth = |s: &str| s.matches('{').count() as i64 - s.matches('}').count() as i64;
    let mut found = Vec::new();
    let mut group = String::new();
    let mut group_line = 0;
    for (n, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        if group.is_empty() && !(code.contains("crate::{") && depth(code) > 0) {
            found.extend(targets(code).into_iter().map(|to| (n + 1, to)));
            continue;
        }
        if group.is_empty() {
            group_line = n + 1;
        }
        group.push_str(code);
        group.push(' ');
        if depth(&group) <= 0 {
            let whole = std::mem::take(&mut group);
            found.extend(targets(&whole).into_iter().map(|to| (group_line, to)));
        }
    }
    found
}

/// (file, line number, from, to) for every cross-module path in the crate.
fn edges() -> Vec<(String, usize, String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let modules = modules(root);
    let mut files = Vec::new();
    support::rust_files(&root.join("src"), &mut files);
    support::rust_files(&root.join("initialisers"), &mut files);
    let mut edges = Vec::new();
    for file in files {
        let Some(from) = owner(root, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for (line, to) in paths_in(&text) {
            if to != from && modules.contains(&to) {
                let shown = file.strip_prefix(root).unwrap().display().to_string();
                edges.push((shown, line, from.clone(), to));
            }
        }
    }
    edges
}

#[it::test]
fn every_module_uses_only_the_layers_below_it() {
    let rules = allowed();
    let mut forbidden = Vec::new();
    for (file, line, from, to) in edges() {
        let Some(may) = rules.get(from.as_str()) else {
            forbidden.push(format!(
                "{file}: module `{from}` has no place in the layering (add it to tests/architecture.rs)"
            ));
            continue;
        };
        // Everything may use the foundation; the foundation's own rule is empty, so it may use
        // nothing else.
        if FOUNDATION.contains(&to.as_str()) {
            continue;
        }
        if !may.contains(&to.as_str()) {
            forbidden.push(format!(
                "{file}:{line}: `{from}` → `{to}` is forbidden; `{from}` may use {}",
                if may.is_empty() {
                    "only the foundation".to_string()
                } else {
                    format!("{} and the foundation", may.join(", "))
                }
            ));
        }
    }
    assert!(
        forbidden.is_empty(),
        "forbidden imports:\n{}",
        forbidden.join("\n")
    );
}

#[it::test]
fn the_module_graph_has_no_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (_, _, from, to) in edges() {
        graph.entry(from).or_default().insert(to);
    }
    // Depth-first search with colours; a grey node reached again closes a cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, bool>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(node) {
            Some(true) => return None,
            Some(false) => {
                let start = path.iter().position(|n| n == node).unwrap();
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        state.insert(node.to_string(), false);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, state, path) {
                return Some(cycle);
            }
        }
        path.pop();
        state.insert(node.to_string(), true);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut state, &mut Vec::new()) {
            panic!("module cycle: {}", cycle.join(" → "));
        }
    }
}

#[it::test]
fn the_scanner_reads_a_group_spanning_lines_whole() {
    let text = "use std::fmt;\nuse crate::{\n    api::{ErrorBody, ErrorCode},\n    server::X,\n};\n// crate::cli in a comment\nfn f() { crate::store::g() }\n";
    let found: Vec<String> = paths_in(text).into_iter().map(|(_, to)| to).collect();
    assert_eq!(found, ["api", "server", "store"]);
}

#[it::test]
fn the_scanner_sees_grouped_and_inline_paths() {
    assert_eq!(targets("use crate::store::{Key, Revision};"), ["store"]);
    assert_eq!(
        targets("use crate::{api::Token, store::{self, Key}};"),
        ["api", "store"]
    );
    assert_eq!(
        targets("    let x = crate::server::error::error_chain(&e);"),
        ["server"]
    );
    assert!(targets("macro_rules! m { () => { $crate::store::Key } }").is_empty());
    assert!(targets("use other_crate::store;").is_empty());
}

/// The children of module directory `dir`: its `.rs` files (but `mod.rs`) and its
/// subdirectories, by module name.
fn children(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_stem()?.to_str()?.to_string();
            let module = path.is_dir() || (path.extension()? == "rs" && name != "mod");
            module.then_some(name)
        })
        .collect()
}

/// Every module named right after `prefix` in `text` (`super::a`, `super::{a, b::c}`), outside
/// comments and the test modules at the end of a file.
fn after_prefix(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("#[cfg(test)]") {
            break;
        }
        if code.starts_with("//") {
            continue;
        }
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let before = &rest[..at];
            rest = &rest[at + prefix.len()..];
            if before.ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            found.extend(targets(&format!("crate::{rest}")));
        }
    }
    found
}

/// The dependencies between the children of module directory `dir`: child → children it
/// names through `super::` (from a file directly in `dir`), `super::super::` (from a file one
/// level deeper) or `crate::<module path>::`.
fn child_graph(dir: &Path, module_path: &str) -> BTreeMap<String, BTreeSet<String>> {
    let siblings = children(dir);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for child in &siblings {
        let file = dir.join(format!("{child}.rs"));
        let subdir = dir.join(child);
        let mut sources = Vec::new();
        if file.is_file() {
            sources.push((std::fs::read_to_string(&file).unwrap(), "super::"));
        }
        if subdir.is_dir() {
            let mut files = Vec::new();
            support::rust_files(&subdir, &mut files);
            for f in files {
                let prefix = if f.file_name().is_some_and(|n| n == "mod.rs") {
                    "super::"
                } else {
                    "super::super::"
                };
                sources.push((std::fs::read_to_string(&f).unwrap(), prefix));
            }
        }
        let mut named = BTreeSet::new();
        for (text, prefix) in &sources {
            named.extend(after_prefix(text, prefix));
            if !module_path.is_empty() {
                named.extend(after_prefix(text, &format!("crate::{module_path}::")));
            }
        }
        named.retain(|n| n != child && siblings.contains(n));
        graph.insert(child.clone(), named);
    }
    graph
}

/// A cycle in `graph`, as the path that closes it.
fn cycle_in(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

/// Every module directory under `dir`, with its path from the crate root (`cfgsync`,
/// `server::conn`).
fn module_dirs(dir: &Path, path: &str, out: &mut Vec<(std::path::PathBuf, String)>) {
    out.push((dir.to_path_buf(), path.to_string()));
    for entry in std::fs::read_dir(dir).unwrap() {
        let sub = entry.unwrap().path();
        if sub.is_dir() {
            let name = sub.file_name().unwrap().to_string_lossy().to_string();
            let nested = if path.is_empty() {
                name
            } else {
                format!("{path}::{name}")
            };
            module_dirs(&sub, &nested, out);
        }
    }
}

#[it::test]
fn no_module_has_a_cycle_between_its_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut dirs = Vec::new();
    module_dirs(&root, "", &mut dirs);
    let mut cycles = Vec::new();
    for (dir, path) in &dirs {
        // The crate root's children are the top-level modules: their layering is checked
        // above, on every path rather than `super::`.
        if path.is_empty() {
            continue;
        }
        if let Some(cycle) = cycle_in(&child_graph(dir, path)) {
            cycles.push(format!("{path}: {}", cycle.join(" → ")));
        }
    }
    assert!(
        cycles.is_empty(),
        "cycles between the files of one module:\n{}",
        cycles.join("\n")
    );
}

#[it::test]
fn a_cycle_between_two_files_of_a_module_is_found() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.rs"), "use super::b::Thing;\n").unwrap();
    std::fs::write(dir.path().join("b.rs"), "fn f() { crate::m::c::g() }\n").unwrap();
    std::fs::create_dir(dir.path().join("c")).unwrap();
    std::fs::write(
        dir.path().join("c/inner.rs"),
        "use super::super::{a, other};\n#[cfg(test)]\nmod tests { use super::b; }\n",
    )
    .unwrap();
    let graph = child_graph(dir.path(), "m");
    assert_eq!(graph["a"], BTreeSet::from(["b".to_string()]));
    assert_eq!(graph["b"], BTreeSet::from(["c".to_string()]));
    assert_eq!(
        graph["c"],
        BTreeSet::from(["a".to_string()]),
        "test modules are skipped"
    );
    assert_eq!(
        cycle_in(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    std::fs::write(dir.path().join("b.rs"), "fn f() {}\n").unwrap();
    assert_eq!(cycle_in(&child_graph(dir.path(), "m")), None);
}

/// (name, first line, lines) of every function in `text` with a body, from its `fn` line to
/// its closing brace (braces in strings and comments are rare enough in this code to ignore).
fn function_lengths(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let code = lines[i].trim_start();
        let name = code
            .split_once("fn ")
            .filter(|(before, _)| {
                !code.starts_with("//")
                    && before
                        .split_whitespace()
                        .all(|w| w.starts_with("pub") || w == "async" || w == "const")
            })
            .map(|(_, after)| leading_name(after).unwrap_or_default());
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            i += 1;
            continue;
        };
        let (mut depth, mut opened, mut end) = (0i64, false, i);
        for (j, line) in lines.iter().enumerate().skip(i) {
            if !opened && line.trim_end().ends_with(';') {
                break;
            }
            depth += line.matches('{').count() as i64 - line.matches('}').count() as i64;
            opened |= line.contains('{');
            if opened && depth <= 0 {
                end = j;
                break;
            }
        }
        if opened {
            found.push((name, i + 1, end - i + 1));
            i = end + 1;
        } else {
            i += 1;
        }
    }
    found
}

#[it::test]
fn no_function_of_the_server_is_over_60_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    support::rust_files(&root.join("src/server"), &mut files);
    let mut long = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (name, line, length) in function_lengths(&text) {
            if length > 60 {
                let shown = file.strip_prefix(root).unwrap().display();
                long.push(format!("{shown}:{line}: {name} is {length} lines"));
            }
        }
    }
    assert!(long.is_empty(), "split these:\n{}", long.join("\n"));
}

#[it::test]
fn function_lengths_are_counted_from_fn_to_closing_brace() {
    let text = "/// doc\npub async fn a(x: u8) -> u8 {\n    if x > 1 {\n        x\n    } else {\n        0\n    }\n}\nfn decl();\nfn b() {}\n";
    assert_eq!(
        function_lengths(text),
        [("a".to_string(), 2, 7), ("b".to_string(), 10, 1)]
    );
}
