#!/usr/bin/python3
"""imap_fetch.py PORT USER PASSWORD

Reads the INBOX with Python's imaplib over plain text on loopback: for
each message FETCH BODY.PEEK[] and then FLAGS; then, for message 1 only,
FETCH BODY[] and FLAGS again. Prints JSON (message bytes base64-encoded);
tests/imap.rs compares it with the store.
"""
import base64, imaplib, json, sys

port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
b64 = lambda b: base64.b64encode(b).decode()


def literal(data):
    # [(b'1 (BODY[] {N}', b'<N octets>'), b')']
    for part in data:
        if isinstance(part, tuple):
            return part[1]
    raise SystemExit("no literal in %r" % (data,))


def flags(c, n):
    typ, data = c.fetch(str(n), "(FLAGS)")
    assert typ == "OK", (typ, data)
    return data[0].decode()


c = imaplib.IMAP4("127.0.0.1", port, timeout=20)
out = {"capabilities": sorted(c.capabilities)}
typ, data = c.login(user, password)
assert typ == "OK", (typ, data)
typ, data = c.select("INBOX")
assert typ == "OK", (typ, data)
count = int(data[0])
out["messages"] = []
for n in range(1, count + 1):
    typ, data = c.fetch(str(n), "(BODY.PEEK[])")
    assert typ == "OK", (typ, data)
    out["messages"].append({"peek": b64(literal(data)), "flags_after_peek": flags(c, n)})
typ, data = c.fetch("1", "(BODY[])")
assert typ == "OK", (typ, data)
out["body"] = b64(literal(data))
out["flags_after_body"] = [flags(c, n) for n in range(1, count + 1)]
c.logout()
print(json.dumps(out))
