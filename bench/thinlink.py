#!/usr/bin/env python3
"""bench/thinlink.py - the sink, the client and the arithmetic of bench/thinlink.sh.

Subcommands (Python 3; `sink` needs aiosmtpd, Debian's python3-aiosmtpd):

  sink --port P --log FILE
      An SMTP server on 127.0.0.1:P that accepts everything and records each
      message as one JSON line: t (arrival, Unix time), the X-Bench-Id
      header, size, and the SHA-256 of the body with line ends normalised
      (so that headers added on the way, Received: lines, do not count).

  drive --port P --at T --big BYTES --small N --small-size BYTES
        --budget S --submitted FILE --sink-log FILE
      Waits until Unix time T, then submits one large MIME message (a text
      part and a base64 attachment of random bytes, BYTES octets in all)
      and then N small text messages to 127.0.0.1:P over SMTP (Python's
      smtplib, one connection per message), recording each with the time
      its 250 came; then waits until the sink has every message or S
      seconds have passed since the first submission.

  analyse DIR --rate BIT/S --cycle S --down S
      Reads DIR/submitted.jsonl, DIR/sink.jsonl, DIR/relay.jsonl and prints
      one JSON object with the figures of that run.

  table RESULT.json... (one per run)
      Prints the markdown tables (medians over runs) for both sides.
"""
import argparse
import base64
import hashlib
import json
import os
import random
import re
import statistics
import sys
import time


def body_hash(msg: bytes) -> str:
    m = msg.replace(b"\r\n", b"\n")
    i = m.find(b"\n\n")
    body = m[i + 2:] if i >= 0 else b""
    return hashlib.sha256(body.rstrip(b"\n")).hexdigest()


def bench_id(msg: bytes) -> str:
    head = msg.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    m = re.search(rb"^X-Bench-Id:\s*(\S+)", head, re.M | re.I)
    return m.group(1).decode() if m else "?"


def read_jsonl(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    out.append(json.loads(line))
    except FileNotFoundError:
        pass
    return out


# ------------------------------------------------------------------ sink
def cmd_sink(a):
    import asyncio
    from aiosmtpd.smtp import SMTP

    logf = open(a.log, "a", buffering=1)

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            raw = envelope.original_content or envelope.content
            if isinstance(raw, str):
                raw = raw.encode("utf-8", "surrogateescape")
            logf.write(json.dumps({"t": time.time(), "id": bench_id(raw), "size": len(raw),
                                   "sha256": body_hash(raw), "from": envelope.mail_from,
                                   "rcpt": envelope.rcpt_tos}) + "\n")
            return "250 2.0.0 Ok"

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(Handler(), hostname="sink.bench.example", data_size_limit=64 << 20),
            "127.0.0.1", a.port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ------------------------------------------------------------------ drive
def make_big(size, rng):
    head = ("From: Branch Office <scanner@branch.example>\r\n"
            "To: Head Office <archive@hq.example>\r\n"
            "Subject: scan 0001 (thinlink bench)\r\n"
            "Message-ID: <big.%d@branch.example>\r\n"
            "X-Bench-Id: big\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"b0undary\"\r\n\r\n"
            "--b0undary\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            "The scan is attached.\r\n\r\n"
            "--b0undary\r\n"
            "Content-Type: application/octet-stream; name=\"scan0001.pdf\"\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            "Content-Disposition: attachment; filename=\"scan0001.pdf\"\r\n\r\n") % os.getpid()
    tail = "\r\n--b0undary--\r\n"
    room = size - len(head) - len(tail)
    # base64 lines of 76 characters + CRLF carry 57 octets each
    raw = rng.randbytes(max(57, room // 78 * 57))
    b64 = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return head.encode() + b64.rstrip(b"\r\n") + tail.encode()


WORDS = ("the order for next week is attached below please confirm the delivery "
         "date and the price list for the branch office printer toner paper").split()


def make_small(i, size, rng):
    head = ("From: Clerk <clerk%d@branch.example>\r\n"
            "To: Orders <orders@hq.example>\r\n"
            "Subject: order %d (thinlink bench)\r\n"
            "Message-ID: <small%02d.%d@branch.example>\r\n"
            "X-Bench-Id: small-%02d\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n") % (i, i, i, os.getpid(), i)
    lines, n = [], len(head)
    while n < size - 2:
        line = " ".join(rng.choice(WORDS) for _ in range(11))
        lines.append(line)
        n += len(line) + 2
    return head.encode() + "\r\n".join(lines).encode() + b"\r\n"


def cmd_drive(a):
    import smtplib

    rng = random.Random(a.seed)
    msgs = [("big", make_big(a.big, rng))]
    for i in range(1, a.small + 1):
        msgs.append(("small-%02d" % i, make_small(i, a.small_size, rng)))
    wait = a.at - time.time()
    if wait > 0:
        time.sleep(wait)
    out = open(a.submitted, "a", buffering=1)
    first = None
    for mid, data in msgs:
        t_start = time.time()
        with smtplib.SMTP("127.0.0.1", a.port, local_hostname="client.branch.example", timeout=60) as s:
            m = re.search(rb"^To: .*<([^>]+)>", data, re.M)
            s.sendmail("sender@branch.example", [m.group(1).decode()], data)
        t = time.time()
        first = first or t_start
        out.write(json.dumps({"id": mid, "t": t, "t_start": t_start, "size": len(data),
                              "sha256": body_hash(data)}) + "\n")
    ids = {m for m, _ in msgs}
    deadline = first + a.budget
    while time.time() < deadline:
        got = {r["id"] for r in read_jsonl(a.sink_log)}
        if ids <= got:
            print("all %d arrived after %.1f s" % (len(ids), time.time() - first), flush=True)
            return
        time.sleep(0.5)
    got = {r["id"] for r in read_jsonl(a.sink_log)}
    print("budget of %d s over; missing: %s" % (a.budget, " ".join(sorted(ids - got)) or "none"), flush=True)


# ------------------------------------------------------------------ analyse
def cmd_analyse(a):
    d = a.dir
    sub = read_jsonl(os.path.join(d, "submitted.jsonl"))
    sink = read_jsonl(os.path.join(d, "sink.jsonl"))
    relay = read_jsonl(os.path.join(d, "relay.jsonl"))
    rate = a.rate / 8.0
    start = next(e for e in relay if e["ev"] == "start")
    t_first = min(s["t_start"] for s in sub)
    t_last_sub = max(s["t"] for s in sub)
    end_t = max([e["t"] for e in relay if e["ev"] == "stop"] or [time.time()])
    t_stop = t_first + a.budget if a.budget else end_t
    subd = {s["id"]: s for s in sub}
    first_arr = {}
    dups = 0
    whole = bad = 0
    for r in sink:
        s = subd.get(r["id"])
        if s is None:
            continue
        if r["id"] in first_arr:
            dups += 1
            continue
        first_arr[r["id"]] = r["t"]
        if r["sha256"] == s["sha256"]:
            whole += 1
        else:
            bad += 1
    small = [s for s in sub if s["id"].startswith("small")]
    bigs = [s for s in sub if s["id"] == "big"]
    lat = sorted(first_arr[s["id"]] - s["t"] for s in small if s["id"] in first_arr)
    res = {"dir": d, "t0": start["t"], "submitted": len(sub), "arrived": len(first_arr),
           "whole": whole, "corrupt": bad, "duplicates": dups,
           "small_total": len(small), "small_arrived": len(lat),
           "small_missing": sorted(s["id"] for s in small if s["id"] not in first_arr),
           "submit_s": round(t_last_sub - t_first, 2),
           "submit_phase_s": round((t_first - start["t"]) % a.cycle, 2)}
    if lat:
        res["small_latency_median_s"] = round(statistics.median(lat), 1)
        res["small_latency_min_s"] = round(lat[0], 1)
        res["small_latency_max_s"] = round(lat[-1], 1)
    if len(lat) == len(small) and small:
        res["small_all_in_s"] = round(max(first_arr[s["id"]] for s in small) - t_first, 1)
    if bigs:
        b = bigs[0]
        res["big_size"] = b["size"]
        if "big" in first_arr:
            res["big_arrived_s"] = round(first_arr["big"] - b["t"], 1)
    msg_bytes = sum(s["size"] for s in sub)
    small_bytes = sum(s["size"] for s in small)
    res["message_bytes"] = msg_bytes
    res["small_bytes"] = small_bytes
    ends = {e["id"]: e for e in relay if e["ev"] == "end"}
    conns = [e for e in relay if e["ev"] == "conn"]
    up = sum(e.get("up", 0) for e in ends.values())
    down = sum(e.get("down", 0) for e in ends.values())
    stop = [e for e in relay if e["ev"] == "stop"]
    if stop:
        up, down = stop[-1]["carried_up"], stop[-1]["carried_down"]
    res["carried_up"] = up
    res["carried_down"] = down
    res["carried_ratio"] = round(up / msg_bytes, 2)
    delivered_bytes = sum(subd[i]["size"] for i in first_arr)
    res["delivered_bytes"] = delivered_bytes
    res["carried_per_delivered"] = round(up / delivered_bytes, 2) if delivered_bytes else None
    res["carried_in_cut_conns"] = sum(e.get("up", 0) for e in ends.values() if e.get("how") == "cut")
    sessions = [c for c in conns if ends.get(c["id"], {}).get("up", 0) > 0]
    probes = [c for c in conns if c["id"] in ends and ends[c["id"]].get("up", 0) == 0]
    res["connections"] = len(conns)
    res["sessions"] = len(sessions)
    res["probes_or_empty"] = len(probes)
    res["cut_sessions"] = sum(1 for c in sessions if ends[c["id"]].get("how") == "cut")
    # sessions that carried more than 64 KiB towards the hub: attempts at
    # the large message (the small ones together are about 31 KB)
    res["big_sessions"] = sum(1 for c in sessions if ends[c["id"]].get("up", 0) > 65536)
    # link-ups while mail waited: something submitted before, not yet at the sink
    ups = [e["t"] for e in relay if e["ev"] == "up" and e["t"] > t_first and e["t"] < t_stop]
    downs = sorted(e["t"] for e in relay if e["ev"] == "down")
    gaps = []
    for u in ups:
        waiting = [s for s in sub if s["t"] < u and first_arr.get(s["id"], 1e20) > u]
        if not waiting:
            continue
        nxt_down = min([x for x in downs if x > u] or [1e20])
        horizon = min(nxt_down, t_stop)
        anyc = [c["t"] - u for c in conns if u <= c["t"] < horizon]
        sess = [c["t"] - u for c in sessions if u <= c["t"] < horizon]
        gaps.append({"up_at_s": round(u - t_first, 1), "waiting": len(waiting),
                     "first_connect_s": round(min(anyc), 2) if anyc else None,
                     "first_session_s": round(min(sess), 2) if sess else None})
    res["linkups"] = gaps
    ok = [g["first_session_s"] for g in gaps if g["first_session_s"] is not None]
    res["linkups_waiting"] = len(gaps)
    res["linkups_with_session"] = len(ok)
    res["linkups_within_5s"] = sum(1 for x in ok if x <= 5)
    if ok:
        res["linkup_session_median_s"] = round(statistics.median(ok), 2)
        res["linkup_session_max_s"] = round(max(ok), 2)
    # the bandwidth bound: the octets at RATE (one way), and the same with
    # the link up only (CYCLE - DOWN) of every CYCLE seconds
    frac = (a.cycle - a.down) / a.cycle if a.down > 0 else 1.0
    res["bound_all_s"] = round(msg_bytes / rate, 1)
    res["bound_all_with_cuts_s"] = round(msg_bytes / rate / frac, 1)
    res["bound_small_s"] = round(small_bytes / rate, 1)
    if len(first_arr) == len(sub):
        res["drain_s"] = round(max(first_arr.values()) - t_first, 1)
    print(json.dumps(res))


# ------------------------------------------------------------------ table
def cmd_table(a):
    rows = [json.load(open(p)) for p in a.results]
    med = lambda xs: statistics.median(xs) if xs else None
    sides = []
    for r in rows:
        if r["side"] not in sides:
            sides.append(r["side"])

    def fmt(x, unit="", nd=1):
        if x is None:
            return "–"
        return ("%." + str(nd) + "f%s") % (x, unit)

    def runs(sel, key, nd=1):
        return ", ".join("–" if r.get(key) is None else ("%." + str(nd) + "f") % r[key] for r in sel)

    print("| | " + " | ".join(sides) + " |")
    print("|---|" + "---|" * len(sides))
    by = {s: [r for r in rows if r["side"] == s] for s in sides}
    n = {s: len(by[s]) for s in sides}

    def line(label, f):
        print("| %s | %s |" % (label, " | ".join(f(by[s]) for s in sides)))

    line("runs", lambda g: str(len(g)))
    line("small messages arrived (of %d), per run" % rows[0]["small_total"],
         lambda g: ", ".join(str(r["small_arrived"]) for r in g))
    line("small: submission → at the hub's sink, median / max s (median over runs)",
         lambda g: "%s / %s" % (fmt(med([r["small_latency_median_s"] for r in g if "small_latency_median_s" in r])),
                                fmt(med([r["small_latency_max_s"] for r in g if "small_latency_max_s" in r]))))
    line("small: max s, per run", lambda g: runs(g, "small_latency_max_s"))
    line("all 20 small at the sink, s after the first submission, per run", lambda g: runs(g, "small_all_in_s"))
    line("the large message arrived (s after its submission), per run",
         lambda g: ", ".join(("yes (%.0f s)" % r["big_arrived_s"]) if "big_arrived_s" in r else "no" for r in g))
    line("arrived whole (SHA-256 of the body) / corrupt / duplicates, summed",
         lambda g: "%d / %d / %d" % (sum(r["whole"] for r in g), sum(r["corrupt"] for r in g), sum(r["duplicates"] for r in g)))
    line("message bytes submitted", lambda g: "%d" % g[0]["message_bytes"])
    line("bytes carried branch → hub, median (per run)",
         lambda g: "%d (%s)" % (med([r["carried_up"] for r in g]), ", ".join(str(r["carried_up"]) for r in g)))
    line("carried / message bytes, median (per run)",
         lambda g: "%.2fx (%s)" % (med([r["carried_ratio"] for r in g]), ", ".join("%.2f" % r["carried_ratio"] for r in g)))
    line("bytes carried hub → branch, median", lambda g: "%d" % med([r["carried_down"] for r in g]))
    line("bytes carried in connections the link cut, median", lambda g: "%d" % med([r["carried_in_cut_conns"] for r in g]))
    line("SMTP sessions through the link (cut by the link), median",
         lambda g: "%s (%s)" % (fmt(med([r["sessions"] for r in g]), "", 0), fmt(med([r["cut_sessions"] for r in g]), "", 0)))
    line("… of which carried over 64 KiB (attempts at the large message), median",
         lambda g: fmt(med([r["big_sessions"] for r in g]), "", 0))
    line("connections without a byte from the branch (probes), median",
         lambda g: fmt(med([r["probes_or_empty"] for r in g]), "", 0))
    line("link-ups while mail waited, summed", lambda g: str(sum(r["linkups_waiting"] for r in g)))
    line("… followed by a session before the next cut / within 5 s",
         lambda g: "%d / %d" % (sum(r["linkups_with_session"] for r in g), sum(r["linkups_within_5s"] for r in g)))
    line("link-up → next session, median / max s over all link-ups",
         lambda g: (lambda xs: "%s / %s" % (fmt(med(xs), "", 2), fmt(max(xs) if xs else None, "", 2)))(
             [x["first_session_s"] for r in g for x in r["linkups"] if x["first_session_s"] is not None]))
    line("drain time of all %d, s after the first submission, per run" % rows[0]["submitted"], lambda g: runs(g, "drain_s"))
    line("bandwidth bound, all %d: at the link's rate / counting only the time it is up" % rows[0]["submitted"],
         lambda g: "%.0f s / %.0f s" % (g[0]["bound_all_s"], g[0]["bound_all_with_cuts_s"]))
    line("bandwidth bound, the 20 small", lambda g: "%.1f s" % g[0]["bound_small_s"])
    print()
    for s in sides:
        for r in by[s]:
            ups = ", ".join("%s s: %s" % (x["up_at_s"], "none" if x["first_session_s"] is None else "%.1f s" % x["first_session_s"])
                            for x in r["linkups"])
            print("- %s, round %s: link-ups after the first submission (s) and the delay to the next session: %s" % (
                s, r.get("round", "?"), ups or "none"))
            if r["small_missing"] or "big_arrived_s" not in r:
                print("  missing at the end of the budget: %s" % " ".join(r["small_missing"] + ([] if "big_arrived_s" in r else ["big"])))


def main():
    p = argparse.ArgumentParser()
    sp = p.add_subparsers(dest="cmd", required=True)
    s = sp.add_parser("sink")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--log", required=True)
    s = sp.add_parser("drive")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--at", type=float, required=True)
    s.add_argument("--big", type=int, default=3 << 20)
    s.add_argument("--small", type=int, default=20)
    s.add_argument("--small-size", type=int, default=1500)
    s.add_argument("--budget", type=float, default=360)
    s.add_argument("--seed", type=int, default=1845)
    s.add_argument("--submitted", required=True)
    s.add_argument("--sink-log", required=True)
    s = sp.add_parser("analyse")
    s.add_argument("dir")
    s.add_argument("--rate", type=float, default=256000)
    s.add_argument("--cycle", type=float, default=40)
    s.add_argument("--down", type=float, default=8)
    s.add_argument("--budget", type=float, default=0)
    s = sp.add_parser("table")
    s.add_argument("results", nargs="+")
    a = p.parse_args()
    {"sink": cmd_sink, "drive": cmd_drive, "analyse": cmd_analyse, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
