#!/usr/bin/python3
"""imap_starttls_injection.py PORT USER PASSWORD: a command pipelined
behind STARTTLS in the same packet must be discarded, not run after the
handshake (CVE-2011-0411 class). Prints JSON; tests/imap.rs checks it."""
import json, socket, ssl, sys

port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = socket.create_connection(("127.0.0.1", port), timeout=10)


def line(sock, buf):
    while b"\r\n" not in buf[0]:
        chunk = sock.recv(4096)
        if not chunk:
            return "<EOF>"
        buf[0] += chunk
    l, buf[0] = buf[0].split(b"\r\n", 1)
    return l.decode("utf-8", "replace")


def until(sock, buf, tag):
    got = []
    while True:
        l = line(sock, buf)
        got.append(l)
        if l == "<EOF>" or l.startswith(tag + " "):
            return got


buf = [b""]
out = {"greeting": line(s, buf)}
s.sendall(b"a1 STARTTLS\r\na2 LOGIN %s %s\r\n" % (user.encode(), password.encode()))
out["starttls"] = until(s, buf, "a1")
out["left_in_clear"] = buf[0].decode("utf-8", "replace")
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
t = ctx.wrap_socket(s, server_hostname="localhost")
buf = [b""]
# Were the injected LOGIN run, this would be answered BAD (already logged
# in) and a2's answer would come first.
t.sendall(b"a3 SELECT INBOX\r\n")
out["after_tls"] = until(t, buf, "a3")
t.sendall(b"a4 LOGOUT\r\n")
out["logout"] = until(t, buf, "a4")
print(json.dumps(out))
