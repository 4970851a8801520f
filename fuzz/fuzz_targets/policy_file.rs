//! Policy files: parse and compile (templates included); never a panic.
#![no_main]

use std::path::Path;

use bootsync::cfgsync::policy::Policy;
use bootsync::files::parse_text;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for name in ["policy.yaml", "policy.json"] {
        if let Ok(policy) = parse_text::<Policy>(Path::new(name), text) {
            if let Err(problems) = policy.compile() {
                assert!(!problems.is_empty());
            }
        }
    }
});
