//! Direct reads of the broker's presence database for `device-sim verify --database-url`:
//! PostgreSQL (`boolean` online flag) or SQLite (`INTEGER` 0/1), the schema of
//! `migrations/{postgres,sqlite}/0001_presence.sql`. Only reads; never writes.

use std::collections::HashMap;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::verify::Presence;

const QUERY: &str = "SELECT device_id, online, last_reason FROM devices";

/// Every row of the `devices` table, by device id.
pub async fn devices(url: &str) -> Result<HashMap<String, Presence>> {
    let shown = redact(url);
    let rows: Vec<(String, bool, Option<String>)> =
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut conn = PgConnectOptions::from_str(url)
                .with_context(|| format!("bad --database-url {shown}"))?
                .connect()
                .await
                .with_context(|| format!("connecting to {shown}"))?;
            let rows = sqlx::query_as::<_, (String, bool, Option<String>)>(QUERY)
                .fetch_all(&mut conn)
                .await
                .with_context(|| format!("reading devices from {shown}"))?;
            let _ = conn.close().await;
            rows
        } else if url.starts_with("sqlite:") {
            // No create_if_missing: a wrong path is an error, not an empty database.
            let mut conn = SqliteConnectOptions::from_str(url)
                .with_context(|| format!("bad --database-url {shown}"))?
                .create_if_missing(false)
                .connect()
                .await
                .with_context(|| format!("opening {shown}"))?;
            let rows = sqlx::query_as::<_, (String, i64, Option<String>)>(QUERY)
                .fetch_all(&mut conn)
                .await
                .with_context(|| format!("reading devices from {shown}"))?;
            let _ = conn.close().await;
            rows.into_iter()
                .map(|(id, online, reason)| (id, online != 0, reason))
                .collect()
        } else {
            bail!("--database-url must start with postgres://, postgresql:// or sqlite:");
        };
    Ok(rows
        .into_iter()
        .map(|(id, online, last_reason)| {
            (
                id,
                Presence {
                    online,
                    last_reason,
                },
            )
        })
        .collect())
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:///tmp/b.db"), "sqlite:///tmp/b.db");
    }

    #[tokio::test]
    async fn unknown_scheme_and_missing_file_are_errors() {
        assert!(devices("mysql://x/y").await.is_err());
        assert!(devices("sqlite:///nonexistent/dir/b.db").await.is_err());
    }
}
