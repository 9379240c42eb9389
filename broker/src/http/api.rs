//! The REST API's handlers, generic over the store backend. Their parameters come typed from
//! [`super::params`], their failures are [`ApiError`]s; counting and the router's own errors are
//! the layers' business ([`super::layers`]).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::params::{DeviceId, DevicesQuery, NodesQuery, Query, SessionsQuery};
use super::AppState;
use crate::metrics::metrics;
use crate::mqtt::LiveSessions;
use crate::store::{Device, PresenceStore, Session};

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
    fn new(device: Device, registry: &LiveSessions) -> Self {
        let live = device
            .online
            .then(|| registry.last_seen(&device.device_id))
            .flatten()
            .map(DateTime::<Utc>::from);
        let last_seen = live.or(device.disconnected_at.filter(|_| !device.online));
        Self { device, last_seen }
    }
}

/// `GET /api/v1/devices/{id}`: the device and its latest session.
pub async fn get_device<S: PresenceStore>(
    State(state): State<AppState<S>>,
    DeviceId(id): DeviceId,
) -> Result<impl IntoResponse, ApiError> {
    let _slot = state.queries.acquire().await?;
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

/// `GET /api/v1/devices`: a page of devices, by id.
pub async fn list_devices<S: PresenceStore>(
    State(state): State<AppState<S>>,
    Query(query): Query<DevicesQuery>,
) -> Result<Json<Value>, ApiError> {
    let _slot = state.queries.acquire().await?;
    let devices = state
        .store
        .devices(query.online, query.cursor.as_deref(), query.limit)
        .await?;
    let next_cursor = (devices.len() == query.limit as usize)
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

/// `GET /api/v1/devices/{id}/sessions`: the device's sessions, newest first.
pub async fn device_sessions<S: PresenceStore>(
    State(state): State<AppState<S>>,
    DeviceId(id): DeviceId,
    Query(query): Query<SessionsQuery>,
) -> Result<Json<Value>, ApiError> {
    let _slot = state.queries.acquire().await?;
    let sessions = state.store.sessions(&id, query.limit).await?;
    if sessions.is_empty() && state.store.device(&id).await?.is_none() {
        return Err(ApiError::NotFound(id));
    }
    Ok(Json(json!({ "device_id": id, "sessions": sessions })))
}

/// `GET /api/v1/stats`: totals (cached), and the connections of this node.
pub async fn stats<S: PresenceStore>(
    State(state): State<AppState<S>>,
) -> Result<Json<Value>, ApiError> {
    let stats = state.stats.get(&state.store).await?;
    Ok(Json(json!({
        "online": stats.online,
        "known_devices": stats.known_devices,
        "connects": stats.connects,
        "disconnects": stats.disconnects,
        "connected_to_this_node": state.registry.connected(),
    })))
}

/// `GET /api/v1/nodes`: boots of the broker nodes, newest first: when each started, when it
/// was last alive and whether it crashed (`recovered`: a later boot closed its sessions as
/// broker_restart).
pub async fn list_nodes<S: PresenceStore>(
    State(state): State<AppState<S>>,
    Query(query): Query<NodesQuery>,
) -> Result<Json<Value>, ApiError> {
    let _slot = state.queries.acquire().await?;
    let nodes = state
        .store
        .nodes(query.node_id.as_deref(), query.limit)
        .await?;
    Ok(Json(json!({ "nodes": nodes })))
}

/// `GET /readyz`: 200 once the migrations are applied and the store answers.
pub async fn readyz<S: PresenceStore>(State(state): State<AppState<S>>) -> Response {
    if !state.migrated.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": "migrations not applied yet" })),
        )
            .into_response();
    }
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
}

/// `GET /metrics`: every metric, in Prometheus text format.
pub async fn metrics_text() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics().render(),
    )
}
