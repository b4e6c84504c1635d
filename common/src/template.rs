//! URL templates with `{macro}` placeholders, filled with URL-encoded values.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything but RFC 3986 unreserved characters is encoded, so a value placed
/// after the host can never break out of its query parameter or path segment,
/// nor change the host. One limit: a value that is exactly `.` or `..` and fills
/// a whole path segment is still a dot segment to URL parsers (which decode
/// `%2E` for this too), so it can move the request up the path, on that host.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Fills every `{name}` whose name `lookup` knows with its URL-encoded value.
/// Unknown macros are left as they are (the advertiser may use braces of its own).
pub fn fill<'a>(template: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                let name = &after[..close];
                match lookup(name) {
                    Some(value) => out.extend(utf8_percent_encode(value, COMPONENT)),
                    None => {
                        out.push('{');
                        out.push_str(name);
                        out.push('}');
                    }
                }
                rest = &after[close + 1..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The `{name}` macros a template uses, in order.
pub fn macros(template: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        found.push(&after[..close]);
        rest = &after[close + 1..];
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<&'static str> {
        match name {
            "click_id" => Some("abc"),
            "sub1" => Some("a b&c=d/é"),
            "empty" => Some(""),
            _ => None,
        }
    }

    #[test]
    fn fills_and_encodes_known_macros() {
        assert_eq!(
            fill("https://x.test/l?c={click_id}&s={sub1}&e={empty}", lookup),
            "https://x.test/l?c=abc&s=a%20b%26c%3Dd%2F%C3%A9&e="
        );
    }

    #[test]
    fn leaves_unknown_and_unclosed_braces() {
        assert_eq!(fill("/p/{other}/{click_id}", lookup), "/p/{other}/abc");
        assert_eq!(fill("/p?x={click_id", lookup), "/p?x={click_id");
        assert_eq!(fill("no macros", lookup), "no macros");
    }

    #[test]
    fn lists_macros() {
        assert_eq!(macros("a{x}b{y}c{"), vec!["x", "y"]);
    }
}
