//! A replica's view of its log in memory: the latest snapshot and the entries after it.
//! The durable copy is the caller's (it follows the persist effects); this one is what
//! the protocol decides from.

use super::message::{Entry, Snapshot};

/// The snapshot and the entries that follow it; `entries[i].index` is
/// `snapshot.index + 1 + i`.
#[derive(Debug, Clone, Default)]
pub(crate) struct RaftLog {
    pub(crate) snapshot: Snapshot,
    entries: Vec<Entry>,
}

impl RaftLog {
    /// A log restored from what was persisted. Entries that do not continue the snapshot
    /// (ones it already covers, or after a gap) are dropped.
    pub(crate) fn restore(snapshot: Snapshot, entries: Vec<Entry>) -> RaftLog {
        let mut log = RaftLog {
            snapshot,
            entries: Vec::new(),
        };
        for e in entries {
            if e.index == log.last_index() + 1 {
                log.entries.push(e);
            }
        }
        log
    }

    pub(crate) fn first_index(&self) -> u64 {
        self.snapshot.index + 1
    }

    pub(crate) fn last_index(&self) -> u64 {
        self.snapshot.index + self.entries.len() as u64
    }

    pub(crate) fn last_term(&self) -> u64 {
        self.entries.last().map_or(self.snapshot.term, |e| e.term)
    }

    /// The term of the entry at `index`: known for the snapshot's last index and every
    /// entry after it, unknown below (compacted) and past the end.
    pub(crate) fn term(&self, index: u64) -> Option<u64> {
        if index == self.snapshot.index {
            return Some(self.snapshot.term);
        }
        self.get(index).map(|e| e.term)
    }

    pub(crate) fn get(&self, index: u64) -> Option<&Entry> {
        let at = index.checked_sub(self.first_index())?;
        self.entries.get(usize::try_from(at).ok()?)
    }

    /// Clones of the entries in `from..=to`, at most `max` of them and, past the first,
    /// at most `max_bytes` of commands together.
    pub(crate) fn slice(&self, from: u64, to: u64, max: usize, max_bytes: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut i = from.max(self.first_index());
        while i <= to && out.len() < max {
            match self.get(i) {
                Some(e) if out.is_empty() || bytes + e.data.len() <= max_bytes => {
                    bytes += e.data.len();
                    out.push(e.clone());
                }
                _ => break,
            }
            i += 1;
        }
        out
    }

    /// Puts `e` at its index, dropping whatever was there and after it.
    pub(crate) fn put(&mut self, e: Entry) {
        if e.index <= self.snapshot.index || e.index > self.last_index() + 1 {
            return;
        }
        let at = (e.index - self.first_index()) as usize;
        self.entries.truncate(at);
        self.entries.push(e);
    }

    /// Replaces the prefix up to `index` (which must be in the log) by a snapshot.
    pub(crate) fn compact(&mut self, index: u64, data: Vec<u8>) -> Option<Snapshot> {
        let term = self.term(index)?;
        if index <= self.snapshot.index {
            return None;
        }
        let drop = (index - self.snapshot.index) as usize;
        self.entries.drain(..drop);
        self.snapshot = Snapshot { index, term, data };
        Some(self.snapshot.clone())
    }

    /// Replaces the whole log by a snapshot from the leader.
    pub(crate) fn install(&mut self, snapshot: Snapshot) {
        self.entries.clear();
        self.snapshot = snapshot;
    }

    /// §5.4.1: a candidate's log is at least as up-to-date as this one when its last term
    /// is later, or the same with an index at least as large.
    pub(crate) fn up_to_date(&self, last_index: u64, last_term: u64) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// The largest index at or below `index` whose term is at most `term` (the snapshot's
    /// index if none is left in the log). Both ends use it for the fast back-off (§5.3,
    /// "the follower can include the term of the conflicting entry"): one rejection skips
    /// a whole term of divergent entries instead of one entry.
    pub(crate) fn conflict_by_term(&self, index: u64, term: u64) -> u64 {
        let mut i = index.min(self.last_index());
        while i > self.snapshot.index {
            match self.term(i) {
                Some(t) if t <= term => return i,
                _ => i -= 1,
            }
        }
        self.snapshot.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(terms: &[u64]) -> RaftLog {
        let entries = terms
            .iter()
            .enumerate()
            .map(|(i, &term)| Entry {
                index: i as u64 + 1,
                term,
                data: vec![],
            })
            .collect();
        RaftLog::restore(Snapshot::default(), entries)
    }

    #[test]
    fn put_truncates_and_compact_keeps_terms() {
        let mut log = log_of(&[1, 1, 2, 2, 3]);
        log.put(Entry {
            index: 4,
            term: 4,
            data: vec![],
        });
        assert_eq!((log.last_index(), log.last_term()), (4, 4));
        let snap = log.compact(2, b"sm".to_vec()).unwrap();
        assert_eq!((snap.index, snap.term), (2, 1));
        assert_eq!(log.term(1), None);
        assert_eq!(log.term(2), Some(1));
        assert_eq!(log.term(3), Some(2));
        assert_eq!(log.slice(1, 9, 10, usize::MAX).len(), 2);
        assert!(log.compact(1, vec![]).is_none());
    }

    #[test]
    fn a_slice_holds_at_most_max_bytes_past_its_first_entry() {
        let entries = (1..=4)
            .map(|index| Entry {
                index,
                term: 1,
                data: vec![0; 10],
            })
            .collect();
        let log = RaftLog::restore(Snapshot::default(), entries);
        assert_eq!(log.slice(1, 4, 10, 25).len(), 2);
        assert_eq!(log.slice(1, 4, 10, 5).len(), 1);
        assert_eq!(log.slice(1, 4, 3, usize::MAX).len(), 3);
    }

    #[test]
    fn conflict_by_term_skips_a_term_at_a_time() {
        let log = log_of(&[1, 1, 1, 4, 4, 5, 5, 6, 6, 6]);
        assert_eq!(log.conflict_by_term(10, 3), 3);
        assert_eq!(log.conflict_by_term(10, 6), 10);
        assert_eq!(log.conflict_by_term(7, 4), 5);
        assert_eq!(log.conflict_by_term(10, 0), 0);
        assert_eq!(log.conflict_by_term(99, 5), 7);
    }
}
