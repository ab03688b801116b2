//! The log as a replica keeps it: appending as primary, taking records or a snapshot from
//! a peer, compaction, and making records durable.

use super::view::Inner;
use super::{fatal, Replica};
use crate::messenger::log::{decode_snapshot, encode_snapshot, Pos, Record};
use crate::messenger::protocol::Delivery;
use crate::messenger::replica_protocol::{Role, MAX_EPOCH};
use crate::messenger::state::Change;
use crate::{log_debug, log_info};
use std::sync::MutexGuard;
use std::time::Instant;

/// Changes from a peer: records following a position, or a whole snapshot (and the
/// position it was announced at).
pub(super) enum Incoming {
    Records(Pos, Vec<Record>),
    Snapshot(Pos, Vec<u8>),
}

impl Replica {
    /// Appends a change as primary: applies it, buffers it for the disk, keeps it for the
    /// backups. Returns its sequence number and the message to deliver, for a send.
    pub(super) fn append_local(
        &self,
        inner: &mut Inner,
        change: &Change,
    ) -> (u64, Option<(String, Delivery)>) {
        let pos = Pos {
            epoch: inner.epoch,
            seq: inner.last.seq + 1,
        };
        let bytes = change.to_bytes();
        let delivered = inner.state.apply(pos.into(), change);
        self.disk.append(pos, &bytes);
        inner.push(pos, bytes);
        self.maybe_compact(inner);
        (pos.seq, delivered)
    }

    /// Starts a compaction once the log holds `compact_after` records past the snapshot:
    /// the state is encoded here, under the lock, and written on a thread of the disk's
    /// ([`Disk::compact`](crate::messenger::log::Disk::compact)), so no request waits for
    /// the snapshot's writes and syncs. A storage failure there is a crash, as here.
    fn maybe_compact(&self, inner: &mut Inner) {
        if self.disk.since_snapshot() < self.compact_after || self.disk.compacting() {
            return;
        }
        let snapshot = encode_snapshot(inner.last, &inner.state);
        if let Err(e) = self.disk.compact(snapshot, inner.last, |e| fatal(e)) {
            fatal(&e);
        }
        log_debug!(
            "messenger-{}: compacting the log at {}",
            self.id,
            inner.last
        );
    }

    /// Takes records that follow `prev` (skipping those already held): `Err` when they do
    /// not continue this log. Returns the sequence number up to which this log is now known
    /// to agree with the sender's: the last record sent, which is not always this log's
    /// last (a suffix the sender does not have may follow it).
    pub(super) fn accept(
        &self,
        inner: &mut Inner,
        prev: Pos,
        records: Vec<Record>,
    ) -> Result<u64, ()> {
        let mut prev = prev;
        let mut skip = 0;
        for r in &records {
            if r.pos.seq > inner.last.seq {
                break;
            }
            if !inner.holds(r.pos) {
                return Err(());
            }
            prev = r.pos;
            skip += 1;
        }
        if skip == records.len() {
            return if inner.holds(prev) {
                Ok(prev.seq)
            } else {
                Err(())
            };
        }
        if prev != inner.last {
            return Err(());
        }
        let mut changes = Vec::with_capacity(records.len() - skip);
        for r in &records[skip..] {
            changes.push(Change::decode(&r.change).map_err(|_| ())?);
        }
        for (r, change) in records.into_iter().skip(skip).zip(changes) {
            inner.state.apply(r.pos.into(), &change);
            self.disk.append(r.pos, &r.change);
            inner.push(r.pos, r.change);
        }
        self.maybe_compact(inner);
        Ok(inner.last.seq)
    }

    /// Takes records or a snapshot; returns as [`Replica::accept`].
    pub(super) fn take(&self, inner: &mut Inner, incoming: Incoming) -> Result<u64, ()> {
        match incoming {
            Incoming::Records(prev, records) => self.accept(inner, prev, records),
            Incoming::Snapshot(announced, bytes) => {
                let (pos, state) = decode_snapshot(&bytes).map_err(|e| {
                    log_info!("messenger-{}: bad snapshot from a peer: {e}", self.id);
                })?;
                let refusal = if pos == announced {
                    // As primary or candidate it asked for it (a FETCH); else it follows.
                    self.snapshot_refusal(inner, pos, inner.role == Role::Candidate)
                } else {
                    Some("it is not at the position its chunks announced")
                };
                if let Some(why) = refusal {
                    log_info!("messenger-{}: refused a snapshot at {pos}: {why}", self.id);
                    return Err(());
                }
                if let Err(e) = self.disk.install(&bytes, pos) {
                    fatal(&e);
                }
                log_info!("messenger-{}: installed a snapshot at {pos}", self.id);
                inner.state = state;
                inner.last = pos;
                inner.base = pos;
                inner.window.clear();
                inner.durable = pos.seq;
                Ok(pos.seq)
            }
        }
    }

    /// Why a snapshot at `pos` cannot replace this server's log, if it cannot: its epoch
    /// is past the limit; it goes back before a record this server acknowledged (which a
    /// primary may have committed on the strength of it); or, as the answer to a FETCH
    /// (`fetched`), this server is no candidate or its log is not behind.
    pub(super) fn snapshot_refusal(
        &self,
        inner: &Inner,
        pos: Pos,
        fetched: bool,
    ) -> Option<&'static str> {
        if pos.epoch > MAX_EPOCH {
            Some("its epoch is above the limit")
        } else if pos < inner.acked {
            Some("it goes back before what this server acknowledged")
        } else if fetched && (inner.role != Role::Candidate || pos <= inner.last) {
            Some("not asked for, or not newer than this log")
        } else {
            None
        }
    }

    /// [`Replica::flush_to`] on the thread that reads peer `from`'s link, given the lock
    /// (handed back once the sync is done). While the thread syncs, `from`'s frames wait
    /// unread, and a slow disk (fsyncs of seconds on a busy machine) would make a live
    /// peer look silent: it counts as heard meanwhile (see `Remote::syncing`), and its
    /// silence counts from the end of the sync.
    pub(super) fn flush_reading<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        from: usize,
        seq: u64,
    ) -> MutexGuard<'a, Inner> {
        inner.peers[from].syncing = true;
        drop(inner);
        self.flush_to(seq);
        let mut inner = self.lock();
        let p = &mut inner.peers[from];
        p.syncing = false;
        if p.heard.is_some() {
            p.heard = Some(Instant::now());
        }
        inner
    }

    /// Makes records up to `seq` durable here, then lets commits advance.
    pub(super) fn flush_to(&self, seq: u64) {
        if let Err(e) = self.disk.sync_to(seq) {
            fatal(&e);
        }
        let mut inner = self.lock();
        let seq = seq.min(inner.last.seq);
        if inner.durable < seq {
            inner.durable = seq;
            self.recompute_commit(&mut inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messenger::replication::view::Inner;
    use crate::messenger::Options;

    fn record(epoch: u64, seq: u64, name: &str) -> Record {
        let change = Change::Register {
            name: name.into(),
            nonce: 0,
        };
        Record {
            pos: Pos { epoch, seq },
            change: change.to_bytes(),
        }
    }

    #[test]
    fn a_snapshot_behind_what_was_acknowledged_is_refused() {
        let dir = std::env::temp_dir().join(format!("switchboard-snap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let peers = vec![
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ];
        let (replica, _) = Replica::open(&Options::new(1, peers, dir.clone())).unwrap();
        let mut inner = replica.lock();
        let at = |epoch, seq| Pos { epoch, seq };
        inner.acked = at(4, 150);
        inner.last = at(4, 160);
        let refused = |inner: &Inner, pos, fetched| replica.snapshot_refusal(inner, pos, fetched);
        // Behind what this server acknowledged, in log order: refused.
        assert!(refused(&inner, at(4, 149), false).is_some());
        assert!(refused(&inner, at(2, 900), false).is_some());
        // At or past it: taken. A later epoch that started from a shorter log is past it
        // (the history after a split healed; what it lacks was the losing side's).
        assert_eq!(refused(&inner, at(4, 150), false), None);
        assert_eq!(refused(&inner, at(6, 131), false), None);
        // Never past the epoch limit.
        assert!(refused(&inner, at(MAX_EPOCH + 1, 200), false).is_some());
        // A FETCH answer only as candidate, and only ahead of this log.
        assert!(refused(&inner, at(6, 200), true).is_some());
        inner.role = Role::Candidate;
        assert!(refused(&inner, at(4, 155), true).is_some());
        assert_eq!(refused(&inner, at(6, 131), true), None);
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_compaction_writes_its_snapshot_with_no_lock_held_and_a_restart_loads_it() {
        let dir = std::env::temp_dir().join(format!("switchboard-cmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let peers = vec!["127.0.0.1:1".parse().unwrap()];
        let mut options = Options::new(0, peers, dir.clone());
        options.compact_after = 3;
        let (replica, _) = Replica::open(&options).unwrap();
        let register = |name: &str| Change::Register {
            name: name.into(),
            nonce: 0,
        };
        // The disk's snapshot writes wait, as on a slow disk; requests and syncs do not.
        let held = replica.disk.hold_snapshots();
        for name in ["a", "b", "c", "d"] {
            let mut inner = replica.lock();
            replica.append_local(&mut inner, &register(name));
            let seq = inner.last.seq;
            drop(inner);
            replica.flush_to(seq);
        }
        assert!(replica.disk.compacting(), "the third record starts one");
        assert_eq!(replica.lock().durable, 4);
        drop(held);
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while replica.disk.compacting() {
            assert!(Instant::now() < deadline, "the compaction never finished");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        replica.begin_stop();
        drop(replica);
        let (_, loaded) = Replica::open(&options).unwrap();
        // The snapshot at the third record, and the fourth from the log.
        assert!(
            loaded.starts_with("snapshot at 3@")
                && loaded.contains(", 1 records replayed, last 4@"),
            "{loaded}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn records_are_taken_only_in_sequence_and_agreement_is_reported() {
        let dir = std::env::temp_dir().join(format!("switchboard-repl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let peers = vec!["127.0.0.1:1".parse().unwrap()];
        let (replica, _) = Replica::open(&Options::new(0, peers, dir.clone())).unwrap();
        let mut inner = replica.lock();
        let at = |epoch, seq| Pos { epoch, seq };
        let first = vec![record(1, 1, "a"), record(1, 2, "b"), record(1, 3, "c")];
        assert_eq!(replica.accept(&mut inner, Pos::default(), first), Ok(3));
        // A gap is refused.
        assert_eq!(
            replica.accept(&mut inner, at(1, 4), vec![record(1, 5, "e")]),
            Err(())
        );
        // What is held already is skipped; what follows it is taken.
        let resent = vec![record(1, 2, "b"), record(1, 3, "c"), record(1, 4, "d")];
        assert_eq!(replica.accept(&mut inner, at(1, 1), resent), Ok(4));
        // A record that disagrees with the one held at its place is refused.
        assert_eq!(
            replica.accept(&mut inner, at(1, 3), vec![record(2, 4, "x")]),
            Err(())
        );
        // Agreement is reported up to the last record sent, not this log's last.
        assert_eq!(
            replica.accept(&mut inner, at(1, 2), vec![record(1, 3, "c")]),
            Ok(3)
        );
        assert!(inner.state.exists("d") && !inner.state.exists("x"));
        assert_eq!(inner.last, at(1, 4));
        assert!(inner.holds(at(1, 4)) && !inner.holds(at(2, 4)) && inner.holds(Pos::default()));
        assert_eq!(inner.records_after(2, 10).len(), 2);
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
