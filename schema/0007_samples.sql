-- outpost store, version 7: a picture of the last day for the status page.

-- Every minute while the daemon serves [metrics], the queue's depth by
-- state and the link's state at that moment. Housekeeping drops rows older
-- than 48 hours, so the table stays near 2 880 rows.
CREATE TABLE samples (
    at       INTEGER PRIMARY KEY,
    queued   INTEGER NOT NULL,
    deferred INTEGER NOT NULL,
    held     INTEGER NOT NULL,
    link     TEXT NOT NULL
);
