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

/// One initialiser class, submitted with `inventory::submit!`.
#[derive(Debug)]
pub struct Registration {
    /// The class name used in spec files (dotted for third parties: `acme.create-admin`).
    pub class: &'static str,
    /// One line saying what it does.
    pub summary: &'static str,
    /// The constructor from params.
    pub construct: Constructor,
}

impl Registration {
    /// A registration record; `const` so it can be submitted statically.
    pub const fn new(class: &'static str, summary: &'static str, construct: Constructor) -> Self {
        Self {
            class,
            summary,
            construct,
        }
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
