//! Who may use which endpoint: the bearer-token check that wraps each protected route.
//!
//! Each route is wrapped by one of [`read`], [`admin`] or [`metrics`] (see `endpoint` in
//! [`super`]); /healthz and /readyz are not. They find the [`ApiAccess`] in the request's
//! extensions (the router's outermost layer puts it there). Without a tokens file every request
//! is let in. With one, a request without a valid token gets 401 with `WWW-Authenticate:
//! Bearer`, a token whose role is below the endpoint's gets 403; both are counted in
//! `heartwire_http_requests_refused_total` by reason and logged at most once per interval
//! (never the token). A request let in carries its [`Caller`] in its extensions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

use super::tokens::{ApiAccess, Denied, Role};
use crate::labels::ApiRefusal;
use crate::metrics::metrics;
use crate::telemetry::LogLimiter;

pub use super::tokens::Caller;

/// Refused requests are logged at most once per this interval (with the count held back).
const LOG_INTERVAL: Duration = Duration::from_secs(10);
static UNAUTHORIZED: LogLimiter = LogLimiter::new(LOG_INTERVAL);
static FORBIDDEN: LogLimiter = LogLimiter::new(LOG_INTERVAL);

/// Lets in a token of any role (or anyone, without a tokens file).
pub async fn read(access: Extension<Arc<ApiAccess>>, request: Request, next: Next) -> Response {
    guard(&access, Role::Read, request, next).await
}

/// Lets in a token of role admin (or anyone, without a tokens file).
pub async fn admin(access: Extension<Arc<ApiAccess>>, request: Request, next: Next) -> Response {
    guard(&access, Role::Admin, request, next).await
}

/// /metrics: open with `http.metrics_public = true`, else as [`read`].
pub async fn metrics_scrape(
    access: Extension<Arc<ApiAccess>>,
    request: Request,
    next: Next,
) -> Response {
    if access.metrics_public() {
        return next.run(request).await;
    }
    guard(&access, Role::Read, request, next).await
}

async fn guard(access: &ApiAccess, needed: Role, mut request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match access.check(authorization, needed) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(denied) => refuse(&request, denied),
    }
}

fn refuse(request: &Request, denied: Denied) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.to_string());
    let method = request.method().as_str();
    let path = request.uri().path();
    match denied {
        Denied::Unauthorized(why) => {
            metrics().http_refused.inc(ApiRefusal::Unauthorized);
            if let Some(suppressed) = UNAUTHORIZED.check() {
                tracing::warn!(
                    peer = peer.as_deref(),
                    method,
                    path,
                    why,
                    suppressed,
                    "API request refused: no valid bearer token (401)."
                );
            }
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"heartwire\"")],
                Json(json!({
                    "error": format!("{why}: send Authorization: Bearer TOKEN with a token of http.api_tokens_file")
                })),
            )
                .into_response()
        }
        Denied::Forbidden { name, role } => {
            metrics().http_refused.inc(ApiRefusal::Forbidden);
            if let Some(suppressed) = FORBIDDEN.check() {
                tracing::warn!(
                    peer = peer.as_deref(),
                    method,
                    path,
                    token = &*name,
                    role = role.as_str(),
                    suppressed,
                    "API request refused: the token's role may not use this endpoint (403)."
                );
            }
            (
                StatusCode::FORBIDDEN,
                Json(json!({
                    "error": format!("token {name} has role {role}; this endpoint needs role admin")
                })),
            )
                .into_response()
        }
    }
}
