//! Synthetic events shaped like the real ones: a `ClickRecorded` as click-service
//! records a loadgen click, a `ConversionReported` as a partner publishes it.

use proto::{
    clicks::v1::{ClickDisposition, ClickRecorded},
    conversions::v1::{ConversionOrigin, ConversionReported},
};

/// The landing-URL template of the benchmark offers.
pub const LANDING_URL: &str = "https://shop.example/land?cid={click_id}&s1={sub1}&src={source}";

/// The tracking-link query the click scenarios send (with `aff=` first).
pub const CLICK_QUERY: &str = "sub1=loadgen&source=bench";

/// The click click-service records for a loadgen click on `offer_id` by
/// `affiliate_id`: same fields, same sizes.
pub fn click(click_id: &str, offer_id: &str, affiliate_id: &str, now_ms: i64) -> ClickRecorded {
    let redirect_url = common::template::fill(LANDING_URL, |name| match name {
        "click_id" => Some(click_id),
        "sub1" => Some("loadgen"),
        "source" => Some("bench"),
        _ => None,
    });
    ClickRecorded {
        event_id: click_id.to_owned(),
        occurred_at_ms: now_ms,
        click_id: click_id.to_owned(),
        offer_id: offer_id.to_owned(),
        affiliate_id: affiliate_id.to_owned(),
        sub1: "loadgen".to_owned(),
        source: "bench".to_owned(),
        ip: "127.0.0.1".to_owned(),
        user_agent: crate::http::USER_AGENT.to_owned(),
        disposition: ClickDisposition::Landing as i32,
        redirect_url,
        ..Default::default()
    }
}

/// A visitor's IPv4 address derived from the random tail of a click id: seeded
/// clicks each come from their own visitor, as most clicks do, so the clicks
/// fold writes a unique click's rows for each (one visitor's clicks would
/// coalesce into one fingerprint row per fold group).
pub fn visitor_ip(click_id: &str) -> String {
    let tail = click_id
        .get(click_id.len().saturating_sub(8)..)
        .unwrap_or("");
    let [a, b, c, d] = u32::from_str_radix(tail, 16).unwrap_or(0).to_be_bytes();
    format!("{a}.{b}.{c}.{d}")
}

/// A partner's report of a sale on `click_id` with transaction `txid`, its
/// conversion id derived as postback-service derives it.
pub fn conversion(click_id: &str, txid: &str, now_ms: i64) -> ConversionReported {
    let id = postback_service::postback::conversion_id(click_id, "", txid);
    ConversionReported {
        event_id: id.clone(),
        occurred_at_ms: now_ms,
        conversion_id: id,
        click_id: click_id.to_owned(),
        goal: String::new(),
        txid: txid.to_owned(),
        amount_micros: Some(12_500_000),
        currency: "USD".to_owned(),
        origin: ConversionOrigin::Nats as i32,
        ip: String::new(),
        ..Default::default()
    }
}

/// A fresh click id, as click-service makes them.
pub fn click_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn visitors_differ_by_click() {
        assert_eq!(
            visitor_ip("0190a0b4-7c6e-7a2b-9c1d-2e3f0a0b0c0d"),
            "10.11.12.13"
        );
        assert_ne!(visitor_ip(&click_id()), visitor_ip(&click_id()));
    }

    #[test]
    fn a_synthetic_click_has_the_size_of_a_recorded_one() {
        let id = click_id();
        let c = click(&id, "bench", "bench-aff", 1);
        assert!(c.redirect_url.contains(&id));
        let len = c.encode_to_vec().len();
        assert!((250..400).contains(&len), "{len}");
    }
}
