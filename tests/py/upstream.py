#!/usr/bin/python3
"""upstream.py PORT OUTDIR [--tls CERT KEY] [--implicit] [--auth USER:PASS]

An upstream relay for the flush tests (aiosmtpd, Debian's python3-aiosmtpd:
run it with /usr/bin/python3). By the recipient's local part: 'defer' ->
451 4.3.0, 'reject' -> 550 5.1.1, anything else -> 250. Each message goes to
OUTDIR/NNNN.eml (the bytes as sent: CRLF kept, dots unstuffed) and
OUTDIR/NNNN.env (envelope sender, empty for <>, then one accepted recipient
a line). The .env is written last, so a test that sees it sees the whole
.eml. Prints "listening PORT" once it accepts connections; stops on SIGTERM
or SIGINT.
"""
import argparse, glob, itertools, os, signal, ssl

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

ap = argparse.ArgumentParser()
ap.add_argument("port", type=int)
ap.add_argument("outdir")
ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
ap.add_argument("--implicit", action="store_true")
ap.add_argument("--auth", metavar="USER:PASS")
a = ap.parse_args()


def write(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


class Handler:
    n = itertools.count(len(glob.glob(f"{a.outdir}/*.eml")) + 1)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0].lower()
        if "defer" in local:
            return "451 4.3.0 try later"
        if "reject" in local:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 ok"

    async def handle_DATA(self, server, session, envelope):
        n = next(self.n)
        write(f"{a.outdir}/{n:04d}.eml", envelope.original_content)
        # aiosmtpd reports MAIL FROM:<> as "<>": write the null sender as "".
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from
        env = "\n".join([sender, *envelope.rcpt_tos]) + "\n"
        write(f"{a.outdir}/{n:04d}.env", env.encode())
        return "250 2.0.0 saved"


def check(server, session, envelope, mechanism, data):
    # handled=False: on failure aiosmtpd answers 535 itself (else no reply).
    ok = f"{data.login.decode()}:{data.password.decode()}" == a.auth
    return AuthResult(success=ok, handled=False)


kw = dict(hostname="127.0.0.1", port=a.port, decode_data=False)
if a.tls:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*a.tls)
    kw["ssl_context" if a.implicit else "tls_context"] = ctx
    kw["auth_require_tls"] = not a.implicit
if a.auth:
    kw.update(authenticator=check, auth_required=True)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
c = Controller(Handler(), **kw)
c.start()
print("listening", a.port, flush=True)
signal.sigwait({signal.SIGINT, signal.SIGTERM})
c.stop()
