//! The rules an offer carries: goals, dedup policy, status words, time zone,
//! caps and postback security; and what an affiliate asks to be told.

use serde::{Deserialize, Serialize};

/// Which later conversions of a click count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DedupPolicy {
    /// The first conversion per (click, goal) counts; a later one counts only if
    /// it carries a txid not yet attributed for that (click, goal).
    #[default]
    FirstPerGoal,
    /// Exactly one conversion per (click, goal), whatever its txid.
    OnePerGoal,
    /// Every distinct txid counts once per (click, goal); without a txid, one.
    UniqueTxid,
    /// Every distinct conversion counts (retries of the same postback still
    /// do not: they are the same conversion).
    All,
}

impl DedupPolicy {
    /// The policy named `text`; empty: the default.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "" | "first_per_goal" => Self::FirstPerGoal,
            "one_per_goal" => Self::OnePerGoal,
            "unique_txid" => Self::UniqueTxid,
            "all" => Self::All,
            _ => return None,
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::FirstPerGoal => "first_per_goal",
            Self::OnePerGoal => "one_per_goal",
            Self::UniqueTxid => "unique_txid",
            Self::All => "all",
        }
    }
}

/// Our status of an attributed conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversionStatus {
    Pending,
    Approved,
    Rejected,
}

impl ConversionStatus {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
        }
    }

    /// The status named `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => Self::Pending,
            "approved" => Self::Approved,
            "rejected" => Self::Rejected,
            _ => return None,
        })
    }

    /// Whether the advertiser may move a conversion from `self` to `to`:
    /// pending → approved | rejected, approved → rejected (a reversal).
    pub fn may_become(self, to: Self) -> bool {
        matches!(
            (self, to),
            (Self::Pending, Self::Approved | Self::Rejected) | (Self::Approved, Self::Rejected)
        )
    }
}

/// Longest advertiser status word: the postback door refuses a longer one
/// and a partner's is cut to it, so a `status_map` word past it never matches.
pub const MAX_STATUS_LEN: usize = 32;

/// Built-in advertiser status words; an offer's `status_map` adds to them.
pub fn default_status(word: &str) -> Option<ConversionStatus> {
    use ConversionStatus::{Approved, Pending, Rejected};
    Some(match word {
        "" | "approved" | "approve" | "confirmed" | "confirm" | "sale" | "paid" | "ok"
        | "success" | "completed" | "complete" | "1" => Approved,
        "pending" | "hold" | "on_hold" | "waiting" | "new" | "0" => Pending,
        "rejected" | "reject" | "declined" | "decline" | "canceled" | "cancelled" | "reversed"
        | "reversal" | "refund" | "refunded" | "chargeback" | "fraud" | "trash" | "-1" => Rejected,
        _ => return None,
    })
}

/// One conversion event of an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goal {
    pub goal_id: String,
    pub name: String,
    pub payout_micros: Option<i64>,
    pub revenue_micros: Option<i64>,
    pub dedup: Option<DedupPolicy>,
}

/// Daily caps in the offer's time zone; 0: none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps {
    pub daily_clicks: u64,
    pub daily_clicks_per_affiliate: u64,
    pub daily_conversions: u64,
    pub daily_conversions_per_affiliate: u64,
}

/// How advertiser postbacks for an offer must authenticate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Security {
    pub token: String,
    pub allowed_ips: Vec<String>,
    pub hmac_secret: String,
    pub signature_window_seconds: u32,
}

impl Security {
    /// Whether any check is configured.
    pub fn is_required(&self) -> bool {
        !self.token.is_empty() || !self.allowed_ips.is_empty() || !self.hmac_secret.is_empty()
    }
}

/// The status events an affiliate is told of by default.
pub const DEFAULT_POSTBACK_STATUSES: [&str; 2] = ["approved", "reversed"];

/// Whether an affiliate that asked for `wanted` (empty: the default) is told of a
/// move from `from` (None: the attribution itself) to `to`.
pub fn affiliate_wants(
    wanted: &[String],
    from: Option<ConversionStatus>,
    to: ConversionStatus,
) -> bool {
    let wants = |name: &str| {
        if wanted.is_empty() {
            DEFAULT_POSTBACK_STATUSES.contains(&name)
        } else {
            wanted.iter().any(|w| w == name)
        }
    };
    match to {
        ConversionStatus::Pending => wants("pending"),
        ConversionStatus::Approved => wants("approved"),
        ConversionStatus::Rejected => {
            wants("rejected") || (from == Some(ConversionStatus::Approved) && wants("reversed"))
        }
    }
}

/// The calendar day (`YYYY-MM-DD`) of `ms` in time zone `tz` (empty or unknown: UTC).
pub fn day_in(tz: &str, ms: i64) -> String {
    let Ok(ts) = jiff::Timestamp::from_millisecond(ms) else {
        return "invalid".to_owned();
    };
    let zone = if tz.is_empty() {
        jiff::tz::TimeZone::UTC
    } else {
        jiff::tz::TimeZone::get(tz).unwrap_or(jiff::tz::TimeZone::UTC)
    };
    ts.to_zoned_datetime(zone).date().to_string()
}

/// Whether `tz` is a known IANA time zone.
pub fn is_time_zone(tz: &str) -> bool {
    jiff::tz::TimeZone::get(tz).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConversionStatus::{Approved, Pending, Rejected};

    #[test]
    fn status_moves_forward_only() {
        assert!(Pending.may_become(Approved));
        assert!(Pending.may_become(Rejected));
        assert!(Approved.may_become(Rejected));
        assert!(!Approved.may_become(Pending));
        assert!(!Rejected.may_become(Approved));
        assert!(!Approved.may_become(Approved));
    }

    #[test]
    fn default_words() {
        assert_eq!(default_status(""), Some(Approved));
        assert_eq!(default_status("sale"), Some(Approved));
        assert_eq!(default_status("hold"), Some(Pending));
        assert_eq!(default_status("chargeback"), Some(Rejected));
        assert_eq!(default_status("maybe"), None);
    }

    #[test]
    fn affiliates_hear_approvals_and_reversals_by_default() {
        let none: Vec<String> = Vec::new();
        assert!(affiliate_wants(&none, None, Approved));
        assert!(!affiliate_wants(&none, None, Pending));
        assert!(
            affiliate_wants(&none, Some(Approved), Rejected),
            "a reversal"
        );
        assert!(
            !affiliate_wants(&none, Some(Pending), Rejected),
            "a pending one declined"
        );
        let all = vec!["pending".to_owned(), "rejected".to_owned()];
        assert!(affiliate_wants(&all, None, Pending));
        assert!(affiliate_wants(&all, Some(Pending), Rejected));
        assert!(!affiliate_wants(&all, None, Approved));
    }

    #[test]
    fn days_follow_the_time_zone() {
        // 2026-03-01T03:30:00Z is still Feb 28 in New York (UTC-5).
        let ms = 1_772_335_800_000;
        assert_eq!(day_in("", ms), "2026-03-01");
        assert_eq!(day_in("America/New_York", ms), "2026-02-28");
        assert_eq!(day_in("Asia/Tokyo", ms), "2026-03-01");
        assert!(is_time_zone("Europe/Berlin"));
        assert!(!is_time_zone("Mars/Olympus"));
    }
}
