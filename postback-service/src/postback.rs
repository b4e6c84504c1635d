//! What a valid conversion report is, from either door: an advertiser's HTTP
//! postback ([`PostbackInput::parse`]) or a partner's protobuf on NATS
//! ([`normalize_reported`]). Both end as the same `ConversionReported`.

use std::borrow::Cow;

use common::{money, ApiError};
use proto::conversions::v1::{ConversionOrigin, ConversionReported};
use uuid::Uuid;

/// Namespace of conversion ids (UUID v5 of click id, goal and txid).
const CONVERSION_NS: Uuid = Uuid::from_u128(0x6f1c_2a4e_8b3d_4c59_9e27_d0a1_5b6c_7e80);

/// Longest goal name.
pub const MAX_GOAL_LEN: usize = 64;
/// Longest advertiser transaction id.
pub const MAX_TXID_LEN: usize = 256;
/// Longest conversion id a partner may give.
pub const MAX_CONVERSION_ID_LEN: usize = 128;
/// Longest advertiser status word.
pub const MAX_STATUS_LEN: usize = catalog::terms::MAX_STATUS_LEN;

/// Why a partner's conversion id cannot name a conversion: it becomes part of
/// `Nats-Msg-Id` headers (decisions, deliveries) and of the affiliate
/// postback's `X-Delivery-Id`, where a line break cannot go.
pub fn conversion_id_problem(id: &str) -> Option<&'static str> {
    if id.len() > MAX_CONVERSION_ID_LEN {
        Some("conversion_id longer than 128 bytes")
    } else if id.chars().any(char::is_control) {
        Some("conversion_id holds a control character")
    } else {
        None
    }
}

/// The stable id of a conversion: the same postback, retried, gets the same id.
pub fn conversion_id(click_id: &str, goal: &str, txid: &str) -> String {
    let name = format!("{click_id}\u{1f}{goal}\u{1f}{txid}");
    Uuid::new_v5(&CONVERSION_NS, name.as_bytes()).to_string()
}

/// The parameters of one advertiser postback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostbackInput {
    /// Canonical (lower-case, hyphenated) UUID text.
    pub click_id: String,
    pub goal: String,
    pub txid: String,
    pub amount_micros: Option<i64>,
    /// Empty: the offer's currency.
    pub currency: String,
    /// The advertiser's status word, lower case; empty: approved.
    pub status: String,
}

/// The parameter names accepted for the click id, in order of preference.
pub const CLICK_ID_ALIASES: [&str; 4] = ["click_id", "cid", "subid", "transaction_id"];

/// Every parameter a postback reads: the input's, then the offer's security
/// ones. They must be UTF-8; any other parameter is ignored, whatever it holds.
pub const PARAMETERS: [&str; 13] = [
    "click_id",
    "cid",
    "subid",
    "transaction_id",
    "goal",
    "amount",
    "currency",
    "txid",
    "status",
    "token",
    "ts",
    "sig",
    "offer_id",
];

impl PostbackInput {
    /// Parses query and form pairs. Rules: unknown parameters are ignored; a known
    /// parameter given twice must carry the same value; empty values are absent.
    ///
    /// # Errors
    /// 400 naming the field: missing or non-UUID click id, conflicting repeats,
    /// over-long goal or txid, a bad amount, an unknown currency.
    pub fn parse<'a>(
        pairs: impl IntoIterator<Item = (Cow<'a, str>, Cow<'a, str>)>,
    ) -> Result<Self, ApiError> {
        let mut values: [Option<String>; PARAMETERS.len()] = Default::default();
        for (key, value) in pairs {
            let Some(slot) = PARAMETERS.iter().position(|k| *k == key) else {
                continue;
            };
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            match &values[slot] {
                Some(prev) if prev != value => {
                    return Err(ApiError::invalid(
                        PARAMETERS[slot],
                        "given twice with different values",
                    ))
                }
                _ => values[slot] = Some(value.to_owned()),
            }
        }
        // The security parameters are read by `security::check`; here only
        // checked for conflicting repeats.
        let [cid0, cid1, cid2, cid3, goal, amount, currency, txid, status, ..] = values;
        let status = status.unwrap_or_default().to_ascii_lowercase();
        if status.len() > MAX_STATUS_LEN {
            return Err(ApiError::invalid("status", "is longer than 32 bytes"));
        }
        // The status word goes into the report's `Nats-Msg-Id`.
        if status.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "status",
                "must not contain control characters",
            ));
        }
        // The first alias that holds a click id (an advertiser may send its
        // own value in another one, `subid` say); two that hold different
        // click ids are a 400.
        let given: Vec<(&str, String)> = [cid0, cid1, cid2, cid3]
            .into_iter()
            .zip(CLICK_ID_ALIASES)
            .filter_map(|(v, name)| v.map(|v| (name, v)))
            .collect();
        let (first_field, _) = given.first().ok_or_else(|| {
            ApiError::invalid("click_id", "is required (or cid, subid, transaction_id)")
        })?;
        let ids: Vec<(&str, Uuid)> = given
            .iter()
            .filter_map(|(name, v)| Some((*name, Uuid::try_parse(v).ok()?)))
            .collect();
        let Some(&(_, click)) = ids.first() else {
            return Err(ApiError::invalid(
                *first_field,
                "must be the click id (a UUID) from the tracking redirect",
            ));
        };
        if let Some((other, _)) = ids.iter().find(|(_, id)| *id != click) {
            return Err(ApiError::invalid(
                *other,
                "names another click than the other click id parameters",
            ));
        }
        let click_id = click.to_string();
        let goal = goal.unwrap_or_default();
        if goal.len() > MAX_GOAL_LEN {
            return Err(ApiError::invalid("goal", "is longer than 64 bytes"));
        }
        let txid = txid.unwrap_or_default();
        if txid.len() > MAX_TXID_LEN {
            return Err(ApiError::invalid("txid", "is longer than 256 bytes"));
        }
        let amount_micros = amount
            .map(|a| {
                money::parse_micros_rounded(&a)
                    .map_err(|e| ApiError::invalid("amount", e.to_string()))
            })
            .transpose()?;
        let currency = match currency {
            None => String::new(),
            Some(c) => money::parse_currency(&c).ok_or_else(|| {
                ApiError::invalid("currency", "must be an ISO 4217 code such as USD")
            })?,
        };
        Ok(Self {
            click_id,
            goal,
            txid,
            amount_micros,
            currency,
            status,
        })
    }

    /// The event this postback reports; its id is the conversion id.
    /// `verified_offer_id`: the offer whose postback security it passed.
    pub fn into_event(
        self,
        ip: String,
        now_ms: i64,
        verified_offer_id: String,
        unchecked_params: String,
    ) -> ConversionReported {
        let id = conversion_id(&self.click_id, &self.goal, &self.txid);
        ConversionReported {
            event_id: id.clone(),
            occurred_at_ms: now_ms,
            conversion_id: id,
            click_id: self.click_id,
            goal: self.goal,
            txid: self.txid,
            amount_micros: self.amount_micros,
            currency: self.currency,
            origin: ConversionOrigin::Http as i32,
            ip,
            status: self.status,
            verified_offer_id,
            unchecked_params,
        }
    }
}

/// The value of parameter `name` as [`PostbackInput::parse`] reads one: the
/// first given that is not empty once trimmed, trimmed (`token=&token=x`,
/// `token=x%20` are `x`; parse refuses two different ones).
pub fn param<'p>(pairs: &'p [(String, String)], name: &str) -> Option<&'p str> {
    pairs
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.trim())
        .find(|v| !v.is_empty())
}

/// The `Nats-Msg-Id` of a report: the conversion id, plus the status word when
/// one is given, so a later status report is not dropped as a retry, plus the
/// offer it was verified for, so a verified report is not dropped as a retry
/// of an unverified one (see [`crate::conversions::ConversionView::reopens_with`]).
pub fn report_msg_id(e: &ConversionReported) -> String {
    let mut id = e.conversion_id.clone();
    if !e.status.is_empty() {
        // Escaped, so a status word cannot pass for another report's id
        // (`hold@o1` for `hold` verified for o1).
        let word = e
            .status
            .replace('%', "%25")
            .replace('/', "%2F")
            .replace('@', "%40");
        id = format!("{id}/{word}");
    }
    if !e.verified_offer_id.is_empty() {
        id = format!("{id}@{}", e.verified_offer_id);
    }
    id
}

/// Brings a `ConversionReported` from the log to canonical form: derived
/// conversion id and event time where missing, canonical click id, upper-case
/// currency. `log_time_ms` is when JetStream stored it.
///
/// # Errors
/// Why the report is malformed, in words; it is then decided `malformed`.
pub fn normalize_reported(
    mut e: ConversionReported,
    log_time_ms: i64,
) -> Result<ConversionReported, String> {
    if e.click_id.is_empty() {
        return Err("missing click_id".to_owned());
    }
    e.click_id = Uuid::try_parse(&e.click_id)
        .map_err(|_| format!("click_id {:?} is not a UUID", truncate(&e.click_id)))?
        .to_string();
    if e.goal.len() > MAX_GOAL_LEN || e.txid.len() > MAX_TXID_LEN {
        return Err("goal or txid too long".to_owned());
    }
    if e.amount_micros.is_some_and(|a| a < 0) {
        return Err("negative amount".to_owned());
    }
    if e.amount_micros.is_some_and(|a| a > money::MAX_MICROS) {
        return Err("amount above 10^12 units".to_owned());
    }
    if !e.currency.is_empty() {
        e.currency = money::parse_currency(&e.currency)
            .ok_or_else(|| format!("unknown currency {:?}", truncate(&e.currency)))?;
    }
    let derived = conversion_id(&e.click_id, &e.goal, &e.txid);
    if e.conversion_id.is_empty() {
        e.conversion_id = derived;
    } else if let Some(problem) = conversion_id_problem(&e.conversion_id) {
        return Err(problem.to_owned());
    }
    if e.occurred_at_ms <= 0 {
        e.occurred_at_ms = log_time_ms;
    }
    if e.origin == ConversionOrigin::Unspecified as i32
        || ConversionOrigin::try_from(e.origin).is_err()
    {
        e.origin = ConversionOrigin::Nats as i32;
    }
    Ok(e)
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "0190a0b4-7c6e-7a2b-9c1d-2e3f4a5b6c7d";

    fn parse(q: &str) -> Result<PostbackInput, ApiError> {
        PostbackInput::parse(url::form_urlencoded::parse(q.as_bytes()))
    }

    fn field(r: Result<PostbackInput, ApiError>) -> String {
        match r {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("expected 400, got {other:?}"),
        }
    }

    #[test]
    fn parses_every_alias_and_field() {
        for alias in CLICK_ID_ALIASES {
            let p = parse(&format!(
                "{alias}={}&goal=sale&amount=9.99&currency=eur&txid=T1",
                CID.to_uppercase()
            ))
            .unwrap();
            assert_eq!(p.click_id, CID, "canonical form via {alias}");
            assert_eq!(
                (p.goal.as_str(), p.txid.as_str(), p.currency.as_str()),
                ("sale", "T1", "EUR")
            );
            assert_eq!(p.amount_micros, Some(9_990_000));
        }
        // A float printed in full is rounded to micros, not refused.
        let p = parse(&format!("click_id={CID}&amount=30.299999999999997")).unwrap();
        assert_eq!(p.amount_micros, Some(30_300_000));
    }

    #[test]
    fn names_the_bad_field() {
        assert_eq!(field(parse("goal=x")), "click_id");
        assert_eq!(field(parse("click_id=nope")), "click_id");
        assert_eq!(field(parse("cid=nope")), "cid");
        assert_eq!(field(parse(&format!("click_id={CID}&amount=-1"))), "amount");
        assert_eq!(
            field(parse(&format!("click_id={CID}&amount=NaN"))),
            "amount"
        );
        assert_eq!(
            field(parse(&format!("click_id={CID}&currency=ZZZ"))),
            "currency"
        );
        assert_eq!(
            field(parse(&format!("click_id={CID}&goal={}", "g".repeat(65)))),
            "goal"
        );
        assert_eq!(
            field(parse(&format!("click_id={CID}&txid=a&txid=b"))),
            "txid"
        );
    }

    #[test]
    fn the_first_alias_holding_a_click_id_counts_and_two_click_ids_are_refused() {
        // An advertiser's own value in `subid` beside our click id.
        let p = parse(&format!("transaction_id={CID}&subid=AFF123")).unwrap();
        assert_eq!(p.click_id, CID);
        let p = parse(&format!("cid={CID}&click_id={}", CID.to_uppercase())).unwrap();
        assert_eq!(p.click_id, CID, "the same click id twice is fine");
        let other = "0190a0b4-7c6e-7a2b-9c1d-2e3f4a5b6c7e";
        assert_eq!(field(parse(&format!("click_id={CID}&cid={other}"))), "cid");
        assert_eq!(field(parse("subid=AFF123")), "subid");
    }

    #[test]
    fn same_repeat_and_unknown_params_are_fine() {
        let p = parse(&format!("click_id={CID}&txid=a&txid=a&utm=1")).unwrap();
        assert_eq!(p.txid, "a");
    }

    #[test]
    fn conversion_id_is_stable_and_distinguishes_goal_and_txid() {
        assert_eq!(conversion_id(CID, "", ""), conversion_id(CID, "", ""));
        assert_ne!(conversion_id(CID, "a", ""), conversion_id(CID, "", "a"));
        assert_ne!(conversion_id(CID, "", "t1"), conversion_id(CID, "", "t2"));
    }

    #[test]
    fn normalizes_partner_events() {
        let e = ConversionReported {
            click_id: CID.to_uppercase(),
            currency: "usd".into(),
            ..Default::default()
        };
        let n = normalize_reported(e, 42).unwrap();
        assert_eq!(n.click_id, CID);
        assert_eq!(n.conversion_id, conversion_id(CID, "", ""));
        assert_eq!(n.occurred_at_ms, 42);
        assert_eq!(n.currency, "USD");
        assert_eq!(n.origin(), ConversionOrigin::Nats);
    }

    #[test]
    fn a_reports_msg_id_tells_status_words_and_verified_reports_apart() {
        let e = |status: &str, verified: &str| ConversionReported {
            conversion_id: "c1".into(),
            status: status.into(),
            verified_offer_id: verified.into(),
            ..Default::default()
        };
        let ids: Vec<String> = [
            e("", ""),
            e("hold", ""),
            e("", "o1"),
            e("hold", "o1"),
            e("hold@o1", ""),
            e("a/b%", ""),
        ]
        .iter()
        .map(report_msg_id)
        .collect();
        assert_eq!(
            ids,
            [
                "c1",
                "c1/hold",
                "c1@o1",
                "c1/hold@o1",
                "c1/hold%40o1",
                "c1/a%2Fb%25"
            ],
            "a word cannot pass for a verified report"
        );
    }

    #[test]
    fn refuses_nonsense_partner_events() {
        let bad = [
            ConversionReported::default(),
            ConversionReported {
                click_id: "x".into(),
                ..Default::default()
            },
            ConversionReported {
                click_id: CID.into(),
                amount_micros: Some(-1),
                ..Default::default()
            },
            ConversionReported {
                click_id: CID.into(),
                currency: "ZZZ".into(),
                ..Default::default()
            },
            ConversionReported {
                click_id: CID.into(),
                amount_micros: Some(money::MAX_MICROS + 1),
                ..Default::default()
            },
            ConversionReported {
                click_id: CID.into(),
                conversion_id: "partner\n7".into(),
                ..Default::default()
            },
        ];
        for e in bad {
            assert!(normalize_reported(e.clone(), 1).is_err(), "{e:?}");
        }
    }
}
