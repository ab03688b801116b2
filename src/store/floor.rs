//! The design's floor, to measure the store against (`store-bench --floor`), and the work
//! it can be given to calibrate it ([`FloorWork`]).

use super::keyhash::KeyHasher;
use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Work a floor adds to every request it reads, to calibrate the floor: how the server's
/// CPU per operation grows with one kind of work or another, measured beside the plain
/// floor and the store in the same rounds. Nothing by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloorWork {
    /// Dependent multiply-adds per request, each through a stack slot (`black_box` stores
    /// and reloads the running value): about 6.5 instructions each and no memory beyond
    /// the thread's own stack line, so `--floor-spin 53` adds about 690 instructions per
    /// SET operation of two requests.
    pub spin: u32,
    /// Hash the first 12 bytes of each request (the length of the generator's keys,
    /// `key:NNNNNNNN`) with the store's keyed hash (SipHash-1-3 under a random key), as
    /// every store request hashes its key: the hash's cost alone, without finding the key.
    pub hash: bool,
    /// Touch what a map shared by every thread must: per request, take and give back one
    /// of four lock words (an atomic add and subtract, as a shard's lock) and write (a
    /// `store`) or read (anything else) the 32 bytes of the key's own cell (key number `i`
    /// has cell `i`, of `--keys` cells on lines of their own, shared by all connections).
    /// About 130 instructions per request, the call included: the cost of cache lines
    /// moving between the cores.
    pub share: bool,
    /// Call this many distinct functions per request (at most [`CODE_FUNCTIONS`]), each
    /// three instructions that run (a compare, a branch not taken, an add; twelve bytes or
    /// so, within the 16 bytes functions are aligned to, so on one line of code) followed by
    /// a part that never does, so each runs on a line of its own (`profile_store.py
    /// --cache-sim` counts the hot lines). Beside a floor running as many instructions on
    /// few lines (`spin`), it tells what fetching lines of code costs once each system
    /// call has run the kernel's own code through the same caches.
    pub code: u32,
}

/// The most functions `--floor-code` calls per request.
pub const CODE_FUNCTIONS: u32 = 64;

impl FloorWork {
    /// Why this work cannot be done, if it cannot.
    ///
    /// # Errors
    /// More functions than there are to call.
    pub fn check(&self) -> Result<(), String> {
        if self.code > CODE_FUNCTIONS {
            return Err(format!(
                "--floor-code {} is more than the {CODE_FUNCTIONS} functions there are",
                self.code
            ));
        }
        Ok(())
    }

    /// Does the work for one request `line`; returns a value that depends on all of it.
    #[inline(never)]
    fn apply(&self, shared: &FloorShared, line: &[u8]) -> u64 {
        let mut x = 1u64;
        for _ in 0..self.spin {
            x = std::hint::black_box(x).wrapping_mul(3).wrapping_add(1);
        }
        if self.hash {
            x ^= shared.hasher.hash(&line[..line.len().min(KEY_LEN)]);
        }
        for f in &CODE_CHAIN[..self.code.min(CODE_FUNCTIONS) as usize] {
            x = f(x);
        }
        if self.share {
            let (is_store, rest) = match line.strip_prefix(b"store,key:") {
                Some(rest) => (true, rest),
                None => (false, line.strip_prefix(b"lookup,key:").unwrap_or_default()),
            };
            // A key's eight digits, read as a number without a check (anything else makes
            // some number too): a few instructions, where a scan would be more than the
            // sharing this measures.
            let digits = rest.first_chunk::<8>().copied().unwrap_or([b'0'; 8]);
            let i = digits.iter().fold(0usize, |n, &d| {
                n.wrapping_mul(10)
                    .wrapping_add(usize::from(d.wrapping_sub(b'0')))
            });
            let lock = &shared.locks[i % shared.locks.len()].0;
            lock.fetch_add(1, Ordering::Acquire);
            let cells = shared.cells.len();
            let cell = &shared.cells[if i < cells { i } else { i % cells }].0;
            for word in cell {
                if is_store {
                    word.store(x, Ordering::Relaxed);
                } else {
                    x = x.wrapping_add(word.load(Ordering::Relaxed));
                }
            }
            lock.fetch_sub(1, Ordering::Release);
        }
        x
    }
}

/// The number of a generator's key, from its digits (`NNNNNNNN` of `key:NNNNNNNN`): `None`
/// for anything but digits, or too many of them to be a key.
fn key_number(digits: &[u8]) -> Option<usize> {
    // Fewer digits than `usize::MAX` has cannot overflow.
    if digits.len() > usize::MAX.ilog10() as usize {
        return None;
    }
    digits.iter().try_fold(0usize, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + usize::from(d - b'0'))
    })
}

/// The length of the generator's keys (`key:NNNNNNNN`), which a floor's `hash` work hashes.
const KEY_LEN: usize = 12;

/// What a floor's [`FloorWork`] works on, shared by all its connections.
struct FloorShared {
    hasher: KeyHasher,
    locks: [Padded<AtomicU64>; 4],
    cells: Box<[Padded<[AtomicU64; 4]>]>,
}

/// A value alone on its cache lines (two, as the adjacent-line prefetcher pairs them).
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

impl FloorShared {
    fn new(keys: usize) -> FloorShared {
        FloorShared {
            hasher: KeyHasher::random(),
            locks: Default::default(),
            cells: (0..keys.max(1)).map(|_| Padded::default()).collect(),
        }
    }
}

/// Functions of a few instructions each, made longer than a cache line by a part that
/// never runs (placed after them), so that calling them in turn runs lines of their own.
/// Each adds its own constant, so that no two are alike and none is merged with another.
macro_rules! code_functions {
    ($($name:ident = $k:literal),* $(,)?) => {
        $(
            #[inline(never)]
            fn $name(x: u64) -> u64 {
                if x == u64::MAX {
                    std::hint::cold_path();
                    let mut y = x;
                    for c in [3u64, 5, 7, 11, 13, 17, 19, 23] {
                        y = std::hint::black_box(y.rotate_left(c as u32) ^ c.wrapping_mul($k));
                    }
                    return y;
                }
                x.wrapping_add($k)
            }
        )*
        /// The functions `--floor-code` calls a prefix of.
        static CODE_CHAIN: [fn(u64) -> u64; CODE_FUNCTIONS as usize] = [$($name),*];
    };
}

code_functions!(
    c00 = 1,
    c01 = 2,
    c02 = 3,
    c03 = 4,
    c04 = 5,
    c05 = 6,
    c06 = 7,
    c07 = 8,
    c08 = 9,
    c09 = 10,
    c10 = 11,
    c11 = 12,
    c12 = 13,
    c13 = 14,
    c14 = 15,
    c15 = 16,
    c16 = 17,
    c17 = 18,
    c18 = 19,
    c19 = 20,
    c20 = 21,
    c21 = 22,
    c22 = 23,
    c23 = 24,
    c24 = 25,
    c25 = 26,
    c26 = 27,
    c27 = 28,
    c28 = 29,
    c29 = 30,
    c30 = 31,
    c31 = 32,
    c32 = 33,
    c33 = 34,
    c34 = 35,
    c35 = 36,
    c36 = 37,
    c37 = 38,
    c38 = 39,
    c39 = 40,
    c40 = 41,
    c41 = 42,
    c42 = 43,
    c43 = 44,
    c44 = 45,
    c45 = 46,
    c46 = 47,
    c47 = 48,
    c48 = 49,
    c49 = 50,
    c50 = 51,
    c51 = 52,
    c52 = 53,
    c53 = 54,
    c54 = 55,
    c55 = 56,
    c56 = 57,
    c57 = 58,
    c58 = 59,
    c59 = 60,
    c60 = 61,
    c61 = 62,
    c62 = 63,
    c63 = 64,
);

/// The floor of the design, to measure the store against: a bare thread-per-connection
/// loop that answers every `lookup,key:NNNNNNNN` line with that key's `{just,…}` reply
/// (made once, at start) and ignores every other line. No request parsing beyond the key's
/// number, no map, no lock, no counters: what one thread per connection costs with the
/// same generator, the same replies and the same system calls (one read and one write per
/// batch). Line framing only. Serves until the process is killed. `work` (none by
/// default) is added to every request, to calibrate it ([`FloorWork`]).
///
/// # Errors
/// When the listener fails.
pub fn serve_floor(
    listener: std::net::TcpListener,
    keys: usize,
    value_size: usize,
    work: FloorWork,
) -> io::Result<()> {
    let replies: Arc<[Vec<u8>]> = (0..keys)
        .map(|i| {
            let mut r = b"{just,".to_vec();
            r.extend_from_slice(&super::bench::value(i, value_size));
            r.extend_from_slice(b"}\n");
            r
        })
        .collect();
    let shared = Arc::new(FloorShared::new(keys));
    for stream in listener.incoming() {
        let stream = stream?;
        let (replies, shared) = (Arc::clone(&replies), Arc::clone(&shared));
        std::thread::Builder::new()
            .stack_size(128 << 10)
            .spawn(move || floor_connection(stream, &replies, work, &shared))?;
    }
    Ok(())
}

/// One connection of [`serve_floor`]: read what is there, answer every whole line, write
/// the answers at once, until the client closes.
fn floor_connection(
    mut stream: TcpStream,
    replies: &[Vec<u8>],
    work: FloorWork,
    shared: &FloorShared,
) {
    use std::io::Read;
    const PREFIX: &[u8] = b"lookup,key:";
    let _ = stream.set_nodelay(true);
    let (mut buf, mut out) = (vec![0u8; 64 << 10], Vec::with_capacity(64 << 10));
    let (mut start, mut end) = (0, 0);
    loop {
        if start == end {
            (start, end) = (0, 0);
        } else if end == buf.len() {
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }
        match stream.read(&mut buf[end..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => end += n,
        }
        while let Some(nl) = crate::framing::find_newline(&buf[start..end]) {
            let line = &buf[start..start + nl];
            start += nl + 1;
            if work != FloorWork::default() {
                std::hint::black_box(work.apply(shared, line));
            }
            let Some(digits) = line.strip_prefix(PREFIX) else {
                continue;
            };
            if let Some(reply) = key_number(digits).and_then(|i| replies.get(i)) {
                out.extend_from_slice(reply);
            } else {
                out.extend_from_slice(b"{error,unknown}\n");
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_work_spins_hashes_a_keys_length_shares_the_keys_cell_and_calls_functions() {
        let shared = FloorShared::new(10);
        let none = FloorWork::default();
        assert_eq!(none.apply(&shared, b"store,k,v"), 1);
        let spin = FloorWork {
            spin: 3,
            ..FloorWork::default()
        };
        assert_eq!(spin.apply(&shared, b"x"), ((3 + 1) * 3 + 1) * 3 + 1);
        let hash = FloorWork {
            hash: true,
            ..FloorWork::default()
        };
        let h = |line: &[u8]| hash.apply(&shared, line);
        let keyed = |bytes: &[u8]| shared.hasher.hash(bytes);
        assert_eq!(h(b"store,key:00000001,v"), 1 ^ keyed(b"store,key:00"));
        assert_eq!(h(b"stats"), 1 ^ keyed(b"stats"));
        assert_eq!(super::super::bench::key(7).len(), KEY_LEN);
        // A store writes its key's cell (with the spin's result), a lookup of that key
        // reads it back, a lookup of any other key does not see it; every lock is given
        // back. Keys past the cells wrap around; what is not a key uses cell 0.
        let share = FloorWork {
            spin: 1,
            share: true,
            ..FloorWork::default()
        };
        share.apply(&shared, b"store,key:00000003,v");
        for i in 0..10 {
            let seen = share.apply(&shared, format!("lookup,key:{i:08}").as_bytes());
            assert_eq!(seen, if i == 3 { 4 + 4 * 4 } else { 4 }, "key {i}");
        }
        assert_eq!(share.apply(&shared, b"lookup,key:00000013"), 4 + 4 * 4);
        let long = format!("lookup,key:{}", "9".repeat(40));
        for odd in [
            &b"stats"[..],
            b"",
            b"lookup,key:",
            b"lookup,key:x1",
            long.as_bytes(),
        ] {
            assert_eq!(share.apply(&shared, odd), 4, "{odd:?}");
        }
        share.apply(&shared, b"store,key:,v");
        assert_eq!(share.apply(&shared, b"lookup,key:00000000"), 4 + 4 * 4);
        assert!(shared
            .locks
            .iter()
            .all(|l| l.0.load(Ordering::Relaxed) == 0));
        // The functions add 1, 2, 3, ... in turn; each is a function of its own.
        let code = |n| FloorWork {
            code: n,
            ..FloorWork::default()
        };
        assert_eq!(code(3).apply(&shared, b"x"), 1 + 1 + 2 + 3);
        assert_eq!(code(CODE_FUNCTIONS).apply(&shared, b"x"), 1 + 64 * 65 / 2);
        let mut at: Vec<usize> = CODE_CHAIN.iter().map(|&f| f as usize).collect();
        at.sort_unstable();
        at.dedup();
        assert_eq!(at.len(), CODE_FUNCTIONS as usize, "functions merged");
        assert!(code(CODE_FUNCTIONS).check().is_ok());
        let refused = code(CODE_FUNCTIONS + 1).check().unwrap_err();
        assert!(refused.contains("more than the 64 functions"), "{refused}");
    }

    #[test]
    fn a_key_number_is_its_digits_and_nothing_else() {
        assert_eq!(key_number(b"00000042"), Some(42));
        assert_eq!(key_number(b""), Some(0));
        assert_eq!(key_number(b"12a"), None);
        assert_eq!(key_number(b"-1"), None);
        let most = "9".repeat(usize::MAX.ilog10() as usize);
        assert_eq!(key_number(most.as_bytes()), most.parse().ok());
        assert_eq!(key_number(format!("{most}9").as_bytes()), None);
    }
}
