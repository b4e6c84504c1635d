//! The CLICKS fold: each click kept as the bytes it has in the log (the record)
//! behind one byte of flags (unique or not), keyed by its UUID, plus gross and
//! unique click counters per offer and per affiliate.
//!
//! Rows: `c/<click_id>` the click ([`click_row`]), `f/<bucket>` the visitors'
//! last click times ([`visitors`]), `n/…` the counters ([`Tally`]).
//!
//! A click is *unique* when the same (IP, user agent, offer, affiliate) has not
//! clicked in the 24 hours before it (event time). Decided in the fold, in log
//! order, so a replay reaches the same answer.

use common::{fold::Fold, store::decode_u64, LogEntry, Staged};
use prost::Message;
use proto::clicks::v1::{ClickRecorded, ClicksRecorded};

pub mod visitors;

use visitors::Visitor;

/// Row key of a click.
pub fn click_key(click_id: &str) -> Vec<u8> {
    [b"c/", click_id.as_bytes()].concat()
}

/// The rows' format ([`Fold::format`]). 2: a click's row carries its
/// unique flag (format 1 wrote a `cu/<click_id>` row per unique click: one
/// more write per click, a quarter of the fold's time). 3: visitors are kept
/// in bucket rows, not a row each ([`visitors`]). 4: gross and unique
/// counts share one row ([`Tally`]), so a report never shows a group's gross
/// clicks without its unique ones (a group's rows are applied one by one).
/// 5: batches of clicks (`clicks.v1.recorded_batch`) are folded; an older
/// version skipped them, so a Tree it wrote may lack clicks that are in the
/// log, and is folded again whatever order the services were upgraded in.
const FORMAT: u32 = 5;

/// Flag of a click's row: the click was unique.
const UNIQUE: u8 = 1;

/// A click's row: its flags, then its bytes as in the log.
pub fn click_row(payload: &[u8], unique: bool) -> Vec<u8> {
    let flags = if unique { UNIQUE } else { 0 };
    [&[flags][..], payload].concat()
}

/// Counter key of clicks per offer (`o`) or affiliate (`a`).
pub fn count_key(kind: char, id: &str) -> Vec<u8> {
    format!("n/{kind}/{id}").into_bytes()
}

/// Clicks counted for one offer or affiliate: gross, and unique among them.
/// One row, 16 bytes (two u64 BE), so the two are always read together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Every click.
    pub clicks: u64,
    /// Clicks that were unique.
    pub unique: u64,
}

impl Tally {
    /// Reads a counter row; a short or garbled row counts what it can.
    pub fn decode(bytes: &[u8]) -> Self {
        let (clicks, unique) = bytes.split_at(bytes.len().min(8));
        Self {
            clicks: decode_u64(clicks),
            unique: decode_u64(unique),
        }
    }

    /// The counter row.
    pub fn encode(&self) -> Vec<u8> {
        [self.clicks.to_be_bytes(), self.unique.to_be_bytes()].concat()
    }

    /// The tally after one more click.
    fn count(self, unique: bool) -> Self {
        Self {
            clicks: self.clicks.saturating_add(1),
            unique: self.unique.saturating_add(u64::from(unique)),
        }
    }
}

/// Stages one more click, unique or not, on a counter row.
fn tally(staged: &mut Staged<'_>, key: Vec<u8>, unique: bool) -> Result<(), sled::Error> {
    let now = staged
        .get(&key)?
        .map_or_else(Tally::default, |row| Tally::decode(&row));
    staged.insert(key, now.count(unique).encode());
    Ok(())
}

/// How long a visitor's repeat clicks are not unique.
pub const UNIQUE_WINDOW_MS: i64 = 24 * 3_600_000;

/// Whether a click at `at_ms` is unique after the visitor's last click at `last_ms`.
pub fn is_unique(last_ms: Option<i64>, at_ms: i64) -> bool {
    last_ms.is_none_or(|last| at_ms - last >= UNIQUE_WINDOW_MS)
}

/// Folds `clicks.v1.recorded` and `clicks.v1.recorded_batch`. A click seen twice (re-published after the
/// duplicate window) counts once.
#[derive(Debug, Default)]
pub struct ClicksFold;

impl Fold for ClicksFold {
    fn format(&self) -> u32 {
        FORMAT
    }

    fn apply(&mut self, staged: &mut Staged<'_>, entry: &LogEntry<'_>) -> Result<(), sled::Error> {
        let Ok(clicks) = ClicksRecorded::each(entry.subject, entry.payload) else {
            tracing::warn!(seq = entry.seq, "undecodable batch of clicks skipped");
            return Ok(());
        };
        for payload in &clicks {
            apply_click(staged, &LogEntry { payload, ..*entry })?;
        }
        Ok(())
    }
}

/// Folds one click (`entry.payload`, alone or out of a batch).
fn apply_click(staged: &mut Staged<'_>, entry: &LogEntry<'_>) -> Result<(), sled::Error> {
    let click = match ClickRecorded::decode(entry.payload) {
        Ok(c) if !c.click_id.is_empty() => c,
        _ => {
            tracing::warn!(
                seq = entry.seq,
                subject = entry.subject,
                "undecodable click skipped"
            );
            return Ok(());
        }
    };
    let key = click_key(&click.click_id);
    if staged.contains(&key)? {
        return Ok(());
    }
    let last = visitors::visit(
        staged,
        &Visitor::of(&click),
        click.occurred_at_ms,
        entry.log_time_ms,
    )?;
    let unique = is_unique(last, click.occurred_at_ms);
    staged.insert(key, click_row(entry.payload, unique));
    tally(staged, count_key('o', &click.offer_id), unique)?;
    tally(staged, count_key('a', &click.affiliate_id), unique)?;
    Ok(())
}

/// Read access to the clicks Tree.
#[derive(Clone, Debug)]
pub struct Clicks {
    tree: sled::Tree,
}

impl Clicks {
    /// Reads the Tree [`ClicksFold`] writes.
    pub fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    /// Whether the click is in the projection.
    ///
    /// # Errors
    /// sled read failure.
    pub fn contains(&self, click_id: &str) -> Result<bool, sled::Error> {
        self.tree.contains_key(click_key(click_id))
    }

    /// One click.
    ///
    /// # Errors
    /// sled read failure.
    pub fn get(&self, click_id: &str) -> Result<Option<ClickRecorded>, sled::Error> {
        Ok(self.get_with_unique(click_id)?.map(|(click, _)| click))
    }

    /// One click and whether it was unique, from its one row.
    ///
    /// # Errors
    /// sled read failure.
    pub fn get_with_unique(
        &self,
        click_id: &str,
    ) -> Result<Option<(ClickRecorded, bool)>, sled::Error> {
        Ok(self.tree.get(click_key(click_id))?.and_then(|row| {
            let (flags, record) = row.split_first()?;
            Some((ClickRecorded::decode(record).ok()?, flags & UNIQUE != 0))
        }))
    }

    /// Whether a click was unique (false: not in the projection).
    #[cfg(test)]
    fn is_unique(&self, click_id: &str) -> Result<bool, sled::Error> {
        Ok(self
            .get_with_unique(click_id)?
            .is_some_and(|(_, unique)| unique))
    }

    /// Clicks counted for an offer (`'o'`) or affiliate (`'a'`).
    ///
    /// # Errors
    /// sled read failure.
    pub fn count(&self, kind: char, id: &str) -> Result<Tally, sled::Error> {
        Ok(self
            .tree
            .get(count_key(kind, id))?
            .map_or_else(Tally::default, |v| Tally::decode(&v)))
    }

    /// Every click counter of one kind, by id.
    ///
    /// # Errors
    /// sled read failure.
    pub fn counts(&self, kind: char) -> Result<Vec<(String, Tally)>, sled::Error> {
        let prefix = count_key(kind, "");
        let mut out = Vec::new();
        for row in self.tree.scan_prefix(&prefix) {
            let (k, v) = row?;
            let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((id, Tally::decode(&v)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_within_24_hours() {
        assert!(is_unique(None, 5));
        assert!(!is_unique(Some(0), UNIQUE_WINDOW_MS - 1));
        assert!(is_unique(Some(0), UNIQUE_WINDOW_MS));
    }

    #[test]
    fn a_tally_row_holds_both_counts() {
        let tally = Tally::default().count(true).count(false).count(true);
        assert_eq!(
            tally,
            Tally {
                clicks: 3,
                unique: 2
            }
        );
        assert_eq!(Tally::decode(&tally.encode()), tally);
        assert_eq!(tally.encode().len(), 16);
        assert_eq!(Tally::decode(&[]), Tally::default());
    }

    #[test]
    fn repeat_visitors_count_gross_not_unique() {
        let dir = tempfile::tempdir().unwrap();
        let db = common::store::open_db(dir.path()).unwrap();
        let tree = common::FoldTree::open(&db, "clicks").unwrap();
        let mut staged = Staged::new(&tree);
        let click = |id: &str, ip: &str, at: i64| {
            ClickRecorded {
                click_id: id.into(),
                offer_id: "o1".into(),
                affiliate_id: "a1".into(),
                ip: ip.into(),
                user_agent: "ua".into(),
                occurred_at_ms: at,
                ..Default::default()
            }
            .encode_to_vec()
        };
        let day = UNIQUE_WINDOW_MS;
        // c2 and c3 were recorded together: one message, folded as two.
        let batch = ClicksRecorded {
            clicks: vec![click("c2", "1.1.1.1", 10), click("c3", "2.2.2.2", 20)],
        }
        .encode_to_vec();
        let events = [
            (proto::subject::CLICK_RECORDED, click("c1", "1.1.1.1", 0)),
            (proto::subject::CLICKS_RECORDED_BATCH, batch),
            (
                proto::subject::CLICK_RECORDED,
                click("c4", "1.1.1.1", day + 10),
            ),
        ];
        for (i, (subject, payload)) in events.iter().enumerate() {
            let entry = LogEntry {
                subject,
                payload,
                seq: i as u64 + 1,
                log_time_ms: 0,
            };
            ClicksFold.apply(&mut staged, &entry).unwrap();
        }
        staged.commit(3).unwrap();
        let clicks = Clicks::new(tree.rows().clone());
        let unique: Vec<bool> = ["c1", "c2", "c3", "c4"]
            .iter()
            .map(|c| clicks.is_unique(c).unwrap())
            .collect();
        assert_eq!(unique, [true, false, true, true]);
        assert_eq!(
            clicks.counts('o').unwrap(),
            vec![(
                "o1".to_owned(),
                Tally {
                    clicks: 4,
                    unique: 3
                }
            )]
        );
    }

    #[test]
    fn a_click_counts_once_and_garbage_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let db = common::store::open_db(dir.path()).unwrap();
        let tree = common::FoldTree::open(&db, "clicks").unwrap();
        let click = ClickRecorded {
            click_id: "c1".into(),
            offer_id: "o1".into(),
            affiliate_id: "a1".into(),
            ..Default::default()
        }
        .encode_to_vec();
        // Re-published later inside a batch, beside garbage.
        let batch = ClicksRecorded {
            clicks: vec![vec![0xff], click.clone()],
        }
        .encode_to_vec();
        let (one, many) = (
            proto::subject::CLICK_RECORDED,
            proto::subject::CLICKS_RECORDED_BATCH,
        );
        let mut staged = Staged::new(&tree);
        let entries = [
            (one, &click[..]),
            (one, &[0xff][..]),
            (one, &click[..]),
            (many, &batch[..]),
            (many, &[0xff][..]),
        ];
        for (seq, (subject, payload)) in (1..).zip(entries) {
            let entry = LogEntry {
                subject,
                payload,
                seq,
                log_time_ms: 0,
            };
            ClicksFold.apply(&mut staged, &entry).unwrap();
        }
        staged.commit(5).unwrap();
        let clicks = Clicks::new(tree.rows().clone());
        assert_eq!(clicks.get("c1").unwrap().unwrap().offer_id, "o1");
        assert!(clicks.is_unique("c1").unwrap());
        let one = Tally {
            clicks: 1,
            unique: 1,
        };
        assert_eq!(clicks.count('o', "o1").unwrap(), one);
        assert_eq!(clicks.counts('a').unwrap(), vec![("a1".to_owned(), one)]);
    }
}
