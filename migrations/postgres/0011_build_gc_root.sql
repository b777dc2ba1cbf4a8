-- The GC root that keeps a build's derivation while it is unfinished: a
-- store file written by the evaluator that references the derivations of
-- one group of jobs (NULL: the derivation itself is the root).
ALTER TABLE builds ADD COLUMN gc_root TEXT;
