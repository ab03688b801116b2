//! The key-value state: a map of bytes to bytes, split into independently locked shards.
//!
//! Why shards of `RwLock<Table>` (the table is `table.rs`): every connection thread
//! touches the map, and one lock would serialise them all; with several shards per core
//! two threads meet on a lock only when their keys hash to the same shard, and lookups
//! (the common case) share a read lock even then. A lock is held for table operations and
//! copies, never across socket I/O: a lookup copies its reply line into the connection's
//! output buffer under the read lock, and a batch's lookups may keep it ([`Lookups`]).
//!
//! Measured (`store-bench --conns 16 --pipeline 32`, GET only, the lock-heaviest load we
//! have, 5 alternated runs of each build): a `Mutex` per shard instead of the `RwLock` cost
//! 2.1 times the server CPU per lookup (lookups of one shard then wait for each other, and
//! for a holder the scheduler preempted); skipping the lock altogether (an unsound
//! experiment, GET only) measured no different from the `RwLock`, so its two atomic
//! operations per lookup are not where the time goes on two cores.

use super::keyhash::KeyHasher;
use super::table::{Entry, Table};
use std::hint::cold_path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

/// Shards per core (rounded up to a power of two), and the bounds on their number.
const SHARDS_PER_CORE: usize = 2;
const MIN_SHARDS: usize = 4;
const MAX_SHARDS: usize = 256;

/// How many shards: twice the cores this process may run on, rounded up to a power of two.
/// Enough that writers on different cores rarely meet on a lock, and few enough that a
/// batch of pipelined lookups finds several of its keys in each shard it holds
/// ([`Lookups`]).
fn shard_count() -> usize {
    let cores = std::thread::available_parallelism().map_or(MIN_SHARDS, |n| n.get());
    (cores * SHARDS_PER_CORE)
        .next_power_of_two()
        .clamp(MIN_SHARDS, MAX_SHARDS)
}

/// One shard, padded to its own cache lines so that locking one does not slow its
/// neighbours (false sharing).
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    inner: RwLock<ShardMap>,
    /// Writers waiting for this shard's write lock: a [`Lookups`] that keeps a read guard
    /// across lookups gives it up when it sees one.
    writers: AtomicU32,
}

/// A shard's entries, filed by their key's keyed hash: the hash is computed once per
/// request (it picks the shard, then the slot), and the table keeps it beside each entry.
#[derive(Default)]
struct ShardMap {
    table: Table,
    /// Bytes of keys and values in this shard, for `stats`.
    bytes: u64,
}

impl ShardMap {
    #[inline(always)]
    fn entry(&self, hash: u64, key: &[u8]) -> Option<&Entry> {
        self.table.get(hash, key)
    }

    fn get(&self, hash: u64, key: &[u8]) -> Option<&[u8]> {
        self.entry(hash, key).map(Entry::value)
    }

    /// Sets `key` to `value` (its hash is `hash`), keeping `bytes` exact.
    #[inline(always)]
    fn set(&mut self, hash: u64, key: &[u8], value: &[u8]) {
        let (change, _) = self.table.set(hash, key, value);
        self.bytes = self.bytes.wrapping_add_signed(change);
    }

    /// Removes `key`; true if it was there.
    fn remove(&mut self, hash: u64, key: &[u8]) -> bool {
        match self.table.remove(hash, key) {
            Some(gone) => {
                self.bytes -= gone;
                true
            }
            None => false,
        }
    }
}

/// The store's shared state; cheap to share behind an `Arc`.
pub struct Store {
    /// A power of two of them ([`shard_count`]).
    shards: Box<[Shard]>,
    /// 64 less log2 of the number of shards: a key's shard is its hash's top bits.
    shift: u32,
    /// Hashes keys. Keys come from clients, so the hash is keyed (SipHash-1-3 with a random
    /// key), which keeps anyone from aiming every key at one shard or one bucket.
    hasher: KeyHasher,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Store::with_shards(shard_count())
    }

    /// An empty store of `shards` shards (a power of two).
    fn with_shards(shards: usize) -> Self {
        assert!(shards.is_power_of_two() && shards >= 2);
        Store {
            shards: (0..shards).map(|_| Shard::default()).collect(),
            shift: 64 - shards.trailing_zeros(),
            hasher: KeyHasher::random(),
        }
    }

    #[inline(always)]
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash(key)
    }

    /// The shard of a key whose hash is `hash`: the hash's top bits (the table in the shard
    /// uses all of them, spread again).
    #[inline(always)]
    fn shard_index(&self, hash: u64) -> usize {
        (hash >> self.shift) as usize
    }

    fn shard(&self, hash: u64) -> &Shard {
        &self.shards[self.shard_index(hash)]
    }

    fn read(&self, hash: u64) -> RwLockReadGuard<'_, ShardMap> {
        read_lock(self.shard(hash))
    }

    /// The shard's write lock. While it waits, the shard counts it among its `writers`, so
    /// that readers holding the shard across a batch ([`Lookups`]) let go. A lock that is
    /// free is taken without the count: only a waiting writer needs readers to see it.
    #[inline(always)]
    fn write(&self, hash: u64) -> RwLockWriteGuard<'_, ShardMap> {
        write_lock(self.shard(hash))
    }

    /// Lookups that may keep their shards' read locks from one to the next; see
    /// [`Lookups`].
    pub fn lookups(&self) -> Lookups<'_> {
        Lookups {
            store: self,
            held: Vec::new(),
            served: 0,
        }
    }

    /// Calls `f` with the value of `key` (or `None`) under the shard's read lock; `f` should
    /// only copy what it needs.
    pub fn with_value<R>(&self, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        let hash = self.hash(key);
        f(self.read(hash).get(hash, key))
    }

    /// Calls `f` with the reply to a lookup of `key` as a line, `{just,VALUE}\n` (or `None`),
    /// under the shard's read lock: the line framing's reply with no formatting, for a
    /// server that knows no value holds a `\n`. `f` should only copy it.
    #[inline(always)]
    pub fn with_lookup_line<R>(&self, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        let hash = self.hash(key);
        f(self.read(hash).entry(hash, key).map(Entry::line))
    }

    /// The value of `key`, copied.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.with_value(key, |v| v.map(<[u8]>::to_vec))
    }

    /// Sets `key` to `value`. `log` runs under the shard's write lock, after the update:
    /// writes to one key reach the log in the order they reach the map.
    pub fn set_logged<R>(&self, key: &[u8], value: &[u8], log: impl FnOnce() -> R) -> R {
        let hash = self.hash(key);
        let mut shard = self.write(hash);
        shard.set(hash, key, value);
        log()
    }

    /// Sets `key` to `value`. One function with the lock, the probe and the update inlined
    /// into it: the calls between them cost 51 instructions per `store` (callgrind, README's
    /// eighth round). It stays out of the request loop, so the fast path and the general
    /// one share this copy.
    #[inline(never)]
    pub fn set(&self, key: &[u8], value: &[u8]) {
        self.set_logged(key, value, || ())
    }

    /// Removes `key`; true if it was present. `log` runs under the write lock, and only
    /// when something was removed.
    pub fn delete_logged(&self, key: &[u8], log: impl FnOnce()) -> bool {
        let hash = self.hash(key);
        let mut shard = self.write(hash);
        let removed = shard.remove(hash, key);
        if removed {
            log();
        }
        removed
    }

    /// Removes `key`; true if it was present.
    pub fn delete(&self, key: &[u8]) -> bool {
        self.delete_logged(key, || ())
    }

    /// Replaces every entry by `pairs`, at once for every reader and writer: every shard's
    /// write lock is held (taken in order, each counted among the shard's writers while it
    /// waits, so held read locks let go) while the map is emptied and refilled. A lookup
    /// sees all of the old entries or all of the new, never a key missing from both (a
    /// Raft follower installing its leader's snapshot).
    pub fn replace_all(&self, pairs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) {
        let mut shards: Vec<_> = self.shards.iter().map(write_lock).collect();
        for shard in &mut shards {
            **shard = ShardMap::default();
        }
        for (key, value) in pairs {
            let hash = self.hash(&key);
            shards[self.shard_index(hash)].set(hash, &key, &value);
        }
    }

    /// Whether `f` holds for any value (each shard under its read lock in turn).
    pub fn any_value(&self, f: impl Fn(&[u8]) -> bool) -> bool {
        self.shards.iter().any(|s| {
            (s.inner.read().unwrap_or_else(PoisonError::into_inner))
                .table
                .entries()
                .any(|e| f(e.value()))
        })
    }

    /// Number of keys and bytes of keys and values, summed shard by shard (each shard is
    /// exact; the total is not one atomic snapshot while writes go on).
    pub fn size(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(keys, bytes), s| {
            let s = s.inner.read().unwrap_or_else(PoisonError::into_inner);
            (keys + s.table.len() as u64, bytes + s.bytes)
        })
    }

    /// A cursor that copies every entry out, shard by shard and a chunk at a time, for
    /// writing a snapshot without holding a lock across I/O.
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            store: self,
            shard: 0,
            keys: Vec::new(),
            key_ends: Vec::new(),
            next_key: 0,
            chunk: Vec::new(),
            lens: Vec::new(),
        }
    }
}

/// A shard's read lock. A panic while holding a shard lock cannot leave a half-updated map
/// (an update allocates before it changes anything, and the counts are changed last), so a
/// poisoned lock is still consistent.
fn read_lock(shard: &Shard) -> RwLockReadGuard<'_, ShardMap> {
    shard.inner.read().unwrap_or_else(PoisonError::into_inner)
}

/// A shard's write lock (see [`Store::write`]; consistent when poisoned, as [`read_lock`]).
#[inline(always)]
fn write_lock(shard: &Shard) -> RwLockWriteGuard<'_, ShardMap> {
    match shard.inner.try_write() {
        Ok(guard) => return guard,
        Err(TryLockError::Poisoned(p)) => return p.into_inner(),
        Err(TryLockError::WouldBlock) => cold_path(),
    }
    shard.writers.fetch_add(1, Ordering::Relaxed);
    let guard = shard.inner.write().unwrap_or_else(PoisonError::into_inner);
    shard.writers.fetch_sub(1, Ordering::Relaxed);
    guard
}

/// Shards' read locks held at once by one [`Lookups`], at most.
const MAX_HELD: usize = 8;
/// Lookups served under held locks before [`Lookups`] lets them all go, at most.
const MAX_SERVED: u32 = 64;

/// The lookups of one batch of pipelined requests, keeping each shard's read lock from one
/// lookup to the next instead of taking it for each.
///
/// Why: on two cores, a shard's lock word is written by readers on both, so nearly every
/// lookup that takes it first waits for the cache line to come over from the other core;
/// `perf annotate` of `store-bench --pipeline 32` put most of the lookup's time on the
/// lock's load and its two atomic operations, not on the hash or the table. With a few
/// shards per core, a batch of 32 lookups meets each shard several times and takes its
/// lock once.
///
/// What keeps it safe:
/// - A thread never waits for a lock while it holds one: a lock beyond the first is only
///   *tried*, and when that fails (a writer holds or awaits it) everything held is let go
///   before waiting. Writers hold one lock at a time, so there is no cycle to deadlock in.
/// - A writer waiting on a held shard is seen (`writers`) at the next lookup in it, which
///   lets everything go; and nothing is held for more than 64 lookups (`MAX_SERVED`).
/// - The holder must [`release`](Lookups::release) before any other access to the store
///   (its own writes would wait for its own read lock) and before any socket I/O, as
///   the store's locks are never held across it. Dropping it releases too.
pub struct Lookups<'a> {
    store: &'a Store,
    /// Held read locks, by shard index.
    held: Vec<(usize, RwLockReadGuard<'a, ShardMap>)>,
    /// Lookups served since the locks were last all let go.
    served: u32,
}

impl Lookups<'_> {
    /// Calls `f` with the reply to a lookup of `key` as a line, `{just,VALUE}\n` (or
    /// `None`), as [`Store::with_lookup_line`] does, but leaving the shard's read lock held
    /// for the next lookup. `f` should only copy it.
    #[inline(always)]
    pub fn line<R>(&mut self, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        let hash = self.store.hash(key);
        let map = self.shard(self.store.shard_index(hash));
        f(map.entry(hash, key).map(Entry::line))
    }

    /// The shard's map, under a read lock held by this `Lookups`.
    #[inline(always)]
    fn shard(&mut self, i: usize) -> &ShardMap {
        self.served += 1;
        if self.served > MAX_SERVED {
            cold_path();
            self.release();
            self.served = 1;
        }
        let shard = &self.store.shards[i];
        if let Some(at) = self.held.iter().position(|(j, _)| *j == i) {
            if shard.writers.load(Ordering::Relaxed) == 0 {
                return &self.held[at].1;
            }
            cold_path();
            self.release();
        }
        self.take(i)
    }

    /// Takes shard `i`'s read lock, without waiting while any other is held.
    fn take(&mut self, i: usize) -> &ShardMap {
        let shard = &self.store.shards[i];
        if self.held.len() == MAX_HELD {
            cold_path();
            self.release();
        }
        let guard = if self.held.is_empty() {
            read_lock(shard)
        } else {
            match shard.inner.try_read() {
                Ok(guard) => guard,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    cold_path();
                    self.release();
                    read_lock(shard)
                }
            }
        };
        self.held.push((i, guard));
        &self.held.last().expect("just pushed").1
    }

    /// Lets every held lock go.
    #[inline]
    pub fn release(&mut self) {
        self.held.clear();
        self.served = 0;
    }
}

/// Copies the entries of a [`Store`] out in chunks (see [`Store::snapshot`]).
///
/// A shard's keys are listed under one read lock; their values are then copied a chunk at a
/// time, each chunk under a read lock of its own. Writes go on in between, so an entry is as
/// it was at some moment after the cursor reached its shard: a key removed since it was
/// listed is skipped, one inserted since is missed. A log rewrite wants exactly that: every
/// write from the start of the rewrite on is in its since-snapshot buffer as well.
pub struct Snapshot<'a> {
    store: &'a Store,
    /// The next shard whose keys are to be listed.
    shard: usize,
    /// The listed keys of the current shard, end to end, and where each ends.
    keys: Vec<u8>,
    key_ends: Vec<usize>,
    /// Index in `key_ends` of the next key to copy.
    next_key: usize,
    /// The current chunk: keys and values end to end, and their lengths.
    chunk: Vec<u8>,
    lens: Vec<(usize, usize)>,
}

impl Snapshot<'_> {
    /// Copies the next entries, about `max_bytes` of keys and values (at least one entry),
    /// and then calls `f` with each, under no lock. False when every shard is done.
    pub fn next_chunk(&mut self, max_bytes: usize, mut f: impl FnMut(&[u8], &[u8])) -> bool {
        while self.next_key == self.key_ends.len() {
            if self.shard == self.store.shards.len() {
                return false;
            }
            self.list_keys();
        }
        self.chunk.clear();
        self.lens.clear();
        {
            // The shard whose keys were listed last.
            let shard = self.store.shards[self.shard - 1]
                .inner
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            let mut bytes = 0;
            while self.next_key < self.key_ends.len() && bytes < max_bytes {
                let start = match self.next_key {
                    0 => 0,
                    i => self.key_ends[i - 1],
                };
                let key = &self.keys[start..self.key_ends[self.next_key]];
                self.next_key += 1;
                if let Some(value) = shard.get(self.store.hash(key), key) {
                    self.chunk.extend_from_slice(key);
                    self.chunk.extend_from_slice(value);
                    self.lens.push((key.len(), value.len()));
                    bytes += key.len() + value.len();
                }
            }
        }
        let mut at = 0;
        for &(k, v) in &self.lens {
            f(&self.chunk[at..at + k], &self.chunk[at + k..at + k + v]);
            at += k + v;
        }
        if self.chunk.capacity() > 4 * max_bytes {
            // One large value passed through; do not keep its allocation.
            self.chunk = Vec::new();
        }
        true
    }

    /// Lists the keys of the next shard and moves on to it.
    fn list_keys(&mut self) {
        self.keys.clear();
        self.key_ends.clear();
        self.next_key = 0;
        let shard = self.store.shards[self.shard]
            .inner
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        for entry in shard.table.entries() {
            self.keys.extend_from_slice(entry.key());
            self.key_ends.push(self.keys.len());
        }
        self.shard += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacing_everything_never_shows_a_key_missing_from_both_states() {
        // A follower installing its leader's snapshot: "k" is in the old state and the
        // new. Deleting every key and then setting the new ones, a lookup between the two
        // found nothing.
        let s = std::sync::Arc::new(Store::new());
        let state = |v: &[u8]| -> Vec<(Vec<u8>, Vec<u8>)> {
            (0..500)
                .map(|i| (format!("key{i}").into_bytes(), v.to_vec()))
                .chain([(b"k".to_vec(), v.to_vec())])
                .collect()
        };
        s.replace_all(state(b"old"));
        assert_eq!(s.size().0, 501);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (s, stop) = (std::sync::Arc::clone(&s), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut looked = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    assert!(s.get(b"k").is_some(), "k missing after {looked} lookups");
                    looked += 1;
                }
                looked
            })
        };
        for round in 0..300 {
            s.replace_all(state(if round % 2 == 0 { b"new" } else { b"old" }));
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        s.replace_all([(b"only".to_vec(), b"1".to_vec())]);
        assert_eq!((s.size(), s.get(b"k")), ((1, 5), None));
    }

    #[test]
    fn set_get_overwrite_delete_and_sizes() {
        let s = Store::new();
        assert_eq!(s.get(b"k"), None);
        s.set(b"k", b"one");
        assert_eq!(s.get(b"k").as_deref(), Some(&b"one"[..]));
        s.set(b"k", b"two");
        s.set(b"k", b"three");
        assert_eq!(s.get(b"k").as_deref(), Some(&b"three"[..]));
        s.set(b"other", b"");
        assert_eq!(s.size(), (2, 1 + 5 + 5));
        // The lookup line holds the value as it is now, through overwrites of the same
        // length and of others.
        let line = |k: &[u8]| s.with_lookup_line(k, |l| l.map(<[u8]>::to_vec));
        assert_eq!(line(b"k").as_deref(), Some(&b"{just,three}\n"[..]));
        assert_eq!(line(b"other").as_deref(), Some(&b"{just,}\n"[..]));
        assert_eq!(line(b"missing"), None);
        s.set(b"k", b"THREE");
        assert_eq!(line(b"k").as_deref(), Some(&b"{just,THREE}\n"[..]));
        s.set(b"k", b"3");
        assert_eq!(line(b"k").as_deref(), Some(&b"{just,3}\n"[..]));
        assert_eq!(s.get(b"k").as_deref(), Some(&b"3"[..]));
        s.set(b"k", b"three");
        assert_eq!(s.size(), (2, 1 + 5 + 5));
        assert!(s.delete(b"k"));
        assert!(!s.delete(b"k"));
        assert_eq!(s.size(), (1, 5));
    }

    #[test]
    fn keys_that_share_a_hash_are_kept_apart() {
        // Forced collisions: the same hash for every key, as SipHash gives only by chance.
        let mut m = ShardMap::default();
        for (k, v) in [(&b"a"[..], &b"1"[..]), (b"bb", b"22"), (b"ccc", b"333")] {
            m.set(7, k, v);
        }
        m.set(7, b"bb", b"two");
        assert_eq!(m.get(7, b"a"), Some(&b"1"[..]));
        assert_eq!(m.get(7, b"bb"), Some(&b"two"[..]));
        assert_eq!(m.get(7, b"ccc"), Some(&b"333"[..]));
        assert_eq!(m.get(8, b"a"), None);
        assert_eq!((m.table.len(), m.bytes), (3, 2 + 5 + 6));
        assert!(m.remove(7, b"a"));
        assert!(!m.remove(7, b"a"));
        assert!(m.remove(7, b"ccc"));
        assert_eq!(m.get(7, b"bb"), Some(&b"two"[..]));
        assert!(m.remove(7, b"bb"));
        assert_eq!((m.table.len(), m.bytes), (0, 0));
    }

    #[test]
    fn concurrent_writers_on_distinct_keys_lose_nothing() {
        let s = std::sync::Arc::new(Store::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        s.set(format!("{t}-{i}").as_bytes(), &[t as u8; 8]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let key_bytes: usize = (0..4)
            .flat_map(|t| (0..2000).map(move |i| format!("{t}-{i}").len()))
            .sum();
        assert_eq!(s.size(), (8000, 8000 * 8 + key_bytes as u64));
    }

    #[test]
    fn the_shard_count_is_a_power_of_two_within_bounds() {
        let n = shard_count();
        assert!(
            n.is_power_of_two() && (MIN_SHARDS..=MAX_SHARDS).contains(&n),
            "{n}"
        );
    }

    /// Key `i`'s current value through `lookups`, as the reply line's value.
    fn looked_up(lookups: &mut Lookups<'_>, key: &[u8]) -> Option<Vec<u8>> {
        lookups.line(key, |l| l.map(|l| l[JUST.len()..l.len() - 2].to_vec()))
    }

    const JUST: &[u8] = b"{just,";

    #[test]
    fn a_held_shard_is_let_go_for_a_waiting_writer() {
        let s = Store::with_shards(2);
        s.set(b"k", b"old");
        let mut lookups = s.lookups();
        assert_eq!(looked_up(&mut lookups, b"k").as_deref(), Some(&b"old"[..]));
        assert_eq!(
            lookups.held.len(),
            1,
            "the lock stays held after the lookup"
        );
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| s.set(b"k", b"new"));
            // The writer counts itself among the shard's writers, then waits for the lock:
            // once it waits, a try fails (std's RwLock turns new readers away then).
            let shard = s.shard(s.hash(b"k"));
            while shard.writers.load(Ordering::Relaxed) == 0 || shard.inner.try_read().is_ok() {
                std::thread::yield_now();
            }
            // The next lookup in that shard lets every lock go before it takes one again
            // (`served` starts over at 0 then; reusing the held lock would make it 2). Which
            // of the two gets the lock next is std's business (a reader may slip in before
            // the woken writer runs), so the value seen may be either.
            let seen = looked_up(&mut lookups, b"k");
            let let_go = lookups.served == 0;
            lookups.release();
            writer.join().unwrap();
            assert!(let_go, "the held lock was kept for a waiting writer");
            assert!(matches!(seen.as_deref(), Some(b"old" | b"new")), "{seen:?}");
        });
        let mut lookups = s.lookups();
        assert_eq!(looked_up(&mut lookups, b"k").as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn lookups_let_go_after_a_bounded_run_and_on_release() {
        let s = Store::with_shards(4);
        for i in 0..100 {
            s.set(format!("k{i}").as_bytes(), b"v");
        }
        let mut lookups = s.lookups();
        for i in 0..1000 {
            assert!(looked_up(&mut lookups, format!("k{}", i % 100).as_bytes()).is_some());
            assert!(lookups.held.len() <= MAX_HELD.min(4));
            assert!(lookups.served <= MAX_SERVED);
        }
        lookups.release();
        assert!(lookups.held.is_empty());
        // With nothing held, a write from this thread goes through.
        s.set(b"k0", b"w");
        assert_eq!(looked_up(&mut lookups, b"k0").as_deref(), Some(&b"w"[..]));
    }

    #[test]
    fn batches_of_held_lookups_and_writers_never_deadlock_and_see_only_written_values() {
        // Readers keep shard locks across batches of lookups while writers write the same
        // keys, on two shards (so readers hold both and meet writers all the time). Every
        // value read must be one a writer wrote, and every thread must finish: a reader that
        // waited for one lock while holding another could deadlock here with a waiting
        // writer (std's RwLock makes new readers wait behind a waiting writer).
        let s = std::sync::Arc::new(Store::with_shards(2));
        let keys: Vec<Vec<u8>> = (0..64).map(|i| format!("key{i}").into_bytes()).collect();
        for k in &keys {
            s.set(k, b"0");
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for t in 0..6u64 {
            let (s, keys, done) = (s.clone(), keys.clone(), done_tx.clone());
            threads.push(std::thread::spawn(move || {
                let mut rng = crate::bench::Rng::new(t);
                if t < 2 {
                    for n in 1..=3000u64 {
                        let k = &keys[rng.below(keys.len() as u64) as usize];
                        s.set(k, n.to_string().as_bytes());
                    }
                } else {
                    let mut lookups = s.lookups();
                    for _ in 0..300 {
                        for _ in 0..rng.below(40) + 1 {
                            let k = &keys[rng.below(keys.len() as u64) as usize];
                            let v = looked_up(&mut lookups, k).expect("every key is set");
                            let n: u64 = std::str::from_utf8(&v).unwrap().parse().unwrap();
                            assert!(n <= 3000, "{n}");
                        }
                        lookups.release();
                    }
                }
                done.send(t).unwrap();
            }));
        }
        drop(done_tx);
        for _ in 0..threads.len() {
            // A liveness bound, not a timing: the work takes well under a second.
            done_rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("a thread is stuck: deadlock");
        }
        for t in threads {
            t.join().unwrap();
        }
    }

    fn contents(s: &Store, chunk: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut all = Vec::new();
        let mut snapshot = s.snapshot();
        while snapshot.next_chunk(chunk, |k, v| all.push((k.to_vec(), v.to_vec()))) {}
        all.sort();
        all
    }

    #[test]
    fn a_snapshot_copies_every_entry_once_whatever_the_chunk_size() {
        let s = Store::new();
        assert!(contents(&s, 1).is_empty());
        let mut want: Vec<_> = (0..500)
            .map(|i| (format!("k{i}").into_bytes(), vec![i as u8; i % 7]))
            .collect();
        for (k, v) in &want {
            s.set(k, v);
        }
        want.sort();
        for chunk in [1, 10, 1000, 1 << 20] {
            assert_eq!(contents(&s, chunk), want, "chunk {chunk}");
        }
    }

    #[test]
    fn a_snapshot_skips_keys_removed_after_they_were_listed() {
        let s = Store::new();
        for i in 0..200 {
            s.set(format!("k{i}").as_bytes(), b"old");
        }
        let mut snapshot = s.snapshot();
        let mut seen = Vec::new();
        // One entry per chunk: the first chunk lists its shard's keys and copies one.
        assert!(snapshot.next_chunk(1, |k, _| seen.push(k.to_vec())));
        for i in 0..200 {
            let k = format!("k{i}");
            if seen[0] != k.as_bytes() {
                s.delete(k.as_bytes());
            }
        }
        while snapshot.next_chunk(1, |k, _| seen.push(k.to_vec())) {}
        assert_eq!(seen.len(), 1, "{seen:?}");
    }
}
