//! The rules that change a replica's role and its commit point (see the [module
//! documentation](crate::messenger)): failure detection, candidacy, taking over, stepping
//! down, membership, a stall, and the ticker that drives them.

use super::timing::{ACK_TIMEOUT, DOWN_AFTER, FETCH_RETRY, HEARTBEAT_EVERY, STALL, TICK};
use super::view::{Feed, Inner};
use super::Replica;
use crate::log_info;
use crate::messenger::replica_protocol::{ReplicaMsg, Role, MAX_EPOCH};
use crate::messenger::state::Change;
use std::net::Shutdown;
use std::sync::{Arc, MutexGuard, PoisonError};
use std::thread;
use std::time::Instant;

/// The smallest epoch above `known` that belongs to server `id` of `n`: epochs are
/// unique to their primary, so two servers never lead the same epoch. `None` when it would
/// pass [`MAX_EPOCH`] (checked arithmetic: an epoch never wraps to a small one).
pub fn next_epoch(known: u64, id: u64, n: u64) -> Option<u64> {
    let e = known.checked_add(1)?;
    let e = e.checked_add(id.checked_add(n)?.checked_sub(e % n)? % n)?;
    (e <= MAX_EPOCH).then_some(e)
}

impl Replica {
    /// As primary: admits caught-up peers as members and advances the commit point to what
    /// this server and every member hold durably.
    pub(super) fn recompute_commit(&self, inner: &mut Inner) {
        let now = Instant::now();
        // A late ticker may mean this process was stalled and its members dropped on stale
        // evidence; nothing is committed until the ticker has ruled on it (see `stalled`).
        let late = now.duration_since(inner.last_tick) > STALL && inner.peers.len() > 1;
        if inner.role != Role::Primary || late {
            return;
        }
        let floor = inner.committed.max(inner.takeover);
        for j in (0..inner.peers.len()).filter(|&j| j != self.id) {
            let p = &inner.peers[j];
            let ready =
                inner.up(j, now) && p.feed != Feed::Unknown && p.acked >= floor.max(p.overdue);
            if !inner.peers[j].member && ready {
                inner.peers[j].member = true;
                inner.version += 1;
                log_info!(
                    "messenger-{}: server {j} caught up; commits wait for it",
                    self.id
                );
            }
        }
        let mut c = inner.durable;
        for p in inner.peers.iter().filter(|p| p.member) {
            c = c.min(p.acked);
        }
        // A live peer that is not a member may not know it yet: excluded while alive (slow
        // to acknowledge), it may still be busy with older frames, its in-sync flag set. If
        // this server committed without it and then failed with the others, it would take
        // over alone without those changes. So nothing more is committed until every live
        // non-member has echoed a heartbeat that says it is excluded (taking it in cleared
        // its flag), or is down. Usually one round trip.
        let unaware = (0..inner.peers.len()).any(|j| {
            let p = &inner.peers[j];
            j != self.id
                && !p.member
                && inner.up(j, now)
                && p.status.is_some_and(|s| s.echo < p.excluded)
        });
        if unaware {
            c = c.min(inner.committed);
        }
        if c > inner.committed {
            inner.committed = c;
            // Answers and messages held for these records go to their outboxes now (and
            // to the relay queues, which the links carry: they are woken).
            let epoch = inner.epoch;
            inner.clients.release(epoch, c);
            self.changed.notify_all();
        }
    }

    /// Stops counting peer `j` as a member (if it was one): heartbeats from the next mark on
    /// tell it that it is excluded, and commits go on without it once it has echoed one
    /// or is down.
    pub(super) fn exclude(&self, inner: &mut Inner, j: usize) {
        inner.version += 1;
        let p = &mut inner.peers[j];
        p.member = false;
        p.excluded = inner.version;
    }

    pub(super) fn init_feed(&self, inner: &mut Inner, j: usize) {
        let Some(status) = inner.peers[j].status else {
            return;
        };
        inner.peers[j].feed = if inner.holds(status.last) {
            Feed::From(status.last.seq + 1)
        } else {
            Feed::Snapshot
        };
        self.changed.notify_all();
    }

    pub(super) fn peer_down(&self, inner: &mut Inner, j: usize, why: &str) {
        let p = &mut inner.peers[j];
        p.status = None;
        p.was_down = true;
        // Its next heartbeats come from a new link (or a new life) and echo afresh.
        p.echo = 0;
        // Everything queued for it answered what it sent; a new link starts afresh (our
        // last acknowledgement is repeated on it).
        p.control.clear();
        p.forwarding = 0;
        if p.heard.take().is_some() {
            log_info!("messenger-{}: server {j} is down ({why})", self.id);
        }
        let was_member = p.member;
        p.asked = None;
        p.confirmed = None;
        p.assembly = None;
        // Its forwarded clients are gone with it (it closes them, or has died).
        inner.clients.drop_remote(j);
        // Should it turn out alive after all, it must echo its exclusion before commits
        // go on without it.
        self.exclude(inner, j);
        if was_member {
            log_info!(
                "messenger-{}: commits no longer wait for server {j}",
                self.id
            );
        }
        self.recompute_commit(inner);
    }

    /// Re-evaluates the role (see the rules in the module documentation), lets commits
    /// advance, wakes the links, and writes out anything appended.
    pub(super) fn reconcile(&self, mut inner: MutexGuard<'_, Inner>) {
        if let Some(seq) = self.settle(&mut inner) {
            drop(inner);
            self.flush_to(seq);
        }
    }

    /// [`Replica::reconcile`] on the thread that reads peer `from`'s link, whose frames
    /// wait unread while it syncs (see [`Replica::flush_reading`]).
    pub(super) fn reconcile_reading(&self, mut inner: MutexGuard<'_, Inner>, from: usize) {
        if let Some(seq) = self.settle(&mut inner) {
            drop(self.flush_reading(inner, from, seq));
        }
    }

    /// Reconcile's work under the lock; returns what is to be flushed.
    fn settle(&self, inner: &mut Inner) -> Option<u64> {
        self.evaluate(inner);
        self.check_forwarded(inner);
        self.recompute_commit(inner);
        self.changed.notify_all();
        (inner.durable < inner.last.seq).then_some(inner.last.seq)
    }

    pub(super) fn evaluate(&self, inner: &mut Inner) {
        let now = Instant::now();
        // A late ticker may mean this process was stalled: what it knows of its peers is
        // stale, and the others may have moved on. Acting on it here, before the ticker has
        // ruled (see `stalled`), could make a stale server primary in a new epoch, whose
        // epoch record would then outrank the real primary's log.
        let late = now.duration_since(inner.last_tick) > STALL && inner.peers.len() > 1;
        if inner.stopping || late {
            return;
        }
        let lower = (0..self.id).find(|&j| inner.maybe_up(j, now));
        if inner.role == Role::Primary {
            if let Some(j) = lower {
                self.step_down(inner, &format!("server {j} is up"));
            } else if inner.max_epoch > inner.epoch {
                let why = format!("epoch {} is newer than mine", inner.max_epoch);
                self.step_down(inner, &why);
            }
            return;
        }
        let others: Vec<usize> = (0..inner.peers.len())
            .filter(|&j| j != self.id && inner.up(j, now))
            .collect();
        let status = |j: usize| inner.peers[j].status.expect("up peers have a status");
        // A primary this server cannot hear may still lead: a live peer that follows it
        // says so (a cut link, not a dead server; a dead primary's backups stop saying so
        // well before it counts as down here). Taking over would only make the two take
        // turns through that peer, each new epoch deposing the other.
        let primary_up = others.iter().any(|&j| {
            let s = status(j);
            s.role == Role::Primary || s.primary.is_some_and(|p| p != self.id)
        });
        let someone_in_sync = inner.in_sync || others.iter().any(|&j| status(j).in_sync);
        let all_up = others.len() + 1 == inner.peers.len();
        // Hearing fewer than a majority (itself included), it takes over only if every
        // server it does not hear refused its dial: dead, not cut off. A minority cut off
        // from a primary that goes on committing with the majority would otherwise take
        // over in a newer epoch, whose log outranks theirs at the heal: everything they
        // committed during the cut would be lost, not just what a lone primary
        // acknowledged alone.
        let quorum = 2 * (others.len() + 1) > inner.peers.len()
            || (0..inner.peers.len())
                .filter(|&j| j != self.id && !others.contains(&j))
                .all(|j| inner.peers[j].dead);
        // Just started, or back from a stall: a peer not heard from yet may be primary.
        let settling = now.duration_since(inner.started) < DOWN_AFTER && !all_up;
        if lower.is_some() || primary_up || settling || !quorum || !(someone_in_sync || all_up) {
            if inner.role == Role::Candidate {
                self.set_candidate(inner, false);
            }
            return;
        }
        if inner.role != Role::Candidate {
            self.set_candidate(inner, true);
            log_info!(
                "messenger-{}: candidate at {}; asking {others:?} for anything newer",
                self.id,
                inner.last
            );
        }
        // Heartbeats may be up to 100 ms old: only a FETCH answered about the current last
        // record proves a peer holds nothing this server lacks.
        let last = inner.last;
        let mut waiting = false;
        for &j in &others {
            let p = &mut inner.peers[j];
            if p.confirmed == Some(last) {
                continue;
            }
            waiting = true;
            let ask = p
                .asked
                .is_none_or(|(pos, at)| pos != last || now.duration_since(at) > FETCH_RETRY);
            if ask {
                p.control.push(ReplicaMsg::Fetch { last }.encode());
                p.asked = Some((last, now));
            }
        }
        if !waiting {
            self.become_primary(inner, now);
        }
    }

    /// This server has heard of `epoch` from `from`, other than from that epoch's primary
    /// saying where it stands: if it is newer than any this server has accepted, a primary
    /// may have committed changes in it without this server, which no longer counts itself
    /// in sync (a primary that learns it was superseded after a network split must not then
    /// take over again on its own, before hearing from the servers that moved on).
    pub(super) fn superseded(&self, inner: &mut Inner, epoch: u64, from: usize) {
        if epoch > inner.epoch && inner.in_sync {
            inner.in_sync = false;
            inner.version += 1;
            log_info!(
                "messenger-{}: may miss committed changes of epoch {epoch} (server {from} knows it)",
                self.id
            );
        }
    }

    /// Enters or leaves candidacy; either way, answers to earlier questions no longer count.
    pub(super) fn set_candidate(&self, inner: &mut Inner, on: bool) {
        inner.role = if on { Role::Candidate } else { Role::Backup };
        inner.version += 1;
        for p in &mut inner.peers {
            p.asked = None;
            p.confirmed = None;
        }
    }

    fn become_primary(&self, inner: &mut Inner, now: Instant) {
        let n = inner.peers.len() as u64;
        let known = inner.max_epoch.max(inner.epoch).max(inner.last.epoch);
        let Some(epoch) = next_epoch(known, self.id as u64, n) else {
            if !inner.epochs_exhausted {
                inner.epochs_exhausted = true;
                log_info!(
                    "messenger-{}: cannot take over: no epoch above {known} within the limit \
                     ({MAX_EPOCH})",
                    self.id
                );
            }
            return;
        };
        inner.epoch = epoch;
        inner.max_epoch = epoch;
        inner.role = Role::Primary;
        inner.in_sync = true;
        inner.need = None;
        inner.primary_since = now;
        let mut members = Vec::new();
        for j in (0..inner.peers.len()).filter(|&j| j != self.id) {
            let up = inner.up(j, now);
            let p = &mut inner.peers[j];
            p.acked = 0;
            p.overdue = 0;
            p.member = up;
            p.feed = Feed::Unknown;
            if up {
                members.push(j);
                self.init_feed(inner, j);
            } else {
                // Not heard from now, it may come back believing it holds everything.
                self.exclude(inner, j);
            }
        }
        let (seq, _) = self.append_local(inner, &Change::Epoch);
        inner.takeover = seq;
        inner.committed = seq - 1;
        inner.version += 1;
        log_info!(
            "messenger-{}: primary for epoch {epoch} from seq {seq}; backups {members:?}",
            self.id
        );
    }

    pub(super) fn step_down(&self, inner: &mut Inner, why: &str) {
        inner.role = Role::Backup;
        for p in &mut inner.peers {
            p.member = false;
            p.feed = Feed::Unknown;
        }
        // Its clients fail over to the new primary and log in there.
        inner.clients.close_all();
        inner.version += 1;
        log_info!("messenger-{}: stepping down: {why}", self.id);
    }

    pub(super) fn run_ticker(self: Arc<Self>) {
        while self.tick() {
            thread::sleep(TICK);
        }
    }

    /// One tick: a stall, silent peers, overdue acknowledgements, then the roles. False
    /// once the replica stops.
    ///
    /// A tick never syncs the log. A late tick is how a stalled process finds out (see
    /// [`Replica::stalled`]), and a tick that synced (or waited for another thread's sync,
    /// which holds the log) would be late on a slow disk with nothing stalled: a primary
    /// that took over with a 300 ms fsync stepped down at its next tick. What a tick
    /// appends (an epoch record) goes to the flusher ([`Replica::run_flusher`]). (A
    /// compaction, which writes a snapshot under the lock, can still hold a tick up.)
    pub(super) fn tick(&self) -> bool {
        let mut inner = self.lock();
        if inner.stopping {
            return false;
        }
        let now = Instant::now();
        // Alone, nobody can have taken over during a stall.
        if now.duration_since(inner.last_tick) > STALL && inner.peers.len() > 1 {
            self.stalled(&mut inner, now);
        }
        inner.last_tick = now;
        for j in (0..inner.peers.len()).filter(|&j| j != self.id) {
            if inner.peers[j]
                .last_heard(now)
                .is_some_and(|t| now.duration_since(t) >= DOWN_AFTER)
            {
                self.peer_down(&mut inner, j, "silent");
            }
        }
        self.check_acks(&mut inner, now);
        if let Some(seq) = self.settle(&mut inner) {
            if inner.flush_wanted < seq {
                inner.flush_wanted = seq;
                self.flush_asked.notify_one();
            }
        }
        true
    }

    /// The flusher: makes durable what the ticker asks for (`flush_wanted`), off the
    /// ticker's thread, until the replica stops. Commits advance as each flush ends
    /// ([`Replica::flush_to`]), as they do after any other thread's.
    pub(super) fn run_flusher(self: Arc<Self>) {
        let mut inner = self.lock();
        while !inner.stopping {
            // A snapshot installed meanwhile may have moved the log's end below the ask.
            let seq = inner.flush_wanted.min(inner.last.seq);
            if seq > inner.durable {
                drop(inner);
                self.flush_to(seq);
                inner = self.lock();
            } else {
                inner = self
                    .flush_asked
                    .wait(inner)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    /// As primary, excludes every member that has not acknowledged a record for
    /// [`ACK_TIMEOUT`] after it was appended; it is a member again once it acknowledges
    /// that record.
    pub(super) fn check_acks(&self, inner: &mut Inner, now: Instant) {
        for j in (0..inner.peers.len()).filter(|&j| j != self.id) {
            let p = &inner.peers[j];
            if inner.role != Role::Primary || !p.member || p.acked >= inner.last.seq {
                continue;
            }
            let first = p.acked + 1;
            let at = inner
                .entry(first)
                .map_or(inner.primary_since, |e| e.at.max(inner.primary_since));
            if now.duration_since(at) > ACK_TIMEOUT {
                self.exclude(inner, j);
                inner.peers[j].overdue = first;
                log_info!(
                    "messenger-{}: server {j} has not acknowledged seq {first} for {ACK_TIMEOUT:?}; \
                     excluding it (commits go on once it knows)",
                    self.id
                );
            }
        }
    }

    /// This process was stalled: its view of the others is stale and they may have taken
    /// over meanwhile. A primary steps down; every server forgets what it knew of its peers
    /// and, as at start, waits [`DOWN_AFTER`] to hear from them before taking over. Their
    /// links are closed, for what waits unread in them was sent during the stall and is
    /// stale too; only what arrives on the links they dial again counts.
    pub(super) fn stalled(&self, inner: &mut Inner, now: Instant) {
        let gap = now.duration_since(inner.last_tick);
        log_info!(
            "messenger-{}: stalled for {gap:?}; re-learning its peers",
            self.id
        );
        if inner.role == Role::Primary {
            self.step_down(inner, "this server stalled");
        }
        if inner.role == Role::Candidate {
            self.set_candidate(inner, false);
        }
        // Silent this long, it may have been declared down and excluded, and changes
        // committed without it: only a primary's word can make it in sync again. (Shorter
        // stalls cannot look like death: at most 100 ms passed since its last heartbeat.)
        if gap + HEARTBEAT_EVERY >= DOWN_AFTER && inner.in_sync {
            inner.in_sync = false;
            log_info!(
                "messenger-{}: may miss committed changes after the stall",
                self.id
            );
        }
        for p in &mut inner.peers {
            p.heard = None;
            p.status = None;
            p.refused = false;
            p.dead = false;
            p.was_down = false;
            p.echo = 0;
            p.inbound += 1;
            if let Some(link) = p.link.take() {
                let _ = link.shutdown(Shutdown::Both);
            }
        }
        inner.started = now;
        inner.version += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messenger::log::Pos;
    use crate::messenger::replica_protocol::{Standing, Status};
    use std::path::PathBuf;
    use std::time::Duration;

    /// Server 0 of `n`.
    fn replica_of(n: usize, name: &str) -> (Arc<Replica>, PathBuf) {
        super::super::testing::replica(0, n, name)
    }

    fn ago(d: Duration) -> Instant {
        Instant::now().checked_sub(d).unwrap()
    }

    /// A server that hears fewer than a majority takes over only if the others are dead
    /// (their dials refused), not merely silent: cut off alone from a primary that goes on
    /// with the third server, it would take over in a newer epoch, and at the heal its log
    /// would outrank everything those two committed meanwhile.
    #[test]
    fn a_minority_takes_over_only_from_the_dead_not_from_the_silent() {
        let (replica, dir) = replica_of(3, "minority");
        let mut inner = replica.lock();
        inner.in_sync = true;
        inner.started = ago(2 * DOWN_AFTER);
        inner.last_tick = Instant::now();
        for j in [1, 2] {
            inner.peers[j].was_down = true;
        }
        // Both silent (a cut): it stays a backup.
        replica.evaluate(&mut inner);
        assert_eq!(inner.role, Role::Backup);
        // One refused its dial, the other is silent: still a backup.
        inner.peers[1].dead = true;
        replica.evaluate(&mut inner);
        assert_eq!(inner.role, Role::Backup);
        // Both dead: it carries on alone.
        inner.peers[2].dead = true;
        replica.evaluate(&mut inner);
        assert_eq!(inner.role, Role::Primary);
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
        // With one other server heard (a majority of three), the silent one is no bar.
        let (replica, dir) = replica_of(3, "majority");
        let mut inner = replica.lock();
        inner.in_sync = true;
        inner.started = ago(2 * DOWN_AFTER);
        inner.last_tick = Instant::now();
        inner.peers[2].was_down = true;
        inner.peers[1].heard = Some(Instant::now());
        inner.peers[1].status = Some(Status {
            role: Role::Backup,
            epoch: 0,
            last: Pos { epoch: 0, seq: 0 },
            in_sync: true,
            you: Standing::NotPrimary,
            mark: 0,
            echo: 0,
            primary: None,
        });
        replica.evaluate(&mut inner);
        assert_eq!(
            inner.role,
            Role::Candidate,
            "it asks server 1, then takes over"
        );
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn commits_wait_for_a_live_excluded_peer_until_it_echoes_its_exclusion() {
        let (replica, dir) = replica_of(2, "exclusion");
        let mut inner = replica.lock();
        inner.role = Role::Primary;
        inner.last = Pos { epoch: 3, seq: 5 };
        (inner.takeover, inner.committed, inner.durable) = (1, 3, 5);
        replica.exclude(&mut inner, 1);
        let mark = inner.peers[1].excluded;
        let alive = |inner: &mut Inner, echo: u64| {
            inner.peers[1].heard = Some(Instant::now());
            inner.peers[1].status = Some(Status {
                role: Role::Backup,
                epoch: 3,
                last: Pos { epoch: 3, seq: 2 },
                in_sync: true,
                you: Standing::NotPrimary,
                mark: 1,
                echo,
                primary: None,
            });
        };
        // Alive and unaware (no echo, or the echo of a heartbeat from before): nothing more.
        for echo in [0, mark - 1] {
            alive(&mut inner, echo);
            replica.recompute_commit(&mut inner);
            assert_eq!(inner.committed, 3, "echo {echo}");
        }
        // It took in a heartbeat that told it: commits go on without it.
        alive(&mut inner, mark);
        replica.recompute_commit(&mut inner);
        assert_eq!(inner.committed, 5);
        // Down is as good: it comes back not in sync.
        inner.durable = 6;
        inner.last.seq = 6;
        alive(&mut inner, 0);
        replica.recompute_commit(&mut inner);
        assert_eq!(inner.committed, 5);
        replica.peer_down(&mut inner, 1, "test");
        assert_eq!(inner.committed, 6);
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A member that stops acknowledging (alive, and up to date with what is committed)
    /// is excluded, and stays out until it acknowledges the record it was excluded for:
    /// taken in again at once, it held the commit point where it was, and the primary
    /// excluded and re-admitted it every tick while no send was acknowledged.
    #[test]
    fn a_member_excluded_for_a_missing_ack_stays_out_until_it_acknowledges_that_record() {
        use super::super::view::Feed;
        let (replica, dir) = replica_of(2, "overdue");
        let mut inner = replica.lock();
        inner.role = Role::Primary;
        inner.last = Pos { epoch: 3, seq: 5 };
        (inner.takeover, inner.committed, inner.durable) = (1, 3, 5);
        inner.primary_since = ago(2 * ACK_TIMEOUT);
        let heartbeat = |inner: &mut Inner, echo: u64| {
            inner.peers[1].heard = Some(Instant::now());
            inner.peers[1].status = Some(Status {
                role: Role::Backup,
                epoch: 3,
                last: Pos { epoch: 3, seq: 5 },
                in_sync: true,
                you: Standing::Member,
                mark: 1,
                echo,
                primary: Some(0),
            });
        };
        heartbeat(&mut inner, 0);
        (inner.peers[1].member, inner.peers[1].acked) = (true, 3);
        inner.peers[1].feed = Feed::From(6);
        replica.check_acks(&mut inner, Instant::now());
        assert!(!inner.peers[1].member);
        for _ in 0..3 {
            replica.recompute_commit(&mut inner);
            assert!(
                !inner.peers[1].member,
                "taken in again without acknowledging seq 4"
            );
        }
        // Once it knows, commits go on without it.
        let mark = inner.peers[1].excluded;
        heartbeat(&mut inner, mark);
        replica.recompute_commit(&mut inner);
        assert_eq!(inner.committed, 5);
        assert!(!inner.peers[1].member);
        // It acknowledges what it was excluded for: a member again.
        inner.peers[1].acked = 5;
        replica.recompute_commit(&mut inner);
        assert!(inner.peers[1].member);
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A takeover on a slow disk: the tick that made it leaves the epoch record's sync to
    /// the flusher and returns, though another thread's sync holds the log. It used to sync
    /// the record itself (waiting for that sync), so a sync longer than [`STALL`] made its
    /// next tick late, and the new primary stepped down as stalled.
    #[test]
    fn a_tick_never_waits_for_the_disk_and_the_flusher_syncs_what_it_appended() {
        let (replica, dir) = replica_of(2, "slow-disk");
        {
            let mut inner = replica.lock();
            // The rules make it primary at its next tick (as in the stall test below).
            inner.in_sync = true;
            inner.started = ago(2 * DOWN_AFTER);
            inner.peers[1].was_down = true;
            inner.peers[1].dead = true;
            inner.last_tick = Instant::now();
        }
        let held = replica.disk.hold_writes();
        let (done, ticked) = std::sync::mpsc::channel();
        let ticker = Arc::clone(&replica);
        let t = thread::spawn(move || done.send(ticker.tick()).unwrap());
        assert_eq!(
            ticked.recv_timeout(Duration::from_secs(10)),
            Ok(true),
            "the tick waited for the disk"
        );
        t.join().unwrap();
        {
            let inner = replica.lock();
            assert_eq!(inner.role, Role::Primary);
            assert_eq!(
                inner.flush_wanted, inner.last.seq,
                "its epoch record, asked for"
            );
            assert!(
                inner.durable < inner.last.seq,
                "not synced yet: the log is held"
            );
        }
        let flusher = {
            let r = Arc::clone(&replica);
            thread::spawn(move || r.run_flusher())
        };
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let inner = replica.lock();
            if inner.durable == inner.last.seq {
                break;
            }
            assert!(Instant::now() < deadline, "the flusher never synced it");
            drop(inner);
            thread::sleep(Duration::from_millis(5));
        }
        replica.begin_stop();
        flusher.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stalled_server_trusts_nothing_it_knew_and_acts_only_once_the_ticker_has_run() {
        let (replica, dir) = replica_of(2, "stall");
        let mut inner = replica.lock();
        inner.in_sync = true;
        // Too short to have looked dead: it still holds everything.
        inner.last_tick = ago(STALL + Duration::from_millis(50));
        replica.stalled(&mut inner, Instant::now());
        assert!(inner.in_sync);
        // Long enough to have been declared down and left behind: it may not.
        inner.last_tick = ago(DOWN_AFTER - HEARTBEAT_EVERY);
        replica.stalled(&mut inner, Instant::now());
        assert!(!inner.in_sync);
        // With the ticker late, nothing is decided, though the rules would make it primary
        // (the peer is known down and this server holds everything).
        inner.in_sync = true;
        inner.started = ago(2 * DOWN_AFTER);
        inner.peers[1].was_down = true;
        inner.peers[1].dead = true;
        inner.last_tick = ago(2 * STALL);
        replica.evaluate(&mut inner);
        assert_eq!(inner.role, Role::Backup);
        inner.last_tick = Instant::now();
        replica.evaluate(&mut inner);
        assert_eq!(inner.role, Role::Primary);
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn epochs_belong_to_one_server_each() {
        for n in 1..=5u64 {
            for id in 0..n {
                for known in 0..20 {
                    let e = next_epoch(known, id, n).unwrap();
                    assert!(e > known && e % n == id, "n {n} id {id} known {known}: {e}");
                    assert!(e <= known + n);
                }
            }
        }
    }

    #[test]
    fn epochs_never_wrap_or_pass_the_limit() {
        for n in [1u64, 3, 1 << 16] {
            for id in [0, n - 1] {
                for known in [MAX_EPOCH - 1, MAX_EPOCH, u64::MAX - 6, u64::MAX] {
                    let e = next_epoch(known, id, n);
                    assert!(
                        e.is_none_or(|e| e > known && e <= MAX_EPOCH),
                        "n {n} id {id} known {known}: {e:?}"
                    );
                }
                assert_eq!(next_epoch(u64::MAX, id, n), None);
                assert_eq!(next_epoch(MAX_EPOCH, id, n), None);
            }
        }
        // Just below the limit there is still room for every server.
        for id in 0..3 {
            assert!(next_epoch(MAX_EPOCH - 3, id, 3).is_some());
        }
    }
}
