//! The spec file: cadence and the ordered initialisers, validated with every problem reported.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::borrow::Cow;
use std::num::NonZeroU32;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use sha2::Digest as _;

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

impl Entry {
    /// Whether it runs before the service gate (and so keeps no flag).
    pub fn pre_gate(&self) -> bool {
        self.initialiser.phase() == super::Phase::BeforeGate
    }
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

    /// Validates a parsed spec; `dir` is where relative paths resolve. Every problem is
    /// reported, each with where it is.
    pub fn from_value(raw: &Value, dir: PathBuf, registry: &Registry) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let top = Place::top();
        let file: Option<SpecFile> = read_map(raw, &top, &mut problems);
        let mut entries = Vec::new();
        let mut cadence = Cadence::default();
        if let Some(file) = file {
            if let Some(written) = &file.cadence {
                let place = Place::cadence();
                if let Some(written) = read_map::<CadenceFile>(written, &place, &mut problems) {
                    cadence = written.apply(&place, &mut problems);
                }
            }
            let mut names = BTreeSet::new();
            let list = file
                .initialisers
                .required(&top, "initialisers", &mut problems)
                .unwrap_or_default();
            for (index, item) in list.iter().enumerate() {
                let place = Place::entry(index, item);
                if let Some(entry) = read_map::<EntryFile>(item, &place, &mut problems)
                    .and_then(|e| e.build(&place, registry, &mut names, &mut problems))
                {
                    entries.push(entry);
                }
            }
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

// The file as written. These types are the one description of its shape: the reader below
// and the committed JSON Schema (`bootsync schema spec`) are both derived from them.

/// A spec file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "bootsync spec")]
pub struct SpecFile {
    /// How often the reconciler wakes; every field has a default.
    #[schemars(with = "Option<CadenceFile>")]
    pub cadence: Option<Value>,
    /// The initialisers, in the order they run.
    #[schemars(with = "Vec<EntryFile>")]
    pub initialisers: Field<Vec<Value>>,
}

/// The `cadence` map of a spec.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(description = "How often the reconciler wakes; every field has a default.")]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Cadence")]
pub struct CadenceFile {
    /// First pause after a failed gate or an unanswering store (default 5s), doubled per wake.
    #[serde(default)]
    pub gate_backoff: Field<Lasting>,
    /// First retry delay while something is behind its flag (default 15s), doubled per failure.
    #[serde(default)]
    pub retry: Field<Lasting>,
    /// Sleep when everything is at its flag (default 300s).
    #[serde(default)]
    pub steady: Field<Lasting>,
    /// Cap of the per-initialiser retry backoff (default 300s).
    #[serde(default)]
    pub max_backoff: Field<Lasting>,
    /// Consecutive failures after which a status says it needs an operator (default 10).
    #[serde(default)]
    pub needs_operator_after: Field<NonZeroU32>,
}

impl CadenceFile {
    fn apply(self, at: &Place, problems: &mut Vec<String>) -> Cadence {
        let mut cadence = Cadence::default();
        let durations = [
            ("gate_backoff", self.gate_backoff, &mut cadence.gate_backoff),
            ("retry", self.retry, &mut cadence.retry),
            ("steady", self.steady, &mut cadence.steady),
            ("max_backoff", self.max_backoff, &mut cadence.max_backoff),
        ];
        for (name, field, slot) in durations {
            if let Some(Lasting(duration)) = field.optional(at, name, problems) {
                *slot = duration;
            }
        }
        if let Some(n) = self
            .needs_operator_after
            .optional(at, "needs_operator_after", problems)
        {
            cadence.needs_operator_after = n.get();
        }
        cadence
    }
}

/// One initialiser of a spec. In the schema each registered class gets its own copy of this
/// shape, with `class` fixed and `params` its own type.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Initialiser")]
pub struct EntryFile {
    /// The registered class to run.
    pub class: Field<Text>,
    /// Unique instance name: the key its flag is stored under.
    pub name: Field<Name>,
    /// The flag the operator wants; changing it runs the initialiser again.
    pub flag: Field<Flag>,
    /// Longest a run may take (default 10m).
    #[serde(default)]
    pub timeout: Field<Lasting>,
    /// The class's params.
    #[serde(default)]
    pub params: Value,
}

impl EntryFile {
    /// Checks the fields and constructs the initialiser; `None` after reporting its problems.
    fn build(
        self,
        at: &Place,
        registry: &Registry,
        names: &mut BTreeSet<String>,
        problems: &mut Vec<String>,
    ) -> Option<Entry> {
        let before = problems.len();
        let class = self.class.required(at, "class", problems);
        let name = self.name.required(at, "name", problems);
        let flag = self.flag.required(at, "flag", problems);
        let timeout = self
            .timeout
            .optional(at, "timeout", problems)
            .map_or(DEFAULT_TIMEOUT, |Lasting(d)| d);
        if let Some(Name(name)) = &name
            && !names.insert(name.clone())
        {
            problems.push(format!("{}duplicate name {name:?}", at.whole()));
        }
        let initialiser = class
            .as_ref()
            .and_then(|Text(class)| match registry.get(class) {
                None => {
                    problems.push(format!(
                        "{}unknown class {class:?}; registered classes: {}",
                        at.whole(),
                        registry.names().join(", ")
                    ));
                    None
                }
                Some(registration) => match (registration.construct)(self.params.clone()) {
                    Ok(initialiser) => Some(Arc::<dyn Initialiser>::from(initialiser)),
                    Err(err) => {
                        problems.push(format!("{}{class} {err}", at.whole()));
                        None
                    }
                },
            });
        if problems.len() > before {
            return None;
        }
        Some(Entry {
            class: class?.0,
            name: name?.0,
            flag: flag?.0,
            timeout,
            params_hash: params_hash(&self.params),
            params: self.params,
            initialiser: initialiser?,
        })
    }
}

/// One field as read: absent, present but wrong (why), or good. Reading a field never fails
/// its whole map, so every problem of a file is reported at once.
#[derive(Debug, Clone, Default)]
pub enum Field<T> {
    /// Not written.
    #[default]
    Missing,
    /// Written, but not a `T` (why).
    Bad(String),
    /// Written and good.
    Good(T),
}

impl<T> Field<T> {
    /// The value; a missing or bad field is a problem.
    fn required(self, at: &Place, name: &str, problems: &mut Vec<String>) -> Option<T> {
        if matches!(self, Field::Missing) {
            problems.push(format!("{}missing `{name}`", at.whole()));
            return None;
        }
        self.optional(at, name, problems)
    }

    /// The value if written; a bad field is a problem.
    fn optional(self, at: &Place, name: &str, problems: &mut Vec<String>) -> Option<T> {
        match self {
            Field::Missing => None,
            Field::Bad(why) => {
                problems.push(format!("{}: {why}", at.field(name)));
                None
            }
            Field::Good(value) => Some(value),
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Field<T> {
    /// Never fails: an absent (or null) field is `Missing`, so serde asks no `default` of a
    /// required one, and a field that is not a `T` is `Bad`.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Option::<Value>::deserialize(deserializer)? {
            None => Field::Missing,
            Some(value) => match T::deserialize(value) {
                Ok(good) => Field::Good(good),
                Err(err) => Field::Bad(err.to_string()),
            },
        })
    }
}

impl<T: JsonSchema> JsonSchema for Field<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }

    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }

    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

/// Text that is not blank, kept exactly as written (a stored flag or state key written with a
/// trailing space must still match).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.trim().is_empty() {
            return Err(serde::de::Error::custom("must be a non-empty string"));
        }
        Ok(Text(text))
    }
}

/// An instance name: the key its records are stored under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(pub String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Text(name) = Text::deserialize(deserializer)?;
        crate::store::validate_key(&name).map_err(serde::de::Error::custom)?;
        Ok(Name(name))
    }
}

/// A flag: text such as `v2`, or a number (kept as its text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag(pub String);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::Number(n) => Ok(Flag(n.to_string())),
            other => Text::deserialize(other)
                .map(|Text(t)| Flag(t))
                .map_err(|e| serde::de::Error::custom(format!("a flag is text or a number: {e}"))),
        }
    }
}

/// `JsonSchema` for a value the schema shows inline, as `schema`.
macro_rules! inline_schema {
    ($ty:ty, $name:literal, $schema:tt) => {
        impl JsonSchema for $ty {
            fn inline_schema() -> bool {
                true
            }

            fn schema_name() -> Cow<'static, str> {
                $name.into()
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!($schema)
            }
        }
    };
}

inline_schema!(Text, "Text", {"type": "string", "pattern": "\\S"});
inline_schema!(Name, "Name", {
    "type": "string",
    "pattern": "\\S",
    "maxLength": crate::store::MAX_KEY_LEN,
});
inline_schema!(Flag, "Flag", {"type": ["string", "number"], "pattern": "\\S"});

/// A duration longer than zero, written as text: `500ms`, `15s`, `2m`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lasting(pub Duration);

impl<'de> Deserialize<'de> for Lasting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)
            .map_err(|_| serde::de::Error::custom("must be a duration such as \"15s\""))?;
        match duration::parse(&text) {
            Ok(d) if d.is_zero() => Err(serde::de::Error::custom("must be longer than zero")),
            Ok(d) => Ok(Lasting(d)),
            Err(e) => Err(serde::de::Error::custom(e)),
        }
    }
}

impl JsonSchema for Lasting {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        duration::schema(generator)
    }
}

/// Where a map sits in the file, for problem messages.
struct Place {
    /// Prefix of a problem with the whole map (`initialisers[2] (x): `).
    whole: String,
    /// Prefix of a field's name (`cadence.`).
    field: String,
}

impl Place {
    fn top() -> Self {
        Self {
            whole: String::new(),
            field: String::new(),
        }
    }

    fn cadence() -> Self {
        Self {
            whole: "cadence: ".into(),
            field: "cadence.".into(),
        }
    }

    fn entry(index: usize, item: &Value) -> Self {
        let whole = match item.get("name").and_then(Value::as_str) {
            Some(name) => format!("initialisers[{index}] ({name}): "),
            None => format!("initialisers[{index}]: "),
        };
        Self {
            field: whole.clone(),
            whole,
        }
    }

    fn whole(&self) -> &str {
        &self.whole
    }

    fn field(&self, name: &str) -> String {
        format!("{}{name}", self.field)
    }
}

/// The field names `T` declares, from its derived schema.
fn field_names<T: JsonSchema>() -> Vec<String> {
    let schema = SchemaGenerator::default().into_root_schema_for::<T>();
    schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

/// Reads a map into `T`: each key `T` does not declare is a problem; the rest is read field by
/// field, every field keeping its own problem.
fn read_map<T: DeserializeOwned + JsonSchema>(
    value: &Value,
    at: &Place,
    problems: &mut Vec<String>,
) -> Option<T> {
    let known = field_names::<T>();
    let Some(map) = value.as_object() else {
        problems.push(format!(
            "{}must be a map with {}",
            at.whole(),
            known.join(", ")
        ));
        return None;
    };
    let mut kept = serde_json::Map::new();
    for (key, value) in map {
        if known.contains(key) {
            kept.insert(key.clone(), value.clone());
        } else {
            problems.push(format!(
                "{}unknown field {key:?} (expected {})",
                at.whole(),
                known.join(", ")
            ));
        }
    }
    match serde_json::from_value(Value::Object(kept)) {
        Ok(read) => Some(read),
        Err(err) => {
            problems.push(format!("{}{err}", at.whole()));
            None
        }
    }
}

/// A stable hash of the params: SHA-256 of their JSON with every object's keys sorted, so
/// equal params hash equally whatever order they were written in (this build's serde_json
/// keeps insertion order). Prefixed with the algorithm, so a hash an older release stored
/// (FNV-1a) is told apart instead of looking like changed params.
pub fn params_hash(params: &Value) -> String {
    let mut sorted = params.clone();
    sorted.sort_all_objects();
    let json = serde_json::to_vec(&sorted).expect("a JSON value always serialises");
    format!(
        "{PARAMS_HASH_PREFIX}{}",
        hex::encode(sha2::Sha256::digest(json))
    )
}

/// What [`params_hash`] starts with.
pub const PARAMS_HASH_PREFIX: &str = "sha256:";

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
            "unknown field \"other\" (expected cadence, initialisers)",
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
