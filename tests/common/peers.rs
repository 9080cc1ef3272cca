//! Real peers for the interop tests: processes stopped by PID, commands
//! run with a deadline, a private Postfix instance (never on port 25).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::wait_for;

/// A child process stopped by PID (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
}

impl Proc {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{name} cannot start ({e}): tests/run.sh installs it"));
        Proc { name, child }
    }

    /// Waits until the process accepts TCP connections on 127.0.0.1:port.
    pub fn wait_port(&mut self, port: u16, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited at start ({st}):\n{}",
                    self.name,
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on {port}:\n{}",
                self.name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// True while `pid` runs (a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What a command printed, and how it ended.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout:\n{}--- stderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to its end, with a deadline: output goes to files (no pipe
/// to fill up), and a command still running at the deadline is stopped by
/// its PID and fails the test.
pub fn run(what: &str, cmd: &mut Command, timeout: Duration) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} cannot start ({e}): tests/run.sh installs it"));
    let mut guard = Proc {
        name: "command",
        child,
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = guard.child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            drop(guard);
            panic!(
                "{what} did not finish within {timeout:?}:\n{}{}",
                std::fs::read_to_string(&out).unwrap_or_default(),
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ran {
        code: status.code(),
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    }
}

pub fn assert_nothing_on_port_25() {
    let out = Command::new("ss")
        .args(["-ltnH", "sport = :25"])
        .output()
        .expect("ss (iproute2)");
    assert!(out.status.success(), "ss failed");
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "something listens on port 25:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

// ---------------------------------------------------------------------------

/// A private Postfix instance (peers.md section 3): smtpd on 127.0.0.1:port
/// only, its own config, queue and log in a temporary directory. The
/// "filesink" transport writes one .eml (+ .from) per recipient; "etrnhold"
/// is an smtp clone to defer (an ETRN hub, section 3b). Stopped by the
/// master's PID (and its children's) when dropped.
pub struct Postfix {
    pub port: u16,
    pub dir: tempfile::TempDir,
    started: bool,
}

impl Postfix {
    pub fn new(port: u16) -> Postfix {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        chmod(d, 0o755);
        std::fs::create_dir(d.join("conf")).unwrap();
        std::fs::create_dir(d.join("out")).unwrap();
        chmod(&d.join("out"), 0o1777);
        std::fs::create_dir(d.join("spool")).unwrap();
        chmod(&d.join("spool"), 0o755);
        let p = d.display();
        std::fs::write(
            d.join("conf/main.cf"),
            format!(
                "compatibility_level = 3.6
queue_directory = {p}/spool
data_directory = {p}/data
maillog_file_prefixes = {p}
maillog_file = {p}/maillog
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = pf.test
mydestination =
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
filesink_destination_recipient_limit = 1
"
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("conf/master.cf"),
            format!(
                "127.0.0.1:{port} inet n - n - - smtpd
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
tlsmgr    unix - - n 1000? 1 tlsmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
etrnhold  unix - - n - - smtp
filesink  unix - n n - - pipe
  flags= user=nobody argv={p}/deliver.sh {p}/out ${{sender}} ${{recipient}} ${{queue_id}}
"
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("deliver.sh"),
            "#!/bin/sh\n# $1 out dir, $2 sender, $3 recipient, $4 queue id\n\
             umask 022; cat >\"$1/$4.$3.eml\" && printf '%s\\n' \"$2\" >\"$1/$4.$3.from\"\n",
        )
        .unwrap();
        chmod(&d.join("deliver.sh"), 0o755);
        Postfix {
            port,
            dir,
            started: false,
        }
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    pub fn postconf(&self, settings: &[&str]) {
        let out = Command::new("/usr/sbin/postconf")
            .arg("-c")
            .arg(self.conf())
            .arg("-e")
            .args(settings)
            .output()
            .expect("postconf (tests/run.sh installs postfix)");
        assert!(
            out.status.success(),
            "postconf: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start(&mut self) {
        self.started = true;
        let out = Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(self.conf())
            .arg("start")
            .output()
            .expect("postfix (tests/run.sh installs it)");
        assert!(
            out.status.success(),
            "postfix start: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.maillog()
        );
        let port = self.port;
        wait_for("Postfix to listen", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// `postqueue -p` for this instance.
    pub fn queue(&self) -> String {
        run(
            "postqueue -p",
            Command::new("/usr/sbin/postqueue")
                .arg("-c")
                .arg(self.conf())
                .arg("-p"),
            Duration::from_secs(30),
        )
        .all()
    }

    pub fn maillog(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// Delivered messages by recipient: (envelope sender, bytes). Only
    /// complete ones: the .from is written after the .eml.
    pub fn delivered(&self) -> BTreeMap<String, (String, Vec<u8>)> {
        let out = self.dir.path().join("out");
        let mut got = BTreeMap::new();
        for e in std::fs::read_dir(&out).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let Some(stem) = name.strip_suffix(".from") else {
                continue;
            };
            let (_queue_id, rcpt) = stem.split_once('.').unwrap();
            let from = std::fs::read_to_string(&path).unwrap().trim().to_string();
            let eml = std::fs::read(out.join(format!("{stem}.eml"))).unwrap();
            got.insert(rcpt.to_string(), (from, eml));
        }
        got
    }

    pub fn master_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join("spool/pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if !self.started {
            return;
        }
        // peers.md pf_stop: by PID, the master, then wait for it and its children.
        let Some(master) = self.master_pid() else {
            return;
        };
        let kids: Vec<u32> = Command::new("ps")
            .args(["-o", "pid=", "--ppid", &master.to_string()])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        signal(master, "TERM");
        let all: Vec<u32> = std::iter::once(master).chain(kids).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        while all.iter().any(|&p| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for &p in all.iter().filter(|&&p| alive(p)) {
            signal(p, "KILL");
        }
    }
}
