-- Duration histograms kept as things finish (one row per histogram and
-- bucket: how many, and the sum of their seconds), so /metrics reads a
-- few rows instead of scanning every step at each scrape. Seeded from
-- what is there, with the bounds of metrics::BUCKETS (1, 5, 15, 60, 300,
-- 900, 3600 and 10800 s; bucket 8 is above the last).
CREATE TABLE histograms (
    name    TEXT NOT NULL,
    bucket  BIGINT NOT NULL,
    count   BIGINT NOT NULL,
    sum     DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, bucket)
);
INSERT INTO histograms (name, bucket, count, sum)
SELECT 'step_duration', b, COUNT(*), SUM(v) FROM (
    SELECT (stop_time - start_time) AS v,
        CASE WHEN stop_time - start_time <= 1 THEN 0 WHEN stop_time - start_time <= 5 THEN 1
             WHEN stop_time - start_time <= 15 THEN 2 WHEN stop_time - start_time <= 60 THEN 3
             WHEN stop_time - start_time <= 300 THEN 4 WHEN stop_time - start_time <= 900 THEN 5
             WHEN stop_time - start_time <= 3600 THEN 6 WHEN stop_time - start_time <= 10800 THEN 7 ELSE 8 END AS b
    FROM steps WHERE state IN ('succeeded', 'failed') AND start_time IS NOT NULL AND stop_time IS NOT NULL
) s GROUP BY b;
INSERT INTO histograms (name, bucket, count, sum)
SELECT 'evaluation_duration', b, COUNT(*), SUM(v) FROM (
    SELECT (duration_ms / 1000.0) AS v,
        CASE WHEN duration_ms <= 1000 THEN 0 WHEN duration_ms <= 5000 THEN 1
             WHEN duration_ms <= 15000 THEN 2 WHEN duration_ms <= 60000 THEN 3
             WHEN duration_ms <= 300000 THEN 4 WHEN duration_ms <= 900000 THEN 5
             WHEN duration_ms <= 3600000 THEN 6 WHEN duration_ms <= 10800000 THEN 7 ELSE 8 END AS b
    FROM evaluations WHERE status <> 'running' AND duration_ms IS NOT NULL
) e GROUP BY b;
