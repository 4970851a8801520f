//! Naming rules and size limits shared by every backend.

use super::Error;

/// Longest namespace or type id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// Size and count limits a store enforces on writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest value, as compact JSON bytes.
    pub max_value_bytes: usize,
    /// Most operations plus checks in one batch.
    pub max_batch_ops: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_value_bytes: 1024 * 1024,
            max_batch_ops: 1024,
        }
    }
}

/// Whether a namespace is reserved: stored normally, never on the public change stream.
pub fn is_reserved(namespace: &str) -> bool {
    namespace.starts_with('_')
}

fn validate_id(what: &str, id: &str) -> Result<(), Error> {
    let invalid = |reason: String| Error::Invalid {
        what: what.to_string(),
        reason,
    };
    if id.is_empty() {
        return Err(invalid(format!("{what} must not be empty")));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid(format!(
            "{what} is {} bytes, over the limit of {MAX_ID_LEN}",
            id.len()
        )));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(invalid(format!(
            "{what} {id:?} contains {bad:?}; only letters, digits, '_', '.' and '-' are allowed"
        )));
    }
    if id == "." || id == ".." {
        return Err(invalid(format!("{what} must not be {id:?}")));
    }
    Ok(())
}

/// Checks a namespace id.
pub fn validate_namespace(namespace: &str) -> Result<(), Error> {
    validate_id("namespace", namespace)
}

/// Checks a type id.
pub fn validate_type(kind: &str) -> Result<(), Error> {
    validate_id("type", kind)
}

/// Checks a key: non-empty UTF-8 without control characters, bounded in length.
pub fn validate_key(key: &str) -> Result<(), Error> {
    let invalid = |reason: String| Error::Invalid {
        what: "key".to_string(),
        reason,
    };
    if key.is_empty() {
        return Err(invalid("key must not be empty".into()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(invalid(format!(
            "key is {} bytes, over the limit of {MAX_KEY_LEN}",
            key.len()
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(invalid(format!("key {key:?} contains a control character")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_accept_the_documented_alphabet() {
        assert!(validate_namespace("prod-1.eu_west").is_ok());
        assert!(validate_namespace("__system__").is_ok());
    }

    #[test]
    fn identifiers_reject_separators_spaces_and_dots_alone() {
        for bad in [
            "",
            "a/b",
            "a b",
            "..",
            ".",
            "é",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(validate_type(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn keys_reject_control_characters_and_oversize() {
        assert!(validate_key("a/b c.é").is_ok());
        assert!(validate_key("a\nb").is_err());
        assert!(validate_key("").is_err());
        assert!(validate_key(&"k".repeat(MAX_KEY_LEN + 1)).is_err());
    }

    #[test]
    fn reserved_means_a_leading_underscore() {
        assert!(is_reserved("__system__"));
        assert!(is_reserved("_x"));
        assert!(!is_reserved("prod_"));
    }
}
