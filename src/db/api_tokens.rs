//! The `api_tokens` table: bearer tokens that may use write endpoints,
//! stored only as sha256 digests. Tokens from `api_token_files` are synced
//! in at start (source `file`), so removing a file revokes its token.

use serde::Serialize;

use super::{Ex, Result, now, run};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ApiToken {
    pub id: i64,
    pub name: String,
    pub token_sha256: String,
    pub source: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

pub fn digest(token: &str) -> String {
    crate::nix::Hash::sha256(token.as_bytes()).to_hex()
}

pub async fn add(ex: Ex<'_>, name: &str, token: &str, source: &str) -> Result<()> {
    run!(ex, c => sqlx::query(
        "INSERT INTO api_tokens (name, token_sha256, source, created_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (token_sha256) DO UPDATE SET name = excluded.name, source = excluded.source")
        .bind(name).bind(digest(token)).bind(source).bind(now()).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Replaces the file-sourced tokens with `tokens` (name, token).
pub async fn sync_from_files(mut ex: Ex<'_>, tokens: &[(String, String)]) -> Result<()> {
    run!(ex.re(), c => sqlx::query("DELETE FROM api_tokens WHERE source = 'file'").execute(&mut *c).await?.rows_affected());
    for (name, token) in tokens {
        add(ex.re(), name, token, "file").await?;
    }
    Ok(())
}

/// The token's record if `token` is valid; marks it used.
pub async fn check(mut ex: Ex<'_>, token: &str) -> Result<Option<ApiToken>> {
    let d = digest(token);
    let found: Option<ApiToken> = run!(ex.re(), c => sqlx::query_as(
        "SELECT id, name, token_sha256, source, created_at, last_used_at FROM api_tokens WHERE token_sha256 = $1")
        .bind(&d).fetch_optional(&mut *c).await?);
    if found.is_some() {
        run!(ex, c => sqlx::query("UPDATE api_tokens SET last_used_at = $2 WHERE token_sha256 = $1")
            .bind(&d).bind(now()).execute(&mut *c).await?.rows_affected());
    }
    Ok(found)
}

/// The sha256 of every valid token, for checking sessions; unlike
/// [`check`], nothing is marked used.
pub async fn digests(ex: Ex<'_>) -> Result<Vec<String>> {
    Ok(run!(ex, c => sqlx::query_scalar("SELECT token_sha256 FROM api_tokens").fetch_all(&mut *c).await?))
}
