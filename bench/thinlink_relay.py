#!/usr/bin/env python3
"""bench/thinlink_relay.py - a thin, flaky link between two loopback ports.

A userspace TCP relay (Python 3 standard library only) for bench/thinlink.sh.
It listens on 127.0.0.1:LISTEN and forwards each connection to
127.0.0.1:TARGET, emulating a link of RATE bit/s each way, a round trip of
RTT ms, that goes down for DOWN seconds every CYCLE seconds:

- Rate: each direction is one link shared by every connection (a FIFO
  serialiser): a chunk of n bytes leaves at max(now, link free) + n / rate.
  The relay reads at most BUFFER seconds of transmission ahead (a modem's
  queue); beyond that it stops reading, so TCP's flow control pushes back
  on the sender. Its sockets have small buffers for the same reason.
- Delay: each chunk is written to the far end RTT/2 after it has left
  (chunks are timestamped, not serialised by the delay). A new connection
  to the target is opened RTT after the client connected, so the
  greeting reaches the client 1.5 RTT after connect() returned.
- Cuts: the link is up from the start for CYCLE - DOWN seconds, then down
  for DOWN seconds, and so on (down in [k*CYCLE - DOWN, k*CYCLE) for
  k = 1, 2, ...). At each link-down every open connection is reset on both
  sides (SO_LINGER 0: RST) and the data still in the relay is dropped, and
  the listening socket is closed, so that a connect() is refused (a cheap
  TCP probe sees the link down). At link-up the listener opens again.
- Counting: bytes carried = bytes delivered to the far end, per direction
  (what was read but dropped at a cut is not carried).

It writes one JSON object per line to LOG: {"ev": "start"} (t0 and the
parameters), "up" / "down" (link state changes), "conn" (a connection
accepted: id, t), "end" (a connection ended: id, t, bytes up and down,
how: "cut" | "closed" | "target-refused" | "stop": still open when the
relay was stopped), and at SIGTERM/SIGINT a final
"stop" with the totals. Times are Unix time (time.time()). "up" here means
client -> target (branch -> hub), "down" target -> client.

Usage: thinlink_relay.py --listen PORT --target PORT --log FILE
       [--rate 256000] [--rtt-ms 300] [--cycle 40] [--down 8] [--buffer 1.0]
It prints "ready LISTEN" on stdout once it listens.
"""
import argparse
import asyncio
import json
import signal
import socket
import struct
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--listen", type=int, required=True)
p.add_argument("--target", type=int, required=True)
p.add_argument("--log", required=True)
p.add_argument("--rate", type=float, default=256000.0, help="bit/s each way")
p.add_argument("--rtt-ms", type=float, default=300.0)
p.add_argument("--cycle", type=float, default=40.0)
p.add_argument("--down", type=float, default=8.0)
p.add_argument("--buffer", type=float, default=1.0, help="seconds of transmission queued in the relay at most")
args = p.parse_args()

RATE = args.rate / 8.0          # bytes per second
HALF = args.rtt_ms / 2000.0     # one-way delay, s
CHUNK = 1460                    # bytes per read: about one segment
SOCKBUF = 16384                 # SO_RCVBUF / SO_SNDBUF of the relay's sockets

logf = open(args.log, "a", buffering=1)


def log(ev, **kw):
    kw["ev"] = ev
    kw.setdefault("t", time.time())
    logf.write(json.dumps(kw) + "\n")


class Link:
    """One direction of the link: a FIFO serialiser at RATE bytes/s."""

    def __init__(self):
        self.free_at = 0.0
        self.carried = 0

    def schedule(self, n, now):
        start = max(now, self.free_at)
        self.free_at = start + n / RATE
        return self.free_at


UP, DOWN = Link(), Link()
conns = {}          # id -> Conn
next_id = 0
link_up = True
t0 = time.time()


def reset(writer):
    """Close with an RST (SO_LINGER 0)."""
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        writer.transport.abort()
    except Exception:
        pass


class Conn:
    def __init__(self, cid, reader, writer):
        self.id = cid
        self.creader, self.cwriter = reader, writer
        self.treader = self.twriter = None
        self.bytes = {"up": 0, "down": 0}
        self.tasks = []
        self.ended = False
        self.pending = 2          # directions still open

    def end(self, how):
        if self.ended:
            return
        self.ended = True
        conns.pop(self.id, None)
        log("end", id=self.id, up=self.bytes["up"], down=self.bytes["down"], how=how)
        for w in (self.cwriter, self.twriter):
            if w is None:
                continue
            if how == "cut":
                reset(w)
            else:
                try:
                    w.close()
                except Exception:
                    pass
        for t in self.tasks:
            if t is not asyncio.current_task():
                t.cancel()

    async def pump(self, name, link, reader, writer):
        """Read from one side, carry over the link, write to the other."""
        q = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def sender():
            while True:
                at, data = await q.get()
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:            # EOF from the reading side
                    try:
                        if writer.can_write_eof():
                            writer.write_eof()
                    except Exception:
                        pass
                    return
                writer.write(data)
                await writer.drain()
                self.bytes[name] += len(data)
                link.carried += len(data)

        st = asyncio.ensure_future(sender())
        self.tasks.append(st)
        try:
            while True:
                data = await reader.read(CHUNK)
                now = loop.time()
                if not data:
                    await q.put((max(now, link.free_at) + HALF, None))
                    break
                done = link.schedule(len(data), now)
                await q.put((done + HALF, data))
                ahead = link.free_at - now - args.buffer
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await st
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            self.end("closed")
            return
        self.pending -= 1
        if self.pending == 0:
            self.end("closed")


def tune(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKBUF)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKBUF)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


async def handle(reader, writer):
    global next_id
    next_id += 1
    c = Conn(next_id, reader, writer)
    conns[c.id] = c
    log("conn", id=c.id)
    if not link_up:             # raced with a cut
        c.end("cut")
        return
    try:
        await asyncio.sleep(2 * HALF)       # the handshake's round trip
        if c.ended:
            return
        c.treader, c.twriter = await asyncio.open_connection("127.0.0.1", args.target)
        tune(c.twriter.get_extra_info("socket"))
    except (ConnectionError, OSError):
        c.end("target-refused")
        return
    except asyncio.CancelledError:
        return
    if c.ended:
        reset(c.twriter)
        return
    c.tasks.append(asyncio.current_task())
    a = asyncio.ensure_future(c.pump("up", UP, c.creader, c.twriter))
    b = asyncio.ensure_future(c.pump("down", DOWN, c.treader, c.cwriter))
    c.tasks += [a, b]
    try:
        await asyncio.gather(a, b, return_exceptions=True)
    except asyncio.CancelledError:
        pass


def listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tune(s)                     # inherited by accepted sockets
    s.bind(("127.0.0.1", args.listen))
    s.listen(64)
    s.setblocking(False)
    return s


async def main():
    global link_up
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(handle, sock=listener())
    log("start", t=t0, listen=args.listen, target=args.target, rate_bps=args.rate,
        rtt_ms=args.rtt_ms, cycle=args.cycle, down=args.down, buffer=args.buffer)
    log("up", t=t0)
    print("ready %d" % args.listen, flush=True)
    k = 1
    if args.down <= 0:              # a link that never goes down
        await stop.wait()
    while not stop.is_set():
        t_down = t0 + k * args.cycle - args.down
        t_up = t0 + k * args.cycle
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, t_down - time.time()))
            break
        except asyncio.TimeoutError:
            pass
        link_up = False
        server.close()
        log("down", open=len(conns))
        for c in list(conns.values()):
            c.end("cut")
        UP.free_at = DOWN.free_at = 0.0
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(0.0, t_up - time.time()))
            break
        except asyncio.TimeoutError:
            pass
        while True:
            try:
                server = await asyncio.start_server(handle, sock=listener())
                break
            except OSError as e:        # should not happen with SO_REUSEADDR
                log("relisten-error", error=str(e))
                await asyncio.sleep(0.05)
        link_up = True
        log("up")
        k += 1
    server.close()
    for c in list(conns.values()):
        c.end("stop")
    log("stop", carried_up=UP.carried, carried_down=DOWN.carried, connections=next_id)


asyncio.run(main())
