//! The API's one error shape: `{error, field, message}` with a 4xx/5xx status. Messages name
//! the field and the fix, and never carry secrets (tokens, keys) back.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error the API returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// A short code: `unauthenticated`, `forbidden`, `invalid_request`, `not_found`,
    /// `method_not_allowed`, `unsupported_media_type`, `payload_too_large`, `timeout`,
    /// `unavailable`, `internal`.
    pub error: String,
    /// The request field at fault (`id`, `capabilities`, `backup_prefs.schedule`, a header
    /// such as `authorization`), when there is one.
    pub field: Option<String>,
    /// What is wrong and how to fix it.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        error: &str,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: error.into(),
                field: field.map(str::to_string),
                message: message.into(),
            },
        }
    }

    /// 401: who the caller is could not be established (certificate or token).
    pub fn unauthenticated(field: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            Some(field),
            message,
        )
    }

    /// 403: the caller is known but may not do this.
    pub fn forbidden(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", Some(field), message)
    }

    /// 400: the request is malformed or a field is invalid.
    pub fn invalid(field: Option<&str>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", field, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", None, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            None,
            message,
        )
    }

    /// 500. The detail is logged, not returned.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "API request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            None,
            "internal error; see the controller's log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"agentry\""),
            );
        }
        response
    }
}
