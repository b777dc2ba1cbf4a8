//! The `builds`, `build_outputs` and `aggregate_constituents` tables: a job
//! of a jobset to be built from one derivation, its status (Hydra's
//! numbers, see [`BuildStatus`]), its outputs, and for aggregate jobs the
//! builds it stands for.

use serde::Serialize;

use super::{Ex, Result, now, run};

mod listing;
pub use listing::*;

/// Hydra's build status numbers, kept for compatibility.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[repr(i64)]
pub enum BuildStatus {
    Succeeded = 0,
    Failed = 1,
    DepFailed = 2,
    Aborted = 3,
    Cancelled = 4,
    FailedWithOutput = 6,
    TimedOut = 7,
    CachedFailure = 8,
    Unsupported = 9,
    LogLimitExceeded = 10,
    OutputLimitExceeded = 11,
    NotDeterministic = 12,
}

impl BuildStatus {
    pub fn from_i64(n: i64) -> Option<Self> {
        use BuildStatus::*;
        Some(match n {
            0 => Succeeded,
            1 => Failed,
            2 => DepFailed,
            3 => Aborted,
            4 => Cancelled,
            6 => FailedWithOutput,
            7 => TimedOut,
            8 => CachedFailure,
            9 => Unsupported,
            10 => LogLimitExceeded,
            11 => OutputLimitExceeded,
            12 => NotDeterministic,
            _ => return None,
        })
    }

    pub fn label(self) -> &'static str {
        use BuildStatus::*;
        match self {
            Succeeded => "succeeded",
            Failed => "failed",
            DepFailed => "dependency failed",
            Aborted => "aborted",
            Cancelled => "cancelled",
            FailedWithOutput => "failed with output",
            TimedOut => "timed out",
            CachedFailure => "cached failure",
            Unsupported => "unsupported system",
            LogLimitExceeded => "log limit exceeded",
            OutputLimitExceeded => "output limit exceeded",
            NotDeterministic => "not deterministic",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Build {
    pub id: i64,
    pub jobset_id: i64,
    pub job: String,
    pub drv_path: String,
    pub nix_name: String,
    pub system: String,
    pub description: Option<String>,
    pub license: Option<String>,
    pub maintainers: Option<String>,
    pub homepage: Option<String>,
    pub timeout: i64,
    pub max_silent: i64,
    pub priority: i64,
    pub global_priority: i64,
    pub is_aggregate: bool,
    pub created_at: i64,
    pub finished: bool,
    pub build_status: Option<i64>,
    pub start_time: Option<i64>,
    pub stop_time: Option<i64>,
    pub is_cached: bool,
    pub keep: bool,
    pub top_step_id: Option<i64>,
    pub failed_step_id: Option<i64>,
    pub error: Option<String>,
    /// What roots its derivation while it is unfinished, when not the
    /// derivation itself: the evaluator's file for its group of jobs.
    #[serde(skip)]
    pub gc_root: Option<String>,
}

impl Build {
    /// The store path whose GC root keeps this build's derivation.
    pub fn root(&self) -> &str {
        self.gc_root.as_deref().unwrap_or(&self.drv_path)
    }

    pub fn status(&self) -> Option<BuildStatus> {
        self.build_status.and_then(BuildStatus::from_i64)
    }
}

#[derive(Debug, Clone, Default)]
pub struct NewBuild {
    pub jobset_id: i64,
    pub job: String,
    pub drv_path: String,
    pub nix_name: String,
    pub system: String,
    pub description: Option<String>,
    pub license: Option<String>,
    pub maintainers: Option<String>,
    pub homepage: Option<String>,
    pub timeout: i64,
    pub max_silent: i64,
    pub priority: i64,
    pub is_aggregate: bool,
    /// Output name and store path.
    pub outputs: Vec<(String, String)>,
    /// See [`Build::gc_root`].
    pub gc_root: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Output {
    pub build_id: i64,
    pub name: String,
    pub path: String,
}

macro_rules! cols {
    () => {
        "id, jobset_id, job, drv_path, nix_name, system, description, license, maintainers, homepage, timeout, \
         max_silent, priority, global_priority, is_aggregate, created_at, finished, build_status, start_time, \
         stop_time, is_cached, keep, top_step_id, failed_step_id, error, gc_root"
    };
}

/// Inserts a build and its outputs (run it in a transaction).
pub async fn create(mut ex: Ex<'_>, b: &NewBuild) -> Result<Build> {
    let sql = concat!(
        "INSERT INTO builds (jobset_id, job, drv_path, nix_name, system, description, license, maintainers, homepage,
             timeout, max_silent, priority, is_aggregate, created_at, gc_root)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) RETURNING ",
        cols!()
    );
    let build: Build = run!(ex.re(), c => sqlx::query_as(sql)
        .bind(b.jobset_id).bind(&b.job).bind(&b.drv_path).bind(&b.nix_name).bind(&b.system)
        .bind(&b.description).bind(&b.license).bind(&b.maintainers).bind(&b.homepage)
        .bind(b.timeout).bind(b.max_silent).bind(b.priority).bind(b.is_aggregate).bind(now()).bind(&b.gc_root)
        .fetch_one(&mut *c).await?);
    for (name, path) in &b.outputs {
        run!(ex.re(), c => sqlx::query("INSERT INTO build_outputs (build_id, name, path) VALUES ($1, $2, $3)")
            .bind(build.id).bind(name).bind(path).execute(&mut *c).await?.rows_affected());
    }
    Ok(build)
}

pub async fn get(ex: Ex<'_>, id: i64) -> Result<Option<Build>> {
    let sql = concat!("SELECT ", cols!(), " FROM builds WHERE id = $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(id).fetch_optional(&mut *c).await?))
}

/// The newest build of this derivation in the jobset, which a new
/// evaluation reuses instead of making another (as Hydra does).
pub async fn find_in_jobset(ex: Ex<'_>, jobset_id: i64, job: &str, drv_path: &str) -> Result<Option<Build>> {
    let sql = concat!(
        "SELECT ",
        cols!(),
        " FROM builds WHERE jobset_id = $1 AND job = $2 AND drv_path = $3 ORDER BY id DESC LIMIT 1"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(jobset_id).bind(job).bind(drv_path).fetch_optional(&mut *c).await?))
}

pub async fn outputs(ex: Ex<'_>, build_id: i64) -> Result<Vec<Output>> {
    Ok(run!(ex, c => sqlx::query_as("SELECT build_id, name, path FROM build_outputs WHERE build_id = $1 ORDER BY name")
        .bind(build_id).fetch_all(&mut *c).await?))
}

/// A step the builds need started on a machine at `at`: for each build
/// still without one, that is its start time (Hydra's `starttime`). One
/// statement per chunk, as a step may be shared by thousands of builds.
pub async fn set_started(mut ex: Ex<'_>, ids: &[i64], at: i64) -> Result<()> {
    for chunk in ids.chunks(ROWS_PER_STATEMENT - 1) {
        let sql = sqlx::AssertSqlSafe(format!(
            "UPDATE builds SET start_time = {} WHERE id IN {} AND start_time IS NULL AND finished = FALSE",
            values_placeholders(ex.backend(), 1, 1, 1),
            values_placeholders(ex.backend(), 1, chunk.len(), 2)
        ));
        run!(ex.re(), c => {
            let mut q = sqlx::query(sql).bind(at);
            for id in chunk {
                q = q.bind(*id);
            }
            q.execute(&mut *c).await?.rows_affected()
        });
    }
    Ok(())
}

/// Finishes a build once; returns false if it was already finished, so a
/// result that arrives twice (after a restart, say) is recorded once.
pub async fn finish(
    ex: Ex<'_>,
    id: i64,
    status: BuildStatus,
    is_cached: bool,
    failed_step_id: Option<i64>,
    error: Option<&str>,
) -> Result<bool> {
    let n = run!(ex, c => sqlx::query(
        "UPDATE builds SET finished = TRUE, build_status = $2, is_cached = $3, failed_step_id = $4, error = $5,
             stop_time = $6, start_time = COALESCE(start_time, $6) WHERE id = $1 AND finished = FALSE")
        .bind(id).bind(status as i64).bind(is_cached).bind(failed_step_id).bind(error).bind(now())
        .execute(&mut *c).await?.rows_affected());
    Ok(n == 1)
}

/// Sets the top step of many builds (build id, step id), a few hundred a
/// statement.
pub async fn set_top_steps(mut ex: Ex<'_>, tops: &[(i64, i64)]) -> Result<()> {
    for chunk in tops.chunks(ROWS_PER_STATEMENT) {
        // VALUES columns are column1, column2 in SQLite and PostgreSQL alike.
        let sql = sqlx::AssertSqlSafe(format!(
            "UPDATE builds SET top_step_id = v.column2 FROM (VALUES {}) AS v WHERE builds.id = v.column1",
            values_placeholders(ex.backend(), chunk.len(), 2, 1)
        ));
        run!(ex.re(), c => {
            let mut q = sqlx::query(sql);
            for (b, s) in chunk {
                q = q.bind(*b).bind(*s);
            }
            q.execute(&mut *c).await?.rows_affected()
        });
    }
    Ok(())
}

pub async fn set_top_step(ex: Ex<'_>, id: i64, step_id: i64) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE builds SET top_step_id = $2 WHERE id = $1").bind(id).bind(step_id).execute(&mut *c).await?.rows_affected());
    Ok(())
}

pub async fn unfinished(ex: Ex<'_>) -> Result<Vec<Build>> {
    let sql = concat!("SELECT ", cols!(), " FROM builds WHERE finished = FALSE ORDER BY id");
    Ok(run!(ex, c => sqlx::query_as(sql).fetch_all(&mut *c).await?))
}

pub async fn add_constituent(ex: Ex<'_>, aggregate_id: i64, constituent_id: i64) -> Result<()> {
    run!(ex, c => sqlx::query(
        "INSERT INTO aggregate_constituents (aggregate_id, constituent_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(aggregate_id).bind(constituent_id).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// An aggregate's constituents: id, job, whether finished, status.
pub async fn constituent_states(ex: Ex<'_>, aggregate_id: i64) -> Result<Vec<(i64, String, bool, Option<i64>)>> {
    Ok(run!(ex, c => sqlx::query_as(
        "SELECT b.id, b.job, b.finished, b.build_status FROM aggregate_constituents a
         JOIN builds b ON b.id = a.constituent_id WHERE a.aggregate_id = $1 ORDER BY b.job, b.id")
        .bind(aggregate_id).fetch_all(&mut *c).await?))
}

pub async fn constituents(ex: Ex<'_>, aggregate_id: i64) -> Result<Vec<i64>> {
    Ok(run!(ex, c => sqlx::query_scalar(
        "SELECT constituent_id FROM aggregate_constituents WHERE aggregate_id = $1 ORDER BY constituent_id")
        .bind(aggregate_id).fetch_all(&mut *c).await?))
}

/// Rows per multi-row statement: well under both backends' parameter limits.
const ROWS_PER_STATEMENT: usize = 200;

/// Placeholders `($1, $2, …), (…)` for `rows` rows of `cols` columns. On
/// SQLite they are plain `?`: SQLite looks each `$N` up by name while
/// preparing, which is quadratic and made a 2,800-parameter insert 12 times
/// slower.
pub(crate) fn values_placeholders(backend: super::Backend, rows: usize, cols: usize, first: usize) -> String {
    let mut s = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            s.push_str(", ");
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push_str(", ");
            }
            match backend {
                super::Backend::Sqlite => s.push('?'),
                super::Backend::Postgres => {
                    s.push('$');
                    s.push_str(&(first + r * cols + c).to_string());
                }
            }
        }
        s.push(')');
    }
    s
}

/// The newest build of each (job, derivation) in the jobset, for reuse by
/// a new evaluation: one query per a few hundred jobs.
/// Whether the jobset has any build at all (a new jobset's first
/// evaluation need not look its jobs up).
pub async fn any_in_jobset(ex: Ex<'_>, jobset_id: i64) -> Result<bool> {
    Ok(run!(ex, c => sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM builds WHERE jobset_id = $1)")
        .bind(jobset_id).fetch_one(&mut *c).await?))
}

pub async fn find_many_in_jobset(
    mut ex: Ex<'_>,
    jobset_id: i64,
    wanted: &[(&str, &str)],
) -> Result<std::collections::HashMap<(String, String), i64>> {
    // By derivation alone, so the planner always takes builds_by_drv;
    // other jobsets' builds of the same derivation are dropped below. Not
    // prepared: planned each time with the values at hand. A plan
    // PostgreSQL caches for a prepared statement while `builds` is still
    // empty scans the whole table once it is not (measured: 30 ms per 1,000
    // lookups became 1.25 s).
    let mut rows: Vec<(i64, String, String, i64)> = Vec::new();
    if let Ex::Postgres(c) = &mut ex {
        // One array for the whole batch (see `create_many_pg`).
        let drvs: Vec<&str> = wanted.iter().map(|(_, d)| *d).collect();
        rows = sqlx::query_as("SELECT jobset_id, job, drv_path, id FROM builds WHERE drv_path = ANY($1)")
            .persistent(false)
            .bind(drvs)
            .fetch_all(&mut **c)
            .await?;
    } else {
        for chunk in wanted.chunks(ROWS_PER_STATEMENT) {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT jobset_id, job, drv_path, id FROM builds WHERE drv_path IN {}",
                values_placeholders(ex.backend(), 1, chunk.len(), 1)
            ));
            rows.extend(run!(ex.re(), c => {
                let mut q = sqlx::query_as(sql).persistent(false);
                for (_, drv) in chunk {
                    q = q.bind(*drv);
                }
                q.fetch_all(&mut *c).await?
            }));
        }
    }
    let mut found = std::collections::HashMap::new();
    for (js, job, drv, id) in rows {
        if js == jobset_id {
            let e = found.entry((job, drv)).or_insert(id);
            *e = (*e).max(id);
        }
    }
    // The query matched by derivation only; keep the pairs that were asked for.
    let wanted: std::collections::HashSet<(&str, &str)> = wanted.iter().copied().collect();
    found.retain(|(job, drv), _| wanted.contains(&(job.as_str(), drv.as_str())));
    Ok(found)
}

/// Inserts builds and their outputs with multi-row statements; returns the
/// new ids by job name (job names are unique within one evaluation).
pub async fn create_many(mut ex: Ex<'_>, new: &[NewBuild]) -> Result<std::collections::HashMap<String, i64>> {
    const COLS: usize = 15;
    let t = now();
    if let Ex::Postgres(c) = &mut ex {
        return create_many_pg(c, new, t).await;
    }
    let mut ids = std::collections::HashMap::new();
    for chunk in new.chunks(ROWS_PER_STATEMENT) {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO builds (jobset_id, job, drv_path, nix_name, system, description, license, maintainers, homepage,
                 timeout, max_silent, priority, is_aggregate, created_at, gc_root) VALUES {} RETURNING job, id",
            values_placeholders(ex.backend(), chunk.len(), COLS, 1)
        ));
        let rows: Vec<(String, i64)> = run!(ex.re(), c => {
            let mut q = sqlx::query_as(sql);
            for b in chunk {
                q = q.bind(b.jobset_id).bind(&b.job).bind(&b.drv_path).bind(&b.nix_name).bind(&b.system)
                    .bind(&b.description).bind(&b.license).bind(&b.maintainers).bind(&b.homepage)
                    .bind(b.timeout).bind(b.max_silent).bind(b.priority).bind(b.is_aggregate).bind(t).bind(&b.gc_root);
            }
            q.fetch_all(&mut *c).await?
        });
        ids.extend(rows);
    }
    let outputs: Vec<(i64, &str, &str)> = new
        .iter()
        .filter_map(|b| ids.get(&b.job).map(|id| (*id, b)))
        .flat_map(|(id, b)| b.outputs.iter().map(move |(n, p)| (id, n.as_str(), p.as_str())))
        .collect();
    for chunk in outputs.chunks(ROWS_PER_STATEMENT) {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO build_outputs (build_id, name, path) VALUES {}",
            values_placeholders(ex.backend(), chunk.len(), 3, 1)
        ));
        run!(ex.re(), c => {
            let mut q = sqlx::query(sql);
            for (id, n, p) in chunk {
                q = q.bind(*id).bind(*n).bind(*p);
            }
            q.execute(&mut *c).await?.rows_affected()
        });
    }
    Ok(ids)
}

/// [`create_many`] on PostgreSQL: one column array per parameter, so a
/// batch is one statement of 15 parameters, where a multi-row VALUES list of
/// thousands of parameters costs PostgreSQL more to parse and plan than to
/// insert.
async fn create_many_pg(
    c: &mut sqlx::PgConnection,
    new: &[NewBuild],
    t: i64,
) -> Result<std::collections::HashMap<String, i64>> {
    fn col<'a, T>(new: &'a [NewBuild], f: impl Fn(&'a NewBuild) -> T) -> Vec<T> {
        new.iter().map(f).collect()
    }
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "INSERT INTO builds (jobset_id, job, drv_path, nix_name, system, description, license, maintainers, homepage,
             timeout, max_silent, priority, is_aggregate, created_at, gc_root)
         SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[],
             $8::TEXT[], $9::TEXT[], $10::BIGINT[], $11::BIGINT[], $12::BIGINT[], $13::BOOLEAN[], $14::BIGINT[], $15::TEXT[])
         RETURNING job, id",
    )
    .bind(col(new, |b| b.jobset_id))
    .bind(col(new, |b| b.job.as_str()))
    .bind(col(new, |b| b.drv_path.as_str()))
    .bind(col(new, |b| b.nix_name.as_str()))
    .bind(col(new, |b| b.system.as_str()))
    .bind(col(new, |b| b.description.as_deref()))
    .bind(col(new, |b| b.license.as_deref()))
    .bind(col(new, |b| b.maintainers.as_deref()))
    .bind(col(new, |b| b.homepage.as_deref()))
    .bind(col(new, |b| b.timeout))
    .bind(col(new, |b| b.max_silent))
    .bind(col(new, |b| b.priority))
    .bind(col(new, |b| b.is_aggregate))
    .bind(vec![t; new.len()])
    .bind(col(new, |b| b.gc_root.as_deref()))
    .fetch_all(&mut *c)
    .await?;
    let ids: std::collections::HashMap<String, i64> = rows.into_iter().collect();
    let (mut bid, mut name, mut path) = (Vec::new(), Vec::new(), Vec::new());
    for b in new {
        if let Some(id) = ids.get(&b.job) {
            for (n, p) in &b.outputs {
                bid.push(*id);
                name.push(n.as_str());
                path.push(p.as_str());
            }
        }
    }
    sqlx::query(
        "INSERT INTO build_outputs (build_id, name, path) SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[])",
    )
    .bind(bid)
    .bind(name)
    .bind(path)
    .execute(&mut *c)
    .await?;
    Ok(ids)
}

/// The newest successful build of a job: what deployers fetch.
pub async fn latest_successful(ex: Ex<'_>, jobset_id: i64, job: &str) -> Result<Option<Build>> {
    let sql = concat!(
        "SELECT ",
        cols!(),
        " FROM builds WHERE jobset_id = $1 AND job = $2 AND finished = TRUE AND build_status = 0 ORDER BY id DESC LIMIT 1"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(jobset_id).bind(job).fetch_optional(&mut *c).await?))
}

/// Hydra's `latest-finished`: the newest successful build of a job from an
/// evaluation whose builds have all finished; with `system`, Hydra's
/// `latest-for` instead: the newest successful build for that system.
pub async fn latest_finished(ex: Ex<'_>, jobset_id: i64, job: &str, system: Option<&str>) -> Result<Option<Build>> {
    if let Some(system) = system {
        let sql = concat!(
            "SELECT ",
            cols!(),
            " FROM builds WHERE jobset_id = $1 AND job = $2 AND finished = TRUE AND build_status = 0 AND system = $3
             ORDER BY id DESC LIMIT 1"
        );
        return Ok(
            run!(ex, c => sqlx::query_as(sql).bind(jobset_id).bind(job).bind(system).fetch_optional(&mut *c).await?),
        );
    }
    let sql = concat!(
        "SELECT ",
        cols!(),
        " FROM builds b WHERE b.jobset_id = $1 AND b.job = $2 AND b.finished = TRUE AND b.build_status = 0
           AND EXISTS (SELECT 1 FROM eval_members m WHERE m.build_id = b.id AND NOT EXISTS (
               SELECT 1 FROM eval_members m2 JOIN builds b2 ON b2.id = m2.build_id
               WHERE m2.eval_id = m.eval_id AND b2.finished = FALSE))
         ORDER BY b.id DESC LIMIT 1"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(jobset_id).bind(job).fetch_optional(&mut *c).await?))
}

/// When builds finished since `since` (Unix seconds), for counts per period.
pub async fn stop_times_since(ex: Ex<'_>, since: i64) -> Result<Vec<i64>> {
    Ok(run!(ex, c => sqlx::query_scalar(
        "SELECT stop_time FROM builds WHERE finished = TRUE AND stop_time >= $1 ORDER BY stop_time")
        .bind(since).fetch_all(&mut *c).await?))
}

/// Pins a build (and so its outputs' closure) against garbage collection.
pub async fn set_keep(ex: Ex<'_>, id: i64, keep: bool) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE builds SET keep = $2 WHERE id = $1").bind(id).bind(keep).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Bumps a build to the front of the queue (Hydra's global priority).
pub async fn bump(ex: Ex<'_>, id: i64) -> Result<()> {
    run!(ex, c => sqlx::query(
        "UPDATE builds SET global_priority = (SELECT COALESCE(MAX(global_priority), 0) + 1 FROM builds) WHERE id = $1")
        .bind(id).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Makes a finished build unfinished again, for a restart. Its group's
/// root may be gone by now: its own derivation is its root again.
pub async fn reopen(ex: Ex<'_>, id: i64) -> Result<bool> {
    let n = run!(ex, c => sqlx::query(
        "UPDATE builds SET finished = FALSE, build_status = NULL, start_time = NULL, stop_time = NULL, is_cached = FALSE,
             failed_step_id = NULL, error = NULL, gc_root = NULL WHERE id = $1 AND finished = TRUE")
        .bind(id).execute(&mut *c).await?.rows_affected());
    Ok(n == 1)
}

/// The unfinished builds among `ids`.
pub async fn unfinished_of(ex: Ex<'_>, ids: &[i64]) -> Result<Vec<Build>> {
    Ok(get_many(ex, ids).await?.into_iter().filter(|b| !b.finished).collect())
}

/// The builds among `ids` that exist, in id order: a few hundred a query.
pub async fn get_many(mut ex: Ex<'_>, ids: &[i64]) -> Result<Vec<Build>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let sql = sqlx::AssertSqlSafe(format!(
            concat!("SELECT ", cols!(), " FROM builds WHERE id IN {} ORDER BY id"),
            values_placeholders(ex.backend(), 1, chunk.len(), 1)
        ));
        let rows: Vec<Build> = run!(ex.re(), c => {
            let mut q = sqlx::query_as(sql);
            for id in chunk {
                q = q.bind(*id);
            }
            q.fetch_all(&mut *c).await?
        });
        out.extend(rows);
    }
    out.sort_by_key(|b| b.id);
    Ok(out)
}

/// Finished builds per Hydra status.
pub async fn count_by_status(ex: Ex<'_>) -> Result<Vec<(i64, i64)>> {
    Ok(run!(ex, c => sqlx::query_as(
        "SELECT build_status, COUNT(*) FROM builds WHERE finished = TRUE AND build_status IS NOT NULL
         GROUP BY build_status ORDER BY build_status")
        .fetch_all(&mut *c).await?))
}

/// Cancels, with `why`, the unfinished builds of a jobset that its newest
/// evaluation `eval_id` does not have (superseded by it), or all of them
/// (`eval_id` None: a closed pull request's). One statement; returns the
/// ids, for the queue to stop what only they needed once this commits.
pub async fn cancel_unfinished_of_jobset(
    ex: Ex<'_>,
    jobset_id: i64,
    eval_id: Option<i64>,
    why: &str,
) -> Result<Vec<i64>> {
    Ok(run!(ex, c => sqlx::query_scalar(
        "UPDATE builds SET finished = TRUE, build_status = $3, is_cached = FALSE, error = $4, stop_time = $5,
             start_time = COALESCE(start_time, $5)
         WHERE jobset_id = $1 AND finished = FALSE AND NOT EXISTS
             (SELECT 1 FROM eval_members m WHERE m.eval_id = $2 AND m.build_id = builds.id)
         RETURNING id")
        .bind(jobset_id).bind(eval_id).bind(BuildStatus::Cancelled as i64).bind(why).bind(now())
        .fetch_all(&mut *c).await?))
}

/// What roots the unfinished builds' derivations (see [`Build::root`]), each once.
pub async fn unfinished_roots(ex: Ex<'_>) -> Result<Vec<String>> {
    Ok(
        run!(ex, c => sqlx::query_scalar("SELECT DISTINCT COALESCE(gc_root, drv_path) FROM builds WHERE finished = FALSE")
        .fetch_all(&mut *c).await?),
    )
}

/// Ids of every unfinished build (the partial index `builds_unfinished`).
pub async fn unfinished_ids(ex: Ex<'_>) -> Result<Vec<i64>> {
    Ok(run!(ex, c => sqlx::query_scalar("SELECT id FROM builds WHERE finished = FALSE ORDER BY id")
        .fetch_all(&mut *c).await?))
}
