//! An evaluation's page: its jobs, builds, errors and diff.

use super::*;

#[derive(Template)]
#[template(path = "eval.html")]
struct EvalPage {
    title: String,
    nav: Nav,
    project: String,
    jobset: String,
    e: evaluations::Evaluation,
    started: String,
    took: String,
    diff: evaluations::Diff,
    fixed: Vec<String>,
    broken: Vec<String>,
    errors: Vec<(String, String)>,
    builds: Vec<Row>,
}

#[utoipa::path(get, path = "/eval/{id}", tag = "pages", params(("id" = i64, Path, description = "evaluation id", minimum = 1)),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "an evaluation, its jobs and what changed", content((api::EvalDetail = "application/json"), (String = "text/html"))), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn eval(State(s): State<AppState>, Path(id): Path<i64>, headers: HeaderMap) -> Result<Response, WebError> {
    if wants_json(&headers) {
        return Ok(api::get_eval(State(s), Path(id)).await?.into_response());
    }
    let d = match s.memo.evals.get(&id) {
        Some(d) => d,
        None => {
            let d = Arc::new(eval_data(&s, id).await?);
            s.memo.evals.put(id, d.e.jobset_id, d.generation, d.clone());
            d
        }
    };
    html(EvalPage {
        nav: nav(&s, &headers),
        title: format!("Evaluation {id} of {}:{} · Kiln", d.project, d.jobset),
        project: d.project.clone(),
        jobset: d.jobset.clone(),
        started: when(d.e.started_at),
        took: d.e.duration_ms.map(|ms| format!("{:.1}s", ms as f64 / 1000.0)).unwrap_or_default(),
        e: d.e.clone(),
        diff: d.diff.clone(),
        fixed: d.fixed.clone(),
        broken: d.broken.clone(),
        errors: d.errors.clone(),
        builds: d.builds.clone(),
    })
}

/// What the evaluation page shows, as read from the database.
pub struct EvalData {
    project: String,
    jobset: String,
    e: evaluations::Evaluation,
    diff: evaluations::Diff,
    fixed: Vec<String>,
    broken: Vec<String>,
    errors: Vec<(String, String)>,
    builds: Vec<Row>,
    generation: (u64, u64),
}

async fn eval_data(s: &AppState, id: i64) -> Result<EvalData, WebError> {
    let mut c = s.db.conn().await?;
    let e = evaluations::get(c.ex(), id).await?.ok_or_else(|| WebError::NotFound(format!("evaluation {id}")))?;
    let generation = s.memo.evals.generations().of(e.jobset_id);
    let j =
        jobsets::get_by_id(c.ex(), e.jobset_id).await?.ok_or_else(|| WebError::NotFound(format!("evaluation {id}")))?;
    let p = projects::get_by_id(c.ex(), j.project_id)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("evaluation {id}")))?;
    let cur = evaluations::member_states(c.ex(), id).await?;
    let prev = match e.prev_eval_id {
        Some(pid) => evaluations::member_states(c.ex(), pid).await?,
        None => Vec::new(),
    };
    let diff = evaluations::diff(e.prev_eval_id, &prev, &cur);
    let members = evaluations::members(c.ex(), id).await?;
    let ids: Vec<i64> = members.iter().filter_map(|m| m.build_id).collect();
    let listed = builds::listed(c.ex(), &ids).await?;
    // Fixed and broken: against the previous evaluation's builds.
    let mut fixed = Vec::new();
    let mut broken = Vec::new();
    if let Some(pid) = e.prev_eval_id {
        let before: BTreeMap<String, (Option<bool>, Option<i64>)> = evaluations::cells(c.ex(), &[pid])
            .await?
            .into_iter()
            .map(|c| (c.job, (c.finished, c.build_status)))
            .collect();
        for b in &listed {
            if !b.finished {
                continue;
            }
            if let Some((Some(true), st)) = before.get(&b.job) {
                let was_ok = *st == Some(0);
                let is_ok = b.build_status == Some(0);
                if was_ok && !is_ok {
                    broken.push(b.job.clone());
                } else if !was_ok && is_ok {
                    fixed.push(b.job.clone());
                }
            }
        }
    }
    let errors = members.into_iter().filter_map(|m| m.error.map(|e| (m.job, e))).collect();
    Ok(EvalData {
        project: p.name,
        jobset: j.name,
        e,
        diff,
        fixed,
        broken,
        errors,
        builds: listed.into_iter().map(row).collect(),
        generation,
    })
}
