//! The HTTP side: the REST API over the presence store, /metrics, /healthz and /readyz.
//!
//! [`app`] builds the router from its state, so tests call it without a socket; it is generic
//! over the store backend, like the rest of the broker. JSON bodies, RFC 3339 UTC timestamps;
//! errors are `{"error": "..."}` with 400 (bad parameter), 404 (unknown device or credential),
//! 409 (a credential exists) or 503 (store unavailable or busy; internals are logged, not
//! returned).
//!
//! - [`api`]: the handlers, and [`ApiError`], the JSON answer of a failed request;
//! - [`credentials`]: the admin endpoints of database credentials (create, rotate, revoke,
//!   list), which write through a read-write pool ([`AppState::with_credentials`]);
//! - [`params`]: the typed parameters of each endpoint, decoded strictly (a query struct per
//!   endpoint, the device id of the path);
//! - [`layers`]: the two layers around the router: one counts every request in
//!   `heartwire_http_requests_total` under its route's label, the other turns every error the
//!   router produces (unknown route, wrong method) into the same JSON shape;
//! - [`queries`]: the API reads through a store pool of its own, never the bridge's, and at most
//!   `http.max_store_queries` requests query it at once; /api/v1/stats comes from a
//!   short-lived cache;
//! - [`head`] and [`server`]: the listener, which refuses request heads over the limits in JSON
//!   before routing.

pub mod api;
pub mod credentials;
pub mod error;
pub mod head;
pub mod layers;
pub mod params;
pub mod queries;
pub mod server;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::middleware;
use axum::routing::get;
use axum::Router;

use crate::config::HttpConfig;
use crate::labels::HttpRoute;
use crate::mqtt::LiveSessions;
use crate::store::PresenceStore;
use layers::counted_as;
use queries::{QueryLimit, StatsCache};

pub use error::ApiError;

/// What the handlers need.
#[derive(Clone)]
pub struct AppState<S> {
    /// The presence store: the API's own read-only pool.
    pub store: S,
    /// The broker's live sessions (for last_seen).
    pub registry: LiveSessions,
    /// Set by the bridge once migrations are applied.
    pub migrated: Arc<AtomicBool>,
    /// Every handler that queries the store takes a slot here first.
    pub queries: Arc<QueryLimit>,
    /// The /api/v1/stats totals.
    pub stats: Arc<StatsCache>,
    /// What the credential endpoints write through; `None`: they answer 503.
    pub credentials: Option<credentials::CredentialsAdmin<S>>,
}

impl<S: PresenceStore> AppState<S> {
    /// State over `store` (a pool of `http.max_store_queries` + 2 connections: one for the
    /// /stats refresh, one for /readyz), with the query limit and stats cache of `config`.
    pub fn new(
        store: S,
        registry: LiveSessions,
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
            credentials: None,
        }
    }

    /// This state with the credential endpoints writing through `store` (a read-write pool)
    /// and telling `auth` what they changed.
    pub fn with_credentials(mut self, store: S, auth: Arc<crate::auth::Auth>) -> Self {
        self.credentials = Some(credentials::CredentialsAdmin { store, auth });
        self
    }
}

/// The router: each route with the label its requests are counted under (none for the probes
/// and the scrape), inside the counting and JSON-error layers.
pub fn app<S: PresenceStore>(state: AppState<S>) -> Router {
    use HttpRoute::{Device, Devices, Nodes, Readyz, Sessions, Stats};
    let routes = Router::new()
        .route(
            "/api/v1/devices",
            counted_as(Some(Devices), get(api::list_devices::<S>)),
        )
        .route(
            "/api/v1/devices/{id}",
            counted_as(Some(Device), get(api::get_device::<S>)),
        )
        .route(
            "/api/v1/devices/{id}/sessions",
            counted_as(Some(Sessions), get(api::device_sessions::<S>)),
        )
        .route(
            "/api/v1/stats",
            counted_as(Some(Stats), get(api::stats::<S>)),
        )
        .route(
            "/api/v1/nodes",
            counted_as(Some(Nodes), get(api::list_nodes::<S>)),
        )
        .merge(credentials::routes::<S>())
        .route("/healthz", counted_as(None, get(|| async { "ok\n" })))
        .route("/readyz", counted_as(Some(Readyz), get(api::readyz::<S>)))
        .route("/metrics", counted_as(None, get(api::metrics_text)))
        .with_state(state);
    // Around the whole router rather than each route, so that they see its answers complete
    // (a route adds the `Allow` header of its 405 itself) and the router's own errors.
    Router::new()
        .fallback_service(routes)
        .layer(middleware::from_fn(layers::json_errors))
        .layer(middleware::from_fn(layers::count_requests))
}
