-- Triggers counted, so that a check clears only the triggers it saw: a
-- push that arrives while its jobset is being evaluated is evaluated next,
-- not cleared with the one that started the check.
ALTER TABLE jobsets ADD COLUMN trigger_seq BIGINT NOT NULL DEFAULT 0;
