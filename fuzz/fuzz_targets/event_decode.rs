//! Any bytes as a message on conversions.v1.reported, clicks.v1.recorded,
//! clicks.v1.recorded_batch or conversions.v1.decided_batch: the
//! decode-and-normalise path never panics; what it accepts is well formed,
//! what it refuses becomes a `malformed` conversion.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postback_service::conversions::{ConversionView, Decision};
use prost::Message;
use proto::{
    clicks::v1::{ClickRecorded, ClicksRecorded},
    conversions::v1::ConversionReported,
};

fuzz_target!(|data: &[u8]| {
    let _ = ClickRecorded::decode(data);
    if let Ok(clicks) = ClicksRecorded::each(proto::subject::CLICKS_RECORDED_BATCH, data) {
        for click in clicks {
            let _ = ClickRecorded::decode(&click[..]);
        }
    }
    for decision in Decision::all_in(proto::subject::CONVERSIONS_DECIDED_BATCH, data) {
        let _ = decision.msg_id();
    }
    match ConversionReported::decode(data) {
        Ok(e) => match postback_service::postback::normalize_reported(e.clone(), 1_000) {
            Ok(n) => {
                assert!(!n.conversion_id.is_empty() && n.occurred_at_ms > 0);
                let view = ConversionView::reported(&n, 1, 1_000);
                assert!(view.malformed.is_none());
            }
            Err(why) => {
                let view = ConversionView::malformed("m".into(), Some(&e), why, data, 1, 1_000);
                assert!(view.malformed.is_some());
            }
        },
        Err(error) => {
            let view = ConversionView::malformed("m".into(), None, error.to_string(), data, 1, 1_000);
            assert!(view.raw_hex.is_some());
        }
    }
});
