//! The admin and join tokens as extractors: a handler that names [`Admin`] or [`Join`] before
//! its body extractor is guarded from the request head, so no body is read (or buffered) for
//! a caller without the token.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use base64::Engine as _;

use super::error::ApiError;
use crate::api::auth::{Token, bearer};

/// What holds the tokens a route checks.
pub trait Tokens {
    /// Guards config writes and every reserved namespace.
    fn admin_token(&self) -> Option<&Token>;
    /// Guards the node routes.
    fn join_token(&self) -> Option<&Token>;
}

/// Requires `expected` (when configured) as the request's bearer token.
pub fn require(expected: Option<&Token>, headers: &HeaderMap, what: &str) -> Result<(), ApiError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    match bearer(headers) {
        Some(presented) if expected.matches(presented) => Ok(()),
        Some(_) => Err(ApiError::unauthorized(format!("the {what} token is wrong"))),
        None => Err(ApiError::unauthorized(format!(
            "this route needs the {what} token as 'Authorization: Bearer <token>'"
        ))),
    }
}

/// An extractor that requires one of the tokens from the request head (when configured).
macro_rules! token_guard {
    ($(#[$doc:meta])* $name:ident, $token:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $name;

        impl<S: Tokens + Send + Sync> FromRequestParts<S> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(
                parts: &mut Parts,
                state: &S,
            ) -> Result<Self, Self::Rejection> {
                require(state.$token(), &parts.headers, $what).map(|()| $name)
            }
        }
    };
}

token_guard!(
    /// The request carries the admin token (or none is configured); 401 otherwise.
    Admin,
    admin_token,
    "admin"
);
token_guard!(
    /// The request carries the join token (or none is configured); 401 otherwise.
    Join,
    join_token,
    "join"
);

/// Whether the request carries the admin token (or none is configured), for routes whose
/// answer depends on it rather than being refused without it.
#[derive(Debug, Clone, Copy)]
pub struct IsAdmin(pub bool);

impl<S: Tokens + Send + Sync> FromRequestParts<S> for IsAdmin {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(IsAdmin(
            require(state.admin_token(), &parts.headers, "admin").is_ok(),
        ))
    }
}

impl IsAdmin {
    /// 401 unless the request carries the admin token.
    pub fn require(self) -> Result<(), ApiError> {
        if self.0 {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "this needs the admin token as 'Authorization: Bearer <token>'",
            ))
        }
    }
}

/// The password of an `Authorization: Basic` header (a browser's answer to a challenge).
pub fn basic_password(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':')
        .map(|(_, password)| password.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_yields_the_password_whatever_the_user() {
        let mut headers = HeaderMap::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode("anyone:s3cret");
        headers.insert(
            header::AUTHORIZATION,
            format!("Basic {encoded}").parse().unwrap(),
        );
        assert_eq!(basic_password(&headers).as_deref(), Some("s3cret"));
        headers.insert(header::AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert_eq!(basic_password(&headers), None);
    }
}
