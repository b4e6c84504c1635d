//! The HTTP error shape both services answer with.
//!
//! | variant | status | body |
//! |---|---|---|
//! | `Invalid` | 400 | `{"error": message, "field": name}` |
//! | `Unauthorized` | 401 | `{"error": message}` |
//! | `NotFound` | 404 | `{"error": message, "field": name}` |
//! | `Conflict` | 409 | `{"error": message, "field": name}` |
//! | `TooLarge` | 413 | `{"error": message, "field": name}` |
//! | `Refused` | 401, 403, 429 | `{"error": message, "reason": code}` |
//! | `Unavailable` | 503 | `{"error": "event log unavailable, retry"}` (cause logged) |
//! | `Internal` | 500 | `{"error": "internal error"}` (cause logged) |

use axum::{
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

/// Everything a handler can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{field}: {message}")]
    NotFound { field: String, message: String },
    #[error("{field}: {message}")]
    Conflict { field: String, message: String },
    #[error("{field}: {message}")]
    TooLarge { field: String, message: String },
    #[error("{reason}: {message}")]
    Refused {
        status: u16,
        reason: &'static str,
        message: String,
    },
    #[error("event log unavailable")]
    Unavailable(#[source] crate::nats::PublishError),
    #[error("projection storage")]
    Internal(#[from] sled::Error),
}

impl ApiError {
    /// 400 naming the field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// 503 when an event is neither acknowledged by JetStream nor taken by the
    /// outbox: nothing was recorded.
    pub fn not_durable(error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, "event neither acknowledged nor spooled");
        Self::Refused {
            status: 503,
            reason: "not_recorded",
            message: "the event could not be recorded; retry".to_owned(),
        }
    }

    /// 404 naming the field.
    pub fn not_found(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::NotFound {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            Self::Invalid { field, message } => (
                StatusCode::BAD_REQUEST,
                json!({"error": message, "field": field}),
            ),
            Self::Unauthorized(message) => (StatusCode::UNAUTHORIZED, json!({"error": message})),
            Self::NotFound { field, message } => (
                StatusCode::NOT_FOUND,
                json!({"error": message, "field": field}),
            ),
            Self::Conflict { field, message } => (
                StatusCode::CONFLICT,
                json!({"error": message, "field": field}),
            ),
            Self::TooLarge { field, message } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": message, "field": field}),
            ),
            Self::Refused {
                status,
                reason,
                message,
            } => (
                StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN),
                json!({"error": message, "reason": reason}),
            ),
            Self::Unavailable(source) => {
                tracing::error!(error = %source, "publish failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": "event log unavailable, retry"}),
                )
            }
            Self::Internal(source) => {
                tracing::error!(error = %source, "projection read failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "internal error"}),
                )
            }
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
