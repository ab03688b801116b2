//! Raft consensus as a sans-IO core: a [`RaftCore`] takes inputs and returns outputs, and
//! owns no sockets, threads, clocks, disks or global randomness. [`driver`] runs it on a
//! thread with a timer, persists through [`disk`] and carries messages through a
//! [`driver::Transport`] (the replicated store's is the framework's links); a
//! deterministic simulator (the tests) carries them through a faulty network instead.
//!
//! ## Inputs
//! - [`RaftCore::tick`]: one unit of time (elections and heartbeats count ticks).
//! - [`RaftCore::receive`]: a [`Message`] from a peer ([`decode`] turns bytes into one).
//! - [`RaftCore::propose`]: a client's command (leader only); returns its index and term.
//! - [`RaftCore::read_index`]: a linearizable read, tagged by the caller (leader only).
//! - [`RaftCore::persisted`]: "everything up to this index and term is on disk".
//! - [`RaftCore::transfer_leadership`]: hand over before a planned stop.
//! - [`RaftCore::compact`]: the state machine at an applied index, to replace the log prefix.
//!
//! ## Outputs, and the persist-before-send rule
//! Every input appends to a [`Ready`]. The caller must **persist** its hard state,
//! snapshot and entries, and only **then send** its messages: a vote or an acknowledgement
//! is a promise about what survives a crash (§5.1, Figure 2 "respond after storing"). A
//! Ready may collect several inputs before it is carried out; persisting all of it before
//! sending any of it is still correct (it is the state a one-by-one run reaches, with the
//! messages delayed); Readys themselves are carried out in order. After persisting, the
//! caller reports it with `persisted`: the leader counts itself towards a majority, and
//! any replica applies entries, only up to what it has on disk. Then it restores
//! `snapshot` (if any) into its state machine, applies `committed` in order, and answers
//! `reads` once it has applied their index. (Only some messages promise anything about
//! the disk: acknowledgements of entries, and anything sent while a new term, vote or
//! snapshot is unsaved. [`driver`] sends the others before the fsync they would wait
//! for: a leader's Appends and heartbeats, as the thesis's §10.2.1 allows, and a
//! follower's heartbeat answers.) Time is ticks; the defaults
//! ([`Config::new`]) elect after 10–19 ticks without a leader and heartbeat every tick.
//!
//! ## Tests
//! `src/raft/sim.rs` runs thousands of seeds of a simulated faulty network with crashes
//! and checks Raft's safety properties every tick; `src/raft/tests.rs` scripts one rule
//! per scenario (pre-vote, check-quorum, read-index, transfer, snapshot, Figure 8).
//!
//! ## What is supported
//! Static membership of 3 or 5 ids (no joint consensus or learners); leader election with
//! randomised timeouts drawn from a caller's seed (§5.2); pre-vote (thesis §9.6);
//! check-quorum with leader leases on vote requests (thesis §6.2, §4.2.3); log
//! replication with the consistency check and back-off by term (§5.3); commit by counting
//! only entries of the current term (§5.4.2); read-index reads, batched into heartbeat
//! rounds or riding on Appends (below), after the leader's first commit in its term
//! (thesis §6.4); leadership transfer
//! with TimeoutNow (thesis §3.10); snapshots made by the caller and sent to a follower
//! behind the leader's first index in InstallSnapshot chunks of at most
//! [`Config::max_chunk`] bytes (§7, Figure 13), all at once: the follower assembles one
//! leader's chunks in order (dropping duplicates, and everything after a gap until the
//! leader resends the whole after an election timeout without an answer) and installs
//! the snapshot only when complete, so a peer's frame limit need only hold one chunk.
//! Not here: membership changes, learners, lease-based reads without a round.
//!
//! ## Message economy (and why each saving is safe)
//! - [`RaftCore::propose_all`] appends a batch, then sends each follower what it lacks
//!   once; [`driver`] gathers every proposal of a round into one batch. Before, each
//!   proposal sent its own Append to every follower (4 Appends per acknowledged write at
//!   16 connections, now 1.3). Safe: the log and the messages are those of proposing one
//!   by one with the intermediate Appends lost, which the simulator already covers.
//! - On a commit, when a read round starts its heartbeats carry the commit index
//!   (clamped to each follower's match, as every heartbeat), so no empty Append goes
//!   with them; Appends still go to followers that lack entries. Safe: the commit index
//!   a follower learns is only ever one the leader committed, by either message.
//! - A read asked once the leader has committed in its term is also confirmed when a
//!   majority (the leader included) has acknowledged an entry appended **after** the read
//!   was asked, whichever comes first with its heartbeat round: under a write load it
//!   rides on the Appends that go anyway (thesis §6.4 with Appends for heartbeats), and
//!   reads asked while a round is out need not wait for the next one. Safe: only an
//!   Append sent after the read can carry that index, and a follower that acknowledges it
//!   in this term had voted for no later term by then, so any later leader is elected
//!   after the read was asked; the read's index is the commit index when it was asked,
//!   which holds every write acknowledged before. An acknowledgement of an Append sent
//!   before the read confirms nothing (`a_read_rides_on_acknowledgements_of_appends_sent_
//!   after_it_only`, which fails if the bound is off by one).
//! - [`driver`] sends a leader's messages before its fsync also when its hard state
//!   changed only in the commit index (which storage never writes on its own): before,
//!   nearly every round under load held its Appends until after the leader's fsync.
//!
//! ## Example: three replicas in memory
//! ```
//! use switchboard::raft::{Config, Ready, RaftCore, Role};
//!
//! let ids = [1, 2, 3];
//! let mut rs: Vec<RaftCore> = ids
//!     .iter()
//!     .map(|&id| RaftCore::new(Config::new(id, &ids, 7)).unwrap())
//!     .collect();
//! let mut applied: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 3];
//!
//! // Carries out one replica's Ready as a driver would: persist (here: nothing to do,
//! // memory is the disk), acknowledge, then send, then apply.
//! fn drive(rs: &mut [RaftCore], applied: &mut [Vec<Vec<u8>>], at: usize, mut ready: Ready) {
//!     loop {
//!         if let Some(e) = ready.entries.last() {
//!             let (index, term) = (e.index, e.term);
//!             rs[at].persisted(index, term, &mut ready);
//!         }
//!         ready.entries.clear();
//!         for e in ready.committed.drain(..) {
//!             applied[at].push(e.data);
//!         }
//!         let Some(msg) = ready.messages.pop() else { return };
//!         let to = (msg.to - 1) as usize;
//!         let mut next = Ready::default();
//!         rs[to].receive(msg, &mut next);
//!         drive(rs, applied, to, next);
//!     }
//! }
//!
//! // Tick until somebody leads.
//! let leader = loop {
//!     for at in 0..3 {
//!         let mut ready = Ready::default();
//!         rs[at].tick(&mut ready);
//!         drive(&mut rs, &mut applied, at, ready);
//!     }
//!     if let Some(r) = rs.iter().position(|r| r.role() == Role::Leader) {
//!         break r;
//!     }
//! };
//!
//! let mut ready = Ready::default();
//! let (index, _term) = rs[leader].propose(b"store,k,v".to_vec(), &mut ready).unwrap();
//! drive(&mut rs, &mut applied, leader, ready);
//! for _ in 0..3 {
//!     for at in 0..3 {
//!         let mut ready = Ready::default();
//!         rs[at].tick(&mut ready); // heartbeats carry the commit index to followers
//!         drive(&mut rs, &mut applied, at, ready);
//!     }
//! }
//! for at in 0..3 {
//!     assert!(rs[at].commit_index() >= index);
//!     assert_eq!(applied[at].last(), Some(&b"store,k,v".to_vec())); // after the no-op
//! }
//! ```

pub mod disk;
pub mod driver;
#[cfg(test)]
mod driver_hold_tests;
#[cfg(test)]
mod driver_tests;
mod leader;
pub mod links;
mod log;
pub mod member;
mod message;
mod replica;
mod rng;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
mod types;

pub use message::{
    decode, encode, Body, DecodeError, Entry, Message, ReplicaId, Snapshot, SnapshotChunk,
};
pub use replica::RaftCore;
pub use rng::Rng;
pub use types::{Config, HardState, RaftError, ReadState, Ready, Role, Stored};
