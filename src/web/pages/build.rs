//! A build's page: its facts, outputs, constituents and steps.

use super::*;

#[derive(Template)]
#[template(path = "build.html")]
struct BuildPage {
    title: String,
    nav: Nav,
    b: Row,
    drv: String,
    description: String,
    queued_at: String,
    started: String,
    finished: String,
    error: Option<String>,
    outputs: Vec<(String, String, String)>,
    steps: Vec<StepLine>,
    /// How many steps were built and how many substituted from upstreams.
    step_summary: String,
    evals: Vec<i64>,
    running: bool,
    /// Pinned: garbage collection keeps its outputs.
    keep: bool,
    /// For an aggregate: its constituents (build id, job, status, class).
    constituents: Vec<(i64, String, String, &'static str)>,
    products: Vec<crate::db::products::ProductRow>,
    metrics: Vec<crate::products::Metric>,
}

#[utoipa::path(get, path = "/build/{id}", tag = "pages", params(("id" = i64, Path, description = "build id", minimum = 1)),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "a build", content((build_api::BuildView = "application/json"), (String = "text/html"))), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn build(State(s): State<AppState>, Path(id): Path<i64>, headers: HeaderMap) -> Result<Response, WebError> {
    if wants_json(&headers) {
        return Ok(build_api::get_build(State(s), Path(id)).await?.into_response());
    }
    let mut c = s.db.conn().await?;
    let b = builds::get(c.ex(), id).await?.ok_or_else(|| WebError::NotFound(format!("build {id}")))?;
    let listed = builds::listed(c.ex(), &[id])
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| WebError::NotFound(format!("build {id}")))?;
    let outputs = builds::outputs(c.ex(), id)
        .await?
        .into_iter()
        .map(|o| {
            let hash = o.path.trim_start_matches("/nix/store/").chars().take(32).collect::<String>();
            (o.name, o.path, hash)
        })
        .collect();
    let steps = match b.top_step_id {
        Some(top) => steps::closure_of(c.ex(), top).await?,
        None => Vec::new(),
    };
    let running = steps.iter().any(|s| s.state == "running");
    let step_summary = step_summary(&steps);
    let constituents = if b.is_aggregate {
        builds::constituent_states(c.ex(), id)
            .await?
            .into_iter()
            .map(|(cid, job, finished, st)| {
                let (status, class) = status_of(finished, st);
                (cid, job, status, class)
            })
            .collect()
    } else {
        Vec::new()
    };
    let steps = steps
        .into_iter()
        .map(|st| {
            let class = match st.state.as_str() {
                "succeeded" | "substituted" => "ok",
                "failed" | "aborted" => "bad",
                "running" => "running",
                _ => "queued",
            };
            StepLine {
                drv_base: st.drv_path.trim_start_matches("/nix/store/").to_string(),
                took: match (st.start_time, st.stop_time) {
                    (Some(a), Some(z)) => duration(z - a),
                    (Some(a), None) if st.state == "running" => format!("{} so far", duration(crate::db::now() - a)),
                    _ => String::new(),
                },
                id: st.id,
                state: st.state,
                class,
                machine: st.machine.map(|m| m.split('?').next().unwrap_or("").to_string()).unwrap_or_default(),
                phase: st.phase.unwrap_or_default(),
                tries: st.tries,
            }
        })
        .collect();
    let evals = evaluations::of_build(c.ex(), id).await?;
    let (products, metrics) = match b.top_step_id {
        Some(top) => {
            (crate::db::products::products_of(c.ex(), top).await?, crate::db::products::metrics_of(c.ex(), top).await?)
        }
        None => (Vec::new(), Vec::new()),
    };
    html(BuildPage {
        nav: nav(&s, &headers),
        title: format!("Build {id}: {} · Kiln", b.job),
        drv: b.drv_path.clone(),
        description: b.description.clone().unwrap_or_default(),
        queued_at: when(b.created_at),
        started: when_opt(b.start_time),
        finished: when_opt(b.stop_time),
        error: b.error.clone(),
        b: row(listed),
        outputs,
        steps,
        step_summary,
        evals,
        running,
        keep: b.keep,
        constituents,
        products,
        metrics,
    })
}

/// "2 built, 14 substituted": what a build's closure took.
pub(crate) fn step_summary(steps: &[crate::db::steps::Step]) -> String {
    let n = |state: &str| steps.iter().filter(|s| s.state == state).count();
    let (built, substituted) = (n("succeeded"), n("substituted"));
    let rest = steps.len() - built - substituted;
    let mut parts = vec![format!("{built} built"), format!("{substituted} substituted from upstream caches")];
    if rest > 0 {
        parts.push(format!("{rest} not built yet or failed"));
    }
    parts.join(", ")
}
