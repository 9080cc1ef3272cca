#!/usr/bin/python3
"""smtplib_relay.py PORT: sends a message with Python's smtplib (pipelining
off, as smtplib does) and prints the queue id."""
import smtplib, sys

s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=10)
s.ehlo("client.test")
s.mail("sender@client.test", ["BODY=8BITMIME"])
s.rcpt("one@elsewhere.example")
s.rcpt("two@elsewhere.example")
code, resp = s.data(b"Subject: smtplib\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n..\r\n.x\r\n")
assert code == 250, (code, resp)
print(resp.decode().rsplit(" ", 1)[-1])
s.quit()
