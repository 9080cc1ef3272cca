#!/usr/bin/env python3
"""watch_queue.py - time a queue drain.  Used by sink-flush.sh and bench/flush.sh.

  watch_queue.py --flush-cmd CMD --depth-cmd CMD --port PORT
                 [--interval 0.1] [--timeout 600]

1. runs DEPTH_CMD (shell) -> initial depth N (must be > 0)
2. t0; runs FLUSH_CMD (shell, waits for it to return)
3. polls DEPTH_CMD every INTERVAL s until it prints 0 -> t1
   meanwhile counts ESTABLISHED TCP connections to remote port PORT in this
   network namespace (from /proc/net/tcp{,6}) = upstream connection concurrency
Prints key=value lines: messages, elapsed_s, flush_cmd_s, avg_conns, max_conns,
first_conn_s (t0 -> first upstream connection seen), timed_out.
"""
import argparse
import subprocess
import sys
import time


def depth(cmd):
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    try:
        return int(out.stdout.strip().split()[-1])
    except (ValueError, IndexError):
        sys.stderr.write("watch_queue: depth command printed %r (stderr %r)\n"
                         % (out.stdout, out.stderr))
        return -1


def conns(port):
    n = 0
    hexport = ":%04X" % port
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    p = line.split()
                    # p[2] = rem_address "IP:PORT", p[3] = state (01 = ESTABLISHED)
                    if p[3] == "01" and p[2].endswith(hexport):
                        n += 1
        except OSError:
            pass
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flush-cmd", required=True)
    ap.add_argument("--depth-cmd", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()

    n0 = depth(a.depth_cmd)
    if n0 <= 0:
        print("watch_queue: queue depth is %d before flush; nothing to measure" % n0,
              file=sys.stderr)
        sys.exit(1)
    t0 = time.monotonic()
    r = subprocess.run(a.flush_cmd, shell=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    tf = time.monotonic() - t0
    if r.returncode != 0:
        print("watch_queue: flush command failed rc=%d: %s" % (r.returncode, r.stderr.strip()),
              file=sys.stderr)
        sys.exit(1)
    samples, maxc, first_conn, timed_out = [], 0, None, 0
    while True:
        c = conns(a.port)
        now = time.monotonic()
        if c and first_conn is None:
            first_conn = now - t0
        samples.append(c)
        maxc = max(maxc, c)
        d = depth(a.depth_cmd)
        if d == 0:
            break
        if now - t0 > a.timeout:
            timed_out = 1
            break
        time.sleep(a.interval)
    t1 = time.monotonic()
    busy = [s for s in samples if s > 0]
    print("messages=%d" % n0)
    print("elapsed_s=%.3f" % (t1 - t0))
    print("flush_cmd_s=%.3f" % tf)
    print("first_conn_s=%s" % ("%.3f" % first_conn if first_conn is not None else "na"))
    print("avg_conns=%.1f" % (sum(busy) / len(busy) if busy else 0.0))
    print("max_conns=%d" % maxc)
    print("timed_out=%d" % timed_out)
    print("remaining=%d" % d)


if __name__ == "__main__":
    main()
