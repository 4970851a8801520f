//! Bundle files: parse and validate; a valid bundle holds only safe payload paths.
#![no_main]

use std::path::Path;

use bootsync::cfgsync::NodeArtifactsBundle;
use bootsync::files::{check_payload_path, parse_text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for name in ["bundle.yaml", "bundle.json"] {
        if let Ok(bundle) = parse_text::<NodeArtifactsBundle>(Path::new(name), text) {
            if bundle.validate().is_ok() {
                for file in bundle.nodes.iter().flat_map(|n| &n.files).chain(&bundle.shared_files) {
                    assert!(check_payload_path(&file.path).is_ok(), "{:?}", file.path);
                }
            }
        }
    }
});
