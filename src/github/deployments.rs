//! Kiln's deployments as GitHub deployments (the Deployments API): each
//! deployment of a project on GitHub becomes a GitHub deployment of the
//! evaluation's commit to the environment, and each status it takes
//! becomes a deployment status with a link to its page. The reporter
//! queues a message in the outbox whenever a deployment's status differs
//! from the last one queued (in one transaction with noting it, so none is
//! lost or sent twice across restarts); the sender creates the GitHub
//! deployment when it first delivers one and posts the status. Only the
//! newest state of a deployment is sent: a newer one supersedes an older
//! undelivered message.

use serde::{Deserialize, Serialize};

use crate::db::{Db, DbError, deployments, environments, evaluations, now, outbox, projects};

use super::sender::{Outcome, classify};
use super::statuses::describe;
use super::{Credentials, Repo};

/// The outbox `kind` of a deployment's state.
pub const KIND: &str = "github_deployment";
/// Deployments older than this when the reporter first sees them are not
/// reported (GitHub was configured after them).
const HORIZON_S: i64 = 86400;

/// One state of one deployment, as queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub owner: String,
    pub repo: String,
    pub sha: String,
    pub environment: String,
    /// Kiln's deployment id.
    pub deployment: i64,
    /// GitHub's: `pending`, `queued`, `in_progress`, `success`, `failure`, `inactive`.
    pub state: String,
    pub description: String,
    pub log_url: String,
}

impl State {
    pub fn target(&self) -> String {
        format!("{}/{}#deployment-{}", self.owner, self.repo, self.deployment)
    }
}

/// GitHub's state for one of ours, with a description.
pub fn github_state(status: &str, error: Option<&str>) -> (&'static str, String) {
    match status {
        deployments::WAITING => ("pending", "waiting for Promote".into()),
        deployments::QUEUED => ("queued", "queued".into()),
        deployments::RUNNING => ("in_progress", "switching hosts".into()),
        deployments::SUCCEEDED => ("success", "every host runs it".into()),
        deployments::FAILED => ("failure", describe(error.unwrap_or("failed"))),
        deployments::SUPERSEDED => ("inactive", "superseded by a newer deployment".into()),
        _ => ("inactive", "cancelled".into()),
    }
}

/// Queues the state of every deployment whose status GitHub has not been
/// told; returns how many it queued.
pub async fn report_changes(db: &Db, base_url: &str) -> Result<usize, DbError> {
    let changed = {
        let mut c = db.conn().await?;
        deployments::unreported(c.ex(), now() - HORIZON_S, 100).await?
    };
    let mut queued = 0;
    for (id, _) in changed {
        let mut tx = db.begin().await?;
        // Read again inside the transaction: the status noted is the one sent.
        let Some(d) = deployments::get(tx.ex(), id).await? else { continue };
        if let Some(s) = state_of(&mut tx, &d, base_url).await? {
            let payload = serde_json::to_string(&s).expect("serialises");
            outbox::enqueue(tx.ex(), KIND, &s.target(), "deployment", &payload).await?;
            queued += 1;
        }
        deployments::set_github_reported(tx.ex(), id, &d.status).await?;
        tx.commit().await?;
    }
    Ok(queued)
}

/// What GitHub is told of `d`; `None` when its project is not on GitHub.
async fn state_of(
    tx: &mut crate::db::Tx,
    d: &deployments::Deployment,
    base_url: &str,
) -> Result<Option<State>, DbError> {
    let Some(env) = environments::get_by_id(tx.ex(), d.environment_id).await? else { return Ok(None) };
    let Some(project) = projects::get_by_id(tx.ex(), env.project_id).await? else { return Ok(None) };
    let Some(repo) = super::repo_of(&project) else { return Ok(None) };
    let Some(eval) = evaluations::get(tx.ex(), d.eval_id).await? else { return Ok(None) };
    let (state, description) = github_state(&d.status, d.error.as_deref());
    Ok(Some(State {
        owner: repo.owner,
        repo: repo.name,
        sha: eval.commit_sha,
        environment: env.name,
        deployment: d.id,
        state: state.into(),
        description,
        log_url: format!("{base_url}/deployment/{}", d.id),
    }))
}

/// Delivers one state: creates the GitHub deployment first if this is the
/// first of its states to get through, then posts the status.
pub async fn deliver(db: &Db, creds: &Credentials, s: &State) -> Result<Outcome, DbError> {
    let repo = Repo { owner: s.owner.clone(), name: s.repo.clone() };
    let client = match creds.client(&repo).await {
        Ok(c) => c,
        Err(e) => return Ok(Outcome::Retry(e.to_string())),
    };
    let known = {
        let mut c = db.conn().await?;
        deployments::github_id(c.ex(), s.deployment).await?
    };
    let github_id = match known {
        Some(id) => id,
        None => {
            let body = serde_json::json!({
                "ref": s.sha,
                "environment": s.environment,
                "description": format!("Kiln deployment {}", s.deployment),
                // Kiln decided it is green; GitHub is not to check again.
                "required_contexts": [],
                "auto_merge": false,
                "payload": { "kiln_deployment": s.deployment },
            });
            let route = format!("/repos/{}/{}/deployments", s.owner, s.repo);
            let (status, headers, text) = match super::sender::request(&client, http::Method::POST, route, &body).await
            {
                Ok(r) => r,
                Err(e) => return Ok(Outcome::Retry(e)),
            };
            if status != 201 {
                return Ok(classify(status, &headers, &text, now()));
            }
            let Some(id) = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["id"].as_i64()) else {
                return Ok(Outcome::GiveUp(format!("GitHub created a deployment without an id: {text}")));
            };
            let mut c = db.conn().await?;
            deployments::set_github_id(c.ex(), s.deployment, id).await?;
            id
        }
    };
    let body = serde_json::json!({
        "state": s.state,
        "log_url": s.log_url,
        "description": s.description,
        "environment": s.environment,
    });
    let route = format!("/repos/{}/{}/deployments/{github_id}/statuses", s.owner, s.repo);
    Ok(match super::sender::request(&client, http::Method::POST, route, &body).await {
        Ok((status, headers, text)) => classify(status, &headers, &text, now()),
        Err(e) => Outcome::Retry(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_maps_to_a_state_github_accepts() {
        let github = ["error", "failure", "inactive", "in_progress", "queued", "pending", "success"];
        for s in ["waiting", "queued", "running", "succeeded", "failed", "superseded", "cancelled"] {
            let (state, d) = github_state(s, Some(&"x".repeat(300)));
            assert!(github.contains(&state) && d.chars().count() <= 140, "{s} → {state}");
        }
        assert_eq!(github_state("failed", Some("wave 1 failed: a rolled-back")).1, "wave 1 failed: a rolled-back");
    }
}
