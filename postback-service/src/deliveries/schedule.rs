//! The dispatcher's own state in sled: the retry schedule and its queue cursor.
//!
//! Not a projection of the log: attempts in progress are not events. A restart
//! resumes each delivery at its stored attempt count and time; a wiped data dir
//! starts the unfinished ones afresh, and never re-sends one the log records as
//! delivered.

use serde::{Deserialize, Serialize};

const CURSOR_KEY: &[u8] = b"~cursor";

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
            next_at_ms: 0,
            last_status: 0,
            last_error: String::new(),
            last_body: String::new(),
            created_at_ms: common::time::now_ms(),
            unpublished: None,
        }
    }

    /// A fresh run of attempts (generation `generation`) of a delivery the log
    /// already knows, to the URL it recorded.
    pub fn again(outcome: super::Outcome, generation: u32) -> Self {
        let target = Target {
            delivery_id: outcome.delivery_id,
            conversion_id: outcome.conversion_id,
            affiliate_id: outcome.affiliate_id,
            offer_id: outcome.offer_id,
            click_id: outcome.click_id,
            url: outcome.url,
            status: approved(),
        };
        Self::fresh(target, generation)
    }
}

fn key(delivery_id: &str) -> Vec<u8> {
    [b"s/", delivery_id.as_bytes()].concat()
}

/// The schedule Tree.
#[derive(Clone, Debug)]
pub struct ScheduleStore {
    tree: sled::Tree,
}

impl ScheduleStore {
    /// Over its own Tree.
    pub fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    /// One schedule.
    ///
    /// # Errors
    /// sled failure.
    pub fn get(&self, delivery_id: &str) -> Result<Option<Schedule>, sled::Error> {
        common::store::get_json(&self.tree, &key(delivery_id))
    }

    /// Writes a schedule and flushes (a restart must see it).
    ///
    /// # Errors
    /// sled failure.
    pub async fn put(&self, s: &Schedule) -> Result<(), sled::Error> {
        self.tree.insert(
            key(&s.delivery_id),
            serde_json::to_vec(s).unwrap_or_default(),
        )?;
        common::store::flush(&self.tree).await?;
        Ok(())
    }

    /// Removes a finished schedule.
    ///
    /// # Errors
    /// sled failure.
    pub async fn remove(&self, delivery_id: &str) -> Result<(), sled::Error> {
        self.tree.remove(key(delivery_id))?;
        common::store::flush(&self.tree).await?;
        Ok(())
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

    /// How far the queue of attributed conversions has been walked.
    ///
    /// # Errors
    /// sled failure.
    pub fn cursor(&self) -> Result<u64, sled::Error> {
        Ok(self
            .tree
            .get(CURSOR_KEY)?
            .map_or(0, |v| common::store::decode_u64(&v)))
    }

    /// Adds new schedules and moves the cursor, atomically, and flushes.
    ///
    /// # Errors
    /// sled failure.
    pub async fn enqueue(&self, new: &[Schedule], cursor: u64) -> Result<(), sled::Error> {
        let mut batch = sled::Batch::default();
        for s in new {
            batch.insert(
                key(&s.delivery_id),
                serde_json::to_vec(s).unwrap_or_default(),
            );
        }
        batch.insert(CURSOR_KEY, cursor.to_be_bytes().to_vec());
        self.tree.apply_batch(batch)?;
        common::store::flush(&self.tree).await?;
        Ok(())
    }
}
