//! Reading operator files (spec, bundle, policy, seed files): YAML or JSON by extension.

use std::path::{Component, Path};

use serde::de::DeserializeOwned;

/// A file that could not be used, with every problem found in it.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {}", problems.join("; "))]
pub struct FileError {
    /// The file.
    pub path: String,
    /// Each problem, with where it is.
    pub problems: Vec<String>,
}

impl FileError {
    /// One problem in one file.
    pub fn one(path: &Path, problem: impl Into<String>) -> Self {
        Self {
            path: path.display().to_string(),
            problems: vec![problem.into()],
        }
    }
}

/// Parses a YAML (`.yaml`/`.yml`) or JSON file into `T`.
pub fn parse_file<T: DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| FileError::one(path, format!("cannot read: {err}")))?;
    parse_text(path, &text)
}

/// Parses text as YAML or JSON, chosen by the path's extension (JSON when unknown).
pub fn parse_text<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, FileError> {
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml")
    );
    if yaml {
        serde_saphyr::from_str(text).map_err(|err| FileError::one(path, err.to_string()))
    } else {
        serde_json::from_str(text).map_err(|err| FileError::one(path, err.to_string()))
    }
}

/// Checks a payload path: non-empty, no `..`, no NUL or control characters.
pub fn check_payload_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("path is empty".into());
    }
    if path.chars().any(char::is_control) {
        return Err(format!("path {path:?} contains a control character"));
    }
    if Path::new(path)
        .components()
        .any(|c| c == Component::ParentDir)
    {
        return Err(format!("path {path:?} contains '..'"));
    }
    Ok(())
}

/// Checks a path a bundle or policy names: a payload path (above) written one way only, so
/// that no two spellings name one file and no client has to guess: no `.` or empty component,
/// no trailing `/`, no backslash (a separator on some nodes, not on others).
pub fn check_canonical_payload_path(path: &str) -> Result<(), String> {
    check_payload_path(path)?;
    if path.contains('\\') {
        return Err(format!("path {path:?} contains a backslash"));
    }
    let relative = path.strip_prefix('/').unwrap_or(path);
    if relative
        .split('/')
        .any(|part| part.is_empty() || part == ".")
    {
        return Err(format!(
            "path {path:?} is not in canonical form (an empty or '.' component, or a trailing '/')"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_and_policy_paths_have_one_spelling() {
        for fine in [
            "/config.yaml",
            "config.yaml",
            "etc/node/config.yaml",
            "/a/b",
        ] {
            assert!(check_canonical_payload_path(fine).is_ok(), "{fine}");
        }
        for bad in [
            ".",
            "./",
            "dir/",
            "..\\..\\x",
            "a//b",
            "./a",
            "a/./b",
            "/",
            "//x",
            "../x",
        ] {
            assert!(check_canonical_payload_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn payload_paths_refuse_parent_dirs_and_control_characters() {
        for good in ["/config.yaml", "a/b.txt"] {
            assert!(check_payload_path(good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "a/../../x", "a\0b"] {
            assert!(check_payload_path(bad).is_err(), "{bad:?}");
        }
    }
}
