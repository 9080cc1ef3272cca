#!/usr/bin/env bash
# bench/uploads.sh - memory with many large messages being received at once,
# outpost side by side with Postfix in the same run.
#
# Usage (from anywhere; needs root):
#   cargo build --release && bash bench/uploads.sh
#
# What it does, RUNS times and for each server (order alternating):
#   - starts it fresh (outpost: new store and process, one relay listener on
#     a free 127.0.0.1 port; Postfix: a private queue-only instance, smtpd on
#     a free 127.0.0.1 port, nothing on port 25);
#   - runs bench/uploads.py: SESSIONS connections each start one SIZE_MIB
#     message over DATA, all stop half-way, the memory of the server's
#     whole process tree is read (the sum of Pss, so shared pages count
#     once; outpost: one process; Postfix: master, smtpd and cleanup
#     processes), then all finish;
#   - checks every message was accepted and is in the queue;
#   - prints a markdown table of medians: RSS half-way, peak RSS, time.
#
# Environment (defaults in brackets):
#   SESSIONS [40]  SIZE_MIB [8]  RUNS [3]  KEEP_DIR [unset]
set -eu

SESSIONS=${SESSIONS:-40}
SIZE_MIB=${SIZE_MIB:-8}
RUNS=${RUNS:-3}
PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTPOST=${OUTPOST:-$REPO/target/release/outpost}
. "$REPO/bench/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root (installs postfix, starts a private Postfix instance)"
[ -x "$OUTPOST" ] || die "$OUTPOST missing: run 'cargo build --release' first"
install_postfix
command -v ss >/dev/null || die "ss (iproute2) missing"

T=$(mktemp -d /tmp/outpost-uploads.XXXXXX)
chmod 755 "$T"
OP_PID=
PF=
cleanup() {
    local rc=$?
    set +e
    stop_pid "$OP_PID"
    [ -n "$PF" ] && pf_stop_dir "$PF"
    if [ -n "${KEEP_DIR:-}" ] && [ -f "$T/results.tsv" ]; then
        mkdir -p "$KEEP_DIR" && cp "$T/results.tsv" "$KEEP_DIR"/
    fi
    rm -rf "$T"
    port25_check || rc=1
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM


printf 'server\tround\tpss_half_kb\tpss_peak_kb\telapsed_s\n' >"$T/results.tsv"
record() {  # server round "key=value ..."
    local half peak el
    half=$(sed -n 's/.*pss_half_kb=\([0-9]*\).*/\1/p' <<<"$3")
    peak=$(sed -n 's/.*pss_peak_kb=\([0-9]*\).*/\1/p' <<<"$3")
    el=$(sed -n 's/.*elapsed_s=\([0-9.]*\).*/\1/p' <<<"$3")
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$half" "$peak" "$el" >>"$T/results.tsv"
    log "$1 round $2: $3"
}

run_outpost() {
    local dir=$T/op-$1 out n
    op_config "$dir"
    "$OUTPOST" serve --config "$OP_CFG" >>"$dir/outpost.log" 2>&1 &
    OP_PID=$!
    wait_port "$OP_PORT" || { tail -5 "$dir/outpost.log" >&2; die "outpost did not listen"; }
    sleep 0.5
    out=$("$PY" "$REPO/bench/uploads.py" "$OP_PORT" "$OP_PID" "$SESSIONS" "$SIZE_MIB") \
        || die "not every upload to outpost was accepted: $out"
    stop_pid "$OP_PID"; OP_PID=
    n=$("$OUTPOST" queue list --json --config "$OP_CFG" | "$PY" -c 'import json,sys;print(len(json.load(sys.stdin)))')
    [ "$n" -eq "$SESSIONS" ] || die "outpost queued $n of $SESSIONS messages"
    record outpost "$1" "$out"
    rm -rf "$dir"
}

run_postfix() {
    local port out n
    PF=$T/pf-$1
    port=$(free_port)
    pf_queue_only "$PF" "$port" "message_size_limit = 26214400
default_process_limit = $((SESSIONS + 20))"
    wait_port "$port" || die "postfix not listening on 127.0.0.1:$port"
    sleep 0.5
    out=$("$PY" "$REPO/bench/uploads.py" "$port" "$(master_of "$PF")" "$SESSIONS" "$SIZE_MIB") \
        || die "not every upload to Postfix was accepted: $out"
    n=$(pf_queue_files "$PF")
    pf_stop_dir "$PF"; PF=
    [ "$n" -eq "$SESSIONS" ] || die "postfix queued $n of $SESSIONS messages"
    record "postfix $PF_VERSION" "$1" "$out"
}

log "$SESSIONS uploads of $SIZE_MIB MiB at once, $RUNS rounds"
for r in $(seq "$RUNS"); do
    if [ $((r % 2)) -eq 1 ]; then run_outpost "$r"; run_postfix "$r"; else run_postfix "$r"; run_outpost "$r"; fi
done

"$PY" - "$T/results.tsv" "$SESSIONS" "$SIZE_MIB" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print(f"\n{sys.argv[2]} messages of {sys.argv[3]} MiB in flight at once (medians of {len(rows)//2} runs)\n")
print("| server | memory half-way (Pss) | peak | time |")
print("|---|---|---|---|")
for server in dict.fromkeys(r["server"] for r in rows):
    rs = [r for r in rows if r["server"] == server]
    med = lambda k: statistics.median(float(r[k]) for r in rs)
    print(f"| {server} | {med('pss_half_kb')/1024:.1f} MiB | {med('pss_peak_kb')/1024:.1f} MiB | {med('elapsed_s'):.1f} s |")
EOF
