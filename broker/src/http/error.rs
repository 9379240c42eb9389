//! [`ApiError`]: why an API request failed, and its JSON answer (`{"error": "..."}`).

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::store::StoreError;
use crate::telemetry::LogLimiter;

/// Failed API requests are logged at most once per this interval (with the count held back).
const LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
static STORE_FAILED: LogLimiter = LogLimiter::new(LOG_INTERVAL);
static STORE_BUSY: LogLimiter = LogLimiter::new(LOG_INTERVAL);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404.
    #[error("device {0:?} not found")]
    NotFound(String),
    /// 404: no connection of this client id on this node.
    #[error("client {0:?} is not connected to this node")]
    NotConnected(String),
    /// 404: a ban to lift that is not in force.
    #[error("client id {0:?} is not banned")]
    NotBanned(String),
    /// 404: no credential of this user name (or only a revoked one).
    #[error("no credential for user name {0:?}")]
    NoCredential(String),
    /// 404: no backup of this name in the backup directory.
    #[error("no backup {0:?} in the backup directory")]
    NoBackup(String),
    /// 409: the request conflicts with what is stored.
    #[error("{0}")]
    Conflict(String),
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 500: the broker could not do what was asked (the cause is in the message and logged).
    #[error("{0}")]
    Failed(String),
    /// 503; the cause is logged.
    #[error("presence store unavailable")]
    Store(#[from] StoreError),
    /// 503: a request that shared a failed store query (the failure was logged by the request
    /// that made it).
    #[error("presence store unavailable")]
    Unavailable,
    /// 503 with `Retry-After`: every store query slot stayed taken for
    /// `http.store_queue_timeout`.
    #[error("too many concurrent requests to the presence store; retry in a moment")]
    Busy,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::NotFound(_)
            | ApiError::NotConnected(_)
            | ApiError::NotBanned(_)
            | ApiError::NoCredential(_)
            | ApiError::NoBackup(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Store(error) => {
                if let Some(suppressed) = STORE_FAILED.check() {
                    tracing::warn!(%error, suppressed, "API request failed on the store.");
                }
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Busy => {
                if let Some(suppressed) = STORE_BUSY.check() {
                    tracing::warn!(
                        suppressed,
                        "API requests refused: every store query slot stayed taken \
                         (http.max_store_queries, http.store_queue_timeout)."
                    );
                }
                let body = Json(json!({ "error": self.to_string() }));
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "1")],
                    body,
                )
                    .into_response();
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}
