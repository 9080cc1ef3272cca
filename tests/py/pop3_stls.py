#!/usr/bin/python3
"""pop3_stls.py PORT CAFILE USER PASSWORD

On a POP3 listener that refuses plain-text login without TLS: records CAPA,
USER, PASS and AUTH PLAIN before STLS, then STLS (poplib's stls(), the
certificate checked against CAFILE for "localhost"), CAPA and the login
after it. Prints JSON; tests/pop3.rs checks it.
"""
import base64, json, poplib, socket, ssl, sys

port, cafile, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]


class POP3(poplib.POP3):
    def _create_socket(self, timeout):
        # 127.0.0.1, while TLS checks the name "localhost" (self.host).
        return socket.create_connection(("127.0.0.1", self.port), timeout)


def attempt(f, *args):
    try:
        return f(*args).decode()
    except poplib.error_proto as e:
        return e.args[0].decode() if isinstance(e.args[0], bytes) else str(e.args[0])


p = POP3("localhost", port, timeout=20)
out = {"greeting": p.getwelcome().decode(), "capa_before": sorted(p.capa())}
out["user_before"] = attempt(p.user, user)
out["pass_before"] = attempt(p.pass_, password)
plain = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
out["auth_before"] = attempt(p._shortcmd, "AUTH PLAIN " + plain)
out["stls"] = p.stls(ssl.create_default_context(cafile=cafile)).decode()
out["capa_after"] = sorted(p.capa())
out["user_after"] = attempt(p.user, user)
out["pass_after"] = attempt(p.pass_, password)
out["stat_after"] = list(p.stat())
out["quit"] = p.quit().decode()
print(json.dumps(out))
