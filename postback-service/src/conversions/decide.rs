//! The one place with judgement: does a reported conversion count, and what does
//! a later status report change? Pure: no clock, no I/O.
//!
//! Rules for a report, in order; the first that applies decides:
//! 1. a malformed report is rejected `malformed`;
//! 2. no click in the projection: wait, or once the grace is over, reject
//!    `unknown_click`;
//! 3. the click's offer is not in the catalog: `unknown_offer`;
//! 4. the offer requires postback security and this HTTP report did not pass it
//!    for this offer at the door, or the door verified it for another offer:
//!    `unauthenticated`;
//! 5. the click was sent to the offer's fallback URL (the offer was paused or
//!    its click cap full), not to its landing page: `fallback_click`;
//! 6. the offer lists goals and this goal is not one: `unknown_goal`;
//! 7. the advertiser's status word is unknown to the offer: `malformed`;
//! 8. faster than the offer's `min_ctit_seconds` after the click, or dated
//!    more than [`CLOCK_SKEW_MS`] before it: `too_fast`;
//! 9. after click time + the offer's attribution window: `expired`;
//! 10. a duplicate under the goal's dedup policy: `duplicate`;
//! 11. a daily conversion cap of the offer (overall or for this affiliate) is
//!     full for the conversion's day in the offer's time zone: `cap_reached`;
//! 12. otherwise attributed, with the goal's payout; revenue from the postback's
//!     amount (in its currency, else the offer's) or else the goal's revenue; the
//!     status the advertiser sent (default approved); the affiliate postback URL
//!     and status list in force fixed in the decision.

use catalog::{Affiliate, ConversionStatus, DedupPolicy, Offer};
use proto::clicks::v1::{ClickDisposition, ClickRecorded};

use super::fold::StatusUpdate;
use super::view::{ConversionState, ConversionView, Reason};

/// How far before its click a conversion may be dated and still count: the
/// click is timed by click-service's clock, the conversion by postback-service's
/// or a partner's. Further back, it is a conversion that did not follow the
/// click (or a date set to land on another cap day): `too_fast`.
pub(crate) const CLOCK_SKEW_MS: i64 = 5_000;

/// Everything `decide` looks at.
#[derive(Debug, Clone, Copy)]
pub struct DecideInput<'a> {
    pub conversion: &'a ConversionView,
    /// An HTTP report the door could not check (it did not know the offer)
    /// whose kept parameters pass the offer's postback security now.
    pub checked_now: bool,
    pub click: Option<&'a ClickRecorded>,
    pub offer: Option<&'a Offer>,
    /// The click's affiliate, for its postback URL and status list.
    pub affiliate: Option<&'a Affiliate>,
    /// An attributed conversion exists for (click, goal).
    pub goal_taken: bool,
    /// An attributed conversion exists for (click, goal, txid).
    pub txid_taken: bool,
    /// The unknown-click grace has passed and the click fold has applied every
    /// click stored until the grace ran out.
    pub click_wait_over: bool,
    /// The catalog fold has applied every catalog event stored before the
    /// click was recorded: an offer or affiliate it lacks is not coming. (A
    /// click proves both were in the catalog when it was recorded, so a
    /// catalog fold behind the clicks fold must not make them `unknown`.)
    pub catalog_wait_over: bool,
    /// Attributions already counted on this conversion's cap day: for the offer,
    /// and for the offer and this affiliate.
    pub cap_used: (u64, u64),
}

/// What `decide` concludes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not yet: the click may still arrive.
    Wait,
    Attribute {
        offer_id: String,
        affiliate_id: String,
        payout_micros: i64,
        payout_currency: String,
        revenue_micros: i64,
        revenue_currency: String,
        /// The affiliate postback URL template in force; empty: none.
        postback_url: String,
        /// The status events the affiliate is told of.
        postback_statuses: Vec<String>,
        status: ConversionStatus,
        /// The day counted against caps.
        cap_day: String,
    },
    Reject {
        reason: Reason,
        detail: String,
    },
}

fn reject(reason: Reason, detail: impl Into<String>) -> Verdict {
    Verdict::Reject {
        reason,
        detail: detail.into(),
    }
}

/// Whether a conversion is a duplicate under `policy`.
pub fn is_duplicate(
    policy: DedupPolicy,
    has_txid: bool,
    goal_taken: bool,
    txid_taken: bool,
) -> bool {
    match policy {
        DedupPolicy::FirstPerGoal => {
            if has_txid {
                txid_taken
            } else {
                goal_taken
            }
        }
        DedupPolicy::OnePerGoal => goal_taken,
        DedupPolicy::UniqueTxid => txid_taken,
        DedupPolicy::All => false,
    }
}

/// Rule 4: why an HTTP report (`origin`) does not count for `offer`: the
/// offer requires postback security and the door did not verify the report
/// for it (`verified_offer_id`), or the door verified it for another offer
/// (its `offer_id=` named one whose security the sender passes). Partner
/// events on NATS are trusted.
fn unverified(offer: &Offer, origin: &str, verified_offer_id: &str) -> Option<String> {
    // An offer asking for no security takes any postback, one verified for
    // another offer (its `offer_id=` named that one) too.
    if origin != "http" || verified_offer_id == offer.offer_id || !offer.security.is_required() {
        return None;
    }
    if !verified_offer_id.is_empty() {
        return Some(format!(
            "this postback was verified for offer {verified_offer_id}, not for the click's offer {}",
            offer.offer_id
        ));
    }
    offer.security.is_required().then(|| {
        "the offer requires postback security; this postback was not verified for it".to_owned()
    })
}

/// Rule 5: why the click went to its offer's fallback URL, if it did. Its
/// visitor never saw the offer (paused, or over its click cap: traffic the
/// advertiser turned away), so a sale reported for it is not the offer's.
fn fallback(click: &ClickRecorded) -> Option<&'static str> {
    match click.disposition() {
        ClickDisposition::FallbackPaused => Some("the offer was paused"),
        ClickDisposition::FallbackCapped => Some("its daily click cap was full"),
        ClickDisposition::Landing | ClickDisposition::Unspecified => None,
    }
}

/// Decides one reported conversion.
pub fn decide(input: DecideInput<'_>) -> Verdict {
    let c = input.conversion;
    if let Some(why) = &c.malformed {
        return reject(Reason::Malformed, why.clone());
    }
    let Some(click) = input.click else {
        return if input.click_wait_over {
            reject(Reason::UnknownClick, "no click with this id was recorded")
        } else {
            Verdict::Wait
        };
    };
    if !input.catalog_wait_over && (input.offer.is_none() || input.affiliate.is_none()) {
        return Verdict::Wait;
    }
    let Some(offer) = input.offer else {
        return reject(
            Reason::UnknownOffer,
            format!("offer {:?} is not in the catalog", click.offer_id),
        );
    };
    let verified_for = if input.checked_now {
        &offer.offer_id
    } else {
        &c.verified_offer_id
    };
    if let Some(why) = unverified(offer, &c.origin, verified_for) {
        return reject(Reason::Unauthenticated, why);
    }
    if let Some(why) = fallback(click) {
        return reject(
            Reason::FallbackClick,
            format!(
                "the click was sent to offer {}'s fallback URL ({why}), not to its landing page",
                offer.offer_id
            ),
        );
    }
    let goal = if c.goal.is_empty() {
        "default"
    } else {
        &c.goal
    };
    let Some(terms) = offer.goal_terms(&c.goal) else {
        return reject(
            Reason::UnknownGoal,
            format!("goal {goal:?} is not a goal of offer {}", offer.offer_id),
        );
    };
    let Some(status) = offer.map_status(&c.advertiser_status) else {
        return reject(
            Reason::Malformed,
            format!("unknown status word {:?}", c.advertiser_status),
        );
    };
    let age_ms = c.converted_at_ms.saturating_sub(click.occurred_at_ms);
    if age_ms < -CLOCK_SKEW_MS {
        return reject(
            Reason::TooFast,
            format!(
                "dated {} ms before the click (more than the {CLOCK_SKEW_MS} ms allowed for \
                 clock skew)",
                age_ms.saturating_neg()
            ),
        );
    }
    if offer.min_ctit_seconds > 0 && age_ms < i64::from(offer.min_ctit_seconds) * 1000 {
        return reject(
            Reason::TooFast,
            format!(
                "converted {} ms after the click; the minimum is {} s",
                age_ms, offer.min_ctit_seconds
            ),
        );
    }
    let window_ms = i64::from(offer.attribution_window_hours) * 3_600_000;
    if age_ms > window_ms {
        return reject(
            Reason::Expired,
            format!(
                "converted {}s after the click; the window is {}h",
                age_ms / 1000,
                offer.attribution_window_hours
            ),
        );
    }
    if is_duplicate(
        terms.dedup,
        !c.txid.is_empty(),
        input.goal_taken,
        input.txid_taken,
    ) {
        let detail = if c.txid.is_empty() {
            format!(
                "goal {goal} already attributed for this click ({})",
                terms.dedup.name()
            )
        } else {
            format!(
                "txid {:?} already attributed for goal {goal} ({})",
                c.txid,
                terms.dedup.name()
            )
        };
        return reject(Reason::Duplicate, detail);
    }
    let caps = offer.caps;
    let cap_day = offer.day_of(c.converted_at_ms);
    if caps.daily_conversions > 0 && input.cap_used.0 >= caps.daily_conversions {
        return reject(
            Reason::CapReached,
            format!(
                "daily cap of {} conversions reached on {cap_day}",
                caps.daily_conversions
            ),
        );
    }
    if caps.daily_conversions_per_affiliate > 0
        && input.cap_used.1 >= caps.daily_conversions_per_affiliate
    {
        return reject(
            Reason::CapReached,
            format!(
                "daily cap of {} conversions for this affiliate reached on {cap_day}",
                caps.daily_conversions_per_affiliate
            ),
        );
    }
    let (revenue_micros, revenue_currency) = match c.amount_micros {
        Some(amount) if !c.currency.is_empty() => (amount, c.currency.clone()),
        Some(amount) => (amount, offer.currency.clone()),
        None => (terms.revenue_micros, offer.currency.clone()),
    };
    Verdict::Attribute {
        offer_id: click.offer_id.clone(),
        affiliate_id: click.affiliate_id.clone(),
        payout_micros: terms.payout_micros,
        payout_currency: offer.currency.clone(),
        revenue_micros,
        revenue_currency,
        postback_url: catalog::postback_template(offer, input.affiliate).to_owned(),
        postback_statuses: input
            .affiliate
            .map(|a| a.postback_statuses.clone())
            .unwrap_or_default(),
        status,
        cap_day,
    }
}

/// What a later status report of a known conversion does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusVerdict {
    /// The conversion is not decided yet.
    Wait,
    /// Nothing changes, and why.
    Ignore(String),
    Change {
        from: ConversionStatus,
        to: ConversionStatus,
    },
}

/// Decides a later status report: pending → approved | rejected and approved →
/// rejected (a reversal) move the conversion; anything else changes nothing.
pub fn decide_status(
    view: &ConversionView,
    offer: Option<&Offer>,
    update: &StatusUpdate,
) -> StatusVerdict {
    let word = update.advertiser_status.as_str();
    match view.state {
        ConversionState::Pending => return StatusVerdict::Wait,
        ConversionState::Rejected => {
            return StatusVerdict::Ignore(format!(
                "the conversion was rejected ({})",
                view.reason.map_or("unknown", Reason::code)
            ))
        }
        ConversionState::Attributed => {}
    }
    // Rule 4 holds for a status report as for the first: an HTTP report the
    // door could not check (its click not folded there yet) moves nothing on
    // an offer that requires postback security.
    if let Some(why) = offer.and_then(|o| unverified(o, &update.origin, &update.verified_offer_id))
    {
        return StatusVerdict::Ignore(format!("unauthenticated: {why}"));
    }
    let mapped = match offer {
        Some(o) => o.map_status(word),
        None => catalog::terms::default_status(&word.trim().to_ascii_lowercase()),
    };
    let Some(to) = mapped else {
        return StatusVerdict::Ignore(format!("unknown status word {word:?}"));
    };
    let from = view.status.unwrap_or(ConversionStatus::Approved);
    if from == to {
        StatusVerdict::Ignore(format!("already {}", to.name()))
    } else if !from.may_become(to) {
        StatusVerdict::Ignore(format!("{} cannot become {}", from.name(), to.name()))
    } else {
        StatusVerdict::Change { from, to }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::{Caps, Goal, OfferStatus, Security};
    use proto::conversions::v1::{ConversionAttributed, ConversionOrigin, ConversionReported};

    const HOUR: i64 = 3_600_000;

    fn offer() -> Offer {
        Offer {
            offer_id: "o1".into(),
            name: "o".into(),
            url: "https://a.test/".into(),
            payout_micros: 2_000_000,
            revenue_micros: 5_000_000,
            currency: "USD".into(),
            attribution_window_hours: 24,
            status: OfferStatus::Active,
            fallback_url: String::new(),
            postback_url: String::new(),
            goals: Vec::new(),
            dedup: DedupPolicy::default(),
            status_map: Default::default(),
            min_ctit_seconds: 0,
            timezone: String::new(),
            caps: Caps::default(),
            security: Security::default(),
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn click() -> ClickRecorded {
        ClickRecorded {
            click_id: "c1".into(),
            offer_id: "o1".into(),
            affiliate_id: "a1".into(),
            occurred_at_ms: 1000,
            ..Default::default()
        }
    }

    fn conversion(at: i64, txid: &str, amount: Option<i64>, currency: &str) -> ConversionView {
        let e = ConversionReported {
            conversion_id: "cv".into(),
            click_id: "c1".into(),
            occurred_at_ms: at,
            txid: txid.into(),
            amount_micros: amount,
            currency: currency.into(),
            origin: ConversionOrigin::Http as i32,
            ..Default::default()
        };
        ConversionView::reported(&e, 1, at)
    }

    fn input<'a>(
        c: &'a ConversionView,
        click: Option<&'a ClickRecorded>,
        offer: Option<&'a Offer>,
    ) -> DecideInput<'a> {
        DecideInput {
            conversion: c,
            checked_now: false,
            click,
            offer,
            affiliate: None,
            goal_taken: false,
            txid_taken: false,
            click_wait_over: false,
            catalog_wait_over: true,
            cap_used: (0, 0),
        }
    }

    fn reason(v: Verdict) -> Reason {
        match v {
            Verdict::Reject { reason, .. } => reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    fn attributed(v: Verdict) -> (i64, i64, String, ConversionStatus) {
        match v {
            Verdict::Attribute {
                payout_micros,
                revenue_micros,
                revenue_currency,
                status,
                ..
            } => (payout_micros, revenue_micros, revenue_currency, status),
            other => panic!("expected an attribution, got {other:?}"),
        }
    }

    #[test]
    fn attributes_with_offer_payout_and_revenue() {
        let (c, k, o) = (conversion(2000, "", None, ""), click(), offer());
        let v = decide(input(&c, Some(&k), Some(&o)));
        let Verdict::Attribute {
            offer_id,
            affiliate_id,
            payout_currency,
            cap_day,
            ..
        } = v.clone()
        else {
            panic!()
        };
        assert_eq!(
            (
                offer_id.as_str(),
                affiliate_id.as_str(),
                payout_currency.as_str()
            ),
            ("o1", "a1", "USD")
        );
        assert_eq!(cap_day, "1970-01-01");
        assert_eq!(
            attributed(v),
            (
                2_000_000,
                5_000_000,
                "USD".into(),
                ConversionStatus::Approved
            )
        );
    }

    #[test]
    fn revenue_comes_from_the_postback_amount_when_given() {
        let (k, o) = (click(), offer());
        let c = conversion(2000, "", Some(9_990_000), "EUR");
        assert_eq!(
            attributed(decide(input(&c, Some(&k), Some(&o)))).1,
            9_990_000
        );
        assert_eq!(attributed(decide(input(&c, Some(&k), Some(&o)))).2, "EUR");
        let c = conversion(2000, "", Some(1), "");
        assert_eq!(
            attributed(decide(input(&c, Some(&k), Some(&o)))).2,
            "USD",
            "amount without currency is in the offer's"
        );
    }

    #[test]
    fn waits_for_the_click_until_the_grace_is_over() {
        let c = conversion(2000, "", None, "");
        assert_eq!(decide(input(&c, None, None)), Verdict::Wait);
        let over = DecideInput {
            click_wait_over: true,
            ..input(&c, None, None)
        };
        assert_eq!(reason(decide(over)), Reason::UnknownClick);
    }

    #[test]
    fn rejects_malformed_first_and_unknown_offers() {
        let mut c = conversion(2000, "", None, "");
        let k = click();
        assert_eq!(
            reason(decide(input(&c, Some(&k), None))),
            Reason::UnknownOffer
        );
        c.malformed = Some("missing click_id".into());
        assert_eq!(reason(decide(input(&c, None, None))), Reason::Malformed);
    }

    #[test]
    fn a_catalog_fold_behind_the_click_makes_its_offer_and_affiliate_wait_not_unknown() {
        let (c, k, o) = (conversion(2000, "", None, ""), click(), offer());
        let lagging = |offer, affiliate| DecideInput {
            affiliate,
            catalog_wait_over: false,
            ..input(&c, Some(&k), offer)
        };
        let aff = Affiliate {
            affiliate_id: "a1".into(),
            name: String::new(),
            postback_url: String::new(),
            postback_statuses: Vec::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        assert_eq!(decide(lagging(None, Some(&aff))), Verdict::Wait);
        assert_eq!(
            decide(lagging(Some(&o), None)),
            Verdict::Wait,
            "attributed without the affiliate's postback URL otherwise"
        );
        attributed(decide(lagging(Some(&o), Some(&aff))));
        // The click's wait comes first: a conversion without its click is
        // not held for the catalog.
        let no_click = DecideInput {
            click_wait_over: true,
            catalog_wait_over: false,
            ..input(&c, None, None)
        };
        assert_eq!(reason(decide(no_click)), Reason::UnknownClick);
    }

    #[test]
    fn a_click_sent_to_the_fallback_url_earns_nothing() {
        let (c, o) = (conversion(2000, "", None, ""), offer());
        for disposition in [
            ClickDisposition::FallbackPaused,
            ClickDisposition::FallbackCapped,
        ] {
            let mut k = click();
            k.set_disposition(disposition);
            assert_eq!(
                reason(decide(input(&c, Some(&k), Some(&o)))),
                Reason::FallbackClick,
                "{disposition:?}"
            );
        }
        let mut landed = click();
        landed.set_disposition(ClickDisposition::Landing);
        attributed(decide(input(&c, Some(&landed), Some(&o))));
    }

    #[test]
    fn the_window_is_inclusive_and_then_expires() {
        let (k, o) = (click(), offer());
        let edge = conversion(1000 + 24 * HOUR, "", None, "");
        attributed(decide(input(&edge, Some(&k), Some(&o))));
        let late = conversion(1001 + 24 * HOUR, "", None, "");
        assert_eq!(
            reason(decide(input(&late, Some(&k), Some(&o)))),
            Reason::Expired
        );
    }

    #[test]
    fn goals_select_terms_and_unknown_goals_are_rejected() {
        let k = click();
        let o = Offer {
            goals: vec![
                Goal {
                    goal_id: "install".into(),
                    name: "Install".into(),
                    payout_micros: Some(1),
                    revenue_micros: None,
                    dedup: None,
                },
                Goal {
                    goal_id: "purchase".into(),
                    name: "Buy".into(),
                    payout_micros: None,
                    revenue_micros: Some(7),
                    dedup: None,
                },
            ],
            ..offer()
        };
        let mut c = conversion(2000, "", None, "");
        c.goal = "install".into();
        let (p, r, ..) = attributed(decide(input(&c, Some(&k), Some(&o))));
        assert_eq!((p, r), (1, 5_000_000));
        c.goal = "purchase".into();
        let (p, r, ..) = attributed(decide(input(&c, Some(&k), Some(&o))));
        assert_eq!((p, r), (2_000_000, 7));
        c.goal = "signup".into();
        assert_eq!(
            reason(decide(input(&c, Some(&k), Some(&o)))),
            Reason::UnknownGoal
        );
        c.goal = String::new();
        let (p, ..) = attributed(decide(input(&c, Some(&k), Some(&o))));
        assert_eq!(p, 2_000_000, "no goal: the offer's default");
    }

    #[test]
    fn dedup_policies() {
        use DedupPolicy::{All, FirstPerGoal, OnePerGoal, UniqueTxid};
        // (policy, has txid, goal taken, txid taken) -> duplicate?
        let cases = [
            (FirstPerGoal, false, true, false, true),
            (FirstPerGoal, true, true, false, false),
            (FirstPerGoal, true, true, true, true),
            (OnePerGoal, true, true, false, true),
            (OnePerGoal, false, false, false, false),
            (UniqueTxid, false, true, false, false),
            (UniqueTxid, true, true, true, true),
            (UniqueTxid, false, true, true, true),
            (All, true, true, true, false),
        ];
        for (policy, has_txid, goal, txid, dup) in cases {
            assert_eq!(
                is_duplicate(policy, has_txid, goal, txid),
                dup,
                "{policy:?} {has_txid} {goal} {txid}"
            );
        }
    }

    #[test]
    fn too_fast_and_status_words() {
        let k = click();
        let o = Offer {
            min_ctit_seconds: 10,
            ..offer()
        };
        let fast = conversion(1000 + 9_999, "", None, "");
        assert_eq!(
            reason(decide(input(&fast, Some(&k), Some(&o)))),
            Reason::TooFast
        );
        let ok = conversion(1000 + 10_000, "", None, "");
        attributed(decide(input(&ok, Some(&k), Some(&o))));
        // Before its click: within the clocks' skew it counts, beyond it not,
        // whatever the offer's minimum.
        let skewed = conversion(1000 - CLOCK_SKEW_MS, "", None, "");
        attributed(decide(input(&skewed, Some(&k), Some(&offer()))));
        let before = conversion(1000 - CLOCK_SKEW_MS - 1, "", None, "");
        let verdict = decide(input(&before, Some(&k), Some(&offer())));
        assert!(
            matches!(&verdict, Verdict::Reject { reason: Reason::TooFast, detail }
                if detail.contains("before the click")),
            "{verdict:?}"
        );
        let mut far = k.clone();
        far.occurred_at_ms = i64::MIN;
        let late = conversion(i64::MAX, "", None, "");
        assert_eq!(
            reason(decide(input(&late, Some(&far), Some(&offer())))),
            Reason::Expired,
            "no overflow"
        );
        let mut held = conversion(2000, "", None, "");
        held.advertiser_status = "hold".into();
        assert_eq!(
            attributed(decide(input(&held, Some(&k), Some(&offer())))).3,
            ConversionStatus::Pending
        );
        held.advertiser_status = "weird".into();
        assert_eq!(
            reason(decide(input(&held, Some(&k), Some(&offer())))),
            Reason::Malformed
        );
    }

    #[test]
    fn caps_at_the_boundary() {
        let k = click();
        let o = Offer {
            caps: Caps {
                daily_conversions: 3,
                daily_conversions_per_affiliate: 2,
                ..Caps::default()
            },
            ..offer()
        };
        let c = conversion(2000, "", None, "");
        attributed(decide(DecideInput {
            cap_used: (2, 1),
            ..input(&c, Some(&k), Some(&o))
        }));
        assert_eq!(
            reason(decide(DecideInput {
                cap_used: (3, 0),
                ..input(&c, Some(&k), Some(&o))
            })),
            Reason::CapReached
        );
        assert_eq!(
            reason(decide(DecideInput {
                cap_used: (0, 2),
                ..input(&c, Some(&k), Some(&o))
            })),
            Reason::CapReached
        );
    }

    #[test]
    fn security_is_required_for_http_reports_only() {
        let k = click();
        let o = Offer {
            security: Security {
                token: "t".into(),
                ..Security::default()
            },
            ..offer()
        };
        let mut c = conversion(2000, "", None, "");
        assert_eq!(
            reason(decide(input(&c, Some(&k), Some(&o)))),
            Reason::Unauthenticated
        );
        // Unchecked at the door, its kept parameters pass now.
        attributed(decide(DecideInput {
            checked_now: true,
            ..input(&c, Some(&k), Some(&o))
        }));
        c.verified_offer_id = "o1".into();
        attributed(decide(input(&c, Some(&k), Some(&o))));
        c.verified_offer_id = "other".into();
        assert_eq!(
            reason(decide(input(&c, Some(&k), Some(&o)))),
            Reason::Unauthenticated
        );
        c.origin = "nats".into();
        attributed(decide(input(&c, Some(&k), Some(&o))));

        // Verified for another offer (its `offer_id=` named one whose security
        // the sender passes): not for the click's secured one...
        c.origin = "http".into();
        let Verdict::Reject { reason, detail } = decide(input(&c, Some(&k), Some(&o))) else {
            panic!("attributed a report verified for another offer");
        };
        assert_eq!(reason, Reason::Unauthenticated);
        assert!(detail.contains("offer other"), "{detail}");
        // ...but an offer asking for none takes it, as it takes any postback.
        let mut c = conversion(2000, "", None, "");
        c.verified_offer_id = "other".into();
        attributed(decide(input(&c, Some(&k), Some(&offer()))));
    }

    #[test]
    fn the_offer_postback_url_overrides_the_affiliates() {
        let (c, k) = (conversion(2000, "", None, ""), click());
        let aff = Affiliate {
            affiliate_id: "a1".into(),
            name: "a".into(),
            postback_url: "https://aff.test/pb?c={click_id}".into(),
            postback_statuses: vec!["pending".into()],
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        let url = |o: &Offer| match decide(DecideInput {
            affiliate: Some(&aff),
            ..input(&c, Some(&k), Some(o))
        }) {
            Verdict::Attribute {
                postback_url,
                postback_statuses,
                ..
            } => (postback_url, postback_statuses),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            url(&offer()),
            (
                "https://aff.test/pb?c={click_id}".to_owned(),
                vec!["pending".to_owned()]
            )
        );
        let own = Offer {
            postback_url: "https://own.test/{click_id}".into(),
            ..offer()
        };
        assert_eq!(url(&own).0, "https://own.test/{click_id}");
    }

    /// A status report as a partner sends it.
    fn word(w: &str) -> StatusUpdate {
        StatusUpdate {
            advertiser_status: w.into(),
            origin: "nats".into(),
            ..StatusUpdate::default()
        }
    }

    #[test]
    fn a_status_report_on_a_secured_offer_counts_only_verified() {
        let o = Offer {
            security: Security {
                token: "t".into(),
                ..Security::default()
            },
            ..offer()
        };
        let approved = conversion(2000, "", None, "").attributed(&ConversionAttributed::default());
        let http = |verified: &str| StatusUpdate {
            advertiser_status: "chargeback".into(),
            origin: "http".into(),
            verified_offer_id: verified.into(),
            ..StatusUpdate::default()
        };
        let verdict = decide_status(&approved, Some(&o), &http(""));
        assert!(
            matches!(&verdict, StatusVerdict::Ignore(why) if why.starts_with("unauthenticated")),
            "{verdict:?}"
        );
        assert!(matches!(
            decide_status(&approved, Some(&o), &http("other-offer")),
            StatusVerdict::Ignore(_)
        ));
        assert!(matches!(
            decide_status(&approved, Some(&o), &http("o1")),
            StatusVerdict::Change { .. }
        ));
        assert!(
            matches!(
                decide_status(&approved, Some(&o), &word("chargeback")),
                StatusVerdict::Change { .. }
            ),
            "a partner's, as for a first report"
        );
        assert!(
            matches!(
                decide_status(&approved, Some(&offer()), &http("")),
                StatusVerdict::Change { .. }
            ),
            "an offer without security"
        );
    }

    #[test]
    fn status_moves() {
        let base = conversion(2000, "", None, "");
        assert_eq!(
            decide_status(&base, None, &word("approved")),
            StatusVerdict::Wait
        );
        let e = ConversionAttributed {
            status: 1,
            ..Default::default()
        }; // pending
        let pending = base.clone().attributed(&e);
        assert_eq!(
            decide_status(&pending, Some(&offer()), &word("sale")),
            StatusVerdict::Change {
                from: ConversionStatus::Pending,
                to: ConversionStatus::Approved
            }
        );
        assert!(matches!(
            decide_status(&pending, Some(&offer()), &word("hold")),
            StatusVerdict::Ignore(_)
        ));
        let approved = base.attributed(&ConversionAttributed::default());
        assert_eq!(
            decide_status(&approved, Some(&offer()), &word("chargeback")),
            StatusVerdict::Change {
                from: ConversionStatus::Approved,
                to: ConversionStatus::Rejected
            }
        );
        assert!(
            matches!(
                decide_status(&approved, Some(&offer()), &word("hold")),
                StatusVerdict::Ignore(_)
            ),
            "no way back"
        );
        let custom = Offer {
            status_map: [("trash".to_owned(), ConversionStatus::Rejected)].into(),
            ..offer()
        };
        assert!(matches!(
            decide_status(&approved, Some(&custom), &word("TRASH")),
            StatusVerdict::Change { .. }
        ));
    }
}
