//! Postback security at the door, per offer: a static token, an IP/CIDR
//! allowlist, and HMAC-SHA256 signatures with a timestamp window and replay
//! refusal. A refused postback is not a conversion: it gets 401/403 with the
//! reason, is counted and logged with the caller's IP ([`Refusals`]), and a
//! caller refused too often is answered 429 without further logging.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Mutex,
};

use catalog::Security;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

/// Default accepted skew of `ts`, seconds.
pub const DEFAULT_WINDOW_SECS: u32 = 300;
/// Refusals per caller IP per minute before it is answered 429 unlogged.
pub const REFUSALS_PER_MINUTE: u32 = 20;

/// Why a postback was refused at the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadToken,
    IpNotAllowed,
    MissingSignature,
    BadSignature,
    Expired,
    Replayed,
}

impl Refusal {
    /// The machine-readable reason.
    pub fn code(self) -> &'static str {
        match self {
            Self::BadToken => "bad_token",
            Self::IpNotAllowed => "ip_not_allowed",
            Self::MissingSignature => "missing_signature",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired_signature",
            Self::Replayed => "replayed_signature",
        }
    }

    /// 403 for a caller we do not take postbacks from; 401 otherwise.
    pub fn status(self) -> u16 {
        if self == Self::IpNotAllowed {
            403
        } else {
            401
        }
    }
}

/// The signed text: every parameter but `sig`, sorted by name then value, as
/// `application/x-www-form-urlencoded`.
pub fn canonical(pairs: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = pairs.iter().filter(|(k, _)| k != "sig").collect();
    sorted.sort();
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(sorted.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .finish()
}

/// Lower-case hex HMAC-SHA256 of `text` under `secret`.
pub fn sign(secret: &str, text: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(text.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `ip` is one of `allowed`'s addresses or in one of its CIDRs. An
/// IPv4 address and its IPv4-mapped IPv6 form (`::ffff:203.0.113.5`, as a
/// dual-stack listener sees IPv4 callers and our logs show them) are one
/// address, on either side.
fn ip_allowed(ip: IpAddr, allowed: &[String]) -> bool {
    let ip = ip.to_canonical();
    allowed
        .iter()
        .any(|entry| match entry.parse::<ipnet::IpNet>() {
            Ok(net) => canonical_net(net).contains(&ip),
            Err(_) => entry
                .parse::<IpAddr>()
                .is_ok_and(|a| a.to_canonical() == ip),
        })
}

/// An IPv4-mapped IPv6 network (within `::ffff:0:0/96`) as the IPv4 one.
fn canonical_net(net: ipnet::IpNet) -> ipnet::IpNet {
    match net {
        ipnet::IpNet::V6(v6) if v6.prefix_len() >= 96 => v6
            .network()
            .to_ipv4_mapped()
            .and_then(|v4| ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).ok())
            .map_or(net, ipnet::IpNet::V4),
        other => other,
    }
}

/// Remembers signatures seen within their window, to refuse replays.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: Mutex<Pruned<String, i64>>,
}

/// A map whose expired entries are swept when it has doubled since the last
/// sweep (at least [`Pruned::FLOOR`] entries): one sweep per that many
/// inserts, not one per call once it is large.
#[derive(Debug)]
struct Pruned<K, V> {
    map: HashMap<K, V>,
    sweep_at: usize,
}

impl<K, V> Default for Pruned<K, V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            sweep_at: Self::FLOOR,
        }
    }
}

impl<K, V> Pruned<K, V> {
    const FLOOR: usize = 10_000;

    /// Keeps only the entries `live` keeps, if it is time to sweep.
    fn sweep(&mut self, live: impl FnMut(&K, &mut V) -> bool) {
        if self.map.len() > self.sweep_at {
            self.map.retain(live);
            self.sweep_at = (self.map.len() * 2).max(Self::FLOOR);
        }
    }
}

/// A signature the door has just used, for a report not durable yet: it is
/// forgotten again when dropped unless [`kept`](Self::keep), so the retry a
/// 503 asks for (or one after a request cut short) is not refused as a
/// replay of a report that was never recorded.
#[must_use = "the signature is forgotten when this is dropped"]
pub struct SignatureUse<'a> {
    replays: &'a ReplayGuard,
    sig: Option<String>,
}

impl SignatureUse<'_> {
    /// The report is durable: its signature stays used.
    pub fn keep(mut self) {
        self.sig = None;
    }
}

impl Drop for SignatureUse<'_> {
    fn drop(&mut self) {
        if let Some(sig) = self.sig.take() {
            self.replays
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .map
                .remove(&sig);
        }
    }
}

impl ReplayGuard {
    /// The use of the signature in `pairs` (if any) that [`check`] has just
    /// let through.
    pub fn pending_use(&self, pairs: &[(String, String)]) -> SignatureUse<'_> {
        let sig = crate::postback::param(pairs, "sig").map(str::to_ascii_lowercase);
        SignatureUse { replays: self, sig }
    }

    /// True the first time `sig` is seen before `expires_ms`; false on a replay.
    fn first_use(&self, sig: &str, now_ms: i64, expires_ms: i64) -> bool {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.sweep(|_, exp| *exp > now_ms);
        match seen.map.get(sig) {
            Some(exp) if *exp > now_ms => false,
            _ => {
                seen.map.insert(sig.to_owned(), expires_ms);
                true
            }
        }
    }
}

/// Runs an offer's checks on a postback's parameters.
///
/// # Errors
/// The first check that fails.
pub fn check(
    security: &Security,
    pairs: &[(String, String)],
    ip: IpAddr,
    now_ms: i64,
    replays: &ReplayGuard,
) -> Result<(), Refusal> {
    let param = |name: &str| crate::postback::param(pairs, name);
    if !security.allowed_ips.is_empty() && !ip_allowed(ip, &security.allowed_ips) {
        return Err(Refusal::IpNotAllowed);
    }
    if !security.token.is_empty()
        && !common::auth::constant_time_eq(
            param("token").unwrap_or("").as_bytes(),
            security.token.as_bytes(),
        )
    {
        return Err(Refusal::BadToken);
    }
    if !security.hmac_secret.is_empty() {
        let (Some(sig), Some(ts)) = (param("sig"), param("ts")) else {
            return Err(Refusal::MissingSignature);
        };
        let expected = sign(&security.hmac_secret, &canonical(pairs));
        if !common::auth::constant_time_eq(sig.to_ascii_lowercase().as_bytes(), expected.as_bytes())
        {
            return Err(Refusal::BadSignature);
        }
        let window = i64::from(if security.signature_window_seconds == 0 {
            DEFAULT_WINDOW_SECS
        } else {
            security.signature_window_seconds
        }) * 1000;
        let ts_ms = ts
            .parse::<i64>()
            .map_err(|_| Refusal::BadSignature)?
            .saturating_mul(1000);
        if (now_ms - ts_ms).abs() > window {
            return Err(Refusal::Expired);
        }
        if !replays.first_use(&expected, now_ms, ts_ms + window) {
            return Err(Refusal::Replayed);
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Tally {
    total: u64,
    suppressed: u64,
    by_reason: BTreeMap<&'static str, u64>,
    by_ip: Pruned<IpAddr, (i64, u32)>,
}

/// Counts refused postbacks and rate-limits callers refused too often.
#[derive(Debug, Default)]
pub struct Refusals {
    tally: Mutex<Tally>,
}

/// What the admin API shows of refusals (since the process started).
#[derive(Debug, Serialize)]
pub struct RefusalReport {
    pub total: u64,
    /// Refusals answered 429 and not logged one by one.
    pub suppressed: u64,
    pub by_reason: BTreeMap<&'static str, u64>,
}

impl Refusals {
    /// Counts a refusal; false when the caller is over its rate (answer 429,
    /// do not log).
    pub fn record(&self, ip: IpAddr, refusal: Refusal, now_ms: i64) -> bool {
        let mut t = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        t.total += 1;
        *t.by_reason.entry(refusal.code()).or_default() += 1;
        t.by_ip.sweep(|_, (start, _)| now_ms - *start < 60_000);
        let entry = t.by_ip.map.entry(ip).or_insert((now_ms, 0));
        if now_ms - entry.0 >= 60_000 {
            *entry = (now_ms, 0);
        }
        entry.1 += 1;
        let allowed = entry.1 <= REFUSALS_PER_MINUTE;
        if !allowed {
            t.suppressed += 1;
        }
        allowed
    }

    /// Whether the caller is over its rate already; if so, its postback is
    /// counted as refused (`too_many_refusals`, suppressed: answered 429 and
    /// not logged), so the report shows the size of a flood.
    pub fn over_rate(&self, ip: IpAddr, now_ms: i64) -> bool {
        let mut t = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let over = t
            .by_ip
            .map
            .get(&ip)
            .is_some_and(|(start, n)| now_ms - start < 60_000 && *n > REFUSALS_PER_MINUTE);
        if over {
            t.total += 1;
            t.suppressed += 1;
            *t.by_reason.entry("too_many_refusals").or_default() += 1;
        }
        over
    }

    /// The counts.
    pub fn report(&self) -> RefusalReport {
        let t = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        RefusalReport {
            total: t.total,
            suppressed: t.suppressed,
            by_reason: t.by_reason.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_entries_are_swept_once_the_map_has_doubled() {
        let mut p: Pruned<u32, i64> = Pruned::default();
        // 30k live entries: each sweep finds them all live, and the next
        // sweep waits until the map has doubled.
        for k in 0..30_000 {
            p.map.insert(k, 100);
            p.sweep(|_, exp| *exp > 50);
        }
        assert_eq!(p.map.len(), 30_000);
        assert!(p.sweep_at >= 30_000, "{}", p.sweep_at);
        // Once they are over, the next sweep past the mark drops them.
        for k in 30_000..=(p.sweep_at as u32) {
            p.map.insert(k, 100);
        }
        p.sweep(|_, exp| *exp > 200);
        assert!(p.map.is_empty());
        assert_eq!(p.sweep_at, Pruned::<u32, i64>::FLOOR);
    }

    fn pairs(q: &str) -> Vec<(String, String)> {
        url::form_urlencoded::parse(q.as_bytes())
            .into_owned()
            .collect()
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 7));

    #[test]
    fn canonical_form_sorts_and_drops_sig() {
        assert_eq!(
            canonical(&pairs("txid=a b&click_id=c&sig=x&amount=1")),
            "amount=1&click_id=c&txid=a+b"
        );
    }

    #[test]
    fn token_and_allowlist() {
        let g = ReplayGuard::default();
        let s = Security {
            token: "s3cret".into(),
            allowed_ips: vec!["203.0.113.0/24".into()],
            ..Security::default()
        };
        assert_eq!(check(&s, &pairs("token=s3cret"), IP, 0, &g), Ok(()));
        assert_eq!(
            check(&s, &pairs("token=nope"), IP, 0, &g),
            Err(Refusal::BadToken)
        );
        assert_eq!(check(&s, &pairs(""), IP, 0, &g), Err(Refusal::BadToken));
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            check(&s, &pairs("token=s3cret"), other, 0, &g),
            Err(Refusal::IpNotAllowed)
        );
        let mapped: IpAddr = "::ffff:203.0.113.9".parse().unwrap();
        assert_eq!(check(&s, &pairs("token=s3cret"), mapped, 0, &g), Ok(()));
        // The allowlist written in the mapped form our logs show.
        for entry in ["::ffff:203.0.113.9", "::ffff:203.0.113.0/120"] {
            let allowed = [entry.to_owned()];
            assert!(ip_allowed(mapped, &allowed), "{entry}");
            assert!(
                ip_allowed("203.0.113.9".parse().unwrap(), &allowed),
                "{entry}"
            );
            assert!(!ip_allowed(other, &allowed), "{entry}");
        }
        assert!(!ip_allowed(IP, &["::ffff:203.0.113.9".into()]));
        // Read as the rest of the postback is: the first value not empty
        // once trimmed.
        for sent in ["token=&token=s3cret", "token=s3cret%20", "token=+s3cret"] {
            assert_eq!(check(&s, &pairs(sent), IP, 0, &g), Ok(()), "{sent}");
        }
    }

    #[test]
    fn a_signature_whose_report_was_not_recorded_may_be_sent_again() {
        let g = ReplayGuard::default();
        let s = Security {
            hmac_secret: "k".into(),
            ..Security::default()
        };
        let now = 1_700_000_000_000;
        let unsigned = "click_id=c&ts=1700000000";
        let sig = sign("k", &canonical(&pairs(unsigned)));
        // Upper-case hex is the same signature.
        let signed = pairs(&format!("{unsigned}&sig={}", sig.to_ascii_uppercase()));
        assert_eq!(check(&s, &signed, IP, now, &g), Ok(()));
        drop(g.pending_use(&signed)); // a 503: not durable
        assert_eq!(check(&s, &signed, IP, now + 1, &g), Ok(()), "the retry");
        g.pending_use(&signed).keep(); // durable
        assert_eq!(check(&s, &signed, IP, now + 2, &g), Err(Refusal::Replayed));
    }

    #[test]
    fn signatures_good_bad_expired_replayed() {
        let g = ReplayGuard::default();
        let s = Security {
            hmac_secret: "k".into(),
            ..Security::default()
        };
        let now = 1_700_000_000_000;
        let unsigned = "click_id=c&amount=5&ts=1700000000";
        let sig = sign("k", &canonical(&pairs(unsigned)));
        let signed = format!("{unsigned}&sig={sig}");
        assert_eq!(check(&s, &pairs(&signed), IP, now, &g), Ok(()));
        assert_eq!(
            check(&s, &pairs(&signed), IP, now + 1000, &g),
            Err(Refusal::Replayed)
        );
        let tampered = signed.replace("amount=5", "amount=500");
        assert_eq!(
            check(&s, &pairs(&tampered), IP, now, &g),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            check(&s, &pairs(unsigned), IP, now, &g),
            Err(Refusal::MissingSignature)
        );
        let old = "click_id=c&ts=1699999000";
        let old_signed = format!("{old}&sig={}", sign("k", &canonical(&pairs(old))));
        assert_eq!(
            check(&s, &pairs(&old_signed), IP, now, &g),
            Err(Refusal::Expired)
        );
    }

    #[test]
    fn refusals_are_counted_and_rate_limited() {
        let r = Refusals::default();
        for _ in 0..REFUSALS_PER_MINUTE {
            assert!(r.record(IP, Refusal::BadToken, 0));
        }
        assert!(!r.record(IP, Refusal::BadToken, 1));
        for at in 2..102 {
            assert!(r.over_rate(IP, at));
        }
        assert!(!r.over_rate(IP, 61_000), "a minute later it may try again");
        let report = r.report();
        assert_eq!(
            (report.total, report.suppressed),
            (u64::from(REFUSALS_PER_MINUTE) + 101, 101),
            "each postback answered 429 counts"
        );
        assert_eq!(report.by_reason["too_many_refusals"], 100);
    }
}
