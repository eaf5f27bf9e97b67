//! Errors as HTTP answers: OpenAI's `{"error": {message, type, param, code}}` with the matching status.
use crate::core::protocol::openai::{ErrorBody, ErrorResponse};
use crate::core::router::RouteError;
use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Seconds a client told "busy" should wait before retrying.
const RETRY_AFTER_SECONDS: u64 = 1;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad_request(param: Option<&str>, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), param: param.map(str::to_string) }
    }

    /// A field-level problem: the message always names the field.
    pub fn invalid(param: &str, message: impl std::fmt::Display) -> Self {
        Self::bad_request(Some(param), format!("`{param}` {message}"))
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, message: message.into(), param: None }
    }

    /// The service cannot answer yet (or just now); clients are told to retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, message: message.into(), param: None }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), param: None }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            _ => "InternalServerError",
        }
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                kind: self.kind().to_string(),
                param: self.param.clone(),
                code: self.status.as_u16(),
            },
        }
    }
}

impl From<RouteError> for ApiError {
    fn from(error: RouteError) -> Self {
        let status = match &error {
            RouteError::Busy { .. } | RouteError::NoWorkers => StatusCode::SERVICE_UNAVAILABLE,
            RouteError::Engine(crate::core::engine::EngineError::InvalidRequest(_)) => StatusCode::BAD_REQUEST,
            RouteError::Engine(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self { status, message: error.to_string(), param: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}
