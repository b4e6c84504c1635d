//! HTTP routes, one file each, and the state they share.

mod catch_up;
mod click;
mod conversion;
mod postback;
mod postbacks;
mod reports;

use std::{sync::Arc, time::Duration};

use axum::{
    extract::DefaultBodyLimit,
    routing::{get, post},
    Router,
};

use crate::{clicks::Clicks, conversions::Conversions};

pub use catch_up::LogEnds;

/// Largest accepted request body (a postback is a handful of parameters).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What handlers need.
#[derive(Clone)]
pub struct AppState {
    pub js: async_nats::jetstream::Context,
    pub conversions: Conversions,
    pub clicks: Clicks,
    /// Where the CLICKS fold is, to wait for a click not folded yet.
    pub clicks_status: tokio::sync::watch::Receiver<common::fold::FoldStatus>,
    /// Where the CONVERSIONS fold is, to wait for a conversion not folded yet.
    pub conversions_status: tokio::sync::watch::Receiver<common::fold::FoldStatus>,
    /// Where the POSTBACKS fold is, to wait for a delivery's outcome not
    /// folded yet (the leader drops a schedule once its outcome is acked).
    pub postbacks_status: tokio::sync::watch::Receiver<common::fold::FoldStatus>,
    /// How long a postback waits at the door for its click to be folded, and
    /// an API lookup of a click or conversion not found for its fold.
    pub door_wait: Duration,
    pub dispatcher: crate::deliveries::Dispatcher,
    pub catalog: catalog::Catalog,
    pub refusals: Arc<crate::security::Refusals>,
    pub replays: Arc<crate::security::ReplayGuard>,
    pub trusted_proxy_header: Arc<str>,
    pub admin_token: Arc<str>,
    pub publish_timeout: Duration,
    pub outbox: common::outbox::Outbox,
    pub ack_deadline: Duration,
    /// Whether this instance leads (runs the dispatcher) or stands by.
    pub lease: tokio::sync::watch::Receiver<common::lease::LeaseStatus>,
    /// Where the streams end, asked of NATS once for many reads.
    pub log_ends: Arc<LogEnds>,
}

/// The service's routes (health routes are merged in by startup). The state
/// is shared behind one `Arc`: axum hands every request its own copy of the
/// state, and copying each handle in it (and dropping them after) was about 3 %
/// of click-service's CPU at full load (the same change as there).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/postback",
            get(postback::postback).post(postback::postback),
        )
        .route(
            "/api/conversions/{conversion_id}",
            get(conversion::get_conversion),
        )
        .route("/api/clicks/{click_id}", get(click::get_click))
        .route("/api/reports", get(reports::get_reports))
        .route("/api/postbacks", get(postbacks::list_postbacks))
        .route("/api/postback-refusals", get(postback::refusals))
        .route("/api/postbacks/{delivery_id}", get(postbacks::get_postback))
        .route(
            "/api/postbacks/{delivery_id}/retry",
            post(postbacks::retry_postback),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Arc::new(state))
}
