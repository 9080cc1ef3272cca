-- outpost store, version 5: flush windows and the daily byte budget.

-- The link may also be "closed": not to be used now (outside
-- flush.windows, or the day's flush.daily_byte_budget spent). Like "down",
-- it stops the link-up clock, so mail that waits for a window or a budget
-- does not age. SQLite cannot change a CHECK constraint in place: the one
-- row moves to a new table.
CREATE TABLE link_v5 (
    id                INTEGER PRIMARY KEY CHECK (id = 1),
    state             TEXT NOT NULL CHECK (state IN ('up', 'down', 'unknown', 'closed')),
    since             INTEGER NOT NULL,
    last_error        TEXT,
    up_total          INTEGER NOT NULL DEFAULT 0,
    clock_at          INTEGER NOT NULL,
    last_flush_at     INTEGER,
    last_flush_result TEXT,
    last_etrn_at      INTEGER,
    last_etrn_result  TEXT
);
INSERT INTO link_v5 (id, state, since, last_error, up_total, clock_at, last_flush_at,
                     last_flush_result, last_etrn_at, last_etrn_result)
    SELECT id, state, since, last_error, up_total, clock_at, last_flush_at,
           last_flush_result, last_etrn_at, last_etrn_result
      FROM link;
DROP TABLE link;
ALTER TABLE link_v5 RENAME TO link;

-- Octets sent to the upstream per local day ('YYYY-MM-DD'), for
-- flush.daily_byte_budget. Days older than 40 are dropped as new ones come.
CREATE TABLE sent_bytes (
    day   TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL
);
