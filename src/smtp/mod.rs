//! Inbound SMTP: relay, submission and submissions listeners.
//!
//! `codec` turns bytes into lines and buffers replies, `data` reads message
//! content strictly, `policy` decides who may send where, `reply` holds every
//! reply text, `session` is the dialog and `server` the accept loops.

pub mod codec;
pub mod data;
pub mod policy;
pub mod reply;
pub mod server;
pub mod session;
