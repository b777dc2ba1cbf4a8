-- No query orders or filters builds by stop time yet; every evaluation
-- paid for keeping this index up to date.
DROP INDEX builds_by_stop;
