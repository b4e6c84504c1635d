//! One conversion as the projection keeps it, and its pure fold.

use std::fmt;

use catalog::ConversionStatus;
use proto::conversions::v1::{
    ConversionAttributed, ConversionOrigin, ConversionRejected, ConversionReported,
    ConversionStatus as ProtoStatus, ConversionStatusUpdated, RejectReason,
};
use serde::{Deserialize, Serialize};

use crate::postback::MAX_STATUS_LEN;

/// Where a conversion is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversionState {
    Pending,
    Attributed,
    Rejected,
}

/// Why a conversion was rejected: the machine-readable reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    UnknownClick,
    Expired,
    Duplicate,
    UnknownOffer,
    Malformed,
    UnknownGoal,
    TooFast,
    CapReached,
    Unauthenticated,
    FallbackClick,
}

impl Reason {
    /// The reason code as in the API.
    pub fn code(self) -> &'static str {
        match self {
            Self::UnknownClick => "unknown_click",
            Self::Expired => "expired",
            Self::Duplicate => "duplicate",
            Self::UnknownOffer => "unknown_offer",
            Self::Malformed => "malformed",
            Self::UnknownGoal => "unknown_goal",
            Self::TooFast => "too_fast",
            Self::CapReached => "cap_reached",
            Self::Unauthenticated => "unauthenticated",
            Self::FallbackClick => "fallback_click",
        }
    }

    /// The reason of an event; an unknown enum value from a newer writer reads as
    /// `malformed` rather than failing.
    pub fn from_proto(value: i32) -> Self {
        match RejectReason::try_from(value) {
            Ok(RejectReason::UnknownClick) => Self::UnknownClick,
            Ok(RejectReason::Expired) => Self::Expired,
            Ok(RejectReason::Duplicate) => Self::Duplicate,
            Ok(RejectReason::UnknownOffer) => Self::UnknownOffer,
            Ok(RejectReason::UnknownGoal) => Self::UnknownGoal,
            Ok(RejectReason::TooFast) => Self::TooFast,
            Ok(RejectReason::CapReached) => Self::CapReached,
            Ok(RejectReason::Unauthenticated) => Self::Unauthenticated,
            Ok(RejectReason::FallbackClick) => Self::FallbackClick,
            _ => Self::Malformed,
        }
    }

    /// The event's enum value.
    pub fn to_proto(self) -> RejectReason {
        match self {
            Self::UnknownClick => RejectReason::UnknownClick,
            Self::Expired => RejectReason::Expired,
            Self::Duplicate => RejectReason::Duplicate,
            Self::UnknownOffer => RejectReason::UnknownOffer,
            Self::Malformed => RejectReason::Malformed,
            Self::UnknownGoal => RejectReason::UnknownGoal,
            Self::TooFast => RejectReason::TooFast,
            Self::CapReached => RejectReason::CapReached,
            Self::Unauthenticated => RejectReason::Unauthenticated,
            Self::FallbackClick => RejectReason::FallbackClick,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// One conversion: what was reported, and what was decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversionView {
    pub conversion_id: String,
    pub click_id: String,
    pub goal: String,
    pub txid: String,
    pub amount_micros: Option<i64>,
    pub currency: String,
    /// `http` or `nats`.
    pub origin: String,
    pub ip: String,
    /// Event time of the conversion.
    pub converted_at_ms: i64,
    /// When the log stored the report.
    pub reported_at_ms: i64,
    pub reported_seq: u64,
    /// Set when the report itself is malformed: why.
    pub malformed: Option<String>,
    /// The report's bytes, hex, when it did not decode.
    pub raw_hex: Option<String>,
    pub state: ConversionState,
    pub reason: Option<Reason>,
    pub detail: String,
    pub offer_id: String,
    pub affiliate_id: String,
    pub payout_micros: i64,
    pub payout_currency: String,
    pub revenue_micros: i64,
    pub revenue_currency: String,
    pub decided_at_ms: Option<i64>,
    /// The affiliate postback URL template fixed by the attribution; empty: none.
    #[serde(default)]
    pub postback_url: String,
    /// The status events the affiliate is told of, fixed by the attribution.
    #[serde(default)]
    pub postback_statuses: Vec<String>,
    /// Our status of an attributed conversion.
    #[serde(default)]
    pub status: Option<ConversionStatus>,
    /// The advertiser's latest status word, as sent (lower case).
    #[serde(default)]
    pub advertiser_status: String,
    /// The offer whose postback security this report passed at the door.
    #[serde(default)]
    pub verified_offer_id: String,
    /// The cap day the attribution counted against.
    #[serde(default)]
    pub cap_day: String,
    /// Every status move after the attribution.
    #[serde(default)]
    pub status_history: Vec<StatusChange>,
}

/// One status move of an attributed conversion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    pub from: ConversionStatus,
    pub to: ConversionStatus,
    pub advertiser_status: String,
    pub at_ms: i64,
}

/// Our status of an event value (unspecified reads as approved).
pub(crate) fn status_from_proto(value: i32) -> ConversionStatus {
    match ProtoStatus::try_from(value) {
        Ok(ProtoStatus::Pending) => ConversionStatus::Pending,
        Ok(ProtoStatus::Rejected) => ConversionStatus::Rejected,
        _ => ConversionStatus::Approved,
    }
}

/// The event value of our status.
pub(crate) fn status_to_proto(status: ConversionStatus) -> ProtoStatus {
    match status {
        ConversionStatus::Pending => ProtoStatus::Pending,
        ConversionStatus::Approved => ProtoStatus::Approved,
        ConversionStatus::Rejected => ProtoStatus::Rejected,
    }
}

impl ConversionView {
    /// A pending conversion from a normalised report.
    pub fn reported(e: &ConversionReported, seq: u64, log_time_ms: i64) -> Self {
        let origin = match e.origin() {
            ConversionOrigin::Http => "http",
            ConversionOrigin::Nats | ConversionOrigin::Unspecified => "nats",
        };
        Self {
            conversion_id: e.conversion_id.clone(),
            click_id: e.click_id.clone(),
            goal: e.goal.clone(),
            txid: e.txid.clone(),
            amount_micros: e.amount_micros,
            currency: e.currency.clone(),
            origin: origin.to_owned(),
            ip: e.ip.clone(),
            converted_at_ms: e.occurred_at_ms,
            reported_at_ms: log_time_ms,
            reported_seq: seq,
            malformed: None,
            raw_hex: None,
            state: ConversionState::Pending,
            reason: None,
            detail: String::new(),
            offer_id: String::new(),
            affiliate_id: String::new(),
            payout_micros: 0,
            payout_currency: String::new(),
            revenue_micros: 0,
            revenue_currency: String::new(),
            decided_at_ms: None,
            postback_url: String::new(),
            postback_statuses: Vec::new(),
            status: None,
            advertiser_status: clipped(e.status.trim().to_ascii_lowercase(), MAX_STATUS_LEN),
            verified_offer_id: clipped(e.verified_offer_id.clone(), MAX_OFFER_ID_LEN),
            cap_day: String::new(),
            status_history: Vec::new(),
        }
    }

    /// A pending conversion from a report that is malformed: it waits only for
    /// its `malformed` decision.
    pub fn malformed(
        conversion_id: String,
        partial: Option<&ConversionReported>,
        why: String,
        raw: &[u8],
        seq: u64,
        log_time_ms: i64,
    ) -> Self {
        let mut view = Self::reported(&partial.cloned().unwrap_or_default(), seq, log_time_ms);
        view.conversion_id = conversion_id;
        view.converted_at_ms = log_time_ms;
        view.malformed = Some(why);
        view.raw_hex = Some(raw.iter().take(4096).map(|b| format!("{b:02x}")).collect());
        view.origin = "nats".to_owned();
        // What was sent, cut to what a well-formed report may hold: its
        // rejection carries these, and must fit in a NATS message (a report
        // of a megabyte would stop every decision behind it). All the bytes
        // as sent are in `raw_hex`, up to 4 KB.
        use crate::postback::{MAX_CONVERSION_ID_LEN, MAX_GOAL_LEN, MAX_TXID_LEN};
        for (field, max) in [
            (&mut view.click_id, MAX_CONVERSION_ID_LEN),
            (&mut view.goal, MAX_GOAL_LEN),
            (&mut view.txid, MAX_TXID_LEN),
            (&mut view.advertiser_status, MAX_STATUS_LEN),
            (&mut view.currency, 8),
            (&mut view.ip, 64),
        ] {
            clip(field, max);
        }
        view
    }

    /// The view after an attribution. Only a pending conversion changes: the first
    /// decision wins, later ones (a re-decision after a lost ack) are ignored.
    pub fn attributed(mut self, e: &ConversionAttributed) -> Self {
        if self.state != ConversionState::Pending {
            return self;
        }
        self.state = ConversionState::Attributed;
        self.offer_id.clone_from(&e.offer_id);
        self.affiliate_id.clone_from(&e.affiliate_id);
        self.payout_micros = e.payout_micros;
        self.payout_currency.clone_from(&e.payout_currency);
        self.revenue_micros = e.revenue_micros;
        self.revenue_currency.clone_from(&e.revenue_currency);
        self.decided_at_ms = Some(e.occurred_at_ms);
        self.postback_url.clone_from(&e.affiliate_postback_url);
        self.postback_statuses.clone_from(&e.postback_statuses);
        self.status = Some(status_from_proto(e.status));
        self.cap_day.clone_from(&e.cap_day);
        self
    }

    /// The view after a status update; only a changed one on an attributed
    /// conversion moves it.
    pub fn status_updated(mut self, e: &ConversionStatusUpdated) -> Self {
        let (Some(from), true) = (self.status, e.changed) else {
            return self;
        };
        let to = status_from_proto(e.to);
        if from != to {
            self.status = Some(to);
            self.status_history.push(StatusChange {
                from,
                to,
                advertiser_status: e.advertiser_status.clone(),
                at_ms: e.occurred_at_ms,
            });
        }
        self
    }

    /// Whether `report`, a report of this same conversion, opens it again, to
    /// be decided as that report:
    /// - a report verified for an offer (or a partner's, trusted), when this
    ///   one was rejected
    ///   `unauthenticated` or is an HTTP report nobody verified still waiting
    ///   for its decision. A report nobody verified (sent while the door could
    ///   not see its click, by anyone who knew the click id) must not keep the
    ///   advertiser's verified one out;
    /// - a report with another status word, when this one was rejected
    ///   `malformed` for its word alone (rule 7: a typo, a word the offer's
    ///   `status_map` did not know). The conversion id leaves the word out,
    ///   so the advertiser's corrected retry names this conversion, and would
    ///   otherwise be ignored as a status change of a rejected one.
    pub fn reopens_with(&self, report: &ConversionView) -> bool {
        let unverified_report = self.state == ConversionState::Pending
            && self.malformed.is_none()
            && self.origin == "http"
            && self.verified_offer_id.is_empty();
        // A partner's report on NATS is trusted as a verified one is.
        let trusted = !report.verified_offer_id.is_empty() || report.origin != "http";
        let verified = trusted
            && (unverified_report
                || (self.state == ConversionState::Rejected
                    && self.reason == Some(Reason::Unauthenticated)));
        verified || self.rejected_for_its_word(&report.advertiser_status)
    }

    /// Rejected `malformed` for its status word alone (rule 7: the report
    /// itself was well formed), and `word` is another one.
    pub fn rejected_for_its_word(&self, word: &str) -> bool {
        self.state == ConversionState::Rejected
            && self.reason == Some(Reason::Malformed)
            && self.malformed.is_none()
            && word != self.advertiser_status
    }

    /// Pending again, as the report of the same conversion at `seq` that
    /// `update` tells (its word, origin, door verification, amount and
    /// currency): decided afresh, as that report.
    pub fn reopened_as(mut self, update: &super::fold::StatusUpdate, seq: u64) -> Self {
        self.state = ConversionState::Pending;
        self.reason = None;
        self.detail.clear();
        self.offer_id.clear();
        self.affiliate_id.clear();
        self.decided_at_ms = None;
        self.reported_seq = seq;
        update
            .advertiser_status
            .clone_into(&mut self.advertiser_status);
        if !update.origin.is_empty() {
            update.origin.clone_into(&mut self.origin);
        }
        update
            .verified_offer_id
            .clone_into(&mut self.verified_offer_id);
        self.amount_micros = update.amount_micros;
        update.currency.clone_into(&mut self.currency);
        self
    }

    /// The view after a rejection; like [`Self::attributed`], first decision wins.
    pub fn rejected(mut self, e: &ConversionRejected) -> Self {
        if self.state != ConversionState::Pending {
            return self;
        }
        self.state = ConversionState::Rejected;
        self.reason = Some(Reason::from_proto(e.reason));
        self.detail.clone_from(&e.detail);
        self.offer_id.clone_from(&e.offer_id);
        self.affiliate_id.clone_from(&e.affiliate_id);
        self.decided_at_ms = Some(e.occurred_at_ms);
        self
    }
}

/// Longest offer id (as the catalog takes them).
const MAX_OFFER_ID_LEN: usize = 64;

/// `text` cut to at most `max` bytes ([`clip`]). A partner's status word or
/// verified offer, unlike an HTTP report's, comes unchecked, and both go into
/// decisions (a detail, a status update), which must fit in a NATS message:
/// a word no offer maps, cut, is still one no offer maps.
fn clipped(mut text: String, max: usize) -> String {
    clip(&mut text, max);
    text
}

/// `text` cut to at most `max` bytes, at a character's boundary.
fn clip(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> ConversionView {
        let e = ConversionReported {
            conversion_id: "cv".into(),
            click_id: "ck".into(),
            occurred_at_ms: 5,
            origin: ConversionOrigin::Http as i32,
            ..Default::default()
        };
        ConversionView::reported(&e, 9, 7)
    }

    #[test]
    fn a_report_is_pending_with_its_times() {
        let v = pending();
        assert_eq!(v.state, ConversionState::Pending);
        assert_eq!(
            (v.converted_at_ms, v.reported_at_ms, v.reported_seq),
            (5, 7, 9)
        );
        assert_eq!(v.origin, "http");
    }

    #[test]
    fn the_first_decision_wins() {
        let attributed = ConversionAttributed {
            offer_id: "o".into(),
            payout_micros: 3,
            occurred_at_ms: 11,
            ..Default::default()
        };
        let v = pending().attributed(&attributed);
        assert_eq!(
            (v.state, v.payout_micros, v.decided_at_ms),
            (ConversionState::Attributed, 3, Some(11))
        );
        let rejected = ConversionRejected {
            reason: RejectReason::Duplicate as i32,
            ..Default::default()
        };
        assert_eq!(
            v.clone().rejected(&rejected),
            v,
            "a later decision changes nothing"
        );
        let r = pending().rejected(&rejected);
        assert_eq!(
            (r.state, r.reason),
            (ConversionState::Rejected, Some(Reason::Duplicate))
        );
        assert_eq!(r.clone().attributed(&attributed), r);
    }

    #[test]
    fn a_partner_s_unchecked_words_are_kept_short_enough_to_decide() {
        let e = ConversionReported {
            status: format!(" {}\u{1} ", "é".repeat(600_000)),
            verified_offer_id: "o".repeat(1_000_000),
            ..Default::default()
        };
        let view = ConversionView::reported(&e, 1, 1);
        assert!(view.advertiser_status.len() <= MAX_STATUS_LEN);
        assert!(
            view.advertiser_status.starts_with("é"),
            "cut at a character"
        );
        assert_eq!(view.verified_offer_id.len(), MAX_OFFER_ID_LEN);
    }

    #[test]
    fn unknown_reason_values_read_as_malformed() {
        assert_eq!(Reason::from_proto(999), Reason::Malformed);
        for r in [
            Reason::UnknownClick,
            Reason::Expired,
            Reason::Duplicate,
            Reason::UnknownOffer,
            Reason::Malformed,
            Reason::UnknownGoal,
            Reason::TooFast,
            Reason::CapReached,
            Reason::Unauthenticated,
        ] {
            assert_eq!(Reason::from_proto(r.to_proto() as i32), r);
        }
    }
}
