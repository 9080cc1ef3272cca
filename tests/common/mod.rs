//! Runs the real `outpost` binary on 127.0.0.1 with a temporary directory,
//! and cleans up by PID.
#![allow(dead_code)]

pub mod fake;
pub mod peers;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// A free port on 127.0.0.1 (bound, then released for the daemon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Three different free ports (the kernel may hand out a port again once
/// it is released).
fn three_ports() -> (u16, u16, u16) {
    loop {
        let p = (free_port(), free_port(), free_port());
        if p.0 != p.1 && p.1 != p.2 && p.0 != p.2 {
            return p;
        }
    }
}

/// Waits for `cond` with a deadline; panics with `what` when it never holds.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub relay: u16,
    pub submission: u16,
    pub submissions: u16,
    pub config_path: PathBuf,
    /// Lines for the `[store]` section (after `path`).
    store: String,
    extra: String,
    child: Option<Child>,
    started_once: bool,
}

impl Gateway {
    /// Writes a config (relay, submission, submissions on free ports; the
    /// local domain branch.example; `extra` appended) and starts the daemon.
    pub fn start(extra: &str) -> Gateway {
        let g = Gateway::configure(extra);
        g.spawned()
    }

    pub fn configure(extra: &str) -> Gateway {
        Gateway::configure_in(tempfile::tempdir().unwrap(), "", extra)
    }

    /// Like `configure`, in `dir` (the store, the log, the sockets), with
    /// `store` added to the `[store]` section.
    pub fn configure_in(dir: tempfile::TempDir, store: &str, extra: &str) -> Gateway {
        let config_path = dir.path().join("outpost.toml");
        let (relay, submission, submissions) = three_ports();
        let g = Gateway {
            dir,
            relay,
            submission,
            submissions,
            config_path,
            store: store.to_string(),
            extra: extra.to_string(),
            child: None,
            started_once: false,
        };
        g.write_config();
        g
    }

    /// The config file: this gateway's ports and directory, then `extra`.
    fn write_config(&self) {
        let d = self.dir.path().display();
        let (relay, submission, submissions) = (self.relay, self.submission, self.submissions);
        // TOML allows one [store] table: the keys of one in `extra` join ours.
        let (from_extra, extra) = split_section(&self.extra, "[store]");
        let mut store = self.store.clone();
        if !store.is_empty() && !store.ends_with('\n') {
            store.push('\n');
        }
        store.push_str(&from_extra);
        let mut config = format!(
            r#"hostname = "gw.test"
[store]
path = "{d}/queue.sqlite"
{store}[[listen]]
address = "127.0.0.1:{relay}"
mode = "relay"
[[listen]]
address = "127.0.0.1:{submission}"
mode = "submission"
plaintext_auth = false
[[listen]]
address = "127.0.0.1:{submissions}"
mode = "submissions"
[tls]
certificate = "{d}/cert.pem"
key = "{d}/key.pem"
self_signed = true
[control]
socket = "{d}/control.sock"
[submit]
socket = "{d}/submit.sock"
"#
        );
        if !self.extra.contains("[local]") {
            config.push_str("[local]\ndomains = [\"branch.example\"]\n");
        }
        if !self.extra.contains("[smtp]") {
            config.push_str("[smtp]\nauth_failure_delay = \"100ms\"\n");
        }
        config.push_str(&extra);
        std::fs::write(&self.config_path, config).unwrap();
    }

    fn spawned(mut self) -> Gateway {
        self.spawn();
        self
    }

    pub fn spawn(&mut self) {
        self.spawn_with_env(&[]);
    }

    pub fn spawn_with_env(&mut self, env: &[(&str, &str)]) {
        for attempt in 0.. {
            match self.try_spawn(env) {
                Ok(()) => return,
                // Another process took one of our ports between choosing
                // and binding: choose again (first start only).
                Err(log)
                    if attempt < 5 && log.contains("cannot listen on") && !self.started_once =>
                {
                    self.new_ports();
                }
                Err(log) => panic!("outpost exited at start:\n{log}"),
            }
        }
    }

    fn new_ports(&mut self) {
        let old = [self.relay, self.submission, self.submissions];
        (self.relay, self.submission, self.submissions) = three_ports();
        // The file as it is now (a test may have added to it), with the
        // listeners moved.
        let mut config = std::fs::read_to_string(&self.config_path).unwrap();
        for (from, to) in old
            .iter()
            .zip([self.relay, self.submission, self.submissions])
        {
            config = config.replace(&format!("127.0.0.1:{from}\""), &format!("127.0.0.1:{to}\""));
        }
        std::fs::write(&self.config_path, config).unwrap();
    }

    fn try_spawn(&mut self, env: &[(&str, &str)]) -> Result<(), String> {
        assert!(self.child.is_none());
        let ready_before = self.log().matches("outpost ready").count();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("log"))
            .unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("OUTPOST_LOG", "debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.relay;
        let start = Instant::now();
        // Ready means this process said so (another process could hold the
        // port) and the port answers.
        while self.log().matches("outpost ready").count() == ready_before
            || TcpStream::connect(("127.0.0.1", port)).is_err()
        {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("({status})\n{}", self.log()));
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "outpost did not listen:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.started_once = true;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// SIGTERM and wait for the exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        unsafe_kill(child.id(), "TERM");
        wait_child(&mut child, Duration::from_secs(60))
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe_kill(child.id(), "KILL");
            wait_child(&mut child, Duration::from_secs(10));
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Runs `outpost ARGS --config <this config>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }

    pub fn add_user(&self, name: &str, password: &str) {
        let out = self.cli_stdin(
            &["user", "add", name, "--password-stdin"],
            Some(&format!("{password}\n")),
        );
        assert!(
            out.status.success(),
            "user add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `outpost flush --json` in a process whose clock runs `offset` ahead
    /// (`+2m`; libfaketime), so that aging is tested without waiting for
    /// time to pass. The daemon must be stopped: the flush then runs in
    /// that process, on its clock. Returns the exit code and the JSON.
    pub fn flush_later(&self, offset: &str) -> (i32, serde_json::Value) {
        let out = Command::new("faketime")
            .args(["-f", offset, BIN, "flush", "--json", "--config"])
            .arg(&self.config_path)
            .output()
            .expect("faketime (Debian package faketime) runs");
        (out.status.code().unwrap_or(-1), json_out(&out))
    }

    /// `queue list --json`, parsed.
    pub fn queue(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["queue", "list", "--json"]);
        assert!(
            out.status.success(),
            "queue list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn queue_ids(&self) -> Vec<String> {
        self.queue()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// The stored message, through the store itself.
    pub fn body(&self, id: &str) -> Vec<u8> {
        let store = outpost::queue::Store::open(&self.dir.path().join("queue.sqlite")).unwrap();
        store.body(id).unwrap().expect("body stored")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `text` without the table `header` (e.g. "[store]"), and that table's
/// lines (up to the next table).
fn split_section(text: &str, header: &str) -> (String, String) {
    let (mut section, mut rest, mut inside) = (String::new(), String::new(), false);
    for line in text.lines() {
        if line.trim_start().starts_with('[') {
            inside = line.trim() == header;
            if inside {
                continue;
            }
        }
        let out = if inside { &mut section } else { &mut rest };
        out.push_str(line);
        out.push('\n');
    }
    (section, rest)
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("outpost did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A line-oriented SMTP client over a plain socket, for byte-exact cases.
pub struct Client {
    pub reader: BufReader<TcpStream>,
    pub stream: TcpStream,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        Client::connect_from(port, None)
    }

    /// Connects from a chosen local address (e.g. 127.0.0.2).
    pub fn connect_from(port: u16, local: Option<&str>) -> Client {
        let stream = match local {
            None => TcpStream::connect(("127.0.0.1", port)).unwrap(),
            Some(ip) => {
                let sock = socket2_bind(ip);
                sock.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
                    .unwrap();
                sock.into()
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut c = Client { reader, stream };
        let greeting = c.reply();
        assert!(greeting.starts_with("220 "), "greeting: {greeting}");
        c
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one whole reply (all its lines), joined with \n.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap_or(0);
            if n == 0 {
                all.push_str("<EOF>");
                return all;
            }
            all.push_str(line.trim_end_matches(['\r', '\n']));
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
            all.push('\n');
        }
    }

    /// Sends a command line and returns the reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// True when the server closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0))
    }

    /// A whole transaction; returns the final reply.
    pub fn send_mail(&mut self, from: &str, to: &[&str], data: &[u8]) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert!(r.starts_with("250"), "MAIL: {r}");
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>"));
            assert!(r.starts_with("250"), "RCPT {t}: {r}");
        }
        let r = self.cmd("DATA");
        assert!(r.starts_with("354"), "DATA: {r}");
        self.send(data);
        self.send(b".\r\n");
        self.reply()
    }
}

/// A command's `--json` output, parsed (or the test fails showing it).
pub fn json_out(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The queue id in a "250 2.0.0 Ok: queued as ID" reply.
pub fn queued_id(reply: &str) -> Option<String> {
    reply
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .map(|s| s.trim().to_string())
}

fn socket2_bind(ip: &str) -> socket2::Socket {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{ip}:0").parse().unwrap();
    sock.bind(&local.into()).unwrap();
    sock
}

/// [`peers::run`], with what the command printed also kept in `log` (for a
/// look after a failure): the exit code and the output.
pub fn run_logged(
    cmd: &mut Command,
    log: &std::path::Path,
    timeout: Duration,
) -> (Option<i32>, String) {
    let what = format!("{:?}", cmd.get_program());
    let ran = peers::run(&what, cmd, timeout);
    let all = ran.all();
    let _ = std::fs::write(log, &all);
    (ran.code, all)
}
