//! The CLICKS fold: each click kept as the bytes it has in the log (the record)
//! behind one byte of flags (unique or not), keyed by its UUID, plus gross and
//! unique click counters per offer and per affiliate.
//!
//! Rows: `c/<click_id>` the click ([`click_row`]), `f/<bucket>` the visitors'
//! last click times ([`visitors`]), `n/…` and `nu/…` the counters.
//!
//! A click is *unique* when the same (IP, user agent, offer, affiliate) has not
//! clicked in the 24 hours before it (event time). Decided in the fold, in log
//! order, so a replay reaches the same answer.

use common::{fold::Fold, store::decode_u64, LogEntry, Staged};
use prost::Message;
use proto::clicks::v1::ClickRecorded;

pub mod visitors;

use visitors::Visitor;

/// Row key of a click.
pub fn click_key(click_id: &str) -> Vec<u8> {
    [b"c/", click_id.as_bytes()].concat()
}

/// The rows' format ([`Fold::format`]). 2: a click's row carries its
/// unique flag (format 1 wrote a `cu/<click_id>` row per unique click: one
/// more write per click, a quarter of the fold's time). 3: visitors are kept
/// in bucket rows, not a row each ([`visitors`]).
const FORMAT: u32 = 3;

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

/// Counter key of unique clicks per offer (`o`) or affiliate (`a`).
pub fn unique_count_key(kind: char, id: &str) -> Vec<u8> {
    format!("nu/{kind}/{id}").into_bytes()
}

/// How long a visitor's repeat clicks are not unique.
pub const UNIQUE_WINDOW_MS: i64 = 24 * 3_600_000;

/// Whether a click at `at_ms` is unique after the visitor's last click at `last_ms`.
pub fn is_unique(last_ms: Option<i64>, at_ms: i64) -> bool {
    last_ms.is_none_or(|last| at_ms - last >= UNIQUE_WINDOW_MS)
}

/// Folds `clicks.v1.recorded`. A click seen twice (re-published after the
/// duplicate window) counts once.
#[derive(Debug, Default)]
pub struct ClicksFold;

impl Fold for ClicksFold {
    fn format(&self) -> u32 {
        FORMAT
    }

    fn apply(&mut self, staged: &mut Staged<'_>, entry: &LogEntry<'_>) -> Result<(), sled::Error> {
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
        staged.add_u64(count_key('o', &click.offer_id), 1)?;
        staged.add_u64(count_key('a', &click.affiliate_id), 1)?;
        let last = visitors::visit(
            staged,
            &Visitor::of(&click),
            click.occurred_at_ms,
            entry.log_time_ms,
        )?;
        let unique = is_unique(last, click.occurred_at_ms);
        staged.insert(key, click_row(entry.payload, unique));
        if unique {
            staged.add_u64(unique_count_key('o', &click.offer_id), 1)?;
            staged.add_u64(unique_count_key('a', &click.affiliate_id), 1)?;
        }
        Ok(())
    }
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
    pub fn count(&self, kind: char, id: &str) -> Result<u64, sled::Error> {
        Ok(self
            .tree
            .get(count_key(kind, id))?
            .map_or(0, |v| decode_u64(&v)))
    }

    /// Every click counter of one kind, by id.
    ///
    /// # Errors
    /// sled read failure.
    pub fn counts(&self, kind: char) -> Result<Vec<(String, u64)>, sled::Error> {
        self.counts_with(&format!("n/{kind}/"))
    }

    /// Every unique-click counter of one kind, by id.
    ///
    /// # Errors
    /// sled read failure.
    pub fn unique_counts(&self, kind: char) -> Result<Vec<(String, u64)>, sled::Error> {
        self.counts_with(&format!("nu/{kind}/"))
    }

    fn counts_with(&self, prefix: &str) -> Result<Vec<(String, u64)>, sled::Error> {
        let mut out = Vec::new();
        for row in self.tree.scan_prefix(prefix.as_bytes()) {
            let (k, v) = row?;
            let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((id, decode_u64(&v)));
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
    fn repeat_visitors_count_gross_not_unique() {
        let dir = tempfile::tempdir().unwrap();
        let db = common::store::open_db(dir.path()).unwrap();
        let tree = db.open_tree("clicks").unwrap();
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
        let events = [
            click("c1", "1.1.1.1", 0),
            click("c2", "1.1.1.1", 10),
            click("c3", "2.2.2.2", 20),
            click("c4", "1.1.1.1", day + 10),
        ];
        for (i, payload) in events.iter().enumerate() {
            let entry = LogEntry {
                subject: "clicks.v1.recorded",
                payload,
                seq: i as u64 + 1,
                log_time_ms: 0,
            };
            ClicksFold.apply(&mut staged, &entry).unwrap();
        }
        staged.commit(4).unwrap();
        let clicks = Clicks::new(tree);
        let unique: Vec<bool> = ["c1", "c2", "c3", "c4"]
            .iter()
            .map(|c| clicks.is_unique(c).unwrap())
            .collect();
        assert_eq!(unique, [true, false, true, true]);
        assert_eq!(clicks.counts('o').unwrap(), vec![("o1".to_owned(), 4)]);
        assert_eq!(
            clicks.unique_counts('o').unwrap(),
            vec![("o1".to_owned(), 3)]
        );
    }

    #[test]
    fn a_click_counts_once_and_garbage_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let db = common::store::open_db(dir.path()).unwrap();
        let tree = db.open_tree("clicks").unwrap();
        let click = ClickRecorded {
            click_id: "c1".into(),
            offer_id: "o1".into(),
            affiliate_id: "a1".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let mut staged = Staged::new(&tree);
        for (seq, payload) in [(1, &click[..]), (2, &[0xff][..]), (3, &click[..])] {
            let entry = LogEntry {
                subject: "clicks.v1.recorded",
                payload,
                seq,
                log_time_ms: 0,
            };
            ClicksFold.apply(&mut staged, &entry).unwrap();
        }
        staged.commit(3).unwrap();
        let clicks = Clicks::new(tree);
        assert_eq!(clicks.get("c1").unwrap().unwrap().offer_id, "o1");
        assert!(clicks.is_unique("c1").unwrap());
        assert_eq!(clicks.count('o', "o1").unwrap(), 1);
        assert_eq!(clicks.counts('a').unwrap(), vec![("a1".to_owned(), 1)]);
    }
}
