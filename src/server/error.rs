//! The one JSON error type of every HTTP route, answering with [`ErrorBody`]: `{"code",
//! "message", "details"}`.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};

use super::conn::body::BodyError;
use crate::api::ErrorDetails;
pub use crate::api::{ErrorBody, ErrorCode};
use crate::store;
use crate::telemetry::error_chain;

/// An HTTP error: the wire body, whose code fixes the status. Internal details are logged,
/// never returned.
#[derive(Debug, Clone)]
pub struct ApiError {
    body: ErrorBody,
}

impl ApiError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            body: ErrorBody::new(code, message),
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// 404: the thing asked for does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// 401: a token is needed and was missing or wrong.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    /// 422: well-formed but invalid content.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Invalid, message)
    }

    /// 429 with the seconds to wait (`details.retry_after_secs` and `Retry-After`).
    pub fn too_many(message: impl Into<String>, retry_after_secs: u64) -> Self {
        let details = ErrorDetails {
            retry_after_secs: Some(retry_after_secs),
            ..ErrorDetails::default()
        };
        ErrorBody::new(ErrorCode::TooManyRequests, message)
            .with_details(details)
            .into()
    }

    /// 503: a dependency (the store) is unavailable.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// 500: logs the cause and returns a message without internal detail.
    pub fn internal(context: &str, cause: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %error_chain(cause), "{context}");
        Self::new(
            ErrorCode::Internal,
            "internal server error; see the server log",
        )
    }

    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.body.status()
    }

    /// The machine-readable code.
    pub fn code(&self) -> ErrorCode {
        self.body.code
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.body.message
    }
}

impl From<ErrorBody> for ApiError {
    fn from(body: ErrorBody) -> Self {
        Self { body }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = self.body.details.retry_after_secs;
        let mut response = (self.body.status(), Json(self.body)).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

impl From<store::Error> for ApiError {
    fn from(err: store::Error) -> Self {
        if matches!(
            err,
            store::Error::BadUrl { .. } | store::Error::Backend { .. }
        ) {
            return Self::internal("store operation failed", &err);
        }
        Self {
            body: ErrorBody::from(&err),
        }
    }
}

fn rejection(status: StatusCode, message: String) -> ApiError {
    ApiError {
        body: ErrorBody::new(ErrorCode::for_status(status), message),
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        // A body cut off by the server's own limits says which, with its own status.
        match super::conn::body::body_error(&r) {
            Some(err @ BodyError::Busy { .. }) => {
                Self::new(ErrorCode::Unavailable, err.to_string())
            }
            Some(err @ BodyError::TooSlow { .. }) => Self::new(ErrorCode::Timeout, err.to_string()),
            None => rejection(r.status(), r.body_text()),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        // A path that does not decode is a malformed request, not a server fault.
        let status = if r.status().is_server_error() {
            StatusCode::BAD_REQUEST
        } else {
            r.status()
        };
        rejection(status, r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        rejection(r.status(), r.body_text())
    }
}

/// The largest request body the router takes, as a request extension, so a rejection can name it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// `axum::Json` whose rejections use the JSON error shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().copied();
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => {
                let mut err = ApiError::from(rejection);
                // A body over the request limit says which limit it broke.
                if let (ErrorCode::TooLarge, Some(BodyLimit(limit))) = (err.code(), limit) {
                    err.body.details.limit = Some(limit as u64);
                }
                Err(err)
            }
        }
    }
}

/// An axum extractor whose rejection answers with the JSON error shape.
macro_rules! with_json_rejection {
    ($(#[$doc:meta])* $name:ident, $inner:ident) => {
        $(#[$doc])*
        pub(super) struct $name<T>(pub(super) T);

        impl<S, T> FromRequestParts<S> for $name<T>
        where
            T: serde::de::DeserializeOwned + Send,
            S: Send + Sync,
        {
            type Rejection = ApiError;

            async fn from_request_parts(
                parts: &mut Parts,
                state: &S,
            ) -> Result<Self, Self::Rejection> {
                let $inner(value) = $inner::<T>::from_request_parts(parts, state).await?;
                Ok($name(value))
            }
        }
    };
}

with_json_rejection!(
    /// Path parameters decoded with the JSON error shape on failure.
    ApiPath,
    Path
);
with_json_rejection!(
    /// Query parameters decoded with the JSON error shape on failure.
    ApiQuery,
    Query
);

/// Fallback for unknown routes.
pub async fn not_found_route() -> ApiError {
    ApiError::not_found("no such route")
}

/// Fallback for a known route with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this route does not accept that method",
    )
}
