//! Checks of the admin API's JSON bodies. Every refusal names the field.

use common::{money, ApiError};
use std::collections::HashMap;

use catalog::{ConversionStatus, DedupPolicy};
use proto::catalog::v1::{
    AffiliateUpserted, Caps, Goal, OfferStatus, OfferUpserted, PostbackSecurity,
};
use serde_json::{Map, Value};

/// Longest id accepted for offers and affiliates.
pub const MAX_ID_LEN: usize = 64;
/// Default attribution window: 30 days.
pub const DEFAULT_WINDOW_HOURS: u32 = 720;
/// Longest attribution window: one year.
pub const MAX_WINDOW_HOURS: u32 = 8760;

/// Ids are short URL-safe strings: 1 to 64 of `A-Z a-z 0-9 _ -`. They become a
/// NATS subject token, so `.`, `*` and `>` can never appear.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks an id from the path.
///
/// # Errors
/// 400 naming `field`.
pub fn check_id(field: &str, id: &str) -> Result<(), ApiError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            "must be 1 to 64 characters of A-Z a-z 0-9 _ -",
        ))
    }
}

/// What `GET` shows in place of a secret.
pub const MASK: &str = "********";

/// A secret sent back as `GET` shows it ([`MASK`]) keeps the one `current`
/// holds, so an offer read, edited and put back keeps its postback security.
///
/// # Errors
/// 400 naming the field when there is no secret to keep.
pub fn keep_masked_secrets(
    event: &mut OfferUpserted,
    current: Option<&catalog::Security>,
) -> Result<(), ApiError> {
    let Some(security) = event.security.as_mut() else {
        return Ok(());
    };
    let kept = |f: fn(&catalog::Security) -> &str| current.map(f).filter(|s| !s.is_empty());
    for (field, value, stored) in [
        ("security.token", &mut security.token, kept(|s| &s.token)),
        (
            "security.hmac_secret",
            &mut security.hmac_secret,
            kept(|s| &s.hmac_secret),
        ),
    ] {
        if value == MASK {
            *value = stored
                .ok_or_else(|| {
                    ApiError::invalid(field, "is the mask GET shows; send the secret itself")
                })?
                .to_owned();
        }
    }
    Ok(())
}

/// Checks a URL template: absolute http(s) once its macros are filled.
///
/// # Errors
/// 400 naming `field`.
pub fn check_url_template(field: &str, template: &str) -> Result<(), ApiError> {
    // `Url::parse` would drop or encode them, but the template is used as
    // written: a landing URL goes into the redirect's `Location` header, where
    // a control character fails every click after it is recorded.
    if template.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    // A browser resolves `https:adv.test/…` (no `//`) against the tracking
    // link when the schemes match: a relative reference, to our own host.
    let lower = template.get(..8).unwrap_or(template).to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(ApiError::invalid(
            field,
            "must be an absolute http(s) URL, starting http:// or https://",
        ));
    }
    // Filled twice with different values: where the two differ in scheme,
    // host, port or user, a macro chose them, and whoever sends the value
    // (an affiliate's `sub1`, say) would choose where we redirect or post.
    let parse = |value| url::Url::parse(&common::template::fill(template, |_| Some(value)));
    match (parse("x"), parse("y0")) {
        (Ok(a), Ok(b)) if (a.scheme() == "http" || a.scheme() == "https") && a.host().is_some() => {
            let authority = |u: &url::Url| {
                (
                    u.scheme().to_owned(),
                    u.host_str().map(str::to_owned),
                    u.port(),
                    u.username().to_owned(),
                    u.password().map(str::to_owned),
                )
            };
            if authority(&a) == authority(&b) {
                Ok(())
            } else {
                Err(ApiError::invalid(
                    field,
                    "must not have a macro in its scheme, host, port or user",
                ))
            }
        }
        _ => Err(ApiError::invalid(field, "must be an absolute http(s) URL")),
    }
}

struct Body(Map<String, Value>);

/// Fields a `GET` shows that a `PUT` does not set: the body of a `GET`, edited
/// and put back, is accepted. They are ignored, save the entity's id, which
/// must be the one in the path.
const READ_ONLY: &[&str] = &["created_at", "updated_at"];

impl Body {
    /// A `PUT` body of the entity whose id (`id_field`) is `id`: fields in
    /// `known`, and those `GET` shows ([`READ_ONLY`], `id_field`).
    fn parse(bytes: &[u8], known: &[&str], (id_field, id): (&str, &str)) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| ApiError::invalid("body", format!("invalid JSON: {e}")))?;
        let Value::Object(mut map) = value else {
            return Err(ApiError::invalid("body", "must be a JSON object"));
        };
        match map.remove(id_field) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == id => {}
            Some(_) => {
                return Err(ApiError::invalid(
                    id_field,
                    format!("must be the id in the path ({id}) or absent"),
                ))
            }
        }
        for field in READ_ONLY {
            map.remove(*field);
        }
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ApiError::invalid(unknown.clone(), "unknown field"));
        }
        Ok(Self(map))
    }

    /// A string field; `null` and absence read as `None`.
    fn string(&self, field: &str) -> Result<Option<String>, ApiError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.len() <= 2048 => Ok(Some(s.trim().to_owned())),
            Some(Value::String(_)) => Err(ApiError::invalid(field, "is longer than 2048 bytes")),
            Some(_) => Err(ApiError::invalid(field, "must be a string")),
        }
    }

    /// A money field: a decimal string (or a JSON number) to micros.
    fn money(&self, field: &str) -> Result<Option<i64>, ApiError> {
        let text = match self.0.get(field) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            // serde_json writes small floats with an exponent (`5e-6`);
            // Rust's own formatting never does.
            Some(Value::Number(n)) => match n.as_f64() {
                Some(f) if n.is_f64() => f.to_string(),
                _ => n.to_string(),
            },
            Some(_) => {
                return Err(ApiError::invalid(
                    field,
                    "must be a decimal string such as \"2.50\"",
                ))
            }
        };
        money::parse_micros(&text)
            .map(Some)
            .map_err(|e| ApiError::invalid(field, e.to_string()))
    }
}

/// The offer a `PUT /api/offers/{offer_id}` body describes. Defaults: name = id,
/// payout and revenue 0, currency USD, window 720 h, status active.
///
/// # Errors
/// 400 naming the first bad field.
pub fn offer_from_json(offer_id: &str, bytes: &[u8]) -> Result<OfferUpserted, ApiError> {
    const KNOWN: &[&str] = &[
        "name",
        "url",
        "payout",
        "revenue",
        "currency",
        "attribution_window_hours",
        "status",
        "fallback_url",
        "postback_url",
        "goals",
        "dedup",
        "status_map",
        "min_ctit_seconds",
        "timezone",
        "caps",
        "security",
    ];
    let body = Body::parse(bytes, KNOWN, ("offer_id", offer_id))?;
    let url = body
        .string("url")?
        .ok_or_else(|| ApiError::invalid("url", "is required"))?;
    check_url_template("url", &url)?;
    let fallback_url = body.string("fallback_url")?.unwrap_or_default();
    if !fallback_url.is_empty() {
        check_url_template("fallback_url", &fallback_url)?;
    }
    let postback_url = body.string("postback_url")?.unwrap_or_default();
    if !postback_url.is_empty() {
        check_url_template("postback_url", &postback_url)?;
    }
    let currency = match body.string("currency")? {
        None => "USD".to_owned(),
        Some(c) => money::parse_currency(&c)
            .ok_or_else(|| ApiError::invalid("currency", "must be an ISO 4217 code such as USD"))?,
    };
    let window = match body.0.get("attribution_window_hours") {
        None | Some(Value::Null) => DEFAULT_WINDOW_HOURS,
        Some(v) => v
            .as_u64()
            .filter(|h| (1..=u64::from(MAX_WINDOW_HOURS)).contains(h))
            .map(|h| h as u32)
            .ok_or_else(|| {
                ApiError::invalid(
                    "attribution_window_hours",
                    "must be a whole number from 1 to 8760",
                )
            })?,
    };
    let status = match body.string("status")?.as_deref() {
        None | Some("active") => OfferStatus::Active,
        Some("paused") => OfferStatus::Paused,
        Some(_) => {
            return Err(ApiError::invalid(
                "status",
                "must be \"active\" or \"paused\"",
            ))
        }
    };
    let rules = offer_rules(&body)?;
    if u64::from(rules.min_ctit_seconds) >= u64::from(window) * 3600 {
        return Err(ApiError::invalid(
            "min_ctit_seconds",
            format!(
                "must be shorter than the attribution window ({window} h): \
                 every conversion would be too_fast or expired"
            ),
        ));
    }
    Ok(OfferUpserted {
        goals: rules.goals,
        dedup: rules.dedup,
        status_map: rules.status_map,
        min_ctit_seconds: rules.min_ctit_seconds,
        timezone: rules.timezone,
        caps: rules.caps,
        security: rules.security,
        event_id: String::new(),
        occurred_at_ms: 0,
        offer_id: offer_id.to_owned(),
        name: body.string("name")?.unwrap_or_else(|| offer_id.to_owned()),
        url,
        payout_micros: body.money("payout")?.unwrap_or(0),
        revenue_micros: body.money("revenue")?.unwrap_or(0),
        currency,
        attribution_window_hours: window,
        status: status as i32,
        fallback_url,
        postback_url,
    })
}

/// The attribution rules of an offer body.
struct OfferRules {
    goals: Vec<Goal>,
    dedup: String,
    status_map: HashMap<String, String>,
    min_ctit_seconds: u32,
    timezone: String,
    caps: Option<Caps>,
    security: Option<PostbackSecurity>,
}

fn dedup_field(field: &str, value: Option<String>) -> Result<String, ApiError> {
    let text = value.unwrap_or_default();
    DedupPolicy::parse(&text).map(|_| text).ok_or_else(|| {
        ApiError::invalid(
            field,
            "must be first_per_goal, one_per_goal, unique_txid or all",
        )
    })
}

fn whole(field: &str, value: Option<&Value>, max: u64) -> Result<u64, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v.as_u64().filter(|n| *n <= max).ok_or_else(|| {
            ApiError::invalid(field, format!("must be a whole number from 0 to {max}"))
        }),
    }
}

fn object(body: &Body, field: &str, known: &[&str]) -> Result<Option<Body>, ApiError> {
    match body.0.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => {
            if let Some(k) = map.keys().find(|k| !known.contains(&k.as_str())) {
                return Err(ApiError::invalid(format!("{field}.{k}"), "unknown field"));
            }
            Ok(Some(Body(map.clone())))
        }
        Some(_) => Err(ApiError::invalid(field, "must be an object")),
    }
}

fn offer_rules(body: &Body) -> Result<OfferRules, ApiError> {
    let mut goals = Vec::new();
    match body.0.get("goals") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let at = |f: &str| format!("goals[{i}].{f}");
                let Value::Object(map) = item else {
                    return Err(ApiError::invalid(
                        format!("goals[{i}]"),
                        "must be an object",
                    ));
                };
                let goal = Body(map.clone());
                if let Some(k) = map
                    .keys()
                    .find(|k| !["id", "name", "payout", "revenue", "dedup"].contains(&k.as_str()))
                {
                    return Err(ApiError::invalid(at(k), "unknown field"));
                }
                let id = goal
                    .string("id")
                    .map_err(|_| ApiError::invalid(at("id"), "must be a string"))?;
                let id = id.filter(|id| is_valid_id(id)).ok_or_else(|| {
                    ApiError::invalid(
                        at("id"),
                        "is required: 1 to 64 characters of A-Z a-z 0-9 _ -",
                    )
                })?;
                if goals.iter().any(|g: &Goal| g.goal_id == id) {
                    return Err(ApiError::invalid(at("id"), "is given twice"));
                }
                let money = |f: &str| goal.money(f).map_err(|e| rename(e, at(f)));
                goals.push(Goal {
                    name: goal
                        .string("name")
                        .map_err(|e| rename(e, at("name")))?
                        .unwrap_or_else(|| id.clone()),
                    payout_micros: money("payout")?,
                    revenue_micros: money("revenue")?,
                    dedup: dedup_field(
                        &at("dedup"),
                        goal.string("dedup").map_err(|e| rename(e, at("dedup")))?,
                    )?,
                    goal_id: id,
                });
            }
        }
        Some(_) => return Err(ApiError::invalid("goals", "must be an array")),
    }
    let mut status_map = HashMap::new();
    match body.0.get("status_map") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (word, to) in map {
                let field = format!("status_map.{word}");
                // Trimmed, as the door trims a postback's word.
                let trimmed = word.trim();
                let word_len = trimmed.len();
                if word_len > catalog::terms::MAX_STATUS_LEN
                    || trimmed.chars().any(char::is_control)
                {
                    return Err(ApiError::invalid(
                        field,
                        format!(
                            "a status word is at most {} bytes, with no control characters: \
                             a postback's word is refused or cut past that, and never matches",
                            catalog::terms::MAX_STATUS_LEN
                        ),
                    ));
                }
                match to.as_str().and_then(ConversionStatus::parse) {
                    Some(s) if word_len > 0 => {
                        status_map.insert(word.trim().to_ascii_lowercase(), s.name().to_owned());
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            field,
                            "must map a word to pending, approved or rejected",
                        ))
                    }
                }
            }
        }
        Some(_) => return Err(ApiError::invalid("status_map", "must be an object")),
    }
    let timezone = body.string("timezone")?.unwrap_or_default();
    if !timezone.is_empty() && !catalog::terms::is_time_zone(&timezone) {
        return Err(ApiError::invalid(
            "timezone",
            "must be an IANA time zone such as Europe/Berlin",
        ));
    }
    const CAPS: [&str; 4] = [
        "daily_clicks",
        "daily_clicks_per_affiliate",
        "daily_conversions",
        "daily_conversions_per_affiliate",
    ];
    let caps = match object(body, "caps", &CAPS)? {
        None => None,
        Some(c) => {
            let n = |f: &str| whole(&format!("caps.{f}"), c.0.get(f), 1_000_000_000);
            Some(Caps {
                daily_clicks: n("daily_clicks")?,
                daily_clicks_per_affiliate: n("daily_clicks_per_affiliate")?,
                daily_conversions: n("daily_conversions")?,
                daily_conversions_per_affiliate: n("daily_conversions_per_affiliate")?,
            })
        }
    };
    let security = match object(
        body,
        "security",
        &[
            "token",
            "allowed_ips",
            "hmac_secret",
            "signature_window_seconds",
        ],
    )? {
        None => None,
        Some(s) => {
            let mut allowed_ips = Vec::new();
            match s.0.get("allowed_ips") {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => {
                    for (i, ip) in items.iter().enumerate() {
                        let text = ip.as_str().unwrap_or("").trim();
                        if text.parse::<ipnet::IpNet>().is_err()
                            && text.parse::<std::net::IpAddr>().is_err()
                        {
                            return Err(ApiError::invalid(
                                format!("security.allowed_ips[{i}]"),
                                "must be an IP address or CIDR",
                            ));
                        }
                        allowed_ips.push(text.to_owned());
                    }
                }
                Some(_) => {
                    return Err(ApiError::invalid(
                        "security.allowed_ips",
                        "must be an array",
                    ))
                }
            }
            let text = |f: &str| s.string(f).map_err(|e| rename(e, format!("security.{f}")));
            Some(PostbackSecurity {
                token: text("token")?.unwrap_or_default(),
                allowed_ips,
                hmac_secret: text("hmac_secret")?.unwrap_or_default(),
                signature_window_seconds: whole(
                    "security.signature_window_seconds",
                    s.0.get("signature_window_seconds"),
                    86_400,
                )? as u32,
            })
        }
    };
    Ok(OfferRules {
        goals,
        dedup: dedup_field("dedup", body.string("dedup")?)?,
        status_map,
        min_ctit_seconds: whole(
            "min_ctit_seconds",
            body.0.get("min_ctit_seconds"),
            30 * 86_400,
        )? as u32,
        timezone,
        caps,
        security,
    })
}

fn rename(e: ApiError, field: String) -> ApiError {
    match e {
        ApiError::Invalid { message, .. } => ApiError::Invalid { field, message },
        other => other,
    }
}

/// The affiliate a `PUT /api/affiliates/{affiliate_id}` body describes.
///
/// # Errors
/// 400 naming the first bad field.
pub fn affiliate_from_json(
    affiliate_id: &str,
    bytes: &[u8],
) -> Result<AffiliateUpserted, ApiError> {
    let known = ["name", "postback_url", "postback_statuses"];
    let body = Body::parse(bytes, &known, ("affiliate_id", affiliate_id))?;
    let mut postback_statuses = Vec::new();
    match body.0.get("postback_statuses") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(s @ ("pending" | "approved" | "rejected" | "reversed")) => {
                        postback_statuses.push(s.to_owned())
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            format!("postback_statuses[{i}]"),
                            "must be pending, approved, rejected or reversed",
                        ))
                    }
                }
            }
        }
        Some(_) => return Err(ApiError::invalid("postback_statuses", "must be an array")),
    }
    let postback_url = body.string("postback_url")?.unwrap_or_default();
    if !postback_url.is_empty() {
        check_url_template("postback_url", &postback_url)?;
    }
    Ok(AffiliateUpserted {
        event_id: String::new(),
        occurred_at_ms: 0,
        affiliate_id: affiliate_id.to_owned(),
        name: body
            .string("name")?
            .unwrap_or_else(|| affiliate_id.to_owned()),
        postback_url,
        postback_statuses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: ApiError) -> String {
        match e {
            ApiError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_url_template_keeps_its_macros_out_of_scheme_host_port_and_user() {
        for good in [
            "https://adv.test/l?c={click_id}&s={sub1}",
            "https://adv.test:8443/{sub1}/l#{sub2}",
            "http://user:pw@adv.test/{source}",
            "HTTPS://adv.test/{sub1}",
        ] {
            assert!(check_url_template("url", good).is_ok(), "{good}");
        }
        for bad in [
            "https://{sub1}/l",
            "https://{sub1}.adv.test/l",
            "https://adv.test.{sub1}/",
            "https://adv.test:{sub1}/",
            "https://{sub1}@adv.test/",
            "https://u:{sub1}@adv.test/",
            "{sub1}://adv.test/",
            "https:adv.test/p/{sub1}/x?u=http://z",
            "https:/adv.test/",
            "https:\\\\adv.test/",
            " https://adv.test/",
        ] {
            let err = check_url_template("url", bad).expect_err(bad);
            assert_eq!(field_of(err), "url", "{bad}");
        }
    }

    #[test]
    fn ids_are_short_and_url_safe() {
        assert!(is_valid_id("offer-1_A"));
        for bad in ["", "a.b", "a*", "a>", "a b", "é", &"x".repeat(65)] {
            assert!(!is_valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_full_offer_parses_with_money_in_micros() {
        let o = offer_from_json(
            "o1",
            br#"{"name":"Shop","url":"https://adv.test/l?c={click_id}","payout":"2.5",
                "revenue":4,"currency":"eur","attribution_window_hours":48,"status":"paused",
                "fallback_url":"https://adv.test/fb"}"#,
        )
        .unwrap();
        assert_eq!(o.payout_micros, 2_500_000);
        assert_eq!(o.revenue_micros, 4_000_000);
        assert_eq!(o.currency, "EUR");
        // A small JSON number, which serde_json would write as `5e-6`.
        let small = offer_from_json("o1", br#"{"url":"http://a.test/","payout":0.000005}"#);
        assert_eq!(small.unwrap().payout_micros, 5);
        assert_eq!(o.attribution_window_hours, 48);
        assert_eq!(o.status(), OfferStatus::Paused);
    }

    #[test]
    fn rules_parse() {
        let o = offer_from_json(
            "o1",
            br#"{"url":"http://a.test/","dedup":"unique_txid","min_ctit_seconds":30,
                "timezone":"America/New_York","status_map":{"Sale":"approved","trash":"rejected"},
                "goals":[{"id":"install","payout":"1"},{"id":"purchase","revenue":"9.5","dedup":"all"}],
                "caps":{"daily_conversions":5},
                "security":{"token":"t","allowed_ips":["10.0.0.0/8","1.2.3.4"],"hmac_secret":"k"}}"#,
        )
        .unwrap();
        assert_eq!(
            (o.dedup.as_str(), o.min_ctit_seconds, o.timezone.as_str()),
            ("unique_txid", 30, "America/New_York")
        );
        assert_eq!(o.status_map["sale"], "approved");
        assert_eq!(o.goals.len(), 2);
        assert_eq!(o.goals[0].payout_micros, Some(1_000_000));
        assert_eq!(o.goals[1].dedup, "all");
        assert_eq!(o.caps.unwrap().daily_conversions, 5);
        assert_eq!(o.security.unwrap().allowed_ips.len(), 2);
    }

    #[test]
    fn a_status_map_word_no_postback_can_carry_is_refused() {
        let long = "w".repeat(33);
        for word in [long.as_str(), "tab\\tword"] {
            let body =
                format!(r#"{{"url":"http://a.test/","status_map":{{"{word}":"approved"}}}}"#);
            let err = offer_from_json("o1", body.as_bytes()).unwrap_err();
            assert!(
                matches!(&err, ApiError::Invalid { field, .. } if field.starts_with("status_map.")),
                "{err}"
            );
        }
        let ok = "w".repeat(32);
        let body = format!(r#"{{"url":"http://a.test/","status_map":{{"{ok}":"approved"}}}}"#);
        assert!(offer_from_json("o1", body.as_bytes()).is_ok());
        // Trimmed first, as a postback's word is.
        let body = r#"{"url":"http://a.test/","status_map":{"paid\n":"approved"}}"#;
        assert!(offer_from_json("o1", body.as_bytes()).is_ok());
    }

    #[test]
    fn defaults_fill_what_is_missing() {
        let o = offer_from_json("o1", br#"{"url":"http://a.test/"}"#).unwrap();
        assert_eq!((o.name.as_str(), o.currency.as_str()), ("o1", "USD"));
        assert_eq!(o.attribution_window_hours, DEFAULT_WINDOW_HOURS);
        assert_eq!(o.status(), OfferStatus::Active);
    }

    #[test]
    fn a_masked_secret_put_back_keeps_the_stored_one() {
        let body =
            br#"{"url":"http://a.test/","security":{"token":"********","hmac_secret":"new"}}"#;
        let stored = catalog::Security {
            token: "s3cret".into(),
            hmac_secret: "old".into(),
            ..catalog::Security::default()
        };
        let mut event = offer_from_json("o1", body).unwrap();
        keep_masked_secrets(&mut event, Some(&stored)).unwrap();
        let security = event.security.unwrap();
        assert_eq!(
            (security.token.as_str(), security.hmac_secret.as_str()),
            ("s3cret", "new"),
            "the mask keeps, a new value replaces"
        );
        let mut event = offer_from_json("o1", body).unwrap();
        assert_eq!(
            field_of(keep_masked_secrets(&mut event, None).unwrap_err()),
            "security.token",
            "nothing stored to keep"
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "body"),
            (b"[1]", "body"),
            (br#"{}"#, "url"),
            (br#"{"url":"ftp://a.test/"}"#, "url"),
            (br#"{"url":"/relative"}"#, "url"),
            (br#"{"url":"http://a.test/","payout":"-1"}"#, "payout"),
            (
                br#"{"url":"http://a.test/","revenue":"1.0000001"}"#,
                "revenue",
            ),
            (br#"{"url":"http://a.test/","currency":"ABC"}"#, "currency"),
            (
                br#"{"url":"http://a.test/","attribution_window_hours":0}"#,
                "attribution_window_hours",
            ),
            (br#"{"url":"http://a.test/","status":"on"}"#, "status"),
            (
                br#"{"url":"http://a.test/","attribution_window_hours":1,"min_ctit_seconds":3600}"#,
                "min_ctit_seconds",
            ),
            (
                br#"{"url":"http://a.test/","fallback_url":"nope"}"#,
                "fallback_url",
            ),
            (br#"{"url":"http://a.test/","payot":"1"}"#, "payot"),
            (br#"{"url":7}"#, "url"),
            (
                br#"{"url":"http://a.test/","postback_url":"a.test"}"#,
                "postback_url",
            ),
            // Url::parse drops a line break and encodes a BEL; the redirect's
            // header would take neither.
            (br#"{"url":"http://a.test/l\n?x=1"}"#, "url"),
            (
                br#"{"url":"http://a.test/","fallback_url":"http://a.test/\u0007"}"#,
                "fallback_url",
            ),
        ];
        for (body, field) in cases {
            let got = field_of(offer_from_json("o1", body).unwrap_err());
            assert_eq!(&got, field, "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(
            field_of(affiliate_from_json("a1", br#"{"postback_url":"x"}"#).unwrap_err()),
            "postback_url"
        );
    }
}
