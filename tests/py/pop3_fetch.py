#!/usr/bin/python3
"""pop3_fetch.py PORT MODE CAFILE USER PASSWORD

Reads a whole maildrop with Python's poplib and prints what it saw as JSON;
tests/pop3.rs compares it with the store. MODE: "pop3s" (implicit TLS),
"stls" (plain, then STLS) or "plain". The certificate is checked against
CAFILE for the name "localhost". Message lines are printed as poplib returns
them (line ends removed, dots unstuffed), base64-encoded; nothing is deleted.
"""
import base64, json, poplib, socket, ssl, sys

port, mode, cafile, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(cafile=cafile)


def connect_loopback(self, timeout):
    # Connect to 127.0.0.1 while TLS checks the name "localhost" (self.host).
    return socket.create_connection(("127.0.0.1", self.port), timeout)


class POP3(poplib.POP3):
    _create_socket = connect_loopback


class POP3S(poplib.POP3_SSL):
    def _create_socket(self, timeout):
        return self.context.wrap_socket(connect_loopback(self, timeout), server_hostname=self.host)


b64 = lambda b: base64.b64encode(b).decode()
if mode == "pop3s":
    p = POP3S("localhost", port, context=ctx, timeout=20)
else:
    p = POP3("localhost", port, timeout=20)
out = {"greeting": p.getwelcome().decode()}
if mode == "stls":
    out["stls"] = p.stls(ctx).decode()
out["capa"] = sorted(p.capa())
out["user"] = p.user(user).decode()
out["pass"] = p.pass_(password).decode()
count, size = p.stat()
out["stat"] = [count, size]
out["list"] = [l.decode() for l in p.list()[1]]
out["uidl"] = [l.decode() for l in p.uidl()[1]]
out["messages"] = []
for n in range(1, count + 1):
    resp, lines, octets = p.retr(n)
    top = p.top(n, 0)[1]
    out["messages"].append(
        {"resp": resp.decode(), "octets": octets, "lines": [b64(l) for l in lines], "top0": [b64(l) for l in top]}
    )
out["quit"] = p.quit().decode()
print(json.dumps(out))
