//! The replicated store (`store-server --raft ID --peers A0,A1,A2 --data-dir DIR`): the
//! classic protocol, in every framing, over a Raft log ([`crate::raft`]).
//!
//! - **Writes** (`store`, `delete`) are proposed to the log and answered once applied,
//!   i.e. committed on a majority's disks; a connection's consecutive writes go in as one
//!   batch, and the driver gives every write waiting at its next round one fsync.
//! - **Lookups** are linearizable: read-index (the leader confirms with a heartbeat round,
//!   or by the acknowledgements of Appends sent after the lookup arrived, that it still
//!   leads, then answers once it has applied the commit index of that moment), rounds
//!   shared by concurrent reads.
//! - **Order per connection**: a request is handled once everything before it on its
//!   connection is applied, so a `lookup` after a `store` sees it. Across one server's
//!   connections, arrival order as the classic store keeps it ([`crate::order`]): a
//!   one-shot client's `store` is applied before a connection accepted after it acts.
//!   Applying it takes a commit (a majority's fsyncs, and a forward to the leader), not a
//!   memory write, so a newcomer waits for it as long as a request may take (twice the
//!   request timeout and a margin), not the classic store's 50 ms.
//! - **Any server takes clients**: a follower forwards requests to the leader on a
//!   connection of its own that starts with the frame `raft-forward`, and relays the
//!   replies. In that mode the leader answers `store` with `ok` and says `{error,not_leader}`
//!   (then closes) when it no longer leads: nothing of that request was applied, so the
//!   follower retries on the next leader.
//! - **No leader**: a request waits up to the request timeout, then gets
//!   `{error,no_leader}`. `store` has no reply in the classic protocol, so a failed store
//!   gets that error and the connection is closed: the client knows something failed, and
//!   no later reply can be mistaken for an earlier request's. A failed write's outcome is
//!   unknown (it may yet commit); a failed lookup changed nothing.
//! - **`stats`** is answered by the server asked, with a `{raft,[...]}` item: role, term,
//!   leader, commit and applied index, and (on the leader) each peer's match index.

use super::protocol::{self, Request, Verb};
use super::state::Store;
use super::{append_lookup_reply, FLUSH_AT, LOOKUP_FRAMING};
use crate::framing::{encode_frame, FrameError, Framing, Limits};
use crate::order::Arrivals;
use crate::raft::driver::{Outcome, RaftHandle, SnapshotTask, StateMachine, Status};
use crate::raft::links;
use crate::raft::member::{Member, MemberOptions};
use crate::raft::{ReplicaId, Role};
use crate::request::{self, Replies, TOO_LONG};
use crate::server::{
    self, is_disconnect, Connection, HandlerError, Server, ServerConfig, ServerHandle,
};
use crate::store::client::StoreClient;
use crossbeam_channel::Receiver;
use std::io::{self, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first frame of a follower's forwarding connection to the leader.
pub const FORWARD: &[u8] = b"raft-forward";

/// How much longer than the request timeout a follower waits for the leader's answer on a
/// forwarding connection: the leader answers every request within its own request
/// timeout, which started a little after the follower's.
const UPSTREAM_MARGIN: Duration = Duration::from_secs(2);

/// The longest one request can keep its connection busy, with request timeout `timeout`:
/// a follower tries until its deadline, and a forward started just before it waits up to
/// the leader's whole timeout and [`UPSTREAM_MARGIN`]. A connection accepted later waits
/// this long at most for an earlier one's first requests (arrival order): a write's
/// commit takes fsyncs on a majority, which under disk load passed the classic store's
/// 50 ms ([`crate::order::MAX_WAIT`]), and the newcomer's lookup then ran first.
fn longest_request(timeout: Duration) -> Duration {
    2 * timeout + UPSTREAM_MARGIN
}

/// How a replicated store is set up.
#[derive(Debug, Clone)]
pub struct ReplicatedOptions {
    /// This server's index in `peers` (0-based; its Raft id is one more).
    pub index: usize,
    /// Every server's address, this one's included: it listens on its own entry, and
    /// dials (and forwards to) the others at theirs. 3 or 5 of them.
    pub peers: Vec<String>,
    /// The clients' framing (and the peers' hello's).
    pub framing: Framing,
    /// Frame size limits for clients.
    pub limits: Limits,
    /// Where the Raft log, hard state and snapshot live.
    pub data_dir: PathBuf,
    /// How long a request may wait for a leader (and for its commit).
    pub request_timeout: Duration,
    /// The cluster secret for the peer links.
    pub secret: Option<crate::auth::Secret>,
    /// One tick of Raft's clock (elections after 10–19 ticks).
    pub tick: Duration,
    /// Take a snapshot after this many entries (0: never).
    pub compact_every: u64,
}

impl ReplicatedOptions {
    /// Defaults for server `index` of `peers`: line framing, 5 s request timeout, 10 ms
    /// ticks, a snapshot every 100,000 entries.
    pub fn new(index: usize, peers: Vec<String>, data_dir: PathBuf) -> ReplicatedOptions {
        ReplicatedOptions {
            index,
            peers,
            framing: Framing::Line,
            limits: Limits::default(),
            data_dir,
            request_timeout: Duration::from_secs(5),
            secret: None,
            tick: Duration::from_millis(10),
            compact_every: 100_000,
        }
    }
}

/// The store as a Raft state machine: commands are classic `store`/`delete` requests.
pub struct StoreMachine(pub Arc<Store>);

impl StateMachine for StoreMachine {
    fn apply(&mut self, _index: u64, command: &[u8]) -> Vec<u8> {
        match protocol::parse(command) {
            Ok(Request::Store { key, value }) => {
                self.0.set(key, value);
                Vec::new()
            }
            Ok(Request::Delete { key }) => {
                let mut out = Vec::new();
                if self.0.delete(key) {
                    protocol::format_ok(&mut out);
                } else {
                    protocol::format_nothing(&mut out);
                }
                out
            }
            // Only writes are proposed.
            _ => Vec::new(),
        }
    }

    /// `(klen:u32 key vlen:u32 value)*`, big-endian lengths.
    fn snapshot(&mut self) -> Vec<u8> {
        encode_store(&self.0)
    }

    /// Reads the store on the snapshot thread while the driver goes on applying: the
    /// blob is *fuzzy*, each key as of some moment between the snapshot's index and the
    /// end of the read. That restores correctly because every command is an overwrite of
    /// one key (`store` sets it, `delete` removes it): applying the entries after the
    /// snapshot's index sets each key they touch to its last write, whatever the blob
    /// had, and leaves every other key as it was at the index (ZooKeeper's fuzzy
    /// snapshots rest on the same idempotence). Until those entries are applied again
    /// nothing reads the restored state: lookups wait for the leader's commit index.
    fn snapshot_later(&mut self) -> SnapshotTask {
        let store = Arc::clone(&self.0);
        Box::new(move || encode_store(&store))
    }

    fn restore(&mut self, mut data: &[u8]) -> io::Result<()> {
        let mut pairs = Vec::new();
        let take = |data: &mut &[u8]| -> io::Result<Vec<u8>> {
            let bad = || io::Error::new(io::ErrorKind::InvalidData, "a store snapshot cut short");
            let len = data.get(..4).ok_or_else(bad)?;
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let bytes = data.get(4..4 + len).ok_or_else(bad)?.to_vec();
            *data = &data[4 + len..];
            Ok(bytes)
        };
        while !data.is_empty() {
            let k = take(&mut data)?;
            let v = take(&mut data)?;
            pairs.push((k, v));
        }
        // At once: a lookup (one confirmed by read-index just before this replica lost the
        // lead, say) sees the old state or the new, never a key missing from both.
        self.0.replace_all(pairs);
        Ok(())
    }
}

/// `(klen:u32 key vlen:u32 value)*`, big-endian lengths, read shard by shard.
fn encode_store(store: &Store) -> Vec<u8> {
    let mut out = Vec::new();
    let mut cursor = store.snapshot();
    while cursor.next_chunk(1 << 20, |k, v| {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }) {}
    out
}

/// The replicated store service, shared by every connection.
pub struct ReplicatedStore {
    store: Arc<Store>,
    raft: RaftHandle,
    member: Member,
    options: ReplicatedOptions,
    started: Instant,
    commands: [AtomicU64; 5],
    arrivals: Arrivals,
}

/// Why a request was not done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fail {
    /// Certainly not applied (no leader in time, or the leader asked stopped leading).
    NotApplied,
    /// May or may not have been applied.
    Unknown,
}

impl ReplicatedStore {
    /// Opens the data directory, restores the store from it, and starts the Raft driver
    /// and the peer links.
    ///
    /// # Errors
    /// When the data directory is damaged or unreadable, or the options are unusable.
    pub fn open(options: ReplicatedOptions) -> io::Result<Arc<ReplicatedStore>> {
        let store = Arc::new(Store::new());
        let member_options = MemberOptions {
            index: options.index,
            dial: options.peers.clone(),
            cluster: "store".into(),
            framing: options.framing,
            secret: options.secret.clone(),
            data_dir: options.data_dir.clone(),
            tick: options.tick,
            compact_every: options.compact_every,
        };
        let member = Member::start(&member_options, StoreMachine(Arc::clone(&store)))?;
        Ok(Arc::new(ReplicatedStore {
            store,
            raft: member.raft().clone(),
            member,
            started: Instant::now(),
            commands: Default::default(),
            arrivals: Arrivals::with_max_wait(longest_request(options.request_timeout)),
            options,
        }))
    }

    /// The state, for inspection.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The Raft replica's state now.
    pub fn status(&self) -> Status {
        self.raft.status()
    }

    /// For a planned stop: if this server leads, hands leadership to the most up-to-date
    /// peer (so clients wait for no election timeout). True when it does not lead now.
    pub fn transfer_leadership(&self, within: Duration) -> bool {
        self.raft.transfer_leadership(within)
    }

    /// Stops the driver and closes the peer links; call after the server has stopped.
    pub fn close(&self) {
        self.member.close();
    }

    /// The server's handler: peers' links and clients on one port, clients in arrival
    /// order (see [`ReplicatedStore::serve`]).
    pub fn handler(self: &Arc<Self>) -> impl crate::server::Handler {
        let service = Arc::clone(self);
        self.arrivals.handler(move |conn| service.serve(&conn))
    }

    /// Serves one connection: a peer's link if its first frame is a Raft hello, a
    /// follower's forwarding connection if it is [`FORWARD`], else a client.
    ///
    /// # Errors
    /// A framing error that loses sync, or a failed socket: each ends this connection only.
    pub fn serve(&self, conn: &Connection) -> Result<(), HandlerError> {
        // Arrival order across this server's connections, for the course's one-shot
        // clients (see `crate::order`): a connection's first requests wait for what
        // connections accepted before it had sent, and settle once applied.
        let mut reader = conn.reader(self.options.framing, self.options.limits);
        let first = loop {
            if !self.arrivals.await_first_bytes(conn) {
                // Nothing (more) came; part of a first frame may be buffered: it was cut
                // off, as at any end.
                if let Err(e) = reader.finish() {
                    request::ended(e, conn)?;
                }
                return Ok(());
            }
            match reader.fill() {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => return Ok(request::ended(e, conn)?),
            }
            match reader.next_buffered() {
                Ok(Some(f)) => break Some(f.to_vec()),
                Err(e) if e.is_recoverable() => break None,
                Err(e) => return Err(e.into()),
                // Only part of the first frame: younger connections need not wait for the
                // rest, which may be slow to come (newcomers wait for a connection with
                // bytes pending for as long as a request may take).
                Ok(None) => {
                    self.arrivals.release(conn);
                }
            }
        };
        let hello = first.as_ref().is_some_and(|f| f.starts_with(links::HELLO));
        let forward = first.as_deref() == Some(FORWARD);
        if conn.in_reserve() && !hello {
            // Past the connection limit: the reserve is for peer links (a follower's
            // forwarding connection is refused as a client is).
            self.arrivals.settle(conn);
            conn.refuse();
            return Ok(());
        }
        if hello || forward {
            // A peer's link or a follower's forwarding connection: nobody waits for it.
            self.arrivals.settle(conn);
        } else {
            self.arrivals.wait_for_earlier(conn);
        }
        if let (true, Some(f)) = (hello, &first) {
            return links::serve_peer(self.member.peer_config(), &self.raft, conn, f, reader);
        }
        let mut session = Session {
            svc: self,
            forward,
            upstream: None,
            counts: [0; 5],
        };
        let mut batch: Vec<Option<Vec<u8>>> = if forward { Vec::new() } else { vec![first] };
        // Charged to the client memory budget, and written whenever it passes `FLUSH_AT`
        // within a batch, as the classic store's: a batch of lookups of a large value
        // never builds up in memory.
        let mut out = Replies::new(conn, self.options.framing);
        // Until the first batch settles, an early write settles it (`Replies::flush_early`).
        out.hold(Some(&self.arrivals));
        loop {
            let fatal = loop {
                match reader.next_buffered() {
                    Ok(Some(f)) => batch.push(Some(f.to_vec())),
                    Ok(None) => break None,
                    Err(e) if e.is_recoverable() => batch.push(None),
                    Err(e) => break Some(e),
                }
            };
            let done = session.batch(&batch, &conn.server, &mut out);
            self.arrivals.settle(conn);
            out.hold(None);
            batch.clear();
            let written = done.and_then(|close| Ok(out.flush()? && !close));
            session.add_counts();
            match written {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) if is_disconnect(&e) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            if let Some(e) = fatal {
                return Err(e.into());
            }
            match reader.fill() {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => return ended(e),
            }
        }
    }

    fn stats(&self, server: &ServerHandle, out: &mut Vec<u8>) {
        let stats = super::stats_of(
            &self.store,
            server,
            self.started,
            self.commands.each_ref().map(|c| c.load(Ordering::Relaxed)),
        );
        let mut payload = Vec::new();
        protocol::format_stats(&stats, &mut payload);
        payload.truncate(payload.len() - 2); // reopen the list: "]}"
        format_raft(&self.raft.status(), &mut payload);
        payload.extend_from_slice(b"]}");
        frame(self.options.framing, &payload, out);
    }

    /// Runs `cmds` (writes) as leader; on `Lost`, proposes the rest again while leading.
    fn write_local(
        &self,
        cmds: &[Vec<u8>],
        results: &mut Vec<Vec<u8>>,
        deadline: Instant,
    ) -> Result<(), Fail> {
        loop {
            let rxs = self.raft.propose_batch(cmds[results.len()..].to_vec());
            for rx in rxs {
                match wait(&rx, deadline) {
                    Some(Outcome::Done(r)) => results.push(r),
                    // Every later one is lost too (see `propose_batch`).
                    Some(Outcome::Lost) => break,
                    Some(Outcome::NotLeader(_)) => return Err(Fail::NotApplied),
                    _ => return Err(Fail::Unknown),
                }
            }
            if results.len() == cmds.len() {
                return Ok(());
            }
            if Instant::now() >= deadline || self.raft.status().role != Role::Leader {
                return Err(Fail::NotApplied);
            }
        }
    }
}

/// Runs a replicated store server on its own `--peers` entry until Ctrl-C or SIGTERM;
/// then hands leadership over (if it leads), stops the server, the driver and the links.
///
/// # Errors
/// What kept it from starting: the address, the data directory, the signal handler.
pub fn run_until_signal(options: ReplicatedOptions, config: ServerConfig) -> Result<(), String> {
    let addr = options
        .peers
        .get(options.index)
        .cloned()
        .ok_or("--raft must be an index into --peers")?;
    let listener = TcpListener::bind(&addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let svc = ReplicatedStore::open(options).map_err(|e| format!("cannot start raft: {e}"))?;
    let started = Server::with_handler(listener, config, svc.handler()).and_then(Server::spawn);
    let running = match started {
        Ok(r) => r,
        Err(e) => {
            svc.close();
            return Err(format!("cannot serve on {addr}: {e}"));
        }
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    if let Err(e) = server::on_termination(move || {
        let _ = tx.try_send(());
    }) {
        running.stop();
        svc.close();
        return Err(format!("cannot install the Ctrl-C handler: {e}"));
    }
    let _ = rx.recv();
    // A planned stop costs the clients no election timeout.
    let led = svc.status().role == Role::Leader;
    if !svc.transfer_leadership(Duration::from_secs(2)) {
        crate::log_info!("store: leadership transfer did not finish in 2 s; stopping anyway");
    } else if led {
        crate::log_info!("store: leadership handed over before stopping");
    }
    running.stop();
    svc.close();
    Ok(())
}

fn ended(e: FrameError) -> Result<(), HandlerError> {
    match e {
        FrameError::Truncated { .. } => Ok(()),
        e if e.is_timeout() => Ok(()),
        FrameError::Io(e) if is_disconnect(&e) => Ok(()),
        e => Err(e.into()),
    }
}

fn wait(rx: &Receiver<Outcome>, deadline: Instant) -> Option<Outcome> {
    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .ok()
}

fn frame(framing: Framing, payload: &[u8], out: &mut Vec<u8>) {
    if let Err(e) = encode_frame(framing, payload, out) {
        // A value stored through another framing may not fit this one: a '\n' in a
        // `line` reply (`{error,unencodable}`), or a length over a `u16` frame's.
        let mut reason = Vec::new();
        protocol::format_error(e.reason(), &mut reason);
        let _ = encode_frame(framing, &reason, out);
    }
}

fn error(framing: Framing, reason: &str, out: &mut Vec<u8>) {
    let mut payload = Vec::new();
    protocol::format_error(reason, &mut payload);
    frame(framing, &payload, out);
}

/// Appends `,{raft,[{id,N},{role,R},{term,N},{leader,N|none},{commit_index,N},
/// {applied_index,N},{snapshot_index,N},{match_index,[{ID,N},...]}]}`.
fn format_raft(s: &Status, out: &mut Vec<u8>) {
    let role = match s.role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::PreCandidate => "pre_candidate",
    };
    let leader = s.leader.map_or("none".to_owned(), |l| (l - 1).to_string());
    let _ = write!(
        out,
        ",{{raft,[{{id,{}}},{{role,{role}}},{{term,{}}},{{leader,{leader}}},{{commit_index,{}}},\
         {{applied_index,{}}},{{snapshot_index,{}}},{{match_index,[",
        s.id - 1,
        s.term,
        s.commit,
        s.applied,
        s.snapshot
    );
    for (i, (p, m)) in s.matched.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = write!(out, "{{{},{m}}}", p - 1);
    }
    let c = &s.counts;
    let _ = write!(
        out,
        "]}},{{counts,[{{fsyncs,{}}},{{rounds,{}}},{{appends,{}}},{{heartbeats,{}}},\
         {{answers,{}}},{{other,{}}},{{proposals,{}}},{{reads,{}}},{{read_rounds,{}}}]}}]}}",
        c.fsyncs,
        c.rounds,
        c.appends,
        c.heartbeats,
        c.answers,
        c.other,
        c.proposals,
        c.reads,
        c.read_rounds
    );
}

/// The follower's connection to the leader, for one client connection.
struct Upstream {
    leader: ReplicaId,
    client: StoreClient,
}

/// One client connection (or a follower's forwarding connection).
struct Session<'s> {
    svc: &'s ReplicatedStore,
    /// A follower forwards on this connection: reply to every write, never forward.
    forward: bool,
    upstream: Option<Upstream>,
    /// Requests of the current batch by verb.
    counts: [u64; 5],
}

/// Where a confirmed lookup's value is.
enum Found {
    /// In this replica's map, as of a read index confirmed: read it now.
    Here,
    /// The leader's answer, forwarded.
    There(Option<Vec<u8>>),
}

/// A lookup's reply: `{just,VALUE}`, `nothing`, or the error of a value the framing
/// cannot carry.
fn lookup_reply(framing: Framing, value: Option<&[u8]>, out: &mut Vec<u8>) {
    match value {
        Some(v) => {
            if let Err(e) = append_lookup_reply(framing, Some(v), out) {
                error(framing, e.reason(), out);
            }
        }
        None => frame(framing, b"nothing", out),
    }
}

impl Session<'_> {
    /// Handles one read's requests in order; true when the connection must close.
    fn batch(
        &mut self,
        frames: &[Option<Vec<u8>>],
        server: &ServerHandle,
        replies: &mut Replies<'_>,
    ) -> io::Result<bool> {
        let framing = self.svc.options.framing;
        let mut i = 0;
        while i < frames.len() {
            if replies.len() >= FLUSH_AT && !replies.flush_early()? {
                return Ok(true);
            }
            let Some(f) = &frames[i] else {
                let out = replies.buffer();
                self.count(Verb::Error, 1);
                frame(framing, TOO_LONG, out);
                i += 1;
                continue;
            };
            let request = match protocol::parse(f) {
                Ok(r) => r,
                Err(e) => {
                    self.count(Verb::Error, 1);
                    error(framing, e.reason(), replies.buffer());
                    i += 1;
                    continue;
                }
            };
            self.count(request.verb(), 1);
            match request {
                Request::Stats => self.svc.stats(server, replies.buffer()),
                Request::Lookup { key } => match self.lookup(key) {
                    Ok(Found::Here) => {
                        // Copied at once when it fits the buffer's spare room (charged
                        // already); else room is made and charged first, with no shard
                        // lock held while a charge may wait, and the key looked up again
                        // (a value that grew meanwhile is charged once copied).
                        let store = &self.svc.store;
                        let out = replies.buffer();
                        let room = out.capacity() - out.len();
                        let need = store.with_value(key, |v| {
                            let need = v.map_or(0, <[u8]>::len) + LOOKUP_FRAMING;
                            if need <= room {
                                lookup_reply(framing, v, out);
                                return 0;
                            }
                            need
                        });
                        if need > 0 {
                            replies.reserve(need)?;
                            let out = replies.buffer();
                            store.with_value(key, |v| lookup_reply(framing, v, out));
                        }
                    }
                    Ok(Found::There(v)) => {
                        if let Some(v) = &v {
                            replies.reserve(v.len() + LOOKUP_FRAMING)?;
                        }
                        lookup_reply(framing, v.as_deref(), replies.buffer());
                    }
                    Err(fail) => {
                        if self.fail(fail, replies.buffer()) {
                            return Ok(true);
                        }
                    }
                },
                Request::Store { .. } | Request::Delete { .. } => {
                    // The run of writes from here goes in as one batch.
                    let mut cmds = Vec::new();
                    let mut verbs = Vec::new();
                    while let Some(Some(f)) = frames.get(i) {
                        match protocol::parse(f) {
                            Ok(r @ (Request::Store { .. } | Request::Delete { .. })) => {
                                verbs.push(r.verb());
                                cmds.push(f.clone());
                                i += 1;
                            }
                            _ => break,
                        }
                    }
                    let (results, outcome) = self.writes(&cmds);
                    let out = replies.buffer();
                    for (verb, r) in verbs.iter().zip(&results) {
                        if *verb == Verb::Delete {
                            frame(framing, r, out);
                        } else if self.forward {
                            frame(framing, b"ok", out);
                        }
                    }
                    // The first of the run was counted above.
                    for v in verbs.iter().skip(1) {
                        self.count(*v, 1);
                    }
                    if let Err(fail) = outcome {
                        self.fail(fail, out);
                        return Ok(true);
                    }
                    continue;
                }
            }
            i += 1;
        }
        Ok(false)
    }

    /// Answers a failed request; true when the connection must close.
    fn fail(&self, fail: Fail, out: &mut Vec<u8>) -> bool {
        let framing = self.svc.options.framing;
        match (self.forward, fail) {
            (true, Fail::NotApplied) => error(framing, "not_leader", out),
            (true, Fail::Unknown) => error(framing, "unknown", out),
            (false, _) => error(framing, "no_leader", out),
        }
        self.forward
    }

    /// Counted into the service's counters once the batch's replies are written, as the
    /// classic store does: a `stats` reply does not count its own batch.
    fn count(&mut self, verb: Verb, n: u64) {
        self.counts[verb as usize] += n;
    }

    fn add_counts(&mut self) {
        for (total, n) in self.svc.commands.iter().zip(&mut self.counts) {
            if *n > 0 {
                total.fetch_add(std::mem::take(n), Ordering::Relaxed);
            }
        }
    }

    /// Applies `cmds` in order: here when leading, else through the leader, retrying
    /// while nothing is in doubt and the request timeout allows.
    fn writes(&mut self, cmds: &[Vec<u8>]) -> (Vec<Vec<u8>>, Result<(), Fail>) {
        let deadline = Instant::now() + self.svc.options.request_timeout;
        let mut results = Vec::new();
        loop {
            let st = self.svc.raft.status();
            let tried = if st.role == Role::Leader {
                Some(self.svc.write_local(cmds, &mut results, deadline))
            } else if self.forward {
                return (results, Err(Fail::NotApplied));
            } else {
                st.leader
                    .map(|l| self.forward_writes(l, &cmds[results.len()..], &mut results))
            };
            match tried {
                Some(Ok(())) => return (results, Ok(())),
                Some(Err(Fail::Unknown)) => return (results, Err(Fail::Unknown)),
                _ => {}
            }
            if Instant::now() >= deadline {
                return (results, Err(Fail::NotApplied));
            }
            std::thread::sleep(self.svc.options.tick / 2);
        }
    }

    /// A linearizable lookup: read-index here when leading, else through the leader.
    fn lookup(&mut self, key: &[u8]) -> Result<Found, Fail> {
        let deadline = Instant::now() + self.svc.options.request_timeout;
        loop {
            let st = self.svc.raft.status();
            if st.role == Role::Leader {
                match wait(&self.svc.raft.read(), deadline) {
                    Some(Outcome::Done(_)) => return Ok(Found::Here),
                    Some(Outcome::Lost | Outcome::NotLeader(_)) => {}
                    _ => return Err(Fail::NotApplied),
                }
            } else if self.forward {
                return Err(Fail::NotApplied);
            } else if let Some(l) = st.leader {
                if let Some(found) = self.forward_lookup(l, key) {
                    return Ok(Found::There(found));
                }
            }
            if Instant::now() >= deadline {
                return Err(Fail::NotApplied);
            }
            std::thread::sleep(self.svc.options.tick / 2);
        }
    }

    fn upstream(&mut self, leader: ReplicaId) -> Option<&mut StoreClient> {
        if self.upstream.as_ref().is_some_and(|u| u.leader != leader) {
            self.upstream = None;
        }
        if self.upstream.is_none() {
            let addr = &self.svc.options.peers[(leader - 1) as usize];
            let timeout = self.svc.options.request_timeout + UPSTREAM_MARGIN;
            let mut client =
                StoreClient::connect_timeout(addr.as_str(), self.svc.options.framing, timeout)
                    .ok()?;
            client.queue_raw(FORWARD).ok()?;
            self.upstream = Some(Upstream { leader, client });
        }
        self.upstream.as_mut().map(|u| &mut u.client)
    }

    /// Forwards writes to `leader`, pipelined; their replies in order.
    fn forward_writes(
        &mut self,
        leader: ReplicaId,
        cmds: &[Vec<u8>],
        results: &mut Vec<Vec<u8>>,
    ) -> Result<(), Fail> {
        let Some(client) = self.upstream(leader) else {
            return Err(Fail::NotApplied);
        };
        for c in cmds {
            if client.queue_raw(c).is_err() {
                self.upstream = None;
                return Err(Fail::NotApplied);
            }
        }
        for c in cmds {
            let reply = match client.recv() {
                Ok(r) => r,
                Err(_) => {
                    self.upstream = None;
                    return Err(Fail::Unknown);
                }
            };
            let is_store = c.starts_with(b"store,");
            match protocol::parse_reply(&reply) {
                Some(protocol::Reply::Ok) if is_store => results.push(Vec::new()),
                Some(protocol::Reply::Ok | protocol::Reply::Nothing) if !is_store => {
                    results.push(reply)
                }
                Some(protocol::Reply::Error(b"not_leader")) => {
                    // It closes after this batch; nothing from here on was applied.
                    self.upstream = None;
                    return Err(Fail::NotApplied);
                }
                _ => {
                    self.upstream = None;
                    return Err(Fail::Unknown);
                }
            }
        }
        Ok(())
    }

    /// Forwards a lookup; `None` to retry (no answer, or the leader stopped leading).
    fn forward_lookup(&mut self, leader: ReplicaId, key: &[u8]) -> Option<Option<Vec<u8>>> {
        let client = self.upstream(leader)?;
        match client.lookup(key) {
            Ok(found) => Some(found),
            Err(_) => {
                self.upstream = None;
                None
            }
        }
    }
}

#[cfg(test)]
#[path = "replicated_tests.rs"]
mod tests;
