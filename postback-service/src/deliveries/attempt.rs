//! One HTTP attempt of a delivery, classified.

use std::time::{Duration, Instant};

use super::policy::{classify, Class};
use super::target::{check_url, GuardedResolver};

/// Most redirects a delivery follows, when it follows any.
const MAX_REDIRECTS: usize = 5;

/// How much of a response body is kept.
pub const BODY_LIMIT: usize = 512;

/// What one attempt found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptResult {
    pub class: Class,
    /// None when no HTTP answer came.
    pub status: Option<u16>,
    pub latency_ms: u64,
    pub error: String,
    /// The first [`BODY_LIMIT`] bytes of the answer.
    pub body: Vec<u8>,
}

/// Installs ring as the process's rustls crypto provider (reqwest is built
/// without one, to avoid a C toolchain dependency). Idempotent; every reqwest
/// client in the process needs it first.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The HTTP client deliveries use: no redirects unless allowed (then at most 5,
/// each hop checked like the first), the guarded resolver, no proxy, a user
/// agent.
///
/// # Errors
/// The TLS backend could not be set up.
pub fn client(
    allow_private: bool,
    follow_redirects: bool,
) -> Result<reqwest::Client, reqwest::Error> {
    install_tls_provider();
    let redirect = if follow_redirects {
        reqwest::redirect::Policy::custom(move |attempt| {
            // `previous` starts with the first URL, not a redirect: the
            // fifth redirect finds 5 there, and is followed.
            if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error("refused: too many redirects")
            } else if let Err(why) = check_url(attempt.url().as_str(), allow_private) {
                attempt.error(why)
            } else {
                attempt.follow()
            }
        })
    } else {
        reqwest::redirect::Policy::none()
    };
    reqwest::Client::builder()
        .redirect(redirect)
        // A proxy from the environment (HTTP_PROXY, ALL_PROXY...) would
        // resolve the postback's host itself, past the guarded resolver.
        .no_proxy()
        .dns_resolver(GuardedResolver::shared(allow_private))
        .user_agent(concat!("s2s-tracker-postback/", env!("CARGO_PKG_VERSION")))
        .pool_max_idle_per_host(8)
        .build()
}

/// Which delivery and attempt a request is, sent as `X-Delivery-Id` and
/// `X-Delivery-Attempt` (`<generation>.<attempt>`) so a receiver can deduplicate
/// and tell a retry from a new event.
#[derive(Debug, Clone, Copy)]
pub struct AttemptTag<'a> {
    pub delivery_id: &'a str,
    pub generation: u32,
    pub attempt: u32,
}

/// Requests `url` with GET once, within `timeout` (the body read included).
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    tag: AttemptTag<'_>,
    timeout: Duration,
    allow_private: bool,
) -> AttemptResult {
    let started = Instant::now();
    let failed = |class, error: String| AttemptResult {
        class,
        status: None,
        latency_ms: started.elapsed().as_millis() as u64,
        error,
        body: Vec::new(),
    };
    let url = match check_url(url, allow_private) {
        Ok(u) => u,
        Err(why) => return failed(Class::Permanent, why),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let sent = client
        .get(url)
        .header("x-delivery-id", tag.delivery_id)
        .header(
            "x-delivery-attempt",
            format!("{}.{}", tag.generation, tag.attempt),
        )
        .send();
    let mut response = match tokio::time::timeout_at(deadline, sent).await {
        Err(_) => return failed(Class::Retry, format!("timed out after {timeout:?}")),
        Ok(Err(error)) => {
            let text = common::fold::error_chain(&error);
            let class = if text.contains("refused:") {
                Class::Permanent
            } else {
                Class::Retry
            };
            return failed(class, text);
        }
        Ok(Ok(response)) => response,
    };
    // The status decides. A body that stalls or breaks off after it (within
    // the same timeout) is noted, never turned into a retry: the receiver has
    // answered, and a 2xx sent again would be counted twice.
    let status = response.status().as_u16();
    let mut body = Vec::new();
    let read = tokio::time::timeout_at(deadline, async {
        while body.len() < BODY_LIMIT {
            match response.chunk().await? {
                Some(chunk) => body.extend_from_slice(&chunk),
                None => break,
            }
        }
        Ok::<_, reqwest::Error>(())
    })
    .await;
    body.truncate(BODY_LIMIT);
    let unread = match read {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(common::fold::error_chain(&error)),
        Err(_) => Some(format!("timed out after {timeout:?}")),
    };
    let mut error = if (200..300).contains(&status) {
        String::new()
    } else {
        format!("HTTP {status}")
    };
    if let Some(why) = unread {
        if !error.is_empty() {
            error.push_str("; ");
        }
        error.push_str(&format!("body not read whole: {why}"));
    }
    AttemptResult {
        class: classify(status),
        status: Some(status),
        latency_ms: started.elapsed().as_millis() as u64,
        error,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GET /r/{n}` redirects to `/r/{n - 1}`, `/r/0` answers 200.
    async fn redirect_chain() -> std::net::SocketAddr {
        use axum::{extract::Path, response::Redirect, routing::get, Router};
        let app = Router::new().route(
            "/r/{n}",
            get(|Path(n): Path<u32>| async move {
                match n {
                    0 => Err("landed"),
                    n => Ok(Redirect::temporary(&format!("/r/{}", n - 1))),
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    #[tokio::test]
    async fn five_redirects_are_followed_and_a_sixth_fails_for_good() {
        let addr = redirect_chain().await;
        let follows = client(true, true).unwrap();
        let tag = AttemptTag {
            delivery_id: "d",
            generation: 1,
            attempt: 1,
        };
        let get = |hops: usize| {
            let url = format!("http://{addr}/r/{hops}");
            let follows = follows.clone();
            async move { send(&follows, &url, tag, Duration::from_secs(5), true).await }
        };
        let five = get(MAX_REDIRECTS).await;
        assert_eq!(
            (five.status, five.body.as_slice()),
            (Some(200), &b"landed"[..]),
            "{five:?}"
        );
        let six = get(MAX_REDIRECTS + 1).await;
        assert_eq!((six.class, six.status), (Class::Permanent, None), "{six:?}");
        assert!(six.error.contains("too many redirects"), "{six:?}");
        let none = send(
            &client(true, false).unwrap(),
            &format!("http://{addr}/r/1"),
            tag,
            Duration::from_secs(5),
            true,
        )
        .await;
        assert_eq!(none.status, Some(307), "not followed unless allowed");
    }
}
