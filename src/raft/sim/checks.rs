//! The properties the simulator checks: election safety, log matching, leader
//! completeness, state-machine safety, and that commits are durable on a majority.

use super::{fnv, Check, Sim};
use crate::raft::types::{Role, Stored};
use std::collections::BTreeMap;

impl Sim {
    /// Election safety, log matching, leader completeness, after every tick.
    pub(super) fn check_tick(&mut self) -> Check {
        for id in self.live() {
            let r = self.servers[&id].replica.as_ref().expect("live");
            if r.role() == Role::Leader {
                // §5.2 Election Safety: at most one leader per term, over the whole run.
                match self.leaders.get(&r.term()) {
                    Some(&first) if first != id => {
                        return Err(format!(
                            "two leaders in term {}: {first} and {id}",
                            r.term()
                        ))
                    }
                    Some(_) => {}
                    None => {
                        self.leaders.insert(r.term(), id);
                        self.stats.leader_terms += 1;
                        // §5.4 Leader Completeness: every entry committed in an earlier term
                        // is in the new leader's log (or under its snapshot).
                        let entries = self.committed.range(r.first_index()..);
                        for (&index, &(term, _, by)) in entries {
                            if by < r.term() && r.term_at(index) != Some(term) {
                                return Err(format!(
                                    "leader {id} of term {} lacks committed ({index}, {term})",
                                    r.term()
                                ));
                            }
                        }
                    }
                }
            }
            // §5.3 Log Matching: an (index, term) names one entry and one predecessor,
            // so by induction two logs agreeing on one agree on everything before it.
            let from = self.servers[&id].checked.max(r.first_index() - 1) + 1;
            for index in from..=r.last_index() {
                let e = r.entry(index).expect("in the log");
                let prev = r.term_at(index - 1).unwrap_or(0);
                let seen = (fnv(0, &e.data), prev);
                let first = *self.entries.entry((index, e.term)).or_insert(seen);
                if first != seen {
                    return Err(format!("logs differ at ({index}, {}) on {id}", e.term));
                }
            }
            let last = r.last_index();
            self.servers.get_mut(&id).expect("live").checked = last;
        }
        Ok(())
    }
    /// Persist-before-send (§5.1, Figure 2): an entry is committed only once a majority
    /// has it on disk, where a crash cannot take it.
    pub(super) fn check_durable(&self, index: u64, term: u64) -> Check {
        let on_disk = |d: &Stored| {
            index <= d.snapshot.index
                || d.entries
                    .get((index - d.snapshot.index - 1) as usize)
                    .is_some_and(|e| e.index == index && e.term == term)
        };
        let n = self.servers.values().filter(|s| on_disk(&s.disk)).count();
        if n * 2 <= self.servers.len() {
            return Err(format!("committed ({index}, {term}) is on {n} disks only"));
        }
        Ok(())
    }

    /// §5.4 Leader Completeness, for an entry committed (by term `by` at the latest)
    /// after leaders of later terms were elected. A stale leader of an earlier term may
    /// lack it: the property is about higher terms only.
    pub(super) fn check_leaders_have(&self, index: u64, term: u64, by: u64) -> Check {
        for s in self.servers.values() {
            let Some(r) = s.replica.as_ref() else {
                continue;
            };
            let later = r.role() == Role::Leader && r.term() > by;
            if later && index >= r.first_index() && r.term_at(index) != Some(term) {
                return Err(format!(
                    "leader of term {} lacks committed ({index}, {term})",
                    r.term()
                ));
            }
        }
        Ok(())
    }
}

/// §5.4.3 State Machine Safety: one state (hash) per applied index, on every replica.
pub(super) fn check_sm(committed: &BTreeMap<u64, (u64, u64, u64)>, index: u64, hash: u64) -> Check {
    match committed.get(&index) {
        Some(&(_, h, _)) if h != hash => Err(format!("state machines differ after index {index}")),
        _ => Ok(()),
    }
}
