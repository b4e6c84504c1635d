//! Restarts and rebuilds: the projection is disposable, the log is the record.

use crate::support::System;

async fn traffic(sys: &System) -> Vec<String> {
    sys.demo_catalog().await;
    sys.put_affiliate("a2", serde_json::json!({})).await;
    let mut clicks = Vec::new();
    for (i, aff) in ["a1", "a2", "a1"].iter().enumerate() {
        let (click_id, _) = sys.click_ok("o1", &format!("aff={aff}&sub1=s{i}")).await;
        clicks.push(click_id);
    }
    let mut ids = Vec::new();
    ids.push(
        sys.postback_ok(&format!("click_id={}&amount=1.25", clicks[0]))
            .await,
    );
    ids.push(sys.postback_ok(&format!("click_id={}", clicks[0])).await); // same: retry
    ids.push(
        sys.postback_ok(&format!("click_id={}&goal=upsell&txid=X", clicks[1]))
            .await,
    );
    ids.push(
        sys.postback_ok(&format!("click_id={}&txid=Y", clicks[0]))
            .await,
    );
    ids.push(
        sys.postback_ok(&format!("click_id={}&goal=upsell", clicks[1]))
            .await,
    ); // duplicate
    for id in &ids {
        sys.decided(id).await;
    }
    clicks
}

#[tokio::test]
async fn restarting_both_services_changes_nothing() {
    let mut sys = System::start().await;
    let clicks = traffic(&sys).await;
    let before = sys.snapshot(&clicks).await;
    assert_eq!(before["by_offer"]["rows"][0]["attributed"], 3, "{before}");
    assert_eq!(before["by_offer"]["rows"][0]["rejected"], 1, "{before}");
    sys.restart_services().await;
    let after = sys.snapshot(&clicks).await;
    assert_eq!(before, after);
    // And the restarted services keep working.
    let (click_id, _) = sys.click_ok("o1", "aff=a2").await;
    let id = sys.postback_ok(&format!("click_id={click_id}")).await;
    assert_eq!(sys.decided(&id).await["state"], "attributed");
}

#[tokio::test]
async fn a_wiped_data_dir_is_rebuilt_identically_from_the_log() {
    let mut sys = System::start().await;
    let clicks = traffic(&sys).await;
    let before = sys.snapshot(&clicks).await;
    let old_dir = sys.postback_data_dir();
    sys.wipe_postback().await;
    assert_ne!(old_dir, sys.postback_data_dir(), "a fresh, empty data dir");
    let after = sys.snapshot(&clicks).await;
    assert_eq!(
        before, after,
        "same conversions, same decisions, same reports"
    );

    // Nothing was decided twice: the log holds one decision per conversion.
    let js = sys.jetstream().await;
    let mut stream = js.get_stream("CONVERSIONS").await.unwrap();
    let info = stream.info().await.unwrap();
    let reported = 4; // five postbacks, one a retry of another
    assert_eq!(
        info.state.messages,
        reported * 2,
        "one report and one decision each"
    );
}
