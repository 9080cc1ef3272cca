-- outpost store, version 2: what the flusher needs.

-- The link to the upstream: one row. `up_total` counts the seconds during
-- which the link was up, brought up to date at `clock_at`; retry.max_age is
-- measured on this clock, so an outage does not age mail (DESIGN rule 6).
CREATE TABLE link (
    id                INTEGER PRIMARY KEY CHECK (id = 1),
    state             TEXT NOT NULL CHECK (state IN ('up', 'down', 'unknown')),
    since             INTEGER NOT NULL,
    last_error        TEXT,
    up_total          INTEGER NOT NULL DEFAULT 0,
    clock_at          INTEGER NOT NULL,
    last_flush_at     INTEGER,
    last_flush_result TEXT
);
INSERT INTO link (id, state, since, clock_at)
    VALUES (1, 'unknown', CAST(strftime('%s', 'now') AS INTEGER), CAST(strftime('%s', 'now') AS INTEGER));

-- The link-up clock when the message arrived.
ALTER TABLE messages ADD COLUMN up_clock_at_receipt INTEGER NOT NULL DEFAULT 0;

-- The final dot went out and no reply came (RFC 1047): delivery uncertain.
ALTER TABLE recipients ADD COLUMN uncertain INTEGER NOT NULL DEFAULT 0;
-- A delay warning was sent for this recipient.
ALTER TABLE recipients ADD COLUMN warned INTEGER NOT NULL DEFAULT 0;
