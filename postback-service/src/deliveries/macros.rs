//! Filling an affiliate postback URL template (pure).

use catalog::ConversionStatus;
use common::money::format_micros;
use proto::clicks::v1::ClickRecorded;

use crate::conversions::ConversionView;

/// The macros an affiliate postback URL may use.
pub const MACROS: [&str; 20] = [
    "click_id",
    "conversion_id",
    "offer_id",
    "aff_id",
    "sub1",
    "sub2",
    "sub3",
    "sub4",
    "sub5",
    "source",
    "aff_click_id",
    "goal",
    "payout",
    "revenue",
    "currency",
    "txid",
    "status",
    "delivery_id",
    "revenue_currency",
    "event_time",
];

/// The URL for one delivery: every macro URL-encoded; `{status}` is the status
/// event told (`approved`, `pending`, `rejected`).
pub fn fill(
    template: &str,
    conversion: &ConversionView,
    click: Option<&ClickRecorded>,
    delivery_id: &str,
    status: ConversionStatus,
) -> String {
    let payout = format_micros(conversion.payout_micros);
    let revenue = format_micros(conversion.revenue_micros);
    let event_time = (conversion.converted_at_ms / 1000).to_string();
    let empty = ClickRecorded::default();
    let k = click.unwrap_or(&empty);
    common::template::fill(template, |name| {
        if let Some(value) = click_macro(k, name) {
            return Some(value);
        }
        Some(match name {
            "click_id" => &conversion.click_id,
            "conversion_id" => &conversion.conversion_id,
            "offer_id" => &conversion.offer_id,
            "aff_id" => &conversion.affiliate_id,
            "goal" => &conversion.goal,
            "payout" => &payout,
            "revenue" => &revenue,
            "currency" => &conversion.payout_currency,
            "revenue_currency" => &conversion.revenue_currency,
            "txid" => &conversion.txid,
            "status" => status.name(),
            "delivery_id" => delivery_id,
            "event_time" => &event_time,
            _ => return None,
        })
    })
}

/// The value of a macro that comes from the click (its sub-ids, source and
/// the affiliate's click id); `None` for the others.
fn click_macro<'a>(k: &'a ClickRecorded, name: &str) -> Option<&'a str> {
    Some(match name {
        "sub1" => &k.sub1,
        "sub2" => &k.sub2,
        "sub3" => &k.sub3,
        "sub4" => &k.sub4,
        "sub5" => &k.sub5,
        "source" => &k.source,
        "aff_click_id" => &k.aff_click_id,
        _ => return None,
    })
}

/// `template` with the click's macros filled (URL-encoded) and the others
/// left for [`fill`]: done when a conversion is attributed, with its click at
/// hand, so its later status deliveries carry them even where the click has
/// left the projection (a stream with a max age, a new instance). A filled
/// value cannot make a macro: its braces are encoded.
pub fn fill_click(template: &str, click: &ClickRecorded) -> String {
    common::template::fill(template, |name| click_macro(click, name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::conversions::v1::{ConversionAttributed, ConversionReported};

    #[test]
    fn fills_every_macro_encoded() {
        let reported = ConversionReported {
            conversion_id: "cv-1".into(),
            click_id: "ck-1".into(),
            goal: "sale".into(),
            txid: "T 1".into(),
            occurred_at_ms: 1_700_000_000_999,
            ..Default::default()
        };
        let view = ConversionView::reported(&reported, 1, 0).attributed(&ConversionAttributed {
            offer_id: "o1".into(),
            affiliate_id: "a1".into(),
            payout_micros: 2_500_000,
            payout_currency: "USD".into(),
            revenue_micros: 10_000_000,
            revenue_currency: "EUR".into(),
            ..Default::default()
        });
        let click = ClickRecorded {
            sub1: "s1".into(),
            sub2: "s&2".into(),
            sub3: "s3".into(),
            sub4: "s4".into(),
            sub5: "s5".into(),
            source: "src".into(),
            aff_click_id: "ac/1".into(),
            ..Default::default()
        };
        let template = MACROS
            .iter()
            .map(|m| format!("{m}={{{m}}}"))
            .collect::<Vec<_>>()
            .join("&");
        let url = fill(
            &format!("https://aff.test/pb?{template}"),
            &view,
            Some(&click),
            "dl-1",
            ConversionStatus::Approved,
        );
        assert_eq!(
            url,
            "https://aff.test/pb?click_id=ck-1&conversion_id=cv-1&offer_id=o1&aff_id=a1&sub1=s1\
&sub2=s%262&sub3=s3&sub4=s4&sub5=s5&source=src&aff_click_id=ac%2F1&goal=sale&payout=2.50\
&revenue=10.00&currency=USD&txid=T%201&status=approved&delivery_id=dl-1&revenue_currency=EUR\
&event_time=1700000000"
        );
        // The click's macros filled first (at attribution), the rest later
        // without the click: the same URL.
        let early = fill_click(&format!("https://aff.test/pb?{template}"), &click);
        assert!(
            early.contains("sub2=s%262&") && early.contains("{status}"),
            "{early}"
        );
        assert_eq!(
            fill(&early, &view, None, "dl-1", ConversionStatus::Approved),
            url
        );
        let braces = ClickRecorded {
            sub1: "{status}".into(),
            ..Default::default()
        };
        assert_eq!(
            fill(
                &fill_click("https://aff.test/pb?s={sub1}", &braces),
                &view,
                None,
                "dl-1",
                ConversionStatus::Approved
            ),
            "https://aff.test/pb?s=%7Bstatus%7D",
            "a value makes no macro"
        );
    }
}
