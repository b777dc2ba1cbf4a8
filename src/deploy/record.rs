//! Where a host's steps are recorded as they happen: the database, when
//! Kiln switches the host itself (push), or Kiln's server over HTTP, when
//! the host's own agent switches it (pull). The steps are the same either
//! way (`run::switch_host`); only this differs.

use std::time::Duration;

use thiserror::Error;

use super::agent::{Report, Reporter};
use super::host::CheckResult;
use crate::db::deployment_hosts as dh;
use crate::db::{Db, DbError};

#[derive(Debug, Error)]
pub enum RecordError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot report to Kiln: {0}")]
    Report(String),
}

pub enum Recorder {
    Db { db: Db, events: Option<crate::events::Events> },
    Server(Reporter),
}

/// How long a report is retried before the step gives up.
const PATIENCE: Duration = Duration::from_secs(120);

impl Recorder {
    pub fn is_agent(&self) -> bool {
        matches!(self, Recorder::Server(_))
    }

    fn changed(&self, id: i64) {
        if let Recorder::Db { events: Some(e), .. } = self {
            e.deployment_changed(id);
        }
    }

    pub async fn log(&self, id: i64, host: &str, text: &str) -> Result<(), RecordError> {
        if text.is_empty() {
            return Ok(());
        }
        match self {
            Recorder::Db { db, .. } => {
                let mut c = db.conn().await?;
                dh::append_log(c.ex(), id, host, text).await?;
            }
            Recorder::Server(r) => {
                r.report(id, &Report::Log { text: text.to_string() }, PATIENCE).await?;
            }
        }
        self.changed(id);
        Ok(())
    }

    /// Records the status; the agent tries for `patience` only.
    pub async fn set_within(
        &self,
        id: i64,
        host: &str,
        status: &str,
        error: Option<&str>,
        patience: Duration,
    ) -> Result<(), RecordError> {
        match self {
            Recorder::Db { db, .. } => {
                let mut c = db.conn().await?;
                dh::set_status(c.ex(), id, host, status, error).await?;
            }
            Recorder::Server(r) => {
                let report = Report::Status { status: status.to_string(), error: error.map(str::to_string) };
                r.report(id, &report, patience).await?;
            }
        }
        self.changed(id);
        Ok(())
    }

    pub async fn set(&self, id: i64, host: &str, status: &str, error: Option<&str>) -> Result<(), RecordError> {
        self.set_within(id, host, status, error, PATIENCE).await
    }

    /// Records what the host had and this attempt's work directory before
    /// the host changes; returns the previous closure as recorded (the
    /// first attempt's, after a restart).
    pub async fn begin_switch(
        &self,
        id: i64,
        host: &str,
        current: Option<&str>,
        work_dir: &str,
    ) -> Result<Option<String>, RecordError> {
        let previous = match self {
            Recorder::Db { db, .. } => {
                let mut c = db.conn().await?;
                dh::begin_switch(c.ex(), id, host, current, work_dir)
                    .await?
                    .ok_or_else(|| RecordError::Report(format!("{host}'s part in deployment {id} has ended")))?
                    .previous_path
            }
            Recorder::Server(r) => {
                let report = Report::Begin { current: current.map(str::to_string), work_dir: work_dir.to_string() };
                let v = r.report(id, &report, PATIENCE).await?;
                v.get("previous_path").and_then(|p| p.as_str()).map(str::to_string)
            }
        };
        self.changed(id);
        Ok(previous)
    }

    pub async fn set_checks(&self, id: i64, host: &str, checks: &[CheckResult]) -> Result<(), RecordError> {
        match self {
            Recorder::Db { db, .. } => {
                let mut c = db.conn().await?;
                dh::set_checks(c.ex(), id, host, &serde_json::to_string(checks).expect("serialises")).await?;
            }
            Recorder::Server(r) => {
                r.report(id, &Report::Checks { checks: checks.to_vec() }, PATIENCE).await?;
            }
        }
        self.changed(id);
        Ok(())
    }
}
