//! Message content on its way into the store.
//!
//! A message being received is kept in memory only while it is small. Past
//! [`SPILL_OVER`] octets the session moves what it has into a [`Spool`]: an
//! unnamed file in the store's directory (`O_TMPFILE`, so a crash leaves
//! nothing behind), written on a blocking thread. The writer copies the
//! finished [`Body`] into the database through a blob handle in blocks of
//! [`COPY_BLOCK`]. So the memory a session holds does not depend on the
//! size of the message it receives, and forty 8 MiB uploads at once cost a
//! few MiB, not 320.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Content a session keeps in memory before it goes to a spool file.
pub const SPILL_OVER: usize = 128 * 1024;

/// The block in which a spooled body is read back into the database.
const COPY_BLOCK: usize = 256 * 1024;

/// Where spool files are made: the store's own directory, so that a body
/// is on the same file system (and under the same `store.min_free`) as the
/// database it goes into.
pub fn spool_dir(store_path: &Path) -> PathBuf {
    match store_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A whole message or a part of one: `head`, then what a spool file holds,
/// then `tail`.
#[derive(Debug, Default)]
pub struct Body {
    /// Written first (the `Received:` field this gateway adds).
    head: Vec<u8>,
    file: Option<File>,
    file_len: u64,
    tail: Vec<u8>,
}

#[cfg(test)]
impl Clone for Body {
    fn clone(&self) -> Body {
        Body {
            head: self.head.clone(),
            file: self.file.as_ref().map(|f| f.try_clone().unwrap()),
            file_len: self.file_len,
            tail: self.tail.clone(),
        }
    }
}

impl From<Vec<u8>> for Body {
    fn from(tail: Vec<u8>) -> Body {
        Body {
            tail,
            ..Body::default()
        }
    }
}

impl Body {
    /// `head` put in front of the content.
    pub fn with_head(mut self, head: Vec<u8>) -> Body {
        self.head = head;
        self
    }

    /// Octets in all.
    pub fn len(&self) -> u64 {
        self.head.len() as u64 + self.file_len + self.tail.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the first `n` octets after the head (what a checkpoint keeps
    /// of an interrupted transfer: whole lines of DATA).
    pub fn truncate(&mut self, n: u64) -> io::Result<()> {
        if n <= self.file_len {
            self.tail.clear();
            if n < self.file_len {
                if let Some(f) = &self.file {
                    f.set_len(n)?;
                }
                self.file_len = n;
            }
        } else {
            let keep = usize::try_from(n - self.file_len).unwrap_or(usize::MAX);
            self.tail.truncate(keep);
        }
        Ok(())
    }

    /// Hands the body to `sink` in order, in blocks of at most
    /// [`COPY_BLOCK`] octets for the spooled part, with each block's offset.
    pub fn copy_to(&self, mut sink: impl FnMut(u64, &[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut at = 0u64;
        if !self.head.is_empty() {
            sink(at, &self.head)?;
            at += self.head.len() as u64;
        }
        if let Some(f) = &self.file {
            let mut block = vec![0u8; COPY_BLOCK.min(self.file_len as usize)];
            let mut done = 0u64;
            while done < self.file_len {
                let want = (self.file_len - done).min(block.len() as u64) as usize;
                f.read_exact_at(&mut block[..want], done)?;
                sink(at, &block[..want])?;
                at += want as u64;
                done += want as u64;
            }
        }
        if !self.tail.is_empty() {
            sink(at, &self.tail)?;
        }
        Ok(())
    }

    /// The body as one buffer, without a copy when it is all in memory.
    pub fn into_vec(self) -> io::Result<Vec<u8>> {
        if self.head.is_empty() && self.file.is_none() {
            return Ok(self.tail);
        }
        self.to_vec()
    }

    /// The whole body in memory, for the few places that need it so (a
    /// resumed transaction's content, tests).
    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(usize::try_from(self.len()).unwrap_or(0));
        self.copy_to(|_, b| {
            out.extend_from_slice(b);
            Ok(())
        })?;
        Ok(out)
    }
}

/// Where a session puts content past [`SPILL_OVER`]: a file made on first
/// use, appended to on a blocking thread. A failed write (a full disk) is
/// remembered; the rest is dropped, and [`Spool::finish`] reports it, so
/// that the session reads on to the end of the data and then refuses.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    file: Option<File>,
    len: u64,
    error: Option<io::Error>,
}

impl Spool {
    pub fn new(dir: PathBuf) -> Spool {
        Spool {
            dir,
            file: None,
            len: 0,
            error: None,
        }
    }

    /// Octets written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `chunk`.
    pub async fn write(&mut self, chunk: Vec<u8>) {
        if self.error.is_some() || chunk.is_empty() {
            return;
        }
        let file = self.file.take();
        let dir = self.dir.clone();
        let n = chunk.len() as u64;
        let done = tokio::task::spawn_blocking(move || {
            let mut f = match file {
                Some(f) => f,
                None => tempfile::tempfile_in(&dir)?,
            };
            f.write_all(&chunk)?;
            Ok::<File, io::Error>(f)
        })
        .await;
        match done {
            Ok(Ok(f)) => {
                self.file = Some(f);
                self.len += n;
            }
            Ok(Err(e)) => self.error = Some(e),
            Err(e) => self.error = Some(io::Error::other(e)),
        }
    }

    /// The content: what was spooled, then `tail`. Fails when a write did.
    pub fn finish(self, tail: Vec<u8>) -> io::Result<Body> {
        if let Some(e) = self.error {
            return Err(e);
        }
        Ok(Body {
            head: Vec::new(),
            file: self.file,
            file_len: self.len,
            tail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spooled(parts: &[&[u8]], tail: &[u8]) -> Body {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut s = Spool::new(dir.path().to_path_buf());
        for p in parts {
            rt.block_on(s.write(p.to_vec()));
        }
        s.finish(tail.to_vec()).unwrap()
    }

    #[test]
    fn head_spool_and_tail_come_out_in_order() {
        let b = spooled(&[b"one ", b"two "], b"three").with_head(b"head ".to_vec());
        assert_eq!(b.len(), 18);
        assert_eq!(b.to_vec().unwrap(), b"head one two three");
        let mut at = Vec::new();
        b.copy_to(|o, _| {
            at.push(o);
            Ok(())
        })
        .unwrap();
        assert_eq!(at, vec![0, 5, 13]);
    }

    #[test]
    fn a_spool_file_leaves_no_name_behind() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut s = Spool::new(dir.path().to_path_buf());
        rt.block_on(s.write(vec![b'x'; 1000]));
        assert_eq!(s.len(), 1000);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn large_bodies_are_copied_in_blocks() {
        let big = vec![b'y'; COPY_BLOCK * 2 + 10];
        let b = spooled(&[&big], b"");
        let mut sizes = Vec::new();
        b.copy_to(|_, block| {
            sizes.push(block.len());
            Ok(())
        })
        .unwrap();
        assert_eq!(sizes, vec![COPY_BLOCK, COPY_BLOCK, 10]);
    }

    #[test]
    fn truncate_keeps_a_prefix_of_the_content() {
        let mut b = spooled(&[b"0123456789"], b"abcdef");
        b.truncate(13).unwrap();
        assert_eq!(b.to_vec().unwrap(), b"0123456789abc");
        b.truncate(4).unwrap();
        assert_eq!(b.to_vec().unwrap(), b"0123");
        assert_eq!(b.len(), 4);
        let mut m = Body::from(b"hello".to_vec());
        m.truncate(2).unwrap();
        assert_eq!(m.to_vec().unwrap(), b"he");
    }

    #[test]
    fn a_failed_write_is_reported_at_the_end() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut s = Spool::new(PathBuf::from("/nonexistent/outpost-spool"));
        rt.block_on(s.write(b"x".to_vec()));
        rt.block_on(s.write(b"y".to_vec()));
        assert!(s.finish(Vec::new()).is_err());
    }
}
