//! The HTTP API key: `Authorization: Bearer KEY`, as OpenAI clients send it, compared in constant time.
//!
//! Probes stay open so orchestrators need no secret: `/health` and `/live` always, `/metrics` unless the
//! operator protects it too. A missing or wrong key is a 401 with an OpenAI error body.
use super::error::ApiError;
use axum::Router as HttpRouter;
use axum::extract::Request;
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

/// A key clients must present. Its text never reaches a log (`Debug` hides it).
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Refuses an empty key or one that cannot travel in an HTTP header.
    pub fn new(key: &str) -> Result<Self, String> {
        let key = key.trim();
        if key.is_empty() {
            return Err("the API key is empty".into());
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the API key must be printable ASCII without spaces, as an HTTP header carries it".into());
        }
        Ok(Self(key.to_string()))
    }

    fn matches(&self, presented: &[u8]) -> bool {
        // The length of a key is no secret worth a timing-safe comparison; its bytes are.
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(…)")
    }
}

/// `app`, asking for `key` on every path but the open ones.
pub fn protect(app: HttpRouter, key: Option<ApiKey>, protect_metrics: bool) -> HttpRouter {
    let Some(key) = key else {
        return app;
    };
    app.layer(middleware::from_fn(move |request: Request, next: Next| {
        let key = key.clone();
        async move {
            let open = match request.uri().path() {
                "/health" | "/live" => true,
                "/metrics" => !protect_metrics,
                _ => false,
            };
            if open || presented(&request).is_some_and(|p| key.matches(p)) {
                return next.run(request).await;
            }
            refusal(presented(&request).is_some())
        }
    }))
}

/// The bearer token of the request's `Authorization` header.
fn presented(request: &Request) -> Option<&[u8]> {
    let value = request.headers().get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| token.trim_ascii())
}

fn refusal(sent_one: bool) -> Response {
    let message = if sent_one {
        "Incorrect API key provided. Send the key the server was started with (--api-key or DYNAMO_API_KEY)."
    } else {
        "No API key provided. Send `Authorization: Bearer KEY` with the key the server was started with."
    };
    ApiError::unauthorized(message).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_cannot_travel_in_a_header_are_refused() {
        assert!(ApiKey::new("").is_err());
        assert!(ApiKey::new("  ").is_err());
        assert!(ApiKey::new("two words").is_err());
        assert!(ApiKey::new("ключ").is_err());
        let key = ApiKey::new(" sk-123 ").unwrap();
        assert!(key.matches(b"sk-123"));
        assert!(!key.matches(b"sk-124"));
        assert!(!key.matches(b"sk-1234"));
        assert!(!key.matches(b""));
        assert_eq!(format!("{key:?}"), "ApiKey(…)");
    }
}
