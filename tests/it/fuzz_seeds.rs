//! The fuzzers' committed seeds go through the same parsers in the normal suite: valid seeds
//! stay valid and hostile ones stay refused as the code changes.

use std::path::{Path, PathBuf};

use bootsync::bootstrap::{Registry, Spec};
use bootsync::cfgsync::policy::Policy;
use bootsync::cfgsync::registration::check;
use bootsync::cfgsync::{ArtifactOutputMap, NodeArtifactsBundle, NodeRegistration};
use bootsync::files::parse_text;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    assert!(out.len() >= 3, "{target}: too few seeds");
    out
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

#[it::test]
fn node_body_seeds_are_accepted_or_refused_as_named() {
    for (name, bytes) in seeds("node_body") {
        let decoded = serde_json::from_slice::<NodeRegistration>(&bytes);
        let accepted = decoded.as_ref().is_ok_and(|r| check(r).is_ok());
        let expected = matches!(name.as_str(), "plain" | "ipv6-metadata");
        assert_eq!(accepted, expected, "{name}: {decoded:?}");
    }
}

#[it::test]
fn spec_seeds_give_a_spec_or_every_problem() {
    let registry = Registry::collect().unwrap();
    for (name, bytes) in seeds("spec_file") {
        let raw: serde_json::Value = parse_text(Path::new(&name), text(&bytes)).unwrap();
        let result = Spec::from_value(&raw, PathBuf::from("."), &registry);
        if name.starts_with("many-problems") {
            let problems = result.unwrap_err();
            assert!(problems.len() >= 3, "{problems:?}");
        } else {
            assert!(result.is_ok(), "{name}: {result:?}");
        }
    }
}

#[it::test]
fn bundle_and_policy_seeds_validate_unless_hostile() {
    for (name, bytes) in seeds("bundle_file") {
        let bundle: NodeArtifactsBundle = parse_text(Path::new(&name), text(&bytes)).unwrap();
        assert_eq!(bundle.validate().is_ok(), name != "hostile.yaml", "{name}");
    }
    for (name, bytes) in seeds("policy_file") {
        let policy: Policy = parse_text(Path::new(&name), text(&bytes)).unwrap();
        let compiled = policy.compile();
        assert_eq!(compiled.is_ok(), name != "broken-template.yaml", "{name}");
    }
}

#[it::test]
fn payload_path_seeds_resolve_only_inside_the_root_or_to_a_route() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
    let routed = dir.path().join("elsewhere/node.yaml");
    let map = ArtifactOutputMap::new()
        .with_root(&root)
        .route("/config.yaml", &routed);
    for (name, bytes) in seeds("payload_path") {
        let Ok(path) = std::str::from_utf8(&bytes) else {
            continue;
        };
        let resolved = map.resolve(path);
        let ok = matches!(name.as_str(), "routed" | "relative" | "dots");
        assert_eq!(resolved.is_ok(), ok, "{name} ({path:?}): {resolved:?}");
        if let Ok(dest) = resolved {
            assert!(
                dest == routed || dest.starts_with(&root),
                "{}",
                dest.display()
            );
        }
    }
}
