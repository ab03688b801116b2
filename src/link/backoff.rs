//! How long to wait before dialling a lost peer again: exponential backoff with full
//! jitter, capped. Sans-IO: [`Backoff::next_delay`] returns a duration and the caller
//! sleeps (or a simulator advances its clock), so the policy is tested without time.
//!
//! The first retry comes after at most `first`, each later one after at most twice the
//! previous bound, never more than `cap`; the actual wait is drawn uniformly from
//! `[bound / 2, bound]`, so peers that lost each other at the same moment do not redial
//! in lock step, and a healed network is found again within `cap` of healing.
//! [`Backoff::reset`] after a link comes up starts over from `first`.
//!
//! ```
//! use switchboard::link::Backoff;
//! use std::time::Duration;
//!
//! let mut backoff = Backoff::seeded(Duration::from_millis(50), Duration::from_secs(1), 7);
//! let waits: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
//! assert!(waits.iter().all(|w| *w <= Duration::from_secs(1)));
//! assert!(waits[0] <= Duration::from_millis(50));
//! backoff.reset();
//! assert!(backoff.next_delay() <= Duration::from_millis(50));
//! ```

use crate::bench::Rng;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The redial policy of one link (see [`crate::link`]).
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    bound: Duration,
    rng: Rng,
}

/// The framework's default: the first retry within 50 ms, never more than 1 s apart.
pub const FIRST_RETRY: Duration = Duration::from_millis(50);
/// The longest wait between two dials of a configured peer.
pub const MAX_RETRY: Duration = Duration::from_secs(1);

impl Default for Backoff {
    /// [`FIRST_RETRY`] up to [`MAX_RETRY`], jitter seeded afresh.
    fn default() -> Self {
        Backoff::new(FIRST_RETRY, MAX_RETRY)
    }
}

impl Backoff {
    /// Retries from `first` doubling up to `cap`, with jitter seeded from the process's
    /// random hash keys (different in every process and every call).
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(0);
        Backoff::seeded(first, cap, hasher.finish())
    }

    /// The same policy with a fixed seed: the same waits every run (tests, simulators).
    pub fn seeded(first: Duration, cap: Duration, seed: u64) -> Backoff {
        let first = first.min(cap);
        Backoff {
            first,
            cap,
            bound: first,
            rng: Rng::new(seed),
        }
    }

    /// How long to wait before the next dial; each call doubles the bound up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let bound = self.bound;
        self.bound = (bound * 2).min(self.cap);
        let nanos = bound.as_nanos() as u64;
        let half = nanos / 2;
        Duration::from_nanos(half + self.rng.below(nanos - half + 1))
    }

    /// The link came up: the next loss starts again from the first, short wait.
    pub fn reset(&mut self) {
        self.bound = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waits_double_up_to_the_cap_and_stay_in_the_upper_half() {
        let mut b = Backoff::seeded(100 * MS, 1000 * MS, 1);
        let bounds = [100, 200, 400, 800, 1000, 1000, 1000];
        for bound in bounds {
            let wait = b.next_delay();
            assert!(wait <= bound * MS, "{wait:?} over {bound} ms");
            assert!(wait >= bound * MS / 2, "{wait:?} under half of {bound} ms");
        }
    }

    #[test]
    fn reset_starts_over_and_jitter_differs_between_seeds() {
        let mut b = Backoff::seeded(100 * MS, 1000 * MS, 1);
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= 100 * MS);
        let draws = |seed| {
            let mut b = Backoff::seeded(MS * 1000, MS * 1000, seed);
            (0..8).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_ne!(draws(1), draws(2), "two peers must not redial in lock step");
        assert_eq!(draws(3), draws(3), "a seed reproduces its waits");
    }

    #[test]
    fn a_first_wait_above_the_cap_is_capped() {
        let mut b = Backoff::seeded(5000 * MS, 1000 * MS, 9);
        assert!(b.next_delay() <= 1000 * MS);
        assert!(Backoff::default().next_delay() <= FIRST_RETRY);
    }
}
