-- Environments are declared by the default branch's .kiln.toml; deployments
-- switch their hosts to an evaluation's closures, wave by wave. A
-- deployment's hosts carry their closures, so a deployment does not depend
-- on its evaluation being kept.
CREATE TABLE environments (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id  BIGINT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    spec        TEXT NOT NULL,
    declared    BOOLEAN NOT NULL DEFAULT TRUE,
    lease_owner TEXT,
    lease_until BIGINT,
    created_at  BIGINT NOT NULL,
    UNIQUE (project_id, name)
);

CREATE TABLE deployments (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    environment_id  BIGINT NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    eval_id         BIGINT NOT NULL,
    status          TEXT NOT NULL,
    reason          TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    started_at      BIGINT,
    finished_at     BIGINT,
    error           TEXT
);
CREATE INDEX deployments_by_environment ON deployments (environment_id, id);
CREATE INDEX deployments_open ON deployments (status) WHERE status IN ('waiting', 'queued', 'running');

CREATE TABLE deployment_hosts (
    deployment_id   BIGINT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    host            TEXT NOT NULL,
    wave            BIGINT NOT NULL,
    job             TEXT NOT NULL,
    build_id        BIGINT,
    store_path      TEXT NOT NULL,
    previous_path   TEXT,
    status          TEXT NOT NULL,
    work_dir        TEXT,
    log             TEXT NOT NULL DEFAULT '',
    checks          TEXT NOT NULL DEFAULT '[]',
    error           TEXT,
    started_at      BIGINT,
    finished_at     BIGINT,
    PRIMARY KEY (deployment_id, host)
);
