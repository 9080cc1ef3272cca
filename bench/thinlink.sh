#!/usr/bin/env bash
# bench/thinlink.sh - a branch on a thin, flaky link (issue 10's scenario):
# 256 kbit/s each way, 300 ms round trip, down for 8 s every 40 s. One 3 MiB
# message and then 20 small ones are submitted to the branch; what arrives
# at the hub's upstream, when, and what it cost on the link. outpost as the
# branch, then Postfix as the branch, in the same run.
#
# Usage (from anywhere; as root):
#   cargo build --release && bash bench/thinlink.sh
#
# Prerequisites: Debian (apt-get), root, bash, iproute2 (ss), python3 (the
# Debian /usr/bin/python3: standard library, plus python3-aiosmtpd for the
# sink), outpost built in release mode (target/release/outpost, or OUTPOST=).
# The script installs Debian's postfix package (preseeded "No
# configuration": no system MTA, nothing on port 25) and python3-aiosmtpd
# when they are missing. It runs about 2 x BUDGET seconds per round
# (12 minutes with the defaults) and uses little CPU: the link is slow.
#
# What it does, for each round and each side (outpost, postfix; the order
# alternates between rounds), with fresh processes and a fresh temp dir:
#   - the sink: bench/thinlink.py sink, an aiosmtpd server on a free
#     127.0.0.1 port that records each message it gets (arrival time, the
#     X-Bench-Id header, size, SHA-256 of the body);
#   - the hub: `outpost serve` (the same release binary), a relay listener on
#     a free 127.0.0.1 port, [upstream] server = the sink, tls = "none",
#     flush.on_submit = true, flush.interval = "1s": it passes on at once
#     what it gets, so "at the sink" is "at the hub" plus a few ms;
#   - the link: bench/thinlink_relay.py (Python asyncio, standard library)
#     on a free 127.0.0.1 port, forwarding to the hub: RATE bit/s each way,
#     RTT_MS round trip, up CYCLE - DOWN seconds then down DOWN seconds (every
#     open connection reset, connects refused), from its start; it logs each
#     connection and the bytes it carried each way;
#   - the branch:
#       outpost  `outpost serve` with op_config's settings (bench/lib.sh: a
#                relay listener on a free 127.0.0.1 port, control and submit
#                sockets in the temp dir) and only [upstream] server =
#                "[127.0.0.1]:RELAYPORT", tls = "none", [flush] on_submit =
#                true: everything else at its default (no flush.interval,
#                probe_interval 5s, large_message_size 1 MiB, one upstream
#                connection, retry.base 5m);
#       postfix  a private Postfix instance (own config and spool in the temp
#                dir), smtpd on a free 127.0.0.1 port, relayhost =
#                [127.0.0.1]:RELAYPORT; queueing and delivery at Postfix's
#                defaults (queue_run_delay and minimal_backoff_time 300s,
#                up to 20 connections to the relayhost);
#   - LEAD seconds after the link came up: bench/thinlink.py drive submits
#     one message of BIG octets (MIME, a base64 attachment of random bytes)
#     and then SMALL text messages of about SMALL_SIZE octets to the
#     branch's listener (smtplib, one connection each), then waits until the
#     sink has them all or BUDGET seconds have passed since the first
#     submission;
#   - then everything is stopped (by PID) and bench/thinlink.py analyse
#     works out the figures: when each message arrived, whether it arrived
#     whole, the bytes the link carried against the message bytes, and for
#     each link-up while mail was waiting, the delay to the next connection
#     that carried the branch's bytes (an SMTP session; a connection with
#     no byte from the branch is a probe).
# At the end it prints a markdown table (medians over rounds) and the
# link-ups of each run. Nothing listens on port 25 or on a non-loopback
# address; every process started here is stopped by PID on exit and the
# temp dir is removed (KEEP_DIR=dir keeps the logs and per-run results).
#
# Environment (defaults in brackets):
#   RUNS [1]  BUDGET [360] (s per side)  SIDES ["outpost postfix"]
#   RATE [256000] (bit/s each way)  RTT_MS [300]  CYCLE [40]  DOWN [8] (s;
#            DOWN=0: a link that never goes down, for the drain time against
#            the bandwidth bound)
#   BIG [3145728] (octets)  SMALL [20]  SMALL_SIZE [1500] (octets)
#   LEAD [3] (s from the link's start to the first submission)
#   OUTPOST [REPO/target/release/outpost; copied into the temp dir at start]
#   KEEP_DIR [unset]
set -eu

RUNS=${RUNS:-1}
BUDGET=${BUDGET:-360}
SIDES=${SIDES:-outpost postfix}
RATE=${RATE:-256000}
RTT_MS=${RTT_MS:-300}
CYCLE=${CYCLE:-40}
DOWN=${DOWN:-8}
BIG=${BIG:-3145728}
SMALL=${SMALL:-20}
SMALL_SIZE=${SMALL_SIZE:-1500}
LEAD=${LEAD:-3}
PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTPOST_SRC=${OUTPOST:-$REPO/target/release/outpost}
TOOL=$REPO/bench/thinlink.py
RELAY=$REPO/bench/thinlink_relay.py

. "$REPO/bench/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root (installs packages, starts a private Postfix instance)"
[ -x "$OUTPOST_SRC" ] || die "$OUTPOST_SRC missing: run 'cargo build --release' first"
[ -f "$TOOL" ] && [ -f "$RELAY" ] || die "bench/thinlink.py or bench/thinlink_relay.py missing"

# ------------------------------------------------------------------ install
apt_install() {
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
    fi
}
case " $SIDES " in *" postfix "*) install_postfix ;; esac
if ! "$PY" -c 'import aiosmtpd' 2>/dev/null; then
    log "installing python3-aiosmtpd"
    apt_install python3-aiosmtpd
    "$PY" -c 'import aiosmtpd' || die "aiosmtpd still missing for $PY"
fi
command -v ss >/dev/null || die "ss (iproute2) missing"
[ -z "$(ss -ltnH 'sport = :25')" ] || log "WARNING: something already listens on port 25 (not ours)"

# ------------------------------------------------------------------ state, cleanup
T=$(mktemp -d /tmp/outpost-thinlink.XXXXXX)
chmod 755 "$T"                      # postfix must traverse it
OUTPOST=$T/outpost                  # a private copy: a rebuild mid-run changes nothing
cp "$OUTPOST_SRC" "$OUTPOST"
cp "$TOOL" "$RELAY" "$T"/            # the same for the Python helpers
TOOL=$T/thinlink.py RELAY=$T/thinlink_relay.py
SINK_PID= HUB_PID= RELAY_PID= BR_PID= DRV_PID= PF=

stop_side() {  # the link first: nothing is carried after the budget
    stop_pid "$DRV_PID"; DRV_PID=
    stop_pid "$RELAY_PID"; RELAY_PID=
    stop_pid "$BR_PID"; BR_PID=
    [ -n "$PF" ] && pf_stop_dir "$PF"; PF=
    stop_pid "$HUB_PID"; HUB_PID=
    stop_pid "$SINK_PID"; SINK_PID=
}
cleanup() {
    local rc=$?
    set +e
    stop_side
    if [ -n "${KEEP_DIR:-}" ]; then     # logs and results, not the stores or spools
        mkdir -p "$KEEP_DIR" && (cd "$T" && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' \
            -o -name '*.txt' -o -name maillog -o -name '*.toml' -o -name main.cf \) -print0 | tar --null -cf - -T -) \
            | tar -xf - -C "$KEEP_DIR"
    fi
    rm -rf "$T"
    port25_check || rc=1
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

distinct_port() {  # a free port not in "$@"
    local p
    while :; do
        p=$(free_port)
        case " $* " in *" $p "*) ;; *) echo "$p"; return ;; esac
    done
}

log "outpost $("$OUTPOST" --version 2>/dev/null | awk '{print $2}') (sha256 $(sha256sum "$OUTPOST" | cut -c1-12)); nproc=$(nproc); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); kernel $(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg)"
log "link: $RATE bit/s each way, RTT $RTT_MS ms, down $DOWN s every $CYCLE s; BIG=$BIG, $SMALL x ~$SMALL_SIZE octets; BUDGET=$BUDGET s per side; RUNS=$RUNS"

# ------------------------------------------------------------------ one side
pf_branch() {  # DIR RELAYPORT -> PF, BR_PORT
    PF=$1
    BR_PORT=$(distinct_port "$SINK_PORT" "$HUB_PORT" "$RELAY_PORT")
    mkdir -p "$PF/conf"; mkdir -m 755 "$PF/spool"; chmod 755 "$PF"
    cat >"$PF/conf/main.cf" <<EOF
# Benchmark-only private Postfix instance written by outpost bench/thinlink.sh. Loopback only.
# Queueing and delivery settings are Postfix's defaults.
compatibility_level = 3.6
queue_directory = $PF/spool
data_directory = $PF/data
maillog_file_prefixes = /tmp
maillog_file = $PF/maillog
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = pf.branch.example
mydomain = branch.example
myorigin = \$myhostname
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:$2
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
EOF
    write_master_cf "$PF/conf/master.cf" "127.0.0.1:$BR_PORT"
    postfix -c "$PF/conf" start >/dev/null 2>&1 || { tail -5 "$PF/maillog" >&2 || true; die "postfix (branch) did not start"; }
    wait_port "$BR_PORT" || die "postfix (branch) not listening on 127.0.0.1:$BR_PORT"
    PF_VERSION=$(postconf -c "$PF/conf" -h mail_version)
}

run_side() {  # SIDE ROUND
    local side=$1 round=$2 d=$T/$1-$2 t0 at
    mkdir -p "$d"
    SINK_PORT=$(free_port)
    # the sink
    "$PY" "$TOOL" sink --port "$SINK_PORT" --log "$d/sink.jsonl" 2>"$d/sink.log" &
    SINK_PID=$!
    wait_port "$SINK_PORT" || die "the sink did not listen on 127.0.0.1:$SINK_PORT"
    # the hub
    op_config "$d/hub" "$(printf '[upstream]\nserver = "[127.0.0.1]:%s"\ntls = "none"\n\n[flush]\non_submit = true\ninterval = "1s"\n' "$SINK_PORT")"
    sed -i 's/^hostname = .*/hostname = "hub.bench.example"/' "$OP_CFG"
    HUB_PORT=$OP_PORT
    [ "$HUB_PORT" != "$SINK_PORT" ] || die "port clash, try again"
    "$OUTPOST" check-config --config "$OP_CFG" >/dev/null || die "bad hub configuration $OP_CFG"
    "$OUTPOST" serve --config "$OP_CFG" >>"$d/hub/outpost.log" 2>&1 &
    HUB_PID=$!
    wait_port "$HUB_PORT" || { tail -5 "$d/hub/outpost.log" >&2; die "the hub did not listen on 127.0.0.1:$HUB_PORT"; }
    # the link
    RELAY_PORT=$(distinct_port "$SINK_PORT" "$HUB_PORT")
    "$PY" "$RELAY" --listen "$RELAY_PORT" --target "$HUB_PORT" --log "$d/relay.jsonl" \
        --rate "$RATE" --rtt-ms "$RTT_MS" --cycle "$CYCLE" --down "$DOWN" >"$d/relay.out" 2>"$d/relay.log" &
    RELAY_PID=$!
    wait_port "$RELAY_PORT" || die "the relay did not listen on 127.0.0.1:$RELAY_PORT"
    t0=$("$PY" -c 'import json,sys; print(next(json.loads(l)["t"] for l in open(sys.argv[1]) if "\"start\"" in l))' "$d/relay.jsonl")
    # the branch
    if [ "$side" = outpost ]; then
        op_config "$d/branch" "$(printf '[upstream]\nserver = "[127.0.0.1]:%s"\ntls = "none"\n\n[flush]\non_submit = true\n' "$RELAY_PORT")"
        sed -i 's/^hostname = .*/hostname = "branch.bench.example"/' "$OP_CFG"
        BR_PORT=$OP_PORT BR_CFG=$OP_CFG
        "$OUTPOST" check-config --config "$BR_CFG" >/dev/null || die "bad branch configuration $BR_CFG"
        # info: its flush and probe lines are part of the record
        OUTPOST_LOG=info "$OUTPOST" serve --config "$BR_CFG" >>"$d/branch/outpost.log" 2>&1 &
        BR_PID=$!
        wait_port "$BR_PORT" || { tail -5 "$d/branch/outpost.log" >&2; die "the branch did not listen on 127.0.0.1:$BR_PORT"; }
        log "round $round, outpost: sink :$SINK_PORT, hub :$HUB_PORT (pid $HUB_PID), link :$RELAY_PORT (pid $RELAY_PID), branch outpost :$BR_PORT (pid $BR_PID)"
    else
        pf_branch "$d/pf" "$RELAY_PORT"
        log "round $round, postfix: sink :$SINK_PORT, hub :$HUB_PORT (pid $HUB_PID), link :$RELAY_PORT (pid $RELAY_PID), branch Postfix $PF_VERSION :$BR_PORT (master $(master_of "$PF"))"
    fi
    # submit, and wait for the sink or the budget
    at=$(awk -v t="$t0" -v l="$LEAD" 'BEGIN{printf "%.3f", t + l}')
    "$PY" "$TOOL" drive --port "$BR_PORT" --at "$at" --big "$BIG" --small "$SMALL" --small-size "$SMALL_SIZE" \
        --budget "$BUDGET" --submitted "$d/submitted.jsonl" --sink-log "$d/sink.jsonl" >"$d/drive.txt" 2>&1 &
    DRV_PID=$!
    wait "$DRV_PID" || { cat "$d/drive.txt" >&2; die "submitting to the branch failed"; }
    DRV_PID=
    log "round $round, $side: $(cat "$d/drive.txt")"
    # what the branch still holds
    if [ "$side" = outpost ]; then
        "$OUTPOST" queue list --config "$BR_CFG" >"$d/branch-queue.txt" 2>&1 || true
        "$OUTPOST" status --config "$BR_CFG" >"$d/branch-status.txt" 2>&1 || true
    else
        postqueue -c "$PF/conf" -p >"$d/branch-queue.txt" 2>&1 || true
    fi
    sed 's/^/    /' "$d/branch-queue.txt" | head -20 >&2
    stop_side
    "$PY" "$TOOL" analyse "$d" --rate "$RATE" --cycle "$CYCLE" --down "$DOWN" --budget "$BUDGET" >"$d/result.json" \
        || die "analyse failed"
    "$PY" - "$d/result.json" "$side" "$round" <<'EOF'
import json, sys
p, side, rnd = sys.argv[1:]
r = json.load(open(p)); r["side"] = side; r["round"] = int(rnd)
json.dump(r, open(p, "w"))
EOF
    cp "$d/result.json" "$T/result-$side-$round.json"
    "$PY" -c '
import json, sys
r = json.load(open(sys.argv[1]))
print("[result] %s round %s: small %d/%d (max %s s), big %s, carried %d up / %d message bytes = %.2fx, %d sessions (%d cut), link-ups with mail waiting %d, with a session within 5 s %d" % (
    r["side"], r["round"], r["small_arrived"], r["small_total"], r.get("small_latency_max_s", "-"),
    ("after %s s" % r["big_arrived_s"]) if "big_arrived_s" in r else "no", r["carried_up"], r["message_bytes"],
    r["carried_ratio"], r["sessions"], r["cut_sessions"], r["linkups_waiting"], r["linkups_within_5s"]))' "$d/result.json" >&2
}

# ------------------------------------------------------------------ runs
for round in $(seq "$RUNS"); do
    sides=$SIDES
    [ $((round % 2)) -eq 0 ] && sides=$(echo "$SIDES" | awk '{for (i = NF; i > 0; i--) printf "%s%s", $i, (i > 1 ? " " : "")}')
    for side in $sides; do run_side "$side" "$round"; done
done

# ------------------------------------------------------------------ summary
echo
echo "Thin, flaky link: $RATE bit/s each way, RTT $RTT_MS ms, down $DOWN s every $CYCLE s; 1 x $BIG octets then $SMALL x ~$SMALL_SIZE; budget $BUDGET s per side; ${PF_VERSION:+Postfix $PF_VERSION; }medians of $RUNS run(s)"
echo
"$PY" "$TOOL" table $(for round in $(seq "$RUNS"); do for side in $SIDES; do echo "$T/result-$side-$round.json"; done; done)
