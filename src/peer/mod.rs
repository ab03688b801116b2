//! Serverless chat (`chat-peer`): every peer is a server, a client and a router at once.
//! Peers agree on who is in the room through a leader, and route each other's messages
//! over the links they have, by breadth-first search.
//!
//! - [`protocol`]: the peer-to-peer messages, term lines, parsed and formatted; pure.
//! - [`routing`]: link-state adverts and next hops by breadth-first search; pure.
//! - [`node`]: one peer's state (members, links, chat streams) as a state machine; pure.
//! - this module: the wiring: a framework [`Server`] for incoming links, dialled links, a
//!   writer thread with a bounded outbox per link, heartbeats, and the console;
//!   `printer`, the output's own thread, so a stdout nobody reads stops nothing else.
//!
//! # Identity and the leader
//!
//! A member is `(name, listen address, incarnation)`; the incarnation (microseconds since
//! the epoch at start) tells a restarted peer from its predecessor. Members are ordered by
//! name, then address, then incarnation; names are unique in a room. The **leader** is the
//! smallest member of the list that the peer looking does not consider down (itself
//! included). Nobody is elected: every peer computes it from the list it holds.
//!
//! # Membership
//!
//! - A list carries a version. A peer takes a list only if it **supersedes** the one it
//!   holds: a higher version, or the same version and a member sequence that compares
//!   smaller (see [`protocol::MemberList::supersedes`]); then it floods the list on all its
//!   links except the one it came on. A flood therefore ends, and every connected peer ends
//!   with the same list. A new link starts with the list and every advert its ends hold.
//! - Only the leader changes the list: it bumps the version and issues the whole sorted
//!   list, one change at a time (every input to a peer is handled under its one lock), so
//!   joins are serialised.
//! - **Join**: the joiner links to the `--via` peer, which sends it the list and the link
//!   adverts it holds (should `--via` be a joiner too, the list follows once it has one);
//!   the joiner then links to every member it may reach directly, asks a member (never
//!   another joiner) `who_leads` and sends `join_req` to that leader, routed (so a
//!   joiner forbidden to link to the leader joins through a member all the same). A
//!   non-leader answers `join_req` with `{leader,L}`; the leader admits, or refuses a taken
//!   or malformed name, or a room already of 256 members, with `{join_refused,Reason}`.
//!   The joiner repeats both every 500 ms until a list holding it arrives, so a leader
//!   that dies mid-join costs a retry, not the join; it gives up after 15 s. A name held
//!   by a member at the *same* address is a restart of that member (the old run cannot
//!   hold the port any more): the leader replaces the old run.
//! - **Failure**: a peer links to every member it may (the smaller of each pair dials; the
//!   larger too while it has no route to the smaller, which may not know of it yet), so
//!   a crash shows at once as broken links; a link silent for 3 s is closed too. Each peer
//!   floods its own links whenever they change, and that advert is its report: the leader
//!   sees a member that nobody links to any more as unreachable. A member unreachable in
//!   the leader's graph for 1 s is dropped (`[DROPPED] Name: unreachable` on a peer that
//!   cannot reach it either, `[LEAVE] Name` on the others). When the leader
//!   itself is the one unreachable, the next smallest member finds itself the leader after
//!   that second and issues the list without it; joins go on through it. Should its list
//!   tie with one the dead leader issued just before dying, the dead leader's wins (it
//!   holds a smaller member) and the new leader issues its change again on top of it.
//! - **Leave** (end of input, `exit`, Ctrl-C): the leaver waits until every line it sent
//!   is acknowledged (at most 1 s), then sends `leave` to the leader, which issues a list
//!   without it; a leaving leader issues that list itself, so the next smallest leads. The
//!   leaver exits once it holds such a list, or after 3 s in all.
//! - **Rooms.** A room is named by the member that founded it (unique to that run); every
//!   list carries it and every hello of a peer that holds a list. A link between peers of
//!   two rooms is refused (`{refused,other_room}`) and a list of another room ignored, so
//!   two rooms never merge by accident.
//! - **Splits heal.** A member dropped from the list while this peer had no route to it is
//!   *lost* (a split, or a crash): this peer dials its address every tick for as long as it
//!   is lost (the dials of one address paced by [`link::Backoff`], at most about 1 s apart)
//!   and keeps both chat streams with it. When a probe links the two halves, each end is
//!   handed the other's list. A joined peer never takes a list without itself: when such a
//!   list of its room supersedes its own, it is the winning half, and the peer sends its
//!   own list (`merge`) to that list's smallest member, every 500 ms until merged. That
//!   leader admits, in one new version, every member of the request whose name is free: one
//!   leader, one list, a version above both halves'. A member dropped while alive (a
//!   one-sided cut) asks back the same way instead of exiting.
//!
//! # Links and routing
//!
//! Every connection between peers is a link: `{hello,Member,Room}` each way (`{hello,Member}`
//! from a joiner with no list yet), then flooded lists and adverts, routed messages and
//! heartbeats. A list is taken only on the link of the leader that issued it whenever this
//! peer has a link to that leader, from any member otherwise (see `node`); a line this
//! peer cannot parse closes the link of a peer on no list it holds, and is skipped from a
//! member. `--no-direct ADDR` makes a peer refuse
//! (`{refused,no_direct}`) and never dial a link to ADDR, so their traffic is routed. When
//! two links between the same pair open at once, both ends keep the one dialled by the
//! smaller member (of two dialled by the same end, the newer); the other is half-closed
//! and read to its end, so nothing sent on it is lost. A replaced link's far end may
//! have given up on it before reading it (a hello that timed out across a cut), so the
//! new link brings the peer up to date again: the list and every advert. Routing rules
//! are in [`routing`]; each peer's own links count first hand, so a broken link reroutes
//! at once.
//!
//! # Delivery
//!
//! A typed line is sent to each other member as `{msg,Seq,Text}`, routed, where `Seq`
//! numbers the stream from this sender to that member (1, 2, 3, ...). The receiver prints
//! line `Seq` only after line `Seq-1` (holding lines that arrive early), drops repeats, and
//! answers `{ack,N}` for everything printed up to N; it ignores (and so does not
//! acknowledge) a line from a sender that is not on its list yet. The sender resends what
//! is not acknowledged every second (at most 256 lines a tick, so that a backlog does not
//! swamp one link), along whatever route exists then, so a line lost with a dead router,
//! or ignored by a member whose list lagged, arrives anyway: exactly once per member, in
//! the sender's order. A sender with 1,024 lines unacknowledged by
//! some member waits (for the ack, or for that member to be dropped). Both ends keep a
//! departed member's streams for 60 s, so a member dropped and put back by rival lists
//! carries on where it was.
//!
//! # Threads and timing
//!
//! One lock guards the [`node::PeerState`]; a link reader, the tick, the console and a dial
//! each take it to hand in one input, and carry out the resulting effects under it
//! (queueing lines without blocking, printing), so effects keep the node's order. Per link:
//! a reader thread and a writer thread that drains a bounded outbox (4,096 lines; a link
//! that far behind is closed) and sends a `heartbeat` after 250 ms idle. The bytes queued
//! on all links together, and what their readers and every accepted connection's reader
//! hold (a partial line, up to 256 KiB each), are charged to one budget
//! (`--max-client-memory`, 64 MiB by default; [`crate::link::Link::charged_outbox`], as
//! chat federation links are): a link the budget cannot cover (a cut network holding its
//! bytes) is closed at once, logged, detached and dialled again like any lost link, and
//! what it held goes again by the resend of unacknowledged lines, along whatever route
//! exists; a connection that is no link yet (a stranger's hello that never ends) is
//! closed, logged, and one whose hello and handshake are not done within the link timeout
//! is cut, however it trickles them ([`crate::server::ServerConfig::opening_timeout`]).
//! The tick runs
//! every 100 ms: dials missing links and lost members, retries a join or a merge, resends,
//! drops members down for 1 s. A dial that fails puts off the next one to that address by
//! its [`link::Backoff`]. Links read and write with the link timeout (`--link-timeout`,
//! 3 s by default); `--reach ADDR=VIA` dials a member's address at another.
//!
//! # Bounds
//!
//! Nothing a peer sends grows another without limit: link lines are at most 256 KiB
//! (longer ones are skipped), link queues and read buffers at most the budget above in all, lists at most
//! 256 members, chat lines at most 16 KiB, lines
//! held for a gap at most 16 MiB in all (more are dropped unacknowledged and come again),
//! and adverts of peers not on the list at most 256, each kept 15 s.
//!
//! # Output
//!
//! `[Name] text` for a message, `[JOIN] Name` and `[LEAVE] Name` for membership changes
//! (`[DROPPED] Name: unreachable` for a member dropped that this peer could not reach),
//! and `[MEMBERS vN by L] a,b,c` after every change of the list held (first at admission;
//! `L` is the leader that issued version N: the label names one list). `[UNREACHABLE] Name`
//! / `[REACHABLE] Name` when a member's routes go and come back, and `[NOT SENT] ...` for a
//! typed line that reaches nobody now (see `node`'s `reach`).

mod links;
pub mod node;
mod printer;
pub mod protocol;
pub mod routing;

use crate::auth::{cluster_secret, PolicyError, Secret};
use crate::budget::Budget;
use crate::framing::{FrameReader, Framing, Limits};
use crate::group::{Group, Running, Stop};
use crate::link::{self, Answer, Backoff, Dialer, End, Link, LinkError, Timeouts, Verdict};
use crate::outbox::{Bytes, Outbox, OutboxConfig};
use crate::server::{Connection, HandlerError, RunningServer, Server, ServerConfig};
use crate::{log_debug, log_info};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use links::{accept_link, dial, line, link_limits};
use node::{Effect, Outcome, PeerState, SayError};
use printer::{Printer, OUTPUT_QUEUE};
use protocol::{valid_name, Member, PeerMessage, MAX_LINE, MAX_NAME};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, ToSocketAddrs};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the periodic work runs (dialling, join retries, resends, failure checks).
pub const TICK: Duration = Duration::from_millis(100);
/// A link with nothing to send sends a heartbeat after this long.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// A link that receives nothing for this long is closed (12 heartbeats missed): the
/// default of `--link-timeout`.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(3);
/// Lines queued on one link beyond which the link is closed as stuck.
pub const OUTBOX: usize = 4096;
/// `--max-client-memory` unless set: bytes the queues of all links together may hold (see
/// [`PeerConfig::max_client_memory`]). Four times a full window of the longest lines to
/// one member (1,024 × 16 KiB), sixteen resend bursts of them; a small share of a machine.
pub const DEFAULT_MAX_CLIENT_MEMORY: usize = 64 << 20;
/// How long a leaving peer waits for its last lines to be acknowledged and then for the
/// list without it (see [`node::LEAVE_FLUSH`]).
pub const LEAVE_WAIT: Duration = Duration::from_secs(3);
/// Longest line a peer may type, in bytes.
pub use protocol::MAX_TEXT;
/// Dial in 1 s; answer a hello, write, and hear something (a heartbeat at least) within
/// the link timeout (`--link-timeout`, [`LINK_TIMEOUT`] by default), or the link is closed.
fn timeouts(link_timeout: Duration) -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(1),
        handshake: link_timeout,
        write: link_timeout,
        idle: Some(link_timeout),
    }
}
/// How long stopping waits for link writers to flush, and then for link threads to end.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// What a peer is told on the command line.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Where to listen for links (port 0 picks one).
    pub listen: String,
    /// The name to chat under.
    pub name: String,
    /// A member of the room to join; `None` starts a new room.
    pub via: Option<String>,
    /// Addresses of peers this one must never link to directly.
    pub no_direct: Vec<String>,
    /// The room's secret (`--secret-file`): with it every link proves it both ways
    /// ([`crate::auth`]) before its hello reaches the node; see [`secret_policy`].
    pub secret: Option<Secret>,
    /// A link silent this long is closed (`--link-timeout`; [`LINK_TIMEOUT`] by default,
    /// at least [`MIN_LINK_TIMEOUT`]): the bound on noticing a cut network.
    pub link_timeout: Duration,
    /// `(ADDR, VIA)` pairs (`--reach ADDR=VIA`): the peer listening at `ADDR` (as members
    /// know it) is dialled at `VIA` (a port forward, a tunnel, a test's fault proxy).
    pub reach: Vec<(String, String)>,
    /// Bytes the queues and read buffers of all this peer's links and connections, and the
    /// output's queue (`printer`), together may hold (`--max-client-memory`;
    /// [`DEFAULT_MAX_CLIENT_MEMORY`] by default), besides the cap of [`OUTBOX`] lines per
    /// link. While a cut network holds a link's bytes its queue grows; a link the budget
    /// cannot cover is closed at once (logged) and redialled, and its lines go again by the
    /// resend of what is unacknowledged (see [`crate::link::Link::charged_outbox`]). A
    /// connection whose hello has not ended yet is charged for what its reader holds, so
    /// strangers sending lines that never end cannot hold more than the budget either.
    pub max_client_memory: usize,
}

impl PeerConfig {
    /// A peer listening on `listen` as `name` that starts a room; every other setting at
    /// its default.
    pub fn new(listen: &str, name: &str) -> PeerConfig {
        PeerConfig {
            listen: listen.to_owned(),
            name: name.to_owned(),
            via: None,
            no_direct: Vec::new(),
            secret: None,
            link_timeout: LINK_TIMEOUT,
            reach: Vec::new(),
            max_client_memory: DEFAULT_MAX_CLIENT_MEMORY,
        }
    }
}

/// Parses `--reach ADDR=VIA`.
///
/// # Errors
/// Without an `=`, or with an empty side.
pub fn parse_reach(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((addr, via)) if !addr.is_empty() && !via.is_empty() => {
            Ok((addr.to_owned(), via.to_owned()))
        }
        _ => Err(format!("expected ADDR=VIA, got {arg:?}")),
    }
}

/// The shortest `--link-timeout`: several heartbeats must fit in it.
pub const MIN_LINK_TIMEOUT: Duration = Duration::from_millis(1000);

/// Every tag of a chat-peer link is bound to this name: a proof made for another service
/// sharing the secret file is worthless here.
const CLUSTER: &[u8] = b"switchboard chat-peer room";

/// What a member proves on a link: all of it (name, address, incarnation), so a proof
/// cannot be reused for another name at the same address.
fn identity(m: &Member) -> Vec<u8> {
    format!("{}@{}#{}", m.name, m.addr, m.inc).into_bytes()
}

/// The start-up rule of `--secret-file` for a peer listening on `listen` and joining via
/// `via`: [`crate::auth::cluster_secret`] over both addresses.
///
/// # Errors
/// An address that does not resolve, an unusable secret file, or no secret with an
/// address off loopback.
pub fn secret_policy(
    secret_file: Option<&std::path::Path>,
    listen: &str,
    via: Option<&str>,
) -> Result<Option<Secret>, PeerError> {
    let mut addrs = Vec::new();
    for addr in std::iter::once(listen).chain(via) {
        let resolved = addr
            .to_socket_addrs()
            .map_err(|source| PeerError::Resolve {
                addr: addr.to_owned(),
                source,
            })?;
        addrs.extend(resolved);
    }
    cluster_secret(secret_file, &addrs, "the room").map_err(PeerError::Secret)
}

/// Why a peer could not start, join or stay.
#[derive(Debug)]
pub enum PeerError {
    /// The name is not 1 to 32 letters, digits, `_`, `-` or `.`.
    BadName(String),
    /// `--via` names a peer that `--no-direct` forbids linking to.
    ViaForbidden(String),
    /// An address that does not resolve.
    Resolve {
        /// The address as given.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The listening address cannot be bound.
    Listen {
        /// The address as given.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// A thread cannot be started.
    Io(io::Error),
    /// The leader refused to admit this peer.
    JoinRefused {
        /// The name asked for.
        name: String,
        /// The leader's reason (`name_taken`, `bad_name`).
        reason: String,
    },
    /// No leader admitted this peer in time.
    JoinTimeout,
    /// The `--via` peer could not be reached, before any link was made.
    ViaUnreachable {
        /// The address dialled.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// `--link-timeout` below [`MIN_LINK_TIMEOUT`].
    LinkTimeout(Duration),
    /// `--secret-file` is unusable, or missing where it is required.
    Secret(PolicyError),
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerError::BadName(name) => write!(
                f,
                "bad name {name:?}: use 1 to {MAX_NAME} letters, digits, '_', '-' or '.'"
            ),
            PeerError::ViaForbidden(addr) => {
                write!(
                    f,
                    "cannot join via {addr}: --no-direct forbids linking to it"
                )
            }
            PeerError::Resolve { addr, source } => write!(f, "cannot resolve {addr}: {source}"),
            PeerError::Listen { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            PeerError::Io(e) => write!(f, "{e}"),
            PeerError::JoinRefused { name, reason } if reason == "name_taken" => {
                write!(f, "join refused: the name {name} is taken in this room")
            }
            PeerError::JoinRefused { name, reason } => {
                write!(f, "join refused for {name}: {reason}")
            }
            PeerError::JoinTimeout => f.write_str("no leader admitted this peer in time"),
            PeerError::ViaUnreachable { addr, source } => {
                write!(f, "cannot reach --via {addr}: {source}")
            }
            PeerError::LinkTimeout(d) => write!(
                f,
                "--link-timeout {d:?} is too short: at least {MIN_LINK_TIMEOUT:?} (heartbeats go every {HEARTBEAT:?})"
            ),
            PeerError::Secret(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for PeerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PeerError::Resolve { source, .. }
            | PeerError::Listen { source, .. }
            | PeerError::ViaUnreachable { source, .. } => Some(source),
            PeerError::Io(e) => Some(e),
            PeerError::Secret(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for PeerError {
    fn from(e: io::Error) -> Self {
        PeerError::Io(e)
    }
}

/// What the threads of a peer tell its main loop.
#[derive(Debug)]
enum Event {
    Joined,
    Finished(Outcome),
    /// End of input, `exit`, or a signal: leave.
    Quit,
    /// The first dial to the `--via` peer failed: there is no room to join there.
    ViaUnreachable(SocketAddr, io::Error),
}

/// A live link: its outbox, and which end dialled it.
struct LinkSlot {
    id: u64,
    dialed_by_me: bool,
    outbox: Outbox,
}

/// What became of a link whose hello exchange is done.
enum Attached {
    /// It is the link to that peer now, and its writer runs.
    Registered,
    /// An existing link to that peer is kept; this one is read to its end.
    Duplicate,
    /// The peer is shutting down (or no writer could be started).
    Closing,
}

/// Everything behind the peer's one lock.
struct State {
    node: PeerState,
    links: HashMap<Member, LinkSlot>,
    /// Queues the node's lines for the output thread; `None` once the peer has stopped.
    output: Option<Printer>,
    dialing: HashSet<SocketAddr>,
    /// Addresses whose last dial failed: not dialled again before the time here, drawn
    /// from the address's [`Backoff`] (reset, and the entry gone, once a link is up).
    redial: HashMap<SocketAddr, (Backoff, Instant)>,
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled after every change of state, for a sender waiting on a full window.
    changed: Condvar,
    events: Sender<Event>,
    next_id: AtomicU64,
    /// Dials and the links they serve, with every link socket (registered, losing a
    /// duplicate contest, or mid-handshake), so shutdown can close them all.
    links: Group,
    /// Link writers: joined before the sockets are closed, so each flushes its outbox.
    writers: Group,
    /// The output thread (`printer`): joined last, so every line decided is written.
    printer: Group,
    dialer: Dialer,
    /// What this peer proves on every link, dialled or accepted (`--secret-file`).
    auth: Option<link::Auth>,
    /// Every link's timeouts (`--link-timeout`).
    timeouts: Timeouts,
    /// Where to dial a member's address instead (`--reach`).
    reach: HashMap<SocketAddr, SocketAddr>,
    /// What every link's queue is charged to (`--max-client-memory`).
    budget: Budget,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Runs `f` on the node under the lock and carries out its effects there too, so
    /// lines are queued and printed in the order the node decided them.
    fn with_node<T>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut PeerState, Instant, &mut Vec<Effect>) -> T,
    ) -> T {
        let mut st = self.state();
        let mut effects = Vec::new();
        let result = f(&mut st.node, Instant::now(), &mut effects);
        self.apply(&mut st, effects);
        drop(st);
        self.changed.notify_all();
        result
    }

    fn apply(self: &Arc<Self>, st: &mut State, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Send(to, msg) => {
                    // A full outbox closes its link and says why; a closed one is on its
                    // way to being detached.
                    if let Some(link) = st.links.get(&to) {
                        let _ = link.outbox.send(Bytes::from(line(&msg)));
                    }
                }
                Effect::Print(line) => {
                    // Queued, in the order decided: a write here, under the lock, would
                    // stop the whole peer while nobody reads the output (`printer`).
                    if let Some(output) = &mut st.output {
                        output.print(line);
                    }
                }
                Effect::Dial(addr) => {
                    let now = Instant::now();
                    let backing_off = st.redial.get(&addr).is_some_and(|(_, at)| now < *at);
                    if !st.closing && !backing_off && st.dialing.insert(addr) {
                        let shared = Arc::clone(self);
                        if self
                            .links
                            .spawn("peer-dial", move || dial(shared, addr))
                            .is_err()
                        {
                            st.dialing.remove(&addr);
                        }
                    }
                }
                Effect::Joined => {
                    let _ = self.events.try_send(Event::Joined);
                }
                Effect::Finish(outcome) => {
                    let _ = self.events.try_send(Event::Finished(outcome));
                }
            }
        }
    }

    /// Registers a link to `peer` whose hello exchange is done, and starts its writer.
    fn attach<R: Read>(
        self: &Arc<Self>,
        peer: &Member,
        link: &mut Link<R>,
        id: u64,
        dialed_by_me: bool,
    ) -> Attached {
        let mut st = self.state();
        if st.closing {
            return Attached::Closing;
        }
        let fresh = match st.links.get(peer) {
            None => true,
            Some(old) => {
                // Both ends apply the same rule to the same two links and keep the same one.
                let new_wins = if old.dialed_by_me == dialed_by_me {
                    true
                } else {
                    let me_smaller = st.node.me() < peer;
                    dialed_by_me == me_smaller
                };
                if !new_wins {
                    return Attached::Duplicate;
                }
                false
            }
        };
        let heartbeat = Bytes::from(line(&PeerMessage::Heartbeat));
        let config = OutboxConfig::new(format!("peer: link to {peer}"), OUTBOX)
            .heartbeat(HEARTBEAT, heartbeat);
        // Charged to the budget: a link that a cut network makes hold more than it can
        // cover is closed (logged), detached, and dialled again by the tick.
        let (outbox, writer) = link.charged_outbox(config, Some(&self.budget));
        // Started under the lock that `closing` is set under, so `Peer::stop` either finds
        // this writer in `writers` or this link sees `closing`: no writer goes unjoined.
        if self
            .writers
            .spawn("peer-writer", move || writer.run())
            .is_err()
        {
            return Attached::Closing;
        }
        // Replacing a link drops its outbox: its writer sends what is queued and half-closes.
        st.links.insert(
            peer.clone(),
            LinkSlot {
                id,
                dialed_by_me,
                outbox,
            },
        );
        let mut effects = Vec::new();
        if fresh {
            log_debug!("peer: link to {peer} up");
            st.node.link_up(peer.clone(), &mut effects);
        } else {
            log_debug!("peer: link to {peer} replaced");
            st.node.link_replaced(peer.clone(), &mut effects);
        }
        self.apply(&mut st, effects);
        Attached::Registered
    }

    /// Forgets link `id` to `peer`, if it is still the registered one.
    fn detach(self: &Arc<Self>, peer: &Member, id: u64) {
        let mut st = self.state();
        if st.links.get(peer).is_some_and(|l| l.id == id) {
            st.links.remove(peer);
            log_debug!("peer: link to {peer} down");
            let mut effects = Vec::new();
            st.node.link_down(peer, &mut effects);
            self.apply(&mut st, effects);
        }
    }

    /// Sends a typed line, waiting while a window is full; false once not a member.
    fn say(self: &Arc<Self>, text: &str) -> bool {
        let mut st = self.state();
        loop {
            if st.closing {
                return false;
            }
            let mut effects = Vec::new();
            match st.node.say(text, Instant::now(), &mut effects) {
                Ok(()) => {
                    self.apply(&mut st, effects);
                    return true;
                }
                Err(SayError::NotMember) => return false,
                Err(SayError::Busy) => {
                    st = self
                        .changed
                        .wait_timeout(st, TICK)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
    }
}

/// A running peer.
pub struct Peer {
    shared: Arc<Shared>,
    events: Receiver<Event>,
    server: Option<RunningServer>,
    ticker: Option<Running<Ticker, ()>>,
    local: SocketAddr,
}

/// Stops the tick thread.
struct Ticker(Sender<()>);

impl Stop for Ticker {
    fn stop(&self) {
        let _ = self.0.try_send(());
    }
}

/// Asks a running peer to leave the room (Ctrl-C); cloneable, usable from any thread.
#[derive(Clone)]
pub struct PeerHandle {
    events: Sender<Event>,
}

impl PeerHandle {
    /// Leaves the room and shuts the peer down; returns at once.
    pub fn leave(&self) {
        let _ = self.events.try_send(Event::Quit);
    }
}

impl Peer {
    /// Binds, starts serving links, and starts a room or begins joining one; chat lines
    /// and membership changes are written to `output`, by a thread of their own (from a
    /// queue of at most 32 MiB, charged to the client memory budget: an output nobody
    /// reads loses lines, marked `[NOT SHOWN]`, and stops nothing else).
    ///
    /// # Errors
    /// A bad name, a `--via` that `--no-direct` forbids, an address that does not resolve
    /// or cannot be bound, or a thread that cannot be started.
    pub fn start(config: &PeerConfig, output: Box<dyn Write + Send>) -> Result<Peer, PeerError> {
        if !valid_name(&config.name) {
            return Err(PeerError::BadName(config.name.clone()));
        }
        let resolve = |addr: &String| {
            addr.to_socket_addrs()
                .map(|a| a.collect::<Vec<_>>())
                .map_err(|source| PeerError::Resolve {
                    addr: addr.clone(),
                    source,
                })
        };
        let via = match &config.via {
            // Resolving to no address at all must not quietly start a room of our own.
            Some(v) => Some(
                resolve(v)?
                    .first()
                    .copied()
                    .ok_or_else(|| PeerError::Resolve {
                        addr: v.clone(),
                        source: io::Error::new(io::ErrorKind::NotFound, "no address"),
                    })?,
            ),
            None => None,
        };
        let mut no_direct = Vec::new();
        for addr in &config.no_direct {
            no_direct.extend(resolve(addr)?);
        }
        if config.link_timeout < MIN_LINK_TIMEOUT {
            return Err(PeerError::LinkTimeout(config.link_timeout));
        }
        let mut reach = HashMap::new();
        for (addr, via) in &config.reach {
            let first = |a: &String| {
                resolve(a)?
                    .first()
                    .copied()
                    .ok_or_else(|| PeerError::Resolve {
                        addr: a.clone(),
                        source: io::Error::new(io::ErrorKind::NotFound, "no address"),
                    })
            };
            reach.insert(first(addr)?, first(via)?);
        }
        let timeouts = timeouts(config.link_timeout);
        if let (Some(addr), Some(v)) = (via, &config.via) {
            if no_direct.contains(&addr) {
                return Err(PeerError::ViaForbidden(v.clone()));
            }
        }
        let listen = |source| PeerError::Listen {
            addr: config.listen.clone(),
            source,
        };
        let listener = TcpListener::bind(&config.listen).map_err(listen)?;
        let local = listener.local_addr().map_err(listen)?;
        let inc = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let me = Member {
            name: config.name.clone(),
            addr: local,
            inc,
        };
        let mut effects = Vec::new();
        let my_identity = identity(&me);
        let node = PeerState::new(me, via, no_direct, Instant::now(), &mut effects);
        let (events_tx, events) = bounded(64);
        let links = Group::new("peer");
        let printer = Group::with_stack_size("peer", 128 << 10);
        let budget = Budget::new("peer", config.max_client_memory);
        let charged = Some((&budget, "peer: the output"));
        let output = Printer::start(output, OUTPUT_QUEUE, charged, &printer)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                node,
                links: HashMap::new(),
                output: Some(output),
                dialing: HashSet::new(),
                redial: HashMap::new(),
                closing: false,
            }),
            changed: Condvar::new(),
            events: events_tx,
            next_id: AtomicU64::new(0),
            links: links.clone(),
            writers: Group::with_stack_size("peer", 128 << 10),
            printer,
            dialer: Dialer {
                limits: link_limits(),
                group: Some(links),
                ..Dialer::new(Framing::Line, timeouts)
            },
            auth: config.secret.clone().map(|secret| link::Auth {
                secret,
                cluster: CLUSTER.to_vec(),
                identity: my_identity,
            }),
            timeouts,
            reach,
            budget,
        });
        {
            let mut st = shared.state();
            shared.apply(&mut st, effects);
        }
        let mut server_config = ServerConfig::named("peer");
        server_config.idle_timeout = Some(config.link_timeout);
        // The hello and the handshake as a whole, not just each read of them: a hello
        // trickled a byte at a time would otherwise hold a slot for as long as it may be.
        server_config.opening_timeout = Some(config.link_timeout);
        server_config.client_memory = Some(shared.budget.clone());
        let for_links = Arc::clone(&shared);
        let server = Server::from_listener(listener, server_config, move |conn| {
            accept_link(&for_links, conn)
        })?
        .spawn()?;
        let (stop, stopped) = bounded::<()>(1);
        let for_ticks = Arc::clone(&shared);
        let ticker = Running::spawn("peer-tick", Ticker(stop), move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                for_ticks.with_node(|node, now, out| node.tick(now, out));
            }
        })?;
        Ok(Peer {
            shared,
            events,
            server: Some(server),
            ticker: Some(ticker),
            local,
        })
    }

    /// The address this peer listens on (and is known by).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The budget every link's queue is charged to, for its counters.
    pub fn client_memory(&self) -> &Budget {
        &self.shared.budget
    }

    /// A handle to make the peer leave.
    pub fn handle(&self) -> PeerHandle {
        PeerHandle {
            events: self.shared.events.clone(),
        }
    }

    /// Waits for admission, then sends every line read from `input` to the room until
    /// the input ends (or a line is `exit`), or the peer is told to leave; then leaves and
    /// shuts down. The thread reading `input` is not joined: a blocking read of stdin
    /// cannot be interrupted, and it ends with the process.
    ///
    /// # Errors
    /// When the join is refused or times out. (A peer dropped from the room while alive
    /// asks to be merged back; that does not end it.)
    pub fn run(mut self, input: impl Read + Send + 'static) -> Result<(), PeerError> {
        // Admission comes first: no line is read before this peer is a member.
        match self.events.recv() {
            Ok(Event::Joined) => {}
            Ok(Event::Finished(outcome)) => return self.finish(outcome),
            Ok(Event::ViaUnreachable(addr, source)) => {
                self.stop();
                return Err(PeerError::ViaUnreachable { addr, source });
            }
            Ok(Event::Quit) | Err(_) => return self.finish(Outcome::Left),
        }
        let shared = Arc::clone(&self.shared);
        thread::Builder::new()
            .name("peer-console".into())
            .spawn(move || console(&shared, input))?;
        loop {
            match self.events.recv() {
                Ok(Event::Joined | Event::ViaUnreachable(..)) => {}
                Ok(Event::Finished(outcome)) => return self.finish(outcome),
                Ok(Event::Quit) | Err(_) => break,
            }
        }
        self.shared.with_node(|node, now, out| node.leave(now, out));
        let deadline = Instant::now() + LEAVE_WAIT;
        while let Ok(event) = self
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if let Event::Finished(outcome) = event {
                return self.finish(outcome);
            }
        }
        self.finish(Outcome::Left)
    }

    fn finish(mut self, outcome: Outcome) -> Result<(), PeerError> {
        self.stop();
        match outcome {
            Outcome::Left => Ok(()),
            Outcome::JoinTimeout => Err(PeerError::JoinTimeout),
            Outcome::Refused(reason) => Err(PeerError::JoinRefused {
                name: self.shared.state().node.me().name.clone(),
                reason,
            }),
        }
    }

    /// Stops ticking, lets every link send what is queued, closes every socket and joins
    /// every thread (the console reader excepted).
    fn stop(&mut self) {
        let Some(ticker) = self.ticker.take() else {
            return;
        };
        ticker.stop();
        let links = {
            let mut st = self.shared.state();
            st.closing = true;
            std::mem::take(&mut st.links)
        };
        // Dropping the outboxes makes each writer flush and half-close (a leaving leader's
        // last list goes out this way); writes time out after LINK_TIMEOUT at worst.
        drop(links);
        self.shared.writers.join(STOP_WAIT);
        // Then every socket, links mid-handshake included; the readers and dials end.
        self.shared.links.shutdown();
        if let Some(server) = self.server.take() {
            server.stop();
        }
        self.shared.links.close(STOP_WAIT);
        self.shared.writers.close(STOP_WAIT);
        // Last, the output: what is queued is written, unless nobody reads it.
        drop(self.shared.state().output.take());
        if !self.shared.printer.join(STOP_WAIT).stragglers.is_empty() {
            log_info!(
                "peer: the output is still not being read after {STOP_WAIT:?}; \
                 the lines queued for it are left unwritten"
            );
        }
        log_debug!("peer: stopped; {}", self.shared.budget.summary());
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends each line of `input` to the room; asks the peer to leave at its end.
fn console(shared: &Arc<Shared>, input: impl Read) {
    let mut input = BufReader::new(input);
    let mut line = Vec::new();
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        if text == "exit" {
            break;
        }
        if text.is_empty() {
            continue;
        }
        if text.len() > MAX_TEXT {
            log_info!(
                "peer: line of {} bytes not sent (max {MAX_TEXT})",
                text.len()
            );
            continue;
        }
        if !shared.say(text) {
            return;
        }
    }
    let _ = shared.events.try_send(Event::Quit);
}
