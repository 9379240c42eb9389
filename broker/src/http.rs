//! The HTTP side: the REST API over the presence store, /metrics, /healthz and /readyz.
//!
//! [`app`] builds the router from its state, so tests call it without a socket. JSON bodies,
//! RFC 3339 UTC timestamps; errors are `{"error": "..."}` with 400 (bad parameter), 404
//! (unknown device) or 503 (store unavailable or busy; internals are logged, not returned).
//! Every other error the router produces (unknown route, wrong method, an extractor's
//! rejection) is turned into the same JSON shape ([`json_errors`]); request heads over the
//! limits are answered in JSON before routing ([`head`]).
//!
//! The API reads through a store pool of its own, never the bridge's, and at most
//! `http.max_store_queries` requests query it at once ([`queries`]); /api/v1/stats comes from a
//! short-lived cache.

pub mod head;
pub mod queries;
pub mod server;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;

use crate::config::HttpConfig;
use crate::labels::{HttpRoute, StatusClass};
use crate::metrics::metrics;
use crate::mqtt::Registry;
use crate::store::{Device, PresenceStore, Session, StoreError};
use crate::telemetry::LogLimiter;
use queries::{QueryLimit, StatsCache};

/// Largest page of devices or sessions.
pub const MAX_LIMIT: u32 = 1000;
/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 100;

/// What the handlers need.
#[derive(Clone)]
pub struct AppState<S> {
    /// The presence store: the API's own read-only pool.
    pub store: S,
    /// The broker's live sessions (for last_seen).
    pub registry: Registry,
    /// Set by the bridge once migrations are applied.
    pub migrated: Arc<AtomicBool>,
    /// Every handler that queries the store takes a slot here first.
    pub queries: Arc<QueryLimit>,
    /// The /api/v1/stats totals.
    pub stats: Arc<StatsCache>,
}

impl<S: PresenceStore> AppState<S> {
    /// State over `store` (a pool of `http.max_store_queries` + 2 connections: one for the
    /// /stats refresh, one for /readyz), with the query limit and stats cache of `config`.
    pub fn new(
        store: S,
        registry: Registry,
        migrated: Arc<AtomicBool>,
        config: &HttpConfig,
    ) -> Self {
        Self {
            store,
            registry,
            migrated,
            queries: Arc::new(QueryLimit::new(
                config.max_store_queries,
                config.store_queue_timeout,
            )),
            stats: Arc::new(StatsCache::new(config.stats_cache_ttl)),
        }
    }
}

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
    /// 400.
    #[error("{0}")]
    BadRequest(String),
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
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
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

/// The router.
pub fn app<S: PresenceStore>(state: AppState<S>) -> Router {
    let routes = Router::new()
        .route("/api/v1/devices", get(list_devices::<S>))
        .route("/api/v1/devices/{id}", get(get_device::<S>))
        .route("/api/v1/devices/{id}/sessions", get(device_sessions::<S>))
        .route("/api/v1/stats", get(stats::<S>))
        .route("/api/v1/nodes", get(list_nodes::<S>))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<S>))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    // Around the whole router rather than each route, so that it sees their answers complete
    // (a route adds the `Allow` header of its 405 itself).
    Router::new()
        .fallback_service(routes)
        .layer(middleware::from_fn(json_errors))
}

/// Turns an error answer that is not JSON (the router's 404 and 405, an extractor's plain-text
/// rejection) into `{"error": "..."}`, keeping its status and headers (`Allow` on a 405).
async fn json_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = match status {
        StatusCode::NOT_FOUND => format!("no such resource: {path}"),
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            format!("method {method} not allowed on {path}; allowed: {allowed}")
        }
        _ if !text.is_empty() => text,
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    count(HttpRoute::Other, status);
    let body = json!({ "error": message }).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
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

/// Counts a request in `heartwire_http_requests_total` under `route` and `status`'s class.
pub(crate) fn count(route: HttpRoute, status: StatusCode) {
    metrics()
        .http_requests
        .inc(route, StatusClass::of(status.as_u16()));
}

fn counted<T: IntoResponse>(route: HttpRoute, result: Result<T, ApiError>) -> Response {
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

/// The `{id}` of a device path; a 400 when it is not UTF-8 once percent-decoded.
fn device_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id).map_err(|rejection| {
        ApiError::BadRequest(format!(
            "bad device id in the path ({}): percent-encode it as UTF-8",
            rejection.body_text()
        ))
    })
}

/// The query string's parameters, strictly: percent-escapes must be valid and decode to
/// UTF-8, and no parameter may be given twice (a lenient decoder would silently change the
/// value asked for).
fn query_params(query: Option<&str>) -> Result<HashMap<String, String>, ApiError> {
    let mut params = HashMap::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key)
            .ok_or_else(|| ApiError::BadRequest(format!("bad query parameter name {key:?}")))?;
        let value = percent_decode(value).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "bad value {value:?} of query parameter {key:?}: percent-encode it as UTF-8"
            ))
        })?;
        if params.contains_key(&key) {
            return Err(ApiError::BadRequest(format!(
                "query parameter {key:?} given more than once"
            )));
        }
        params.insert(key, value);
    }
    Ok(params)
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space); `None` on a bad escape or
/// bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

async fn get_device<S: PresenceStore>(
    State(state): State<AppState<S>>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let result = async {
        let id = device_id(path)?;
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
    .await;
    counted(HttpRoute::Device, result)
}

async fn list_devices<S: PresenceStore>(
    State(state): State<AppState<S>>,
    RawQuery(query): RawQuery,
) -> Response {
    let result = async {
        let params = query_params(query.as_deref())?;
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
        let _slot = state.queries.acquire().await?;
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
    counted(HttpRoute::Devices, result)
}

async fn device_sessions<S: PresenceStore>(
    State(state): State<AppState<S>>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Response {
    let result = async {
        let id = device_id(path)?;
        let params = query_params(query.as_deref())?;
        check_params(&params, &["limit"])?;
        let limit = parse_limit(&params)?;
        let _slot = state.queries.acquire().await?;
        let sessions = state.store.sessions(&id, limit).await?;
        if sessions.is_empty() && state.store.device(&id).await?.is_none() {
            return Err(ApiError::NotFound(id.clone()));
        }
        Ok(Json(json!({ "device_id": id, "sessions": sessions })))
    }
    .await;
    counted(HttpRoute::Sessions, result)
}

async fn stats<S: PresenceStore>(State(state): State<AppState<S>>) -> Response {
    let result = async {
        let stats = state.stats.get(&state.store).await?;
        Ok::<_, ApiError>(Json(json!({
            "online": stats.online,
            "known_devices": stats.known_devices,
            "connects": stats.connects,
            "disconnects": stats.disconnects,
            "connected_to_this_node": state.registry.connected(),
        })))
    }
    .await;
    counted(HttpRoute::Stats, result)
}

/// Boots of the broker nodes, newest first: when each started, when it was last alive and
/// whether it crashed (`recovered`: a later boot closed its sessions as broker_restart).
async fn list_nodes<S: PresenceStore>(
    State(state): State<AppState<S>>,
    RawQuery(query): RawQuery,
) -> Response {
    let result = async {
        let params = query_params(query.as_deref())?;
        check_params(&params, &["node_id", "limit"])?;
        let limit = parse_limit(&params)?;
        let node_id = params.get("node_id").map(String::as_str);
        let _slot = state.queries.acquire().await?;
        let nodes = state.store.nodes(node_id, limit).await?;
        Ok::<_, ApiError>(Json(json!({ "nodes": nodes })))
    }
    .await;
    counted(HttpRoute::Nodes, result)
}

async fn readyz<S: PresenceStore>(State(state): State<AppState<S>>) -> Response {
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
    count(HttpRoute::Readyz, response.status());
    response
}

async fn metrics_text() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics().render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded_strictly() {
        let params = query_params(Some("limit=5&cursor=a%2Fb+c&online=")).expect("valid");
        assert_eq!(params["limit"], "5");
        assert_eq!(params["cursor"], "a/b c");
        assert_eq!(params["online"], "");
        assert!(query_params(None).expect("none").is_empty());
        assert!(query_params(Some("&&")).expect("empty pairs").is_empty());
        for bad in [
            "cursor=%FF",
            "cursor=%G1",
            "cursor=%4",
            "limit=1&limit=2",
            "%C3%28=1",
        ] {
            let error = query_params(Some(bad)).expect_err(bad);
            assert!(matches!(error, ApiError::BadRequest(_)), "{bad}");
        }
        assert_eq!(
            query_params(Some("id=caf%C3%A9")).expect("UTF-8")["id"],
            "café"
        );
    }
}
