//! `device-sim provision`: prints `user:password` lines for the devices of a run, the input of
//! `broker passwd --bulk FILE`, so that a broker with authentication accepts exactly them.

use std::io::{self, BufWriter, Write};

use anyhow::{Context, Result};
use broker::auth::password_file::check_user;

use crate::cli::ProvisionArgs;

/// Writes one `user:password` line per device to standard output: client ids `PREFIX + number`
/// from `--start-number`, `--count` of them.
pub fn provision(args: &ProvisionArgs) -> Result<()> {
    let credentials = args.credentials()?;
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for number in args.start_number..args.start_number.saturating_add(args.count) {
        let client_id = format!("{}{number}", args.prefix);
        // A password file cannot hold every user name (no ':', no control characters...).
        check_user(&client_id)
            .with_context(|| format!("client id {client_id:?} cannot be a user name"))?;
        let Some((user, password)) = credentials.for_device(&client_id) else {
            continue;
        };
        writeln!(out, "{user}:{password}").context("writing to standard output")?;
    }
    out.flush().context("writing to standard output")
}
