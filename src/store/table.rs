//! One shard's entries: an open-addressed table filed by the key's keyed hash, each entry a
//! single allocation holding the key and the line that answers a lookup of it.
//!
//! Why not std's `HashMap`: a lookup there reads the control bytes, then the bucket, then the
//! key through its own pointer, then the value through another: four dependent cache lines
//! after the lock. Here a lookup reads its slot (hash and entry pointer side by side), then
//! the entry, where the key and its reply line sit end to end: two. It also runs fewer
//! instructions, the probe being a compare of stored hashes (`interop/profile_store.py`:
//! README, "Store: the distance to the floor").
//!
//! Linear probing, at most three quarters full, deletion by backward shift (no tombstones,
//! so a table that sees churn never fills with them). The hash is keyed SipHash
//! ([`super::keyhash`]), so nobody without the key can build the long probe runs that
//! linear probing fears; keys that share a whole 64-bit hash are kept in slots of their
//! own and told apart by comparison.

/// What an entry's line holds around the value: a lookup's reply in line framing.
const JUST: &[u8] = b"{just,";
const JUST_END: &[u8] = b"}\n";

/// A key and its value, kept as `KEY{just,VALUE}\n` in one allocation, so that the store's
/// commonest reply, a line-framed lookup, is one copy from beside the key it matched.
pub(super) struct Entry {
    key_len: usize,
    bytes: Box<[u8]>,
}

impl Entry {
    fn new(key: &[u8], value: &[u8]) -> Entry {
        let mut bytes = Vec::with_capacity(key.len() + JUST.len() + value.len() + JUST_END.len());
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(JUST);
        bytes.extend_from_slice(value);
        bytes.extend_from_slice(JUST_END);
        Entry {
            key_len: key.len(),
            bytes: bytes.into_boxed_slice(),
        }
    }

    pub(super) fn key(&self) -> &[u8] {
        &self.bytes[..self.key_len]
    }

    /// `{just,VALUE}\n`.
    pub(super) fn line(&self) -> &[u8] {
        &self.bytes[self.key_len..]
    }

    pub(super) fn value(&self) -> &[u8] {
        &self.bytes[self.key_len + JUST.len()..self.bytes.len() - JUST_END.len()]
    }

    fn set_value(&mut self, value: &[u8]) {
        if self.value().len() == value.len() {
            let start = self.key_len + JUST.len();
            let end = self.bytes.len() - JUST_END.len();
            self.bytes[start..end].copy_from_slice(value);
        } else {
            self.resize_value(value);
        }
    }

    /// [`set_value`](Self::set_value) with a value of another size: a new allocation,
    /// kept out of the common path's code.
    #[cold]
    #[inline(never)]
    fn resize_value(&mut self, value: &[u8]) {
        *self = Entry::new(self.key(), value);
    }

    /// Bytes of key and value, for `stats`.
    pub(super) fn size(&self) -> u64 {
        (self.key_len + self.value().len()) as u64
    }
}

/// A slot: empty, or an entry and its key's hash.
#[derive(Default)]
struct Slot {
    hash: u64,
    entry: Option<Entry>,
}

/// The table. Its capacity is a power of two, at least [`MIN_CAPACITY`].
pub(super) struct Table {
    slots: Box<[Slot]>,
    len: usize,
    /// 64 less log2 of the capacity: what [`Table::home`] shifts by.
    shift: u32,
}

impl Default for Table {
    fn default() -> Table {
        Table::with_capacity(MIN_CAPACITY)
    }
}

const MIN_CAPACITY: usize = 8;

/// Whether two keys are equal: as `a == b`, without a call to `memcmp` for keys of 8 to 16
/// bytes (two overlapping word loads from each side cover them).
#[inline(always)]
fn same_key(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if !(8..=16).contains(&n) {
        return a == b;
    }
    let word = |k: &[u8], at: usize| u64::from_le_bytes(k[at..at + 8].try_into().expect("8 bytes"));
    word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8)
}

impl Table {
    /// Number of entries.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Where a probe for `hash` starts. The shard took the hash's top bits; an odd
    /// multiplier makes the product's top bits depend on all of them.
    #[inline(always)]
    fn home(&self, hash: u64) -> usize {
        (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    fn with_capacity(capacity: usize) -> Table {
        debug_assert!(capacity.is_power_of_two() && capacity >= MIN_CAPACITY);
        Table {
            slots: (0..capacity).map(|_| Slot::default()).collect(),
            len: 0,
            shift: 64 - capacity.trailing_zeros(),
        }
    }

    #[inline(always)]
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// Index of the slot holding `key`.
    #[inline(always)]
    fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        let mask = self.mask();
        let mut i = self.home(hash);
        loop {
            let slot = &self.slots[i];
            match &slot.entry {
                None => return None,
                Some(e) if slot.hash == hash && same_key(e.key(), key) => return Some(i),
                Some(_) => i = (i + 1) & mask,
            }
        }
    }

    /// The entry for `key`, whose hash is `hash`: [`Table::find`] for the lookup path,
    /// returning the entry it reached rather than its index.
    #[inline(always)]
    pub(super) fn get(&self, hash: u64, key: &[u8]) -> Option<&Entry> {
        let mask = self.mask();
        let mut i = self.home(hash);
        loop {
            let slot = &self.slots[i];
            let entry = slot.entry.as_ref()?;
            if slot.hash == hash && same_key(entry.key(), key) {
                return Some(entry);
            }
            i = (i + 1) & mask;
        }
    }

    /// Sets `key` to `value`: the size change of keys and values in bytes, and whether the
    /// key is new.
    #[inline(always)]
    pub(super) fn set(&mut self, hash: u64, key: &[u8], value: &[u8]) -> (i64, bool) {
        if let Some(i) = self.find(hash, key) {
            let entry = self.slots[i].entry.as_mut().expect("found");
            let change = value.len() as i64 - entry.value().len() as i64;
            entry.set_value(value);
            return (change, false);
        }
        self.insert(hash, key, value)
    }

    /// [`set`](Self::set) of a key not in the table: kept out of the common path's code
    /// (an update), which it would otherwise spread over more cache lines.
    #[cold]
    #[inline(never)]
    fn insert(&mut self, hash: u64, key: &[u8], value: &[u8]) -> (i64, bool) {
        // Allocate before changing anything: a failed allocation leaves the table as it was.
        let entry = Entry::new(key, value);
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.resize(self.slots.len() * 2);
        }
        self.place(hash, entry);
        self.len += 1;
        ((key.len() + value.len()) as i64, true)
    }

    /// Removes `key`: the bytes of key and value it held.
    pub(super) fn remove(&mut self, hash: u64, key: &[u8]) -> Option<u64> {
        let mut hole = self.find(hash, key)?;
        let gone = self.slots[hole].entry.take().expect("found").size();
        self.len -= 1;
        // Backward shift: each later entry of the run moves into the hole unless its home
        // lies after the hole (cyclically), where a probe from its home would not pass it.
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            if self.slots[j].entry.is_none() {
                break;
            }
            let home = self.home(self.slots[j].hash);
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                self.slots.swap(hole, j);
                hole = j;
            }
        }
        if self.slots.len() > MIN_CAPACITY && self.len * 8 < self.slots.len() {
            // Mostly emptied: give the slots back (at most a quarter full after).
            self.resize((self.len * 4).next_power_of_two().max(MIN_CAPACITY));
        }
        Some(gone)
    }

    /// Puts `entry` in the first empty slot from its home; there is one (at most three
    /// quarters are full).
    fn place(&mut self, hash: u64, entry: Entry) {
        let mask = self.mask();
        let mut i = self.home(hash);
        while self.slots[i].entry.is_some() {
            i = (i + 1) & mask;
        }
        self.slots[i] = Slot {
            hash,
            entry: Some(entry),
        };
    }

    fn resize(&mut self, capacity: usize) {
        let old = std::mem::replace(self, Table::with_capacity(capacity));
        self.len = old.len;
        for slot in old.slots.into_vec() {
            if let Some(entry) = slot.entry {
                self.place(slot.hash, entry);
            }
        }
    }

    /// Every entry, in slot order.
    pub(super) fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.slots.iter().filter_map(|s| s.entry.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Every entry is reachable from its home without crossing an empty slot, and the count
    /// is right: what the probes and the backward shift rely on.
    fn check(t: &Table) {
        let mut n = 0;
        for (i, slot) in t.slots.iter().enumerate() {
            let Some(e) = &slot.entry else { continue };
            n += 1;
            let mut j = t.home(slot.hash);
            while j != i {
                assert!(
                    t.slots[j].entry.is_some(),
                    "slot {i}: empty slot {j} on its probe"
                );
                j = (j + 1) & t.mask();
            }
            assert_eq!(t.get(slot.hash, e.key()).map(Entry::key), Some(e.key()));
        }
        assert_eq!(n, t.len);
        assert!(t.len * 4 <= t.slots.len() * 3);
        assert_eq!(t.slots.len(), 1 << (64 - t.shift));
    }

    #[test]
    fn entries_hold_key_line_and_value() {
        let mut e = Entry::new(b"key", b"value");
        assert_eq!(
            (e.key(), e.line(), e.value()),
            (&b"key"[..], &b"{just,value}\n"[..], &b"value"[..])
        );
        e.set_value(b"VALUE");
        assert_eq!(e.line(), b"{just,VALUE}\n");
        e.set_value(b"");
        assert_eq!(
            (e.key(), e.line(), e.size()),
            (&b"key"[..], &b"{just,}\n"[..], 3)
        );
    }

    #[test]
    fn same_key_agrees_with_slice_equality() {
        // Every length to 20 against every length to 20, and for equal lengths a
        // difference at each position in turn: the word loads must cover every byte.
        for n in 0..=20usize {
            let a: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37)).collect();
            for m in 0..=20usize {
                let b: Vec<u8> = (0..m as u8).map(|i| i.wrapping_mul(37)).collect();
                assert_eq!(same_key(&a, &b), a == b, "{n} vs {m}");
            }
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x80;
                assert!(!same_key(&a, &b), "length {n}, differing at {at}");
            }
        }
    }

    /// The multiplicative inverse of an odd number modulo 2^64 (Newton's iteration).
    fn inverse(odd: u64) -> u64 {
        let mut x = odd;
        for _ in 0..5 {
            x = x.wrapping_mul(2u64.wrapping_sub(odd.wrapping_mul(x)));
        }
        assert_eq!(odd.wrapping_mul(x), 1);
        x
    }

    /// Random sets, overwrites and removes against std's `HashMap`, with hashes drawn from
    /// a few values so that whole-hash collisions, shared homes, runs that wrap past the
    /// end of the table and the backward shift across them all happen often; the
    /// invariants are checked after every step, through growth and shrinking.
    #[test]
    fn agrees_with_a_hash_map_under_collisions_wraps_and_resizes() {
        for seed in 0..40 {
            let mut rng = crate::bench::Rng::new(seed);
            let hash_kinds = 1 + seed % 7;
            let keys = 4 + rng.below(200) as usize;
            let mut table = Table::default();
            let mut model: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
            let hash_of = |k: usize| -> u64 {
                // Pick each hash by the product `home` keeps the top bits of: even classes
                // all-ones at the top (home: the last slot, whatever the capacity, so runs
                // wrap past the end), odd ones spread; keys of a class share a whole hash.
                let class = k as u64 % hash_kinds;
                let product = if class.is_multiple_of(2) {
                    !(class << 40)
                } else {
                    class << 58
                };
                product.wrapping_mul(inverse(0x9E37_79B9_7F4A_7C15))
            };
            for step in 0..3000 {
                let k = rng.below(keys as u64) as usize;
                let key = format!("key-{k}").into_bytes();
                let hash = hash_of(k);
                match rng.below(10) {
                    0..=4 => {
                        let len = rng.below(12) as usize;
                        let value = rng.bytes(len);
                        let old = model.insert(key.clone(), value.clone());
                        let (change, new) = table.set(hash, &key, &value);
                        assert_eq!(new, old.is_none(), "seed {seed} step {step}");
                        let want = match &old {
                            None => (key.len() + value.len()) as i64,
                            Some(o) => value.len() as i64 - o.len() as i64,
                        };
                        assert_eq!(change, want);
                    }
                    5..=7 => {
                        let old = model.remove(&key);
                        let gone = table.remove(hash, &key);
                        assert_eq!(gone, old.map(|v| (key.len() + v.len()) as u64));
                    }
                    _ => {
                        let got = table.get(hash, &key).map(|e| e.value().to_vec());
                        assert_eq!(got, model.get(&key).cloned(), "seed {seed} step {step}");
                    }
                }
                check(&table);
            }
            let mut all: Vec<_> = table
                .entries()
                .map(|e| (e.key().to_vec(), e.value().to_vec()))
                .collect();
            all.sort();
            let mut want: Vec<_> = model.into_iter().collect();
            want.sort();
            assert_eq!(all, want, "seed {seed}");
        }
    }

    #[test]
    fn an_emptied_table_gives_its_slots_back() {
        let mut t = Table::default();
        for i in 0..10_000u64 {
            t.set(
                i.wrapping_mul(0x2545_F491_4F6C_DD1D),
                &i.to_le_bytes(),
                b"v",
            );
        }
        assert!(t.slots.len() >= 10_000 * 4 / 3);
        for i in 0..10_000u64 {
            assert!(t
                .remove(i.wrapping_mul(0x2545_F491_4F6C_DD1D), &i.to_le_bytes())
                .is_some());
        }
        assert_eq!((t.len(), t.slots.len()), (0, MIN_CAPACITY));
        check(&t);
    }
}
