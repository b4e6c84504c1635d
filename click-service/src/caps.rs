//! Daily click caps: click-service folds its own CLICKS stream into per-day
//! counters (offer, and offer × affiliate), on the day each click recorded.
//!
//! The check reads the projection, so concurrent clicks can overshoot a cap by
//! the clicks in flight (milliseconds of fold lag); a click on a capped offer
//! waits for its own event to be folded before answering, so sequential clicks
//! are counted exactly.

use common::{fold::Fold, store::decode_u64, LogEntry, Staged};
use prost::Message;
use proto::clicks::v1::{ClickDisposition, ClickRecorded, ClicksRecorded};

fn cap_key(offer_id: &str, affiliate_id: Option<&str>, day: &str) -> Vec<u8> {
    match affiliate_id {
        None => format!("cap/o/{offer_id}/{day}").into_bytes(),
        Some(a) => format!("cap/a/{offer_id}/{a}/{day}").into_bytes(),
    }
}

/// Counts landing clicks per cap day.
#[derive(Debug, Default)]
pub struct ClickCapsFold;

impl Fold for ClickCapsFold {
    /// 2: batches of clicks are counted; an older version skipped them, so
    /// its counts may fall short of the log.
    fn format(&self) -> u32 {
        2
    }

    fn apply(&mut self, staged: &mut Staged<'_>, entry: &LogEntry<'_>) -> Result<(), sled::Error> {
        let Ok(clicks) = ClicksRecorded::each(entry.subject, entry.payload) else {
            return Ok(());
        };
        for payload in &clicks {
            let Ok(click) = ClickRecorded::decode(&payload[..]) else {
                continue;
            };
            if click.cap_day.is_empty() || click.disposition() != ClickDisposition::Landing {
                continue;
            }
            staged.add_u64(cap_key(&click.offer_id, None, &click.cap_day), 1)?;
            staged.add_u64(
                cap_key(&click.offer_id, Some(&click.affiliate_id), &click.cap_day),
                1,
            )?;
        }
        Ok(())
    }
}

/// Reads the click counters.
#[derive(Clone, Debug)]
pub struct ClickCounts {
    tree: sled::Tree,
}

impl ClickCounts {
    /// Over the Tree [`ClickCapsFold`] writes.
    pub fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    /// Landing clicks on `day`: (for the offer, for the offer and affiliate).
    ///
    /// # Errors
    /// sled read failure.
    pub fn used(
        &self,
        offer_id: &str,
        affiliate_id: &str,
        day: &str,
    ) -> Result<(u64, u64), sled::Error> {
        let get = |k: Vec<u8>| -> Result<u64, sled::Error> {
            Ok(self.tree.get(k)?.map_or(0, |v| decode_u64(&v)))
        };
        Ok((
            get(cap_key(offer_id, None, day))?,
            get(cap_key(offer_id, Some(affiliate_id), day))?,
        ))
    }
}

/// Whether an offer has a daily click cap.
pub fn has_click_caps(caps: &catalog::Caps) -> bool {
    caps.daily_clicks > 0 || caps.daily_clicks_per_affiliate > 0
}

/// Opens `gate` (the caps fold's, [`common::fold::FoldSpec::gate`]) once the
/// catalog holds an offer with a click cap, looking again whenever the catalog
/// fold moves; it then stays open. Until then click-service does not read
/// CLICKS at all: with no caps in the catalog nobody needs the counts, and
/// NATS delivering every click to this service cost CPU on the machine's
/// cores that the click handlers share (see BENCHMARKS.md). The fold then
/// starts from its checkpoint (the log's first click the first time), so the
/// counts of the day include the clicks from before the cap.
pub async fn open_on_first_cap(
    catalog: catalog::Catalog,
    mut catalog_status: tokio::sync::watch::Receiver<common::FoldStatus>,
    gate: tokio::sync::watch::Sender<bool>,
    token: tokio_util::sync::CancellationToken,
) {
    loop {
        match any_click_caps(&catalog) {
            Ok(true) => {
                gate.send_replace(true);
                return;
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "reading the catalog for click caps"),
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = common::fold::changed(&mut catalog_status) => {}
        }
    }
}

/// Whether the catalog has an offer with a click cap.
///
/// # Errors
/// sled failure.
pub fn any_click_caps(catalog: &catalog::Catalog) -> Result<bool, sled::Error> {
    Ok(catalog.offers()?.iter().any(|o| has_click_caps(&o.caps)))
}

/// Whether the catalog of the projection `db` has an offer with a click cap.
/// While it has none, click-service does not fold its click-caps Tree, so the
/// projection's checksum leaves that Tree out, and a rebuild, which always
/// folds it, still prints the same checksum
/// ([`common::rebuild::FoldJob::checksummed`]).
///
/// # Errors
/// sled failure.
pub fn catalog_has_click_caps(db: &sled::Db) -> Result<bool, sled::Error> {
    any_click_caps(&catalog::Catalog::new(db.open_tree("catalog")?))
}

/// Whether a click cap is full: `used` is (offer, offer × affiliate).
pub fn is_full(caps: &catalog::Caps, used: (u64, u64)) -> bool {
    (caps.daily_clicks > 0 && used.0 >= caps.daily_clicks)
        || (caps.daily_clicks_per_affiliate > 0 && used.1 >= caps.daily_clicks_per_affiliate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::Caps;

    #[test]
    fn caps_fill_at_the_boundary() {
        let caps = Caps {
            daily_clicks: 3,
            daily_clicks_per_affiliate: 2,
            ..Caps::default()
        };
        assert!(!is_full(&caps, (2, 1)));
        assert!(is_full(&caps, (3, 0)));
        assert!(is_full(&caps, (0, 2)));
        assert!(
            !is_full(&Caps::default(), (1_000, 1_000)),
            "no caps, never full"
        );
    }

    #[test]
    fn counts_landing_clicks_per_day() {
        let dir = tempfile::tempdir().unwrap();
        let db = common::store::open_db(dir.path()).unwrap();
        let tree = common::FoldTree::open(&db, "clicks").unwrap();
        let mut staged = Staged::new(&tree);
        let click = |day: &str, aff: &str, d: ClickDisposition| {
            ClickRecorded {
                offer_id: "o1".into(),
                affiliate_id: aff.into(),
                cap_day: day.into(),
                disposition: d as i32,
                ..Default::default()
            }
            .encode_to_vec()
        };
        // The second and third were recorded together, in one batch.
        let batch = ClicksRecorded {
            clicks: vec![
                click("2026-01-01", "a2", ClickDisposition::Landing),
                click("2026-01-01", "a1", ClickDisposition::FallbackCapped),
            ],
        }
        .encode_to_vec();
        let (one, many) = (
            proto::subject::CLICK_RECORDED,
            proto::subject::CLICKS_RECORDED_BATCH,
        );
        let events = [
            (one, click("2026-01-01", "a1", ClickDisposition::Landing)),
            (many, batch),
            (one, click("2026-01-02", "a1", ClickDisposition::Landing)),
        ];
        for (i, (subject, payload)) in events.iter().enumerate() {
            let entry = LogEntry {
                subject,
                payload,
                seq: i as u64 + 1,
                log_time_ms: 0,
            };
            ClickCapsFold.apply(&mut staged, &entry).unwrap();
        }
        staged.commit(3).unwrap();
        let counts = ClickCounts::new(tree.rows().clone());
        assert_eq!(counts.used("o1", "a1", "2026-01-01").unwrap(), (2, 1));
        assert_eq!(counts.used("o1", "a1", "2026-01-02").unwrap(), (1, 1));
    }
}
