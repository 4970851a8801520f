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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_paths_refuse_parent_dirs_and_control_characters() {
        assert!(check_payload_path("/config.yaml").is_ok());
        assert!(check_payload_path("a/b.txt").is_ok());
        assert!(check_payload_path("").is_err());
        assert!(check_payload_path("../x").is_err());
        assert!(check_payload_path("a/../../x").is_err());
        assert!(check_payload_path("a\0b").is_err());
    }
}
