//! Click → 302 → postback → attributed, visible in every read endpoint.

use std::{collections::HashMap, time::Duration};

use reqwest::StatusCode;
use serde_json::json;

use crate::support::{
    app::{click_id_in, url_params},
    eventually,
    nats::clicks_in_log,
    System, OFFER_URL,
};

#[tokio::test]
async fn click_redirects_with_macros_then_postback_is_attributed_everywhere() {
    let sys = System::start().await;
    sys.demo_catalog().await;

    let r = sys
        .http
        .get(sys.click_url(
            "/c/o1?aff=a1&sub1=x%20y&sub2=b%26c&sub3=3&sub4=4&sub5=5&source=fb&aff_click_id=AC-9",
        ))
        // Raw UTF-8, as some in-app browsers send their device's name.
        .header(
            "user-agent",
            reqwest::header::HeaderValue::from_bytes("test-agent/1 (Ünï)".as_bytes()).unwrap(),
        )
        .header("referer", "https://pub.example/page")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with("https://adv.example/landing?"),
        "{location}"
    );
    let params = url_params(&location);
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap()
    };
    let click_id = get("cid").to_owned();
    let parsed = uuid::Uuid::parse_str(&click_id).expect("click id is a UUID");
    assert_eq!(parsed.get_version_num(), 7, "click id is a UUID v7");
    assert_eq!((get("o"), get("a")), ("o1", "a1"));
    assert_eq!(
        (get("s1"), get("s2"), get("s3"), get("s4"), get("s5")),
        ("x y", "b&c", "3", "4", "5")
    );
    assert_eq!((get("src"), get("acid")), ("fb", "AC-9"));
    assert!(
        location.contains("s2=b%26c"),
        "values are URL-encoded: {location}"
    );

    let conversion_id = sys
        .postback_ok(&format!("click_id={click_id}&amount=12.34&txid=T1"))
        .await;
    let conversion = sys.decided(&conversion_id).await;
    assert_eq!(conversion["state"], "attributed", "{conversion}");
    assert_eq!(conversion["click_id"], click_id.as_str());
    assert_eq!(
        (
            conversion["offer_id"].as_str(),
            conversion["affiliate_id"].as_str()
        ),
        (Some("o1"), Some("a1"))
    );
    assert_eq!(
        (
            conversion["payout"].as_str(),
            conversion["revenue"].as_str()
        ),
        (Some("2.50"), Some("12.34"))
    );
    assert_eq!(conversion["revenue_currency"], "USD");
    assert_eq!(conversion["txid"], "T1");
    assert!(conversion["decided_at"].is_string());

    let (status, click) = sys.api(&format!("/api/clicks/{click_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(click["click"]["sub1"], "x y");
    assert_eq!(click["click"]["user_agent"], "test-agent/1 (Ünï)");
    assert_eq!(click["click"]["referer"], "https://pub.example/page");
    assert_eq!(click["click"]["ip"], "127.0.0.1");
    assert_eq!(click["click"]["disposition"], "landing");
    assert_eq!(click["click"]["redirect_url"], location.as_str());
    assert_eq!(
        click["conversions"][0]["conversion_id"],
        conversion_id.as_str()
    );
    assert_eq!(click["conversions"][0]["state"], "attributed");

    for (group, id) in [("offer", "o1"), ("affiliate", "a1")] {
        let report = sys.report(group).await;
        assert_eq!(report["group_by"], group);
        let row = &report["rows"][0];
        assert_eq!(row["id"], id, "{report}");
        assert_eq!(
            (
                row["clicks"].as_u64(),
                row["attributed"].as_u64(),
                row["rejected"].as_u64()
            ),
            (Some(1), Some(1), Some(0))
        );
        assert_eq!(row["payout"], json!({"USD": "2.50"}));
        assert_eq!(row["revenue"], json!({"USD": "12.34"}));
    }
}

#[tokio::test]
async fn paused_offer_goes_to_its_fallback_or_nowhere() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    sys.put_offer(
        "o1",
        json!({"url": OFFER_URL, "status": "paused", "fallback_url": "https://fallback.example/?c={click_id}"}),
    )
    .await;
    let (_, location) = sys.click_ok("o1", "aff=a1").await;
    assert!(
        location.starts_with("https://fallback.example/?c="),
        "{location}"
    );
    let click_id = url_params(&location)[0].1.clone();
    assert!(
        uuid::Uuid::parse_str(&click_id).is_ok(),
        "fallback gets the click id too"
    );
    let (status, click) = eventually("fallback click folded", Duration::from_secs(5), || async {
        let r = sys.api(&format!("/api/clicks/{click_id}")).await;
        (r.0 == StatusCode::OK).then_some(r)
    })
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        click["click"]["disposition"], "fallback_paused",
        "recorded as such"
    );
    // A sale reported for it is not the paused offer's.
    let id = sys.postback_ok(&format!("click_id={click_id}")).await;
    let decided = sys.decided(&id).await;
    assert_eq!(
        (&decided["state"], &decided["reason"]),
        (&json!("rejected"), &json!("fallback_click")),
        "{decided}"
    );

    sys.put_offer("o1", json!({"url": OFFER_URL, "status": "paused"}))
        .await;
    let r = sys.click("o1", "aff=a1").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["field"], "offer_id");
}

#[tokio::test]
async fn click_errors_name_the_parameter() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    let cases = [
        ("nope", "aff=a1", StatusCode::NOT_FOUND, "offer_id"),
        ("bad.id", "aff=a1", StatusCode::NOT_FOUND, "offer_id"),
        ("o1", "", StatusCode::BAD_REQUEST, "aff"),
        ("o1", "sub1=x", StatusCode::BAD_REQUEST, "aff"),
        ("o1", "aff=ghost", StatusCode::NOT_FOUND, "aff"),
        (
            "o1",
            &format!("aff=a1&sub3={}", "x".repeat(2000)),
            StatusCode::BAD_REQUEST,
            "sub3",
        ),
    ];
    for (offer, query, status, field) in cases {
        let r = sys.click(offer, query).await;
        assert_eq!(r.status(), status, "/c/{offer}?{query}");
        let body: serde_json::Value = r.json().await.expect("JSON error body");
        assert_eq!(body["field"], field, "/c/{offer}?{query}: {body}");
        assert!(body["error"].is_string());
    }
    // An ad network's own parameter in Latin-1 is not ours to refuse; one of
    // ours is, by name.
    let r = sys.click("o1", "aff=a1&kw=caf%E9").await;
    assert_eq!(r.status(), StatusCode::FOUND, "the click is not lost");
    let r = sys.click("o1", "aff=a1&sub1=caf%E9").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn catalog_changes_reach_both_services_live() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    sys.put_offer(
        "o1",
        json!({"url": "https://new.example/?c={click_id}", "payout": "7", "attribution_window_hours": 24}),
    )
    .await;
    let (_, location) = sys.click_ok("o1", "aff=a1").await;
    assert!(
        location.starts_with("https://new.example/?c="),
        "click-service sees the new URL: {location}"
    );
    sys.wait_postback_sees_offer("o1", "7.00").await;
    let click_id = url_params(&location)[0].1.clone();
    let id = sys.postback_ok(&format!("cid={click_id}")).await;
    let conversion = sys.decided(&id).await;
    assert_eq!(
        conversion["payout"], "7.00",
        "postback-service pays the new payout: {conversion}"
    );
    assert_eq!(conversion["revenue"], "0.00");
}

#[tokio::test]
async fn a_head_request_is_checked_like_a_click_and_records_nothing() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    let head = |query: &'static str| {
        let url = sys.click_url(&format!("/c/o1?{query}"));
        let http = sys.http.clone();
        async move { http.head(url).send().await.expect("HEAD /c") }
    };
    let probe = head("aff=a1").await;
    assert_eq!(probe.status(), StatusCode::OK);
    assert!(probe.headers().get("location").is_none(), "no redirect");
    assert_eq!(head("aff=nobody").await.status(), StatusCode::NOT_FOUND);

    let js = sys.jetstream().await;
    let clicks = || async {
        let mut stream = js.get_stream("CLICKS").await.unwrap();
        stream.info().await.unwrap().state.messages
    };
    assert_eq!(clicks().await, 0, "a HEAD is no click");
    sys.click_ok("o1", "aff=a1").await;
    // A 302 after the ack deadline came from the outbox: published soon after.
    crate::support::eventually("a GET is a click", Duration::from_secs(10), || async {
        (clicks().await == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_visitor_ip_is_the_one_it_appended() {
    let mut sys = System::start().await;
    sys.demo_catalog().await;
    sys.restart_click_with(|c| c.trusted_proxy_header = "X-Forwarded-For".into())
        .await;

    let r = sys
        .http
        .get(sys.click_url("/c/o1?aff=a1"))
        .header("x-forwarded-for", "10.9.9.9, 198.51.100.9")
        .send()
        .await
        .expect("GET /c");
    assert_eq!(r.status(), StatusCode::FOUND);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let click_id = click_id_in(&location).unwrap();
    let click = eventually("the click folded", Duration::from_secs(5), || async {
        let (status, v) = sys.api(&format!("/api/clicks/{click_id}")).await;
        (status == StatusCode::OK && v["click"].is_object()).then_some(v)
    })
    .await;
    assert_eq!(click["click"]["ip"], "198.51.100.9", "{click}");
}

/// Clicks fired at once: each redirect waits for its click's ack, and the
/// clicks that arrived while others awaited theirs share one message.
async fn fire_clicks(sys: &System, n: usize) -> Vec<String> {
    let clicks = (0..n).map(|i| async move {
        let (click_id, _) = sys.click_ok("o1", &format!("aff=a1&sub1=s{i}")).await;
        click_id
    });
    let ids = futures::future::join_all(clicks).await;
    assert!(ids.iter().all(|id| !id.is_empty()));
    ids
}

#[tokio::test]
async fn clicks_arriving_together_are_acked_as_one_message_each_intact_and_attributed() {
    let mut sys = System::start().await;
    sys.demo_catalog().await;
    let ids = fire_clicks(&sys, 300).await;

    let js = sys.jetstream().await;
    // A 302 given past the ack deadline came from the outbox, which publishes
    // a moment later.
    let every_click_in = |count: usize| {
        let js = js.clone();
        move || {
            let js = js.clone();
            async move {
                let in_log = clicks_in_log(&js).await;
                (in_log.len() >= count).then_some(in_log)
            }
        }
    };
    let in_log = eventually(
        "300 clicks in the log",
        Duration::from_secs(10),
        every_click_in(300),
    )
    .await;
    let mut once: HashMap<&str, u32> = HashMap::new();
    for (_, click) in &in_log {
        *once.entry(click.click_id.as_str()).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(
            once.get(id.as_str()),
            Some(&1),
            "click {id} in the log once"
        );
    }
    assert_eq!(in_log.len(), ids.len(), "nothing else in the log");
    let batched = in_log
        .iter()
        .filter(|(subject, _)| subject == proto::subject::CLICKS_RECORDED_BATCH)
        .count();
    assert!(
        batched > 0,
        "300 clicks at once: some arrived while others awaited their ack"
    );

    // Every click of a batch is folded as if it had come alone.
    eventually("300 clicks folded", Duration::from_secs(10), || async {
        (sys.report("offer").await["rows"][0]["clicks"] == 300).then_some(())
    })
    .await;
    for (i, id) in ids.iter().enumerate() {
        let (status, click) = sys.api(&format!("/api/clicks/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{id}");
        assert_eq!(click["click"]["sub1"], format!("s{i}"));
    }
    let (_, batched_click) = in_log
        .iter()
        .find(|(subject, _)| subject == proto::subject::CLICKS_RECORDED_BATCH)
        .unwrap();
    let conversion_id = sys
        .postback_ok(&format!("click_id={}&amount=1", batched_click.click_id))
        .await;
    assert_eq!(sys.decided(&conversion_id).await["state"], "attributed");

    // CLICK_BATCH_MAX=1: one message per click, on clicks.v1.recorded only.
    sys.restart_click_with(|c| c.click_batch_max = 1).await;
    let alone = fire_clicks(&sys, 50).await;
    let in_log = eventually(
        "350 clicks in the log",
        Duration::from_secs(10),
        every_click_in(350),
    )
    .await;
    for id in &alone {
        let subjects: Vec<&str> = in_log
            .iter()
            .filter(|(_, click)| &click.click_id == id)
            .map(|(subject, _)| subject.as_str())
            .collect();
        assert_eq!(subjects, [proto::subject::CLICK_RECORDED], "{id}");
    }
}
