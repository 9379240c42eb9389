//! The admin endpoints of database credentials (`auth.database`): create, rotate, revoke and
//! list the per-device user names and passwords of the presence store's `credentials` table.
//!
//! - `POST /api/v1/admin/credentials` with `{"username", "password"?, "publish"?,
//!   "subscribe"?}`: 201 with the password (generated when not given: 32 random bytes,
//!   base64url). It is shown this once: the store keeps only its argon2id hash. 409 when the
//!   user name has a credential that is not revoked (a revoked one is replaced).
//! - `POST /api/v1/admin/credentials/{username}/rotate`, optionally with `{"password"}`: a new
//!   password (generated when not given), 200; the old one stops working. 404 without a
//!   credential. (With a password of one's own, provisioning can be repeated: create, and on
//!   409 rotate to the same password.)
//! - `DELETE /api/v1/admin/credentials/{username}`: revokes it (204). 404 without one.
//! - `GET /api/v1/admin/credentials?limit=&cursor=`: a page by user name, revoked ones
//!   included, never a hash.
//!
//! A change is told to the node's authentication at once ([`Auth::forget_credential`]); other
//! nodes see it within `auth.database_cache_ttl`. Passwords never reach a log.

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::params::{CredentialsQuery, Query};
use super::AppState;
use super::{endpoint, Guard};
use crate::auth::password_file::Hash;
use crate::auth::{valid_filter, Auth};
use crate::labels::{AuthMethod, HttpRoute};
use crate::store::{Credential, CredentialRecord, PresenceStore};

/// Longest user name (bytes).
const MAX_USERNAME: usize = 256;
/// Shortest and longest password given by the caller (bytes).
const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 8..=1024;
/// Most topic filters in one list.
const MAX_FILTERS: usize = 1000;

/// What the credential endpoints need besides the API's state.
#[derive(Clone)]
pub struct CredentialsAdmin<S> {
    /// A read-write pool (the API's own is read-only).
    pub store: S,
    /// Told which user name changed.
    pub auth: Arc<Auth>,
}

/// The credential routes (admin role), to be merged into [`super::app`]'s router.
pub fn routes<S: PresenceStore>() -> Router<AppState<S>> {
    let counted = |route| endpoint(Guard::Admin, Some(HttpRoute::AdminCredentials), route);
    Router::new()
        .route(
            "/api/v1/admin/credentials",
            counted(get(list::<S>).post(create::<S>)),
        )
        .route(
            "/api/v1/admin/credentials/{username}",
            counted(delete(revoke::<S>)),
        )
        .route(
            "/api/v1/admin/credentials/{username}/rotate",
            counted(post(rotate::<S>)),
        )
}

/// The optional body of `POST /api/v1/admin/credentials/{username}/rotate`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotation {
    password: Option<String>,
}

/// The body of `POST /api/v1/admin/credentials`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCredential {
    username: String,
    password: Option<String>,
    publish: Option<Vec<String>>,
    subscribe: Option<Vec<String>>,
}

fn admin<S: Clone>(state: &AppState<S>) -> Result<CredentialsAdmin<S>, ApiError> {
    state.credentials.clone().ok_or(ApiError::Unavailable)
}

fn check_username(username: &str) -> Result<(), ApiError> {
    if username.is_empty() || username.len() > MAX_USERNAME {
        return Err(ApiError::BadRequest(format!(
            "username must be 1 to {MAX_USERNAME} bytes"
        )));
    }
    if username.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "username must not contain control characters".to_owned(),
        ));
    }
    Ok(())
}

fn check_filters(key: &str, filters: &Option<Vec<String>>) -> Result<(), ApiError> {
    let Some(filters) = filters else {
        return Ok(());
    };
    if filters.len() > MAX_FILTERS {
        return Err(ApiError::BadRequest(format!(
            "{key} holds at most {MAX_FILTERS} topic filters"
        )));
    }
    match filters.iter().find(|f| !valid_filter(f)) {
        Some(bad) => Err(ApiError::BadRequest(format!(
            "{key}: {bad:?} is not a valid MQTT topic filter"
        ))),
        None => Ok(()),
    }
}

/// A new random password: 32 bytes from the OS, base64url without padding (43 characters).
fn generate_password() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| ApiError::Unavailable)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// `given`, if it has an acceptable length, or a generated password.
fn password_or_generated(given: Option<String>) -> Result<String, ApiError> {
    match given {
        Some(p) if PASSWORD_LEN.contains(&p.len()) => Ok(p),
        Some(_) => Err(ApiError::BadRequest(format!(
            "password must be {} to {} bytes (or leave it out to have one generated)",
            PASSWORD_LEN.start(),
            PASSWORD_LEN.end()
        ))),
        None => generate_password(),
    }
}

/// The argon2id PHC string of `password`, hashed off the async runtime.
async fn hash(password: &str) -> Result<String, ApiError> {
    let password = password.as_bytes().to_vec();
    tokio::task::spawn_blocking(move || Hash::new_argon2id(&password))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|hash| hash.to_line_field())
        .ok_or(ApiError::Unavailable)
}

/// `POST /api/v1/admin/credentials`.
async fn create<S: PresenceStore>(
    State(state): State<AppState<S>>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let admin = admin(&state)?;
    let new: NewCredential = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "the body must be JSON {{\"username\", \"password\"?, \"publish\"?, \
             \"subscribe\"?}}: {e}"
        ))
    })?;
    check_username(&new.username)?;
    check_filters("publish", &new.publish)?;
    check_filters("subscribe", &new.subscribe)?;
    let password = password_or_generated(new.password)?;
    let now = Utc::now();
    let record = CredentialRecord {
        credential: Credential {
            username: new.username,
            publish: new.publish,
            subscribe: new.subscribe,
            created_at: now,
            updated_at: now,
            revoked_at: None,
        },
        password_hash: hash(&password).await?,
    };
    let _slot = state.queries.acquire().await?;
    if !admin.store.create_credential(&record).await? {
        return Err(ApiError::Conflict(format!(
            "user name {:?} has a credential: rotate or revoke it",
            record.credential.username
        )));
    }
    admin.auth.forget_credential(&record.credential.username);
    let mut body = serde_json::to_value(&record.credential).unwrap_or_default();
    body["password"] = Value::String(password);
    Ok((StatusCode::CREATED, Json(body)))
}

/// `POST /api/v1/admin/credentials/{username}/rotate`.
async fn rotate<S: PresenceStore>(
    State(state): State<AppState<S>>,
    Path(username): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let admin = admin(&state)?;
    check_username(&username)?;
    let rotation: Rotation = if body.is_empty() {
        Rotation::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::BadRequest(format!(
                "the body must be empty or JSON {{\"password\"}}: {e}"
            ))
        })?
    };
    let password = password_or_generated(rotation.password)?;
    let password_hash = hash(&password).await?;
    let now = Utc::now();
    let _slot = state.queries.acquire().await?;
    if !admin
        .store
        .rotate_credential(&username, &password_hash, now)
        .await?
    {
        return Err(ApiError::NoCredential(username));
    }
    admin.auth.forget_credential(&username);
    close_connections(&state, &username);
    Ok(Json(
        json!({ "username": username, "password": password, "updated_at": now }),
    ))
}

/// `DELETE /api/v1/admin/credentials/{username}`.
async fn revoke<S: PresenceStore>(
    State(state): State<AppState<S>>,
    Path(username): Path<String>,
) -> Result<StatusCode, ApiError> {
    let admin = admin(&state)?;
    check_username(&username)?;
    let _slot = state.queries.acquire().await?;
    if !admin.store.revoke_credential(&username, Utc::now()).await? {
        return Err(ApiError::NoCredential(username));
    }
    admin.auth.forget_credential(&username);
    close_connections(&state, &username);
    Ok(StatusCode::NO_CONTENT)
}

/// Closes the connections on this node logged in with `username`'s database credential,
/// which was just revoked or rotated (reason `not_authorized`); other nodes refuse the old
/// secret within `auth.database_cache_ttl` and keep their connections.
fn close_connections<S: PresenceStore>(state: &AppState<S>, username: &str) {
    let closed = state
        .registry
        .disconnect_logins(AuthMethod::Database, &HashSet::from([username]));
    if closed > 0 {
        tracing::info!(
            username,
            closed,
            "Connections of a revoked or rotated database credential closed (not_authorized)."
        );
    }
}

/// `GET /api/v1/admin/credentials`.
async fn list<S: PresenceStore>(
    State(state): State<AppState<S>>,
    Query(query): Query<CredentialsQuery>,
) -> Result<Json<Value>, ApiError> {
    let admin = admin(&state)?;
    let _slot = state.queries.acquire().await?;
    let credentials = admin
        .store
        .credentials(query.cursor.as_deref(), query.limit)
        .await?;
    let next_cursor = (credentials.len() == query.limit as usize)
        .then(|| credentials.last().map(|c| c.username.clone()))
        .flatten();
    Ok(Json(
        json!({ "credentials": credentials, "next_cursor": next_cursor }),
    ))
}
