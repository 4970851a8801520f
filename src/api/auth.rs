//! Bearer tokens and the header names of the API: a token is loaded from a file, compared in
//! constant time and never printed.

use std::fmt;
use std::path::Path;

use http::{HeaderMap, header};

/// Header carrying the store revision a response was read or written at.
pub const REVISION_HEADER: &str = "x-bootsync-revision";
/// Header carrying a node's secret in strict mode.
pub const NODE_SECRET_HEADER: &str = "x-bootsync-node-secret";

/// A secret token. Its `Debug` output is redacted so it cannot leak into logs; cloning it (once
/// per node request, with the routes' state) shares the secret instead of copying it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(std::sync::Arc<str>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Why a token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("cannot read token file {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no token.
    #[error("token file {path} is empty")]
    Empty {
        /// The file.
        path: String,
    },
}

impl Token {
    /// A token from a string (surrounding whitespace removed).
    pub fn new(secret: impl AsRef<str>) -> Option<Self> {
        let trimmed = secret.as_ref().trim();
        (!trimmed.is_empty()).then(|| Token(trimmed.into()))
    }

    /// Reads a token from a file; trailing newlines are ignored.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Token::new(text).ok_or_else(|| TokenError::Empty {
            path: path.display().to_string(),
        })
    }

    /// The secret, for sending it as a client.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares in time independent of where the first difference is.
    pub fn matches(&self, presented: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), presented.as_bytes())
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    diff == 0
}

/// The bearer token of a request, if it has one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_the_exact_secret() {
        let token = Token::new("s3cret\n").unwrap();
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3cre"));
        assert!(!token.matches("s3cret2"));
        assert!(!token.matches(""));
    }

    #[test]
    fn debug_output_never_contains_the_secret() {
        let token = Token::new("hunter2").unwrap();
        assert!(!format!("{token:?}").contains("hunter2"));
    }

    #[test]
    fn bearer_is_parsed_case_insensitively() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }
}
