//! Money without floating point: amounts are integer millionths ("micros") of an
//! ISO 4217 currency in events and decimal strings in JSON.

use thiserror::Error;

/// Micros per currency unit.
pub const MICROS: i64 = 1_000_000;

/// Why a decimal amount was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AmountError {
    #[error("must be a decimal number such as 12.50")]
    NotDecimal,
    #[error("must not be negative")]
    Negative,
    #[error("has more than 6 decimal places")]
    TooPrecise,
    #[error("is too large")]
    TooLarge,
}

/// Largest accepted amount: one trillion units, far above any real payout.
/// `i64::MAX` micros is only 9.2 of them, so report totals add up in `i128`.
const MAX_UNITS: i64 = 1_000_000_000_000;

/// [`MAX_UNITS`] in micros: the largest amount an event may carry.
pub const MAX_MICROS: i64 = MAX_UNITS * MICROS;

/// Parses a non-negative decimal (`"12"`, `"12.5"`, `"0.000001"`) into micros.
///
/// # Errors
/// Anything but ASCII digits with at most one `.` (signs, exponents, `NaN`, `inf`,
/// inner spaces; whitespace around it is ignored), more than 6 decimals, or more
/// than 10^12 units.
pub fn parse_micros(text: &str) -> Result<i64, AmountError> {
    parse(text, false)
}

/// [`parse_micros`], with more than 6 decimals rounded to 6 (half up) instead
/// of refused: what an advertiser's server sends is often a float printed in
/// full (`30.299999999999997` for 10.1 × 3), and refusing it loses the sale.
///
/// # Errors
/// As [`parse_micros`], but never [`AmountError::TooPrecise`].
pub fn parse_micros_rounded(text: &str) -> Result<i64, AmountError> {
    parse(text, true)
}

fn parse(text: &str, round: bool) -> Result<i64, AmountError> {
    let text = text.trim();
    if let Some(rest) = text.strip_prefix('-') {
        return match parse_unsigned(rest, round) {
            Ok(0) => Ok(0),
            Ok(_) => Err(AmountError::Negative),
            Err(e) => Err(e),
        };
    }
    parse_unsigned(text, round)
}

/// [`parse`] after its one optional minus sign.
fn parse_unsigned(text: &str, round: bool) -> Result<i64, AmountError> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
        return Err(AmountError::NotDecimal);
    }
    if text.ends_with('.') && frac.is_empty() && int.is_empty() {
        return Err(AmountError::NotDecimal);
    }
    let mut frac = frac.trim_end_matches('0');
    // Half up: the 7th decimal decides.
    let mut round_up = false;
    if frac.len() > 6 {
        if !round {
            return Err(AmountError::TooPrecise);
        }
        round_up = frac.as_bytes()[6] >= b'5';
        frac = &frac[..6];
    }
    let int = int.trim_start_matches('0');
    if int.len() > 13 {
        return Err(AmountError::TooLarge);
    }
    let units: i64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| AmountError::TooLarge)?
    };
    if units > MAX_UNITS {
        return Err(AmountError::TooLarge);
    }
    let mut frac_micros: i64 = 0;
    for (i, b) in frac.bytes().enumerate() {
        frac_micros += i64::from(b - b'0') * 10_i64.pow(5 - i as u32);
    }
    let micros = units * MICROS + frac_micros + i64::from(round_up);
    if micros > MAX_MICROS {
        return Err(AmountError::TooLarge);
    }
    Ok(micros)
}

/// Formats micros as a decimal string with at least two decimals: `1500000` → `"1.50"`,
/// `1234567` → `"1.234567"`.
pub fn format_micros(micros: impl Into<i128>) -> String {
    let micros: i128 = micros.into();
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let units = abs / MICROS as u128;
    let frac = format!("{:06}", abs % MICROS as u128);
    let trimmed = frac.trim_end_matches('0');
    let shown = if trimmed.len() < 2 {
        &frac[..2]
    } else {
        trimmed
    };
    format!("{sign}{units}.{shown}")
}

/// Active ISO 4217 currency codes, in order, each 3 letters and a space.
const ISO_4217: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND \
BOB BRL BSD BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN \
ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD \
JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT \
MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR \
RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND \
TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VED VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG";

/// Normalises a currency code to upper case and checks it is an active ISO 4217 code.
pub fn parse_currency(text: &str) -> Option<String> {
    let upper = text.trim().to_ascii_uppercase();
    (upper.len() == 3 && is_iso_4217(upper.as_bytes())).then_some(upper)
}

/// Whether `code` is in [`ISO_4217`]: a binary search of its fixed-width
/// entries. Every report with a currency asks, and a walk of the list was
/// 0.8 % of postback-service's CPU in the decisions benchmark.
fn is_iso_4217(code: &[u8]) -> bool {
    let codes = ISO_4217.as_bytes();
    let (mut low, mut high) = (0, codes.len().div_ceil(4));
    while low < high {
        let mid = (low + high) / 2;
        match codes[mid * 4..mid * 4 + 3].cmp(code) {
            std::cmp::Ordering::Less => low = mid + 1,
            std::cmp::Ordering::Greater => high = mid,
            std::cmp::Ordering::Equal => return true,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_currency_is_found_and_nothing_else() {
        let codes: Vec<&str> = ISO_4217.split(' ').collect();
        assert!(
            codes.windows(2).all(|w| w[0] < w[1]),
            "in order, no repeats"
        );
        assert!(codes
            .iter()
            .all(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase())));
        for code in &codes {
            assert_eq!(parse_currency(code).as_deref(), Some(*code));
            assert_eq!(
                parse_currency(&format!(" {} ", code.to_lowercase())).as_deref(),
                Some(*code)
            );
        }
        for bad in ["", "US", "USDX", "XXX", "AAA", "ZZZ", "EU R", "usd1", "€"] {
            assert_eq!(parse_currency(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parses_decimals_exactly() {
        assert_eq!(parse_micros("12"), Ok(12_000_000));
        assert_eq!(parse_micros("12.5"), Ok(12_500_000));
        assert_eq!(parse_micros("0.000001"), Ok(1));
        assert_eq!(parse_micros(".5"), Ok(500_000));
        assert_eq!(parse_micros("3."), Ok(3_000_000));
        assert_eq!(parse_micros("1.2300000"), Ok(1_230_000));
        assert_eq!(parse_micros("-0"), Ok(0));
    }

    #[test]
    fn refuses_what_is_not_a_plain_non_negative_decimal() {
        for bad in [
            "", ".", "abc", "NaN", "inf", "1e3", "+1", "1.2.3", " 1 2", "0x10", "--0", "- 0", "-+1",
        ] {
            assert_eq!(parse_micros(bad), Err(AmountError::NotDecimal), "{bad}");
        }
        assert_eq!(parse_micros("-1.5"), Err(AmountError::Negative));
        assert_eq!(parse_micros("0.0000001"), Err(AmountError::TooPrecise));
        assert_eq!(
            parse_micros("99999999999999999999"),
            Err(AmountError::TooLarge)
        );
        assert_eq!(parse_micros("1000000000001"), Err(AmountError::TooLarge));
        assert_eq!(
            parse_micros("1000000000000.5"),
            Err(AmountError::TooLarge),
            "past 10^12 units by a fraction"
        );
        assert_eq!(parse_micros("1000000000000"), Ok(MAX_MICROS));
    }

    #[test]
    fn rounds_past_six_decimals_half_up_when_asked() {
        assert_eq!(parse_micros_rounded("30.299999999999997"), Ok(30_300_000));
        assert_eq!(parse_micros_rounded("19.9900001"), Ok(19_990_000));
        assert_eq!(parse_micros_rounded("0.0000005"), Ok(1));
        assert_eq!(parse_micros_rounded("0.00000049"), Ok(0));
        assert_eq!(parse_micros_rounded("0.9999995"), Ok(1_000_000));
        assert_eq!(parse_micros_rounded("12.5"), Ok(12_500_000));
        assert_eq!(parse_micros_rounded("-0.0000001"), Ok(0));
        assert_eq!(parse_micros_rounded("1e3"), Err(AmountError::NotDecimal));
        assert_eq!(parse_micros_rounded("999999999999.9999999"), Ok(MAX_MICROS));
        assert_eq!(
            parse_micros_rounded("1000000000000.0000005"),
            Err(AmountError::TooLarge),
            "rounded up past 10^12 units"
        );
    }

    #[test]
    fn formats_with_at_least_two_decimals() {
        assert_eq!(format_micros(1_500_000), "1.50");
        assert_eq!(format_micros(0), "0.00");
        assert_eq!(format_micros(1_234_567), "1.234567");
        assert_eq!(format_micros(-2_000_000), "-2.00");
    }

    #[test]
    fn round_trips() {
        for m in [0, 1, 10, 999_999, 1_000_000, 123_456_789] {
            assert_eq!(parse_micros(&format_micros(m)), Ok(m));
        }
    }

    #[test]
    fn knows_currencies() {
        assert_eq!(parse_currency("usd").as_deref(), Some("USD"));
        assert_eq!(parse_currency("EUR").as_deref(), Some("EUR"));
        assert_eq!(parse_currency("ved").as_deref(), Some("VED"));
        assert_eq!(parse_currency("XXX"), None);
        assert_eq!(parse_currency("US"), None);
    }
}
