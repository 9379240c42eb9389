//! The flapping bans, for operators: `GET /api/v1/admin/bans` lists the client ids banned by
//! flapping detection (`mqtt.flapping`) and `DELETE /api/v1/admin/bans/{client_id}` lifts one.
//! Admin endpoints: [`routes`] is merged into [`super::app`] on its own, so that it can be put
//! behind the admin role.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::params::DeviceId;
use super::ApiError;
use super::{endpoint, Guard};
use crate::labels::HttpRoute;
use crate::mqtt::limits::{Ban, Flapping};

/// A ban as the API shows it.
#[derive(Debug, Serialize)]
struct BanView {
    client_id: String,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    reason: &'static str,
}

impl From<Ban> for BanView {
    fn from(ban: Ban) -> Self {
        Self {
            client_id: ban.client_id,
            since: ban.since.into(),
            until: ban.until.into(),
            reason: ban.reason,
        }
    }
}

/// The ban endpoints over the broker's flapping detector, counted under route `bans`.
pub fn routes(flapping: Arc<Flapping>) -> Router {
    Router::new()
        .route(
            "/api/v1/admin/bans",
            endpoint(Guard::Admin, Some(HttpRoute::Bans), get(list)),
        )
        .route(
            "/api/v1/admin/bans/{client_id}",
            endpoint(
                Guard::Admin,
                Some(HttpRoute::Bans),
                axum::routing::delete(lift),
            ),
        )
        .with_state(flapping)
}

/// `GET /api/v1/admin/bans`: `{"bans": [{client_id, since, until, reason}]}`, by client id.
async fn list(State(flapping): State<Arc<Flapping>>) -> Json<serde_json::Value> {
    let bans: Vec<BanView> = flapping.bans().into_iter().map(BanView::from).collect();
    Json(serde_json::json!({ "bans": bans }))
}

/// `DELETE /api/v1/admin/bans/{client_id}`: 204 once lifted, 404 when the id is not banned.
async fn lift(
    State(flapping): State<Arc<Flapping>>,
    DeviceId(client_id): DeviceId,
) -> Result<StatusCode, ApiError> {
    if flapping.lift(&client_id) {
        tracing::info!(
            client_id = client_id.as_str(),
            "Flapping ban lifted through the API."
        );
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotBanned(client_id))
    }
}
