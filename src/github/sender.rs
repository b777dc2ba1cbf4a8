//! Delivers the outbox's commit statuses (and check runs, see `checks`,
//! and deployment states, see `deployments`) to GitHub. Messages go oldest
//! first; a newer status for a context supersedes an undelivered older one
//! when it is written, so only the latest state of each context is sent,
//! and a context's messages are never sent out of order (one at a time,
//! in id order, and a failed one holds back the later ones of its commit).
//! Network errors and 5xx are retried with exponential backoff; `403` or
//! `429` with `Retry-After` or an exhausted `X-RateLimit-Remaining` pause
//! all sending until GitHub allows it again; other 4xx give up with the
//! reason logged and kept on the message. A delivery that takes longer
//! than `github.timeout_s` (a connection that never answers, or answers
//! a byte at a time) counts as a network error, so one stalled request
//! delays the others by that long at most. Everything is in the database,
//! so a restart carries on where the last run stopped.

use std::collections::HashSet;
use std::time::Duration;

use http_body_util::BodyExt;
use tracing::{debug, info, warn};

use crate::db::{Db, DbError, now, outbox};

use super::statuses::{KIND, Status};
use super::{Credentials, Repo};

/// How often the outbox is looked at when nothing is due.
const POLL: Duration = Duration::from_millis(500);
/// Retries of a 5xx or network error stop growing apart here.
const MAX_BACKOFF_S: i64 = 600;
/// After this many failed attempts a message is given up.
const MAX_ATTEMPTS: i64 = 30;
/// The longest pause a rate limit may impose before we look again.
const MAX_PAUSE_S: i64 = 3600;

/// What one attempt came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again later (5xx, network): after the backoff.
    Retry(String),
    /// Rate limited: nothing is sent before `until` (Unix seconds).
    Paused {
        until: i64,
        reason: String,
    },
    /// Refused for good (4xx): the reason.
    GiveUp(String),
}

/// Runs until `stop`: queues deployments' new states (`base_url` for
/// their links) and sends what is due.
pub async fn run(db: Db, creds: Credentials, base_url: String, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let mut paused_until = 0i64;
    loop {
        if let Err(e) = super::deployments::report_changes(&db, &base_url).await {
            warn!(error = %e, "cannot queue deployment states for GitHub");
        }
        let wait = match send_due(&db, &creds, &mut paused_until).await {
            Ok(0) => POLL,
            Ok(_) => Duration::ZERO,
            Err(e) => {
                warn!(error = %e, "status outbox");
                POLL * 4
            }
        };
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Sends every due message once; returns how many it tried.
pub async fn send_due(db: &Db, creds: &Credentials, paused_until: &mut i64) -> Result<usize, DbError> {
    let t = now();
    if t < *paused_until {
        return Ok(0);
    }
    let due = {
        let mut c = db.conn().await?;
        outbox::due(c.ex(), t, 100).await?
    };
    // A commit whose earlier message failed now waits: its later ones
    // would otherwise overtake it.
    let mut held: HashSet<String> = HashSet::new();
    let mut tried = 0;
    for m in due {
        if !matches!(m.kind.as_str(), KIND | super::deployments::KIND | super::checks::KIND) || held.contains(&m.target)
        {
            continue;
        }
        tried += 1;
        let unreadable = |e: serde_json::Error| format!("unreadable payload: {e}");
        let (state, attempt) = if m.kind == super::checks::KIND {
            match serde_json::from_str::<super::checks::CheckRun>(&m.payload) {
                Ok(r) => (
                    r.conclusion.clone().unwrap_or_else(|| r.status.clone()),
                    Ok(Box::pin(async move { super::checks::deliver(db, creds, &r).await }) as Attempt<'_>),
                ),
                Err(e) => (String::new(), Err(unreadable(e))),
            }
        } else if m.kind == KIND {
            match serde_json::from_str::<Status>(&m.payload) {
                Ok(s) => (s.state.clone(), Ok(Box::pin(async move { Ok(deliver(creds, &s).await) }) as Attempt<'_>)),
                Err(e) => (String::new(), Err(unreadable(e))),
            }
        } else {
            match serde_json::from_str::<super::deployments::State>(&m.payload) {
                Ok(s) => (
                    s.state.clone(),
                    Ok(Box::pin(async move { super::deployments::deliver(db, creds, &s).await }) as Attempt<'_>),
                ),
                Err(e) => (String::new(), Err(unreadable(e))),
            }
        };
        let attempt = match attempt {
            Ok(a) => a,
            Err(why) => {
                let mut c = db.conn().await?;
                outbox::give_up(c.ex(), m.id, &why).await?;
                continue;
            }
        };
        let outcome = match tokio::time::timeout(creds.timeout(), attempt).await {
            Ok(o) => o?,
            Err(_) => Outcome::Retry(format!("GitHub did not answer within {} s", creds.timeout().as_secs())),
        };
        let mut c = db.conn().await?;
        match outcome {
            Outcome::Delivered => {
                outbox::mark_delivered(c.ex(), m.id).await?;
                debug!(target = %m.target, context = %m.context, state = %state, "status delivered");
            }
            Outcome::Retry(why) => {
                let backoff = (1i64 << m.attempts.clamp(0, 20)).min(MAX_BACKOFF_S);
                if m.attempts + 1 >= MAX_ATTEMPTS {
                    warn!(target = %m.target, context = %m.context, error = %why, "status given up after retries");
                    outbox::give_up(c.ex(), m.id, &why).await?;
                } else {
                    info!(target = %m.target, context = %m.context, error = %why, retry_in_s = backoff, "status will be retried");
                    outbox::mark_failed(c.ex(), m.id, &why, now() + backoff).await?;
                    held.insert(m.target.clone());
                }
            }
            Outcome::Paused { until, reason } => {
                let until = until.min(now() + MAX_PAUSE_S);
                warn!(until, reason = %reason, "GitHub rate limit: statuses paused");
                outbox::postpone(c.ex(), m.id, &reason, until).await?;
                *paused_until = until;
                return Ok(tried);
            }
            Outcome::GiveUp(why) => {
                warn!(target = %m.target, context = %m.context, error = %why, "GitHub refused the status");
                outbox::give_up(c.ex(), m.id, &why).await?;
            }
        }
    }
    Ok(tried)
}

/// One delivery in flight, of either kind.
type Attempt<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Outcome, DbError>> + Send + 'a>>;

/// Posts one status and classifies the answer.
pub async fn deliver(creds: &Credentials, s: &Status) -> Outcome {
    let repo = Repo { owner: s.owner.clone(), name: s.repo.clone() };
    let client = match creds.client(&repo).await {
        Ok(c) => c,
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    let route = format!("/repos/{}/{}/statuses/{}", s.owner, s.repo, s.sha);
    let body = serde_json::json!({
        "state": s.state,
        "target_url": s.target_url,
        "description": s.description,
        "context": s.context,
    });
    let resp = match client._post(route, Some(&body)).await {
        Ok(r) => r,
        Err(e) => return Outcome::Retry(format!("cannot reach GitHub: {e}")),
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = match resp.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).chars().take(300).collect::<String>(),
        Err(_) => String::new(),
    };
    classify(status, &headers, &text, now())
}

/// Sends one JSON request (POST or PATCH) to GitHub: its status, headers
/// and body, or why GitHub could not be reached.
pub async fn request(
    client: &octocrab::Octocrab,
    method: http::Method,
    route: String,
    body: &serde_json::Value,
) -> Result<(u16, http::HeaderMap, String), String> {
    let resp = if method == http::Method::PATCH {
        client._patch(route, Some(body)).await
    } else {
        client._post(route, Some(body)).await
    }
    .map_err(|e| format!("cannot reach GitHub: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = match resp.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    Ok((status, headers, text))
}

/// GitHub's answer, as what to do next.
pub fn classify(status: u16, headers: &http::HeaderMap, body: &str, at: i64) -> Outcome {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    match status {
        200..=299 => Outcome::Delivered,
        403 | 429 => {
            let retry_after = header("retry-after").and_then(|v| v.parse::<i64>().ok());
            let exhausted = header("x-ratelimit-remaining") == Some("0");
            let reset = header("x-ratelimit-reset").and_then(|v| v.parse::<i64>().ok());
            if let Some(s) = retry_after {
                Outcome::Paused { until: at + s.max(1), reason: format!("{status}, Retry-After {s} s") }
            } else if exhausted && let Some(r) = reset {
                Outcome::Paused { until: r.max(at + 1), reason: format!("{status}, rate limit resets at {r}") }
            } else if status == 429 || body.to_lowercase().contains("rate limit") {
                // A secondary limit without a hint: GitHub asks for at least a minute.
                Outcome::Paused { until: at + 60, reason: format!("{status}: {body}") }
            } else {
                Outcome::GiveUp(format!("{status}: {body}"))
            }
        }
        500..=599 => Outcome::Retry(format!("{status}: {body}")),
        _ => Outcome::GiveUp(format!("{status}: {body}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut m = http::HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn answers_are_classified_as_github_documents_them() {
        assert_eq!(classify(201, &h(&[]), "", 100), Outcome::Delivered);
        assert!(matches!(classify(502, &h(&[]), "bad gateway", 100), Outcome::Retry(_)));
        assert_eq!(
            classify(429, &h(&[("retry-after", "7")]), "", 100),
            Outcome::Paused { until: 107, reason: "429, Retry-After 7 s".into() }
        );
        assert!(matches!(
            classify(403, &h(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "500")]), "", 100),
            Outcome::Paused { until: 500, .. }
        ));
        assert!(matches!(
            classify(403, &h(&[]), "You have exceeded a secondary rate limit", 100),
            Outcome::Paused { until: 160, .. }
        ));
        assert!(matches!(classify(403, &h(&[]), "Resource not accessible by integration", 100), Outcome::GiveUp(_)));
        assert!(matches!(classify(422, &h(&[]), "Validation Failed", 100), Outcome::GiveUp(_)));
        assert!(matches!(classify(404, &h(&[]), "Not Found", 100), Outcome::GiveUp(_)));
    }
}
