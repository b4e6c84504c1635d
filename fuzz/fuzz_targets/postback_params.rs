//! Any bytes as a postback query string or form body: parsing never panics, and
//! what it accepts has a UUID click id and sane fields.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let known = &postback_service::postback::PARAMETERS;
    let Ok(pairs) = common::params::parse_known(data, "query", known) else {
        return;
    };
    if let Ok(input) = postback_service::postback::PostbackInput::parse(
        pairs
            .iter()
            .map(|(k, v)| (k.as_str().into(), v.as_str().into())),
    ) {
        assert!(uuid_like(&input.click_id));
        assert!(input.amount_micros.is_none_or(|a| a >= 0));
        assert!(input.goal.len() <= 64 && input.txid.len() <= 256);
        let event = input.into_event("127.0.0.1".into(), 0, String::new(), String::new());
        assert!(!event.conversion_id.is_empty());
    }
});

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.bytes().filter(|b| *b == b'-').count() == 4
}
