//! The event contract shared by every service and partner: generated prost types,
//! the subjects they travel on and the streams that keep them.
//!
//! One subject per event type, so the subject names the message to decode. A
//! breaking change gets a new subject (`clicks.v2.recorded`) in the same stream.

#![allow(missing_docs, unreachable_pub, clippy::doc_lazy_continuation)]

pub mod catalog {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/catalog.v1.rs"));
    }
}
pub mod clicks {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/clicks.v1.rs"));
    }
}
pub mod conversions {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/conversions.v1.rs"));
    }
}
pub mod postbacks {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/postbacks.v1.rs"));
    }
}

/// Subjects, `<domain>.v<N>.<event>`.
pub mod subject {
    pub const CLICK_RECORDED: &str = "clicks.v1.recorded";
    pub const CONVERSION_REPORTED: &str = "conversions.v1.reported";
    pub const CONVERSION_ATTRIBUTED: &str = "conversions.v1.attributed";
    pub const CONVERSION_REJECTED: &str = "conversions.v1.rejected";
    pub const CONVERSION_STATUS_UPDATED: &str = "conversions.v1.status_updated";
    pub const POSTBACK_DELIVERED: &str = "postbacks.v1.delivered";
    pub const POSTBACK_FAILED: &str = "postbacks.v1.failed";
    pub const POSTBACK_RETRY_REQUESTED: &str = "postbacks.v1.retry_requested";
    /// Prefix of `catalog.v1.offers.<offer_id>`.
    pub const OFFER_PREFIX: &str = "catalog.v1.offers.";
    /// Prefix of `catalog.v1.affiliates.<affiliate_id>`.
    pub const AFFILIATE_PREFIX: &str = "catalog.v1.affiliates.";

    /// The subject an offer's changes go to.
    pub fn offer(offer_id: &str) -> String {
        format!("{OFFER_PREFIX}{offer_id}")
    }

    /// The subject an affiliate's changes go to.
    pub fn affiliate(affiliate_id: &str) -> String {
        format!("{AFFILIATE_PREFIX}{affiliate_id}")
    }
}

/// Stream names; each stream holds `<domain-lower>.>`.
pub mod stream {
    pub const CLICKS: &str = "CLICKS";
    pub const CONVERSIONS: &str = "CONVERSIONS";
    pub const POSTBACKS: &str = "POSTBACKS";
    pub const CATALOG: &str = "CATALOG";
}
