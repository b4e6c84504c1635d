//! The catalog admin API: `PUT`/`GET /api/offers[/{id}]`, `/api/affiliates[/{id}]`.
//! Every call needs `Authorization: Bearer <ADMIN_TOKEN>`.
//!
//! A `PUT` publishes the entity's new state to `CATALOG` and answers once this
//! service's own projection has applied it (or after 2 s, the event being durable
//! either way), so a `GET` right after sees it.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    Json,
};
use catalog::{Affiliate, Offer};
use common::{money::format_micros, time::rfc3339, ApiError};
use prost::Message;
use serde::Serialize;

use super::AppState;
use crate::catalog_input::{affiliate_from_json, check_id, offer_from_json};

/// An offer as the API shows it: money as decimal strings.
#[derive(Debug, Serialize)]
pub(super) struct OfferJson {
    offer_id: String,
    name: String,
    url: String,
    payout: String,
    revenue: String,
    currency: String,
    attribution_window_hours: u32,
    status: catalog::OfferStatus,
    fallback_url: Option<String>,
    postback_url: Option<String>,
    goals: Vec<serde_json::Value>,
    dedup: &'static str,
    status_map: std::collections::BTreeMap<String, catalog::ConversionStatus>,
    min_ctit_seconds: u32,
    timezone: String,
    caps: catalog::Caps,
    /// Secrets are shown only as set or not.
    security: serde_json::Value,
    created_at: String,
    updated_at: String,
}

fn mask(secret: &str) -> Option<&'static str> {
    (!secret.is_empty()).then_some(crate::catalog_input::MASK)
}

impl From<Offer> for OfferJson {
    fn from(o: Offer) -> Self {
        let goals = o
            .goals
            .iter()
            .map(|g| {
                serde_json::json!({
                    "id": g.goal_id,
                    "name": g.name,
                    "payout": g.payout_micros.map(format_micros),
                    "revenue": g.revenue_micros.map(format_micros),
                    "dedup": g.dedup.map(catalog::DedupPolicy::name),
                })
            })
            .collect();
        let security = serde_json::json!({
            "token": mask(&o.security.token),
            "allowed_ips": o.security.allowed_ips,
            "hmac_secret": mask(&o.security.hmac_secret),
            "signature_window_seconds": o.security.signature_window_seconds,
        });
        Self {
            goals,
            dedup: o.dedup.name(),
            status_map: o.status_map.clone(),
            min_ctit_seconds: o.min_ctit_seconds,
            timezone: if o.timezone.is_empty() {
                "UTC".to_owned()
            } else {
                o.timezone.clone()
            },
            caps: o.caps,
            security,
            payout: format_micros(o.payout_micros),
            revenue: format_micros(o.revenue_micros),
            fallback_url: (!o.fallback_url.is_empty()).then_some(o.fallback_url),
            postback_url: (!o.postback_url.is_empty()).then_some(o.postback_url),
            created_at: rfc3339(o.created_at_ms),
            updated_at: rfc3339(o.updated_at_ms),
            offer_id: o.offer_id,
            name: o.name,
            url: o.url,
            currency: o.currency,
            attribution_window_hours: o.attribution_window_hours,
            status: o.status,
        }
    }
}

/// An affiliate as the API shows it.
#[derive(Debug, Serialize)]
pub(super) struct AffiliateJson {
    affiliate_id: String,
    name: String,
    postback_url: Option<String>,
    postback_statuses: Vec<String>,
    created_at: String,
    updated_at: String,
}

impl From<Affiliate> for AffiliateJson {
    fn from(a: Affiliate) -> Self {
        let statuses = if a.postback_statuses.is_empty() {
            catalog::terms::DEFAULT_POSTBACK_STATUSES
                .iter()
                .map(|s| (*s).to_owned())
                .collect()
        } else {
            a.postback_statuses.clone()
        };
        Self {
            postback_statuses: statuses,
            postback_url: (!a.postback_url.is_empty()).then_some(a.postback_url),
            created_at: rfc3339(a.created_at_ms),
            updated_at: rfc3339(a.updated_at_ms),
            affiliate_id: a.affiliate_id,
            name: a.name,
        }
    }
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    common::auth::require_bearer(headers, &state.admin_token)
}

/// Waits (up to 2 s) for this instance's catalog fold to apply the CATALOG
/// stream as it ends now, so what a `PUT` keeps of the entity as it is (a
/// secret sent back masked, whether it is created) is what any instance wrote
/// last, not what this one had folded: a token rotated through another
/// instance a moment before was otherwise written back over, and postbacks
/// carrying the new one refused. Whether it got there (NATS not answering,
/// the fold still behind: not), all within the 2 s.
async fn catch_up(state: &AppState) -> bool {
    let last = common::nats::last_sequence(&state.js, proto::stream::CATALOG);
    common::fold::reaches_end(last, &state.catalog_status, Duration::from_secs(2)).await
}

/// Publishes a catalog event and waits (up to 2 s) for the local projection
/// to apply it: whether it did.
async fn publish_catalog(
    state: &AppState,
    subject: String,
    payload: Vec<u8>,
    event_id: &str,
) -> Result<bool, ApiError> {
    let seq = common::nats::publish(
        &state.js,
        subject,
        event_id,
        payload.into(),
        state.publish_timeout,
    )
    .await
    .map_err(ApiError::Unavailable)?;
    let mut status = state.catalog_status.clone();
    Ok(common::fold::wait_applied(&mut status, seq, Duration::from_secs(2)).await)
}

/// What a `PUT` answers: the projection's entity once it applied the event;
/// before (a fold slower than the wait), the event applied to what was
/// there, not the entity as it was before the `PUT`.
fn answer<T: Clone>(
    applied: bool,
    now: Option<Arc<T>>,
    prev: Option<Arc<T>>,
    apply: impl FnOnce(Option<T>) -> T,
) -> T {
    match now {
        Some(now) if applied => Arc::unwrap_or_clone(now),
        _ => apply(prev.map(Arc::unwrap_or_clone)),
    }
}

pub(super) async fn put_offer(
    State(state): State<Arc<AppState>>,
    Path(offer_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<OfferJson>), ApiError> {
    authorize(&state, &headers)?;
    check_id("offer_id", &offer_id)?;
    let mut event = offer_from_json(&offer_id, &body)?;
    let caught_up = catch_up(&state).await;
    let current = state.catalog.offer(&offer_id)?;
    // A secret sent back masked is the one stored: not known for sure, it is
    // not guessed from what this instance had folded.
    let masked = event.security.as_ref().is_some_and(|s| {
        s.token == crate::catalog_input::MASK || s.hmac_secret == crate::catalog_input::MASK
    });
    if masked && !caught_up {
        return Err(ApiError::Refused {
            status: 503,
            reason: "catalog_behind",
            message: "this instance cannot tell yet which secret is stored; send the secret \
                      itself, or retry"
                .to_owned(),
        });
    }
    crate::catalog_input::keep_masked_secrets(&mut event, current.as_ref().map(|o| &o.security))?;
    let existed = current.is_some();
    event.event_id = uuid::Uuid::now_v7().to_string();
    event.occurred_at_ms = common::time::now_ms();
    let subject = proto::subject::offer(&offer_id);
    let applied = publish_catalog(&state, subject, event.encode_to_vec(), &event.event_id).await?;
    let now = state.catalog.offer(&offer_id)?;
    let offer = answer(applied, now, current, |prev| {
        catalog::apply_offer(prev, &event)
    });
    let code = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((code, Json(offer.into())))
}

pub(super) async fn get_offer(
    State(state): State<Arc<AppState>>,
    Path(offer_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<OfferJson>, ApiError> {
    authorize(&state, &headers)?;
    let offer = state.catalog.offer(&offer_id)?;
    offer
        .map(|o| Json(Arc::unwrap_or_clone(o).into()))
        .ok_or_else(|| ApiError::not_found("offer_id", "unknown offer"))
}

pub(super) async fn list_offers(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Vec<OfferJson>>, ApiError> {
    authorize(&state, &headers)?;
    Ok(Json(
        state
            .catalog
            .offers()?
            .into_iter()
            .map(Into::into)
            .collect(),
    ))
}

pub(super) async fn put_affiliate(
    State(state): State<Arc<AppState>>,
    Path(affiliate_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<AffiliateJson>), ApiError> {
    authorize(&state, &headers)?;
    check_id("affiliate_id", &affiliate_id)?;
    let mut event = affiliate_from_json(&affiliate_id, &body)?;
    catch_up(&state).await;
    let current = state.catalog.affiliate(&affiliate_id)?;
    let existed = current.is_some();
    event.event_id = uuid::Uuid::now_v7().to_string();
    event.occurred_at_ms = common::time::now_ms();
    let subject = proto::subject::affiliate(&affiliate_id);
    let applied = publish_catalog(&state, subject, event.encode_to_vec(), &event.event_id).await?;
    let now = state.catalog.affiliate(&affiliate_id)?;
    let affiliate = answer(applied, now, current, |prev| {
        catalog::apply_affiliate(prev, &event)
    });
    let code = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((code, Json(affiliate.into())))
}

pub(super) async fn get_affiliate(
    State(state): State<Arc<AppState>>,
    Path(affiliate_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<AffiliateJson>, ApiError> {
    authorize(&state, &headers)?;
    let affiliate = state.catalog.affiliate(&affiliate_id)?;
    affiliate
        .map(|a| Json(Arc::unwrap_or_clone(a).into()))
        .ok_or_else(|| ApiError::not_found("affiliate_id", "unknown affiliate"))
}

pub(super) async fn list_affiliates(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Vec<AffiliateJson>>, ApiError> {
    authorize(&state, &headers)?;
    Ok(Json(
        state
            .catalog
            .affiliates()?
            .into_iter()
            .map(Into::into)
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_put_answers_what_it_wrote_even_before_the_projection_has_it() {
        let (prev, now) = (Some(Arc::new(1)), Some(Arc::new(5)));
        let add_ten = |p: Option<i32>| p.unwrap_or(0) + 10;
        assert_eq!(
            answer(true, now.clone(), prev.clone(), add_ten),
            5,
            "applied: as folded"
        );
        assert_eq!(
            answer(false, now, prev, add_ten),
            11,
            "not yet applied: the event on what was there, not the old entity"
        );
        assert_eq!(answer(false, None, None, add_ten), 10, "a new entity");
    }
}
