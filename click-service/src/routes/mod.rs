//! HTTP routes, one file each, and the state they share.

mod admin;
mod record_click;

use std::{sync::Arc, time::Duration};

use axum::{
    routing::{get, put},
    Router,
};
use tokio::sync::watch;

/// What handlers need.
#[derive(Clone)]
pub struct AppState {
    pub js: async_nats::jetstream::Context,
    pub catalog: catalog::Catalog,
    pub catalog_status: watch::Receiver<common::FoldStatus>,
    pub click_counts: crate::caps::ClickCounts,
    pub clicks_status: watch::Receiver<common::FoldStatus>,
    pub admin_token: Arc<str>,
    pub publish_timeout: Duration,
    pub outbox: common::outbox::Outbox,
    pub ack_deadline: Duration,
}

/// The service's routes (health routes are merged in by startup).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/c/{offer_id}", get(record_click::record_click))
        .route("/api/offers", get(admin::list_offers))
        .route(
            "/api/offers/{offer_id}",
            put(admin::put_offer).get(admin::get_offer),
        )
        .route("/api/affiliates", get(admin::list_affiliates))
        .route(
            "/api/affiliates/{affiliate_id}",
            put(admin::put_affiliate).get(admin::get_affiliate),
        )
        .with_state(state)
}
