//! Several postback-service instances on one log: one leads (decides and
//! sends affiliate postbacks), the others stand by and take over.

use std::{collections::HashMap, time::Duration};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::{app::url_params, eventually, Receiver, Reply, System, OFFER_URL};

/// `/readyz`'s lease part of the postback-service at `addr`.
async fn lease(sys: &System, addr: std::net::SocketAddr) -> Value {
    let url = format!("http://{addr}/readyz");
    let r = sys.http.get(&url).send().await.expect("GET /readyz");
    let v: Value = r.json().await.expect("readyz JSON");
    v["lease"].clone()
}

/// Waits until the lease entry `watch` follows is deleted: released by its
/// holder. An entry left to expire vanishes with no delete marker, so this
/// tells a release from an expiry whatever the timing.
async fn released(
    watch: &mut (impl futures::Stream<
        Item = Result<async_nats::jetstream::kv::Entry, async_nats::jetstream::kv::WatcherError>,
    > + Unpin),
) {
    use futures::StreamExt;
    let deleted = async {
        while let Some(entry) = watch.next().await {
            let entry = entry.expect("watching the lease");
            if entry.operation == async_nats::jetstream::kv::Operation::Delete {
                return;
            }
        }
        panic!("the lease watch ended");
    };
    tokio::time::timeout(Duration::from_secs(10), deleted)
        .await
        .expect("the lease released (deleted), not left to expire");
}

/// Waits until the instance at `addr` has `role`; returns its lease part.
async fn role(sys: &System, addr: std::net::SocketAddr, role: &str) -> Value {
    eventually(
        &format!("{addr} is {role}"),
        Duration::from_secs(10),
        || async {
            let l = lease(sys, addr).await;
            (l["role"] == role).then_some(l)
        },
    )
    .await
}

/// Waits until the instance at `addr` stands by for a leader it names (a
/// standby that could not read the entry names none); returns its lease part.
async fn standby_of(sys: &System, addr: std::net::SocketAddr) -> Value {
    eventually(
        &format!("{addr} stands by"),
        Duration::from_secs(10),
        || async {
            let l = lease(sys, addr).await;
            (l["role"] == "standby" && l["leader"] != "").then_some(l)
        },
    )
    .await
}

/// Offer o1 and affiliate a1 posting back to `receiver`.
async fn catalog(sys: &System, receiver: &Receiver) {
    sys.put_offer(
        "o1",
        json!({"url": OFFER_URL, "payout": "2.50", "revenue": "10"}),
    )
    .await;
    let url = receiver.url("/pb?conversion_id={conversion_id}&d={delivery_id}");
    sys.put_affiliate("a1", json!({"postback_url": url})).await;
    sys.wait_postback_sees_offer("o1", "2.50").await;
}

/// A postback through the instance at `addr`; returns the conversion id.
async fn postback_via(sys: &System, addr: std::net::SocketAddr, click_id: &str) -> String {
    let url = format!("http://{addr}/postback?click_id={click_id}");
    let r = sys.http.get(&url).send().await.expect("GET /postback");
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.expect("JSON");
    v["conversion_id"]
        .as_str()
        .expect("conversion id")
        .to_owned()
}

/// The affiliate postbacks `receiver` got, per conversion id.
fn sent_per_conversion(receiver: &Receiver) -> HashMap<String, usize> {
    let mut sent = HashMap::new();
    for seen in receiver.seen() {
        let params = url_params(&format!("http://x{}", seen.uri));
        if let Some((_, id)) = params.iter().find(|(k, _)| k == "conversion_id") {
            *sent.entry(id.clone()).or_default() += 1;
        }
    }
    sent
}

#[tokio::test]
async fn two_instances_send_each_affiliate_postback_once_and_the_standby_takes_over() {
    // A 2-minute lease: the standby asks every quarter ttl (30 s), so taking
    // over within the 10 s `role` waits is the release seen by its watch of
    // the lease, not its next ask nor the entry's expiry.
    let mut sys = System::start_configured(500, |c| c.leader_lease_ms = 120_000).await;
    let receiver = Receiver::start(vec![], Reply::Status(200, "ok")).await;
    catalog(&sys, &receiver).await;
    let first = sys.postback.as_ref().expect("running").addr;
    // Ready is caught up with the log; the lease may not be asked for yet.
    let leader = role(&sys, first, "leader").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let second = sys.start_another_postback(dir.path()).await;
    let standby = standby_of(&sys, second.addr).await;
    assert_eq!(standby["leader"], leader["holder"], "{standby} {leader}");
    assert_ne!(standby["holder"], leader["holder"]);

    // Postbacks through both instances: each decided and sent once.
    let mut conversions = Vec::new();
    for i in 0..12 {
        let (click_id, _) = sys.click_ok("o1", &format!("aff=a1&sub1={i}")).await;
        let via = if i % 2 == 0 { first } else { second.addr };
        conversions.push(postback_via(&sys, via, &click_id).await);
    }
    for id in &conversions {
        assert_eq!(sys.decided(id).await["state"], "attributed");
    }
    eventually("every postback sent", Duration::from_secs(10), || async {
        (sent_per_conversion(&receiver).len() == conversions.len()).then_some(())
    })
    .await;
    // Long enough for a second dispatcher, were there one, to send too.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = sent_per_conversion(&receiver);
    assert_eq!(sent.len(), conversions.len(), "{sent:?}");
    assert!(sent.values().all(|&n| n == 1), "each sent once: {sent:?}");

    // A retry by hand on the standby is refused with the leader's name.
    let r = sys
        .http
        .post(format!("http://{}/api/postbacks/any/retry", second.addr))
        .bearer_auth("admin")
        .send()
        .await
        .expect("POST retry");
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let body: Value = r.json().await.expect("JSON");
    let message = body["error"].as_str().unwrap_or_default();
    let holder = leader["holder"].as_str().expect("holder");
    assert!(message.contains(holder), "{body}");

    // The leader stops: it releases the lease (rather than leaving it to
    // expire) and the standby leads at once.
    let js = sys.jetstream().await;
    let kv = js.get_key_value("leases").await.expect("the leases bucket");
    let mut watch = kv.watch("postback-service").await.expect("watch");
    sys.stop_postback().await;
    released(&mut watch).await;
    let now_leader = role(&sys, second.addr, "leader").await;
    assert_eq!(now_leader["holder"], standby["holder"]);
    let (click_id, _) = sys.click_ok("o1", "aff=a1&sub1=after").await;
    let id = postback_via(&sys, second.addr, &click_id).await;
    eventually("the new leader sends", Duration::from_secs(10), || async {
        (sent_per_conversion(&receiver).get(&id) == Some(&1)).then_some(())
    })
    .await;
    assert!(sent_per_conversion(&receiver).values().all(|&n| n == 1));
    second.stop().await;
}

#[tokio::test]
async fn a_lease_left_by_a_crashed_holder_is_taken_once_it_expires() {
    crashed_holder_replaced(false).await;
}

/// A bucket made by hand without a max age, whose entries would never expire:
/// the service gives it its lease's.
#[tokio::test]
async fn a_lease_bucket_without_a_max_age_gets_one_and_a_crashed_holder_is_replaced() {
    crashed_holder_replaced(true).await;
}

async fn crashed_holder_replaced(no_max_age: bool) {
    // 6 s: long enough that the restart below is standing by before the
    // foreign entry expires.
    let mut sys = System::start_configured(500, |c| c.leader_lease_ms = 6_000).await;
    sys.demo_catalog().await;
    role(&sys, sys.postback.as_ref().expect("running").addr, "leader").await;
    sys.stop_postback().await;

    // Another holder that crashed: its entry stays until the bucket's max age
    // (this test's 6 s) ends it.
    let js = sys.jetstream().await;
    if no_max_age {
        let mut stream = js.get_stream("KV_leases").await.expect("the leases stream");
        let mut config = stream.info().await.expect("stream info").config.clone();
        config.max_age = Duration::ZERO;
        js.update_stream(config).await.expect("max age removed");
    }
    let kv = js.get_key_value("leases").await.expect("the leases bucket");
    kv.create("postback-service", "crashed-instance".into())
        .await
        .expect("a foreign lease");
    let written = std::time::Instant::now();
    sys.start_postback().await;
    let addr = sys.postback.as_ref().expect("running").addr;
    let standby = standby_of(&sys, addr).await;
    assert_eq!(standby["leader"], "crashed-instance", "{standby}");
    let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
    let id = sys.postback_ok(&format!("click_id={click_id}")).await;
    role(&sys, addr, "leader").await;
    assert!(
        written.elapsed() >= Duration::from_millis(4500),
        "led only once the entry expired: {:?}",
        written.elapsed()
    );
    assert_eq!(sys.decided(&id).await["state"], "attributed");
}

#[tokio::test]
async fn an_entry_under_its_own_name_is_waited_out_and_an_overwritten_leader_steps_down() {
    // 8 s: renewed every 2 s.
    let mut sys = System::start_configured(500, |c| c.leader_lease_ms = 8_000).await;
    sys.demo_catalog().await;
    let addr = sys.postback.as_ref().expect("running").addr;
    let mine = role(&sys, addr, "leader").await["holder"]
        .as_str()
        .expect("holder")
        .to_owned();
    sys.stop_postback().await;

    // An entry under this instance's own name, renewed as a live holder
    // renews it (every second, from before the start on): a twin (a copy of
    // this data dir, its instance-id with it), or this instance's crashed
    // process. It is not taken from it.
    let js = sys.jetstream().await;
    let kv = js.get_key_value("leases").await.expect("the leases bucket");
    let revision = kv
        .create("postback-service", mine.clone().into())
        .await
        .expect("our own name's lease");
    let (stop_twin, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let twin = tokio::spawn({
        let (kv, mine) = (kv.clone(), mine.clone());
        async move {
            let mut revision = revision;
            loop {
                tokio::select! {
                    _ = &mut stopped => return std::time::Instant::now(),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                revision = kv
                    .update("postback-service", mine.clone().into(), revision)
                    .await
                    .expect("the twin renews: nobody wrote over it");
            }
        }
    });
    sys.start_postback().await;
    let addr = sys.postback.as_ref().expect("running").addr;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(lease(&sys, addr).await["role"], "standby", "the twin leads");

    // The twin gone (or crashed): its entry is waited out, as anyone's is; a
    // twin's attempts in flight may outlive its tenure by a postback timeout.
    stop_twin.send(()).expect("the twin runs");
    let left = twin.await.expect("the twin renewed throughout");
    eventually(
        "leading once it expired",
        Duration::from_secs(20),
        || async { (lease(&sys, addr).await["role"] == "leader").then_some(()) },
    )
    .await;
    assert!(
        left.elapsed() >= Duration::from_secs(6),
        "led well before the entry expired (8 s after its last renewal): {:?}",
        left.elapsed()
    );

    // Another process writes the entry (a leader it could not see, say): the
    // next renewal fails and this one steps down; it leads again once the
    // entry is gone, and decides what came meanwhile.
    kv.put("postback-service", "intruder".into())
        .await
        .expect("written over");
    eventually(
        "standing by for the intruder",
        Duration::from_secs(10),
        || async {
            let l = lease(&sys, addr).await;
            (l["role"] == "standby" && l["leader"] == "intruder").then_some(())
        },
    )
    .await;
    let (click_id, _) = sys.click_ok("o1", "aff=a1&sub1=meanwhile").await;
    let id = sys.postback_ok(&format!("click_id={click_id}")).await;
    // Folded (in the projection), then given time a leader would decide in.
    eventually("the report folded", Duration::from_secs(10), || async {
        let (status, _) = sys.api(&format!("/api/conversions/{id}")).await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, pending) = sys.api(&format!("/api/conversions/{id}")).await;
    assert_eq!(pending["state"], "pending", "nobody decides: {pending}");
    kv.delete("postback-service").await.expect("entry gone");
    role(&sys, addr, "leader").await;
    assert_eq!(sys.decided(&id).await["state"], "attributed");
}

#[tokio::test]
async fn a_lease_shorter_than_two_postback_timeouts_stops_the_start_by_name() {
    let sys = System::start().await;
    let mut config = sys.postback_config();
    (config.leader_lease_ms, config.postback_timeout_ms) = (3_000, 2_000);
    let Err(error) = postback_service::Application::build(config).await else {
        panic!("started with a lease shorter than two postback timeouts");
    };
    let message = common::fold::error_chain(&error);
    assert!(
        message.contains("LEADER_LEASE_MS (3000)")
            && message.contains("POSTBACK_TIMEOUT_MS (2000)"),
        "{message}"
    );
}

/// Starts another instance configured with a lease of `lease_ms`, waits
/// until it has asked for the lease (it stands by), and stops it.
async fn standby_with_lease(sys: &System, lease_ms: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = sys.postback_config();
    (config.data_dir, config.leader_lease_ms) = (dir.path().to_path_buf(), lease_ms);
    let other = sys.start_another_postback_with(config).await;
    standby_of(sys, other.addr).await;
    other.stop().await;
}

#[tokio::test]
async fn a_longer_configured_lease_raises_the_bucket_and_a_shorter_one_leaves_it() {
    let sys = System::start().await;
    // The bucket is made when the lease is first asked for.
    role(&sys, sys.postback.as_ref().expect("running").addr, "leader").await;
    let js = sys.jetstream().await;
    let max_age = || async {
        let mut stream = js.get_stream("KV_leases").await.expect("the bucket");
        stream.info().await.expect("its info").config.max_age
    };
    assert_eq!(
        max_age().await,
        Duration::from_secs(2),
        "as first configured"
    );

    // An instance configured with a longer lease (after its postback timeout
    // was raised, say) raises the bucket's max age when it asks for the lease.
    standby_with_lease(&sys, 6_000).await;
    assert_eq!(max_age().await, Duration::from_secs(6));

    // A shorter one leaves it: a lease shortened under its holder could end
    // before that holder stops.
    standby_with_lease(&sys, 3_000).await;
    assert_eq!(max_age().await, Duration::from_secs(6));
    let leader = sys.postback.as_ref().expect("running").addr;
    assert_eq!(
        lease(&sys, leader).await["role"],
        "leader",
        "it leads throughout"
    );
}

#[tokio::test]
async fn a_leader_whose_led_work_dies_gives_the_lease_up_and_leads_again() {
    use common::lease::{run_led, status_channel, LeaseConfig, Role};
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };
    let nats = crate::support::NatsServer::start();
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let config = LeaseConfig {
        key: "led-work".into(),
        holder: "only-instance".into(),
        ttl: Duration::from_millis(3_000),
    };
    let (tx, rx) = status_channel(&config);
    let runs = Arc::new(AtomicUsize::new(0));
    let token = tokio_util::sync::CancellationToken::new();
    let counted = runs.clone();
    let led = move |child: tokio_util::sync::CancellationToken, _| {
        let run = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            assert!(run > 0, "the first term's work breaks");
            child.cancelled().await;
        }
    };
    let kv = common::lease::create_bucket(&js, config.ttl).await.unwrap();
    let mut watch = kv.watch("led-work").await.unwrap();
    let task = tokio::spawn(run_led(js.clone(), config, tx, token.clone(), led));

    let role = |want: Role| {
        let rx = rx.clone();
        async move { (rx.borrow().role == want).then_some(()) }
    };
    eventually("the first term", Duration::from_secs(5), || async {
        (runs.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    eventually("standing by", Duration::from_secs(5), || {
        role(Role::Standby)
    })
    .await;
    // Released, not left to expire.
    released(&mut watch).await;
    eventually("a second term", Duration::from_secs(10), || async {
        (runs.load(Ordering::SeqCst) == 2 && rx.borrow().role == Role::Leader).then_some(())
    })
    .await;
    token.cancel();
    task.await.unwrap();
}

/// A new leader waits for a fold still working through a backlog however
/// long it takes (here past its patience, which would once have ended the
/// wait with the fold halfway), and gives up only on a fold that applies
/// nothing for that long.
#[tokio::test]
async fn a_new_leader_waits_for_a_fold_still_catching_up_but_not_for_a_stuck_one() {
    use common::fold::caught_up_with;
    let nats = crate::support::NatsServer::start();
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    common::nats::ensure_streams(&js).await.unwrap();
    const EVENTS: u64 = 20;
    for _ in 0..EVENTS {
        js.publish(proto::subject::POSTBACK_DELIVERED, "".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let patience = Duration::from_millis(600);

    // Catching up: one event applied every 60 ms, 1.2 s in all.
    let (tx, rx) = common::fold::status_channel("POSTBACKS");
    let feeder = tokio::spawn(async move {
        for seq in 1..=EVENTS {
            tokio::time::sleep(Duration::from_millis(60)).await;
            tx.send_modify(|s| s.applied_seq = seq);
        }
        tx
    });
    caught_up_with(&js, "POSTBACKS", rx.clone(), patience, "test").await;
    assert_eq!(
        rx.borrow().applied_seq,
        EVENTS,
        "waited until the fold reached the log's end"
    );
    let _tx = feeder.await.unwrap();

    // Stuck at 5: given up once it applied nothing for the patience.
    let (stuck, rx) = common::fold::status_channel("POSTBACKS");
    stuck.send_modify(|s| s.applied_seq = 5);
    tokio::time::timeout(
        Duration::from_secs(10),
        caught_up_with(&js, "POSTBACKS", rx, patience, "test"),
    )
    .await
    .expect("a stuck fold is not waited for forever");
}

/// A delivery's schedule is its leader's own: a standby has none, and a
/// former leader's is as it was when its term ended. Both show a delivery as
/// the log holds it; one still pending is the leader's to show, and their
/// 404 says so.
#[tokio::test]
async fn a_former_leader_does_not_show_its_old_schedules_as_pending() {
    let receiver = Receiver::start(vec![], Reply::Status(500, "down")).await;
    // After its first failed attempt the delivery waits a minute: pending.
    let mut sys = System::start_configured(500, |c| c.postback_first_retry_ms = 60_000).await;
    catalog(&sys, &receiver).await;
    let first = sys.postback.as_ref().expect("running").addr;
    role(&sys, first, "leader").await;
    let (click_id, _) = sys.click_ok("o1", "aff=a1").await;
    let conversion = postback_via(&sys, first, &click_id).await;
    let delivery = postback_service::deliveries::delivery_id(&conversion, "a1");
    let http = sys.http.clone();
    let get = |addr: std::net::SocketAddr| {
        let (http, delivery) = (http.clone(), delivery.clone());
        async move {
            let url = format!("http://{addr}/api/postbacks/{delivery}");
            let r = http
                .get(&url)
                .bearer_auth("admin")
                .send()
                .await
                .expect("GET");
            (r.status(), r.json::<Value>().await.expect("JSON"))
        }
    };
    eventually(
        "the first attempt made",
        Duration::from_secs(10),
        || async {
            let (_, v) = get(first).await;
            (v["state"] == "pending" && v["attempts"] == 1).then_some(())
        },
    )
    .await;

    // A second instance takes over from the first, which comes back as a
    // standby with its old schedule on disk.
    let dir = tempfile::tempdir().expect("temp dir");
    let second = sys.start_another_postback(dir.path()).await;
    standby_of(&sys, second.addr).await;
    sys.stop_postback().await;
    let leader = role(&sys, second.addr, "leader").await;
    sys.start_postback().await;
    let first = sys.postback.as_ref().expect("running").addr;
    standby_of(&sys, first).await;
    let (status, body) = get(first).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "not its old schedule: {body}"
    );
    let holder = leader["holder"].as_str().expect("holder");
    assert!(
        body["error"].as_str().unwrap_or_default().contains(holder),
        "names the leader: {body}"
    );
    let (status, body) = get(second.addr).await;
    assert_eq!(
        (status, &body["state"]),
        (StatusCode::OK, &json!("pending")),
        "{body}"
    );
}
