//! The dispatcher's in-memory view of due deliveries: one queue per target
//! host, so a saturated or dead host never holds back another host's
//! deliveries, and starting one costs O(1) instead of a walk over a backlog.
//!
//! The durable truth stays in the schedule store's due index (time-ordered);
//! [`Ready`] reads it incrementally: [`Ready::scan_from`] says from which due
//! time on the index has not been read yet (inclusive, so a delivery due in
//! the same millisecond as the last scan is still found; ids already known are
//! ignored). A delivery that ends with its schedule due *before* that point
//! (an attempt cut short, a storage error) is put back by [`Ready::finish`],
//! since no scan will read it again. Scans and finishes must be serialised
//! (the dispatcher holds one lock over each), so a schedule written while a
//! scan was reading is either read by the scan or put back by its finish.

use std::collections::{HashMap, HashSet, VecDeque};

/// Most deliveries queued for one host. A dead or slow host's backlog would
/// otherwise fill the dispatcher's whole room ([`Ready::len`] is bounded), and
/// then no other host's due delivery would be read. The scan reads past the
/// ones refused; once their host's queue is down to half, the index is read
/// again from the earliest of them.
pub const MAX_WAITING_PER_HOST: usize = 2048;

/// Due deliveries by host, and the ones started.
#[derive(Debug, Default)]
pub struct Ready {
    scanned_ms: i64,
    hosts: HashMap<String, HostQueue>,
    /// Queued or started.
    known: HashSet<String>,
    /// Hosts that had a due delivery refused for a full queue, and the
    /// earliest due time refused (the scan read past it).
    refused: Option<(HashSet<String>, i64)>,
}

#[derive(Debug, Default)]
struct HostQueue {
    waiting: VecDeque<String>,
    started: usize,
}

impl Ready {
    /// The due time from which the index must still be read (inclusive).
    pub fn scan_from(&self) -> i64 {
        self.scanned_ms
    }

    /// Records that the index was read up to `upto_ms` (inclusive).
    pub fn scanned(&mut self, upto_ms: i64) {
        self.scanned_ms = self.scanned_ms.max(upto_ms);
    }

    /// Makes the next scan read the whole index again (a safety net against a
    /// wall clock that stepped back; known ids are not queued twice).
    pub fn rescan(&mut self) {
        self.scanned_ms = 0;
    }

    /// Makes the next scan read the index from `due_ms` on: new schedules
    /// are due "now" by the wall clock, which may have stepped back behind
    /// the last scan; they would otherwise wait for the next full rescan.
    pub fn rewind_to(&mut self, due_ms: i64) {
        self.scanned_ms = self.scanned_ms.min(due_ms);
    }

    /// Queues a delivery for `host`, due at `due_at`, unless it is already
    /// queued or started. When `host` already has [`MAX_WAITING_PER_HOST`]
    /// waiting, it is left in the index and read again later.
    pub fn offer(&mut self, delivery_id: &str, host: &str, due_at: i64) {
        if self.known.contains(delivery_id) {
            return;
        }
        let queue = self.hosts.entry(host.to_owned()).or_default();
        if queue.waiting.len() >= MAX_WAITING_PER_HOST {
            let (hosts, from) = self.refused.get_or_insert_with(|| (HashSet::new(), due_at));
            hosts.insert(host.to_owned());
            *from = (*from).min(due_at);
            return;
        }
        self.known.insert(delivery_id.to_owned());
        queue.waiting.push_back(delivery_id.to_owned());
    }

    /// Queued or started deliveries.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether nothing is queued or started.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Takes the deliveries to start now, oldest first per host, so that no host
    /// has more than `per_host` started; returns (delivery id, host).
    pub fn take_startable(&mut self, per_host: usize) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (host, queue) in &mut self.hosts {
            while queue.started < per_host {
                let Some(id) = queue.waiting.pop_front() else {
                    break;
                };
                queue.started += 1;
                out.push((id, host.clone()));
            }
        }
        self.hosts
            .retain(|_, q| q.started > 0 || !q.waiting.is_empty());
        if let Some((hosts, from)) = &self.refused {
            let has_room = |h: &String| {
                self.hosts
                    .get(h)
                    .is_none_or(|q| q.waiting.len() <= MAX_WAITING_PER_HOST / 2)
            };
            if hosts.iter().any(has_room) {
                self.scanned_ms = self.scanned_ms.min(*from);
                self.refused = None;
            }
        }
        out
    }

    /// A started delivery is over. `still_due_at`: its schedule's due time if it
    /// still has one; one due before [`Self::scan_from`] is queued again.
    pub fn finish(&mut self, delivery_id: &str, host: &str, still_due_at: Option<i64>) {
        if let Some(queue) = self.hosts.get_mut(host) {
            queue.started = queue.started.saturating_sub(1);
        }
        self.known.remove(delivery_id);
        if let Some(at) = still_due_at.filter(|at| *at < self.scanned_ms) {
            self.offer(delivery_id, host, at);
        }
        if self
            .hosts
            .get(host)
            .is_some_and(|q| q.started == 0 && q.waiting.is_empty())
        {
            self.hosts.remove(host);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(started: &[(String, String)]) -> Vec<&str> {
        let mut v: Vec<&str> = started.iter().map(|(id, _)| id.as_str()).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn a_busy_host_does_not_hold_back_another() {
        let mut r = Ready::default();
        for i in 0..5 {
            r.offer(&format!("slow{i}"), "slow:80", 0);
        }
        r.offer("fast0", "fast:80", 0);
        assert_eq!(ids(&r.take_startable(2)), ["fast0", "slow0", "slow1"]);
        assert!(
            r.take_startable(2).is_empty(),
            "both hosts are at their limit"
        );
        r.finish("fast0", "fast:80", None);
        r.offer("fast1", "fast:80", 0);
        assert_eq!(ids(&r.take_startable(2)), ["fast1"]);
        r.finish("slow0", "slow:80", None);
        assert_eq!(ids(&r.take_startable(2)), ["slow2"], "oldest first");
        assert_eq!(r.len(), 5);
    }

    #[test]
    fn a_hosts_backlog_leaves_room_for_the_others_and_is_read_again() {
        let mut r = Ready::default();
        let max = MAX_WAITING_PER_HOST;
        for i in 0..max + 10 {
            r.offer(&format!("busy{i}"), "busy:80", 100 + i as i64);
        }
        r.offer("other0", "other:80", 5_000);
        r.scanned(10_000);
        assert_eq!(r.len(), max + 1, "ten left in the index");
        assert_eq!(ids(&r.take_startable(1)), ["busy0", "other0"]);
        assert_eq!(r.scan_from(), 10_000, "the busy queue is still full");
        // The busy host works through half its queue: the index is read
        // again from the first delivery refused.
        let started = r.take_startable(max / 2);
        assert_eq!(started.len(), max / 2 - 1);
        assert_eq!(r.scan_from(), 100 + max as i64);
        r.offer(&format!("busy{max}"), "busy:80", 100 + max as i64);
        assert_eq!(r.len(), max + 2);
    }

    #[test]
    fn known_deliveries_are_not_queued_twice() {
        let mut r = Ready::default();
        r.offer("a", "h:80", 0);
        r.offer("a", "h:80", 0);
        assert_eq!(r.take_startable(8).len(), 1);
        r.offer("a", "h:80", 0);
        assert!(r.take_startable(8).is_empty(), "started: still known");
    }

    #[test]
    fn a_delivery_left_due_behind_the_scan_is_queued_again() {
        let mut r = Ready::default();
        r.offer("a", "h:80", 0);
        r.offer("b", "h:80", 0);
        r.offer("c", "h:80", 0);
        r.take_startable(8);
        r.scanned(1_000);
        r.finish("a", "h:80", Some(500)); // cut short: the scan will not see it again
        r.finish("b", "h:80", Some(2_000)); // retried later: the scan will
        r.finish("c", "h:80", None); // done
        assert_eq!(ids(&r.take_startable(8)), ["a"]);
        assert_eq!(r.scan_from(), 1_000);
        r.scanned(10);
        assert_eq!(r.scan_from(), 1_000, "never walks back");
        r.rewind_to(2_000);
        assert_eq!(r.scan_from(), 1_000, "a later due time leaves it");
        r.rewind_to(400);
        assert_eq!(
            r.scan_from(),
            400,
            "an earlier one (a clock stepped back) rewinds it"
        );
        r.rescan();
        assert_eq!(r.scan_from(), 0, "unless told to");
    }
}
