//! The leader's side of a [`RaftCore`]: per-follower progress, log replication with fast
//! back-off, the commit rule, read-index rounds, check-quorum, and leadership transfer.

use super::message::{Body, Entry, ReplicaId, SnapshotChunk};
use super::replica::RaftCore;
use super::types::{RaftError, ReadState, Ready, Role};
use std::mem;

/// How the leader sends to one follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Its log's end is unknown: one Append at a time, the next after an answer (or a
    /// heartbeat's answer, if one was lost).
    Probe {
        /// An Append is out and unanswered.
        waiting: bool,
    },
    /// It matches: stream Appends ahead of the acknowledgements, up to `max_inflight`.
    Replicate,
    /// It needs the snapshot at `index`, sent `ticks` ago; resent if nothing comes back
    /// within `patience` ticks (a chunk may have been lost).
    Snapshot {
        /// The snapshot's last index.
        index: u64,
        /// Ticks since it was sent.
        ticks: u32,
        /// Ticks to wait for its answer: an election timeout the first time, doubling
        /// with each send that went unanswered, up to [`SNAPSHOT_PATIENCE_DOUBLINGS`]
        /// doublings. A follower answers only once the snapshot is saved and restored,
        /// which for a large state takes longer than an election timeout: resent at a
        /// fixed interval, the whole snapshot would go again and again meanwhile.
        patience: u32,
    },
}

/// How many times the wait for a snapshot's answer may double ([`Flow::Snapshot`]): at
/// most eight election timeouts.
pub(crate) const SNAPSHOT_PATIENCE_DOUBLINGS: u32 = 3;

/// What the leader knows of one follower's log.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    /// The follower's log is known to match the leader's up to here.
    pub(crate) matched: u64,
    /// The next index to send.
    pub(crate) next: u64,
    pub(crate) flow: Flow,
    /// Ticks with a heartbeat answered since `matched` last moved while entries were
    /// unacknowledged.
    pub(crate) stalled: u32,
    /// A heartbeat was answered since the last tick while entries were unacknowledged.
    pub(crate) alive: bool,
    /// Sends of the snapshot since `matched` last moved.
    pub(crate) snapshot_sends: u32,
}

/// The leader's read-index bookkeeping (thesis §6.4): reads wait for a round of
/// heartbeats answered by a majority. Reads that arrive while a round is out share the
/// next round, so one round confirms any number of them.
#[derive(Debug, Default)]
pub(crate) struct Reads {
    /// The last round number used; heartbeats carry it, answers echo it.
    last_round: u64,
    /// The round out now: its number, the commit index it confirms, who has answered,
    /// and the reads it serves.
    current: Option<Round>,
    /// Reads for the next round.
    waiting: Vec<u64>,
    /// Reads that an Append acknowledgement may confirm before their round does.
    riders: Vec<Rider>,
}

/// A read that rides on Appends (thesis §6.4's confirmation, by Appends instead of
/// heartbeats): it is confirmed once a majority's match reaches `after`, the first index
/// appended after it was asked, since only an Append sent after the read can carry that
/// index, and a follower that acknowledges it has not voted for a later term by then.
#[derive(Debug)]
struct Rider {
    ctx: u64,
    /// The commit index when it was asked (of this term: see `read_index`).
    index: u64,
    after: u64,
}

#[derive(Debug)]
struct Round {
    id: u64,
    index: u64,
    acks: Vec<ReplicaId>,
    ctxs: Vec<u64>,
}

impl RaftCore {
    /// Appends `data` to the log (§5.3). Returns its index and term: it is committed when
    /// an entry with this index *and* term comes out in [`Ready::committed`]; an entry of
    /// another term at that index means this proposal was lost with its leader.
    ///
    /// # Errors
    /// [`RaftError::NotLeader`] on a follower or candidate, [`RaftError::Transferring`]
    /// during a leadership transfer.
    pub fn propose(&mut self, data: Vec<u8>, out: &mut Ready) -> Result<(u64, u64), RaftError> {
        let (first, term) = self.propose_all(vec![data], out)?;
        Ok((first, term))
    }

    /// Appends every command of `batch` in order, then sends each follower what it lacks
    /// once: a driver that gathers the proposals of many clients sends one Append per
    /// follower for all of them (per `max_batch` entries), not one per proposal. Returns
    /// the first one's index and their term (the others follow it).
    ///
    /// # Errors
    /// As [`RaftCore::propose`]: then none of them is appended.
    pub fn propose_all(
        &mut self,
        batch: Vec<Vec<u8>>,
        out: &mut Ready,
    ) -> Result<(u64, u64), RaftError> {
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        if self.transferee.is_some() {
            return Err(RaftError::Transferring);
        }
        let at = (self.log.last_index() + 1, self.term);
        for data in batch {
            self.append(data, out);
        }
        self.broadcast_append(out);
        Ok(at)
    }

    /// Asks for a linearizable read tagged `ctx`. The confirmation comes out in
    /// [`Ready::reads`] once a majority has answered a heartbeat sent after this call,
    /// or (when the leader has committed in its term already) acknowledged an entry
    /// appended after this call, whichever comes first (or in [`Ready::failed_reads`] if
    /// this replica stops leading first).
    ///
    /// # Errors
    /// [`RaftError::NotLeader`] unless this replica leads.
    pub fn read_index(&mut self, ctx: u64, out: &mut Ready) -> Result<(), RaftError> {
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        self.reads.waiting.push(ctx);
        if self.log.term(self.commit) == Some(self.term) {
            self.reads.riders.push(Rider {
                ctx,
                index: self.commit,
                after: self.log.last_index() + 1,
            });
        }
        self.start_read_round(out);
        Ok(())
    }

    /// Confirms the riders whose first later index a majority (this leader included)
    /// has acknowledged; their reads leave the heartbeat rounds.
    fn confirm_riders(&mut self, out: &mut Ready) {
        if self.reads.riders.is_empty() {
            return;
        }
        let mut matched: Vec<u64> = self.progress.values().map(|p| p.matched).collect();
        matched.sort_unstable_by(|a, b| b.cmp(a));
        // This leader plus `quorum - 1` followers.
        let reached = matched[self.quorum - 2];
        let mut done = Vec::new();
        self.reads.riders.retain(|r| {
            if r.after <= reached {
                done.push(ReadState {
                    ctx: r.ctx,
                    index: r.index,
                });
                false
            } else {
                true
            }
        });
        if done.is_empty() {
            return;
        }
        let confirmed = |ctx: &u64| done.iter().any(|d| d.ctx == *ctx);
        self.reads.waiting.retain(|c| !confirmed(c));
        if let Some(round) = self.reads.current.as_mut() {
            round.ctxs.retain(|c| !confirmed(c));
        }
        out.reads.extend(done);
    }

    /// Hands leadership to `to` for a planned stop (thesis §3.10): proposals are refused,
    /// `to` is brought up to date, then told to campaign at once. Abandoned if it has not
    /// happened within an election timeout.
    ///
    /// # Errors
    /// [`RaftError::NotLeader`] unless this replica leads; [`RaftError::UnknownPeer`]
    /// unless `to` is another member.
    pub fn transfer_leadership(&mut self, to: ReplicaId, out: &mut Ready) -> Result<(), RaftError> {
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        if !self.peers.contains(&to) {
            return Err(RaftError::UnknownPeer(to));
        }
        self.transferee = Some(to);
        self.election_elapsed = 0;
        if self.progress[&to].matched == self.log.last_index() {
            self.send(to, Body::TimeoutNow, out);
        } else {
            self.send_append(to, false, out);
        }
        Ok(())
    }

    /// Read-index rounds this replica has started (as leader, in any term).
    pub fn read_rounds(&self) -> u64 {
        self.reads.last_round
    }

    pub(super) fn become_leader(&mut self, out: &mut Ready) {
        self.set_role(Role::Leader, out);
        self.leader = Some(self.cfg.id);
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.active.clear();
        let next = self.log.last_index() + 1;
        for &p in &self.peers {
            let pr = Progress {
                matched: 0,
                next,
                flow: Flow::Probe { waiting: false },
                stalled: 0,
                alive: false,
                snapshot_sends: 0,
            };
            self.progress.insert(p, pr);
        }
        // §8: a no-op of the new term lets the leader commit (Figure 8 forbids counting
        // replicas of older entries) and so learn the commit index reads need.
        self.append(Vec::new(), out);
        self.broadcast_append(out);
    }

    pub(super) fn tick_leader(&mut self, out: &mut Ready) {
        self.election_elapsed += 1;
        self.heartbeat_elapsed += 1;
        if self.election_elapsed >= self.cfg.election_ticks {
            self.election_elapsed = 0;
            // Thesis §6.2: a leader cut off from a majority stops acting as one, so
            // clients go to the other side instead of waiting on it forever.
            let heard = self.active.len() + 1;
            self.active.clear();
            if self.cfg.check_quorum && heard < self.quorum {
                self.become_follower(self.term, None, out);
                return;
            }
            self.transferee = None;
        }
        let last = self.log.last_index();
        // Half an election timeout, in ticks.
        let patience = (self.cfg.election_ticks / 2).max(2);
        for p in self.peers.clone() {
            let pr = self.progress.get_mut(&p).expect("progress for every peer");
            if let Flow::Snapshot {
                ticks, patience, ..
            } = &mut pr.flow
            {
                *ticks += 1;
                if *ticks >= *patience {
                    pr.flow = Flow::Probe { waiting: false };
                }
            }
            if pr.flow == Flow::Replicate && pr.matched < last && mem::take(&mut pr.alive) {
                // Everything was sent, yet the follower is alive and its match has not
                // moved for half an election timeout: Appends were lost (no round trip
                // is that slow, or elections would fail too). Probe from its match.
                pr.stalled += 1;
                if pr.stalled >= patience {
                    pr.stalled = 0;
                    pr.next = pr.matched + 1;
                    pr.flow = Flow::Probe { waiting: false };
                    self.send_append(p, false, out);
                }
            }
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat(out);
        }
    }

    fn append(&mut self, data: Vec<u8>, out: &mut Ready) {
        let e = Entry {
            index: self.log.last_index() + 1,
            term: self.term,
            data,
        };
        self.log.put(e.clone());
        out.entries.push(e);
    }

    fn broadcast_append(&mut self, out: &mut Ready) {
        for p in self.peers.clone() {
            self.send_append(p, true, out);
        }
    }

    fn broadcast_heartbeat(&mut self, out: &mut Ready) {
        let round = self.reads.current.as_ref().map_or(0, |r| r.id);
        for p in self.peers.clone() {
            // Never more than it matches: the follower's entries past that may differ.
            let commit = self.commit.min(self.progress[&p].matched);
            self.send(p, Body::Heartbeat { commit, round }, out);
        }
    }

    /// Sends `to` what it lacks: entries, or the snapshot once they are compacted away;
    /// with `empty_ok`, an empty Append (to carry the commit index) when it lacks nothing.
    pub(super) fn send_append(&mut self, to: ReplicaId, empty_ok: bool, out: &mut Ready) {
        let last = self.log.last_index();
        let mut first = true;
        loop {
            let pr = &self.progress[&to];
            let paused = match pr.flow {
                Flow::Probe { waiting } => waiting,
                Flow::Replicate => pr.next - pr.matched > self.cfg.max_inflight,
                Flow::Snapshot { .. } => true,
            };
            if paused || (pr.next > last && !(first && empty_ok)) {
                return;
            }
            first = false;
            let prev = pr.next - 1;
            let Some(prev_term) = self.log.term(prev) else {
                // §7: the entries it needs are compacted away. The snapshot goes in
                // chunks, all at once; the follower answers once it has them all, and a
                // lost chunk is sent again with the rest after an election timeout.
                let (index, term) = (self.log.snapshot.index, self.log.snapshot.term);
                let pr = self.progress.get_mut(&to).expect("progress for every peer");
                let doublings = pr.snapshot_sends.min(SNAPSHOT_PATIENCE_DOUBLINGS);
                pr.snapshot_sends += 1;
                pr.flow = Flow::Snapshot {
                    index,
                    ticks: 0,
                    patience: self.cfg.election_ticks << doublings,
                };
                let total = self.log.snapshot.data.len();
                let mut offset = 0;
                loop {
                    let end = total.min(offset + self.cfg.max_chunk);
                    let chunk = SnapshotChunk {
                        index,
                        term,
                        offset: offset as u64,
                        total: total as u64,
                        data: self.log.snapshot.data[offset..end].to_vec(),
                    };
                    self.send(to, Body::Snapshot(chunk), out);
                    offset = end;
                    if offset == total {
                        return;
                    }
                }
            };
            let entries = self
                .log
                .slice(prev + 1, last, self.cfg.max_batch, self.cfg.max_chunk);
            let n = entries.len() as u64;
            let commit = self.commit;
            let pr = self.progress.get_mut(&to).expect("progress for every peer");
            match pr.flow {
                Flow::Replicate => pr.next += n,
                _ => pr.flow = Flow::Probe { waiting: true },
            }
            let body = Body::Append {
                prev_index: prev,
                prev_term,
                commit,
                entries,
            };
            self.send(to, body, out);
            if n == 0 {
                return;
            }
        }
    }

    pub(super) fn on_append_resp(
        &mut self,
        from: ReplicaId,
        index: u64,
        reject: bool,
        hint_index: u64,
        hint_term: u64,
        out: &mut Ready,
    ) {
        if self.role != Role::Leader {
            return;
        }
        self.active.insert(from);
        let last = self.log.last_index();
        let pr = self
            .progress
            .get_mut(&from)
            .expect("progress for every peer");
        if reject {
            let stale = match pr.flow {
                Flow::Probe { .. } => index != pr.next - 1,
                _ => index <= pr.matched,
            };
            if stale {
                return;
            }
            // Fast back-off: skip to our last entry whose term is at most the follower's
            // term at its hint; both logs agree on nothing after the hint (§5.3).
            let probe = self.log.conflict_by_term(hint_index, hint_term);
            pr.next = index.min(probe + 1).max(pr.matched + 1);
            pr.flow = Flow::Probe { waiting: false };
            self.send_append(from, false, out);
            return;
        }
        let index = index.min(last);
        if index > pr.matched {
            pr.matched = index;
            pr.stalled = 0;
            pr.alive = false;
            pr.snapshot_sends = 0;
        }
        pr.next = pr.next.max(pr.matched + 1);
        match pr.flow {
            Flow::Probe { .. } => pr.flow = Flow::Replicate,
            Flow::Snapshot { index: s, .. } if pr.matched >= s => pr.flow = Flow::Replicate,
            _ => {}
        }
        if pr.flow == Flow::Replicate {
            // After a probe or a snapshot, `next` may still point past a lost message.
            pr.next = pr.next.min(last + 1).max(pr.matched + 1);
        }
        let caught_up = pr.matched == last;
        self.confirm_riders(out);
        if self.maybe_commit() {
            self.on_commit(out);
        } else {
            self.send_append(from, false, out);
        }
        if caught_up && self.transferee == Some(from) {
            self.send(from, Body::TimeoutNow, out);
        }
    }

    pub(super) fn on_heartbeat_resp(&mut self, from: ReplicaId, round: u64, out: &mut Ready) {
        if self.role != Role::Leader {
            return;
        }
        self.active.insert(from);
        let pr = self
            .progress
            .get_mut(&from)
            .expect("progress for every peer");
        if let Flow::Probe { waiting } = &mut pr.flow {
            // An Append (or its answer) may have been lost; the follower is alive, so try again.
            *waiting = false;
        }
        if pr.flow == Flow::Replicate && pr.matched < self.log.last_index() {
            // Counted per tick in `tick_leader`, not per answer: a follower whose disk
            // lags behind its network (a driver that answers heartbeats while its fsync
            // runs) answers many read rounds' heartbeats between two acknowledgements.
            pr.alive = true;
        }
        if pr.matched < self.log.last_index() {
            self.send_append(from, false, out);
        }
        let quorum = self.quorum;
        let Some(current) = self.reads.current.as_mut() else {
            return;
        };
        if current.id != round || current.acks.contains(&from) {
            return;
        }
        current.acks.push(from);
        if current.acks.len() + 1 >= quorum {
            let done = self.reads.current.take().expect("checked above");
            self.reads.riders.retain(|r| !done.ctxs.contains(&r.ctx));
            for ctx in done.ctxs {
                out.reads.push(ReadState {
                    ctx,
                    index: done.index,
                });
            }
            self.start_read_round(out);
        }
    }

    /// §5.3, §5.4.2: the highest index a majority has on disk becomes committed, but only
    /// if its entry is of this term; older entries commit with it, never by counting.
    pub(super) fn maybe_commit(&mut self) -> bool {
        let mut matched: Vec<u64> = self.progress.values().map(|p| p.matched).collect();
        matched.push(self.persisted.min(self.log.last_index()));
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let n = matched[self.quorum - 1];
        #[allow(unused_mut)]
        let mut ours = self.log.term(n) == Some(self.term);
        #[cfg(test)]
        if self.bug == super::replica::Bug::CommitAnyTerm {
            ours = true;
        }
        if n > self.commit && ours {
            self.commit = n;
            true
        } else {
            false
        }
    }

    /// Tells the followers the new commit index: by the heartbeats of a read round if one
    /// starts now (they carry it), else by an Append (empty when a follower lacks nothing).
    pub(super) fn on_commit(&mut self, out: &mut Ready) {
        let heartbeats = self.start_read_round(out);
        for p in self.peers.clone() {
            self.send_append(p, !heartbeats, out);
        }
    }

    /// Starts a read round if reads wait and none is out; true when its heartbeats went.
    fn start_read_round(&mut self, out: &mut Ready) -> bool {
        // §6.4: until an entry of its term is committed a new leader does not know the
        // commit index, so reads wait for the no-op.
        if self.reads.current.is_some()
            || self.reads.waiting.is_empty()
            || self.log.term(self.commit) != Some(self.term)
        {
            return false;
        }
        self.reads.last_round += 1;
        self.reads.current = Some(Round {
            id: self.reads.last_round,
            index: self.commit,
            acks: Vec::new(),
            ctxs: mem::take(&mut self.reads.waiting),
        });
        self.heartbeat_elapsed = 0;
        self.broadcast_heartbeat(out);
        true
    }

    pub(super) fn fail_reads(&mut self, out: &mut Ready) {
        // Every rider's read is waiting or in the round too: it fails there.
        self.reads.riders.clear();
        if let Some(r) = self.reads.current.take() {
            out.failed_reads.extend(r.ctxs);
        }
        out.failed_reads.append(&mut self.reads.waiting);
    }
}
