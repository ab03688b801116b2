//! A linearizability checker for recorded key-value histories: concurrent clients' `store`
//! and `lookup` calls, each with the time it was invoked and the time its reply came back,
//! checked against a register per key (Wing & Gong's search with Lowe's memoisation, the
//! algorithm of Porcupine and Knossos). For tests of replicated stores under partitions and
//! crashes.
//!
//! A register's history is linearizable when each call can be given one instant between its
//! invocation and its return at which it took effect, such that every lookup returns the
//! value of the latest store before it. Keys are independent registers, so each key is
//! checked alone (linearizability is compositional), which keeps the search small.
//!
//! A call whose outcome is unknown (the connection died, a timeout) is recorded with no
//! return: a store may then have taken effect at any time after its invocation, or never; a
//! lookup with no answer tells nothing and is left out.
//!
//! ```
//! use switchboard::lincheck::{check, Call, Op};
//!
//! // Client 1 stores x=1 over [0, 10]; client 2's lookup over [5, 15] sees it, which is
//! // fine: the store may take effect at 5.
//! let ok = [
//!     Call { client: 1, invoked: 0, returned: Some(10), op: Op::store("x", "1") },
//!     Call { client: 2, invoked: 5, returned: Some(15), op: Op::found("x", "1") },
//! ];
//! assert!(check(&ok).is_ok());
//!
//! // A lookup that starts after the store returned must see it.
//! let stale = [
//!     Call { client: 1, invoked: 0, returned: Some(10), op: Op::store("x", "1") },
//!     Call { client: 2, invoked: 11, returned: Some(15), op: Op::absent("x") },
//! ];
//! let err = check(&stale).unwrap_err();
//! assert_eq!(err.key, b"x");
//! println!("{err}"); // the key's history, one call a line
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;

/// One operation on the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `store,KEY,VALUE`.
    Store {
        /// The key.
        key: Vec<u8>,
        /// The value stored.
        value: Vec<u8>,
    },
    /// `lookup,KEY`, with what it returned (`None` for `nothing`).
    Lookup {
        /// The key.
        key: Vec<u8>,
        /// The value seen, or `None` when the key was absent.
        seen: Option<Vec<u8>>,
    },
}

impl Op {
    /// A store of `value` under `key`.
    pub fn store(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Op {
        Op::Store {
            key: key.into(),
            value: value.into(),
        }
    }

    /// A lookup of `key` that found `value`.
    pub fn found(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Op {
        Op::Lookup {
            key: key.into(),
            seen: Some(value.into()),
        }
    }

    /// A lookup of `key` that answered `nothing`.
    pub fn absent(key: impl Into<Vec<u8>>) -> Op {
        Op::Lookup {
            key: key.into(),
            seen: None,
        }
    }

    fn key(&self) -> &[u8] {
        match self {
            Op::Store { key, .. } | Op::Lookup { key, .. } => key,
        }
    }
}

/// One call as a client saw it. Times are in any monotonic unit (nanoseconds since the
/// test began, say), from one clock for all clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Which client made it (for the report).
    pub client: u64,
    /// When the request was sent.
    pub invoked: u64,
    /// When its reply arrived (for a store: when it was acknowledged); `None` when the
    /// outcome is unknown.
    pub returned: Option<u64>,
    /// What it did.
    pub op: Op,
}

/// A key whose history no order explains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The key.
    pub key: Vec<u8>,
    /// Its calls, by invocation time.
    pub history: Vec<Call>,
    /// The most calls any attempted order could explain before it got stuck.
    pub explained: usize,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "history of key {:?} is not linearizable ({} calls; at most {} explained in order):",
            String::from_utf8_lossy(&self.key),
            self.history.len(),
            self.explained
        )?;
        for c in &self.history {
            let ret = c.returned.map_or("?".to_owned(), |r| r.to_string());
            let what = match &c.op {
                Op::Store { value, .. } => format!("store {:?}", String::from_utf8_lossy(value)),
                Op::Lookup { seen, .. } => match seen {
                    Some(v) => format!("lookup -> {:?}", String::from_utf8_lossy(v)),
                    None => "lookup -> nothing".to_owned(),
                },
            };
            writeln!(
                f,
                "  client {:>3} [{:>12} .. {:>12}] {what}",
                c.client, c.invoked, ret
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// Checks a whole history, key by key.
///
/// # Errors
/// The first key (in key order) whose calls have no linearization.
pub fn check(history: &[Call]) -> Result<(), Violation> {
    let mut by_key: HashMap<&[u8], Vec<&Call>> = HashMap::new();
    for c in history {
        by_key.entry(c.op.key()).or_default().push(c);
    }
    let mut keys: Vec<&[u8]> = by_key.keys().copied().collect();
    keys.sort();
    for key in keys {
        check_register(key, &by_key[key])?;
    }
    Ok(())
}

/// One call reduced for the search: values interned as small numbers (0 is "absent").
#[derive(Clone, Copy)]
struct Step {
    invoked: u64,
    returned: u64,
    store: bool,
    value: u32,
}

fn check_register<'a>(key: &[u8], calls: &[&'a Call]) -> Result<(), Violation> {
    // A lookup with no answer says nothing, so it is left out.
    let mut calls: Vec<&'a Call> = calls
        .iter()
        .copied()
        .filter(|c| c.returned.is_some() || matches!(c.op, Op::Store { .. }))
        .collect();
    calls.sort_by_key(|c| c.invoked);
    let mut values: HashMap<&[u8], u32> = HashMap::new();
    let mut intern = |v: Option<&'a [u8]>| -> u32 {
        v.map_or(0, |v| {
            let next = values.len() as u32 + 1;
            *values.entry(v).or_insert(next)
        })
    };
    let steps: Vec<Step> = calls
        .iter()
        .map(|c| {
            let (store, value) = match &c.op {
                Op::Store { value, .. } => (true, intern(Some(value))),
                Op::Lookup { seen, .. } => (false, intern(seen.as_deref())),
            };
            Step {
                invoked: c.invoked,
                returned: c.returned.unwrap_or(u64::MAX),
                store,
                value,
            }
        })
        .collect();
    let mut search = Search {
        steps: &steps,
        done: vec![0u64; steps.len().div_ceil(64)],
        seen: HashSet::new(),
        best: 0,
    };
    if search.run(0, 0) {
        return Ok(());
    }
    Err(Violation {
        key: key.to_vec(),
        history: calls.into_iter().cloned().collect(),
        explained: search.best,
    })
}

struct Search<'a> {
    steps: &'a [Step],
    /// Bit i set: call i is already placed in the order.
    done: Vec<u64>,
    /// (placed calls, register value) pairs already shown to lead nowhere.
    seen: HashSet<(Vec<u64>, u32)>,
    best: usize,
}

impl Search<'_> {
    fn is_done(&self, i: usize) -> bool {
        self.done[i / 64] & (1 << (i % 64)) != 0
    }

    fn flip(&mut self, i: usize) {
        self.done[i / 64] ^= 1 << (i % 64);
    }

    /// Depth-first: place one more call whose invocation precedes every pending call's
    /// return (otherwise that return would have to come before it), recursing until every
    /// call with a known return is placed. Unknown stores may stay unplaced: they may never
    /// have happened.
    fn run(&mut self, placed: usize, value: u32) -> bool {
        self.best = self.best.max(placed);
        let pending: Vec<usize> = (0..self.steps.len())
            .filter(|&i| !self.is_done(i))
            .collect();
        let Some(first_return) = pending.iter().map(|&i| self.steps[i].returned).min() else {
            return true;
        };
        if first_return == u64::MAX {
            return true;
        }
        if !self.seen.insert((self.done.clone(), value)) {
            return false;
        }
        let candidates = pending
            .into_iter()
            .filter(|&i| self.steps[i].invoked <= first_return);
        for i in candidates {
            let s = self.steps[i];
            let next = if s.store {
                s.value
            } else if s.value == value {
                value
            } else {
                continue;
            };
            self.flip(i);
            let found = self.run(placed + 1, next);
            self.flip(i);
            if found {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(client: u64, invoked: u64, returned: Option<u64>, op: Op) -> Call {
        Call {
            client,
            invoked,
            returned,
            op,
        }
    }

    #[test]
    fn sequential_histories() {
        let h = [
            call(1, 0, Some(1), Op::absent("k")),
            call(1, 2, Some(3), Op::store("k", "a")),
            call(1, 4, Some(5), Op::found("k", "a")),
            call(1, 6, Some(7), Op::store("k", "b")),
            call(1, 8, Some(9), Op::found("k", "b")),
        ];
        assert!(check(&h).is_ok());
        let mut bad = h.clone();
        bad[4].op = Op::found("k", "a");
        let err = check(&bad).unwrap_err();
        assert_eq!(err.explained, 4);
        assert!(err.to_string().contains("lookup -> \"a\""), "{err}");
    }

    #[test]
    fn overlapping_calls_may_take_effect_in_either_order() {
        // Two stores overlap; readers after both may see either, but not disagree over time.
        let h = [
            call(1, 0, Some(10), Op::store("k", "a")),
            call(2, 0, Some(10), Op::store("k", "b")),
            call(3, 11, Some(12), Op::found("k", "a")),
            call(4, 13, Some(14), Op::found("k", "a")),
        ];
        assert!(check(&h).is_ok());
        let flip_flop = [
            call(1, 0, Some(10), Op::store("k", "a")),
            call(2, 0, Some(10), Op::store("k", "b")),
            call(3, 11, Some(12), Op::found("k", "a")),
            call(4, 13, Some(14), Op::found("k", "b")),
        ];
        assert!(check(&flip_flop).is_err());
    }

    #[test]
    fn a_read_overlapping_a_write_may_see_old_or_new_but_not_go_back() {
        let h = [
            call(1, 0, Some(1), Op::store("k", "old")),
            call(1, 2, Some(20), Op::store("k", "new")),
            call(2, 3, Some(4), Op::found("k", "new")),
            call(3, 5, Some(6), Op::found("k", "old")),
        ];
        assert!(check(&h).is_err(), "new was seen, then old: time went back");
        let h2 = [
            call(1, 0, Some(1), Op::store("k", "old")),
            call(1, 2, Some(20), Op::store("k", "new")),
            call(2, 3, Some(4), Op::found("k", "old")),
            call(3, 5, Some(6), Op::found("k", "new")),
        ];
        assert!(check(&h2).is_ok());
    }

    #[test]
    fn an_unknown_store_may_apply_late_or_never() {
        let never = [
            call(1, 0, None, Op::store("k", "maybe")),
            call(2, 5, Some(6), Op::absent("k")),
        ];
        assert!(check(&never).is_ok());
        let late = [
            call(1, 0, None, Op::store("k", "maybe")),
            call(2, 5, Some(6), Op::absent("k")),
            call(2, 100, Some(101), Op::found("k", "maybe")),
        ];
        assert!(check(&late).is_ok());
        let before_invoked = [
            call(2, 0, Some(1), Op::found("k", "maybe")),
            call(1, 5, None, Op::store("k", "maybe")),
        ];
        assert!(check(&before_invoked).is_err(), "seen before it was sent");
        // An acknowledged store lost by a failover is caught.
        let lost = [
            call(1, 0, Some(1), Op::store("k", "acked")),
            call(2, 5, Some(6), Op::absent("k")),
        ];
        assert!(check(&lost).is_err());
    }

    #[test]
    fn keys_are_checked_apart_and_unanswered_lookups_ignored() {
        let h = [
            call(1, 0, Some(1), Op::store("a", "1")),
            call(1, 0, Some(1), Op::store("b", "2")),
            call(2, 2, Some(3), Op::found("a", "1")),
            call(2, 2, None, Op::found("b", "junk")),
            call(3, 4, Some(5), Op::found("b", "1")),
        ];
        let err = check(&h).unwrap_err();
        assert_eq!(err.key, b"b");
        assert_eq!(err.history.len(), 2, "the unanswered lookup is left out");
    }

    #[test]
    fn a_long_concurrent_history_is_checked_quickly() {
        // Eight clients in lock-step rounds: each round every client stores its own value
        // overlapping the others, then reads; all reads in a round see the round's winner.
        let mut h = Vec::new();
        let mut t = 0;
        for round in 0..60u64 {
            let winner = round % 8;
            for c in 0..8u64 {
                h.push(call(
                    c,
                    t,
                    Some(t + 10),
                    Op::store("k", format!("{round}-{c}")),
                ));
            }
            // The winner's store is the one every later read sees.
            for c in 0..8u64 {
                h.push(call(
                    c,
                    t + 11,
                    Some(t + 12),
                    Op::found("k", format!("{round}-{winner}")),
                ));
            }
            t += 20;
        }
        assert!(check(&h).is_ok());
        // One read that sees a losing value in a later round than its store breaks it.
        let n = h.len();
        h[n - 1].op = Op::found("k", "0-3");
        assert!(check(&h).is_err());
    }
}
