//! A log with a retention limit: an operator may give `CLICKS` a max age above
//! the longest attribution window, and then every click it held can expire.

use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, System, OFFER_URL};

/// Sets `CLICKS`' max age, as an operator would on the running stream.
async fn expire_clicks_after(sys: &System, max_age: Duration) {
    let js = sys.jetstream().await;
    let mut stream = js.get_stream("CLICKS").await.expect("CLICKS exists");
    let mut config = stream.info().await.expect("stream info").config.clone();
    config.max_age = max_age;
    // JetStream keeps the dedup window within the max age.
    config.duplicate_window = config.duplicate_window.min(max_age);
    js.update_stream(config).await.expect("max age set");
}

/// Waits until `CLICKS` holds no message, though its sequence has moved on.
async fn clicks_expired(sys: &System) -> u64 {
    let js = sys.jetstream().await;
    eventually("every click expired", Duration::from_secs(15), || async {
        let mut stream = js.get_stream("CLICKS").await.ok()?;
        let state = stream.info().await.ok()?.state.clone();
        (state.messages == 0 && state.last_sequence > 0).then_some(state.last_sequence)
    })
    .await
}

#[tokio::test]
async fn a_projection_behind_a_log_whose_events_expired_is_ready_and_decides() {
    let mut sys = System::start().await;
    sys.demo_catalog().await;
    let (folded, _) = sys.click_ok("o1", "aff=a1").await;
    eventually("the click folded", Duration::from_secs(10), || async {
        let (status, _) = sys.api(&format!("/api/clicks/{folded}")).await;
        status.is_success().then_some(())
    })
    .await;
    // Set once it is folded: a slow fold would otherwise never see it.
    expire_clicks_after(&sys, Duration::from_secs(1)).await;

    // Down while clicks come and expire: its checkpoint is behind the log's
    // last sequence, and nothing after it is left to deliver.
    sys.stop_postback().await;
    let (missed, _) = sys.click_ok("o1", "aff=a1").await;
    let last = clicks_expired(&sys).await;
    assert!(
        last >= 2,
        "both clicks were in the log: last sequence {last}"
    );
    sys.start_postback().await; // waits for /readyz 200
    let id = sys.postback_ok(&format!("click_id={missed}")).await;
    let decision = sys.decided(&id).await;
    assert_eq!(decision["state"], "rejected", "{decision}");
    assert_eq!(decision["reason"], "unknown_click", "{decision}");

    // The operator's rebuild finishes too (it waits for every fold's tail).
    sys.stop_postback().await;
    let data_dir = sys.postback_data_dir();
    let rebuild = common::rebuild::rebuild(
        &sys.nats.url,
        "retention-rebuild",
        &data_dir,
        postback_service::startup::fold_jobs(),
        &["dispatch"],
    );
    tokio::time::timeout(Duration::from_secs(20), rebuild)
        .await
        .expect("the rebuild finishes")
        .expect("the rebuild succeeds");
    sys.start_postback().await;
    assert_eq!(sys.decided(&id).await["reason"], "unknown_click");

    // And from an empty data dir: nothing to fold, yet at the tail.
    sys.wipe_postback().await;
    let url = sys.postback_url("/readyz");
    let clicks_fold = sys.projection(&url, "CLICKS").await.expect("a CLICKS fold");
    assert_eq!(clicks_fold["caught_up"], true, "{clicks_fold}");
    assert_eq!(
        clicks_fold["applied_seq"], 0,
        "nothing applied: {clicks_fold}"
    );
    let id = sys.postback_ok(&format!("click_id={folded}&txid=2")).await;
    assert_eq!(sys.decided(&id).await["reason"], "unknown_click");
}

#[tokio::test]
async fn events_deleted_after_the_checkpoint_are_skipped_and_the_next_ones_folded() {
    let mut sys = System::start().await;
    sys.demo_catalog().await;
    sys.stop_postback().await;
    let mut clicks = Vec::new();
    for i in 0..3 {
        clicks.push(sys.click_ok("o1", &format!("aff=a1&sub1={i}")).await.0);
    }
    // The first two of them leave the log (as a message limit or an
    // operator's delete would take them) while postback-service is down.
    let js = sys.jetstream().await;
    let stream = js.get_stream("CLICKS").await.expect("CLICKS exists");
    for seq in 1..=2 {
        stream.delete_message(seq).await.expect("deleted");
    }
    sys.start_postback().await;
    let kept = sys.postback_ok(&format!("click_id={}", clicks[2])).await;
    assert_eq!(sys.decided(&kept).await["state"], "attributed");
    let gone = sys.postback_ok(&format!("click_id={}", clicks[0])).await;
    assert_eq!(sys.decided(&gone).await["reason"], "unknown_click");
}

/// A reversal months later, its click gone from the log and the projection:
/// the offer's security is checked against the conversion's offer, so the
/// advertiser's tokened chargeback counts (it was answered 200 and then
/// ignored as unverified), and one without the token is refused at the door.
#[tokio::test]
async fn a_secured_reversal_after_its_click_expired_is_verified_by_its_conversion() {
    let mut sys = System::start().await;
    sys.demo_catalog().await;
    sys.put_offer(
        "o1",
        json!({"url": OFFER_URL, "payout": "2.50", "security": {"token": "s3cret"}}),
    )
    .await;
    sys.wait_postback_sees_offer("o1", "2.50").await;
    let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
    let base = format!("click_id={click_id}&txid=T1");
    let id = sys.postback_ok(&format!("{base}&token=s3cret")).await;
    assert_eq!(sys.decided(&id).await["state"], "attributed");
    expire_clicks_after(&sys, Duration::from_secs(1)).await;
    clicks_expired(&sys).await;
    // A new instance: it never saw the click.
    sys.wipe_postback().await;
    assert_eq!(sys.decided(&id).await["status"], "approved");

    let (status, body) = sys.postback(&format!("{base}&status=chargeback")).await;
    assert_eq!(
        (status.as_u16(), body["reason"].as_str()),
        (401, Some("bad_token")),
        "{body}"
    );
    sys.postback_ok(&format!("{base}&status=chargeback&token=s3cret"))
        .await;
    eventually("reversed", Duration::from_secs(10), || async {
        let (_, v) = sys.api(&format!("/api/conversions/{id}")).await;
        (v["status"] == "rejected").then_some(())
    })
    .await;
}
