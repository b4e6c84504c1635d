//! The affiliate postback delivery log:
//! - `GET /api/postbacks?affiliate=&state=pending|delivered|failed&limit=&offset=`,
//!   newest first;
//! - `GET /api/postbacks/{delivery_id}`;
//! - `POST /api/postbacks/{delivery_id}/retry`: send a failed delivery again.

use std::sync::Arc;

use std::collections::{HashMap, HashSet};

use axum::{
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
    Json,
};
use common::{time::rfc3339, ApiError};
use serde::Serialize;
use serde_json::{json, Value};

use super::AppState;
use crate::deliveries::{
    dispatcher::RetryError, outcome::HistoryEntry, Outcome, OutcomeState, Schedule,
};

/// A delivery as the API shows it.
#[derive(Debug, Serialize)]
pub(super) struct DeliveryJson {
    delivery_id: String,
    /// `pending`, `delivered` or `failed`.
    state: &'static str,
    conversion_id: String,
    click_id: String,
    offer_id: String,
    affiliate_id: String,
    url: String,
    attempts: u32,
    status_code: Option<u32>,
    latency_ms: Option<u64>,
    error: Option<String>,
    response_body: Option<String>,
    next_attempt_at: Option<String>,
    generation: u32,
    updated_at: String,
    history: Vec<HistoryJson>,
}

#[derive(Debug, Serialize)]
struct HistoryJson {
    state: OutcomeState,
    at: String,
    generation: u32,
    attempts: u32,
    status_code: Option<u32>,
    error: Option<String>,
}

fn some<T: PartialEq + Default>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

impl From<HistoryEntry> for HistoryJson {
    fn from(h: HistoryEntry) -> Self {
        Self {
            state: h.state,
            at: rfc3339(h.at_ms),
            generation: h.generation,
            attempts: h.attempts,
            status_code: some(h.status_code),
            error: some(h.error),
        }
    }
}

/// The view of a delivery from what the log says and what is still scheduled.
pub(super) fn delivery_json(
    outcome: Option<Outcome>,
    schedule: Option<Schedule>,
) -> Option<DeliveryJson> {
    let history: Vec<HistoryJson> = outcome
        .as_ref()
        .map(|o| o.history.iter().cloned().map(Into::into).collect())
        .unwrap_or_default();
    match (outcome, schedule) {
        (Some(o), _) if o.state != OutcomeState::RetryRequested => Some(DeliveryJson {
            state: if o.state == OutcomeState::Delivered {
                "delivered"
            } else {
                "failed"
            },
            delivery_id: o.delivery_id,
            conversion_id: o.conversion_id,
            click_id: o.click_id,
            offer_id: o.offer_id,
            affiliate_id: o.affiliate_id,
            url: o.url,
            attempts: o.attempts,
            status_code: some(o.status_code),
            latency_ms: o.latency_ms,
            error: some(o.error),
            response_body: some(o.body),
            next_attempt_at: None,
            generation: o.generation,
            updated_at: rfc3339(o.updated_at_ms),
            history,
        }),
        (_, Some(s)) => {
            let updated = s.first_attempt_ms.max(s.created_at_ms);
            Some(DeliveryJson {
                state: scheduled_state(&s),
                delivery_id: s.delivery_id,
                conversion_id: s.conversion_id,
                click_id: s.click_id,
                offer_id: s.offer_id,
                affiliate_id: s.affiliate_id,
                url: s.url,
                attempts: s.attempts,
                status_code: some(s.last_status),
                latency_ms: None,
                error: some(s.last_error),
                response_body: some(s.last_body),
                next_attempt_at: (s.unpublished.is_none()).then(|| rfc3339(s.next_at_ms)),
                generation: s.generation,
                updated_at: rfc3339(updated),
                history,
            })
        }
        (Some(o), None) => Some(DeliveryJson {
            state: "pending",
            delivery_id: o.delivery_id,
            conversion_id: o.conversion_id,
            click_id: o.click_id,
            offer_id: o.offer_id,
            affiliate_id: o.affiliate_id,
            url: o.url,
            attempts: 0,
            status_code: None,
            latency_ms: None,
            error: None,
            response_body: None,
            next_attempt_at: None,
            generation: o.generation,
            updated_at: rfc3339(o.updated_at_ms),
            history,
        }),
        (None, None) => None,
    }
}

/// One delivery by id.
pub(super) fn lookup(
    state: &AppState,
    delivery_id: &str,
) -> Result<Option<DeliveryJson>, ApiError> {
    let outcome = state.dispatcher.outcomes().get(delivery_id)?;
    let schedule = match leading(state) {
        true => state.dispatcher.schedules().get(delivery_id)?,
        false => None,
    };
    Ok(delivery_json(outcome, schedule))
}

/// Whether this instance leads: only then are its schedules (the pending
/// deliveries, with their attempts) current. A standby has none, and a former
/// leader's are as they were when its term ended; both show what the log
/// holds (delivered, failed, a retry requested).
fn leading(state: &AppState) -> bool {
    state.lease.borrow().role == common::lease::Role::Leader
}

/// Who leads, as a standby's answer names it.
fn leader_name(lease: &common::lease::LeaseStatus) -> &str {
    match lease.leader.as_str() {
        "" => "none yet",
        leader => leader,
    }
}

pub(super) async fn get_postback(
    State(state): State<Arc<AppState>>,
    Path(delivery_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<DeliveryJson>, ApiError> {
    common::auth::require_bearer(&headers, &state.admin_token)?;
    if let Some(delivery) = lookup(&state, &delivery_id)? {
        return Ok(Json(delivery));
    }
    // Its outcome may be in the log and not folded yet: the leader drops a
    // schedule once its outcome is acked.
    let stream = proto::stream::POSTBACKS;
    if super::catch_up::caught_up(&state, stream, &state.postbacks_status, state.door_wait).await {
        if let Some(delivery) = lookup(&state, &delivery_id)? {
            return Ok(Json(delivery));
        }
    }
    let lease = state.lease.borrow().clone();
    let message = match lease.role {
        common::lease::Role::Leader => "unknown delivery".to_owned(),
        _ => format!(
            "no outcome of this delivery in the log; pending deliveries are known to the \
             leader ({}), this instance ({}) stands by",
            leader_name(&lease),
            lease.holder
        ),
    };
    Err(ApiError::not_found("delivery_id", message))
}

pub(super) async fn list_postbacks(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    common::auth::require_bearer(&headers, &state.admin_token)?;
    let query = query.unwrap_or_default();
    let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let wanted_state = match params.get("state").map(String::as_str) {
        None | Some("") => None,
        Some(s @ ("pending" | "delivered" | "failed")) => Some(s.to_owned()),
        Some(_) => {
            return Err(ApiError::invalid(
                "state",
                "must be pending, delivered or failed",
            ))
        }
    };
    let number = |name: &str, default: usize, max: usize| match params.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| *n <= max)
            .ok_or_else(|| ApiError::invalid(name, format!("must be a whole number up to {max}"))),
    };
    let limit = number("limit", 50, 500)?.max(1);
    let offset = number("offset", 0, usize::MAX)?;
    let affiliate = params.get("affiliate").filter(|a| !a.is_empty());

    let affiliate = affiliate.cloned();
    let (total, page) = tokio::task::spawn_blocking(move || {
        let wanted = |e: &Row| {
            affiliate.as_ref().is_none_or(|a| &e.affiliate_id == a)
                && wanted_state.as_deref().is_none_or(|s| e.state == s)
        };
        let mut total = 0;
        let mut ids = Vec::new();
        for e in listing(&state)? {
            let e = e?;
            if wanted(&e) {
                if total >= offset && ids.len() < limit {
                    ids.push(e.delivery_id);
                }
                total += 1;
            }
        }
        let page = ids
            .iter()
            .map(|id| lookup(&state, id))
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>, _>>()?;
        Ok::<_, ApiError>((total, page))
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    let next = (offset + page.len() < total).then_some(offset + page.len());
    Ok(Json(
        json!({"total": total, "offset": offset, "next_offset": next, "postbacks": page}),
    ))
}

/// A delivery as the listing orders and filters it, before its page is read.
struct Row {
    at_ms: i64,
    delivery_id: String,
    affiliate_id: String,
    /// As [`DeliveryJson::state`].
    state: &'static str,
}

impl Row {
    /// Newest first; at the same millisecond, the greater delivery id first
    /// (the time index's own order, walked backwards).
    fn order(&self) -> (i64, &str) {
        (self.at_ms, &self.delivery_id)
    }
}

/// Every delivery, newest first, as [`delivery_json`] would show it, without
/// decoding an outcome: outcomes come from their time index (state and
/// affiliate are in it), merged with the schedules still pending. Costs a walk
/// of the index plus one read per pending schedule, and memory for the
/// pending ones only.
/// The state a delivery with a schedule shows: `pending`, unless the
/// schedule holds its outcome for a late ack (the affiliate already answered):
/// that outcome, `delivered` or `failed`, though not yet in the log.
fn scheduled_state(s: &crate::deliveries::Schedule) -> &'static str {
    match s.unpublished.as_ref().map(|u| u.subject.as_str()) {
        Some(proto::subject::POSTBACK_DELIVERED) => "delivered",
        Some(proto::subject::POSTBACK_FAILED) => "failed",
        _ => "pending",
    }
}

fn listing(state: &AppState) -> Result<impl Iterator<Item = Result<Row, ApiError>> + '_, ApiError> {
    let outcomes = state.dispatcher.outcomes();
    let mut pending: Vec<Row> = Vec::new();
    let schedules = match leading(state) {
        true => state.dispatcher.schedules().all()?,
        false => Vec::new(),
    };
    for s in schedules {
        // A delivered or failed outcome is shown over its schedule (a
        // schedule outlives its outcome's event only until it is removed).
        let shadowed = outcomes
            .get(&s.delivery_id)?
            .is_some_and(|o| o.state != OutcomeState::RetryRequested);
        if !shadowed {
            pending.push(Row {
                at_ms: s.first_attempt_ms.max(s.created_at_ms),
                state: scheduled_state(&s),
                delivery_id: s.delivery_id,
                affiliate_id: s.affiliate_id,
            });
        }
    }
    pending.sort_unstable_by(|a, b| b.order().cmp(&a.order()));
    let scheduled: HashSet<String> = pending.iter().map(|p| p.delivery_id.clone()).collect();
    let logged = outcomes.newest_first().filter_map(move |l| {
        let l = match l {
            Ok(l) => l,
            Err(e) => return Some(Err(ApiError::from(e))),
        };
        // Shown by its schedule, when it had one pending as the schedules
        // were read (an outcome folded since is shown at the next listing,
        // not twice in this one).
        if scheduled.contains(&l.delivery_id) {
            return None;
        }
        let state = match l.state {
            OutcomeState::Delivered => "delivered",
            OutcomeState::Failed => "failed",
            OutcomeState::RetryRequested => "pending",
        };
        Some(Ok(Row {
            at_ms: l.updated_at_ms,
            delivery_id: l.delivery_id,
            affiliate_id: l.affiliate_id,
            state,
        }))
    });
    Ok(merge_newest_first(pending.into_iter().map(Ok), logged))
}

/// Two newest-first sequences as one; an error as soon as either meets one.
fn merge_newest_first<E>(
    a: impl Iterator<Item = Result<Row, E>>,
    b: impl Iterator<Item = Result<Row, E>>,
) -> impl Iterator<Item = Result<Row, E>> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (_, Some(Err(_))) => b.next(),
        (Some(Ok(x)), Some(Ok(y))) if x.order() < y.order() => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
}

pub(super) async fn retry_postback(
    State(state): State<Arc<AppState>>,
    Path(delivery_id): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    common::auth::require_bearer(&headers, &state.admin_token)?;
    // Only the leader's dispatcher sends: a retry scheduled on a standby would
    // wait for it to lead.
    let lease = state.lease.borrow().clone();
    if lease.role != common::lease::Role::Leader {
        return Err(ApiError::Conflict {
            field: "delivery_id".into(),
            message: format!(
                "this instance ({}) is a standby; ask the leader ({})",
                lease.holder,
                leader_name(&lease)
            ),
        });
    }
    match state.dispatcher.request_retry(&delivery_id).await {
        Ok(generation) => Ok((
            StatusCode::ACCEPTED,
            Json(
                json!({"status": "retrying", "delivery_id": delivery_id, "generation": generation}),
            ),
        )),
        Err(RetryError::NotFound) => Err(ApiError::not_found("delivery_id", "unknown delivery")),
        Err(e @ RetryError::NotFailed(_)) => Err(ApiError::Conflict {
            field: "delivery_id".into(),
            message: format!("{e}; only failed deliveries can be retried"),
        }),
        Err(e @ (RetryError::Superseded(_) | RetryError::LaterPending(_))) => {
            Err(ApiError::Conflict {
                field: "delivery_id".into(),
                message: e.to_string(),
            })
        }
        Err(RetryError::Publish(e)) => Err(ApiError::Unavailable(e)),
        Err(RetryError::Store(e)) => Err(ApiError::Internal(e)),
        Err(e @ RetryError::Stopping) => Err(ApiError::Refused {
            status: 503,
            reason: "stopping",
            message: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use crate::deliveries::{
        schedule::{Target, Unpublished},
        Schedule,
    };

    #[test]
    fn a_delivery_whose_outcome_waits_for_its_ack_shows_that_outcome() {
        let target = Target {
            delivery_id: "d1".into(),
            conversion_id: "c1".into(),
            affiliate_id: "a1".into(),
            offer_id: "o1".into(),
            click_id: "k1".into(),
            url: "http://aff.example/pb".into(),
            status: "approved".into(),
        };
        let mut s = Schedule::fresh(target, 1);
        let state = |s: &Schedule| super::delivery_json(None, Some(s.clone())).unwrap().state;
        assert_eq!(state(&s), "pending");
        for (subject, shown) in [
            (proto::subject::POSTBACK_DELIVERED, "delivered"),
            (proto::subject::POSTBACK_FAILED, "failed"),
        ] {
            s.unpublished = Some(Unpublished {
                subject: subject.into(),
                msg_id: "m".into(),
                payload: Vec::new(),
            });
            assert_eq!(state(&s), shown);
            assert_eq!(
                super::scheduled_state(&s),
                shown,
                "the listing's filter too"
            );
        }
    }
}
