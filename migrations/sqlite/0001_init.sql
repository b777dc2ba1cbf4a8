-- Kiln's schema, modelled on Hydra's (Projects, Jobsets, JobsetEvals,
-- JobsetEvalMembers, Builds, BuildOutputs, BuildSteps) with steps shared
-- across builds. Timestamps are Unix seconds in BIGINT so SQLite and
-- PostgreSQL agree; lists are JSON text. Keep in step with
-- migrations/postgres/0001_init.sql: same tables, same columns.

CREATE TABLE projects (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT NOT NULL UNIQUE,
    display_name    TEXT NOT NULL DEFAULT '',
    description     TEXT NOT NULL DEFAULT '',
    repo            TEXT NOT NULL,
    github_repo     TEXT,
    enabled         BOOLEAN NOT NULL DEFAULT TRUE,
    hidden          BOOLEAN NOT NULL DEFAULT FALSE,
    declared_in     TEXT NOT NULL DEFAULT 'api',
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);

CREATE TABLE jobsets (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id          BIGINT NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    name                TEXT NOT NULL,
    branch              TEXT,
    pr_number           BIGINT,
    flake_dir           TEXT NOT NULL DEFAULT '',
    attributes          TEXT NOT NULL DEFAULT '["hydraJobs"]',
    systems             TEXT NOT NULL DEFAULT '[]',
    check_interval      BIGINT NOT NULL DEFAULT 300,
    scheduling_shares   BIGINT NOT NULL DEFAULT 100,
    keep_evaluations    BIGINT NOT NULL DEFAULT 3,
    enabled             BOOLEAN NOT NULL DEFAULT TRUE,
    hidden              BOOLEAN NOT NULL DEFAULT FALSE,
    config_hash         TEXT NOT NULL DEFAULT '',
    last_checked_at     BIGINT,
    trigger_at          BIGINT,
    force_eval          BOOLEAN NOT NULL DEFAULT FALSE,
    error               TEXT,
    error_at            BIGINT,
    created_at          BIGINT NOT NULL,
    UNIQUE (project_id, name)
);

CREATE TABLE evaluations (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    jobset_id       BIGINT NOT NULL REFERENCES jobsets(id) ON DELETE CASCADE,
    status          TEXT NOT NULL,
    commit_sha      TEXT NOT NULL,
    git_ref         TEXT NOT NULL,
    flake_ref       TEXT NOT NULL,
    lock_hash       TEXT,
    config_hash     TEXT NOT NULL DEFAULT '',
    started_at      BIGINT NOT NULL,
    finished_at     BIGINT,
    duration_ms     BIGINT,
    workers         BIGINT NOT NULL DEFAULT 1,
    jobs            BIGINT NOT NULL DEFAULT 0,
    error_jobs      BIGINT NOT NULL DEFAULT 0,
    new_builds      BIGINT NOT NULL DEFAULT 0,
    forced          BOOLEAN NOT NULL DEFAULT FALSE,
    error           TEXT,
    stderr          TEXT
);
CREATE INDEX evaluations_by_jobset ON evaluations (jobset_id, id);

CREATE TABLE steps (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    drv_path            TEXT NOT NULL UNIQUE,
    system              TEXT NOT NULL,
    required_features   TEXT NOT NULL DEFAULT '',
    state               TEXT NOT NULL,
    build_status        BIGINT,
    phase               TEXT,
    machine             TEXT,
    tries               BIGINT NOT NULL DEFAULT 0,
    next_try_at         BIGINT,
    timeout             BIGINT,
    max_silent          BIGINT,
    created_at          BIGINT NOT NULL,
    start_time          BIGINT,
    stop_time           BIGINT,
    error               TEXT,
    log_file            TEXT
);
CREATE INDEX steps_by_state ON steps (state, system);

CREATE TABLE step_deps (
    step_id     BIGINT NOT NULL REFERENCES steps(id) ON DELETE CASCADE,
    dep_id      BIGINT NOT NULL REFERENCES steps(id) ON DELETE CASCADE,
    PRIMARY KEY (step_id, dep_id)
);
CREATE INDEX step_deps_by_dep ON step_deps (dep_id);

CREATE TABLE step_outputs (
    step_id     BIGINT NOT NULL REFERENCES steps(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    path        TEXT NOT NULL,
    PRIMARY KEY (step_id, name)
);
CREATE INDEX step_outputs_by_path ON step_outputs (path);

CREATE TABLE builds (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    jobset_id           BIGINT NOT NULL REFERENCES jobsets(id) ON DELETE CASCADE,
    job                 TEXT NOT NULL,
    drv_path            TEXT NOT NULL,
    nix_name            TEXT NOT NULL,
    system              TEXT NOT NULL,
    description         TEXT,
    license             TEXT,
    maintainers         TEXT,
    homepage            TEXT,
    timeout             BIGINT NOT NULL DEFAULT 36000,
    max_silent          BIGINT NOT NULL DEFAULT 7200,
    priority            BIGINT NOT NULL DEFAULT 100,
    global_priority     BIGINT NOT NULL DEFAULT 0,
    is_aggregate        BOOLEAN NOT NULL DEFAULT FALSE,
    created_at          BIGINT NOT NULL,
    finished            BOOLEAN NOT NULL DEFAULT FALSE,
    build_status        BIGINT,
    start_time          BIGINT,
    stop_time           BIGINT,
    is_cached           BOOLEAN NOT NULL DEFAULT FALSE,
    keep                BOOLEAN NOT NULL DEFAULT FALSE,
    top_step_id         BIGINT REFERENCES steps(id),
    failed_step_id      BIGINT REFERENCES steps(id),
    error               TEXT
);
CREATE INDEX builds_by_job ON builds (jobset_id, job, id);
CREATE INDEX builds_by_drv ON builds (drv_path);
CREATE INDEX builds_unfinished ON builds (id) WHERE finished = FALSE;
CREATE INDEX builds_by_stop ON builds (stop_time);

CREATE TABLE eval_members (
    eval_id     BIGINT NOT NULL REFERENCES evaluations(id) ON DELETE CASCADE,
    job         TEXT NOT NULL,
    build_id    BIGINT REFERENCES builds(id),
    is_new      BOOLEAN NOT NULL DEFAULT FALSE,
    error       TEXT,
    PRIMARY KEY (eval_id, job)
);
CREATE INDEX eval_members_by_build ON eval_members (build_id);

CREATE TABLE build_outputs (
    build_id    BIGINT NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    path        TEXT NOT NULL,
    PRIMARY KEY (build_id, name)
);
CREATE INDEX build_outputs_by_path ON build_outputs (path);

CREATE TABLE aggregate_constituents (
    aggregate_id    BIGINT NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    constituent_id  BIGINT NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    PRIMARY KEY (aggregate_id, constituent_id)
);

CREATE TABLE machines (
    name                    TEXT PRIMARY KEY,
    enabled                 BOOLEAN NOT NULL DEFAULT TRUE,
    paused_until            BIGINT,
    consecutive_failures    BIGINT NOT NULL DEFAULT 0,
    last_failure_at         BIGINT,
    last_error              TEXT,
    steps_done              BIGINT NOT NULL DEFAULT 0,
    updated_at              BIGINT NOT NULL
);

CREATE TABLE cache_paths (
    hash_part   TEXT PRIMARY KEY,
    store_path  TEXT NOT NULL,
    nar_hash    TEXT NOT NULL,
    nar_size    BIGINT NOT NULL,
    file_hash   TEXT NOT NULL,
    file_size   BIGINT NOT NULL,
    nar_file    TEXT NOT NULL,
    compression TEXT NOT NULL,
    refs        TEXT NOT NULL DEFAULT '',
    deriver     TEXT,
    ca          TEXT,
    origin      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX cache_paths_by_nar ON cache_paths (nar_file);
CREATE INDEX cache_paths_by_created ON cache_paths (created_at);

CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL,
    target          TEXT NOT NULL,
    context         TEXT NOT NULL,
    payload         TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    delivered_at    BIGINT,
    superseded      BOOLEAN NOT NULL DEFAULT FALSE,
    last_error      TEXT
);
CREATE INDEX outbox_pending ON outbox (next_attempt_at, id) WHERE delivered_at IS NULL AND superseded = FALSE;
CREATE INDEX outbox_by_context ON outbox (target, context, id);

CREATE TABLE api_tokens (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT NOT NULL,
    token_sha256    TEXT NOT NULL UNIQUE,
    source          TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    last_used_at    BIGINT
);

CREATE TABLE webhook_deliveries (
    delivery_id TEXT PRIMARY KEY,
    received_at BIGINT NOT NULL
);
