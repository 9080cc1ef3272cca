//! The systemd units pass `systemd-analyze verify`.

mod common;

use std::process::Command;

/// Verifies copies of the units whose ExecStart points at the built binary
/// (verify checks that the program exists). Returns verify's complaints.
fn verify(units: &[(&str, String)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, text) in units {
        let p = dir.path().join(name);
        std::fs::write(&p, text.replace("/usr/bin/outpost", common::BIN)).unwrap();
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .expect("systemd-analyze (package systemd) is installed");
    // verify exits 0 on some problems and only prints them: both count.
    let mut complaints = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        complaints.push_str(&format!("\nexit {}", out.status));
    }
    complaints
}

fn units() -> Vec<(&'static str, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    [
        "outpost.service",
        "outpost-flush.service",
        "outpost-flush.timer",
    ]
    .into_iter()
    .map(|n| (n, std::fs::read_to_string(dir.join(n)).unwrap()))
    .collect()
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let complaints = verify(&units());
    assert!(complaints.trim().is_empty(), "{complaints}");
}

#[test]
fn verify_does_catch_a_broken_unit() {
    let mut u = units();
    u[0].1 = u[0].1.replace("Type=notify", "Type=notifyy");
    assert!(verify(&u).contains("notifyy"));
}

#[test]
fn the_service_is_hardened() {
    let service = &units()[0].1;
    for line in [
        "Type=notify",
        "User=outpost",
        "StateDirectory=outpost",
        "RuntimeDirectory=outpost",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectoryMode=0700",
        "UMask=0077",
        "MemoryMax=",
        "TasksMax=",
    ] {
        assert!(
            service.lines().any(|l| l.starts_with(line)),
            "outpost.service lacks {line}"
        );
    }
}

/// The resource limits are set, with values systemd takes, and leave room
/// above the measured figures (docs/SECURITY.md, "Hardening").
#[test]
fn memory_and_tasks_are_bounded_with_headroom() {
    let service = &units()[0].1;
    let value = |key: &str| -> String {
        service
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("outpost.service lacks {key}"))
            .trim()
            .to_string()
    };
    let memory = value("MemoryMax=");
    let mib: u64 = match memory.strip_suffix('M') {
        Some(n) => n.parse().unwrap(),
        None => match memory.strip_suffix('G') {
            Some(n) => n.parse::<u64>().unwrap() * 1024,
            None => panic!("MemoryMax={memory}: write it in M or G"),
        },
    };
    // Idle 12 MiB + argon2 pool 51 MiB + 40 uploads of 8 MiB (25 MiB,
    // spooled) + a flush sending a 25 MiB message (twice) and a window of
    // small ones, with room for a second connection.
    assert!(
        mib >= 12 + 51 + 25 + 2 * (2 * 25 + 8),
        "MemoryMax={memory} leaves no headroom"
    );
    let tasks: u64 = value("TasksMax=").parse().unwrap();
    // Workers, one blocking thread per session (smtp.max_connections 200),
    // the verify pool, the writer.
    assert!(
        tasks > 200 + 16,
        "TasksMax={tasks} is below the sessions' threads"
    );
    // And systemd takes both: a bad value is a complaint from verify.
    let mut u = units();
    u[0].1 = u[0]
        .1
        .replace(&format!("TasksMax={tasks}"), "TasksMax=lots");
    let complaints = verify(&u);
    assert!(
        complaints.contains("'lots'"),
        "verify did not notice a bad TasksMax: {complaints}"
    );
}
