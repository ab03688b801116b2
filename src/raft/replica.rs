//! One Raft replica as a state machine without I/O: the inputs are methods (a tick, a
//! message, a proposal, a read, a persistence acknowledgement), the outputs go into a
//! [`Ready`] the caller carries out. Elections and the follower's side live here; the
//! leader's side (replication, commit, reads, transfer) is in `leader.rs`.

use super::leader::{Progress, Reads};
use super::log::RaftLog;
use super::message::{Body, Entry, Message, ReplicaId, Snapshot, SnapshotChunk};
use super::rng::Rng;
use super::types::{Config, HardState, RaftError, Ready, Role, Stored};
use std::collections::{BTreeMap, BTreeSet};

/// The highest term a replica takes from a message: far below `u64::MAX`, so that no
/// term arithmetic wraps. No election reaches it (one a microsecond would take half a
/// million years); a message past it is a forged or corrupt one, and taking its term would
/// leave the replica unable ever to campaign again (its next term would wrap), with that
/// term saved on disk.
pub const MAX_TERM: u64 = 1 << 62;

/// Deliberate protocol bugs, so tests can show the simulator's checks catch them.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Bug {
    #[default]
    None,
    /// Grant every vote request, even a second one in a term.
    VoteTwice,
    /// Grant votes and pre-votes without the §5.4.1 up-to-date check.
    IgnoreLogInVotes,
    /// Commit entries of earlier terms by counting (the Figure 8 mistake).
    CommitAnyTerm,
}

/// One Raft replica. See [`Ready`] for what to do with its outputs.
#[derive(Debug)]
pub struct RaftCore {
    pub(super) cfg: Config,
    pub(super) peers: Vec<ReplicaId>,
    pub(super) quorum: usize,
    rng: Rng,
    pub(super) term: u64,
    vote: Option<ReplicaId>,
    pub(super) role: Role,
    pub(super) leader: Option<ReplicaId>,
    pub(super) log: RaftLog,
    pub(super) commit: u64,
    applied: u64,
    /// The last index known to be on this replica's disk: the leader counts only this far
    /// for itself, and nothing past it is applied.
    pub(super) persisted: u64,
    pub(super) election_elapsed: u32,
    pub(super) heartbeat_elapsed: u32,
    timeout: u32,
    votes: BTreeMap<ReplicaId, bool>,
    pub(super) progress: BTreeMap<ReplicaId, Progress>,
    /// Peers heard from since the last check-quorum.
    pub(super) active: BTreeSet<ReplicaId>,
    pub(super) transferee: Option<ReplicaId>,
    pub(super) reads: Reads,
    last_hard: HardState,
    /// The InstallSnapshot being received, chunk by chunk.
    partial: Option<Partial>,
    #[cfg(test)]
    pub(crate) bug: Bug,
}

/// The chunks of one leader's snapshot received so far, in order from offset 0. Keyed by
/// the leader's term as well as the snapshot's index and term: two leaders' blobs for
/// one index need not be byte for byte the same, so their chunks never mix.
#[derive(Debug)]
struct Partial {
    leader_term: u64,
    index: u64,
    term: u64,
    total: u64,
    data: Vec<u8>,
}

impl RaftCore {
    /// A replica with an empty log.
    ///
    /// # Errors
    /// [`RaftError::BadConfig`] unless the members are 3 or 5 distinct ids including
    /// `id`, and `0 < heartbeat_ticks < election_ticks`.
    pub fn new(cfg: Config) -> Result<RaftCore, RaftError> {
        RaftCore::restart(cfg, Stored::default())
    }

    /// A replica resuming from what it persisted. Its state machine is the snapshot's;
    /// the committed entries after it come out again in the first [`Ready`].
    ///
    /// # Errors
    /// As [`RaftCore::new`].
    pub fn restart(cfg: Config, stored: Stored) -> Result<RaftCore, RaftError> {
        let mut ids = cfg.members.clone();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != cfg.members.len() || !(ids.len() == 3 || ids.len() == 5) {
            return Err(RaftError::BadConfig("members must be 3 or 5 distinct ids"));
        }
        if !ids.contains(&cfg.id) {
            return Err(RaftError::BadConfig("id is not among the members"));
        }
        if cfg.heartbeat_ticks == 0 || cfg.heartbeat_ticks >= cfg.election_ticks {
            return Err(RaftError::BadConfig(
                "need 0 < heartbeat_ticks < election_ticks",
            ));
        }
        if cfg.max_batch == 0 || cfg.max_inflight == 0 || cfg.max_chunk == 0 {
            return Err(RaftError::BadConfig(
                "max_batch, max_inflight and max_chunk must be > 0",
            ));
        }
        let log = RaftLog::restore(stored.snapshot, stored.entries);
        let hs = stored.hard_state;
        let mut r = RaftCore {
            peers: ids.iter().copied().filter(|&p| p != cfg.id).collect(),
            quorum: ids.len() / 2 + 1,
            rng: Rng::new(cfg.seed ^ cfg.id.wrapping_mul(0x2545_f491_4f6c_dd1d)),
            term: hs.term,
            vote: hs.vote,
            role: Role::Follower,
            leader: None,
            commit: hs.commit.clamp(log.snapshot.index, log.last_index()),
            applied: log.snapshot.index,
            persisted: log.last_index(),
            log,
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            timeout: 0,
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            active: BTreeSet::new(),
            transferee: None,
            reads: Reads::default(),
            last_hard: hs,
            partial: None,
            cfg,
            #[cfg(test)]
            bug: Bug::None,
        };
        r.reset_timeout();
        Ok(r)
    }

    /// This replica's id.
    pub fn id(&self) -> ReplicaId {
        self.cfg.id
    }
    /// Its role.
    pub fn role(&self) -> Role {
        self.role
    }
    /// Its current term.
    pub fn term(&self) -> u64 {
        self.term
    }
    /// The leader it knows of in its term.
    pub fn leader(&self) -> Option<ReplicaId> {
        self.leader
    }
    /// The highest index it knows is committed.
    pub fn commit_index(&self) -> u64 {
        self.commit
    }
    /// The highest index handed out for applying.
    pub fn applied_index(&self) -> u64 {
        self.applied
    }
    /// The last index in its log.
    pub fn last_index(&self) -> u64 {
        self.log.last_index()
    }
    /// The first index still in the log (one past the snapshot).
    pub fn first_index(&self) -> u64 {
        self.log.first_index()
    }
    /// The term of the entry at `index`, while it is in the log (or is the snapshot's).
    pub fn term_at(&self, index: u64) -> Option<u64> {
        self.log.term(index)
    }
    /// The entry at `index`, while it is in the log.
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        self.log.get(index)
    }
    /// The latest snapshot (index 0 if none).
    pub fn snapshot(&self) -> &Snapshot {
        &self.log.snapshot
    }
    /// On a leader, how far `peer`'s log is known to match.
    pub fn match_index(&self, peer: ReplicaId) -> Option<u64> {
        self.progress.get(&peer).map(|p| p.matched)
    }

    /// One unit of time passes.
    pub fn tick(&mut self, out: &mut Ready) {
        if self.role == Role::Leader {
            self.tick_leader(out);
        } else {
            self.election_elapsed += 1;
            if self.election_elapsed >= self.timeout {
                self.campaign(self.cfg.pre_vote, false, out);
            }
        }
        self.flush(out);
    }

    /// Handles a message from a peer. Messages not addressed to this replica, or not from
    /// a member, or with a term past `MAX_TERM` (2^62), are ignored.
    pub fn receive(&mut self, msg: Message, out: &mut Ready) {
        if msg.to == self.cfg.id && self.peers.contains(&msg.from) && msg.term <= MAX_TERM {
            self.step(msg, out);
            self.flush(out);
        }
    }

    /// The caller has persisted everything up to `index`, whose entry had `term` (for a
    /// snapshot: its index and term). An acknowledgement for entries since replaced is
    /// recognised by its term and ignored.
    pub fn persisted(&mut self, index: u64, term: u64, out: &mut Ready) {
        if index > self.persisted && self.log.term(index) == Some(term) {
            self.persisted = index;
            if self.role == Role::Leader && self.maybe_commit() {
                self.on_commit(out);
            }
        }
        self.flush(out);
    }

    /// Replaces the log up to `index` (applied already) by `data`, the state machine's
    /// blob at that index. Returns the snapshot for the caller to persist; the entries up
    /// to `index` may then be dropped from storage.
    ///
    /// # Errors
    /// [`RaftError::CannotCompact`] when `index` is not applied, or not past the current
    /// snapshot.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Result<Snapshot, RaftError> {
        let refuse = RaftError::CannotCompact {
            index,
            applied: self.applied,
            snapshot: self.log.snapshot.index,
        };
        if index > self.applied {
            return Err(refuse);
        }
        self.log.compact(index, data).ok_or(refuse)
    }

    fn step(&mut self, m: Message, out: &mut Ready) {
        let higher = m.term > self.term;
        if higher {
            if let Body::PreVote { .. } | Body::Vote { force: false, .. } = m.body {
                // §4.2.3: while a leader is heard from, a vote request (from a replica
                // that was cut off, say) does not disturb it; a transfer forces past this.
                if self.in_lease() {
                    return;
                }
            }
            match m.body {
                // Pre-votes never move terms: that is their point (§9.6).
                Body::PreVote { .. } | Body::PreVoteResp { granted: true } => {}
                Body::Append { .. } | Body::Heartbeat { .. } | Body::Snapshot(_) => {
                    self.become_follower(m.term, Some(m.from), out)
                }
                _ => self.become_follower(m.term, None, out),
            }
        } else if m.term < self.term {
            match m.body {
                // A stale leader (cut off, then healed) learns the term and steps down;
                // with pre-vote it would otherwise never hear a higher term.
                Body::Append { .. } | Body::Heartbeat { .. } => {
                    self.send(m.from, self.reject_stale(), out)
                }
                Body::PreVote { .. } => {
                    self.send(m.from, Body::PreVoteResp { granted: false }, out)
                }
                _ => {}
            }
            return;
        }
        match m.body {
            Body::PreVote {
                last_index,
                last_term,
            } => {
                #[allow(unused_mut)]
                let mut log_ok = self.log.up_to_date(last_index, last_term);
                #[cfg(test)]
                if self.bug == Bug::IgnoreLogInVotes {
                    log_ok = true;
                }
                let granted = higher && log_ok;
                let term = if granted { m.term } else { self.term };
                self.send_at(m.from, term, Body::PreVoteResp { granted }, out);
            }
            Body::Vote {
                last_index,
                last_term,
                ..
            } => self.on_vote(m.from, last_index, last_term, out),
            Body::PreVoteResp { granted } => {
                if self.role == Role::PreCandidate && m.term == self.term + 1 {
                    self.tally(m.from, granted, out);
                }
            }
            Body::VoteResp { granted } => {
                if self.role == Role::Candidate {
                    self.tally(m.from, granted, out);
                }
            }
            Body::Append {
                prev_index,
                prev_term,
                commit,
                entries,
            } => {
                self.hear_leader(m.from, out);
                self.on_append(m.from, prev_index, prev_term, commit, entries, out);
            }
            Body::Heartbeat { commit, round } => {
                self.hear_leader(m.from, out);
                // The leader caps `commit` at what this replica matches, so it is safe.
                self.commit = self.commit.max(commit.min(self.log.last_index()));
                self.send(m.from, Body::HeartbeatResp { round }, out);
            }
            Body::Snapshot(chunk) => {
                self.hear_leader(m.from, out);
                if let Some(snap) = self.on_chunk(chunk) {
                    self.on_snapshot(m.from, snap, out);
                }
            }
            Body::AppendResp {
                index,
                reject,
                hint_index,
                hint_term,
            } => self.on_append_resp(m.from, index, reject, hint_index, hint_term, out),
            Body::HeartbeatResp { round } => self.on_heartbeat_resp(m.from, round, out),
            Body::TimeoutNow => {
                if self.role != Role::Leader {
                    // §3.10: the leader has brought us up to date and stopped taking
                    // writes; start the election now, skipping pre-vote and leases.
                    self.campaign(false, true, out);
                }
            }
        }
    }

    fn reject_stale(&self) -> Body {
        Body::AppendResp {
            index: 0,
            reject: true,
            hint_index: 0,
            hint_term: 0,
        }
    }

    pub(super) fn in_lease(&self) -> bool {
        self.cfg.check_quorum
            && self.leader.is_some()
            && self.election_elapsed < self.cfg.election_ticks
    }

    fn hear_leader(&mut self, from: ReplicaId, out: &mut Ready) {
        if self.role != Role::Follower {
            // §5.2: a candidate that hears from a leader of its own term follows it.
            self.become_follower(self.term, Some(from), out);
        }
        self.leader = Some(from);
        self.election_elapsed = 0;
    }

    fn on_vote(&mut self, from: ReplicaId, last_index: u64, last_term: u64, out: &mut Ready) {
        // §5.2: one vote per term, kept across restarts through the hard state.
        #[allow(unused_mut)]
        let mut free = self.vote == Some(from) || (self.vote.is_none() && self.leader.is_none());
        // §5.4.1: only for a candidate whose log holds everything this one might have
        // acknowledged (the election restriction).
        #[allow(unused_mut)]
        let mut log_ok = self.log.up_to_date(last_index, last_term);
        #[cfg(test)]
        match self.bug {
            Bug::VoteTwice => free = true,
            Bug::IgnoreLogInVotes => log_ok = true,
            _ => {}
        }
        let granted = free && log_ok;
        if granted {
            self.vote = Some(from);
            self.election_elapsed = 0;
        }
        self.send(from, Body::VoteResp { granted }, out);
    }

    fn on_append(
        &mut self,
        from: ReplicaId,
        prev_index: u64,
        prev_term: u64,
        commit: u64,
        entries: Vec<Entry>,
        out: &mut Ready,
    ) {
        let contiguous = entries
            .iter()
            .enumerate()
            .all(|(i, e)| Some(e.index) == prev_index.checked_add(i as u64 + 1));
        if !contiguous {
            return;
        }
        if prev_index < self.commit {
            // Everything to our commit index is the leader's too (leader completeness);
            // say so, and the leader continues from there.
            let index = self.commit;
            self.send(from, ack(index), out);
            return;
        }
        if self.log.term(prev_index) != Some(prev_term) {
            // §5.3 consistency check failed. The hint is our last index whose term is
            // at most `prev_term`: the leader skips a term of divergent entries at once.
            let hint_index = self.log.conflict_by_term(prev_index, prev_term);
            let hint_term = self.log.term(hint_index).unwrap_or(0);
            let body = Body::AppendResp {
                index: prev_index,
                reject: true,
                hint_index,
                hint_term,
            };
            self.send(from, body, out);
            return;
        }
        let last_new = prev_index + entries.len() as u64;
        for e in entries {
            match self.log.term(e.index) {
                Some(t) if t == e.term => continue,
                Some(_) if e.index <= self.commit => {
                    // A committed entry never changes (§5.4); a leader asking for it is
                    // not following the protocol. Refuse the whole message.
                    debug_assert!(false, "append conflicts with a committed entry");
                    return;
                }
                // §5.3: a conflicting entry and all that follow it are deleted.
                _ => {
                    self.persisted = self.persisted.min(e.index - 1);
                    self.log.put(e.clone());
                    out.entries.push(e);
                }
            }
        }
        self.commit = self.commit.max(commit.min(last_new));
        self.send(from, ack(last_new), out);
    }

    /// Adds a chunk to the snapshot being received; returns the snapshot once complete.
    /// A chunk that does not continue it is dropped: a duplicate adds nothing, and after
    /// a gap (a lost or reordered chunk) the leader sends the whole snapshot again once
    /// an election timeout passes without an answer, its chunks filling in from here. A
    /// chunk at offset 0 of another snapshot, or from another term's leader, starts over.
    fn on_chunk(&mut self, c: SnapshotChunk) -> Option<Snapshot> {
        let fits = c
            .offset
            .checked_add(c.data.len() as u64)
            .is_some_and(|end| end <= c.total);
        if c.index <= self.commit || !fits {
            // Covered already: answered as a whole snapshot would be, from the commit.
            self.partial = None;
            return fits.then(|| Snapshot {
                index: c.index,
                term: c.term,
                data: Vec::new(),
            });
        }
        let same = |p: &Partial| {
            (p.leader_term, p.index, p.term, p.total) == (self.term, c.index, c.term, c.total)
        };
        if !self.partial.as_ref().is_some_and(same) {
            if c.offset != 0 {
                return None;
            }
            self.partial = Some(Partial {
                leader_term: self.term,
                index: c.index,
                term: c.term,
                total: c.total,
                data: Vec::new(),
            });
        }
        let p = self.partial.as_mut().expect("set above");
        if c.offset != p.data.len() as u64 {
            return None;
        }
        p.data.extend_from_slice(&c.data);
        if (p.data.len() as u64) < p.total {
            return None;
        }
        let p = self.partial.take().expect("set above");
        Some(Snapshot {
            index: p.index,
            term: p.term,
            data: p.data,
        })
    }

    fn on_snapshot(&mut self, from: ReplicaId, snap: Snapshot, out: &mut Ready) {
        if snap.index <= self.commit {
            let index = self.commit;
            self.send(from, ack(index), out);
            return;
        }
        let index = snap.index;
        if self.log.term(index) == Some(snap.term) {
            // Our log already has it; only the commit index moves (§7: "retain the
            // entries following it").
            self.commit = index;
        } else {
            // §7: the snapshot replaces the whole log. Entries queued for persisting in
            // this Ready belonged to the discarded log; committed ones are covered by it.
            out.entries.clear();
            out.committed.retain(|e| e.index > index);
            self.log.install(snap.clone());
            out.snapshot = Some(snap);
            self.commit = index;
            self.applied = index;
            self.persisted = 0;
        }
        self.send(from, ack(index), out);
    }

    fn tally(&mut self, from: ReplicaId, granted: bool, out: &mut Ready) {
        self.votes.insert(from, granted);
        let yes = self.votes.values().filter(|&&g| g).count();
        let no = self.votes.len() - yes;
        if yes >= self.quorum {
            if self.role == Role::PreCandidate {
                self.campaign(false, false, out);
            } else {
                self.become_leader(out);
            }
        } else if no >= self.quorum {
            self.become_follower(self.term, None, out);
        }
    }

    /// Starts an election: a pre-vote round (term not raised), or a real one (§5.2).
    pub(super) fn campaign(&mut self, pre: bool, force: bool, out: &mut Ready) {
        self.fail_reads(out);
        self.progress.clear();
        self.transferee = None;
        self.leader = None;
        self.election_elapsed = 0;
        self.reset_timeout();
        self.votes.clear();
        self.votes.insert(self.cfg.id, true);
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        if pre {
            self.set_role(Role::PreCandidate, out);
            for to in self.peers.clone() {
                let body = Body::PreVote {
                    last_index,
                    last_term,
                };
                self.send_at(to, self.term + 1, body, out);
            }
        } else {
            self.term += 1;
            self.vote = Some(self.cfg.id);
            self.set_role(Role::Candidate, out);
            for to in self.peers.clone() {
                let body = Body::Vote {
                    last_index,
                    last_term,
                    force,
                };
                self.send(to, body, out);
            }
        }
    }

    pub(super) fn become_follower(
        &mut self,
        term: u64,
        leader: Option<ReplicaId>,
        out: &mut Ready,
    ) {
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        self.fail_reads(out);
        self.progress.clear();
        self.transferee = None;
        self.leader = leader;
        self.election_elapsed = 0;
        self.reset_timeout();
        self.set_role(Role::Follower, out);
    }

    pub(super) fn set_role(&mut self, role: Role, out: &mut Ready) {
        if role != self.role {
            self.role = role;
            out.role = Some((role, self.term));
        } else if out.role.is_some() {
            out.role = Some((role, self.term));
        }
    }

    fn reset_timeout(&mut self) {
        // §5.2: randomised timeouts make split votes rare.
        let e = u64::from(self.cfg.election_ticks);
        self.timeout = (e + self.rng.below(e)) as u32;
    }

    pub(super) fn send(&mut self, to: ReplicaId, body: Body, out: &mut Ready) {
        self.send_at(to, self.term, body, out);
    }

    fn send_at(&mut self, to: ReplicaId, term: u64, body: Body, out: &mut Ready) {
        out.messages.push(Message {
            from: self.cfg.id,
            to,
            term,
            body,
        });
    }

    /// Emits what every call may have changed: the hard state, and entries now both
    /// committed and on this replica's disk.
    fn flush(&mut self, out: &mut Ready) {
        let hard = HardState {
            term: self.term,
            vote: self.vote,
            commit: self.commit,
        };
        if hard != self.last_hard {
            self.last_hard = hard;
            out.hard_state = Some(hard);
        }
        let upto = self.commit.min(self.persisted);
        if upto > self.applied {
            let from = self.applied + 1;
            out.committed
                .extend(self.log.slice(from, upto, usize::MAX, usize::MAX));
            self.applied = upto;
        }
    }
}

/// A successful AppendEntries answer up to `index`.
pub(super) fn ack(index: u64) -> Body {
    Body::AppendResp {
        index,
        reject: false,
        hint_index: 0,
        hint_term: 0,
    }
}
