//! Affiliate postbacks against real HTTP receivers on loopback.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::support::{app::url_params, eventually, Receiver, Reply, System, OFFER_URL};

const ALL_MACROS: &str =
    "/pb?click_id={click_id}&conversion_id={conversion_id}&offer_id={offer_id}\
&aff_id={aff_id}&sub1={sub1}&sub2={sub2}&sub3={sub3}&sub4={sub4}&sub5={sub5}&source={source}\
&aff_click_id={aff_click_id}&goal={goal}&payout={payout}&revenue={revenue}&currency={currency}\
&txid={txid}&status={status}&delivery_id={delivery_id}";

/// Offer o1, affiliate `aff` posting back to `url`; returns nothing.
async fn catalog(sys: &System, aff: &str, url: &str) {
    sys.put_offer(
        "o1",
        json!({"url": OFFER_URL, "payout": "2.50", "revenue": "10"}),
    )
    .await;
    sys.put_affiliate(aff, json!({"postback_url": url})).await;
    sys.wait_postback_sees_offer("o1", "2.50").await;
}

/// Offer o1 and affiliate a1 posting back to `url` on approvals and reversals.
async fn status_catalog(sys: &System, url: &str) {
    sys.put_offer(
        "o1",
        json!({"url": OFFER_URL, "payout": "2.50", "revenue": "10"}),
    )
    .await;
    sys.put_affiliate(
        "a1",
        json!({"postback_url": url, "postback_statuses": ["approved", "reversed"]}),
    )
    .await;
    sys.wait_postback_sees_offer("o1", "2.50").await;
}

/// A click by `aff` and an attributed conversion; returns (click id, conversion id, delivery id).
async fn convert(sys: &System, aff: &str, extra: &str) -> (String, String, String) {
    let (click_id, _) = sys
        .click_ok(
            "o1",
            &format!(
                "aff={aff}&sub1=s%201&sub2=b%26c&sub3=3&sub4=4&sub5=5&source=src&aff_click_id=AC-1"
            ),
        )
        .await;
    let conversion_id = sys
        .postback_ok(&format!("click_id={click_id}{extra}"))
        .await;
    assert_eq!(sys.decided(&conversion_id).await["state"], "attributed");
    let delivery_id = postback_service::deliveries::delivery_id(&conversion_id, aff);
    (click_id, conversion_id, delivery_id)
}

#[tokio::test]
async fn two_500s_then_200_is_one_delivery_after_three_attempts_with_every_macro() {
    let receiver = Receiver::start(
        vec![Reply::Status(500, "oops"), Reply::Status(503, "busy")],
        Reply::Status(200, "ok"),
    )
    .await;
    let sys = System::start().await;
    catalog(&sys, "a1", &receiver.url(ALL_MACROS)).await;
    let (click_id, conversion_id, delivery_id) =
        convert(&sys, "a1", "&goal=sale&amount=12.5&txid=T%201").await;

    let delivery = sys.delivery_in(&delivery_id, "delivered").await;
    assert_eq!(delivery["attempts"], 3, "{delivery}");
    assert_eq!(delivery["status_code"], 200);
    let seen = receiver.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter().all(|s| s.uri == seen[0].uri),
        "every attempt asks the same URL"
    );
    let params = url_params(&format!("http://x{}", seen[2].uri));
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("<missing>")
    };
    assert_eq!(get("click_id"), click_id);
    assert_eq!(get("conversion_id"), conversion_id);
    assert_eq!((get("offer_id"), get("aff_id")), ("o1", "a1"));
    assert_eq!(
        (
            get("sub1"),
            get("sub2"),
            get("sub3"),
            get("sub4"),
            get("sub5")
        ),
        ("s 1", "b&c", "3", "4", "5")
    );
    assert_eq!(
        (get("source"), get("aff_click_id"), get("goal")),
        ("src", "AC-1", "sale")
    );
    assert_eq!(
        (get("payout"), get("revenue"), get("currency")),
        ("2.50", "12.50", "USD")
    );
    assert_eq!(
        (get("txid"), get("status"), get("delivery_id")),
        ("T 1", "approved", delivery_id.as_str())
    );

    // The click view shows the delivery too; nothing is sent again.
    let (_, click) = sys.api(&format!("/api/clicks/{click_id}")).await;
    assert_eq!(click["deliveries"][0]["delivery_id"], delivery_id.as_str());
    assert_eq!(click["deliveries"][0]["state"], "delivered");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(receiver.seen().len(), 3, "never sent again after a success");
}

#[tokio::test]
async fn a_404_is_one_attempt_and_a_failure_with_the_body() {
    let receiver = Receiver::start(vec![], Reply::Status(404, "no such campaign")).await;
    let sys = System::start().await;
    catalog(&sys, "a1", &receiver.url("/pb?c={click_id}")).await;
    let (_, _, delivery_id) = convert(&sys, "a1", "").await;
    let delivery = sys.delivery_in(&delivery_id, "failed").await;
    assert_eq!(
        (
            delivery["attempts"].as_u64(),
            delivery["status_code"].as_u64()
        ),
        (Some(1), Some(404)),
        "{delivery}"
    );
    assert_eq!(delivery["response_body"], "no such campaign");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        receiver.seen().len(),
        1,
        "a permanent refusal is not retried"
    );

    let (status, list) = sys.api("/api/postbacks?state=failed&affiliate=a1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["total"], 1, "{list}");
    assert_eq!(list["postbacks"][0]["delivery_id"], delivery_id.as_str());
    let (_, none) = sys.api("/api/postbacks?state=delivered").await;
    assert_eq!(none["total"], 0);
    let (status, body) = sys.api("/api/postbacks?state=lost").await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("state"))
    );
}

#[tokio::test]
async fn a_hanging_receiver_times_out_and_is_retried() {
    let receiver = Receiver::start(
        vec![Reply::Hang(Duration::from_secs(10))],
        Reply::Status(200, "ok"),
    )
    .await;
    // A timeout the second attempt's answer is well within, on a loaded
    // machine too; a lease of at least two timeouts, as the service requires.
    let sys = System::start_configured(500, |c| {
        (c.postback_timeout_ms, c.leader_lease_ms) = (1500, 4000);
    })
    .await;
    catalog(&sys, "a1", &receiver.url("/pb?c={click_id}")).await;
    let (_, _, delivery_id) = convert(&sys, "a1", "").await;
    let delivery = sys.delivery_in(&delivery_id, "delivered").await;
    assert_eq!(delivery["attempts"], 2, "{delivery}");
    let seen = receiver.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[1].at - seen[0].at >= Duration::from_millis(1500),
        "the second came after the timeout"
    );
}

#[tokio::test]
async fn a_2xx_whose_body_stalls_is_delivered_once_not_retried() {
    // The affiliate records the postback and answers 200, then its body
    // stalls past the attempt's timeout: the status stands.
    let receiver = Receiver::start(vec![], Reply::StallBody(200, Duration::from_secs(10))).await;
    let sys = System::start_configured(500, |c| {
        (c.postback_timeout_ms, c.leader_lease_ms) = (1000, 4000);
    })
    .await;
    catalog(&sys, "a1", &receiver.url("/pb?c={click_id}")).await;
    let (_, _, delivery_id) = convert(&sys, "a1", "").await;
    let delivery = sys.delivery_in(&delivery_id, "delivered").await;
    assert_eq!(
        (
            delivery["attempts"].as_u64(),
            delivery["status_code"].as_u64()
        ),
        (Some(1), Some(200)),
        "{delivery}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.seen().len(), 1, "not sent again");
    // The note stays with the delivery once its outcome is in the log.
    let delivery = sys.delivery_in(&delivery_id, "delivered").await;
    assert!(
        delivery["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("body not read whole")),
        "{delivery}"
    );
}

#[tokio::test]
async fn a_reversal_is_told_after_the_approval_still_being_retried() {
    // The approval meets a 503 and is retried 1.5 s later; the reversal comes
    // in meanwhile.
    let receiver =
        Receiver::start(vec![Reply::Status(503, "busy")], Reply::Status(200, "ok")).await;
    let sys = System::start_configured(500, |c| c.postback_first_retry_ms = 1500).await;
    status_catalog(&sys, &receiver.url("/pb?s={status}")).await;
    let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
    let id = sys.postback_ok(&format!("click_id={click_id}")).await;
    assert_eq!(sys.decided(&id).await["state"], "attributed");
    eventually(
        "the approval's first attempt",
        Duration::from_secs(10),
        || async { (receiver.seen().len() == 1).then_some(()) },
    )
    .await;
    sys.postback_ok(&format!("click_id={click_id}&status=chargeback"))
        .await;
    eventually("both told", Duration::from_secs(15), || async {
        (receiver.seen().len() == 3).then_some(())
    })
    .await;
    let told: Vec<String> = receiver
        .seen()
        .iter()
        .map(|s| s.uri.rsplit('=').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        told,
        ["approved", "approved", "rejected"],
        "in the order they happened"
    );
}

#[tokio::test]
async fn a_reversal_carries_the_clicks_macros_after_the_click_has_left_the_log() {
    let receiver = Receiver::start(vec![], Reply::Status(200, "ok")).await;
    let mut sys = System::start().await;
    status_catalog(&sys, &receiver.url("/pb?s={status}&k={sub1}")).await;
    let (click_id, _) = sys.click_ok("o1", "aff=a1&sub1=K%201").await;
    let id = sys.postback_ok(&format!("click_id={click_id}")).await;
    assert_eq!(sys.decided(&id).await["state"], "attributed");
    eventually("the approval told", Duration::from_secs(10), || async {
        (receiver.seen().len() == 1).then_some(())
    })
    .await;

    // The click leaves the log (a max age an operator set), and a new
    // projection is folded from what is left: the click is nowhere.
    let js = sys.jetstream().await;
    js.get_stream("CLICKS")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    sys.wipe_postback().await;
    sys.postback_ok(&format!("click_id={click_id}&status=chargeback"))
        .await;
    eventually("the reversal told", Duration::from_secs(15), || async {
        (receiver.seen().len() == 2).then_some(())
    })
    .await;
    let seen = receiver.seen();
    assert!(
        seen[0].uri.ends_with("s=approved&k=K%201"),
        "{}",
        seen[0].uri
    );
    assert!(
        seen[1].uri.ends_with("s=rejected&k=K%201"),
        "{}",
        seen[1].uri
    );
}

#[tokio::test]
async fn a_stopped_dispatcher_resumes_its_schedule_and_delivers_once() {
    let receiver =
        Receiver::start(vec![Reply::Status(500, "down")], Reply::Status(200, "ok")).await;
    // The retry is due 5 s (±20 %) after the first attempt: after the restart.
    let mut sys = System::start_configured(500, |c| c.postback_first_retry_ms = 5000).await;
    catalog(&sys, "a1", &receiver.url("/pb?c={click_id}")).await;
    let (_, _, delivery_id) = convert(&sys, "a1", "").await;
    let pending =
        crate::support::eventually("first attempt made", Duration::from_secs(5), || async {
            let (_, v) = sys.api(&format!("/api/postbacks/{delivery_id}")).await;
            (v["attempts"] == 1).then_some(v)
        })
        .await;
    assert_eq!(pending["state"], "pending");
    assert_eq!(pending["status_code"], 500);
    assert!(pending["next_attempt_at"].is_string());
    sys.restart_postback().await;
    assert_eq!(
        receiver.seen().len(),
        1,
        "the restart does not send everything at once"
    );
    let delivery = sys.delivery_in(&delivery_id, "delivered").await;
    assert_eq!(
        delivery["attempts"], 2,
        "resumed at its stored attempt count: {delivery}"
    );
    let seen = receiver.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[1].at - seen[0].at >= Duration::from_secs(4),
        "the retry kept its time (5 s ± 20 %), not sent at the restart: {:?}",
        seen[1].at - seen[0].at
    );
}

#[tokio::test]
async fn a_rebuilt_projection_does_not_send_delivered_postbacks_again() {
    let receiver = Receiver::start(vec![], Reply::Status(200, "ok")).await;
    let mut sys = System::start().await;
    catalog(&sys, "a1", &receiver.url("/pb?c={click_id}")).await;
    let (_, _, delivery_id) = convert(&sys, "a1", "").await;
    sys.delivery_in(&delivery_id, "delivered").await;
    sys.wipe_postback().await;
    let rebuilt = sys.delivery_in(&delivery_id, "delivered").await;
    assert_eq!(rebuilt["attempts"], 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.seen().len(),
        1,
        "the rebuild knew it was delivered"
    );
}

#[tokio::test]
async fn a_slow_receiver_does_not_delay_a_fast_one() {
    let slow = Receiver::start(vec![], Reply::Hang(Duration::from_secs(60))).await;
    let fast = Receiver::start(vec![], Reply::Status(200, "ok")).await;
    // No slow attempt ends (times out) within the test; a lease of at least
    // two timeouts, as the service requires.
    let sys = System::start_configured(500, |c| {
        (c.postback_timeout_ms, c.leader_lease_ms) = (30_000, 60_000);
    })
    .await;
    catalog(&sys, "slow", &slow.url("/pb?c={click_id}")).await;
    sys.put_affiliate(
        "fast",
        json!({"postback_url": fast.url("/pb?c={click_id}")}),
    )
    .await;
    sys.wait_postback_sees_offer("o1", "2.50").await;
    let mut slow_ids = Vec::new();
    for _ in 0..6 {
        slow_ids.push(convert(&sys, "slow", "").await.2);
    }
    // The slow host's slots all taken, hanging.
    eventually(
        "the slow host's 4 slots taken",
        Duration::from_secs(10),
        || async { (slow.seen().len() == 4).then_some(()) },
    )
    .await;
    let (_, _, fast_id) = convert(&sys, "fast", "").await;
    let delivered = sys.delivery_in(&fast_id, "delivered").await;
    assert_eq!(delivered["attempts"], 1);
    for id in &slow_ids {
        let (_, v) = sys.api(&format!("/api/postbacks/{id}")).await;
        assert_eq!(
            v["state"], "pending",
            "the slow ones are still hanging: {v}"
        );
    }
    assert_eq!(
        slow.seen().len(),
        4,
        "the per-host limit in flight to one host, no more"
    );
}

/// `n` clicks by a1 on o1, reported on NATS while postback-service is down
/// (its first round finds them all); returns their conversion ids.
async fn reported_while_down(sys: &mut System, n: usize) -> Vec<String> {
    use prost::Message;
    let mut clicks = Vec::new();
    for _ in 0..n {
        clicks.push(sys.click_ok("o1", "aff=a1").await.0);
    }
    sys.stop_postback().await;
    let mut ids = Vec::new();
    for click_id in &clicks {
        let report = proto::conversions::v1::ConversionReported {
            click_id: click_id.clone(),
            ..Default::default()
        };
        sys.publish("conversions.v1.reported", report.encode_to_vec())
            .await;
        ids.push(postback_service::postback::conversion_id(click_id, "", ""));
    }
    ids
}

/// Per conversion, the subject of the one message carrying its decision;
/// each of `ids` must have exactly one.
async fn decided_once(
    sys: &System,
    ids: &[String],
) -> std::collections::HashMap<String, Vec<String>> {
    let carried_by = decisions_in_log(sys).await;
    for id in ids {
        assert_eq!(
            carried_by.get(id).map(Vec::len),
            Some(1),
            "{id} decided once"
        );
    }
    carried_by
}

/// Per conversion, the subjects of the messages carrying its decisions.
async fn decisions_in_log(sys: &System) -> std::collections::HashMap<String, Vec<String>> {
    use postback_service::conversions::Decision;
    let js = sys.jetstream().await;
    let mut carried_by: std::collections::HashMap<String, Vec<String>> = Default::default();
    for (subject, payload, _) in crate::support::nats::read_stream(&js, "CONVERSIONS").await {
        for decision in Decision::all_in(&subject, &payload) {
            let id = decision.conversion_id().to_owned();
            carried_by.entry(id).or_default().push(subject.clone());
        }
    }
    carried_by
}

/// A burst of reports is decided in one round, whose decisions go to the log
/// together (`conversions.v1.decided_batch`): each conversion is decided once,
/// each postback owed is sent once, and a projection rebuilt from that log
/// sends none again.
#[tokio::test]
async fn a_burst_decided_in_batches_is_delivered_once_each_even_after_a_rebuild() {
    const BURST: usize = 20;
    let receiver = Receiver::start(vec![], Reply::Status(200, "ok")).await;
    let mut sys = System::start().await;
    catalog(&sys, "a1", &receiver.url("/pb?c={click_id}")).await;
    let ids = reported_while_down(&mut sys, BURST).await;
    sys.start_postback().await;
    let deliveries: Vec<String> = ids
        .iter()
        .map(|id| postback_service::deliveries::delivery_id(id, "a1"))
        .collect();
    for (id, delivery) in ids.iter().zip(&deliveries) {
        assert_eq!(sys.decided(id).await["state"], "attributed", "{id}");
        sys.delivery_in(delivery, "delivered").await;
    }

    let carried_by = decided_once(&sys, &ids).await;
    let batched = ids
        .iter()
        .filter(|id| carried_by[*id][0] == "conversions.v1.decided_batch")
        .count();
    assert!(batched > 1, "decided together: {carried_by:?}");
    assert_eq!(receiver.seen().len(), BURST, "each delivered once");

    sys.wipe_postback().await;
    for delivery in &deliveries {
        sys.delivery_in(delivery, "delivered").await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.seen().len(), BURST, "the rebuild sent none again");
}

/// An operator bounded CONVERSIONS' messages below what a burst's batch
/// takes: JetStream refuses the batch for good, and the decider sends its
/// decisions again in smaller batches (not the same batch, forever).
#[tokio::test]
async fn a_batch_too_large_for_the_stream_is_decided_in_smaller_ones() {
    const BURST: usize = 100;
    const MOST: usize = 8 * 1024;
    let receiver = Receiver::start(vec![], Reply::Status(200, "ok")).await;
    let mut sys = System::start().await;
    catalog(&sys, "a1", &receiver.url("/pb?c={click_id}")).await;
    let ids = reported_while_down(&mut sys, BURST).await;
    let js = sys.jetstream().await;
    let mut stream = js.get_stream("CONVERSIONS").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_message_size = MOST as i32;
    js.update_stream(config).await.unwrap();
    sys.start_postback().await;
    for id in &ids {
        assert_eq!(sys.decided(id).await["state"], "attributed", "{id}");
    }
    decided_once(&sys, &ids).await;
    for (subject, payload, _) in crate::support::nats::read_stream(&js, "CONVERSIONS").await {
        assert!(payload.len() <= MOST, "{subject}: {} bytes", payload.len());
    }
}

#[tokio::test]
async fn private_targets_are_refused_unless_allowed() {
    let receiver = Receiver::start(vec![], Reply::Status(200, "ok")).await;
    let sys = System::start_configured(500, |c| c.postback_allow_private = false).await;
    catalog(&sys, "a1", &receiver.url("/pb?c={click_id}")).await;
    let by_name = format!(
        "http://localhost:{}/pb?c={{click_id}}",
        receiver.addr.port()
    );
    sys.put_affiliate("a2", json!({"postback_url": by_name}))
        .await;
    sys.wait_postback_sees_offer("o1", "2.50").await;
    let (_, _, literal) = convert(&sys, "a1", "").await;
    let (_, _, named) = convert(&sys, "a2", "").await;
    for id in [literal, named] {
        let failed = sys.delivery_in(&id, "failed").await;
        assert!(
            failed["error"].as_str().unwrap().contains("refused"),
            "{failed}"
        );
        assert_eq!(failed["attempts"], 1);
    }
    assert!(
        receiver.seen().is_empty(),
        "nothing reached the private address"
    );
}

#[tokio::test]
async fn a_failed_delivery_can_be_retried_by_hand_and_it_is_logged() {
    let receiver = Receiver::start(vec![], Reply::Status(410, "gone")).await;
    let sys = System::start().await;
    catalog(&sys, "a1", &receiver.url("/pb?c={click_id}")).await;
    let (_, _, delivery_id) = convert(&sys, "a1", "").await;
    sys.delivery_in(&delivery_id, "failed").await;

    let r = sys
        .http
        .post(sys.postback_url(&format!("/api/postbacks/{delivery_id}/retry")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "retry needs the admin token"
    );
    receiver.answer_from_now(Reply::Status(200, "ok"));
    let (status, body) = sys
        .api_post(&format!("/api/postbacks/{delivery_id}/retry"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["generation"], 2);
    let delivered = sys.delivery_in(&delivery_id, "delivered").await;
    assert_eq!(
        (
            delivered["generation"].as_u64(),
            delivered["attempts"].as_u64()
        ),
        (Some(2), Some(1)),
        "{delivered}"
    );
    let history: Vec<_> = delivered["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["state"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(history, ["failed", "retry_requested", "delivered"]);
    assert_eq!(receiver.seen().len(), 2);

    let (status, body) = sys
        .api_post(&format!("/api/postbacks/{delivery_id}/retry"))
        .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::CONFLICT, Some("delivery_id")),
        "a delivered one is final"
    );
    let (status, _) = sys
        .api_post(&format!("/api/postbacks/{}/retry", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let js = sys.jetstream().await;
    let mut stream = js.get_stream("POSTBACKS").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(
        info.state.messages, 3,
        "failed, retry_requested, delivered: every step is in the log"
    );
}

#[tokio::test]
async fn an_offer_postback_url_overrides_the_affiliates() {
    let affiliate_own = Receiver::start(vec![], Reply::Status(200, "ok")).await;
    let offer_level = Receiver::start(vec![], Reply::Status(200, "ok")).await;
    let sys = System::start().await;
    catalog(&sys, "a1", &affiliate_own.url("/own?c={click_id}")).await;
    sys.put_offer("o1", json!({"url": OFFER_URL, "payout": "3", "postback_url": offer_level.url("/offer?c={click_id}&p={payout}")})).await;
    sys.wait_postback_sees_offer("o1", "3.00").await;
    let (click_id, _, delivery_id) = convert(&sys, "a1", "").await;
    sys.delivery_in(&delivery_id, "delivered").await;
    assert!(affiliate_own.seen().is_empty());
    assert_eq!(
        offer_level.seen()[0].uri,
        format!("/offer?c={click_id}&p=3.00")
    );
}

/// `before` conversions delivered; then NATS loses CONVERSIONS while
/// postback-service is down (or, `running`, while it runs and stays
/// connected), and `after` reports reach the new stream before the service is
/// back. Each of those is decided and delivered, once.
async fn conversions_stream_created_again(before: usize, after: usize, running: bool) {
    use prost::Message;
    let receiver = Receiver::start(vec![], Reply::Status(200, "ok")).await;
    let mut sys = System::start().await;
    catalog(&sys, "a1", &receiver.url("/pb?c={click_id}")).await;
    for _ in 0..before {
        let (_, _, delivery_id) = convert(&sys, "a1", "").await;
        sys.delivery_in(&delivery_id, "delivered").await;
    }

    if !running {
        sys.stop_postback().await;
    }
    let js = sys.jetstream().await;
    js.delete_stream("CONVERSIONS").await.expect("deleted");
    common::nats::ensure_streams(&js)
        .await
        .expect("created again");
    let mut ids = Vec::new();
    for _ in 0..after {
        let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
        let report = proto::conversions::v1::ConversionReported {
            click_id: click_id.clone(),
            ..Default::default()
        };
        sys.publish("conversions.v1.reported", report.encode_to_vec())
            .await;
        ids.push(postback_service::postback::conversion_id(&click_id, "", ""));
    }
    if !running {
        sys.start_postback().await;
    }

    for id in &ids {
        assert_eq!(sys.decided(id).await["state"], "attributed", "{id}");
        let delivery = postback_service::deliveries::delivery_id(id, "a1");
        sys.delivery_in(&delivery, "delivered").await;
    }
    assert_eq!(receiver.seen().len(), before + after, "each once");
}

/// The new stream is longer than the projection's checkpoint (2): only the
/// stream's creation time tells its events from the old ones.
#[tokio::test]
async fn a_conversions_stream_created_again_and_longer_is_folded_from_its_start() {
    conversions_stream_created_again(1, 3, false).await;
}

/// The new stream is shorter: the fold starts again on its own, and the new
/// decisions (sequence 2) come before the dispatcher's old cursor (6).
#[tokio::test]
async fn a_conversions_stream_created_again_and_shorter_is_delivered_from_its_start() {
    conversions_stream_created_again(3, 1, false).await;
}

/// The same while postback-service runs and its connection stays up: its
/// fold's consumer would go on past the new stream's first events; the fold
/// sees the stream's new creation time within seconds and starts over.
#[tokio::test]
async fn a_conversions_stream_created_again_while_folding_is_folded_from_its_start() {
    conversions_stream_created_again(3, 1, true).await;
}

#[tokio::test]
async fn the_delivery_log_lists_filters_and_pages_newest_first() {
    // a1's receiver takes every postback, a2's refuses for good, a3's fails
    // and its retry is a minute away: delivered, failed and pending at once.
    let ok = Receiver::start(vec![], Reply::Status(200, "ok")).await;
    let gone = Receiver::start(vec![], Reply::Status(404, "gone")).await;
    let down = Receiver::start(vec![], Reply::Status(500, "down")).await;
    let sys = System::start_configured(500, |c| c.postback_first_retry_ms = 60_000).await;
    catalog(&sys, "a1", &ok.url("/pb?c={click_id}")).await;
    sys.put_affiliate("a2", json!({"postback_url": gone.url("/pb?c={click_id}")}))
        .await;
    sys.put_affiliate("a3", json!({"postback_url": down.url("/pb?c={click_id}")}))
        .await;
    let mut expected = Vec::new();
    for (aff, state) in [
        ("a1", "delivered"),
        ("a2", "failed"),
        ("a3", "pending"),
        ("a1", "delivered"),
        ("a3", "pending"),
        ("a2", "failed"),
        ("a1", "delivered"),
    ] {
        let (_, _, id) = convert(&sys, aff, "").await;
        let d = sys.delivery_in(&id, state).await;
        if state == "pending" {
            eventually("the first attempt", Duration::from_secs(10), || async {
                let (_, d) = sys.api(&format!("/api/postbacks/{id}")).await;
                (d["attempts"] == 1).then_some(())
            })
            .await;
        }
        expected.push((id, aff, d["state"].as_str().unwrap_or_default().to_owned()));
    }

    let (status, all) = sys.api("/api/postbacks?limit=500").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all["total"], 7, "{all}");
    assert_eq!(all["next_offset"], serde_json::Value::Null);
    let listed = all["postbacks"].as_array().unwrap();
    let times: Vec<&str> = listed
        .iter()
        .map(|d| d["updated_at"].as_str().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    let mut ids: Vec<&str> = listed
        .iter()
        .map(|d| d["delivery_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    let mut want: Vec<&str> = expected.iter().map(|(id, _, _)| id.as_str()).collect();
    want.sort_unstable();
    assert_eq!(ids, want, "each delivery once");

    // Filters count what they list.
    for (query, total) in [
        ("state=delivered", 3),
        ("state=failed", 2),
        ("state=pending", 2),
        ("affiliate=a3", 2),
        ("affiliate=a1&state=delivered", 3),
        ("affiliate=a1&state=failed", 0),
        ("affiliate=nobody", 0),
    ] {
        let (_, v) = sys.api(&format!("/api/postbacks?{query}")).await;
        assert_eq!(v["total"], total, "{query}: {v}");
        let shown = v["postbacks"].as_array().unwrap();
        assert_eq!(shown.len(), total, "{query}");
        for d in shown {
            let (_, aff, state) = expected
                .iter()
                .find(|(id, _, _)| d["delivery_id"] == id.as_str())
                .unwrap();
            assert!(
                query.contains(&format!("={state}")) || query.contains(&format!("={aff}")),
                "{query}: {d}"
            );
        }
    }

    // Pages of 3 walk the same list.
    let mut paged = Vec::new();
    let mut offset = Some(0);
    while let Some(at) = offset {
        let (_, v) = sys
            .api(&format!("/api/postbacks?limit=3&offset={at}"))
            .await;
        assert_eq!(v["total"], 7);
        paged.extend(v["postbacks"].as_array().unwrap().iter().cloned());
        offset = v["next_offset"].as_u64();
    }
    assert_eq!(&paged, listed);
}

/// A dispatcher over a database of its own and a nats-server of its own, led
/// by the test: its POSTBACKS rows are folded from `events` (subject,
/// payload), and the test holds its folds' statuses.
struct LoneDispatcher {
    dispatcher: postback_service::deliveries::Dispatcher,
    js: async_nats::jetstream::Context,
    postbacks_fold: tokio::sync::watch::Sender<common::FoldStatus>,
    conversions_fold: tokio::sync::watch::Sender<common::FoldStatus>,
    postbacks: common::store::FoldTree,
    _nats: crate::support::NatsServer,
    _dir: tempfile::TempDir,
}

impl LoneDispatcher {
    /// Folds one more POSTBACKS event, at `seq`, and says so.
    fn fold(&self, seq: u64, subject: &str, payload: &[u8]) {
        let entry = common::fold::LogEntry {
            subject,
            payload,
            seq,
            log_time_ms: 0,
        };
        let mut fold = postback_service::deliveries::PostbacksFold;
        common::fold::apply_new(&self.postbacks, &mut fold, &[entry]).unwrap();
        self.postbacks_fold.send_modify(|s| s.applied_seq = seq);
    }
}

async fn lone_dispatcher(events: &[(&str, Vec<u8>)]) -> LoneDispatcher {
    use common::fold::Fold;
    use postback_service::deliveries::{
        dispatcher::DispatchStores, Dispatcher, Outcomes, PostbacksFold, ScheduleStore,
    };
    let nats = crate::support::NatsServer::start();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    common::nats::ensure_streams(&js).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("db")).unwrap();
    let tree = |name: &str| db.open_tree(name).unwrap();
    let postbacks = common::store::FoldTree::open(&db, "postbacks").unwrap();
    for (seq, (subject, payload)) in (1..).zip(events) {
        let mut staged = common::store::Staged::new(&postbacks);
        let entry = common::fold::LogEntry {
            subject,
            payload,
            seq,
            log_time_ms: 0,
        };
        PostbacksFold.apply(&mut staged, &entry).unwrap();
        staged.commit(seq).unwrap();
    }
    let (postbacks_fold, postbacks_status) = common::fold::status_channel("POSTBACKS");
    let (conversions_fold, _) = common::fold::status_channel("CONVERSIONS");
    let config = postback_service::Config::for_tests(&nats.url, dir.path().into());
    let stores = DispatchStores {
        conversions: postback_service::conversions::Conversions::new(tree("conversions")),
        clicks: postback_service::clicks::Clicks::new(tree("clicks")),
        outcomes: Outcomes::new(postbacks.rows().clone()),
        schedules: ScheduleStore::new(
            tree("dispatch"),
            common::store::GroupFlush::new((*db).clone()),
        ),
        postbacks_status,
    };
    let dispatcher = Dispatcher::new(js.clone(), stores, config.dispatch()).unwrap();
    LoneDispatcher {
        dispatcher,
        js,
        postbacks_fold,
        conversions_fold,
        postbacks,
        _nats: nats,
        _dir: dir,
    }
}

/// A delivery to `url` of conversion `conv-<id>`'s approval.
fn target(id: &str) -> postback_service::deliveries::schedule::Target {
    postback_service::deliveries::schedule::Target {
        delivery_id: id.into(),
        conversion_id: format!("conv-{id}"),
        affiliate_id: "a1".into(),
        offer_id: "o1".into(),
        click_id: "k1".into(),
        url: "http://127.0.0.1:9/pb".into(),
        status: "approved".into(),
    }
}

/// A delivery answered 2xx whose outcome's ack came late (NATS slow) keeps
/// that outcome in its schedule and publishes it again later; at the end of a
/// term (a rolling deploy's stop, the lease lost) it is published before the
/// dispatcher stops, not kept for this instance's next term: the next leader,
/// another instance, folds POSTBACKS before it sends anything and would
/// otherwise send the delivery again.
#[tokio::test]
async fn an_outcome_kept_for_a_late_ack_is_published_when_the_term_ends() {
    use postback_service::deliveries::{schedule::Unpublished, Schedule};
    let lone = lone_dispatcher(&[]).await;
    let (dispatcher, js) = (&lone.dispatcher, &lone.js);
    let delivered = proto::postbacks::v1::PostbackDelivered {
        delivery_id: "d1".into(),
        ..Default::default()
    };
    let mut schedule = Schedule::fresh(target("d1"), 1);
    schedule.unpublished = Some(Unpublished {
        subject: proto::subject::POSTBACK_DELIVERED.into(),
        msg_id: "postback-delivered-d1-1".into(),
        payload: prost::Message::encode_to_vec(&delivered),
    });
    dispatcher.schedules().put(&schedule).await.unwrap();

    // A term that ends at once: no round runs, the lease is not held.
    let token = tokio_util::sync::CancellationToken::new();
    token.cancel();
    let (_, conversions_status) = common::fold::status_channel("CONVERSIONS");
    let tenure = common::lease::Tenure::default();
    postback_service::deliveries::run_dispatcher(
        dispatcher.clone(),
        conversions_status,
        tenure,
        token,
    )
    .await;

    let log = crate::support::nats::read_stream(js, "POSTBACKS").await;
    let subjects: Vec<_> = log.iter().map(|(subject, _, _)| subject.as_str()).collect();
    assert_eq!(
        subjects,
        [proto::subject::POSTBACK_DELIVERED],
        "published once"
    );
    assert!(
        dispatcher.schedules().get("d1").unwrap().is_none(),
        "and its schedule dropped"
    );
}

/// A hand retry whose request is dropped once its `retry_requested` is in the
/// log (the client gone, the request timeout) still gets its schedule: it is
/// sent, not left `pending` for good.
#[tokio::test]
async fn a_hand_retry_whose_request_is_dropped_midway_is_still_scheduled() {
    let failed = proto::postbacks::v1::PostbackFailed {
        delivery_id: "d1".into(),
        conversion_id: "conv".into(),
        affiliate_id: "a1".into(),
        url: "http://127.0.0.1:9/pb".into(),
        generation: 1,
        attempts: 3,
        ..Default::default()
    };
    let failed = prost::Message::encode_to_vec(&failed);
    // Its POSTBACKS fold does not move: the request waits for it.
    let lone = lone_dispatcher(&[(proto::subject::POSTBACK_FAILED, failed)]).await;
    let (dispatcher, js) = (&lone.dispatcher, &lone.js);
    let dropped =
        tokio::time::timeout(Duration::from_millis(500), dispatcher.request_retry("d1")).await;
    assert!(dropped.is_err(), "dropped while it waits: {dropped:?}");
    let log = crate::support::nats::read_stream(js, "POSTBACKS").await;
    let subjects: Vec<_> = log.iter().map(|(subject, _, _)| subject.as_str()).collect();
    assert_eq!(subjects, [proto::subject::POSTBACK_RETRY_REQUESTED]);
    let generation = eventually("the retry scheduled", Duration::from_secs(15), || async {
        Some(dispatcher.schedules().get("d1").unwrap()?.generation)
    })
    .await;
    assert_eq!(generation, 2);
}

/// A schedule an earlier term of this instance left for a delivery another
/// leader has finished since (leadership moved away and back) is dropped when
/// the term starts: it would hold a later status of its conversion back, and
/// answer a hand retry 409, until it came due.
#[tokio::test]
async fn a_term_drops_the_schedules_of_deliveries_the_log_says_are_finished() {
    use postback_service::deliveries::{schedule::Unpublished, Schedule};
    // d1 was delivered by another leader; d2 was not; d3 failed there (the
    // affiliate refused it as a duplicate: this instance had delivered it,
    // and holds that outcome, its ack lost).
    let delivered = |id: &str| proto::postbacks::v1::PostbackDelivered {
        delivery_id: id.into(),
        generation: 1,
        ..Default::default()
    };
    let failed = proto::postbacks::v1::PostbackFailed {
        delivery_id: "d3".into(),
        generation: 1,
        ..Default::default()
    };
    let encode = prost::Message::encode_to_vec;
    let lone = lone_dispatcher(&[
        (proto::subject::POSTBACK_DELIVERED, encode(&delivered("d1"))),
        (
            proto::subject::POSTBACK_FAILED,
            prost::Message::encode_to_vec(&failed),
        ),
    ])
    .await;
    for fold in [&lone.postbacks_fold, &lone.conversions_fold] {
        fold.send_modify(|s| (s.caught_up, s.at_tail) = (true, true));
    }
    let dispatcher = &lone.dispatcher;
    // Both on a retry an hour out, from this instance's earlier term.
    for id in ["d1", "d2"] {
        let mut schedule = Schedule::fresh(target(id), 1);
        schedule.next_at_ms = common::time::now_ms() + 3_600_000;
        dispatcher.schedules().put(&schedule).await.unwrap();
    }
    let mut held = Schedule::fresh(target("d3"), 1);
    held.unpublished = Some(Unpublished {
        subject: proto::subject::POSTBACK_DELIVERED.into(),
        msg_id: "postback-delivered-d3-1".into(),
        payload: encode(&delivered("d3")),
    });
    dispatcher.schedules().put(&held).await.unwrap();

    let token = tokio_util::sync::CancellationToken::new();
    let tenure =
        common::lease::Tenure::until(tokio::time::Instant::now() + Duration::from_secs(60));
    let term = tokio::spawn(postback_service::deliveries::run_dispatcher(
        dispatcher.clone(),
        lone.conversions_fold.subscribe(),
        tenure,
        token.clone(),
    ));
    eventually(
        "the finished one dropped",
        Duration::from_secs(10),
        || async {
            dispatcher
                .schedules()
                .get("d1")
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(
        dispatcher.schedules().get("d2").unwrap().is_some(),
        "the unfinished one kept"
    );
    eventually(
        "the success it held published",
        Duration::from_secs(10),
        || async {
            let log = crate::support::nats::read_stream(&lone.js, "POSTBACKS").await;
            log.iter()
                .any(|(subject, _, _)| subject == proto::subject::POSTBACK_DELIVERED)
                .then_some(())
        },
    )
    .await;
    token.cancel();
    term.await.unwrap();
}

/// A retry found without its schedule at a term's start may have been
/// delivered a moment before (its schedule goes once its outcome is acked,
/// before the POSTBACKS fold applies it): it is scheduled only once the fold
/// has reached the log's end and still shows it requested, so it is never
/// sent again after its success; one not delivered is sent then.
#[tokio::test]
async fn a_retry_found_without_its_schedule_is_not_sent_again_after_its_success() {
    use proto::postbacks::v1::{PostbackDelivered, PostbackFailed, PostbackRetryRequested};
    let receiver = Receiver::start(vec![], Reply::Status(200, "ok")).await;
    let failed = |id: &str| {
        prost::Message::encode_to_vec(&PostbackFailed {
            delivery_id: id.into(),
            conversion_id: format!("conv-{id}"),
            affiliate_id: "a1".into(),
            url: receiver.url(&format!("/pb?d={id}")),
            generation: 1,
            ..Default::default()
        })
    };
    let retry = |id: &str| {
        prost::Message::encode_to_vec(&PostbackRetryRequested {
            delivery_id: id.into(),
            generation: 2,
            ..Default::default()
        })
    };
    let events = [
        (proto::subject::POSTBACK_FAILED, failed("d1")),
        (proto::subject::POSTBACK_RETRY_REQUESTED, retry("d1")),
        (proto::subject::POSTBACK_FAILED, failed("d2")),
        (proto::subject::POSTBACK_RETRY_REQUESTED, retry("d2")),
    ];
    let lone = lone_dispatcher(&events).await;
    // The log holds those and d1's second generation delivered, which the
    // fold has not applied yet.
    let delivered = prost::Message::encode_to_vec(&PostbackDelivered {
        delivery_id: "d1".into(),
        generation: 2,
        status_code: 200,
        ..Default::default()
    });
    for (subject, payload) in events
        .iter()
        .cloned()
        .chain([(proto::subject::POSTBACK_DELIVERED, delivered.clone())])
    {
        let ack = lone.js.publish(subject, payload.into()).await.unwrap();
        ack.await.unwrap();
    }
    for fold in [&lone.postbacks_fold, &lone.conversions_fold] {
        fold.send_modify(|s| (s.caught_up, s.at_tail, s.applied_seq) = (true, true, 4));
    }
    let token = tokio_util::sync::CancellationToken::new();
    let tenure =
        common::lease::Tenure::until(tokio::time::Instant::now() + Duration::from_secs(60));
    let term = tokio::spawn(postback_service::deliveries::run_dispatcher(
        lone.dispatcher.clone(),
        lone.conversions_fold.subscribe(),
        tenure,
        token.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        receiver.seen().len(),
        0,
        "nothing sent before the fold is at the end"
    );
    // The log goes on (a burst): the look waits for the end it read after
    // listing its candidates, not for the end at each look.
    let later = prost::Message::encode_to_vec(&PostbackFailed {
        delivery_id: "d9".into(),
        generation: 1,
        ..Default::default()
    });
    let ack = lone
        .js
        .publish(proto::subject::POSTBACK_FAILED, later.into())
        .await
        .unwrap();
    ack.await.unwrap();
    lone.fold(5, proto::subject::POSTBACK_DELIVERED, &delivered);
    eventually("d2 sent", Duration::from_secs(10), || async {
        (!receiver.seen().is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent: Vec<String> = receiver.seen().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(sent, ["/pb?d=d2"], "d1 not sent again");
    token.cancel();
    term.await.unwrap();
}
