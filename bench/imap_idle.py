#!/usr/bin/env python3
"""Many IMAP sessions idle at once, held open until told to let go.

Usage: imap_idle.py HOST PORT SESSIONS USER PASSWORD [BATCH]

Opens SESSIONS connections to HOST:PORT, BATCH [20] at a time. On each:
reads the greeting, LOGIN USER PASSWORD, SELECT INBOX, IDLE, and waits for
the server's "+" continuation. A batch has 60 s for all of that; the next
batch starts when it is done. Plain blocking sockets, one step of the
dialogue on every connection of a batch at once (the server works on them
concurrently), so the client itself stays small.

When every session is idle it prints one line, "idle=N exists=K" (K: the
messages SELECT reported in INBOX, from the first session), and flushes it.
Then it waits until its standard input closes (or SIGTERM/SIGINT), sends
DONE and LOGOUT on every session and prints a second line of key=value
pairs: sessions, idle, done_ok (sessions that answered DONE and LOGOUT with
OK, i.e. were still there), elapsed_s (from the first connect to all idle).

Exits 1, with the first error on stderr, unless every session went idle
(and then was still there at the end).
"""
import signal
import socket
import sys
import time

STEP_S = 60.0


class Conn:
    def __init__(self, host, port, deadline):
        self.sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
        self.buf = b""
        self.exists = None

    def send(self, data):
        self.sock.sendall(data)

    def line(self, deadline):
        while b"\r\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply in time")
            self.sock.settimeout(left)
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def tagged(self, tag, deadline):
        """Lines up to the tagged reply; raises unless it is OK."""
        while True:
            line = self.line(deadline)
            if line.startswith(b"* ") and line.endswith(b" EXISTS"):
                self.exists = int(line.split()[1])
            if line.startswith(tag + b" "):
                if line.split()[1].upper() != b"OK":
                    raise RuntimeError(f"{tag.decode()} refused: {line[:200]!r}")
                return

    def continuation(self, deadline):
        while True:
            line = self.line(deadline)
            if line.startswith(b"+"):
                return
            if not line.startswith(b"*"):
                raise RuntimeError(f"IDLE refused: {line[:200]!r}")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def quote(s):
    return b'"' + s.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'


def each(conns, errors, fn):
    """fn(conn) on every live connection; the ones that fail are dropped."""
    alive = []
    for c in conns:
        try:
            fn(c)
            alive.append(c)
        except (OSError, RuntimeError, ValueError) as e:
            errors.append(e)
            c.close()
    return alive


def open_batch(host, port, n, user, password, errors):
    deadline = time.monotonic() + STEP_S
    conns = []
    for _ in range(n):
        try:
            conns.append(Conn(host, port, deadline))
        except OSError as e:
            errors.append(e)
    conns = each(conns, errors, lambda c: c.line(deadline))  # greeting
    login = b"a LOGIN " + quote(user) + b" " + quote(password) + b"\r\n"
    for cmd, tag in ((login, b"a"), (b"b SELECT INBOX\r\n", b"b")):
        conns = each(conns, errors, lambda c: c.send(cmd))
        conns = each(conns, errors, lambda c: c.tagged(tag, deadline))
    conns = each(conns, errors, lambda c: c.send(b"c IDLE\r\n"))
    return each(conns, errors, lambda c: c.continuation(deadline))


class Released(Exception):
    pass


def release(_sig, _frame):
    raise Released()


def main():
    host, port, sessions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    user, password = sys.argv[4], sys.argv[5]
    batch = int(sys.argv[6]) if len(sys.argv) > 6 else 20
    errors = []
    idle = []
    t0 = time.monotonic()
    while len(idle) < sessions and len(errors) == 0:
        idle += open_batch(host, port, min(batch, sessions - len(idle)), user, password, errors)
    elapsed = time.monotonic() - t0
    exists = idle[0].exists if idle else None
    print(f"idle={len(idle)} exists={exists}", flush=True)

    signal.signal(signal.SIGTERM, release)
    signal.signal(signal.SIGINT, release)
    if len(idle) == sessions:
        try:
            while sys.stdin.buffer.read(65536):
                pass
        except Released:
            pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    deadline = time.monotonic() + STEP_S
    done = each(idle, errors, lambda c: c.send(b"DONE\r\n"))
    done = each(done, errors, lambda c: c.tagged(b"c", deadline))
    done = each(done, errors, lambda c: c.send(b"d LOGOUT\r\n"))
    done = each(done, errors, lambda c: c.tagged(b"d", deadline))
    for c in idle:
        c.close()
    print(f"sessions={sessions} idle={len(idle)} done_ok={len(done)} elapsed_s={elapsed:.1f}", flush=True)
    if errors:
        print(f"{len(errors)} errors, the first: {errors[0]!r}", file=sys.stderr)
    sys.exit(0 if len(idle) == sessions and len(done) == sessions else 1)


main()
