//! `GET /api/conversions/{conversion_id}`: one conversion, its state and why.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    http::HeaderMap,
    Json,
};
use common::{money::format_micros, time::rfc3339, ApiError};
use serde::Serialize;

use super::AppState;
use crate::conversions::{ConversionState, ConversionView, Reason};

/// A conversion as the API shows it.
#[derive(Debug, Serialize)]
pub(super) struct ConversionJson {
    conversion_id: String,
    state: ConversionState,
    /// Of an attributed conversion: pending, approved or rejected (by the advertiser).
    status: Option<catalog::ConversionStatus>,
    /// The advertiser's latest status word.
    advertiser_status: Option<String>,
    status_history: Vec<serde_json::Value>,
    reason: Option<Reason>,
    detail: Option<String>,
    click_id: Option<String>,
    offer_id: Option<String>,
    affiliate_id: Option<String>,
    goal: Option<String>,
    txid: Option<String>,
    amount: Option<String>,
    currency: Option<String>,
    payout: Option<String>,
    payout_currency: Option<String>,
    revenue: Option<String>,
    revenue_currency: Option<String>,
    origin: String,
    converted_at: String,
    reported_at: String,
    decided_at: Option<String>,
}

fn some(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<ConversionView> for ConversionJson {
    fn from(v: ConversionView) -> Self {
        let attributed = v.state == ConversionState::Attributed;
        let status_history = v
            .status_history
            .iter()
            .map(|h| {
                serde_json::json!({
                    "from": h.from, "to": h.to, "advertiser_status": h.advertiser_status,
                    "at": rfc3339(h.at_ms),
                })
            })
            .collect();
        Self {
            conversion_id: v.conversion_id,
            state: v.state,
            status: v.status,
            advertiser_status: some(v.advertiser_status),
            status_history,
            reason: v.reason,
            detail: some(v.detail),
            click_id: some(v.click_id),
            offer_id: some(v.offer_id),
            affiliate_id: some(v.affiliate_id),
            goal: some(v.goal),
            txid: some(v.txid),
            amount: v.amount_micros.map(format_micros),
            currency: some(v.currency),
            payout: attributed.then(|| format_micros(v.payout_micros)),
            payout_currency: some(v.payout_currency),
            revenue: attributed.then(|| format_micros(v.revenue_micros)),
            revenue_currency: some(v.revenue_currency),
            origin: v.origin,
            converted_at: rfc3339(v.converted_at_ms),
            reported_at: rfc3339(v.reported_at_ms),
            decided_at: v.decided_at_ms.map(rfc3339),
        }
    }
}

pub(super) async fn get_conversion(
    State(state): State<Arc<AppState>>,
    Path(conversion_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ConversionJson>, ApiError> {
    common::auth::require_bearer(&headers, &state.admin_token)?;
    let mut view = state.conversions.get(&conversion_id)?;
    // Acked a moment ago (here or by another instance), or published by a
    // partner: perhaps only not folded yet.
    if view.is_none() {
        let stream = proto::stream::CONVERSIONS;
        let status = &state.conversions_status;
        if super::catch_up::caught_up(&state, stream, status, state.door_wait).await {
            view = state.conversions.get(&conversion_id)?;
        }
    }
    view.map(|v| Json(v.into()))
        .ok_or_else(|| ApiError::not_found("conversion_id", "unknown conversion"))
}
