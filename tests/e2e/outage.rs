//! NATS down: clicks and postbacks are spooled to the durable outbox, answered,
//! and published when NATS is back; with a full outbox they get 503.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{app::update_stream, eventually, nats::clicks_in_log, System};

async fn ready(sys: &System, url: &str) -> (StatusCode, Value) {
    let r = sys.http.get(url).send().await.unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

/// Waits until both services are ready with their outboxes empty (NATS back).
async fn drained_and_ready(sys: &System) {
    for url in [sys.click_url("/readyz"), sys.postback_url("/readyz")] {
        eventually(
            "connected, outbox drained and ready",
            Duration::from_secs(30),
            || async {
                let (status, body) = ready(sys, &url).await;
                (status == StatusCode::OK && body["outbox"]["depth"] == 0).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test]
async fn with_nats_down_clicks_and_postbacks_are_spooled_then_published() {
    let mut sys = System::start().await;
    sys.demo_catalog().await;
    let (before, _) = sys.click_ok("o1", "aff=a1").await;
    // Published (a click answered after the ack deadline is still spooled).
    eventually("nothing spooled", Duration::from_secs(10), || async {
        let (_, body) = ready(&sys, &sys.click_url("/readyz")).await;
        (body["outbox"]["depth"] == 0).then_some(())
    })
    .await;
    sys.nats.kill();

    let (during, location) = sys.click_ok("o1", "aff=a1").await;
    assert!(
        location.contains(&during),
        "the user is redirected without waiting for NATS"
    );
    let (status, body) = sys.postback(&format!("click_id={before}&txid=T1")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["durable"], "outbox");
    let spooled_conversion = body["conversion_id"].as_str().unwrap().to_owned();
    // A click this service has not folded yet sends the door to NATS for the
    // stream's end; with NATS down that must not hold the postback past the
    // door's wait (the client gives up after 10 s).
    let unfolded = uuid::Uuid::now_v7();
    let (status, body) = sys.postback(&format!("click_id={unfolded}&txid=T2")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["durable"], "outbox");

    for (url, depth) in [
        (sys.click_url("/readyz"), 1),
        (sys.postback_url("/readyz"), 2),
    ] {
        let (status, body) = eventually(
            "not ready while NATS is down",
            Duration::from_secs(5),
            || async {
                let (status, body) = ready(&sys, &url).await;
                (status == StatusCode::SERVICE_UNAVAILABLE).then_some((status, body))
            },
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["outbox"]["depth"], depth, "{body}");
        assert!(body["outbox"]["oldest_age_ms"].as_i64().is_some(), "{body}");
        let r = sys
            .http
            .get(url.replace("readyz", "healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "alive all the same");
    }

    sys.nats.restart();
    drained_and_ready(&sys).await;
    assert_eq!(
        sys.decided(&spooled_conversion).await["state"],
        "attributed"
    );
    let id = sys.postback_ok(&format!("click_id={during}")).await;
    assert_eq!(
        sys.decided(&id).await["state"],
        "attributed",
        "the spooled click reached the log"
    );
    let js = sys.jetstream().await;
    let clicks = js
        .get_stream("CLICKS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(clicks, 2, "each click once");
}

#[tokio::test]
async fn services_started_while_nats_is_down_take_clicks_and_postbacks_into_the_outbox() {
    let mut sys = System::start().await;
    sys.demo_catalog().await;
    let (before, _) = sys.click_ok("o1", "aff=a1").await;
    eventually("the click folded", Duration::from_secs(10), || async {
        let (status, _) = sys.api(&format!("/api/clicks/{before}")).await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
    sys.click.take().unwrap().stop().await;
    sys.postback.take().unwrap().stop().await;
    sys.nats.kill();

    // Both start (a deploy, a reboot, an OOM kill during the outage) and
    // serve from their projections: not ready, but nothing is turned away.
    let config = sys.click_config();
    sys.serve_click(config).await;
    sys.serve_postback().await;
    let (during, location) = sys.click_ok("o1", "aff=a1").await;
    assert!(location.contains(&during), "{location}");
    let (status, body) = sys.postback(&format!("click_id={before}&txid=T1")).await;
    assert_eq!(
        (status, body["durable"].as_str()),
        (StatusCode::OK, Some("outbox")),
        "{body}"
    );
    let spooled = body["conversion_id"].as_str().unwrap().to_owned();
    let (status, _) = ready(&sys, &sys.click_url("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    sys.nats.restart();
    drained_and_ready(&sys).await;
    assert_eq!(sys.decided(&spooled).await["state"], "attributed");
    let id = sys.postback_ok(&format!("click_id={during}")).await;
    assert_eq!(
        sys.decided(&id).await["state"],
        "attributed",
        "the click taken during the outage reached the log"
    );
}

#[tokio::test]
async fn an_event_jetstream_refuses_for_good_is_set_aside_and_the_rest_drain() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    // An operator lowered the CLICKS stream's largest message below what a
    // click with long sub-ids takes.
    let js = sys.jetstream().await;
    update_stream(&js, "CLICKS", |c| c.max_message_size = 2048).await;

    let long = "x".repeat(1000);
    let (big, _) = sys
        .click_ok("o1", &format!("aff=a1&sub1={long}&sub2={long}&sub3={long}"))
        .await;
    // Clicks behind it are not held up by it.
    let (small, _) = sys.click_ok("o1", "aff=a1").await;
    let id = sys.postback_ok(&format!("click_id={small}")).await;
    assert_eq!(sys.decided(&id).await["state"], "attributed");
    let status = eventually("set aside", Duration::from_secs(10), || async {
        let (_, body) = ready(&sys, &sys.click_url("/readyz")).await;
        (body["outbox"]["refused"] == 1).then_some(body)
    })
    .await;
    assert_eq!(status["outbox"]["depth"], 0, "{status}");
    let (status, _) = sys.api(&format!("/api/clicks/{big}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not in the log");
}

#[tokio::test]
async fn a_batch_of_clicks_jetstream_refuses_for_good_reaches_the_log_as_its_clicks() {
    let sys = System::start().await;
    sys.demo_catalog().await;
    // Each click fits under the lowered limit alone; no two fit together.
    let js = sys.jetstream().await;
    update_stream(&js, "CLICKS", |c| c.max_message_size = 2048).await;
    let long = "x".repeat(500);
    let sys = &sys;
    let clicks = (0..100).map(|i| {
        let query = format!("aff=a1&sub1={long}&sub2={i}");
        async move { sys.click_ok("o1", &query).await.0 }
    });
    let ids = futures::future::join_all(clicks).await;

    let status = eventually("outbox drained", Duration::from_secs(20), || async {
        let (_, body) = ready(sys, &sys.click_url("/readyz")).await;
        (body["outbox"]["depth"] == 0).then_some(body)
    })
    .await;
    assert_eq!(
        status["outbox"]["refused"], 0,
        "nothing set aside: {status}"
    );
    let in_log = clicks_in_log(&js).await;
    assert!(
        in_log
            .iter()
            .all(|(subject, _)| subject == proto::subject::CLICK_RECORDED),
        "no batch fits"
    );
    for id in &ids {
        let n = in_log.iter().filter(|(_, c)| &c.click_id == id).count();
        assert_eq!(n, 1, "click {id} in the log once");
    }
    let id = sys.postback_ok(&format!("click_id={}", ids[99])).await;
    assert_eq!(sys.decided(&id).await["state"], "attributed");
}

/// The demo catalog, click-service's outbox limited to `limit` events, and
/// NATS gone.
async fn outage_with_outbox_of(limit: u64) -> System {
    let mut sys = System::start().await;
    sys.demo_catalog().await;
    sys.restart_click_with(|c| c.ingest.outbox_max_entries = limit)
        .await;
    sys.nats.kill();
    sys
}

#[tokio::test]
async fn a_full_outbox_refuses_with_503_and_nothing_is_recorded() {
    let mut sys = outage_with_outbox_of(1).await;
    let (kept, _) = sys.click_ok("o1", "aff=a1").await;
    let r = sys.click("o1", "aff=a1").await;
    assert_eq!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "no redirect without a durable click"
    );
    assert!(r.headers().get("location").is_none());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "not_recorded");
    let (_, status) = ready(&sys, &sys.click_url("/readyz")).await;
    assert_eq!(status["outbox"]["depth"], 1, "only the first: {status}");

    // NATS back: the outbox drains, and the log holds the first click alone.
    sys.nats.restart();
    eventually("outbox drained", Duration::from_secs(20), || async {
        let (_, body) = ready(&sys, &sys.click_url("/readyz")).await;
        (body["outbox"]["depth"] == 0).then_some(())
    })
    .await;
    let in_log = clicks_in_log(&sys.jetstream().await).await;
    let ids: Vec<_> = in_log.iter().map(|(_, c)| c.click_id.as_str()).collect();
    assert_eq!(ids, [kept.as_str()], "the refused click is not recorded");
}

#[tokio::test]
async fn clicks_arriving_together_fill_the_outbox_to_its_limit_not_short_of_it() {
    let sys = outage_with_outbox_of(3).await;
    // They go in batches; a batch the outbox has no room for whole is tried
    // click by click, so exactly as many are kept as it holds.
    let sys = &sys;
    let clicks = (0..12).map(|i| async move {
        let r = sys.click("o1", &format!("aff=a1&sub1={i}")).await;
        r.status()
    });
    let statuses = futures::future::join_all(clicks).await;
    let redirected = statuses.iter().filter(|s| **s == StatusCode::FOUND).count();
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert_eq!((redirected, refused), (3, 9), "{statuses:?}");
    let (_, body) = ready(sys, &sys.click_url("/readyz")).await;
    assert_eq!(body["outbox"]["depth"], 3, "{body}");
}

/// A batch published and not acked in time may still reach the log; with no
/// room in the outbox its clicks are refused, not sent again one by one under
/// their own ids, where JetStream would store each a second time.
#[tokio::test]
async fn a_batch_not_acked_in_time_is_never_sent_again_as_its_clicks() {
    let mut sys = System::start().await;
    sys.demo_catalog().await;
    sys.restart_click_with(|c| {
        // No room at all: every click is published, none spooled.
        c.ingest.outbox_max_entries = 0;
        // One message in flight: what arrives meanwhile is one batch.
        c.click_commits_in_flight = 1;
    })
    .await;
    sys.nats.pause();
    let sys = &sys;
    let clicks =
        (0..12).map(|i| async move { sys.click("o1", &format!("aff=a1&sub1={i}")).await.status() });
    let statuses = futures::future::join_all(clicks).await;
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "not acked, not spooled: {statuses:?}"
    );
    sys.nats.resume();
    let js = sys.jetstream().await;
    // What the paused server was sent reaches the log now: the lone first
    // click and the batch of the rest, each once.
    let logged = eventually(
        "the messages sent reach the log",
        Duration::from_secs(10),
        || async {
            let logged = clicks_in_log(&js).await;
            (logged.len() >= 12).then_some(logged)
        },
    )
    .await;
    let batched = logged
        .iter()
        .filter(|(s, _)| s == proto::subject::CLICKS_RECORDED_BATCH)
        .count();
    assert!(
        batched > 1,
        "the test needs a batch: {batched} clicks in one"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ids: Vec<_> = clicks_in_log(&js)
        .await
        .into_iter()
        .map(|(_, c)| c.click_id)
        .collect();
    let all = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), all, "a click in the log twice");
}

/// NATS back without its data (no volume, a new server): the services make
/// the streams again at once, without a restart of their own, and take clicks
/// and postbacks into the new log. The catalog went with the log, so the
/// operator puts it again.
#[tokio::test]
async fn nats_back_without_its_data_gets_its_streams_again() {
    let mut sys = System::start().await;
    sys.demo_catalog().await;
    sys.click_ok("o1", "aff=a1").await;
    sys.nats.restart_empty();
    let js = sys.jetstream().await;
    eventually(
        "the streams made again",
        Duration::from_secs(15),
        || async {
            for stream in ["CATALOG", "CLICKS", "CONVERSIONS", "POSTBACKS"] {
                js.get_stream(stream).await.ok()?;
            }
            Some(())
        },
    )
    .await;
    sys.demo_catalog().await;
    let sys = &sys;
    let click_id = eventually("a click recorded", Duration::from_secs(15), || async {
        let r = sys.click("o1", "aff=a1").await;
        (r.status() == StatusCode::FOUND).then(|| {
            let location = r.headers()["location"].to_str().unwrap();
            crate::support::app::click_id_in(location).unwrap()
        })
    })
    .await;
    let id = sys.postback_ok(&format!("click_id={click_id}")).await;
    assert_eq!(sys.decided(&id).await["state"], "attributed");
    drained_and_ready(sys).await;
}

#[tokio::test]
async fn a_drain_round_takes_every_acked_event_out_even_behind_one_that_fails() {
    use common::outbox::{Order, Outbox};
    let nats = crate::support::nats::NatsServer::start();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "T".into(),
        subjects: vec!["t.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path(), 10).unwrap();
    // The head of the line has no stream to take it (yet): it fails every
    // round, and is not refused for good.
    outbox
        .spool("nowhere.x", "m0", b"0", Order::PerKey("c0"))
        .await
        .unwrap();
    for i in 1..=3 {
        let (id, key) = (format!("m{i}"), format!("c{i}"));
        outbox
            .spool("t.x", &id, id.as_bytes(), Order::PerKey(&key))
            .await
            .unwrap();
    }
    let token = tokio_util::sync::CancellationToken::new();
    let drainer = tokio::spawn(outbox.clone().run_drainer(
        js.clone(),
        Duration::from_secs(2),
        token.clone(),
    ));
    eventually(
        "the three behind it out",
        Duration::from_secs(15),
        || async { (outbox.depth() == 1).then_some(()) },
    )
    .await;
    let status = outbox.status();
    assert_eq!((status.depth, status.refused), (1, 0), "the head waits");
    let stored = crate::support::nats::read_stream(&js, "T").await;
    let ids: Vec<Vec<u8>> = stored.into_iter().map(|(_, p, _)| p).collect();
    assert_eq!(ids, [b"m1".to_vec(), b"m2".to_vec(), b"m3".to_vec()]);
    token.cancel();
    drainer.await.unwrap();
}

/// The retry a 503 asks for is taken: the signature of a report that was not
/// recorded is not used up.
#[tokio::test]
async fn a_signed_postback_answered_503_is_taken_when_sent_again() {
    let sys = System::start_configured(500, |c| c.ingest.outbox_max_entries = 0).await;
    sys.put_offer(
        "o1",
        serde_json::json!({"url": crate::support::app::OFFER_URL,
            "security": {"hmac_secret": "k3y"}}),
    )
    .await;
    sys.put_affiliate("a1", serde_json::json!({})).await;
    sys.wait_postback_sees_offer("o1", "").await;
    let (k, _) = sys.click_ok("o1", "aff=a1").await;
    let (status, _) = sys.api(&format!("/api/clicks/{k}")).await;
    assert_eq!(status, StatusCode::OK, "the door knows the click's offer");
    let unsigned = format!("click_id={k}&ts={}", common::time::now_ms() / 1000);
    let signed = crate::support::app::signed("k3y", &unsigned);

    sys.nats.pause();
    let (status, body) = sys.postback(&signed).await;
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("not_recorded")),
        "{body}"
    );
    sys.nats.resume();
    let id = eventually("the retry taken", Duration::from_secs(15), || async {
        let (status, body) = sys.postback(&signed).await;
        assert_ne!(status, StatusCode::UNAUTHORIZED, "{body}");
        (status == StatusCode::OK).then(|| body["conversion_id"].as_str().unwrap().to_owned())
    })
    .await;
    assert_eq!(sys.decided(&id).await["state"], "attributed");
}

/// A postback carrying a token and a signature whose click the door does not
/// know yet (not in the log yet, or NATS unavailable) is taken with its
/// parameters kept, and checked once its click is folded: the right ones
/// count, wrong or missing ones are rejected `unauthenticated`.
#[tokio::test]
async fn a_postback_the_door_cannot_check_yet_is_checked_once_its_click_is_known() {
    let sys = System::start_with_grace(60_000).await;
    sys.put_offer(
        "o1",
        serde_json::json!({"url": crate::support::app::OFFER_URL,
            "security": {"token": "s3cret", "hmac_secret": "k3y"}}),
    )
    .await;
    // An offer whose only check is the caller's address.
    sys.put_offer(
        "o2",
        serde_json::json!({"url": crate::support::app::OFFER_URL,
            "security": {"allowed_ips": ["127.0.0.0/8"]}}),
    )
    .await;
    sys.put_affiliate("a1", serde_json::json!({})).await;
    sys.wait_postback_sees_offer("o2", "").await;
    let signed = |unsigned: String| crate::support::app::signed("k3y", &unsigned);
    let clicked_at = common::time::now_ms() - 1000;
    let now = common::time::now_ms() / 1000;
    let first = uuid::Uuid::now_v7().to_string();
    let second = uuid::Uuid::now_v7().to_string();
    let third = uuid::Uuid::now_v7().to_string();
    // The first click is in no log yet: its postback comes first.
    let early = signed(format!("click_id={first}&token=s3cret&ts={now}"));
    let early = sys.postback_ok(&early).await;
    // With NATS gone, the door cannot look the second click up at all.
    sys.nats.pause();
    let mut ids = Vec::new();
    for query in [
        signed(format!("click_id={second}&token=s3cret&ts={now}")),
        signed(format!("click_id={second}&txid=t2&token=wrong&ts={now}")),
        format!("click_id={second}&txid=t3&token=s3cret&ts={now}&sig=00"),
        format!("click_id={second}&txid=t4"),
        // The first one's reversal, in the same window.
        signed(format!(
            "click_id={second}&status=rejected&token=s3cret&ts={now}"
        )),
        // On the offer that checks the address only.
        format!("click_id={third}"),
    ] {
        let (status, body) = sys.postback(&query).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        ids.push(body["conversion_id"].as_str().unwrap().to_owned());
    }
    sys.nats.resume();
    // The clicks were made before their postbacks, and reach the log late.
    sys.publish_click_at(&first, clicked_at).await;
    sys.publish_click_at(&second, clicked_at).await;
    let on_o2 = proto::clicks::v1::ClickRecorded {
        event_id: third.clone(),
        click_id: third.clone(),
        offer_id: "o2".into(),
        affiliate_id: "a1".into(),
        occurred_at_ms: clicked_at,
        ..Default::default()
    };
    sys.publish(
        proto::subject::CLICK_RECORDED,
        prost::Message::encode_to_vec(&on_o2),
    )
    .await;
    let v = sys.decided(&early).await;
    assert_eq!(v["state"], "attributed", "{v}");
    assert_eq!(sys.decided(&ids[0]).await["state"], "attributed");
    for id in &ids[1..4] {
        let v = sys.decided(id).await;
        assert_eq!(
            (v["state"].as_str(), v["reason"].as_str()),
            (Some("rejected"), Some("unauthenticated")),
            "{v}"
        );
    }
    assert_eq!(ids[4], ids[0], "a status report of the same conversion");
    let v = sys.decided(&ids[5]).await;
    assert_eq!(v["state"], "attributed", "the address passes: {v}");
    eventually("the reversal applied", Duration::from_secs(10), || async {
        let (_, v) = sys.api(&format!("/api/conversions/{}", ids[0])).await;
        (v["status"] == "rejected").then_some(())
    })
    .await;
}

/// Services starting together on a new NATS each ensure the streams at once:
/// one's look finds no stream, another creates it, and the first one's create
/// must not fail the start (nats-server 2.9 may answer that race "subjects
/// overlap" rather than take the identical stream as created; seen once in CI
/// on a loaded machine, where it stopped click-service's start; this test did
/// not hit the race in 20 tries here, so it guards the outcome, not the race).
#[tokio::test]
async fn services_ensuring_the_streams_together_all_succeed() {
    for _ in 0..10 {
        let nats = crate::support::NatsServer::start();
        let mut together = Vec::new();
        for _ in 0..8 {
            let client = async_nats::connect(&nats.url).await.expect("connect");
            let js = async_nats::jetstream::new(client);
            together.push(tokio::spawn(async move {
                common::nats::ensure_streams(&js).await
            }));
        }
        for ensured in together {
            let ensured = ensured.await.unwrap();
            assert!(ensured.is_ok(), "{:?}", ensured.err());
        }
    }
}
