//! `bootsync schema spec|bundle|policy`: prints the JSON Schema of a file operators write.

use clap::Args;

use super::{EXIT_OK, EXIT_USAGE};
use crate::bootstrap::Registry;
use crate::bootstrap::schema::{Document, schema};

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
