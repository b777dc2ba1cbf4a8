-- The approval gate for pull requests from outside contributors. A
-- pull-request template says whose pull requests are built without
-- approval (GitHub's author_association values, as a JSON array) and
-- whether an approval covers later pushes. A pull request's jobset keeps
-- its author, the author's association, its latest head, and who approved
-- it at which head.
ALTER TABLE jobsets ADD COLUMN trusted_associations TEXT NOT NULL DEFAULT '["OWNER","MEMBER","COLLABORATOR"]';
ALTER TABLE jobsets ADD COLUMN approve_each_push BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE jobsets ADD COLUMN pr_author TEXT;
ALTER TABLE jobsets ADD COLUMN pr_association TEXT;
ALTER TABLE jobsets ADD COLUMN pr_head_sha TEXT;
ALTER TABLE jobsets ADD COLUMN approved_by TEXT;
ALTER TABLE jobsets ADD COLUMN approved_sha TEXT;
