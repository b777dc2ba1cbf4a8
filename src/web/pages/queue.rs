//! The queue's and the machines' pages.

use super::*;

#[derive(Template)]
#[template(path = "queue.html")]
struct QueuePage {
    title: String,
    nav: Nav,
    running: Vec<StepLine>,
    runnable: Vec<StepLine>,
    builds: Vec<Row>,
    unfinished: i64,
}

fn step_line(st: steps::Step) -> StepLine {
    StepLine {
        drv_base: st.drv_path.trim_start_matches("/nix/store/").to_string(),
        took: st.start_time.map(|a| duration(crate::db::now() - a)).unwrap_or_default(),
        id: st.id,
        class: if st.state == "running" { "running" } else { "queued" },
        state: st.state,
        machine: st.machine.map(|m| m.split('?').next().unwrap_or("").to_string()).unwrap_or_default(),
        phase: st.phase.unwrap_or_default(),
        tries: st.tries,
    }
}

#[utoipa::path(get, path = "/queue", tag = "pages",
    responses((status = 200, description = "running and runnable steps, queued builds", content((QueueView = "application/json"), (String = "text/html")))))]
pub async fn queue(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, WebError> {
    let mut c = s.db.conn().await?;
    let running = steps::running(c.ex()).await?;
    let runnable = steps::runnable(c.ex(), 200).await?;
    let queued = builds::queued(c.ex(), 200).await?;
    let unfinished = builds::count_unfinished(c.ex()).await?;
    if wants_json(&headers) {
        return Ok(axum::Json(QueueView {
            running: running.into_iter().map(Into::into).collect(),
            runnable: runnable.into_iter().map(Into::into).collect(),
            builds: queued.into_iter().map(Into::into).collect(),
            unfinished,
        })
        .into_response());
    }
    html(QueuePage {
        nav: nav(&s, &headers),
        title: "Queue · Kiln".into(),
        running: running.into_iter().map(step_line).collect(),
        runnable: runnable.into_iter().map(step_line).collect(),
        builds: queued.into_iter().map(row).collect(),
        unfinished,
    })
}

#[derive(Template)]
#[template(path = "machines.html")]
struct MachinesPage {
    title: String,
    nav: Nav,
    machines: Vec<MachineLine>,
    machines_file: Option<String>,
    file_errors: Vec<MachineFileError>,
    outbox: crate::db::outbox::Stats,
    github: bool,
    github_problem: Option<String>,
}

/// The queue as JSON.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct QueueView {
    running: Vec<build_api::StepView>,
    /// Steps waiting for a free machine, first to be dispatched first.
    runnable: Vec<build_api::StepView>,
    /// Unfinished builds, highest priority first.
    builds: Vec<build_api::BuildSummary>,
    unfinished: i64,
}

/// The machines as JSON.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct MachinesView {
    machines: Vec<MachineLine>,
    /// The machines file the page read (none: this machine builds).
    machines_file: Option<String>,
    /// Entries of the machines file Kiln cannot use, and why.
    errors: Vec<MachineFileError>,
    /// GitHub statuses waiting to be sent.
    outbox: crate::db::outbox::Stats,
    /// What GitHub refused for want of a permission, and which to grant.
    github_problem: Option<String>,
}

/// An entry of the machines file that Kiln cannot use.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct MachineFileError {
    /// Its line number (none when the file itself cannot be read).
    line: Option<usize>,
    /// The entry as written.
    entry: String,
    reason: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct MachineLine {
    uri: String,
    name: String,
    systems: String,
    features: String,
    /// How Kiln talks to it (`ssh-ng://` machines: the serve protocol to
    /// the `nix-store` beside their `nix-daemon`).
    protocol: String,
    /// The command Kiln runs there.
    command: String,
    /// Store settings Nix accepts that have no effect on Kiln's builds.
    inert_settings: Vec<String>,
    running: u32,
    slots: u32,
    speed: f64,
    paused: Option<String>,
    enabled: bool,
    consecutive_failures: i64,
    last_error: Option<String>,
    steps_done: i64,
    current: Vec<String>,
    recent_failures: Vec<String>,
    /// Its URL (the URI, percent-encoded): POST `{path}/disable` or
    /// `{path}/enable` with a token.
    path: String,
}

/// The machines Kiln builds on, the machines-file entries it cannot use and
/// the file's name. Read here rather than taken from the queue runner, which
/// a `--roles web` process does not have; the file is small.
pub fn configured_machines(
    config: &crate::config::Config,
) -> (Vec<crate::builder::machines::Machine>, Vec<MachineFileError>, Option<String>) {
    match crate::build::machine_source(config, None) {
        crate::queue::MachineSource::File(f) => {
            let (list, errors) = match crate::builder::machines::load(&f) {
                Ok((list, errors)) => (
                    list,
                    errors
                        .into_iter()
                        .map(|e| MachineFileError { line: Some(e.line), entry: e.entry, reason: e.reason })
                        .collect(),
                ),
                Err(e) => (
                    vec![],
                    vec![MachineFileError { line: None, entry: String::new(), reason: format!("cannot read it: {e}") }],
                ),
            };
            (list, errors, Some(f.display().to_string()))
        }
        crate::queue::MachineSource::List(l) => (l, vec![], None),
    }
}

#[utoipa::path(get, path = "/machines", tag = "pages",
    responses((status = 200, description = "the build machines", content((MachinesView = "application/json"), (String = "text/html")))))]
pub async fn machines(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, WebError> {
    let status = s.queue.status.lock().expect("status").clone();
    let (list, file_errors, machines_file) = configured_machines(&s.config);
    let mut c = s.db.conn().await?;
    let running_steps = steps::running(c.ex()).await?;
    let mut lines = Vec::new();
    for m in list {
        let st = crate::db::machines::get(c.ex(), &m.uri).await?;
        let failures = steps::failed_on(c.ex(), &m.uri, 5).await?;
        let running = status.machines.iter().find(|(u, _, _)| *u == m.uri).map(|(_, r, _)| *r).unwrap_or(0);
        lines.push(MachineLine {
            name: m.uri.split('?').next().unwrap_or(&m.uri).to_string(),
            systems: m.systems.join(", "),
            features: m.supported_features.join(", "),
            protocol: m.protocol(),
            command: m.remote_command(),
            inert_settings: m.inert_settings.clone(),
            running,
            slots: m.max_jobs,
            speed: m.speed_factor,
            paused: st.as_ref().and_then(|s| s.paused_until).filter(|t| *t > crate::db::now()).map(when),
            enabled: st.as_ref().is_none_or(|s| s.enabled),
            consecutive_failures: st.as_ref().map(|s| s.consecutive_failures).unwrap_or(0),
            last_error: st.as_ref().and_then(|s| s.last_error.clone()),
            steps_done: st.as_ref().map(|s| s.steps_done).unwrap_or(0),
            current: running_steps
                .iter()
                .filter(|r| r.machine.as_deref() == Some(&m.uri))
                .map(|r| r.drv_path.clone())
                .collect(),
            recent_failures: failures.into_iter().map(|f| f.drv_path).collect(),
            path: format!("/machines/{}", crate::web::actions::path_segment(&m.uri)),
            uri: m.uri,
        });
    }
    let outbox = crate::db::outbox::stats(c.ex()).await?;
    let github_problem = crate::db::outbox::last_given_up_with(c.ex(), crate::github::checks::PERMISSION_HINT).await?;
    if wants_json(&headers) {
        return Ok(axum::Json(MachinesView {
            machines: lines,
            machines_file,
            errors: file_errors,
            outbox,
            github_problem,
        })
        .into_response());
    }
    html(MachinesPage {
        nav: nav(&s, &headers),
        title: "Machines · Kiln".into(),
        machines: lines,
        machines_file,
        file_errors,
        outbox,
        github: s.config.github.is_some(),
        github_problem,
    })
}
