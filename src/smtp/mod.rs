//! Inbound SMTP: relay, submission and submissions listeners.
//!
//! `data` reads message content strictly, `policy` decides who may send
//! where, `reply` holds every reply text, `session` is the dialog. Lines
//! come through `crate::codec`; `crate::server` runs the accept loops.

pub mod data;
pub mod policy;
pub mod reply;
pub mod session;
