//! Outbound: delivery status notifications now; the SMTP client and the
//! flusher next.

pub mod client;
pub mod dsn;
pub mod flush;
pub mod route;
