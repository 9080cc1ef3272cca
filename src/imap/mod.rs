//! IMAP (RFC 9051, with RFC 3501 clients in mind) for the local
//! mailboxes: the same accounts, store and limits as POP3, with folders.
//!
//! Commands are parsed by imap-codec, framed by imap-next (literals within
//! `imap.max_literal_size`, AUTHENTICATE, IDLE); the MIME structure comes
//! from mail-parser (`mime`). A folder holds references to messages stored
//! once; every change goes through the store's writer, and the writer's
//! signal tells sessions in IDLE to look again.

mod fetch;
mod mime;
mod search;
mod session;
mod wire;

pub use fetch::response as fetch_response;
pub use session::Session;
