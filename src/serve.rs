//! `kiln serve`: opens the state directory and database, makes sure the
//! signing key and API tokens are in place, and runs the HTTP server until
//! SIGTERM or Ctrl-C, then shuts down cleanly (in-flight requests finish,
//! the database is closed).

use std::sync::Arc;

use thiserror::Error;
use tracing::info;

use crate::config::{Config, ConfigError};
use crate::db::{self, Db, DbError};
use crate::trigger::Evaluator;
use crate::web::{self, AppState};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot create state directory {path}: {source}")]
    StateDir { path: String, source: std::io::Error },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Github(#[from] crate::github::GithubError),
    #[error(transparent)]
    Forge(#[from] crate::forge::ForgeError),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
}

/// Opens the database named by the configuration and applies migrations.
pub async fn open_db(config: &Config) -> Result<Db, ServeError> {
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|source| ServeError::StateDir { path: config.state_dir.display().to_string(), source })?;
    let db = Db::connect(&config.database_url()).await?;
    let applied = db.migrate().await?;
    if applied > 0 {
        info!(applied, "database migrations applied");
    }
    Ok(db)
}

/// The parts of `kiln serve` a process runs; all of them by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// The HTTP server: pages, API, binary cache, webhooks.
    pub web: bool,
    /// Fetching and evaluating jobsets.
    pub eval: bool,
    /// The queue runner (one per database; others stand by).
    pub queue: bool,
    /// Sending GitHub statuses from the outbox.
    pub notify: bool,
}

impl Roles {
    pub const ALL: Roles = Roles { web: true, eval: true, queue: true, notify: true };

    /// `web,eval,queue,notify`, any subset.
    pub fn parse(s: &str) -> Result<Roles, String> {
        let mut r = Roles { web: false, eval: false, queue: false, notify: false };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "web" => r.web = true,
                "eval" => r.eval = true,
                "queue" => r.queue = true,
                "notify" => r.notify = true,
                other => return Err(format!("unknown role {other:?}: use web, eval, queue, notify")),
            }
        }
        if r == (Roles { web: false, eval: false, queue: false, notify: false }) {
            return Err("no role given".into());
        }
        Ok(r)
    }
}

pub async fn run(config: Config) -> Result<(), ServeError> {
    run_roles(config, Roles::ALL).await
}

/// Runs the given roles; the others run in other processes on the same
/// database (PostgreSQL, or SQLite on one machine).
pub async fn run_roles(config: Config, roles: Roles) -> Result<(), ServeError> {
    info!(web = roles.web, eval = roles.eval, queue = roles.queue, notify = roles.notify, "roles");
    let db = open_db(&config).await?;
    let tokens = {
        let tokens = config.api_tokens()?;
        let mut c = db.conn().await?;
        db::api_tokens::sync_from_files(c.ex(), &tokens).await?;
        if tokens.is_empty() {
            info!("no api_token_files configured: write endpoints refuse every request");
        }
        tokens
    };
    let key_file = config.cache_secret_key_file();
    let (key, generated) = crate::cache::load_or_generate_key(&key_file, &config.cache.key_name)?;
    if generated {
        info!(file = %key_file.display(), "generated cache signing key");
    }
    info!(public_key = %key.public(), "cache signing key");

    let config = Arc::new(config);
    let public_key = key.public();
    let cache = crate::cache::Cache::open(&config, db.clone(), key)?;
    let logs = crate::logs::Logs::new(&config.state_dir).share_through(cache.storage());
    let machines = crate::build::machine_source(&config, None);
    let events = crate::events::Events::new();
    let queue = crate::queue::Queue::start(
        db.clone(),
        cache.clone(),
        logs.clone(),
        machines,
        config.queue.clone(),
        config.state_dir.clone(),
        events.clone(),
        crate::github::policy(&config),
        if roles.queue {
            crate::queue::leader::Leadership::Database { db: db.clone(), state_dir: config.state_dir.clone() }
        } else {
            crate::queue::leader::Leadership::Never
        },
        crate::upstream::Upstreams::from_config(&config)?,
    );
    let evaluator = Evaluator::new(db.clone(), config.clone(), Some(queue.clone()), events.clone());
    evaluator.sync_config_projects().await?;

    // One stop signal for every part: the HTTP server drains, the
    // evaluator stops starting evaluations.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let eval_task = roles.eval.then(|| tokio::spawn(evaluator.clone().run(stopped(stop_rx.clone()))));

    // Periodic work. One process of a deployment collects and prunes: the
    // queue's; each web process reads its token files again.
    let mut periodic = if roles.queue {
        vec![
            tokio::spawn(periodic_gc(cache.clone(), config.clone(), stopped(stop_rx.clone()))),
            tokio::spawn(crate::history::run(
                db.clone(),
                logs.clone(),
                config.history.clone(),
                stopped(stop_rx.clone()),
            )),
        ]
    } else {
        Vec::new()
    };
    if roles.queue {
        let deployer = crate::deploy::Deployer::new(
            deploy_ctx(&config, &db, &public_key, Some(events.clone())),
            lease_owner(&config),
        );
        periodic.push(tokio::spawn(deployer.run(stopped(stop_rx.clone()))));
    }
    // Several processes on one PostgreSQL hear each other's events.
    if let crate::db::Db::Postgres(pool) = &db {
        periodic.push(tokio::spawn(crate::events::relay::run(pool.clone(), events.clone(), stopped(stop_rx.clone()))));
    }
    if roles.web && !config.api_token_files.is_empty() {
        periodic.push(tokio::spawn(watch_token_files(db.clone(), config.clone(), tokens, stopped(stop_rx.clone()))));
    }
    let (webhook_secret, sender_task) = match &config.github {
        Some(gh) => {
            let secret = match &gh.webhook_secret_file {
                Some(f) => Some(Arc::new(crate::github::read_secret("github.webhook_secret_file", f)?)),
                None => None,
            };
            let task = match crate::github::Credentials::from_config(gh)? {
                Some(_) if !roles.notify => None,
                Some(creds) => {
                    info!(api = %gh.api_url, "sending commit statuses to GitHub");
                    Some(tokio::spawn(crate::github::sender::run(
                        db.clone(),
                        creds,
                        config.base_url(),
                        stopped(stop_rx.clone()),
                    )))
                }
                None => {
                    info!("[github] has no token_file or app: statuses wait in the outbox");
                    None
                }
            };
            (secret, task)
        }
        None => (None, None),
    };
    let forges = Arc::new(crate::forge::Forge::load_all(&config)?);
    if !forges.is_empty() && roles.notify {
        info!(forges = forges.len(), "sending commit statuses to Gitea and Forgejo");
        periodic.push(tokio::spawn(crate::forge::run(db.clone(), forges.to_vec(), stopped(stop_rx.clone()))));
    }
    let session_key =
        crate::web::session::SessionKey::load_or_create(&config.state_dir.join("keys").join("session.key"))?;
    let state = AppState {
        db: db.clone(),
        config: config.clone(),
        public_key,
        evaluator,
        cache,
        logs,
        queue: queue.clone(),
        session_key,
        events: events.clone(),
        webhook_secret,
        forges,
        memo: crate::web::Memos::new(&events),
    };
    // Handlers first: a SIGTERM right after "listening" must stop us cleanly.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let server = if roles.web {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServeError::Bind { addr: config.listen.to_string(), source })?;
        let addr = listener.local_addr()?;
        info!("listening on http://{addr}");
        let header_timeout = std::time::Duration::from_secs(config.header_read_timeout_s);
        Some(http1_serve(listener, web::router(state), header_timeout, stopped(stop_rx.clone())))
    } else {
        info!("running without the web role: nothing listens");
        None
    };
    let server = async {
        match server {
            Some(s) => s.await,
            None => stopped(stop_rx).await,
        }
    };
    let signal = async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        info!("shutting down");
        events.close();
        let _ = stop_tx.send(true);
    };
    let ((), _) = tokio::join!(server, signal);
    // Running steps finish and are recorded, so nothing is half-done; what
    // outlasts the timeout is built again after the next start.
    let running = queue.status.lock().expect("status").running.len();
    if running > 0 {
        info!(running, timeout_s = config.queue.stop_timeout_s, "waiting for running steps");
    }
    if !queue.drain(std::time::Duration::from_secs(config.queue.stop_timeout_s)).await {
        tracing::warn!("steps still running at the stop timeout: they are built again after a restart");
    }
    queue.stop();
    if let Some(t) = eval_task {
        let _ = t.await;
    }
    for t in periodic {
        let _ = t.await;
    }
    if let Some(t) = sender_task {
        let _ = t.await;
    }
    db.close().await;
    Ok(())
}

/// Runs cache garbage collection every `cache.gc_interval_s`.
/// How often the token files are read again.
const TOKEN_RELOAD: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads `api_token_files` again every [`TOKEN_RELOAD`]: a token changed in
/// its file (rotated) works at once, and the old one, with the sessions
/// made from it, stops at the next request; a file that cannot be read
/// any more takes its token away (failing closed). The database is only
/// written when the tokens changed, in one transaction, so no request
/// sees a moment without tokens.
async fn watch_token_files(
    db: Db,
    config: Arc<Config>,
    mut last: Vec<(String, String)>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(TOKEN_RELOAD) => {}
        }
        let mut now = Vec::new();
        let mut unreadable = Vec::new();
        for f in &config.api_token_files {
            match crate::config::read_secret(f) {
                Ok(t) => now.push((f.display().to_string(), t)),
                Err(e) => unreadable.push(e),
            }
        }
        if now == last {
            continue;
        }
        let synced = async {
            let mut tx = db.begin().await?;
            db::api_tokens::sync_from_files(tx.ex(), &now).await?;
            tx.commit().await
        };
        match synced.await {
            Ok(()) => {
                info!(tokens = now.len(), "API tokens read again from their files");
                for e in &unreadable {
                    tracing::warn!(error = %e, "an API token file cannot be read: its token no longer works");
                }
                last = now;
            }
            Err(e) => tracing::warn!(error = %e, "cannot record the API tokens read again"),
        }
    }
}

async fn periodic_gc(cache: crate::cache::Cache, config: Arc<Config>, stop: impl std::future::Future<Output = ()>) {
    if config.cache.gc_interval_s == 0 {
        return;
    }
    let every = std::time::Duration::from_secs(config.cache.gc_interval_s);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(every) => {}
        }
        match crate::cache::gc::collect(&cache, config.cache.keep_uploads_days, false).await {
            Ok(r) => info!(
                deleted = r.deleted_paths.len(),
                files = r.deleted_files,
                freed = r.freed_bytes,
                "cache garbage collected"
            ),
            Err(e) => tracing::warn!(error = %e, "cache garbage collection failed"),
        }
    }
}

/// Serves HTTP/1.1 (what Nix and browsers here speak) on `listener` until
/// `stop`, then lets open requests finish. Hand-rolled instead of
/// `axum::serve` for two reasons measured on the cache: TCP_NODELAY (without
/// it a streamed body's first chunk waits for the ACK of the headers, 40 ms
/// a NAR) and no HTTP/2 sniffing on every connection. A client gets
/// `header_timeout` to send each request's header: without it one that
/// sends half a header, or connects and says nothing, holds its connection
/// and task for ever.
async fn http1_serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    header_timeout: std::time::Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        // hyper's header timeout needs a timer to run at all.
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    // Open requests get a while to finish; idle keep-alive connections close.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), graceful.shutdown()).await;
}

/// What deployments need from the server's configuration.
pub fn deploy_ctx(
    config: &Config,
    db: &crate::db::Db,
    public_key: &crate::nix::PublicKey,
    events: Option<crate::events::Events>,
) -> crate::deploy::run::Ctx {
    let d = &config.deploy;
    crate::deploy::run::Ctx {
        db: db.clone(),
        ssh: crate::deploy::host::Ssh {
            dir: config.state_dir.join("ssh-deploy"),
            key: d.ssh_key_file.clone(),
            connect_timeout: std::time::Duration::from_secs(d.connect_timeout_s),
        },
        activate_timeout: std::time::Duration::from_secs(d.activate_timeout_s),
        agent_wait: std::time::Duration::from_secs(d.agent_wait_s),
        substituter: Some((config.deploy_cache_url(), public_key.to_string())),
        events,
    }
}

/// This server's name in environment leases: the same after a restart, so
/// it takes its deployments back at once.
fn lease_owner(config: &Config) -> String {
    let dir = std::fs::canonicalize(&config.state_dir).unwrap_or_else(|_| config.state_dir.clone());
    format!("serve:{}", &crate::nix::Hash::sha256(dir.as_os_str().as_encoded_bytes()).to_hex()[..16])
}
