//! `outpost sendmail`, and the binary invoked as `sendmail` or `mailq`.
//!
//! The message goes to the running daemon over the local submission socket
//! (`submit.socket`) as an SMTP session, so any local user can send without
//! access to the store. With no daemon, the same SMTP session runs inside
//! this process against the store, when this user may write it.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use super::exit;
use crate::address::smtp_path;
use crate::config::Config;
use crate::queue::{Store, Writer};
use crate::server::local_listen;
use crate::shared::{Peer, Phase, Shared, Triggers};
use crate::smtp::session::Session;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Read a message from stdin and submit it (the default, `-bm`).
    Deliver,
    /// `-bs`: SMTP on stdin and stdout.
    Smtp,
    /// `-bp`: list the queue (`mailq`).
    ListQueue,
    /// `-q`: flush now.
    Flush,
    /// `-bi`: rebuild aliases; nothing to do here.
    NewAliases,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub mode: Mode,
    /// `-t`: recipients from To, Cc and Bcc; Bcc removed.
    pub extract: bool,
    /// `-i`, `-oi`: a line with a single dot does not end the message.
    pub ignore_dots: bool,
    pub from: Option<String>,
    pub full_name: Option<String>,
    pub recipients: Vec<String>,
    /// `-C FILE`: the configuration file.
    pub config: Option<PathBuf>,
}

/// Parses sendmail's options the way programs use them. Options sendmail
/// accepts and that change nothing here are accepted and ignored.
pub fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        mode: Mode::Deliver,
        extract: false,
        ignore_dots: false,
        from: None,
        full_name: None,
        recipients: Vec::new(),
        config: None,
    };
    let mut it = args.iter().peekable();
    // The value of an option: glued ("-ffoo") or the next argument.
    fn value<'a>(
        glued: &str,
        it: &mut std::iter::Peekable<std::slice::Iter<'a, String>>,
        opt: &str,
    ) -> Result<String, String> {
        if !glued.is_empty() {
            return Ok(glued.to_string());
        }
        it.next()
            .cloned()
            .ok_or_else(|| format!("option -{opt} needs a value"))
    }
    while let Some(arg) = it.next() {
        if arg == "--" {
            a.recipients.extend(it.by_ref().cloned());
            break;
        }
        let Some(opt) = arg.strip_prefix('-').filter(|o| !o.is_empty()) else {
            a.recipients.push(arg.clone());
            continue;
        };
        let (flag, rest) = opt.split_at(1);
        match flag {
            "t" => a.extract = true,
            "i" => a.ignore_dots = true,
            "f" | "r" => a.from = Some(value(rest, &mut it, flag)?),
            "F" => a.full_name = Some(value(rest, &mut it, flag)?),
            "C" => a.config = Some(PathBuf::from(value(rest, &mut it, flag)?)),
            "o" => {
                // -oi, or -oX options that do not matter here (-oem, -odi...).
                if rest == "i" {
                    a.ignore_dots = true;
                }
            }
            "b" => match rest {
                "m" => a.mode = Mode::Deliver,
                "s" => a.mode = Mode::Smtp,
                "p" => a.mode = Mode::ListQueue,
                "i" => a.mode = Mode::NewAliases,
                other => {
                    return Err(format!(
                        "-b{other} is not supported (use -bm, -bs, -bp or -bi)"
                    ))
                }
            },
            "q" => a.mode = Mode::Flush,
            // Options with a value that change nothing here.
            "B" | "N" | "R" | "V" | "L" | "X" | "h" | "O" => {
                let _ = value(rest, &mut it, flag)?;
            }
            // Flags that change nothing here.
            "v" | "U" | "G" | "n" | "m" | "e" | "x" | "A" => {}
            other => return Err(format!("unknown option -{other}")),
        }
    }
    a.recipients = a
        .recipients
        .iter()
        .flat_map(|r| r.split(','))
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .collect();
    // A CR or LF would end the line they go on (MAIL FROM, RCPT TO, the
    // From: header) and start another that the caller chose: refused,
    // like every other control character.
    let named = a
        .from
        .iter()
        .map(|f| ("the sender (-f)", f))
        .chain(a.full_name.iter().map(|n| ("the full name (-F)", n)))
        .chain(a.recipients.iter().map(|r| ("a recipient", r)));
    for (what, value) in named {
        if value.chars().any(char::is_control) {
            return Err(format!(
                "{what} \"{}\" contains a control character (such as CR or LF); refused",
                value.escape_debug()
            ));
        }
    }
    Ok(a)
}

/// The message as submitted: CRLF line ends, the header fields a message
/// needs added when missing, Bcc removed with `-t`. Returns the message and
/// the recipients named in To, Cc and Bcc (used with `-t`).
pub fn prepare(
    input: &[u8],
    args: &Args,
    sender: &str,
    hostname: &str,
    id: &str,
) -> (Vec<u8>, Vec<String>) {
    // Lines, without their ends; a lone "." ends the input unless -i.
    let text = input.strip_suffix(b"\n").unwrap_or(input);
    let mut lines: Vec<&[u8]> = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !args.ignore_dots && line == b"." {
            break;
        }
        lines.push(line);
    }
    let header_end = lines
        .iter()
        .position(|l| l.is_empty())
        .unwrap_or(lines.len());
    // Header fields, each with its continuation lines.
    let mut fields: Vec<Vec<&[u8]>> = Vec::new();
    for l in &lines[..header_end] {
        match (l.first(), fields.last_mut()) {
            (Some(b' ' | b'\t'), Some(f)) => f.push(l),
            _ => fields.push(vec![l]),
        }
    }
    let name_of = |f: &Vec<&[u8]>| -> String {
        let first = String::from_utf8_lossy(f[0]).to_string();
        first
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    };
    let mut recipients = Vec::new();
    for f in &fields {
        if matches!(name_of(f).as_str(), "to" | "cc" | "bcc") {
            let value: String = f
                .iter()
                .map(|l| String::from_utf8_lossy(l).to_string())
                .collect::<Vec<_>>()
                .join(" ");
            let value = value.split_once(':').map(|(_, v)| v).unwrap_or("");
            recipients.extend(addresses(value));
        }
    }
    let has = |name: &str| fields.iter().any(|f| name_of(f) == name);
    let mut out = Vec::with_capacity(input.len() + 256);
    if !has("from") {
        let from = match &args.full_name {
            Some(n) => format!("From: {} <{sender}>\r\n", quote_phrase(n)),
            None => format!("From: {sender}\r\n"),
        };
        out.extend_from_slice(from.as_bytes());
    }
    if !has("date") {
        out.extend_from_slice(
            format!("Date: {}\r\n", chrono::Local::now().to_rfc2822()).as_bytes(),
        );
    }
    if !has("message-id") {
        out.extend_from_slice(format!("Message-ID: <{id}@{hostname}>\r\n").as_bytes());
    }
    for f in &fields {
        if args.extract && matches!(name_of(f).as_str(), "bcc" | "resent-bcc") {
            continue;
        }
        for l in f {
            out.extend_from_slice(l);
            out.extend_from_slice(b"\r\n");
        }
    }
    for l in &lines[header_end..] {
        out.extend_from_slice(l);
        out.extend_from_slice(b"\r\n");
    }
    (out, recipients)
}

/// The addresses in a To, Cc or Bcc field's value (`a@b, "X" <c@d>,
/// group: e@f;`, with comments and encoded names), read by mail-parser.
fn addresses(value: &str) -> Vec<String> {
    let field = format!("To:{value}\r\n\r\n");
    let Some(message) = mail_parser::MessageParser::default().parse(field.as_bytes()) else {
        return Vec::new();
    };
    message
        .to()
        .map(|list| {
            list.iter()
                .filter_map(|a| a.address())
                .filter(|a| a.contains('@'))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// An address as outpost keeps it: a quoted local part (`"john doe"@x`,
/// as written in a header or on the command line) without its quotes, so
/// that it is quoted once, not twice, on the way out.
fn unquoted(address: &str) -> String {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return address.to_string();
    };
    let Some(inner) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) else {
        return address.to_string();
    };
    let mut out = String::with_capacity(address.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' {
            chars.next().unwrap_or(c)
        } else {
            c
        });
    }
    format!("{out}@{domain}")
}

fn quote_phrase(name: &str) -> String {
    if name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || " .-_'".contains(c))
    {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// The uid of this process.
fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The login name of `uid`, through the system's name service (local
/// files, LDAP, ...), else $USER.
fn user_name(uid: u32) -> String {
    uzers::get_user_by_uid(uid)
        .map(|u| u.name().to_string_lossy().into_owned())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| format!("uid{uid}"))
}

/// Why a submission failed, and the sysexits code for it.
struct Failure {
    code: u8,
    message: String,
}

fn failed(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// One SMTP submission over `stream`; returns the queue id.
async fn submit<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    sender: &str,
    recipients: &[String],
    message: &[u8],
) -> Result<(String, Vec<String>), Failure> {
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::new(r);
    async fn reply<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<(u16, String), Failure> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)
                .await
                .map_err(|e| failed(exit::TEMPFAIL, e.to_string()))?
                == 0
            {
                return Err(failed(exit::TEMPFAIL, "the server closed the connection"));
            }
            text.push_str(line.trim_end());
            if line.as_bytes().get(3) != Some(&b'-') {
                let code = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                return Ok((code, text));
            }
            text.push(' ');
        }
    }
    async fn send<W: AsyncWriteExt + Unpin>(w: &mut W, line: &str) -> Result<(), Failure> {
        w.write_all(line.as_bytes())
            .await
            .map_err(|e| failed(exit::TEMPFAIL, e.to_string()))
    }
    let class = |code: u16| {
        if code / 100 == 4 {
            exit::TEMPFAIL
        } else {
            exit::UNAVAILABLE
        }
    };
    let (code, text) = reply(&mut r).await?;
    if code != 220 {
        return Err(failed(class(code), text));
    }
    send(&mut w, "EHLO localhost\r\n").await?;
    let (code, text) = reply(&mut r).await?;
    if code != 250 {
        return Err(failed(class(code), text));
    }
    // Written as RFC 5321 paths: a local part that needs quoting is
    // quoted, so an address cannot end the path early or add parameters.
    let path = |a: &str| {
        smtp_path(a).ok_or_else(|| {
            failed(
                exit::DATAERR,
                format!(
                    "<{}> cannot be written as an SMTP address (control characters or a bad domain)",
                    a.escape_debug()
                ),
            )
        })
    };
    let sender_path = path(sender)?;
    let smtputf8 = if sender.is_ascii() && recipients.iter().all(|r| r.is_ascii()) {
        ""
    } else {
        " SMTPUTF8"
    };
    let body = if message.iter().any(|&b| b >= 0x80) {
        " BODY=8BITMIME"
    } else {
        ""
    };
    send(
        &mut w,
        &format!("MAIL FROM:<{sender_path}>{body}{smtputf8}\r\n"),
    )
    .await?;
    let (code, text) = reply(&mut r).await?;
    if code != 250 {
        return Err(failed(class(code), format!("sender <{sender}>: {text}")));
    }
    let mut refused = Vec::new();
    let mut accepted = 0;
    for rcpt in recipients {
        let Ok(rcpt_path) = path(rcpt) else {
            refused.push(format!(
                "<{}>: cannot be written as an SMTP address (control characters or a bad domain)",
                rcpt.escape_debug()
            ));
            continue;
        };
        send(&mut w, &format!("RCPT TO:<{rcpt_path}>\r\n")).await?;
        let (code, text) = reply(&mut r).await?;
        if code / 100 == 2 {
            accepted += 1;
        } else {
            refused.push(format!("<{rcpt}>: {text}"));
        }
    }
    if accepted == 0 {
        let code = if refused.iter().any(|t| t.contains(": 4")) {
            exit::TEMPFAIL
        } else {
            exit::NOUSER
        };
        return Err(failed(code, refused.join("\n")));
    }
    send(&mut w, "DATA\r\n").await?;
    let (code, text) = reply(&mut r).await?;
    if code != 354 {
        return Err(failed(class(code), text));
    }
    let mut data = crate::smtp::data::dot_stuff(message);
    data.extend_from_slice(b".\r\n");
    w.write_all(&data)
        .await
        .map_err(|e| failed(exit::TEMPFAIL, e.to_string()))?;
    let (code, text) = reply(&mut r).await?;
    if code != 250 {
        return Err(failed(class(code), text));
    }
    let _ = send(&mut w, "QUIT\r\n").await;
    let id = text.rsplit(' ').next().unwrap_or("").to_string();
    Ok((id, refused))
}

/// The in-process server, for when no daemon listens: the same SMTP session
/// the daemon would run, against the store directly.
fn local_server(config: &Config) -> Result<(Arc<Shared>, crate::queue::WriterThread), String> {
    let store = Store::open(&config.store.path).map_err(|e| e.to_string())?;
    // Only write where we may: opening does not prove it for an existing file.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&config.store.path)
        .map_err(|e| format!("{}: {e}", config.store.path.display()))?;
    let (writer, thread) = Writer::start(&config.store.path).map_err(|e| e.to_string())?;
    let shared = Shared::new(
        Arc::new(config.clone()),
        Arc::new(store),
        writer,
        None,
        Triggers::default(),
    );
    Ok((Arc::new(shared), thread))
}

/// Submits as `args` say. `unread`: why the configuration could not be
/// read, when `config` is the defaults instead; then only the default
/// submission socket is tried, and a failure names both causes.
pub fn run(config: &Config, args: &Args, unread: Option<&str>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sendmail: cannot start the runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    match args.mode {
        Mode::Smtp => rt.block_on(smtp_on_stdio(config, unread)),
        Mode::Deliver => rt.block_on(deliver(config, args, unread)),
        Mode::NewAliases => {
            println!(
                "outpost: aliases live in [local.aliases] of the configuration; nothing to rebuild"
            );
            ExitCode::from(exit::OK)
        }
        Mode::ListQueue | Mode::Flush => unreachable!("handled by the caller"),
    }
}

/// The failure when the configuration could not be read and the default
/// submission socket did not answer either.
fn unread_failure(config: &Config, unread: &str, e: &std::io::Error) -> Failure {
    failed(
        exit::CONFIG,
        format!(
            "{unread}\nsendmail: without it, tried the default submission socket {}: {e}\n\
             sendmail: the configuration holds no secrets: make it readable by every user \
             (chmod 644), or start outpost if it is not running (systemctl start outpost)",
            config.submit.socket.display()
        ),
    )
}

async fn deliver(config: &Config, args: &Args, unread: Option<&str>) -> ExitCode {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("sendmail: reading the message from standard input: {e}");
        return ExitCode::from(exit::IOERR);
    }
    let uid = uid();
    let sender = args
        .from
        .as_deref()
        .map(unquoted)
        .unwrap_or_else(|| format!("{}@{}", user_name(uid), config.hostname));
    let id = crate::queue::QueueId::generate();
    // In the From: header the address is written as in the envelope.
    let header_sender = smtp_path(&sender).unwrap_or_else(|| sender.clone());
    let (message, from_headers) =
        prepare(&input, args, &header_sender, &config.hostname, id.as_str());
    let mut recipients = args.recipients.clone();
    if args.extract {
        for r in from_headers {
            if !recipients.iter().any(|x| x.eq_ignore_ascii_case(&r)) {
                recipients.push(r);
            }
        }
    }
    let recipients: Vec<String> = recipients.iter().map(|r| unquoted(r)).collect();
    if recipients.is_empty() {
        eprintln!("sendmail: no recipients: name them as arguments, or use -t to take them from To, Cc and Bcc");
        return ExitCode::from(exit::USAGE);
    }
    let result = match tokio::net::UnixStream::connect(&config.submit.socket).await {
        Ok(stream) => submit(stream, &sender, &recipients, &message).await,
        Err(e) if unread.is_some() => Err(unread_failure(config, unread.unwrap_or(""), &e)),
        Err(_) => match local_server(config) {
            Ok((shared, thread)) => {
                let (ours, theirs) = tokio::io::duplex(64 * 1024);
                let (_phase_tx, phase) = tokio::sync::watch::channel(Phase::Running);
                let session = Session::new(shared, local_listen(), Peer::Local { uid }, theirs, phase);
                let server = tokio::spawn(session.run());
                let r = submit(ours, &sender, &recipients, &message).await;
                let _ = server.await;
                thread.join();
                r
            }
            Err(e) => Err(failed(
                exit::TEMPFAIL,
                format!(
                    "no outpost daemon listens on {} (submit.socket), and this user cannot write the store ({e}); \
                     start outpost (systemctl start outpost), or ask the administrator",
                    config.submit.socket.display()
                ),
            )),
        },
    };
    match result {
        Ok((_id, refused)) if refused.is_empty() => ExitCode::from(exit::OK),
        Ok((id, refused)) => {
            eprintln!(
                "sendmail: queued as {id} for the others; refused:\n{}",
                refused.join("\n")
            );
            ExitCode::from(exit::NOUSER)
        }
        Err(f) => {
            eprintln!("sendmail: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// `-bs`: an SMTP session on stdin and stdout, with the daemon or in-process.
async fn smtp_on_stdio(config: &Config, unread: Option<&str>) -> ExitCode {
    let stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    match tokio::net::UnixStream::connect(&config.submit.socket).await {
        Ok(stream) => {
            drop(stdio);
            let (mut sr, mut sw) = stream.into_split();
            let up = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut sw).await;
                let _ = sw.shutdown().await;
            });
            // The session ends when the daemon closes it (after QUIT).
            let mut out = tokio::io::stdout();
            let _ = tokio::io::copy(&mut sr, &mut out).await;
            let _ = out.flush().await;
            up.abort();
            ExitCode::from(exit::OK)
        }
        Err(e) if unread.is_some() => {
            let f = unread_failure(config, unread.unwrap_or(""), &e);
            eprintln!("sendmail: {}", f.message);
            ExitCode::from(f.code)
        }
        Err(_) => match local_server(config) {
            Ok((shared, thread)) => {
                let (_phase_tx, phase) = tokio::sync::watch::channel(Phase::Running);
                Session::new(
                    shared,
                    local_listen(),
                    Peer::Local { uid: uid() },
                    stdio,
                    phase,
                )
                .run()
                .await;
                thread.join();
                ExitCode::from(exit::OK)
            }
            Err(e) => {
                eprintln!(
                    "sendmail: no outpost daemon listens on {} (submit.socket), and this user cannot write the store ({e})",
                    config.submit.socket.display()
                );
                ExitCode::from(exit::TEMPFAIL)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Args {
        parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn options_programs_use() {
        let a = args(&[
            "-t",
            "-i",
            "-f",
            "app@x.example",
            "-FThe App",
            "-oem",
            "-odi",
            "a@b,c@d",
            "e@f",
        ]);
        assert!(a.extract && a.ignore_dots);
        assert_eq!(a.from.as_deref(), Some("app@x.example"));
        assert_eq!(a.full_name.as_deref(), Some("The App"));
        assert_eq!(a.recipients, ["a@b", "c@d", "e@f"]);
        assert!(args(&["-oi", "x@y"]).ignore_dots);
        assert_eq!(args(&["-bs"]).mode, Mode::Smtp);
        assert_eq!(args(&["-bp"]).mode, Mode::ListQueue);
        assert_eq!(args(&["-q"]).mode, Mode::Flush);
        assert_eq!(args(&["-q15m"]).mode, Mode::Flush);
        assert_eq!(
            args(&["-B", "8BITMIME", "-v", "--", "-odd@x"]).recipients,
            ["-odd@x"]
        );
        assert!(parse_args(&["-bd".to_string()]).is_err());
        assert!(parse_args(&["-f".to_string()]).is_err());
    }

    #[test]
    fn prepare_adds_headers_and_removes_bcc_with_t() {
        let a = args(&["-t", "-F", "Web App"]);
        let input = b"To: Alice <alice@x.example>, bob@y.example\nCc: \"Last, First\" <carol@z.example>\nBcc: secret@w.example,\n  hidden@v.example\nSubject: hi\n\nline\n.\nafter dot\n";
        let (msg, rcpts) = prepare(input, &a, "app@host.example", "host.example", "QID");
        let text = String::from_utf8(msg).unwrap();
        assert_eq!(
            rcpts,
            [
                "alice@x.example",
                "bob@y.example",
                "carol@z.example",
                "secret@w.example",
                "hidden@v.example"
            ]
        );
        assert!(
            !text.contains("Bcc") && !text.contains("secret@") && !text.contains("hidden@"),
            "{text}"
        );
        assert!(
            text.starts_with("From: Web App <app@host.example>\r\nDate: "),
            "{text}"
        );
        assert!(text.contains("Message-ID: <QID@host.example>\r\n"));
        assert!(text.contains("Subject: hi\r\n\r\nline\r\n"), "{text}");
        // Without -i a lone dot ends the input.
        assert!(!text.contains("after dot"));
        assert!(!text.contains('\n') || text.replace("\r\n", "").find('\n').is_none());
        let (msg, _) = prepare(b"Subject: x\n\n.\nmore\n", &args(&["-i"]), "s@h", "h", "Q");
        assert!(String::from_utf8(msg)
            .unwrap()
            .ends_with("\r\n.\r\nmore\r\n"));
    }

    #[test]
    fn existing_headers_are_kept() {
        let input = b"From: me@x\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <a@b>\r\n\r\nbody\r\n";
        let (msg, _) = prepare(input, &args(&[]), "s@h", "h", "Q");
        assert_eq!(msg, input);
    }

    #[test]
    fn header_addresses() {
        assert_eq!(addresses(" undisclosed-recipients:;"), Vec::<String>::new());
        assert_eq!(addresses(" team: a@x, b@y;"), ["a@x", "b@y"]);
        assert_eq!(addresses(" \"Doe, J\" <j@x>"), ["j@x"]);
        // Comments, encoded names and folding, as mail programs write them.
        assert_eq!(
            addresses(" j@x (Doe, J), =?utf-8?q?M=C3=BCller?= <m@y>,\r\n\tz@w"),
            ["j@x", "m@y", "z@w"]
        );
    }

    #[test]
    fn control_characters_in_arguments_are_refused() {
        let try_args =
            |a: &[&str]| parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let e = try_args(&["-f", "a@b.example\r\nRCPT TO:<x@evil.example>", "c@d"]).unwrap_err();
        assert!(e.contains("sender (-f)") && e.contains("\\r\\n"), "{e}");
        let e = try_args(&["-F", "Name\nBcc: x@evil.example", "c@d"]).unwrap_err();
        assert!(e.contains("full name (-F)"), "{e}");
        let e = try_args(&["c@d\rDATA"]).unwrap_err();
        assert!(e.contains("a recipient"), "{e}");
        assert!(try_args(&["a\u{7f}b@c"]).is_err());
        assert!(try_args(&["-f", "a@b", "-F", "Ann O'Neil", "c@d"]).is_ok());
    }

    #[test]
    fn quoted_local_parts_are_taken_as_written() {
        assert_eq!(unquoted("\"john doe\"@x.example"), "john doe@x.example");
        assert_eq!(unquoted("\"a\\\"b\"@x.example"), "a\"b@x.example");
        assert_eq!(unquoted("plain@x.example"), "plain@x.example");
        assert_eq!(
            unquoted("odd> NOTIFY=NEVER@x.example"),
            "odd> NOTIFY=NEVER@x.example"
        );
    }
}
