//! The admin and join tokens as route guards.

use axum::http::HeaderMap;

use super::error::ApiError;
use crate::api::auth::{Token, bearer};

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
