//! The refusals several routes share, described once for the OpenAPI document. A leaf of the
//! server module: handlers name these sets in their annotations, and the document is built from
//! the handlers.

// The sets are only ever read by utoipa's derive, never built as values.
#![allow(dead_code)]

use crate::api::ErrorBody;

/// Refusals of every route that reads a JSON body: one set, described once.
#[derive(utoipa::IntoResponses)]
pub(super) enum JsonBodyRefused {
    /// Malformed JSON, or an invalid name, header or field
    #[response(status = 400)]
    Malformed(ErrorBody),
    /// The body stopped, or came too slowly (`--body-timeout`, `--min-body-rate`,
    /// `--request-deadline`)
    #[response(status = 408)]
    TooSlow(ErrorBody),
    /// The body is over `--body-limit`, or a value or metadata over its limit
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Not `application/json`
    #[response(status = 415)]
    NotJson(ErrorBody),
    /// The bodies held at once fill `--body-budget`, or the store does not answer; retry
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The refusals of a `/v1` write beyond its body's: a failed precondition, or a value
/// `__cfgsync__` would refuse.
#[derive(utoipa::IntoResponses)]
pub(super) enum WriteRefused {
    /// A precondition failed (the message and `details.key` name it); nothing was written
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// A value `__cfgsync__` would refuse (every problem listed); nothing was written
    #[response(status = 422)]
    Invalid(ErrorBody),
}

/// The refusal of every route that needs the admin token.
#[derive(utoipa::IntoResponses)]
pub(super) enum AdminRequired {
    /// Missing or wrong admin token (when one is configured)
    #[response(status = 401)]
    Unauthorized(ErrorBody),
}

/// The refusal of the node routes without the join token.
#[derive(utoipa::IntoResponses)]
pub(super) enum JoinRequired {
    /// Missing or wrong join token, or (strict mode) node secret
    #[response(status = 401)]
    Unauthorized(ErrorBody),
}

/// The refusals of a read that may name a reserved namespace.
#[derive(utoipa::IntoResponses)]
pub(super) enum ReadRefused {
    /// An invalid name
    #[response(status = 400)]
    Invalid(ErrorBody),
    /// A reserved namespace (starting with `_`) without the admin token
    #[response(status = 401)]
    Reserved(ErrorBody),
}
