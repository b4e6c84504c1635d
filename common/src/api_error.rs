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
//!
//! Errors made before a handler runs (axum's own, the request timeout's) get
//! the same shape from [`json_errors`].

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

/// Gives an error response that is not JSON (axum's own: an unknown route, a
/// method not allowed, a path that is not UTF-8, a body over the limit; the
/// request timeout's 503) the shape [`ApiError`] answers with: its text as
/// `error`, and the part of the request it names as `field` for a 400 or 413.
/// Everything else passes untouched, so a success costs a status check.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let body = match status {
        StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => {
            // axum's path rejections say "Invalid URL"; its others are the body's.
            let field = if message.starts_with("Invalid URL") {
                "path"
            } else {
                "body"
            };
            json!({"error": message, "field": field})
        }
        _ => json!({"error": message}),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn mapped(status: StatusCode, body: &'static str) -> (StatusCode, serde_json::Value) {
        let response = json_errors((status, body).into_response()).await;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn errors_made_outside_the_handlers_are_json_too() {
        assert_eq!(
            mapped(StatusCode::BAD_REQUEST, "Invalid URL: not UTF-8").await,
            (
                StatusCode::BAD_REQUEST,
                json!({"error": "Invalid URL: not UTF-8", "field": "path"})
            )
        );
        assert_eq!(
            mapped(StatusCode::PAYLOAD_TOO_LARGE, "length limit exceeded")
                .await
                .1["field"],
            "body"
        );
        assert_eq!(
            mapped(StatusCode::METHOD_NOT_ALLOWED, "").await,
            (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "method not allowed"})
            )
        );
        let ok = json_errors((StatusCode::FOUND, "plain").into_response()).await;
        assert_eq!(
            ok.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8",
            "success untouched"
        );
        let ours = ApiError::not_found("offer_id", "unknown offer").into_response();
        let ours = json_errors(ours).await;
        let bytes = axum::body::to_bytes(ours.into_body(), 4096).await.unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
            json!({"error": "unknown offer", "field": "offer_id"}),
            "an ApiError untouched"
        );
    }
}
