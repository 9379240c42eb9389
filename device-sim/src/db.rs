//! Direct reads of the broker's presence database for `device-sim verify --database-url`:
//! PostgreSQL (`boolean` online flag) or SQLite (`INTEGER` 0/1), the schema of
//! `migrations/{postgres,sqlite}/0001_presence.sql`. Only reads; never writes.

use std::collections::HashMap;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

use broker::database_url::{redact, Backend, SCHEMES};

use crate::presence::Presence;

const QUERY: &str = "SELECT device_id, online, last_reason FROM devices";

/// Every row of the `devices` table, by device id.
pub async fn devices(url: &str) -> Result<HashMap<String, Presence>> {
    let shown = redact(url);
    let rows: Vec<(String, bool, Option<String>)> = match Backend::of_url(url) {
        Some(Backend::Postgres) => {
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
        }
        Some(Backend::Sqlite) => {
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
        }
        None => bail!("--database-url must start with {SCHEMES}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_scheme_and_missing_file_are_errors() {
        assert!(devices("mysql://x/y").await.is_err());
        assert!(devices("sqlite:///nonexistent/dir/b.db").await.is_err());
    }
}
