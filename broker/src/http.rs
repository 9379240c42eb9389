//! The HTTP side: the REST API over the presence store, /metrics, /healthz and /readyz.
//!
//! [`app`] builds the router from its state, so tests call it without a socket; it is generic
//! over the store backend, like the rest of the broker. JSON bodies, RFC 3339 UTC timestamps;
//! errors are `{"error": "..."}` with 400 (bad parameter), 401 or 403 (no valid token, or a
//! role that may not), 404 (unknown device or credential, client not connected), 409 (a
//! credential exists) or 503 (store unavailable or busy; internals are logged, not returned).
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
//! - [`bans`]: the admin endpoints that list and lift flapping bans, merged into [`app`];
//! - [`head`] and [`server`]: the listener, which refuses request heads over the limits in JSON
//!   before routing.
//! - [`tokens`] and [`access`]: who may use which endpoint: bearer tokens from
//!   `http.api_tokens_file` with role `read` or `admin`, checked around each route;
//! - [`admin`]: the admin endpoints (kick a client, reload the files).

pub mod access;
pub mod admin;
pub mod api;
pub mod bans;
pub mod credentials;
pub mod error;
pub mod head;
pub mod layers;
pub mod params;
pub mod queries;
pub mod server;
pub mod tokens;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::middleware;
use axum::routing::{get, MethodRouter};
use axum::{Extension, Router};

use crate::config::HttpConfig;
use crate::labels::HttpRoute;
use crate::mqtt::limits::Flapping;
use crate::mqtt::LiveSessions;
use crate::reload::Reloader;
use crate::store::PresenceStore;
use layers::counted_as;
use queries::{QueryLimit, StatsCache};
use tokens::ApiAccess;

pub use error::ApiError;

/// What the handlers need.
#[derive(Clone)]
pub struct AppState<S> {
    /// The presence store: the API's own read-only pool.
    pub store: S,
    /// The broker's live sessions (for last_seen, and to kick a client).
    pub registry: LiveSessions,
    /// Set by the bridge once migrations are applied.
    pub migrated: Arc<AtomicBool>,
    /// Every handler that queries the store takes a slot here first.
    pub queries: Arc<QueryLimit>,
    /// The /api/v1/stats totals.
    pub stats: Arc<StatsCache>,
    /// Who may use which endpoint (the API tokens).
    pub access: Arc<ApiAccess>,
    /// What `POST /api/v1/admin/reload` reloads (the same as SIGHUP).
    pub reloader: Arc<Reloader>,
    /// The broker's flapping detector, whose bans the admin endpoints list and lift.
    pub bans: Arc<Flapping>,
    /// What the credential endpoints write through; `None`: they answer 503.
    pub credentials: Option<credentials::CredentialsAdmin<S>>,
    /// The broker state and where its backups go (`None`: persistence is off).
    pub state: Option<(Arc<dyn crate::state::StateStore>, std::path::PathBuf)>,
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
            access: Arc::new(ApiAccess::open()),
            reloader: Arc::new(Reloader::new()),
            bans: Arc::new(Flapping::new(&Default::default())),
            credentials: None,
            state: None,
        }
    }

    /// The same, backing up the broker state `store` into `dir` on request.
    pub fn with_state(
        mut self,
        store: Arc<dyn crate::state::StateStore>,
        dir: std::path::PathBuf,
    ) -> Self {
        self.state = Some((store, dir));
        self
    }

    /// The same, letting requests in by the tokens of `access` (without: every request).
    pub fn with_access(mut self, access: Arc<ApiAccess>) -> Self {
        self.access = access;
        self
    }

    /// The same, reloading files with `reloader` (without: none configured).
    pub fn with_reloader(mut self, reloader: Arc<Reloader>) -> Self {
        self.reloader = reloader;
        self
    }

    /// The same, listing and lifting the bans of `flapping` (the broker's).
    pub fn with_bans(mut self, flapping: Arc<Flapping>) -> Self {
        self.bans = flapping;
        self
    }

    /// This state with the credential endpoints writing through `store` (a read-write pool)
    /// and telling `auth` what they changed.
    pub fn with_credentials(mut self, store: S, auth: Arc<crate::auth::Auth>) -> Self {
        self.credentials = Some(credentials::CredentialsAdmin { store, auth });
        self
    }
}

/// Who may use a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Anyone (/healthz, /readyz).
    Open,
    /// A token of any role.
    Read,
    /// A token of role admin.
    Admin,
    /// Anyone with `http.metrics_public`, else a token of any role.
    Metrics,
}

/// `route` behind `guard`, its answers (refusals included) counted under `label` (`None`: not
/// counted). Every route of [`app`] is made by this.
pub fn endpoint<S>(
    guard: Guard,
    label: Option<HttpRoute>,
    route: MethodRouter<S>,
) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    let route = match guard {
        Guard::Open => route,
        Guard::Read => route.route_layer(middleware::from_fn(access::read)),
        Guard::Admin => route.route_layer(middleware::from_fn(access::admin)),
        Guard::Metrics => route.route_layer(middleware::from_fn(access::metrics_scrape)),
    };
    counted_as(label, route)
}

/// The router: each route behind its guard and with the label its requests are counted under
/// (none for the probes and the scrape), inside the counting and JSON-error layers. Admin
/// routes come from [`admin::routes`], [`credentials::routes`] and [`bans::routes`].
pub fn app<S: PresenceStore>(state: AppState<S>) -> Router {
    use Guard::{Metrics, Open, Read};
    use HttpRoute::{Device, Devices, Nodes, Readyz, Sessions, Stats};
    let access = Arc::clone(&state.access);
    let bans = bans::routes(Arc::clone(&state.bans));
    let routes = Router::new()
        .route(
            "/api/v1/devices",
            endpoint(Read, Some(Devices), get(api::list_devices::<S>)),
        )
        .route(
            "/api/v1/devices/{id}",
            endpoint(Read, Some(Device), get(api::get_device::<S>)),
        )
        .route(
            "/api/v1/devices/{id}/sessions",
            endpoint(Read, Some(Sessions), get(api::device_sessions::<S>)),
        )
        .route(
            "/api/v1/stats",
            endpoint(Read, Some(Stats), get(api::stats::<S>)),
        )
        .route(
            "/api/v1/nodes",
            endpoint(Read, Some(Nodes), get(api::list_nodes::<S>)),
        )
        .route("/healthz", endpoint(Open, None, get(|| async { "ok\n" })))
        .route(
            "/readyz",
            endpoint(Open, Some(Readyz), get(api::readyz::<S>)),
        )
        .route("/metrics", endpoint(Metrics, None, get(api::metrics_text)))
        .merge(admin::routes::<S>())
        .merge(credentials::routes::<S>())
        .with_state(state)
        .merge(bans);
    // Around the whole router rather than each route, so that they see its answers complete
    // (a route adds the `Allow` header of its 405 itself) and the router's own errors.
    Router::new()
        .fallback_service(routes)
        .layer(middleware::from_fn(layers::json_errors))
        .layer(middleware::from_fn(layers::count_requests))
        .layer(Extension(access))
}
