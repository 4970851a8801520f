//! The spec file: cadence and the ordered initialisers, validated with every problem reported.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::Initialiser;
use super::duration;
use super::registry::Registry;

/// How often the reconciler wakes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cadence {
    /// Sleep after a failed gate.
    pub gate_backoff: Duration,
    /// First retry delay while something is not at its flag (grows per initialiser).
    pub retry: Duration,
    /// Sleep when everything is at its flag.
    pub steady: Duration,
    /// Cap of the per-initialiser retry backoff.
    pub max_backoff: Duration,
    /// Consecutive failures after which a status says it needs an operator.
    pub needs_operator_after: u32,
}

impl Default for Cadence {
    fn default() -> Self {
        Self {
            gate_backoff: Duration::from_secs(5),
            retry: Duration::from_secs(15),
            steady: Duration::from_secs(300),
            max_backoff: Duration::from_secs(300),
            needs_operator_after: 10,
        }
    }
}

/// One initialiser instance from the spec, constructed and ready to run.
#[derive(Clone)]
pub struct Entry {
    /// Its registered class.
    pub class: String,
    /// Its unique instance name (the key of its state).
    pub name: String,
    /// The flag the operator wants.
    pub flag: String,
    /// Longest a run may take.
    pub timeout: Duration,
    /// The params as written.
    pub params: Value,
    /// A stable hash of the params, to warn when they change without a flag bump.
    pub params_hash: String,
    /// The constructed initialiser.
    pub initialiser: Arc<dyn Initialiser>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("class", &self.class)
            .field("name", &self.name)
            .field("flag", &self.flag)
            .finish_non_exhaustive()
    }
}

/// A validated spec.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Wake cadence.
    pub cadence: Cadence,
    /// Initialisers in order.
    pub entries: Vec<Entry>,
    /// The spec file's directory (relative params paths resolve against it).
    pub dir: PathBuf,
}

/// Every problem found in a spec file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {} problem(s):\n  - {}", problems.len(), problems.join("\n  - "))]
pub struct SpecError {
    /// The spec file.
    pub path: String,
    /// Each problem, with where it is.
    pub problems: Vec<String>,
}

/// Default per-initialiser timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

impl Spec {
    /// Reads and validates a spec file (YAML or JSON by extension).
    pub fn load(path: &Path, registry: &Registry) -> Result<Self, SpecError> {
        let fail = |problem: String| SpecError {
            path: path.display().to_string(),
            problems: vec![problem],
        };
        let raw: Value = crate::files::parse_file(path).map_err(|e| fail(e.problems.join("; ")))?;
        let dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        Self::from_value(&raw, dir, registry).map_err(|problems| SpecError {
            path: path.display().to_string(),
            problems,
        })
    }

    /// Validates a parsed spec; `dir` is where relative paths resolve.
    pub fn from_value(raw: &Value, dir: PathBuf, registry: &Registry) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let Some(top) = raw.as_object() else {
            return Err(vec![
                "the spec must be a map with `initialisers` (and optionally `cadence`)".into(),
            ]);
        };
        for key in top.keys() {
            if key != "cadence" && key != "initialisers" {
                problems.push(format!(
                    "unknown top-level field {key:?} (expected cadence, initialisers)"
                ));
            }
        }
        let cadence = parse_cadence(top.get("cadence"), &mut problems);
        let mut entries = Vec::new();
        let mut names = BTreeSet::new();
        match top.get("initialisers") {
            None => problems.push("missing `initialisers` (a list)".into()),
            Some(Value::Array(list)) => {
                for (index, item) in list.iter().enumerate() {
                    if let Some(entry) =
                        parse_entry(index, item, registry, &mut names, &mut problems)
                    {
                        entries.push(entry);
                    }
                }
            }
            Some(_) => problems.push("`initialisers` must be a list".into()),
        }
        if problems.is_empty() {
            Ok(Self {
                cadence,
                entries,
                dir,
            })
        } else {
            Err(problems)
        }
    }
}

fn parse_cadence(raw: Option<&Value>, problems: &mut Vec<String>) -> Cadence {
    let mut cadence = Cadence::default();
    let Some(raw) = raw else { return cadence };
    let Some(map) = raw.as_object() else {
        problems.push("`cadence` must be a map".into());
        return cadence;
    };
    for (key, value) in map {
        let slot = match key.as_str() {
            "gate_backoff" => &mut cadence.gate_backoff,
            "retry" => &mut cadence.retry,
            "steady" => &mut cadence.steady,
            "max_backoff" => &mut cadence.max_backoff,
            "needs_operator_after" => {
                match value.as_u64() {
                    Some(n) if n > 0 => cadence.needs_operator_after = n as u32,
                    _ => problems
                        .push("cadence.needs_operator_after must be a positive number".into()),
                }
                continue;
            }
            other => {
                problems.push(format!(
                    "cadence: unknown field {other:?} (expected gate_backoff, retry, steady, max_backoff, needs_operator_after)"
                ));
                continue;
            }
        };
        match value.as_str().map(duration::parse) {
            Some(Ok(d)) if !d.is_zero() => *slot = d,
            Some(Ok(_)) => problems.push(format!("cadence.{key} must be longer than zero")),
            Some(Err(e)) => problems.push(format!("cadence.{key}: {e}")),
            None => problems.push(format!("cadence.{key} must be a duration such as \"15s\"")),
        }
    }
    cadence
}

fn parse_entry(
    index: usize,
    item: &Value,
    registry: &Registry,
    names: &mut BTreeSet<String>,
    problems: &mut Vec<String>,
) -> Option<Entry> {
    let Some(map) = item.as_object() else {
        problems.push(format!(
            "initialisers[{index}]: must be a map with class, name, flag"
        ));
        return None;
    };
    let name = map.get("name").and_then(Value::as_str).map(str::to_string);
    let at = match &name {
        Some(name) => format!("initialisers[{index}] ({name})"),
        None => format!("initialisers[{index}]"),
    };
    let before = problems.len();
    for key in map.keys() {
        if !matches!(
            key.as_str(),
            "class" | "name" | "flag" | "timeout" | "params"
        ) {
            problems.push(format!(
                "{at}: unknown field {key:?} (expected class, name, flag, timeout, params)"
            ));
        }
    }
    let text = |field: &str, problems: &mut Vec<String>| -> Option<String> {
        match map.get(field) {
            None => {
                problems.push(format!("{at}: missing `{field}`"));
                None
            }
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
            Some(Value::Number(n)) if field == "flag" => Some(n.to_string()),
            Some(_) => {
                problems.push(format!("{at}: `{field}` must be a non-empty string"));
                None
            }
        }
    };
    let class = text("class", problems);
    let name = text("name", problems);
    let flag = text("flag", problems);
    if let Some(name) = &name {
        if let Err(err) = crate::store::validate_key(name) {
            problems.push(format!("{at}: name: {err}"));
        }
        if !names.insert(name.clone()) {
            problems.push(format!("{at}: duplicate name {name:?}"));
        }
    }
    let timeout = match map.get("timeout") {
        None => DEFAULT_TIMEOUT,
        Some(Value::String(s)) => match duration::parse(s) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                problems.push(format!("{at}: timeout must be longer than zero"));
                DEFAULT_TIMEOUT
            }
            Err(e) => {
                problems.push(format!("{at}: timeout: {e}"));
                DEFAULT_TIMEOUT
            }
        },
        Some(_) => {
            problems.push(format!("{at}: timeout must be a duration such as \"2m\""));
            DEFAULT_TIMEOUT
        }
    };
    let params = map.get("params").cloned().unwrap_or(Value::Null);
    let initialiser = class
        .as_deref()
        .and_then(|class| match registry.get(class) {
            None => {
                problems.push(format!(
                    "{at}: unknown class {class:?}; registered classes: {}",
                    registry.names().join(", ")
                ));
                None
            }
            Some(registration) => match (registration.construct)(params.clone()) {
                Ok(initialiser) => Some(Arc::<dyn Initialiser>::from(initialiser)),
                Err(err) => {
                    problems.push(format!("{at}: {class} {err}"));
                    None
                }
            },
        });
    if problems.len() > before {
        return None;
    }
    Some(Entry {
        class: class?,
        name: name?,
        flag: flag?,
        timeout,
        params_hash: params_hash(&params),
        params,
        initialiser: initialiser?,
    })
}

/// Writes JSON with object keys sorted at every level, so equal params hash equally whatever
/// order they were written in (serde_json may preserve insertion order).
fn canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A stable FNV-1a hash of the params' canonical JSON.
pub fn params_hash(params: &Value) -> String {
    let mut text = String::new();
    canonical(params, &mut text);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn registry() -> Registry {
        Registry::collect().unwrap()
    }

    #[test]
    fn a_valid_spec_keeps_order_and_defaults() {
        let raw = json!({
            "initialisers": [
                {"class": "exec", "name": "b", "flag": "v1", "params": {"command": ["true"]}},
                {"class": "exec", "name": "a", "flag": 2, "timeout": "30s", "params": {"command": ["true"]}}
            ]
        });
        let spec = Spec::from_value(&raw, ".".into(), &registry()).unwrap();
        assert_eq!(
            spec.entries
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>(),
            ["b", "a"]
        );
        assert_eq!(spec.entries[1].flag, "2");
        assert_eq!(spec.entries[1].timeout, Duration::from_secs(30));
        assert_eq!(spec.cadence, Cadence::default());
    }

    #[test]
    fn every_problem_is_reported_at_once_with_index_and_name() {
        let raw = json!({
            "cadence": {"retry": "soon", "tempo": "1s"},
            "initialisers": [
                {"class": "exec", "name": "x", "flag": "v1", "params": {"command": ["true"], "colour": "red"}},
                {"class": "no-such", "name": "y", "flag": "v1"},
                {"class": "exec", "name": "x", "params": {"command": ["true"]}},
                {"name": "z", "flag": "v1", "timeout": "forever"},
                {"class": "exec", "name": "w", "flag": "v1", "params": {"command": ["true"]}, "extra": 1}
            ],
            "other": true
        });
        let problems = Spec::from_value(&raw, ".".into(), &registry()).unwrap_err();
        let all = problems.join("\n");
        for expected in [
            "unknown top-level field \"other\"",
            "cadence.retry",
            "unknown field \"tempo\"",
            "initialisers[0] (x): exec params do not fit",
            "colour",
            "initialisers[1] (y): unknown class \"no-such\"; registered classes:",
            "initialisers[2] (x): missing `flag`",
            "initialisers[2] (x): duplicate name",
            "initialisers[3] (z): missing `class`",
            "initialisers[3] (z): timeout",
            "initialisers[4] (w): unknown field \"extra\"",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
    }

    #[test]
    fn params_hash_is_stable_and_sensitive() {
        assert_eq!(
            params_hash(&json!({"a": 1, "b": 2})),
            params_hash(&json!({"b": 2, "a": 1}))
        );
        assert_ne!(params_hash(&json!({"a": 1})), params_hash(&json!({"a": 2})));
        assert_eq!(
            params_hash(&json!({"outer": {"y": [1, {"q": 1, "p": 2}], "x": null}})),
            params_hash(&json!({"outer": {"x": null, "y": [1, {"p": 2, "q": 1}]}}))
        );
    }
}
