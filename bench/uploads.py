#!/usr/bin/env python3
"""Many large uploads in flight at once, and the server's memory meanwhile.

Usage: uploads.py PORT ROOT_PID [SESSIONS] [SIZE_MIB]

Opens SESSIONS SMTP connections to 127.0.0.1:PORT and starts one message of
SIZE_MIB MiB on each (DATA, text lines of 78 octets). Every connection sends
the first half, then all wait until each has sent its half: at that point
SESSIONS half-received messages are in flight, and the resident memory of
ROOT_PID and all its descendants is read from /proc: the sum of their Pss
(proportional set size: a page shared by n processes counts 1/n in each,
so Postfix's many processes are not charged their shared libraries many
times over). Then
each sends the rest and the end of data. Memory is also sampled every 50 ms
throughout; the peak of those samples is reported.

Prints one line of key=value pairs: pss_half_kb, pss_peak_kb, accepted
(messages answered 250 after the end of data), elapsed_s. Exits 1 unless
every message was accepted.
"""
import asyncio
import os
import sys
import time

LINE = b"x" * 76 + b"\r\n"


def tree_pss_kb(root):
    """Pss of root and its live descendants, in KiB."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


async def reply(reader):
    """One SMTP reply; returns its code."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def session(port, size, n, half_sent, go):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await reply(reader) == 220
    writer.write(b"EHLO uploads.bench.example\r\n")
    assert await reply(reader) == 250
    writer.write(b"MAIL FROM:<bench@source.example> SIZE=%d\r\n" % size)
    assert await reply(reader) == 250, "MAIL refused"
    writer.write(b"RCPT TO:<sink@dest.example>\r\n")
    assert await reply(reader) == 250, "RCPT refused"
    writer.write(b"DATA\r\n")
    assert await reply(reader) == 354
    header = b"From: bench@source.example\r\nTo: sink@dest.example\r\nSubject: upload %d\r\n\r\n" % n
    lines = (size - len(header)) // len(LINE)
    block = LINE * 800  # about 62 KiB per write
    per_block = 800
    writer.write(header)
    sent = 0
    for phase in (lines // 2, lines):
        while sent < phase:
            k = min(per_block, phase - sent)
            writer.write(block if k == per_block else LINE * k)
            await writer.drain()
            sent += k
        if phase != lines:
            half_sent.release()
            await go.wait()
    writer.write(b".\r\n")
    await writer.drain()
    code = await reply(reader)
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()
    return code == 250


async def main():
    port, root = int(sys.argv[1]), int(sys.argv[2])
    sessions = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    size = int(float(sys.argv[4]) * 1024 * 1024) if len(sys.argv) > 4 else 8 << 20
    half_sent = asyncio.Semaphore(0)
    go = asyncio.Event()
    peak = 0
    stop = False

    async def sample():
        nonlocal peak
        while not stop:
            peak = max(peak, tree_pss_kb(root))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    t0 = time.monotonic()
    tasks = [asyncio.create_task(session(port, size, i, half_sent, go)) for i in range(sessions)]
    for _ in range(sessions):
        await half_sent.acquire()
    await asyncio.sleep(0.5)  # let the server take in what is on its sockets
    pss_half = tree_pss_kb(root)
    go.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.monotonic() - t0
    stop = True
    await sampler
    accepted = sum(1 for r in results if r is True)
    print(f"pss_half_kb={pss_half} pss_peak_kb={peak} accepted={accepted} elapsed_s={elapsed:.1f}")
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        print(f"first error: {errors[0]!r}", file=sys.stderr)
    sys.exit(0 if accepted == sessions else 1)


asyncio.run(main())
