#!/usr/bin/python3
"""submission.py PORT USER PASSWORD: AUTH only after STARTTLS, MAIL only after
AUTH, wrong passwords refused; prints the queue id of the message sent."""
import smtplib, ssl, sys

port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE

s = smtplib.SMTP("127.0.0.1", port, timeout=10)
s.ehlo("client.test")
assert not s.has_extn("auth"), "AUTH must not be offered before TLS"
code, msg = s.docmd("AUTH", "PLAIN " + "AGFsaWNlAHNlY3JldA==")
assert code == 538, (code, msg)
code, msg = s.docmd("MAIL", "FROM:<alice@branch.example>")
assert code == 530, (code, msg)
s.starttls(context=ctx)
s.ehlo("client.test")
assert s.has_extn("auth") and "PLAIN" in s.esmtp_features["auth"], s.esmtp_features
try:
    s.login(user, password + "-wrong")
    raise SystemExit("a wrong password was accepted")
except smtplib.SMTPAuthenticationError as e:
    assert e.smtp_code == 535, e
s.login(user, password)
code, _ = s.mail("alice@branch.example")
assert code == 250
code, _ = s.rcpt("friend@elsewhere.example")
assert code == 250
code, resp = s.data(b"Subject: submitted\r\n\r\n8-bit: \xc3\xa9t\xc3\xa9\r\n.leading dot\r\n")
assert code == 250, (code, resp)
print(resp.decode().rsplit(" ", 1)[-1])
s.quit()
