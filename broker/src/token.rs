//! `broker token NAME ROLE`: makes a new API token and the line of `http.api_tokens_file` that
//! lets it in (the binary's subcommand; the file format is `broker::http::tokens`).

use anyhow::{bail, Context};
use clap::Args;

use broker::http::tokens::{check_name, line, new_token, Role};

/// The arguments of `broker token` (its help is on `Command::Token` in main.rs).
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The token's name, shown in logs: letters, digits, '.', '_', '-' or '@' (at most 64).
    name: String,
    /// What the token may do: `read` (every endpoint but the admin ones) or `admin`.
    role: String,
}

/// Runs `broker token`: the token on standard output's first line, the file line on its
/// second (so that `broker token x read | tail -n 1 >> tokens` works), a hint on standard
/// error.
pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    if let Err(why) = check_name(&args.name) {
        bail!("token name {why}");
    }
    let Some(role) = Role::from_name(&args.role) else {
        bail!(
            "unknown role {:?}: expected one of {}",
            args.role,
            Role::NAMES
        );
    };
    let token = new_token().context("cannot make a token")?;
    eprintln!(
        "New {role} token {name}. Give the token (first line) to its user: it is shown only \
         now. Add the second line to the file of http.api_tokens_file, then reload (SIGHUP or \
         POST /api/v1/admin/reload).",
        name = args.name
    );
    println!("{token}");
    println!("{}", line(&args.name, role, &token));
    Ok(())
}
