//! Spec files as YAML and JSON text: a spec or a list of problems, never a panic.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bootsync::bootstrap::{Registry, Spec};
use bootsync::files::parse_text;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    let registry = REGISTRY.get_or_init(|| Registry::collect().expect("core classes register"));
    let Ok(text) = std::str::from_utf8(data) else { return };
    for name in ["spec.yaml", "spec.json"] {
        if let Ok(raw) = parse_text::<serde_json::Value>(Path::new(name), text) {
            if let Err(problems) = Spec::from_value(&raw, PathBuf::from("."), registry) {
                assert!(!problems.is_empty(), "a rejected spec names its problems");
            }
        }
    }
});
