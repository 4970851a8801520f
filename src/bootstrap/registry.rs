//! The registry of initialiser classes, collected through `inventory` from every linked crate.

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::Initialiser;

/// Why params did not fit an initialiser: their shape, or a check beyond it.
#[derive(Debug, thiserror::Error)]
#[error("params do not fit: {0}")]
pub struct ParamsError(pub String);

impl From<serde_json::Error> for ParamsError {
    fn from(err: serde_json::Error) -> Self {
        Self(err.to_string())
    }
}

/// An initialiser class built from typed params. Implement it and register the class with
/// [`crate::register!`]: the params type is named once, here, and serves both the spec reader
/// and the spec's JSON Schema.
pub trait FromParams: Initialiser + Sized {
    /// The class name in spec files (dotted for third parties: `acme.create-admin`).
    const CLASS: &'static str;
    /// One line saying what it does.
    const SUMMARY: &'static str;
    /// The params as the spec writes them; give it `#[serde(deny_unknown_fields)]`. Absent
    /// params are read as an empty map.
    type Params: DeserializeOwned + JsonSchema;
    /// Builds the initialiser; an `Err` says what is wrong with params of the right shape.
    fn from_params(params: Self::Params) -> Result<Self, String>;
}

/// Builds an initialiser from its spec params.
pub type Constructor = fn(Value) -> Result<Box<dyn Initialiser>, ParamsError>;

/// Describes an initialiser's params for the spec's JSON Schema.
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

    /// The registration of a class built from typed params (what [`crate::register!`] submits).
    pub const fn of<T: FromParams>() -> Self {
        Self {
            class: T::CLASS,
            summary: T::SUMMARY,
            construct: construct::<T>,
            params_schema: Some(params_schema::<T::Params>),
        }
    }

    /// Adds the params' schema: `.with_params_schema(schema::params_schema::<Params>)`.
    pub const fn with_params_schema(mut self, schema: ParamsSchema) -> Self {
        self.params_schema = Some(schema);
        self
    }
}

inventory::collect!(Registration);

fn construct<T: FromParams>(params: Value) -> Result<Box<dyn Initialiser>, ParamsError> {
    // Absent params mean "all defaults", as an empty map would.
    let params = if params.is_null() {
        Value::Object(Default::default())
    } else {
        params
    };
    let typed: T::Params = serde_json::from_value(params)?;
    Ok(Box::new(T::from_params(typed).map_err(ParamsError)?))
}

fn params_schema<P: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<P>()
}

/// Registers an initialiser class, from any crate linked into the binary.
///
/// - `register!(CreateAdmin);` for a type that implements [`FromParams`];
/// - `register!(Greet(Params), "example.greet", "stores a greeting");` for a newtype over its
///   params that needs no check beyond their shape: it implements [`FromParams`] too.
#[macro_export]
macro_rules! register {
    ($initialiser:ident($params:ty), $class:literal, $summary:literal) => {
        impl $crate::bootstrap::FromParams for $initialiser {
            const CLASS: &'static str = $class;
            const SUMMARY: &'static str = $summary;
            type Params = $params;

            fn from_params(params: $params) -> ::std::result::Result<Self, ::std::string::String> {
                ::std::result::Result::Ok($initialiser(params))
            }
        }
        $crate::register!($initialiser);
    };
    ($initialiser:ty) => {
        $crate::inventory::submit! {
            $crate::bootstrap::Registration::of::<$initialiser>()
        }
    };
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
