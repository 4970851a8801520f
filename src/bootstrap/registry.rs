//! The registry of initialiser classes, collected through `inventory` from every linked crate.

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::Initialiser;

/// Why params did not fit an initialiser's typed params.
#[derive(Debug, thiserror::Error)]
#[error("params do not fit: {0}")]
pub struct ParamsError(#[from] pub serde_json::Error);

/// Builds an initialiser from its spec params.
pub type Constructor = fn(Value) -> Result<Box<dyn Initialiser>, ParamsError>;

/// Describes an initialiser's params for the spec's JSON Schema (see
/// [`super::schema::params_schema`]).
pub type ParamsSchema = fn(&mut schemars::SchemaGenerator) -> schemars::Schema;

/// One initialiser class, submitted with `inventory::submit!`.
#[derive(Debug)]
pub struct Registration {
    /// The class name used in spec files (dotted for third parties: `acme.create-admin`).
    pub class: &'static str,
    /// One line saying what it does.
    pub summary: &'static str,
    /// The constructor from params.
    pub construct: Constructor,
    /// The params' JSON Schema, when the class provides one (any params are accepted otherwise).
    pub params_schema: Option<ParamsSchema>,
}

impl Registration {
    /// A registration record; `const` so it can be submitted statically.
    pub const fn new(class: &'static str, summary: &'static str, construct: Constructor) -> Self {
        Self {
            class,
            summary,
            construct,
            params_schema: None,
        }
    }

    /// Adds the params' schema: `.with_params_schema(schema::params_schema::<Params>)`.
    pub const fn with_params_schema(mut self, schema: ParamsSchema) -> Self {
        self.params_schema = Some(schema);
        self
    }
}

inventory::collect!(Registration);

/// Deserialises typed params strictly (give `P` `#[serde(deny_unknown_fields)]`) and builds.
pub fn from_params<P, I>(
    params: Value,
    build: impl FnOnce(P) -> I,
) -> Result<Box<dyn Initialiser>, ParamsError>
where
    P: DeserializeOwned,
    I: Initialiser,
{
    // Absent params mean "all defaults", as an empty map would.
    let params = if params.is_null() {
        Value::Object(Default::default())
    } else {
        params
    };
    let typed: P = serde_json::from_value(params)?;
    Ok(Box::new(build(typed)))
}

/// Every registered class, sorted by name.
#[derive(Debug)]
pub struct Registry {
    classes: std::collections::BTreeMap<&'static str, &'static Registration>,
}

impl Registry {
    /// Collects every linked registration; two with one class name is an error naming both.
    pub fn collect() -> Result<Self, String> {
        Self::from_records(inventory::iter::<Registration>())
    }

    fn from_records(
        records: impl IntoIterator<Item = &'static Registration>,
    ) -> Result<Self, String> {
        let mut classes = std::collections::BTreeMap::new();
        for record in records {
            if let Some(previous) = classes.insert(record.class, record) {
                return Err(format!(
                    "initialiser class {:?} is registered twice ({:?} and {:?})",
                    record.class, previous.summary, record.summary
                ));
            }
        }
        Ok(Self { classes })
    }

    /// The registration for a class.
    pub fn get(&self, class: &str) -> Option<&'static Registration> {
        self.classes.get(class).copied()
    }

    /// Every class name, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.classes.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The core classes that ship in `initialisers/`.
    const CORE: [&str; 6] = [
        "cfgsync-bundle",
        "cfgsync-policy",
        "exec",
        "namespace-init",
        "template-seed",
        "wait-for",
    ];

    #[test]
    fn every_core_initialiser_is_linked_and_registered() {
        let registry = Registry::collect().unwrap();
        for class in CORE {
            assert!(
                registry.get(class).is_some(),
                "{class} missing from {:?}",
                registry.names()
            );
        }
    }

    #[test]
    fn a_duplicate_class_is_an_error_naming_it() {
        fn nothing(_: Value) -> Result<Box<dyn Initialiser>, ParamsError> {
            unreachable!()
        }
        static A: Registration = Registration::new("dup", "first", nothing);
        static B: Registration = Registration::new("dup", "second", nothing);
        let err = Registry::from_records([&A, &B]).unwrap_err();
        assert!(
            err.contains("dup") && err.contains("first") && err.contains("second"),
            "{err}"
        );
    }
}
