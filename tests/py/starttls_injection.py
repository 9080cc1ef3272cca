#!/usr/bin/python3
"""starttls_injection.py PORT: a command pipelined behind STARTTLS must be
discarded, not executed after the handshake (CVE-2011-0411 class)."""
import socket, ssl, sys

port = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", port), timeout=10)


def reply(sock):
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data + b"<EOF>"
        data += chunk
        lines = data.split(b"\r\n")
        last = lines[-2] if len(lines) >= 2 else b""
        if data.endswith(b"\r\n") and len(last) >= 4 and last[3:4] == b" ":
            return data


assert reply(s).startswith(b"220"), "greeting"
s.sendall(b"EHLO client.test\r\n")
assert b"STARTTLS" in reply(s)
# The injected MAIL arrives in the same packet as STARTTLS.
s.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
r = reply(s)
assert r == b"220 2.0.0 Ready to start TLS\r\n", f"only the STARTTLS reply, got {r!r}"
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
t = ctx.wrap_socket(s, server_hostname="localhost")
t.sendall(b"EHLO client.test\r\n")
r = reply(t)
assert r.startswith(b"250-"), f"first reply after TLS must answer EHLO, got {r!r}"
t.sendall(b"RCPT TO:<a@elsewhere.example>\r\n")
r = reply(t)
assert r.startswith(b"503"), f"the injected MAIL must not have run, got {r!r}"
t.sendall(b"QUIT\r\n")
print("ok", t.version())
