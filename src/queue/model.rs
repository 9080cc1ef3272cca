//! What the store keeps, in mail terms.

use std::fmt;
use std::str::FromStr;

use rand::Rng;

/// A message's queue id: 14 characters, time-ordered, unique in practice.
///
/// Seconds since 2020 in 6 base-32 digits (good for 34 years), the fraction
/// of the second in 2 (about a millisecond), a counter in 3 (unique within
/// this process for 32 768 ids per millisecond), then 3 random digits (for
/// other processes writing the same store, such as `outpost sendmail`):
/// ids sort by arrival, so the flusher sends oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(String);

const ALPHABET: &[u8; 32] = b"0123456789BCDFGHJKLMNPQRSTVWXYZa";

impl QueueId {
    pub fn generate() -> QueueId {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs().saturating_sub(1_577_836_800);
        let frac = (now.subsec_nanos() as u64 * 1024) / 1_000_000_000;
        let stamp = (secs << 10) | frac;
        let mut s = String::with_capacity(14);
        for i in (0..8).rev() {
            s.push(ALPHABET[((stamp >> (5 * i)) & 31) as usize] as char);
        }
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for i in (0..3).rev() {
            s.push(ALPHABET[((n >> (5 * i)) & 31) as usize] as char);
        }
        let mut rng = rand::rng();
        for _ in 0..3 {
            s.push(ALPHABET[rng.random_range(0..32)] as char);
        }
        QueueId(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a recipient's copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Forwarded to the upstream relay.
    Upstream,
    /// A mailbox on this gateway.
    Local,
    /// Kept for a hub domain until its branch asks (ETRN).
    Hold,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Upstream => "upstream",
            Route::Local => "local",
            Route::Hold => "hold",
        }
    }
}

impl FromStr for Route {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "upstream" => Route::Upstream,
            "local" => Route::Local,
            "hold" => Route::Hold,
            _ => return Err(format!("unknown route {s}")),
        })
    }
}

/// A recipient's state in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientState {
    Queued,
    Deferred,
    Held,
    Delivered,
    Bounced,
    Expired,
}

impl RecipientState {
    pub const ALL: [RecipientState; 6] = [
        RecipientState::Queued,
        RecipientState::Deferred,
        RecipientState::Held,
        RecipientState::Delivered,
        RecipientState::Bounced,
        RecipientState::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RecipientState::Queued => "queued",
            RecipientState::Deferred => "deferred",
            RecipientState::Held => "held",
            RecipientState::Delivered => "delivered",
            RecipientState::Bounced => "bounced",
            RecipientState::Expired => "expired",
        }
    }

    /// Delivered, bounced or expired: nothing more will happen.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RecipientState::Delivered | RecipientState::Bounced | RecipientState::Expired
        )
    }
}

impl fmt::Display for RecipientState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RecipientState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RecipientState::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown state `{s}`: expected queued, deferred, held, delivered, bounced or expired")
            })
    }
}

/// What is known about the link to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Up,
    Down,
    #[default]
    Unknown,
    /// Not to be used now: outside `flush.windows`, or the day's
    /// `flush.daily_byte_budget` is spent. The link-up clock stands still.
    Closed,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Up => "up",
            LinkState::Down => "down",
            LinkState::Unknown => "unknown",
            LinkState::Closed => "closed",
        }
    }
}

impl FromStr for LinkState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "up" => LinkState::Up,
            "down" => LinkState::Down,
            "unknown" => LinkState::Unknown,
            "closed" => LinkState::Closed,
            _ => return Err(format!("unknown link state {s}")),
        })
    }
}

impl fmt::Display for LinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The link row, as `outpost status` shows it.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    pub state: LinkState,
    pub since: i64,
    pub last_error: Option<String>,
    pub last_flush_at: Option<i64>,
    pub last_flush_result: Option<String>,
    /// Seconds the link has been up, in all, as of now.
    pub up_clock: i64,
}

/// Pending recipients by state, for `outpost status`.
#[derive(Debug, Clone, Default)]
pub struct QueueCounts {
    pub by_state: Vec<(String, i64)>,
    /// When the oldest pending message arrived.
    pub oldest: Option<i64>,
    pub uncertain: i64,
    /// The earliest next attempt of an upstream recipient.
    pub next_due: Option<i64>,
}

impl QueueCounts {
    /// Pending recipients in `state`.
    pub fn count(&self, state: RecipientState) -> i64 {
        self.by_state
            .iter()
            .find(|(k, _)| k == state.as_str())
            .map(|(_, n)| *n)
            .unwrap_or(0)
    }
}

/// A message with recipients due for the upstream.
#[derive(Debug, Clone)]
pub struct DueMessage {
    pub id: String,
    pub received_at: i64,
    /// Octets of the stored message.
    pub size: i64,
    pub up_clock_at_receipt: i64,
    pub sender: String,
    pub body_type: Option<String>,
    pub smtputf8: bool,
    pub dsn_ret: Option<DsnRet>,
    pub dsn_envid: Option<String>,
    pub recipients: Vec<DueRecipient>,
}

#[derive(Debug, Clone)]
pub struct DueRecipient {
    pub idx: u32,
    pub address: String,
    pub attempts: u32,
    pub notify: Option<String>,
    pub orcpt: Option<String>,
    pub warned: bool,
    pub last_reply: Option<String>,
    pub domain: String,
    pub next_attempt: i64,
    pub route: Route,
    /// Queued or deferred (waiting), or held (for a branch's ETRN, or by
    /// the administrator).
    pub state: RecipientState,
}

/// Hub role: mail held for one domain.
#[derive(Debug, Clone)]
pub struct HeldDomain {
    pub domain: String,
    pub messages: i64,
    /// When the domain last asked for its mail (ETRN), if ever.
    pub last_asked: Option<i64>,
}

/// A message accepted by a session, ready to be committed.
#[derive(Debug)]
#[cfg_attr(test, derive(Clone))]
pub struct NewMessage {
    pub id: QueueId,
    pub received_at: i64,
    /// Empty for the null sender.
    pub sender: String,
    pub client_addr: String,
    pub client_helo: String,
    pub auth_user: Option<String>,
    pub protocol: String,
    pub body_type: Option<String>,
    pub smtputf8: bool,
    pub dsn_ret: Option<DsnRet>,
    pub dsn_envid: Option<String>,
    pub recipients: Vec<NewRecipient>,
    /// The whole message, CRLF line ends, Received header first; a large
    /// one mostly in a spool file.
    pub body: super::Body,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NewRecipient {
    pub address: String,
    pub domain: String,
    pub route: Route,
    pub dsn_notify: Option<String>,
    pub dsn_orcpt: Option<String>,
    /// For a local recipient: the accounts whose mailboxes get the message
    /// in the same commit (an alias may name several).
    pub mailboxes: Vec<String>,
}

/// RET= of MAIL (RFC 3461): what a failure notice returns of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DsnRet {
    /// The whole message.
    Full,
    /// Its header only.
    Hdrs,
}

impl DsnRet {
    pub fn as_str(self) -> &'static str {
        match self {
            DsnRet::Full => "FULL",
            DsnRet::Hdrs => "HDRS",
        }
    }
}

impl fmt::Display for DsnRet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl rusqlite::types::ToSql for DsnRet {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl rusqlite::types::FromSql for DsnRet {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        match v.as_str()? {
            "FULL" => Ok(DsnRet::Full),
            "HDRS" => Ok(DsnRet::Hdrs),
            other => Err(rusqlite::types::FromSqlError::Other(
                format!("RET={other} is neither FULL nor HDRS").into(),
            )),
        }
    }
}

/// A recipient not yet final, for the queue administration commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRecipient {
    pub message_id: String,
    pub idx: u32,
    pub state: RecipientState,
    pub route: Route,
}

/// Which interrupted (or completed) transaction: the client's TRANSID, its
/// EHLO name, and who it is (its account, or its address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionKey {
    pub transid: String,
    pub helo: String,
    pub client: String,
}

/// The MAIL parameters and recipients of a transaction, kept with a
/// checkpoint so that a resumed transaction needs neither again.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    pub body_type: Option<String>,
    pub smtputf8: bool,
    pub dsn_ret: Option<DsnRet>,
    pub dsn_envid: Option<String>,
    pub recipients: Vec<NewRecipient>,
}

/// A big message on its way to the upstream (or cut on its way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub message_id: String,
    pub upstream: String,
    pub size: i64,
    /// The offset this try started from (CHECKPOINT), 0 for a whole one.
    pub resumed_at: i64,
    /// Octets written so far, the offset included.
    pub sent: i64,
    pub started_at: i64,
    pub updated_at: i64,
}

/// A checkpointed transaction (RFC 1845).
#[derive(Debug)]
#[cfg_attr(test, derive(Clone))]
pub struct Partial {
    pub key: TransactionKey,
    pub sender: String,
    pub envelope: Envelope,
    /// The message content received so far (empty once complete).
    pub content: super::Body,
    /// Octets of content: received so far, or the whole message.
    pub size: i64,
    /// The queue id, once the message was committed.
    pub queue_id: Option<String>,
    pub updated_at: i64,
}

impl NewRecipient {
    /// The state a recipient starts in: hold-domain mail waits for ETRN.
    pub fn initial_state(&self) -> RecipientState {
        match self.route {
            Route::Hold => RecipientState::Held,
            Route::Upstream | Route::Local => RecipientState::Queued,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RecipientStatus {
    pub address: String,
    pub route: Route,
    pub state: RecipientState,
    pub attempts: u32,
    pub next_attempt: i64,
    pub last_reply: Option<String>,
}

#[derive(Debug, Clone)]
pub struct MessageSummary {
    pub id: String,
    pub received_at: i64,
    pub size: i64,
    pub sender: String,
    pub protocol: String,
    pub recipients: Vec<RecipientStatus>,
}

#[derive(Debug, Clone)]
pub struct MessageDetail {
    pub summary: MessageSummary,
    pub client_addr: String,
    pub client_helo: String,
    pub auth_user: Option<String>,
    pub body_type: Option<String>,
    pub smtputf8: bool,
    pub dsn_ret: Option<DsnRet>,
    pub dsn_envid: Option<String>,
    /// The header section as stored; None once the body is gone.
    pub headers: Option<String>,
    pub history: Vec<HistoryEntry>,
}

#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub at: i64,
    pub recipient: Option<u32>,
    pub event: String,
    pub detail: String,
}

/// One message in one of a user's folders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxEntry {
    /// The row: what POP3 deletes and IMAP commands name internally.
    pub id: i64,
    /// The queue id: stable, unique in the mailbox, the POP3 UID.
    pub uid: String,
    /// The IMAP UID, ascending in its folder.
    pub imap_uid: u32,
    /// IMAP flags, space-separated (`\Seen \Flagged $Label1`).
    pub flags: String,
    pub sender: String,
    /// Size of the stored message (without the Return-Path line added when
    /// it is read).
    pub stored_size: i64,
    /// When it came into the folder (the IMAP INTERNALDATE).
    pub delivered_at: i64,
    /// Stored by an IMAP client (APPEND): read back exactly as given, with
    /// no Return-Path line added.
    pub appended: bool,
}

impl MailboxEntry {
    /// The line a reader sees first (RFC 5321 §4.4: the final delivery
    /// adds it); nothing for a message a client stored itself.
    pub fn return_path(&self) -> String {
        if self.appended {
            return String::new();
        }
        format!("Return-Path: <{}>\r\n", self.sender)
    }

    /// Whether the message has flag `flag` (case-insensitive, RFC 9051 §2.3.2).
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.split(' ').any(|f| f.eq_ignore_ascii_case(flag))
    }

    /// The size a POP3 client sees.
    pub fn size(&self) -> i64 {
        self.stored_size + self.return_path().len() as i64
    }
}

/// The database's pages (SQLite's page_count, freelist_count, page_size,
/// auto_vacuum: 0 none, 1 full, 2 incremental).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageStats {
    pub pages: i64,
    pub free: i64,
    pub size: i64,
    pub auto_vacuum: i64,
}

/// The store's size on disk, for `outpost status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    /// The database file.
    pub size_bytes: u64,
    /// Its write-ahead log (`<path>-wal`).
    pub wal_bytes: u64,
    /// Free pages inside the database file (reused before the file grows).
    pub free_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct UserRow {
    pub name: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_are_unique_and_ordered_by_time() {
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| QueueId::generate()).collect();
        assert_eq!(ids.len(), 10_000);
        let a = QueueId::generate();
        std::thread::sleep(std::time::Duration::from_millis(3));
        let b = QueueId::generate();
        assert!(a < b, "{a} then {b}");
        let a = QueueId::generate();
        assert_eq!(a.as_str().len(), 14);
        assert!(a.as_str().bytes().all(|b| ALPHABET.contains(&b)));
        // the time prefix is ordered: ALPHABET is in ASCII order
        let mut sorted = ALPHABET.to_vec();
        sorted.sort();
        assert_eq!(&sorted[..], &ALPHABET[..]);
    }

    #[test]
    fn states_round_trip() {
        for s in RecipientState::ALL {
            assert_eq!(s.as_str().parse::<RecipientState>().unwrap(), s);
        }
        assert!("lost".parse::<RecipientState>().is_err());
    }
}
