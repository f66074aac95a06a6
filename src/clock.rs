//! Wall-clock time with an adjustable offset, so that tests can move time forward (cooldowns,
//! budget periods) without sleeping. Production never moves it. A manual clock (tests) does not
//! follow the system clock at all: only `advance` moves it, so a deadline computed from it is
//! exact however long the machine takes between two steps of a test.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The time source shared by the parts that compare against deadlines.
#[derive(Clone, Default, Debug)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
    /// Stopped: `now_ms` is the offset alone, not the system time plus the offset.
    manual: bool,
}

fn system_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock stopped at the system's now that moves only when advanced (for tests).
    pub fn manual() -> Self {
        Self {
            offset_ms: Arc::new(AtomicI64::new(system_now_ms())),
            manual: true,
        }
    }

    /// Now, in unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        if self.manual {
            offset
        } else {
            system_now_ms() + offset
        }
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_moves_all_clones() {
        let c = Clock::system();
        let d = c.clone();
        let before = d.now_ms();
        c.advance(Duration::from_secs(3600));
        assert!(d.now_ms() - before >= 3_600_000);
    }

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let c = Clock::manual();
        let d = c.clone();
        let start = c.now_ms();
        assert!(
            (start - Clock::system().now_ms()).abs() < 60_000,
            "starts at the system's now"
        );
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(d.now_ms(), start, "real time passing does not move it");
        c.advance(Duration::from_millis(1500));
        assert_eq!(d.now_ms(), start + 1500);
    }
}
