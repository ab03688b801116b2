//! `messenger-server --quorum majority`: the same service on the framework's Raft module
//! ([`crate::raft`]): an acknowledged change is on a majority's disks, so it survives any
//! partition and any minority crashing (one of three), and the cluster serves only while a
//! majority is up and connected.
//!
//! - **Who serves clients**: the Raft leader, once its claim of an epoch is committed
//!   ([`fence`]). A follower forwards its clients' requests to the leader it knows on its
//!   Raft link to it and relays the answers ([`forward`]), so a client that reaches a
//!   follower but not the leader is served. A server that can do neither (no leader known,
//!   its link to the leader down, or a leader whose claim is not committed yet) answers as
//!   a backup does: `40` with the leader's id when it knows one, else `41`, and closes; the
//!   clients fail over on their own, so they and the Python client work unchanged.
//! - **Deciding**: the leader decides each request as the primary does
//!   (`requests::respond`) against its *own view*: the committed state plus the
//!   changes it has decided since (a copy made when its epoch was committed). Each
//!   decision that answers anything, or changes anything, is numbered `EPOCH.SEQ` and
//!   proposed (a request that changes nothing proposes a barrier), in decision order, by
//!   one proposer thread.
//! - **Answering**: the answer, and a message pushed to its logged-in recipient, are held
//!   (the client registry, `clients`) until the command numbered for them is applied and
//!   accepted: committed, on a majority. A deposed leader's commands are refused by the
//!   fence, so it releases nothing it decided on a state that was no longer current; it
//!   steps down (closing its clients, who fail over) when Raft says it no longer leads, or
//!   when it applies another server's claim or a refusal of its own command.
//! - **Every server** applies every committed command to its state ([`fence::Machine`]);
//!   snapshots (`--compact-after`) are the fence and the state.
//! - **Message numbers** are `EPOCH.SEQ` with epochs claimed through the log: each names
//!   one message forever, and they grow along the log, as clients expect.

pub mod fence;
pub mod forward;

use super::clients::{Clients, Out};
use super::protocol::{self, MessageId, Reply};
use super::requests::{self, Serving};
use super::server::{client_reader, serve_client, Service};
use super::state::{Limits, State};
use crate::auth::Secret;
use crate::group::Group;
use crate::log_info;
use crate::outbox::{Outbox, Writer};
use crate::raft::driver::{RaftHandle, StateMachine};
use crate::raft::links::{self, LinkTransport};
use crate::raft::member::{Member, MemberOptions};
use crate::raft::Role;
use crate::request::{read_step, Step};
use crate::server::{Connection, HandlerError};
use fence::{Applied, Command, Machine};
use forward::ForwardMsg;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// A claim of an epoch not committed within this long is made again (the fence refuses
/// the duplicate if the first one lands after all).
const CLAIM_RETRY: Duration = Duration::from_secs(1);
/// How long [`Majority::stop`] waits for the service's threads.
const STOP_DEADLINE: Duration = Duration::from_secs(5);
/// Stack of the service's threads (client writers, ticker, proposer).
const STACK: usize = 128 << 10;

/// How a majority-mode server is set up.
#[derive(Debug, Clone)]
pub struct MajorityOptions {
    /// This server's id: its index in `peers`.
    pub id: usize,
    /// Every server's address, by id (clients and peers use the same port).
    pub peers: Vec<SocketAddr>,
    /// Where this server dials each server (`--dial`; by default `peers`).
    pub dial: Vec<SocketAddr>,
    /// Where the Raft log, hard state and snapshot live.
    pub data_dir: PathBuf,
    /// Snapshot after this many log entries.
    pub compact_after: u64,
    /// The cluster secret for the peer links.
    pub secret: Option<Secret>,
    /// One tick of Raft's clock (elections after 10–19 ticks without a leader).
    pub tick: Duration,
    /// What this server refuses as leader (`--max-accounts`); set the same on every
    /// server (every server applies what the leader decided, whatever its own).
    pub limits: Limits,
}

impl MajorityOptions {
    /// Server `id` of `peers`, keeping its data in `data_dir`: 10 ms ticks, the primary
    /// mode's compaction threshold.
    pub fn new(id: usize, peers: Vec<SocketAddr>, data_dir: PathBuf) -> MajorityOptions {
        MajorityOptions {
            id,
            dial: peers.clone(),
            peers,
            data_dir,
            compact_after: super::log::COMPACT_AFTER,
            secret: None,
            tick: Duration::from_millis(10),
            limits: Limits::default(),
        }
    }
}

/// The leader's epoch: what it decided since its claim was committed.
struct Lead {
    epoch: u64,
    /// The Raft term it claimed in: a change of term means it stopped leading meanwhile.
    term: u64,
    /// The next sequence number to give out.
    next: u64,
    /// The last one accepted (committed).
    committed: u64,
    /// The committed state plus every change decided since: what requests are decided on.
    view: State,
}

/// Everything behind the one lock: the committed state, the leader's view, the clients.
struct Inner {
    /// The committed state and the fence, as every server applies them.
    machine: Machine,
    lead: Option<Lead>,
    clients: Clients,
    /// Commands decided and not yet handed to Raft, in order.
    queue: Vec<Vec<u8>>,
    /// A claim proposed and not yet applied: when, and in which term.
    claim: Option<(Instant, u64)>,
    /// The leader Raft knows of, by id (refreshed every tick).
    leader: Option<usize>,
    /// As follower: client connections of this server forwarded to a leader.
    forwarded: HashMap<u64, Forwarded>,
    /// As leader: followers' connections it serves, by their registry id.
    remotes: HashMap<u64, Remote>,
    stopping: bool,
}

/// A client connection of this follower, served by `leader` through it.
struct Forwarded {
    leader: usize,
    /// Requests forwarded so far (the last one's number).
    sent: u64,
    /// Relays received so far (the last one's number).
    got: u64,
}

/// A follower's connection served by this leader.
struct Remote {
    peer: usize,
    /// Relays sent so far (the last one's number).
    sent: u64,
    /// Requests received so far (the last one's number).
    got: u64,
}

struct Shared {
    id: usize,
    /// What requests are decided within.
    limits: Limits,
    /// How many servers there are.
    peers: usize,
    inner: Mutex<Inner>,
    /// The proposer waits on this.
    queued: Condvar,
    /// The outgoing Raft links, for forwarding (set once Raft is started).
    links: OnceLock<LinkTransport>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Critical sections leave the state consistent before anything that can panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn step_down(&self, inner: &mut Inner, why: &str) {
        if let Some(lead) = inner.lead.take() {
            log_info!(
                "messenger-{}: stepping down from epoch {}: {why}",
                self.id,
                lead.epoch
            );
        }
        inner.clients.close_all();
    }

    /// Decides one request on the leader's view, numbers and queues its command, and
    /// queues its answer (and a send's delivery) to leave once that command is accepted;
    /// on a follower, forwards it. True when the connection is to close.
    fn request(&self, inner: &mut Inner, conn: u64, payload: &[u8]) -> bool {
        if let Some(close) = self.forward(inner, conn, payload) {
            return close;
        }
        let decoded = protocol::decode_request(payload);
        let serving = match (&inner.lead, inner.leader) {
            _ if inner.stopping => Serving::Unavailable,
            (Some(_), _) => Serving::Primary,
            (None, Some(l)) if l != self.id => Serving::Redirect(l),
            (None, _) => Serving::Unavailable,
        };
        if serving == Serving::Primary && !inner.clients.is_open(conn) {
            return true;
        }
        let state = inner
            .lead
            .as_ref()
            .map_or(&inner.machine.state, |l| &l.view);
        let effects = requests::respond(
            serving,
            state,
            self.limits,
            inner.clients.sessions(),
            conn,
            decoded,
        );
        let Some(lead) = inner.lead.as_mut() else {
            // A redirect, or nothing (a confirm): at once.
            if !effects.replies.is_empty() || effects.close {
                let out = Out::replies(0, None, &effects.replies, effects.close);
                inner.clients.send(conn, out, 0);
            }
            return effects.close;
        };
        let epoch = lead.epoch;
        let answers = effects.after_commit && !effects.replies.is_empty();
        let mut tag = None;
        if effects.change.is_some() || answers {
            let seq = lead.next;
            lead.next += 1;
            tag = Some(seq);
            if let Some(change) = &effects.change {
                let at = MessageId { epoch, seq };
                if let Some((to, d)) = lead.view.apply(at, change) {
                    let out = Out::replies(epoch, Some(seq), &[Reply::Deliver(d)], false);
                    inner.clients.send_to_user(&to, out, lead.committed);
                }
            }
            let command = Command::Change {
                epoch,
                seq,
                change: effects.change,
            };
            inner.queue.push(command.encode());
            self.queued.notify_all();
        }
        let committed = lead.committed;
        inner
            .clients
            .session_effect(conn, effects.session, effects.token);
        if !effects.replies.is_empty() || effects.close {
            let out = Out::replies(epoch, tag, &effects.replies, effects.close);
            inner.clients.send(conn, out, committed);
        }
        effects.close
    }
}

/// The Raft state machine: applies committed commands to the shared state, and on the
/// leader releases the answers they were waiting for.
struct Applier(Arc<Shared>);

impl StateMachine for Applier {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let shared = &self.0;
        let mut guard = shared.lock();
        let inner = &mut *guard;
        let command = match Command::decode(command) {
            Ok(c) => c,
            Err(e) => {
                // Every server decodes the same bytes the same way: all skip it.
                log_info!("messenger-{}: log entry {index}: {e}; skipped", shared.id);
                return Vec::new();
            }
        };
        let me = shared.id as u64;
        match inner.machine.apply(&command) {
            // Only a claim this process made and is waiting for: one of an earlier life,
            // replayed at a restart or learnt from the leader's log, names this server but
            // leads nothing now. Taken for a lead, it would answer requests whose changes
            // it can never commit, released at once by the replayed acceptances after it.
            Applied::Led { node, epoch } if node == me && inner.claim.is_some() => {
                let term = inner.claim.take().map_or(0, |(_, term)| term);
                if inner.lead.as_ref().is_none_or(|l| l.epoch != epoch) {
                    shared.step_down(inner, "a newer claim of mine");
                    log_info!("messenger-{}: leading epoch {epoch}", shared.id);
                    inner.lead = Some(Lead {
                        epoch,
                        term,
                        next: 1,
                        committed: 0,
                        view: inner.machine.state.clone(),
                    });
                }
            }
            Applied::Led { node, epoch } => {
                let who = if node == me {
                    "a claim of mine made before".to_owned()
                } else {
                    format!("server {node}")
                };
                shared.step_down(inner, &format!("{who} leads epoch {epoch}"));
            }
            Applied::NotLed { node } => {
                if node == me {
                    inner.claim = None;
                }
            }
            Applied::Accepted { at, .. } => {
                if let Some(lead) = inner.lead.as_mut().filter(|l| l.epoch == at.epoch) {
                    lead.committed = at.seq;
                    inner.clients.release(at.epoch, at.seq);
                }
            }
            Applied::Refused { epoch } => {
                if inner.lead.as_ref().is_some_and(|l| l.epoch == epoch) {
                    shared.step_down(inner, "a change of mine was refused");
                }
            }
        }
        shared.pump(inner);
        Vec::new()
    }

    fn snapshot(&mut self) -> Vec<u8> {
        self.0.lock().machine.encode()
    }

    fn restore(&mut self, data: &[u8]) -> io::Result<()> {
        let machine =
            Machine::decode(data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut inner = self.0.lock();
        self.0.step_down(&mut inner, "restoring a snapshot");
        // At start (before `listening on`) or from the leader (InstallSnapshot, after).
        log_info!(
            "messenger-{}: state restored from a snapshot: epoch {} seq {}, {} accounts",
            self.0.id,
            machine.fence.epoch,
            machine.fence.seq,
            machine.state.accounts()
        );
        self.0.pump(&mut inner);
        inner.machine = machine;
        Ok(())
    }
}

/// One messenger server in majority mode. Serve its port with [`Majority::serve`].
pub struct Majority {
    shared: Arc<Shared>,
    member: Member,
    group: Group,
}

impl Majority {
    /// Opens the data directory, restores the state from its snapshot, and starts Raft,
    /// the peer links, the ticker and the proposer.
    ///
    /// # Errors
    /// When the options are unusable (not 3 or 5 servers), the data directory is damaged
    /// or unreadable, or a thread cannot be started.
    pub fn open(options: &MajorityOptions) -> io::Result<Arc<Majority>> {
        let shared = Arc::new(Shared {
            id: options.id,
            limits: options.limits,
            peers: options.peers.len(),
            inner: Mutex::new(Inner {
                machine: Machine::default(),
                lead: None,
                clients: Clients::default(),
                queue: Vec::new(),
                claim: None,
                leader: None,
                forwarded: HashMap::new(),
                remotes: HashMap::new(),
                stopping: false,
            }),
            queued: Condvar::new(),
            links: OnceLock::new(),
        });
        let cluster = options
            .peers
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(";");
        let member_options = MemberOptions {
            index: options.id,
            dial: options.dial.iter().map(SocketAddr::to_string).collect(),
            // Bound into the links' proofs: a messenger cluster with this --peers list (no
            // commas: the hello's fields are comma-separated).
            cluster: format!("messenger;{cluster}"),
            framing: crate::framing::Framing::U32,
            secret: options.secret.clone(),
            data_dir: options.data_dir.clone(),
            tick: options.tick,
            compact_every: options.compact_after,
        };
        let member = Member::start(&member_options, Applier(Arc::clone(&shared)))?;
        let _ = shared.links.set(member.links());
        let group = Group::with_stack_size(&format!("messenger-{}", options.id), STACK);
        let majority = Arc::new(Majority {
            shared,
            member,
            group,
        });
        let (m, tick) = (Arc::clone(&majority), options.tick);
        let started = majority
            .group
            .spawn(format!("messenger-{}-tick", options.id), move || {
                m.run_ticker(tick)
            })
            .and_then(|()| {
                let m = Arc::clone(&majority);
                majority
                    .group
                    .spawn(format!("messenger-{}-propose", options.id), move || {
                        m.run_proposer()
                    })
            });
        if let Err(e) = started {
            majority.stop();
            return Err(io::Error::other(e));
        }
        Ok(majority)
    }

    /// Serves one accepted connection: a Raft peer's link if its first frame is a Raft
    /// hello, else a client.
    ///
    /// # Errors
    /// A framing error that loses sync, or a failed socket; each ends this connection only.
    pub fn serve(&self, conn: Connection) -> Result<(), HandlerError> {
        let mut reader = client_reader(&conn);
        let first = match read_step(&mut reader, &conn)? {
            Step::Frame(f) => f.to_vec(),
            Step::Skipped(_) => Vec::new(),
            Step::End => return Ok(()),
        };
        if first.starts_with(links::HELLO) {
            let cfg = self.member.peer_config();
            let raft = self.member.raft();
            return links::serve_peer_with(cfg, raft, &conn, &first, reader, &*self.shared);
        }
        serve_client(self, &conn, reader, first)
    }

    /// The Raft handle (status, leadership transfer).
    pub fn raft(&self) -> &RaftHandle {
        self.member.raft()
    }

    /// Stops serving clients: closes their connections and wakes the service's threads.
    /// Call it with the server's shutdown; then [`Majority::stop`].
    pub fn begin_stop(&self) {
        let mut inner = self.shared.lock();
        inner.stopping = true;
        inner.lead = None;
        inner.clients.stop();
        self.shared.pump(&mut inner);
        self.shared.queued.notify_all();
    }

    /// Stops: the service's threads, then Raft and the links.
    pub fn stop(&self) {
        self.begin_stop();
        self.group.close(STOP_DEADLINE);
        self.member.close();
    }

    /// Every tick: steps down when Raft no longer leads (or led again in another term
    /// meanwhile), claims an epoch when Raft leads and no claim of it is committed.
    fn run_ticker(&self, tick: Duration) {
        while !self.group.is_closing() {
            std::thread::sleep(tick);
            let status = self.member.raft().status();
            let mut guard = self.shared.lock();
            let inner = &mut *guard;
            if inner.stopping {
                return;
            }
            inner.leader = status.leader.map(|l| (l - 1) as usize);
            let leads = status.role == Role::Leader;
            if let Some(lead) = &inner.lead {
                if !leads || lead.term != status.term {
                    let why = format!("raft term {} role {:?}", status.term, status.role);
                    self.shared.step_down(inner, &why);
                }
            }
            // Connections forwarded to a leader that is no longer the one Raft knows (or
            // to another, now this server leads) fail over.
            let stale: Vec<u64> = (inner.forwarded.iter())
                .filter(|(_, f)| inner.lead.is_some() || inner.leader != Some(f.leader))
                .map(|(&conn, _)| conn)
                .collect();
            for conn in stale {
                self.shared.drop_forwarded(inner, conn);
            }
            self.shared.pump(inner);
            let claimed = inner
                .claim
                .is_some_and(|(at, term)| term == status.term && at.elapsed() < CLAIM_RETRY);
            // Only once everything in its log is applied (its term's first entry included):
            // a claim of its own from an earlier life, still in the log, is then applied
            // while no claim of this process waits, and leads nothing; and the fence the
            // claim reads is the log's.
            let caught_up = status.applied >= status.last_index;
            if leads && inner.lead.is_none() && !claimed && caught_up {
                let claim = Command::Lead {
                    node: self.shared.id as u64,
                    epoch: inner.machine.fence.epoch + 1,
                };
                inner.queue.push(claim.encode());
                inner.claim = Some((Instant::now(), status.term));
                self.shared.queued.notify_all();
            }
        }
    }

    /// Hands decided commands to Raft in the order they were decided, outside the lock
    /// (the driver's queue may be full, and the driver applies under the lock).
    fn run_proposer(&self) {
        loop {
            let batch = {
                let mut inner = self.shared.lock();
                while inner.queue.is_empty() && !inner.stopping {
                    inner = self
                        .shared
                        .queued
                        .wait(inner)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if inner.stopping {
                    return;
                }
                std::mem::take(&mut inner.queue)
            };
            // The outcomes are not awaited: answers are released as commands apply.
            drop(self.member.raft().propose_batch(batch));
        }
    }
}

impl Service for Majority {
    fn id(&self) -> usize {
        self.shared.id
    }

    fn add_client(&self, conn: u64, outbox: Outbox, writer: Writer) -> io::Result<()> {
        let name = format!("messenger-{}-out-{conn}", self.shared.id);
        self.group
            .spawn(name, move || writer.run())
            .map_err(io::Error::other)?;
        self.shared.lock().clients.add(conn, outbox);
        Ok(())
    }

    fn remove_client(&self, conn: u64) {
        let mut inner = self.shared.lock();
        if let Some(f) = inner.forwarded.remove(&conn) {
            self.shared.post(f.leader, &ForwardMsg::Closed { conn });
        }
        inner.clients.remove(conn);
    }

    fn request(&self, conn: u64, payload: &[u8]) -> bool {
        let mut guard = self.shared.lock();
        let close = self.shared.request(&mut guard, conn, payload);
        self.shared.pump(&mut guard);
        close
    }
}
