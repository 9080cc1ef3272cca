#!/usr/bin/env bash
# bench/imap_idle.sh - memory per idle IMAP session, outpost side by side
# with Dovecot (the IMAP server an office would otherwise run) in the same run.
#
# Usage (from anywhere; needs root):
#   cargo build --release && bash bench/imap_idle.sh
#
# What it does, RUNS times and for each server (order alternating):
#   - starts it fresh, on a free 127.0.0.1 port, with one account (alice)
#     and one small message in her INBOX. outpost: new store, `outpost user
#     add alice --password-stdin`, `outpost serve` with an imap listener
#     (plaintext LOGIN is allowed on loopback by default; `[imap]` left at
#     its defaults) and a relay listener, the message sent over SMTP to
#     alice@bench.example (`[local] domains`). Dovecot: a private instance
#     (`dovecot -F -c DIR/dovecot.conf`, own base_dir, state_dir and log,
#     imap on 127.0.0.1 only, imaps off, `ssl = no`), passwd-file with alice
#     ({PLAIN} password, uid/gid nobody/nogroup, home and Maildir in the temp
#     dir), the message APPENDed with imaplib; its process model left at the
#     defaults (one imap process per session), with process and client
#     limits raised to allow SESSIONS sessions from one user and address;
#   - serves one warm-up session (bench/imap_idle.py with 1 session: login,
#     SELECT, which must report the message, IDLE, DONE, LOGOUT), then reads
#     the memory of the server's whole process tree: the sum of Pss from
#     /proc/PID/smaps_rollup over the server and all its descendants (shared
#     pages count once; outpost: one process; Dovecot: master, config, auth,
#     log, anvil, stats, imap-login and every imap process);
#   - runs bench/imap_idle.py: SESSIONS connections, each LOGIN, SELECT INBOX,
#     IDLE (opened BATCH at a time); once all are idle and a second has
#     passed, reads the tree's memory again, then lets them go (DONE,
#     LOGOUT) and checks every session was still there;
#   - per idle session = (with SESSIONS idle - before) / SESSIONS;
#   - prints a markdown table of medians: before, with SESSIONS idle, per
#     idle session, and the ratio Dovecot / outpost per session.
#
# Installs Debian's dovecot-imapd when missing, with a policy-rc.d (exit 101)
# in place so that the system service is not started; checks that nothing
# listens on ports 143 and 993 before and after.
#
# Environment (defaults in brackets):
#   SESSIONS [200]  RUNS [3]  BATCH [20]  KEEP_DIR [unset]
set -eu

SESSIONS=${SESSIONS:-200}
RUNS=${RUNS:-3}
BATCH=${BATCH:-20}
PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3
PASSWORD=idle-bench-pw

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTPOST=${OUTPOST:-$REPO/target/release/outpost}
. "$REPO/bench/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root (installs dovecot-imapd, starts a private Dovecot instance)"
[ -x "$OUTPOST" ] || die "$OUTPOST missing: run 'cargo build --release' first"
command -v ss >/dev/null || die "ss (iproute2) missing"

imap_ports_check() {  # returns 1 (and says so) when anything listens on 143 or 993
    local l
    l=$(ss -ltnpH '( sport = :143 or sport = :993 )')
    if [ -n "$l" ]; then
        log "WARNING: something listens on port 143 or 993: $l"; return 1
    fi
    log "ports 143, 993: nothing listens"
}

# install_dovecot: Debian's dovecot-imapd, without letting the package start
# the system service (which would listen on 0.0.0.0:143).
install_dovecot() {
    local made_policy= l
    [ -x /usr/sbin/dovecot ] && return 0
    log "installing dovecot-imapd (services kept from starting by policy-rc.d)"
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dovecot-imapd >/dev/null; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dovecot-imapd >/dev/null \
            || { [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d; die "apt-get install dovecot-imapd failed"; }
    fi
    [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
    l=$(ss -ltnpH '( sport = :143 or sport = :993 )')
    if [ -n "$l" ]; then
        grep -q dovecot <<<"$l" || die "something that is not dovecot listens on 143/993: $l"
        log "the system dovecot started after all; stopping it"
        service dovecot stop >/dev/null 2>&1 || systemctl stop dovecot >/dev/null 2>&1 || true
        sleep 1
        [ -z "$(ss -ltnH '( sport = :143 or sport = :993 )')" ] || die "the system dovecot still listens on 143/993"
    fi
    [ -x /usr/sbin/dovecot ] || die "dovecot missing after installing dovecot-imapd"
}

install_dovecot
imap_ports_check || die "stop what listens on port 143/993 first"
DC_VERSION=$(dovecot --version | cut -d' ' -f1)

T=$(mktemp -d /tmp/outpost-imap-idle.XXXXXX)
chmod 755 "$T"
OP_PID=
DC_PID=
HOLD_PID=
cleanup() {
    local rc=$?
    set +e
    exec 3>&-
    stop_pid "$HOLD_PID"
    stop_pid "$OP_PID"
    dc_stop
    if [ -n "${KEEP_DIR:-}" ] && [ -f "$T/results.tsv" ]; then
        mkdir -p "$KEEP_DIR" && cp "$T/results.tsv" "$KEEP_DIR"/
    fi
    rm -rf "$T"
    imap_ports_check || rc=1
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# tree_pids ROOT: ROOT and all its live descendants.
tree_pids() {
    ps -eo pid=,ppid= | awk -v root="$1" '
        { kids[$2] = kids[$2] " " $1 }
        END { todo[1] = root; n = 1
              while (n > 0) { p = todo[n--]; print p
                              m = split(kids[p], k, " "); for (i = 1; i <= m; i++) todo[++n] = k[i] } }'
}

# tree_pss ROOT -> "KIB PROCS": the sum of Pss over ROOT's process tree.
tree_pss() {
    local p kb total=0 procs=0
    for p in $(tree_pids "$1"); do
        kb=$(awk '/^Pss:/ { print $2; exit }' "/proc/$p/smaps_rollup" 2>/dev/null) || continue
        [ -n "$kb" ] || continue
        total=$((total + kb)); procs=$((procs + 1))
    done
    echo "$total $procs"
}

# dc_stop: TERM to our Dovecot's master, then wait for it and its children.
dc_stop() {
    local p kids
    [ -n "$DC_PID" ] && [ -e "/proc/$DC_PID" ] || { DC_PID=; return 0; }
    kids=$(tree_pids "$DC_PID" | tail -n +2)
    stop_pid "$DC_PID"
    for p in $kids; do
        for _ in $(seq 100); do [ -e "/proc/$p" ] || break; sleep 0.1; done
    done
    DC_PID=
}

printf 'server\tround\tsessions\tpss_before_kb\tprocs_before\tpss_idle_kb\tprocs_idle\tper_session_kb\n' >"$T/results.tsv"

# measure NAME ROUND PORT ROOT_PID: warm-up session, memory, SESSIONS idle
# sessions, memory again, let them go; one row of results.tsv.
measure() {
    local name=$1 round=$2 port=$3 root=$4 dir=$T/hold-$2 out before idle per
    mkdir -p "$dir"
    out=$("$PY" "$REPO/bench/imap_idle.py" 127.0.0.1 "$port" 1 alice "$PASSWORD" </dev/null) \
        || die "$name: the warm-up session failed: $out"
    grep -q '^idle=1 exists=1$' <<<"$out" || die "$name: INBOX does not hold the one message: $out"
    sleep 1
    before=$(tree_pss "$root")

    mkfifo "$dir/hold"
    "$PY" "$REPO/bench/imap_idle.py" 127.0.0.1 "$port" "$SESSIONS" alice "$PASSWORD" "$BATCH" \
        <"$dir/hold" >"$dir/out" 2>"$dir/err" &
    HOLD_PID=$!
    exec 3>"$dir/hold"
    for _ in $(seq 6000); do  # 10 minutes at most
        [ -s "$dir/out" ] && break
        [ -e "/proc/$HOLD_PID" ] || break
        sleep 0.1
    done
    head -1 "$dir/out" | grep -q "^idle=$SESSIONS " \
        || { exec 3>&-; wait "$HOLD_PID" || true; HOLD_PID=
             die "$name: not all $SESSIONS sessions went idle: $(cat "$dir/out" "$dir/err")"; }
    sleep 1
    idle=$(tree_pss "$root")
    exec 3>&-
    wait "$HOLD_PID" || { HOLD_PID=; die "$name: sessions lost while idle: $(cat "$dir/out" "$dir/err")"; }
    HOLD_PID=
    log "$name round $round: $(tail -1 "$dir/out")"
    per=$(( (${idle% *} - ${before% *}) / SESSIONS ))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$round" "$SESSIONS" "${before% *}" "${before#* }" \
        "${idle% *}" "${idle#* }" "$per" >>"$T/results.tsv"
    log "$name round $round: before ${before% *} KiB (${before#* } processes)," \
        "with $SESSIONS idle ${idle% *} KiB (${idle#* } processes), $per KiB per session"
    rm -rf "$dir"
}

run_outpost() {
    local dir=$T/op-$1 port
    port=$(free_port)
    op_config "$dir" "
[[listen]]
address = \"127.0.0.1:$port\"
mode = \"imap\"

[local]
domains = [\"bench.example\"]"
    echo "$PASSWORD" | "$OUTPOST" --config "$OP_CFG" user add alice --password-stdin >/dev/null \
        || die "outpost user add failed"
    "$OUTPOST" --config "$OP_CFG" serve >>"$dir/outpost.log" 2>&1 &
    OP_PID=$!
    wait_port "$OP_PORT" && wait_port "$port" || { tail -5 "$dir/outpost.log" >&2; die "outpost did not listen"; }
    "$PY" - "$OP_PORT" <<'EOF' || die "outpost did not take the message for alice"
import smtplib, sys
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30) as s:
    s.sendmail("bench@source.example", ["alice@bench.example"],
               "From: bench@source.example\r\nTo: alice@bench.example\r\n"
               "Subject: one small message\r\n\r\nHello, Alice.\r\n")
EOF
    measure outpost "$1" "$port" "$OP_PID"
    stop_pid "$OP_PID"; OP_PID=
    if grep -qiE 'error|warn' "$dir/outpost.log"; then
        log "outpost round $1: its log has $(grep -ciE 'error|warn' "$dir/outpost.log") warning/error lines, the first:"
        grep -iE 'error|warn' "$dir/outpost.log" | head -3 >&2
    fi
    rm -rf "$dir"
}

run_dovecot() {
    local dir=$T/dc-$1 port
    port=$(free_port)
    mkdir -p "$dir/run" "$dir/state" "$dir/home/alice" "$dir/mail"
    chown nobody:nogroup "$dir/home/alice" "$dir/mail"
    echo "alice:{PLAIN}$PASSWORD:$(id -u nobody):$(getent group nogroup | cut -d: -f3)::$dir/home/alice::" >"$dir/passwd"
    cat >"$dir/dovecot.conf" <<EOT
# Benchmark-only private Dovecot instance written by outpost's bench/. Loopback only.
instance_name = outpost-bench-$1
base_dir = $dir/run
state_dir = $dir/state
log_path = $dir/dovecot.log
listen = 127.0.0.1
protocols = imap
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
passdb {
  driver = passwd-file
  args = scheme=PLAIN $dir/passwd
}
userdb {
  driver = passwd-file
  args = $dir/passwd
}
mail_location = maildir:$dir/mail/%u
default_client_limit = $((2 * SESSIONS + 100 > 1000 ? 2 * SESSIONS + 100 : 1000))
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $port
  }
  inet_listener imaps {
    port = 0
  }
}
service imap {
  process_limit = $((SESSIONS + 20))
}
protocol imap {
  mail_max_userip_connections = $((SESSIONS + 20))
}
EOT
    dovecot -F -c "$dir/dovecot.conf" >>"$dir/dovecot.log" 2>&1 &
    DC_PID=$!
    wait_port "$port" || { tail -5 "$dir/dovecot.log" >&2; die "dovecot did not listen"; }
    "$PY" - "$port" "$PASSWORD" <<'EOF' || { tail -5 "$dir/dovecot.log" >&2; die "could not APPEND alice's message to Dovecot"; }
import imaplib, sys
m = imaplib.IMAP4("127.0.0.1", int(sys.argv[1]))
m.login("alice", sys.argv[2])
m.append("INBOX", None, None, b"From: bench@source.example\r\nTo: alice@bench.example\r\n"
         b"Subject: one small message\r\n\r\nHello, Alice.\r\n")
m.logout()
EOF
    measure "Dovecot $DC_VERSION" "$1" "$port" "$DC_PID"
    dc_stop
    if grep -qiE 'error|fatal|warn' "$dir/dovecot.log"; then
        log "Dovecot round $1: its log has $(grep -ciE 'error|fatal|warn' "$dir/dovecot.log") warning/error lines, the first:"
        grep -iE 'error|fatal|warn' "$dir/dovecot.log" | head -3 >&2
    fi
    rm -rf "$dir"
}

log "$SESSIONS idle IMAP sessions, $RUNS rounds"
for r in $(seq "$RUNS"); do
    if [ $((r % 2)) -eq 1 ]; then run_outpost "$r"; run_dovecot "$r"; else run_dovecot "$r"; run_outpost "$r"; fi
done

"$PY" - "$T/results.tsv" "$SESSIONS" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
n = sys.argv[2]
print(f"\n{n} idle IMAP sessions (LOGIN, SELECT INBOX, IDLE), memory as the sum of Pss"
      f" over the server's processes (medians of {len(rows)//len(set(r['server'] for r in rows))} runs)\n")
print(f"| server | before | with {n} idle | per idle session |")
print("|---|---|---|---|")
per = {}
for server in dict.fromkeys(r["server"] for r in rows):
    rs = [r for r in rows if r["server"] == server]
    med = lambda k: statistics.median(float(r[k]) for r in rs)
    per[server] = med("per_session_kb")
    print(f"| {server} | {med('pss_before_kb')/1024:.1f} MiB | {med('pss_idle_kb')/1024:.1f} MiB"
          f" | {per[server]:.0f} KiB |")
op = per.get("outpost")
dc = [v for k, v in per.items() if k.startswith("Dovecot")]
if op and dc:
    print(f"\nDovecot / outpost per idle session: {dc[0] / op:.1f}x")
EOF
