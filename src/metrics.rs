//! `/metrics` in Prometheus' text format (version 0.0.4). What the
//! database knows (builds by status, step and evaluation durations, the
//! GitHub outbox) is read from it at each scrape, so the figures survive
//! restarts and agree between coordinators; what only this process sees
//! (binary cache hits, misses and bytes, the queue in memory, the
//! database pool) comes from counters kept here.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::db::{self, Db, DbError};

/// Binary cache traffic of this process.
pub static CACHE_NARINFO_HITS: AtomicU64 = AtomicU64::new(0);
pub static CACHE_NARINFO_MISSES: AtomicU64 = AtomicU64::new(0);
pub static CACHE_NAR_BYTES: AtomicU64 = AtomicU64::new(0);
pub static CACHE_NARS: AtomicU64 = AtomicU64::new(0);
/// Reads the cache's storage could not answer (a bucket down or slow).
pub static CACHE_STORAGE_ERRORS: AtomicU64 = AtomicU64::new(0);

pub fn count(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Histogram bounds in seconds: a step or an evaluation takes from
/// seconds to hours.
pub const BUCKETS: &[f64] = &[1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 10800.0];

/// The bucket of [`BUCKETS`] a value falls in (`BUCKETS.len()`: above the last bound).
pub fn bucket_of(v: f64) -> usize {
    BUCKETS.iter().position(|b| v <= *b).unwrap_or(BUCKETS.len())
}

/// The exposition, appended to as metrics are gathered.
struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.head(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A histogram from per-bucket counts (not cumulative), in BUCKETS order
    /// plus one for "above the last".
    fn histogram(&mut self, name: &str, help: &str, counts: &[i64], sum: f64) {
        self.head(name, "histogram", help);
        let mut total = 0i64;
        for (i, b) in BUCKETS.iter().enumerate() {
            total += counts[i];
            self.sample(&format!("{name}_bucket"), &[("le", &b.to_string())], total as f64);
        }
        total += counts[BUCKETS.len()];
        self.sample(&format!("{name}_bucket"), &[("le", "+Inf")], total as f64);
        self.sample(&format!("{name}_sum"), &[], sum);
        self.sample(&format!("{name}_count"), &[], total as f64);
    }
}

/// Everything `/metrics` shows.
pub async fn render(db: &Db, queue: &crate::queue::Status) -> Result<String, DbError> {
    let mut o = Out(String::new());
    let mut c = db.conn().await?;

    o.one("kiln_builds_unfinished", "gauge", "Builds not finished yet.", queue.builds_unfinished as f64);
    o.one("kiln_steps_runnable", "gauge", "Steps ready to build, waiting for a machine.", queue.runnable as f64);
    o.one("kiln_steps_waiting", "gauge", "Steps waiting for their inputs.", queue.waiting as f64);
    o.head("kiln_steps_running", "gauge", "Steps building now, per machine.");
    for (machine, running, _) in &queue.machines {
        o.sample("kiln_steps_running", &[("machine", &host(machine))], *running as f64);
    }
    o.head("kiln_machine_slots", "gauge", "Build slots per machine.");
    for (machine, _, slots) in &queue.machines {
        o.sample("kiln_machine_slots", &[("machine", &host(machine))], *slots as f64);
    }
    o.one(
        "kiln_results_unrecorded",
        "gauge",
        "Finished steps and cancellations waiting for the database to take them.",
        queue.unrecorded as f64,
    );
    o.one("kiln_steps_built_total", "counter", "Steps this process built.", queue.steps_done as f64);
    o.one("kiln_steps_failed_total", "counter", "Steps that failed in this process.", queue.steps_failed as f64);

    o.head("kiln_deployments", "gauge", "Deployments in the database, by status.");
    for (status, n) in db::deployments::count_by_status(c.ex()).await? {
        o.sample("kiln_deployments", &[("status", &status)], n as f64);
    }
    o.head("kiln_deployment_hosts", "gauge", "Hosts' parts in deployments, by status (rolled-back, failed, …).");
    for (status, n) in db::deployment_hosts::count_by_status(c.ex()).await? {
        o.sample("kiln_deployment_hosts", &[("status", &status)], n as f64);
    }
    o.head("kiln_builds_finished", "gauge", "Finished builds in the database, by Hydra's status.");
    for (status, n) in db::builds::count_by_status(c.ex()).await? {
        let label = db::builds::BuildStatus::from_i64(status).map(|s| s.label()).unwrap_or("other");
        o.sample("kiln_builds_finished", &[("status", label)], n as f64);
    }

    let n = BUCKETS.len() + 1;
    let (counts, sum) = db::histograms::read(c.ex(), db::histograms::STEP_DURATION, n).await?;
    o.histogram("kiln_step_duration_seconds", "How long finished steps took to build.", &counts, sum);
    let (counts, sum) = db::histograms::read(c.ex(), db::histograms::EVALUATION_DURATION, n).await?;
    o.histogram("kiln_evaluation_duration_seconds", "How long finished evaluations took.", &counts, sum);

    o.one(
        "kiln_cache_narinfo_hits_total",
        "counter",
        "narinfo requests answered from the cache.",
        CACHE_NARINFO_HITS.load(Ordering::Relaxed) as f64,
    );
    o.one(
        "kiln_cache_narinfo_misses_total",
        "counter",
        "narinfo requests for paths the cache does not have.",
        CACHE_NARINFO_MISSES.load(Ordering::Relaxed) as f64,
    );
    o.one(
        "kiln_cache_nars_served_total",
        "counter",
        "NAR downloads started.",
        CACHE_NARS.load(Ordering::Relaxed) as f64,
    );
    o.one(
        "kiln_cache_nar_bytes_served_total",
        "counter",
        "Bytes of NAR files served.",
        CACHE_NAR_BYTES.load(Ordering::Relaxed) as f64,
    );
    o.one(
        "kiln_cache_storage_errors_total",
        "counter",
        "Cache reads answered 503 because the storage (a bucket) could not answer.",
        CACHE_STORAGE_ERRORS.load(Ordering::Relaxed) as f64,
    );

    let ob = db::outbox::stats(c.ex()).await?;
    o.one("kiln_outbox_pending", "gauge", "GitHub statuses waiting to be sent.", ob.pending as f64);
    o.one("kiln_outbox_retrying", "gauge", "Waiting statuses that failed at least once.", ob.retrying as f64);
    o.one("kiln_outbox_given_up", "gauge", "Statuses GitHub refused for good.", ob.given_up as f64);
    o.one("kiln_outbox_delivered", "gauge", "Statuses delivered.", ob.delivered as f64);
    drop(c);

    let (size, idle) = db.pool_use();
    o.one("kiln_db_connections", "gauge", "Open database connections in the pool.", size as f64);
    o.one("kiln_db_connections_idle", "gauge", "Idle database connections in the pool.", idle as f64);
    Ok(o.0)
}

/// A machine URI without its query (which may name keys and stores).
fn host(uri: &str) -> String {
    uri.split('?').next().unwrap_or(uri).to_string()
}
