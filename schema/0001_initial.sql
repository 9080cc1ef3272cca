-- outpost store, version 1. Never edit once shipped: add 0002_*.sql instead.
-- Times are Unix seconds (UTC).

-- One row per accepted message: the envelope and where it came from.
CREATE TABLE messages (
    id          TEXT PRIMARY KEY,       -- queue id, as told to the client in "queued as"
    received_at INTEGER NOT NULL,
    sender      TEXT NOT NULL,          -- '' is the null sender <>
    size        INTEGER NOT NULL,       -- bytes of the stored body
    client_addr TEXT NOT NULL,          -- peer IP, or 'local' for the sendmail command
    client_helo TEXT NOT NULL DEFAULT '',
    auth_user   TEXT,                   -- submission account, when authenticated
    protocol    TEXT NOT NULL,          -- SMTP, ESMTP, ESMTPS, ESMTPSA ... (RFC 3848)
    body_type   TEXT,                   -- BODY= (7BIT, 8BITMIME)
    smtputf8    INTEGER NOT NULL DEFAULT 0,
    dsn_ret     TEXT,                   -- RET= (FULL, HDRS)
    dsn_envid   TEXT                    -- ENVID=
) WITHOUT ROWID;

-- The message itself (Received header included, CRLF line ends, dots
-- unstuffed), stored once. Deleted when every recipient is final.
CREATE TABLE bodies (
    message_id TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    data       BLOB NOT NULL
);

-- One row per recipient with its own state.
CREATE TABLE recipients (
    message_id   TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    idx          INTEGER NOT NULL,      -- order given at RCPT
    address      TEXT NOT NULL,
    domain       TEXT NOT NULL,         -- lower case, for ETRN and "flush this domain"
    route        TEXT NOT NULL CHECK (route IN ('upstream', 'local', 'hold')),
    state        TEXT NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'deferred', 'held', 'delivered', 'bounced', 'expired')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL,
    last_reply   TEXT,
    dsn_notify   TEXT,                  -- NOTIFY= (e.g. 'FAILURE,DELAY', 'NEVER')
    dsn_orcpt    TEXT,                  -- ORCPT= as given (addr-type;xtext)
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (message_id, idx)
) WITHOUT ROWID;

-- What the flusher asks: which recipients are due now.
CREATE INDEX recipients_due ON recipients (next_attempt)
    WHERE state IN ('queued', 'deferred');
-- ETRN and "flush --domain": pending mail per destination domain.
CREATE INDEX recipients_domain ON recipients (domain, state);
CREATE INDEX recipients_state ON recipients (state);

-- Every delivery attempt and state change, for `queue show`.
CREATE TABLE history (
    id         INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    rcpt_idx   INTEGER,                 -- NULL: concerns the whole message
    at         INTEGER NOT NULL,
    event      TEXT NOT NULL,           -- received, delivered, deferred, bounced, held, ...
    detail     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX history_message ON history (message_id);

-- Accounts for submission AUTH and POP3 (argon2 PHC strings).
CREATE TABLE users (
    name          TEXT PRIMARY KEY COLLATE NOCASE,
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
) WITHOUT ROWID;
