//! Fault tests: a steady load of clicks and postbacks against the real service
//! binaries while NATS or a service is killed, then an accounting of every
//! request that got a 2xx, in the manner of Jepsen's checker: none lost, none
//! duplicated, the projection equal to a fresh rebuild, no affiliate postback
//! sent again after its recorded success.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use postback_service::conversions::Decision;
use prost::Message;
use proto::{conversions::v1::ConversionReported, postbacks::v1::PostbackDelivered};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::{
    app::{click_id_in, projection, url_params},
    eventually,
    nats::{clicks_in_log, read_stream},
    process::Process,
    NatsServer, Receiver, Reply, OFFER_URL,
};

struct Cluster {
    nats: NatsServer,
    dir: tempfile::TempDir,
    click: Process,
    postback: Process,
    receiver: Receiver,
    http: reqwest::Client,
}

fn env(nats: &NatsServer, data_dir: &std::path::Path) -> Vec<(String, String)> {
    [
        ("NATS_URL", nats.url.clone()),
        ("DATA_DIR", data_dir.display().to_string()),
        ("ADMIN_TOKEN", "admin".to_owned()),
        ("ACK_DEADLINE_MS", "50".to_owned()),
        ("POSTBACK_ALLOW_PRIVATE", "true".to_owned()),
        ("POSTBACK_FIRST_RETRY_MS", "100".to_owned()),
        ("POSTBACK_TIMEOUT_MS", "1000".to_owned()),
        ("UNKNOWN_CLICK_GRACE_MS", "10000".to_owned()),
        // A SIGKILLed leader's entry is waited out: 4 s, not the default 20.
        ("LEADER_LEASE_MS", "4000".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// `env` with some variables set otherwise.
fn env_with(
    nats: &NatsServer,
    data_dir: &std::path::Path,
    set: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut env = env(nats, data_dir);
    for (key, value) in set {
        env.retain(|(k, _)| k != key);
        env.push(((*key).to_owned(), (*value).to_owned()));
    }
    env
}

impl Cluster {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A cluster whose services have these variables set otherwise.
    async fn start_with(set: &[(&str, &str)]) -> Self {
        postback_service::deliveries::attempt::install_tls_provider();
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let mut click = Process::start(
            "click-service",
            env_with(&nats, &dir.path().join("click"), set),
            dir.path(),
        );
        let mut postback = Process::start(
            "postback-service",
            env_with(&nats, &dir.path().join("postback"), set),
            dir.path(),
        );
        click.ready(&http).await;
        postback.ready(&http).await;
        let receiver = Receiver::start(vec![], Reply::Status(200, "ok")).await;
        let put = |path: &str, body: Value| {
            let req = http.put(click.url(path)).bearer_auth("admin").json(&body);
            async move { assert!(req.send().await.unwrap().status().is_success()) }
        };
        put("/api/offers/o1", json!({"url": OFFER_URL, "payout": "1"})).await;
        put(
            "/api/affiliates/a1",
            json!({"postback_url": receiver.url("/pb?d={delivery_id}")}),
        )
        .await;
        let cluster = Self {
            nats,
            dir,
            click,
            postback,
            receiver,
            http,
        };
        cluster.settle_catalog().await;
        cluster
    }

    async fn settle_catalog(&self) {
        eventually(
            "postback-service has the catalog",
            Duration::from_secs(10),
            || async {
                let url = self.postback.url("/readyz");
                let catalog = projection(&self.http, &url, "CATALOG").await?;
                (catalog["applied_seq"].as_u64()? >= 2).then_some(())
            },
        )
        .await;
    }

    /// A click on o1 with `query`, then a postback of it accepted.
    async fn click_and_postback(&self, query: &str) {
        let click = self.click.url(&format!("/c/o1?{query}"));
        let r = self.http.get(click).send().await.unwrap();
        let location = r.headers()["location"].to_str().unwrap().to_owned();
        let id = click_id_in(&location).unwrap();
        let postback = self.postback.url(&format!("/postback?click_id={id}"));
        let r = self.http.get(postback).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }

    /// Waits until `p`'s API shows conversion `id` in `state`.
    async fn await_state(&self, p: &Process, id: &str, state: &str) {
        let path = format!("/api/conversions/{id}");
        let what = format!("conversion {id} {state} at {}", p.url(""));
        eventually(&what, Duration::from_secs(15), || async {
            let (s, v) = self.api(p, &path).await;
            (s == StatusCode::OK && v["state"] == state).then_some(())
        })
        .await;
    }

    async fn api(&self, p: &Process, path: &str) -> (StatusCode, Value) {
        match self.http.get(p.url(path)).bearer_auth("admin").send().await {
            Ok(r) => {
                let s = r.status();
                (s, r.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (StatusCode::SERVICE_UNAVAILABLE, Value::Null),
        }
    }
}

/// What the load got a 2xx for.
#[derive(Default)]
struct Ledger {
    clicks: Vec<String>,
    conversions: Vec<String>,
    refused: u64,
}

/// Clicks fired together in each round of the load: more than click-service
/// has commits in flight, so some go to the log in batches
/// (`clicks.v1.recorded_batch`) and the faults hit those too.
const BURST: u64 = 4;

/// Every 5 ms until `stop`: a burst of clicks at once, then a postback for the
/// first one redirected.
async fn load(
    http: reqwest::Client,
    click: String,
    postback: String,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) && i < 20_000 {
        i += 1;
        let burst =
            (0..BURST).map(|j| http.get(format!("{click}/c/o1?aff=a1&sub1={i}-{j}")).send());
        let mut first = None;
        for r in futures::future::join_all(burst).await {
            match r {
                Ok(r) if r.status() == StatusCode::FOUND => {
                    let location = r.headers()["location"].to_str().unwrap().to_owned();
                    let id = click_id_in(&location).unwrap();
                    ledger.lock().unwrap().clicks.push(id.clone());
                    first.get_or_insert(id);
                }
                _ => ledger.lock().unwrap().refused += 1,
            }
        }
        if let Some(id) = first {
            match http
                .get(format!("{postback}/postback?click_id={id}&txid=T{i}"))
                .send()
                .await
            {
                Ok(r) if r.status() == StatusCode::OK => {
                    let body: Value = r.json().await.unwrap();
                    ledger
                        .lock()
                        .unwrap()
                        .conversions
                        .push(body["conversion_id"].as_str().unwrap().to_owned());
                }
                _ => ledger.lock().unwrap().refused += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run(fault: &str, inject: impl AsyncFnOnce(&mut Cluster)) {
    let mut c = Cluster::start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let load_task = tokio::spawn(load(
        c.http.clone(),
        c.click.url(""),
        c.postback.url(""),
        stop.clone(),
        ledger.clone(),
    ));
    // 1.5 s of load on each side of the fault, and on a slow machine until it
    // has acked 30 conversions more.
    let load_for = async |ledger: &Mutex<Ledger>| {
        let (started, before) = (
            std::time::Instant::now(),
            ledger.lock().unwrap().conversions.len(),
        );
        while started.elapsed() < Duration::from_millis(1500)
            || (ledger.lock().unwrap().conversions.len() < before + 30
                && started.elapsed() < Duration::from_secs(20))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    load_for(&ledger).await;
    inject(&mut c).await;
    load_for(&ledger).await;
    stop.store(true, Ordering::Relaxed);
    load_task.await.unwrap();
    let (clicks, conversions, refused) = {
        let l = ledger.lock().unwrap();
        (l.clicks.clone(), l.conversions.clone(), l.refused)
    };
    assert!(
        clicks.len() > 50 && conversions.len() > 50,
        "{fault}: the load ran ({} clicks)",
        clicks.len()
    );

    // Settle: outboxes drained, every acked conversion decided, every delivery done.
    c.click.ready(&c.http).await;
    c.postback.ready(&c.http).await;
    for p in [&c.click, &c.postback] {
        eventually("outbox drained", Duration::from_secs(30), || async {
            let r = c.http.get(p.url("/readyz")).send().await;
            if std::env::var_os("FAULT_DEBUG").is_some() {
                eprintln!("{r:?}");
            }
            let v: Value = r.ok()?.json().await.ok()?;
            (v["outbox"]["depth"] == 0).then_some(())
        })
        .await;
    }
    for id in &conversions {
        eventually(
            &format!("{fault}: conversion {id} decided"),
            Duration::from_secs(30),
            || async {
                let (s, v) = c.api(&c.postback, &format!("/api/conversions/{id}")).await;
                (s == StatusCode::OK && v["state"] != "pending").then_some(())
            },
        )
        .await;
    }
    eventually("deliveries done", Duration::from_secs(30), || async {
        let (_, v) = c.api(&c.postback, "/api/postbacks?state=pending").await;
        (v["total"] == 0).then_some(())
    })
    .await;

    // None lost, none duplicated: every acked click is in the log exactly once.
    let js = async_nats::jetstream::new(async_nats::connect(&c.nats.url).await.unwrap());
    let mut in_log: HashMap<String, u32> = HashMap::new();
    let mut batched = 0;
    for (subject, click) in clicks_in_log(&js).await {
        *in_log.entry(click.click_id).or_default() += 1;
        batched += usize::from(subject == proto::subject::CLICKS_RECORDED_BATCH);
    }
    assert!(
        batched > 0,
        "{fault}: some clicks went to the log in batches"
    );
    for id in &clicks {
        assert_eq!(
            in_log.get(id),
            Some(&1),
            "{fault}: acked click {id} in the log once"
        );
    }
    assert!(in_log.values().all(|n| *n == 1), "{fault}: no click twice");

    // Every acked conversion has exactly one decision, and it counts.
    let mut decisions: HashMap<String, u32> = HashMap::new();
    let mut attributed_ids = std::collections::HashSet::new();
    let mut reported_ids = std::collections::HashSet::new();
    for (subject, payload, _) in read_stream(&js, "CONVERSIONS").await {
        if subject == "conversions.v1.reported" {
            reported_ids.insert(
                ConversionReported::decode(&payload[..])
                    .unwrap()
                    .conversion_id,
            );
            continue;
        }
        // Alone, or several in one `conversions.v1.decided_batch` message.
        for decision in Decision::all_in(&subject, &payload) {
            let id = decision.conversion_id().to_owned();
            match decision {
                Decision::Attributed(_) => attributed_ids.insert(id.clone()),
                Decision::Rejected(_) => false,
                Decision::StatusUpdated(_) => continue,
            };
            *decisions.entry(id).or_default() += 1;
        }
    }
    for id in &conversions {
        assert_eq!(
            decisions.get(id),
            Some(&1),
            "{fault}: acked conversion {id} decided once"
        );
    }
    assert!(
        decisions.values().all(|n| *n == 1),
        "{fault}: no conversion decided twice"
    );
    // Every acked conversion found its click; a report the client never saw
    // acked (killed after it was durable, before the answer) may be decided too,
    // as its retry would have been: every report in the log has one decision.
    for id in &conversions {
        assert!(
            attributed_ids.contains(id),
            "{fault}: acked conversion {id} attributed"
        );
    }
    assert_eq!(
        decisions.len(),
        reported_ids.len(),
        "{fault}: every report in the log decided"
    );
    let attributed = attributed_ids.len();
    // A delivery is pending only once the dispatcher has read its decision:
    // "none pending" above can precede the last ones, so wait for them all.
    eventually(
        &format!("{fault}: every attributed conversion delivered"),
        Duration::from_secs(30),
        || async {
            let (_, v) = c.api(&c.postback, "/api/postbacks?state=delivered").await;
            (v["total"].as_u64() == Some(attributed as u64)).then_some(())
        },
    )
    .await;

    // No affiliate postback sent again after its recorded success: every request
    // the receiver saw is one of the attempts the success was recorded after
    // (requests carry X-Delivery-Attempt: <generation>.<attempt>).
    let delivered: HashMap<String, (u32, u32)> = read_stream(&js, "POSTBACKS")
        .await
        .into_iter()
        .filter(|(s, ..)| s == "postbacks.v1.delivered")
        .map(|(_, p, _)| {
            let e = PostbackDelivered::decode(&p[..]).unwrap();
            (e.delivery_id, (e.generation, e.attempts))
        })
        .collect();
    assert_eq!(
        delivered.len(),
        attributed,
        "{fault}: one delivery per attributed conversion"
    );

    // The projection equals a fresh rebuild from the log.
    let mut fresh = Process::start(
        "postback-service",
        env(&c.nats, &c.dir.path().join("fresh")),
        c.dir.path(),
    );
    fresh.ready(&c.http).await;
    let snapshot = |p: &Process| {
        let c = &c;
        let ids = clicks.clone();
        let url = p.url("");
        async move {
            let mut views = Vec::new();
            for id in &ids {
                let r = c
                    .http
                    .get(format!("{url}/api/clicks/{id}"))
                    .bearer_auth("admin")
                    .send()
                    .await
                    .unwrap();
                views.push(r.json::<Value>().await.unwrap());
            }
            let report = c
                .http
                .get(format!("{url}/api/reports?group_by=affiliate"))
                .bearer_auth("admin")
                .send()
                .await
                .unwrap();
            json!({"clicks": views, "report": report.json::<Value>().await.unwrap()})
        }
    };
    let live = snapshot(&c.postback).await;
    let rebuilt = snapshot(&fresh).await;
    assert!(
        live == rebuilt,
        "{fault}: the projection differs from a fresh rebuild"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut resent = 0;
    let mut sent: HashMap<(String, String), u32> = HashMap::new();
    for seen in c.receiver.seen() {
        let id = url_params(&format!("http://x{}", seen.uri))
            .into_iter()
            .find(|(k, _)| k == "d")
            .unwrap()
            .1;
        let sent_as = seen.attempt.split_once('.').map_or((0, 0), |(g, a)| {
            (g.parse::<u32>().unwrap_or(0), a.parse::<u32>().unwrap_or(0))
        });
        let repeats = sent.entry((id.clone(), seen.attempt.clone())).or_default();
        *repeats += 1;
        if *repeats > 1
            || delivered
                .get(&id)
                .is_some_and(|recorded| sent_as > *recorded)
        {
            resent += 1;
            eprintln!(
                "{fault}: {id} delivered as {:?}, then sent again as {}",
                delivered.get(&id),
                seen.attempt
            );
        }
    }
    assert_eq!(
        resent, 0,
        "{fault}: a postback attempt was sent twice, or again after its recorded success"
    );
    println!(
        "fault {fault}: {} clicks and {} conversions acked ({refused} requests refused while down); \
         all in the log once, {attributed} attributed, {} deliveries, {} affiliate requests, 0 after success; \
         projection equal to a fresh rebuild",
        clicks.len(),
        conversions.len(),
        delivered.len(),
        c.receiver.seen().len(),
    );
}

#[tokio::test]
async fn nats_killed_and_restarted_under_load() {
    run("nats restart", async |c: &mut Cluster| {
        c.nats.kill();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        c.nats.restart();
    })
    .await;
}

#[tokio::test]
async fn click_service_sigkilled_and_restarted_under_load() {
    run("click-service SIGKILL", async |c: &mut Cluster| {
        c.click.kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.click.restart();
        c.click.ready(&c.http).await;
    })
    .await;
}

#[tokio::test]
async fn postback_service_sigkilled_while_deciding_and_restarted() {
    run("postback-service SIGKILL", async |c: &mut Cluster| {
        c.postback.kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.postback.restart();
        c.postback.ready(&c.http).await;
    })
    .await;
}

/// A listen address already in use: the service exits non-zero at once, and
/// its error names the address and the cause (what a supervisor's log shows).
/// The harness itself never meets this: it starts services on port 0 and reads
/// the port they bound from ADDR_FILE.
#[tokio::test]
async fn a_taken_listen_address_is_named_and_the_service_exits_non_zero() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut p = Process::start_on(
        "postback-service",
        env(&nats, &dir.path().join("p")),
        dir.path(),
        addr,
    );
    let deadline = tokio::time::Instant::now() + crate::support::process::READY_WITHIN;
    let status = loop {
        if let Some(status) = p.exited() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still running on a taken address"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "exit status {status}");
    let log = p.log_text();
    assert!(
        log.contains(&format!("binding {addr}")) && log.contains("Address already in use"),
        "the error names the address and the cause: {log}"
    );
    drop(taken);
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let mut c = Cluster::start().await;
    let status = c.postback.terminate().expect("was running");
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");

    // NATS frozen: the click is answered from the outbox, and click-service's
    // stop neither hangs on NATS nor loses the click it accepted.
    c.nats.pause();
    let r = c
        .http
        .get(c.click.url("/c/o1?aff=a1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    let click_id = click_id_in(r.headers()["location"].to_str().unwrap()).expect("cid");
    let status = c.click.terminate().expect("was running");
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
    c.nats.resume();
    c.click.restart();
    let js = async_nats::jetstream::new(async_nats::connect(&c.nats.url).await.unwrap());
    eventually(
        "the accepted click in the log",
        Duration::from_secs(20),
        || async {
            let in_log = clicks_in_log(&js).await;
            in_log
                .iter()
                .any(|(_, k)| k.click_id == click_id)
                .then_some(())
        },
    )
    .await;
}

/// Runs postback-service's operator command `args`; returns the checksum it prints.
fn operator(c: &Cluster, args: &[&str]) -> String {
    operator_of(c, "postback-service", "postback", args)
}

/// Runs `service`'s operator command `args` on its data dir `dir`; returns
/// the checksum it prints.
fn operator_of(c: &Cluster, service: &str, dir: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(crate::support::process::binary(service))
        .args(args)
        .envs(env(&c.nats, &c.dir.path().join(dir)))
        .output()
        .expect("operator command runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if args == ["rebuild"] {
        assert!(
            stderr.contains("events/s") && stderr.contains("left"),
            "progress is shown: {stderr}"
        );
    }
    stdout
        .split("checksum ")
        .nth(1)
        .expect("a checksum line")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn the_rebuild_command_reproduces_the_projection_checksum() {
    let mut c = Cluster::start().await;
    for i in 0..20 {
        c.click_and_postback(&format!("aff=a1&sub1={i}")).await;
    }
    eventually("deliveries done", Duration::from_secs(20), || async {
        let (_, v) = c.api(&c.postback, "/api/postbacks?state=delivered").await;
        (v["total"] == 20).then_some(())
    })
    .await;
    let report = c.api(&c.postback, "/api/reports?group_by=offer").await.1;
    // click-service has not folded its clicks (no offer has a click cap) and
    // a rebuild folds them all: the checksum leaves that Tree out.
    assert!(c.click.terminate().unwrap().success());
    let click_before = operator_of(&c, "click-service", "click", &["checksum"]);
    let click_rebuilt = operator_of(&c, "click-service", "click", &["rebuild"]);
    assert_eq!(click_before, click_rebuilt, "click-service too");
    assert!(c.postback.terminate().unwrap().success());
    let before = operator(&c, &["checksum"]);
    let rebuilt = operator(&c, &["rebuild"]);
    assert_eq!(before, rebuilt, "a rebuild reaches the same state");
    assert_eq!(operator(&c, &["rebuild"]), rebuilt, "and again");
    c.postback.restart();
    c.postback.ready(&c.http).await;
    assert_eq!(
        c.api(&c.postback, "/api/reports?group_by=offer").await.1,
        report
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        c.receiver.seen().len(),
        20,
        "the rebuilt projection re-sends nothing"
    );
}

/// `/readyz`'s lease role of a postback-service process (empty: no answer).
async fn lease_role(c: &Cluster, p: &Process) -> String {
    let Ok(r) = c.http.get(p.url("/readyz")).send().await else {
        return String::new();
    };
    let v: Value = r.json().await.unwrap_or(Value::Null);
    v["lease"]["role"].as_str().unwrap_or_default().to_owned()
}

/// Waits until `/readyz` of postback-service process `p` shows `role`.
async fn await_role(c: &Cluster, p: &Process, role: &str) {
    let what = format!("{} at {}", role, p.url(""));
    eventually(&what, Duration::from_secs(10), || async {
        (lease_role(c, p).await == role).then_some(())
    })
    .await;
}

/// A cluster whose postback-service leads, and a second postback-service
/// standing by, both with these variables set otherwise.
async fn leader_and_standby(set: &[(&str, &str)]) -> (Cluster, Process) {
    let c = Cluster::start_with(set).await;
    // Ready means caught up with the log; the lease task may not have asked
    // for the lease yet (`starting`), so the roles are awaited, the leader's
    // before the standby starts.
    await_role(&c, &c.postback, "leader").await;
    let mut standby = Process::start(
        "postback-service",
        env_with(&c.nats, &c.dir.path().join("postback-2"), set),
        c.dir.path(),
    );
    standby.ready(&c.http).await;
    await_role(&c, &standby, "standby").await;
    (c, standby)
}

#[tokio::test]
async fn a_leader_frozen_past_its_lease_sends_nothing_once_it_runs_again() {
    // A 2 s lease (its holder stops at 1 s without renewal) and a retry due
    // 1.5 s after a failed attempt.
    let set = [
        ("LEADER_LEASE_MS", "2000"),
        ("POSTBACK_FIRST_RETRY_MS", "1500"),
    ];
    let (c, standby) = leader_and_standby(&set).await;

    // The affiliate's first answer fails: the leader schedules a retry.
    c.receiver.answer_from_now(Reply::Status(500, "down"));
    c.click_and_postback("aff=a1").await;
    eventually("the first attempt", Duration::from_secs(10), || async {
        (!c.receiver.seen().is_empty()).then_some(())
    })
    .await;
    // Long enough to have scheduled the retry, well before it is due.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.receiver.answer_from_now(Reply::Status(200, "ok"));

    // Frozen (a stopped VM, a long pause): its lease expires, the standby
    // leads and delivers the postback.
    c.postback.pause();
    await_role(&c, &standby, "leader").await;
    eventually(
        "delivered by the new leader",
        Duration::from_secs(10),
        || async {
            let (_, v) = c.api(&standby, "/api/postbacks?state=delivered").await;
            (v["total"] == 1).then_some(())
        },
    )
    .await;
    assert_eq!(c.receiver.seen().len(), 2, "{:?}", c.receiver.seen());

    // The old leader runs again with its retry long overdue: it knows by its
    // own clock that its lease ran out, so it sends nothing, and stands by.
    c.postback.resume();
    await_role(&c, &c.postback, "standby").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let seen = c.receiver.seen();
    assert_eq!(
        seen.len(),
        2,
        "sent once after the failure, not twice: {seen:?}"
    );
    assert_eq!(lease_role(&c, &standby).await, "leader");
}

#[tokio::test]
async fn a_leader_frozen_past_its_lease_decides_nothing_once_it_runs_again() {
    // A 2 s lease; a conversion of a click never seen waits 3 s for it.
    let set = [
        ("LEADER_LEASE_MS", "2000"),
        ("UNKNOWN_CLICK_GRACE_MS", "3000"),
    ];
    let (c, standby) = leader_and_standby(&set).await;
    // JetStream drops a repeated `Nats-Msg-Id` only within the stream's
    // duplicate window (2 min as created; an operator may shorten it). A
    // short one here lets through whatever a stale leader publishes late.
    let js = async_nats::jetstream::new(async_nats::connect(&c.nats.url).await.unwrap());
    crate::support::app::update_stream(&js, "CONVERSIONS", |c| {
        c.duplicate_window = Duration::from_millis(500);
    })
    .await;

    // The leader folds the report and waits for its click.
    let ghost = uuid::Uuid::now_v7();
    let r = c
        .http
        .get(c.postback.url(&format!("/postback?click_id={ghost}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let id = r.json::<Value>().await.unwrap()["conversion_id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.await_state(&c.postback, &id, "pending").await;

    // Frozen past its lease and the grace: the standby leads and rejects it.
    c.postback.pause();
    c.await_state(&standby, &id, "rejected").await;
    tokio::time::sleep(Duration::from_millis(700)).await;

    // The old leader runs again with the grace long over and its decider's
    // next round overdue: by its own clock its lease ran out, so it
    // publishes nothing, and it folds the standby's decision.
    c.postback.resume();
    c.await_state(&c.postback, &id, "rejected").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let decisions: Vec<String> = read_stream(&js, "CONVERSIONS")
        .await
        .into_iter()
        .map(|(subject, _, _)| subject)
        .filter(|s| s != "conversions.v1.reported")
        .collect();
    assert_eq!(
        decisions,
        ["conversions.v1.rejected"],
        "one decision, the new leader's"
    );
    await_role(&c, &c.postback, "standby").await;
    assert_eq!(lease_role(&c, &standby).await, "leader");
}
