//! The key-value state: a map of bytes to bytes, split into independently locked shards.
//!
//! Why 64 shards of `RwLock<HashMap>`: every connection thread touches the map, and one
//! lock would serialise them all; with 64 shards two threads meet on a lock only when their
//! keys hash to the same shard, and lookups (the common case) share a read lock even then.
//! Each lock is held for a hash-map operation and a copy, never across socket I/O: a lookup
//! copies the value into the connection's output buffer under the read lock.
//!
//! Measured (`store-bench --conns 16 --pipeline 32`, GET-only and 1:1, 3 runs each, the
//! lock-heaviest load we have): one `Mutex` shard, one `RwLock` shard and 64 `RwLock`
//! shards all landed between 1.5 and 2.9 M ops/s and 0.31–0.56 µs of server CPU per
//! operation, within the noise of this shared 2-core machine. With two cores there is
//! little to contend; the shards are for machines with more, and cost nothing measurable
//! here.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Number of shards; a power of two well above the number of cores this runs on.
const SHARDS: usize = 64;

/// One shard, padded to its own cache lines so that locking one does not slow its
/// neighbours (false sharing).
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    inner: RwLock<ShardMap>,
}

#[derive(Default)]
struct ShardMap {
    map: HashMap<Box<[u8]>, Box<[u8]>>,
    /// Bytes of keys and values in this shard, for `stats`.
    bytes: u64,
}

/// The store's shared state; cheap to share behind an `Arc`.
pub struct Store {
    shards: Box<[Shard]>,
    /// Picks the shard. Keys come from clients, so the hash is keyed (SipHash with a random
    /// key), which keeps anyone from aiming every key at one shard.
    hasher: RandomState,
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
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &[u8]) -> &Shard {
        let h = self.hasher.hash_one(key);
        // The top bits: the map inside the shard uses the low ones of its own hash.
        &self.shards[(h >> 58) as usize % SHARDS]
    }

    fn read(&self, key: &[u8]) -> RwLockReadGuard<'_, ShardMap> {
        // A panic while holding a shard lock cannot leave a half-updated map (every update
        // is one HashMap call), so a poisoned lock is still consistent.
        self.shard(key)
            .inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, key: &[u8]) -> RwLockWriteGuard<'_, ShardMap> {
        self.shard(key)
            .inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls `f` with the value of `key` (or `None`) under the shard's read lock; `f` should
    /// only copy what it needs.
    pub fn with_value<R>(&self, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        let shard = self.read(key);
        f(shard.map.get(key).map(|v| &v[..]))
    }

    /// The value of `key`, copied.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.with_value(key, |v| v.map(<[u8]>::to_vec))
    }

    /// Sets `key` to `value`. `log` runs under the shard's write lock, after the update:
    /// writes to one key reach the log in the order they reach the map.
    pub fn set_logged<R>(&self, key: &[u8], value: &[u8], log: impl FnOnce() -> R) -> R {
        let mut shard = self.write(key);
        let shard = &mut *shard;
        // Overwriting looks the key up by reference: no key allocation, and none for the
        // value either when its length is unchanged (the common case for counters and
        // fixed-size records).
        match shard.map.get_mut(key) {
            Some(old) => {
                shard.bytes = shard.bytes - old.len() as u64 + value.len() as u64;
                if old.len() == value.len() {
                    old.copy_from_slice(value);
                } else {
                    *old = Box::from(value);
                }
            }
            None => {
                shard.bytes += (key.len() + value.len()) as u64;
                shard.map.insert(Box::from(key), Box::from(value));
            }
        }
        log()
    }

    /// Sets `key` to `value`.
    pub fn set(&self, key: &[u8], value: &[u8]) {
        self.set_logged(key, value, || ())
    }

    /// Removes `key`; true if it was present. `log` runs under the write lock, and only
    /// when something was removed.
    pub fn delete_logged(&self, key: &[u8], log: impl FnOnce()) -> bool {
        let mut shard = self.write(key);
        match shard.map.remove_entry(key) {
            Some((k, v)) => {
                shard.bytes -= (k.len() + v.len()) as u64;
                log();
                true
            }
            None => false,
        }
    }

    /// Removes `key`; true if it was present.
    pub fn delete(&self, key: &[u8]) -> bool {
        self.delete_logged(key, || ())
    }

    /// Number of keys and bytes of keys and values, summed shard by shard (each shard is
    /// exact; the total is not one atomic snapshot while writes go on).
    pub fn size(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(keys, bytes), s| {
            let s = s.inner.read().unwrap_or_else(PoisonError::into_inner);
            (keys + s.map.len() as u64, bytes + s.bytes)
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
                if let Some(value) = shard.map.get(key) {
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
        for key in shard.map.keys() {
            self.keys.extend_from_slice(key);
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
        assert!(s.delete(b"k"));
        assert!(!s.delete(b"k"));
        assert_eq!(s.size(), (1, 5));
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
