//! `device-sim provision`: the accounts of the devices of a run. Without `--api`, prints
//! `user:password` lines, the input of `broker passwd --bulk FILE`, so that a broker with a
//! password file accepts exactly them; with `--api URL`, stores them as database credentials
//! through the broker's admin API (`auth.database`).

use std::io::{self, BufWriter, Write};

use anyhow::{bail, Context, Result};
use broker::auth::password_file::check_user;
use serde_json::json;
use tokio::task::JoinSet;

use crate::cli::ProvisionArgs;
use crate::http::{encode, Api};

/// Credentials sent to the API at once (the broker hashes each, at tens of milliseconds).
const IN_FLIGHT: usize = 4;

/// The user names and passwords of the devices: client ids `PREFIX + number` from
/// `--start-number`, `--count` of them.
fn accounts(args: &ProvisionArgs) -> Result<Vec<(String, String)>> {
    let credentials = args.credentials()?;
    let mut accounts = Vec::new();
    for number in args.start_number..args.start_number.saturating_add(args.count) {
        let client_id = format!("{}{number}", args.prefix);
        // A password file cannot hold every user name (no ':', no control characters...).
        check_user(&client_id)
            .with_context(|| format!("client id {client_id:?} cannot be a user name"))?;
        if let Some(account) = credentials.for_device(&client_id) {
            accounts.push(account);
        }
    }
    Ok(accounts)
}

/// Provisions the devices of `args`: printed, or through the API with `--api`.
pub async fn provision(args: &ProvisionArgs) -> Result<()> {
    let accounts = accounts(args)?;
    match &args.api {
        Some(url) => {
            let api = Api::parse(url)?.with_token(args.api_token.clone())?;
            through_api(&api, accounts).await
        }
        None => print(&accounts),
    }
}

/// Writes one `user:password` line per device to standard output.
fn print(accounts: &[(String, String)]) -> Result<()> {
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for (user, password) in accounts {
        writeln!(out, "{user}:{password}").context("writing to standard output")?;
    }
    out.flush().context("writing to standard output")
}

/// Creates each account as a database credential, [`IN_FLIGHT`] at a time; an account that
/// exists gets its password set again. Says on standard error how many of each.
async fn through_api(api: &Api, accounts: Vec<(String, String)>) -> Result<()> {
    let (mut created, mut updated) = (0u64, 0u64);
    let mut tasks = JoinSet::new();
    let mut accounts = accounts.into_iter();
    loop {
        while tasks.len() < IN_FLIGHT {
            let Some((user, password)) = accounts.next() else {
                break;
            };
            let api = api.clone();
            tasks.spawn(async move { store(&api, &user, &password).await });
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        match done.context("a provisioning task failed")?? {
            Stored::Created => created += 1,
            Stored::Updated => updated += 1,
        }
    }
    eprintln!("device-sim: provisioned through the API: {created} created, {updated} updated.");
    Ok(())
}

/// What became of one account.
enum Stored {
    Created,
    Updated,
}

/// Creates `user`'s credential with `password`, or sets the password of the one it has.
async fn store(api: &Api, user: &str, password: &str) -> Result<Stored> {
    let path = "/api/v1/admin/credentials";
    let (status, body) = api
        .post(path, &json!({ "username": user, "password": password }))
        .await?;
    let rotate = format!("{path}/{}/rotate", encode(user));
    match status {
        201 => Ok(Stored::Created),
        409 => match api.post(&rotate, &json!({ "password": password })).await? {
            (200, _) => Ok(Stored::Updated),
            (status, body) => bail!(
                "POST {rotate}: HTTP {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ),
        },
        _ => bail!(
            "POST {path} for {user:?}: HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ),
    }
}
