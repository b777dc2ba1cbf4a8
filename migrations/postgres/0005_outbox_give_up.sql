-- A status GitHub refused for good (a 4xx other than rate limits) is
-- kept, with its reason, but no longer pending.
ALTER TABLE outbox ADD COLUMN given_up_at BIGINT;
DROP INDEX outbox_pending;
CREATE INDEX outbox_pending ON outbox (next_attempt_at, id) WHERE delivered_at IS NULL AND superseded = FALSE AND given_up_at IS NULL;
