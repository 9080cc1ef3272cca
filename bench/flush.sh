#!/usr/bin/env bash
# bench/flush.sh - how fast outpost flushes a queue over an emulated 100 ms
# round trip, side by side with Postfix flushing the same queue to the same
# upstream in the same run.
#
# Usage (from anywhere; needs root):
#   cargo build --release && bash bench/flush.sh
#
# What it does:
#   - installs Debian's postfix package if smtp-source, smtp-sink or postfix
#     is missing, preseeded "No configuration" (nothing on port 25);
#   - builds the link with bench/harness/netns-link.sh up DELAY_MS 0 none:
#     namespace bench-ns at NS_ADDR (10.200.0.2), host side 10.200.0.1, one-way
#     delay DELAY_MS each way (veth + netem, or TUN + netdelay.py when the
#     kernel has no netem); the upstream always runs inside the namespace;
#   - two upstreams inside the namespace:
#       sink     smtp-sink (PIPELINING, no CHUNKING), started per run by
#                bench/harness/sink-flush.sh -a NS_ADDR -n bench-ns, which also
#                checks that the sink got every message;
#       postfix  a private Postfix instance (PIPELINING + CHUNKING), smtpd on
#                NS_ADDR:PORT only (inet_interfaces = NS_ADDR, the private
#                namespace link), default_transport = discard; started per run
#                and stopped by its master's PID; every message it discards is
#                counted in its log;
#   - RUNS rounds; in each, for each upstream: one Postfix flush and one outpost
#     flush per value of SINK_CONNS / PFUP_CONNS (upstream.connections); the
#     order alternates between rounds. Each run starts from a fresh queue of
#     COUNT messages of SIZE body bytes, filled by smtp-source (10 sessions)
#     while nothing listened at the upstream address;
#   - times the flush with bench/harness/watch_queue.py (the clock starts
#     just before the flush command, stops when the queue depth reads 0) and
#     counts established connections to the upstream port meanwhile;
#   - with TRACE=1 (default) one more outpost run per upstream, not in the
#     medians, with a packet tracer on the host end of the link: round trips
#     (client/server turns) per message, and where the client waits;
#   - prints markdown tables of medians.
#
# Outpost: `outpost serve` with a fresh store per run, one relay listener on a
# free 127.0.0.1 port, [upstream] server = "[NS_ADDR]:PORT", tls = "none",
# connections = N, no flush.interval, flush.on_submit = false, [control] and
# [submit] sockets in the run's temp dir (so that no two instances collide and
# nothing goes to /run/outpost); the timed flush is
# `outpost flush --all --config CFG` through the daemon's control socket (run in
# the background so that the watcher can sample connections); depth is
# `outpost queue list --json | len`.
# Postfix (the client): a private instance (own config and spool in a temp
# dir), smtpd on a free 127.0.0.1 port, relayhost = [NS_ADDR]:PORT,
# defer_transports = smtp while filling; then `defer_transports =`, reload,
# `postqueue -f` (the usual way to flush a Postfix queue). Its smtp
# client uses Postfix's default destination concurrency (20 connections).
# Depth: files in its queue directories.
#
# Round trips per message per connection = avg_conns x elapsed / (messages x RTT),
# RTT as measured by netns-link.sh (TCP connect to a closed port).
# Every process started here is stopped by PID on exit, temp dirs are removed,
# `netns-link.sh down` removes the link. Nothing listens on port 25.
#
# Environment (defaults in brackets):
#   COUNT [1000]  SIZE [10240] (body bytes, smtp-source -l)  RUNS [3]
#   DELAY_MS [50] (one way; RTT = 2x)  UPSTREAMS ["sink postfix"]
#   SINK_CONNS ["1 20"]  PFUP_CONNS ["1"]  (outpost upstream.connections per run)
#   TRACE [1]  TIMEOUT [900] (s per flush)  KEEP_DIR [unset: raw results deleted]
#   TRACE_DUMP [unset] prefix of files (.sink, .postfix) for the traced runs'
#            per-packet log (time, client port, c/s, payload length, TCP
#            flags, first payload bytes)
#   ROUTE_CC [unset] diagnosis only: TCP congestion control for the route to
#            NS_ADDR (`ip route replace ... congctl cubic`); unset = the
#            machine's default (net.ipv4.tcp_congestion_control)
#   OUTPOST [REPO/target/release/outpost; copied into the temp dir at start]
#   SHARED_BENCH [bench/harness]
set -eu

COUNT=${COUNT:-1000}
SIZE=${SIZE:-10240}
RUNS=${RUNS:-3}
DELAY_MS=${DELAY_MS:-50}
UPSTREAMS=${UPSTREAMS:-sink postfix}
SINK_CONNS=${SINK_CONNS:-1 20}
PFUP_CONNS=${PFUP_CONNS:-1}
TRACE=${TRACE:-1}
TIMEOUT=${TIMEOUT:-900}
FILL_SESSIONS=10
SHARED=${SHARED_BENCH:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/harness}
PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3
NETNS=bench-ns

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTPOST_SRC=${OUTPOST:-$REPO/target/release/outpost}

. "$REPO/bench/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root (network namespace, private Postfix instances)"
[ -x "$OUTPOST_SRC" ] || die "$OUTPOST_SRC missing: run 'cargo build --release' first"
for f in netns-link.sh netdelay.py sink-flush.sh lib.sh watch_queue.py cpu.py; do
    [ -f "$SHARED/$f" ] || die "$SHARED/$f missing (set SHARED_BENCH)"
done

# ------------------------------------------------------------------ install
install_postfix smtp-source smtp-sink
command -v ss >/dev/null && command -v ip >/dev/null || die "ss/ip (iproute2) missing"
SMTP_SOURCE=$(find_tool smtp-source) || die "smtp-source not found after installing postfix"
find_tool smtp-sink >/dev/null || die "smtp-sink not found after installing postfix"
[ -z "$(ss -ltnH 'sport = :25')" ] || log "WARNING: something already listens on port 25 (not ours)"
if ip netns list 2>/dev/null | grep -qw "^$NETNS"; then
    die "namespace $NETNS exists already (another benchmark?): not touching it"
fi

# ------------------------------------------------------------------ state, cleanup
T=$(mktemp -d /tmp/outpost-flush.XXXXXX)
chmod 755 "$T"                      # postfix must traverse it
OUTPOST=$T/outpost                  # a private copy: a rebuild mid-run changes nothing
cp "$OUTPOST_SRC" "$OUTPOST"
OP_PID=
OP_FLUSH_DIR=
SRC_PID=
TRACE_PID=
PF=
PFUP=
NETNS_UP=0

flush_bg_stop() {  # the backgrounded `outpost flush` of a run, if still there
    [ -n "$OP_FLUSH_DIR" ] && [ -f "$OP_FLUSH_DIR/flush.pid" ] && stop_pid "$(cat "$OP_FLUSH_DIR/flush.pid")"
    OP_FLUSH_DIR=
}
cleanup() {
    local rc=$?
    set +e
    stop_pid "$TRACE_PID"; stop_pid "$SRC_PID"; flush_bg_stop; stop_pid "$OP_PID"
    [ -n "$PF" ] && pf_stop_dir "$PF"
    [ -n "$PFUP" ] && pf_stop_dir "$PFUP"
    if [ "$NETNS_UP" = 1 ]; then
        local left; left=$(ip netns pids "$NETNS" 2>/dev/null | tr '\n' ' ')
        [ -n "$left" ] && log "WARNING: still in $NETNS: $left"
        "$SHARED/netns-link.sh" down >&2
    fi
    if [ -n "${KEEP_DIR:-}" ] && [ -f "$T/results.tsv" ]; then
        mkdir -p "$KEEP_DIR" && cp "$T/results.tsv" "$T"/*.txt "$KEEP_DIR"/ 2>/dev/null
    fi
    rm -rf "$T"
    port25_check || rc=1
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {  # wait_port ADDR PORT [NETNS]
    local ssx=(ss -ltnH "sport = :$2")
    [ -n "${3:-}" ] && ssx=(ip netns exec "$3" "${ssx[@]}")
    for _ in $(seq 100); do
        "${ssx[@]}" 2>/dev/null | grep -q "$1:$2" && return 0
        sleep 0.1
    done
    return 1
}
kv() { sed -n "s/^$1=//p" <<<"$2" | tail -1; }

# ------------------------------------------------------------------ the link
log "outpost $("$OUTPOST" --version 2>/dev/null | awk '{print $2}') ($(sha256sum "$OUTPOST" | cut -c1-12)); nproc=$(nproc); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); kernel $(uname -r)"
LINK=$("$SHARED/netns-link.sh" up "$DELAY_MS" 0 none | tail -1)
NETNS_UP=1
NS_ADDR=$(sed -n 's/.*NS_ADDR=\([^ ]*\).*/\1/p' <<<"$LINK")
HOST_ADDR=$(sed -n 's/.*HOST_ADDR=\([^ ]*\).*/\1/p' <<<"$LINK")
RTT_MS=$(sed -n 's/.*RTT_MS=\([0-9.]*\).*/\1/p' <<<"$LINK")
LINK_MODE=$(sed -n 's/.*MODE=\([^ ]*\).*/\1/p' <<<"$LINK")
[ -n "$NS_ADDR" ] && [ -n "$RTT_MS" ] || die "netns-link.sh said: $LINK"
RTT_S=$(awk -v r="$RTT_MS" 'BEGIN{printf "%.4f", r/1000}')
log "link: $LINK"
if [ -n "${ROUTE_CC:-}" ]; then   # diagnosis only: another TCP congestion control on the link's route
    ip route replace "$NS_ADDR" dev "${HOST_DEV:-bnch0}" proto kernel scope link src "$HOST_ADDR" congctl "$ROUTE_CC"
    log "route to $NS_ADDR: $(ip route show "$NS_ADDR")"
fi
SINK_PORT=$(free_port)      # ports inside the namespace: nothing else listens there
PFUP_PORT=$(free_port)
[ "$PFUP_PORT" != "$SINK_PORT" ] || PFUP_PORT=$((SINK_PORT + 1))
echo "$LINK" >"$T/link.txt"

# ------------------------------------------------------------------ Postfix, common
# The client: a private instance on loopback, relaying to the namespace.
pf_setup() {
    PF=$T/pf
    PF_PORT=$(free_port)
    mkdir -p "$PF/conf"; mkdir -m 755 "$PF/spool"; chmod 755 "$PF"
    cat >"$PF/conf/main.cf" <<EOF
# Benchmark-only private Postfix instance written by outpost bench/flush.sh. Loopback only.
compatibility_level = 3.6
queue_directory = $PF/spool
data_directory = $PF/data
maillog_file_prefixes = /tmp
maillog_file = $PF/maillog
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = pf.bench.example
mydomain = bench.example
myorigin = \$myhostname
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [$NS_ADDR]:$SINK_PORT
defer_transports = smtp
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
EOF
    write_master_cf "$PF/conf/master.cf" "127.0.0.1:$PF_PORT"
    postfix -c "$PF/conf" start >/dev/null 2>&1 || { tail -5 "$PF/maillog" >&2 || true; die "postfix (client) did not start"; }
    wait_port 127.0.0.1 "$PF_PORT" || die "postfix (client) not listening on 127.0.0.1:$PF_PORT"
    PF_VERSION=$(postconf -c "$PF/conf" -h mail_version)
    log "postfix $PF_VERSION (client) up, master pid $(master_of "$PF"), 127.0.0.1:$PF_PORT"
}
pf_reload() { postfix -c "$PF/conf" reload >/dev/null 2>&1; sleep 1; }

# The CHUNKING upstream: a private instance inside the namespace, on NS_ADDR only.
pfup_setup() {
    PFUP=$T/pfup
    mkdir -p "$PFUP/conf"; mkdir -m 755 "$PFUP/spool"; chmod 755 "$PFUP"
    cat >"$PFUP/conf/main.cf" <<EOF
# Benchmark-only private Postfix upstream written by outpost bench/flush.sh.
# Runs inside network namespace $NETNS and listens only on $NS_ADDR (the
# private benchmark link); accepts relay from $HOST_ADDR and discards.
compatibility_level = 3.6
queue_directory = $PFUP/spool
data_directory = $PFUP/data
maillog_file_prefixes = /tmp
maillog_file = $PFUP/maillog
inet_interfaces = $NS_ADDR
inet_protocols = ipv4
myhostname = up.bench.example
mydomain = bench.example
myorigin = \$myhostname
mydestination =
mynetworks = $HOST_ADDR/32
default_transport = discard
relay_transport = discard
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
EOF
    write_master_cf "$PFUP/conf/master.cf" "$NS_ADDR:$PFUP_PORT"
    : >"$PFUP/maillog"
}
pfup_start() {
    ip netns exec "$NETNS" postfix -c "$PFUP/conf" start >/dev/null 2>&1 \
        || { tail -5 "$PFUP/maillog" >&2 || true; die "postfix upstream did not start"; }
    wait_port "$NS_ADDR" "$PFUP_PORT" "$NETNS" || die "postfix upstream not listening on $NS_ADDR:$PFUP_PORT in $NETNS"
}
pfup_stop() { pf_stop_dir "$PFUP"; }
pfup_sent() { grep -c 'postfix/discard\[.*status=sent' "$PFUP/maillog" || true; }

# ------------------------------------------------------------------ outpost
op_start() {  # op_start DIR SERVER CONNS -> OP_PID, OP_PORT, OP_CFG
    local dir=$1
    op_config "$dir" "$(printf '[upstream]\nserver = "%s"\ntls = "none"\nconnections = %s\n\n[flush]\non_submit = false\n' "$2" "$3")"
    "$OUTPOST" serve --config "$OP_CFG" >>"$dir/outpost.log" 2>&1 &
    OP_PID=$!
    wait_port 127.0.0.1 "$OP_PORT" || { tail -5 "$dir/outpost.log" >&2; die "outpost did not listen on 127.0.0.1:$OP_PORT"; }
}
op_stop() { stop_pid "$OP_PID"; OP_PID=; }
op_depth_cmd() { echo "'$OUTPOST' queue list --json --config '$OP_CFG' | '$PY' -c 'import json,sys;print(len(json.load(sys.stdin)))'"; }

fill() {  # fill PORT: COUNT messages of SIZE over FILL_SESSIONS sessions
    local rc=0
    "$SMTP_SOURCE" -4 -s "$FILL_SESSIONS" -m "$COUNT" -l "$SIZE" -f bench@source.example \
        -t sink@dest.example -M bench-client "127.0.0.1:$1" 2>"$T/src.err" &
    SRC_PID=$!
    wait "$SRC_PID" || rc=$?
    SRC_PID=
    if [ "$rc" -ne 0 ] || grep -qiE 'fatal|error' "$T/src.err"; then tail -5 "$T/src.err" >&2; return 1; fi
}

# ------------------------------------------------------------------ packet tracer (TRACE=1)
cat >"$T/trace.py" <<'EOF'
"""trace.py DEV PORT COUNT RTT_S: watch the TCP connections to remote port PORT
on DEV (the host end of the link: client packets as sent, server packets as
they arrive after the emulated delay). On SIGTERM print key=value lines:
turns = client data sent after server data was received (with one transaction
at a time each one waits for the upstream: a round trip; with CHUNKING and a
window of transactions in flight a turn is just the refill after a reply, and
the reply bursts, server data separated by more than RTT/2, count the round
trips instead), by what the client sent first (MAIL = a new
envelope sent alone, body = message data, EHLO/QUIT/other), plus connects;
think = time from the server data that ended a wait to the client's next
send (local work: store commits, body reads); waits over 5 ms listed;
send stalls = client data sent more than RTT/2 after the previous client data
with no server data in between (TCP held it back: congestion or receive
window), with the client sockets' cwnd sampled by `ss -ti`."""
import os, signal, socket, struct, subprocess, sys, threading, time
dev, port, count, rtt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
s.bind((dev, 0)); s.settimeout(0.2)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)   # Linux; kernel time of each packet
s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
conns = {}   # client port -> state
dump = open(os.environ["TRACE_DUMP"], "w") if os.environ.get("TRACE_DUMP") else None   # every packet
stop = False
cwnd = []    # the client sockets' congestion windows (ss -ti), sampled every 0.25 s
pacing = []  # and their pacing rates
ccs = set()  # and congestion control
def sample_cwnd():
    while not stop:
        toks = subprocess.run(["ss", "-tinH", "state", "established", "( dport = :%d )" % port],
                              capture_output=True, text=True).stdout.split()
        for i, tok in enumerate(toks):
            if tok.startswith("cwnd:"):
                cwnd.append(int(tok[5:]))
            elif tok in ("bbr", "cubic", "reno", "bic", "htcp", "vegas", "westwood", "dctcp"):
                ccs.add(tok)
            elif tok == "pacing_rate" and i + 1 < len(toks):
                v = toks[i + 1]
                for suf, m in (("Gbps", 1e9), ("Mbps", 1e6), ("Kbps", 1e3), ("kbps", 1e3), ("bps", 1)):
                    if v.endswith(suf):
                        try: pacing.append(float(v[:-len(suf)]) * m)
                        except ValueError: pass
                        break
        time.sleep(0.25)
threading.Thread(target=sample_cwnd, daemon=True).start()
def on_term(*_):
    global stop; stop = True
signal.signal(signal.SIGTERM, on_term)
while not stop:
    try:
        pkt, anc, _, _ = s.recvmsg(65535, 64)
    except socket.timeout:
        continue
    except InterruptedError:
        continue
    t = time.time()
    for lvl, typ, data in anc:
        if lvl == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS:
            sec, ns = struct.unpack("qq", data[:16]); t = sec + ns / 1e9
    if len(pkt) < 20 or pkt[0] >> 4 != 4 or pkt[9] != 6:
        continue
    ihl = (pkt[0] & 15) * 4
    tot = struct.unpack("!H", pkt[2:4])[0]
    sp, dp = struct.unpack("!HH", pkt[ihl:ihl + 4])
    off = (pkt[ihl + 12] >> 4) * 4
    flags = pkt[ihl + 13]
    payload = pkt[ihl + off:tot]
    if dp == port:
        c, frm = sp, "c"
    elif sp == port:
        c, frm = dp, "s"
    else:
        continue
    if dump:
        dump.write("%.6f %d %s %d %02x %r\n" % (t, c, frm, len(payload), flags, bytes(payload[:24])))
    st = conns.setdefault(c, {"syn": None, "end": None, "last": None, "last_s": None,
                              "turns": {}, "think": [], "wait": [], "last_c": None, "bursts": 0,
                              "stalls": [], "spread": []})
    if frm == "c" and flags & 0x02:
        st["syn"] = t
    if flags & 0x05:
        st["end"] = t
    if not payload:
        continue
    if frm == "s":
        if st["last"] == "c" and st.get("first_c") is not None:
            st["spread"].append(st["last_c"] - st["first_c"])   # first to last packet of a client flight
        if st["last_s"] is None or t - st["last_s"] > rtt / 2:
            st["bursts"] += 1
        if st["last"] == "c" and st["last_c"] is not None:
            st["wait"].append(t - st["last_c"])
        st["last"], st["last_s"] = "s", t
    else:
        if st["last"] == "s":
            head = bytes(payload[:4]).upper()
            kind = head.decode("ascii", "replace") if head in (b"MAIL", b"EHLO", b"QUIT", b"RSET", b"DATA") else "body"
            st["turns"][kind] = st["turns"].get(kind, 0) + 1
            st["first_c"] = t
            st["think"].append((t - st["last_s"], kind, bytes(payload[:12])))
        elif st["last"] == "c" and t - st["last_c"] > rtt / 2:
            st["stalls"].append(t - st["last_c"])      # TCP held data back (cwnd/rwnd)
        st["last"], st["last_c"] = "c", t
if dump:
    dump.close()
turns = {}
think = []
wait = []
for st in conns.values():
    for k, v in st["turns"].items():
        turns[k] = turns.get(k, 0) + v
    think += st["think"]; wait += st["wait"]
n_turns = sum(turns.values()) + len(conns)          # + one per TCP connect
print("trace_conns=%d" % len(conns))
print("trace_round_trips=%d" % n_turns)
print("trace_round_trips_per_msg=%.3f" % (n_turns / count))
bursts = sum(st["bursts"] for st in conns.values())
print("trace_reply_bursts=%d (%.3f per msg; server data separated by more than RTT/2, greeting included)" % (bursts, bursts / count))
print("trace_turns_by_first_command=%s" % ",".join("%s:%d" % kv for kv in sorted(turns.items())))
think_s = sum(x[0] for x in think)
print("trace_think_s=%.2f" % think_s)
big = [x for x in think if x[0] > 0.005]
print("trace_think_over_5ms=%d (%.2f s)" % (len(big), sum(x[0] for x in big)))
if think:
    print("trace_think_max_ms=%.1f" % (1000 * max(x[0] for x in think)))
by = {}
for d, k, _ in big:
    by.setdefault(k, []).append(d)
print("trace_think_over_5ms_by_next=%s" % ",".join("%s:%d/%.0fms_median" % (k, len(v), 1000 * sorted(v)[len(v) // 2]) for k, v in sorted(by.items())))
if wait:
    w = sorted(wait)
    print("trace_wait_s=%.2f" % sum(w))
    print("trace_wait_median_ms=%.1f" % (1000 * w[len(w) // 2]))
stalls = [x for st in conns.values() for x in st["stalls"]]
print("trace_send_stalls=%d (%.2f s; client data held back more than RTT/2 with no reply in between)" % (len(stalls), sum(stalls)))
if cwnd:
    c = sorted(cwnd)
    print("trace_cwnd_segments=min %d / median %d / max %d (%d samples)" % (c[0], c[len(c) // 2], c[-1], len(c)))
spread = sorted(x for st in conns.values() for x in st["spread"])
if spread:
    print("trace_send_spread_s=%.2f (first to last packet of each client flight; median %.1f ms, max %.1f ms)" % (
        sum(spread), 1000 * spread[len(spread) // 2], 1000 * spread[-1]))
if pacing:
    p = sorted(pacing)
    print("trace_pacing_rate=median %.1f Mbit/s (min %.1f, max %.1f)" % (p[len(p) // 2] / 1e6, p[0] / 1e6, p[-1] / 1e6))
if ccs:
    print("trace_tcp_congestion_control=%s" % ",".join(sorted(ccs)))
spans = [st["end"] - st["syn"] for st in conns.values() if st["syn"] and st["end"]]
if spans:
    print("trace_conn_span_s=%.2f" % max(spans))
EOF

# ------------------------------------------------------------------ one timed flush
printf 'upstream\tmta\tconns_cfg\tround\tcount\telapsed_s\tmsgs_per_s\tavg_conns\tmax_conns\trt_per_msg_conn\tupstream_got\tcpu_s\tsys_busy_pct\tfirst_conn_s\tnote\n' >"$T/results.tsv"
record() {  # upstream mta conns round out got note
    local out=$5 el c rate rt
    el=$(kv elapsed_s "$out"); c=$(kv avg_conns "$out")
    rate=$(awk -v n="$COUNT" -v e="$el" 'BEGIN{printf "%.1f", n/e}')
    rt=$(awk -v c="$c" -v e="$el" -v n="$COUNT" -v r="$RTT_S" 'BEGIN{printf "%.2f", c*e/(n*r)}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$COUNT" "$el" "$rate" \
        "$c" "$(kv max_conns "$out")" "$rt" "$6" "$(kv target_cpu_s "$out")" "$(kv sys_busy_pct "$out")" \
        "$(kv first_conn_s "$out")" "$7" >>"$T/results.tsv"
    log "$1 $2 conns=$3 round=$4: $rate msgs/s, $el s, avg_conns $c (max $(kv max_conns "$out")), $rt round trips/msg/conn, upstream got $6/$COUNT${7:+ ($7)}"
}

# timed UPSTREAM TPID PREP FLUSH_CMD DEPTH_CMD -> OUT (key=value lines), GOT
timed() {
    local up=$1 tpid=$2 prep=$3 fcmd=$4 dcmd=$5 before c0 c1 res
    if [ "$up" = sink ]; then
        local opts=(-a "$NS_ADDR" -n "$NETNS" -t "$TIMEOUT" -P "$tpid")
        [ -n "$prep" ] && opts+=(-r "$prep")
        OUT=$(SINK_USER=nobody bash "$SHARED/sink-flush.sh" "${opts[@]}" "$SINK_PORT" "$fcmd" "$dcmd") \
            || { echo "$OUT" >&2; die "shared flush.sh failed (see above)"; }
        GOT=$(kv sink_msgs "$OUT")
    else
        pfup_start
        before=$(pfup_sent)
        [ -n "$prep" ] && { bash -c "$prep" >/dev/null || die "prep command failed"; }
        c0=$("$PY" "$SHARED/cpu.py" snap "$tpid")
        res=$("$PY" "$SHARED/watch_queue.py" --flush-cmd "$fcmd" --depth-cmd "$dcmd" \
              --port "$PFUP_PORT" --interval 0.1 --timeout "$TIMEOUT") || die "watch_queue failed"
        c1=$("$PY" "$SHARED/cpu.py" snap "$tpid")
        # the upstream discards what it queued: wait until its queue is empty
        for _ in $(seq 300); do [ "$(pf_queue_files "$PFUP")" -eq 0 ] && break; sleep 0.2; done
        # and until the client has closed its connections (Postfix caches
        # them for 2 s), so that the upstream has logged each disconnect
        for _ in $(seq 100); do
            [ -z "$(ss -tnH state established "( dport = :$PFUP_PORT )")" ] && break
            sleep 0.1
        done
        sleep 0.3
        GOT=$(( $(pfup_sent) - before ))
        grep -E 'smtpd\[.*disconnect from' "$PFUP/maillog" | tail -n +"$((PFUP_DISC + 1))" >"$T/disc.txt" || true
        pfup_stop
        PFUP_DISC=$(grep -cE 'smtpd\[.*disconnect from' "$PFUP/maillog" || true)
        OUT="$res
$("$PY" "$SHARED/cpu.py" diff "$c0" "$c1")"
        [ "$(kv timed_out "$OUT")" = 1 ] && die "flush timed out after $TIMEOUT s"
        [ "$GOT" -ge "$COUNT" ] || die "the postfix upstream got only $GOT of $COUNT messages"
    fi
}
PFUP_DISC=0
upstream_addr() { if [ "$1" = sink ]; then echo "[$NS_ADDR]:$SINK_PORT"; else echo "[$NS_ADDR]:$PFUP_PORT"; fi; }
upstream_port() { if [ "$1" = sink ]; then echo "$SINK_PORT"; else echo "$PFUP_PORT"; fi; }
disc_summary() {  # connections and commands the Postfix upstream logged (its disconnect lines)
    [ -s "$T/disc.txt" ] || return 0
    sed -E 's/.*disconnect from [^ ]+ //' "$T/disc.txt" | awk '
        { for (i = 1; i <= NF; i++) { split($i, kv, "="); split(kv[2], n, "/")
              if (!(kv[1] in sum)) order[++k] = kv[1]; sum[kv[1]] += n[1] } }
        END { printf "%d connections:", NR; for (i = 1; i <= k; i++) printf " %s=%d", order[i], sum[order[i]] }'
}

run_outpost() {  # upstream conns round [trace]
    local up=$1 n=$2 round=$3 tr=${4:-} dir=$T/op-$1-$2-$3 depth rc note=
    op_start "$dir" "$(upstream_addr "$up")" "$n"
    fill "$OP_PORT" || die "smtp-source into outpost failed"
    depth=$(bash -c "$(op_depth_cmd)")
    [ "$depth" -eq "$COUNT" ] || die "outpost queued $depth of $COUNT"
    sync; sleep 1
    OP_FLUSH_DIR=$dir
    # in the background, so that the watcher samples connections meanwhile;
    # flush.pid is the PID of `outpost flush` itself, flush.rc its exit status
    local fcmd="( '$OUTPOST' flush --all --config '$OP_CFG' >'$dir/flush.out' 2>&1 & echo \$! >'$dir/flush.pid'; wait \$!; echo \$? >'$dir/flush.rc' ) </dev/null >/dev/null 2>&1 &"
    if [ -n "$tr" ]; then
        TRACE_DUMP=${TRACE_DUMP:+$TRACE_DUMP.$up} "$PY" "$T/trace.py" "${HOST_DEV:-bnch0}" "$(upstream_port "$up")" "$COUNT" "$RTT_S" >"$T/trace.out" 2>&1 &
        TRACE_PID=$!
        sleep 0.5
    fi
    timed "$up" "$OP_PID" "" "$fcmd" "$(op_depth_cmd)"
    for _ in $(seq 600); do [ -f "$dir/flush.rc" ] && break; sleep 0.1; done
    flush_bg_stop
    rc=$(cat "$dir/flush.rc" 2>/dev/null || echo none)
    grep -q "^done: $COUNT delivered, 0 deferred, 0 bounced" "$dir/flush.out" \
        || { tail -3 "$dir/flush.out" >&2; die "outpost flush did not deliver $COUNT (rc $rc)"; }
    [ "$rc" = 0 ] || die "outpost flush exited $rc"
    [ "$up" = postfix ] && note=$(disc_summary)
    if [ -n "$tr" ]; then
        stop_pid "$TRACE_PID"; TRACE_PID=
        cat "$T/trace.out" >&2
        {
            echo "== outpost -> $up, connections=$n (traced, not in the medians)"
            echo "$OUT" | grep -E '^(elapsed_s|avg_conns|max_conns)='
            cat "$T/trace.out"
            [ -n "$note" ] && echo "upstream_log=$note"
        } >>"$T/trace.txt"
        log "traced run: $(kv elapsed_s "$OUT") s, see the trace summary at the end"
    else
        record "$up" outpost "$n" "$round" "$OUT" "$GOT" "$note"
    fi
    op_stop
    rm -rf "$dir"
}

run_postfix() {  # upstream round
    local up=$1 round=$2 n sent bounced note=
    postsuper -c "$PF/conf" -d ALL >/dev/null 2>&1 || true
    postconf -c "$PF/conf" -e "relayhost = $(upstream_addr "$up")" 'defer_transports = smtp'
    pf_reload
    fill "$PF_PORT" || die "smtp-source into postfix failed"
    for _ in $(seq 600); do
        [ "$(find "$PF/spool/deferred" -type f | wc -l)" -ge "$COUNT" ] && break
        sleep 0.5
    done
    n=$(pf_queue_files "$PF")
    [ "$n" -eq "$COUNT" ] && [ "$(find "$PF/spool/deferred" -type f | wc -l)" -eq "$COUNT" ] \
        || die "postfix queue fill: $n queued, want $COUNT deferred"
    : >"$PF/maillog"
    sync; sleep 1
    timed "$up" "$(master_of "$PF")" \
        "postconf -c '$PF/conf' -e 'defer_transports =' && postfix -c '$PF/conf' reload && sleep 1" \
        "postqueue -c '$PF/conf' -f" \
        "find '$PF/spool/maildrop' '$PF/spool/incoming' '$PF/spool/active' '$PF/spool/deferred' '$PF/spool/hold' -type f 2>/dev/null | wc -l"
    sleep 0.5
    sent=$(grep -c 'postfix/smtp\[.*status=sent' "$PF/maillog" || true)
    bounced=$(grep -cE 'status=(bounced|deferred)' "$PF/maillog" || true)
    [ "$sent" -eq "$COUNT" ] && [ "$bounced" -eq 0 ] || die "postfix sent $sent of $COUNT ($bounced bounced/deferred)"
    [ "$up" = postfix ] && note=$(disc_summary)
    record "$up" postfix 20 "$round" "$OUT" "$GOT" "$note"
    postconf -c "$PF/conf" -e 'defer_transports = smtp'
    pf_reload
}

# ------------------------------------------------------------------ runs
pf_setup
case " $UPSTREAMS " in *" postfix "*) pfup_setup ;; esac
for round in $(seq "$RUNS"); do
    for up in $UPSTREAMS; do
        if [ "$up" = sink ]; then conns=$SINK_CONNS; else conns=$PFUP_CONNS; fi
        if [ $((round % 2)) -eq 1 ]; then
            for n in $conns; do run_outpost "$up" "$n" "$round"; done
            run_postfix "$up" "$round"
        else
            run_postfix "$up" "$round"
            for n in $conns; do run_outpost "$up" "$n" "$round"; done
        fi
    done
done
if [ "$TRACE" = 1 ]; then
    for up in $UPSTREAMS; do run_outpost "$up" 1 trace yes; done
fi
pf_stop_dir "$PF"

# ------------------------------------------------------------------ summary
"$PY" - "$T/results.tsv" "$COUNT" "$SIZE" "$RUNS" "$PF_VERSION" "$RTT_MS" "$LINK_MODE" <<'EOF'
import csv, statistics, sys
path, count, size, runs, pfv, rtt, mode = sys.argv[1:]
rows = list(csv.DictReader(open(path), delimiter="\t"))
med = lambda xs: statistics.median(float(x) for x in xs)
names = {"sink": "smtp-sink (PIPELINING)", "postfix": "Postfix %s (PIPELINING + CHUNKING)" % pfv}
print()
print("Flush of %s x %g KiB over a %s ms round trip (%s), medians of %s runs:" % (count, int(size) / 1024, rtt, mode, runs))
print()
print("| upstream | flusher | connections (avg / max) | msgs/s | elapsed s | round trips per msg per connection | vs Postfix | upstream got | runs, msgs/s |")
print("|---|---|---|---|---|---|---|---|---|")
for up in ("sink", "postfix"):
    sel = [r for r in rows if r["upstream"] == up]
    if not sel: continue
    pf = [r for r in sel if r["mta"] == "postfix"]
    pfrate = med(r["msgs_per_s"] for r in pf) if pf else None
    keys = []
    for r in sel:
        k = (r["mta"], r["conns_cfg"])
        if k not in keys: keys.append(k)
    keys.sort(key=lambda k: (k[0] != "outpost", int(k[1])))
    for mta, c in keys:
        g = [r for r in sel if r["mta"] == mta and r["conns_cfg"] == c]
        rate = med(r["msgs_per_s"] for r in g)
        label = "outpost, upstream.connections = %s" % c if mta == "outpost" else "Postfix %s (default concurrency)" % pfv
        ratio = "%.2fx" % (rate / pfrate) if pfrate and mta == "outpost" else "-"
        print("| %s | %s | %.1f / %d | %.1f | %.1f | %.2f | %s | %s | %s |" % (
            names[up], label, med(r["avg_conns"] for r in g), max(int(r["max_conns"]) for r in g),
            rate, med(r["elapsed_s"] for r in g), med(r["rt_per_msg_conn"] for r in g), ratio,
            "/".join(r["upstream_got"] for r in g),
            ", ".join("%.1f" % float(r["msgs_per_s"]) for r in g)))
def pick(up, mta, c, key):
    g = [r[key] for r in rows if r["upstream"] == up and r["mta"] == mta and r["conns_cfg"] == c]
    return med(g) if g else None
print()
print("Targets (DESIGN.md):")
rt = pick("sink", "outpost", "1", "rt_per_msg_conn")
if rt is not None:
    print("- at most 1 round trip per message per connection (smtp-sink, 1 connection): %.2f, %s by %.0f %%" % (
        rt, "met" if rt <= 1 else "missed", abs(rt - 1) * 100))
rate = pick("postfix", "outpost", "1", "msgs_per_s")
if rate is not None:
    pfr = pick("postfix", "postfix", "20", "msgs_per_s")
    print("- at least 63 msgs/s on 1 connection to a CHUNKING Postfix: %.1f, %s by %.1f %%%s" % (
        rate, "met" if rate >= 63 else "missed", abs(rate / 63 - 1) * 100,
        "; Postfix on its 20 connections in this run: %.1f (outpost %.2fx)" % (pfr, rate / pfr) if pfr else ""))
notes = [(r["upstream"], r["mta"], r["conns_cfg"], r["round"], r["note"]) for r in rows if r["note"]]
if notes:
    print()
    print("Connections and commands the Postfix upstream logged (its `disconnect` lines, summed over the run):")
    print()
    for n in notes:
        print("- %s <- %s (connections %s), round %s: %s" % (n[0], n[1], n[2], n[3], n[4]))
EOF
if [ -f "$T/trace.txt" ]; then
    echo
    echo "Packet trace on the host end of the link (round trips = TCP connects + client turns):"
    echo
    sed 's/^/    /' "$T/trace.txt"
fi
