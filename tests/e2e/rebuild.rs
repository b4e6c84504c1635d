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

    // Nothing was decided twice: the log holds one decision per conversion,
    // alone or in a batch.
    let js = sys.jetstream().await;
    let (mut reports, mut decided) = (0, std::collections::HashMap::new());
    for (subject, payload, _) in crate::support::nats::read_stream(&js, "CONVERSIONS").await {
        reports += usize::from(subject == "conversions.v1.reported");
        for d in postback_service::conversions::Decision::all_in(&subject, &payload) {
            *decided.entry(d.conversion_id().to_owned()).or_insert(0) += 1;
        }
    }
    assert_eq!(reports, 4, "five postbacks, one a retry of another");
    assert_eq!(decided.len(), 4, "each decided");
    assert!(decided.values().all(|n| *n == 1), "once: {decided:?}");
}

#[tokio::test]
async fn projections_of_an_older_format_are_folded_again_from_the_log() {
    let mut sys = System::start().await;
    let clicks = traffic(&sys).await;
    let before = sys.snapshot(&clicks).await;
    sys.stop_postback().await;
    // The Trees whose rows changed shape since format 1, and their formats now.
    let trees = [("clicks", 5), ("conversions", 12), ("postbacks", 3)];
    let open = |sys: &System| common::store::open_db(&sys.postback_data_dir()).unwrap();
    {
        // What an older version leaves: no format row, and a row of a shape
        // this version no longer writes.
        let db = open(&sys);
        for (name, _) in trees {
            let tree = db.open_tree(name).unwrap();
            assert!(tree.get(common::store::FORMAT_KEY).unwrap().is_some());
            tree.remove(common::store::FORMAT_KEY).unwrap();
            tree.insert(b"d/old-shape", b"x".as_slice()).unwrap();
        }
        db.flush().unwrap();
    }
    sys.start_postback().await;
    let after = sys.snapshot(&clicks).await;
    assert_eq!(before, after, "folded again: the same state");
    sys.stop_postback().await;
    let db = open(&sys);
    for (name, format) in trees {
        let tree = db.open_tree(name).unwrap();
        assert!(
            tree.get(b"d/old-shape").unwrap().is_none(),
            "{name}: cleared first"
        );
        assert_eq!(
            common::store::format(&tree).unwrap(),
            format,
            "{name}: marked"
        );
    }
}

/// nats-server 2.9 gives a stream edited (a max age set on CLICKS, as the
/// README suggests) another creation time once it restarts. Same events,
/// same sequences: the projections are kept, not cleared and folded again
/// (every instance unready at once, clicks expired since lost from them).
#[tokio::test]
async fn a_stream_edited_then_nats_restarted_keeps_its_projections() {
    let mut sys = System::start().await;
    let clicks = traffic(&sys).await;
    let before = sys.snapshot(&clicks).await;
    sys.stop_postback().await;
    let created = |js: async_nats::jetstream::Context| async move {
        let mut stream = js.get_stream("CLICKS").await.expect("CLICKS");
        stream.info().await.expect("its info").created
    };
    let first = created(sys.jetstream().await).await;
    sys.nats.restart();
    let js = sys.jetstream().await;
    crate::support::app::update_stream(&js, "CLICKS", |c| {
        c.max_age = std::time::Duration::from_secs(30 * 86_400);
    })
    .await;
    sys.nats.restart();
    assert_ne!(
        created(sys.jetstream().await).await,
        first,
        "nats-server gives the edited stream another creation time (2.9.10 does)"
    );
    // A row no fold writes: it goes if the projection is cleared.
    let marker = b"~test/kept";
    {
        let db = common::store::open_db(&sys.postback_data_dir()).unwrap();
        db.open_tree("clicks")
            .unwrap()
            .insert(marker, b"x")
            .unwrap();
        db.flush().unwrap();
    }
    sys.start_postback().await;
    assert_eq!(sys.snapshot(&clicks).await, before);
    sys.stop_postback().await;
    let db = common::store::open_db(&sys.postback_data_dir()).unwrap();
    assert!(
        db.open_tree("clicks")
            .unwrap()
            .get(marker)
            .unwrap()
            .is_some(),
        "the clicks projection was kept"
    );
}
