//! One memory budget for what clients make a server hold (`--max-client-memory`): bytes of
//! partial frames in connection read buffers, frames in flight in a pipeline, frames queued
//! in outboxes, parsed messages waiting in channels. Per-frame limits bound one frame; this
//! bounds their sum, whatever the number of connections.
//!
//! Each connection gets an [`Account`] ([`ServerConfig::client_memory`] does it for every
//! connection of a server); what it holds is charged to the account, and through it to the
//! shared [`Budget`]. A charge that would pass the budget closes the connection holding the
//! most, with a logged reason (as Redis 7's `maxmemory-clients` does), or, when that is the
//! connection asking, refuses its charge and that connection ends: never the process.
//!
//! Charges are made where memory is allocated, not per byte or per request: a read buffer
//! is charged when it grows and credited when it is given back, so a connection whose
//! frames fit its buffer touches the shared counter once in its life.
//!
//! Evicted connections give their bytes back as soon as their threads run. A charge past
//! the budget while some are on their way back waits for them (up to 100 ms) rather than
//! evict one more connection; a charge made under a lock other clients wait on (an
//! outbox's, queued under a chat room's or a messenger's state lock) does not wait, and
//! counts those bytes as given back ([`Charge::resize_now`]), so nobody else stalls on it.
//!
//! ```
//! use switchboard::budget::Budget;
//!
//! let budget = Budget::new("demo", 1000);
//! let a = budget.account("connection 1", None);
//! let b = budget.account("connection 2", None);
//! let mut held_by_a = a.charge(0).unwrap();
//! held_by_a.resize(600)?;
//! let held_by_b = b.charge(300)?;
//! // B asks for 200 more: the budget would pass 1000, and A holds the most: A is cut off
//! // (its socket shut down) and B's charge goes through.
//! let more = b.charge(200)?;
//! assert!(a.is_evicted() && !b.is_evicted());
//! // A asks again: refused.
//! assert!(held_by_a.resize(700).is_err());
//! drop(held_by_a);
//! assert_eq!(budget.held(), 500);
//! assert_eq!(budget.peak(), 1100);
//! # drop((held_by_b, more));
//! # Ok::<(), switchboard::budget::OverBudget>(())
//! ```
//!
//! [`ServerConfig::client_memory`]: crate::server::ServerConfig::client_memory

use crate::log_info;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread;
use std::time::{Duration, Instant};

/// How long a charge past the budget waits for evicted connections' bytes to come back
/// before it evicts another connection (or is refused).
const DOOMED_WAIT: Duration = Duration::from_millis(100);

/// `--max-client-memory` unless set: enough for thousands of busy clients, small next to
/// a machine's memory, and far below what 10,000 connections holding maximal frames could
/// take (160 GiB).
pub const DEFAULT_MAX_CLIENT_MEMORY: usize = 256 << 20;

/// A server-wide (or process-wide: share clones) budget of client memory.
///
/// Example: the [module docs](crate::budget).
#[derive(Clone)]
pub struct Budget(Arc<Shared>);

struct Shared {
    name: String,
    limit: usize,
    /// Bytes charged now, evicted accounts' included.
    held: AtomicUsize,
    /// Of `held`, what evicted accounts still hold: on its way back, so a charge past the
    /// budget waits for it (or, when it must not wait, counts it as back) before it evicts
    /// another connection.
    doomed: AtomicUsize,
    peak: AtomicUsize,
    evictions: AtomicU64,
    refusals: AtomicU64,
    next_key: AtomicU64,
    /// Every live account, to find the largest when the budget is reached (rare: only
    /// then is the table scanned).
    accounts: Mutex<HashMap<u64, Weak<AccountShared>>>,
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("name", &self.0.name)
            .field("limit", &self.0.limit)
            .field("held", &self.held())
            .field("peak", &self.peak())
            .finish()
    }
}

/// A charge was refused: granting it would pass the budget, and the connection asking
/// holds the most (or was already cut off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverBudget {
    /// The budget's limit in bytes.
    pub limit: usize,
    /// Bytes the connection asking held, and asked for.
    pub held: usize,
    /// Bytes asked for.
    pub asked: usize,
}

impl fmt::Display for OverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "over the client memory budget ({} held, {} more asked, budget {})",
            Mib(self.held),
            Mib(self.asked),
            Mib(self.limit)
        )
    }
}

impl std::error::Error for OverBudget {}

impl From<OverBudget> for io::Error {
    fn from(e: OverBudget) -> io::Error {
        io::Error::new(io::ErrorKind::OutOfMemory, e)
    }
}

/// Bytes as MiB with one decimal, for log lines.
struct Mib(usize);

impl fmt::Display for Mib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1} MiB", self.0 as f64 / (1 << 20) as f64)
    }
}

impl Budget {
    /// A budget of `limit` bytes; `name` prefixes its log lines.
    pub fn new(name: &str, limit: usize) -> Budget {
        Budget(Arc::new(Shared {
            name: name.to_owned(),
            limit,
            held: AtomicUsize::new(0),
            doomed: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            next_key: AtomicU64::new(0),
            accounts: Mutex::default(),
        }))
    }

    /// An account for one connection (`label` names it in log lines); `stream` is shut
    /// down if the connection is evicted. Dropping the last handle on it unregisters it.
    pub fn account(&self, label: &str, stream: Option<&Arc<TcpStream>>) -> Account {
        let key = self.0.next_key.fetch_add(1, Ordering::Relaxed);
        let account = Arc::new(AccountShared {
            budget: Arc::clone(&self.0),
            key,
            label: label.to_owned(),
            stream: stream.map_or_else(Weak::new, Arc::downgrade),
            held: AtomicUsize::new(0),
            evicted: AtomicBool::new(false),
        });
        self.0.table().insert(key, Arc::downgrade(&account));
        Account(account)
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// Bytes charged now.
    pub fn held(&self) -> usize {
        self.0.held.load(Ordering::Relaxed)
    }

    /// The most ever charged at once.
    pub fn peak(&self) -> usize {
        self.0.peak.load(Ordering::Relaxed)
    }

    /// Connections closed to make room.
    pub fn evictions(&self) -> u64 {
        self.0.evictions.load(Ordering::Relaxed)
    }

    /// Charges refused.
    pub fn refusals(&self) -> u64 {
        self.0.refusals.load(Ordering::Relaxed)
    }

    /// For tests: charges `step` bytes on one new account after another until the budget
    /// evicts a connection (the largest holder, if it holds more than `step`), at most
    /// `max` times; the charges, to hold or drop.
    #[cfg(test)]
    pub(crate) fn charge_until_an_eviction(&self, step: usize, max: usize) -> Vec<Charge> {
        let mut charges = Vec::new();
        for i in 0..max {
            if self.evictions() > 0 {
                break;
            }
            let account = self.account(&format!("filler {i}"), None);
            charges.push(account.charge(step).expect("a filler's charge"));
        }
        charges
    }

    /// `peak 12.0 MiB of 256.0 MiB, 3 connections closed, 0 refused`: for shutdown lines.
    pub fn summary(&self) -> String {
        format!(
            "client memory peak {} of {}, {} connections closed and {} charges refused over it",
            Mib(self.peak()),
            Mib(self.limit()),
            self.evictions(),
            self.refusals()
        )
    }
}

impl Shared {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Weak<AccountShared>>> {
        self.accounts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The account holding the most among those not yet evicted.
    fn largest(&self) -> Option<Arc<AccountShared>> {
        // Upgraded under the table's lock, but looked at and dropped after it: a
        // connection may let go of its last handle meanwhile, and then the one upgraded
        // here is the last, whose drop takes the table's lock to unregister the account.
        let live: Vec<Arc<AccountShared>> =
            self.table().values().filter_map(Weak::upgrade).collect();
        live.into_iter()
            .filter(|account| !account.evicted.load(Ordering::Relaxed))
            .max_by_key(|account| account.held())
    }

    fn note_peak(&self, held: usize) {
        if held > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(held, Ordering::Relaxed);
        }
    }
}

/// One connection's share of a [`Budget`]: cheap to clone (hand one to every thread that
/// holds memory for the connection).
#[derive(Clone)]
pub struct Account(Arc<AccountShared>);

struct AccountShared {
    budget: Arc<Shared>,
    key: u64,
    label: String,
    stream: Weak<TcpStream>,
    held: AtomicUsize,
    evicted: AtomicBool,
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("label", &self.0.label)
            .field("held", &self.held())
            .field("evicted", &self.is_evicted())
            .finish()
    }
}

impl Drop for AccountShared {
    fn drop(&mut self) {
        self.budget.table().remove(&self.key);
    }
}

impl Account {
    /// Charges `n` bytes; the returned [`Charge`] gives them back when dropped.
    ///
    /// # Errors
    /// [`OverBudget`] when the budget would be passed and this connection holds the most
    /// (or has been evicted already); otherwise the largest holder is evicted instead.
    pub fn charge(&self, n: usize) -> Result<Charge, OverBudget> {
        self.grow(n, Wait::Yes)?;
        Ok(Charge {
            account: self.clone(),
            bytes: n,
        })
    }

    /// As [`charge`](Self::charge), for a charge made under a lock others wait on: past
    /// the budget it never waits for evicted connections' bytes to come back (see
    /// [`Charge::resize_now`]).
    ///
    /// # Errors
    /// As [`charge`](Self::charge).
    pub fn charge_now(&self, n: usize) -> Result<Charge, OverBudget> {
        self.grow(n, Wait::No)?;
        Ok(Charge {
            account: self.clone(),
            bytes: n,
        })
    }

    /// Bytes this connection holds now.
    pub fn held(&self) -> usize {
        self.0.held.load(Ordering::Relaxed)
    }

    /// Whether this connection was closed to make room.
    pub fn is_evicted(&self) -> bool {
        self.0.evicted.load(Ordering::Relaxed)
    }

    fn grow(&self, n: usize, wait: Wait) -> Result<(), OverBudget> {
        if n == 0 {
            return Ok(());
        }
        let me = &*self.0;
        let budget = &*me.budget;
        let refuse = |held: usize| {
            budget.held.fetch_sub(n, Ordering::Relaxed);
            budget.refusals.fetch_add(1, Ordering::Relaxed);
            OverBudget {
                limit: budget.limit,
                held,
                asked: n,
            }
        };
        let mut after = budget.held.fetch_add(n, Ordering::Relaxed) + n;
        if me.evicted.load(Ordering::Relaxed) {
            return Err(refuse(me.held.load(Ordering::Relaxed)));
        }
        // Connections evicted already give their bytes back as soon as their threads run:
        // wait a moment for that rather than evict another (or hold both at once).
        let deadline = Instant::now() + DOOMED_WAIT;
        while wait == Wait::Yes
            && after > budget.limit
            && budget.doomed.load(Ordering::Relaxed) > 0
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(1));
            after = budget.held.load(Ordering::Relaxed);
        }
        // A charge that must not wait counts the evicted connections' bytes as back: at
        // most what they held is held twice, for as long as their threads take to run.
        let over = match wait {
            Wait::Yes => after,
            Wait::No => after.saturating_sub(budget.doomed.load(Ordering::Relaxed)),
        };
        if over > budget.limit {
            let mine = me.held.load(Ordering::Relaxed) + n;
            match budget.largest() {
                Some(victim) if victim.key != me.key && victim.held() > mine => {
                    victim.evict(budget, mine, &me.label);
                }
                // Whoever is refused logs why, as the end of its connection or its frame.
                _ => return Err(refuse(mine - n)),
            }
        }
        me.held.fetch_add(n, Ordering::Relaxed);
        budget.note_peak(after);
        Ok(())
    }

    fn shrink(&self, n: usize) {
        if n == 0 {
            return;
        }
        let me = &*self.0;
        me.held.fetch_sub(n, Ordering::Relaxed);
        me.budget.held.fetch_sub(n, Ordering::Relaxed);
        if me.evicted.load(Ordering::Relaxed) {
            // What it held when it was evicted counted as on its way back.
            let _ = me
                .budget
                .doomed
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                    Some(d.saturating_sub(n))
                });
        }
    }
}

impl AccountShared {
    fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Cuts this connection off to make room for `asker`'s `wanted` bytes.
    fn evict(&self, budget: &Shared, wanted: usize, asker: &str) {
        if self.evicted.swap(true, Ordering::Relaxed) {
            return;
        }
        let held = self.held();
        budget.doomed.fetch_add(held, Ordering::Relaxed);
        budget.evictions.fetch_add(1, Ordering::Relaxed);
        log_info!(
            "{}: client memory budget of {} reached ({} needed by {asker}): closing {}, \
             which holds the most ({})",
            budget.name,
            Mib(budget.limit),
            Mib(wanted),
            self.label,
            Mib(held)
        );
        if let Some(stream) = self.stream.upgrade() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Whether a charge past the budget may wait for evicted connections' bytes to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Yes,
    No,
}

/// Bytes held on an [`Account`]; given back when dropped.
#[derive(Debug)]
pub struct Charge {
    account: Account,
    bytes: usize,
}

impl Charge {
    /// Bytes charged.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Charges `bytes` in all instead: more is charged as [`Account::charge`] does, less
    /// is given back.
    ///
    /// # Errors
    /// As [`Account::charge`]; the charge is unchanged then.
    pub fn resize(&mut self, bytes: usize) -> Result<(), OverBudget> {
        self.resize_with(bytes, Wait::Yes)
    }

    /// As [`resize`](Self::resize), for a charge made under a lock that other clients
    /// wait on: past the budget it never waits for evicted connections' bytes to come
    /// back, it counts them as back (so the budget may be passed by at most what those
    /// connections held, until their threads give it back).
    ///
    /// # Errors
    /// As [`Account::charge`]; the charge is unchanged then.
    pub fn resize_now(&mut self, bytes: usize) -> Result<(), OverBudget> {
        self.resize_with(bytes, Wait::No)
    }

    fn resize_with(&mut self, bytes: usize, wait: Wait) -> Result<(), OverBudget> {
        if bytes > self.bytes {
            self.account.grow(bytes - self.bytes, wait)?;
        } else {
            self.account.shrink(self.bytes - bytes);
        }
        self.bytes = bytes;
        Ok(())
    }

    /// The account charged.
    pub fn account(&self) -> &Account {
        &self.account
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.account.shrink(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn within_the_budget_charges_add_up_and_come_back() {
        let budget = Budget::new("t", 1 << 20);
        let a = budget.account("a", None);
        let c1 = a.charge(1000).unwrap();
        let mut c2 = a.charge(24).unwrap();
        assert_eq!((a.held(), budget.held()), (1024, 1024));
        c2.resize(5000).unwrap();
        c2.resize(10).unwrap();
        assert_eq!(budget.held(), 1010);
        drop((c1, c2));
        assert_eq!((a.held(), budget.held(), budget.peak()), (0, 0, 6000));
        assert_eq!((budget.evictions(), budget.refusals()), (0, 0));
    }

    #[test]
    fn the_largest_holder_is_closed_and_its_bytes_count_as_returning() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let served = Arc::new(listener.accept().unwrap().0);
        let budget = Budget::new("t", 100);
        let big = budget.account("big", Some(&served));
        let small = budget.account("small", None);
        let held = big.charge(80).unwrap();
        let s1 = small.charge(15).unwrap();
        // 15 + 80 + 10 > 100: the big one goes, the small one's charge stands.
        let s2 = small.charge(10).unwrap();
        assert!(big.is_evicted());
        let mut byte = [0u8; 1];
        assert_eq!(
            std::io::Read::read(&mut &client, &mut byte).unwrap(),
            0,
            "the evicted connection's socket is shut down"
        );
        // The evicted one may not grow again.
        assert!(big.charge(1).is_err());
        // Its 80 bytes are on their way back: a charge past the budget meanwhile waits for
        // them, and evicts nobody else.
        let freeing = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            drop(held);
        });
        let s3 = small.charge(50).unwrap();
        freeing.join().unwrap();
        assert!(!small.is_evicted());
        assert_eq!(budget.evictions(), 1);
        assert_eq!(budget.held(), 75);
        // Now the small one is the largest: its own charge past the budget is refused.
        let err = small.charge(30).unwrap_err();
        assert_eq!((err.held, err.asked, err.limit), (75, 30, 100));
        assert_eq!(budget.held(), 75);
        drop((s1, s2, s3));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_charge_that_must_not_wait_counts_evicted_bytes_as_back() {
        let budget = Budget::new("t", 100);
        let big = budget.account("big", None);
        let small = budget.account("small", None);
        let other = budget.account("other", None);
        let held = big.charge(70).unwrap();
        let s1 = small.charge(20).unwrap();
        let o1 = other.charge(5).unwrap();
        // Past the budget: big goes, and keeps its 70 bytes (its thread has not run yet).
        let s2 = small.charge(10).unwrap();
        assert!(big.is_evicted());
        // Small (30) and other (5) hold 35 of their own. A charge that may wait would wait
        // for big's bytes and, with them still held after 100 ms, refuse small (the largest
        // holder now); one that must not wait counts them as back and goes through at once.
        let mut s3 = small.charge(0).unwrap();
        s3.resize_now(40).unwrap();
        assert_eq!((budget.evictions(), budget.refusals()), (1, 0));
        assert!(!small.is_evicted() && !other.is_evicted());
        assert_eq!(budget.held(), 145);
        // Past the budget even with big's bytes counted as back (70 + 85 > 100), and
        // other would then hold the most: refused, as a charge that waits would be.
        let mut o2 = other.charge(0).unwrap();
        let err = o2.resize_now(80).unwrap_err();
        assert_eq!((err.held, err.asked), (5, 80));
        assert_eq!((budget.evictions(), budget.refusals()), (1, 1));
        assert_eq!(budget.held(), 145);
        drop((held, s1, s2, s3, o1, o2));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn accounts_leave_the_table_when_dropped() {
        let budget = Budget::new("t", 10);
        let a = budget.account("a", None);
        let b = a.clone();
        assert_eq!(budget.0.table().len(), 1);
        drop(a);
        assert_eq!(budget.0.table().len(), 1);
        drop(b);
        assert!(budget.0.table().is_empty());
    }
    #[test]
    fn a_connection_ending_while_the_largest_is_sought_deadlocks_nothing() {
        // Connections end (their last handle dropped) while a charge past the budget scans
        // the table for the largest: the handle the scan upgraded may be the last one, and
        // dropping it unregisters the account, which takes the table's lock.
        let budget = Budget::new("t", 10);
        let churned = Arc::new(AtomicBool::new(false));
        let (done, finished) = std::sync::mpsc::channel();
        let scanner = {
            let (budget, churned, done) = (budget.clone(), Arc::clone(&churned), done.clone());
            thread::spawn(move || {
                let mut scans = 0u64;
                while !churned.load(Ordering::Relaxed) {
                    drop(budget.0.largest());
                    scans += 1;
                }
                done.send(scans).unwrap();
            })
        };
        let churner = thread::spawn(move || {
            let mut open: Vec<Option<(Account, Charge)>> = (0..4).map(|_| None).collect();
            for i in 0..100_000 {
                let account = budget.account("c", None);
                let charge = account.charge(i % 3).unwrap();
                open[i % 4] = Some((account, charge));
            }
            drop(open);
            churned.store(true, Ordering::Relaxed);
            done.send(0).unwrap();
        });
        for _ in 0..2 {
            finished
                .recv_timeout(Duration::from_secs(30))
                .expect("a thread deadlocked on the account table");
        }
        scanner.join().unwrap();
        churner.join().unwrap();
    }
}
