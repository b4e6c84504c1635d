//! Strict parsing of query strings and form bodies: unlike a lossy parser, a
//! value that is not UTF-8 after percent-decoding is refused, naming its field.

use percent_encoding::percent_decode;

use crate::ApiError;

/// Longest query string accepted.
pub const MAX_QUERY_BYTES: usize = 8 * 1024;

/// Parses `application/x-www-form-urlencoded` text (a query string or a form
/// body) into pairs, in order.
///
/// # Errors
/// 400 naming `what` (`query` or `body`) when longer than [`MAX_QUERY_BYTES`] for
/// a query, or naming the parameter whose name or value is not UTF-8.
pub fn parse(raw: &[u8], what: &str) -> Result<Vec<(String, String)>, ApiError> {
    parse_with(raw, what, Keep::All)
}

/// [`parse`], keeping only the first of each parameter named in `wanted`: the
/// others, and later copies of a wanted one, are skipped unread, so one that is
/// not UTF-8 (an ad network's Latin-1 keyword, appended again) does not refuse
/// the request.
///
/// # Errors
/// As [`parse`], for the wanted parameters only.
pub fn parse_only(
    raw: &[u8],
    what: &str,
    wanted: &[&str],
) -> Result<Vec<(String, String)>, ApiError> {
    parse_with(raw, what, Keep::FirstOf(wanted))
}

/// [`parse`], where only the parameters named in `known` must be UTF-8: any
/// other that is not (an advertiser platform's own parameter in Latin-1) is
/// skipped, not refused. Every pair that is read is kept, repeats included.
///
/// # Errors
/// As [`parse`], for the known parameters only.
pub fn parse_known(
    raw: &[u8],
    what: &str,
    known: &[&str],
) -> Result<Vec<(String, String)>, ApiError> {
    parse_with(raw, what, Keep::Readable(known))
}

/// Which pairs [`parse_with`] keeps.
#[derive(Clone, Copy)]
enum Keep<'a> {
    /// Every pair; any that is not UTF-8 is refused.
    All,
    /// The first of each of these; the rest are skipped unread.
    FirstOf(&'a [&'a str]),
    /// Every pair that is UTF-8; one of these that is not is refused.
    Readable(&'a [&'a str]),
}

fn parse_with(raw: &[u8], what: &str, keep: Keep<'_>) -> Result<Vec<(String, String)>, ApiError> {
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
        let key = match (decode(k), keep) {
            (Ok(key), Keep::FirstOf(wanted))
                if !wanted.contains(&key.as_str()) || pairs.iter().any(|(k, _)| *k == key) =>
            {
                continue
            }
            (Ok(key), _) => key,
            // Not one of the wanted or known names.
            (Err(_), Keep::FirstOf(_) | Keep::Readable(_)) => continue,
            (Err(_), Keep::All) => {
                return Err(ApiError::invalid(
                    what,
                    "has a parameter name that is not UTF-8",
                ))
            }
        };
        let value = match (decode(v), keep) {
            (Ok(value), _) => value,
            (Err(_), Keep::Readable(known)) if !known.contains(&key.as_str()) => continue,
            (Err(_), _) => return Err(ApiError::invalid(key, "is not valid UTF-8")),
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
        let pairs = parse(b"a=1&b=x+y%26z&c&=e&&d=%C3%A9", "query").unwrap();
        let expected: Vec<(String, String)> =
            [("a", "1"), ("b", "x y&z"), ("c", ""), ("", "e"), ("d", "é")]
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
        assert_eq!(pairs, expected);
    }

    #[test]
    fn invalid_utf8_and_oversize_are_named() {
        assert_eq!(field(parse(b"goal=%FF%FE", "query")), "goal");
        assert_eq!(field(parse(b"%FF=1", "body")), "body");
        assert_eq!(
            field(parse(&vec![b'a'; MAX_QUERY_BYTES + 1], "query")),
            "query"
        );
        assert!(
            parse(&vec![b'a'; MAX_QUERY_BYTES + 1], "body").is_ok(),
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
