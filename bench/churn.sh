#!/usr/bin/env bash
# bench/churn.sh - does the store stay the same size while mail passes
# through? COUNT messages go through one outpost at a constant queue depth,
# and the database file is measured all along.
#
# Usage (from anywhere; as root when python3-aiosmtpd must be installed):
#   cargo build --release && bash bench/churn.sh
#
# What it does:
#   - installs Debian's python3-aiosmtpd when /usr/bin/python3 cannot import
#     aiosmtpd (the upstream);
#   - starts `outpost serve` (target/release/outpost, or $OUTPOST) with a
#     fresh store in a temp dir: one relay listener on a free 127.0.0.1
#     port, [upstream] server = "[127.0.0.1]:UP_PORT", tls = "none",
#     [flush] on_submit = true and interval = "1s" (it forwards as mail
#     comes), store.keep_history = KEEP (so that the purge of finished mail
#     runs during the run: housekeeping runs every KEEP/4, 1 s to 5 min);
#   - one Python process (driver.py below) runs the upstream, an aiosmtpd
#     sink on UP_PORT that counts the messages it got, in a child process,
#     and SESSIONS SMTP client sessions that submit COUNT messages of SIZE
#     body bytes to outpost, several per connection, keeping the number
#     submitted but not yet at the upstream at DEPTH: a constant queue depth;
#   - every SAMPLE seconds it records the database file, its WAL, the rows
#     (messages, recipients, history) and SQLite's page_count and
#     freelist_count (read-only connection, closed after each sample), and
#     outpost's own view (`outpost status --json`: store.size_bytes,
#     store.wal_bytes, store.free_bytes);
#   - when the upstream has all COUNT, it waits TAIL seconds (longer than
#     KEEP plus one housekeeping interval: the last finished mail is purged)
#     and samples once more; then stops outpost by PID (SIGTERM, checks exit
#     0) and prints the samples and a summary.
# Every process started here is stopped by PID on exit; the temp dir is
# removed (KEEP_DIR=dir keeps samples.tsv and outpost's log).
#
# Environment (defaults in brackets):
#   COUNT [100000]  DEPTH [1000]  SESSIONS [4]  SIZE [2048] (body bytes)
#   KEEP ["20s"] (store.keep_history)  SAMPLE [5] (s)  TAIL [30] (s)
#   CONNECTIONS [1] (upstream.connections)  TIMEOUT [3600] (s, whole run)
#   OUTPOST [REPO/target/release/outpost]  KEEP_DIR [unset]
set -eu

COUNT=${COUNT:-100000}
DEPTH=${DEPTH:-1000}
SESSIONS=${SESSIONS:-4}
SIZE=${SIZE:-2048}
KEEP=${KEEP:-20s}
SAMPLE=${SAMPLE:-5}
TAIL=${TAIL:-30}
CONNECTIONS=${CONNECTIONS:-1}
TIMEOUT=${TIMEOUT:-3600}
PY=/usr/bin/python3; [ -x "$PY" ] || PY=python3

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTPOST=${OUTPOST:-$REPO/target/release/outpost}

. "$REPO/bench/lib.sh"

[ -x "$OUTPOST" ] || die "$OUTPOST missing: run 'cargo build --release' first"
command -v ss >/dev/null || die "ss (iproute2) missing"
if ! "$PY" -c 'import aiosmtpd' 2>/dev/null; then
    [ "$(id -u)" = 0 ] || die "python3-aiosmtpd missing: run as root to install it, or install it"
    log "installing python3-aiosmtpd"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-aiosmtpd >/dev/null; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-aiosmtpd >/dev/null
    fi
    "$PY" -c 'import aiosmtpd' || die "aiosmtpd still missing"
fi

T=$(mktemp -d /tmp/outpost-churn.XXXXXX)
OP_PID=
DRV_PID=
cleanup() {
    local rc=$?
    set +e
    stop_pid "$DRV_PID"; stop_pid "$OP_PID"
    if [ -n "${KEEP_DIR:-}" ]; then
        mkdir -p "$KEEP_DIR" && cp "$T"/samples.tsv "$T"/op/outpost.log "$KEEP_DIR"/ 2>/dev/null
    fi
    rm -rf "$T"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM


# ------------------------------------------------------------------ outpost
UP_PORT=$(free_port)
op_config "$T/op" "$(printf '[upstream]\nserver = "[127.0.0.1]:%s"\ntls = "none"\nconnections = %s\n\n[flush]\non_submit = true\ninterval = "1s"\n' "$UP_PORT" "$CONNECTIONS")"
# op_config writes the [store] table; keep_history goes into it.
sed -i "/^path = \"${T//\//\\/}\/op\/queue.sqlite\"$/a keep_history = \"$KEEP\"" "$OP_CFG"
grep -q "^keep_history = \"$KEEP\"" "$OP_CFG" || die "could not set store.keep_history in $OP_CFG"
"$OUTPOST" check-config --config "$OP_CFG" >/dev/null || die "bad configuration $OP_CFG"
# log.level stays "warn" (a line per message would cost CPU); housekeeping's
# own lines are wanted: OUTPOST_LOG (EnvFilter syntax) adds them.
OUTPOST_LOG="warn,outpost::queue::housekeeping=info" \
    "$OUTPOST" serve --config "$OP_CFG" >>"$T/op/outpost.log" 2>&1 &
OP_PID=$!
wait_port "$OP_PORT" || { tail -5 "$T/op/outpost.log" >&2; die "outpost did not listen on 127.0.0.1:$OP_PORT"; }
log "outpost $("$OUTPOST" --version 2>/dev/null || echo '?') pid $OP_PID on 127.0.0.1:$OP_PORT, upstream sink on 127.0.0.1:$UP_PORT, keep_history $KEEP"
log "nproc=$(nproc); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); load $(cut -d' ' -f1-3 /proc/loadavg)"

# ------------------------------------------------------------------ driver
cat >"$T/driver.py" <<'EOF'
"""driver.py: upstream sink + submitting clients at a constant queue depth + sampler."""
import asyncio, json, multiprocessing, os, sqlite3, subprocess, sys, time

(op_port, up_port, count, depth, sessions, size, sample, tail, timeout,
 db, outpost, cfg, out) = sys.argv[1:]
op_port, up_port, count, depth, sessions, size = map(int, (op_port, up_port, count, depth, sessions, size))
sample, tail, timeout = float(sample), float(tail), float(timeout)

got = multiprocessing.Value("q", 0)

def sink(port, got):
    from aiosmtpd.controller import Controller
    class Handler:
        async def handle_DATA(self, server, session, envelope):
            with got.get_lock():
                got.value += 1
            return "250 2.0.0 Ok"
    c = Controller(Handler(), hostname="127.0.0.1", port=port)
    c.start()
    while True:
        time.sleep(3600)

submitted = 0
t0 = time.monotonic()
body = (b"From: churn@source.example\r\nTo: sink@dest.example\r\nSubject: churn\r\n\r\n"
        + b"".join(b"%07d churn churn churn churn churn churn churn churn churn churn\r\n" % i
                   for i in range(size // 71 + 1))[:size] + b"\r\n")

async def reply(r):
    while True:
        line = await r.readline()
        if not line:
            raise SystemExit("outpost closed the connection")
        if line[3:4] != b"-":
            return line

async def session(n):
    global submitted
    r, w = await asyncio.open_connection("127.0.0.1", op_port)
    assert (await reply(r)).startswith(b"220")
    w.write(b"EHLO churn%d.source.example\r\n" % n)
    assert (await reply(r)).startswith(b"250")
    while submitted < count:
        if submitted - got.value >= depth:
            await asyncio.sleep(0.005)
            continue
        submitted += 1
        w.write(b"MAIL FROM:<churn@source.example>\r\n")
        assert (await reply(r)).startswith(b"250")
        w.write(b"RCPT TO:<sink@dest.example>\r\n")
        assert (await reply(r)).startswith(b"250")
        w.write(b"DATA\r\n")
        assert (await reply(r)).startswith(b"354")
        w.write(body + b".\r\n")
        line = await reply(r)
        if not line.startswith(b"250"):
            raise SystemExit("outpost refused a message: %r" % line)
    w.write(b"QUIT\r\n")
    await reply(r)
    w.close()

def measure(label):
    size = lambda p: os.stat(p).st_size if os.path.exists(p) else 0
    c = sqlite3.connect("file:%s?mode=ro" % db, uri=True, timeout=10)
    q = lambda s: c.execute(s).fetchone()[0]
    rows = dict(
        messages=q("SELECT count(*) FROM messages"),
        recipients=q("SELECT count(*) FROM recipients"),
        pending=q("SELECT count(*) FROM recipients WHERE state IN ('queued', 'deferred', 'held')"),
        history=q("SELECT count(*) FROM history"),
        page_count=q("PRAGMA page_count"),
        freelist=q("PRAGMA freelist_count"),
        page_size=q("PRAGMA page_size"),
    )
    c.close()
    st = json.loads(subprocess.run([outpost, "status", "--json", "--config", cfg],
                                   capture_output=True, check=True).stdout)["store"]
    return dict(t=round(time.monotonic() - t0, 1), label=label, submitted=submitted, delivered=got.value,
                db_bytes=size(db), wal_bytes=size(db + "-wal"), status_size=st["size_bytes"],
                status_wal=st["wal_bytes"], status_free=st["free_bytes"], **rows)

async def sampler(rows, stop):
    while not stop.is_set():
        rows.append(measure("run"))
        r = rows[-1]
        print("[%s] t=%6.1fs delivered %6d/%d  pending %5d  messages %6d  history %6d  db %6.1f MiB  wal %5.1f MiB  free %5.1f MiB"
              % (time.strftime("%H:%M:%S"), r["t"], r["delivered"], count, r["pending"], r["messages"],
                 r["history"], r["db_bytes"] / 2**20, r["wal_bytes"] / 2**20, r["status_free"] / 2**20),
              file=sys.stderr, flush=True)
        try:
            await asyncio.wait_for(stop.wait(), sample)
        except asyncio.TimeoutError:
            pass

async def main():
    rows = []
    stop = asyncio.Event()
    s = asyncio.create_task(sampler(rows, stop))
    await asyncio.wait_for(asyncio.gather(*(session(i) for i in range(sessions))), timeout)
    submit_s = time.monotonic() - t0
    while got.value < count:
        if time.monotonic() - t0 > timeout:
            raise SystemExit("the upstream got only %d of %d" % (got.value, count))
        await asyncio.sleep(0.05)
    pass_s = time.monotonic() - t0
    await asyncio.sleep(tail)
    stop.set()
    await s
    rows.append(measure("after tail"))
    with open(out, "w") as f:
        keys = list(rows[0].keys())
        f.write("\t".join(keys) + "\n")
        for r in rows:
            f.write("\t".join(str(r[k]) for k in keys) + "\n")
    print("submitted %d in %.1f s; upstream had all %d after %.1f s (%.0f msgs/s through)"
          % (count, submit_s, count, pass_s, count / pass_s), file=sys.stderr, flush=True)

if __name__ == "__main__":
    p = multiprocessing.Process(target=sink, args=(up_port, got), daemon=True)
    p.start()
    for _ in range(100):
        try:
            import socket
            socket.create_connection(("127.0.0.1", up_port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise SystemExit("the sink did not listen")
    try:
        asyncio.run(main())
    finally:
        p.terminate()
        p.join(5)
EOF

"$PY" "$T/driver.py" "$OP_PORT" "$UP_PORT" "$COUNT" "$DEPTH" "$SESSIONS" "$SIZE" "$SAMPLE" "$TAIL" "$TIMEOUT" \
    "$T/op/queue.sqlite" "$OUTPOST" "$OP_CFG" "$T/samples.tsv" &
DRV_PID=$!
wait "$DRV_PID" || { DRV_PID=; tail -5 "$T/op/outpost.log" >&2; die "the run failed"; }
DRV_PID=

RSS=$(awk '$1=="VmHWM:"{print $2}' "/proc/$OP_PID/status")
kill -TERM "$OP_PID"
rc=0; wait "$OP_PID" || rc=$?
OP_PID=
[ "$rc" -eq 0 ] || die "outpost exited with $rc at SIGTERM"
HK=$(grep -c 'store housekeeping' "$T/op/outpost.log" || true)
ERRS=$(grep -ciE ' (ERROR|WARN) ' "$T/op/outpost.log" || true)
[ "$ERRS" -eq 0 ] || { log "outpost logged warnings or errors:"; grep -iE ' (ERROR|WARN) ' "$T/op/outpost.log" | tail -5 >&2; }

# ------------------------------------------------------------------ summary
"$PY" - "$T/samples.tsv" "$COUNT" "$DEPTH" "$SESSIONS" "$SIZE" "$KEEP" "$RSS" "$HK" "$ERRS" <<'EOF'
import csv, sys
path, count, depth, sessions, size, keep, rss, hk, errs = sys.argv[1:]
rows = list(csv.DictReader(open(path), delimiter="\t"))
mib = lambda r, k: int(r[k]) / 2**20
print()
print("Churn: %s messages of %s body bytes through outpost, queue depth %s (%s sessions), store.keep_history = %s" % (count, size, depth, sessions, keep))
print()
print("| t (s) | delivered | pending | messages | recipients | history | database MiB | WAL MiB | free inside MiB |")
print("|---|---|---|---|---|---|---|---|---|")
step = max(1, len(rows) // 20)
for i, r in enumerate(rows):
    if i % step == 0 or i >= len(rows) - 2:
        print("| %s%s | %s | %s | %s | %s | %s | %.1f | %.1f | %.1f |" % (
            r["t"], " (after)" if r["label"] != "run" else "", r["delivered"], r["pending"], r["messages"],
            r["recipients"], r["history"], mib(r, "db_bytes"), mib(r, "wal_bytes"), mib(r, "status_free")))
run = [r for r in rows if r["label"] == "run" and int(r["delivered"]) > 0]
quarter = [r for r in run if int(r["delivered"]) >= int(count) // 4] or run
first = quarter[0]
# While mail was passing: from a quarter of the traffic to the last sample
# before the upstream had it all.
flowing = [r for r in run if float(r["t"]) >= float(first["t"]) and int(r["delivered"]) < int(count)] or [first]
mx = max(flowing, key=lambda r: int(r["db_bytes"]))
mn = min(flowing, key=lambda r: int(r["db_bytes"]))
end = flowing[-1]
last = rows[-1]
print()
print("| database file | MiB | rows in messages |")
print("|---|---|---|")
print("| when a quarter had passed (t = %s s, %s delivered) | %.1f | %s |" % (first["t"], first["delivered"], mib(first, "db_bytes"), first["messages"]))
print("| smallest / largest from then until the last message (t = %s / %s s) | %.1f / %.1f | %s / %s |" % (
    mn["t"], mx["t"], mib(mn, "db_bytes"), mib(mx, "db_bytes"), mn["messages"], mx["messages"]))
print("| at the last sample before the last message arrived (t = %s s, %s delivered) | %.1f | %s |" % (end["t"], end["delivered"], mib(end, "db_bytes"), end["messages"]))
print("| growth from a quarter to then | %+.1f%% | |" % (100.0 * (int(end["db_bytes"]) - int(first["db_bytes"])) / int(first["db_bytes"])))
print("| after the tail (%s s after the last message) | %.1f | %s |" % (round(float(last["t"]) - float(end["t"])), mib(last, "db_bytes"), last["messages"]))
print("| largest WAL | %.1f | |" % max(mib(r, "wal_bytes") for r in rows))
print()
print("outpost peak RSS %.1f MiB; %s housekeeping runs that purged or vacuumed; %s warning/error log lines" % (int(rss) / 1024, hk, errs))
EOF
