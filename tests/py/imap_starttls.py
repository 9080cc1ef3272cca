#!/usr/bin/python3
"""imap_starttls.py STARTTLS_PORT IMAPS_PORT USER PASSWORD

On an IMAP listener that refuses plain-text login without TLS: the
capabilities and LOGIN before STARTTLS, then imaplib's starttls() (the
gateway's self-signed certificate not checked), the capabilities and LOGIN
after it; then a login over implicit TLS (IMAP4_SSL). Prints JSON;
tests/imap.rs checks it.
"""
import imaplib, json, ssl, sys

port, imaps, user, password = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE


def attempt(f, *args):
    try:
        typ, data = f(*args)
        return typ + " " + b" ".join(d for d in data if isinstance(d, bytes)).decode()
    except imaplib.IMAP4.error as e:
        return "error: " + str(e)


out = {}
c = imaplib.IMAP4("127.0.0.1", port, timeout=20)
out["capabilities_before"] = sorted(c.capabilities)
# imaplib sends LOGIN even when LOGINDISABLED is announced: the server answers.
out["login_before"] = attempt(c.login, user, password)
out["starttls"] = attempt(c.starttls, ctx)
out["tls_version"] = c.sock.version()
out["capabilities_after"] = sorted(c.capabilities)
out["login_after"] = attempt(c.login, user, password)
typ, data = c.select("INBOX")
out["select_after"] = typ + " " + data[0].decode()
c.logout()

s = imaplib.IMAP4_SSL("127.0.0.1", imaps, ssl_context=ctx, timeout=20)
out["imaps_capabilities"] = sorted(s.capabilities)
out["imaps_login"] = attempt(s.login, user, password)
typ, data = s.select("INBOX")
out["imaps_select"] = typ + " " + data[0].decode()
s.logout()
print(json.dumps(out))
