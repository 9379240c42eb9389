//! The layers around the API router: request counting and JSON errors.
//!
//! Every request is counted in `heartwire_http_requests_total{route,status}` in one place,
//! [`count_requests`], the outermost layer. It learns the route from its answer: each route
//! marks its responses with the label it is counted under (`counted_as`); an answer without
//! a mark comes from the router itself (unknown route, wrong method) and counts as `other`.
//! /healthz and /metrics are marked as not counted, so that probes and scrapes do not drown
//! the API's numbers. (Request heads refused before routing never reach the router: the
//! listener counts those as `rejected`, through `count`.)

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::Extension;
use serde_json::json;

use crate::labels::{HttpRoute, StatusClass};
use crate::metrics::metrics;

/// The label a route's answers are counted under; `None`: not counted.
#[derive(Debug, Clone, Copy)]
struct Counted(Option<HttpRoute>);

/// `route`, with its answers marked to be counted under `label` (`None`: not counted).
pub(super) fn counted_as<S>(label: Option<HttpRoute>, route: MethodRouter<S>) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    // A route layer wraps the route's handlers only, not the 405 of a method it lacks: that
    // answer is the router's, and counts as `other`.
    route.route_layer(middleware::map_response_with_state(Counted(label), mark))
}

async fn mark(State(label): State<Counted>, response: Response) -> impl IntoResponse {
    (Extension(label), response)
}

/// Counts a request in `heartwire_http_requests_total` under `route` and `status`'s class.
pub(crate) fn count(route: HttpRoute, status: StatusCode) {
    metrics()
        .http_requests
        .inc(route, StatusClass::of(status.as_u16()));
}

/// Counts every request under the label its route marked its answer with, or as `other`.
pub async fn count_requests(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let label = response
        .extensions()
        .get::<Counted>()
        .map_or(Some(HttpRoute::Other), |counted| counted.0);
    if let Some(route) = label {
        count(route, response.status());
    }
    response
}

/// Turns an error answer that is not JSON (the router's 404 and 405, an extractor's plain-text
/// rejection) into `{"error": "..."}`, keeping its status and headers (`Allow` on a 405).
pub async fn json_errors(request: Request, next: Next) -> Response {
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
    let body = json!({ "error": message }).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}
