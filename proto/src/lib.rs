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

        impl ClicksRecorded {
            /// The clicks a `CLICKS` message carries, each as an encoded
            /// [`ClickRecorded`]: a batch's (`clicks.v1.recorded_batch`), the
            /// message itself (`clicks.v1.recorded`), or none (any other
            /// subject: a later version's event, `clicks.v2.recorded` say,
            /// is not a v1 click to count).
            ///
            /// # Errors
            /// A batch that does not decode.
            pub fn each<'a>(
                subject: &str,
                payload: &'a [u8],
            ) -> Result<Vec<std::borrow::Cow<'a, [u8]>>, prost::DecodeError> {
                if subject == crate::subject::CLICK_RECORDED {
                    return Ok(vec![std::borrow::Cow::Borrowed(payload)]);
                }
                if subject != crate::subject::CLICKS_RECORDED_BATCH {
                    return Ok(Vec::new());
                }
                let batch = <Self as prost::Message>::decode(payload)?;
                Ok(batch
                    .clicks
                    .into_iter()
                    .map(std::borrow::Cow::Owned)
                    .collect())
            }
        }
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
    /// Several clicks in one message (`ClicksRecorded`), acked once.
    pub const CLICKS_RECORDED_BATCH: &str = "clicks.v1.recorded_batch";
    pub const CONVERSION_REPORTED: &str = "conversions.v1.reported";
    pub const CONVERSION_ATTRIBUTED: &str = "conversions.v1.attributed";
    pub const CONVERSION_REJECTED: &str = "conversions.v1.rejected";
    pub const CONVERSION_STATUS_UPDATED: &str = "conversions.v1.status_updated";
    /// Several decisions in one message (`ConversionsDecided`), acked once.
    pub const CONVERSIONS_DECIDED_BATCH: &str = "conversions.v1.decided_batch";
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

#[cfg(test)]
mod tests {
    use prost::Message;

    use crate::clicks::v1::{ClickRecorded, ClicksRecorded};

    fn click(id: &str) -> ClickRecorded {
        ClickRecorded {
            event_id: id.into(),
            click_id: id.into(),
            offer_id: "o1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_batch_carries_its_clicks_and_reads_as_no_click_to_an_older_reader() {
        let (a, b) = (click("a"), click("b"));
        let batch = ClicksRecorded {
            clicks: vec![a.encode_to_vec(), b.encode_to_vec()],
        }
        .encode_to_vec();
        let each = ClicksRecorded::each(crate::subject::CLICKS_RECORDED_BATCH, &batch).unwrap();
        let decoded: Vec<ClickRecorded> = each
            .iter()
            .map(|c| ClickRecorded::decode(&c[..]).unwrap())
            .collect();
        assert_eq!(decoded, [a.clone(), b]);

        // The wire form of `repeated ClickRecorded clicks = 100`.
        #[derive(Clone, PartialEq, prost::Message)]
        struct AsMessages {
            #[prost(message, repeated, tag = "100")]
            clicks: Vec<ClickRecorded>,
        }
        assert_eq!(AsMessages::decode(&batch[..]).unwrap().clicks.len(), 2);

        let older = ClickRecorded::decode(&batch[..]).unwrap();
        assert!(older.click_id.is_empty(), "an older reader skips it");

        let lone = a.encode_to_vec();
        let each = ClicksRecorded::each(crate::subject::CLICK_RECORDED, &lone).unwrap();
        assert_eq!(each, [&lone[..]]);
        assert!(ClicksRecorded::each(crate::subject::CLICKS_RECORDED_BATCH, b"\xff").is_err());
        let later = ClicksRecorded::each("clicks.v2.recorded", &lone).unwrap();
        assert!(later.is_empty(), "a later version's event is no v1 click");
    }
}
