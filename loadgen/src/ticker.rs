//! When the next once-a-second progress line is due.

use std::time::{Duration, Instant};

/// Due once a second from its start.
#[derive(Debug)]
pub struct Ticker {
    started: Instant,
    next: Instant,
}

impl Ticker {
    /// Counting from `started`: the first line is due a second after it.
    pub fn from(started: Instant) -> Self {
        Self {
            started,
            next: started + Duration::from_secs(1),
        }
    }

    /// The time since the start when a line is due, and then not again
    /// before the next second; `None` in between.
    pub fn due(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if now < self.next {
            return None;
        }
        self.next += Duration::from_secs(1);
        Some(now.duration_since(self.started))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_once_a_second() {
        let mut ticker = Ticker::from(Instant::now() - Duration::from_millis(1500));
        let at = ticker.due().expect("a second has passed");
        assert!(at >= Duration::from_millis(1500));
        assert!(ticker.due().is_none(), "not again before the next second");
        assert!(Ticker::from(Instant::now()).due().is_none());
    }
}
