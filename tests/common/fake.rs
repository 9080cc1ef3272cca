//! A scripted SMTP upstream for the cases real peers cannot be made to
//! show: no reply to the final dot, 421 in the middle, a slow greeting.
//! Plain ESMTP (no PIPELINING, no CHUNKING), one thread per connection.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the fake misbehaves.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Wait this long before the greeting.
    pub greet_delay: Duration,
    /// Hang up on the final dot without a reply (RFC 1047's window).
    pub silent_after_dot: bool,
    /// Answer the Nth MAIL of a connection (1-based) with 421 and hang up.
    pub close_at_mail: Option<usize>,
}

/// What the fake saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub connections: AtomicUsize,
    /// Final dots received.
    pub messages: AtomicUsize,
    /// The content of each message, dot-unstuffed, as received.
    pub bodies: Mutex<Vec<Vec<u8>>>,
}

/// Starts the fake on a free loopback port; it runs until the test ends.
pub fn start(script: Script) -> (u16, Arc<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for stream in l.incoming().flatten() {
            s2.connections.fetch_add(1, Ordering::SeqCst);
            let (script, seen) = (script.clone(), s2.clone());
            std::thread::spawn(move || session(stream, &script, &seen));
        }
    });
    (port, seen)
}

fn session(stream: std::net::TcpStream, script: &Script, seen: &Seen) {
    std::thread::sleep(script.greet_delay);
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let _ = w.write_all(b"220 fake.test ESMTP\r\n");
    let (mut in_data, mut mails) = (false, 0);
    let mut raw = Vec::new();
    let mut body = Vec::new();
    loop {
        raw.clear();
        if r.read_until(b'\n', &mut raw).unwrap_or(0) == 0 {
            return;
        }
        if in_data {
            if raw != b".\r\n" {
                body.extend_from_slice(raw.strip_prefix(b".").unwrap_or(&raw));
            } else {
                seen.bodies.lock().unwrap().push(std::mem::take(&mut body));
                seen.messages.fetch_add(1, Ordering::SeqCst);
                if script.silent_after_dot {
                    return;
                }
                in_data = false;
                let _ = w.write_all(b"250 2.0.0 taken\r\n");
            }
            continue;
        }
        let line = String::from_utf8_lossy(&raw);
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        if verb == "MAIL" {
            mails += 1;
            if script.close_at_mail == Some(mails) {
                let _ = w.write_all(b"421 4.3.2 fake.test going down\r\n");
                return;
            }
        }
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-fake.test\r\n250 8BITMIME\r\n",
            "DATA" => {
                in_data = true;
                b"354 go on\r\n"
            }
            "QUIT" => b"221 bye\r\n",
            _ => b"250 ok\r\n",
        };
        let _ = w.write_all(reply);
    }
}
