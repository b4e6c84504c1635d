//! The server-side request forgery guard: affiliate postback URLs are ours to
//! request, so by default they may not point into our own network.
//!
//! IP literals are checked before the request; host names are checked by the
//! HTTP client's resolver ([`GuardedResolver`]) on every connection, so a name
//! that re-resolves to a private address later (DNS rebinding) is refused too.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Whether `ip` is on the public internet: not loopback, private, link-local,
/// unique-local or site-local, shared (CGNAT), documentation, benchmarking,
/// IETF-reserved or future-use (240/4), multicast, broadcast or unspecified;
/// and an IPv6 address that carries an IPv4 one (mapped, compatible, NAT64,
/// 6to4) only as public as that IPv4 address. Teredo (which hides its IPv4
/// address) and local-use NAT64 are refused outright.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19)))
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                let [h1, h2] = hi.to_be_bytes();
                let [l1, l2] = lo.to_be_bytes();
                is_public(IpAddr::V4([h1, h2, l1, l2].into()))
            };
            // ::ffff:a.b.c.d and the deprecated ::a.b.c.d (with :: and ::1
            // among them, which read as 0.0.0.0 and 0.0.0.1: not public).
            if let Some(v4) = v6.to_ipv4() {
                return is_public(IpAddr::V4(v4));
            }
            // NAT64's well-known prefix 64:ff9b::/96 reaches the IPv4 address
            // in its last 32 bits; 6to4 2002::/16 the one after its prefix.
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return embedded(seg[6], seg[7]);
            }
            if seg[0] == 0x2002 {
                return embedded(seg[1], seg[2]);
            }
            let first = seg[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first & 0xffc0) == 0xfec0
                || (first == 0x2001 && seg[1] == 0x0db8)
                || (first == 0x2001 && seg[1] == 0)
                || (first == 0x64 && seg[1] == 0xff9b && seg[2] == 1)
                || seg[..4] == [0x100, 0, 0, 0])
        }
    }
}

/// Checks a URL before any request: http(s) only, and no private IP literal
/// unless allowed.
///
/// # Errors
/// Why the URL is refused.
pub fn check_url(url: &str, allow_private: bool) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("invalid URL: {e}"))?;
    if parsed.scheme() != "http" && parsed.scheme() != "https" {
        return Err(format!(
            "refused: scheme {} (only http and https)",
            parsed.scheme()
        ));
    }
    let literal = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        Some(url::Host::Domain(_)) => None,
        None => return Err("invalid URL: no host".to_owned()),
    };
    if let Some(ip) = literal {
        if !allow_private && !is_public(ip) {
            return Err(format!(
                "refused: {ip} is a private, loopback or link-local address"
            ));
        }
    }
    Ok(parsed)
}

/// A resolver that drops non-public addresses (unless allowed) and fails when
/// none is left.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl GuardedResolver {
    /// As the `Arc` the HTTP client takes.
    pub fn shared(allow_private: bool) -> Arc<Self> {
        Arc::new(Self { allow_private })
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if allowed.is_empty() {
                let error: Box<dyn std::error::Error + Send + Sync> = if found.is_empty() {
                    format!("{host} does not resolve").into()
                } else {
                    format!("refused: {host} resolves only to private, loopback or link-local addresses").into()
                };
                return Err(error);
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fc00::1",
            "fe80::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "198.18.0.1",
            "240.0.0.1",
            "192.0.0.8",
            // IPv6 that carries an IPv4 address: only as public as that one.
            "::10.0.0.5",
            "64:ff9b::a00:5",
            "64:ff9b::127.0.0.1",
            "2002:a00:5::1",
            "2002:7f00:1::",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "64:ff9b:1::a00:5",
            "fec0::1",
            "100::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "93.184.216.34",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn urls_are_checked_before_requests() {
        assert!(check_url("https://aff.example/pb", false).is_ok());
        assert!(check_url("http://127.0.0.1:9/pb", false)
            .unwrap_err()
            .contains("refused"));
        assert!(check_url("http://[::1]/pb", false)
            .unwrap_err()
            .contains("refused"));
        assert!(check_url("http://169.254.169.254/latest/meta-data", false).is_err());
        assert!(check_url("http://127.0.0.1:9/pb", true).is_ok());
        assert!(check_url("ftp://aff.example/", true)
            .unwrap_err()
            .contains("scheme"));
        assert!(check_url("not a url", true).is_err());
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_of_private_addresses() {
        let refused = GuardedResolver {
            allow_private: false,
        }
        .resolve("localhost".parse().unwrap())
        .await;
        assert!(refused.err().unwrap().to_string().contains("refused"));
        let allowed = GuardedResolver {
            allow_private: true,
        }
        .resolve("localhost".parse().unwrap())
        .await;
        assert!(allowed.unwrap().next().is_some());
    }
}
