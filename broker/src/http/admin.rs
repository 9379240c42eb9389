//! The admin endpoints (role admin): closing a client's connection and reloading the files.
//! More admin endpoints join them in [`routes`] (the bans of [`super::bans`] have a state of
//! their own and are merged into [`super::app`] beside them, behind the same guard).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
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
