//! A queue run inside the test process on a test database, with builds
//! created the way an evaluation records them.

use std::path::Path;

use kiln::db::Db;
use kiln::db::builds::{self, Build, NewBuild};
use kiln::queue::{MachineSource, Queue};

use super::{SYSTEM, nix};

/// Starts a queue on `db` with the builders of `machines`; its cache and
/// logs live under `state`.
pub fn start_queue(db: &Db, machines: &Path, state: &Path, config: kiln::config::QueueConfig) -> Queue {
    let kc = kiln::config::Config { state_dir: state.to_path_buf(), ..Default::default() };
    let cache = kiln::cache::Cache::open(&kc, db.clone(), kiln::nix::SigningKey::generate("t-1").unwrap()).unwrap();
    Queue::start(
        db.clone(),
        cache,
        kiln::logs::Logs::new(state),
        MachineSource::File(machines.to_path_buf()),
        config,
        state.to_path_buf(),
        kiln::events::Events::new(),
        None,
        kiln::queue::leader::Leadership::Alone,
        kiln::upstream::Upstreams::none(),
    )
}

/// The `.drv` of a Nix expression, instantiated into the test's store.
pub fn instantiate(expr: &str) -> String {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("e.nix"), expr).unwrap();
    nix("nix-instantiate", &[d.path().join("e.nix").to_str().unwrap()]).trim().to_string()
}

/// Records a build of `drv` as job `job` of `jobset`; its id.
pub async fn new_build(db: &Db, jobset: i64, job: &str, drv: &str) -> i64 {
    let mut c = db.conn().await.unwrap();
    let nb = NewBuild {
        jobset_id: jobset,
        job: job.into(),
        drv_path: drv.into(),
        nix_name: job.into(),
        system: SYSTEM.into(),
        timeout: 600,
        max_silent: 600,
        priority: 100,
        ..Default::default()
    };
    builds::create(c.ex(), &nb).await.unwrap().id
}

pub async fn build(db: &Db, id: i64) -> Build {
    let mut c = db.conn().await.unwrap();
    builds::get(c.ex(), id).await.unwrap().unwrap()
}

/// The state of the step of `drv` in the database, if there is one.
pub async fn step_state(db: &Db, drv: &str) -> Option<String> {
    let mut c = db.conn().await.unwrap();
    kiln::db::steps::get_by_drv(c.ex(), drv).await.unwrap().map(|s| s.state)
}
