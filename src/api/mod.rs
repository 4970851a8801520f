//! The wire contract: every request and response body, the error body with its codes and
//! typed details, the tokens and the header names, and the records the reconciler keeps in
//! `__system__`.
//!
//! The server and both clients (the `/v1` client and the cfgsync client) take their types from
//! here, so a change to the contract is a change in one place, and nothing here knows about
//! axum or reqwest.

pub mod auth;
pub mod cfgsync;
pub mod config;
pub mod error;
pub mod rollout;
pub mod status;
pub mod system;

pub use auth::{NODE_SECRET_HEADER, REVISION_HEADER, Token, TokenError};
pub use error::{ErrorBody, ErrorCode, ErrorDetails};
