//! Where the daemon's log lines go: a line that cannot be written (the log
//! is on a full disk, the pipe to the journal is gone) is dropped and
//! counted, and never disturbs the sessions that logged it.
//!
//! tracing-subscriber's own answer to a failed write is to complain with
//! `eprintln!`, and `eprintln!` panics when stderr cannot be written, which
//! is the same file: every session that logged anything then died without
//! a reply. [`Lossy`] never reports a failure, so that path is never taken.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};

static LOST: AtomicU64 = AtomicU64::new(0);

/// Log lines (or parts of lines) that could not be written since start.
pub fn lost() -> u64 {
    LOST.load(Ordering::Relaxed)
}

/// A writer whose failures are counted, not returned.
pub struct Lossy<W>(pub W);

impl<W: Write> Write for Lossy<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.write_all(buf).is_err() {
            LOST.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// The daemon's log writer: stderr, lossy.
pub fn stderr() -> Lossy<io::Stderr> {
    Lossy(io::stderr())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Full;

    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(28)) // ENOSPC
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(28))
        }
    }

    #[test]
    fn a_failed_write_is_counted_not_returned() {
        let before = lost();
        let mut w = Lossy(Full);
        assert!(w.write_all(b"a log line\n").is_ok());
        assert!(w.flush().is_ok());
        assert_eq!(lost(), before + 1);
        let mut ok = Lossy(Vec::new());
        ok.write_all(b"kept\n").unwrap();
        assert_eq!(ok.0, b"kept\n");
    }
}
