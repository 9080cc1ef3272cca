//! The command line: argument definitions and the commands themselves.

mod check_upstream;
mod flush;
mod mailbox;
mod queue;
pub mod sendmail;
pub mod status;
mod user;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};

/// sysexits.h codes used by the commands.
pub mod exit {
    pub const OK: u8 = 0;
    pub const USAGE: u8 = 64;
    pub const DATAERR: u8 = 65;
    pub const NOINPUT: u8 = 66;
    pub const NOUSER: u8 = 67;
    pub const UNAVAILABLE: u8 = 69;
    pub const SOFTWARE: u8 = 70;
    pub const CANTCREAT: u8 = 73;
    pub const IOERR: u8 = 74;
    pub const TEMPFAIL: u8 = 75;
    pub const CONFIG: u8 = 78;
}

#[derive(Debug, Parser)]
#[command(
    name = "outpost",
    version,
    about = "Store-and-forward mail gateway for branch offices"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "OUTPOST_CONFIG", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway in the foreground.
    Serve,
    /// Check the configuration and print the effective one.
    CheckConfig,
    /// Try the upstream step by step as a flush would (DNS/MX, connect,
    /// greeting, EHLO, STARTTLS and its certificate, AUTH, MAIL/RSET) and
    /// say what fails and how to fix it. Sends no mail. Exit 0, 75 (try
    /// later) or 78 (fix the configuration).
    CheckUpstream,
    /// Send what is due to the upstream now: through the running daemon, or
    /// in this process when none runs. Exit 75 when the link is down.
    Flush {
        /// Ignore retry back-off: try everything pending.
        #[arg(long)]
        all: bool,
        /// Only recipients in this domain (repeatable).
        #[arg(long = "domain", value_name = "D")]
        domains: Vec<String>,
        /// Do not ask the upstream to release inbound mail (ETRN) afterwards.
        #[arg(long, conflicts_with = "etrn_only")]
        no_etrn: bool,
        /// Send nothing; only ask the upstream to release inbound mail (ETRN).
        #[arg(long)]
        etrn_only: bool,
        /// One JSON object with the summary and every message's outcome.
        #[arg(long)]
        json: bool,
    },
    /// Link state, last flush, queue counts, oldest message, next flush.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Look at and manage the queue.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Accounts for submission AUTH and POP3.
    #[command(subcommand)]
    User(UserCommand),
    /// Local mailboxes.
    #[command(subcommand)]
    Mailbox(MailboxCommand),
    /// Write the manual pages (outpost.1 and one per command) into DIR.
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// Submit a message from standard input, as sendmail does: -t -i -oi
    /// -f FROM -F NAME -bs -bp -q and the other common options. Also what
    /// the binary does when invoked as `sendmail`.
    Sendmail {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List messages still queued (mailq style).
    List {
        /// One JSON array, for scripts.
        #[arg(long)]
        json: bool,
        /// Only messages with a recipient in this state.
        #[arg(long)]
        state: Option<crate::queue::RecipientState>,
    },
    /// Envelope, headers, per-recipient state and history of one message.
    Show { id: String },
    /// Remove messages from the queue without a word to anyone.
    Delete(Selection),
    /// Keep messages from being sent until released.
    Hold(Selection),
    /// Let held messages (and ones held as delivery uncertain) go again.
    Release(Selection),
    /// Make messages due now, ignoring their back-off.
    Retry(Selection),
    /// Return messages to their senders with a DSN (5.0.0) and stop trying.
    Bounce(Selection),
}

#[derive(Debug, Subcommand)]
pub enum MailboxCommand {
    /// A user's folders (messages and size of each), then the messages
    /// of one folder: id, UID, flags, size, date, from, subject.
    List {
        user: String,
        /// The folder whose messages to show.
        #[arg(long, default_value = "INBOX")]
        folder: String,
    },
}

/// Which messages an administrative command touches.
#[derive(Debug, clap::Args)]
pub struct Selection {
    /// Queue ids (see `outpost queue list`).
    #[arg(required_unless_present = "all")]
    pub ids: Vec<String>,
    /// Every message in the queue.
    #[arg(long, conflicts_with = "ids")]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add an account.
    Add {
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change an account's password.
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove an account (with mail in its mailbox: only with --force).
    Del {
        name: String,
        /// Delete the account's mailbox with it.
        #[arg(long)]
        force: bool,
    },
    /// List accounts.
    List,
}

/// Loads the configuration or prints why not.
pub fn load_config(cli: &Cli) -> Result<Config, ExitCode> {
    Config::load(&cli.config).map_err(|e| {
        eprintln!("outpost: {e}");
        ExitCode::from(exit::CONFIG)
    })
}

/// Runs a command other than `serve` (which needs the runtime; see main.rs).
pub fn run(cli: &Cli) -> ExitCode {
    match &cli.command {
        Command::Serve => unreachable!("serve is run by main"),
        Command::CheckConfig => check_config(cli),
        Command::CheckUpstream => match load_config(cli) {
            Ok(c) => check_upstream::run(&c),
            Err(code) => code,
        },
        Command::Flush {
            all,
            domains,
            no_etrn,
            etrn_only,
            json,
        } => match load_config(cli) {
            Ok(c) => flush::run(
                c,
                crate::relay::flush::FlushOptions {
                    all: *all,
                    domains: domains.clone(),
                    no_etrn: *no_etrn,
                    etrn_only: *etrn_only,
                },
                *json,
            ),
            Err(code) => code,
        },
        Command::Status { json } => match load_config(cli) {
            Ok(c) => status::run(&c, *json),
            Err(code) => code,
        },
        Command::Queue(q) => match load_config(cli) {
            Ok(c) => queue::run(&c, q),
            Err(code) => code,
        },
        Command::User(u) => match load_config(cli) {
            Ok(c) => user::run(&c, u),
            Err(code) => code,
        },
        Command::Sendmail { args } => sendmail_main(&cli.config, args),
        Command::Man { dir } => match write_man_pages(dir) {
            Ok(n) => {
                println!("{n} manual pages written to {}", dir.display());
                ExitCode::from(exit::OK)
            }
            Err(e) => {
                eprintln!("outpost: writing manual pages to {}: {e}", dir.display());
                ExitCode::from(exit::CANTCREAT)
            }
        },
        Command::Mailbox(MailboxCommand::List { user, folder }) => match load_config(cli) {
            Ok(c) => mailbox::list(&c, user, folder),
            Err(code) => code,
        },
    }
}

/// `outpost sendmail ARGS` and the binary named `sendmail`: `-C FILE`
/// overrides the configuration path.
pub fn sendmail_main(config_path: &std::path::Path, raw: &[String]) -> ExitCode {
    let args = match sendmail::parse_args(raw) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sendmail: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| config_path.to_path_buf());
    let (config, unread) = match Config::load(&path) {
        Ok(c) => (c, None),
        // Submitting needs only the socket: when this user may not read
        // the file (a configuration kept private), try the default socket
        // and say why only if that fails too.
        Err(e)
            if e.unreadable
                && matches!(args.mode, sendmail::Mode::Deliver | sendmail::Mode::Smtp) =>
        {
            match Config::defaults() {
                Ok(c) => (c, Some(e.to_string())),
                Err(_) => {
                    eprintln!("sendmail: {e}");
                    return ExitCode::from(exit::CONFIG);
                }
            }
        }
        Err(e) => {
            eprintln!("sendmail: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    match args.mode {
        sendmail::Mode::ListQueue => queue::run(
            &config,
            &QueueCommand::List {
                json: false,
                state: None,
            },
        ),
        sendmail::Mode::Flush => {
            flush::run(config, crate::relay::flush::FlushOptions::default(), false)
        }
        _ => sendmail::run(&config, &args, unread.as_deref()),
    }
}

/// outpost.1, and outpost-COMMAND.1 for every command (and subcommand),
/// generated from the argument definitions.
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<usize> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    fn write(
        cmd: clap::Command,
        name: String,
        dir: &std::path::Path,
        n: &mut usize,
    ) -> std::io::Result<()> {
        let cmd = cmd.name(name.clone());
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
        std::fs::write(dir.join(format!("{name}.1")), out)?;
        *n += 1;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub.clone(), format!("{name}-{}", sub.get_name()), dir, n)?;
        }
        Ok(())
    }
    let mut n = 0;
    write(Cli::command(), "outpost".into(), dir, &mut n)?;
    Ok(n)
}

fn check_config(cli: &Cli) -> ExitCode {
    match load_config(cli) {
        Ok(c) => {
            // Warnings, not errors: the configuration is usable, and a
            // person decides (the exit status stays 0 for ExecStartPre).
            for w in c.secret_warnings() {
                eprintln!("outpost: warning: {w}");
            }
            println!("# {}: ok. Effective configuration:", cli.config.display());
            print!("{}", c.to_toml());
            ExitCode::from(exit::OK)
        }
        Err(code) => code,
    }
}

/// A runtime for a command that talks to the network or the daemon.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("outpost: cannot start the runtime: {e}");
            ExitCode::from(exit::SOFTWARE)
        })
}

/// Opens the store named by the configuration, or says why not.
fn open_store(config: &Config) -> Result<crate::queue::Store, ExitCode> {
    crate::queue::Store::open(&config.store.path).map_err(|e| {
        eprintln!("outpost: {e} (store.path)");
        ExitCode::from(exit::CANTCREAT)
    })
}
