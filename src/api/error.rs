//! The error body every route answers with, its codes and its typed details, and the one
//! place where a store error becomes a body and a body becomes a store error again.

use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::store::{self, Key, Revision};

/// A stable machine-readable error code. Each code has one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request is malformed.
    BadRequest,
    /// 401: a token or node secret is needed and was missing or wrong.
    Unauthorized,
    /// 403: authenticated but not allowed.
    Forbidden,
    /// 404: the thing asked for does not exist.
    NotFound,
    /// 405: a known route with the wrong method.
    MethodNotAllowed,
    /// 409: a precondition failed; nothing was written.
    Conflict,
    /// 410: the history asked for is compacted.
    Compacted,
    /// 413: a body or value over its limit.
    TooLarge,
    /// 408: the request (its body) came too slowly.
    Timeout,
    /// 415: not `application/json`.
    UnsupportedMediaType,
    /// 422: well-formed but invalid content.
    Invalid,
    /// 500: a server fault; the detail is in the server's log.
    Internal,
    /// 429: too many requests of this kind from this source, or too many changes to one node.
    TooManyRequests,
    /// 503: the store is unavailable or the server is at its connection limit.
    Unavailable,
    /// 404 (cfgsync): there is no config for this identifier.
    MissingConfig,
    /// 425 (cfgsync): the node's config is not ready yet.
    NotReady,
    /// 409 (cfgsync): membership is frozen and the node is not a member.
    Frozen,
    /// 409 (cfgsync): the policy refuses a registration from a new IP.
    IpChanged,
    /// 409 (cfgsync): the registration cap is reached.
    RegistrationCap,
    /// 409 (cfgsync): the metadata budget is spent.
    MetadataBudget,
    /// 409 (cfgsync, strict): a record stored before strict mode, claimed from elsewhere.
    UnclaimedRecord,
    /// 409 (cfgsync): an operator replaced this node by another; it cannot register again.
    Replaced,
    /// 409 (cfgsync): a rollout is under way; another version is installed only when forced.
    RolloutInProgress,
    /// 409 (cfgsync): no rollout is running, or the command does not apply in its state.
    NoRollout,
    /// A code this build does not know (a newer server); the status tells what it means.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The HTTP status this code answers with.
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound | Self::MissingConfig => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict
            | Self::Frozen
            | Self::IpChanged
            | Self::RegistrationCap
            | Self::MetadataBudget
            | Self::UnclaimedRecord
            | Self::Replaced
            | Self::RolloutInProgress
            | Self::NoRollout => StatusCode::CONFLICT,
            Self::Compacted => StatusCode::GONE,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Internal | Self::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotReady => StatusCode::TOO_EARLY,
        }
    }

    /// Whether the same request may succeed later unchanged: the server was busy, paced the
    /// caller, or ran out of time, and said to retry.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::Unavailable | Self::TooManyRequests | Self::Timeout
        )
    }

    /// The code a bare status stands for (a framework's rejection, or an old peer's answer).
    pub fn for_status(status: StatusCode) -> Self {
        match status {
            StatusCode::UNAUTHORIZED => Self::Unauthorized,
            StatusCode::FORBIDDEN => Self::Forbidden,
            StatusCode::NOT_FOUND => Self::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => Self::MethodNotAllowed,
            StatusCode::CONFLICT => Self::Conflict,
            StatusCode::GONE => Self::Compacted,
            StatusCode::PAYLOAD_TOO_LARGE => Self::TooLarge,
            StatusCode::REQUEST_TIMEOUT => Self::Timeout,
            StatusCode::TOO_MANY_REQUESTS => Self::TooManyRequests,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::UnsupportedMediaType,
            StatusCode::UNPROCESSABLE_ENTITY => Self::Invalid,
            StatusCode::TOO_EARLY => Self::NotReady,
            StatusCode::SERVICE_UNAVAILABLE => Self::Unavailable,
            s if s.is_server_error() => Self::Internal,
            _ => Self::BadRequest,
        }
    }

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Conflict => "conflict",
            Self::Compacted => "compacted",
            Self::TooLarge => "too_large",
            Self::Timeout => "timeout",
            Self::TooManyRequests => "too_many_requests",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Invalid => "invalid",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
            Self::MissingConfig => "missing_config",
            Self::NotReady => "not_ready",
            Self::Frozen => "frozen",
            Self::IpChanged => "ip_changed",
            Self::RegistrationCap => "registration_cap",
            Self::MetadataBudget => "metadata_budget",
            Self::UnclaimedRecord => "unclaimed_record",
            Self::Replaced => "replaced",
            Self::RolloutInProgress => "rollout_in_progress",
            Self::NoRollout => "no_rollout",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client needs to act on an error without reading its message. Each field is set
/// only by the codes that carry it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetails {
    /// The key concerned (`conflict`, `too_large`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Key>,
    /// What was invalid (`bad_request` from the store: `namespace`, `key`, `batch`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub what: Option<String>,
    /// Why, without the surrounding sentence (`bad_request`, `conflict`, `unavailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The size found (`too_large`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The limit it broke (`too_large`, `registration_cap`, `metadata_budget`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// The revision a watch asked for (`compacted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<Revision>,
    /// The newest revision whose history is gone (`compacted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compacted: Option<Revision>,
    /// Seconds until the same request would be taken (`too_many_requests` for a node's
    /// changes); the answer's `Retry-After` header says the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

impl ErrorDetails {
    /// Whether no field is set (the body then carries no `details`).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The body of every error response: `{"code": ..., "message": ..., "details": {...}}`.
/// Old peers read `code` and `message` only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a program.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
    /// The typed particulars of `code` (boxed: most errors carry none, and an error travels
    /// by value through every `Result`).
    #[serde(default, skip_serializing_if = "no_details")]
    pub details: Box<ErrorDetails>,
}

#[allow(clippy::borrowed_box)] // serde hands the field itself to this check
fn no_details(details: &Box<ErrorDetails>) -> bool {
    details.is_empty()
}

impl ErrorBody {
    /// A body without details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: Box::default(),
        }
    }

    /// Adds details.
    pub fn with_details(mut self, details: ErrorDetails) -> Self {
        self.details = Box::new(details);
        self
    }

    /// The error a server answered with `status` and `text`: its body when it is the JSON error
    /// shape, else a body with the code [`ErrorCode::Unknown`] (a proxy in between, or the
    /// wrong server), so nothing reads a bare 404 as "absent".
    pub fn from_answer(status: StatusCode, text: &str) -> Self {
        serde_json::from_str(text).unwrap_or_else(|_| {
            let message = if text.trim().is_empty() {
                status.to_string()
            } else {
                text.trim().to_string()
            };
            Self::new(ErrorCode::Unknown, message)
        })
    }

    /// The HTTP status of this body's code.
    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// The store error a server answered with `status`, rebuilt from the code and details:
    /// exactly the error the server's store raised, for every variant a client can act on. A
    /// body without details (an older server) or with a code this build does not know is read
    /// by its status, as before details existed.
    pub fn into_store_error(self, status: StatusCode) -> store::Error {
        let ErrorBody {
            mut code,
            message,
            details: d,
        } = self;
        if code == ErrorCode::Unknown {
            code = ErrorCode::for_status(status);
        }
        match (code, *d) {
            (
                ErrorCode::BadRequest,
                ErrorDetails {
                    what: Some(what),
                    reason: Some(reason),
                    ..
                },
            ) => store::Error::Invalid { what, reason },
            (ErrorCode::BadRequest | ErrorCode::Invalid, _) => store::Error::Invalid {
                what: code.to_string(),
                reason: message,
            },
            (
                ErrorCode::TooLarge,
                ErrorDetails {
                    key: Some(key),
                    size: Some(size),
                    limit: Some(limit),
                    ..
                },
            ) => store::Error::TooLarge {
                key,
                size: size as usize,
                limit: limit as usize,
            },
            (
                ErrorCode::Conflict,
                ErrorDetails {
                    key: Some(key),
                    reason: Some(reason),
                    ..
                },
            ) => store::Error::Conflict { key, reason },
            (
                ErrorCode::Compacted,
                ErrorDetails {
                    requested: Some(requested),
                    compacted: Some(compacted),
                    ..
                },
            ) => store::Error::Compacted {
                requested,
                compacted,
            },
            (ErrorCode::Unavailable, d) => store::Error::Unavailable(d.reason.unwrap_or(message)),
            // An older server's words, without details.
            (ErrorCode::Conflict, _) => store::Error::Conflict {
                key: named_key(&message, "precondition failed on ", ": ")
                    .unwrap_or_else(|| Key::new("unknown", "unknown", "unknown")),
                reason: message,
            },
            (ErrorCode::Compacted, _) => store::Error::Compacted {
                requested: 0,
                compacted: 0,
            },
            (ErrorCode::TooLarge, d) => store::Error::TooLarge {
                key: named_key(&message, "value for ", " is ")
                    .unwrap_or_else(|| Key::new("unknown", "unknown", "unknown")),
                size: 0,
                limit: d.limit.unwrap_or_default() as usize,
            },
            (code, _) => store::Error::backend("calling the server", format!("{code}: {message}")),
        }
    }
}

/// The `ns/type/key` an older server's message names between `before` and `after`.
fn named_key(message: &str, before: &str, after: &str) -> Option<Key> {
    let (named, _) = message.strip_prefix(before)?.split_once(after)?;
    let mut parts = named.splitn(3, '/');
    Some(Key::new(parts.next()?, parts.next()?, parts.next()?))
}

impl From<&store::Error> for ErrorBody {
    /// The body a store error answers with. A backend fault says only that the server failed;
    /// its detail belongs in the server's log.
    fn from(err: &store::Error) -> Self {
        use store::Error as E;
        let message = err.to_string();
        match err {
            E::Invalid { what, reason } => ErrorBody::new(ErrorCode::BadRequest, message)
                .with_details(ErrorDetails {
                    what: Some(what.clone()),
                    reason: Some(reason.clone()),
                    ..ErrorDetails::default()
                }),
            E::TooLarge { key, size, limit } => ErrorBody::new(ErrorCode::TooLarge, message)
                .with_details(ErrorDetails {
                    key: Some(key.clone()),
                    size: Some(*size as u64),
                    limit: Some(*limit as u64),
                    ..ErrorDetails::default()
                }),
            E::Conflict { key, reason } => ErrorBody::new(ErrorCode::Conflict, message)
                .with_details(ErrorDetails {
                    key: Some(key.clone()),
                    reason: Some(reason.clone()),
                    ..ErrorDetails::default()
                }),
            E::Compacted {
                requested,
                compacted,
            } => ErrorBody::new(ErrorCode::Compacted, message).with_details(ErrorDetails {
                requested: Some(*requested),
                compacted: Some(*compacted),
                ..ErrorDetails::default()
            }),
            E::Unavailable(reason) => {
                ErrorBody::new(ErrorCode::Unavailable, message).with_details(ErrorDetails {
                    reason: Some(reason.clone()),
                    ..ErrorDetails::default()
                })
            }
            E::BadUrl { .. } | E::Backend { .. } => ErrorBody::new(
                ErrorCode::Internal,
                "internal server error; see the server log",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_wire_name() {
        let codes = [
            ErrorCode::BadRequest,
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::Conflict,
            ErrorCode::Compacted,
            ErrorCode::TooLarge,
            ErrorCode::Timeout,
            ErrorCode::TooManyRequests,
            ErrorCode::UnsupportedMediaType,
            ErrorCode::Invalid,
            ErrorCode::Internal,
            ErrorCode::Unavailable,
            ErrorCode::MissingConfig,
            ErrorCode::NotReady,
            ErrorCode::Frozen,
            ErrorCode::IpChanged,
            ErrorCode::RegistrationCap,
            ErrorCode::MetadataBudget,
            ErrorCode::UnclaimedRecord,
            ErrorCode::Replaced,
            ErrorCode::RolloutInProgress,
            ErrorCode::NoRollout,
        ];
        for code in codes {
            let wire = serde_json::to_value(code).unwrap();
            assert_eq!(wire, serde_json::Value::from(code.as_str()));
            assert_eq!(serde_json::from_value::<ErrorCode>(wire).unwrap(), code);
        }
        let newer: ErrorCode = serde_json::from_str("\"from_the_future\"").unwrap();
        assert_eq!(newer, ErrorCode::Unknown);
    }

    #[test]
    fn an_older_servers_words_still_make_the_store_error_a_client_acts_on() {
        let body: ErrorBody = serde_json::from_str(
            r#"{"code":"conflict","message":"precondition failed on __system__/lease/reconciler: expected 4"}"#,
        )
        .unwrap();
        match body.into_store_error(StatusCode::CONFLICT) {
            store::Error::Conflict { key, .. } => {
                assert_eq!(key, Key::new("__system__", "lease", "reconciler"));
            }
            other => panic!("{other:?}"),
        }
        let gone = ErrorBody::from_answer(
            StatusCode::GONE,
            "{\"code\":\"compacted\",\"message\":\"x\"}",
        );
        assert!(matches!(
            gone.into_store_error(StatusCode::GONE),
            store::Error::Compacted { .. }
        ));
        // A code from a newer server is read by its status.
        let newer = ErrorBody::from_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"code":"warming_up","message":"soon"}"#,
        );
        assert!(matches!(
            newer.into_store_error(StatusCode::SERVICE_UNAVAILABLE),
            store::Error::Unavailable(_)
        ));
    }

    #[test]
    fn a_bare_404_is_not_taken_for_an_absent_key() {
        let body = ErrorBody::from_answer(StatusCode::NOT_FOUND, "<html>nginx</html>");
        assert_eq!(body.code, ErrorCode::Unknown);
        assert!(body.message.contains("nginx"));
    }

    #[test]
    fn a_body_without_details_is_what_old_peers_send() {
        let body: ErrorBody =
            serde_json::from_str(r#"{"code":"missing_config","message":"no config"}"#).unwrap();
        assert_eq!(body.code, ErrorCode::MissingConfig);
        assert!(body.details.is_empty());
        let text = serde_json::to_string(&body).unwrap();
        assert!(!text.contains("details"), "{text}");
    }
}
