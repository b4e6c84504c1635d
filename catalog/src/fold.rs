//! The pure catalog fold and its adapter to the checkpointed fold loop.

use common::{fold::Fold, LogEntry, Staged};
use prost::Message;
use proto::catalog::v1::{AffiliateUpserted, OfferStatus as ProtoStatus, OfferUpserted};

use crate::reads::{affiliate_key, offer_key};
use crate::terms::{Caps, ConversionStatus, DedupPolicy, Goal, Security};
use crate::views::{Affiliate, Offer, OfferStatus};

/// The offer after `e`. An unspecified status reads as paused: an offer takes
/// traffic only when someone said so.
pub fn apply_offer(prev: Option<Offer>, e: &OfferUpserted) -> Offer {
    let status = match e.status() {
        ProtoStatus::Active => OfferStatus::Active,
        ProtoStatus::Paused | ProtoStatus::Unspecified => OfferStatus::Paused,
    };
    Offer {
        offer_id: e.offer_id.clone(),
        name: e.name.clone(),
        url: e.url.clone(),
        payout_micros: e.payout_micros,
        revenue_micros: e.revenue_micros,
        currency: e.currency.clone(),
        attribution_window_hours: e.attribution_window_hours,
        status,
        fallback_url: e.fallback_url.clone(),
        postback_url: e.postback_url.clone(),
        goals: e
            .goals
            .iter()
            .map(|g| Goal {
                goal_id: g.goal_id.clone(),
                name: g.name.clone(),
                payout_micros: g.payout_micros,
                revenue_micros: g.revenue_micros,
                dedup: DedupPolicy::parse(&g.dedup).filter(|_| !g.dedup.is_empty()),
            })
            .collect(),
        dedup: DedupPolicy::parse(&e.dedup).unwrap_or_default(),
        status_map: e
            .status_map
            .iter()
            .filter_map(|(k, v)| Some((k.to_ascii_lowercase(), ConversionStatus::parse(v)?)))
            .collect(),
        min_ctit_seconds: e.min_ctit_seconds,
        timezone: e.timezone.clone(),
        caps: e.caps.as_ref().map_or_else(Caps::default, |c| Caps {
            daily_clicks: c.daily_clicks,
            daily_clicks_per_affiliate: c.daily_clicks_per_affiliate,
            daily_conversions: c.daily_conversions,
            daily_conversions_per_affiliate: c.daily_conversions_per_affiliate,
        }),
        security: e
            .security
            .as_ref()
            .map_or_else(Security::default, |s| Security {
                token: s.token.clone(),
                allowed_ips: s.allowed_ips.clone(),
                hmac_secret: s.hmac_secret.clone(),
                signature_window_seconds: s.signature_window_seconds,
            }),
        created_at_ms: prev.map_or(e.occurred_at_ms, |p| p.created_at_ms),
        updated_at_ms: e.occurred_at_ms,
    }
}

/// The affiliate after `e`.
pub fn apply_affiliate(prev: Option<Affiliate>, e: &AffiliateUpserted) -> Affiliate {
    Affiliate {
        affiliate_id: e.affiliate_id.clone(),
        name: e.name.clone(),
        postback_url: e.postback_url.clone(),
        postback_statuses: e.postback_statuses.clone(),
        created_at_ms: prev.map_or(e.occurred_at_ms, |p| p.created_at_ms),
        updated_at_ms: e.occurred_at_ms,
    }
}

/// Folds `catalog.v1.offers.*` and `catalog.v1.affiliates.*` into a Tree.
#[derive(Debug, Default)]
pub struct CatalogFold;

impl Fold for CatalogFold {
    fn apply(&mut self, staged: &mut Staged<'_>, entry: &LogEntry<'_>) -> Result<(), sled::Error> {
        if entry.subject.starts_with(proto::subject::OFFER_PREFIX) {
            match OfferUpserted::decode(entry.payload) {
                Ok(e) if !e.offer_id.is_empty() => {
                    let key = offer_key(&e.offer_id);
                    let next = apply_offer(staged.get_json(&key)?, &e);
                    staged.put_json(key, &next);
                }
                _ => skip(entry),
            }
        } else if entry.subject.starts_with(proto::subject::AFFILIATE_PREFIX) {
            match AffiliateUpserted::decode(entry.payload) {
                Ok(e) if !e.affiliate_id.is_empty() => {
                    let key = affiliate_key(&e.affiliate_id);
                    let next = apply_affiliate(staged.get_json(&key)?, &e);
                    staged.put_json(key, &next);
                }
                _ => skip(entry),
            }
        } else {
            skip(entry);
        }
        Ok(())
    }
}

fn skip(entry: &LogEntry<'_>) {
    tracing::warn!(
        subject = entry.subject,
        seq = entry.seq,
        "undecodable catalog event skipped"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer_event(at: i64, status: ProtoStatus) -> OfferUpserted {
        OfferUpserted {
            event_id: "e".into(),
            occurred_at_ms: at,
            offer_id: "o1".into(),
            name: "Offer".into(),
            url: "https://adv.test/?c={click_id}".into(),
            payout_micros: 2_000_000,
            revenue_micros: 3_000_000,
            currency: "USD".into(),
            attribution_window_hours: 24,
            status: status as i32,
            fallback_url: String::new(),
            postback_url: String::new(),
            ..Default::default()
        }
    }

    #[test]
    fn an_upsert_replaces_state_but_keeps_creation_time() {
        let first = apply_offer(None, &offer_event(10, ProtoStatus::Active));
        assert_eq!(first.status, OfferStatus::Active);
        assert_eq!((first.created_at_ms, first.updated_at_ms), (10, 10));
        let second = apply_offer(Some(first), &offer_event(20, ProtoStatus::Paused));
        assert_eq!(second.status, OfferStatus::Paused);
        assert_eq!((second.created_at_ms, second.updated_at_ms), (10, 20));
    }

    #[test]
    fn unspecified_status_is_paused() {
        let o = apply_offer(None, &offer_event(1, ProtoStatus::Unspecified));
        assert_eq!(o.status, OfferStatus::Paused);
    }

    #[test]
    fn fold_skips_garbage_and_applies_good_events() {
        let dir = tempfile::tempdir().unwrap();
        let db = common::store::open_db(dir.path()).unwrap();
        let tree = common::FoldTree::open(&db, "catalog").unwrap();
        let mut staged = Staged::new(&tree);
        let good = offer_event(5, ProtoStatus::Active).encode_to_vec();
        let entry = |subject, payload, seq| LogEntry {
            subject,
            payload,
            seq,
            log_time_ms: 0,
        };
        CatalogFold
            .apply(
                &mut staged,
                &entry("catalog.v1.offers.o1", &[0xff, 0xff], 1),
            )
            .unwrap();
        CatalogFold
            .apply(&mut staged, &entry("catalog.v1.offers.o1", &good, 2))
            .unwrap();
        staged.commit(2).unwrap();
        let catalog = crate::Catalog::new(tree.rows().clone());
        assert_eq!(
            catalog.offer("o1").unwrap().unwrap().payout_micros,
            2_000_000
        );
        assert_eq!(catalog.offers().unwrap().len(), 1);
    }
}
