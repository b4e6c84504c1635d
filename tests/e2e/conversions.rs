//! Deciding conversions: partners on NATS, retries, txids, the reasons, pending.

use std::time::Duration;

use prost::Message;
use proto::conversions::v1::ConversionReported;
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{eventually, System};

async fn publish(sys: &System, subject: &str, payload: Vec<u8>) {
    sys.publish(subject, payload).await;
}

#[tokio::test]
async fn a_partner_publishing_protobuf_to_nats_is_attributed() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
    let event = ConversionReported {
        click_id: click_id.clone(),
        goal: "sale".into(),
        txid: "P-1".into(),
        amount_micros: Some(3_000_000),
        currency: "EUR".into(),
        ..Default::default()
    };
    publish(&sys, "conversions.v1.reported", event.encode_to_vec()).await;
    let id = postback_service::postback::conversion_id(&click_id, "sale", "P-1");
    let conversion = sys.decided(&id).await;
    assert_eq!(conversion["state"], "attributed", "{conversion}");
    assert_eq!(conversion["origin"], "nats");
    assert_eq!(
        (
            conversion["revenue"].as_str(),
            conversion["revenue_currency"].as_str()
        ),
        (Some("3.00"), Some("EUR"))
    );
    assert_eq!(conversion["goal"], "sale");
}

#[tokio::test]
async fn the_same_postback_twice_is_one_conversion_and_one_attribution() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
    let query = format!("click_id={click_id}&goal=sale&txid=T1&amount=5");
    let first = sys.postback_ok(&query).await;
    let second = sys.postback_ok(&query).await;
    assert_eq!(first, second, "same conversion id for a retried postback");
    sys.decided(&first).await;
    let third = sys.postback_ok(&query).await;
    assert_eq!(
        first, third,
        "a retry after the decision is still the same conversion"
    );
    // POST with a form body is the same postback too.
    let r = sys
        .http
        .post(sys.postback_url("/postback"))
        .form(&[
            ("click_id", click_id.as_str()),
            ("goal", "sale"),
            ("txid", "T1"),
            ("amount", "5"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["conversion_id"],
        first.as_str()
    );

    let (_, click) = sys.api(&format!("/api/clicks/{click_id}")).await;
    assert_eq!(click["conversions"].as_array().unwrap().len(), 1, "{click}");
    let report = sys.report("offer").await;
    assert_eq!(report["rows"][0]["attributed"], 1);
    assert_eq!(report["rows"][0]["rejected"], 0);
}

#[tokio::test]
async fn another_txid_counts_but_no_txid_is_a_duplicate() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
    let first = sys
        .postback_ok(&format!("click_id={click_id}&goal=sale&txid=A"))
        .await;
    assert_eq!(sys.decided(&first).await["state"], "attributed");
    let other_txid = sys
        .postback_ok(&format!("click_id={click_id}&goal=sale&txid=B"))
        .await;
    assert_eq!(sys.decided(&other_txid).await["state"], "attributed");
    let no_txid = sys
        .postback_ok(&format!("click_id={click_id}&goal=sale"))
        .await;
    let decided = sys.decided(&no_txid).await;
    assert_eq!(
        (decided["state"].as_str(), decided["reason"].as_str()),
        (Some("rejected"), Some("duplicate")),
        "{decided}"
    );
    let other_goal = sys
        .postback_ok(&format!("click_id={click_id}&goal=install"))
        .await;
    assert_eq!(
        sys.decided(&other_goal).await["state"],
        "attributed",
        "another goal is another conversion"
    );

    let row = &sys.report("affiliate").await["rows"][0];
    assert_eq!(
        (row["attributed"].as_u64(), row["rejected"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(row["rejected_by_reason"], json!({"duplicate": 1}));
    assert_eq!(row["payout"], json!({"USD": "7.50"}));
}

#[tokio::test]
async fn an_unknown_click_is_rejected_after_the_grace() {
    let sys = System::start_with_grace(300).await;
    sys.demo_catalog().await;
    let ghost = uuid::Uuid::now_v7().to_string();
    let id = sys.postback_ok(&format!("click_id={ghost}")).await;
    let decided = sys.decided(&id).await;
    assert_eq!(
        (decided["state"].as_str(), decided["reason"].as_str()),
        (Some("rejected"), Some("unknown_click"))
    );
    let (status, click) = sys.api(&format!("/api/clicks/{ghost}")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "conversions of an unknown click are still shown"
    );
    assert!(click["click"].is_null());
    assert_eq!(click["conversions"][0]["reason"], "unknown_click");
    let report = sys.report("offer").await;
    assert_eq!(report["rows"][0]["id"], serde_json::Value::Null, "{report}");
    assert_eq!(
        report["rows"][0]["rejected_by_reason"],
        json!({"unknown_click": 1})
    );
}

#[tokio::test]
async fn a_conversion_past_the_window_expires() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
    let late = common::time::now_ms() + 25 * 3_600_000;
    let event = ConversionReported {
        click_id: click_id.clone(),
        occurred_at_ms: late,
        ..Default::default()
    };
    publish(&sys, "conversions.v1.reported", event.encode_to_vec()).await;
    let id = postback_service::postback::conversion_id(&click_id, "", "");
    let decided = sys.decided(&id).await;
    assert_eq!(
        (decided["state"].as_str(), decided["reason"].as_str()),
        (Some("rejected"), Some("expired")),
        "{decided}"
    );
    assert_eq!(
        decided["offer_id"], "o1",
        "rejections of known clicks carry the offer"
    );
    assert_eq!(
        sys.report("offer").await["rows"][0]["rejected_by_reason"],
        json!({"expired": 1})
    );
}

#[tokio::test]
async fn a_conversion_before_its_click_waits_then_is_attributed() {
    let sys = System::start_with_grace(60_000).await;
    sys.demo_catalog().await;
    let click_id = uuid::Uuid::now_v7().to_string();
    let id = sys.postback_ok(&format!("click_id={click_id}")).await;
    let pending = eventually(
        "conversion folded as pending",
        Duration::from_secs(5),
        || async {
            let (status, v) = sys.api(&format!("/api/conversions/{id}")).await;
            (status == StatusCode::OK).then_some(v)
        },
    )
    .await;
    assert_eq!(pending["state"], "pending");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sys.api(&format!("/api/conversions/{id}")).await.1["state"],
        "pending",
        "still waiting for its click"
    );

    sys.publish_click(&click_id).await;
    let decided = sys.decided(&id).await;
    assert_eq!(decided["state"], "attributed", "{decided}");
}

#[tokio::test]
async fn malformed_nats_messages_are_decided_and_do_not_block_the_next() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
    publish(&sys, "conversions.v1.reported", vec![0xff, 0xff, 0xff]).await;
    let no_click = ConversionReported {
        goal: "x".into(),
        ..Default::default()
    };
    publish(&sys, "conversions.v1.reported", no_click.encode_to_vec()).await;
    let bad_currency = ConversionReported {
        click_id: click_id.clone(),
        currency: "ZZZ".into(),
        txid: "c".into(),
        ..Default::default()
    };
    publish(
        &sys,
        "conversions.v1.reported",
        bad_currency.encode_to_vec(),
    )
    .await;
    // An id with a line break would go into the decision's `Nats-Msg-Id`
    // header, where async-nats panics on it (the decider, then every round).
    let header_breaker = ConversionReported {
        conversion_id: "partner\r\n7".into(),
        click_id: click_id.clone(),
        txid: "d".into(),
        ..Default::default()
    };
    publish(
        &sys,
        "conversions.v1.reported",
        header_breaker.encode_to_vec(),
    )
    .await;
    // Ten of these would pass i64::MAX in the offer's revenue total.
    let too_much = ConversionReported {
        click_id: click_id.clone(),
        amount_micros: Some(i64::MAX),
        txid: "e".into(),
        ..Default::default()
    };
    publish(&sys, "conversions.v1.reported", too_much.encode_to_vec()).await;
    // Its rejection once carried the whole txid, past what NATS takes in one
    // message: every round of the decider failed at it.
    let huge = ConversionReported {
        click_id: click_id.clone(),
        txid: "x".repeat(1_045_000),
        ..Default::default()
    };
    publish(&sys, "conversions.v1.reported", huge.encode_to_vec()).await;
    let good = ConversionReported {
        click_id: click_id.clone(),
        ..Default::default()
    };
    publish(&sys, "conversions.v1.reported", good.encode_to_vec()).await;

    let id = postback_service::postback::conversion_id(&click_id, "", "");
    assert_eq!(
        sys.decided(&id).await["state"],
        "attributed",
        "the consumer moved past the poison"
    );
    // Malformed reports never take their sale's derived id: each is listed
    // under its click, decided with why.
    let details = eventually(
        "the click's malformed reports decided",
        Duration::from_secs(10),
        || async {
            let (_, v) = sys.api(&format!("/api/clicks/{click_id}")).await;
            let malformed: Vec<String> = v["conversions"]
                .as_array()?
                .iter()
                .filter(|c| c["reason"] == "malformed")
                .filter_map(|c| c["detail"].as_str().map(str::to_owned))
                .collect();
            (malformed.len() == 4).then_some(malformed)
        },
    )
    .await;
    for why in ["currency", "control character", "amount above", "too long"] {
        assert!(
            details.iter().any(|d| d.contains(why)),
            "{why}: {details:?}"
        );
    }
    for txid in ["c", "d", "e"] {
        let derived = postback_service::postback::conversion_id(&click_id, "", txid);
        let (status, _) = sys.api(&format!("/api/conversions/{derived}")).await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{txid}: its derived id is free"
        );
    }
    let report = eventually(
        "six malformed decisions",
        Duration::from_secs(5),
        || async {
            let r = sys.report("offer").await;
            let rows = r["rows"].as_array()?.clone();
            let malformed: u64 = rows
                .iter()
                .filter_map(|row| row["rejected_by_reason"]["malformed"].as_u64())
                .sum();
            (malformed == 6).then_some(r)
        },
    )
    .await;
    assert!(report["rows"].as_array().unwrap().len() >= 2, "{report}");
}

#[tokio::test]
async fn postback_errors_name_the_field() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    let cid = uuid::Uuid::now_v7();
    let cases = [
        (String::new(), "click_id"),
        ("goal=x".to_owned(), "click_id"),
        ("click_id=not-a-uuid".to_owned(), "click_id"),
        ("subid=123".to_owned(), "subid"),
        (format!("click_id={cid}&amount=abc"), "amount"),
        (format!("click_id={cid}&amount=-3"), "amount"),
        (format!("click_id={cid}&currency=XYZ"), "currency"),
        (format!("click_id={cid}&txid=a&txid=b"), "txid"),
        // The status word goes into the report's `Nats-Msg-Id` header.
        (format!("click_id={cid}&status=a%0Ab"), "status"),
        (format!("click_id={cid}&status=a%0Db"), "status"),
    ];
    for (query, field) in cases {
        let (status, body) = sys.postback(&query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(body["field"], field, "{query}: {body}");
    }
    let r = sys
        .http
        .post(sys.postback_url("/postback"))
        .header("content-type", "application/json")
        .body(format!("{{\"click_id\":\"{cid}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["field"],
        "body"
    );

    let (status, _) = sys.api(&format!("/api/conversions/{cid}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = sys.api(&format!("/api/clicks/{cid}")).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::NOT_FOUND, Some("click_id"))
    );
    let (status, body) = sys.api("/api/clicks/nope").await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("click_id"))
    );
    let (status, body) = sys.api("/api/reports?group_by=day").await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("group_by"))
    );
    let r = sys
        .http
        .get(sys.postback_url("/api/reports"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "the read API needs the token"
    );
}

#[tokio::test]
async fn conversions_waiting_past_the_decider_scan_limit_do_not_hold_up_the_ones_behind() {
    // Each round looks at 5 pending conversions and 5 queued status reports;
    // 12 of each wait ahead (clicks never seen, a minute's grace).
    let sys = System::start_configured(60_000, |c| c.decider_scan_limit = 5).await;
    sys.demo_catalog().await;
    for _ in 0..12 {
        let ghost = uuid::Uuid::now_v7();
        sys.postback_ok(&format!("click_id={ghost}")).await;
        sys.postback_ok(&format!("click_id={ghost}&status=rejected"))
            .await;
    }
    let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
    let id = sys.postback_ok(&format!("click_id={click_id}")).await;
    assert_eq!(sys.decided(&id).await["state"], "attributed");
    sys.postback_ok(&format!("click_id={click_id}&status=rejected"))
        .await;
    eventually("reversed", Duration::from_secs(10), || async {
        let (_, v) = sys.api(&format!("/api/conversions/{id}")).await;
        (v["status"] == "rejected").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_head_on_the_postback_url_checks_its_input_and_records_nothing() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
    let head = |query: String| {
        let url = sys.postback_url(&format!("/postback?{query}"));
        let http = sys.http.clone();
        async move { http.head(url).send().await.unwrap().status() }
    };
    assert_eq!(head(format!("click_id={click_id}")).await, StatusCode::OK);
    assert_eq!(
        head("click_id=nope".to_owned()).await,
        StatusCode::BAD_REQUEST
    );
    let js = sys.jetstream().await;
    let mut stream = js.get_stream("CONVERSIONS").await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        0,
        "nothing recorded"
    );
    let id = sys.postback_ok(&format!("click_id={click_id}")).await;
    assert_eq!(sys.decided(&id).await["state"], "attributed");
}

/// The read API answers for what is in the log and only not folded yet: a
/// click redirected, a postback acked or a report a partner published a moment
/// ago is found at once, never a 404 first; an id in no log is still a 404.
#[tokio::test]
async fn the_api_finds_what_was_just_logged_and_not_yet_folded() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    for i in 0..20 {
        let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
        let (status, click) = sys.api(&format!("/api/clicks/{click_id}")).await;
        assert_eq!(status, StatusCode::OK, "click {i} just redirected: {click}");
        assert_eq!(click["click"]["click_id"], click_id.as_str());

        let txid = format!("N-{i}");
        let event = ConversionReported {
            click_id: click_id.clone(),
            txid: txid.clone(),
            ..Default::default()
        };
        publish(&sys, "conversions.v1.reported", event.encode_to_vec()).await;
        let id = postback_service::postback::conversion_id(&click_id, "", &txid);
        let (status, body) = sys.api(&format!("/api/conversions/{id}")).await;
        assert_eq!(status, StatusCode::OK, "report {i} just published: {body}");
        assert_eq!(body["conversion_id"], id.as_str());

        let id = sys
            .postback_ok(&format!("click_id={click_id}&txid=H-{i}"))
            .await;
        let (status, body) = sys.api(&format!("/api/conversions/{id}")).await;
        assert_eq!(status, StatusCode::OK, "postback {i} just acked: {body}");
    }
    let unknown = uuid::Uuid::now_v7();
    let (status, body) = sys.api(&format!("/api/conversions/{unknown}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["field"], "conversion_id", "{body}");
    let (status, body) = sys.api(&format!("/api/clicks/{unknown}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}
