//! The rules networks expect: goals, dedup policies, status lifecycle, fraud
//! windows, unique clicks, caps, postback security; and a rebuild reproducing it all.

use std::time::Duration;

use prost::Message;
use proto::clicks::v1::ClickRecorded;
use proto::conversions::v1::ConversionReported;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::{
    app::{click_id_in, url_params},
    eventually, Receiver, Reply, System, OFFER_URL,
};

async fn offer(sys: &System, body: Value) {
    let mut body = body;
    body["url"] = json!(OFFER_URL);
    sys.put_offer("o1", body).await;
    sys.put_affiliate("a1", json!({})).await;
    sys.put_affiliate("a2", json!({})).await;
    sys.wait_postback_sees_offer("o1", "").await;
}

async fn rejected_for(sys: &System, id: &str) -> String {
    let v = sys.decided(id).await;
    assert_eq!(v["state"], "rejected", "{v}");
    v["reason"].as_str().unwrap().to_owned()
}

/// A partner's report with its own conversion id, so the same (click, goal,
/// txid) can be reported as distinct conversions.
async fn partner(sys: &System, id: &str, click_id: &str, goal: &str, txid: &str, at_ms: i64) {
    let e = ConversionReported {
        conversion_id: id.into(),
        click_id: click_id.into(),
        goal: goal.into(),
        txid: txid.into(),
        occurred_at_ms: at_ms,
        ..Default::default()
    };
    sys.publish("conversions.v1.reported", e.encode_to_vec())
        .await;
}

#[tokio::test]
async fn install_then_purchase_on_one_click_and_unknown_goals() {
    let sys = System::start().await;
    offer(
        &sys,
        json!({"payout": "0.50", "goals": [
        {"id": "install", "payout": "1.00", "revenue": "2"},
        {"id": "purchase", "payout": "5", "revenue": "20"}]}),
    )
    .await;
    let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
    let install = sys
        .decided(
            &sys.postback_ok(&format!("click_id={click_id}&goal=install"))
                .await,
        )
        .await;
    let purchase = sys
        .decided(
            &sys.postback_ok(&format!("click_id={click_id}&goal=purchase"))
                .await,
        )
        .await;
    assert_eq!(
        (install["state"].as_str(), install["payout"].as_str()),
        (Some("attributed"), Some("1.00"))
    );
    assert_eq!(
        (purchase["state"].as_str(), purchase["payout"].as_str()),
        (Some("attributed"), Some("5.00"))
    );
    assert_eq!(purchase["revenue"], "20.00");
    let signup = sys
        .postback_ok(&format!("click_id={click_id}&goal=signup"))
        .await;
    assert_eq!(rejected_for(&sys, &signup).await, "unknown_goal");
    let default = sys
        .decided(&sys.postback_ok(&format!("click_id={click_id}")).await)
        .await;
    assert_eq!(default["payout"], "0.50", "no goal: the offer's default");
    let row = &sys.report("offer").await["rows"][0];
    assert_eq!(row["payout"], json!({"USD": "6.50"}));
}

#[tokio::test]
async fn dedup_policies_unique_txid_one_per_goal_and_all() {
    let sys = System::start().await;
    offer(
        &sys,
        json!({"dedup": "unique_txid", "goals": [
        {"id": "sale"}, {"id": "lead", "dedup": "one_per_goal"}, {"id": "event", "dedup": "all"}]}),
    )
    .await;
    let (k, _) = sys.click_ok("o1", "aff=a1").await;
    let now = common::time::now_ms();
    let ids: Vec<String> = (0..9).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    // unique_txid: every distinct txid once; a repeat of a txid is a duplicate.
    partner(&sys, &ids[0], &k, "sale", "A", now).await;
    partner(&sys, &ids[1], &k, "sale", "B", now).await;
    partner(&sys, &ids[2], &k, "sale", "A", now).await;
    // one_per_goal: the first only, whatever the txid.
    partner(&sys, &ids[3], &k, "lead", "X", now).await;
    partner(&sys, &ids[4], &k, "lead", "Y", now).await;
    // all: every distinct conversion.
    partner(&sys, &ids[5], &k, "event", "", now).await;
    partner(&sys, &ids[6], &k, "event", "", now).await;
    let mut states = Vec::new();
    for id in &ids[..7] {
        let v = sys.decided(id).await;
        states.push(
            v["reason"]
                .as_str()
                .unwrap_or(v["state"].as_str().unwrap())
                .to_owned(),
        );
    }
    assert_eq!(
        states,
        [
            "attributed",
            "attributed",
            "duplicate",
            "attributed",
            "duplicate",
            "attributed",
            "attributed"
        ]
    );
    // An advertiser's retry of one postback is never counted twice, under any policy.
    let retried = sys.postback_ok(&format!("click_id={k}&goal=event")).await;
    assert_eq!(
        sys.postback_ok(&format!("click_id={k}&goal=event")).await,
        retried
    );
    sys.decided(&retried).await;
    let (_, click) = sys.api(&format!("/api/clicks/{k}")).await;
    assert_eq!(click["conversions"].as_array().unwrap().len(), 8);
}

#[tokio::test]
async fn pending_then_approved_then_reversed_moves_reports_and_affiliate_postbacks() {
    let receiver = Receiver::start(vec![], Reply::Status(200, "ok")).await;
    let sys = System::start().await;
    offer(
        &sys,
        json!({"payout": "2.50", "status_map": {"ok_paid": "approved"}}),
    )
    .await;
    sys.put_affiliate(
        "a1",
        json!({"postback_url": receiver.url("/pb?c={click_id}&s={status}&d={delivery_id}")}),
    )
    .await;
    sys.wait_postback_sees_offer("o1", "").await;
    let (k, _) = sys.click_ok("o1", "aff=a1").await;
    let base = format!("click_id={k}&txid=T1");
    let id = sys.postback_ok(&format!("{base}&status=hold")).await;
    let v = sys.decided(&id).await;
    assert_eq!(
        (v["state"].as_str(), v["status"].as_str()),
        (Some("attributed"), Some("pending"))
    );
    let row = &sys.report("offer").await["rows"][0];
    assert_eq!(row["by_status"], json!({"pending": 1}));
    assert_eq!(
        row["payout"],
        json!({}),
        "pending conversions are not paid yet"
    );

    assert_eq!(
        sys.postback_ok(&format!("{base}&status=OK_PAID")).await,
        id,
        "the same conversion"
    );
    let approved = eventually("approved", Duration::from_secs(10), || async {
        let (_, v) = sys.api(&format!("/api/conversions/{id}")).await;
        (v["status"] == "approved").then_some(v)
    })
    .await;
    assert_eq!(approved["status_history"][0]["from"], "pending");
    let row = &sys.report("offer").await["rows"][0];
    assert_eq!(
        (row["by_status"].clone(), row["payout"].clone()),
        (json!({"approved": 1, "pending": 0}), json!({"USD": "2.50"}))
    );
    eventually("approval postback", Duration::from_secs(10), || async {
        (receiver.seen().len() == 1).then_some(())
    })
    .await;

    sys.postback_ok(&format!("{base}&status=chargeback")).await;
    eventually("reversed", Duration::from_secs(10), || async {
        let (_, v) = sys.api(&format!("/api/conversions/{id}")).await;
        (v["status"] == "rejected").then_some(())
    })
    .await;
    let row = &sys.report("offer").await["rows"][0];
    assert_eq!(
        row["payout"],
        json!({"USD": "0.00"}),
        "a reversal takes the payout back"
    );
    assert_eq!(row["attributed"], 1);
    eventually("reversal postback", Duration::from_secs(10), || async {
        (receiver.seen().len() == 2).then_some(())
    })
    .await;
    let seen = receiver.seen();
    let status_of = |i: usize| {
        url_params(&format!("http://x{}", seen[i].uri))
            .into_iter()
            .find(|(k, _)| k == "s")
            .unwrap()
            .1
    };
    assert_eq!(
        (status_of(0), status_of(1)),
        ("approved".to_owned(), "rejected".to_owned())
    );
    assert_ne!(
        seen[0].uri, seen[1].uri,
        "each status event has its own delivery id"
    );
    // The receiver saw it before its outcome is folded: wait for the fold.
    let shown = eventually(
        "the click shows the reversal's delivery too",
        Duration::from_secs(10),
        || async {
            let (_, click) = sys.api(&format!("/api/clicks/{k}")).await;
            let shown: Vec<String> = click["deliveries"]
                .as_array()?
                .iter()
                .filter_map(|d| {
                    let url = d["url"].as_str()?;
                    let s = url_params(url).into_iter().find(|(k, _)| k == "s")?;
                    Some(s.1)
                })
                .collect();
            (shown.len() == 2).then_some(shown)
        },
    )
    .await;
    assert_eq!(shown, ["approved", "rejected"]);

    // No way back from a reversal; the report says why nothing changed.
    sys.postback_ok(&format!("{base}&status=approved")).await;
    // Its word decided (ignored) and folded back: the word last decided.
    let v = eventually("the word decided", Duration::from_secs(10), || async {
        let (_, v) = sys.api(&format!("/api/conversions/{id}")).await;
        (v["advertiser_status"] == "approved").then_some(v)
    })
    .await;
    assert_eq!(v["status"], "rejected", "{v}");
    assert_eq!(receiver.seen().len(), 2);
}

#[tokio::test]
async fn conversions_faster_than_the_minimum_click_to_conversion_time_are_too_fast() {
    let sys = System::start().await;
    offer(&sys, json!({"min_ctit_seconds": 3600})).await;
    let (k, _) = sys.click_ok("o1", "aff=a1").await;
    let id = sys.postback_ok(&format!("click_id={k}")).await;
    assert_eq!(rejected_for(&sys, &id).await, "too_fast");
}

#[tokio::test]
async fn unique_and_gross_clicks() {
    let sys = System::start().await;
    offer(&sys, json!({})).await;
    let mut ids = Vec::new();
    for ua in ["ua-1", "ua-1", "ua-2"] {
        let r = sys
            .http
            .get(sys.click_url("/c/o1?aff=a1"))
            .header("user-agent", ua)
            .send()
            .await
            .unwrap();
        let location = r.headers()["location"].to_str().unwrap().to_owned();
        ids.push(click_id_in(&location).unwrap());
    }
    let row = eventually("three clicks folded", Duration::from_secs(5), || async {
        let r = sys.report("offer").await;
        (r["rows"][0]["clicks"] == 3).then(|| r["rows"][0].clone())
    })
    .await;
    assert_eq!(row["unique_clicks"], 2);
    let mut unique = Vec::new();
    for id in &ids {
        unique.push(
            sys.api(&format!("/api/clicks/{id}")).await.1["click"]["unique"]
                .as_bool()
                .unwrap(),
        );
    }
    assert_eq!(unique, [true, false, true]);
}

/// Waits until click-service's click-caps fold has applied `seq` clicks.
async fn click_caps_folded(sys: &System, seq: u64) {
    let ready = sys.click_url("/readyz");
    eventually("the clicks counted", Duration::from_secs(10), || async {
        let fold = sys.projection(&ready, "CLICKS").await?;
        (fold["applied_seq"].as_u64()? >= seq).then_some(())
    })
    .await;
}

#[tokio::test]
async fn daily_caps_hold_at_the_boundary_and_reset_at_midnight_in_the_offers_time_zone() {
    let sys = System::start().await;
    let tz = "America/New_York";
    offer(&sys, json!({"timezone": tz, "attribution_window_hours": 72, "fallback_url": "https://fallback.example/",
        "caps": {"daily_conversions": 2, "daily_clicks": 4}})).await;
    let mut clicks = Vec::new();
    for _ in 0..4 {
        clicks.push(sys.click_ok("o1", "aff=a1").await.0);
    }
    // A click on a capped offer waits a second at most for its count: on a
    // loaded machine the fold may take longer, so the test waits for it.
    click_caps_folded(&sys, 4).await;
    let (_, location) = sys.click_ok("o1", "aff=a1").await;
    assert_eq!(
        location, "https://fallback.example/",
        "the fifth click of the day goes to the fallback"
    );

    let zone = jiff::tz::TimeZone::get(tz).unwrap();
    let today = jiff::Timestamp::now()
        .to_zoned_datetime(zone.clone())
        .date();
    let midnight = today
        .tomorrow()
        .unwrap()
        .in_tz(tz)
        .unwrap()
        .timestamp()
        .as_millisecond();
    let now = common::time::now_ms();
    let ids: Vec<String> = (0..4).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    partner(&sys, &ids[0], &clicks[0], "", "", now).await;
    partner(&sys, &ids[1], &clicks[1], "", "", now).await;
    partner(&sys, &ids[2], &clicks[2], "", "", midnight - 1000).await;
    partner(&sys, &ids[3], &clicks[3], "", "", midnight + 1000).await;
    assert_eq!(sys.decided(&ids[0]).await["state"], "attributed");
    assert_eq!(
        sys.decided(&ids[1]).await["state"],
        "attributed",
        "the Nth is attributed"
    );
    assert_eq!(
        rejected_for(&sys, &ids[2]).await,
        "cap_reached",
        "the N+1th, one second before midnight"
    );
    assert_eq!(
        sys.decided(&ids[3]).await["state"],
        "attributed",
        "a new day in New York, a new cap"
    );
}

/// click-service folds CLICKS for its click caps only once an offer has one
/// (`caps::open_on_first_cap`); the clicks of the day from before the cap
/// still count towards it.
#[tokio::test]
async fn a_click_cap_set_after_the_days_first_clicks_counts_them() {
    let sys = System::start().await;
    let fallback = "https://fallback.example/";
    offer(&sys, json!({"fallback_url": fallback})).await;
    for _ in 0..3 {
        sys.click_ok("o1", "aff=a1").await;
    }
    let ready = sys.click_url("/readyz");
    let caps_fold = || async { sys.projection(&ready, "CLICKS").await.unwrap() };
    let paused = caps_fold().await;
    assert_eq!(paused["paused"], true, "no caps, no clicks read: {paused}");
    assert_eq!(paused["applied_seq"], 0, "{paused}");
    assert_eq!(
        paused["caught_up"], true,
        "a paused fold is ready: {paused}"
    );

    offer(
        &sys,
        json!({"fallback_url": fallback, "caps": {"daily_clicks": 4}}),
    )
    .await;
    let (_, fourth) = sys.click_ok("o1", "aff=a1").await;
    assert_ne!(fourth, fallback, "the fourth click of the day lands");
    click_caps_folded(&sys, 4).await;
    let (_, fifth) = sys.click_ok("o1", "aff=a1").await;
    assert_eq!(fifth, fallback, "the three clicks before the cap count");
    let folding = caps_fold().await;
    assert_eq!(folding["paused"], false, "{folding}");
    assert!(folding["applied_seq"].as_u64().unwrap() >= 4, "{folding}");
}

/// The decider decides a round while the fold is still applying the previous
/// ones (postback-service's `conversions::in_flight`): a burst of reports, in
/// many rounds, must still meet a cap and one-per-goal dedup exactly, in log
/// order.
#[tokio::test]
async fn a_burst_meets_caps_and_dedup_exactly_while_rounds_are_in_flight() {
    let sys = System::start().await;
    offer(&sys, json!({"caps": {"daily_conversions": 25}})).await;
    sys.put_offer("o2", json!({"url": OFFER_URL, "dedup": "one_per_goal"}))
        .await;
    sys.wait_postback_sees_offer("o2", "").await;
    let mut capped_clicks = Vec::new();
    for _ in 0..60 {
        capped_clicks.push(sys.click_ok("o1", "aff=a1").await.0);
    }
    let mut deduped_clicks = Vec::new();
    for _ in 0..20 {
        deduped_clicks.push(sys.click_ok("o2", "aff=a2").await.0);
    }
    // Pipelined, so that reports keep arriving while rounds are in flight.
    let js = sys.jetstream().await;
    let now = common::time::now_ms();
    let (mut capped, mut deduped, mut acks) = (Vec::new(), Vec::new(), Vec::new());
    for (i, click) in capped_clicks.iter().enumerate() {
        let reports = [
            (click, String::new(), &mut capped),
            (&deduped_clicks[i / 3], format!("T{i}"), &mut deduped),
        ];
        for (click, txid, ids) in reports {
            let id = uuid::Uuid::now_v7().to_string();
            let e = ConversionReported {
                conversion_id: id.clone(),
                click_id: click.clone(),
                txid,
                occurred_at_ms: now,
                ..Default::default()
            };
            let ack = js
                .publish("conversions.v1.reported", e.encode_to_vec().into())
                .await
                .expect("sent");
            acks.push(ack);
            ids.push(id);
            if i % 4 == 3 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
    for ack in acks {
        ack.await.expect("acked");
    }
    let mut outcomes = Vec::new();
    for id in &capped {
        let v = sys.decided(id).await;
        outcomes.push(v["reason"].as_str().unwrap_or("attributed").to_owned());
    }
    assert_eq!(
        outcomes[..25],
        vec!["attributed"; 25],
        "the first 25 reported"
    );
    assert_eq!(outcomes[25..], vec!["cap_reached"; 35]);
    let mut outcomes = Vec::new();
    for id in &deduped {
        let v = sys.decided(id).await;
        outcomes.push(v["reason"].as_str().unwrap_or("attributed").to_owned());
    }
    let expected: Vec<&str> = (0..60)
        .map(|i| {
            if i % 3 == 0 {
                "attributed"
            } else {
                "duplicate"
            }
        })
        .collect();
    assert_eq!(
        outcomes, expected,
        "each click's first report, then duplicates"
    );
}

#[tokio::test]
async fn postback_token_and_ip_allowlist() {
    let sys =
        System::start_configured(500, |c| c.trusted_proxy_header = "X-Forwarded-For".into()).await;
    offer(
        &sys,
        json!({"security": {"token": "s3cret", "allowed_ips": ["198.51.100.0/24"]}}),
    )
    .await;
    let (k, _) = sys.click_ok("o1", "aff=a1").await;
    let send = |query: String, forwarded: Option<&'static str>| {
        let mut req = sys
            .http
            .get(sys.postback_url(&format!("/postback?{query}")));
        if let Some(ip) = forwarded {
            req = req.header("x-forwarded-for", ip);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, body) = send(format!("click_id={k}&token=s3cret"), None).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::FORBIDDEN, Some("ip_not_allowed")),
        "127.0.0.1 is not allowed"
    );
    let (status, body) = send(format!("click_id={k}&token=wrong"), Some("198.51.100.7")).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("bad_token"))
    );
    let (status, body) = send(format!("click_id={k}"), Some("10.0.0.1, 198.51.100.7")).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("bad_token"))
    );
    let (status, body) = send(format!("click_id={k}&token=s3cret"), Some("198.51.100.7")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v = sys.decided(body["conversion_id"].as_str().unwrap()).await;
    assert_eq!(v["state"], "attributed");
    let (_, refusals) = sys.api("/api/postback-refusals").await;
    assert_eq!(refusals["total"], 3, "{refusals}");
    assert_eq!(
        refusals["by_reason"],
        json!({"bad_token": 2, "ip_not_allowed": 1})
    );
    let (_, click) = sys.api(&format!("/api/clicks/{k}")).await;
    assert_eq!(
        click["conversions"].as_array().unwrap().len(),
        1,
        "refused postbacks are not conversions"
    );
}

#[tokio::test]
async fn hmac_signatures_good_bad_expired_replayed_and_refusals_rate_limited() {
    let sys = System::start().await;
    offer(
        &sys,
        json!({"security": {"hmac_secret": "k3y", "signature_window_seconds": 300}}),
    )
    .await;
    let (k, _) = sys.click_ok("o1", "aff=a1").await;
    let sign = |unsigned: String| crate::support::app::signed("k3y", &unsigned);
    let now = common::time::now_ms() / 1000;
    let good = sign(format!("click_id={k}&amount=9.5&ts={now}"));
    let (status, body) = sys.postback(&good).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        sys.decided(body["conversion_id"].as_str().unwrap()).await["revenue"],
        "9.50"
    );
    let (status, body) = sys.postback(&good).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("replayed_signature"))
    );
    let tampered = good.replace("amount=9.5", "amount=950");
    assert_eq!(sys.postback(&tampered).await.1["reason"], "bad_signature");
    let expired = sign(format!("click_id={k}&txid=old&ts={}", now - 3600));
    assert_eq!(
        sys.postback(&expired).await.1["reason"],
        "expired_signature"
    );
    assert_eq!(
        sys.postback(&format!("click_id={k}&txid=x")).await.1["reason"],
        "missing_signature"
    );

    // A caller refused too often is answered 429 without being logged one by one.
    let mut statuses = Vec::new();
    for i in 0..20 {
        statuses.push(sys.postback(&format!("click_id={k}&txid=flood{i}")).await.0);
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        sys.postback(&good.replace("ts=", "txid=z&ts=")).await.0,
        StatusCode::TOO_MANY_REQUESTS,
        "even a good one, for a minute"
    );
}

#[tokio::test]
async fn a_postback_right_behind_its_click_is_still_checked_at_the_door() {
    let sys = System::start().await;
    offer(&sys, json!({"security": {"token": "s3cret"}})).await;
    let js = sys.jetstream().await;
    for _ in 0..5 {
        let click_id = uuid::Uuid::now_v7().to_string();
        let click = ClickRecorded {
            event_id: click_id.clone(),
            click_id: click_id.clone(),
            offer_id: "o1".into(),
            affiliate_id: "a1".into(),
            occurred_at_ms: common::time::now_ms(),
            ..Default::default()
        };
        // Acked by JetStream, then the advertiser calls back at once: the
        // service may not have folded the click yet, and must wait for it.
        js.publish("clicks.v1.recorded", click.encode_to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
        let (status, body) = sys.postback(&format!("click_id={click_id}")).await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("bad_token")),
            "{body}"
        );
        let (status, _) = sys
            .postback(&format!("click_id={click_id}&token=s3cret"))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test]
async fn a_postback_that_skipped_the_door_checks_is_rejected_and_the_verified_one_still_counts() {
    let sys = System::start_with_grace(60_000).await;
    offer(&sys, json!({"security": {"token": "s3cret"}})).await;
    let click_id = uuid::Uuid::now_v7().to_string();
    // The click is not in the projection yet, so the door cannot know the offer.
    let id = sys.postback_ok(&format!("click_id={click_id}")).await;
    sys.publish_click(&click_id).await;
    assert_eq!(rejected_for(&sys, &id).await, "unauthenticated");
    // Anyone who saw the click id could have sent that one. The advertiser's
    // own postback of the same conversion, checked at the door now, is not
    // answered as its retry: the conversion is decided again.
    let (status, body) = sys
        .postback(&format!("click_id={click_id}&token=s3cret"))
        .await;
    assert_eq!(
        (status, body["conversion_id"].as_str()),
        (StatusCode::OK, Some(id.as_str()))
    );
    eventually(
        "decided again, attributed",
        Duration::from_secs(10),
        || async {
            let (_, v) = sys.api(&format!("/api/conversions/{id}")).await;
            (v["state"] == "attributed").then_some(())
        },
    )
    .await;
    // Naming the offer lets the door check it up front.
    let (status, body) = sys
        .postback(&format!("click_id={}&offer_id=o1", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("bad_token"))
    );
}

#[tokio::test]
async fn a_verified_postback_is_not_kept_out_by_an_unverified_one_still_waiting() {
    let sys = System::start_with_grace(60_000).await;
    offer(&sys, json!({"security": {"token": "s3cret"}})).await;
    let click_id = uuid::Uuid::now_v7().to_string();
    // Sent by anyone who saw the click id before the click reached the
    // projection: the door cannot check it, and it waits for its click.
    let id = sys.postback_ok(&format!("click_id={click_id}")).await;
    // The advertiser's own postback, naming the offer, passes the door while
    // the first still waits: it is not answered as that one's retry.
    let verified = sys
        .postback_ok(&format!("click_id={click_id}&offer_id=o1&token=s3cret"))
        .await;
    assert_eq!(verified, id, "the same conversion");
    sys.publish_click(&click_id).await;
    let v = sys.decided(&id).await;
    assert_eq!(
        (v["state"].as_str(), v["reason"].as_str()),
        (Some("attributed"), None),
        "{v}"
    );
}

/// Before its click is known, a postback's `offer_id` is only the
/// advertiser's word: an advertiser's own offer number may be another offer's
/// id here. Its token and signature are checked against the click's offer
/// once the click is folded, whether the offer it named asks for no security
/// or passed them.
#[tokio::test]
async fn a_postback_naming_another_offer_before_its_click_is_checked_against_the_clicks() {
    let sys = System::start_with_grace(60_000).await;
    let secured = json!({"token": "s3cret", "hmac_secret": "k3y"});
    sys.put_offer("o1", json!({"url": OFFER_URL, "security": secured}))
        .await;
    sys.put_offer("o2", json!({"url": OFFER_URL})).await;
    sys.put_offer("o3", json!({"url": OFFER_URL, "security": secured}))
        .await;
    sys.put_affiliate("a1", json!({})).await;
    sys.wait_postback_sees_offer("o3", "").await;
    let now = common::time::now_ms() / 1000;
    let mut ids = Vec::new();
    let mut clicks = Vec::new();
    for named in ["o2", "o3"] {
        let click_id = uuid::Uuid::now_v7().to_string();
        let query = format!("click_id={click_id}&token=s3cret&ts={now}&offer_id={named}");
        ids.push(
            sys.postback_ok(&crate::support::app::signed("k3y", &query))
                .await,
        );
        clicks.push(click_id);
    }
    for click_id in &clicks {
        sys.publish_click(click_id).await; // on o1
    }
    for id in &ids {
        let v = sys.decided(id).await;
        assert_eq!(
            (v["state"].as_str(), v["reason"].as_str()),
            (Some("attributed"), None),
            "{v}"
        );
    }
}

#[tokio::test]
async fn a_rebuild_reproduces_every_rule_decision_and_report_figure() {
    let receiver = Receiver::start(vec![], Reply::Status(200, "ok")).await;
    let mut sys = System::start().await;
    offer(
        &sys,
        json!({"min_ctit_seconds": 0, "dedup": "first_per_goal", "caps": {"daily_conversions": 3},
        "goals": [{"id": "install", "payout": "1"}, {"id": "purchase", "payout": "4"}]}),
    )
    .await;
    sys.put_affiliate("a1", json!({"postback_url": receiver.url("/pb?s={status}"), "postback_statuses": ["pending", "approved", "rejected"]})).await;
    sys.wait_postback_sees_offer("o1", "").await;
    let mut clicks = Vec::new();
    for aff in ["a1", "a1", "a2"] {
        clicks.push(sys.click_ok("o1", &format!("aff={aff}")).await.0);
    }
    let mut ids = vec![
        sys.postback_ok(&format!(
            "click_id={}&goal=install&status=pending",
            clicks[0]
        ))
        .await,
        sys.postback_ok(&format!("click_id={}&goal=purchase&txid=P1", clicks[0]))
            .await,
        sys.postback_ok(&format!("click_id={}&goal=install", clicks[1]))
            .await,
        sys.postback_ok(&format!("click_id={}&goal=install", clicks[2]))
            .await,
        sys.postback_ok(&format!("click_id={}&goal=bogus", clicks[2]))
            .await,
    ];
    for id in &ids {
        sys.decided(id).await;
    }
    ids.push(
        sys.postback_ok(&format!(
            "click_id={}&goal=install&status=approved",
            clicks[0]
        ))
        .await,
    );
    eventually("status moved", Duration::from_secs(10), || async {
        let (_, v) = sys.api(&format!("/api/conversions/{}", ids[0])).await;
        (v["status"] == "approved").then_some(())
    })
    .await;
    eventually("postbacks delivered", Duration::from_secs(10), || async {
        let (_, v) = sys.api("/api/postbacks?state=delivered").await;
        (v["total"] == 4).then_some(())
    })
    .await;
    let before = sys.snapshot(&clicks).await;
    assert_eq!(
        before["by_offer"]["rows"][0]["rejected_by_reason"],
        json!({"cap_reached": 1, "unknown_goal": 1}),
        "{before}"
    );
    let sent = receiver.seen().len();
    sys.wipe_postback().await;
    let after = eventually("rebuilt", Duration::from_secs(10), || async {
        let after = sys.snapshot(&clicks).await;
        (after == before).then_some(after)
    })
    .await;
    assert_eq!(after, before);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.seen().len(), sent, "nothing re-sent");
}
