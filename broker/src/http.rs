//! The HTTP side: the REST API over the presence store, /metrics, /healthz and /readyz.
//!
//! [`app`] builds the router from its state, so tests call it without a socket. JSON bodies,
//! RFC 3339 UTC timestamps; errors are `{"error": "..."}` with 400 (bad parameter), 404
//! (unknown device) or 503 (store unavailable; internals are logged, not returned).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;

use crate::metrics::metrics;
use crate::mqtt::Registry;
use crate::store::{Device, PresenceStore, Session, Store, StoreError};

/// Largest page of devices or sessions.
pub const MAX_LIMIT: u32 = 1000;
/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 100;

/// What the handlers need.
#[derive(Clone)]
pub struct AppState {
    /// The presence store.
    pub store: Store,
    /// The broker's live sessions (for last_seen).
    pub registry: Registry,
    /// Set by the bridge once migrations are applied.
    pub migrated: Arc<AtomicBool>,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404.
    #[error("device {0:?} not found")]
    NotFound(String),
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 503; the cause is logged.
    #[error("presence store unavailable")]
    Store(#[from] StoreError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Store(error) => {
                tracing::warn!(%error, "API request failed on the store.");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// The router.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/devices/{id}", get(get_device))
        .route("/api/v1/devices/{id}/sessions", get(device_sessions))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/nodes", get(list_nodes))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

/// A device as the API shows it.
#[derive(Debug, Serialize)]
struct DeviceView {
    #[serde(flatten)]
    device: Device,
    /// When the device last sent a packet (from the broker's memory while it is connected
    /// here; otherwise when it went offline).
    last_seen: Option<DateTime<Utc>>,
}

impl DeviceView {
    fn new(device: Device, registry: &Registry) -> Self {
        let live = device
            .online
            .then(|| registry.last_seen(&device.device_id))
            .flatten()
            .map(DateTime::<Utc>::from);
        let last_seen = live.or(device.disconnected_at.filter(|_| !device.online));
        Self { device, last_seen }
    }
}

fn count(route: &'static str, status: StatusCode) {
    let class = match status.as_u16() {
        200..=299 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics()
        .http_requests
        .with_label_values(&[route, class])
        .inc();
}

fn counted<T: IntoResponse>(route: &'static str, result: Result<T, ApiError>) -> Response {
    let response = result.into_response();
    count(route, response.status());
    response
}

fn parse_limit(params: &HashMap<String, String>) -> Result<u32, ApiError> {
    match params.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "limit must be an integer between 1 and {MAX_LIMIT}, got {v:?}"
                ))
            }),
    }
}

fn check_params(params: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    match params.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => Err(ApiError::BadRequest(format!(
            "unknown query parameter {unknown:?}; allowed: {}",
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

async fn get_device(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let result = async {
        let device = state
            .store
            .device(&id)
            .await?
            .ok_or_else(|| ApiError::NotFound(id.clone()))?;
        let last_session = state.store.sessions(&id, 1).await?.into_iter().next();
        #[derive(Serialize)]
        struct Body {
            #[serde(flatten)]
            device: DeviceView,
            last_session: Option<Session>,
        }
        Ok(Json(Body {
            device: DeviceView::new(device, &state.registry),
            last_session,
        }))
    }
    .await;
    counted("device", result)
}

async fn list_devices(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        check_params(&params, &["online", "limit", "cursor"])?;
        let online = match params.get("online").map(String::as_str) {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "online must be true or false, got {other:?}"
                )))
            }
        };
        let limit = parse_limit(&params)?;
        let cursor = params.get("cursor").map(String::as_str);
        let devices = state.store.devices(online, cursor, limit).await?;
        let next_cursor = (devices.len() == limit as usize)
            .then(|| devices.last().map(|d| d.device_id.clone()))
            .flatten();
        let devices: Vec<DeviceView> = devices
            .into_iter()
            .map(|d| DeviceView::new(d, &state.registry))
            .collect();
        Ok(Json(
            json!({ "devices": devices, "next_cursor": next_cursor }),
        ))
    }
    .await;
    counted("devices", result)
}

async fn device_sessions(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        check_params(&params, &["limit"])?;
        let limit = parse_limit(&params)?;
        let sessions = state.store.sessions(&id, limit).await?;
        if sessions.is_empty() && state.store.device(&id).await?.is_none() {
            return Err(ApiError::NotFound(id.clone()));
        }
        Ok(Json(json!({ "device_id": id, "sessions": sessions })))
    }
    .await;
    counted("sessions", result)
}

async fn stats(State(state): State<AppState>) -> Response {
    let result = async {
        let stats = state.store.stats().await?;
        Ok::<_, ApiError>(Json(json!({
            "online": stats.online,
            "known_devices": stats.known_devices,
            "connects": stats.connects,
            "disconnects": stats.disconnects,
            "connected_to_this_node": state.registry.connected(),
        })))
    }
    .await;
    counted("stats", result)
}

/// Boots of the broker nodes, newest first: when each started, when it was last alive and
/// whether it crashed (`recovered`: a later boot closed its sessions as broker_restart).
async fn list_nodes(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        check_params(&params, &["node_id", "limit"])?;
        let limit = parse_limit(&params)?;
        let node_id = params.get("node_id").map(String::as_str);
        let nodes = state.store.nodes(node_id, limit).await?;
        Ok::<_, ApiError>(Json(json!({ "nodes": nodes })))
    }
    .await;
    counted("nodes", result)
}

async fn readyz(State(state): State<AppState>) -> Response {
    let response = if !state.migrated.load(Ordering::Acquire) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": "migrations not applied yet" })),
        )
            .into_response()
    } else {
        match state.store.ping().await {
            Ok(()) => Json(json!({ "ready": true })).into_response(),
            Err(error) => {
                tracing::debug!(%error, "Readiness check failed.");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({ "ready": false, "reason": "presence store unreachable" })),
                )
                    .into_response()
            }
        }
    };
    count("readyz", response.status());
    response
}

async fn metrics_text() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics().render(),
    )
}
