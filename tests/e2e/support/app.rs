//! Both services in process against one test's NATS, with typed HTTP helpers.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use reqwest::{redirect::Policy, StatusCode};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{eventually, NatsServer};

/// The demo offer's landing URL: every click macro in a query parameter.
pub const OFFER_URL: &str = "https://adv.example/landing?cid={click_id}&o={offer_id}&a={aff_id}\
&s1={sub1}&s2={sub2}&s3={sub3}&s4={sub4}&s5={sub5}&src={source}&acid={aff_click_id}";

const TOKEN: &str = "admin";

/// A service running in this process.
pub struct Service {
    pub addr: SocketAddr,
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl Service {
    /// Stops it the way SIGTERM does and waits until it has drained.
    pub async fn stop(mut self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), &mut self.handle)
            .await
            .expect("service stops within 20 s")
            .expect("service task did not panic");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn run<F>(addr: SocketAddr, run: F) -> Service
where
    F: FnOnce(CancellationToken) -> JoinHandle<()>,
{
    let stop = CancellationToken::new();
    let handle = run(stop.clone());
    Service { addr, stop, handle }
}

/// One test's whole system: NATS, click-service, postback-service.
pub struct System {
    pub nats: NatsServer,
    pub click: Option<Service>,
    pub postback: Option<Service>,
    click_dir: tempfile::TempDir,
    postback_dir: tempfile::TempDir,
    pub grace_ms: u64,
    pub http: reqwest::Client,
    tweak: Box<dyn Fn(&mut postback_service::Config) + Send + Sync>,
}

impl System {
    /// Starts everything with a 500 ms unknown-click grace.
    pub async fn start() -> Self {
        Self::start_with_grace(500).await
    }

    /// Starts everything with the given unknown-click grace.
    pub async fn start_with_grace(grace_ms: u64) -> Self {
        Self::start_configured(grace_ms, |_| {}).await
    }

    /// Starts everything; `tweak` adjusts postback-service's test configuration
    /// (now and at every restart).
    pub async fn start_configured(
        grace_ms: u64,
        tweak: impl Fn(&mut postback_service::Config) + Send + Sync + 'static,
    ) -> Self {
        if std::env::var_os("TEST_LOG").is_some() {
            common::telemetry::init("info");
        }
        postback_service::deliveries::attempt::install_tls_provider();
        let mut system = Self {
            nats: NatsServer::start(),
            click: None,
            postback: None,
            click_dir: tempfile::tempdir().expect("temp dir"),
            postback_dir: tempfile::tempdir().expect("temp dir"),
            grace_ms,
            http: reqwest::Client::builder()
                .redirect(Policy::none())
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
            tweak: Box::new(tweak),
        };
        system.start_click().await;
        system.start_postback().await;
        system
    }

    pub fn click_config(&self) -> click_service::Config {
        click_service::Config::for_tests(&self.nats.url, self.click_dir.path().to_path_buf())
    }

    pub fn postback_config(&self) -> postback_service::Config {
        let mut c = postback_service::Config::for_tests(
            &self.nats.url,
            self.postback_dir.path().to_path_buf(),
        );
        c.unknown_click_grace_ms = self.grace_ms;
        (self.tweak)(&mut c);
        c
    }

    pub async fn start_click(&mut self) {
        self.start_click_with(self.click_config()).await;
    }

    pub async fn start_click_with(&mut self, config: click_service::Config) {
        let addr = self.serve_click(config).await;
        self.wait_ready(addr).await;
    }

    /// Stops click-service and starts it again with its test configuration
    /// changed by `tweak`; waits until it is ready.
    pub async fn restart_click_with(&mut self, tweak: impl FnOnce(&mut click_service::Config)) {
        if let Some(click) = self.click.take() {
            click.stop().await;
        }
        let mut config = self.click_config();
        tweak(&mut config);
        self.start_click_with(config).await;
    }

    /// Starts click-service and returns once it serves, ready or not (NATS
    /// may be down).
    pub async fn serve_click(&mut self, config: click_service::Config) -> SocketAddr {
        let app = click_service::Application::build(config)
            .await
            .expect("click-service starts");
        let addr = app.local_addr();
        self.click = Some(run(addr, |stop| {
            tokio::spawn(async move {
                app.run_until_stopped(stop)
                    .await
                    .expect("click-service runs")
            })
        }));
        addr
    }

    pub async fn start_postback(&mut self) {
        let addr = self.serve_postback().await;
        self.wait_ready(addr).await;
    }

    /// Starts postback-service and returns once it serves, ready or not.
    pub async fn serve_postback(&mut self) -> SocketAddr {
        let app = postback_service::Application::build(self.postback_config())
            .await
            .expect("postback-service starts");
        let addr = app.local_addr();
        self.postback = Some(run(addr, |stop| {
            tokio::spawn(async move {
                app.run_until_stopped(stop)
                    .await
                    .expect("postback-service runs")
            })
        }));
        addr
    }

    /// Starts one more postback-service on this system's NATS, with a data
    /// dir of its own (`dir`), as a second replica of a deployment; waits
    /// until it is ready.
    pub async fn start_another_postback(&self, dir: &std::path::Path) -> Service {
        let mut config = self.postback_config();
        config.data_dir = dir.to_path_buf();
        self.start_another_postback_with(config).await
    }

    /// [`Self::start_another_postback`] with a configuration of its own (its
    /// data dir included).
    pub async fn start_another_postback_with(&self, config: postback_service::Config) -> Service {
        let app = postback_service::Application::build(config)
            .await
            .expect("another postback-service starts");
        let addr = app.local_addr();
        let service = run(addr, |stop| {
            tokio::spawn(async move {
                app.run_until_stopped(stop)
                    .await
                    .expect("another postback-service runs")
            })
        });
        self.wait_ready(addr).await;
        service
    }

    async fn wait_ready(&self, addr: SocketAddr) {
        let url = format!("http://{addr}/readyz");
        eventually("service ready", Duration::from_secs(10), || async {
            let r = self.http.get(&url).send().await.ok()?;
            (r.status() == StatusCode::OK).then_some(())
        })
        .await;
    }

    /// Stops postback-service (graceful) and starts it again on the same data.
    pub async fn restart_postback(&mut self) {
        self.stop_postback().await;
        self.start_postback().await;
    }

    /// `POST` on postback-service's API with the admin token.
    pub async fn api_post(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .post(self.postback_url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("POST api");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Waits until delivery `id` is in `state` (`delivered`, `failed`); returns it.
    pub async fn delivery_in(&self, id: &str, state: &str) -> Value {
        eventually(
            &format!("delivery {id} {state}"),
            Duration::from_secs(15),
            || async {
                let (status, v) = self.api(&format!("/api/postbacks/{id}")).await;
                (status == StatusCode::OK && v["state"] == state).then_some(v)
            },
        )
        .await
    }

    /// Stops postback-service (graceful), keeping its data dir.
    pub async fn stop_postback(&mut self) {
        self.postback
            .take()
            .expect("postback-service running")
            .stop()
            .await;
    }

    /// Stops both services (graceful) and starts them again on the same data.
    pub async fn restart_services(&mut self) {
        self.click
            .take()
            .expect("click-service running")
            .stop()
            .await;
        self.stop_postback().await;
        self.start_click().await;
        self.start_postback().await;
    }

    /// Stops postback-service, deletes its data dir, starts it again.
    pub async fn wipe_postback(&mut self) {
        self.stop_postback().await;
        self.postback_dir = tempfile::tempdir().expect("temp dir");
        self.start_postback().await;
    }

    pub fn postback_data_dir(&self) -> PathBuf {
        self.postback_dir.path().to_path_buf()
    }

    pub fn click_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.click.as_ref().expect("click-service running").addr
        )
    }

    pub fn postback_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.postback
                .as_ref()
                .expect("postback-service running")
                .addr
        )
    }

    /// Publishes raw bytes to a subject through JetStream, as a partner would,
    /// and waits for the ack.
    pub async fn publish(&self, subject: &str, payload: Vec<u8>) {
        let js = self.jetstream().await;
        js.publish(subject.to_owned(), payload.into())
            .await
            .expect("sent")
            .await
            .expect("acked");
    }

    /// Publishes a `ClickRecorded` of `click_id` (offer o1, affiliate a1, a
    /// second old) straight onto CLICKS, as click-service would have.
    pub async fn publish_click(&self, click_id: &str) {
        self.publish_click_at(click_id, common::time::now_ms() - 1000)
            .await;
    }

    /// [`Self::publish_click`] of a click made at `occurred_at_ms` (one that
    /// waited in click-service's outbox reaches the log late).
    pub async fn publish_click_at(&self, click_id: &str, occurred_at_ms: i64) {
        use prost::Message;
        let click = proto::clicks::v1::ClickRecorded {
            event_id: click_id.to_owned(),
            click_id: click_id.to_owned(),
            offer_id: "o1".into(),
            affiliate_id: "a1".into(),
            occurred_at_ms,
            ..Default::default()
        };
        self.publish("clicks.v1.recorded", click.encode_to_vec())
            .await;
    }

    /// A JetStream context on this test's NATS, as a partner would have.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(&self.nats.url)
            .await
            .expect("connect to test NATS");
        async_nats::jetstream::new(client)
    }

    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .http
            .put(self.click_url(path))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("PUT");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `PUT /api/offers/{id}`, asserting success.
    pub async fn put_offer(&self, id: &str, body: Value) -> Value {
        let (status, json) = self.put(&format!("/api/offers/{id}"), body).await;
        assert!(status.is_success(), "PUT offer {id}: {status} {json}");
        json
    }

    /// `PUT /api/affiliates/{id}`, asserting success.
    pub async fn put_affiliate(&self, id: &str, body: Value) -> Value {
        let (status, json) = self.put(&format!("/api/affiliates/{id}"), body).await;
        assert!(status.is_success(), "PUT affiliate {id}: {status} {json}");
        json
    }

    /// Offer `o1` (payout 2.50, revenue 10.00 USD, 24 h window) and affiliate `a1`,
    /// seen by both services.
    pub async fn demo_catalog(&self) {
        self.put_offer(
            "o1",
            serde_json::json!({"name": "Demo", "url": OFFER_URL, "payout": "2.50",
                "revenue": "10", "currency": "USD", "attribution_window_hours": 24}),
        )
        .await;
        self.put_affiliate("a1", serde_json::json!({"name": "Aff One"}))
            .await;
        self.wait_postback_sees_offer("o1", "2.50").await;
    }

    /// Waits until postback-service has folded the whole CATALOG stream as it is
    /// now (its `/readyz` shows each fold's applied sequence).
    pub async fn wait_postback_sees_offer(&self, id: &str, payout: &str) {
        let js = self.jetstream().await;
        let mut stream = js.get_stream("CATALOG").await.expect("CATALOG stream");
        let last = stream
            .info()
            .await
            .expect("stream info")
            .state
            .last_sequence;
        // Both services: click-service answers a catalog PUT once it has
        // folded it, but gives up waiting after 2 s (a loaded machine).
        for (service, url) in [
            ("postback-service", self.postback_url("/readyz")),
            ("click-service", self.click_url("/readyz")),
        ] {
            eventually(
                &format!("{service} folded catalog to {last} ({id} {payout})"),
                Duration::from_secs(10),
                || async {
                    let seq = self.projection(&url, "CATALOG").await?["applied_seq"].as_u64()?;
                    (seq >= last).then_some(())
                },
            )
            .await;
        }
    }

    /// The status of a service's fold of `stream`, from its `/readyz` at `url`.
    pub async fn projection(&self, url: &str, stream: &str) -> Option<Value> {
        projection(&self.http, url, stream).await
    }

    /// `GET /c/{offer}?{query}`.
    pub async fn click(&self, offer: &str, query: &str) -> reqwest::Response {
        self.http
            .get(self.click_url(&format!("/c/{offer}?{query}")))
            .send()
            .await
            .expect("GET /c")
    }

    /// Clicks and returns (click id, Location), asserting a 302.
    pub async fn click_ok(&self, offer: &str, query: &str) -> (String, String) {
        let r = self.click(offer, query).await;
        assert_eq!(r.status(), StatusCode::FOUND, "click {offer}?{query}");
        let location = r.headers()["location"]
            .to_str()
            .expect("ascii Location")
            .to_owned();
        (click_id_in(&location).unwrap_or_default(), location)
    }

    /// `GET /postback?{query}`: (status, body).
    pub async fn postback(&self, query: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(self.postback_url(&format!("/postback?{query}")))
            .send()
            .await
            .expect("GET /postback");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A postback that must be accepted; returns the conversion id.
    pub async fn postback_ok(&self, query: &str) -> String {
        let (status, body) = self.postback(query).await;
        assert_eq!(status, StatusCode::OK, "postback {query}: {body}");
        assert_eq!(body["status"], "accepted");
        body["conversion_id"]
            .as_str()
            .expect("conversion_id")
            .to_owned()
    }

    /// GET on postback-service's API with the admin token.
    pub async fn api(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(self.postback_url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET api");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Waits until conversion `id` has left `pending`; returns it.
    pub async fn decided(&self, id: &str) -> Value {
        eventually(
            &format!("conversion {id} decided"),
            Duration::from_secs(10),
            || async {
                let (status, v) = self.api(&format!("/api/conversions/{id}")).await;
                (status == StatusCode::OK && v["state"] != "pending").then_some(v)
            },
        )
        .await
    }

    /// Everything the read API says about a set of clicks (their conversions and
    /// deliveries), plus both reports: to compare before and after a rebuild.
    pub async fn snapshot(&self, clicks: &[String]) -> Value {
        let mut views = Vec::new();
        for c in clicks {
            views.push(self.api(&format!("/api/clicks/{c}")).await.1);
        }
        serde_json::json!({
            "clicks": views,
            "by_offer": self.report("offer").await,
            "by_affiliate": self.report("affiliate").await,
        })
    }

    /// `GET /api/reports?group_by=..` rows.
    pub async fn report(&self, group_by: &str) -> Value {
        let (status, v) = self.api(&format!("/api/reports?group_by={group_by}")).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }
}

/// The decoded query parameters of a URL.
/// Changes stream `name`'s configuration as an operator would.
pub async fn update_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
    change: impl FnOnce(&mut async_nats::jetstream::stream::Config),
) {
    let mut stream = js.get_stream(name).await.expect("the stream");
    let mut config = stream.info().await.expect("its info").config.clone();
    change(&mut config);
    js.update_stream(config).await.expect("updated");
}

/// The click id a redirect's Location carries (the demo offers' `cid`).
/// `unsigned` (a postback's query) with its `sig`: HMAC-SHA256 under `secret`
/// of its canonical form, as an advertiser signs it.
pub fn signed(secret: &str, unsigned: &str) -> String {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(unsigned.as_bytes())
        .into_owned()
        .collect();
    let canonical = postback_service::security::canonical(&pairs);
    let sig = postback_service::security::sign(secret, &canonical);
    format!("{unsigned}&sig={sig}")
}

pub fn click_id_in(location: &str) -> Option<String> {
    url_params(location)
        .into_iter()
        .find(|(k, _)| k == "cid")
        .map(|(_, v)| v)
}

pub fn url_params(location: &str) -> Vec<(String, String)> {
    let url = url::Url::parse(location).expect("absolute Location");
    url.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The status of a service's fold of `stream`, from its `/readyz` at `url`
/// (`None` while it does not answer or has no such fold).
pub async fn projection(http: &reqwest::Client, url: &str, stream: &str) -> Option<Value> {
    let v: Value = http.get(url).send().await.ok()?.json().await.ok()?;
    let folds = v["projections"].as_array()?;
    folds.iter().find(|p| p["stream"] == stream).cloned()
}
