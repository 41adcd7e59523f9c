//! The campaign's rate limit as this process applies it. With several
//! workers on one campaign each takes its share of `[delivery] rate`, and
//! the share changes while it runs (a worker joins or dies), so the limiter
//! can be replaced; injectors read the current one before each message.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// A rate limit in messages per second that may change; 0 = none.
#[derive(Debug)]
pub struct Rate {
    per_second: AtomicU32,
    limiter: RwLock<Option<Arc<DefaultDirectRateLimiter>>>,
}

impl Rate {
    /// `per_second` messages a second at most; 0 = unlimited.
    pub fn new(per_second: u32) -> Arc<Rate> {
        Arc::new(Rate {
            per_second: AtomicU32::new(per_second),
            limiter: RwLock::new(limiter(per_second)),
        })
    }

    /// The limit now.
    pub fn per_second(&self) -> u32 {
        self.per_second.load(Ordering::Relaxed)
    }

    /// Changes the limit (no-op when it is the same).
    pub fn set(&self, per_second: u32) {
        if self.per_second.swap(per_second, Ordering::Relaxed) == per_second {
            return;
        }
        *self.limiter.write().unwrap_or_else(|p| p.into_inner()) = limiter(per_second);
    }

    /// The limiter to wait on, if any.
    pub fn current(&self) -> Option<Arc<DefaultDirectRateLimiter>> {
        self.limiter
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// One worker's share of a campaign rate among `workers` live ones
/// (at least 1 message a second when there is a rate at all).
pub fn share(rate: u32, workers: u64) -> u32 {
    if rate == 0 {
        return 0;
    }
    (u64::from(rate) / workers.max(1)).max(1) as u32
}

/// A limiter of `per_second` whose burst is a tenth of a second's worth:
/// a limiter replaced when the share changes (or a worker joining) starts
/// full, and a full second's burst per change would overshoot the rate.
fn limiter(per_second: u32) -> Option<Arc<DefaultDirectRateLimiter>> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = NonZeroU32::new(per_second / 10).unwrap_or(NonZeroU32::MIN);
    Some(Arc::new(RateLimiter::direct(
        Quota::per_second(rate).allow_burst(burst),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_split_the_campaign_rate() {
        assert_eq!(share(600, 3), 200);
        assert_eq!(share(600, 0), 600);
        assert_eq!(share(2, 3), 1);
        assert_eq!(share(0, 3), 0);
    }

    #[test]
    fn the_limiter_follows_the_rate() {
        let r = Rate::new(0);
        assert!(r.current().is_none());
        r.set(10);
        assert_eq!(r.per_second(), 10);
        let first = r.current().unwrap();
        r.set(10);
        assert!(
            Arc::ptr_eq(&first, &r.current().unwrap()),
            "same rate, same limiter"
        );
        r.set(20);
        assert!(!Arc::ptr_eq(&first, &r.current().unwrap()));
    }
}
