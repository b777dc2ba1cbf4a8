-- Hydra's build products and metrics, read from an output's nix-support/
-- when a step is built: they belong to the step (its outputs), so every
-- build it tops has them.
CREATE TABLE step_products (
    step_id      BIGINT NOT NULL REFERENCES steps(id) ON DELETE CASCADE,
    nr           BIGINT NOT NULL,
    kind         TEXT NOT NULL,
    subtype      TEXT NOT NULL,
    path         TEXT NOT NULL,
    name         TEXT NOT NULL,
    default_path TEXT NOT NULL,
    file_size    BIGINT,
    PRIMARY KEY (step_id, nr)
);
CREATE TABLE step_metrics (
    step_id  BIGINT NOT NULL REFERENCES steps(id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    value    DOUBLE PRECISION NOT NULL,
    unit     TEXT,
    PRIMARY KEY (step_id, name)
);
