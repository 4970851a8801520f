//! Where a payload's files go on the node, and writing them all or none.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::ArtifactFile;

/// Why a payload cannot be written; nothing was written when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// A payload path is not acceptable.
    #[error("refusing payload path {path:?}: {reason}")]
    Refused {
        /// The path in the payload.
        path: String,
        /// Why.
        reason: String,
    },
    /// The payload names one path twice.
    #[error("the payload names {path:?} twice")]
    Duplicate {
        /// The path.
        path: String,
    },
    /// Writing failed; the files already in place are unchanged.
    #[error("cannot write {path}")]
    Io {
        /// The file being written.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Routes payload paths to local files: exact routes first, everything else under a root.
#[derive(Debug, Clone)]
pub struct ArtifactOutputMap {
    routes: BTreeMap<String, PathBuf>,
    root: PathBuf,
}

impl Default for ArtifactOutputMap {
    fn default() -> Self {
        Self::new()
    }
}

impl ArtifactOutputMap {
    /// A map with no routes and the current directory as root.
    pub fn new() -> Self {
        Self {
            routes: BTreeMap::new(),
            root: PathBuf::from("."),
        }
    }

    /// Sends the payload path `src` to the local file `dst`.
    pub fn route(mut self, src: impl Into<String>, dst: impl Into<PathBuf>) -> Self {
        self.routes.insert(src.into(), dst.into());
        self
    }

    /// Puts unrouted relative paths under `root`.
    pub fn with_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = root.into();
        self
    }

    /// The local file for a payload path, or why it is refused.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, OutputError> {
        let refuse = |reason: String| OutputError::Refused {
            path: path.to_string(),
            reason,
        };
        crate::files::check_payload_path(path).map_err(refuse)?;
        if let Some(dst) = self.routes.get(path) {
            return Ok(dst.clone());
        }
        if Path::new(path).is_absolute() {
            return Err(refuse(format!(
                "an absolute path outside the client's routes (add --route {path}=DEST)"
            )));
        }
        let dest = self.root.join(path);
        let real = |p: &Path| {
            real_path(p).map_err(|e| refuse(format!("cannot resolve {}: {e}", p.display())))
        };
        let root = real(&self.root)?;
        let parent = dest.parent().unwrap_or(&self.root);
        // A symlink anywhere in the existing part of the chain must not lead out of the root.
        if !real(parent)?.starts_with(&root) {
            return Err(refuse(format!(
                "{} leads outside the output root {} (through a symlink)",
                parent.display(),
                root.display()
            )));
        }
        if dest
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            return Err(refuse(format!("{} is a symlink", dest.display())));
        }
        Ok(dest)
    }

    /// Writes every file or none: all are validated, staged beside their targets and fsynced,
    /// then renamed into place. Returns the local paths written.
    pub fn write_all(&self, files: &[ArtifactFile]) -> Result<Vec<PathBuf>, OutputError> {
        // Duplicates are judged on where files land, so `a/b`, `a//b`, `./a/b` and `a/./b` are
        // one file.
        let mut seen = BTreeSet::new();
        let mut plan = Vec::with_capacity(files.len());
        for file in files {
            let dest = self.resolve(&file.path)?;
            let landing: PathBuf = dest.components().collect();
            if !seen.insert(landing) {
                return Err(OutputError::Duplicate {
                    path: file.path.clone(),
                });
            }
            plan.push((dest, file));
        }
        check_layout(&seen, &plan)?;
        let mut staged: Vec<(PathBuf, PathBuf)> = Vec::with_capacity(plan.len());
        let result = (|| {
            for (dest, file) in &plan {
                let io = |source| OutputError::Io {
                    path: dest.display().to_string(),
                    source,
                };
                let dir = dest
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                std::fs::create_dir_all(dir).map_err(io)?;
                let name = dest
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let (tmp, mut out) = create_staging(dir, &name).map_err(io)?;
                staged.push((tmp, dest.clone()));
                out.write_all(file.content.as_bytes()).map_err(io)?;
                out.sync_all().map_err(io)?;
            }
            Ok(())
        })();
        if let Err(err) = result {
            for (tmp, _) in &staged {
                let _ = std::fs::remove_file(tmp);
            }
            return Err(err);
        }
        let mut written = Vec::with_capacity(staged.len());
        for (i, (tmp, dest)) in staged.iter().enumerate() {
            if let Err(source) = std::fs::rename(tmp, dest) {
                // Leave no staging file behind; the layout check above makes this rare.
                for (tmp, _) in &staged[i..] {
                    let _ = std::fs::remove_file(tmp);
                }
                return Err(OutputError::Io {
                    path: dest.display().to_string(),
                    source,
                });
            }
            if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty())
                && let Ok(handle) = std::fs::File::open(dir)
            {
                // Make the rename itself durable.
                let _ = handle.sync_all();
            }
            written.push(dest.clone());
        }
        Ok(written)
    }
}

/// Refuses, before anything is written, a payload whose files cannot all be laid out: one
/// file under another (`a` and `a/b`), a file where a directory stands, or a directory
/// needed where a file stands.
fn check_layout(
    landings: &BTreeSet<PathBuf>,
    plan: &[(PathBuf, &ArtifactFile)],
) -> Result<(), OutputError> {
    for (dest, file) in plan {
        let refuse = |reason: String| OutputError::Refused {
            path: file.path.clone(),
            reason,
        };
        let landing: PathBuf = dest.components().collect();
        for ancestor in landing.ancestors().skip(1) {
            if landings.contains(ancestor) {
                return Err(refuse(format!(
                    "another file of the payload is written at {}, which this file needs as a directory",
                    ancestor.display()
                )));
            }
            if std::fs::symlink_metadata(ancestor)
                .is_ok_and(|m| !m.is_dir() && !m.file_type().is_symlink())
            {
                return Err(refuse(format!(
                    "{} exists and is not a directory",
                    ancestor.display()
                )));
            }
        }
        if std::fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir()) {
            return Err(refuse(format!("{} is a directory", dest.display())));
        }
    }
    Ok(())
}

/// A new staging file beside the target, under a name no one can guess, created exclusively
/// and never through a symlink: a link planted under any name cannot redirect the write.
fn create_staging(dir: &Path, name: &str) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut last = None;
    for _ in 0..8 {
        let tag: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(16)
            .collect();
        let tmp = dir.join(format!(".{name}.bootsync-{tag}"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            // As `File::create` would: the umask decides.
            .mode(0o666)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => last = Some(err),
            Err(err) => return Err(err),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free staging name")))
}

/// Where `path` really is: its deepest existing ancestor resolved (symlinks followed), plus
/// the components that do not exist yet (which cannot be symlinks).
fn real_path(path: &Path) -> std::io::Result<PathBuf> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(mut real) => {
                for part in rest.iter().rev() {
                    real.push(part);
                }
                return Ok(real);
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let Some(name) = existing.file_name() else {
                    return Err(err);
                };
                rest.push(name.to_os_string());
                existing = existing.parent().ok_or(err)?;
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> ArtifactFile {
        ArtifactFile::new(path, format!("content of {path}"))
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = walk(dir)
            .into_iter()
            .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
            .collect();
        names.sort();
        names
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.is_symlink() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    #[test]
    fn routes_win_and_relative_paths_land_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let map = ArtifactOutputMap::new()
            .route("/config.yaml", dir.path().join("etc/node.yaml"))
            .with_root(dir.path().join("out"));
        let written = map
            .write_all(&[file("/config.yaml"), file("shared/settings.yaml")])
            .unwrap();
        assert_eq!(written.len(), 2);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("etc/node.yaml")).unwrap(),
            "content of /config.yaml"
        );
        assert!(dir.path().join("out/shared/settings.yaml").exists());
    }

    #[test]
    fn hostile_paths_are_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        std::fs::create_dir_all(&root).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();
        let map = ArtifactOutputMap::new().with_root(&root);
        for hostile in [
            "../evil",
            "a/../../evil",
            "/etc/passwd",
            "escape/evil",
            "bad\u{0}name",
        ] {
            let err = map
                .write_all(&[file("good.txt"), file(hostile)])
                .unwrap_err();
            assert!(
                matches!(err, OutputError::Refused { .. }),
                "{hostile}: {err}"
            );
            assert_eq!(
                listing(&root),
                ["escape"],
                "{hostile}: something was written"
            );
            assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        }
    }

    #[test]
    fn duplicate_paths_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let map = ArtifactOutputMap::new().with_root(dir.path());
        assert!(matches!(
            map.write_all(&[file("a"), file("a")]),
            Err(OutputError::Duplicate { .. })
        ));
        assert!(listing(dir.path()).is_empty());
    }

    #[test]
    fn a_failed_write_leaves_the_old_set_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let map = ArtifactOutputMap::new().with_root(dir.path());
        map.write_all(&[
            ArtifactFile::new("a.txt", "old a"),
            ArtifactFile::new("b.txt", "old b"),
        ])
        .unwrap();
        // A name the file system accepts, but whose staging name (longer by 27 bytes) it
        // does not, makes the second staging step fail.
        let long = format!("{}.txt", "n".repeat(240));
        let err = map
            .write_all(&[
                ArtifactFile::new("a.txt", "new a"),
                ArtifactFile::new(long, "new b"),
            ])
            .unwrap_err();
        assert!(matches!(err, OutputError::Io { .. }), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.txt")).unwrap(),
            "old a",
            "half a payload was applied"
        );
        assert!(
            !listing(dir.path()).iter().any(|n| n.contains(".bootsync-")),
            "staging files left behind"
        );
    }

    #[test]
    fn spellings_of_one_path_are_one_file_and_the_payload_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let map = ArtifactOutputMap::new().with_root(dir.path());
        for second in ["a//b", "./a/b", "a/./b"] {
            let err = map.write_all(&[file("a/b"), file(second)]).unwrap_err();
            assert!(
                matches!(err, OutputError::Duplicate { .. }),
                "{second}: {err}"
            );
        }
        assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
    }

    #[test]
    fn a_payload_that_cannot_be_laid_out_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let map = ArtifactOutputMap::new().with_root(dir.path());
        // One file where another needs a directory, in either order.
        for files in [[file("a"), file("a/b")], [file("a/b"), file("a")]] {
            let err = map.write_all(&files).unwrap_err();
            assert!(err.to_string().contains("as a directory"), "{err}");
            assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
        }
        // A directory where a file should go, and a file where a directory is needed.
        std::fs::create_dir(dir.path().join("taken")).unwrap();
        std::fs::write(dir.path().join("plain"), "x").unwrap();
        for path in ["taken", "plain/inner"] {
            let err = map.write_all(&[file("fine"), file(path)]).unwrap_err();
            assert!(matches!(err, OutputError::Refused { .. }), "{path}: {err}");
            assert!(
                !dir.path().join("fine").exists(),
                "{path}: fine was written"
            );
        }
        assert_eq!(
            listing(dir.path()),
            ["plain"],
            "no staging file left behind"
        );
    }
}
