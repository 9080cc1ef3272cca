//! A full disk, for real: the store and the daemon's log on a small tmpfs
//! that fills up. Clients always get a reply (452 4.3.1, never a dropped
//! connection); after making room and a restart, exactly the messages
//! that were answered 250 are there.
//!
//! Mounting needs root, as CI runs the suite; as another user this test
//! fails and says so rather than passing without having run.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{queued_id, Client, Gateway};
use outpost::queue::space::available;

/// A tmpfs of `size`, unmounted when dropped (after the daemon using it,
/// which must be declared after this).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let uid = Command::new("id").arg("-u").output().expect("id -u");
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "this test mounts a tmpfs and must run as root (CI does): \
             run `cargo test --test full_disk` as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(st.success(), "mount -t tmpfs failed: {st}");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let st = Command::new("umount").arg(self.dir.path()).status();
        if !matches!(st, Ok(s) if s.success()) {
            // Something still holds a file there: detach it anyway.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Writes zeros to `path` until the file system has at most `leave` bytes
/// free (0: until it is full).
fn fill(path: &Path, leave: u64) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let chunk = vec![0u8; 16 * 1024];
    loop {
        let free = available(path).unwrap();
        if free <= leave {
            break;
        }
        let n = (free - leave).min(chunk.len() as u64) as usize;
        if f.write_all(&chunk[..n]).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
}

/// A message with a unique marker and `size` octets of text.
fn message(marker: &str, size: usize) -> Vec<u8> {
    let mut m = format!("Subject: {marker}\r\nX-Marker: {marker}\r\n\r\n").into_bytes();
    let line = [b'z'; 78];
    while m.len() < size {
        m.extend_from_slice(&line);
        m.extend_from_slice(b"\r\n");
    }
    m
}

#[derive(Debug, PartialEq, Eq)]
enum Sent {
    /// 250, with the queue id.
    Queued(String),
    /// 452 4.3.1 at MAIL.
    RefusedAtMail,
    /// 452 4.3.1 at the end of the data.
    RefusedAtData,
}

/// One transaction. Any other reply, or a connection closed without a
/// reply, fails the test.
fn try_send(c: &mut Client, marker: &str, size: usize) -> Sent {
    let r = c.cmd("MAIL FROM:<s@client.test>");
    if r.starts_with("452 4.3.1") {
        return Sent::RefusedAtMail;
    }
    assert!(r.starts_with("250"), "MAIL: {r}");
    let r = c.cmd("RCPT TO:<x@far.example>");
    assert!(r.starts_with("250"), "RCPT: {r}");
    let r = c.cmd("DATA");
    assert!(r.starts_with("354"), "DATA: {r}");
    c.send(&message(marker, size));
    c.send(b".\r\n");
    let r = c.reply();
    if r.starts_with("452 4.3.1") {
        return Sent::RefusedAtData;
    }
    Sent::Queued(queued_id(&r).unwrap_or_else(|| panic!("end of data: {r}")))
}

fn marker_of(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.lines()
        .find_map(|l| l.strip_prefix("X-Marker: "))
        .expect("a marker")
        .to_string()
}

#[test]
fn a_full_disk_answers_452_and_keeps_exactly_what_was_acknowledged() {
    let fs = Tmpfs::mount("6m");
    let fill_file: PathBuf = fs.path().join("fill");
    // MAIL is refused below 64 KiB free; messages are bigger than that, so
    // some pass MAIL and find no room at the commit (SQLite: disk full).
    let mut g = Gateway::configure_in(
        tempfile::tempdir_in(fs.path()).unwrap(),
        "min_free = 65536",
        "",
    );
    g.spawn();

    let mut c = Client::connect(g.relay);
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    // SIZE= more than the free space above min_free: 452 at once.
    let too_big = available(fs.path()).unwrap() + 1;
    let r = c.cmd(&format!("MAIL FROM:<s@client.test> SIZE={too_big}"));
    assert!(r.starts_with("452 4.3.1"), "{r}");

    // Room for a few messages: taken.
    fill(&fill_file, 1536 * 1024);
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut ids = Vec::new();
    for i in 0..5 {
        let marker = format!("m{i}");
        match try_send(&mut c, &marker, 150 * 1024) {
            Sent::Queued(id) => {
                acked.insert(marker);
                ids.push(id);
            }
            other => panic!("{marker}: {other:?}"),
        }
    }
    // Above min_free, but no room for this message: MAIL passes and the
    // commit finds the disk full.
    fill(&fill_file, 100 * 1024);
    assert_eq!(try_send(&mut c, "x1", 150 * 1024), Sent::RefusedAtData);
    // Nothing left at all (the log has no room either): refused at MAIL.
    fill(&fill_file, 0);
    assert_eq!(available(fs.path()).unwrap(), 0, "the disk is full");
    assert_eq!(try_send(&mut c, "x2", 1000), Sent::RefusedAtMail);

    // New sessions on the full disk (the log is there too, at debug level):
    // each is greeted and told 452 at MAIL, one after another and at once.
    for _ in 0..5 {
        let mut c = Client::connect(g.relay);
        assert!(c.cmd("EHLO client.test").starts_with("250"));
        let r = c.cmd("MAIL FROM:<s@client.test>");
        assert!(r.starts_with("452 4.3.1"), "{r}");
        assert!(c.cmd("QUIT").starts_with("221"));
    }
    let port = g.relay;
    let burst: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Client::connect(port);
                let e = c.cmd("EHLO client.test");
                let m = c.cmd("MAIL FROM:<s@client.test>");
                (e, m)
            })
        })
        .collect();
    for t in burst {
        let (e, m) = t.join().unwrap();
        assert!(e.starts_with("250"), "EHLO: {e}");
        assert!(m.starts_with("452 4.3.1"), "MAIL: {m}");
    }
    // The first session is still in step too.
    assert!(c.cmd("MAIL FROM:<s@client.test>").starts_with("452 4.3.1"));
    drop(c);

    // Make room: the daemon says how many log lines it could not write,
    // then, after a restart, exactly the acknowledged messages are there.
    std::fs::remove_file(&fill_file).unwrap();
    common::wait_for(
        "the lost log lines reported",
        Duration::from_secs(30),
        || g.log().contains("log lines could not be written"),
    );
    g.restart();
    let mut stored: BTreeSet<String> = BTreeSet::new();
    let queued = g.queue_ids();
    for id in &queued {
        stored.insert(marker_of(&g.body(id)));
    }
    assert_eq!(queued.len(), acked.len(), "one stored message per 250");
    assert_eq!(stored, acked, "stored = acknowledged");
    let mut sorted = ids.clone();
    sorted.sort();
    let mut q = queued.clone();
    q.sort();
    assert_eq!(q, sorted, "the ids given in the 250 replies");

    // And mail flows again.
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let Sent::Queued(id) = try_send(&mut c, "after", 1000) else {
        panic!("not accepted after making room");
    };
    assert!(g.log().contains(&id), "logged again");
    assert_eq!(g.stop(), Some(0));
}
