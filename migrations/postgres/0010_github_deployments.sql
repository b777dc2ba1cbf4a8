-- GitHub's Deployments API: the GitHub deployment that mirrors a Kiln
-- deployment, and the last status of ours that was queued for GitHub (the
-- reporter queues a state whenever the two differ).
ALTER TABLE deployments ADD COLUMN github_id BIGINT;
ALTER TABLE deployments ADD COLUMN github_reported TEXT;
