//! A user's folders (IMAP mailboxes): reading them, and the writer's side
//! of changing them.
//!
//! A message is stored once (`messages`, `bodies`); a folder holds
//! references to it (`mailbox` rows) with a UID and flags of their own, so
//! COPY and a delivery to several accounts add rows, never bodies. A body
//! goes when the last reference and the last pending recipient are gone.

use rusqlite::{params, OptionalExtension};

use super::{MailboxEntry, NewMessage, Store, StoreError};

/// The folder local delivery and POP3 use (RFC 9051 §5.1: the name is
/// case-insensitive; it is stored in this spelling).
pub const INBOX: &str = "INBOX";

/// The folders made at a user's first IMAP login, with their RFC 6154
/// special use, so that every client finds the same ones.
pub const SPECIAL_USE: &[(&str, &str)] = &[
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
];

/// One of a user's folders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    pub id: i64,
    pub name: String,
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub subscribed: bool,
    pub special_use: Option<String>,
}

/// How STORE changes flags (RFC 9051 §6.4.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagOp {
    Replace,
    Add,
    Remove,
}

/// A change to a user's folders, applied by the writer like any other.
/// What can be refused (a name taken, a folder missing) is checked again
/// here, under the write lock, and reported in [`super::Applied::refused`].
#[derive(Debug)]
#[cfg_attr(test, derive(Clone))]
pub enum FolderChange {
    /// INBOX and the special-use folders, those that are missing.
    Ensure {
        user: String,
    },
    Create {
        user: String,
        name: String,
    },
    /// Deletes the folder and its references (not its sub-folders).
    Delete {
        user: String,
        name: String,
    },
    /// Renames the folder and its sub-folders; renaming INBOX moves its
    /// messages into a new folder and leaves INBOX empty (RFC 9051 §6.3.6).
    Rename {
        user: String,
        from: String,
        to: String,
    },
    Subscribe {
        user: String,
        name: String,
        subscribed: bool,
    },
    /// A message a client stores (APPEND): the message and its reference,
    /// with the INTERNALDATE the client gave (the message's own arrival
    /// time stays the real one: housekeeping goes by it).
    Append {
        user: String,
        folder: String,
        message: Box<NewMessage>,
        flags: String,
        internal_date: i64,
    },
    /// References to the same messages in folder `to` (COPY); with
    /// `remove`, the originals go (MOVE). Reports the UIDs in
    /// [`super::Applied::uids`], source and new.
    Copy {
        user: String,
        rows: Vec<i64>,
        to: String,
        remove: bool,
    },
    /// STORE: each row's flags changed by `op` with `flags`.
    Flags {
        user: String,
        rows: Vec<i64>,
        op: FlagOp,
        flags: Vec<String>,
    },
    /// EXPUNGE: these references go, those that still have \Deleted
    /// (another session may have taken it off meanwhile).
    Expunge {
        user: String,
        rows: Vec<i64>,
    },
}

impl FolderChange {
    /// The account whose folders it changes.
    pub fn user(&self) -> &str {
        match self {
            FolderChange::Ensure { user }
            | FolderChange::Create { user, .. }
            | FolderChange::Delete { user, .. }
            | FolderChange::Rename { user, .. }
            | FolderChange::Subscribe { user, .. }
            | FolderChange::Append { user, .. }
            | FolderChange::Copy { user, .. }
            | FolderChange::Flags { user, .. }
            | FolderChange::Expunge { user, .. } => user,
        }
    }
}

/// `current` flags changed by `op` with `flags`; case-insensitive, each
/// once, in the order first seen.
pub fn merge_flags(current: &str, op: FlagOp, flags: &[String]) -> String {
    let mut out: Vec<&str> = match op {
        FlagOp::Replace => Vec::new(),
        _ => current.split(' ').filter(|f| !f.is_empty()).collect(),
    };
    for f in flags {
        let present = out.iter().position(|o| o.eq_ignore_ascii_case(f));
        match (op, present) {
            (FlagOp::Remove, Some(i)) => {
                out.remove(i);
            }
            (FlagOp::Add | FlagOp::Replace, None) => out.push(f),
            _ => {}
        }
    }
    out.join(" ")
}

fn folder_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Folder> {
    Ok(Folder {
        id: r.get(0)?,
        name: r.get(1)?,
        uidvalidity: r.get(2)?,
        uidnext: r.get(3)?,
        subscribed: r.get(4)?,
        special_use: r.get(5)?,
    })
}

const FOLDER_COLUMNS: &str = "id, name, uidvalidity, uidnext, subscribed, special_use";

impl Store {
    /// `user`'s folders, by name.
    pub fn folders(&self, user: &str) -> Result<Vec<Folder>, StoreError> {
        self.with(|c| {
            c.prepare_cached(&format!(
                "SELECT {FOLDER_COLUMNS} FROM folders WHERE user = ?1 ORDER BY name"
            ))?
            .query_map([user], folder_row)?
            .collect()
        })
    }

    /// `user`'s folder `name`; INBOX in any case.
    pub fn folder(&self, user: &str, name: &str) -> Result<Option<Folder>, StoreError> {
        let name = canonical(name);
        self.with(|c| {
            c.prepare_cached(&format!(
                "SELECT {FOLDER_COLUMNS} FROM folders WHERE user = ?1 AND name = ?2"
            ))?
            .query_row([user, name], folder_row)
            .optional()
        })
    }

    /// The messages in `user`'s folder `folder_id`, by UID (none when the
    /// folder is gone or not `user`'s).
    pub fn folder_messages(
        &self,
        user: &str,
        folder_id: i64,
    ) -> Result<Vec<MailboxEntry>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT mb.id, mb.message_id, mb.uid, mb.flags, m.sender, m.size,
                        mb.delivered_at, m.protocol = 'IMAP'
                   FROM mailbox mb JOIN messages m ON m.id = mb.message_id
                  WHERE mb.folder_id = ?1 AND mb.user = ?2 ORDER BY mb.uid",
            )?;
            let rows = st.query_map(params![folder_id, user], |r| {
                Ok(MailboxEntry {
                    id: r.get(0)?,
                    uid: r.get(1)?,
                    imap_uid: r.get(2)?,
                    flags: r.get(3)?,
                    sender: r.get(4)?,
                    stored_size: r.get(5)?,
                    delivered_at: r.get(6)?,
                    appended: r.get(7)?,
                })
            })?;
            rows.collect()
        })
    }

    /// The number of references in each of `user`'s folders, by name.
    pub fn folder_counts(&self, user: &str) -> Result<Vec<(String, i64, i64)>, StoreError> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT f.name, count(m.id), coalesce(sum(m.size), 0)
                   FROM folders f
                   LEFT JOIN mailbox mb ON mb.folder_id = f.id
                   LEFT JOIN messages m ON m.id = mb.message_id
                  WHERE f.user = ?1 GROUP BY f.id ORDER BY f.name",
            )?
            .query_map([user], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect()
        })
    }
}

/// INBOX in any case is INBOX; every other name is as given.
pub fn canonical(name: &str) -> &str {
    if name.eq_ignore_ascii_case(INBOX) {
        INBOX
    } else {
        name
    }
}

type Tx<'a> = rusqlite::Savepoint<'a>;

/// Applies one folder change in the writer's transaction.
pub(super) fn apply(
    tx: &Tx<'_>,
    change: &FolderChange,
    applied: &mut super::Applied,
) -> rusqlite::Result<()> {
    match change {
        FolderChange::Ensure { user } => {
            ensure(tx, user, INBOX, None)?;
            for (name, usage) in SPECIAL_USE {
                ensure(tx, user, name, Some(usage))?;
            }
        }
        FolderChange::Create { user, name } => {
            if folder_id(tx, user, name)?.is_some() {
                applied.refused = Some(format!("[ALREADYEXISTS] folder {name} exists"));
            } else {
                ensure(tx, user, name, None)?;
            }
        }
        FolderChange::Delete { user, name } => {
            let Some(id) = folder_id(tx, user, name)? else {
                applied.refused = Some(format!("[NONEXISTENT] no folder {name}"));
                return Ok(());
            };
            let rows: Vec<i64> = tx
                .prepare_cached("SELECT id FROM mailbox WHERE folder_id = ?1")?
                .query_map([id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            expunge(tx, user, &rows)?;
            tx.prepare_cached("DELETE FROM folders WHERE id = ?1")?
                .execute([id])?;
        }
        FolderChange::Rename { user, from, to } => rename(tx, user, from, to, applied)?,
        FolderChange::Subscribe {
            user,
            name,
            subscribed,
        } => {
            if folder_id(tx, user, name)?.is_none() {
                applied.refused = Some(format!("[NONEXISTENT] no folder {name}"));
                return Ok(());
            }
            tx.prepare_cached("UPDATE folders SET subscribed = ?3 WHERE user = ?1 AND name = ?2")?
                .execute(params![user, canonical(name), subscribed])?;
        }
        FolderChange::Append {
            user,
            folder,
            message,
            flags,
            internal_date,
        } => {
            let Some(id) = folder_id(tx, user, folder)? else {
                applied.refused = Some(format!("[TRYCREATE] no folder {folder}"));
                return Ok(());
            };
            super::writer::insert(tx, message)?;
            let uid = add_reference(tx, user, id, message.id.as_str(), *internal_date, flags)?;
            applied.uidvalidity = uidvalidity(tx, id)?;
            applied.uids.push((0, uid));
        }
        FolderChange::Copy {
            user,
            rows,
            to,
            remove,
        } => {
            let Some(dest) = folder_id(tx, user, to)? else {
                applied.refused = Some(format!("[TRYCREATE] no folder {to}"));
                return Ok(());
            };
            for row in rows {
                let found: Option<(String, i64, String, u32)> = tx
                    .prepare_cached(
                        "SELECT message_id, delivered_at, flags, uid FROM mailbox
                          WHERE id = ?1 AND user = ?2",
                    )?
                    .query_row(params![row, user], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })
                    .optional()?;
                // Expunged meanwhile by another session: nothing to copy.
                let Some((message_id, at, flags, uid)) = found else {
                    continue;
                };
                let new = add_reference(tx, user, dest, &message_id, at, &flags)?;
                applied.uids.push((uid, new));
            }
            if *remove {
                expunge(tx, user, rows)?;
            }
            applied.uidvalidity = uidvalidity(tx, dest)?;
        }
        FolderChange::Flags {
            user,
            rows,
            op,
            flags,
        } => {
            for row in rows {
                let current: Option<String> = tx
                    .prepare_cached("SELECT flags FROM mailbox WHERE id = ?1 AND user = ?2")?
                    .query_row(params![row, user], |r| r.get(0))
                    .optional()?;
                if let Some(current) = current {
                    let new = merge_flags(&current, *op, flags);
                    if new != current {
                        tx.prepare_cached("UPDATE mailbox SET flags = ?2 WHERE id = ?1")?
                            .execute(params![row, new])?;
                    }
                }
            }
        }
        FolderChange::Expunge { user, rows } => {
            let mut flagged = Vec::with_capacity(rows.len());
            for row in rows {
                let deleted = tx
                    .prepare_cached(
                        "SELECT 1 FROM mailbox WHERE id = ?1 AND user = ?2
                            AND ' ' || flags || ' ' LIKE '% \\deleted %'",
                    )?
                    .exists(params![row, user])?;
                if deleted {
                    flagged.push(*row);
                }
            }
            expunge(tx, user, &flagged)?
        }
    }
    Ok(())
}

fn folder_id(tx: &Tx<'_>, user: &str, name: &str) -> rusqlite::Result<Option<i64>> {
    tx.prepare_cached("SELECT id FROM folders WHERE user = ?1 AND name = ?2")?
        .query_row([user, canonical(name)], |r| r.get(0))
        .optional()
}

fn uidvalidity(tx: &Tx<'_>, folder: i64) -> rusqlite::Result<u32> {
    tx.prepare_cached("SELECT uidvalidity FROM folders WHERE id = ?1")?
        .query_row([folder], |r| r.get(0))
}

/// Makes the folder if it is missing; its UIDVALIDITY is above every one
/// given before (the `uidvalidity` counter), so that a name used again
/// never gets an old one.
pub(super) fn ensure(
    tx: &Tx<'_>,
    user: &str,
    name: &str,
    special_use: Option<&str>,
) -> rusqlite::Result<i64> {
    if let Some(id) = folder_id(tx, user, name)? {
        return Ok(id);
    }
    let uidvalidity: i64 = tx
        .prepare_cached(
            "UPDATE uidvalidity SET last = max(last + 1, CAST(strftime('%s', 'now') AS INTEGER))
              WHERE id = 1 RETURNING last",
        )?
        .query_row([], |r| r.get(0))?;
    tx.prepare_cached(
        "INSERT INTO folders (user, name, uidvalidity, special_use) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![user, canonical(name), uidvalidity, special_use])?;
    Ok(tx.last_insert_rowid())
}

/// A new reference to `message_id` in folder `folder`, with the next UID.
pub(super) fn add_reference(
    tx: &Tx<'_>,
    user: &str,
    folder: i64,
    message_id: &str,
    at: i64,
    flags: &str,
) -> rusqlite::Result<u32> {
    let uid: u32 = tx
        .prepare_cached(
            "UPDATE folders SET uidnext = uidnext + 1 WHERE id = ?1 RETURNING uidnext - 1",
        )?
        .query_row([folder], |r| r.get(0))?;
    tx.prepare_cached(
        "INSERT INTO mailbox (user, folder_id, uid, message_id, delivered_at, flags)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![user, folder, uid, message_id, at, flags])?;
    Ok(uid)
}

/// Removes references; a body no one needs any more goes with the last.
pub(super) fn expunge(tx: &Tx<'_>, user: &str, rows: &[i64]) -> rusqlite::Result<()> {
    for row in rows {
        let message_id: Option<String> = tx
            .prepare_cached("DELETE FROM mailbox WHERE id = ?1 AND user = ?2 RETURNING message_id")?
            .query_row(params![row, user], |r| r.get(0))
            .optional()?;
        if let Some(m) = message_id {
            super::writer::drop_body_if_done(tx, &m)?;
        }
    }
    Ok(())
}

fn rename(
    tx: &Tx<'_>,
    user: &str,
    from: &str,
    to: &str,
    applied: &mut super::Applied,
) -> rusqlite::Result<()> {
    let Some(id) = folder_id(tx, user, from)? else {
        applied.refused = Some(format!("[NONEXISTENT] no folder {from}"));
        return Ok(());
    };
    if folder_id(tx, user, to)?.is_some() {
        applied.refused = Some(format!("[ALREADYEXISTS] folder {to} exists"));
        return Ok(());
    }
    let below = format!("{from}/");
    if to.starts_with(&below) {
        applied.refused = Some(format!("[CANNOT] {from} cannot go inside itself"));
        return Ok(());
    }
    // The new name's missing levels are made, as CREATE makes them, so
    // that a client walking the tree with "%" finds it.
    let parents = |tx: &Tx<'_>| -> rusqlite::Result<()> {
        let levels: Vec<&str> = to.split('/').collect();
        for n in 1..levels.len() {
            ensure(tx, user, &levels[..n].join("/"), None)?;
        }
        Ok(())
    };
    if canonical(from) == INBOX {
        parents(tx)?;
        // RFC 9051 §6.3.6: INBOX's messages move to the new folder; INBOX
        // stays, empty. The messages keep their UIDs in a new UIDVALIDITY.
        let new = ensure(tx, user, to, None)?;
        tx.prepare_cached("UPDATE mailbox SET folder_id = ?2 WHERE folder_id = ?1")?
            .execute(params![id, new])?;
        tx.prepare_cached(
            "UPDATE folders SET uidnext = (SELECT uidnext FROM folders WHERE id = ?1) WHERE id = ?2",
        )?
        .execute(params![id, new])?;
        return Ok(());
    }
    // The folder and everything below it ("from/..."), each to its new
    // name, none of which may be taken.
    let names: Vec<(i64, String)> = tx
        .prepare_cached(
            "SELECT id, name FROM folders
              WHERE user = ?1 AND (id = ?2 OR substr(name, 1, length(?3)) = ?3)",
        )?
        .query_map(params![user, id, below], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let moves: Vec<(i64, String)> = names
        .into_iter()
        .map(|(fid, name)| (fid, format!("{to}{}", &name[from.len()..])))
        .collect();
    for (_, new) in &moves {
        if folder_id(tx, user, new)?.is_some() {
            applied.refused = Some(format!("[ALREADYEXISTS] folder {new} exists"));
            return Ok(());
        }
    }
    parents(tx)?;
    for (fid, new) in moves {
        tx.prepare_cached("UPDATE folders SET name = ?2 WHERE id = ?1")?
            .execute(params![fid, new])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store made by the outpost before folders (schema 7), with mail in
    /// two mailboxes, keeps every message after the upgrade: in INBOX, in
    /// the order it came, with UIDs from 1 and UIDNEXT after them.
    #[test]
    fn an_older_store_keeps_its_mailboxes_as_inboxes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.sqlite");
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            for (_, sql) in &super::super::MIGRATIONS[..7] {
                c.execute_batch(sql).unwrap();
            }
            c.pragma_update(None, "user_version", 7).unwrap();
            c.execute_batch(
                "INSERT INTO users VALUES ('alice', 'x', 0, 0), ('bob', 'x', 0, 0);
                 INSERT INTO messages (id, received_at, sender, size, client_addr, protocol)
                   VALUES ('M1', 10, 's@x', 3, '127.0.0.1', 'ESMTP'),
                          ('M2', 20, 's@x', 3, '127.0.0.1', 'ESMTP'),
                          ('M3', 30, '', 3, '127.0.0.1', 'ESMTP');
                 INSERT INTO bodies VALUES ('M1', x'610d0a'), ('M2', x'620d0a'), ('M3', x'630d0a');
                 INSERT INTO mailbox (user, message_id, delivered_at)
                   VALUES ('alice', 'M2', 20), ('bob', 'M1', 10), ('alice', 'M1', 10),
                          ('alice', 'M3', 30);",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let alice = store.mailbox("alice").unwrap();
        let got: Vec<(&str, u32)> = alice.iter().map(|e| (e.uid.as_str(), e.imap_uid)).collect();
        assert_eq!(got, [("M2", 1), ("M1", 2), ("M3", 3)]);
        assert!(alice.iter().all(|e| e.flags.is_empty() && !e.appended));
        let inbox = store.folder("alice", "inbox").unwrap().unwrap();
        assert_eq!((inbox.name.as_str(), inbox.uidnext), ("INBOX", 4));
        assert!(inbox.uidvalidity > 0);
        let bob = store.mailbox("bob").unwrap();
        assert_eq!(bob.len(), 1);
        assert_eq!((bob[0].uid.as_str(), bob[0].imap_uid), ("M1", 1));
        assert_eq!(store.body("M2").unwrap().unwrap(), b"b\r\n");
    }

    #[test]
    fn flags_merge_case_insensitively_and_once() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            merge_flags("\\Seen", FlagOp::Add, &f(&["\\seen", "\\Flagged"])),
            "\\Seen \\Flagged"
        );
        assert_eq!(
            merge_flags("\\Seen \\Flagged $x", FlagOp::Remove, &f(&["\\FLAGGED"])),
            "\\Seen $x"
        );
        assert_eq!(
            merge_flags("\\Seen", FlagOp::Replace, &f(&["\\Deleted", "\\deleted"])),
            "\\Deleted"
        );
        assert_eq!(merge_flags("", FlagOp::Remove, &f(&["\\Seen"])), "");
    }
}
