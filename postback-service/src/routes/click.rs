//! `GET /api/clicks/{click_id}`: a click and every conversion reported for it,
//! the first thing anyone debugging a lost conversion asks for. Conversions
//! reported for a click we never saw are shown too, with `click: null`.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    http::HeaderMap,
    Json,
};
use catalog::ConversionStatus;
use common::{time::rfc3339, ApiError};
use proto::{
    clicks::v1::{ClickDisposition, ClickRecorded},
    stream,
};
use serde::Serialize;

use super::{catch_up::caught_up, conversion::ConversionJson, postbacks::DeliveryJson, AppState};

#[derive(Debug, Serialize)]
pub(super) struct ClickJson {
    click_id: String,
    offer_id: String,
    affiliate_id: String,
    sub1: String,
    sub2: String,
    sub3: String,
    sub4: String,
    sub5: String,
    source: String,
    aff_click_id: String,
    ip: String,
    user_agent: String,
    referer: String,
    /// `landing`, `fallback_paused` or `fallback_capped`.
    disposition: &'static str,
    /// No click from the same IP and user agent on this offer and affiliate in
    /// the 24 hours before.
    unique: bool,
    redirect_url: String,
    clicked_at: String,
}

impl From<ClickRecorded> for ClickJson {
    fn from(c: ClickRecorded) -> Self {
        let disposition = match c.disposition() {
            ClickDisposition::FallbackPaused => "fallback_paused",
            ClickDisposition::FallbackCapped => "fallback_capped",
            ClickDisposition::Landing | ClickDisposition::Unspecified => "landing",
        };
        Self {
            disposition,
            unique: false,
            clicked_at: rfc3339(c.occurred_at_ms),
            click_id: c.click_id,
            offer_id: c.offer_id,
            affiliate_id: c.affiliate_id,
            sub1: c.sub1,
            sub2: c.sub2,
            sub3: c.sub3,
            sub4: c.sub4,
            sub5: c.sub5,
            source: c.source,
            aff_click_id: c.aff_click_id,
            ip: c.ip,
            user_agent: c.user_agent,
            referer: c.referer,
            redirect_url: c.redirect_url,
        }
    }
}

#[derive(Debug, Serialize)]
pub(super) struct ClickWithConversions {
    click: Option<ClickJson>,
    conversions: Vec<ConversionJson>,
    /// The affiliate postbacks of these conversions.
    deliveries: Vec<DeliveryJson>,
}

pub(super) async fn get_click(
    State(state): State<Arc<AppState>>,
    Path(click_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ClickWithConversions>, ApiError> {
    common::auth::require_bearer(&headers, &state.admin_token)?;
    let click_id = uuid::Uuid::try_parse(&click_id)
        .map_err(|_| ApiError::invalid("click_id", "must be a UUID"))?
        .to_string();
    let read = || -> Result<_, ApiError> {
        Ok((
            state.clicks.get_with_unique(&click_id)?,
            state.conversions.of_click(&click_id)?,
        ))
    };
    let (mut click, mut conversions) = read()?;
    if click.is_none() && conversions.is_empty() {
        // Redirected a moment ago, or reported: perhaps only not folded yet.
        let wait = state.door_wait;
        let (clicks, reports) = tokio::join!(
            caught_up(&state, stream::CLICKS, &state.clicks_status, wait),
            caught_up(&state, stream::CONVERSIONS, &state.conversions_status, wait),
        );
        if clicks || reports {
            (click, conversions) = read()?;
        }
    }
    if click.is_none() && conversions.is_empty() {
        return Err(ApiError::not_found("click_id", "unknown click"));
    }
    // Each status event of a conversion has its own delivery (an approval, a
    // pending attribution, a reversal), in the order of the lifecycle.
    let mut deliveries = Vec::new();
    for c in conversions.iter().filter(|c| !c.postback_url.is_empty()) {
        for status in [
            ConversionStatus::Pending,
            ConversionStatus::Approved,
            ConversionStatus::Rejected,
        ] {
            let id =
                crate::deliveries::status_delivery_id(&c.conversion_id, &c.affiliate_id, status);
            deliveries.extend(super::postbacks::lookup(&state, &id)?);
        }
    }
    Ok(Json(ClickWithConversions {
        click: click.map(|(c, unique)| ClickJson { unique, ..c.into() }),
        conversions: conversions.into_iter().map(Into::into).collect(),
        deliveries,
    }))
}
