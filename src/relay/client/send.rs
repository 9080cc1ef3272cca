//! Sending messages over an open session, pipelined, and what each
//! recipient's replies mean; addresses written so that nothing a client
//! sent can become a parameter.

use std::sync::atomic::Ordering;

use super::{LinkError, Session, UpstreamReply};
use crate::address::smtp_path;

/// How a batch reports as it goes, and how it is told to stop.
pub struct Report<'a> {
    /// Called once per message (its index in the batch) as soon as every
    /// recipient's outcome is known: the caller records it at once, so a
    /// stop or a crash later resends nothing the upstream took.
    pub outcome: &'a mut (dyn FnMut(usize, Vec<Outcome>) + Send),
    /// Once set, no new transaction starts; those in flight finish.
    pub stop: &'a std::sync::atomic::AtomicBool,
}

impl Report<'_> {
    fn stopping(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Messages larger than this go with a TRANSID when the upstream offers
/// CHECKPOINT: sent alone (one round trip more), they resume after a cut.
pub const RESUME_OVER: usize = 64 << 10;

/// One recipient of an outgoing message.
#[derive(Debug, Clone)]
pub struct OutRecipient {
    pub address: String,
    pub notify: Option<String>,
    pub orcpt: Option<String>,
}

/// One message to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub sender: String,
    pub recipients: Vec<OutRecipient>,
    pub body: Vec<u8>,
    pub eightbit: bool,
    pub smtputf8: bool,
    pub dsn_ret: Option<crate::queue::DsnRet>,
    pub dsn_envid: Option<String>,
    /// The transaction id this copy goes with (RFC 1845, without the
    /// angle brackets): the same on every try, so a cut transfer resumes.
    pub transid: Option<String>,
}

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered(UpstreamReply),
    Deferred(UpstreamReply),
    Bounced(UpstreamReply),
    /// The final dot was sent and no reply came (RFC 1047).
    Uncertain(String),
    /// Not tried: the session ended before this message's turn.
    Untouched,
}

impl Session {
    /// Checks what the upstream said it accepts; a message it cannot take
    /// is bounced here without being sent.
    pub fn refuse_before_sending(&self, m: &Outgoing) -> Option<UpstreamReply> {
        let unsendable = std::iter::once(&m.sender)
            .chain(m.recipients.iter().map(|r| &r.address))
            .find(|a| smtp_path(a).is_none());
        if let Some(a) = unsendable {
            return Some(UpstreamReply {
                code: 553,
                text: format!(
                    "5.1.7 the address {:?} cannot be written in SMTP (control characters)",
                    a
                ),
            });
        }
        if let Some(max) = self.ext.size {
            if m.body.len() as u64 > max {
                return Some(UpstreamReply {
                    code: 552,
                    text: format!(
                        "5.3.4 message of {} octets is larger than the upstream accepts ({max} octets, its SIZE)",
                        m.body.len()
                    ),
                });
            }
        }
        if m.smtputf8 && !self.ext.smtputf8 {
            return Some(UpstreamReply {
                code: 553,
                text: "5.6.7 the message needs SMTPUTF8 (non-ASCII addresses) and the upstream does not offer it".into(),
            });
        }
        if m.eightbit && !self.ext.eightbit {
            return Some(UpstreamReply {
                code: 554,
                text:
                    "5.6.3 the message has 8-bit content and the upstream does not offer 8BITMIME"
                        .into(),
            });
        }
        None
    }

    /// The MAIL command for `m`, with the parameters the upstream takes.
    fn mail_command(&self, m: &Outgoing) -> String {
        let mut out = format!("MAIL FROM:<{}>", smtp_path(&m.sender).unwrap_or_default());
        if let Some(max) = self.ext.size.map(|_| m.body.len()) {
            out.push_str(&format!(" SIZE={max}"));
        }
        if m.eightbit && self.ext.eightbit {
            out.push_str(" BODY=8BITMIME");
        }
        if m.smtputf8 && self.ext.smtputf8 {
            out.push_str(" SMTPUTF8");
        }
        if self.ext.dsn {
            if let Some(ret) = &m.dsn_ret {
                out.push_str(&format!(" RET={ret}"));
            }
            if let Some(envid) = &m.dsn_envid {
                out.push_str(&format!(" ENVID={}", xtext(envid)));
            }
        }
        if let Some(t) = self.transid(m) {
            out.push_str(&format!(" TRANSID=<{t}>"));
        }
        out.push_str("\r\n");
        out
    }

    /// The RCPT command for one recipient.
    fn rcpt_command(&self, r: &OutRecipient) -> String {
        let mut out = format!("RCPT TO:<{}>", smtp_path(&r.address).unwrap_or_default());
        if self.ext.dsn {
            if let Some(n) = &r.notify {
                out.push_str(&format!(" NOTIFY={n}"));
            }
            if let Some(o) = &r.orcpt {
                let (kind, addr) = o.split_once(';').unwrap_or(("rfc822", o));
                out.push_str(&format!(" ORCPT={kind};{}", xtext(addr)));
            }
        }
        out.push_str("\r\n");
        out
    }

    fn envelope(&self, m: &Outgoing, bdat: bool) -> Vec<u8> {
        let mut out = self.mail_command(m);
        for r in &m.recipients {
            out.push_str(&self.rcpt_command(r));
        }
        if bdat {
            out.push_str(&format!("BDAT {} LAST\r\n", m.body.len()));
        } else {
            out.push_str("DATA\r\n");
        }
        out.into_bytes()
    }

    /// The TRANSID `m` goes with (RFC 1845), when the upstream offers
    /// CHECKPOINT and `m` is big enough for resuming to matter.
    fn transid<'m>(&self, m: &'m Outgoing) -> Option<&'m str> {
        (self.ext.checkpoint && m.body.len() > RESUME_OVER)
            .then_some(m.transid.as_deref())
            .flatten()
    }

    /// Sends `msgs`, reporting each message's outcomes (one per
    /// recipient) through `report` as soon as they are known; a message
    /// never reported was not tried. After a connection loss the session
    /// is unusable (`Err`); otherwise it is handed back for more.
    /// Messages that go with a TRANSID go one at a time, the others
    /// pipelined in runs between them.
    pub async fn send_batch(
        mut self,
        msgs: &[&Outgoing],
        report: &mut Report<'_>,
    ) -> Result<Session, LinkError> {
        let mut i = 0;
        while i < msgs.len() && !report.stopping() {
            if self.transid(msgs[i]).is_some() {
                self.send_resumable(i, msgs[i], report).await?;
                i += 1;
                continue;
            }
            let end = (i..msgs.len())
                .find(|&k| self.transid(msgs[k]).is_some())
                .unwrap_or(msgs.len());
            let offset = i;
            let outcome = &mut *report.outcome;
            let mut shifted = |k: usize, o: Vec<Outcome>| outcome(k + offset, o);
            let mut run = Report {
                outcome: &mut shifted,
                stop: report.stop,
            };
            if self.ext.chunking && self.ext.pipelining {
                self.send_bdat_pipelined(&msgs[i..end], &mut run).await?;
            } else {
                self.send_data(&msgs[i..end], &mut run).await?;
            }
            i = end;
        }
        Ok(self)
    }

    /// One message with a TRANSID (RFC 1845 CHECKPOINT): MAIL alone. 355
    /// means the upstream kept the transaction when the link broke: its
    /// recipients stand, and only the content after the offset goes (none
    /// at all when it was taken whole and the reply never came, RFC 1047).
    /// 250 means a new transaction, sent whole. A link that breaks during
    /// the content leaves the message unreported (still due): the next try
    /// resumes, so nothing is sent twice.
    async fn send_resumable(
        &mut self,
        idx: usize,
        m: &Outgoing,
        report: &mut Report<'_>,
    ) -> Result<(), LinkError> {
        let n = m.recipients.len();
        if let Some(r) = self.refuse_before_sending(m) {
            (report.outcome)(idx, vec![Outcome::Bounced(r); n]);
            return Ok(());
        }
        let bdat = self.ext.chunking;
        let mail = self.command(&self.mail_command(m), "MAIL").await?;
        let (rcpt, offset) = match mail.code {
            355 => {
                let offset = mail
                    .text
                    .split_whitespace()
                    .next()
                    .and_then(|o| o.parse::<usize>().ok())
                    .filter(|&o| o <= m.body.len())
                    .ok_or_else(|| LinkError::Protocol {
                        addr: self.addr.clone(),
                        why: "a 355 reply without a usable octet offset",
                    })?;
                tracing::info!(upstream = %self.addr, transid = self.transid(m).unwrap_or(""), offset,
                               size = m.body.len(), "CHECKPOINT: resuming");
                // The upstream kept the recipients it accepted.
                let ok = UpstreamReply {
                    code: 250,
                    text: "2.1.5 kept from the interrupted transaction".into(),
                };
                (vec![ok; n], offset)
            }
            c if c / 100 == 2 => {
                let mut rcpt = Vec::with_capacity(n);
                if self.ext.pipelining {
                    let cmds: String = m.recipients.iter().map(|r| self.rcpt_command(r)).collect();
                    self.write(cmds.as_bytes(), "RCPT").await?;
                    for _ in 0..n {
                        rcpt.push(self.read_reply("RCPT").await?);
                    }
                } else {
                    for r in &m.recipients {
                        rcpt.push(self.command(&self.rcpt_command(r), "RCPT").await?);
                    }
                }
                if let Some(e) = self.closing(&mail, &rcpt, &mail) {
                    return Err(e);
                }
                if !rcpt.iter().any(|r| r.class() == 2) {
                    (report.outcome)(idx, outcomes(&mail, &rcpt, None));
                    let _ = self.command("RSET\r\n", "RSET").await?;
                    return Ok(());
                }
                (rcpt, 0)
            }
            _ => {
                if mail.code == 421 {
                    return Err(LinkError::Closing {
                        addr: self.addr.clone(),
                        reply: mail,
                    });
                }
                (report.outcome)(idx, outcomes(&mail, &vec![mail.clone(); n], None));
                return Ok(());
            }
        };
        let rest = &m.body[offset..];
        let progress = &self.progress;
        progress.size.store(m.body.len() as u64, Ordering::Relaxed);
        progress.resumed_at.store(offset as u64, Ordering::Relaxed);
        progress
            .resumed_total
            .fetch_add(offset as u64, Ordering::Relaxed);
        progress.sent.store(offset as u64, Ordering::Relaxed);
        progress
            .started_at
            .store(crate::queue::unix_now(), Ordering::Relaxed);
        progress.message.store(idx + 1, Ordering::Relaxed);
        let sent = self.send_rest(rest, bdat, &mail, &rcpt, idx, report).await;
        self.progress.message.store(0, Ordering::Relaxed);
        sent
    }

    /// The content after `offset` of a message sent alone, and its reply.
    async fn send_rest(
        &mut self,
        rest: &[u8],
        bdat: bool,
        mail: &UpstreamReply,
        rcpt: &[UpstreamReply],
        idx: usize,
        report: &mut Report<'_>,
    ) -> Result<(), LinkError> {
        if bdat {
            let mut buf = format!("BDAT {} LAST\r\n", rest.len()).into_bytes();
            // The command line is not the message's.
            self.progress.sent.fetch_sub(
                buf.len()
                    .min(self.progress.sent.load(Ordering::Relaxed) as usize)
                    as u64,
                Ordering::Relaxed,
            );
            buf.extend_from_slice(rest);
            self.write(&buf, "sending a message").await?;
        } else {
            let go = self.command("DATA\r\n", "DATA").await?;
            if go.code != 354 {
                if go.code == 421 {
                    return Err(LinkError::Closing {
                        addr: self.addr.clone(),
                        reply: go,
                    });
                }
                (report.outcome)(idx, outcomes(mail, rcpt, Some(&go)));
                let _ = self.command("RSET\r\n", "RSET").await?;
                return Ok(());
            }
            let mut buf = crate::dotstuff::dot_stuff(rest);
            buf.extend_from_slice(b".\r\n");
            self.write(&buf, "sending a message").await?;
        }
        let last = self.read_final_reply().await?;
        if last.code == 421 {
            return Err(LinkError::Closing {
                addr: self.addr.clone(),
                reply: last,
            });
        }
        let mail_ok = UpstreamReply {
            code: 250,
            text: mail.text.clone(),
        };
        (report.outcome)(idx, outcomes(&mail_ok, rcpt, Some(&last)));
        Ok(())
    }

    /// CHUNKING + PIPELINING: keep up to WINDOW transactions in flight.
    async fn send_bdat_pipelined(
        &mut self,
        msgs: &[&Outgoing],
        report: &mut Report<'_>,
    ) -> Result<(), LinkError> {
        // Transactions and octets in flight at most. An upstream that holds
        // its replies until its input runs dry (Postfix) answers a whole
        // window at once, so the window must cover more than one round
        // trip of its processing.
        const WINDOW: usize = 64;
        const WINDOW_BYTES: usize = 8 << 20;
        let mut sent = 0;
        let mut done = 0;
        // Written and awaiting replies: where each message ends in the
        // octets written ([`Session::written`]).
        let mut written: Vec<Option<u64>> = vec![None; msgs.len()];
        // On a lost connection: a message whose end reached the upstream
        // may have been taken (RFC 1047); one whose end did not cannot
        // have been, and stays due.
        let lost = |sess: &Session,
                    report: &mut Report<'_>,
                    written: &[Option<u64>],
                    from: usize,
                    e: &LinkError| {
            for (i, w) in written.iter().enumerate().skip(from) {
                if let Some(end) = *w {
                    (report.outcome)(i, vec![sess.lost_at(end, e); msgs[i].recipients.len()]);
                }
            }
        };
        while done < msgs.len() {
            if done == sent && report.stopping() {
                return Ok(());
            }
            let mut buf = Vec::new();
            let mut in_buf = Vec::new();
            let in_flight: usize = (done..sent)
                .filter(|&i| written[i].is_some())
                .map(|i| msgs[i].body.len())
                .sum();
            let base = self.written();
            while sent < msgs.len()
                && !report.stopping()
                && sent - done < WINDOW
                && buf.len() < (1 << 20)
                && (in_flight + buf.len() < WINDOW_BYTES || sent == done)
            {
                let m = msgs[sent];
                if let Some(r) = self.refuse_before_sending(m) {
                    (report.outcome)(sent, vec![Outcome::Bounced(r); m.recipients.len()]);
                } else {
                    buf.extend_from_slice(&self.envelope(m, true));
                    buf.extend_from_slice(&m.body);
                    in_buf.push((sent, base + buf.len() as u64));
                }
                sent += 1;
            }
            if !buf.is_empty() {
                for &(i, end) in &in_buf {
                    written[i] = Some(end);
                }
                if let Err(e) = self.write(&buf, "sending messages").await {
                    lost(self, report, &written, done, &e);
                    return Err(e);
                }
            }
            // Read the replies of the oldest messages in flight.
            while done < sent {
                if written[done].is_none() {
                    done += 1;
                    continue;
                }
                let m = msgs[done];
                let replies = async {
                    let mail = self.read_reply("MAIL").await?;
                    let mut rcpt = Vec::with_capacity(m.recipients.len());
                    for _ in &m.recipients {
                        rcpt.push(self.read_reply("RCPT").await?);
                    }
                    let last = self.read_final_reply().await?;
                    Ok::<_, LinkError>((mail, rcpt, last))
                };
                let (mail, rcpt, last) = match replies.await {
                    Ok(r) => r,
                    Err(e) => {
                        lost(self, report, &written, done, &e);
                        return Err(e);
                    }
                };
                written[done] = None;
                if let Some(e) = self.closing(&mail, &rcpt, &last) {
                    // 421: the upstream is going away; this message was not
                    // refused, and what follows it was never looked at.
                    lost(self, report, &written, done + 1, &e);
                    return Err(e);
                }
                (report.outcome)(done, outcomes(&mail, &rcpt, Some(&last)));
                done += 1;
                if sent < msgs.len() && !report.stopping() {
                    break; // refill the window
                }
            }
        }
        Ok(())
    }

    /// What became of a message ending at `end` (in the octets written)
    /// when the connection failed with `e`: uncertain if its end may have
    /// reached the upstream (RFC 1047), else untouched and still due.
    fn lost_at(&self, end: u64, e: &LinkError) -> Outcome {
        if self.never_reached(end) {
            Outcome::Untouched
        } else {
            Outcome::Uncertain(e.to_string())
        }
    }

    /// A 421 anywhere in a transaction's replies: the server is closing.
    fn closing(
        &self,
        mail: &UpstreamReply,
        rcpt: &[UpstreamReply],
        last: &UpstreamReply,
    ) -> Option<LinkError> {
        std::iter::once(mail)
            .chain(rcpt)
            .chain(std::iter::once(last))
            .find(|r| r.code == 421)
            .map(|r| LinkError::Closing {
                addr: self.addr.clone(),
                reply: r.clone(),
            })
    }

    /// DATA, pipelined when offered: the next message's MAIL/RCPT/DATA are
    /// sent right behind the final dot.
    async fn send_data(
        &mut self,
        msgs: &[&Outgoing],
        report: &mut Report<'_>,
    ) -> Result<(), LinkError> {
        let pipelining = self.ext.pipelining;
        // The envelope of message `i` already sent and awaiting replies.
        let mut pending: Option<usize> = None;
        let mut i = 0;
        loop {
            let idx = match pending.take() {
                Some(p) => p,
                None => {
                    if report.stopping() {
                        return Ok(());
                    }
                    // Skip messages refused before sending.
                    while i < msgs.len() {
                        if let Some(r) = self.refuse_before_sending(msgs[i]) {
                            (report.outcome)(
                                i,
                                vec![Outcome::Bounced(r); msgs[i].recipients.len()],
                            );
                            i += 1;
                        } else {
                            break;
                        }
                    }
                    if i >= msgs.len() {
                        return Ok(());
                    }
                    if pipelining {
                        let env = self.envelope(msgs[i], false);
                        self.write(&env, "MAIL").await?;
                    }
                    i += 1;
                    i - 1
                }
            };
            let m = msgs[idx];
            let (mail, rcpt, data) = if pipelining {
                let mail = self.read_reply("MAIL").await?;
                let mut rcpt = Vec::new();
                for _ in &m.recipients {
                    rcpt.push(self.read_reply("RCPT").await?);
                }
                (mail, rcpt, self.read_reply("DATA").await?)
            } else {
                let env = self.envelope(m, false);
                let text = String::from_utf8_lossy(&env).into_owned();
                let mut lines = text.split_inclusive("\r\n");
                let mail = self.command(lines.next().unwrap_or(""), "MAIL").await?;
                let mut rcpt = Vec::new();
                if mail.class() == 2 {
                    for _ in &m.recipients {
                        rcpt.push(self.command(lines.next().unwrap_or(""), "RCPT").await?);
                    }
                } else {
                    rcpt = vec![mail.clone(); m.recipients.len()];
                }
                let any = rcpt.iter().any(|r| r.class() == 2);
                let data = if mail.class() == 2 && any {
                    self.command("DATA\r\n", "DATA").await?
                } else {
                    UpstreamReply {
                        code: 554,
                        text: "5.5.1 no valid recipients (DATA not sent)".into(),
                    }
                };
                (mail, rcpt, data)
            };
            if let Some(e) = self.closing(&mail, &rcpt, &data) {
                return Err(e);
            }
            if data.code != 354 {
                (report.outcome)(idx, outcomes(&mail, &rcpt, Some(&data)));
                // The transaction is not open any more at most servers;
                // RSET makes sure before the next MAIL.
                if mail.class() == 2 {
                    let r = self.command("RSET\r\n", "RSET").await?;
                    if r.class() != 2 {
                        return Err(LinkError::Closing {
                            addr: self.addr.clone(),
                            reply: r,
                        });
                    }
                }
                continue;
            }
            let mut buf = crate::dotstuff::dot_stuff(&m.body);
            buf.extend_from_slice(b".\r\n");
            // Where the dot ends in the octets written.
            let end = self.written() + buf.len() as u64;
            // Behind the dot: the next message's envelope (RFC 2920 §3.1).
            let mut next = None;
            if pipelining && !report.stopping() {
                while i < msgs.len() {
                    if let Some(r) = self.refuse_before_sending(msgs[i]) {
                        (report.outcome)(i, vec![Outcome::Bounced(r); msgs[i].recipients.len()]);
                        i += 1;
                    } else {
                        buf.extend_from_slice(&self.envelope(msgs[i], false));
                        next = Some(i);
                        i += 1;
                        break;
                    }
                }
            }
            if let Err(e) = self.write(&buf, "sending a message").await {
                // Uncertain if the dot may have reached the upstream; else
                // the message stays due.
                (report.outcome)(idx, vec![self.lost_at(end, &e); m.recipients.len()]);
                return Err(e);
            }
            match self.read_final_reply().await {
                Ok(last) if last.code == 421 => {
                    // Refused while closing: not taken, try again later.
                    return Err(LinkError::Closing {
                        addr: self.addr.clone(),
                        reply: last,
                    });
                }
                Ok(last) => (report.outcome)(idx, outcomes(&mail, &rcpt, Some(&last))),
                Err(e) => {
                    (report.outcome)(idx, vec![self.lost_at(end, &e); m.recipients.len()]);
                    return Err(e);
                }
            }
            pending = next;
        }
    }
}

/// Outcomes per recipient from the replies of one transaction.
fn outcomes(
    mail: &UpstreamReply,
    rcpt: &[UpstreamReply],
    last: Option<&UpstreamReply>,
) -> Vec<Outcome> {
    let by_class = |r: &UpstreamReply| match r.class() {
        2 => Outcome::Delivered(r.clone()),
        4 => Outcome::Deferred(r.clone()),
        _ => Outcome::Bounced(r.clone()),
    };
    if mail.class() != 2 {
        return rcpt.iter().map(|_| by_class(mail)).collect();
    }
    rcpt.iter()
        .map(|r| {
            if r.class() != 2 {
                return by_class(r);
            }
            match last {
                Some(l) => by_class(l),
                None => Outcome::Untouched,
            }
        })
        .collect()
}

/// xtext (RFC 3461 §4): `+`, `=`, controls and non-ASCII as +XX.
fn xtext(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_recipient_outcomes() {
        let ok = UpstreamReply {
            code: 250,
            text: "2.0.0 ok".into(),
        };
        let defer = UpstreamReply {
            code: 451,
            text: "4.3.0 later".into(),
        };
        let no = UpstreamReply {
            code: 550,
            text: "5.1.1 no".into(),
        };
        let out = outcomes(&ok, &[ok.clone(), defer.clone(), no.clone()], Some(&ok));
        assert_eq!(
            out,
            vec![
                Outcome::Delivered(ok.clone()),
                Outcome::Deferred(defer.clone()),
                Outcome::Bounced(no.clone())
            ]
        );
        let out = outcomes(&defer, &[ok.clone(), ok.clone()], None);
        assert_eq!(out, vec![Outcome::Deferred(defer.clone()); 2]);
        assert_eq!(no.status(), Some("5.1.1"));
        assert_eq!(
            UpstreamReply {
                code: 250,
                text: "ok".into()
            }
            .status(),
            None
        );
    }

    #[test]
    fn xtext_encoding() {
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
    }
}
