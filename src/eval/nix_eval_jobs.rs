//! `evaluator = "nix-eval-jobs"`: the same evaluation through the external
//! nix-eval-jobs, for sites that have it (it needs a newer Nix than this
//! project's test machines carry). Its JSON lines become the same [`Job`]s
//! as the built-in evaluator's: same names, systems filter, meta fields and
//! limits.

use std::process::Stdio;

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::mpsc;

use super::{EvalError, EvalRequest, EvalStats, Job, attr_name, finalize, worker};

pub const PROGRAM: &str = "nix-eval-jobs";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Line {
    #[serde(default)]
    attr_path: Vec<String>,
    drv_path: Option<String>,
    outputs: Option<std::collections::BTreeMap<String, Option<String>>>,
    system: Option<String>,
    name: Option<String>,
    meta: Option<Map<String, Value>>,
    constituents: Option<Vec<String>>,
    error: Option<String>,
}

pub async fn evaluate(req: &EvalRequest, tx: mpsc::UnboundedSender<Job>) -> Result<EvalStats, EvalError> {
    let mut stats = EvalStats::default();
    let mut seen = std::collections::HashSet::new();
    for root in &req.roots {
        let mut cmd = crate::nix::command::nix_command(PROGRAM);
        cmd.arg("--flake")
            .arg(format!("{}#{}", req.flake_ref, attr_name(&root.path)))
            .args(["--workers", &req.workers.max(1).to_string()])
            .args(["--max-memory-size", &req.max_memory_mib.to_string()])
            .args(["--meta", "--constituents", "--force-recurse"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| EvalError::Failed(format!("cannot run {PROGRAM}: {e} (evaluator = \"nix-eval-jobs\")")))?;
        stats.processes += 1;
        let mut stderr = child.stderr.take().expect("piped");
        let err_task = tokio::spawn(async move {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s).await;
            s
        });
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut any = false;
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(l) = serde_json::from_str::<Line>(&line) else { continue };
            any = true;
            let job = match l.error {
                Some(e) => Job::error(l.attr_path, e),
                None => {
                    if !req.systems.is_empty() && l.system.as_ref().is_some_and(|s| !req.systems.contains(s)) {
                        stats.filtered += 1;
                        continue;
                    }
                    Job {
                        attr: String::new(),
                        attr_path: l.attr_path,
                        drv_path: l.drv_path,
                        outputs: l.outputs.map(|o| o.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect()),
                        system: l.system,
                        name: l.name,
                        meta: l.meta.map(normalize_meta),
                        constituents: l.constituents,
                        error: None,
                        gc_root: None,
                    }
                }
            };
            let job = finalize(root, job);
            if !seen.insert(job.attr.clone()) {
                continue;
            }
            if job.error.is_some() {
                stats.errors += 1;
            } else {
                stats.jobs += 1;
            }
            let _ = tx.send(job);
        }
        let status = child.wait().await.map_err(|e| EvalError::Failed(format!("waiting for {PROGRAM}: {e}")))?;
        let err = err_task.await.unwrap_or_default();
        if !status.success() && !any {
            return Err(EvalError::Failed(worker::error_message(&err)));
        }
    }
    Ok(stats)
}

/// The meta fields Kiln keeps, as strings and numbers, from nix-eval-jobs'
/// raw `meta` (licenses and maintainers are attribute sets there).
fn normalize_meta(m: Map<String, Value>) -> Map<String, Value> {
    fn license(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Array(a) => {
                let l: Vec<String> = a.iter().filter_map(license).collect();
                (!l.is_empty()).then(|| l.join(", "))
            }
            Value::Object(o) => {
                ["spdxId", "shortName", "fullName"].iter().find_map(|k| o.get(*k)?.as_str().map(str::to_string))
            }
            _ => None,
        }
    }
    fn maintainer(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => {
                ["email", "github", "name"].iter().find_map(|k| o.get(*k)?.as_str().map(str::to_string))
            }
            _ => None,
        }
    }
    let mut out = Map::new();
    if let Some(d) = m.get("description").and_then(Value::as_str) {
        out.insert("description".into(), d.into());
    }
    if let Some(l) = m.get("license").and_then(license) {
        out.insert("license".into(), l.into());
    }
    if let Some(Value::Array(ms)) = m.get("maintainers") {
        let l: Vec<String> = ms.iter().filter_map(maintainer).collect();
        if !l.is_empty() {
            out.insert("maintainers".into(), l.join(", ").into());
        }
    }
    match m.get("homepage") {
        Some(Value::String(h)) => {
            out.insert("homepage".into(), h.clone().into());
        }
        Some(Value::Array(a)) => {
            if let Some(h) = a.first().and_then(Value::as_str) {
                out.insert("homepage".into(), h.into());
            }
        }
        _ => {}
    }
    for k in ["timeout", "maxSilent", "schedulingPriority"] {
        if let Some(n) = m.get(k).and_then(Value::as_i64) {
            out.insert(k.into(), n.into());
        }
    }
    out
}

/// Whether nix-eval-jobs can be run.
pub fn available() -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(PROGRAM).is_file()))
}
