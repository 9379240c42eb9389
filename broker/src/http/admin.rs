//! The admin endpoints (role admin): closing a client's connection and reloading the files.
//! More admin endpoints join them in [`routes`] (the bans of [`super::bans`] have a state of
//! their own and are merged into [`super::app`] beside them, behind the same guard).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Map, Value};

use super::access::Caller;
use super::error::ApiError;
use super::{endpoint, AppState, Guard};
use crate::labels::{DisconnectReason, HttpRoute};
use crate::state::backup;
use crate::store::PresenceStore;

/// The admin routes, each behind the admin-role check.
pub fn routes<S: PresenceStore>() -> Router<AppState<S>> {
    Router::new()
        .route(
            "/api/v1/admin/clients/{client_id}/kick",
            endpoint(Guard::Admin, Some(HttpRoute::Kick), post(kick::<S>)),
        )
        .route(
            "/api/v1/admin/reload",
            endpoint(Guard::Admin, Some(HttpRoute::Reload), post(reload::<S>)),
        )
        .route(
            "/api/v1/admin/state/backup",
            endpoint(
                Guard::Admin,
                Some(HttpRoute::StateBackup),
                post(backup::<S>),
            ),
        )
        .route(
            "/api/v1/admin/state/backups",
            endpoint(
                Guard::Admin,
                Some(HttpRoute::StateBackups),
                get(backups::<S>),
            ),
        )
        .route(
            "/api/v1/admin/state/backups/{name}",
            endpoint(
                Guard::Admin,
                Some(HttpRoute::StateBackups),
                get(download::<S>),
            ),
        )
}

/// The backup directory, or 409 when persistence is off.
fn backup_dir<S: PresenceStore>(state: &AppState<S>) -> Result<std::path::PathBuf, ApiError> {
    match &state.state {
        Some((_, dir)) => Ok(dir.clone()),
        None => Err(ApiError::Conflict(
            "persistence is off (persistence.mode = \"off\"): there are no broker state backups"
                .to_owned(),
        )),
    }
}

/// `GET /api/v1/admin/state/backups`: the backups in the backup directory
/// (`persistence.backup_dir`), newest first: `name`, `bytes`, `scheduled`. 409 when
/// persistence is off.
pub async fn backups<S: PresenceStore>(
    State(state): State<AppState<S>>,
) -> Result<Json<Value>, ApiError> {
    let dir = backup_dir(&state)?;
    let listed = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || backup::list(&dir))
            .await
            .map_err(|e| ApiError::Failed(format!("listing task failed: {e}")))?
            .map_err(|e| ApiError::Failed(format!("listing the backups failed: {e}")))?
    };
    Ok(Json(json!({
        "dir": dir.display().to_string(),
        "backups": listed,
    })))
}

/// `GET /api/v1/admin/state/backups/{name}`: the backup file `name`, streamed
/// (`application/octet-stream`, with its length), to keep it off the broker's machine and
/// restore it with `broker restore`. 400 for a name that is not a backup's, 404 when there is
/// none of that name, 409 when persistence is off.
pub async fn download<S: PresenceStore>(
    State(state): State<AppState<S>>,
    caller: Option<Extension<Caller>>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Response, ApiError> {
    let dir = backup_dir(&state)?;
    let Path(name) = path.map_err(|rejection| {
        ApiError::BadRequest(format!("bad backup name: {}", rejection.body_text()))
    })?;
    if !backup::is_backup_name(&name) {
        return Err(ApiError::BadRequest(format!(
            "{name:?} is not the name of a backup (state-<UTC time>[-scheduled].hwstate)"
        )));
    }
    let file = match tokio::fs::File::open(dir.join(&name)).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::NoBackup(name));
        }
        Err(e) => return Err(ApiError::Failed(format!("opening backup {name:?}: {e}"))),
    };
    let bytes = file
        .metadata()
        .await
        .map_err(|e| ApiError::Failed(format!("reading backup {name:?}: {e}")))?
        .len();
    tracing::info!(
        backup = name.as_str(),
        bytes,
        by = by(&caller),
        "Backup downloaded."
    );
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, bytes.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response())
}

/// `POST /api/v1/admin/state/backup`: writes a consistent copy of the broker state (retained
/// messages, persistent sessions and their queues, as of the request) to a new file in the
/// backup directory (`persistence.backup_dir`), written aside, fsynced and renamed. 200 with
/// its path and size; 409 when persistence is off. Restore it with `broker restore`.
pub async fn backup<S: PresenceStore>(
    State(state): State<AppState<S>>,
    caller: Option<Extension<Caller>>,
) -> Result<Json<Value>, ApiError> {
    let Some((store, dir)) = state.state.clone() else {
        return Err(ApiError::Conflict(
            "persistence is off (persistence.mode = \"off\"): there is no broker state to back up"
                .to_owned(),
        ));
    };
    let written =
        tokio::task::spawn_blocking(move || backup::write(&*store, &dir, backup::Trigger::Request))
            .await
            .map_err(|e| ApiError::Failed(format!("backup task failed: {e}")))?;
    match written {
        Ok(written) => {
            let elapsed_ms = written.elapsed.as_millis() as u64;
            tracing::info!(
                path = %written.path.display(),
                bytes = written.bytes,
                elapsed_ms,
                by = by(&caller),
                "Broker state backed up."
            );
            Ok(Json(json!({
                "path": written.path.display().to_string(),
                "bytes": written.bytes,
                "elapsed_ms": elapsed_ms,
            })))
        }
        Err(error) => {
            tracing::error!(%error, "Backing up the broker state failed.");
            Err(ApiError::Failed(format!("backup failed: {error}")))
        }
    }
}

/// The name of the token behind an admin request, for logs (`None`: no tokens file).
fn by(caller: &Option<Extension<Caller>>) -> Option<&str> {
    caller.as_ref().and_then(|Extension(c)| c.name.as_deref())
}

/// `POST /api/v1/admin/clients/{client_id}/kick`: closes the client's connection on this node
/// with reason `kicked` (202; it closes on its own task). 404 when it is not connected here.
pub async fn kick<S: PresenceStore>(
    State(state): State<AppState<S>>,
    caller: Option<Extension<Caller>>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Path(client_id) = path.map_err(|rejection| {
        ApiError::BadRequest(format!(
            "bad client id in the path ({}): percent-encode it as UTF-8",
            rejection.body_text()
        ))
    })?;
    if !state
        .registry
        .disconnect(&client_id, DisconnectReason::Kicked)
    {
        return Err(ApiError::NotConnected(client_id));
    }
    tracing::info!(
        client_id = client_id.as_str(),
        by = by(&caller),
        "Client kicked through the API."
    );
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "client_id": client_id, "reason": DisconnectReason::Kicked })),
    ))
}

/// `POST /api/v1/admin/reload`: re-reads the TLS certificate files, the password file, the ACL
/// file and the API tokens file, as SIGHUP does. 200 with each file's outcome (`reloaded`, `failed` with its
/// error, `not_configured`) and `ok`: whether none failed.
pub async fn reload<S: PresenceStore>(
    State(state): State<AppState<S>>,
    caller: Option<Extension<Caller>>,
) -> Json<Value> {
    tracing::info!(by = by(&caller), "Reload asked for through the API.");
    let outcomes = state.reloader.reload("API").await;
    let ok = outcomes
        .iter()
        .all(|(_, o)| !matches!(o, crate::reload::Outcome::Failed { .. }));
    let files: Map<String, Value> = outcomes
        .into_iter()
        .map(|(key, outcome)| {
            (
                key.to_owned(),
                serde_json::to_value(outcome).unwrap_or(Value::Null),
            )
        })
        .collect();
    Json(json!({ "ok": ok, "files": files }))
}
