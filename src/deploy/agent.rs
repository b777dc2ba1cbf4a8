//! The pull agent (`kiln agent`): runs on a host Kiln cannot reach over
//! SSH, connects out to Kiln, waits for its next closure, and switches
//! itself with the same steps, watchdog and health checks as a push
//! deployment (`run::switch_host` on a local target), reporting each step
//! to Kiln as it happens; and, when a later wave fails under
//! `on_failure = "rollback-all"`, goes back to its previous closure. It
//! neither evaluates nor builds.
//!
//! Wire protocol (bearer token of the host, `[deploy] agent_token_files`):
//! `GET /api/agent/{host}/next` long-polls and answers an [`Assignment`]
//! or 204; `POST /api/agent/{host}/deployment/{id}` takes a [`Report`].
//! Reaching Kiln after activation is the agent's confirmation: if the new
//! configuration cut the host off, the host's watchdog rolls it back.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{Instrument, info, info_span, warn};

use super::host::{CheckResult, Ssh, Target};
use super::record::{RecordError, Recorder};
use super::run;
use super::spec::{HealthCheck, Host};
use crate::db::deployment_hosts::{self as dh, HostRow};

/// A host's part in a running deployment, as its agent gets it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    pub row: HostRow,
    pub host: Host,
    pub checks: Vec<HealthCheck>,
    pub confirm_timeout_s: u64,
    pub activate_timeout_s: u64,
    /// Where the closure comes from: (cache URL, its public key).
    pub substituter: Option<(String, String)>,
}

/// One step, reported by the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Report {
    Log {
        text: String,
    },
    /// Before the host changes: what it runs now and where this attempt
    /// keeps its files. Answered with `{"previous_path": …}`.
    Begin {
        current: Option<String>,
        work_dir: String,
    },
    Status {
        status: String,
        error: Option<String>,
    },
    Checks {
        checks: Vec<CheckResult>,
    },
}

/// Talks to Kiln for one host.
#[derive(Clone)]
pub struct Reporter {
    client: reqwest::Client,
    server: String,
    host: String,
    token: String,
}

impl Reporter {
    pub fn new(server: &str, host: &str, token: String) -> Reporter {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client with rustls builds");
        Reporter { client, server: server.trim_end_matches('/').to_string(), host: host.to_string(), token }
    }

    /// Sends `report` about deployment `id`, retrying what may pass
    /// (connection errors, 5xx) for `patience`; a 4xx is final.
    pub async fn report(&self, id: i64, report: &Report, patience: Duration) -> Result<serde_json::Value, RecordError> {
        let url = format!("{}/api/agent/{}/deployment/{id}", self.server, self.host);
        let body = serde_json::to_vec(report).expect("reports serialise");
        let deadline = Instant::now() + patience;
        let mut wait = Duration::from_millis(500);
        loop {
            let sent = self
                .client
                .post(&url)
                .bearer_auth(&self.token)
                .header("content-type", "application/json")
                .timeout(Duration::from_secs(30))
                .body(body.clone())
                .send()
                .await;
            let why = match sent {
                Ok(r) if r.status().is_success() => {
                    let bytes = r.bytes().await.map_err(|e| RecordError::Report(e.to_string()))?;
                    return Ok(serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null));
                }
                Ok(r) if r.status().is_client_error() => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    return Err(RecordError::Report(format!("Kiln refused it ({status}): {}", text.trim())));
                }
                Ok(r) => format!("Kiln answered {}", r.status()),
                Err(e) => e.to_string(),
            };
            if Instant::now() + wait > deadline {
                return Err(RecordError::Report(why));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
        }
    }

    /// The host's next part to play, after waiting up to Kiln's long-poll.
    pub async fn next(&self) -> Result<Option<Assignment>, String> {
        let url = format!("{}/api/agent/{}/next", self.server, self.host);
        let r = self
            .client
            .get(&url)
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(90))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let bytes = r.bytes().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("Kiln answered {status}: {}", String::from_utf8_lossy(&bytes).trim()));
        }
        serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("an assignment Kiln sent cannot be read: {e}"))
    }
}

/// Runs the agent until `stop` resolves.
pub async fn run(reporter: Reporter, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    info!(server = %reporter.server, host = %reporter.host, "agent waiting for deployments");
    loop {
        let next = tokio::select! {
            _ = &mut stop => return,
            n = reporter.next() => n,
        };
        match next {
            Ok(Some(a)) => {
                let id = a.row.deployment_id;
                let span = info_span!("deployment", deployment = id);
                // A switch is not interrupted by `stop`: the host would be
                // left mid-activation with nobody to confirm it.
                match switch(&reporter, a).instrument(span).await {
                    Ok(status) => info!(deployment = id, status, "part done"),
                    Err(e) => {
                        warn!(deployment = id, error = %e, "part interrupted; it resumes when Kiln is reached");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "cannot reach Kiln; trying again");
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    }
}

/// Plays one part on this host.
async fn switch(reporter: &Reporter, a: Assignment) -> Result<String, RecordError> {
    let rec = Recorder::Server(reporter.clone());
    // Local commands open no connection; the settings are unused.
    let ssh = Ssh { dir: std::path::PathBuf::new(), key: None, connect_timeout: Duration::from_secs(10) };
    let sw = run::Switch {
        ssh: &ssh,
        rec: &rec,
        activate_timeout: Duration::from_secs(a.activate_timeout_s),
        substituter: a.substituter.as_ref().map(|(u, k)| (u.as_str(), k.as_str())),
    };
    let t = Target::local(&a.row.host);
    let (id, host) = (a.row.deployment_id, a.row.host.as_str());
    if a.row.status == dh::ROLLING_BACK {
        // A later wave failed: back to the previous closure, as Kiln
        // rolls back a push host.
        let Some(prev) = &a.row.previous_path else {
            rec.set(id, host, dh::ROLLBACK_FAILED, Some("no previous closure recorded")).await?;
            return Ok(dh::ROLLBACK_FAILED.to_string());
        };
        let status = run::later_wave_roll_back(&sw, &a.host, &t, id, host, prev).await?;
        return Ok(status.to_string());
    }
    run::switch_host(&sw, &a.host, &t, a.confirm_timeout_s, &a.checks, id, &a.row).await
}
