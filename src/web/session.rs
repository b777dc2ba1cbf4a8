//! Signing in to the web UI: a user proves they hold an API token once
//! (`POST /login`), and gets a session cookie signed with a key of Kiln's
//! own (`<state_dir>/keys/session.key`). Forms that change anything carry
//! a CSRF token derived from the session, which another site cannot know.

use std::path::Path;

use axum::http::{HeaderMap, header};
use hmac::{KeyInit, Mac};
use sha2::Sha256;

pub const COOKIE: &str = "kiln_session";
/// How long a sign-in lasts.
pub const LIFETIME_S: i64 = 7 * 86400;

#[derive(Clone)]
pub struct SessionKey([u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(…)")
    }
}

impl SessionKey {
    /// Loads the key, making it (mode 0600) on first use.
    pub fn load_or_create(path: &Path) -> std::io::Result<SessionKey> {
        if let Ok(bytes) = std::fs::read(path)
            && let Ok(k) = <[u8; 32]>::try_from(bytes.as_slice())
        {
            return Ok(SessionKey(k));
        }
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| std::io::Error::other(e.to_string()))?;
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
        f.write_all(&k)?;
        Ok(SessionKey(k))
    }

    fn mac(&self, msg: &str) -> String {
        let mut m = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("any key length");
        m.update(msg.as_bytes());
        crate::nix::hash::to_hex(&m.finalize().into_bytes())
    }

    /// A cookie value for the holder of token `token_id`.
    pub fn issue(&self, token_id: i64, now: i64) -> String {
        let body = format!("{token_id}.{}", now + LIFETIME_S);
        format!("{body}.{}", self.mac(&body))
    }

    /// The token id of a valid, unexpired session value.
    pub fn check(&self, value: &str, now: i64) -> Option<i64> {
        let (body, mac) = value.rsplit_once('.')?;
        let (id, expiry) = body.split_once('.')?;
        let expected = self.mac(body);
        // Constant time: the comparison must not leak a prefix.
        let same =
            expected.len() == mac.len() && expected.bytes().zip(mac.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
        (same && expiry.parse::<i64>().ok()? > now).then(|| id.parse().ok()).flatten()
    }

    /// The CSRF token that goes with a session value.
    pub fn csrf(&self, session: &str) -> String {
        self.mac(&format!("csrf:{session}"))[..32].to_string()
    }
}

/// The session cookie's value in a request, if any.
pub fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_signed_expire_and_have_their_own_csrf() {
        let d = tempfile::tempdir().unwrap();
        let k = SessionKey::load_or_create(&d.path().join("keys/session.key")).unwrap();
        let again = SessionKey::load_or_create(&d.path().join("keys/session.key")).unwrap();
        let v = k.issue(7, 1000);
        assert_eq!(again.check(&v, 1001), Some(7));
        assert_eq!(k.check(&v, 1000 + LIFETIME_S + 1), None, "expired");
        let forged = v.replacen("7.", "8.", 1);
        assert_eq!(k.check(&forged, 1001), None);
        let other = SessionKey::load_or_create(&d.path().join("other.key")).unwrap();
        assert_eq!(other.check(&v, 1001), None);
        assert_ne!(k.csrf(&v), k.csrf(&k.issue(8, 1000)));
    }
}
