//! The spec's JSON Schema, generated from the types that read it and from every registered
//! class's params type, for editors and CI checks (`bootsync schema spec`).

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

use super::registry::Registry;
use super::spec::{EntryFile, SpecFile};

/// The spec's schema: the derived schema of [`SpecFile`], with one arm per class in
/// `registry` in place of the generic initialiser, each with `class` fixed to its name and
/// `params` its own type.
pub fn spec_schema(registry: &Registry) -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let params: Vec<(&str, &str, Value)> = registry
        .names()
        .into_iter()
        .map(|class| {
            let record = registry.get(class).expect("listed classes are registered");
            let schema = record
                .params_schema
                .map_or_else(|| json!({}), |f| f(&mut generator).to_value());
            (record.class, record.summary, schema)
        })
        .collect();
    let mut root = generator.into_root_schema_for::<SpecFile>().to_value();
    let generic = root["$defs"]
        .as_object_mut()
        .and_then(|defs| defs.remove(EntryFile::schema_name().as_ref()))
        .expect("the spec's initialiser shape is a definition");
    let arms: Vec<Value> = params
        .into_iter()
        .map(|(class, summary, params)| {
            let mut arm = generic.clone();
            arm["title"] = json!(class);
            arm["description"] = json!(summary);
            arm["properties"]["class"] = json!({"const": class});
            arm["properties"]["params"] = params;
            arm
        })
        .collect();
    root["properties"]["initialisers"]["items"] = json!({"oneOf": arms});
    root["description"] = json!("The ordered initialisers the reconciler keeps at their flags.");
    root
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_schema_lists_every_registered_class_with_typed_params() {
        let registry = Registry::collect().unwrap();
        let schema = spec_schema(&registry);
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
