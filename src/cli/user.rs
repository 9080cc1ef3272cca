//! `outpost user add|passwd|del|list`.

use std::io::BufRead;
use std::process::ExitCode;

use super::{exit, open_store, UserCommand};
use crate::auth;
use crate::config::Config;
use crate::queue::StoreError;

pub fn run(config: &Config, cmd: &UserCommand) -> ExitCode {
    let store = match open_store(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let result = match cmd {
        UserCommand::Add {
            name,
            password_stdin,
        } => check_name(name)
            .and_then(|_| read_password(*password_stdin))
            .and_then(|pw| hash(&pw))
            .and_then(|h| store.add_user(name, &h).map_err(store_failure))
            .map(|_| println!("added {name}")),
        UserCommand::Passwd {
            name,
            password_stdin,
        } => read_password(*password_stdin)
            .and_then(|pw| hash(&pw))
            .and_then(|h| store.set_password(name, &h).map_err(store_failure))
            .map(|_| println!("password changed for {name}")),
        UserCommand::Del { name, force } => store
            .delete_user(name, *force)
            .map_err(store_failure)
            .map(|_| println!("deleted {name}")),
        UserCommand::List => store.users().map_err(store_failure).map(|users| {
            for u in users {
                println!("{}", u.name);
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err((code, msg)) => {
            eprintln!("outpost: {msg}");
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

fn store_failure(e: StoreError) -> Failure {
    let code = match e {
        StoreError::NoSuchUser(_) => exit::NOUSER,
        StoreError::UserExists(_) | StoreError::UserHasMail(..) => exit::DATAERR,
        _ => exit::IOERR,
    };
    (code, e.to_string())
}

fn check_name(name: &str) -> Result<(), Failure> {
    if auth::valid_user_name(name) {
        Ok(())
    } else {
        Err((
            exit::USAGE,
            format!("`{name}` cannot be an account name: use letters, digits, '.', '_', '-' or '+' (it is also the mailbox's local part)"),
        ))
    }
}

fn hash(pw: &str) -> Result<String, Failure> {
    auth::hash_password(pw).map_err(|e| (exit::SOFTWARE, format!("cannot hash the password: {e}")))
}

fn read_password(from_stdin: bool) -> Result<String, Failure> {
    let pw = if from_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map_err(|e| {
            (
                exit::IOERR,
                format!("reading the password from standard input: {e}"),
            )
        })?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else {
        let a = rpassword::prompt_password("Password: ").map_err(|e| {
            (
                exit::IOERR,
                format!("cannot prompt for a password ({e}); use --password-stdin"),
            )
        })?;
        let b = rpassword::prompt_password("Again: ").map_err(|e| {
            (
                exit::IOERR,
                format!("cannot prompt for a password ({e}); use --password-stdin"),
            )
        })?;
        if a != b {
            return Err((
                exit::DATAERR,
                "the two passwords differ; nothing changed".into(),
            ));
        }
        a
    };
    if pw.is_empty() {
        return Err((exit::DATAERR, "empty password; nothing changed".into()));
    }
    Ok(pw)
}
