//! The types a [`RaftCore`](super::RaftCore)'s caller handles: its configuration, its
//! roles, what it persists, the [`Ready`] of outputs, and its errors.

use super::message::{Entry, Message, ReplicaId, Snapshot};
use std::fmt;

/// A replica's settings. Time is counted in ticks; the caller decides how long one is.
#[derive(Debug, Clone)]
pub struct Config {
    /// This replica's id; one of `members`.
    pub id: ReplicaId,
    /// Every replica's id, this one's included: 3 or 5 of them, fixed for the cluster's life.
    pub members: Vec<ReplicaId>,
    /// Ticks a follower waits for a leader before it campaigns; each wait is drawn from
    /// `election_ticks..2 * election_ticks`. Also the leader's check-quorum period.
    pub election_ticks: u32,
    /// Ticks between a leader's heartbeats; well below `election_ticks`.
    pub heartbeat_ticks: u32,
    /// Most entries in one Append.
    pub max_batch: usize,
    /// Most entries sent to a follower beyond what it has acknowledged.
    pub max_inflight: u64,
    /// Most snapshot bytes in one InstallSnapshot chunk (a snapshot goes as
    /// `ceil(len / max_chunk)` messages), and most command bytes in one Append beyond its
    /// first entry: a peer's frame limit need only hold a chunk or one entry.
    pub max_chunk: usize,
    /// Ask for pre-votes before raising the term (§9.6 of the thesis).
    pub pre_vote: bool,
    /// A leader that hears from no majority for an election timeout steps down, and
    /// followers that hear from a leader ignore vote requests (thesis §6.2, §4.2.3).
    pub check_quorum: bool,
    /// Seeds the election timeouts, so a simulated run depends on its seeds only.
    pub seed: u64,
}

impl Config {
    /// Defaults: elections after 10–19 ticks, a heartbeat every tick, pre-vote and
    /// check-quorum on.
    pub fn new(id: ReplicaId, members: &[ReplicaId], seed: u64) -> Config {
        Config {
            id,
            members: members.to_vec(),
            election_ticks: 10,
            heartbeat_ticks: 1,
            max_batch: 64,
            max_inflight: 512,
            max_chunk: 1 << 20,
            pre_vote: true,
            check_quorum: true,
            seed,
        }
    }
}

/// What a replica is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Following a leader, or waiting for one.
    Follower,
    /// Asking for pre-votes; its term is not raised yet.
    PreCandidate,
    /// Asking for votes in its (raised) term.
    Candidate,
    /// Leading its term.
    Leader,
}

/// What must survive a crash: the term, the vote in it, and (for a faster restart) the
/// commit index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HardState {
    /// The latest term this replica has seen.
    pub term: u64,
    /// Whom it voted for in `term`.
    pub vote: Option<ReplicaId>,
    /// The highest index it knows is committed.
    pub commit: u64,
}

/// What a restarting replica reads back from its storage.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    /// The last hard state persisted.
    pub hard_state: HardState,
    /// The last snapshot persisted (index 0 if none).
    pub snapshot: Snapshot,
    /// The entries persisted after the snapshot, in order.
    pub entries: Vec<Entry>,
}

/// A linearizable read may be served once the state machine has applied `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadState {
    /// The caller's tag from [`RaftCore::read_index`](super::RaftCore::read_index).
    pub ctx: u64,
    /// The commit index at which leadership was confirmed.
    pub index: u64,
}

/// The outputs of one or more calls, for the caller to carry out **in this order**:
///
/// 1. persist: `hard_state` (if any), then `snapshot` (if any: it replaces the whole
///    log), then each of `entries` at its index (dropping any entry at or after it);
///    then tell the replica with [`RaftCore::persisted`](super::RaftCore::persisted) (last entry or snapshot);
/// 2. only then send `messages`: a vote or an acknowledgement among them is a promise
///    about what is on disk (§5.1 "respond after storing");
/// 3. restore the state machine from `snapshot` (if any), apply `committed` in order,
///    and answer `reads` once the state machine has applied their index.
///
/// Readys are carried out in the order they were filled: a later Ready's messages may
/// rely on an earlier Ready's entries being on disk (a duplicate Append is acknowledged
/// without new entries), so its messages wait for every earlier persist too.
#[derive(Debug, Default)]
pub struct Ready {
    /// Persist first.
    pub hard_state: Option<HardState>,
    /// Persist (replacing the log) and restore the state machine from it.
    pub snapshot: Option<Snapshot>,
    /// Persist, each at its index, after the snapshot.
    pub entries: Vec<Entry>,
    /// Send after persisting.
    pub messages: Vec<Message>,
    /// Committed and locally persisted: apply in order.
    pub committed: Vec<Entry>,
    /// Confirmed reads.
    pub reads: Vec<ReadState>,
    /// Reads this replica can no longer confirm (it stopped leading): retry elsewhere.
    pub failed_reads: Vec<u64>,
    /// The role after these calls, when it changed, with its term.
    pub role: Option<(Role, u64)>,
}

impl Ready {
    /// Whether there is anything to persist before `messages` may go.
    pub fn must_persist(&self) -> bool {
        self.hard_state.is_some() || self.snapshot.is_some() || !self.entries.is_empty()
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RaftError {
    /// Only the leader takes proposals, reads and transfers; here is who leads, if known.
    NotLeader {
        /// The leader as far as this replica knows.
        leader: Option<ReplicaId>,
    },
    /// A leadership transfer is under way; proposals wait for the new leader.
    Transferring,
    /// The id is not one of the members (or is this replica).
    UnknownPeer(ReplicaId),
    /// The configuration is unusable.
    BadConfig(&'static str),
    /// A snapshot can only cover applied entries still in the log.
    CannotCompact {
        /// The index asked for.
        index: u64,
        /// What is applied.
        applied: u64,
        /// The current snapshot's index.
        snapshot: u64,
    },
}

impl fmt::Display for RaftError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RaftError::NotLeader { leader: Some(l) } => write!(f, "not the leader; {l} is"),
            RaftError::NotLeader { leader: None } => write!(f, "not the leader; none known"),
            RaftError::Transferring => write!(f, "leadership transfer under way"),
            RaftError::UnknownPeer(id) => write!(f, "{id} is not another member"),
            RaftError::BadConfig(why) => write!(f, "bad raft config: {why}"),
            RaftError::CannotCompact {
                index,
                applied,
                snapshot,
            } => write!(
                f,
                "cannot compact to {index}: applied {applied}, snapshot at {snapshot}"
            ),
        }
    }
}

impl std::error::Error for RaftError {}
