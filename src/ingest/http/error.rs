//! The JSON error body every 4xx/5xx carries: `{"error": "<code>", "message": "<text>"}`.

use http::{header, HeaderValue, StatusCode};
use serde::Serialize;

use super::{respond, Response};

/// Longest error message sent; longer ones are cut.
const MAX_MESSAGE_BYTES: usize = 512;

/// An API error: a status, a stable machine-readable code and a message naming the problem.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for `Retry-After` (503 only).
    pub retry_after_seconds: Option<u64>,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let mut message = message.into();
        // Messages may quote the client's input (serde names an unknown field): bound the
        // echo, so an error never reflects a whole body back.
        if message.len() > MAX_MESSAGE_BYTES {
            let mut end = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        Self {
            status,
            code,
            message,
            retry_after_seconds: None,
            allow: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn unavailable(message: impl Into<String>, retry_after_seconds: u64) -> Self {
        Self {
            retry_after_seconds: Some(retry_after_seconds),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
        }
    }
}

impl ApiError {
    /// The response: `status` with the JSON error body.
    pub fn into_response(self) -> Response {
        let body = serde_json::to_vec(&Body {
            error: self.code,
            message: &self.message,
        })
        .unwrap_or_else(|_| b"{\"error\":\"internal\"}".to_vec());
        let mut response = respond(self.status, "application/json", body.into());
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after_seconds {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(allow) = self.allow {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}
