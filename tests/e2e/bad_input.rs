//! Hostile HTTP input: every case a 4xx naming the field (or ignored, where that
//! is the documented rule), never a 500, and the service keeps serving.

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::System;

#[tokio::test]
async fn hostile_clicks_and_postbacks_get_4xx_naming_the_field() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
    let long = "x".repeat(9000);
    let cases: Vec<(String, StatusCode, &str)> = vec![
        (
            sys.click_url("/c/o1?aff=a1&sub1=%FF%FE"),
            StatusCode::BAD_REQUEST,
            "sub1",
        ),
        (
            sys.click_url(&format!("/c/o1?aff=a1&junk={long}")),
            StatusCode::BAD_REQUEST,
            "query",
        ),
        (
            sys.click_url("/c/o1?aff=%C3%28"),
            StatusCode::BAD_REQUEST,
            "aff",
        ),
        (
            sys.postback_url(&format!("/postback?click_id={click_id}&goal=%FF")),
            StatusCode::BAD_REQUEST,
            "goal",
        ),
        (
            sys.postback_url(&format!("/postback?click_id={click_id}&amount=1e309")),
            StatusCode::BAD_REQUEST,
            "amount",
        ),
        (
            sys.postback_url(&format!(
                "/postback?click_id={click_id}&amount=99999999999999999999"
            )),
            StatusCode::BAD_REQUEST,
            "amount",
        ),
        (
            sys.postback_url(&format!("/postback?click_id={click_id}&amount=inf")),
            StatusCode::BAD_REQUEST,
            "amount",
        ),
        (
            sys.postback_url(&format!("/postback?click_id={click_id}&currency=%00%00%00")),
            StatusCode::BAD_REQUEST,
            "currency",
        ),
        (
            sys.postback_url("/postback?click_id=%7B%7D"),
            StatusCode::BAD_REQUEST,
            "click_id",
        ),
        (
            sys.postback_url(&format!(
                "/postback?click_id={click_id}&status={}",
                "s".repeat(40)
            )),
            StatusCode::BAD_REQUEST,
            "status",
        ),
        (
            sys.postback_url(&format!("/postback?click_id={click_id}&{long}=1")),
            StatusCode::BAD_REQUEST,
            "query",
        ),
        (
            sys.postback_url(&format!("/postback?click_id={click_id}&token=a&token=b")),
            StatusCode::BAD_REQUEST,
            "token",
        ),
    ];
    for (url, status, field) in cases {
        let r = sys.http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), status, "{}", &url[..url.len().min(120)]);
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body["field"],
            field,
            "{}: {body}",
            &url[..url.len().min(120)]
        );
    }
    let r = sys
        .http
        .post(sys.postback_url("/postback"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(vec![b'a'; 70 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "body");
    // Unknown parameters are ignored, by rule, even when they are not UTF-8
    // (an advertiser platform's own, in Latin-1).
    let id = sys
        .postback_ok(&format!(
            "click_id={click_id}&utm_source=x&foo=bar&kw=caf%E9&%FF=1"
        ))
        .await;
    assert_eq!(
        sys.decided(&id).await["state"],
        "attributed",
        "still serving"
    );
}

/// What axum answers before any handler runs (a path that is not UTF-8, an
/// unknown route, a method not allowed, a body over the limit) is JSON too.
#[tokio::test]
async fn errors_before_any_handler_are_json_naming_what_they_can() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    let big = vec![b'{'; 3 * 1024 * 1024];
    let cases = [
        (
            sys.http.get(sys.click_url("/c/%FF?aff=a1")),
            StatusCode::BAD_REQUEST,
            Some("path"),
        ),
        (
            sys.http.get(sys.click_url("/nowhere")),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            sys.http.get(sys.postback_url("/api/nowhere")),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            sys.http.delete(sys.click_url("/c/o1?aff=a1")),
            StatusCode::METHOD_NOT_ALLOWED,
            None,
        ),
        (
            sys.http
                .put(sys.click_url("/api/offers/o1"))
                .bearer_auth("admin")
                .body(big),
            StatusCode::PAYLOAD_TOO_LARGE,
            Some("body"),
        ),
    ];
    for (request, status, field) in cases {
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), status);
        let allow = r.headers().get("allow").cloned();
        let body: Value = r.json().await.expect("a JSON body");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
        assert_eq!(body["field"].as_str(), field, "{status}: {body}");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            assert!(allow.is_some(), "the Allow header is kept");
        }
    }
}

/// A client that opens a connection and never finishes its request head (a
/// slowloris, a dead peer) is cut off at the header read timeout, on both
/// services; meanwhile others are served, and it does not hold up a stop.
#[tokio::test]
async fn a_request_head_never_finished_is_cut_off_and_holds_up_no_stop() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let short = |ingest: &mut common::config::IngestArgs| ingest.header_read_timeout_ms = 300;
    let mut sys = System::start_configured(500, move |c| short(&mut c.ingest)).await;
    // The services now close a keep-alive connection idle for 300 ms: the
    // test's own requests each take a new one, so none is sent on a
    // connection just as the service closes it.
    sys.http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("http client");
    sys.restart_click_with(|c| short(&mut c.ingest)).await;
    sys.demo_catalog().await;

    let half_open = |addr| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
            .await
            .expect("write a partial head");
        stream
    };
    let addrs = [
        sys.click.as_ref().expect("click-service").addr,
        sys.postback.as_ref().expect("postback-service").addr,
    ];
    for addr in addrs {
        let mut stream = half_open(addr).await;
        // Others are served meanwhile.
        sys.click_ok("o1", "aff=a1").await;
        let (status, _) = sys.api("/api/reports?group_by=offer").await;
        assert_eq!(status, StatusCode::OK);
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_to_end(&mut answer),
        )
        .await;
        assert!(closed.is_ok(), "{addr}: the half-open connection is closed");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            !answer.contains(" 200 "),
            "{addr}: nothing served: {answer}"
        );
    }
    let _held = half_open(addrs[1]).await;
    sys.postback.take().expect("postback-service").stop().await;
}
