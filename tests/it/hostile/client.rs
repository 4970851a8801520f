//! A local writer of the client's output folder against the real writing code.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bootsync::cfgsync::{ArtifactFile, ArtifactOutputMap};

fn everything_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.is_symlink() {
            found.extend(everything_under(&path));
        }
        found.push(path);
    }
    found
}

/// A local writer of the output folder swapped a subdirectory for a symlink between the
/// client's path check and its write, and a payload file landed outside (run 15 of 36). The
/// client now walks from a descriptor of its root, one directory at a time, never through a
/// symlink.
#[it::test]
fn a_directory_swapped_for_a_symlink_while_writing_sends_nothing_outside_in_200_runs() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let map = ArtifactOutputMap::new().with_root(root.path());
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = std::thread::spawn({
        let (stop, root, outside) = (
            stop.clone(),
            root.path().to_path_buf(),
            outside.path().to_path_buf(),
        );
        move || {
            let (sub, aside) = (root.join("sub"), root.join("sub.aside"));
            let mut swaps = 0u64;
            // A real directory for a moment, then a symlink out for a moment: some writes
            // pass the path check on the real one and meet the symlink after it.
            let pause = || {
                let until = std::time::Instant::now()
                    + std::time::Duration::from_micros(fastrand::u64(0..200));
                while std::time::Instant::now() < until {
                    std::hint::spin_loop();
                }
            };
            while !stop.load(Ordering::Relaxed) {
                pause();
                if std::fs::rename(&sub, &aside).is_ok() {
                    let _ = std::os::unix::fs::symlink(&outside, &sub);
                    pause();
                    let _ = std::fs::remove_file(&sub);
                    let _ = std::fs::rename(&aside, &sub);
                    swaps += 1;
                }
            }
            swaps
        }
    });
    let mut written = 0;
    for run in 0..200 {
        // Out of step with the swapper, so each run meets it at another point.
        std::thread::sleep(std::time::Duration::from_micros(fastrand::u64(0..500)));
        let files = [
            ArtifactFile::new("sub/deep/config.yaml", format!("run {run}")),
            ArtifactFile::new("sub/peers.yaml", format!("run {run}")),
        ];
        written += usize::from(map.write_all(&files).is_ok());
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    let escaped = everything_under(outside.path());
    assert!(
        escaped.is_empty(),
        "written outside the folder: {escaped:?}"
    );
    eprintln!("200 runs: {written} written whole, {swaps} swaps raced them, nothing outside");
    assert!(swaps > 0, "the swapper never swapped: the race was not run");
}
