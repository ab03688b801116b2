//! The `stats` request counters: requests by verb, counted by each connection in counters
//! of its own and summed when `stats` asks.
//!
//! Why not shared counters: an atomic add is a locked read-modify-write, and the store
//! made two per batch (a `store` and its barrier `lookup`), on cache lines that every
//! connection thread wrote. A connection's own counters have one writer, its thread, so
//! an add is a plain load and store; `stats` reads them with atomic loads, so it never
//! sees a torn count, and a connection's counts are at most one batch behind, as before.

use super::protocol::Verb;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// How many verbs are counted, in [`Verb::ALL`] order.
const VERBS: usize = Verb::ALL.len();

/// One connection's counters, on cache lines of their own (so that two connections'
/// threads never write one line).
#[repr(align(128))]
#[derive(Default)]
struct Counts([AtomicU64; VERBS]);

/// Every connection's counters: those of live connections, and the sum of those that ended.
#[derive(Default)]
pub(super) struct Tallies {
    inner: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    /// Live connections' counters; a connection's slot is emptied when it ends, and
    /// reused (`free`), so an end costs the same however many are live.
    live: Vec<Option<Arc<Counts>>>,
    free: Vec<usize>,
    ended: [u64; VERBS],
}

impl Tallies {
    /// Counters for a new connection, counted in [`Tallies::sum`] from now on; its counts
    /// stay in the sum after it is dropped.
    pub(super) fn open(self: &Arc<Self>) -> Tally {
        let counts = Arc::new(Counts::default());
        let mut registry = self.lock();
        let slot = match registry.free.pop() {
            Some(slot) => {
                registry.live[slot] = Some(Arc::clone(&counts));
                slot
            }
            None => {
                registry.live.push(Some(Arc::clone(&counts)));
                registry.live.len() - 1
            }
        };
        Tally {
            tallies: Arc::clone(self),
            counts,
            slot,
        }
    }

    /// Requests by verb, over every connection so far.
    pub(super) fn sum(&self) -> [u64; VERBS] {
        let registry = self.lock();
        registry
            .live
            .iter()
            .flatten()
            .fold(registry.ended, |mut sum, c| {
                for (sum, c) in sum.iter_mut().zip(&c.0) {
                    *sum += c.load(Ordering::Relaxed);
                }
                sum
            })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Nothing done under the lock can panic part way (slots are in range, sums are of
        // counts), so a panic elsewhere while it was held leaves it consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's counters: added to by its thread only, summed by [`Tallies::sum`].
pub(super) struct Tally {
    tallies: Arc<Tallies>,
    counts: Arc<Counts>,
    /// Where `counts` is in the registry's `live`.
    slot: usize,
}

impl Tally {
    /// Adds `counts` (by verb) and zeroes them.
    #[inline]
    pub(super) fn add(&self, counts: &mut [u64; VERBS]) {
        // The only writer is this connection's thread (`Tally` is not `Clone`, and `add` is
        // its only write), so a load and a store add without losing any. All five, without
        // a branch: the line is this connection's own.
        for (total, n) in self.counts.0.iter().zip(counts) {
            total.store(
                total.load(Ordering::Relaxed) + std::mem::take(n),
                Ordering::Relaxed,
            );
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let mut registry = self.tallies.lock();
        // Moved from the live to the ended in one step under the lock, so a sum never
        // counts them twice or not at all.
        registry.live[self.slot] = None;
        registry.free.push(self.slot);
        for (ended, c) in registry.ended.iter_mut().zip(&self.counts.0) {
            *ended += c.load(Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_of_live_and_ended_connections_are_summed() {
        let tallies = Arc::new(Tallies::default());
        let a = tallies.open();
        let b = tallies.open();
        a.add(&mut [1, 2, 0, 0, 0]);
        let mut batch = [0, 5, 0, 1, 0];
        b.add(&mut batch);
        assert_eq!(batch, [0; VERBS], "added counts are taken");
        assert_eq!(tallies.sum(), [1, 7, 0, 1, 0]);
        drop(a);
        assert_eq!(
            tallies.sum(),
            [1, 7, 0, 1, 0],
            "an ended connection still counts"
        );
        b.add(&mut [0, 0, 3, 0, 4]);
        drop(b);
        assert_eq!(tallies.sum(), [1, 7, 3, 1, 4]);
        let registry = tallies.lock();
        assert!(registry.live.iter().all(Option::is_none));
        drop(registry);
        // An ended connection's slot is reused, and its counts are not counted twice.
        let c = tallies.open();
        c.add(&mut [0, 0, 0, 0, 1]);
        assert_eq!(tallies.lock().live.len(), 2, "a slot reused");
        assert_eq!(tallies.sum(), [1, 7, 3, 1, 5]);
    }

    #[test]
    fn threads_counting_at_once_lose_nothing() {
        let tallies = Arc::new(Tallies::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let tallies = Arc::clone(&tallies);
                std::thread::spawn(move || {
                    let tally = tallies.open();
                    for _ in 0..10_000 {
                        tally.add(&mut [1, 1, 0, 0, 0]);
                    }
                })
            })
            .collect();
        // Sums taken while they count never go down, and never pass the end total.
        let mut last = 0;
        while !threads.iter().all(|t| t.is_finished()) {
            let now = tallies.sum()[0];
            assert!(now >= last && now <= 40_000, "{last} then {now}");
            last = now;
        }
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(tallies.sum(), [40_000, 40_000, 0, 0, 0]);
    }
}
