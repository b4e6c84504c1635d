//! The POSTBACKS fold: what became of each delivery, as the log records it.
//!
//! Rows: `o/<delivery_id>` the [`Outcome`], packed ([`common::store::pack`]; the
//! API answers it as JSON); `t/<updated ms BE><delivery_id>` an index for
//! newest-first listing, whose value is the outcome's state (one byte) and
//! affiliate id: a listing filters and counts on the index alone.

use common::{fold::Fold, LogEntry, Staged};
use prost::Message;
use proto::postbacks::v1::{PostbackDelivered, PostbackFailed, PostbackRetryRequested};
use serde::{Deserialize, Serialize};

/// Where a delivery stands in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeState {
    /// Final: never sent again.
    Delivered,
    /// Final until an operator asks for a retry.
    Failed,
    /// An operator asked to send it again; attempts follow.
    RetryRequested,
}

/// One logged event of a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub state: OutcomeState,
    pub at_ms: i64,
    pub generation: u32,
    pub attempts: u32,
    pub status_code: u32,
    pub error: String,
}

/// A delivery as the log leaves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub delivery_id: String,
    pub conversion_id: String,
    pub affiliate_id: String,
    pub offer_id: String,
    pub click_id: String,
    pub url: String,
    pub state: OutcomeState,
    pub generation: u32,
    pub attempts: u32,
    pub status_code: u32,
    pub latency_ms: Option<u64>,
    pub error: String,
    /// The first 512 bytes of the last response body, as text.
    pub body: String,
    pub updated_at_ms: i64,
    pub history: Vec<HistoryEntry>,
}

#[cfg(test)]
impl Outcome {
    /// A delivery that failed after one attempt, for tests.
    pub(crate) fn failed_for_test(
        delivery_id: String,
        conversion_id: &str,
        affiliate_id: &str,
    ) -> Self {
        Self {
            delivery_id,
            conversion_id: conversion_id.into(),
            affiliate_id: affiliate_id.into(),
            offer_id: "o".into(),
            click_id: "k".into(),
            url: "http://x/".into(),
            state: OutcomeState::Failed,
            generation: 1,
            attempts: 1,
            status_code: 404,
            latency_ms: None,
            error: String::new(),
            body: String::new(),
            updated_at_ms: 0,
            history: Vec::new(),
        }
    }
}

impl Outcome {
    fn entry(&self) -> HistoryEntry {
        HistoryEntry {
            state: self.state,
            at_ms: self.updated_at_ms,
            generation: self.generation,
            attempts: self.attempts,
            status_code: self.status_code,
            error: self.error.clone(),
        }
    }
}

/// `next` in place of `prev`, its history carried on, unless `prev` is final (a
/// success) or of a newer generation.
fn settle(prev: Option<Outcome>, next: Outcome) -> Option<Outcome> {
    if prev
        .as_ref()
        .is_some_and(|p| p.state == OutcomeState::Delivered || p.generation > next.generation)
    {
        return None;
    }
    let mut history = prev.map(|p| p.history).unwrap_or_default();
    history.push(next.entry());
    Some(Outcome { history, ..next })
}

/// The outcome after `e`. A success is final; a failure or a success of an older
/// generation than the one in force changes nothing.
pub fn apply_delivered(prev: Option<Outcome>, e: &PostbackDelivered) -> Option<Outcome> {
    let next = Outcome {
        delivery_id: e.delivery_id.clone(),
        conversion_id: e.conversion_id.clone(),
        affiliate_id: e.affiliate_id.clone(),
        offer_id: e.offer_id.clone(),
        click_id: e.click_id.clone(),
        url: e.url.clone(),
        state: OutcomeState::Delivered,
        generation: e.generation,
        attempts: e.attempts,
        status_code: e.status_code,
        latency_ms: Some(e.latency_ms),
        error: e.error.clone(),
        body: String::new(),
        updated_at_ms: e.occurred_at_ms,
        history: Vec::new(),
    };
    settle(prev, next)
}

/// The outcome after a failure (ignored once delivered, or if stale).
pub fn apply_failed(prev: Option<Outcome>, e: &PostbackFailed) -> Option<Outcome> {
    let next = Outcome {
        delivery_id: e.delivery_id.clone(),
        conversion_id: e.conversion_id.clone(),
        affiliate_id: e.affiliate_id.clone(),
        offer_id: e.offer_id.clone(),
        click_id: e.click_id.clone(),
        url: e.url.clone(),
        state: OutcomeState::Failed,
        generation: e.generation,
        attempts: e.attempts,
        status_code: e.status_code,
        latency_ms: None,
        error: e.error.clone(),
        body: String::from_utf8_lossy(&e.body).into_owned(),
        updated_at_ms: e.occurred_at_ms,
        history: Vec::new(),
    };
    settle(prev, next)
}

/// The outcome after a retry request: only a failed delivery, and only for the
/// next generation.
pub fn apply_retry_requested(prev: Option<Outcome>, e: &PostbackRetryRequested) -> Option<Outcome> {
    let prev = prev?;
    if prev.state != OutcomeState::Failed || e.generation != prev.generation + 1 {
        return None;
    }
    let mut next = Outcome {
        state: OutcomeState::RetryRequested,
        generation: e.generation,
        attempts: 0,
        updated_at_ms: e.occurred_at_ms,
        ..prev
    };
    let entry = next.entry();
    next.history.push(entry);
    Some(next)
}

pub(super) fn outcome_key(delivery_id: &str) -> Vec<u8> {
    [b"o/", delivery_id.as_bytes()].concat()
}

fn time_key(at_ms: i64, delivery_id: &str) -> Vec<u8> {
    [
        &b"t/"[..],
        &(at_ms.max(0) as u64).to_be_bytes(),
        delivery_id.as_bytes(),
    ]
    .concat()
}

/// What the time index keeps of an outcome.
fn listed_value(o: &Outcome) -> Vec<u8> {
    let state = match o.state {
        OutcomeState::Delivered => b'd',
        OutcomeState::Failed => b'f',
        OutcomeState::RetryRequested => b'r',
    };
    [&[state][..], o.affiliate_id.as_bytes()].concat()
}

/// An outcome as the time index lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub delivery_id: String,
    pub affiliate_id: String,
    pub state: OutcomeState,
    pub updated_at_ms: i64,
}

/// One decoded `postbacks.v1.*` event.
enum PostbackEvent {
    Delivered(PostbackDelivered),
    Failed(PostbackFailed),
    RetryRequested(PostbackRetryRequested),
}

impl PostbackEvent {
    fn decode(subject: &str, payload: &[u8]) -> Option<Self> {
        match subject {
            proto::subject::POSTBACK_DELIVERED => {
                PostbackDelivered::decode(payload).ok().map(Self::Delivered)
            }
            proto::subject::POSTBACK_FAILED => {
                PostbackFailed::decode(payload).ok().map(Self::Failed)
            }
            proto::subject::POSTBACK_RETRY_REQUESTED => PostbackRetryRequested::decode(payload)
                .ok()
                .map(Self::RetryRequested),
            _ => None,
        }
    }

    fn delivery_id(&self) -> &str {
        match self {
            Self::Delivered(e) => &e.delivery_id,
            Self::Failed(e) => &e.delivery_id,
            Self::RetryRequested(e) => &e.delivery_id,
        }
    }

    fn apply(&self, prev: Option<Outcome>) -> Option<Outcome> {
        match self {
            Self::Delivered(e) => apply_delivered(prev, e),
            Self::Failed(e) => apply_failed(prev, e),
            Self::RetryRequested(e) => apply_retry_requested(prev, e),
        }
    }
}

/// The rows' format ([`Fold::format`]). 3: the time index's value holds the
/// outcome's state and affiliate (empty before). 2: outcomes are packed, not
/// JSON.
/// Packed rows are not self-describing: any change to [`Outcome`]'s fields
/// (or to the types inside it) needs a new format, which
/// `tests::a_packed_outcome_keeps_its_shape` enforces.
const FORMAT: u32 = 3;

/// Folds `postbacks.v1.*`.
#[derive(Debug, Default)]
pub struct PostbacksFold;

impl Fold for PostbacksFold {
    fn format(&self) -> u32 {
        FORMAT
    }

    fn apply(&mut self, staged: &mut Staged<'_>, entry: &LogEntry<'_>) -> Result<(), sled::Error> {
        let Some(event) = PostbackEvent::decode(entry.subject, entry.payload) else {
            return skip(entry);
        };
        let id = event.delivery_id();
        if id.is_empty() {
            return skip(entry);
        }
        let key = outcome_key(id);
        let prev: Option<Outcome> = staged.get_packed(&key)?;
        let old_time = prev.as_ref().map(|p| time_key(p.updated_at_ms, id));
        if let Some(next) = event.apply(prev) {
            if let Some(old) = old_time {
                staged.remove(old);
            }
            staged.insert(time_key(next.updated_at_ms, id), listed_value(&next));
            staged.put_packed(key, &next);
        }
        Ok(())
    }
}

fn skip(entry: &LogEntry<'_>) -> Result<(), sled::Error> {
    tracing::warn!(
        subject = entry.subject,
        seq = entry.seq,
        "unexpected postback event skipped"
    );
    Ok(())
}

/// Read access to the outcomes Tree.
#[derive(Clone, Debug)]
pub struct Outcomes {
    tree: sled::Tree,
}

impl Outcomes {
    /// Reads the Tree [`PostbacksFold`] writes.
    pub fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    /// One delivery's outcome.
    ///
    /// # Errors
    /// sled read failure.
    pub fn get(&self, delivery_id: &str) -> Result<Option<Outcome>, sled::Error> {
        common::store::get_packed(&self.tree, &outcome_key(delivery_id))
    }

    /// Every outcome as the time index lists it, most recently changed first
    /// (ties: the greater delivery id first), lazily; no outcome is decoded.
    pub fn newest_first(&self) -> impl Iterator<Item = Result<Listed, sled::Error>> + '_ {
        self.tree
            .scan_prefix(b"t/")
            .rev()
            .filter_map(move |row| self.listed(row).transpose())
    }

    fn listed(
        &self,
        row: Result<(sled::IVec, sled::IVec), sled::Error>,
    ) -> Result<Option<Listed>, sled::Error> {
        let (k, v) = row?;
        let (Some(at), Some(id)) = (k.get(2..10), k.get(10..)) else {
            return Ok(None);
        };
        let mut ms = [0u8; 8];
        ms.copy_from_slice(at);
        let delivery_id = String::from_utf8_lossy(id).into_owned();
        let state = match v.first() {
            Some(b'd') => OutcomeState::Delivered,
            Some(b'f') => OutcomeState::Failed,
            Some(b'r') => OutcomeState::RetryRequested,
            // Not a row of this format (which folds again from the log).
            _ => return Ok(None),
        };
        Ok(Some(Listed {
            delivery_id,
            affiliate_id: String::from_utf8_lossy(&v[1..]).into_owned(),
            state,
            updated_at_ms: i64::try_from(u64::from_be_bytes(ms)).unwrap_or(i64::MAX),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(generation: u32) -> PostbackFailed {
        PostbackFailed {
            delivery_id: "d".into(),
            generation,
            attempts: 1,
            status_code: 404,
            ..Default::default()
        }
    }

    fn delivered(generation: u32) -> PostbackDelivered {
        PostbackDelivered {
            delivery_id: "d".into(),
            generation,
            attempts: 3,
            status_code: 200,
            ..Default::default()
        }
    }

    #[test]
    fn success_is_final() {
        let d = apply_delivered(None, &delivered(1)).unwrap();
        assert_eq!(d.state, OutcomeState::Delivered);
        assert_eq!(apply_failed(Some(d.clone()), &failed(1)), None);
        assert_eq!(apply_delivered(Some(d.clone()), &delivered(2)), None);
        let retry = PostbackRetryRequested {
            delivery_id: "d".into(),
            generation: 2,
            ..Default::default()
        };
        assert_eq!(apply_retry_requested(Some(d), &retry), None);
    }

    #[test]
    fn a_failure_can_be_retried_once_per_generation_and_then_delivered() {
        let f = apply_failed(None, &failed(1)).unwrap();
        let retry = PostbackRetryRequested {
            delivery_id: "d".into(),
            generation: 2,
            ..Default::default()
        };
        let r = apply_retry_requested(Some(f), &retry).unwrap();
        assert_eq!((r.state, r.generation), (OutcomeState::RetryRequested, 2));
        assert_eq!(
            apply_retry_requested(Some(r.clone()), &retry),
            None,
            "not twice"
        );
        assert_eq!(
            apply_failed(Some(r.clone()), &failed(1)),
            None,
            "a stale failure changes nothing"
        );
        let d = apply_delivered(Some(r), &delivered(2)).unwrap();
        assert_eq!(d.state, OutcomeState::Delivered);
        let states: Vec<_> = d.history.iter().map(|h| h.state).collect();
        assert_eq!(
            states,
            [
                OutcomeState::Failed,
                OutcomeState::RetryRequested,
                OutcomeState::Delivered
            ]
        );
    }

    #[test]
    fn a_retry_request_needs_a_failure() {
        let retry = PostbackRetryRequested {
            delivery_id: "d".into(),
            generation: 2,
            ..Default::default()
        };
        assert_eq!(apply_retry_requested(None, &retry), None);
    }

    /// Outcomes are stored packed, which is not self-describing. If this fails
    /// because `Outcome` (or a type in it) changed, bump [`FORMAT`] (the Tree
    /// is then folded again from the log on upgrade) and update the bytes.
    #[test]
    fn a_packed_outcome_keeps_its_shape() {
        let entry = HistoryEntry {
            state: OutcomeState::Failed,
            at_ms: 1,
            generation: 2,
            attempts: 3,
            status_code: 404,
            error: "e".into(),
        };
        let outcome = Outcome {
            delivery_id: "d".into(),
            conversion_id: "cv".into(),
            affiliate_id: "a".into(),
            offer_id: "o".into(),
            click_id: "ck".into(),
            url: "u".into(),
            state: OutcomeState::RetryRequested,
            generation: 4,
            attempts: 5,
            status_code: 500,
            latency_ms: Some(6),
            error: "x".into(),
            body: "b".into(),
            updated_at_ms: 7,
            history: vec![entry],
        };
        let packed = common::store::pack(&outcome);
        let hex: String = packed.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            (FORMAT, hex.as_str()),
            (3, PACKED_OUTCOME),
            "see this test's doc"
        );
        assert_eq!(common::store::unpack::<Outcome>(&packed), Some(outcome));
    }

    const PACKED_OUTCOME: &str =
        "01640263760161016f02636b0175020405f4030106017801620e010102020394030165";
}
