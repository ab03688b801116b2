//! Runs a [`RaftCore`] for real: one thread owns it, ticks it on a timer, carries out each
//! [`Ready`] by the persist-before-send rule, sends its messages through a [`Transport`],
//! applies committed entries to a [`StateMachine`], and answers read-index reads once
//! their index is applied.
//!
//! Its disk is a thread of its own ([`RaftStorage`] there): the driver queues each
//! Ready's hard state, snapshot and entries to it and goes on handling messages,
//! proposals and ticks while it writes; the disk thread writes whatever queued up during
//! its last fsync with one write and one fsync (group commit, pipelined with the
//! network), and reports back. A message that promises something about the disk waits
//! for every save queued before it: an acknowledgement of entries, and every message
//! while a change of term or vote or a snapshot is being saved. Anything else promises
//! nothing about the disk and goes at once: a leader's Appends and heartbeats (its own
//! disk counts towards a commit only once saved, thesis §10.2.1), and a follower's
//! heartbeat answers (so a read-index round is not held up by the follower's fsync).
//! Snapshots for compaction are built on a thread of their own from
//! [`StateMachine::snapshot_later`], which also writes and syncs the snapshot file
//! ([`prepare_snapshot`]); the disk thread only renames it into place and cuts the log,
//! so the appends queued behind a compaction do not wait for a large state's write.
//!
//! A snapshot installed from the leader is restored on a thread of its own too: the
//! driver hands its state machine over with the blob and goes on answering heartbeats
//! and votes, taking entries and saving them. Meanwhile nothing is applied (committed
//! entries queue behind the restore, in order, and reads wait for them), and every
//! acknowledgement waits for the restore as well as for its save, so the leader hears
//! the snapshot acknowledged only once it is both on disk and in the state machine. A
//! crash in between restarts from the disk, which has either the snapshot or the log
//! before it (restored at start, before the driver runs).
//!
//! Other threads talk to it through a [`RaftHandle`]: proposals and reads go in a
//! channel, their outcomes come back on one-shot channels; [`RaftHandle::status`] is a
//! copy the driver refreshes after every round. The driver drains every input waiting
//! before it acts, so whatever arrived meanwhile shares one round (and one Append).
//!
//! A proposal's fate is known exactly: applied (with the state machine's result), or
//! lost with its leader's term (an entry of another term was applied at its index: it
//! will never apply, so retrying it is safe), or unknown (a snapshot from the leader
//! covered it before it applied here).

use super::disk::{prepare_snapshot, RaftStorage};
use super::message::{encode, Body, Entry, Message, ReplicaId, Snapshot};
use super::replica::RaftCore;
use super::types::{Config, HardState, RaftError, Ready, Role, Stored};
use crate::log_info;
use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// What the replicated log drives: commands in, results out, and a blob for snapshots.
pub trait StateMachine: Send + 'static {
    /// Applies the committed command at `index`; returns the result its proposer gets.
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8>;
    /// The whole state, for a snapshot.
    fn snapshot(&mut self) -> Vec<u8>;
    /// The whole state as of now, as work the driver runs on another thread while it
    /// goes on applying entries (so a large state does not stall the cluster). Its blob
    /// must be one from which [`StateMachine::restore`], then applying every entry after
    /// now, gives this state machine's state. The default builds it here with
    /// [`StateMachine::snapshot`] (on the driver's thread) and hands it over.
    fn snapshot_later(&mut self) -> SnapshotTask {
        let data = self.snapshot();
        Box::new(move || data)
    }
    /// Replaces the whole state by a snapshot's. Called on a thread of the driver's (the
    /// state machine is handed over to it and back), so a large state does not stall the
    /// driver; nothing else is called meanwhile.
    ///
    /// # Errors
    /// When `data` is not a snapshot this state machine wrote.
    fn restore(&mut self, data: &[u8]) -> io::Result<()>;
}

/// Builds a snapshot's blob, on a thread of the driver's (see
/// [`StateMachine::snapshot_later`]).
pub type SnapshotTask = Box<dyn FnOnce() -> Vec<u8> + Send>;

/// Carries encoded messages to peers. Sending may lose them (Raft resends); it must not
/// block for long, since the driver's thread calls it.
pub trait Transport: Send + 'static {
    /// Sends one encoded [`Message`] to `to`.
    fn send(&mut self, to: ReplicaId, message: Vec<u8>);
}

/// How a driver runs.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The core's settings (ids, election and heartbeat ticks, seed).
    pub raft: Config,
    /// One tick of the core's clock.
    pub tick: Duration,
    /// Take a snapshot once this many entries are applied past the last one (0: never).
    pub compact_every: u64,
}

/// What became of a proposal or a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; the state machine's result (for a read: empty, and the state machine has
    /// applied everything the read must see).
    Done(Vec<u8>),
    /// Not taken: this replica does not lead; the leader it knows of.
    NotLeader(Option<ReplicaId>),
    /// Taken, and certainly never to be applied (its leader lost its term, or a read could
    /// not be confirmed): safe to retry.
    Lost,
    /// Taken, and covered by a snapshot before it applied here: it may have taken effect.
    Unknown,
    /// The driver has stopped.
    Stopped,
}

/// A copy of the replica's state, refreshed after every round of the driver.
#[derive(Debug, Clone)]
pub struct Status {
    /// This replica's id.
    pub id: ReplicaId,
    /// Its role.
    pub role: Role,
    /// Its term.
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<ReplicaId>,
    /// Its commit index.
    pub commit: u64,
    /// The index its state machine has applied.
    pub applied: u64,
    /// Its last log index.
    pub last_index: u64,
    /// Its snapshot's index.
    pub snapshot: u64,
    /// On a leader, each peer's match index.
    pub matched: Vec<(ReplicaId, u64)>,
    /// Set when the driver stopped on a storage failure.
    pub failed: Option<String>,
    /// What this replica has done since it started, for counting the cost of a write.
    pub counts: Counts,
}

/// Counters since the driver started: disk syncs, messages sent by kind, proposals and
/// reads taken, read-index rounds started. Per acknowledged write, the differences
/// across a run show what the write path costs without timing anything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Disk syncs (log appends, hard states, snapshots).
    pub fsyncs: u64,
    /// Appends sent (with entries, or empty to carry the commit index).
    pub appends: u64,
    /// Heartbeats sent (on the timer, or to confirm reads).
    pub heartbeats: u64,
    /// Answers to Appends and heartbeats sent.
    pub answers: u64,
    /// Every other message sent (votes, snapshots, transfers).
    pub other: u64,
    /// Readys carried out with entries or a snapshot to persist.
    pub rounds: u64,
    /// Proposals taken as leader.
    pub proposals: u64,
    /// Reads asked as leader.
    pub reads: u64,
    /// Read-index rounds started.
    pub read_rounds: u64,
}

enum Input {
    Message(Message),
    Propose(Vec<Vec<u8>>, Vec<Sender<Outcome>>),
    Read(Sender<Outcome>),
    Transfer(Sender<bool>),
    Stop,
}

/// Talks to a running driver; cheap to clone.
#[derive(Clone)]
pub struct RaftHandle {
    tx: Sender<Input>,
    status: Arc<Mutex<Status>>,
}

/// A running driver: its handle, and the thread to join.
pub struct Driver {
    handle: RaftHandle,
    thread: Option<JoinHandle<()>>,
}

impl Driver {
    /// Opens the storage in `dir`, restores `sm` from its snapshot, and starts the driver's
    /// thread.
    ///
    /// # Errors
    /// When the storage cannot be opened (damaged, unreadable), the snapshot does not
    /// restore, or the configuration is refused.
    pub fn start<S: StateMachine, T: Transport>(
        cfg: DriverConfig,
        dir: &Path,
        sm: S,
        transport: T,
    ) -> io::Result<Driver> {
        let (storage, stored) = RaftStorage::open(dir)?;
        Driver::start_on(cfg, storage, stored, sm, transport)
    }

    /// [`Driver::start`] on an opened `disk` that read back `stored` (the tests' disk
    /// holds its saves back until the test lets them through).
    pub(super) fn start_on<S: StateMachine, T: Transport, D: Disk>(
        cfg: DriverConfig,
        disk: D,
        stored: Stored,
        mut sm: S,
        transport: T,
    ) -> io::Result<Driver> {
        if stored.snapshot.index > 0 {
            sm.restore(&stored.snapshot.data)?;
        }
        let hard = stored.hard_state;
        let core = RaftCore::restart(cfg.raft.clone(), stored)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let status = Arc::new(Mutex::new(status_of(
            &core,
            core.applied_index(),
            None,
            Counts::default(),
        )));
        let (tx, rx) = bounded(8192);
        let handle = RaftHandle {
            tx,
            status: Arc::clone(&status),
        };
        // Unbounded both ways: the driver never blocks on its disk, nor the disk on the
        // driver (what queues is bounded by the clients waiting and `max_inflight`).
        let (jobs, jobs_rx) = unbounded();
        let (done_tx, done_rx) = unbounded();
        let disk_done = done_tx.clone();
        let dir = disk.dir();
        let disk = thread::Builder::new()
            .name("raft-disk".into())
            .spawn(move || disk_loop(disk, &jobs_rx, &disk_done))?;
        let (restored_tx, restored_rx) = bounded(1);
        let mut run = Run {
            applied: core.applied_index(),
            core,
            sm: Some(sm),
            work: VecDeque::new(),
            restoring: None,
            restored_tx,
            restores: 0,
            restored: 0,
            transport,
            status,
            waiting: BTreeMap::new(),
            reads: BTreeMap::new(),
            confirmed: Vec::new(),
            next_ctx: 0,
            transfer: None,
            counted: Counts::default(),
            proposals: (Vec::new(), Vec::new()),
            disk: Some((jobs, disk)),
            dir,
            done_tx,
            done_rx,
            snapshotting: None,
            queued: 0,
            saved: 0,
            barrier: 0,
            held: VecDeque::new(),
            queued_term_vote: (hard.term, hard.vote),
            syncs: 0,
            cfg,
        };
        let thread = thread::Builder::new()
            .name("raft-driver".into())
            .spawn(move || run.main(&rx, &restored_rx))?;
        Ok(Driver {
            handle,
            thread: Some(thread),
        })
    }

    /// A handle to the running driver.
    pub fn handle(&self) -> &RaftHandle {
        &self.handle
    }

    /// Stops the driver and joins its thread (pending proposals get [`Outcome::Stopped`]).
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let _ = self.handle.tx.send(Input::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn oneshot() -> (Sender<Outcome>, Receiver<Outcome>) {
    bounded(1)
}

impl RaftHandle {
    /// Hands a peer's message to the driver. Blocks while the driver's queue is full: a
    /// fast peer is slowed to the disk's pace.
    pub fn deliver(&self, message: Message) {
        let _ = self.tx.send(Input::Message(message));
    }

    /// Proposes `commands` together, in order: the driver takes all of them or none (no
    /// other input comes between), so if one is lost every later one is lost too (an
    /// index's entry of a later term replaces it, and terms only grow along the log).
    pub fn propose_batch(&self, commands: Vec<Vec<u8>>) -> Vec<Receiver<Outcome>> {
        let (txs, rxs): (Vec<_>, Vec<_>) = commands.iter().map(|_| oneshot()).unzip();
        if let Err(e) = self.tx.send(Input::Propose(commands, txs)) {
            if let Input::Propose(_, txs) = e.0 {
                for tx in txs {
                    let _ = tx.send(Outcome::Stopped);
                }
            }
        }
        rxs
    }

    /// Proposes `command`; the outcome comes on the returned channel.
    pub fn propose(&self, command: Vec<u8>) -> Receiver<Outcome> {
        self.propose_batch(vec![command])
            .pop()
            .expect("one receiver")
    }

    /// Asks for a linearizable read: [`Outcome::Done`] once this replica has confirmed it
    /// leads and its state machine has applied everything committed when it was asked.
    pub fn read(&self) -> Receiver<Outcome> {
        let (tx, rx) = oneshot();
        if let Err(e) = self.tx.send(Input::Read(tx)) {
            if let Input::Read(tx) = e.0 {
                let _ = tx.send(Outcome::Stopped);
            }
        }
        rx
    }

    /// On a leader: hands leadership to the most up-to-date peer and waits (up to
    /// `within`) until this replica no longer leads. True when it does not lead (any more).
    pub fn transfer_leadership(&self, within: Duration) -> bool {
        let (tx, rx) = bounded(1);
        if self.tx.send(Input::Transfer(tx)).is_err() {
            return true;
        }
        rx.recv_timeout(within).unwrap_or(false)
    }

    /// The replica's state after the driver's last round.
    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn status_of(core: &RaftCore, applied: u64, failed: Option<String>, counts: Counts) -> Status {
    let mut matched = Vec::new();
    for &p in &core.cfg.members {
        if let Some(m) = core.match_index(p) {
            matched.push((p, m));
        }
    }
    Status {
        id: core.id(),
        role: core.role(),
        term: core.term(),
        leader: core.leader(),
        commit: core.commit_index(),
        applied,
        last_index: core.last_index(),
        snapshot: core.snapshot().index,
        matched,
        failed,
        counts,
    }
}

/// The driver thread's state.
struct Run<S, T> {
    cfg: DriverConfig,
    core: RaftCore,
    /// The state machine; away while a thread restores a snapshot into it.
    sm: Option<S>,
    /// What the state machine is to do, in order, once it is back (nothing waits while
    /// it is here).
    work: VecDeque<Work>,
    /// The thread restoring a snapshot, if one is, and where it hands the state machine
    /// back.
    restoring: Option<JoinHandle<()>>,
    restored_tx: Sender<Restored<S>>,
    /// Snapshots given to the state machine to restore, and restored (numbered from 1).
    restores: u64,
    restored: u64,
    transport: T,
    status: Arc<Mutex<Status>>,
    /// What the state machine has applied (or restored).
    applied: u64,
    /// Proposals by index: their term, and who waits.
    waiting: BTreeMap<u64, (u64, Sender<Outcome>)>,
    /// Reads asked and not yet confirmed, by tag.
    reads: BTreeMap<u64, Sender<Outcome>>,
    /// Reads confirmed at an index not yet applied.
    confirmed: Vec<(u64, Sender<Outcome>)>,
    next_ctx: u64,
    /// A transfer in progress: who waits, and until when.
    transfer: Option<(Sender<bool>, Instant)>,
    /// Messages, rounds, proposals and reads so far (fsyncs and read rounds are added
    /// from the disk thread and the core by `counts`).
    counted: Counts,
    /// Proposals gathered in this round, and who waits for each.
    proposals: (Vec<Vec<u8>>, Vec<Sender<Outcome>>),
    /// The disk thread's queue and the thread (taken when stopping).
    disk: Option<(Sender<DiskJob>, JoinHandle<()>)>,
    /// The storage's directory, where a compaction's snapshot is written ahead.
    dir: PathBuf,
    /// What the disk thread and snapshot threads report.
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    /// The thread building a snapshot, if one is.
    snapshotting: Option<JoinHandle<()>>,
    /// The last save queued, and the last the disk thread has finished (numbered from 1).
    queued: u64,
    saved: u64,
    /// The last save that changes the term or vote or installs a snapshot: until it is
    /// done, every message waits.
    barrier: u64,
    /// Messages waiting for a save or a restore, in the order they were made.
    held: VecDeque<Held>,
    /// The term and vote as of the last save queued.
    queued_term_vote: (u64, Option<ReplicaId>),
    /// Disk syncs, as the disk thread last reported.
    syncs: u64,
}

/// A message that waits: for every save up to `save` and every restore up to `restore`.
struct Held {
    save: u64,
    restore: u64,
    message: Message,
}

/// What the state machine does, in the log's order.
enum Work {
    /// Replace the state by an installed snapshot's (shared with the disk thread saving
    /// it).
    Restore(Arc<Snapshot>),
    /// Apply a committed entry.
    Apply(Entry),
}

/// A restore thread's report: the state machine handed back.
struct Restored<S> {
    sm: S,
    index: u64,
    result: io::Result<()>,
    took: Duration,
}

impl<S: StateMachine, T: Transport> Run<S, T> {
    fn main(&mut self, rx: &Receiver<Input>, restored_rx: &Receiver<Restored<S>>) {
        let mut next_tick = Instant::now() + self.cfg.tick;
        let done_rx = self.done_rx.clone();
        loop {
            let mut ready = Ready::default();
            let wait = next_tick.saturating_duration_since(Instant::now());
            let mut inputs = Vec::new();
            let mut dones = Vec::new();
            let mut restored = None;
            select! {
                recv(rx) -> input => match input {
                    Ok(input) => inputs.push(input),
                    Err(_) => return self.finish(),
                },
                recv(done_rx) -> done => dones.extend(done),
                recv(restored_rx) -> r => restored = r.ok(),
                default(wait) => {}
            }
            // Everything waiting now shares this round.
            inputs.extend(rx.try_iter().take(4096));
            dones.extend(done_rx.try_iter());
            let mut failed = None;
            for done in dones {
                if let Err(why) = self.done(done, &mut ready) {
                    failed = Some(why);
                }
            }
            if let Some(r) = restored.or_else(|| restored_rx.try_recv().ok()) {
                if let Err(why) = self.restored(r) {
                    failed = Some(why);
                }
            }
            let mut stop = false;
            for input in inputs {
                if matches!(input, Input::Stop) {
                    stop = true;
                    break;
                }
                self.input(input, &mut ready);
            }
            self.propose_gathered(&mut ready);
            if Instant::now() >= next_tick {
                self.core.tick(&mut ready);
                next_tick += self.cfg.tick;
                if next_tick < Instant::now() {
                    // Far behind (a stalled thread): do not tick in a burst to catch up.
                    next_tick = Instant::now() + self.cfg.tick;
                }
            }
            if failed.is_none() {
                failed = self.carry_out(ready).err();
            }
            if let Some(e) = failed {
                let why = format!("storage failed: {e}; this replica stops");
                log_info!("raft {}: {why}", self.core.id());
                *self.status.lock().unwrap_or_else(PoisonError::into_inner) =
                    status_of(&self.core, self.applied, Some(why), self.counts());
                return self.finish();
            }
            self.check_transfer();
            *self.status.lock().unwrap_or_else(PoisonError::into_inner) =
                status_of(&self.core, self.applied, None, self.counts());
            if stop {
                return self.finish();
            }
        }
    }

    fn counts(&self) -> Counts {
        Counts {
            fsyncs: self.syncs,
            read_rounds: self.core.read_rounds(),
            ..self.counted
        }
    }

    /// Takes a report of the disk thread or a snapshot thread.
    fn done(&mut self, done: Done, ready: &mut Ready) -> io::Result<()> {
        match done {
            Done::Saved { seq, ack, syncs } => {
                self.saved = seq;
                self.syncs = syncs;
                if let Some((index, term)) = ack {
                    self.core.persisted(index, term, ready);
                }
                self.release_held();
            }
            Done::Compacted { syncs } => self.syncs = syncs,
            Done::Failed(e) => return Err(e),
            Done::Snapshotted {
                index,
                data,
                took,
                prepared,
            } => {
                if let Some(t) = self.snapshotting.take() {
                    let _ = t.join();
                }
                let bytes = data.len();
                // Refused when a snapshot from the leader was installed meanwhile.
                match self.core.compact(index, data) {
                    Ok(snap) => {
                        log_info!(
                            "raft {}: snapshot at {index} ({bytes} bytes) built{} in {} ms \
                             beside the driver; saving it",
                            self.core.id(),
                            if prepared.is_some() {
                                " and written"
                            } else {
                                ""
                            },
                            took.as_millis()
                        );
                        self.queue(DiskJob::Compact(snap, prepared))?;
                    }
                    Err(_) => {
                        if let Some((path, _)) = prepared {
                            let _ = std::fs::remove_file(path);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn queue(&mut self, job: DiskJob) -> io::Result<()> {
        let sent = self.disk.as_ref().map(|(jobs, _)| jobs.send(job));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(io::Error::other("the disk thread has stopped")),
        }
    }

    fn input(&mut self, input: Input, ready: &mut Ready) {
        match input {
            Input::Message(m) => self.core.receive(m, ready),
            Input::Propose(commands, txs) => {
                // Gathered, and proposed together after this round's other inputs.
                self.proposals.0.extend(commands);
                self.proposals.1.extend(txs);
            }
            Input::Read(tx) => {
                self.next_ctx += 1;
                match self.core.read_index(self.next_ctx, ready) {
                    Ok(()) => {
                        self.counted.reads += 1;
                        self.reads.insert(self.next_ctx, tx);
                    }
                    Err(e) => {
                        let _ = tx.send(not_leader(e));
                    }
                }
            }
            Input::Transfer(tx) => {
                if self.core.role() != Role::Leader {
                    let _ = tx.send(true);
                    return;
                }
                let best = self
                    .core
                    .cfg
                    .members
                    .iter()
                    .filter_map(|&p| self.core.match_index(p).map(|m| (m, p)))
                    .max();
                match best.map(|(_, p)| self.core.transfer_leadership(p, ready)) {
                    Some(Ok(())) => {
                        let ticks = self.core.cfg.election_ticks * 2;
                        let until = Instant::now() + self.cfg.tick * ticks;
                        self.transfer = Some((tx, until));
                    }
                    _ => {
                        let _ = tx.send(false);
                    }
                }
            }
            Input::Stop => {}
        }
    }

    /// Proposes every command gathered this round as one batch: one Append per follower
    /// for all of them.
    fn propose_gathered(&mut self, ready: &mut Ready) {
        let (commands, txs) = std::mem::take(&mut self.proposals);
        if commands.is_empty() {
            return;
        }
        match self.core.propose_all(commands, ready) {
            Ok((first, term)) => {
                self.counted.proposals += txs.len() as u64;
                for (index, tx) in (first..).zip(txs) {
                    self.waiting.insert(index, (term, tx));
                }
            }
            Err(e) => {
                for tx in txs {
                    let _ = tx.send(not_leader(e.clone()));
                }
            }
        }
    }

    fn check_transfer(&mut self) {
        let done = match &self.transfer {
            Some((_, until)) => self.core.role() != Role::Leader || Instant::now() >= *until,
            None => false,
        };
        if done {
            let (tx, _) = self.transfer.take().expect("checked above");
            let _ = tx.send(self.core.role() != Role::Leader);
        }
    }

    /// Queues the persisting, sends what may go now (holding the rest for their save, or
    /// their restore), then applies.
    fn carry_out(&mut self, mut ready: Ready) -> io::Result<()> {
        let term_vote = ready.hard_state.map(|h| (h.term, h.vote));
        let changes = term_vote.is_some_and(|tv| tv != self.queued_term_vote);
        // Shared by the disk thread (saving it) and the restore thread (restoring it).
        let snapshot = ready.snapshot.take().map(Arc::new);
        if let Some(snap) = &snapshot {
            // Restored beside the driver, saved on the disk thread: nothing is applied
            // before the restore is done (the entries after it queue behind it), nor
            // acknowledged before both are (below).
            self.work.push_back(Work::Restore(Arc::clone(snap)));
            self.restores += 1;
        }
        if changes || snapshot.is_some() || !ready.entries.is_empty() {
            self.queued += 1;
            if changes || snapshot.is_some() {
                self.barrier = self.queued;
            }
            if let Some(tv) = term_vote {
                self.queued_term_vote = tv;
            }
            if snapshot.is_some() || !ready.entries.is_empty() {
                self.counted.rounds += 1;
            }
            self.queue(DiskJob::Save {
                seq: self.queued,
                hard_state: ready.hard_state.filter(|_| changes),
                snapshot,
                entries: std::mem::take(&mut ready.entries),
            })?;
        }
        // While a term, a vote or a snapshot is being saved, every message may depend on
        // it; else only an acknowledgement of entries does (a duplicate Append is
        // acknowledged with no entries of its own, on the strength of earlier saves). An
        // acknowledgement also waits for a snapshot being restored: the leader may count
        // this replica as holding the snapshot only once its state machine does.
        let hold_all = self.barrier > self.saved;
        for m in std::mem::take(&mut ready.messages) {
            let promise = matches!(m.body, Body::AppendResp { .. });
            let save = hold_all || (promise && self.queued > self.saved);
            let restore = promise && self.restores > self.restored;
            if save || restore {
                self.held.push_back(Held {
                    save: if save { self.queued } else { 0 },
                    restore: if restore { self.restores } else { 0 },
                    message: m,
                });
            } else {
                self.send_one(m);
            }
        }
        self.work.extend(ready.committed.drain(..).map(Work::Apply));
        self.run_machine();
        for r in ready.reads.drain(..) {
            if let Some(tx) = self.reads.remove(&r.ctx) {
                self.confirmed.push((r.index, tx));
            }
        }
        for ctx in ready.failed_reads.drain(..) {
            if let Some(tx) = self.reads.remove(&ctx) {
                let _ = tx.send(Outcome::Lost);
            }
        }
        self.answer_reads();
        self.maybe_compact();
        Ok(())
    }

    /// Has the state machine do the work queued for it while it is here: applies
    /// entries, and hands it to a thread of its own for a restore (the work after it
    /// waits for it to come back).
    fn run_machine(&mut self) {
        while self.sm.is_some() {
            let Some(work) = self.work.pop_front() else {
                return;
            };
            match work {
                Work::Apply(e) => self.apply(&e),
                Work::Restore(snap) => self.restore_beside(snap),
            }
        }
    }

    fn apply(&mut self, e: &Entry) {
        let result = match &mut self.sm {
            Some(sm) if !e.data.is_empty() => sm.apply(e.index, &e.data),
            _ => Vec::new(),
        };
        self.applied = e.index;
        while let Some(entry) = self.waiting.first_entry() {
            if *entry.key() > e.index {
                break;
            }
            let (index, (term, tx)) = entry.remove_entry();
            let outcome = if index == e.index && term == e.term {
                Outcome::Done(result.clone())
            } else {
                Outcome::Lost
            };
            let _ = tx.send(outcome);
        }
    }

    /// Starts restoring `snap` into the state machine on a thread of its own.
    fn restore_beside(&mut self, snap: Arc<Snapshot>) {
        let mut sm = self.sm.take().expect("called with the state machine here");
        if let Some(t) = self.restoring.take() {
            let _ = t.join(); // it has handed the state machine back: it is ending
        }
        let back = self.restored_tx.clone();
        let started = Instant::now();
        let spawned = thread::Builder::new()
            .name("raft-restore".into())
            .spawn(move || {
                // A panic stops the driver, as one on its own thread would.
                let result = panic::catch_unwind(AssertUnwindSafe(|| sm.restore(&snap.data)))
                    .unwrap_or_else(|_| Err(io::Error::other("the state machine panicked")));
                let took = started.elapsed();
                let index = snap.index;
                let _ = back.send(Restored {
                    sm,
                    index,
                    result,
                    took,
                });
            });
        match spawned {
            Ok(t) => self.restoring = Some(t),
            Err(e) => {
                // No thread to be had: the driver cannot go on without its state machine.
                let _ = self.done_tx.send(Done::Failed(io::Error::other(format!(
                    "cannot start a thread to restore a snapshot: {e}"
                ))));
            }
        }
    }

    /// Takes the state machine back from a restore, then does the work that waited.
    fn restored(&mut self, r: Restored<S>) -> io::Result<()> {
        let Restored {
            sm,
            index,
            result,
            took,
        } = r;
        self.sm = Some(sm);
        result.map_err(|e| {
            io::Error::new(e.kind(), format!("restoring the snapshot at {index}: {e}"))
        })?;
        log_info!(
            "raft {}: snapshot at {index} restored in {} ms beside the driver",
            self.core.id(),
            took.as_millis()
        );
        self.restored += 1;
        self.applied = index;
        let covered: Vec<u64> = self.waiting.range(..=index).map(|(&i, _)| i).collect();
        for i in covered {
            let (_, tx) = self.waiting.remove(&i).expect("listed");
            let _ = tx.send(Outcome::Unknown);
        }
        self.release_held();
        self.run_machine();
        self.answer_reads();
        self.maybe_compact();
        Ok(())
    }

    /// Sends every held message whose saves and restores are done, in order.
    fn release_held(&mut self) {
        let (saved, restored) = (self.saved, self.restored);
        let mut keep = VecDeque::new();
        for h in std::mem::take(&mut self.held) {
            if h.save <= saved && h.restore <= restored {
                self.send_one(h.message);
            } else {
                keep.push_back(h);
            }
        }
        self.held = keep;
    }

    /// Answers the confirmed reads whose index the state machine has applied.
    fn answer_reads(&mut self) {
        let applied = self.applied;
        self.confirmed.retain(|(index, tx)| {
            if *index <= applied {
                let _ = tx.send(Outcome::Done(Vec::new()));
                false
            } else {
                true
            }
        });
    }

    fn send_one(&mut self, m: Message) {
        let c = &mut self.counted;
        match m.body {
            Body::Append { .. } => c.appends += 1,
            Body::Heartbeat { .. } => c.heartbeats += 1,
            Body::AppendResp { .. } | Body::HeartbeatResp { .. } => c.answers += 1,
            _ => c.other += 1,
        }
        self.transport.send(m.to, encode(&m));
    }

    /// Starts building a snapshot beside the driver once `compact_every` entries are
    /// applied past the last one (and no build is under way).
    fn maybe_compact(&mut self) {
        let every = self.cfg.compact_every;
        let Some(sm) = self.sm.as_mut() else {
            return; // restoring
        };
        if every == 0
            || self.snapshotting.is_some()
            || self.applied < self.core.snapshot().index + every
        {
            return;
        }
        let index = self.applied;
        let started = Instant::now();
        let task = sm.snapshot_later();
        let done = self.done_tx.clone();
        // The file is written on the same thread, so the disk thread only renames it.
        let prepare = self
            .core
            .term_at(index)
            .map(|term| (self.dir.clone(), term));
        let id = self.core.id();
        let spawned = thread::Builder::new()
            .name("raft-snapshot".into())
            .spawn(move || {
                let data = task();
                let prepared = prepare.and_then(|(dir, term)| {
                    match prepare_snapshot(&dir, index, term, &data) {
                        Ok(path) => Some((path, term)),
                        Err(e) => {
                            // The disk thread writes it then, as it would a leader's.
                            log_info!("raft {id}: cannot write the snapshot ahead: {e}");
                            None
                        }
                    }
                });
                let took = started.elapsed();
                let _ = done.send(Done::Snapshotted {
                    index,
                    data,
                    took,
                    prepared,
                });
            });
        match spawned {
            Ok(t) => self.snapshotting = Some(t),
            Err(e) => log_info!("raft {}: cannot start a snapshot: {e}", self.core.id()),
        }
    }

    fn finish(&mut self) {
        // The disk thread finishes what is queued, then ends; a snapshot build ends on
        // its own (its report goes nowhere).
        if let Some((jobs, disk)) = self.disk.take() {
            drop(jobs);
            let _ = disk.join();
        }
        if let Some(t) = self.snapshotting.take() {
            let _ = t.join();
        }
        if let Some(t) = self.restoring.take() {
            let _ = t.join();
        }
        for (_, (_, tx)) in std::mem::take(&mut self.waiting) {
            let _ = tx.send(Outcome::Stopped);
        }
        for (_, tx) in std::mem::take(&mut self.reads) {
            let _ = tx.send(Outcome::Stopped);
        }
        for (_, tx) in std::mem::take(&mut self.confirmed) {
            let _ = tx.send(Outcome::Stopped);
        }
    }
}

/// A save for the disk thread, in the order queued.
enum DiskJob {
    /// A Ready's hard state (only when its term or vote changed), snapshot and entries.
    Save {
        seq: u64,
        hard_state: Option<HardState>,
        snapshot: Option<Arc<Snapshot>>,
        entries: Vec<Entry>,
    },
    /// A snapshot of this replica's own state machine: the log up to it is cut. With the
    /// file [`prepare_snapshot`] wrote for it (its path and the term it wrote), which is
    /// then only renamed into place.
    Compact(Snapshot, Option<(PathBuf, u64)>),
}

/// What the disk thread and the snapshot threads report.
enum Done {
    /// Every save up to `seq` is on disk; `ack` is the last entry (or snapshot) written.
    Saved {
        seq: u64,
        ack: Option<(u64, u64)>,
        syncs: u64,
    },
    /// A compaction's snapshot is saved.
    Compacted { syncs: u64 },
    /// A save failed: what is on disk is unknown, and the replica must stop.
    Failed(io::Error),
    /// A snapshot's blob at `index` is built (and its file written, if `prepared`).
    Snapshotted {
        index: u64,
        data: Vec<u8>,
        took: Duration,
        prepared: Option<(PathBuf, u64)>,
    },
}

/// What the disk thread saves to: a [`RaftStorage`] (the tests' wraps one, holding its
/// saves back until the test lets them through).
pub(super) trait Disk: Send + 'static {
    /// [`RaftStorage::save_parts`].
    ///
    /// # Errors
    /// When a write or an fsync fails.
    fn save(
        &mut self,
        hard_state: Option<HardState>,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
    ) -> io::Result<Option<(u64, u64)>>;
    /// [`RaftStorage::save_snapshot`].
    ///
    /// # Errors
    /// When a write or an fsync fails.
    fn save_snapshot(&mut self, snap: &Snapshot) -> io::Result<()>;
    /// [`RaftStorage::save_prepared_snapshot`].
    ///
    /// # Errors
    /// When the rename or the log's rewrite fails.
    fn save_prepared_snapshot(&mut self, snap: &Snapshot, prepared: &Path) -> io::Result<()>;
    /// The directory snapshot files may be written to ahead ([`prepare_snapshot`]).
    fn dir(&self) -> PathBuf;
    /// [`RaftStorage::syncs`].
    fn syncs(&self) -> u64;
}

impl Disk for RaftStorage {
    fn save(
        &mut self,
        hard_state: Option<HardState>,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
    ) -> io::Result<Option<(u64, u64)>> {
        self.save_parts(hard_state, snapshot, entries)
    }
    fn save_snapshot(&mut self, snap: &Snapshot) -> io::Result<()> {
        RaftStorage::save_snapshot(self, snap)
    }
    fn save_prepared_snapshot(&mut self, snap: &Snapshot, prepared: &Path) -> io::Result<()> {
        RaftStorage::save_prepared_snapshot(self, snap, prepared)
    }
    fn dir(&self) -> PathBuf {
        RaftStorage::dir(self).to_owned()
    }
    fn syncs(&self) -> u64 {
        RaftStorage::syncs(self)
    }
}

/// Consecutive saves the disk thread writes together.
#[derive(Default)]
struct Batch {
    /// The last save in it.
    seq: u64,
    hard_state: Option<HardState>,
    snapshot: Option<Arc<Snapshot>>,
    entries: Vec<Entry>,
}

/// The disk thread: takes every save queued, writes consecutive ones together (their
/// entries with one write and one fsync), and reports each batch done. Saves are done in
/// the order queued, and never merged across one that replaces entries written before
/// (a snapshot, a compaction, entries that overwrite a conflicting tail): what is on
/// disk after any crash is the state after some prefix of the saves.
fn disk_loop<D: Disk>(mut storage: D, jobs: &Receiver<DiskJob>, done: &Sender<Done>) {
    while let Ok(first) = jobs.recv() {
        let mut batch: Option<Batch> = None;
        for job in std::iter::once(first).chain(jobs.try_iter()) {
            let result = match job {
                DiskJob::Save {
                    seq,
                    hard_state,
                    snapshot,
                    entries,
                } => {
                    let overwrites = snapshot.is_some()
                        || batch.as_ref().is_some_and(|b| {
                            let last = b.entries.last().map_or(0, |e| e.index);
                            entries.first().is_some_and(|e| e.index <= last)
                        });
                    let flushed = if overwrites {
                        flush(&mut storage, batch.take(), done)
                    } else {
                        Ok(())
                    };
                    let b = batch.get_or_insert_with(Default::default);
                    b.seq = seq;
                    if hard_state.is_some() {
                        b.hard_state = hard_state;
                    }
                    if snapshot.is_some() {
                        b.snapshot = snapshot;
                    }
                    b.entries.extend(entries);
                    flushed
                }
                DiskJob::Compact(snap, prepared) => flush(&mut storage, batch.take(), done)
                    .and_then(|()| match prepared {
                        Some((path, term)) if term == snap.term => {
                            storage.save_prepared_snapshot(&snap, &path)
                        }
                        other => {
                            if let Some((path, _)) = other {
                                let _ = std::fs::remove_file(path);
                            }
                            storage.save_snapshot(&snap)
                        }
                    })
                    .map(|()| {
                        let _ = done.send(Done::Compacted {
                            syncs: storage.syncs(),
                        });
                    }),
            };
            if let Err(e) = result {
                let _ = done.send(Done::Failed(e));
                return;
            }
        }
        if let Err(e) = flush(&mut storage, batch, done) {
            let _ = done.send(Done::Failed(e));
            return;
        }
    }
}

fn flush<D: Disk>(storage: &mut D, batch: Option<Batch>, done: &Sender<Done>) -> io::Result<()> {
    if let Some(b) = batch {
        let ack = storage.save(b.hard_state, b.snapshot.as_deref(), &b.entries)?;
        let _ = done.send(Done::Saved {
            seq: b.seq,
            ack,
            syncs: storage.syncs(),
        });
    }
    Ok(())
}

fn not_leader(e: RaftError) -> Outcome {
    match e {
        RaftError::NotLeader { leader } => Outcome::NotLeader(leader),
        // During a transfer: the new leader is about to be elected; the caller retries.
        _ => Outcome::NotLeader(None),
    }
}
