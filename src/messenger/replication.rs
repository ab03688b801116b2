//! One server of the cluster: its state, its log, its role, and its links to the others.
//! The rules it follows are written out in the [module documentation](super); the
//! constants below are their timing.
//!
//! Threads: one link thread per peer dials it and writes every message for it (records,
//! acknowledgements, heartbeats, fetch answers), pulling from shared state under the one
//! lock; the inbound link from each peer is served on that connection's own thread; a
//! ticker turns silences into failures, drops members that stopped acknowledging, and
//! re-evaluates the role. Client connections are in [`super::server`].

use super::log::{decode_snapshot, encode_snapshot, Disk, Pos, Record, COMPACT_AFTER};
use super::peer::{PeerMsg, Role, Standing, Status};
use super::protocol::Delivery;
use super::server::ClientEntry;
use super::state::{Change, State};
use crate::framing::{encode_frame, FrameError, FrameReader, Framing, Limits};
use crate::server::{Connection, HandlerError};
use crate::{log_debug, log_info};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Every link carries a heartbeat at least this often.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(100);
/// A peer not heard from for this long is down (a closed link makes it down at once).
pub const DOWN_AFTER: Duration = Duration::from_millis(500);
/// A member that has not acknowledged a record this long after it was appended is no
/// longer waited for.
pub const ACK_TIMEOUT: Duration = Duration::from_millis(1000);
/// How often roles and failures are re-evaluated.
const TICK: Duration = Duration::from_millis(20);
/// A tick this late means the whole process was stalled (stopped, swapped out): long
/// enough, with [`HEARTBEAT_EVERY`] before it, for the others to have seen [`DOWN_AFTER`]
/// of silence only if it is more than this.
pub const STALL: Duration = Duration::from_millis(300);
/// A candidate asks again if a FETCH goes unanswered this long.
const FETCH_RETRY: Duration = Duration::from_millis(1000);
/// A backup repeats a NEED for the same position at most this often.
const NEED_RETRY: Duration = Duration::from_millis(200);
const REDIAL_EVERY: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// Writes on a link, and silences on an inbound link, longer than this end it.
const LINK_TIMEOUT: Duration = Duration::from_secs(2);
/// Records kept in memory to catch a peer up; one further behind gets a snapshot.
const WINDOW: usize = 100_000;
/// Records per REPLICATE frame.
const BATCH: usize = 4096;
/// Largest peer frame (a snapshot).
const PEER_MAX_FRAME: usize = 1 << 30;

/// How a server is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// This server's id: its index in `peers`.
    pub id: usize,
    /// Every server's address, by id (clients and peers use the same port).
    pub peers: Vec<SocketAddr>,
    /// Where the snapshot and the change log live.
    pub data_dir: PathBuf,
    /// Fsync the log before a change counts as durable here (otherwise it is written to
    /// the OS, which survives a killed process but not a power cut).
    pub fsync: bool,
    /// Snapshot the state and empty the log after this many records
    /// ([`COMPACT_AFTER`] by default).
    pub compact_after: u64,
}

impl Options {
    /// Server `id` of `peers`, keeping its data in `data_dir`, with fsync and the default
    /// compaction threshold.
    pub fn new(id: usize, peers: Vec<SocketAddr>, data_dir: PathBuf) -> Options {
        Options {
            id,
            peers,
            data_dir,
            fsync: true,
            compact_after: COMPACT_AFTER,
        }
    }
}

/// What the primary streams to one peer next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// Its position is not known yet (no heartbeat since the link came up).
    Unknown,
    /// Records from this sequence number on.
    From(u64),
    /// A whole snapshot: its log does not continue ours.
    Snapshot,
}

/// This server's view of one peer.
struct Peer {
    /// When a frame last arrived on its inbound link; `None`: down.
    heard: Option<Instant>,
    /// The last dial failed.
    refused: bool,
    /// Known down since start: its link closed or it went silent.
    was_down: bool,
    /// Its last heartbeat.
    status: Option<Status>,
    /// Generation of its current inbound link: frames from an older link (and its end)
    /// are ignored.
    inbound: u64,
    /// The current inbound link, to close it after a stall.
    link: Option<Arc<TcpStream>>,
    /// The mark of its last heartbeat taken in, echoed back to it (0: none since its link
    /// came up or this server stalled).
    echo: u64,
    // As candidate:
    /// The position last asked about (FETCH), and when.
    asked: Option<(Pos, Instant)>,
    /// The position it last answered it holds nothing beyond.
    confirmed: Option<Pos>,
    // As primary:
    feed: Feed,
    acked: u64,
    /// Commits wait for its acknowledgements.
    member: bool,
    /// The mark (`Inner::version`) from which heartbeats tell it that it is excluded. Until
    /// it echoes one, while it is up, it may still believe it holds every committed change,
    /// so commits wait for it all the same (see `recompute_commit`).
    excluded: u64,
    /// Encoded messages for the link thread to send.
    control: Vec<Vec<u8>>,
}

impl Peer {
    fn new() -> Peer {
        Peer {
            heard: None,
            refused: false,
            was_down: false,
            status: None,
            inbound: 0,
            link: None,
            echo: 0,
            asked: None,
            confirmed: None,
            feed: Feed::Unknown,
            acked: 0,
            member: false,
            excluded: 0,
            control: Vec::new(),
        }
    }
}

/// A record kept in memory.
struct Entry {
    pos: Pos,
    at: Instant,
    change: Vec<u8>,
}

/// Everything behind the node's one lock.
pub(super) struct Inner {
    pub(super) role: Role,
    /// The highest epoch accepted from a primary (or started as one).
    pub(super) epoch: u64,
    /// The highest epoch heard of.
    max_epoch: u64,
    /// As primary: the sequence number of this term's first record.
    takeover: u64,
    primary_since: Instant,
    pub(super) state: State,
    pub(super) last: Pos,
    /// Records `base.seq + 1 ..= last.seq`, contiguous.
    window: VecDeque<Entry>,
    base: Pos,
    /// Records up to here are durable on this server.
    durable: u64,
    /// As primary: records up to here are durable on this server and every member.
    pub(super) committed: u64,
    /// This server holds every committed change.
    in_sync: bool,
    peers: Vec<Peer>,
    pub(super) clients: HashMap<u64, ClientEntry>,
    pub(super) sessions: HashMap<String, u64>,
    /// As backup: the last NEED sent.
    need: Option<(Pos, Instant)>,
    /// As backup: the last acknowledgement, repeated on a new link.
    last_ack: Option<(u64, u64)>,
    /// Bumped whenever what heartbeats say changes, so links send one at once; sent as
    /// their `mark`. Starts at the wall clock in nanoseconds, so a restarted server's marks
    /// are above its previous life's and a peer's stale echo never passes for a new one.
    version: u64,
    /// Start, or the end of the last stall: peers not heard from since may be up.
    started: Instant,
    /// When the ticker last ran; a primary whose ticker is late advances no commit.
    last_tick: Instant,
    pub(super) stopping: bool,
}

impl Inner {
    fn epoch_at(&self, seq: u64) -> Option<u64> {
        if seq == self.base.seq {
            return Some(self.base.epoch);
        }
        self.entry(seq).map(|e| e.pos.epoch)
    }

    fn entry(&self, seq: u64) -> Option<&Entry> {
        if seq <= self.base.seq || seq > self.last.seq {
            return None;
        }
        self.window.get((seq - self.base.seq - 1) as usize)
    }

    /// Whether this log has the record at `pos` (and so everything before it agrees).
    fn holds(&self, pos: Pos) -> bool {
        self.epoch_at(pos.seq) == Some(pos.epoch)
    }

    /// Up to `max` records after `seq` (which must be at or after `base`).
    fn records_after(&self, seq: u64, max: usize) -> Vec<Record> {
        let from = (seq - self.base.seq) as usize;
        self.window
            .range(from.min(self.window.len())..)
            .take(max)
            .map(|e| Record {
                pos: e.pos,
                change: e.change.clone(),
            })
            .collect()
    }

    fn push(&mut self, pos: Pos, change: Vec<u8>) {
        self.window.push_back(Entry {
            pos,
            at: Instant::now(),
            change,
        });
        self.last = pos;
        while self.window.len() > WINDOW {
            if let Some(e) = self.window.pop_front() {
                self.base = e.pos;
            }
        }
    }

    fn up(&self, j: usize, now: Instant) -> bool {
        let p = &self.peers[j];
        p.status.is_some() && p.heard.is_some_and(|t| now.duration_since(t) < DOWN_AFTER)
    }

    /// Not known to be down: up, or not heard from yet during the first [`DOWN_AFTER`]
    /// after start, unless a dial was refused or a link from it closed.
    fn maybe_up(&self, j: usize, now: Instant) -> bool {
        let p = &self.peers[j];
        match p.heard {
            Some(t) => now.duration_since(t) < DOWN_AFTER,
            None => !p.refused && !p.was_down && now.duration_since(self.started) < DOWN_AFTER,
        }
    }

    /// The primary as far as this server knows: itself, or the lowest live peer that
    /// says it is one.
    pub(super) fn known_primary(&self, me: usize) -> Option<usize> {
        if self.role == Role::Primary {
            return Some(me);
        }
        let now = Instant::now();
        (0..self.peers.len()).find(|&j| {
            j != me
                && self.up(j, now)
                && self.peers[j]
                    .status
                    .is_some_and(|s| s.role == Role::Primary)
        })
    }

    fn standing(&self, j: usize) -> Standing {
        let p = &self.peers[j];
        match self.role {
            Role::Primary if !p.member => Standing::Excluded,
            Role::Primary if p.acked >= self.takeover => Standing::InSync,
            Role::Primary => Standing::Member,
            _ => Standing::NotPrimary,
        }
    }

    fn status_for(&self, j: usize) -> Status {
        Status {
            role: self.role,
            epoch: self.epoch,
            last: self.last,
            in_sync: self.in_sync,
            you: self.standing(j),
            mark: self.version,
            echo: self.peers[j].echo,
        }
    }
}

/// One messenger server.
pub struct Node {
    pub(super) id: usize,
    addrs: Vec<SocketAddr>,
    /// The `--peers` list as HELLO carries it.
    cluster: String,
    inner: Mutex<Inner>,
    /// Link threads and the ticker wait on this.
    pub(super) changed: Condvar,
    /// Client outboxes wait on this for commits.
    commits: Condvar,
    disk: Disk,
    compact_after: u64,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The first heartbeat mark of this process's life: above every mark of an earlier life
/// (marks grow by one per change, far slower than nanoseconds).
fn first_mark() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// The smallest epoch above `known` that belongs to server `id` of `n`: epochs are
/// unique to their primary, so two servers never lead the same epoch.
pub fn next_epoch(known: u64, id: u64, n: u64) -> u64 {
    let e = known + 1;
    e + (id + n - e % n) % n
}

/// A storage failure is a crash: the server stops at once rather than acknowledge a change
/// it could not write.
fn fatal(e: &io::Error) -> ! {
    log_info!("messenger: storage failure: {e}; exiting");
    std::process::exit(70);
}

/// Changes from a peer: records following a position, or a whole snapshot.
enum Incoming {
    Records(Pos, Vec<Record>),
    Snapshot(Vec<u8>),
}

impl Node {
    /// Opens the data directory and loads it; returns the node (a backup until the rules
    /// say otherwise) and a one-line report of what was loaded.
    ///
    /// # Errors
    /// When `id` is not an index of `peers`, or the data directory cannot be opened (see
    /// [`Disk::open`]).
    pub fn open(options: &Options) -> io::Result<(Arc<Node>, String)> {
        let n = options.peers.len();
        if options.id >= n {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("--id {} but only {n} peers", options.id),
            ));
        }
        let (disk, loaded) = Disk::open(&options.data_dir, options.fsync)?;
        let report = loaded.to_string();
        let last = loaded.last();
        let now = Instant::now();
        let mut inner = Inner {
            role: Role::Backup,
            epoch: last.epoch,
            max_epoch: last.epoch,
            takeover: 0,
            primary_since: now,
            state: loaded.state,
            last: loaded.base,
            window: VecDeque::new(),
            base: loaded.base,
            durable: last.seq,
            committed: 0,
            in_sync: false,
            peers: (0..n).map(|_| Peer::new()).collect(),
            clients: HashMap::new(),
            sessions: HashMap::new(),
            need: None,
            last_ack: None,
            version: first_mark(),
            started: now,
            last_tick: now,
            stopping: false,
        };
        for r in loaded.records {
            inner.push(r.pos, r.change);
        }
        let cluster = options
            .peers
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let node = Node {
            id: options.id,
            addrs: options.peers.clone(),
            cluster,
            inner: Mutex::new(inner),
            changed: Condvar::new(),
            commits: Condvar::new(),
            disk,
            compact_after: options.compact_after.max(1),
            threads: Mutex::new(Vec::new()),
        };
        Ok((Arc::new(node), report))
    }

    /// Starts the link threads and the ticker.
    ///
    /// # Errors
    /// When a thread cannot be started.
    pub fn start(self: &Arc<Self>) -> io::Result<()> {
        let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        for j in (0..self.addrs.len()).filter(|&j| j != self.id) {
            let node = Arc::clone(self);
            threads.push(
                thread::Builder::new()
                    .name(format!("messenger-{}-link-{j}", self.id))
                    .spawn(move || node.run_link(j))?,
            );
        }
        let node = Arc::clone(self);
        threads.push(
            thread::Builder::new()
                .name(format!("messenger-{}-tick", self.id))
                .spawn(move || node.run_ticker())?,
        );
        Ok(())
    }

    /// Stops serving: closes client connections and wakes every waiting thread. Call it
    /// with the server's shutdown; then [`Node::stop`].
    pub fn begin_stop(&self) {
        let mut inner = self.lock();
        inner.stopping = true;
        for c in inner.clients.values() {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        self.changed.notify_all();
        self.commits.notify_all();
    }

    /// Stops, joins the node's threads and writes out the log.
    pub fn stop(&self) {
        self.begin_stop();
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for t in threads {
            let _ = t.join();
        }
        if let Err(e) = self.disk.sync_to(u64::MAX) {
            log_info!("messenger-{}: final log write failed: {e}", self.id);
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        // Critical sections leave the state consistent before anything that can panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

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
        let delivered = inner.state.apply(pos.seq, change);
        self.disk.append(pos, &bytes);
        inner.push(pos, bytes);
        self.maybe_compact(inner);
        (pos.seq, delivered)
    }

    fn maybe_compact(&self, inner: &mut Inner) {
        if self.disk.since_snapshot() < self.compact_after {
            return;
        }
        let snapshot = encode_snapshot(inner.last, &inner.state);
        if let Err(e) = self.disk.install(&snapshot, inner.last) {
            fatal(&e);
        }
        log_debug!("messenger-{}: compacted the log at {}", self.id, inner.last);
        inner.durable = inner.last.seq;
    }

    /// Takes records that follow `prev` (skipping those already held): `Err` when they do
    /// not continue this log. Returns the sequence number up to which this log is now known
    /// to agree with the sender's: the last record sent, which is not always this log's
    /// last (a suffix the sender does not have may follow it).
    fn accept(&self, inner: &mut Inner, prev: Pos, records: Vec<Record>) -> Result<u64, ()> {
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
            inner.state.apply(r.pos.seq, &change);
            self.disk.append(r.pos, &r.change);
            inner.push(r.pos, r.change);
        }
        self.maybe_compact(inner);
        Ok(inner.last.seq)
    }

    /// Takes records or a snapshot; returns as [`Node::accept`].
    fn take(&self, inner: &mut Inner, incoming: Incoming) -> Result<u64, ()> {
        match incoming {
            Incoming::Records(prev, records) => self.accept(inner, prev, records),
            Incoming::Snapshot(bytes) => {
                let (pos, state) = decode_snapshot(&bytes).map_err(|e| {
                    log_info!("messenger-{}: bad snapshot from a peer: {e}", self.id);
                })?;
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

    /// As primary: admits caught-up peers as members and advances the commit point to what
    /// this server and every member hold durably.
    fn recompute_commit(&self, inner: &mut Inner) {
        let now = Instant::now();
        // A late ticker may mean this process was stalled and its members dropped on stale
        // evidence; nothing is committed until the ticker has ruled on it (see `stalled`).
        let late = now.duration_since(inner.last_tick) > STALL && inner.peers.len() > 1;
        if inner.role != Role::Primary || late {
            return;
        }
        let floor = inner.committed.max(inner.takeover);
        for j in (0..inner.peers.len()).filter(|&j| j != self.id) {
            let ready = inner.up(j, now)
                && inner.peers[j].feed != Feed::Unknown
                && inner.peers[j].acked >= floor;
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
            self.commits.notify_all();
        }
    }

    /// Stops counting peer `j` as a member (if it was one): heartbeats from the next mark on
    /// tell it that it is excluded, and commits go on without it once it has echoed one
    /// or is down.
    fn exclude(&self, inner: &mut Inner, j: usize) {
        inner.version += 1;
        let p = &mut inner.peers[j];
        p.member = false;
        p.excluded = inner.version;
    }

    fn init_feed(&self, inner: &mut Inner, j: usize) {
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

    fn peer_down(&self, inner: &mut Inner, j: usize, why: &str) {
        let p = &mut inner.peers[j];
        p.status = None;
        p.was_down = true;
        // Its next heartbeats come from a new link (or a new life) and echo afresh.
        p.echo = 0;
        // Everything queued for it answered what it sent; a new link starts afresh (our
        // last acknowledgement is repeated on it).
        p.control.clear();
        if p.heard.take().is_some() {
            log_info!("messenger-{}: server {j} is down ({why})", self.id);
        }
        let was_member = p.member;
        p.asked = None;
        p.confirmed = None;
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
    fn settle(&self, mut inner: MutexGuard<'_, Inner>) {
        self.evaluate(&mut inner);
        self.recompute_commit(&mut inner);
        self.changed.notify_all();
        let flush = (inner.durable < inner.last.seq).then_some(inner.last.seq);
        drop(inner);
        if let Some(seq) = flush {
            self.flush_to(seq);
        }
    }

    fn evaluate(&self, inner: &mut Inner) {
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
        let primary_up = others.iter().any(|&j| status(j).role == Role::Primary);
        let someone_in_sync = inner.in_sync || others.iter().any(|&j| status(j).in_sync);
        let all_up = others.len() + 1 == inner.peers.len();
        // Just started, or back from a stall: a peer not heard from yet may be primary.
        let settling = now.duration_since(inner.started) < DOWN_AFTER && !all_up;
        if lower.is_some() || primary_up || settling || !(someone_in_sync || all_up) {
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
                p.control.push(PeerMsg::Fetch { last }.encode());
                p.asked = Some((last, now));
            }
        }
        if !waiting {
            self.become_primary(inner, now);
        }
    }

    /// Enters or leaves candidacy; either way, answers to earlier questions no longer count.
    fn set_candidate(&self, inner: &mut Inner, on: bool) {
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
        let epoch = next_epoch(known, self.id as u64, n);
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

    fn step_down(&self, inner: &mut Inner, why: &str) {
        inner.role = Role::Backup;
        for p in &mut inner.peers {
            p.member = false;
            p.feed = Feed::Unknown;
        }
        for c in inner.clients.values_mut() {
            let _ = c.stream.shutdown(Shutdown::Both);
            c.user = None;
        }
        inner.sessions.clear();
        inner.version += 1;
        log_info!("messenger-{}: stepping down: {why}", self.id);
        self.commits.notify_all();
    }

    /// Waits until record `tag` of `epoch` is committed; false if this server stops being
    /// that epoch's primary first (the client will fail over and resend).
    pub(super) fn wait_commit(&self, epoch: u64, tag: u64) -> bool {
        let mut inner = self.lock();
        loop {
            if inner.stopping || inner.role != Role::Primary || inner.epoch != epoch {
                return false;
            }
            if inner.committed >= tag {
                return true;
            }
            inner = self
                .commits
                .wait_timeout(inner, Duration::from_millis(200))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn run_ticker(self: Arc<Self>) {
        loop {
            let mut inner = self.lock();
            if inner.stopping {
                return;
            }
            let now = Instant::now();
            // Alone, nobody can have taken over during a stall.
            if now.duration_since(inner.last_tick) > STALL && inner.peers.len() > 1 {
                self.stalled(&mut inner, now);
            }
            inner.last_tick = now;
            for j in (0..inner.peers.len()).filter(|&j| j != self.id) {
                if inner.peers[j]
                    .heard
                    .is_some_and(|t| now.duration_since(t) >= DOWN_AFTER)
                {
                    self.peer_down(&mut inner, j, "silent");
                }
                let p = &inner.peers[j];
                if inner.role != Role::Primary || !p.member || p.acked >= inner.last.seq {
                    continue;
                }
                let first = p.acked + 1;
                let at = inner
                    .entry(first)
                    .map_or(inner.primary_since, |e| e.at.max(inner.primary_since));
                if now.duration_since(at) > ACK_TIMEOUT {
                    self.exclude(&mut inner, j);
                    log_info!(
                        "messenger-{}: server {j} has not acknowledged seq {first} for {ACK_TIMEOUT:?}; \
                         excluding it (commits go on once it knows)",
                        self.id
                    );
                }
            }
            self.settle(inner);
            thread::sleep(TICK);
        }
    }

    /// This process was stalled: its view of the others is stale and they may have taken
    /// over meanwhile. A primary steps down; every server forgets what it knew of its peers
    /// and, as at start, waits [`DOWN_AFTER`] to hear from them before taking over. Their
    /// links are closed, for what waits unread in them was sent during the stall and is
    /// stale too; only what arrives on the links they dial again counts.
    fn stalled(&self, inner: &mut Inner, now: Instant) {
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

    /// Waits up to `d`, or less if the node stops.
    fn pause(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut inner = self.lock();
        while !inner.stopping {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            inner = self
                .changed
                .wait_timeout(inner, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn run_link(self: Arc<Self>, j: usize) {
        while !self.lock().stopping {
            match self.dial(j) {
                Ok(stream) => {
                    {
                        let mut inner = self.lock();
                        inner.peers[j].refused = false;
                        if inner.role == Role::Primary {
                            self.init_feed(&mut inner, j);
                        }
                        if let (Some((epoch, seq)), false) =
                            (inner.last_ack, inner.role == Role::Primary)
                        {
                            let ack = PeerMsg::Ack { epoch, seq }.encode();
                            inner.peers[j].control.insert(0, ack);
                        }
                    }
                    log_debug!("messenger-{}: linked to server {j}", self.id);
                    self.pump(j, &stream);
                    let _ = stream.shutdown(Shutdown::Both);
                    self.lock().peers[j].feed = Feed::Unknown;
                }
                Err(e) => {
                    log_debug!("messenger-{}: cannot link to server {j}: {e}", self.id);
                    self.lock().peers[j].refused = true;
                }
            }
            self.pause(REDIAL_EVERY);
        }
    }

    fn dial(&self, j: usize) -> io::Result<TcpStream> {
        let stream = TcpStream::connect_timeout(&self.addrs[j], CONNECT_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(LINK_TIMEOUT))?;
        stream.set_read_timeout(Some(LINK_TIMEOUT))?;
        let hello = PeerMsg::Hello {
            from: self.id,
            cluster: self.cluster.clone(),
        };
        let mut frame = Vec::new();
        encode_frame(Framing::U32, &hello.encode(), &mut frame).map_err(io::Error::other)?;
        (&stream).write_all(&frame)?;
        let limits = Limits {
            max_frame: 16,
            ..Limits::default()
        };
        let mut reader = FrameReader::with_limits(&stream, Framing::U32, limits);
        match reader.read_frame() {
            Ok(Some(b"w")) => Ok(stream),
            Ok(_) => Err(io::Error::other("the peer refused the link")),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// Writes whatever peer `j` is due, until the link fails or the node stops.
    fn pump(&self, j: usize, stream: &TcpStream) {
        let mut told: Option<(u64, Standing)> = None;
        let mut beat: Option<Instant> = None;
        let mut out = Vec::new();
        loop {
            {
                let mut inner = self.lock();
                loop {
                    if inner.stopping {
                        return;
                    }
                    for msg in std::mem::take(&mut inner.peers[j].control) {
                        encode_peer(&msg, &mut out);
                    }
                    self.feed(&mut inner, j, &mut out);
                    let now = Instant::now();
                    let standing = inner.standing(j);
                    let due = beat.is_none_or(|t| now.duration_since(t) >= HEARTBEAT_EVERY)
                        || told != Some((inner.version, standing));
                    if due {
                        encode_peer(&PeerMsg::Heartbeat(inner.status_for(j)).encode(), &mut out);
                        beat = Some(now);
                        told = Some((inner.version, standing));
                    }
                    if !out.is_empty() {
                        break;
                    }
                    let since = beat.map_or(Duration::ZERO, |t| now.duration_since(t));
                    inner = self
                        .changed
                        .wait_timeout(inner, HEARTBEAT_EVERY.saturating_sub(since))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
            if let Err(e) = (&*stream).write_all(&out) {
                log_debug!("messenger-{}: link to server {j} failed: {e}", self.id);
                return;
            }
            out.clear();
            if out.capacity() > 1 << 20 {
                out = Vec::new();
            }
        }
    }

    /// As primary, appends the next records (or a snapshot) for peer `j` to `out`.
    fn feed(&self, inner: &mut Inner, j: usize, out: &mut Vec<u8>) {
        if inner.role != Role::Primary {
            return;
        }
        let msg = match inner.peers[j].feed {
            Feed::Unknown => return,
            Feed::From(next) if next > inner.last.seq => return,
            Feed::From(next) => match inner.epoch_at(next - 1) {
                Some(prev_epoch) => {
                    let records = inner.records_after(next - 1, BATCH);
                    inner.peers[j].feed = Feed::From(next + records.len() as u64);
                    PeerMsg::Replicate {
                        epoch: inner.epoch,
                        prev: Pos {
                            epoch: prev_epoch,
                            seq: next - 1,
                        },
                        records,
                        fetched: false,
                    }
                }
                None => self.snapshot_for(inner, j, false),
            },
            Feed::Snapshot => self.snapshot_for(inner, j, false),
        };
        encode_peer(&msg.encode(), out);
    }

    fn snapshot_for(&self, inner: &mut Inner, j: usize, fetched: bool) -> PeerMsg {
        log_info!(
            "messenger-{}: sending server {j} a snapshot at {}",
            self.id,
            inner.last
        );
        if !fetched {
            inner.peers[j].feed = Feed::From(inner.last.seq + 1);
        }
        PeerMsg::Snapshot {
            epoch: inner.epoch,
            bytes: encode_snapshot(inner.last, &inner.state),
            fetched,
        }
    }

    /// Serves an inbound peer link whose HELLO has been read. The dialer sends nothing
    /// until it has our WELCOME, so `buffered` (bytes read past the HELLO) must be 0.
    pub(super) fn serve_peer(
        &self,
        conn: &Connection,
        hello: &[u8],
        buffered: usize,
    ) -> Result<(), HandlerError> {
        let from = match PeerMsg::decode(hello) {
            Ok(PeerMsg::Hello { from, cluster })
                if cluster == self.cluster
                    && from < self.addrs.len()
                    && from != self.id
                    && buffered == 0 =>
            {
                from
            }
            _ => {
                log_info!(
                    "messenger-{}: refused a peer link from {}: not of this cluster (check --peers)",
                    self.id,
                    conn.peer
                );
                return Ok(());
            }
        };
        let mut welcome = Vec::new();
        encode_peer(&PeerMsg::Welcome.encode(), &mut welcome);
        conn.stream.set_read_timeout(Some(LINK_TIMEOUT))?;
        (&*conn.stream).write_all(&welcome)?;
        let generation = {
            let mut inner = self.lock();
            let p = &mut inner.peers[from];
            p.inbound += 1;
            p.heard = Some(Instant::now());
            p.link = Some(Arc::clone(&conn.stream));
            p.inbound
        };
        let limits = Limits {
            max_frame: PEER_MAX_FRAME,
            ..Limits::default()
        };
        let mut reader = FrameReader::with_limits(&*conn.stream, Framing::U32, limits);
        let result: Result<(), HandlerError> = loop {
            // One read, every frame it completed, then one flush and one acknowledgement
            // for all the records among them: a backup that falls behind catches up in
            // fewer, larger fsyncs.
            match reader.fill() {
                Ok(true) => {}
                Ok(false) => break reader.finish().map_err(Into::into),
                // A silent or reset link: the peer is down, not misbehaving.
                Err(FrameError::Io(_)) => break Ok(()),
                Err(e) => break Err(e.into()),
            }
            let mut ack = None;
            let failed = loop {
                match reader.next_buffered() {
                    Ok(Some(frame)) => match PeerMsg::decode(frame) {
                        Ok(msg) => self.on_peer(from, generation, msg, &mut ack),
                        Err(e) => break Some(HandlerError::from(e)),
                    },
                    Ok(None) => break None,
                    Err(e) => break Some(e.into()),
                }
            };
            if let Some((epoch, seq)) = ack {
                self.acknowledge(from, epoch, seq);
            }
            if let Some(e) = failed {
                break Err(e);
            }
        };
        let mut inner = self.lock();
        if inner.peers[from].inbound == generation {
            inner.peers[from].link = None;
            self.peer_down(&mut inner, from, "link closed");
        }
        self.settle(inner);
        result
    }

    /// Handles one message from peer `from`. Records taken from a primary are acknowledged
    /// by the caller, once per read: `ack` is set to the epoch and sequence number to
    /// acknowledge.
    fn on_peer(&self, from: usize, generation: u64, msg: PeerMsg, ack: &mut Option<(u64, u64)>) {
        let mut inner = self.lock();
        if inner.peers[from].inbound != generation {
            return;
        }
        inner.peers[from].heard = Some(Instant::now());
        match msg {
            PeerMsg::Heartbeat(status) => self.on_heartbeat(inner, from, status),
            PeerMsg::Replicate {
                epoch,
                prev,
                records,
                fetched,
            } => {
                let incoming = Incoming::Records(prev, records);
                if fetched {
                    self.on_fetched(inner, from, incoming);
                } else {
                    self.on_replicate(inner, from, epoch, incoming, ack);
                }
            }
            PeerMsg::Snapshot {
                epoch,
                bytes,
                fetched,
            } => {
                let incoming = Incoming::Snapshot(bytes);
                if fetched {
                    self.on_fetched(inner, from, incoming);
                } else {
                    self.on_replicate(inner, from, epoch, incoming, ack);
                }
            }
            PeerMsg::Ack { epoch, seq } => {
                if inner.role == Role::Primary && epoch == inner.epoch {
                    let p = &mut inner.peers[from];
                    p.acked = p.acked.max(seq);
                    self.recompute_commit(&mut inner);
                    self.changed.notify_all();
                }
            }
            PeerMsg::Need { last } => {
                if inner.role == Role::Primary {
                    inner.peers[from].feed = if inner.holds(last) {
                        Feed::From(last.seq + 1)
                    } else {
                        Feed::Snapshot
                    };
                    self.changed.notify_all();
                }
            }
            PeerMsg::Reject { epoch } => {
                inner.max_epoch = inner.max_epoch.max(epoch);
                self.settle(inner);
            }
            PeerMsg::Fetch { last } => {
                // Records after the asker's last if this log has it; all of this log if it
                // is ahead but does not; else nothing (an empty answer: nothing newer).
                let answer = if inner.holds(last) {
                    PeerMsg::Replicate {
                        epoch: inner.epoch,
                        prev: last,
                        records: inner.records_after(last.seq, usize::MAX),
                        fetched: true,
                    }
                } else if inner.last > last {
                    self.snapshot_for(&mut inner, from, true)
                } else {
                    PeerMsg::Replicate {
                        epoch: inner.epoch,
                        prev: last,
                        records: Vec::new(),
                        fetched: true,
                    }
                };
                inner.peers[from].control.push(answer.encode());
                self.changed.notify_all();
            }
            PeerMsg::Hello { .. } | PeerMsg::Welcome => {}
        }
    }

    fn on_heartbeat(&self, mut inner: MutexGuard<'_, Inner>, from: usize, status: Status) {
        inner.max_epoch = inner.max_epoch.max(status.epoch);
        // Echoed back: it tells a primary this server has taken in what the heartbeat said
        // (its standing, applied below). A stale primary's standing is ignored, so is its mark.
        if status.role != Role::Primary || status.epoch >= inner.epoch {
            inner.peers[from].echo = status.mark;
        }
        if status.role == Role::Primary && status.epoch >= inner.epoch {
            let in_sync = match status.you {
                Standing::Excluded => false,
                Standing::InSync => true,
                Standing::Member | Standing::NotPrimary => inner.in_sync,
            };
            if in_sync != inner.in_sync {
                inner.in_sync = in_sync;
                inner.version += 1;
                let now = if in_sync { "holds" } else { "may miss" };
                log_info!(
                    "messenger-{}: {now} every committed change (server {from} says)",
                    self.id
                );
            }
        }
        if inner.peers[from].status.is_none() {
            log_info!("messenger-{}: server {from} is up", self.id);
        }
        inner.peers[from].status = Some(status);
        if inner.role == Role::Primary && inner.peers[from].feed == Feed::Unknown {
            self.init_feed(&mut inner, from);
        }
        self.settle(inner);
    }

    fn on_replicate(
        &self,
        mut inner: MutexGuard<'_, Inner>,
        from: usize,
        epoch: u64,
        incoming: Incoming,
        ack: &mut Option<(u64, u64)>,
    ) {
        if epoch < inner.epoch {
            let reject = PeerMsg::Reject { epoch: inner.epoch }.encode();
            inner.peers[from].control.push(reject);
            self.changed.notify_all();
            return;
        }
        if inner.role == Role::Primary {
            self.step_down(&mut inner, &format!("server {from} leads epoch {epoch}"));
        }
        if inner.role == Role::Candidate {
            self.set_candidate(&mut inner, false);
        }
        if epoch > inner.epoch {
            inner.epoch = epoch;
            inner.version += 1;
        }
        inner.max_epoch = inner.max_epoch.max(epoch);
        let Ok(agreed) = self.take(&mut inner, incoming) else {
            let last = inner.last;
            let now = Instant::now();
            let repeat = inner
                .need
                .is_some_and(|(p, at)| p == last && now.duration_since(at) < NEED_RETRY);
            if !repeat {
                inner.need = Some((last, now));
                inner.peers[from]
                    .control
                    .push(PeerMsg::Need { last }.encode());
                self.changed.notify_all();
            }
            return;
        };
        *ack = Some((epoch, agreed));
    }

    /// Makes everything taken so far durable, then acknowledges up to `seq` to the primary.
    fn acknowledge(&self, primary: usize, epoch: u64, seq: u64) {
        self.flush_to(seq);
        let mut inner = self.lock();
        if inner.epoch == epoch {
            inner.last_ack = Some((epoch, seq));
            let ack = PeerMsg::Ack { epoch, seq }.encode();
            inner.peers[primary].control.push(ack);
            self.changed.notify_all();
        }
    }

    /// As candidate, takes a FETCH answer: what the peer holds beyond this server's last
    /// record, if anything, after which it is known to hold nothing newer.
    fn on_fetched<'a>(&'a self, mut inner: MutexGuard<'a, Inner>, from: usize, incoming: Incoming) {
        if inner.role != Role::Candidate {
            return;
        }
        let taken = match incoming {
            Incoming::Records(prev, records) if records.is_empty() => {
                if prev == inner.last {
                    inner.peers[from].confirmed = Some(prev);
                }
                None
            }
            Incoming::Snapshot(bytes) => match decode_snapshot(&bytes) {
                Ok((pos, _)) if pos <= inner.last => None,
                _ => Some(self.take(&mut inner, Incoming::Snapshot(bytes))),
            },
            records => Some(self.take(&mut inner, records)),
        };
        match taken {
            None => {}
            Some(Ok(_)) => {
                log_info!(
                    "messenger-{}: caught up to {} from server {from}",
                    self.id,
                    inner.last
                );
                inner.peers[from].confirmed = Some(inner.last);
                let seq = inner.last.seq;
                drop(inner);
                self.flush_to(seq);
                inner = self.lock();
            }
            Some(Err(())) => {
                log_info!(
                    "messenger-{}: server {from}'s answer did not fit; asking again",
                    self.id
                );
                inner.peers[from].asked = None;
            }
        }
        self.settle(inner);
    }
}

fn encode_peer(payload: &[u8], out: &mut Vec<u8>) {
    // Peer frames are far below the u32 header's 4 GiB.
    encode_frame(Framing::U32, payload, out).expect("a peer frame fits a u32 header");
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn records_are_taken_only_in_sequence_and_agreement_is_reported() {
        let dir = std::env::temp_dir().join(format!("switchboard-repl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let peers = vec!["127.0.0.1:1".parse().unwrap()];
        let (node, _) = Node::open(&Options::new(0, peers, dir.clone())).unwrap();
        let mut inner = node.lock();
        let at = |epoch, seq| Pos { epoch, seq };
        let first = vec![record(1, 1, "a"), record(1, 2, "b"), record(1, 3, "c")];
        assert_eq!(node.accept(&mut inner, Pos::default(), first), Ok(3));
        // A gap is refused.
        assert_eq!(
            node.accept(&mut inner, at(1, 4), vec![record(1, 5, "e")]),
            Err(())
        );
        // What is held already is skipped; what follows it is taken.
        let resent = vec![record(1, 2, "b"), record(1, 3, "c"), record(1, 4, "d")];
        assert_eq!(node.accept(&mut inner, at(1, 1), resent), Ok(4));
        // A record that disagrees with the one held at its place is refused.
        assert_eq!(
            node.accept(&mut inner, at(1, 3), vec![record(2, 4, "x")]),
            Err(())
        );
        // Agreement is reported up to the last record sent, not this log's last.
        assert_eq!(
            node.accept(&mut inner, at(1, 2), vec![record(1, 3, "c")]),
            Ok(3)
        );
        assert!(inner.state.exists("d") && !inner.state.exists("x"));
        assert_eq!(inner.last, at(1, 4));
        assert!(inner.holds(at(1, 4)) && !inner.holds(at(2, 4)) && inner.holds(Pos::default()));
        assert_eq!(inner.records_after(2, 10).len(), 2);
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn node_of(n: usize, name: &str) -> (Arc<Node>, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("switchboard-repl-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let peers = (1..=n)
            .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
            .collect();
        (
            Node::open(&Options::new(0, peers, dir.clone())).unwrap().0,
            dir,
        )
    }

    fn ago(d: Duration) -> Instant {
        Instant::now().checked_sub(d).unwrap()
    }

    #[test]
    fn commits_wait_for_a_live_excluded_peer_until_it_echoes_its_exclusion() {
        let (node, dir) = node_of(2, "exclusion");
        let mut inner = node.lock();
        inner.role = Role::Primary;
        inner.last = Pos { epoch: 3, seq: 5 };
        (inner.takeover, inner.committed, inner.durable) = (1, 3, 5);
        node.exclude(&mut inner, 1);
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
            });
        };
        // Alive and unaware (no echo, or the echo of a heartbeat from before): nothing more.
        for echo in [0, mark - 1] {
            alive(&mut inner, echo);
            node.recompute_commit(&mut inner);
            assert_eq!(inner.committed, 3, "echo {echo}");
        }
        // It took in a heartbeat that told it: commits go on without it.
        alive(&mut inner, mark);
        node.recompute_commit(&mut inner);
        assert_eq!(inner.committed, 5);
        // Down is as good: it comes back not in sync.
        inner.durable = 6;
        inner.last.seq = 6;
        alive(&mut inner, 0);
        node.recompute_commit(&mut inner);
        assert_eq!(inner.committed, 5);
        node.peer_down(&mut inner, 1, "test");
        assert_eq!(inner.committed, 6);
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stalled_server_trusts_nothing_it_knew_and_acts_only_once_the_ticker_has_run() {
        let (node, dir) = node_of(2, "stall");
        let mut inner = node.lock();
        inner.in_sync = true;
        // Too short to have looked dead: it still holds everything.
        inner.last_tick = ago(STALL + Duration::from_millis(50));
        node.stalled(&mut inner, Instant::now());
        assert!(inner.in_sync);
        // Long enough to have been declared down and left behind: it may not.
        inner.last_tick = ago(DOWN_AFTER - HEARTBEAT_EVERY);
        node.stalled(&mut inner, Instant::now());
        assert!(!inner.in_sync);
        // With the ticker late, nothing is decided, though the rules would make it primary
        // (the peer is known down and this server holds everything).
        inner.in_sync = true;
        inner.started = ago(2 * DOWN_AFTER);
        inner.peers[1].was_down = true;
        inner.last_tick = ago(2 * STALL);
        node.evaluate(&mut inner);
        assert_eq!(inner.role, Role::Backup);
        inner.last_tick = Instant::now();
        node.evaluate(&mut inner);
        assert_eq!(inner.role, Role::Primary);
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn epochs_belong_to_one_server_each() {
        for n in 1..=5u64 {
            for id in 0..n {
                for known in 0..20 {
                    let e = next_epoch(known, id, n);
                    assert!(e > known && e % n == id, "n {n} id {id} known {known}: {e}");
                    assert!(e <= known + n);
                }
            }
        }
    }
}
