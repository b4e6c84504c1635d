//! URL templates with `{macro}` placeholders, filled with URL-encoded values.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything but RFC 3986 unreserved characters is encoded, so a value placed
/// after the host can never break out of its query parameter or path segment,
/// nor change the host. Dots stay as they are: a path segment that values make
/// `.` or `..` is emptied instead (see [`fill`]).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Fills every `{name}` whose name `lookup` knows with its URL-encoded value.
/// Unknown macros are left as they are (the advertiser may use braces of its own).
///
/// A path segment that comes out as `.` or `..` with a value in it (a click's
/// `sub1=..` filling `/{sub1}/`) is left empty: URL parsers and browsers take
/// it as a dot segment, `%2E` included, and would send the request up the
/// template's path. Dots anywhere else, and a template's own dot segments,
/// stay as they are.
pub fn fill<'a>(template: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    // Where values were written in `out`.
    let mut values = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                let name = &after[..close];
                match lookup(name) {
                    Some(value) => {
                        let start = out.len();
                        out.extend(utf8_percent_encode(value, COMPONENT));
                        values.push(start..out.len());
                    }
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
    empty_dot_segments(out, &values)
}

/// `out` without the dot segments a value is part of. Values are encoded, so
/// every `/`, `\\`, `?` and `#` in `out` is the template's own. Parsers of
/// http(s) URLs take `\\` for `/` and `%2E` for `.`, and so does this.
fn empty_dot_segments(out: String, values: &[std::ops::Range<usize>]) -> String {
    let path_start = match out.find("://") {
        Some(scheme_end) => match out[scheme_end + 3..].find(['/', '\\', '?', '#']) {
            Some(end) if matches!(out.as_bytes()[scheme_end + 3 + end], b'/' | b'\\') => {
                scheme_end + 3 + end
            }
            _ => return out,
        },
        None => 0,
    };
    let path_end = out[path_start..]
        .find(['?', '#'])
        .map_or(out.len(), |end| path_start + end);
    let mut dots = Vec::new();
    let mut start = path_start;
    for segment in out[path_start..path_end].split(['/', '\\']) {
        let end = start + segment.len();
        // An empty value counts too: `{sub1}..` with no sub1 is one as well.
        let filled = values.iter().any(|v| v.start <= end && start <= v.end);
        if filled && is_dot_segment(segment) {
            dots.push(start..end);
        }
        start = end + 1;
    }
    if dots.is_empty() {
        return out;
    }
    let mut emptied = String::with_capacity(out.len());
    let mut at = 0;
    for dot in dots {
        emptied.push_str(&out[at..dot.start]);
        at = dot.end;
    }
    emptied.push_str(&out[at..]);
    emptied
}

/// `.` or `..`, a dot written `%2E` or `%2e` included.
fn is_dot_segment(segment: &str) -> bool {
    let decoded = segment.replace("%2E", ".").replace("%2e", ".");
    matches!(decoded.as_str(), "." | "..")
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
    fn a_value_never_makes_a_dot_segment() {
        let fill_with = |template: &str, v: &'static str| fill(template, |_| Some(v));
        for v in [".", ".."] {
            for (template, filled) in [
                ("https://x.test/a/{s}/b", "https://x.test/a//b".to_owned()),
                ("https://x.test/a/{s}", "https://x.test/a/".to_owned()),
                (
                    "https://x.test/a/{s}?q=1",
                    "https://x.test/a/?q=1".to_owned(),
                ),
                ("https://x.test/a/{s}#f", "https://x.test/a/#f".to_owned()),
                ("/rel/{s}/x", "/rel//x".to_owned()),
                // In a query, a fragment or a longer segment: as it is.
                (
                    "https://x.test/a?s={s}&t=/{s}/#/{s}/",
                    format!("https://x.test/a?s={v}&t=/{v}/#/{v}/"),
                ),
                (
                    "https://x.test/a/v{s}/b",
                    format!("https://x.test/a/v{v}/b"),
                ),
            ] {
                assert_eq!(fill_with(template, v), filled, "{template} with {v}");
            }
        }
        for (template, v, filled) in [
            // Values that make one together, or with the template's own dot.
            ("https://x.test/a/{s}{s}/b", ".", "https://x.test/a//b"),
            ("https://x.test/a/{s}./b", ".", "https://x.test/a//b"),
            ("https://x.test/a/{s}./b", "", "https://x.test/a//b"),
            // The template's own dot segments are the advertiser's.
            ("https://x.test/a/../{s}", "b", "https://x.test/a/../b"),
            // The template's `%2E` next to a value, or its `\\` for a `/`.
            ("https://x.test/a/{s}%2E/b", ".", "https://x.test/a//b"),
            ("https://x.test/a/%2e{s}/b", ".", "https://x.test/a//b"),
            ("https://x.test/a\\{s}\\b", "..", "https://x.test/a\\\\b"),
            ("https://x.test\\{s}\\b", "..", "https://x.test\\\\b"),
            // No path: a `/` in the query or fragment starts none.
            ("https://x.test?n=/{s}/x", "..", "https://x.test?n=/../x"),
            ("https://x.test#/{s}/x", "..", "https://x.test#/../x"),
            // What parsers decode to a dot is encoded, so it stays a name.
            (
                "https://x.test/a/{s}/b",
                "%2e%2e",
                "https://x.test/a/%252e%252e/b",
            ),
        ] {
            assert_eq!(fill_with(template, v), filled, "{template} with {v}");
        }
        // What a URL parser makes of it: the request stays under /a/.
        for template in ["https://x.test/a/{s}/b", "https://x.test/a\\{s}\\b"] {
            let url = url::Url::parse(&fill_with(template, "..")).unwrap();
            assert_eq!(url.path(), "/a//b", "{template}");
        }
    }

    #[test]
    fn lists_macros() {
        assert_eq!(macros("a{x}b{y}c{"), vec!["x", "y"]);
    }
}
