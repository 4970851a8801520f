//! `bootsync schema spec|bundle|policy`: prints the JSON Schema of a file operators write.

use clap::Args;

use super::{EXIT_OK, EXIT_USAGE};
use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

use crate::bootstrap::Registry;
use crate::bootstrap::schema::spec_schema;

/// The files with a schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Document {
    /// The reconciler's spec file (`--spec`).
    Spec,
    /// A precomputed cfgsync bundle (`--bundle`, `cfgsync-bundle`).
    Bundle,
    /// A cfgsync registration policy (`--policy`, `cfgsync-policy`).
    Policy,
}

impl Document {
    /// The lowercase name, as `bootsync schema` takes it and `specs/schema/` files are named.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Document::Spec => "spec",
            Document::Bundle => "bundle",
            Document::Policy => "policy",
        }
    }
}

/// The schema of `document`; the spec's lists the params of every class in `registry`.
pub(crate) fn schema(document: Document, registry: &Registry) -> Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let mut schema = match document {
        Document::Spec => spec_schema(registry),
        Document::Bundle => generator
            .into_root_schema_for::<crate::cfgsync::NodeArtifactsBundle>()
            .to_value(),
        Document::Policy => generator
            .into_root_schema_for::<crate::cfgsync::policy::Policy>()
            .to_value(),
    };
    if let Some(map) = schema.as_object_mut() {
        map.insert(
            "$id".into(),
            json!(format!(
                "https://bootsync.invalid/schema/{}.schema.json",
                document.name()
            )),
        );
    }
    schema
}

/// Flags of `bootsync schema`.
#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Which file's schema to print.
    #[arg(value_enum)]
    document: Document,
}

pub(crate) fn run(args: SchemaArgs) -> anyhow::Result<u8> {
    let registry = match Registry::collect() {
        Ok(registry) => registry,
        Err(err) => {
            eprintln!("error: {err}");
            return Ok(EXIT_USAGE);
        }
    };
    let text = serde_json::to_string_pretty(&schema(args.document, &registry))?;
    println!("{text}");
    Ok(EXIT_OK)
}
