#!/usr/bin/env bash
# bench/accept.sh - durable accept rate and memory of outpost, side by side with
# Postfix in the same run.
#
# Usage (from anywhere; needs root):
#   cargo build --release && bash bench/accept.sh
#
# What it does:
#   - installs Debian's postfix package if smtp-source or postfix is missing,
#     preseeded "No configuration" (no /etc/postfix/main.cf, nothing on port 25);
#   - measures outpost's idle RSS and its RSS with HOLD_SESSIONS open SMTP
#     sessions (each after EHLO);
#   - RUNS times, for each message size: one outpost run and one Postfix run
#     (order alternates per round), each smtp-source -s SESSIONS -m COUNT
#     (one message per connection, smtp-source's default, as in
#     bench/harness); outpost gets a fresh store and process per run,
#     Postfix an emptied queue;
#   - checks every message was queued (outpost: `outpost queue list --json`;
#     Postfix: files in its queue directories);
#   - prints a markdown table of medians.
#
# Outpost: target/release/outpost serve --config TMP/outpost.toml, one relay
# listener on a free 127.0.0.1 port. Postfix: a private instance (own config
# and queue directory in a temp dir), smtpd on a free 127.0.0.1 port only,
# defer_transports = smtp (it queues, never delivers). Nothing on port 25.
# Every process started here is stopped by PID on exit; temp dirs are removed.
#
# Environment (defaults in brackets):
#   COUNT [10000]  SESSIONS [10]  RUNS [3]  SIZES ["1024 10240"] (body bytes, smtp-source -l)
#   HOLD_SESSIONS [100]  KEEP_DIR [unset: raw results are deleted with the temp dir]
#   CPU_PY [bench/harness/cpu.py]
set -eu

COUNT=${COUNT:-10000}
SESSIONS=${SESSIONS:-10}
RUNS=${RUNS:-3}
SIZES=${SIZES:-1024 10240}
HOLD_SESSIONS=${HOLD_SESSIONS:-100}
PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTPOST=${OUTPOST:-$REPO/target/release/outpost}

. "$REPO/bench/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root (installs postfix, starts a private Postfix instance)"
[ -x "$OUTPOST" ] || die "$OUTPOST missing: run 'cargo build --release' first"

# ------------------------------------------------------------------ install
install_postfix smtp-source
command -v ss >/dev/null || die "ss (iproute2) missing"
SMTP_SOURCE=$(find_tool smtp-source) || die "smtp-source not found after installing postfix"
[ -z "$(ss -ltnH 'sport = :25')" ] || log "WARNING: something already listens on port 25 (not ours)"

# ------------------------------------------------------------------ state, cleanup
T=$(mktemp -d /tmp/outpost-bench.XXXXXX)
chmod 755 "$T"                      # postfix must traverse it
OP_PID=
PF=
HOLD_PID=
SRC_PID=

pf_master() { master_of "$PF"; }
pf_stop() { pf_stop_dir "$PF"; }
cleanup() {
    local rc=$?
    set +e
    stop_pid "$SRC_PID"; stop_pid "$HOLD_PID"; stop_pid "$OP_PID"
    [ -n "$PF" ] && pf_stop
    if [ -n "${KEEP_DIR:-}" ] && [ -f "$T/results.tsv" ]; then
        mkdir -p "$KEEP_DIR" && cp "$T/results.tsv" "$T"/*.txt "$KEEP_DIR"/ 2>/dev/null
    fi
    rm -rf "$T"
    port25_check || rc=1
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }

# CPU of a process tree (utime+stime+cutime+cstime of the root and all its
# live descendants: Postfix's master reaps its workers, so their CPU lands in
# its cutime/cstime): bench/harness/cpu.py.
CPU_PY=${CPU_PY:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/harness/cpu.py}
cpu_snap() { "$PY" "$CPU_PY" snap "$1"; }
cpu_s() { "$PY" "$CPU_PY" diff "$1" "$2" | sed -n 's/^target_cpu_s=//p'; }
sys_busy() { "$PY" "$CPU_PY" diff "$1" "$2" | sed -n 's/^sys_busy_pct=//p'; }

# ------------------------------------------------------------------ outpost
op_start() {  # op_start DIR -> OP_PID, OP_PORT, OP_CFG
    local dir=$1
    op_config "$dir"
    "$OUTPOST" serve --config "$OP_CFG" >>"$dir/outpost.log" 2>&1 &
    OP_PID=$!
    wait_port "$OP_PORT" || { tail -5 "$dir/outpost.log" >&2; die "outpost did not listen on 127.0.0.1:$OP_PORT"; }
}
op_stop() { stop_pid "$OP_PID"; OP_PID=; }
op_count() {
    "$OUTPOST" queue list --json --config "$OP_CFG" \
        | "$PY" -c 'import json,sys;print(len(json.load(sys.stdin)))'
}
rss_kb() { awk -v k="$2" '$1==k":"{print $2}' "/proc/$1/status"; }

# ------------------------------------------------------------------ postfix
pf_setup() {  # private instance on a free loopback port; peers.md section 3
    PF=$T/pf
    PF_PORT=$(free_port)
    pf_queue_only "$PF" "$PF_PORT"
    wait_port "$PF_PORT" || die "postfix not listening on 127.0.0.1:$PF_PORT"
    log "postfix $PF_VERSION up, master pid $(pf_master), 127.0.0.1:$PF_PORT"
}
pf_count() { pf_queue_files "$PF"; }
pf_busy() { find "$PF/spool/incoming" "$PF/spool/active" -type f 2>/dev/null | wc -l; }
pf_purge() { postsuper -c "$PF/conf" -d ALL >/dev/null 2>&1 || true; : >"$PF/maillog"; sync; sleep 1; }

# ------------------------------------------------------------------ one load run
cpu_children() { # children CPU seconds of this shell, from the builtin `times` output in $1
    awk 'NR==2{n=0; for(i=1;i<=2;i++){split($i,a,"m"); sub("s","",a[2]); n+=a[1]*60+a[2]}; printf "%.3f", n}' "$1"
}
run_source() {  # run_source PORT SIZE -> ELAPSED, CLIENT_PCT; fails if smtp-source did
    local port=$1 size=$2 t0 t1 rc=0
    times >"$T/times0"      # builtin, no fork: only smtp-source is reaped until times1
    t0=$(now)
    "$SMTP_SOURCE" -4 -s "$SESSIONS" -m "$COUNT" -l "$size" -f bench@source.example \
        -t sink@dest.example -M bench-client "127.0.0.1:$port" 2>"$T/src.err" &
    SRC_PID=$!
    wait "$SRC_PID" || rc=$?
    SRC_PID=
    t1=$(now)
    times >"$T/times1"
    if [ "$rc" -ne 0 ] || grep -qiE 'fatal|error' "$T/src.err"; then
        tail -5 "$T/src.err" >&2; return 1
    fi
    ELAPSED=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')
    CLIENT_PCT=$(awk -v a="$(cpu_children "$T/times0")" -v b="$(cpu_children "$T/times1")" -v e="$ELAPSED" \
        'BEGIN{printf "%.0f", 100*(b-a)/e}')
}

printf 'server\tsize\tround\tcount\telapsed_s\tmsgs_per_s\tcpu_ms_per_msg\tcpu_settled_ms_per_msg\tsys_busy_pct\tclient_cpu_pct\tqueued\trss_after_kb\n' >"$T/results.tsv"
record() {  # server size round cpu_s cpu_settled_s busy queued rss
    local rate
    rate=$(awk -v n="$COUNT" -v e="$ELAPSED" 'BEGIN{printf "%.1f", n/e}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$COUNT" "$ELAPSED" "$rate" \
        "$(awk -v c="$4" -v n="$COUNT" 'BEGIN{printf "%.3f", c*1000/n}')" \
        "$(awk -v c="$5" -v n="$COUNT" 'BEGIN{printf "%.3f", c*1000/n}')" \
        "$6" "$CLIENT_PCT" "$7" "$8" >>"$T/results.tsv"
    log "$1 size=$2 round=$3: $rate msgs/s, $(awk -v c="$4" -v n="$COUNT" 'BEGIN{printf "%.2f", c*1000/n}') ms CPU/msg, machine busy $6%, smtp-source ${CLIENT_PCT}% of a core, queued $7/$COUNT"
}

run_outpost() {  # size round
    local dir=$T/op-$1-$2 c0 c1 n rss
    op_start "$dir"
    sleep 0.5
    c0=$(cpu_snap "$OP_PID")
    run_source "$OP_PORT" "$1" || die "smtp-source against outpost failed (size $1, round $2)"
    c1=$(cpu_snap "$OP_PID")
    rss=$(rss_kb "$OP_PID" VmHWM)
    op_stop
    n=$(op_count)           # after a clean stop: what is on disk
    [ "$n" -eq "$COUNT" ] || die "outpost queued $n of $COUNT messages"
    record outpost "$1" "$2" "$(cpu_s "$c0" "$c1")" "$(cpu_s "$c0" "$c1")" "$(sys_busy "$c0" "$c1")" "$n" "$rss"
    rm -rf "$dir"
}

run_postfix() {  # size round
    local c0 c1 c2 n m
    pf_purge
    m=$(pf_master)
    c0=$(cpu_snap "$m")
    run_source "$PF_PORT" "$1" || die "smtp-source against postfix failed (size $1, round $2)"
    c1=$(cpu_snap "$m")
    n=$(pf_count)
    # qmgr keeps moving incoming -> active -> deferred after the last 250;
    # wait for it (so it does not load the next run) and count that CPU too.
    for _ in $(seq 600); do [ "$(pf_busy)" -eq 0 ] && break; sleep 0.2; done
    c2=$(cpu_snap "$m")
    [ "$n" -eq "$COUNT" ] || die "postfix queued $n of $COUNT messages"
    record postfix "$1" "$2" "$(cpu_s "$c0" "$c1")" "$(cpu_s "$c0" "$c2")" "$(sys_busy "$c0" "$c1")" "$n" "-"
}

# ------------------------------------------------------------------ memory
cat >"$T/hold.py" <<'EOF'
"""hold.py PID PORT N: open N SMTP sessions (banner + EHLO), hold them, print VmRSS of PID in kB."""
import socket, sys, time
pid, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def reply(f):
    while True:
        line = f.readline()
        if not line:
            raise SystemExit("connection closed")
        if line[3:4] != b"-":
            return line
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")
    assert reply(f).startswith(b"220"), "no 220 banner"
    s.sendall(b"EHLO hold%d.bench.example\r\n" % i)
    assert reply(f).startswith(b"250"), "EHLO refused"
    socks.append((s, f))
time.sleep(1.0)
rss = [l.split()[1] for l in open("/proc/%d/status" % pid) if l.startswith("VmRSS:")][0]
print(rss, flush=True)
for s, f in socks:
    s.sendall(b"QUIT\r\n"); reply(f); s.close()
EOF

log "outpost $("$OUTPOST" --version 2>/dev/null || echo '?'); nproc=$(nproc); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
op_start "$T/op-mem"
sleep 1
IDLE_RSS=$(rss_kb "$OP_PID" VmRSS)
"$PY" "$T/hold.py" "$OP_PID" "$OP_PORT" "$HOLD_SESSIONS" >"$T/hold.out" &
HOLD_PID=$!
wait "$HOLD_PID" || die "holding $HOLD_SESSIONS sessions failed"
HOLD_PID=
HOLD_RSS=$(cat "$T/hold.out")
sleep 0.5
AFTER_RSS=$(rss_kb "$OP_PID" VmRSS)
op_stop
rm -rf "$T/op-mem"
log "outpost RSS: idle $IDLE_RSS kB, with $HOLD_SESSIONS sessions $HOLD_RSS kB, after closing them $AFTER_RSS kB"

# ------------------------------------------------------------------ accept runs
pf_setup
for round in $(seq "$RUNS"); do
    for size in $SIZES; do
        if [ $((round % 2)) -eq 1 ]; then
            run_outpost "$size" "$round"; run_postfix "$size" "$round"
        else
            run_postfix "$size" "$round"; run_outpost "$size" "$round"
        fi
    done
done
pf_stop

# ------------------------------------------------------------------ summary
"$PY" - "$T/results.tsv" "$IDLE_RSS" "$HOLD_RSS" "$HOLD_SESSIONS" "$SESSIONS" "$COUNT" "$RUNS" "$PF_VERSION" <<'EOF'
import csv, statistics, sys
path, idle, hold, nhold, sess, count, runs, pfv = sys.argv[1:]
rows = list(csv.DictReader(open(path), delimiter="\t"))
med = lambda xs: statistics.median(float(x) for x in xs)
def pick(server, size, key):
    return [r[key] for r in rows if r["server"] == server and r["size"] == size]
sizes = []
for r in rows:
    if r["size"] not in sizes: sizes.append(r["size"])
def kib(s): return "%g KiB" % (int(s) / 1024)
print()
print("Accept, %s sessions, %s messages per run, one message per connection, medians of %s (Postfix %s, defer_transports=smtp):" % (sess, count, runs, pfv))
print()
print("| size | outpost msgs/s | Postfix msgs/s | outpost / Postfix | outpost CPU ms/msg | Postfix CPU ms/msg (incl. qmgr settle) | smtp-source CPU, % of a core, outpost / Postfix | runs outpost / Postfix msgs/s |")
print("|---|---|---|---|---|---|---|---|")
for s in sizes:
    o, p = med(pick("outpost", s, "msgs_per_s")), med(pick("postfix", s, "msgs_per_s"))
    print("| %s | %.0f | %.0f | %.2fx | %.2f | %.2f (%.2f) | %.0f / %.0f | %s / %s |" % (
        kib(s), o, p, o / p,
        med(pick("outpost", s, "cpu_ms_per_msg")), med(pick("postfix", s, "cpu_ms_per_msg")),
        med(pick("postfix", s, "cpu_settled_ms_per_msg")),
        med(pick("outpost", s, "client_cpu_pct")), med(pick("postfix", s, "client_cpu_pct")),
        ", ".join("%.0f" % float(x) for x in pick("outpost", s, "msgs_per_s")),
        ", ".join("%.0f" % float(x) for x in pick("postfix", s, "msgs_per_s"))))
print()
print("| outpost memory | VmRSS |")
print("|---|---|")
print("| idle, after start | %.1f MiB |" % (int(idle) / 1024))
print("| %s open SMTP sessions (after EHLO) | %.1f MiB |" % (nhold, int(hold) / 1024))
peak = max(int(r["rss_after_kb"]) for r in rows if r["server"] == "outpost")
print("| peak (VmHWM) during an accept run, max over runs | %.1f MiB |" % (peak / 1024))
EOF
