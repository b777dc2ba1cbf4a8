-- Whether a cached path's narinfo carries Kiln's signature. Kiln signs what
-- it built; an upload keeps the uploader's signatures and gets Kiln's only
-- when it was signed by a trusted upload key (decision 014). Every row
-- written before this migration was signed by Kiln.
ALTER TABLE cache_paths ADD COLUMN kiln_signed BOOLEAN NOT NULL DEFAULT TRUE;
