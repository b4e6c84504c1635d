//! The dispatcher's own state in sled: the retry schedule and its queue cursor.
//!
//! Not a projection of the log: attempts in progress are not events. A restart
//! resumes each delivery at its stored attempt count and time; a wiped data dir
//! starts the unfinished ones afresh, and never re-sends one the log records as
//! delivered.

use serde::{Deserialize, Serialize};

/// The queue position walked to ([`crate::conversions::queue_position`]).
const CURSOR_KEY: &[u8] = b"~queue-cursor";
/// Before format 12 of the conversions fold the queue was keyed by stream
/// sequence alone, and the cursor was one: read as the end of that sequence.
const SEQ_CURSOR_KEY: &[u8] = b"~cursor";
/// The log the cursor walked ([`common::store::log_of`] of the conversions
/// Tree): a cursor of another log is no cursor.
const CURSOR_LOG_KEY: &[u8] = b"~cursor-log";

/// An outcome event waiting to be published (the attempt is done; only the
/// record is missing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unpublished {
    pub subject: String,
    pub msg_id: String,
    pub payload: Vec<u8>,
}

/// One delivery not finished yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub delivery_id: String,
    pub conversion_id: String,
    pub affiliate_id: String,
    pub offer_id: String,
    pub click_id: String,
    /// The URL to request, macros filled.
    pub url: String,
    /// The status event told: approved, pending, rejected.
    #[serde(default = "approved")]
    pub status: String,
    pub generation: u32,
    /// Attempts made in this generation.
    pub attempts: u32,
    /// 0: none yet.
    pub first_attempt_ms: i64,
    pub next_at_ms: i64,
    pub last_status: u32,
    pub last_error: String,
    pub last_body: String,
    pub created_at_ms: i64,
    pub unpublished: Option<Unpublished>,
    /// The attempt number durably set aside for the next request (0: none),
    /// and by which run of the dispatcher (see [`Schedule::take_attempt`]).
    #[serde(default)]
    pub reserved_attempt: u32,
    #[serde(default)]
    pub reserved_by: u64,
}

fn approved() -> String {
    "approved".to_owned()
}

/// Where one delivery goes.
#[derive(Debug, Clone)]
pub struct Target {
    pub delivery_id: String,
    pub conversion_id: String,
    pub affiliate_id: String,
    pub offer_id: String,
    pub click_id: String,
    /// The URL to request, macros filled.
    pub url: String,
    pub status: String,
}

impl Schedule {
    /// A first run of attempts (generation `generation`) to `target`, due now.
    pub fn fresh(target: Target, generation: u32) -> Self {
        let now = common::time::now_ms();
        Self {
            delivery_id: target.delivery_id,
            conversion_id: target.conversion_id,
            affiliate_id: target.affiliate_id,
            offer_id: target.offer_id,
            click_id: target.click_id,
            url: target.url,
            status: target.status,
            generation,
            attempts: 0,
            first_attempt_ms: 0,
            next_at_ms: now,
            last_status: 0,
            last_error: String::new(),
            last_body: String::new(),
            created_at_ms: now,
            unpublished: None,
            reserved_attempt: 0,
            reserved_by: 0,
        }
    }

    /// A fresh run of attempts (generation `generation`) of a delivery the log
    /// already knows, to the URL it recorded, telling the status its id is of
    /// (the outcome does not carry it): a reversal retried stays a reversal,
    /// and so waits for the approval scheduled before it.
    pub fn again(outcome: super::Outcome, generation: u32) -> Self {
        let status = super::status_of_delivery(
            &outcome.delivery_id,
            &outcome.conversion_id,
            &outcome.affiliate_id,
        )
        .map_or_else(approved, |status| status.name().to_owned());
        let target = Target {
            delivery_id: outcome.delivery_id,
            conversion_id: outcome.conversion_id,
            affiliate_id: outcome.affiliate_id,
            offer_id: outcome.offer_id,
            click_id: outcome.click_id,
            url: outcome.url,
            status,
        };
        Self::fresh(target, generation)
    }

    /// Sets the next attempt number aside for dispatcher run `run`; it is
    /// durable once this schedule is written and flushed.
    pub fn reserve_next(&mut self, run: u64) {
        self.reserved_attempt = self.attempts.max(self.reserved_attempt) + 1;
        self.reserved_by = run;
    }

    /// This schedule with its next attempt number reserved for run `run`.
    pub fn reserved_for(mut self, run: u64) -> Self {
        self.reserve_next(run);
        self
    }

    /// Counts an attempt about to be sent by dispatcher run `run`. True when
    /// its number was reserved by this run and so is already durable; false
    /// when the schedule must be written (and flushed) before the request goes
    /// out: a reservation left by an earlier run may have been sent before that
    /// run stopped, so its number is never used again.
    pub fn take_attempt(&mut self, run: u64) -> bool {
        let durable = (self.reserved_by == run || self.reserved_by == RELEASED)
            && self.reserved_attempt == self.attempts + 1;
        if !durable {
            self.reserve_next(run);
        }
        self.attempts = self.reserved_attempt;
        durable
    }
}

/// `reserved_by` of a reservation whose run stopped cleanly, with nothing in
/// flight: any later run may use it.
pub const RELEASED: u64 = 0;

fn key(delivery_id: &str) -> Vec<u8> {
    [b"s/", delivery_id.as_bytes()].concat()
}

/// The due index: `d/` + due time (big-endian ms) + delivery id, valued with
/// the target's host, so finding due schedules is a range scan that can pass
/// over a saturated host without decoding anything.
fn due_key(next_at_ms: i64, delivery_id: &str) -> Vec<u8> {
    let at = u64::try_from(next_at_ms).unwrap_or(0).to_be_bytes();
    [b"d/".as_slice(), &at, delivery_id.as_bytes()].concat()
}

/// Where the delivery id starts in a due key.
const DUE_ID_AT: usize = 10;

/// `host:port` of a URL, the unit of per-host concurrency.
pub fn host_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .map(|u| {
            format!(
                "{}:{}",
                u.host_str().unwrap_or(""),
                u.port_or_known_default().unwrap_or(0)
            )
        })
        .unwrap_or_default()
}

/// Stages `s`'s due index entry.
fn stage_due(writes: &mut common::store::Writes, s: &Schedule) {
    writes.insert(
        due_key(s.next_at_ms, &s.delivery_id),
        host_of(&s.url).as_bytes(),
    );
}

/// Stages `s` and its due index entry.
fn stage(writes: &mut common::store::Writes, s: &Schedule) {
    stage_due(writes, s);
    writes.insert(
        key(&s.delivery_id),
        serde_json::to_vec(s).unwrap_or_default(),
    );
}

/// One entry of the due index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub at_ms: i64,
    pub delivery_id: String,
    pub host: String,
}

/// The schedule Tree.
#[derive(Clone, Debug)]
pub struct ScheduleStore {
    tree: sled::Tree,
    durable: common::store::GroupFlush,
}

impl ScheduleStore {
    /// Over its own Tree, flushed by `durable` (the database's shared flusher).
    pub fn new(tree: sled::Tree, durable: common::store::GroupFlush) -> Self {
        Self { tree, durable }
    }

    /// One schedule.
    ///
    /// # Errors
    /// sled failure.
    pub fn get(&self, delivery_id: &str) -> Result<Option<Schedule>, sled::Error> {
        common::store::get_json(&self.tree, &key(delivery_id))
    }

    /// Writes a schedule and flushes (a restart must see it). Concurrent writers
    /// share their flushes.
    ///
    /// # Errors
    /// sled failure.
    pub async fn put(&self, s: &Schedule) -> Result<(), sled::Error> {
        // Single-key writes (no sled batch, see `common::store::Writes`), in an
        // order whose every prefix recovery handles: a due entry missing or
        // stale is rebuilt by `reindex` at start or re-checked before an attempt.
        let mut writes = common::store::Writes::default();
        if let Some(old) = self.get(&s.delivery_id)? {
            writes.remove(due_key(old.next_at_ms, &old.delivery_id));
        }
        stage(&mut writes, s);
        writes.apply(&self.tree)?;
        self.durable.flush().await
    }

    /// Removes a finished schedule, without waiting for a flush: only schedules
    /// whose outcome is already in the log are removed, and one that comes back
    /// after a crash is dropped by the dispatcher when it finds that outcome in
    /// the log, never sent again.
    ///
    /// # Errors
    /// sled failure.
    pub fn remove(&self, delivery_id: &str) -> Result<(), sled::Error> {
        let mut writes = common::store::Writes::default();
        if let Some(old) = self.get(delivery_id)? {
            writes.remove(due_key(old.next_at_ms, delivery_id));
        }
        writes.remove(key(delivery_id));
        writes.apply(&self.tree)
    }

    /// Every schedule.
    ///
    /// # Errors
    /// sled failure.
    pub fn all(&self) -> Result<Vec<Schedule>, sled::Error> {
        let mut out = Vec::new();
        for row in self.tree.scan_prefix(b"s/") {
            let (_, v) = row?;
            if let Ok(s) = serde_json::from_slice(&v) {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// The schedules due from `from_ms` to `to_ms` (both inclusive), earliest
    /// first, lazily.
    pub fn due_between(
        &self,
        from_ms: i64,
        to_ms: i64,
    ) -> impl Iterator<Item = Result<Due, sled::Error>> + '_ {
        let range = due_key(from_ms, "")..due_key(to_ms.saturating_add(1), "");
        self.tree.range(range).map(|row| {
            let (k, v) = row?;
            let mut at = [0u8; 8];
            at.copy_from_slice(k.get(2..DUE_ID_AT).unwrap_or(&[0; 8]));
            Ok(Due {
                at_ms: i64::try_from(u64::from_be_bytes(at)).unwrap_or(i64::MAX),
                delivery_id: String::from_utf8_lossy(k.get(DUE_ID_AT..).unwrap_or_default())
                    .into_owned(),
                host: String::from_utf8_lossy(&v).into_owned(),
            })
        })
    }

    /// Hands the attempt numbers reserved by dispatcher run `run` to whichever
    /// run comes next; only once nothing of `run` is in flight (a clean stop).
    ///
    /// # Errors
    /// sled failure.
    pub async fn release_reservations(&self, run: u64) -> Result<(), sled::Error> {
        let mut writes = common::store::Writes::default();
        for mut s in self.all()? {
            if s.reserved_by == run {
                s.reserved_by = RELEASED;
                stage(&mut writes, &s);
            }
        }
        writes.apply(&self.tree)?;
        self.durable.flush().await
    }

    /// Rebuilds the due index from the schedules (for schedules written before
    /// the index existed; idempotent).
    ///
    /// # Errors
    /// sled failure.
    pub fn reindex(&self) -> Result<(), sled::Error> {
        let mut writes = common::store::Writes::default();
        for s in self.all()? {
            stage_due(&mut writes, &s);
        }
        writes.apply(&self.tree)
    }

    /// How far the queue of attributed conversions of `log` has been walked:
    /// 0 when the cursor is of another log. The conversions stream was created
    /// again meanwhile and its sequences started at 1; the new log's queue is
    /// walked from its start (what is already scheduled or delivered under the
    /// same delivery id is skipped as ever). `None` (a cursor or a Tree written
    /// before logs were told apart) matches any log.
    ///
    /// # Errors
    /// sled failure.
    pub fn cursor(&self, log: Option<&[u8]>) -> Result<u64, sled::Error> {
        if let (Some(walked), Some(log)) = (self.tree.get(CURSOR_LOG_KEY)?, log) {
            if walked != log {
                return Ok(0);
            }
        }
        if let Some(v) = self.tree.get(CURSOR_KEY)? {
            return Ok(common::store::decode_u64(&v));
        }
        Ok(self.tree.get(SEQ_CURSOR_KEY)?.map_or(0, |v| {
            crate::conversions::queue_end(common::store::decode_u64(&v))
        }))
    }

    /// Adds new schedules and moves the cursor of `log`, atomically, and
    /// flushes.
    ///
    /// # Errors
    /// sled failure.
    pub async fn enqueue(
        &self,
        new: &[Schedule],
        cursor: u64,
        log: Option<&[u8]>,
    ) -> Result<(), sled::Error> {
        let mut writes = common::store::Writes::default();
        for s in new {
            stage(&mut writes, s);
        }
        writes.insert(CURSOR_KEY, cursor.to_be_bytes().to_vec());
        writes.remove(SEQ_CURSOR_KEY);
        if let Some(log) = log {
            writes.insert(CURSOR_LOG_KEY, log.to_vec());
        }
        writes.apply(&self.tree)?;
        self.durable.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(id: &str, next_at_ms: i64) -> Schedule {
        let target = Target {
            delivery_id: id.into(),
            conversion_id: String::new(),
            affiliate_id: String::new(),
            offer_id: String::new(),
            click_id: String::new(),
            url: "http://x/".into(),
            status: "approved".into(),
        };
        Schedule {
            next_at_ms,
            ..Schedule::fresh(target, 1)
        }
    }

    #[test]
    fn a_delivery_sent_again_tells_the_status_it_told_before() {
        use catalog::ConversionStatus::{Approved, Pending, Rejected};
        for status in [Pending, Approved, Rejected] {
            let id = crate::deliveries::status_delivery_id("conv", "aff", status);
            let outcome = crate::deliveries::Outcome::failed_for_test(id, "conv", "aff");
            assert_eq!(Schedule::again(outcome, 2).status, status.name());
        }
    }

    #[test]
    fn an_attempt_number_is_never_used_twice_across_runs() {
        let mut s = schedule("a", 0);
        s.reserve_next(1); // enqueued by run 1
        assert!(s.take_attempt(1), "run 1 uses its own reservation");
        assert_eq!(s.attempts, 1);
        s.reserve_next(1); // the retry is scheduled
        assert_eq!(s.reserved_attempt, 2);
        // Run 1 stops; run 2 cannot know whether attempt 2 went out.
        assert!(!s.take_attempt(2), "must be written before sending");
        assert_eq!(s.attempts, 3);
        s.reserve_next(2);
        s.reserved_by = RELEASED; // run 2 stopped cleanly
        assert!(s.take_attempt(3), "a released reservation is anyone's");
        assert_eq!(s.attempts, 4);
        let mut fresh = schedule("b", 0);
        assert!(!fresh.take_attempt(7), "nothing reserved");
        assert_eq!(fresh.attempts, 1);
    }

    #[tokio::test]
    async fn a_cursor_of_stream_sequences_is_read_as_queue_positions() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("dispatch").unwrap();
        let store = ScheduleStore::new(tree.clone(), common::store::GroupFlush::new(tree));
        assert_eq!(store.cursor(None).unwrap(), 0, "none yet");
        // Written before the queue was keyed by position: sequence 7 walked.
        store
            .tree
            .insert(SEQ_CURSOR_KEY, &7u64.to_be_bytes())
            .unwrap();
        let walked = store.cursor(None).unwrap();
        assert_eq!(walked, crate::conversions::queue_end(7));
        assert!(walked < crate::conversions::queue_position(8, 0));
        store.enqueue(&[], walked + 1, None).await.unwrap();
        assert_eq!(store.cursor(None).unwrap(), walked + 1);
        assert!(store.tree.get(SEQ_CURSOR_KEY).unwrap().is_none());
    }

    #[tokio::test]
    async fn the_due_index_follows_puts_and_removes() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("dispatch").unwrap();
        let store = ScheduleStore::new(tree.clone(), common::store::GroupFlush::new(tree));
        store
            .enqueue(&[schedule("a", 0), schedule("b", 0)], 7, Some(b"log-1"))
            .await
            .unwrap();
        store.put(&schedule("c", 500)).await.unwrap();
        let due = |from, to| {
            store
                .due_between(from, to)
                .map(|d| d.unwrap().delivery_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(due(0, 100), ["a", "b"]);
        store.put(&schedule("a", 1000)).await.unwrap();
        assert_eq!(due(0, 100), ["b"], "a moved to later");
        assert_eq!(due(0, 1000), ["b", "c", "a"], "earliest first");
        assert_eq!(due(500, 1000), ["c", "a"], "both ends inclusive");
        let first = store.due_between(0, 1000).next().unwrap().unwrap();
        assert_eq!((first.at_ms, first.host.as_str()), (0, "x:80"));
        store.remove("b").unwrap();
        assert_eq!(due(0, 1000), ["c", "a"]);
        assert_eq!(
            (
                store.all().unwrap().len(),
                store.cursor(Some(b"log-1")).unwrap()
            ),
            (2, 7)
        );
        assert_eq!(store.cursor(None).unwrap(), 7, "a log not told");
        assert_eq!(
            store.cursor(Some(b"log-2")).unwrap(),
            0,
            "the stream was created again: its queue from the start"
        );
        store.tree.remove(due_key(500, "c")).unwrap();
        store.reindex().unwrap();
        assert_eq!(due(0, 1000), ["c", "a"], "reindex restores a lost entry");
    }
}
