//! Every reply the SMTP server sends, in one place. Each carries an RFC 3463
//! enhanced status code (RFC 2034), and its text says what to do about it.

use std::borrow::Cow;

pub use crate::codec::Reply;

pub fn greeting(host: &str) -> Reply {
    Reply::multi(220, vec![format!("{host} ESMTP outpost").into()])
}

/// EHLO's answer: the greeting line, then the keywords.
pub fn ehlo(lines: Vec<Cow<'static, str>>) -> Reply {
    Reply::multi(250, lines)
}
pub fn auth_challenge(text: &'static str) -> Reply {
    Reply::new(334, "", text)
}
pub fn auth_line_too_long() -> Reply {
    Reply::new(500, "5.5.6", "Authentication exchange line is too long")
}
pub fn syntax_hint(syntax: &str) -> Reply {
    Reply::new(501, "5.5.4", format!("Syntax: {syntax}"))
}
pub fn bad_sender_address() -> Reply {
    Reply::new(553, "5.1.7", "Invalid sender address")
}
pub fn bad_recipient_address() -> Reply {
    Reply::new(553, "5.1.3", "Invalid recipient address")
}
pub fn sender_not_an_address() -> Reply {
    Reply::new(553, "5.1.7", "Sender address must be user@domain or <>")
}

pub fn ok() -> Reply {
    Reply::new(250, "2.0.0", "Ok")
}
pub fn sender_ok() -> Reply {
    Reply::new(250, "2.1.0", "Sender ok")
}
pub fn recipient_ok() -> Reply {
    Reply::new(250, "2.1.5", "Recipient ok")
}
pub fn queued(id: &str) -> Reply {
    Reply::new(250, "2.0.0", format!("Ok: queued as {id}"))
}
pub fn bye(host: &str) -> Reply {
    Reply::new(221, "2.0.0", format!("{host} closing connection"))
}
pub fn start_data() -> Reply {
    Reply::new(354, "", "End data with <CR><LF>.<CR><LF>")
}
pub fn bdat_ok(n: usize) -> Reply {
    Reply::new(250, "2.0.0", format!("{n} octets received"))
}
pub fn ready_tls() -> Reply {
    Reply::new(220, "2.0.0", "Ready to start TLS")
}
pub fn auth_ok() -> Reply {
    Reply::new(235, "2.7.0", "Authentication successful")
}
pub fn vrfy() -> Reply {
    Reply::new(
        252,
        "2.5.0",
        "Cannot verify the user, but will accept the message and attempt delivery",
    )
}
pub fn expn() -> Reply {
    Reply::new(502, "5.5.1", "EXPN is not available here")
}
pub fn help() -> Reply {
    Reply::new(
        214,
        "2.0.0",
        "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY STARTTLS AUTH",
    )
}

// ---- sequence and syntax ----------------------------------------------------

pub fn syntax(text: &'static str) -> Reply {
    Reply::new(501, "5.5.4", text)
}
pub fn unknown_command() -> Reply {
    Reply::new(500, "5.5.1", "Unknown command")
}
pub fn line_too_long() -> Reply {
    Reply::new(
        500,
        "5.5.2",
        "Command line too long (512 octets at most, RFC 5321 §4.5.3.1.4)",
    )
}
pub fn bare_lf_in_command() -> Reply {
    Reply::new(
        500,
        "5.5.2",
        "Command lines must end with CRLF, not a bare LF or CR",
    )
}
pub fn nul_in_command() -> Reply {
    Reply::new(500, "5.5.2", "NUL octets are not allowed in commands")
}
pub fn non_ascii_address() -> Reply {
    Reply::new(
        553,
        "5.6.7",
        "Non-ASCII address: send MAIL FROM with SMTPUTF8 to use one",
    )
}
pub fn http_refused() -> Reply {
    Reply::new(500, "5.5.1", "This is an SMTP server, not a web server")
}
pub fn need_helo() -> Reply {
    Reply::new(503, "5.5.1", "Send EHLO (or HELO) first")
}
pub fn need_mail() -> Reply {
    Reply::new(503, "5.5.1", "Send MAIL FROM first")
}
pub fn nested_mail() -> Reply {
    Reply::new(
        503,
        "5.5.1",
        "A transaction is open already: finish it or send RSET",
    )
}
pub fn need_rcpt() -> Reply {
    Reply::new(554, "5.5.1", "No valid recipients")
}
pub fn bdat_in_progress() -> Reply {
    Reply::new(
        503,
        "5.5.1",
        "A BDAT transfer is in progress: finish it with BDAT LAST, or send RSET",
    )
}
pub fn too_many_errors() -> Reply {
    Reply::new(421, "4.7.0", "Too many errors, closing connection")
}
pub fn too_many_rcpt_errors() -> Reply {
    Reply::new(
        421,
        "4.7.0",
        "Too many errors and refused recipients, closing connection",
    )
}
pub fn tls_already() -> Reply {
    Reply::new(503, "5.5.1", "TLS is already active")
}
pub fn tls_unavailable() -> Reply {
    Reply::new(
        454,
        "4.7.0",
        "TLS not available: no certificate is configured",
    )
}
pub fn chunking_pipelined_starttls() -> Reply {
    Reply::new(
        503,
        "5.5.1",
        "STARTTLS during a transaction: send RSET first",
    )
}

// ---- ETRN (RFC 1985) -------------------------------------------------------

pub fn etrn_started(name: &str, n: i64) -> Reply {
    Reply::new(
        253,
        "2.0.0",
        format!("OK, {n} pending messages for node {name} started"),
    )
}
pub fn etrn_nothing(name: &str) -> Reply {
    Reply::new(
        251,
        "2.0.0",
        format!("OK, no messages waiting for node {name}"),
    )
}
/// CHECKPOINT (RFC 1845): the transaction resumes after `offset` octets.
pub fn checkpoint_offset(offset: i64) -> Reply {
    Reply {
        code: 355,
        status: "",
        lines: vec![format!("{offset} is the transaction offset").into()],
    }
}
/// A resumed transaction that was already committed.
pub fn already_queued(id: &str) -> Reply {
    Reply::new(
        250,
        "2.0.0",
        format!("Ok: queued as {id} (already, before the link broke)"),
    )
}

/// ODMR (RFC 2645) replies.
pub fn odmr_only() -> Reply {
    Reply::new(
        502,
        "5.5.1",
        "This is an ODMR port: EHLO, STARTTLS, AUTH, ATRN and QUIT only",
    )
}
pub fn atrn_auth_required() -> Reply {
    Reply::new(530, "5.7.0", "Authentication required before ATRN")
}
pub fn atrn_refused(why: String) -> Reply {
    Reply::new(450, "4.7.1", format!("ATRN request refused: {why}"))
}
pub fn atrn_unavailable() -> Reply {
    Reply::new(451, "4.3.0", "Unable to process ATRN request now")
}
pub fn atrn_no_mail() -> Reply {
    Reply::new(453, "4.0.0", "You have no mail")
}
pub fn atrn_turning(messages: i64, domains: &str) -> Reply {
    Reply::new(
        250,
        "2.0.0",
        format!("OK, turning the connection around for {messages} held messages ({domains})"),
    )
}
pub fn etrn_not_for_account(name: &str, account: &str) -> Reply {
    Reply::new(
        459,
        "4.7.1",
        format!("Node {name} not allowed: account {account} may release only its own domains ([hub.odmr])"),
    )
}

pub fn etrn_not_allowed(name: &str) -> Reply {
    Reply::new(
        459,
        "4.7.1",
        format!("Node {name} not allowed: ETRN only from hub.etrn_networks or after AUTH"),
    )
}
pub fn etrn_not_held(name: &str) -> Reply {
    Reply::new(
        459,
        "4.7.1",
        format!("Node {name} not allowed: no mail is held here for it"),
    )
}
pub fn etrn_no_queues(name: &str) -> Reply {
    Reply::new(
        458,
        "4.5.0",
        format!(
            "Unable to queue messages for {name}: queue names are not used here, ask by domain"
        ),
    )
}
pub fn etrn_failed(name: &str) -> Reply {
    Reply::new(
        458,
        "4.3.0",
        format!("Unable to queue messages for node {name}: try again later"),
    )
}
pub fn etrn_in_transaction() -> Reply {
    Reply::new(
        503,
        "5.5.1",
        "ETRN is not allowed during a mail transaction",
    )
}

// ---- limits -----------------------------------------------------------------

pub fn too_big_declared(limit: u64) -> Reply {
    Reply::new(
        552,
        "5.3.4",
        format!("Message size exceeds the limit of {limit} octets"),
    )
}
pub fn too_big(limit: usize) -> Reply {
    Reply::new(
        552,
        "5.3.4",
        format!("Message size exceeds the limit of {limit} octets; nothing was queued"),
    )
}
pub fn too_many_recipients(max: usize) -> Reply {
    Reply::new(
        452,
        "4.5.3",
        format!(
            "Too many recipients (at most {max} per message); send the rest in another message"
        ),
    )
}
pub fn timeout() -> Reply {
    Reply::new(
        421,
        "4.4.2",
        "Timeout waiting for the client, closing connection",
    )
}
pub fn session_too_long() -> Reply {
    Reply::new(
        421,
        "4.4.2",
        "Session time limit reached, closing connection; nothing unfinished was queued",
    )
}
pub fn too_many_connections() -> Reply {
    Reply::new(421, "4.7.0", "Too many connections, try again later")
}
pub fn too_many_from_you() -> Reply {
    Reply::new(
        421,
        "4.7.0",
        "Too many connections from your address, try again later",
    )
}
pub fn shutting_down(host: &str) -> Reply {
    Reply::new(
        421,
        "4.3.2",
        format!("{host} shutting down, try again later"),
    )
}

// ---- content ----------------------------------------------------------------

pub fn bare_lf() -> Reply {
    Reply::new(
        550,
        "5.5.2",
        "Message refused: it contains a bare LF; lines must end with CRLF (RFC 5321 §2.3.8), nothing was queued",
    )
}
pub fn bare_cr() -> Reply {
    Reply::new(
        550,
        "5.5.2",
        "Message refused: it contains a bare CR; lines must end with CRLF (RFC 5321 §2.3.8), nothing was queued",
    )
}
pub fn nul_in_data() -> Reply {
    Reply::new(
        554,
        "5.6.0",
        "Message refused: it contains NUL octets; nothing was queued",
    )
}
pub fn data_line_too_long(max: usize) -> Reply {
    Reply::new(
        554,
        "5.6.0",
        format!("Message refused: a line is longer than {max} octets; nothing was queued"),
    )
}
/// RFC 3463 X.4.6: routing loop detected.
pub fn too_many_hops(max: usize) -> Reply {
    Reply::new(
        554,
        "5.4.6",
        format!(
            "Message refused: more than {max} Received headers, it is probably in a mail loop; nothing was queued"
        ),
    )
}

// ---- policy -----------------------------------------------------------------

pub fn relay_denied() -> Reply {
    Reply::new(
        554,
        "5.7.1",
        "Relaying denied: your address is not in relay.networks; authenticate on the submission port to send outside",
    )
}
pub fn unknown_user() -> Reply {
    Reply::new(550, "5.1.1", "No such user here")
}
pub fn mailbox_full() -> Reply {
    Reply::new(
        452,
        "4.2.2",
        "Mailbox full: the user must make room; try again later",
    )
}
pub fn bad_address() -> Reply {
    Reply::new(
        553,
        "5.1.3",
        "Address not accepted: use a plain user@domain address",
    )
}
pub fn auth_required() -> Reply {
    Reply::new(
        530,
        "5.7.0",
        "Authentication required: AUTH before MAIL on this port",
    )
}
pub fn encryption_required() -> Reply {
    Reply::new(
        538,
        "5.7.11",
        "Encryption required for requested authentication mechanism: STARTTLS first",
    )
}
pub fn auth_failed() -> Reply {
    Reply::new(535, "5.7.8", "Authentication credentials invalid")
}
pub fn auth_too_many() -> Reply {
    Reply::new(
        421,
        "4.7.0",
        "Too many failed authentications, closing connection",
    )
}
pub fn auth_blocked(left: std::time::Duration) -> Reply {
    Reply::new(
        454,
        "4.7.0",
        format!(
            "Too many failed logins from your address; try again in {} minutes",
            left.as_secs().div_ceil(60)
        ),
    )
}
pub fn auth_already() -> Reply {
    Reply::new(503, "5.5.1", "Already authenticated")
}
pub fn auth_mechanism() -> Reply {
    Reply::new(
        504,
        "5.5.4",
        "Unsupported authentication mechanism: use PLAIN or LOGIN",
    )
}
pub fn auth_cancelled() -> Reply {
    Reply::new(501, "5.0.0", "Authentication cancelled")
}
pub fn auth_bad_base64() -> Reply {
    Reply::new(
        501,
        "5.5.2",
        "Cannot decode the response: it must be base64",
    )
}
pub fn auth_not_offered() -> Reply {
    Reply::new(503, "5.5.1", "AUTH is not offered on this connection")
}
pub fn auth_in_transaction() -> Reply {
    Reply::new(503, "5.5.1", "AUTH is not allowed during a transaction")
}
/// `param` is the client's own text: echoed as printable ASCII (RFC 5321
/// §4.2: reply text is), other octets as `?`, and cut, so that a reply
/// never carries control characters or runs over 512 octets.
pub fn smtputf8_unsupported_param(param: &str) -> Reply {
    const MAX: usize = 64;
    let mut shown: String = param
        .chars()
        .take(MAX)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    if param.chars().count() > MAX {
        shown.push_str("...");
    }
    Reply::new(555, "5.5.4", format!("Unsupported parameter {shown}"))
}
pub fn bad_param(text: String) -> Reply {
    Reply::new(501, "5.5.4", text)
}

// ---- failures on our side ---------------------------------------------------

pub fn store_failed() -> Reply {
    Reply::new(
        451,
        "4.3.0",
        "Local error in storing the message; try again later",
    )
}
pub fn store_full() -> Reply {
    Reply::new(452, "4.3.1", "Insufficient system storage; try again later")
}
/// RFC 3463 X.4.6: the name's aliases loop (or nest too deep).
pub fn alias_loop() -> Reply {
    Reply::new(
        550,
        "5.4.6",
        "Mail for this name cannot be delivered: its aliases loop or nest too deeply; the postmaster has to correct them",
    )
}
/// RFC 1870 §6.1: SIZE= more than there is room for now.
pub fn no_room_for(declared: u64) -> Reply {
    Reply::new(
        452,
        "4.3.1",
        format!(
            "Insufficient system storage for a message of {declared} octets now; try again later"
        ),
    )
}
pub fn temp_lookup_failed() -> Reply {
    Reply::new(451, "4.3.0", "Temporary lookup failure; try again later")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form() {
        let mut out = Vec::new();
        queued("ABC").write_to(&mut out);
        assert_eq!(out, b"250 2.0.0 Ok: queued as ABC\r\n");
        let mut out = Vec::new();
        Reply::multi(250, vec!["host".into(), "PIPELINING".into()]).write_to(&mut out);
        assert_eq!(out, b"250-host\r\n250 PIPELINING\r\n");
    }

    /// Found by the `smtp_command` fuzz target: an unknown MAIL parameter
    /// was echoed with its control characters (here ^C), and a long one
    /// made a reply line over 512 octets.
    #[test]
    fn unsupported_parameters_are_echoed_printable_and_short() {
        let mut line = b"MAIL FROM:<> RET=HDRS ENOID\x03=abc123 BODY=8BITMIME".to_vec();
        let r = crate::smtp::session::parse_command(&mut line).unwrap_err();
        assert_eq!(r.code, 555);
        assert_eq!(r.lines, ["Unsupported parameter ENOID?=ABC123"]);
        let mut line = format!("MAIL FROM:<> X{}=1", "Y".repeat(480)).into_bytes();
        let r = crate::smtp::session::parse_command(&mut line).unwrap_err();
        assert_eq!(r.code, 555);
        let mut out = Vec::new();
        r.write_to(&mut out);
        assert!(out.len() <= 512, "{} octets", out.len());
        assert!(!out[..out.len() - 2].iter().any(|&b| b < 0x20 || b == 0x7f));
    }
}
