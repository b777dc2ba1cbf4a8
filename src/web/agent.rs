//! The endpoints pull agents (`kiln agent`) call: the next part a host is
//! to play in a running deployment (long-polled), and the reports of each
//! step, which land on the host's row as if Kiln had taken the step
//! itself. A host's agent presents the token of `[deploy]
//! agent_token_files.<host>`; it can read and report that host only, and
//! only while the deployment is running and the host's part is open.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{AppState, WebError, auth};
use crate::db::deployment_hosts as dh;
use crate::db::{api_tokens, deployments, environments};
use crate::deploy::agent::{Assignment, Report};

/// How long `next` holds a request open when there is nothing to do.
const LONG_POLL: Duration = Duration::from_secs(25);

/// The presented token must be `host`'s agent token.
fn check_agent(s: &AppState, host: &str, headers: &HeaderMap) -> Result<(), WebError> {
    let presented = auth::presented(headers).ok_or(WebError::Unauthorized)?;
    let Some(file) = s.config.deploy.agent_token_files.get(host) else {
        return Err(WebError::Unauthorized);
    };
    // Read each time, so a rotated file takes effect without a restart.
    let expected = crate::config::read_secret(file).map_err(|e| {
        tracing::error!(host, error = %e, "cannot read an agent's token file");
        WebError::Internal("cannot read the agent's token file".into())
    })?;
    if api_tokens::digest(&presented) != api_tokens::digest(&expected) {
        return Err(WebError::Unauthorized);
    }
    Ok(())
}

/// The environment's declaration of `host`, if it is a pull host there.
async fn pull_host(
    s: &AppState,
    environment_id: i64,
    host: &str,
) -> Result<Option<(crate::deploy::spec::Environment, crate::deploy::spec::Host)>, WebError> {
    let mut c = s.db.conn().await?;
    let Some(env) = environments::get_by_id(c.ex(), environment_id).await? else { return Ok(None) };
    let spec = env.spec()?;
    Ok(spec.hosts.get(host).filter(|h| h.pull).cloned().map(|h| (spec, h)))
}

async fn assignment(s: &AppState, host: &str) -> Result<Option<Assignment>, WebError> {
    let parts = {
        let mut c = s.db.conn().await?;
        dh::for_agent(c.ex(), host).await?
    };
    for (environment_id, row) in parts {
        let Some((spec, h)) = pull_host(s, environment_id, host).await? else { continue };
        return Ok(Some(Assignment {
            checks: spec.checks_of(host),
            confirm_timeout_s: spec.confirm_timeout_s,
            activate_timeout_s: s.config.deploy.activate_timeout_s,
            substituter: Some((s.config.deploy_cache_url(), s.public_key.to_string())),
            host: h,
            row,
        }));
    }
    Ok(None)
}

/// `GET /api/agent/{host}/next`: the host's part, or 204 after the long-poll.
pub async fn next(
    State(s): State<AppState>,
    Path(host): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    check_agent(&s, &host, &headers)?;
    let deadline = Instant::now() + LONG_POLL;
    loop {
        if let Some(a) = assignment(&s, &host).await? {
            return Ok(Json(a).into_response());
        }
        if Instant::now() >= deadline {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Statuses an agent may report.
const REPORTABLE: [&str; 6] =
    [dh::CHECKING, dh::SUCCEEDED, dh::SKIPPED, dh::FAILED, dh::ROLLED_BACK, dh::ROLLBACK_FAILED];

/// `POST /api/agent/{host}/deployment/{id}`: one step of the host's part.
pub async fn report(
    State(s): State<AppState>,
    Path((host, id)): Path<(String, i64)>,
    headers: HeaderMap,
    body: Result<Json<Report>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, WebError> {
    check_agent(&s, &host, &headers)?;
    let Json(report) = body.map_err(|e| WebError::BadRequest(format!("not a report: {}", e.body_text())))?;
    let mut c = s.db.conn().await?;
    let d = deployments::get(c.ex(), id).await?.ok_or_else(|| WebError::NotFound(format!("deployment {id}")))?;
    let row =
        dh::get(c.ex(), id, &host).await?.ok_or_else(|| WebError::NotFound(format!("{host} in deployment {id}")))?;
    drop(c);
    if pull_host(&s, d.environment_id, &host).await?.is_none() {
        return Err(WebError::Forbidden(format!("{host} is not a pull host of this deployment's environment")));
    }
    if d.status != deployments::RUNNING || row.is_done() {
        return Err(WebError::Conflict(format!(
            "Kiln has ended this part: the deployment is {}, {host} is {}{}",
            d.status,
            row.status,
            row.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
        )));
    }
    if row.status == dh::WAITING && matches!(report, Report::Checks { .. }) {
        return Err(WebError::Conflict(format!("{host} has not begun its switch")));
    }
    let mut c = s.db.conn().await?;
    let answer = match report {
        Report::Log { text } => {
            dh::append_log(c.ex(), id, &host, &text).await?;
            serde_json::json!({})
        }
        Report::Begin { current, work_dir } => {
            if !work_dir.starts_with('/') {
                return Err(WebError::BadRequest("work_dir must be an absolute path".into()));
            }
            let r = dh::begin_switch(c.ex(), id, &host, current.as_deref(), &work_dir).await?;
            let r = r.ok_or_else(|| WebError::Conflict(format!("Kiln has ended {host}'s part")))?;
            serde_json::json!({ "previous_path": r.previous_path })
        }
        Report::Status { status, error } => {
            if !REPORTABLE.contains(&status.as_str()) {
                return Err(WebError::BadRequest(format!("{status:?} is not a status an agent reports")));
            }
            let open = [dh::WAITING, dh::SWITCHING, dh::CHECKING, dh::ROLLING_BACK];
            if !dh::set_status_if(c.ex(), id, &host, &open, &status, error.as_deref()).await? {
                return Err(WebError::Conflict(format!("Kiln has ended {host}'s part")));
            }
            serde_json::json!({})
        }
        Report::Checks { checks } => {
            dh::set_checks(c.ex(), id, &host, &serde_json::to_string(&checks).expect("serialises")).await?;
            serde_json::json!({})
        }
    };
    drop(c);
    s.events.deployment_changed(id);
    Ok(Json(answer).into_response())
}
