//! A spec can name `acme.create-admin` in the binary that links it — no change to bootsync.

use std::path::{Path, PathBuf};
use std::process::Command;

fn check(binary: &Path, dir: &Path) -> (i32, String) {
    let out = Command::new(binary)
        .args(["check", "--spec", "spec.yaml"])
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn the_linked_binary_accepts_the_third_party_class_and_plain_bootsync_does_not() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("spec.yaml"),
        "initialisers:\n  - { class: acme.create-admin, name: admin, flag: v1, params: { namespace: prod, user: root } }\n",
    )
    .unwrap();
    let acme = PathBuf::from(env!("CARGO_BIN_EXE_acme-bootsync"));
    let (code, out) = check(&acme, dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("admin (acme.create-admin)"), "{out}");

    // Built by the same `cargo test` run at the workspace root (both are default members).
    let plain = acme.with_file_name("bootsync");
    assert!(
        plain.exists(),
        "run `cargo test` at the workspace root so the bootsync binary is built"
    );
    let (code, out) = check(&plain, dir.path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("unknown class \"acme.create-admin\""), "{out}");
}

#[test]
fn strict_params_apply_to_third_party_initialisers_too() {
    acme_initialisers::link();
    let registry = bootsync::bootstrap::Registry::collect().unwrap();
    let registration = registry
        .get("acme.create-admin")
        .expect("registered through inventory");
    assert!(
        (registration.construct)(
            bootsync::plugin::serde_json::json!({"namespace": "prod", "user": "root"})
        )
        .is_ok()
    );
    let err = (registration.construct)(
        bootsync::plugin::serde_json::json!({"namespace": "prod", "user": "root", "role": "x"}),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("role"), "{err}");
    assert!(
        registry.get("exec").is_some(),
        "the core classes are there too"
    );
}

#[test]
fn the_linked_binary_describes_the_third_party_params_in_its_spec_schema() {
    let acme = PathBuf::from(env!("CARGO_BIN_EXE_acme-bootsync"));
    let out = Command::new(&acme)
        .args(["schema", "spec"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let schema: bootsync::plugin::serde_json::Value =
        bootsync::plugin::serde_json::from_slice(&out.stdout).unwrap();
    let class = schema["properties"]["initialisers"]["items"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["title"] == "acme.create-admin")
        .expect("the third-party class is listed")
        .clone();
    assert_eq!(
        class["properties"]["params"]["$ref"],
        "#/$defs/AcmeCreateAdminParams"
    );
    let params = &schema["$defs"]["AcmeCreateAdminParams"];
    assert_eq!(
        params["required"],
        bootsync::plugin::serde_json::json!(["namespace", "user"])
    );
}
