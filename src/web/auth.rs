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

/// The token of an upload: a bearer token, or the password of HTTP Basic
/// auth, which is what Nix sends from its `netrc-file`.
pub fn presented_upload(headers: &HeaderMap) -> Option<String> {
    if let Some(t) = presented(headers) {
        return Some(t);
    }
    use base64::Engine;
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (_, password) = text.split_once(':')?;
    Some(password.to_string()).filter(|p| !p.is_empty())
}

/// Checks an upload's credentials (bearer or Basic).
pub async fn require_upload(state: &AppState, headers: &HeaderMap) -> Result<ApiToken, WebError> {
    let token = presented_upload(headers).ok_or(WebError::UnauthorizedBasic)?;
    let mut c = state.db.conn().await?;
    api_tokens::check(c.ex(), &token).await?.ok_or(WebError::UnauthorizedBasic)
}

/// Checks that the request carries a valid token.
pub async fn require(state: &AppState, headers: &HeaderMap) -> Result<ApiToken, WebError> {
    let token = presented(headers).ok_or(WebError::Unauthorized)?;
    let mut c = state.db.conn().await?;
    api_tokens::check(c.ex(), &token).await?.ok_or(WebError::Unauthorized)
}
