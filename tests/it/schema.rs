//! `bootsync schema`: the committed schemas under `specs/schema/` match the code, every example
//! file in the repository validates, and what the schema rejects the parser rejects too.

use crate::support;

use std::path::{Path, PathBuf};

use serde_json::Value;

const DOCUMENTS: [&str; 3] = ["spec", "bundle", "policy"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn printed(document: &str) -> String {
    let (code, out, err) = support::run_cli(&["schema", document], root());
    assert_eq!(code, 0, "{err}");
    out
}

fn validator(document: &str) -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(&printed(document)).unwrap();
    jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{document} schema: {e}"))
}

fn yaml(path: &Path) -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[it::test]
fn the_committed_schemas_match_the_code() {
    for document in DOCUMENTS {
        let path = root().join(format!("specs/schema/{document}.schema.json"));
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed.trim_end() == printed(document).trim_end(),
            "{} is stale; regenerate it with\n  cargo run -- schema {document} > specs/schema/{document}.schema.json",
            path.display()
        );
    }
}

/// Which schema a YAML file of the repository is an instance of, by its top-level keys.
fn kind_of(value: &Value) -> Option<&'static str> {
    let map = value.as_object()?;
    if map.contains_key("initialisers") {
        Some("spec")
    } else if map.contains_key("nodes") {
        Some("bundle")
    } else if map.contains_key("files") || map.contains_key("expect_nodes") {
        Some("policy")
    } else {
        None
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if path.is_dir() {
            // Build output and deployment manifests (Kubernetes, compose) are not bootsync files.
            if name != "target" && name != "deploy" {
                yaml_files(&path, out);
            }
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(path);
        }
    }
}

#[it::test]
fn every_example_file_validates_against_its_schema() {
    let validators: Vec<(&str, jsonschema::Validator)> =
        DOCUMENTS.iter().map(|d| (*d, validator(d))).collect();
    let mut files = Vec::new();
    yaml_files(&root().join("examples"), &mut files);
    let mut seen = std::collections::BTreeMap::new();
    for file in files {
        let value = yaml(&file);
        let Some(kind) = kind_of(&value) else {
            continue;
        };
        let (_, validator) = validators.iter().find(|(d, _)| *d == kind).unwrap();
        let problems: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            problems.is_empty(),
            "{} is not a valid {kind}: {problems:#?}",
            file.display()
        );
        *seen.entry(kind).or_insert(0) += 1;
    }
    for document in DOCUMENTS {
        assert!(
            seen.contains_key(document),
            "no example {document} found: {seen:?}"
        );
    }
}

#[it::test]
fn what_the_spec_schema_rejects_bootsync_check_rejects_too() {
    let spec = validator("spec");
    let dir = tempfile::tempdir().unwrap();
    let good = "initialisers:\n  - { class: exec, name: a, flag: v1, timeout: 1m30s, params: { command: [\"true\"] } }\n";
    let bad = [
        (
            "unknown class",
            "initialisers:\n  - { class: nope, name: a, flag: v1 }\n",
        ),
        (
            "unknown params field",
            "initialisers:\n  - { class: exec, name: a, flag: v1, params: { command: [\"true\"], shell: yes } }\n",
        ),
        (
            "missing params field",
            "initialisers:\n  - { class: template-seed, name: a, flag: v1, params: {} }\n",
        ),
        (
            "bad duration",
            "initialisers:\n  - { class: exec, name: a, flag: v1, timeout: soon, params: { command: [\"true\"] } }\n",
        ),
        (
            "missing flag",
            "initialisers:\n  - { class: exec, name: a, params: { command: [\"true\"] } }\n",
        ),
        (
            "unknown cadence field",
            "cadence: { often: 1s }\ninitialisers: []\n",
        ),
        ("unknown top-level field", "initializers: []\n"),
        (
            "wrong enum value",
            "initialisers:\n  - { class: namespace-init, name: a, flag: v1, params: { namespace: prod, source: magic } }\n",
        ),
    ];
    let path = dir.path().join("spec.yaml");
    std::fs::write(&path, good).unwrap();
    assert!(spec.is_valid(&yaml(&path)), "the good spec validates");
    let (code, _, err) = support::cli(dir.path(), "check --spec spec.yaml");
    assert_eq!(code, 0, "{err}");
    for (what, text) in bad {
        std::fs::write(&path, text).unwrap();
        assert!(
            !spec.is_valid(&yaml(&path)),
            "the schema accepts a spec with {what}"
        );
        let (code, _, _) = support::cli(dir.path(), "check --spec spec.yaml");
        assert_eq!(code, 2, "bootsync check accepts a spec with {what}");
    }
}
