//! `broker passwd`: manages a password file as `mosquitto_passwd` does (the binary's
//! subcommand; the file format is `broker::auth::password_file`).
//!
//! New and changed users get argon2id hashes; every other line is kept byte for byte. Mosquitto
//! cannot read argon2id lines: to keep a file usable by Mosquitto, manage it with
//! `mosquitto_passwd` instead.

use std::io::{self, BufRead, IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use broker::auth::password_file::{check_user, parse_bulk, Hash, PasswordFileEditor};

/// The arguments of `broker passwd` (its help is on `Command::Passwd` in main.rs).
#[derive(Debug, Args)]
pub struct PasswdArgs {
    /// Create the file, overwriting any existing one.
    #[arg(short = 'c', conflicts_with = "delete")]
    create: bool,
    /// Batch mode: the password is the third argument.
    #[arg(short = 'b', conflicts_with_all = ["delete", "bulk"])]
    batch: bool,
    /// Delete USER.
    #[arg(short = 'D', conflicts_with = "bulk")]
    delete: bool,
    /// Read `user:password` lines from standard input (blank lines and `#` comments skipped).
    #[arg(long)]
    bulk: bool,
    /// Store a SCRAM-SHA-256 verifier instead of an argon2id hash: the user can then also log
    /// in with MQTT 5 enhanced authentication (method SCRAM-SHA-256).
    #[arg(long)]
    scram: bool,
    /// The password file.
    file: PathBuf,
    /// The user name.
    #[arg(required_unless_present = "bulk")]
    user: Option<String>,
    /// The password (with -b only).
    #[arg(requires = "batch")]
    password: Option<String>,
}

/// Runs `broker passwd`.
pub fn run(args: PasswdArgs) -> anyhow::Result<()> {
    let file = args.file.as_path();
    if args.bulk {
        if args.user.is_some() {
            bail!("--bulk takes no user name: the users come from standard input");
        }
        let mut input = String::new();
        io::stdin()
            .read_to_string(&mut input)
            .context("cannot read standard input")?;
        let users = parse_bulk(&input, Path::new("<stdin>"))?;
        let mut editor = open(file, args.create)?;
        for (user, password) in &users {
            editor.set(user, &hash(password, args.scram)?)?;
        }
        editor.save(file)?;
        eprintln!("{}: {} users added or changed", file.display(), users.len());
        return Ok(());
    }
    let Some(user) = args.user.as_deref() else {
        bail!("a user name is needed (or --bulk)");
    };
    check_user(user)?;
    if args.delete {
        let mut editor = open(file, false)?;
        if !editor.remove(user) {
            bail!("{}: no user {user}", file.display());
        }
        editor.save(file)?;
        return Ok(());
    }
    let password = match (args.batch, args.password) {
        (true, Some(password)) => password,
        (true, None) => bail!("-b needs the password as the third argument"),
        (false, _) => read_password()?,
    };
    if password.is_empty() {
        bail!("empty password");
    }
    let mut editor = open(file, args.create)?;
    editor.set(user, &hash(&password, args.scram)?)?;
    editor.save(file)?;
    Ok(())
}

/// The file to edit: a new, empty one with `-c`, else the existing file (which must parse).
/// The entry for `password`: a SCRAM-SHA-256 verifier, or an argon2id hash.
fn hash(password: &str, scram: bool) -> anyhow::Result<Hash> {
    Ok(if scram {
        Hash::new_scram(password.as_bytes())?
    } else {
        Hash::new_argon2id(password.as_bytes())?
    })
}

fn open(file: &Path, create: bool) -> anyhow::Result<PasswordFileEditor> {
    if create {
        return Ok(PasswordFileEditor::new());
    }
    match PasswordFileEditor::open(file) {
        Err(broker::auth::password_file::PasswordFileError::Read { source, .. })
            if source.kind() == io::ErrorKind::NotFound =>
        {
            bail!("{}: no such file (use -c to create it)", file.display())
        }
        other => Ok(other?),
    }
}

/// The password: asked twice on the terminal without echo, or one line of standard input
/// (without its line ending) when that is not a terminal.
fn read_password() -> anyhow::Result<String> {
    if io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ").context("cannot read the password")?;
        let second =
            rpassword::prompt_password("Reenter password: ").context("cannot read the password")?;
        if first != second {
            bail!("passwords do not match");
        }
        Ok(first)
    } else {
        let mut line = String::new();
        io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        let password = line.strip_suffix('\n').unwrap_or(&line);
        Ok(password.strip_suffix('\r').unwrap_or(password).to_owned())
    }
}
