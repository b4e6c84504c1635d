//! The admin bearer token check both services use.

use axum::http::{header, HeaderMap};

use crate::ApiError;

/// Checks `Authorization: Bearer <token>` in constant time. An empty configured
/// token disables the admin API: every call answers 401.
///
/// # Errors
/// 401 when the token is missing, wrong, or not configured.
pub fn require_bearer(headers: &HeaderMap, token: &str) -> Result<(), ApiError> {
    if token.is_empty() {
        return Err(ApiError::Unauthorized(
            "admin API disabled: start with --admin-token",
        ));
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // The scheme's name is case-insensitive (RFC 9110).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
        .map_or("", |(_, given)| given);
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("missing or wrong bearer token"))
    }
}

/// Compares without stopping at the first difference (length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn accepts_only_the_exact_bearer_token() {
        assert!(require_bearer(&headers("Bearer s3cret"), "s3cret").is_ok());
        assert!(require_bearer(&headers("bearer s3cret"), "s3cret").is_ok());
        assert!(require_bearer(&headers("Basic s3cret"), "s3cret").is_err());
        assert!(require_bearer(&headers("Bearer s3cre"), "s3cret").is_err());
        assert!(require_bearer(&headers("s3cret"), "s3cret").is_err());
        assert!(require_bearer(&HeaderMap::new(), "s3cret").is_err());
        assert!(
            require_bearer(&headers("Bearer "), "").is_err(),
            "empty token disables"
        );
    }
}
