//! The caller's IP behind a reverse proxy: both services take
//! `--trusted-proxy-header` for it (click-service to tell visitors apart,
//! postback-service for offers' IP allowlists).

use std::net::IpAddr;

use axum::http::HeaderMap;

/// The caller's IP: the right-most address in `trusted_header` (the one our own
/// proxy appended) when that header is configured and present, else the peer.
/// Only the header's last line counts (a proxy may add a line of its own after
/// the client's), and only its right-most entry, as an IP or `IP:port`: an
/// entry there that does not read as one (`unknown`) gives the peer, never an
/// entry further left, which the client wrote. The line is split as bytes:
/// a byte past ASCII the client wrote further left (a proxy appending to the
/// client's line passes it on) does not make the whole line unreadable.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted_header: &str) -> IpAddr {
    from_header(peer, headers, trusted_header).to_canonical()
}

/// [`client_ip`] as sent: an IPv4 caller may be `::ffff:a.b.c.d` (a
/// dual-stack listener's peer, or a proxy's header), which [`client_ip`]
/// makes plain IPv4, so one visitor is one address to unique clicks and
/// allowlists whichever way it came.
fn from_header(peer: IpAddr, headers: &HeaderMap, trusted_header: &str) -> IpAddr {
    if trusted_header.is_empty() {
        return peer;
    }
    headers
        .get_all(trusted_header)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|b| *b == b',').next())
        .and_then(|last| std::str::from_utf8(last).ok())
        .map(str::trim)
        .and_then(|s| {
            s.parse::<IpAddr>()
                .ok()
                .or_else(|| s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        })
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 7));

    #[test]
    fn client_ip_honours_only_the_configured_header() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.1.1.1, 203.0.113.7".parse().unwrap());
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(client_ip(peer, &h, ""), peer);
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(client_ip(mapped, &h, ""), IP, "a dual-stack peer, as IPv4");
        assert_eq!(client_ip(peer, &h, "x-forwarded-for"), IP);

        let forwarded = |lines: &[&str]| {
            let mut h = HeaderMap::new();
            for line in lines {
                h.append("x-forwarded-for", line.parse().unwrap());
            }
            client_ip(peer, &h, "x-forwarded-for")
        };
        assert_eq!(
            forwarded(&["203.0.113.99", "203.0.113.7"]),
            IP,
            "the proxy's own line, after the client's"
        );
        assert_eq!(
            forwarded(&["203.0.113.99, unknown"]),
            peer,
            "an unreadable last entry is not skipped for the client's"
        );
        assert_eq!(forwarded(&["1.1.1.1, 203.0.113.7:443"]), IP);
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            axum::http::HeaderValue::from_bytes(b"\xff, 203.0.113.7").unwrap(),
        );
        assert_eq!(
            client_ip(peer, &h, "x-forwarded-for"),
            IP,
            "a byte past ASCII the client wrote further left"
        );
        assert_eq!(
            forwarded(&["[2001:db8::1]:443"]),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }
}
