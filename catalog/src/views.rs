//! The catalog's entities as the projection stores them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::terms::{default_status, Caps, ConversionStatus, DedupPolicy, Goal, Security};

/// Whether an offer takes traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OfferStatus {
    Active,
    Paused,
}

/// An offer, as of its latest `OfferUpserted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub offer_id: String,
    pub name: String,
    /// Landing URL template.
    pub url: String,
    pub payout_micros: i64,
    pub revenue_micros: i64,
    pub currency: String,
    pub attribution_window_hours: u32,
    pub status: OfferStatus,
    /// Empty: none.
    pub fallback_url: String,
    /// Affiliate postback URL template overriding the affiliates' own; empty: none.
    #[serde(default)]
    pub postback_url: String,
    #[serde(default)]
    pub goals: Vec<Goal>,
    #[serde(default)]
    pub dedup: DedupPolicy,
    /// Advertiser status words (lower case) to ours, on top of the defaults.
    #[serde(default)]
    pub status_map: BTreeMap<String, ConversionStatus>,
    #[serde(default)]
    pub min_ctit_seconds: u32,
    /// IANA time zone of the daily caps; empty: UTC.
    #[serde(default)]
    pub timezone: String,
    #[serde(default)]
    pub caps: Caps,
    #[serde(default)]
    pub security: Security,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// What a conversion of one goal earns and how it is deduplicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoalTerms {
    pub payout_micros: i64,
    pub revenue_micros: i64,
    pub dedup: DedupPolicy,
}

impl Offer {
    /// The terms of `goal` (empty: the offer's default). `None`: the offer lists
    /// goals and this is not one of them. An offer without goals takes any name.
    pub fn goal_terms(&self, goal: &str) -> Option<GoalTerms> {
        let default = GoalTerms {
            payout_micros: self.payout_micros,
            revenue_micros: self.revenue_micros,
            dedup: self.dedup,
        };
        if goal.is_empty() || self.goals.is_empty() {
            return Some(default);
        }
        let g = self.goals.iter().find(|g| g.goal_id == goal)?;
        Some(GoalTerms {
            payout_micros: g.payout_micros.unwrap_or(self.payout_micros),
            revenue_micros: g.revenue_micros.unwrap_or(self.revenue_micros),
            dedup: g.dedup.unwrap_or(self.dedup),
        })
    }

    /// Our status for the advertiser's word (case-insensitive): the offer's map
    /// first, then the built-in words. `None`: a word nobody knows.
    pub fn map_status(&self, word: &str) -> Option<ConversionStatus> {
        let word = word.trim().to_ascii_lowercase();
        self.status_map
            .get(&word)
            .copied()
            .or_else(|| default_status(&word))
    }

    /// The cap day of an instant, in the offer's time zone.
    pub fn day_of(&self, ms: i64) -> String {
        crate::terms::day_in(&self.timezone, ms)
    }
}

/// An affiliate, as of its latest `AffiliateUpserted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affiliate {
    pub affiliate_id: String,
    pub name: String,
    /// Empty: none.
    pub postback_url: String,
    /// Status events it is told of; empty: approved and reversed.
    #[serde(default)]
    pub postback_statuses: Vec<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}
