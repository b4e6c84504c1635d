//! `GET|POST /postback`: an advertiser reports a conversion.
//!
//! Parameters come from the query string and, for POST, an
//! `application/x-www-form-urlencoded` body. The answer is `200
//! {"status":"accepted","conversion_id":..}` only once `ConversionReported` is
//! durable: acked by JetStream within the ack deadline, or flushed to the local
//! outbox (then `"durable":"outbox"` is added), or the same conversion is
//! already in the log; 400 names the bad field; 503 means retry.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    body::Bytes,
    extract::rejection::BytesRejection,
    extract::{ConnectInfo, RawQuery, State},
    http::{header, HeaderMap, Method},
    Json,
};
use common::ApiError;
use prost::Message;
use serde_json::{json, Value};

use super::AppState;
use crate::postback::PostbackInput;

#[tracing::instrument(level = "debug", skip_all)]
pub(super) async fn postback(
    State(state): State<Arc<AppState>>,
    method: Method,
    RawQuery(query): RawQuery,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        axum::http::StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge {
            field: "body".into(),
            message: format!("is larger than {} bytes", super::MAX_BODY_BYTES),
        },
        _ => ApiError::invalid("body", rejection.body_text()),
    })?;
    let query = query.unwrap_or_default();
    let known = &crate::postback::PARAMETERS;
    let mut pairs = common::params::parse_known(query.as_bytes(), "query", known)?;
    if method == Method::POST && !body.is_empty() {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type.is_empty() && !is_form(content_type) {
            return Err(ApiError::invalid(
                "body",
                "send parameters as application/x-www-form-urlencoded or in the query string",
            ));
        }
        pairs.extend(common::params::parse_known(&body, "body", known)?);
    }
    let now = common::time::now_ms();
    let ip = common::client_ip::client_ip(peer.ip(), &headers, &state.trusted_proxy_header);
    if state.refusals.over_rate(ip, now) {
        return Err(too_many());
    }
    let input = PostbackInput::parse(pairs.iter().map(|(k, v)| (k.into(), v.into())))?;
    // A HEAD (a link checker, a mail scanner, a "test URL" button) gets the
    // same input checks and records nothing: it must not take a conversion,
    // nor use up a signature the advertiser's own GET carries.
    if method == Method::HEAD {
        return Ok(Json(json!({"status": "ok", "recorded": false})));
    }
    let checked = verify(&state, &input, &pairs, ip, now).await?;
    let signature = state.replays.pending_use(&pairs);
    // Unchecked, but carrying a token or a signature: meant for an offer with
    // postback security. Its parameters go with its report, for the decider
    // to check once the click is known; taken without them, it would be
    // rejected `unauthenticated` then, and its retry answered as known.
    let kept = || {
        if pairs.iter().any(|(k, _)| k == "token" || k == "sig") {
            url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&pairs)
                .finish()
        } else {
            String::new()
        }
    };
    let (verified, unchecked_params) = match checked {
        DoorCheck::Verified { offer_id, named } => {
            (offer_id, if named { kept() } else { String::new() })
        }
        DoorCheck::NotNeeded => (String::new(), String::new()),
        DoorCheck::OfferUnknown => (String::new(), kept()),
    };
    let event = input.into_event(ip.to_string(), now, verified, unchecked_params);
    let accepted = json!({"status": "accepted", "conversion_id": event.conversion_id});
    if let Some(known) = state.conversions.get(&event.conversion_id)? {
        // A verified report always goes to the log (JetStream drops a repeat
        // within its duplicate window): the word it repeats may be one only an
        // unverified report told, which moved nothing on a secured offer.
        if known.advertiser_status == event.status && event.verified_offer_id.is_empty() {
            signature.keep();
            return Ok(Json(accepted)); // a retry of a postback already in the log
        }
    }
    let durable = state
        .outbox
        .publish_or_spool(
            &state.js,
            proto::subject::CONVERSION_REPORTED,
            &crate::postback::report_msg_id(&event),
            event.encode_to_vec(),
            state.ack_deadline,
            common::outbox::Order::PerKey(&event.conversion_id),
        )
        .await
        .map_err(|e| ApiError::not_durable(&e))?;
    signature.keep();
    if durable == common::outbox::Durable::Outbox {
        let body = json!({"status": "accepted", "conversion_id": event.conversion_id, "durable": "outbox"});
        return Ok(Json(body));
    }
    Ok(Json(accepted))
}

/// The click a postback names. A click the projection does not hold yet may
/// still be in the log (its redirect went out once JetStream acked it, so an
/// advertiser can call back before this service has folded it): then wait,
/// briefly, for the CLICKS fold to reach the log's end as it is now, so the
/// offer's security is checked at the door rather than only later by the
/// decider. A click id that is in no log costs one stream-info request. The
/// whole look takes at most the door's wait, NATS down or not.
async fn click_at_door(
    state: &AppState,
    click_id: &str,
) -> Result<Option<proto::clicks::v1::ClickRecorded>, ApiError> {
    if let Some(click) = state.clicks.get(click_id)? {
        return Ok(Some(click));
    }
    if click_id.is_empty() {
        return Ok(None);
    }
    // Read again even when the fold was already there: it may have applied
    // the click between the first read and the stream info.
    if !super::catch_up::caught_up(
        state,
        proto::stream::CLICKS,
        &state.clicks_status,
        state.door_wait,
    )
    .await
    {
        return Ok(None);
    }
    Ok(state.clicks.get(click_id)?)
}

/// A form body's media type, parameters (`; charset=UTF-8`) aside; media
/// types are case-insensitive (RFC 9110).
fn is_form(content_type: &str) -> bool {
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded")
}

fn too_many() -> ApiError {
    ApiError::Refused {
        status: 429,
        reason: "too_many_refusals",
        message: "too many refused postbacks from this address; slow down".to_owned(),
    }
}

/// What the door made of a postback's security.
enum DoorCheck {
    /// It passed the checks of this offer; `named`: an offer only the
    /// postback's `offer_id` parameter named (its click not known yet), which
    /// may not be the click's, so its parameters are kept for the decider.
    Verified { offer_id: String, named: bool },
    /// Its offer is known (from its click or its conversion) and asks for none.
    NotNeeded,
    /// Its offer is not known here (yet), or only named by its `offer_id`
    /// parameter and asking for none: nothing that binds was checked.
    OfferUnknown,
}

/// Runs the offer's postback security, when the offer is known at the door: the
/// click's offer, else that of the conversion the postback reports again (a
/// status report months later, its click gone from the projection: a CLICKS
/// max age, a new instance), else the `offer_id` parameter. A postback whose
/// offer is not known here is taken unchecked: the decider rejects it later
/// if its offer turns out to require security, unless the parameters it
/// carried (kept in its report) pass that offer's checks then; it ignores an
/// unverified status report of a secured offer. An offer only the parameter
/// names is the advertiser's word, not the click's: one asking for no
/// security does not make the postback's token or signature moot (an
/// advertiser's own offer number may be another offer's id here), so they
/// are kept as for an unknown offer, and kept too when they pass its checks.
async fn verify(
    state: &AppState,
    input: &PostbackInput,
    pairs: &[(String, String)],
    ip: std::net::IpAddr,
    now: i64,
) -> Result<DoorCheck, ApiError> {
    let (offer_id, named) = match click_at_door(state, &input.click_id).await? {
        Some(click) => (click.offer_id, false),
        None => {
            let id = crate::postback::conversion_id(&input.click_id, &input.goal, &input.txid);
            match state.conversions.get(&id)? {
                Some(known) if !known.offer_id.is_empty() => (known.offer_id, false),
                _ => {
                    let named = crate::postback::param(pairs, "offer_id").unwrap_or_default();
                    (named.to_owned(), true)
                }
            }
        }
    };
    let Some(offer) = state.catalog.offer(&offer_id)? else {
        return Ok(DoorCheck::OfferUnknown);
    };
    if !offer.security.is_required() {
        return Ok(if named {
            DoorCheck::OfferUnknown
        } else {
            DoorCheck::NotNeeded
        });
    }
    match crate::security::check(&offer.security, pairs, ip, now, &state.replays) {
        Ok(()) => Ok(DoorCheck::Verified {
            offer_id: offer.offer_id.clone(),
            named,
        }),
        Err(refusal) => {
            if !state.refusals.record(ip, refusal, now) {
                return Err(too_many());
            }
            tracing::warn!(%ip, reason = refusal.code(), offer_id = %offer.offer_id,
                click_id = %input.click_id, "postback refused");
            Err(ApiError::Refused {
                status: refusal.status(),
                reason: refusal.code(),
                message: format!("postback refused: {}", refusal.code()),
            })
        }
    }
}

/// `GET /api/postback-refusals`: refused postbacks since the process started.
pub(super) async fn refusals(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<crate::security::RefusalReport>, ApiError> {
    common::auth::require_bearer(&headers, &state.admin_token)?;
    Ok(Json(state.refusals.report()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_form_body_is_told_by_its_media_type_in_any_case() {
        for form in [
            "application/x-www-form-urlencoded",
            "Application/X-WWW-Form-URLencoded; charset=UTF-8",
            " application/x-www-form-urlencoded ;charset=utf-8",
        ] {
            assert!(super::is_form(form), "{form}");
        }
        for other in [
            "application/json",
            "application/x-www-form-urlencodedx",
            "multipart/form-data",
        ] {
            assert!(!super::is_form(other), "{other}");
        }
    }
}
