//! The client's path routing: whatever a server sends, a resolved path is a configured route
//! destination or lies under the output root.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use bootsync::cfgsync::ArtifactOutputMap;
use libfuzzer_sys::fuzz_target;

struct Fixture {
    root: PathBuf,
    routed: PathBuf,
    map: ArtifactOutputMap,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("bootsync-fuzz-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).expect("fixture dirs");
        // A symlink out of the root: paths through it must be refused.
        let _ = std::os::unix::fs::symlink("/etc", root.join("escape"));
        let routed = base.join("elsewhere/node.yaml");
        let map = ArtifactOutputMap::new()
            .with_root(&root)
            .route("/config.yaml", &routed);
        Fixture { root, routed, map }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    let f = fixture();
    if let Ok(dest) = f.map.resolve(path) {
        let inside = dest.starts_with(&f.root)
            && !dest
                .components()
                .any(|c| c == std::path::Component::ParentDir);
        assert!(inside || dest == f.routed, "{path:?} resolved to {}", dest.display());
        // Through the symlink is outside, whatever the lexical path says.
        if let Ok(real_parent) = std::fs::canonicalize(dest.parent().unwrap()) {
            let real_root = std::fs::canonicalize(&f.root).unwrap();
            assert!(
                real_parent.starts_with(&real_root) || dest == f.routed,
                "{path:?} escapes through a symlink to {}",
                real_parent.display()
            );
        }
    }
});
