//! Micro-benchmarks of the pure functions on the hot paths, through the
//! services' public APIs: URL macro filling (every click and delivery), protobuf
//! encode/decode of the two busiest events, the conversion fold, the decision, and
//! the conversion id of a postback.
//!
//! `cargo bench -p loadgen` (or `cargo bench -p loadgen -- decide` for one group).

use std::hint::black_box;

use catalog::{Affiliate, Offer, OfferStatus};
use criterion::{criterion_group, criterion_main, Criterion};
use postback_service::conversions::{decide, ConversionView, DecideInput, Verdict};
use prost::Message;
use proto::{
    clicks::v1::ClickRecorded,
    conversions::v1::{ConversionAttributed, ConversionReported},
};

const CLICK_ID: &str = "0190a0b4-7c6e-7a2b-9c1d-2e3f4a5b6c7d";

fn click() -> ClickRecorded {
    loadgen::events::click(CLICK_ID, "bench", "bench-aff", 1_700_000_000_000)
}

fn reported() -> ConversionReported {
    loadgen::events::conversion(CLICK_ID, "ORDER-12345", 1_700_000_360_000)
}

fn offer() -> Offer {
    Offer {
        offer_id: "bench".into(),
        name: "Bench offer".into(),
        url: loadgen::events::LANDING_URL.into(),
        payout_micros: 2_500_000,
        revenue_micros: 10_000_000,
        currency: "USD".into(),
        attribution_window_hours: 720,
        status: OfferStatus::Active,
        fallback_url: String::new(),
        postback_url: String::new(),
        goals: Vec::new(),
        dedup: Default::default(),
        status_map: Default::default(),
        min_ctit_seconds: 0,
        timezone: String::new(),
        caps: Default::default(),
        security: Default::default(),
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

fn affiliate() -> Affiliate {
    Affiliate {
        affiliate_id: "bench-aff".into(),
        name: "Bench affiliate".into(),
        postback_url:
            "https://aff.example/pb?click={aff_click_id}&payout={payout}&tx={delivery_id}".into(),
        postback_statuses: Vec::new(),
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

fn template(c: &mut Criterion) {
    let mut g = c.benchmark_group("template");
    let lookup = |name: &str| match name {
        "click_id" => Some(CLICK_ID),
        "sub1" => Some("spring sale & more"),
        "source" => Some("bench"),
        _ => None,
    };
    g.bench_function("fill landing url (3 macros, one encoded)", |b| {
        b.iter(|| common::template::fill(black_box(loadgen::events::LANDING_URL), lookup));
    });
    let long = "https://adv.example/l?c={click_id}&o={offer_id}&a={aff_id}&s1={sub1}&s2={sub2}\
                &s3={sub3}&s4={sub4}&s5={sub5}&src={source}&ac={aff_click_id}&keep={unknown}";
    g.bench_function("fill 10 macros + 1 unknown", |b| {
        b.iter(|| common::template::fill(black_box(long), |n| lookup(n).or(Some("x"))));
    });
    g.finish();
}

fn protobuf(c: &mut Criterion) {
    let mut g = c.benchmark_group("prost");
    let click = click();
    let click_bytes = click.encode_to_vec();
    g.bench_function("ClickRecorded encode", |b| {
        b.iter(|| black_box(&click).encode_to_vec());
    });
    g.bench_function("ClickRecorded decode", |b| {
        b.iter(|| ClickRecorded::decode(black_box(&click_bytes[..])));
    });
    let report = reported();
    let report_bytes = report.encode_to_vec();
    g.bench_function("ConversionReported encode", |b| {
        b.iter(|| black_box(&report).encode_to_vec());
    });
    g.bench_function("ConversionReported decode", |b| {
        b.iter(|| ConversionReported::decode(black_box(&report_bytes[..])));
    });
    g.finish();
}

fn fold(c: &mut Criterion) {
    let mut g = c.benchmark_group("fold");
    let report = reported();
    g.bench_function("ConversionView::reported", |b| {
        b.iter(|| ConversionView::reported(black_box(&report), 42, 1_700_000_360_500));
    });
    let view = ConversionView::reported(&report, 42, 1_700_000_360_500);
    let attributed = ConversionAttributed {
        conversion_id: view.conversion_id.clone(),
        click_id: CLICK_ID.into(),
        offer_id: "bench".into(),
        affiliate_id: "bench-aff".into(),
        payout_micros: 2_500_000,
        payout_currency: "USD".into(),
        revenue_micros: 12_500_000,
        revenue_currency: "USD".into(),
        affiliate_postback_url: affiliate().postback_url,
        ..Default::default()
    };
    g.bench_function("ConversionView::attributed", |b| {
        b.iter_batched(
            || view.clone(),
            |v| v.attributed(black_box(&attributed)),
            criterion::BatchSize::SmallInput,
        );
    });
    g.bench_function(
        "ConversionView packed round trip (as stored in sled)",
        |b| {
            b.iter(|| {
                let bytes = common::store::pack(black_box(&view));
                common::store::unpack::<ConversionView>(&bytes)
            });
        },
    );
    g.bench_function("ConversionView JSON round trip (as the API answers)", |b| {
        b.iter(|| {
            let bytes = serde_json::to_vec(black_box(&view)).unwrap_or_default();
            serde_json::from_slice::<ConversionView>(&bytes).ok()
        });
    });
    g.finish();
}

fn decisions(c: &mut Criterion) {
    let mut g = c.benchmark_group("decide");
    let view = ConversionView::reported(&reported(), 42, 1_700_000_360_500);
    let click = click();
    let offer = offer();
    let affiliate = affiliate();
    let input = DecideInput {
        conversion: &view,
        checked_now: false,
        click: Some(&click),
        offer: Some(&offer),
        affiliate: Some(&affiliate),
        goal_taken: false,
        txid_taken: false,
        click_wait_over: false,
        catalog_wait_over: true,
        cap_used: (0, 0),
    };
    assert!(matches!(decide(input), Verdict::Attribute { .. }));
    g.bench_function("attribute", |b| b.iter(|| decide(black_box(input))));
    let duplicate = DecideInput {
        txid_taken: true,
        ..input
    };
    assert!(matches!(decide(duplicate), Verdict::Reject { .. }));
    g.bench_function("reject duplicate", |b| {
        b.iter(|| decide(black_box(duplicate)))
    });
    g.bench_function("conversion_id (UUID v5 of click, goal, txid)", |b| {
        b.iter(|| {
            postback_service::postback::conversion_id(
                black_box(CLICK_ID),
                black_box(""),
                black_box("ORDER-12345"),
            )
        });
    });
    g.finish();
}

criterion_group!(benches, template, protobuf, fold, decisions);
criterion_main!(benches);
