//! What the services' benchmarks and tests share: CPU and memory figures of a process
//! (from `/proc`), free loopback ports for servers that must know each other's addresses
//! before they start, and a small deterministic random number generator.
//!
//! ```
//! use switchboard::bench::{own_cpu_secs, own_rss_kib, Rng};
//!
//! let mut rng = Rng::new(7);
//! let spread: Vec<u64> = (0..1000).map(|_| rng.below(10)).collect();
//! assert!(spread.iter().all(|&n| n < 10));
//! assert_eq!(Rng::new(7).next_u64(), Rng::new(7).next_u64()); // reproducible
//! if cfg!(target_os = "linux") {
//!     assert!(own_rss_kib().unwrap() > 0);
//!     assert!(own_cpu_secs().unwrap() >= 0.0);
//! }
//! ```

use std::collections::BTreeSet;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// xorshift64*: fast, deterministic (a failure reproduces from its seed) and good enough to
/// spread keys and sizes; not for anything an adversary may predict.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A generator seeded from the clock: different on every call.
    pub fn from_time() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng::new(nanos ^ u64::from(std::process::id()).rotate_left(32))
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (which must not be 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// CPU time (user + system) of process `pid` in seconds, from `/proc/PID/stat`.
pub fn process_cpu_secs(pid: u32) -> Option<f64> {
    cpu_secs_from(&format!("/proc/{pid}/stat"))
}

/// A process's CPU time in seconds, user and system apart (`utime`, `stime`).
pub fn process_cpu_split(pid: u32) -> Option<(f64, f64)> {
    cpu_split_from(&format!("/proc/{pid}/stat"))
}

/// This process's own CPU time (user + system) in seconds.
pub fn own_cpu_secs() -> Option<f64> {
    cpu_secs_from("/proc/self/stat")
}

fn cpu_secs_from(path: &str) -> Option<f64> {
    cpu_split_from(path).map(|(user, system)| user + system)
}

fn cpu_split_from(path: &str) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name, which may itself hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = clock_ticks_per_sec();
    let ticks = |i: usize| Some(fields.get(i)?.parse::<f64>().ok()? / tick);
    Some((ticks(11)?, ticks(12)?))
}

/// `getconf CLK_TCK`, asked once per process (a reading of CPU time in a measured window
/// should not start a process).
fn clock_ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Time process `pid`'s threads have run, in seconds, to the nanosecond: the sum of every
/// thread's `/proc/PID/task/TID/schedstat` (its first field). Where `/proc/PID/stat` counts
/// clock ticks (10 ms each), this resolves the CPU of a slice of half a second to well
/// under 1%. A thread that ends is no longer counted, so compare two readings only while
/// the threads in between stay (a server under a steady load).
pub fn process_run_secs(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let mut path = task.ok()?.path();
        path.push("schedstat");
        // A thread may end between the listing and the read: it adds nothing then.
        if let Ok(stat) = std::fs::read_to_string(&path) {
            ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(ns as f64 / 1e9)
}

/// Resident set size of process `pid`, KiB, from `/proc/PID/status`.
pub fn process_rss_kib(pid: u32) -> Option<u64> {
    rss_kib_from(&format!("/proc/{pid}/status"))
}

/// This process's own resident set size, KiB.
pub fn own_rss_kib() -> Option<u64> {
    rss_kib_from("/proc/self/status")
}

fn rss_kib_from(path: &str) -> Option<u64> {
    let status = std::fs::read_to_string(path).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `n` loopback addresses whose ports were free a moment ago (bound together, then
/// released), for servers that must know each other's addresses before they start. The
/// ports are drawn at random below Linux's ephemeral range (32768 and up), so the local
/// ends of outgoing connections, which come from that range, cannot take them meanwhile.
/// One process never hands out a port twice (tests that run at once in one test binary
/// would otherwise draw the same free port now and then, and one of them fail to bind).
///
/// # Errors
/// When no port can be bound.
pub fn free_addrs(n: usize) -> io::Result<Vec<SocketAddr>> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    let mut rng = Rng::from_time();
    let mut listeners = Vec::with_capacity(n);
    for _ in 0..200 {
        if listeners.len() == n {
            break;
        }
        let port = 20_000 + rng.below(12_000) as u16;
        if handed_out.contains(&port) {
            continue;
        }
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            handed_out.insert(port);
            listeners.push(l);
        }
    }
    while listeners.len() < n {
        listeners.push(TcpListener::bind("127.0.0.1:0")?);
    }
    listeners.iter().map(TcpListener::local_addr).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_addrs_are_distinct_and_bindable() {
        let addrs = free_addrs(3).unwrap();
        assert_eq!(addrs.len(), 3);
        assert!(addrs[0] != addrs[1] && addrs[1] != addrs[2] && addrs[0] != addrs[2]);
        let _held: Vec<_> = addrs
            .iter()
            .map(|a| TcpListener::bind(a).unwrap())
            .collect();
    }

    #[test]
    fn one_process_never_gets_the_same_port_twice() {
        // Released at once each time, so only the record of what was handed out keeps a
        // port from coming back (400 draws from 12,000 ports repeat one 999 times in
        // 1,000 without it).
        let mut seen = BTreeSet::new();
        for _ in 0..100 {
            for addr in free_addrs(4).unwrap() {
                assert!(
                    seen.insert(addr.port()),
                    "port {} handed out twice",
                    addr.port()
                );
            }
        }
    }

    #[test]
    fn rng_covers_its_range() {
        let mut rng = Rng::new(0);
        let mut seen = [false; 8];
        for _ in 0..1000 {
            seen[rng.below(8) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
