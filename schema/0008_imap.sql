-- outpost store, version 8: IMAP folders, UIDs and flags.

-- A user's folders. INBOX is the one local delivery and POP3 use; the
-- others are made by IMAP clients (and the special-use folders at the
-- first IMAP login). Names are IMAP names with '/' between levels.
-- Ids are never reused (AUTOINCREMENT): a session that still names a
-- deleted folder or message by id finds nothing, never another one.
CREATE TABLE folders (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user        TEXT NOT NULL COLLATE NOCASE,
    name        TEXT NOT NULL,
    -- RFC 9051 §2.3.1.1: never reused for a name, so a folder deleted and
    -- made again is not mistaken for the old one by a client's cache
    -- (from the `uidvalidity` counter below).
    uidvalidity INTEGER NOT NULL,
    uidnext     INTEGER NOT NULL DEFAULT 1,
    subscribed  INTEGER NOT NULL DEFAULT 1,
    special_use TEXT,                   -- \Sent, \Drafts, \Trash, \Junk, \Archive
    UNIQUE (user, name)
);

INSERT INTO folders (user, name, uidvalidity)
SELECT name, 'INBOX', CAST(strftime('%s', 'now') AS INTEGER)
  FROM (SELECT name FROM users UNION SELECT DISTINCT user FROM mailbox);

-- The last UIDVALIDITY given to a folder. The next folder gets one above
-- it (and above the clock), so that a folder deleted and made again never
-- gets its old one back, whatever became of the folders in between.
CREATE TABLE uidvalidity (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);
INSERT INTO uidvalidity VALUES (1, (SELECT coalesce(max(uidvalidity), 0) FROM folders));

-- A message in a folder: a reference to the message, stored once in
-- `bodies` however many folders hold it. `uid` is its IMAP UID, unique
-- and ascending in the folder; `flags` its IMAP flags, space-separated.
-- The queue id (`message_id`) stays the POP3 UID.
CREATE TABLE mailbox_v8 (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user         TEXT NOT NULL COLLATE NOCASE,
    folder_id    INTEGER NOT NULL REFERENCES folders(id),
    uid          INTEGER NOT NULL,
    message_id   TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    delivered_at INTEGER NOT NULL,      -- the IMAP INTERNALDATE
    flags        TEXT NOT NULL DEFAULT '',
    UNIQUE (folder_id, uid)
);

INSERT INTO mailbox_v8 (id, user, folder_id, uid, message_id, delivered_at)
SELECT mb.id, mb.user, f.id,
       (SELECT count(*) FROM mailbox o WHERE o.user = mb.user AND o.id <= mb.id),
       mb.message_id, mb.delivered_at
  FROM mailbox mb JOIN folders f ON f.user = mb.user AND f.name = 'INBOX';

UPDATE folders SET uidnext = 1 + coalesce(
    (SELECT max(uid) FROM mailbox_v8 WHERE folder_id = folders.id), 0);

DROP TABLE mailbox;
ALTER TABLE mailbox_v8 RENAME TO mailbox;
CREATE INDEX mailbox_message ON mailbox (message_id);
CREATE INDEX mailbox_user ON mailbox (user);
