-- Merge queues: a template jobset (merge_queue) from which each merge
-- group's branch (gh-readonly-queue/...) gets its own jobset, whose
-- statuses are reported under the template's name (report_as) so that
-- branch protection can require one context for every group.
ALTER TABLE jobsets ADD COLUMN merge_queue BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE jobsets ADD COLUMN report_as TEXT;
