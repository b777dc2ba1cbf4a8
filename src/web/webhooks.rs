//! `POST /api/webhooks/github`: what GitHub sends when someone pushes or
//! opens a pull request. The body is read raw (up to
//! [`webhook::MAX_BODY`], else 413) and its signature checked before
//! anything else looks at it; the event's effect and the record of its
//! delivery id commit together. Answers: 200 with what was done (also for
//! repositories Kiln does not know, which it acknowledges and ignores), 204
//! for event types Kiln does not use, 400 for a malformed payload, 401 for
//! a missing or wrong signature, or when no webhook secret is configured
//! (nothing can be verified then).

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::{info, warn};

use super::{AppState, ErrorBody, WebError};
use crate::github::webhook::{self, Applied, Event, WebhookError};

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

#[utoipa::path(post, path = "/api/webhooks/github", tag = "github",
    description = "GitHub webhooks (push, pull_request, merge_group, check_run, check_suite, ping), signed with the configured secret.",
    params(
        ("X-GitHub-Event" = String, Header, description = "the event type"),
        ("X-GitHub-Delivery" = String, Header, description = "the delivery id; a redelivery does nothing twice"),
        ("X-Hub-Signature-256" = String, Header, description = "sha256=HMAC of the body with the webhook secret"),
    ),
    request_body(content = String, content_type = "application/json", description = "GitHub's event payload"),
    responses(
        (status = 200, description = "handled (also for unknown repositories, which are ignored)", body = Applied),
        (status = 204, description = "an event type Kiln does not use"),
        (status = 400, description = "a malformed payload or missing headers", body = ErrorBody),
        (status = 401, description = "a missing or wrong signature, or no webhook secret configured", body = ErrorBody),
        (status = 413, description = "the body is over the size limit", body = ErrorBody),
    ))]
pub async fn github(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, WebError> {
    let Some(secret) = s.webhook_secret.as_ref() else {
        return Err(WebError::Unsigned(
            "GitHub webhooks are not configured here: set github.webhook_secret_file".into(),
        ));
    };
    // Nothing of the request is trusted, or even parsed, before this.
    if let Err(e) = webhook::verify(secret.as_bytes(), &body, header(&headers, "x-hub-signature-256")) {
        warn!(error = %e, "webhook refused");
        return Err(WebError::Unsigned(e.to_string()));
    }
    let event_type = header(&headers, "x-github-event")
        .ok_or_else(|| WebError::BadRequest("missing X-GitHub-Event".into()))?
        .to_string();
    let delivery = header(&headers, "x-github-delivery")
        .filter(|d| !d.is_empty() && d.len() <= 100)
        .ok_or_else(|| WebError::BadRequest("missing X-GitHub-Delivery".into()))?
        .to_string();
    let event = match webhook::parse(&event_type, &body) {
        Ok(e) => e,
        Err(e) => return Err(WebError::BadRequest(e.to_string())),
    };
    if event == Event::Other {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    apply(&s, &delivery, &event_type, &event, None).await
}

/// Applies a verified event and tells the queue and evaluator what it did.
async fn apply(
    s: &AppState,
    delivery: &str,
    event_type: &str,
    event: &Event,
    forge: Option<&crate::forge::ForgeRef>,
) -> Result<Response, WebError> {
    let mut tx = s.db.begin().await?;
    let policy = crate::github::policy(&s.config);
    let applied = match webhook::apply(tx.ex(), delivery, event, policy.as_ref(), forge).await {
        Ok(a) => a,
        Err(WebhookError::Db(e)) => return Err(e.into()),
        Err(e) => return Err(WebError::BadRequest(e.to_string())),
    };
    tx.commit().await?;
    info!(
        event = %event_type,
        delivery = %delivery,
        duplicate = applied.duplicate,
        triggered = applied.triggered.len(),
        disabled = applied.disabled.len(),
        cancelled = applied.cancelled.len(),
        awaiting_approval = applied.awaiting_approval.len(),
        restarted = applied.restarted.len(),
        approved = ?applied.approved,
        "webhook"
    );
    // Recorded as cancelled with the event; the queue now stops what only
    // they needed (its rescan would, a little later).
    for id in &applied.cancelled {
        s.queue.cancel(*id);
    }
    for id in &applied.restarted {
        s.queue.restart(*id);
    }
    if !applied.restarted.is_empty() {
        s.queue.flush().await;
    }
    if !applied.triggered.is_empty() {
        s.evaluator.wake();
    }
    if !applied.disabled.is_empty() || !applied.awaiting_approval.is_empty() || !applied.approved.is_empty() {
        s.memo.forget();
    }
    Ok(Json(applied).into_response())
}

#[utoipa::path(post, path = "/api/webhooks/forge/{forge}", tag = "github",
    description = "Gitea and Forgejo webhooks (push, pull_request), signed with the forge's secret.",
    params(
        ("forge" = String, Path, description = "the forge's name in [[forges]]"),
        ("X-Gitea-Event" = String, Header, description = "the event type (Forgejo: X-Forgejo-Event)"),
        ("X-Gitea-Delivery" = String, Header, description = "the delivery id (Forgejo: X-Forgejo-Delivery); a redelivery does nothing twice"),
        ("X-Gitea-Signature" = String, Header, description = "hex HMAC-SHA256 of the body with the forge's webhook secret (Forgejo: X-Forgejo-Signature)"),
    ),
    request_body(content = String, content_type = "application/json", description = "the forge's event payload"),
    responses(
        (status = 200, description = "handled (also for unknown repositories, which are ignored)", body = Applied),
        (status = 204, description = "an event type Kiln does not use"),
        (status = 400, description = "a malformed payload or missing headers", body = ErrorBody),
        (status = 401, description = "a missing or wrong signature, or no webhook secret for this forge", body = ErrorBody),
        (status = 404, description = "no such forge", body = ErrorBody),
    ))]
pub async fn forge(
    State(s): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, WebError> {
    let Some(f) = s.forges.iter().find(|f| f.at.name == name) else {
        return Err(WebError::NotFound(format!("forge {name}")));
    };
    // Forgejo sends both its own headers and Gitea's.
    let h = |forgejo: &str, gitea: &str| header(&headers, forgejo).or_else(|| header(&headers, gitea));
    if let Err(e) = f.verify(&body, h("x-forgejo-signature", "x-gitea-signature")) {
        warn!(forge = %name, error = %e, "webhook refused");
        return Err(WebError::Unsigned(e.to_string()));
    }
    let event_type = h("x-forgejo-event", "x-gitea-event")
        .ok_or_else(|| WebError::BadRequest("missing X-Gitea-Event".into()))?
        .to_string();
    let delivery = h("x-forgejo-delivery", "x-gitea-delivery")
        .filter(|d| !d.is_empty() && d.len() <= 100)
        .ok_or_else(|| WebError::BadRequest("missing X-Gitea-Delivery".into()))?;
    // Delivery ids are the forge's own: kept apart from GitHub's.
    let delivery = format!("{name}:{delivery}");
    let event = crate::forge::parse(&event_type, &body).map_err(|e| WebError::BadRequest(e.to_string()))?;
    if event == Event::Other {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    apply(&s, &delivery, &event_type, &event, Some(&f.at)).await
}
