//! `kiln deploy`, the break-glass path when the web UI cannot be reached:
//! finds an environment by name, and runs one of its deployments in this
//! process (taking the environment's lease like a server) or, when a
//! running server holds the environment, follows that server's run of it
//! in the database; either way it hands each change as a line of text to
//! the caller, which prints it.

use std::time::Duration;

use thiserror::Error;

use super::Deployer;
use super::progress::Progress;
use super::record::RecordError;
use crate::db::environments::{self, Environment};
use crate::db::{Db, DbError, deployment_hosts, deployments};

#[derive(Debug, Error)]
pub enum CliError {
    /// No such environment, or the name is in several projects.
    #[error("{0}")]
    Name(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// The environment named `name` (`ENV` or `PROJECT/ENV`), with its project's name.
pub async fn find(db: &Db, name: &str) -> Result<(String, Environment), CliError> {
    let all = {
        let mut c = db.conn().await?;
        environments::list(c.ex()).await?
    };
    let matching: Vec<&(String, Environment)> = all
        .iter()
        .filter(|(project, env)| match name.split_once('/') {
            Some((p, e)) => p == project && e == env.name,
            None => env.name == name,
        })
        .collect();
    let names = |list: &mut dyn Iterator<Item = &(String, Environment)>| {
        list.map(|(p, e)| format!("{p}/{}", e.name)).collect::<Vec<_>>().join(", ")
    };
    match matching.as_slice() {
        [one] => Ok((*one).clone()),
        [] => {
            let known = names(&mut all.iter());
            Err(CliError::Name(format!(
                "no environment {name:?}; the default branches declare: {}",
                if known.is_empty() { "none" } else { &known }
            )))
        }
        many => Err(CliError::Name(format!("{name:?} is ambiguous: {}", names(&mut many.iter().copied())))),
    }
}

/// Runs deployment `id` of environment `environment_id` here, or follows
/// the process that holds the environment, until it ends; `line` gets
/// each host's status changes and log lines as they come. Returns the
/// deployment as it ended.
pub async fn run_and_follow(
    deployer: &Deployer,
    db: &Db,
    environment_id: i64,
    id: i64,
    mut line: impl FnMut(&str),
) -> Result<deployments::Deployment, CliError> {
    let mut runner = std::pin::pin!(deployer.run_here(environment_id, id));
    let mut running = true;
    let mut progress = Progress::default();
    loop {
        let (d, rows) = {
            let mut c = db.conn().await?;
            (deployments::get(c.ex(), id).await?, deployment_hosts::of_deployment(c.ex(), id).await?)
        };
        for l in progress.lines(&rows) {
            line(&l);
        }
        match d {
            Some(d) if d.is_open() => {}
            Some(d) => return Ok(d),
            None => return Err(CliError::Name(format!("deployment {id} is gone"))),
        }
        let tick = tokio::time::sleep(Duration::from_millis(300));
        if running {
            tokio::select! {
                r = &mut runner => {
                    running = false;
                    if !r? {
                        line("a running Kiln holds the environment: following its progress");
                    }
                }
                _ = tick => {}
            }
        } else {
            tick.await;
        }
    }
}
