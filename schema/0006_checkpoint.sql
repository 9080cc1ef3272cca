-- outpost store, version 6: CHECKPOINT (RFC 1845), the server side.

-- A transaction a client marked with TRANSID: while it is interrupted, its
-- envelope and the message content received so far, so that the client
-- can resume where the link broke; once complete, the queue id it was
-- committed as, so that a client that never heard the reply (RFC 1047)
-- learns it was taken instead of sending it again. Keyed by the TRANSID,
-- the client's EHLO name and who the client is (its account, or its
-- address): another client cannot take over a transaction. Purged after
-- smtp.checkpoint_keep.
CREATE TABLE partials (
    transid    TEXT NOT NULL,
    helo       TEXT NOT NULL,
    client     TEXT NOT NULL,
    sender     TEXT NOT NULL,
    envelope   TEXT NOT NULL,      -- JSON: MAIL parameters and recipients
    content    BLOB NOT NULL,      -- message content received so far
    size       INTEGER NOT NULL,   -- octets of content, whole when complete
    queue_id   TEXT,               -- set when the message was committed
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (transid, helo, client)
);
CREATE INDEX partials_updated ON partials (updated_at);

-- Client side: a big message on its way to the upstream, for `outpost
-- status` and `queue show` (octets sent, rate, time left). Updated every
-- few seconds while it goes, removed when its outcome is recorded; a row
-- left behind is a transfer the link cut, to be resumed.
CREATE TABLE transfers (
    message_id TEXT PRIMARY KEY,
    upstream   TEXT NOT NULL,
    size       INTEGER NOT NULL,   -- octets of the message
    resumed_at INTEGER NOT NULL,   -- the offset this try started from
    sent       INTEGER NOT NULL,   -- octets of it written so far (offset included)
    started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
