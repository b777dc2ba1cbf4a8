-- Evaluation: a project's own sync state, per-pull-request jobset
-- templates, and the diff of an evaluation against the previous one.
ALTER TABLE projects ADD COLUMN error TEXT;
ALTER TABLE projects ADD COLUMN last_synced_at BIGINT;
ALTER TABLE jobsets ADD COLUMN pull_requests BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE evaluations ADD COLUMN prev_eval_id BIGINT;
ALTER TABLE evaluations ADD COLUMN jobs_new BIGINT NOT NULL DEFAULT 0;
ALTER TABLE evaluations ADD COLUMN jobs_removed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE evaluations ADD COLUMN jobs_changed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE evaluations ADD COLUMN errors_new BIGINT NOT NULL DEFAULT 0;
