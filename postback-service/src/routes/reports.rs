//! `GET /api/reports?group_by=offer|affiliate`: gross and unique clicks,
//! attributed (by current status) and rejected conversions, payout and revenue
//! of approved conversions (per currency) per group.

use std::sync::Arc;

use std::collections::BTreeMap;

use axum::{
    extract::{RawQuery, State},
    http::HeaderMap,
    Json,
};
use common::{money::format_micros, ApiError};
use serde::Serialize;

use super::AppState;
use crate::conversions::{Reason, ReportRow};

#[derive(Debug, Serialize, PartialEq)]
pub(super) struct Row {
    /// The offer or affiliate id; `null` for conversions whose click is unknown.
    id: Option<String>,
    clicks: u64,
    unique_clicks: u64,
    attributed: u64,
    rejected: u64,
    rejected_by_reason: BTreeMap<Reason, u64>,
    /// Attributed conversions by their current status.
    by_status: BTreeMap<catalog::ConversionStatus, u64>,
    /// Of approved conversions, per currency.
    payout: BTreeMap<String, String>,
    revenue: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
pub(super) struct Report {
    group_by: &'static str,
    rows: Vec<Row>,
}

fn decimals(m: BTreeMap<String, i128>) -> BTreeMap<String, String> {
    m.into_iter().map(|(c, v)| (c, format_micros(v))).collect()
}

pub(super) async fn get_reports(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<Report>, ApiError> {
    common::auth::require_bearer(&headers, &state.admin_token)?;
    let query = query.unwrap_or_default();
    let group_by = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "group_by")
        .map(|(_, v)| v.into_owned());
    let (group_by, kind) = match group_by.as_deref() {
        None | Some("offer") => ("offer", 'o'),
        Some("affiliate") => ("affiliate", 'a'),
        Some(_) => return Err(ApiError::invalid("group_by", "must be offer or affiliate")),
    };
    let mut merged: BTreeMap<String, (u64, u64, ReportRow)> = BTreeMap::new();
    for (id, tally) in state.clicks.counts(kind)? {
        let row = merged.entry(id).or_default();
        (row.0, row.1) = (tally.clicks, tally.unique);
    }
    for (id, row) in state.conversions.reports(kind)? {
        merged.entry(id).or_default().2 = row;
    }
    let rows = merged
        .into_iter()
        .map(|(id, (clicks, unique_clicks, r))| Row {
            id: (!id.is_empty()).then_some(id),
            clicks,
            unique_clicks,
            by_status: r.by_status,
            attributed: r.attributed,
            rejected: r.rejected,
            rejected_by_reason: r.rejected_by_reason,
            payout: decimals(r.payout),
            revenue: decimals(r.revenue),
        })
        .collect();
    Ok(Json(Report { group_by, rows }))
}
