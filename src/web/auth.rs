//! Who may write: a bearer token (`Authorization: Bearer <token>`) that is
//! one of the configured `api_token_files`. Tokens are compared by their
//! sha256 in the database, never stored or logged in clear.

use axum::http::{HeaderMap, header};

use super::{AppState, WebError};
use crate::db::api_tokens::{self, ApiToken};

/// The token presented with the request, if any.
pub fn presented(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim().to_string()).filter(|t| !t.is_empty())
}

/// Checks that the request carries a valid token.
pub async fn require(state: &AppState, headers: &HeaderMap) -> Result<ApiToken, WebError> {
    let token = presented(headers).ok_or(WebError::Unauthorized)?;
    let mut c = state.db.conn().await?;
    api_tokens::check(c.ex(), &token).await?.ok_or(WebError::Unauthorized)
}
