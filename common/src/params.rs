//! Parsing of query strings and form bodies: unlike a lossy parser, a value
//! of a parameter we read that is not UTF-8 after percent-decoding is refused,
//! naming its field; any other parameter that is not UTF-8 is skipped.

use percent_encoding::percent_decode;

use crate::ApiError;

/// Longest query string accepted.
pub const MAX_QUERY_BYTES: usize = 8 * 1024;

/// Parses `application/x-www-form-urlencoded` text (a query string or a form
/// body) into pairs, in order, keeping only the first of each parameter named
/// in `wanted`: the others, and later copies of a wanted one, are skipped
/// unread, so one that is not UTF-8 (an ad network's Latin-1 keyword,
/// appended again) does not refuse the request.
///
/// # Errors
/// 400 naming `what` (`query` or `body`) when longer than [`MAX_QUERY_BYTES`]
/// for a query, or naming the wanted parameter whose value is not UTF-8.
pub fn parse_only(
    raw: &[u8],
    what: &str,
    wanted: &[&str],
) -> Result<Vec<(String, String)>, ApiError> {
    parse_with(raw, what, wanted, true)
}

/// Parses it into every pair that is UTF-8, in order, repeats included; only
/// the parameters named in `known` must be: any other that is not (an
/// advertiser platform's own parameter in Latin-1) is skipped, not refused.
///
/// # Errors
/// As [`parse_only`], for the known parameters.
pub fn parse_known(
    raw: &[u8],
    what: &str,
    known: &[&str],
) -> Result<Vec<(String, String)>, ApiError> {
    parse_with(raw, what, known, false)
}

/// The pairs of `raw` whose name and value are UTF-8; a value of one of
/// `names` that is not is a 400. With `first_only`, only the first of each
/// of `names` is kept, the rest skipped unread.
fn parse_with(
    raw: &[u8],
    what: &str,
    names: &[&str],
    first_only: bool,
) -> Result<Vec<(String, String)>, ApiError> {
    if what == "query" && raw.len() > MAX_QUERY_BYTES {
        return Err(ApiError::invalid(
            "query",
            format!("is longer than {MAX_QUERY_BYTES} bytes"),
        ));
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    for part in raw.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
        let (k, v) = match part.iter().position(|b| *b == b'=') {
            Some(i) => (&part[..i], &part[i + 1..]),
            None => (part, &b""[..]),
        };
        // A name that is not UTF-8 is none of `names`.
        let Ok(key) = decode(k) else { continue };
        let named = names.contains(&key.as_str());
        if first_only && (!named || pairs.iter().any(|(k, _)| *k == key)) {
            continue;
        }
        let value = match decode(v) {
            Ok(value) => value,
            Err(_) if !named => continue,
            Err(_) => return Err(ApiError::invalid(key, "is not valid UTF-8")),
        };
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn decode(raw: &[u8]) -> Result<String, std::string::FromUtf8Error> {
    let plus: Vec<u8> = raw
        .iter()
        .map(|b| if *b == b'+' { b' ' } else { *b })
        .collect();
    String::from_utf8(percent_decode(&plus).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(r: Result<Vec<(String, String)>, ApiError>) -> String {
        match r {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("expected 400, got {other:?}"),
        }
    }

    #[test]
    fn decodes_like_forms_do() {
        let pairs = parse_known(b"a=1&b=x+y%26z&c&=e&&d=%C3%A9", "query", &[]).unwrap();
        let expected: Vec<(String, String)> =
            [("a", "1"), ("b", "x y&z"), ("c", ""), ("", "e"), ("d", "é")]
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
        assert_eq!(pairs, expected);
    }

    #[test]
    fn invalid_utf8_and_oversize_are_named() {
        assert_eq!(
            field(parse_known(b"goal=%FF%FE", "query", &["goal"])),
            "goal"
        );
        let long = vec![b'a'; MAX_QUERY_BYTES + 1];
        assert_eq!(field(parse_known(&long, "query", &[])), "query");
        assert!(
            parse_known(&long, "body", &[]).is_ok(),
            "bodies are bounded elsewhere"
        );
    }

    #[test]
    fn only_known_parameters_must_be_utf8_and_every_readable_pair_is_kept() {
        let known = ["goal", "txid"];
        let pairs = parse_known(b"kw=caf%E9&%FF=1&goal=a&x=1&goal=b", "query", &known).unwrap();
        let expected: Vec<(String, String)> = [("goal", "a"), ("x", "1"), ("goal", "b")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(pairs, expected);
        assert_eq!(field(parse_known(b"txid=caf%E9", "body", &known)), "txid");
    }

    #[test]
    fn only_the_wanted_parameters_are_read() {
        let wanted = ["aff", "sub1"];
        let pairs = parse_only(b"kw=caf%E9&%FF=1&aff=a1&sub1=%C3%A9", "query", &wanted).unwrap();
        let expected: Vec<(String, String)> = [("aff", "a1"), ("sub1", "é")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(
            pairs, expected,
            "a Latin-1 value of another parameter is skipped"
        );
        assert_eq!(
            field(parse_only(b"sub1=caf%E9", "query", &wanted)),
            "sub1",
            "a wanted one is still refused, by name"
        );
        assert_eq!(
            parse_only(b"sub1=ok&aff=a1&sub1=caf%E9&aff=a2", "query", &wanted).unwrap(),
            [
                ("sub1".to_owned(), "ok".to_owned()),
                ("aff".to_owned(), "a1".to_owned())
            ],
            "the first of each wins; later copies are not read"
        );
        assert_eq!(
            field(parse_only(
                &vec![b'a'; MAX_QUERY_BYTES + 1],
                "query",
                &wanted
            )),
            "query"
        );
    }
}
