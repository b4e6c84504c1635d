//! The catalog admin API: auth, validation, collections.

use reqwest::StatusCode;
use serde_json::json;

use crate::support::{System, OFFER_URL};

/// A `GET` on click-service's admin API, its JSON.
async fn admin_get(sys: &System, path: &str) -> serde_json::Value {
    sys.http
        .get(sys.click_url(path))
        .bearer_auth("admin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn admin_api_needs_the_bearer_token() {
    let sys = System::start().await;
    for (method, path) in [
        ("GET", "/api/offers"),
        ("PUT", "/api/offers/o1"),
        ("GET", "/api/affiliates"),
        ("PUT", "/api/affiliates/a1"),
    ] {
        for token in [None, Some("wrong")] {
            let mut req = sys
                .http
                .request(method.parse().unwrap(), sys.click_url(path))
                .json(&json!({"url": OFFER_URL}));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.unwrap();
            assert_eq!(
                r.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}"
            );
        }
    }
}

#[tokio::test]
async fn offers_and_affiliates_are_created_updated_and_listed() {
    let sys = System::start().await;
    let (status, created) = sys
        .put(
            "/api/offers/o1",
            json!({"name": "Shop", "url": OFFER_URL, "payout": "1.5", "revenue": 3, "currency": "eur",
                   "attribution_window_hours": 48, "status": "active", "fallback_url": null}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["payout"], "1.50");
    assert_eq!(created["revenue"], "3.00");
    assert_eq!(created["currency"], "EUR");
    assert_eq!(created["fallback_url"], serde_json::Value::Null);
    let (status, updated) = sys
        .put(
            "/api/offers/o1",
            json!({"url": OFFER_URL, "name": "Shop 2"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "an update is 200");
    assert_eq!(updated["name"], "Shop 2");
    assert_eq!(updated["created_at"], created["created_at"]);
    sys.put_offer("o2", json!({"url": "http://b.example/"}))
        .await;
    sys.put_affiliate(
        "a1",
        json!({"name": "Aff", "postback_url": "https://aff.example/pb?c={click_id}"}),
    )
    .await;

    let offers = admin_get(&sys, "/api/offers").await;
    let ids: Vec<_> = offers
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["offer_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["o1", "o2"]);
    let affs = admin_get(&sys, "/api/affiliates").await;
    assert_eq!(
        affs[0]["postback_url"],
        "https://aff.example/pb?c={click_id}"
    );
    let one = admin_get(&sys, "/api/offers/o2").await;
    assert_eq!(
        one["attribution_window_hours"], 720,
        "default window is 30 days"
    );
}

#[tokio::test]
async fn bad_catalog_input_is_a_400_naming_the_field() {
    let sys = System::start().await;
    let cases = [
        ("/api/offers/o1", json!({}), "url"),
        (
            "/api/offers/o1",
            json!({"url": "javascript:alert(1)"}),
            "url",
        ),
        ("/api/offers/o1", json!({"url": "/landing"}), "url"),
        (
            "/api/offers/o1",
            json!({"url": OFFER_URL, "payout": "two"}),
            "payout",
        ),
        (
            "/api/offers/o1",
            json!({"url": OFFER_URL, "revenue": -1}),
            "revenue",
        ),
        (
            "/api/offers/o1",
            json!({"url": OFFER_URL, "currency": "DOLLARS"}),
            "currency",
        ),
        (
            "/api/offers/o1",
            json!({"url": OFFER_URL, "attribution_window_hours": "24"}),
            "attribution_window_hours",
        ),
        (
            "/api/offers/o1",
            json!({"url": OFFER_URL, "status": "live"}),
            "status",
        ),
        (
            "/api/offers/o1",
            json!({"url": OFFER_URL, "fallback_url": "ftp://x"}),
            "fallback_url",
        ),
        (
            "/api/offers/o1",
            json!({"url": OFFER_URL, "colour": "red"}),
            "colour",
        ),
        ("/api/offers/bad.id", json!({"url": OFFER_URL}), "offer_id"),
        (
            "/api/offers/o1",
            json!({"url": OFFER_URL, "offer_id": "o2"}),
            "offer_id",
        ),
        (
            "/api/affiliates/a1",
            json!({"affiliate_id": "a2"}),
            "affiliate_id",
        ),
        (
            "/api/affiliates/a1",
            json!({"postback_url": "not a url"}),
            "postback_url",
        ),
        ("/api/affiliates/a%20b", json!({}), "affiliate_id"),
    ];
    for (path, body, field) in cases {
        let (status, json) = sys.put(path, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}");
        assert_eq!(json["field"], field, "{path} {body}: {json}");
    }
    let r = sys
        .http
        .put(sys.click_url("/api/offers/o1"))
        .bearer_auth("admin")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["field"],
        "body"
    );
    let r = sys
        .http
        .get(sys.click_url("/api/offers/none"))
        .bearer_auth("admin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

/// What a `GET` answers, edited and put back, is accepted as it is: its id,
/// `created_at` and `updated_at` are read-only and ignored, the masked secrets
/// kept, and every other field reads back as it was.
#[tokio::test]
async fn an_entity_read_edited_and_put_back_keeps_everything_else() {
    let sys = System::start().await;
    let get = |path: &'static str| admin_get(&sys, path);
    sys.put_offer(
        "o1",
        json!({"name": "Shop", "url": OFFER_URL, "payout": "1.5", "revenue": "3", "currency": "EUR",
               "attribution_window_hours": 48, "fallback_url": "https://fb.example/",
               "postback_url": "https://adv.example/pb?c={click_id}", "dedup": "unique_txid",
               "goals": [{"id": "sale", "payout": "2"}, {"id": "lead", "dedup": "all"}],
               "status_map": {"paid": "approved"}, "min_ctit_seconds": 5,
               "timezone": "Europe/Berlin", "caps": {"daily_conversions": 7},
               "security": {"token": "s3cret", "hmac_secret": "k3y", "allowed_ips": ["10.0.0.0/8"]}}),
    )
    .await;
    sys.put_affiliate(
        "a1",
        json!({"name": "Aff", "postback_url": "https://aff.example/pb?c={click_id}",
               "postback_statuses": ["approved", "reversed"]}),
    )
    .await;
    for (path, field) in [
        ("/api/offers/o1", "offer_id"),
        ("/api/affiliates/a1", "affiliate_id"),
    ] {
        let before = get(path).await;
        let mut edited = before.clone();
        edited["name"] = json!("Renamed");
        let (status, answer) = sys.put(path, edited).await;
        assert_eq!(status, StatusCode::OK, "{path}: {answer}");
        let after = get(path).await;
        assert_eq!(after, answer, "{path}: the answer is what GET shows");
        assert_eq!(after[field], before[field]);
        assert_eq!(after["created_at"], before["created_at"]);
        let unchanged = |v: &serde_json::Value| {
            let mut v = v.clone();
            for f in ["name", "updated_at"] {
                v.as_object_mut().unwrap().remove(f);
            }
            v
        };
        assert_eq!(
            unchanged(&after),
            unchanged(&before),
            "{path}: only the name changed"
        );
        assert_eq!(after["name"], "Renamed");
    }
    let security = &get("/api/offers/o1").await["security"];
    assert_eq!(
        (&security["token"], &security["hmac_secret"]),
        (&json!("********"), &json!("********")),
        "the secrets are still set"
    );
}

/// A secret sent back masked keeps the one the log holds last, not the one
/// this instance had folded: another instance rotated it a moment before.
#[tokio::test]
async fn a_masked_secret_keeps_the_latest_one_written_through_any_instance() {
    use prost::Message;
    use proto::catalog::v1::{OfferStatus, OfferUpserted, PostbackSecurity};
    let sys = System::start().await;
    sys.put_offer(
        "o1",
        json!({"url": OFFER_URL, "security": {"token": "old"}}),
    )
    .await;
    let shown = admin_get(&sys, "/api/offers/o1").await;
    assert_eq!(shown["security"]["token"], "********");
    // Another instance: a burst of other offers, then o1's token rotated.
    let js = sys.jetstream().await;
    let offer = |id: &str, token: &str| OfferUpserted {
        event_id: uuid::Uuid::now_v7().to_string(),
        occurred_at_ms: common::time::now_ms(),
        offer_id: id.into(),
        url: OFFER_URL.into(),
        status: OfferStatus::Active as i32,
        security: Some(PostbackSecurity {
            token: token.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut acks = Vec::new();
    for i in 0..2000 {
        let id = format!("x{i}");
        let e = offer(&id, "");
        acks.push(
            js.publish(proto::subject::offer(&id), e.encode_to_vec().into())
                .await
                .unwrap(),
        );
    }
    let rotated = offer("o1", "new").encode_to_vec();
    acks.push(
        js.publish(proto::subject::offer("o1"), rotated.into())
            .await
            .unwrap(),
    );
    for ack in acks {
        ack.await.unwrap();
    }
    // At once, through this instance, the offer as GET showed it, renamed.
    let mut edited = shown.clone();
    edited["name"] = json!("Renamed");
    let (status, body) = sys.put("/api/offers/o1", edited).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let stream = js.get_stream("CATALOG").await.unwrap();
    let last = stream
        .get_last_raw_message_by_subject(&proto::subject::offer("o1"))
        .await
        .unwrap();
    let written = OfferUpserted::decode(last.payload).unwrap();
    assert_eq!(
        (
            written.name.as_str(),
            written.security.unwrap().token.as_str()
        ),
        ("Renamed", "new")
    );

    // Not knowing which secret is stored (NATS not answering), it does not
    // guess from what it had folded.
    sys.nats.pause();
    let (status, body) = sys.put("/api/offers/o1", shown).await;
    sys.nats.resume();
    assert_eq!(
        (status, body["reason"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("catalog_behind")),
        "{body}"
    );
}
