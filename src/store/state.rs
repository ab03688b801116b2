//! The key-value state: a map of bytes to bytes, split into independently locked shards.
//!
//! Why 64 shards of `RwLock<Table>` ([`super::table`]): every connection thread touches
//! the map, and one lock would serialise them all; with 64 shards two threads meet on a
//! lock only when their keys hash to the same shard, and lookups (the common case) share a
//! read lock even then. Each lock is held for a table operation and a copy, never across
//! socket I/O: a lookup copies its reply line into the connection's output buffer under
//! the read lock.
//!
//! Measured (`store-bench --conns 16 --pipeline 32`, GET only, the lock-heaviest load we
//! have, 5 alternated runs of each build): a `Mutex` per shard instead of the `RwLock` cost
//! 2.1 times the server CPU per lookup (lookups of one shard then wait for each other, and
//! for a holder the scheduler preempted); skipping the lock altogether (an unsound
//! experiment, GET only) measured no different from the `RwLock`, so its two atomic
//! operations per lookup are not where the time goes on two cores.

use super::keyhash::KeyHasher;
use super::table::{Entry, Table};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Number of shards; a power of two well above the number of cores this runs on.
const SHARDS: usize = 64;
const _: () = assert!(SHARDS == 1 << (64 - 58));

/// One shard, padded to its own cache lines so that locking one does not slow its
/// neighbours (false sharing).
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    inner: RwLock<ShardMap>,
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
    /// A fixed-size array, so that indexing it by six bits of a hash needs no bounds check.
    shards: Box<[Shard; SHARDS]>,
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
        Store {
            shards: Box::new(std::array::from_fn(|_| Shard::default())),
            hasher: KeyHasher::random(),
        }
    }

    #[inline(always)]
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash(key)
    }

    fn shard(&self, hash: u64) -> &Shard {
        // The top six bits: 2^6 = SHARDS (checked at compile time below).
        &self.shards[(hash >> 58) as usize]
    }

    fn read(&self, hash: u64) -> RwLockReadGuard<'_, ShardMap> {
        // A panic while holding a shard lock cannot leave a half-updated map (an update
        // allocates before it changes anything, and the counts are changed last), so a
        // poisoned lock is still consistent.
        self.shard(hash)
            .inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, hash: u64) -> RwLockWriteGuard<'_, ShardMap> {
        self.shard(hash)
            .inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
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

    /// Sets `key` to `value`.
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
            if self.shard == SHARDS {
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
