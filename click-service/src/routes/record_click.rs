//! `GET /c/{offer_id}?aff=..`: record the click, then 302 to the offer.
//!
//! `HEAD` (link checkers, chat unfurlers, mail scanners) gets the same checks
//! and a 200 without a redirect, and records nothing: no click id, nothing
//! counted against a cap.
//!
//! The 302 goes out only once `ClickRecorded` is durable: acked by JetStream
//! within the ack deadline (alone, or with the clicks that arrived meanwhile:
//! [`crate::group_commit`]), or else flushed to the local outbox, which
//! publishes it later with the same `Nats-Msg-Id`. If neither, 503 and no
//! redirect.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{ConnectInfo, Path, RawQuery, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use common::ApiError;
use prost::Message;

use super::AppState;
use crate::caps;
use crate::click::{self, ClickParams, Visitor};

#[tracing::instrument(level = "debug", skip_all, fields(offer_id = %offer_id))]
pub(super) async fn record_click(
    State(state): State<Arc<AppState>>,
    Path(offer_id): Path<String>,
    RawQuery(query): RawQuery,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let unknown_offer = || ApiError::not_found("offer_id", "unknown offer");
    if !crate::catalog_input::is_valid_id(&offer_id) {
        return Err(unknown_offer());
    }
    let params = ClickParams::parse(query.as_deref().unwrap_or(""))?;
    let offer = state.catalog.offer(&offer_id)?.ok_or_else(unknown_offer)?;
    if !crate::catalog_input::is_valid_id(&params.aff)
        || state.catalog.affiliate(&params.aff)?.is_none()
    {
        return Err(ApiError::not_found("aff", "unknown affiliate"));
    }
    let now = common::time::now_ms();
    let cap_day = offer.day_of(now);
    let has_caps = caps::has_click_caps(&offer.caps);
    let capped = has_caps
        && caps::is_full(
            &offer.caps,
            state.click_counts.used(&offer_id, &params.aff, &cap_day)?,
        );
    let (disposition, template) = click::destination(&offer, capped).ok_or_else(|| {
        let why = if capped {
            "daily click cap reached"
        } else {
            "offer is paused"
        };
        ApiError::not_found("offer_id", why)
    })?;
    if method == Method::HEAD {
        let no_store = HeaderValue::from_static("no-store");
        return Ok((StatusCode::OK, [(header::CACHE_CONTROL, no_store)]).into_response());
    }

    let click_id = uuid::Uuid::now_v7().to_string();
    let location = click::landing_url(template, &click_id, &offer_id, &params);
    // Not `to_str`, which refuses any byte past ASCII: a user agent with a
    // device name in UTF-8 is kept (bytes not UTF-8 become U+FFFD), not
    // recorded empty, which would count every such visitor behind one IP as
    // one unique visitor.
    let header_text = |name| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .unwrap_or_default()
            .chars()
            .take(1024)
            .collect()
    };
    let visitor = Visitor {
        ip: common::client_ip::client_ip(peer.ip(), &headers, &state.trusted_proxy_header)
            .to_string(),
        user_agent: header_text(header::USER_AGENT),
        referer: header_text(header::REFERER),
    };
    let event = click::click_event(
        &click_id,
        &offer_id,
        &params,
        &visitor,
        click::Redirect {
            disposition,
            url: location.clone(),
            cap_day,
        },
        now,
    );
    let durable = state
        .clicks
        .record(click_id, event.encode_to_vec())
        .await
        .map_err(|e| ApiError::not_durable(&e))?;
    if let (true, common::outbox::Durable::Log(seq)) = (has_caps, durable) {
        // Count this click before the next one is judged.
        let mut status = state.clicks_status.clone();
        common::fold::wait_applied(&mut status, seq, std::time::Duration::from_secs(1)).await;
    }

    let location = HeaderValue::try_from(location)
        .map_err(|_| ApiError::invalid("offer_id", "landing URL is not a valid header"))?;
    Ok((
        StatusCode::FOUND,
        [
            (header::LOCATION, location),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
    )
        .into_response())
}
