//! One IMAP session: reading commands through imap-next (which frames
//! them, literals and all, within `imap.max_literal_size`), answering them,
//! and keeping the client's view of the selected folder in step with the
//! store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use imap_next::imap_types::{
    auth::{AuthMechanism, AuthenticateData},
    command::{Command, CommandBody},
    core::Tag,
    extensions::binary::LiteralOrLiteral8,
    fetch::MacroOrMessageDataItemNames,
    flag::{Flag, StoreResponse, StoreType},
    mailbox::Mailbox,
    response::{CommandContinuationRequest, Greeting, Status},
    search::SearchKey,
    sequence::SequenceSet,
    status::StatusDataItemName,
    ToStatic,
};
use imap_next::server::{Error as NextError, Event, Options, Server};
use imap_next::{Interrupt, Io, State};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::fetch;
use super::search::{self, Candidate};
use super::wire::{self, string, text, DELIMITER, SYSTEM_FLAGS};
use crate::codec::{Codec, Conn};
use crate::config::{Config, Listen};
use crate::queue::StoreError;
use crate::queue::{
    Body, Change, FlagOp, Folder, FolderChange, MailboxEntry, NewMessage, QueueId, INBOX,
};
use crate::shared::{phase_reached, Login, Phase, Shared, BIG_COMMAND};

/// How long a TLS handshake may take.
const TLS_TIMEOUT: Duration = Duration::from_secs(30);
/// After a timeout, how long the last response may take to leave.
const LINGER: Duration = Duration::from_secs(1);
/// A command line without its literals (RFC 7162 §4 asks for at least 8 KiB).
const MAX_COMMAND: u32 = 64 * 1024;
/// Before login, the most a client may send towards one command, literals
/// included: a stranger cannot make the session hold a message-sized
/// literal (`imap.max_literal_size` applies once logged in).
const MAX_BEFORE_LOGIN: usize = 64 * 1024;

enum Flow {
    Go,
    Close,
}

/// The folder the client has selected, as the client knows it: sequence
/// number n is `messages[n - 1]`.
struct Selected {
    folder: Folder,
    read_only: bool,
    messages: Vec<MailboxEntry>,
    /// The flags last told in `* FLAGS`.
    flags: String,
}

/// What a folder's `* FLAGS` names: the system flags and the keywords its
/// messages have (RFC 3501 §7.2.6), so that a client learns the tags in
/// use.
fn folder_flags(messages: &[MailboxEntry]) -> String {
    let mut keywords: Vec<&str> = Vec::new();
    for f in messages.iter().flat_map(|m| m.flags.split(' ')) {
        if !f.is_empty()
            && !f.starts_with('\\')
            && !keywords.iter().any(|k| k.eq_ignore_ascii_case(f))
        {
            keywords.push(f);
        }
    }
    keywords.sort_unstable();
    let mut all = SYSTEM_FLAGS.to_string();
    for k in keywords {
        all.push(' ');
        all.push_str(k);
    }
    all
}

pub struct Session<S> {
    shared: Arc<Shared>,
    config: Arc<Config>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    listen: Listen,
    peer: SocketAddr,
    codec: Codec<Conn<S>>,
    server: Server,
    phase: watch::Receiver<Phase>,
    /// The logged-in account's signal that its mailboxes changed.
    mail: Option<watch::Receiver<u64>>,
    /// The account logged in (as stored).
    user: Option<String>,
    selected: Option<Selected>,
    /// The tag of an AUTHENTICATE waiting for its response, or of IDLE.
    pending: Option<Tag<'static>>,
    idling: bool,
    failures: u32,
    /// Octets given to the reader since it last produced an event.
    unparsed: usize,
    /// Held while a big command arrives ([`Shared::big_commands`]).
    big: Option<tokio::sync::OwnedSemaphorePermit>,
    deadline: Instant,
    linger: Duration,
}

fn next_server(config: &Config) -> Server {
    let mut options = Options::default();
    let literal = config
        .imap
        .max_literal_size
        .unwrap_or(config.relay.max_message_size)
        .min(u64::from(u32::MAX) - u64::from(MAX_COMMAND)) as u32;
    options.max_literal_size = literal;
    options.max_command_size = literal + MAX_COMMAND;
    let _ = options.set_literal_accept_text("go ahead".into());
    // Plain text: imap-next sends it as a BAD, and text that starts with
    // "[" would read as a response code.
    let _ = options.set_literal_reject_text(format!(
        "literal larger than {literal} octets (imap.max_literal_size)"
    ));
    let greeting = Greeting::ok(None, "outpost IMAP ready").expect("valid greeting");
    Server::new(options, greeting)
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub fn new(
        shared: Arc<Shared>,
        listen: Listen,
        peer: SocketAddr,
        stream: S,
        phase: watch::Receiver<Phase>,
    ) -> Self {
        let config = shared.config();
        let mut codec = Codec::new(Conn::Plain(stream));
        codec.set_write_timeout(config.imap.idle_timeout.min(Duration::from_secs(300)));
        Session {
            linger: Duration::from_secs(5),
            deadline: Instant::now() + config.imap.max_session_time,
            server: next_server(&config),
            mail: None,
            config,
            tls: shared.tls(),
            shared,
            listen,
            peer,
            codec,
            phase,
            user: None,
            selected: None,
            pending: None,
            idling: false,
            failures: 0,
            unparsed: 0,
            big: None,
        }
    }

    pub async fn run(mut self) {
        debug!(peer = %self.peer, listener = %self.listen.address, "imap connect");
        if self.listen.mode.implicit_tls() && !self.tls_handshake().await {
            return;
        }
        loop {
            let flow = match self.server.next() {
                Ok(event) => {
                    self.unparsed = 0;
                    self.big = None;
                    self.event(event).await
                }
                Err(Interrupt::Io(Io::Output(bytes))) => {
                    self.codec.write(&bytes);
                    Flow::Go
                }
                Err(Interrupt::Io(Io::NeedMoreInput)) => self.read_more().await,
                Err(Interrupt::Error(e)) => self.input_error(e),
            };
            if let Flow::Close = flow {
                break;
            }
        }
        self.codec.close(self.linger).await;
        debug!(peer = %self.peer, user = self.user.as_deref().unwrap_or("-"), "imap disconnect");
    }

    // ---- input --------------------------------------------------------

    /// Sends what is queued and waits for more input; meanwhile, in IDLE,
    /// tells the client of new mail as it comes.
    async fn read_more(&mut self) -> Flow {
        if let Err(e) = self.codec.flush().await {
            if e.kind() == std::io::ErrorKind::TimedOut {
                info!(peer = %self.peer, "imap client takes no output; closing");
            }
            return Flow::Close;
        }
        if self.unparsed > BIG_COMMAND && self.big.is_none() {
            // Past 1 MiB a command waits its turn before it may grow on.
            let permits = self.shared.big_commands.clone();
            let wait = self
                .config
                .imap
                .idle_timeout
                .min(self.deadline.saturating_duration_since(Instant::now()));
            let mut phase = self.phase.clone();
            let turn = tokio::select! {
                _ = phase_reached(&mut phase, Phase::Draining) => None,
                r = tokio::time::timeout(wait, permits.acquire_owned()) => r.ok().and_then(Result::ok),
            };
            match turn {
                Some(p) => self.big = Some(p),
                None => {
                    info!(peer = %self.peer, "imap: no turn for a large command in time");
                    self.bye("server busy with other large messages; try again later");
                    return Flow::Close;
                }
            }
        }
        // From now, whatever new mail IDLE reports meanwhile: the client
        // must say something within imap.idle_timeout.
        let quiet_until = Instant::now() + self.config.imap.idle_timeout;
        loop {
            if Instant::now() >= self.deadline {
                warn!(peer = %self.peer, limit = ?self.config.imap.max_session_time, "imap session time limit reached (imap.max_session_time)");
                self.bye("session time limit reached, please reconnect");
                return Flow::Close;
            }
            let timeout = quiet_until
                .min(self.deadline)
                .saturating_duration_since(Instant::now());
            let mut phase = self.phase.clone();
            let idling = self.idling;
            tokio::select! {
                biased;
                _ = phase_reached(&mut phase, Phase::Draining) => {
                    self.bye("server shutting down, please reconnect");
                    return Flow::Close;
                }
                r = tokio::time::timeout(timeout, self.codec.fill()) => return match r {
                    Ok(Ok(0)) | Ok(Err(_)) => Flow::Close,
                    Ok(Ok(_)) => {
                        let n = self.codec.buffered().len();
                        self.unparsed += n;
                        if self.user.is_none() && self.unparsed > MAX_BEFORE_LOGIN {
                            info!(peer = %self.peer, octets = self.unparsed, "imap client sent too much before logging in");
                            self.bye("[LIMIT] too much data before login");
                            return Flow::Close;
                        }
                        self.server.enqueue_input(self.codec.buffered());
                        self.codec.consume(n);
                        Flow::Go
                    }
                    Err(_) if Instant::now() >= self.deadline => continue,
                    Err(_) => {
                        info!(peer = %self.peer, "imap idle timeout (imap.idle_timeout)");
                        self.bye("idle timeout, closing");
                        Flow::Close
                    }
                },
                changed = wait_changed(&mut self.mail), if idling => {
                    if !changed {
                        return Flow::Close;
                    }
                    self.refresh(true).await;
                    if self.codec.flush().await.is_err() {
                        return Flow::Close;
                    }
                }
            }
        }
    }

    fn input_error(&mut self, e: NextError) -> Flow {
        self.unparsed = 0;
        self.big = None;
        match e {
            // imap-next answered the tagged BAD itself.
            NextError::LiteralTooLong { .. } => Flow::Go,
            NextError::CommandTooLong { .. } => {
                self.bye("command too long");
                Flow::Close
            }
            NextError::ExpectedCrlfGotLf { discarded_bytes }
            | NextError::MalformedMessage { discarded_bytes } => {
                let line = discarded_bytes.declassify();
                let tag = line
                    .split(|b| *b == b' ')
                    .next()
                    .filter(|t| {
                        !t.is_empty()
                            && t.iter()
                                .all(|b| b.is_ascii_graphic() && !b"(){%*\"\\+".contains(b))
                    })
                    .map(|t| String::from_utf8_lossy(t).into_owned())
                    .unwrap_or_else(|| "*".into());
                self.line(&format!("{tag} BAD syntax error in the command"));
                Flow::Go
            }
        }
    }

    // ---- output -------------------------------------------------------

    fn line(&mut self, s: &str) {
        self.codec.write(s.as_bytes());
        self.codec.write(b"\r\n");
    }

    fn ok(&mut self, tag: &Tag<'_>, s: &str) {
        self.line(&format!("{} OK {}", tag.as_ref(), text(s)));
    }

    fn no(&mut self, tag: &Tag<'_>, s: &str) {
        self.line(&format!("{} NO {}", tag.as_ref(), text(s)));
    }

    fn bad(&mut self, tag: &Tag<'_>, s: &str) {
        self.line(&format!("{} BAD {}", tag.as_ref(), text(s)));
    }

    fn bye(&mut self, s: &str) {
        self.linger = LINGER;
        self.line(&format!("* BYE {}", text(s)));
    }

    fn capabilities(&self) -> String {
        // IMAP4rev1 and the extensions below; not IMAP4rev2, whose
        // SEARCH RETURN (ESEARCH, SEARCHRES) the parser does not read.
        let mut caps = vec!["IMAP4rev1"];
        if self.user.is_none() {
            if self.tls.is_some() && !self.codec.tls_active() {
                caps.push("STARTTLS");
            }
            if self.login_allowed() {
                caps.push("AUTH=PLAIN");
            } else {
                caps.push("LOGINDISABLED");
            }
            caps.push("SASL-IR");
        }
        caps.extend([
            "LITERAL+",
            "ENABLE",
            "IDLE",
            "NAMESPACE",
            "UIDPLUS",
            "MOVE",
            "UNSELECT",
            "SPECIAL-USE",
            "STATUS=SIZE",
            "ID",
        ]);
        caps.join(" ")
    }

    // ---- events -------------------------------------------------------

    async fn event(&mut self, event: Event) -> Flow {
        match event {
            Event::GreetingSent { .. } | Event::ResponseSent { .. } => Flow::Go,
            Event::CommandReceived { command } => self.command(command).await,
            Event::CommandAuthenticateReceived {
                command_authenticate: c,
            } => {
                let tag = c.tag.clone();
                if self.user.is_some() {
                    return self.finish_auth(Status::bad(Some(tag), None, "already logged in"));
                }
                if !matches!(c.mechanism, AuthMechanism::Plain) {
                    return self.finish_auth(Status::no(
                        Some(tag),
                        None,
                        "unsupported mechanism: use PLAIN",
                    ));
                }
                if !self.login_allowed() {
                    return self.finish_auth(Status::no(
                        Some(tag),
                        Some(privacy_required()),
                        "plain-text login needs TLS here: send STARTTLS first",
                    ));
                }
                match c.initial_response {
                    Some(r) => {
                        let data = r.declassify().to_vec();
                        self.plain(tag, data).await
                    }
                    None => {
                        self.pending = Some(tag);
                        let cont = CommandContinuationRequest::base64(Vec::<u8>::new());
                        let _ = self.server.authenticate_continue(cont);
                        Flow::Go
                    }
                }
            }
            Event::AuthenticateDataReceived { authenticate_data } => {
                let tag = self.pending.take().unwrap_or_else(|| Tag::unvalidated("*"));
                match authenticate_data {
                    AuthenticateData::Cancel => {
                        self.finish_auth(Status::bad(Some(tag), None, "authentication cancelled"))
                    }
                    AuthenticateData::Continue(data) => {
                        let data = data.declassify().to_vec();
                        self.plain(tag, data).await
                    }
                }
            }
            Event::IdleCommandReceived { tag } => {
                if self.user.is_none() {
                    let _ = self
                        .server
                        .idle_reject(Status::bad(Some(tag), None, "log in first").expect("valid"));
                    return Flow::Go;
                }
                self.refresh(true).await;
                self.pending = Some(tag);
                self.idling = true;
                // Changes before this point are reported above.
                if let Some(m) = self.mail.as_mut() {
                    m.borrow_and_update();
                }
                let cont = CommandContinuationRequest::basic(None, "idling").expect("valid");
                let _ = self.server.idle_accept(cont);
                Flow::Go
            }
            Event::IdleDoneReceived => {
                self.idling = false;
                let tag = self.pending.take().unwrap_or_else(|| Tag::unvalidated("*"));
                self.refresh(true).await;
                self.ok(&tag, "IDLE done");
                Flow::Go
            }
        }
    }

    fn finish_auth(&mut self, status: Result<Status<'static>, impl std::fmt::Debug>) -> Flow {
        if let Ok(s) = status {
            let _ = self.server.authenticate_finish(s);
        }
        Flow::Go
    }

    /// AUTHENTICATE PLAIN's response (RFC 4616).
    async fn plain(&mut self, tag: Tag<'static>, data: Vec<u8>) -> Flow {
        let Some((user, pass)) = crate::auth::parse_plain(&data) else {
            return self.finish_auth(Status::bad(Some(tag), None, "malformed PLAIN response"));
        };
        let (ok, text) = self.login(&user, pass).await;
        let status = if ok {
            Status::ok(Some(tag), None, text)
        } else {
            Status::no(Some(tag), None, text)
        };
        self.finish_auth(status);
        if self.failures >= self.config.imap.max_auth_failures {
            self.bye("too many failed logins");
            return Flow::Close;
        }
        Flow::Go
    }

    fn login_allowed(&self) -> bool {
        self.codec.tls_active() || self.listen.plaintext_auth_allowed()
    }

    /// Checks a login; on success the session is authenticated and the
    /// user's folders exist. Returns the text for the tagged response.
    async fn login(&mut self, user: &str, pass: String) -> (bool, String) {
        let client = self.shared.client_of(self.peer.ip());
        if let Some(left) = self
            .shared
            .logins
            .blocked(client, Instant::now().into_std())
        {
            let minutes = left.as_secs().div_ceil(60);
            info!(peer = %self.peer, minutes_left = minutes, "imap login refused: this client is blocked after too many failed logins (auth.max_failures)");
            return (
                false,
                format!("[UNAVAILABLE] too many failed logins from your address; try again in {minutes} minutes"),
            );
        }
        let exists = match self.shared.check_password(user, pass).await {
            Login::Accepted => {
                let user = user.to_ascii_lowercase();
                let change = Change::Folder(FolderChange::Ensure { user: user.clone() });
                if let Err(e) = self.shared.writer.apply(vec![change]).await {
                    warn!(peer = %self.peer, user = %user, error = %e, "cannot make the folders");
                    return (
                        false,
                        "[UNAVAILABLE] cannot open the mailbox now; try again later".into(),
                    );
                }
                info!(peer = %self.peer, user = %user, "imap login");
                self.mail = Some(self.shared.writer.mail_changes(&user));
                self.user = Some(user);
                return (
                    true,
                    format!("[CAPABILITY {}] logged in", self.capabilities()),
                );
            }
            Login::WrongPassword => true,
            Login::NoSuchAccount => false,
        };
        self.failures += 1;
        warn!(peer = %self.peer, user = %user, failures = self.failures, "imap login failed");
        self.shared.login_failed(
            &self.config,
            client,
            Some(user).filter(|_| exists),
            &self.peer.to_string(),
        );
        tokio::time::sleep(self.config.imap.auth_failure_delay).await;
        (
            false,
            "[AUTHENTICATIONFAILED] invalid user name or password".into(),
        )
    }

    async fn command(&mut self, command: Command<'static>) -> Flow {
        let tag = command.tag;
        let name = command.body.name();
        match command.body {
            CommandBody::Capability => {
                let caps = self.capabilities();
                self.line(&format!("* CAPABILITY {caps}"));
                self.ok(&tag, "CAPABILITY done");
            }
            CommandBody::Noop | CommandBody::Check => {
                self.refresh(true).await;
                self.ok(&tag, &format!("{name} done"));
            }
            CommandBody::Logout => {
                self.line("* BYE logging out");
                self.ok(&tag, "LOGOUT done");
                return Flow::Close;
            }
            CommandBody::Id { .. } => {
                self.line("* ID (\"name\" \"outpost\")");
                self.ok(&tag, "ID done");
            }
            CommandBody::StartTLS => {
                if self.codec.tls_active() || self.user.is_some() {
                    self.bad(&tag, "TLS is already active or you are logged in");
                } else if self.tls.is_none() {
                    self.no(&tag, "TLS is not available: no certificate is configured");
                } else {
                    self.ok(&tag, "begin TLS negotiation now");
                    if self.codec.flush().await.is_err() || !self.tls_handshake().await {
                        return Flow::Close;
                    }
                    // Nothing the client sent before the handshake counts
                    // (RFC 9051 §6.2.1): a new reader, its greeting unsent.
                    self.server = next_server(&self.config);
                    if let Err(Interrupt::Io(Io::Output(_))) = self.server.next() {}
                }
            }
            CommandBody::Login { username, password } => {
                if self.user.is_some() {
                    self.bad(&tag, "already logged in");
                } else if !self.login_allowed() {
                    self.no(
                        &tag,
                        "[PRIVACYREQUIRED] plain-text login needs TLS here: send STARTTLS first",
                    );
                } else {
                    let user = wire::astring(&username);
                    let pass = wire::astring(password.declassify());
                    let (ok, text) = self.login(&user, pass).await;
                    if ok {
                        self.ok(&tag, &text);
                    } else {
                        self.no(&tag, &text);
                        if self.failures >= self.config.imap.max_auth_failures {
                            self.bye("too many failed logins");
                            return Flow::Close;
                        }
                    }
                }
            }
            _ if self.user.is_none() => {
                self.bad(&tag, &format!("{name} needs a login first"));
            }
            body => {
                if let Err(e) = self.authenticated(&tag, body).await {
                    warn!(peer = %self.peer, user = self.user.as_deref().unwrap_or("-"), error = %e, command = name, "imap command failed");
                    self.no(
                        &tag,
                        "[UNAVAILABLE] the store cannot do this now; try again later",
                    );
                }
            }
        }
        Flow::Go
    }

    fn user(&self) -> String {
        self.user.clone().unwrap_or_default()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::queue::Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.shared.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Failed(e.to_string()))?
    }

    async fn folder(&self, name: &str) -> Result<Option<Folder>, StoreError> {
        let (user, name) = (self.user(), name.to_string());
        self.blocking(move |s| s.folder(&user, &name)).await
    }

    /// Applies a folder change; Err(text) when it was refused.
    async fn change(
        &self,
        change: FolderChange,
    ) -> Result<Result<crate::queue::Applied, String>, StoreError> {
        let applied = self
            .shared
            .writer
            .apply_reporting(vec![Change::Folder(change)])
            .await?;
        Ok(match applied.refused.clone() {
            Some(why) => Err(why),
            None => Ok(applied),
        })
    }

    /// Applies a folder change and answers OK with `done`, or NO with why
    /// it was refused.
    async fn answer_change(
        &mut self,
        tag: &Tag<'static>,
        change: FolderChange,
        done: &str,
    ) -> Result<(), StoreError> {
        match self.change(change).await? {
            Ok(_) => self.ok(tag, done),
            Err(why) => self.no(tag, &why),
        }
        Ok(())
    }

    /// Refuses a change to a folder opened with EXAMINE; true when it did.
    fn refused_read_only(&mut self, tag: &Tag<'static>) -> bool {
        let read_only = self.selected.as_ref().is_some_and(|s| s.read_only);
        if read_only {
            self.no(tag, "[READ-ONLY] the folder was opened with EXAMINE");
        }
        read_only
    }

    async fn authenticated(
        &mut self,
        tag: &Tag<'static>,
        body: CommandBody<'static>,
    ) -> Result<(), StoreError> {
        match body {
            CommandBody::Enable { .. } => {
                // RFC 5161 §3.1: only what CAPABILITY lists as enablable,
                // and none of it is.
                self.line("* ENABLED");
                self.ok(tag, "ENABLE done");
            }
            CommandBody::Namespace => {
                self.line(&format!("* NAMESPACE ((\"\" \"{DELIMITER}\")) NIL NIL"));
                self.ok(tag, "NAMESPACE done");
            }
            CommandBody::Select { mailbox, .. } => self.select(tag, &mailbox, false).await?,
            CommandBody::Examine { mailbox, .. } => self.select(tag, &mailbox, true).await?,
            CommandBody::Unselect | CommandBody::Close => {
                if self.selected.is_none() {
                    self.bad(tag, "no folder is selected");
                    return Ok(());
                }
                if matches!(body, CommandBody::Close) {
                    // CLOSE expunges without telling (RFC 9051 §6.4.1).
                    self.expunge(None, false).await?;
                }
                self.selected = None;
                self.ok(tag, "done");
            }
            CommandBody::Create { mailbox } => self.create(tag, &mailbox).await?,
            CommandBody::Delete { mailbox } => self.delete(tag, &mailbox).await?,
            CommandBody::Rename { from, to } => {
                let from = wire::mailbox_name(&from);
                let Some(to) = wire::new_folder_name(&wire::mailbox_name(&to)) else {
                    self.no(tag, "[CANNOT] not a folder name that can be made");
                    return Ok(());
                };
                let change = FolderChange::Rename {
                    user: self.user(),
                    from,
                    to,
                };
                self.answer_change(tag, change, "RENAME done").await?;
            }
            CommandBody::Subscribe { mailbox } => self.subscribe(tag, &mailbox, true).await?,
            CommandBody::Unsubscribe { mailbox } => self.subscribe(tag, &mailbox, false).await?,
            CommandBody::List {
                reference,
                mailbox_wildcard,
            } => {
                let pattern = wire::list_pattern(&reference, &mailbox_wildcard);
                self.list(tag, &pattern, false).await?;
            }
            CommandBody::Lsub {
                reference,
                mailbox_wildcard,
            } => {
                let pattern = wire::list_pattern(&reference, &mailbox_wildcard);
                self.list(tag, &pattern, true).await?;
            }
            CommandBody::Status {
                mailbox,
                item_names,
            } => self.status(tag, &mailbox, &item_names).await?,
            CommandBody::Append {
                mailbox,
                flags,
                date,
                message,
            } => {
                let data = match message {
                    LiteralOrLiteral8::Literal(l) => l.into_inner().into_owned(),
                    LiteralOrLiteral8::Literal8(l) => l.data.into_owned(),
                };
                let date = date.map(|d| d.as_ref().timestamp());
                self.append(tag, &mailbox, &flags, date, data).await?;
            }
            other => self.selected_command(tag, other).await?,
        }
        Ok(())
    }

    async fn subscribe(
        &mut self,
        tag: &Tag<'static>,
        mailbox: &Mailbox<'_>,
        subscribed: bool,
    ) -> Result<(), StoreError> {
        let change = FolderChange::Subscribe {
            user: self.user(),
            name: wire::mailbox_name(mailbox),
            subscribed,
        };
        self.answer_change(tag, change, "done").await?;
        Ok(())
    }

    async fn create(
        &mut self,
        tag: &Tag<'static>,
        mailbox: &Mailbox<'_>,
    ) -> Result<(), StoreError> {
        let Some(name) = wire::new_folder_name(&wire::mailbox_name(mailbox)) else {
            self.no(tag, "[CANNOT] not a folder name that can be made");
            return Ok(());
        };
        // Missing parents are made too (RFC 9051 §6.3.4).
        let parts: Vec<&str> = name.split(DELIMITER).collect();
        for n in 1..parts.len() {
            let parent = parts[..n].join(&DELIMITER.to_string());
            let change = FolderChange::Create {
                user: self.user(),
                name: parent,
            };
            // One that exists is fine.
            let _ = self.change(change).await?;
        }
        let change = FolderChange::Create {
            user: self.user(),
            name: name.clone(),
        };
        self.answer_change(tag, change, "CREATE done").await?;
        Ok(())
    }

    async fn delete(
        &mut self,
        tag: &Tag<'static>,
        mailbox: &Mailbox<'_>,
    ) -> Result<(), StoreError> {
        let name = wire::mailbox_name(mailbox);
        if name == INBOX {
            self.no(tag, "[CANNOT] INBOX cannot be deleted");
            return Ok(());
        }
        let user = self.user();
        let below = format!("{name}{DELIMITER}");
        let folders = self.blocking(move |s| s.folders(&user)).await?;
        if folders.iter().any(|f| f.name.starts_with(&below)) {
            self.no(
                tag,
                "[INUSE] this folder has sub-folders: delete them first",
            );
            return Ok(());
        }
        if self
            .selected
            .as_ref()
            .is_some_and(|s| s.folder.name == name)
        {
            self.selected = None;
            self.line("* OK [CLOSED] the selected folder is being deleted");
        }
        let change = FolderChange::Delete {
            user: self.user(),
            name,
        };
        self.answer_change(tag, change, "DELETE done").await?;
        Ok(())
    }

    /// LIST and LSUB (RFC 9051 §6.3.9), with special-use attributes
    /// (RFC 6154) and whether a folder has sub-folders.
    async fn list(
        &mut self,
        tag: &Tag<'static>,
        pattern: &str,
        lsub: bool,
    ) -> Result<(), StoreError> {
        let verb = if lsub { "LSUB" } else { "LIST" };
        if pattern.is_empty() {
            // The hierarchy delimiter and root (RFC 9051 §6.3.9).
            self.line(&format!("* {verb} (\\Noselect) \"{DELIMITER}\" \"\""));
            self.ok(tag, &format!("{verb} done"));
            return Ok(());
        }
        let user = self.user();
        let folders = self.blocking(move |s| s.folders(&user)).await?;
        for f in &folders {
            if (lsub && !f.subscribed) || !wire::matches(pattern, &f.name) {
                continue;
            }
            let below = format!("{}{DELIMITER}", f.name);
            let mut attrs = vec![if folders.iter().any(|c| c.name.starts_with(&below)) {
                "\\HasChildren"
            } else {
                "\\HasNoChildren"
            }];
            if let Some(u) = &f.special_use {
                attrs.push(u);
            }
            self.line(&format!(
                "* {verb} ({}) \"{DELIMITER}\" {}",
                attrs.join(" "),
                string(&f.name)
            ));
        }
        self.ok(tag, &format!("{verb} done"));
        Ok(())
    }

    async fn status(
        &mut self,
        tag: &Tag<'static>,
        mailbox: &Mailbox<'_>,
        items: &[StatusDataItemName],
    ) -> Result<(), StoreError> {
        let name = wire::mailbox_name(mailbox);
        let Some(folder) = self.folder(&name).await? else {
            self.no(tag, &format!("[NONEXISTENT] no folder {name}"));
            return Ok(());
        };
        let (user, id) = (self.user(), folder.id);
        let messages = self.blocking(move |s| s.folder_messages(&user, id)).await?;
        let mut out = Vec::new();
        for item in items {
            let (k, v) = match item {
                StatusDataItemName::Messages => ("MESSAGES", messages.len() as u64),
                StatusDataItemName::Recent => ("RECENT", 0),
                StatusDataItemName::UidNext => ("UIDNEXT", u64::from(folder.uidnext)),
                StatusDataItemName::UidValidity => ("UIDVALIDITY", u64::from(folder.uidvalidity)),
                StatusDataItemName::Unseen => (
                    "UNSEEN",
                    messages.iter().filter(|m| !m.has_flag("\\Seen")).count() as u64,
                ),
                StatusDataItemName::Deleted => (
                    "DELETED",
                    messages.iter().filter(|m| m.has_flag("\\Deleted")).count() as u64,
                ),
                StatusDataItemName::Size => {
                    ("SIZE", messages.iter().map(|m| m.size() as u64).sum())
                }
                StatusDataItemName::DeletedStorage => (
                    "DELETED-STORAGE",
                    messages
                        .iter()
                        .filter(|m| m.has_flag("\\Deleted"))
                        .map(|m| m.size() as u64)
                        .sum(),
                ),
                #[allow(unreachable_patterns)]
                _ => continue,
            };
            out.push(format!("{k} {v}"));
        }
        self.line(&format!(
            "* STATUS {} ({})",
            string(&folder.name),
            out.join(" ")
        ));
        self.refresh(true).await;
        self.ok(tag, "STATUS done");
        Ok(())
    }

    async fn select(
        &mut self,
        tag: &Tag<'static>,
        mailbox: &Mailbox<'_>,
        read_only: bool,
    ) -> Result<(), StoreError> {
        // A SELECT leaves the folder selected before, whatever happens.
        if self.selected.take().is_some() {
            self.line("* OK [CLOSED] previous folder closed");
        }
        let name = wire::mailbox_name(mailbox);
        let Some(folder) = self.folder(&name).await? else {
            self.no(tag, &format!("[NONEXISTENT] no folder {name}"));
            return Ok(());
        };
        let (user, id) = (self.user(), folder.id);
        let messages = self.blocking(move |s| s.folder_messages(&user, id)).await?;
        let flags = folder_flags(&messages);
        self.line(&format!("* FLAGS ({flags})"));
        self.line(&format!("* {} EXISTS", messages.len()));
        self.line("* 0 RECENT");
        if let Some(i) = messages.iter().position(|m| !m.has_flag("\\Seen")) {
            self.line(&format!("* OK [UNSEEN {}] first unseen", i + 1));
        }
        if read_only {
            self.line("* OK [PERMANENTFLAGS ()] read-only");
        } else {
            self.line(&format!("* OK [PERMANENTFLAGS ({flags} \\*)] flags kept"));
        }
        self.line(&format!(
            "* OK [UIDVALIDITY {}] UIDs valid",
            folder.uidvalidity
        ));
        self.line(&format!("* OK [UIDNEXT {}] next UID", folder.uidnext));
        self.selected = Some(Selected {
            folder,
            read_only,
            messages,
            flags,
        });
        // Changes up to here are in what was just sent.
        if let Some(m) = self.mail.as_mut() {
            m.borrow_and_update();
        }
        if read_only {
            self.ok(tag, "[READ-ONLY] EXAMINE done");
        } else {
            self.ok(tag, "[READ-WRITE] SELECT done");
        }
        Ok(())
    }

    /// Whether `user` may store `more` octets (`local.quota`).
    async fn fits(&self, more: i64) -> Result<bool, StoreError> {
        let user = self.user();
        let Some(quota) = self.config.local.quota_of(&user) else {
            return Ok(true);
        };
        let used = self.blocking(move |s| s.mailbox_usage(&user)).await?;
        Ok(used + more <= quota as i64)
    }

    /// `store.min_free`, as SMTP keeps it: room for `size` more octets
    /// with the reserve left.
    fn disk_has_room(&self, size: u64) -> bool {
        let min_free = self.config.min_free();
        if min_free == 0 {
            return true;
        }
        match crate::queue::space::available(&self.config.store.path) {
            Ok(free) if free < min_free.saturating_add(size) => {
                warn!(peer = %self.peer, free, min_free, size, "imap APPEND refused: the store's disk is short of space (store.min_free)");
                false
            }
            // Not knowing is no reason to refuse: a full disk still fails
            // the commit.
            _ => true,
        }
    }

    async fn append(
        &mut self,
        tag: &Tag<'static>,
        mailbox: &Mailbox<'_>,
        flags: &[Flag<'_>],
        date: Option<i64>,
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        let name = wire::mailbox_name(mailbox);
        if self.folder(&name).await?.is_none() {
            self.no(tag, &format!("[TRYCREATE] no folder {name}"));
            return Ok(());
        }
        if !self.fits(data.len() as i64).await? {
            self.no(tag, "[OVERQUOTA] the mailbox is full (local.quota)");
            return Ok(());
        }
        if !self.disk_has_room(data.len() as u64) {
            self.no(
                tag,
                "[LIMIT] the server's disk is short of space; try again later",
            );
            return Ok(());
        }
        let flags: Vec<String> = flags.iter().filter_map(wire::flag_name).collect();
        let flags = crate::queue::merge_flags("", FlagOp::Add, &flags);
        let id = QueueId::generate();
        let now = crate::queue::unix_now();
        let message = NewMessage {
            id: id.clone(),
            received_at: now,
            sender: String::new(),
            client_addr: self.peer.ip().to_string(),
            client_helo: String::new(),
            auth_user: self.user.clone(),
            protocol: "IMAP".into(),
            body_type: None,
            smtputf8: false,
            dsn_ret: None,
            dsn_envid: None,
            recipients: Vec::new(),
            body: Body::from(data),
        };
        let change = FolderChange::Append {
            user: self.user(),
            folder: name.clone(),
            message: Box::new(message),
            flags,
            internal_date: date.unwrap_or(now),
        };
        match self.change(change).await? {
            Ok(applied) => {
                let uid = applied.uids.first().map(|u| u.1).unwrap_or(0);
                info!(peer = %self.peer, user = %self.user(), folder = %name, queue_id = %id, uid, "imap append");
                self.refresh(true).await;
                self.ok(
                    tag,
                    &format!("[APPENDUID {} {uid}] APPEND done", applied.uidvalidity),
                );
            }
            Err(why) => self.no(tag, &why),
        }
        Ok(())
    }

    // ---- selected state ----------------------------------------------

    /// Indexes (0-based) of the messages a set names, by sequence number
    /// or UID.
    fn pick(&self, set: &SequenceSet, uid: bool) -> Vec<usize> {
        let Some(sel) = &self.selected else {
            return Vec::new();
        };
        let n = sel.messages.len() as u32;
        let last_uid = sel.messages.last().map(|m| m.imap_uid).unwrap_or(0);
        sel.messages
            .iter()
            .enumerate()
            .filter(|(i, m)| {
                if uid {
                    wire::contains(set, m.imap_uid, last_uid)
                } else {
                    wire::contains(set, *i as u32 + 1, n)
                }
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Whether a sequence set names only messages that exist (RFC 9051
    /// §6.4: a sequence number beyond the last is an error; UIDs are not).
    fn valid_seqs(&self, set: &SequenceSet) -> bool {
        use imap_next::imap_types::sequence::{SeqOrUid, Sequence};
        let n = self.selected.as_ref().map_or(0, |s| s.messages.len()) as u32;
        if n == 0 {
            // Nothing matches; `1:*` in an empty folder is not an error to
            // the clients that send it (Dovecot answers OK too).
            return true;
        }
        set.0.as_ref().iter().all(|s| {
            let ok = |v: &SeqOrUid| match v {
                SeqOrUid::Value(v) => v.get() <= n,
                SeqOrUid::Asterisk => true,
            };
            match s {
                Sequence::Single(v) => ok(v),
                Sequence::Range(a, b) => ok(a) && ok(b),
            }
        })
    }

    async fn selected_command(
        &mut self,
        tag: &Tag<'static>,
        body: CommandBody<'static>,
    ) -> Result<(), StoreError> {
        let name = body.name();
        if self.selected.is_none() {
            self.bad(
                tag,
                &format!("{name} needs a selected folder: SELECT one first"),
            );
            return Ok(());
        }
        let set_ok = |s: &Self, set: &SequenceSet, uid: bool| uid || s.valid_seqs(set);
        match body {
            CommandBody::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
                ..
            } => {
                if !set_ok(self, &sequence_set, uid) {
                    self.bad(tag, "no such message number");
                    return Ok(());
                }
                let items = match macro_or_item_names {
                    MacroOrMessageDataItemNames::Macro(m) => {
                        m.expand().into_iter().map(|i| i.to_static()).collect()
                    }
                    MacroOrMessageDataItemNames::MessageDataItemNames(v) => v,
                };
                self.refresh(uid).await;
                let picked = self.pick(&sequence_set, uid);
                let gone = self.fetch(&picked, &items, uid).await?;
                if gone {
                    self.no(
                        tag,
                        "[EXPUNGEISSUED] some messages were expunged by another session",
                    );
                } else {
                    self.ok(tag, &format!("{name} done"));
                }
            }
            CommandBody::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
                ..
            } => {
                if !set_ok(self, &sequence_set, uid) {
                    self.bad(tag, "no such message number");
                    return Ok(());
                }
                if self.refused_read_only(tag) {
                    return Ok(());
                }
                let op = match kind {
                    StoreType::Add => FlagOp::Add,
                    StoreType::Remove => FlagOp::Remove,
                    StoreType::Replace => FlagOp::Replace,
                };
                let flags: Vec<String> = flags.iter().filter_map(wire::flag_name).collect();
                let picked = self.pick(&sequence_set, uid);
                self.store(&picked, op, flags).await?;
                if !matches!(response, StoreResponse::Silent) || uid {
                    self.report_flags(&picked, uid);
                }
                self.refresh(uid).await;
                self.ok(tag, &format!("{name} done"));
            }
            CommandBody::Search { criteria, uid, .. } => {
                self.refresh(uid).await;
                let key = if criteria.as_ref().len() == 1 {
                    criteria.as_ref()[0].clone()
                } else {
                    SearchKey::And(criteria)
                };
                let found = self.search(&key, uid).await?;
                let list: Vec<String> = found.iter().map(u32::to_string).collect();
                let line = format!("* SEARCH {}", list.join(" "));
                self.line(line.trim_end());
                self.ok(tag, &format!("{name} done"));
            }
            CommandBody::Copy {
                sequence_set,
                mailbox,
                uid,
            } => {
                if !set_ok(self, &sequence_set, uid) {
                    self.bad(tag, "no such message number");
                    return Ok(());
                }
                self.copy(tag, &sequence_set, &mailbox, uid, false).await?;
            }
            CommandBody::Move {
                sequence_set,
                mailbox,
                uid,
            } => {
                if !set_ok(self, &sequence_set, uid) {
                    self.bad(tag, "no such message number");
                    return Ok(());
                }
                if self.refused_read_only(tag) {
                    return Ok(());
                }
                self.copy(tag, &sequence_set, &mailbox, uid, true).await?;
            }
            CommandBody::Expunge | CommandBody::ExpungeUid { .. } => {
                if self.refused_read_only(tag) {
                    return Ok(());
                }
                let only = match body {
                    CommandBody::ExpungeUid { sequence_set } => Some(sequence_set),
                    _ => None,
                };
                self.expunge(only.as_ref(), true).await?;
                self.refresh(true).await;
                self.ok(tag, &format!("{name} done"));
            }
            _ => self.bad(tag, &format!("{name} is not supported")),
        }
        Ok(())
    }

    async fn search(&mut self, key: &SearchKey<'_>, uid: bool) -> Result<Vec<u32>, StoreError> {
        let Some(sel) = &self.selected else {
            return Ok(Vec::new());
        };
        let content = search::needs_content(key);
        let last_seq = sel.messages.len() as u32;
        let last_uid = sel.messages.last().map(|m| m.imap_uid).unwrap_or(0);
        let mut found = Vec::new();
        for (i, entry) in sel.messages.iter().enumerate() {
            // Read and parsed once for all the keys that need it.
            let raw = match content {
                true => self.message(entry).await?,
                false => None,
            };
            let parsed = raw.as_deref().map(super::mime::Parsed::new);
            let c = Candidate {
                seq: i as u32 + 1,
                entry,
                last_seq,
                last_uid,
                message: parsed.as_ref(),
            };
            if search::matches(key, &c) {
                found.push(if uid { entry.imap_uid } else { i as u32 + 1 });
            }
        }
        Ok(found)
    }

    /// The message as a client reads it (with its Return-Path line).
    async fn message(&self, entry: &MailboxEntry) -> Result<Option<Vec<u8>>, StoreError> {
        let (id, prefix) = (entry.uid.clone(), entry.return_path());
        self.blocking(move |s| {
            s.body(&id).map(|b| {
                b.map(|b| {
                    let mut v = prefix.into_bytes();
                    v.extend_from_slice(&b);
                    v
                })
            })
        })
        .await
    }

    /// FETCH; true when some message had been expunged meanwhile.
    async fn fetch(
        &mut self,
        picked: &[usize],
        items: &[imap_next::imap_types::fetch::MessageDataItemName<'static>],
        uid: bool,
    ) -> Result<bool, StoreError> {
        let needs_body = fetch::needs_body(items);
        let read_only = self.selected.as_ref().is_some_and(|s| s.read_only);
        let sets_seen = !read_only && fetch::sets_seen(items);
        let mut gone = false;
        let mut seen_rows = Vec::new();
        for &i in picked {
            let Some(entry) = self.selected.as_ref().map(|s| s.messages[i].clone()) else {
                break;
            };
            let raw = if needs_body {
                match self.message(&entry).await? {
                    Some(raw) => Some(raw),
                    None => {
                        gone = true;
                        continue;
                    }
                }
            } else {
                None
            };
            let mut entry = entry;
            let mark = sets_seen && !entry.has_flag("\\Seen");
            if mark {
                entry.flags =
                    crate::queue::merge_flags(&entry.flags, FlagOp::Add, &["\\Seen".to_string()]);
                seen_rows.push(entry.id);
                if let Some(s) = self.selected.as_mut() {
                    s.messages[i].flags = entry.flags.clone();
                }
            }
            let out = fetch::response(i as u32 + 1, &entry, raw.as_deref(), items, uid, mark);
            self.codec.write(&out);
            if self.codec.pending_output() >= 256 * 1024 {
                if let Err(e) = self.codec.flush().await {
                    return Err(StoreError::Failed(format!("client: {e}")));
                }
            }
        }
        if !seen_rows.is_empty() {
            let change = FolderChange::Flags {
                user: self.user(),
                rows: seen_rows,
                op: FlagOp::Add,
                flags: vec!["\\Seen".into()],
            };
            self.change(change).await?.map_err(StoreError::Failed)?;
        }
        Ok(gone)
    }

    async fn store(
        &mut self,
        picked: &[usize],
        op: FlagOp,
        flags: Vec<String>,
    ) -> Result<(), StoreError> {
        let Some(sel) = self.selected.as_mut() else {
            return Ok(());
        };
        let rows: Vec<i64> = picked.iter().map(|&i| sel.messages[i].id).collect();
        for &i in picked {
            let m = &mut sel.messages[i];
            m.flags = crate::queue::merge_flags(&m.flags, op, &flags);
        }
        let change = FolderChange::Flags {
            user: self.user(),
            rows,
            op,
            flags,
        };
        self.change(change).await?.map_err(StoreError::Failed)?;
        Ok(())
    }

    fn report_flags(&mut self, picked: &[usize], uid: bool) {
        let Some(sel) = &self.selected else {
            return;
        };
        let mut out = String::new();
        for &i in picked {
            let m = &sel.messages[i];
            out.push_str(&format!("* {} FETCH (FLAGS ({})", i + 1, m.flags));
            if uid {
                out.push_str(&format!(" UID {}", m.imap_uid));
            }
            out.push_str(")\r\n");
        }
        self.codec.write(out.as_bytes());
    }

    async fn copy(
        &mut self,
        tag: &Tag<'static>,
        set: &SequenceSet,
        mailbox: &Mailbox<'_>,
        uid: bool,
        remove: bool,
    ) -> Result<(), StoreError> {
        let to = wire::mailbox_name(mailbox);
        let picked = self.pick(set, uid);
        let Some(sel) = &self.selected else {
            return Ok(());
        };
        let rows: Vec<i64> = picked.iter().map(|&i| sel.messages[i].id).collect();
        let size: i64 = picked.iter().map(|&i| sel.messages[i].stored_size).sum();
        if !remove && !self.fits(size).await? {
            self.no(tag, "[OVERQUOTA] the mailbox is full (local.quota)");
            return Ok(());
        }
        let change = FolderChange::Copy {
            user: self.user(),
            rows,
            to,
            remove,
        };
        let applied = match self.change(change).await? {
            Ok(a) => a,
            Err(why) => {
                self.no(tag, &why);
                return Ok(());
            }
        };
        let code = if applied.uids.is_empty() {
            String::new()
        } else {
            format!(
                "[COPYUID {} {} {}] ",
                applied.uidvalidity,
                wire::uid_set(applied.uids.iter().map(|u| u.0)),
                wire::uid_set(applied.uids.iter().map(|u| u.1)),
            )
        };
        if remove {
            // RFC 6851 §4.3: COPYUID in an untagged OK, then the expunges.
            self.line(&format!("* OK {code}moved"));
            self.refresh(true).await;
            self.ok(tag, "MOVE done");
        } else {
            self.refresh(uid).await;
            self.ok(tag, &format!("{code}COPY done"));
        }
        Ok(())
    }

    /// Removes the messages flagged \Deleted (of `only`, UID EXPUNGE);
    /// tells the client when `tell`.
    async fn expunge(&mut self, only: Option<&SequenceSet>, tell: bool) -> Result<(), StoreError> {
        if tell {
            // What other sessions did first: the flags to go by are the
            // store's (the writer checks \Deleted again).
            self.refresh(true).await;
        }
        let Some(sel) = &self.selected else {
            return Ok(());
        };
        if sel.read_only {
            return Ok(());
        }
        let last_uid = sel.messages.last().map(|m| m.imap_uid).unwrap_or(0);
        let doomed: Vec<usize> = sel
            .messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.has_flag("\\Deleted"))
            .filter(|(_, m)| only.is_none_or(|s| wire::contains(s, m.imap_uid, last_uid)))
            .map(|(i, _)| i)
            .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        let rows = doomed.iter().map(|&i| sel.messages[i].id).collect();
        let change = FolderChange::Expunge {
            user: self.user(),
            rows,
        };
        self.change(change).await?.map_err(StoreError::Failed)?;
        if tell {
            self.refresh(true).await;
        } else if let Some(sel) = self.selected.as_mut() {
            for &i in doomed.iter().rev() {
                sel.messages.remove(i);
            }
        }
        Ok(())
    }

    /// Brings the client's view of the selected folder up to date: the
    /// messages others expunged (only when `expunges` may be told, RFC
    /// 9051 §7.5.1), new messages, changed flags.
    async fn refresh(&mut self, expunges: bool) {
        let Some(sel) = &self.selected else {
            return;
        };
        let (user, id) = (self.user(), sel.folder.id);
        let now = match self.blocking(move |s| s.folder_messages(&user, id)).await {
            Ok(m) => m,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "cannot read the folder");
                return;
            }
        };
        let Some(sel) = self.selected.as_mut() else {
            return;
        };
        let mut out = String::new();
        if expunges {
            let present: std::collections::HashSet<u32> = now.iter().map(|m| m.imap_uid).collect();
            for i in (0..sel.messages.len()).rev() {
                if !present.contains(&sel.messages[i].imap_uid) {
                    sel.messages.remove(i);
                    out.push_str(&format!("* {} EXPUNGE\r\n", i + 1));
                }
            }
        }
        let by_uid: std::collections::HashMap<u32, &MailboxEntry> =
            now.iter().map(|m| (m.imap_uid, m)).collect();
        for (i, m) in sel.messages.iter_mut().enumerate() {
            if let Some(n) = by_uid.get(&m.imap_uid) {
                if n.flags != m.flags {
                    m.flags = n.flags.clone();
                    out.push_str(&format!(
                        "* {} FETCH (FLAGS ({}) UID {})\r\n",
                        i + 1,
                        m.flags,
                        m.imap_uid
                    ));
                }
            }
        }
        let last = sel.messages.last().map(|m| m.imap_uid).unwrap_or(0);
        let before = sel.messages.len();
        sel.messages
            .extend(now.into_iter().filter(|m| m.imap_uid > last));
        if sel.messages.len() != before {
            out.push_str(&format!("* {} EXISTS\r\n", sel.messages.len()));
        }
        let flags = folder_flags(&sel.messages);
        if flags != sel.flags {
            // A keyword new to the folder (RFC 3501 §7.2.6).
            out.insert_str(0, &format!("* FLAGS ({flags})\r\n"));
            sel.flags = flags;
        }
        self.codec.write(out.as_bytes());
    }

    async fn tls_handshake(&mut self) -> bool {
        let Some(acceptor) = self.tls.clone() else {
            return false;
        };
        let limit = TLS_TIMEOUT.min(self.deadline.saturating_duration_since(Instant::now()));
        match self.codec.tls_handshake(&acceptor, limit).await {
            Ok(()) => true,
            Err(e) => {
                info!(peer = %self.peer, error = %e, "imap TLS handshake failed");
                false
            }
        }
    }
}

/// Waits for the account's next mailbox change; false when the writer is
/// gone (the daemon is stopping).
async fn wait_changed(mail: &mut Option<watch::Receiver<u64>>) -> bool {
    match mail {
        Some(m) => m.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

fn privacy_required() -> imap_next::imap_types::response::Code<'static> {
    imap_next::imap_types::response::Code::Other(
        imap_next::imap_types::response::CodeOther::unvalidated(b"PRIVACYREQUIRED".as_ref()),
    )
}
