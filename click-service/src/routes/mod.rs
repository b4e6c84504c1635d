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
    /// Header naming the visitor's IP behind our proxy (lower case; empty: the peer).
    pub trusted_proxy_header: Arc<str>,
    pub publish_timeout: Duration,
    /// Where clicks are recorded (through the outbox).
    pub clicks: crate::group_commit::GroupCommit,
}

/// The service's routes (health routes are merged in by startup). The state
/// is shared behind one `Arc`: axum hands every request its own copy of the
/// state, and copying each handle in it (and dropping them after) was about 3 %
/// of click-service's CPU at full load.
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
        .with_state(Arc::new(state))
}
