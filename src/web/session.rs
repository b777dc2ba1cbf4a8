//! Signing in to the web UI: a user proves they hold an API token once
//! (`POST /login`), and gets a session cookie signed with a key of Kiln's
//! own (`<state_dir>/keys/session.key`). The cookie names its token by a
//! keyed digest, and a session counts only while that token is one Kiln
//! knows: a token changed or deleted in its file ends its sessions when
//! Kiln reads the files again (every two seconds, see `serve`). Forms that change anything carry a
//! CSRF token derived from the session, which another site cannot know.

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

    /// A cookie value for the holder of the token whose sha256 is
    /// `token_sha256`.
    pub fn issue(&self, token_sha256: &str, now: i64) -> String {
        let body = format!("{}.{}", self.binding(token_sha256), now + LIFETIME_S);
        format!("{body}.{}", self.mac(&body))
    }

    /// What a session keeps of its token: a keyed digest of the token's
    /// digest. Not the token's id (ids change when tokens are reloaded),
    /// nor its plain sha256, which a stolen cookie would let one test
    /// guessed tokens against.
    fn binding(&self, token_sha256: &str) -> String {
        self.mac(&format!("token:{token_sha256}"))[..32].to_string()
    }

    /// The token binding of a valid, unexpired session value; whether its
    /// token is still configured is [`SessionKey::of_token`]'s question.
    pub fn check(&self, value: &str, now: i64) -> Option<String> {
        let (body, mac) = value.rsplit_once('.')?;
        let (binding, expiry) = body.split_once('.')?;
        let expected = self.mac(body);
        // Constant time: the comparison must not leak a prefix.
        let same =
            expected.len() == mac.len() && expected.bytes().zip(mac.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
        (same && expiry.parse::<i64>().ok()? > now).then(|| binding.to_string())
    }

    /// Whether a session's `binding` (from [`SessionKey::check`]) is that
    /// of one of the tokens whose sha256 digests are `token_sha256s`.
    pub fn of_token<'a>(&self, binding: &str, token_sha256s: impl IntoIterator<Item = &'a str>) -> bool {
        token_sha256s.into_iter().any(|d| self.binding(d) == binding)
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

/// Removes the session cookie from a request, keeping any others.
pub fn drop_cookie(headers: &mut HeaderMap) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| !kv.is_empty() && kv.split_once('=').is_none_or(|(k, _)| k != COOKIE))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = kept.join("; ").parse()
    {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_signed_expire_belong_to_their_token_and_have_their_own_csrf() {
        let d = tempfile::tempdir().unwrap();
        let k = SessionKey::load_or_create(&d.path().join("keys/session.key")).unwrap();
        let again = SessionKey::load_or_create(&d.path().join("keys/session.key")).unwrap();
        let (a, b) = ("aa".repeat(32), "bb".repeat(32));
        let v = k.issue(&a, 1000);
        let binding = again.check(&v, 1001).expect("a valid session");
        assert!(k.of_token(&binding, [b.as_str(), a.as_str()]));
        assert!(!k.of_token(&binding, [b.as_str()]), "its token is gone");
        assert!(!v.contains(&a), "the cookie does not carry the token's digest");
        assert_eq!(k.check(&v, 1000 + LIFETIME_S + 1), None, "expired");
        let forged = format!("{}{}", k.issue(&b, 1000).split('.').next().unwrap(), &v[v.find('.').unwrap()..]);
        assert_eq!(k.check(&forged, 1001), None);
        let other = SessionKey::load_or_create(&d.path().join("other.key")).unwrap();
        assert_eq!(other.check(&v, 1001), None);
        assert_ne!(k.csrf(&v), k.csrf(&k.issue(&b, 1000)));
    }

    #[test]
    fn dropping_the_session_cookie_keeps_the_others() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; kiln_session=x.y.z".parse().unwrap());
        h.append(header::COOKIE, "b=2".parse().unwrap());
        drop_cookie(&mut h);
        assert_eq!(cookie(&h), None);
        assert_eq!(h.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1; b=2"]);
        let mut only = HeaderMap::new();
        only.insert(header::COOKIE, "kiln_session=x.y.z".parse().unwrap());
        drop_cookie(&mut only);
        assert!(only.get(header::COOKIE).is_none());
    }
}
