//! Where a payload's files go on the node, and writing them all or none.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rustix::fs;

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

    /// Where a payload path lands: its directory (beneath the root, or a route's) and name.
    fn target(&self, path: &str) -> Result<Target, OutputError> {
        let shown = self.resolve(path)?;
        let name = shown
            .file_name()
            .map(OsString::from)
            .ok_or_else(|| OutputError::Refused {
                path: path.to_string(),
                reason: "names no file".into(),
            })?;
        let dir = if self.routes.contains_key(path) {
            let parent = shown.parent().filter(|p| !p.as_os_str().is_empty());
            Dir::Routed(parent.unwrap_or(Path::new(".")).to_path_buf())
        } else {
            let mut parts: Vec<OsString> = Path::new(path)
                .components()
                .filter_map(|c| match c {
                    Component::Normal(part) => Some(part.to_os_string()),
                    _ => None,
                })
                .collect();
            parts.pop();
            Dir::Beneath(parts)
        };
        Ok(Target { dir, name, shown })
    }

    /// Writes every file or none: all are validated, staged beside their targets and fsynced,
    /// then renamed into place. Returns the local paths written.
    ///
    /// Everything beneath the output root is reached from a descriptor of the root, one
    /// directory at a time and never through a symlink, so a local writer who swaps a
    /// directory for a symlink while the payload is written cannot send a file outside.
    pub fn write_all(&self, files: &[ArtifactFile]) -> Result<Vec<PathBuf>, OutputError> {
        // Duplicates are judged on where files land, so `a/b`, `a//b`, `./a/b` and `a/./b` are
        // one file.
        let mut seen = BTreeSet::new();
        let mut plan = Vec::with_capacity(files.len());
        for file in files {
            let target = self.target(&file.path)?;
            let landing: PathBuf = target.shown.components().collect();
            if !seen.insert(landing) {
                return Err(OutputError::Duplicate {
                    path: file.path.clone(),
                });
            }
            plan.push((target, file));
        }
        check_layout(&seen, &plan)?;
        let mut dirs = Dirs::new(&self.root);
        let mut staged: Vec<(Arc<OwnedFd>, OsString, OsString, PathBuf)> =
            Vec::with_capacity(plan.len());
        let result = (|| {
            for (target, file) in &plan {
                let io = |source| OutputError::Io {
                    path: target.shown.display().to_string(),
                    source,
                };
                let dir = dirs.open(&target.dir, true).map_err(io)?;
                let (tmp, mut out) = create_staging(&dir, &target.name).map_err(io)?;
                staged.push((dir.clone(), tmp, target.name.clone(), target.shown.clone()));
                out.write_all(file.content.as_bytes()).map_err(io)?;
                out.sync_all().map_err(io)?;
            }
            Ok(())
        })();
        if let Err(err) = result {
            for (dir, tmp, _, _) in &staged {
                let _ = fs::unlinkat(&**dir, tmp.as_os_str(), fs::AtFlags::empty());
            }
            return Err(err);
        }
        let mut written = Vec::with_capacity(staged.len());
        for (i, (dir, tmp, name, shown)) in staged.iter().enumerate() {
            if let Err(errno) = fs::renameat(&**dir, tmp.as_os_str(), &**dir, name.as_os_str()) {
                // Leave no staging file behind; the layout check above makes this rare.
                for (dir, tmp, _, _) in &staged[i..] {
                    let _ = fs::unlinkat(&**dir, tmp.as_os_str(), fs::AtFlags::empty());
                }
                return Err(OutputError::Io {
                    path: shown.display().to_string(),
                    source: errno.into(),
                });
            }
            // Make the rename itself durable.
            let _ = fs::fsync(&**dir);
            written.push(shown.clone());
        }
        Ok(written)
    }

    /// Deletes the files of `before` that `after` no longer names, when they were written
    /// beneath the output root (routed files are the operator's to remove). Reached from
    /// the root's descriptor as [`write_all`](Self::write_all) does; returns what was deleted.
    pub fn remove_dropped(&self, before: &[ArtifactFile], after: &[ArtifactFile]) -> Vec<PathBuf> {
        let kept: BTreeSet<PathBuf> = after
            .iter()
            .filter_map(|f| self.resolve(&f.path).ok())
            .map(|p| p.components().collect())
            .collect();
        let mut dirs = Dirs::new(&self.root);
        let mut removed = Vec::new();
        for file in before {
            let Ok(target) = self.target(&file.path) else {
                continue;
            };
            let landing: PathBuf = target.shown.components().collect();
            if matches!(target.dir, Dir::Routed(_)) || kept.contains(&landing) {
                continue;
            }
            let Ok(dir) = dirs.open(&target.dir, false) else {
                continue;
            };
            // A file only: a directory or a link standing there now is left alone.
            let is_file = fs::statat(
                &*dir,
                target.name.as_os_str(),
                fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .is_ok_and(|st| fs::FileType::from_raw_mode(st.st_mode) == fs::FileType::RegularFile);
            if is_file && fs::unlinkat(&*dir, target.name.as_os_str(), fs::AtFlags::empty()).is_ok()
            {
                removed.push(target.shown);
            }
        }
        removed
    }
}

/// Where one file lands.
struct Target {
    dir: Dir,
    name: OsString,
    /// The path as shown to people (and returned to callers).
    shown: PathBuf,
}

/// A file's directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Dir {
    /// Beneath the output root, by these components.
    Beneath(Vec<OsString>),
    /// A route's directory, as the operator named it.
    Routed(PathBuf),
}

/// Open directories of one write, each opened once.
struct Dirs<'a> {
    root_path: &'a Path,
    root: Option<Arc<OwnedFd>>,
    open: BTreeMap<Dir, Arc<OwnedFd>>,
}

impl<'a> Dirs<'a> {
    fn new(root_path: &'a Path) -> Self {
        Self {
            root_path,
            root: None,
            open: BTreeMap::new(),
        }
    }

    /// The descriptor of `dir`; with `create`, missing directories are made on the way.
    fn open(&mut self, dir: &Dir, create: bool) -> std::io::Result<Arc<OwnedFd>> {
        if let Some(fd) = self.open.get(dir) {
            return Ok(fd.clone());
        }
        let fd = match dir {
            // The operator's own paths: followed as given.
            Dir::Routed(path) => {
                if create {
                    std::fs::create_dir_all(path)?;
                }
                Arc::new(open_dir(fs::CWD, path, false)?)
            }
            Dir::Beneath(parts) => {
                let mut current = self.root(create)?;
                for part in parts {
                    current = Arc::new(step(&current, part, create)?);
                }
                current
            }
        };
        self.open.insert(dir.clone(), fd.clone());
        Ok(fd)
    }

    fn root(&mut self, create: bool) -> std::io::Result<Arc<OwnedFd>> {
        if let Some(root) = &self.root {
            return Ok(root.clone());
        }
        if create {
            std::fs::create_dir_all(self.root_path)?;
        }
        let root = Arc::new(open_dir(fs::CWD, self.root_path, false)?);
        self.root = Some(root.clone());
        Ok(root)
    }
}

fn open_dir<Fd: AsFd>(at: Fd, path: &Path, no_follow: bool) -> std::io::Result<OwnedFd> {
    let mut flags = fs::OFlags::RDONLY | fs::OFlags::DIRECTORY | fs::OFlags::CLOEXEC;
    if no_follow {
        flags |= fs::OFlags::NOFOLLOW;
    }
    Ok(fs::openat(at, path, flags, fs::Mode::empty())?)
}

/// One directory down from `dir`, never through a symlink; made first when missing.
fn step(dir: &OwnedFd, part: &OsStr, create: bool) -> std::io::Result<OwnedFd> {
    let refuse = |what: &str| {
        std::io::Error::other(format!(
            "{} is {what}, not a directory: refusing to write through it",
            part.to_string_lossy()
        ))
    };
    for _ in 0..2 {
        match open_dir(dir, Path::new(part), true) {
            Ok(next) => return Ok(next),
            Err(err) if err.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
                return Err(refuse("a symlink"));
            }
            Err(err) if err.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) => {
                return Err(refuse("a file or a symlink"));
            }
            Err(err) if create && err.kind() == std::io::ErrorKind::NotFound => {
                match fs::mkdirat(dir, part, fs::Mode::from_raw_mode(0o777)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => continue,
                    Err(errno) => return Err(errno.into()),
                }
            }
            Err(err) => return Err(err),
        }
    }
    Err(std::io::Error::other(format!(
        "{} keeps changing: refusing to write through it",
        part.to_string_lossy()
    )))
}

/// Refuses, before anything is written, a payload whose files cannot all be laid out: one
/// file under another (`a` and `a/b`), a file where a directory stands, or a directory
/// needed where a file stands.
fn check_layout(
    landings: &BTreeSet<PathBuf>,
    plan: &[(Target, &ArtifactFile)],
) -> Result<(), OutputError> {
    for (target, file) in plan {
        let dest = &target.shown;
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

/// A new staging file in `dir` beside the target, under a name no one can guess, created
/// exclusively and never through a symlink: a link planted under any name cannot redirect
/// the write.
fn create_staging(dir: &OwnedFd, name: &OsStr) -> std::io::Result<(OsString, std::fs::File)> {
    let mut last = None;
    for _ in 0..8 {
        let tag: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(16)
            .collect();
        let mut tmp = OsString::from(".");
        tmp.push(name);
        tmp.push(format!(".bootsync-{tag}"));
        let flags = fs::OFlags::WRONLY
            | fs::OFlags::CREATE
            | fs::OFlags::EXCL
            | fs::OFlags::NOFOLLOW
            | fs::OFlags::CLOEXEC;
        // As `File::create` would: the umask decides.
        match fs::openat(dir, tmp.as_os_str(), flags, fs::Mode::from_raw_mode(0o666)) {
            Ok(fd) => return Ok((tmp, std::fs::File::from(fd))),
            Err(rustix::io::Errno::EXIST) => last = Some(rustix::io::Errno::EXIST.into()),
            Err(errno) => return Err(errno.into()),
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

    #[test]
    fn dropped_files_beneath_the_root_are_deleted_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let routed = dir.path().join("etc/routed.yaml");
        let map = ArtifactOutputMap::new()
            .route("/routed.yaml", &routed)
            .with_root(dir.path().join("out"));
        let before = [
            file("/routed.yaml"),
            file("keep.txt"),
            file("gone/old.txt"),
            file("dir-now"),
        ];
        map.write_all(&before).unwrap();
        // A directory now stands where a dropped file was: it is not removed.
        std::fs::remove_file(dir.path().join("out/dir-now")).unwrap();
        std::fs::create_dir(dir.path().join("out/dir-now")).unwrap();
        let after = [file("keep.txt")];
        let removed = map.remove_dropped(&before, &after);
        assert_eq!(removed, [dir.path().join("out").join("gone/old.txt")]);
        assert!(routed.exists(), "a routed file is the operator's to remove");
        assert!(dir.path().join("out/keep.txt").exists());
        assert!(dir.path().join("out/dir-now").is_dir());
    }

    #[test]
    fn a_symlinked_directory_beneath_the_root_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        std::fs::create_dir_all(root.join("real")).unwrap();
        let map = ArtifactOutputMap::new().with_root(&root);
        // The path check sees a real directory; the write then meets a symlink there, as
        // when a local writer swaps it in between.
        let plan = map.target("real/f.txt").unwrap();
        std::fs::remove_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("real")).unwrap();
        let mut dirs = Dirs::new(&root);
        let err = dirs.open(&plan.dir, true).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }
}
