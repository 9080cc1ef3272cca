-- outpost store, version 3: local mailboxes.

-- A message in a user's mailbox. The message itself stays in `bodies`,
-- once, however many mailboxes hold it; its queue id is the POP3 UID.
CREATE TABLE mailbox (
    id           INTEGER PRIMARY KEY,
    user         TEXT NOT NULL COLLATE NOCASE,
    message_id   TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    delivered_at INTEGER NOT NULL,
    UNIQUE (user, message_id)
);
CREATE INDEX mailbox_message ON mailbox (message_id);
