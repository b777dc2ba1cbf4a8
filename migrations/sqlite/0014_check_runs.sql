-- GitHub check runs Kiln created: the outbox's messages for one commit
-- (target) and check name (context) update the run GitHub gave this id.
-- A re-run removes the row, so the next message creates a new run.
CREATE TABLE check_runs (
    target      TEXT NOT NULL,
    context     TEXT NOT NULL,
    run_id      BIGINT NOT NULL,
    -- The last state GitHub took was completed (a later state that is not
    -- makes a new run), and how many annotations it has.
    completed   BOOLEAN NOT NULL DEFAULT FALSE,
    annotations_sent BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (target, context)
);
-- The template a pull request's or merge group's jobset was made from:
-- its checks' stable name.
ALTER TABLE jobsets ADD COLUMN template TEXT;
