//! JSON Schemas of the files operators write — the spec, the bundle and the policy — generated
//! from the Rust types that read them, for editors and CI checks (`bootsync schema`).

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::{Map, Value, json};

use super::registry::Registry;

/// The files with a schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Document {
    /// The reconciler's spec file (`--spec`).
    Spec,
    /// A precomputed cfgsync bundle (`--bundle`, `cfgsync-bundle`).
    Bundle,
    /// A cfgsync registration policy (`--policy`, `cfgsync-policy`).
    Policy,
}

impl Document {
    /// Every document, in the order they are listed.
    pub const ALL: [Document; 3] = [Document::Spec, Document::Bundle, Document::Policy];

    /// The lowercase name, as `bootsync schema` takes it and `specs/schema/` files are named.
    pub fn name(self) -> &'static str {
        match self {
            Document::Spec => "spec",
            Document::Bundle => "bundle",
            Document::Policy => "policy",
        }
    }
}

/// The schema of `document`; the spec's lists the params of every class in `registry`.
pub fn schema(document: Document, registry: &Registry) -> Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let mut schema = match document {
        Document::Spec => spec_schema(generator, registry),
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

/// A duration as the spec writes it: `500ms`, `15s`, `2m`, `1h30m`, or bare seconds.
pub fn duration(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "pattern": "^\\s*([0-9]+|([0-9]+(ms|s|m|h))+)\\s*$",
        "examples": ["15s", "2m", "1h30m"],
    })
}

/// A duration field of the spec file, for the schema only (the parser reads text).
struct DurationText;

impl JsonSchema for DurationText {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        duration(generator)
    }
}

/// The `cadence` map of a spec.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields, rename = "Cadence")]
#[allow(dead_code)]
struct CadenceFile {
    /// Sleep after a failed gate (default 5s).
    gate_backoff: Option<DurationText>,
    /// First retry delay while something is behind its flag (default 15s), doubled per failure.
    retry: Option<DurationText>,
    /// Sleep when everything is at its flag (default 300s).
    steady: Option<DurationText>,
    /// Cap of the per-initialiser retry backoff (default 300s).
    max_backoff: Option<DurationText>,
    /// Consecutive failures after which a status says it needs an operator (default 10).
    #[schemars(range(min = 1))]
    needs_operator_after: Option<u32>,
}

fn spec_schema(mut generator: SchemaGenerator, registry: &Registry) -> Value {
    let cadence = generator.subschema_for::<CadenceFile>().to_value();
    let timeout = generator.subschema_for::<DurationText>().to_value();
    let mut classes = Vec::new();
    for class in registry.names() {
        let record = registry.get(class).expect("listed classes are registered");
        let params = record
            .params_schema
            .map_or_else(|| json!({}), |f| f(&mut generator).to_value());
        classes.push(json!({
            "title": class,
            "description": record.summary,
            "type": "object",
            "properties": {
                "class": {"const": class},
                "name": {
                    "type": "string", "minLength": 1, "maxLength": crate::store::MAX_KEY_LEN,
                    "description": "Unique instance name; the key of its stored flag and status.",
                },
                "flag": {
                    "type": ["string", "number"],
                    "description": "The operator-chosen flag (v1, v2, ...); a change runs it again.",
                },
                "timeout": timeout.clone(),
                "params": params,
            },
            "required": ["class", "name", "flag"],
            "additionalProperties": false,
        }));
    }
    let definitions: Map<String, Value> = generator.take_definitions(true);
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "bootsync spec",
        "description": "The ordered initialisers the reconciler keeps at their flags.",
        "type": "object",
        "properties": {
            "cadence": cadence,
            "initialisers": {
                "type": "array",
                "items": {"oneOf": classes},
            },
        },
        "required": ["initialisers"],
        "additionalProperties": false,
        "$defs": definitions,
    })
}

/// The params schema of an initialiser class, for [`super::Registration::with_params_schema`].
pub fn params_schema<P: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<P>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_schema_lists_every_registered_class_with_typed_params() {
        let registry = Registry::collect().unwrap();
        let schema = schema(Document::Spec, &registry);
        let classes = schema["properties"]["initialisers"]["items"]["oneOf"]
            .as_array()
            .unwrap();
        assert_eq!(classes.len(), registry.names().len());
        let exec = classes
            .iter()
            .find(|c| c["title"] == "exec")
            .expect("exec listed");
        // The params of `exec` are its typed struct: a `$ref` into `$defs` with `command`.
        let reference = exec["properties"]["params"]["$ref"].as_str().unwrap();
        let name = reference.rsplit('/').next().unwrap();
        assert!(
            schema["$defs"][name]["properties"]["command"].is_object(),
            "{schema:#}"
        );
        assert_eq!(schema["$defs"][name]["additionalProperties"], false);
    }
}
