-- outpost store, version 4: ETRN, both ways.

-- Hub role: when a branch last asked for its held mail (ETRN, or
-- `outpost flush --domain D`), and how many messages that released.
CREATE TABLE etrn_requests (
    spec     TEXT PRIMARY KEY,          -- "branch.example" or "@branch.example"
    at       INTEGER NOT NULL,
    released INTEGER NOT NULL
);

-- Branch role: the upstream's answers to our last ETRN.
ALTER TABLE link ADD COLUMN last_etrn_at INTEGER;
ALTER TABLE link ADD COLUMN last_etrn_result TEXT;
