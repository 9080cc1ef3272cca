//! Outbound: the flush (decisions in `decide`, the driver in `flush`), the
//! SMTP client to the upstream, routes and delivery status notifications.

pub mod client;
pub mod decide;
pub mod dsn;
pub mod flush;
pub mod route;
