//! A click: its tracking-link parameters, its event, and the redirect URL.

use catalog::{Offer, OfferStatus};
use common::ApiError;
use proto::clicks::v1::{ClickDisposition, ClickRecorded};

/// Longest accepted value of a tracking-link parameter.
pub const MAX_PARAM_LEN: usize = 1024;

/// The tracking-link parameters, `?aff=&sub1..sub5=&source=&aff_click_id=`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClickParams {
    pub aff: String,
    pub subs: [String; 5],
    pub source: String,
    pub aff_click_id: String,
}

impl ClickParams {
    /// Parses a raw query string. Rule: the first occurrence of a parameter wins,
    /// unknown parameters are ignored (ad networks append their own).
    ///
    /// # Errors
    /// 400 naming `aff` when it is missing, any parameter longer than 1024 bytes
    /// or not UTF-8, or `query` when the query string is over 8 KiB.
    pub fn parse(query: &str) -> Result<Self, ApiError> {
        const KNOWN: [&str; 8] = [
            "aff",
            "sub1",
            "sub2",
            "sub3",
            "sub4",
            "sub5",
            "source",
            "aff_click_id",
        ];
        let mut p = Self::default();
        let mut seen = [false; KNOWN.len()];
        for (key, value) in common::params::parse_only(query.as_bytes(), "query", &KNOWN)? {
            let Some(slot) = KNOWN.iter().position(|k| *k == key) else {
                continue;
            };
            if seen[slot] {
                continue;
            }
            seen[slot] = true;
            if value.len() > MAX_PARAM_LEN {
                return Err(ApiError::invalid(key, "is longer than 1024 bytes"));
            }
            match slot {
                0 => p.aff = value,
                1..=5 => p.subs[slot - 1] = value,
                6 => p.source = value,
                _ => p.aff_click_id = value,
            }
        }
        if p.aff.is_empty() {
            return Err(ApiError::invalid("aff", "is required: the affiliate id"));
        }
        Ok(p)
    }
}

/// Who clicked, from the HTTP request.
#[derive(Debug, Default, Clone)]
pub struct Visitor {
    pub ip: String,
    pub user_agent: String,
    pub referer: String,
}

/// Where a click on `offer` goes, or `None` when it goes nowhere (paused or
/// capped without a fallback).
pub fn destination(offer: &Offer, capped: bool) -> Option<(ClickDisposition, &str)> {
    let fallback = |d| (!offer.fallback_url.is_empty()).then_some((d, offer.fallback_url.as_str()));
    match offer.status {
        OfferStatus::Paused => fallback(ClickDisposition::FallbackPaused),
        OfferStatus::Active if capped => fallback(ClickDisposition::FallbackCapped),
        OfferStatus::Active => Some((ClickDisposition::Landing, offer.url.as_str())),
    }
}

/// Fills a landing-URL template with the click's macros.
pub fn landing_url(template: &str, click_id: &str, offer_id: &str, p: &ClickParams) -> String {
    common::template::fill(template, |name| {
        Some(match name {
            "click_id" => click_id,
            "offer_id" => offer_id,
            "aff_id" => &p.aff,
            "sub1" => &p.subs[0],
            "sub2" => &p.subs[1],
            "sub3" => &p.subs[2],
            "sub4" => &p.subs[3],
            "sub5" => &p.subs[4],
            "source" => &p.source,
            "aff_click_id" => &p.aff_click_id,
            _ => return None,
        })
    })
}

/// Where one click was sent, and the day it counts on.
#[derive(Debug, Clone)]
pub struct Redirect {
    pub disposition: ClickDisposition,
    pub url: String,
    /// The cap day in the offer's time zone.
    pub cap_day: String,
}

/// The event of one click.
pub fn click_event(
    click_id: &str,
    offer_id: &str,
    p: &ClickParams,
    visitor: &Visitor,
    redirect: Redirect,
    now_ms: i64,
) -> ClickRecorded {
    let [sub1, sub2, sub3, sub4, sub5] = p.subs.clone();
    ClickRecorded {
        event_id: click_id.to_owned(),
        occurred_at_ms: now_ms,
        click_id: click_id.to_owned(),
        offer_id: offer_id.to_owned(),
        affiliate_id: p.aff.clone(),
        sub1,
        sub2,
        sub3,
        sub4,
        sub5,
        source: p.source.clone(),
        aff_click_id: p.aff_click_id.clone(),
        ip: visitor.ip.clone(),
        user_agent: visitor.user_agent.clone(),
        referer: visitor.referer.clone(),
        disposition: redirect.disposition as i32,
        redirect_url: redirect.url,
        cap_day: redirect.cap_day,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_params_first_wins_unknown_ignored() {
        let p =
            ClickParams::parse("aff=a1&sub1=x%20y&sub1=z&sub5=5&source=fb&aff_click_id=q&gclid=1")
                .unwrap();
        assert_eq!(p.aff, "a1");
        assert_eq!(p.subs[0], "x y");
        assert_eq!(p.subs[4], "5");
        assert_eq!((p.source.as_str(), p.aff_click_id.as_str()), ("fb", "q"));
    }

    #[test]
    fn aff_is_required_and_values_bounded() {
        assert!(
            matches!(ClickParams::parse("sub1=x"), Err(ApiError::Invalid { field, .. }) if field == "aff")
        );
        let long = format!("aff=a&sub2={}", "x".repeat(MAX_PARAM_LEN + 1));
        assert!(
            matches!(ClickParams::parse(&long), Err(ApiError::Invalid { field, .. }) if field == "sub2")
        );
    }

    #[test]
    fn landing_url_fills_every_macro_encoded() {
        let p = ClickParams {
            aff: "a1".into(),
            subs: [
                "s 1".into(),
                "s&2".into(),
                "3".into(),
                "4".into(),
                "5".into(),
            ],
            source: "src".into(),
            aff_click_id: "ac/1".into(),
        };
        let url = landing_url(
            "https://adv.test/l?c={click_id}&o={offer_id}&a={aff_id}&s={sub1},{sub2},{sub3},{sub4},{sub5}&src={source}&ac={aff_click_id}&k={keep}",
            "cid",
            "o1",
            &p,
        );
        assert_eq!(
            url,
            "https://adv.test/l?c=cid&o=o1&a=a1&s=s%201,s%262,3,4,5&src=src&ac=ac%2F1&k={keep}"
        );
    }
}
