//! The federation: which servers are members, the links between them, and what happens
//! when one goes quiet, goes away or comes back. Failure model: servers crash, leave, or
//! are cut off (packets stop, nothing is closed) and later reachable again.
//!
//! 1. **One-way links.** Every member dials every other member and only writes its own
//!    lines on the link it dialled; it reads only the links others dialled to it (on which
//!    it writes nothing but heartbeats, and `{server_leave,..}` when it leaves). Two
//!    servers are joined by two links, one each way, so nobody has to decide who dials,
//!    and each server's own events go out on one ordered link per peer.
//! 2. **Heartbeats.** Every link carries a `heartbeat` line each way whenever it has been
//!    idle for a third of the dead-peer bound (`--link-timeout`, 3 s by default), and a link
//!    silent for the whole bound is dead ([`crate::link::Liveness`]). A dialled link sends a
//!    heartbeat first thing after the welcome: the acceptor counts a link to it as
//!    *confirmed* once a line arrives after the welcome (a hello that was held in a cut
//!    network and delivered after its dialler gave up never is).
//! 3. **Live peers.** A peer is live when our dialled link to it is up and its link to us is
//!    confirmed. Then, under the lock that orders events, we send it `{present,Name}` for
//!    each of our clients and the member list, and from then on every event of our clients.
//!    The member list is this server and its live peers; whenever it grows it goes to every
//!    live peer (`{update_servers,..}`), and a server that hears of one it does not know
//!    dials it. Lists merge by union minus the servers known to be gone.
//! 4. **A lost peer** is one whose link either way ends or goes silent past the bound, or
//!    whose dialled link's queue overflows (more lines than `ChatConfig::link_outbox`, or
//!    more bytes than the server's client memory budget, `--max-client-memory`, can
//!    cover): both links are closed (what was queued on them is dropped), its clients are
//!    announced leaving to local clients, and it is redialled ([`link::redial`],
//!    jittered, at most 1 s apart) for as long as it is known. The peer
//!    sees its links end (or go silent) and does the same, so both sides re-form as soon
//!    as the network lets them: each dials, each link is confirmed, each side goes live and
//!    sends its `present` lines, which the other shows as `{join,..}`.
//! 5. **A gone peer** said `{server_leave,..}`, or answered a redial as another server (a
//!    restart at its address) or as one that has us for gone: it is removed for good and
//!    remembered, so a stale member list cannot bring it back. A restarted server has a new
//!    incarnation: it is a new member. When the gone server was the one `--join` named, the
//!    join is tried again at its address ([`rejoin`]) until a server there answers.
//! 6. **A new link from a peer that already has one to us** means it has lost the old one:
//!    once the new link is confirmed, the old links are closed as for a lost peer, and the
//!    new one replaces them. Until then both are kept: a hello delivered late by a network
//!    that held it (its dialler gave up long ago) never confirms, and replaces nothing.
//!
//! A crash is never reported second-hand: every member sees its own links to the crashed
//! server end, so no server can be expelled on another's word.

use super::hub::Line;
use super::protocol::{self, Hello, PeerMessage, ServerId, Welcome};
use super::{encode, line_limits, Chat};
use crate::framing::{FrameReader, Framing};
use crate::link::{self, Answer, Backoff, Dialer, End, Link, LinkError, Timeouts, Verdict};
use crate::log::{Quota, BAD_REQUEST_LINES};
use crate::outbox::{Outbox, OutboxConfig};
use crate::server::{Connection, HandlerError};
use crate::term::Term;
use crate::{log_debug, log_info};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::net::{Shutdown, TcpStream};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

/// Servers one server links to, at most: each costs four threads and two sockets.
const MAX_PEERS: usize = 256;
/// Client names one peer's roster holds, at most. A real server announces one per client
/// connection (10,000 by default); the cap stops a connection that merely says
/// `{server_hello,..}` from growing this server's memory without bound, one
/// `{present,Name}` line at a time.
const MAX_ROSTER: usize = 1 << 16;
/// Client names all peers' rosters hold together, at most (about 35 MB of names): up to
/// [`MAX_PEERS`] strangers that confirmed a link could otherwise each hold
/// [`MAX_ROSTER`] of them while their links last, gigabytes uncharged.
const MAX_ROSTERS: usize = 1 << 18;
/// Gone servers remembered, at most (a stale list naming an older one costs one failed dial).
const MAX_GONE: usize = 4096;
/// Connecting to a server may take 3 s, its answer to `{server_hello,..}` 5 s, both cut to
/// the dead-peer bound when it is shorter; a link write blocked 5 s means the peer has
/// stopped reading, and the link fails. Reads are bounded by the dead-peer bound
/// ([`Chat::timeouts`]).
pub(super) const BASE_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(3),
    handshake: Duration::from_secs(5),
    write: Duration::from_secs(5),
    idle: None,
};
/// Lines the heartbeat outbox of a link to us may hold (it holds only heartbeats).
const HEARTBEAT_OUTBOX: usize = 4;
/// Refusals after which a peer is not redialled: it has restarted as another server, has
/// us for gone, is leaving, or is us.
const FINAL_REFUSALS: [&str; 4] = [
    "wrong_server",
    "server_gone",
    "shutting_down",
    "same_address",
];

/// The member list and the links, kept in the chat state under its lock.
pub struct Federation {
    me: ServerId,
    peers: BTreeMap<ServerId, Neighbour>,
    gone: VecDeque<ServerId>,
    leaving: bool,
    next_link: u64,
    /// The addresses of the server `--join` named: as given, and as it answered. While no
    /// known server has one of them, the join is tried again (rule 5).
    configured: Vec<String>,
    /// Whether a thread is trying the join again.
    rejoining: bool,
}

struct Neighbour {
    out: Out,
    /// The link this peer dialled to us, which we read, once confirmed (rule 2).
    incoming: Option<InLink>,
    /// Newer links from it, welcomed and not confirmed yet (rule 6), oldest first.
    pending: VecDeque<InLink>,
    /// Both links up: our clients' events go to it, and it is a member (rule 3).
    live: bool,
    /// The clients on that server, as announced on its link.
    roster: BTreeSet<String>,
    /// Whether a name was refused for the roster being full (logged once per peer).
    roster_full: bool,
    /// Known only from its own hello and never live: forgotten once no link from it is
    /// left ([`Federation::forget_stranger`]).
    stranger: bool,
}

/// The state of our link to a peer.
enum Out {
    /// Being dialled (or redialled: the peer is lost).
    Dialing,
    /// Up: its outbox (the only one, so dropping it closes the link) and its number, by
    /// which a report from the link's threads is told from a stale one.
    Up { outbox: Outbox, link: u64 },
}

/// A link a peer dialled to us: its socket, and the outbox of the heartbeats (and, when we
/// leave, the `{server_leave,..}`) we write on it.
pub struct InLink {
    pub stream: Arc<TcpStream>,
    pub beats: Outbox,
}

impl InLink {
    fn is(&self, stream: &Arc<TcpStream>) -> bool {
        Arc::ptr_eq(&self.stream, stream)
    }

    fn close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Whether `link` is `stream`.
fn is(link: &Option<InLink>, stream: &Arc<TcpStream>) -> bool {
    link.as_ref().is_some_and(|l| l.is(stream))
}

/// Unconfirmed links from one peer kept at most (the oldest is closed beyond).
const MAX_PENDING: usize = 4;

/// A line arrived on a peer's link to us: how it counts.
pub enum LinkLine {
    /// The link is not (or no longer) one of the peer's: the line is dropped.
    Stale,
    /// The current link.
    Current,
    /// It confirmed a new link, which is now the current one; the clients in the vector
    /// left with the links it replaced (rule 6).
    Confirmed(Vec<String>),
}

impl Federation {
    pub fn new(me: ServerId) -> Federation {
        Federation {
            me,
            peers: BTreeMap::new(),
            gone: VecDeque::new(),
            leaving: false,
            next_link: 0,
            configured: Vec::new(),
            rejoining: false,
        }
    }

    /// This server and every live peer, sorted.
    pub fn members(&self) -> Vec<ServerId> {
        let mut members: Vec<ServerId> = std::iter::once(&self.me)
            .chain(self.peers.iter().filter(|(_, p)| p.live).map(|(id, _)| id))
            .cloned()
            .collect();
        members.sort();
        members
    }

    /// A server at our own address is this one, or a predecessor that is gone.
    fn is_gone(&self, id: &ServerId) -> bool {
        id.addr == self.me.addr || self.gone.contains(id)
    }

    /// Takes in a member list; returns the servers to dial (now being dialled).
    pub fn learn(&mut self, ids: &[ServerId]) -> Vec<ServerId> {
        let mut new = Vec::new();
        if self.leaving {
            return new;
        }
        for id in ids {
            if self.peers.contains_key(id) || self.is_gone(id) {
                continue;
            }
            if self.peers.len() >= MAX_PEERS {
                log_info!("chat: more than {MAX_PEERS} servers; not linking to {id}");
                break;
            }
            self.peers.insert(id.clone(), Neighbour::new());
            new.push(id.clone());
        }
        new
    }

    /// Why server `id` can never be a member (we are leaving, it is us, or it left), if so.
    fn admissible(&self, id: &ServerId) -> Result<(), &'static str> {
        if self.leaving {
            return Err("shutting_down");
        }
        if id.addr == self.me.addr {
            return Err("same_address");
        }
        if self.gone.contains(id) {
            return Err("server_gone");
        }
        Ok(())
    }

    /// Registers the server reached by a join, whose link is about to go up.
    ///
    /// # Errors
    /// The reason when it cannot be a member.
    pub fn expect(&mut self, id: &ServerId) -> Result<(), &'static str> {
        self.admissible(id)?;
        if self.peers.contains_key(id) {
            return Err("already_linked");
        }
        self.peers.insert(id.clone(), Neighbour::new());
        Ok(())
    }

    /// Registers a link dialled to us, pending until a line arrives on it (rule 2);
    /// `Ok(true)` when its server is new and must be dialled.
    ///
    /// # Errors
    /// The reason the link is refused, for `{error,Reason}`.
    pub fn hello(&mut self, id: &ServerId, link: InLink) -> Result<bool, &'static str> {
        self.admissible(id)?;
        if let Some(peer) = self.peers.get_mut(id) {
            if peer.pending.len() >= MAX_PENDING {
                if let Some(oldest) = peer.pending.pop_front() {
                    oldest.close();
                }
            }
            peer.pending.push_back(link);
            return Ok(false);
        }
        if self.peers.len() >= MAX_PEERS {
            return Err("too_many_servers");
        }
        let mut peer = Neighbour::new();
        peer.pending.push_back(link);
        peer.stranger = true;
        self.peers.insert(id.clone(), peer);
        Ok(true)
    }

    /// A line arrived on `stream` from `id`: the first one on a pending link confirms it
    /// (rules 2 and 6).
    pub fn incoming_line(&mut self, id: &ServerId, stream: &Arc<TcpStream>) -> LinkLine {
        let Some(peer) = self.peers.get_mut(id) else {
            return LinkLine::Stale;
        };
        if is(&peer.incoming, stream) {
            return LinkLine::Current;
        }
        let Some(at) = peer.pending.iter().position(|l| l.is(stream)) else {
            return LinkLine::Stale;
        };
        let Some(confirmed) = peer.pending.remove(at) else {
            return LinkLine::Stale;
        };
        for other in peer.pending.drain(..) {
            other.close();
        }
        let left = if peer.incoming.is_some() {
            log_info!("chat: {id} dialled us again; its old links are dead");
            self.lose(id)
        } else {
            Vec::new()
        };
        if let Some(peer) = self.peers.get_mut(id) {
            peer.incoming = Some(confirmed);
        }
        LinkLine::Confirmed(left)
    }

    /// Makes our dialled link to `id` up; returns its number, or the outbox back when it
    /// is no longer wanted.
    pub fn link_up(&mut self, id: &ServerId, outbox: Outbox) -> Result<u64, Outbox> {
        if self.leaving {
            return Err(outbox);
        }
        match self.peers.get_mut(id) {
            Some(peer) if matches!(peer.out, Out::Dialing) => {
                let link = self.next_link;
                self.next_link += 1;
                peer.out = Out::Up { outbox, link };
                Ok(link)
            }
            _ => Err(outbox),
        }
    }

    /// The outbox of `id` and its link number when both links are up and it is not live
    /// yet: the caller sends the snapshot, then calls [`Federation::set_live`].
    pub fn ready(&self, id: &ServerId) -> Option<(&Outbox, u64)> {
        let peer = self.peers.get(id)?;
        match (&peer.out, &peer.incoming, peer.live) {
            (Out::Up { outbox, link }, Some(_), false) => Some((outbox, *link)),
            _ => None,
        }
    }

    /// `id` is live (rule 3).
    pub fn set_live(&mut self, id: &ServerId) {
        if let Some(peer) = self.peers.get_mut(id) {
            peer.live = true;
            peer.stranger = false;
            log_info!("chat: linked with {id} both ways");
            self.report();
        }
    }

    /// Queues `line` on every live link; a link whose queue is full or whose writer is gone
    /// is pushed to `failed`.
    pub fn relay(&mut self, line: &Line, failed: &mut Vec<(ServerId, u64)>) {
        for (id, peer) in &self.peers {
            if let (true, Out::Up { outbox, link }) = (peer.live, &peer.out) {
                // A full outbox has closed its link and logged why.
                if outbox.send(Line::clone(line)).is_err() {
                    log_info!("chat: the link to {id} is full or closed; dropping it");
                    failed.push((id.clone(), *link));
                }
            }
        }
    }

    /// Our link number `link` to `id` failed (ended, went silent, overflowed): if it is the
    /// current one, the peer is lost (rule 4); returns its clients, who left.
    pub fn out_failed(&mut self, id: &ServerId, link: u64) -> Vec<String> {
        let current = self
            .peers
            .get(id)
            .is_some_and(|p| matches!(p.out, Out::Up { link: up, .. } if up == link));
        if current {
            self.lose(id)
        } else {
            Vec::new()
        }
    }

    /// The link `stream` from `id` ended, without a `{server_leave,..}`: a confirmed one
    /// loses the peer (rule 4); a pending one was only a dial that did not make it.
    pub fn in_ended(&mut self, id: &ServerId, stream: &Arc<TcpStream>) -> Vec<String> {
        let Some(peer) = self.peers.get_mut(id) else {
            return Vec::new();
        };
        let left = if is(&peer.incoming, stream) {
            self.lose(id)
        } else {
            peer.pending.retain(|l| !l.is(stream));
            Vec::new()
        };
        self.forget_stranger(id);
        left
    }

    /// Forgets `id` if it is a stranger (known only from its own hello, never live) with
    /// no link to us left. Without this, anyone could make up servers by the hundred, one
    /// hello each (at any address, reachable or not), and this server would keep them and
    /// redial them for ever, refusing real servers once it knew [`MAX_PEERS`]. A real
    /// server that lost its link before going live dials us again, and is then new again.
    fn forget_stranger(&mut self, id: &ServerId) {
        let forget = self
            .peers
            .get(id)
            .is_some_and(|p| p.stranger && p.incoming.is_none() && p.pending.is_empty());
        if !forget {
            return;
        }
        if let Some(Neighbour {
            out: Out::Up { outbox, .. },
            ..
        }) = self.peers.remove(id)
        {
            outbox.shutdown(Shutdown::Both);
        }
        log_info!("chat: {id} never linked both ways, and its links to us ended; forgetting it");
    }

    /// Rule 4: closes both links to `id` and keeps it, to be redialled; returns its
    /// clients, who left with it.
    fn lose(&mut self, id: &ServerId) -> Vec<String> {
        let Some(peer) = self.peers.get_mut(id) else {
            return Vec::new();
        };
        if let Out::Up { outbox, .. } = std::mem::replace(&mut peer.out, Out::Dialing) {
            outbox.shutdown(Shutdown::Both);
        }
        if let Some(incoming) = peer.incoming.take() {
            incoming.close();
        }
        // Links still pending were dialled after the loss: they may be the peer's redial.
        let was_live = std::mem::replace(&mut peer.live, false);
        let left: Vec<String> = std::mem::take(&mut peer.roster).into_iter().collect();
        peer.roster_full = false;
        log_info!(
            "chat: lost {id}; {} of its clients leave; redialling",
            left.len()
        );
        if was_live {
            self.report();
        }
        left
    }

    /// Removes `id` for good (rule 5; only if its link to us is `incoming`, when given):
    /// closes both links and returns its clients, who left with it.
    pub fn remove(&mut self, id: &ServerId, incoming: Option<&Arc<TcpStream>>) -> Vec<String> {
        let matches = match (self.peers.get(id), incoming) {
            (None, _) => false,
            (Some(peer), Some(ended)) => is(&peer.incoming, ended),
            (Some(_), None) => true,
        };
        let Some(peer) = self.peers.remove(id).filter(|_| matches) else {
            return Vec::new();
        };
        if let Out::Up { outbox, .. } = &peer.out {
            outbox.shutdown(Shutdown::Both);
        }
        for incoming in peer.incoming.iter().chain(&peer.pending) {
            incoming.close();
        }
        if self.gone.len() >= MAX_GONE {
            self.gone.pop_front();
        }
        self.gone.push_back(id.clone());
        log_info!(
            "chat: server {id} is gone; {} of its clients leave",
            peer.roster.len()
        );
        if peer.live {
            self.report();
        }
        peer.roster.into_iter().collect()
    }

    /// Records the server a join reached: typed as `addr`, answering as `id`.
    pub fn configure(&mut self, addr: &str, id: &ServerId) {
        self.configured = vec![addr.to_owned(), id.addr.clone()];
    }

    /// Whether the configured server is to be joined again: none known at its address.
    pub fn wants_rejoin(&self) -> bool {
        !self.leaving
            && !self.configured.is_empty()
            && !self
                .peers
                .keys()
                .any(|id| self.configured.contains(&id.addr))
    }

    /// The address to join again through, if that is wanted and nobody is at it already;
    /// the caller then runs [`rejoin`].
    pub fn start_rejoin(&mut self) -> Option<String> {
        if self.rejoining || !self.wants_rejoin() {
            return None;
        }
        self.rejoining = true;
        self.configured.first().cloned()
    }

    /// No rejoin loop runs after all (its thread could not start).
    pub fn cancel_rejoin(&mut self) {
        self.rejoining = false;
    }

    /// A rejoin loop ended: `true` if it must go on after all (wanted again meanwhile).
    pub fn rejoin_ended(&mut self) -> bool {
        self.rejoining = self.wants_rejoin();
        self.rejoining
    }

    /// Whether `id` is still to be (re)dialled: known, not gone, and we are not leaving.
    pub fn wants(&self, id: &ServerId) -> bool {
        !self.leaving && self.peers.contains_key(id)
    }

    /// Records that client `name` of server `id` is there (`present`) or left.
    pub fn roster(&mut self, id: &ServerId, name: &str, present: bool) {
        let all: usize = (self.peers.values()).map(|p| p.roster.len()).sum();
        let Some(peer) = self.peers.get_mut(id) else {
            return;
        };
        if !present {
            peer.roster.remove(name);
        } else if peer.roster.len() < MAX_ROSTER && all < MAX_ROSTERS {
            peer.roster.insert(name.to_owned());
        } else if !peer.roster.contains(name) && !peer.roster_full {
            // Such a name's events still reach local clients; only its leave when the
            // server goes is not announced, and `who` does not list it.
            peer.roster_full = true;
            log_info!(
                "chat: {id} announced more than {} clients; not recording more",
                peer.roster.len()
            );
        }
    }

    /// The peer whose roster holds client `name`, if any. Names are unique across the
    /// federation, so there is at most one once every claim has been settled.
    pub fn holder(&self, name: &str) -> Option<&ServerId> {
        self.peers
            .iter()
            .find(|(_, p)| p.roster.contains(name))
            .map(|(id, _)| id)
    }

    /// The clients of every peer.
    pub fn rosters(&self) -> impl Iterator<Item = &str> {
        self.peers
            .values()
            .flat_map(|p| p.roster.iter().map(String::as_str))
    }

    /// Leaves: `{server_leave,Id}` goes last on every link, both ways; links to us stop
    /// being read. Nothing is linked or accepted after this. Returns every outbox the leave
    /// was queued on: the caller waits for them to drain ([`drain`]), then drops them, and
    /// each writer half-closes its link.
    pub fn leave(&mut self) -> Vec<Outbox> {
        if self.leaving {
            return Vec::new();
        }
        self.leaving = true;
        let bye = encode(|out| protocol::format_peer(&PeerMessage::Leave(self.me.clone()), out));
        let mut queued = Vec::new();
        for (_, peer) in std::mem::take(&mut self.peers) {
            if let Out::Up { outbox, .. } = peer.out {
                let _ = outbox.send(Line::clone(&bye));
                // Ends the watcher now, not when (or if) the peer closes its end.
                outbox.shutdown(Shutdown::Read);
                queued.push(outbox);
            }
            // The leave goes on the links to us too, so that the peer's watcher of the link
            // it dialled takes the end for a leave, not a loss, whichever link it reads first.
            for incoming in peer.incoming.into_iter().chain(peer.pending) {
                let _ = incoming.beats.send(Line::clone(&bye));
                incoming.beats.shutdown(Shutdown::Read);
                queued.push(incoming.beats);
            }
        }
        log_info!("chat: left the federation");
        queued
    }

    /// Logs the member list, as the seed's `[SERVER UPDATE]`.
    fn report(&self) {
        let addrs = self
            .members()
            .iter()
            .map(|id| Term::str(&id.addr))
            .collect();
        log_info!("chat: [SERVER UPDATE] {}", Term::list(addrs));
    }
}

impl Neighbour {
    fn new() -> Neighbour {
        Neighbour {
            out: Out::Dialing,
            incoming: None,
            pending: VecDeque::new(),
            live: false,
            roster: BTreeSet::new(),
            roster_full: false,
            stranger: false,
        }
    }
}

/// Every tag of a federation link is bound to this cluster name: a proof made for another
/// service sharing the secret file (chat-peer, the messenger) is worthless here.
const CLUSTER: &[u8] = b"switchboard chat federation";

/// What a server proves on its links with the secret: its id, as its hello or welcome
/// names it.
fn auth(chat: &Chat) -> Option<link::Auth> {
    chat.0.secret.as_ref().map(|secret| link::Auth {
        secret: secret.clone(),
        cluster: CLUSTER.to_vec(),
        identity: chat.me().to_string().into_bytes(),
    })
}

/// How long a leaving server waits for its `{server_leave,..}` lines to be written before
/// its connections are shut down.
const LEAVE_FLUSH: Duration = Duration::from_secs(1);

/// Waits (at most [`LEAVE_FLUSH`]) until every one of `outboxes` has been taken by its
/// writer, and a moment for the last write; then drops them, so each writer half-closes.
pub(super) fn drain(outboxes: Vec<Outbox>) {
    if outboxes.is_empty() {
        return;
    }
    let deadline = std::time::Instant::now() + LEAVE_FLUSH;
    while outboxes.iter().any(|o| !o.is_empty()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(20));
}

/// The one line a heartbeat is: `heartbeat\n`.
pub(super) fn heartbeat() -> Line {
    encode(|out| protocol::format_peer(&PeerMessage::Heartbeat, out))
}

/// Connects to `addr`, says hello and reads the answer; on a welcome, returns the link
/// and who answered.
fn dial(chat: &Chat, addr: &str, hello: &Hello) -> Result<(Link, ServerId), LinkError> {
    let targets = link::resolve(addr)?;
    if targets.iter().any(|t| t.to_string() == hello.from.addr) {
        return Err(LinkError::Myself);
    }
    let mut line = Vec::new();
    protocol::format_hello(hello, &mut line);
    let dialer = Dialer {
        limits: line_limits(),
        group: Some(chat.0.group.clone()),
        ..Dialer::new(Framing::Line, chat.timeouts())
    };
    let auth = auth(chat);
    let (link, id) = dialer.dial_with_auth(auth.as_ref(), targets.as_slice(), &line, |answer| {
        protocol::parse_welcome(answer).map(|welcome| match welcome {
            Welcome::Accepted(id) => Answer::Welcome(id),
            Welcome::Refused(reason) => Answer::Refused(reason),
        })
    })?;
    // The welcome must name the server that proved itself: a member cannot answer for
    // another server with its own proof.
    if let Some(proven) = link.peer_identity() {
        if proven != id.to_string().as_bytes() {
            let _ = link.stream().shutdown(Shutdown::Both);
            return Err(LinkError::Unauthenticated(
                "the welcome names another server than the one that proved itself",
            ));
        }
    }
    Ok((link, id))
}

/// Joins the federation `peer` belongs to: links to it; the rest follows from its list.
pub(super) fn join(chat: &Chat, peer: &str) -> Result<ServerId, LinkError> {
    let hello = Hello {
        from: chat.me().clone(),
        to: None,
    };
    let (link, id) = dial(chat, peer, &hello)?;
    if let Err(reason) = chat.state().fed.expect(&id) {
        return Err(LinkError::Refused(reason.to_owned()));
    }
    log_info!("chat: joining the federation through {id}");
    chat.supervise(id.clone(), Some(link))
        .map_err(|e| LinkError::Io(io::Error::other(e)))?;
    chat.state().fed.configure(peer, &id);
    Ok(id)
}

/// Joins through the configured address again, on a thread of its own, for as long as no
/// known server is at it (rule 5): a restart there, or a server that left and comes back.
/// The server that answers is then supervised on this thread.
pub(super) fn rejoin(chat: &Chat, addr: &str) {
    let hello = Hello {
        from: chat.me().clone(),
        to: None,
    };
    let name = format!("chat: joining again through {addr}");
    loop {
        link::redial(
            &name,
            &mut Backoff::default(),
            || chat.state().fed.wants_rejoin(),
            || {
                let (link, id) = dial(chat, addr, &hello)?;
                if let Err(reason) = chat.state().fed.expect(&id) {
                    let _ = link.stream().shutdown(Shutdown::Both);
                    return Err(LinkError::Refused(reason.to_owned()));
                }
                log_info!("{name}: {id} answered");
                Ok((link, id))
            },
            |(link, id)| supervise(chat, &id, Some(link)),
        );
        if !chat.state().fed.rejoin_ended() {
            return;
        }
    }
}

/// The life of our link to `id`, on a thread of its own: serves `first` (a link the join
/// opened), then redials `id` whenever the link is down, for as long as `id` is known
/// (rules 4 and 5).
pub(super) fn supervise(chat: &Chat, id: &ServerId, first: Option<Link>) {
    if let Some(link) = first {
        serve_outgoing(chat, id, link);
    }
    let hello = Hello {
        from: chat.me().clone(),
        to: Some(id.clone()),
    };
    let name = format!("chat: the link to {id}");
    let report = link::redial(
        &name,
        &mut Backoff::default(),
        || chat.wants(id),
        || dial_known(chat, id, &hello),
        |link| serve_outgoing(chat, id, link),
    );
    log_debug!(
        "{name}: no longer dialled ({} dials, {} links)",
        report.attempts,
        report.links
    );
}

/// One dial of a known server. An answer that says the server will never be this one
/// again (rule 5) makes it gone, which ends its [`supervise`] loop.
fn dial_known(chat: &Chat, id: &ServerId, hello: &Hello) -> Result<Link, LinkError> {
    let result = dial(chat, &id.addr, hello);
    let gone_because = match &result {
        Ok((_, answered)) if answered == id => None,
        Ok((_, answered)) => Some(format!("{answered} answered for it")),
        Err(LinkError::Refused(reason)) if FINAL_REFUSALS.contains(&reason.as_str()) => {
            Some(format!("it refused us: {reason}"))
        }
        Err(LinkError::Myself) => Some("that is our own address".to_owned()),
        Err(_) => None,
    };
    if let Some(why) = gone_because {
        if let Ok((link, _)) = &result {
            let _ = link.stream().shutdown(Shutdown::Both);
        }
        log_info!("chat: {why}; taking {id} as gone");
        chat.gone(id);
        return Err(LinkError::Refused(why));
    }
    result.map(|(link, _)| link)
}

/// Writes our lines to `id` until the link is dropped or fails, and watches it meanwhile:
/// the peer writes only heartbeats on a link we dialled, so the watcher's read ends when
/// the peer closes the link, breaks it, or is silent past the dead-peer bound.
fn serve_outgoing(chat: &Chat, id: &ServerId, mut link: Link) {
    let name = format!("chat: the link to {id}");
    // While the network holds the link's bytes its queue grows: charged to the budget the
    // clients share, so a cut costs at most that; past it the link is lost (rule 4).
    let config = OutboxConfig::new(name.clone(), chat.0.link_outbox);
    let config = chat.0.liveness.outbox(config, heartbeat());
    let (outbox, writer) = link.charged_outbox(config, chat.0.budget.as_ref());
    let Some(number) = chat.link_up(id, outbox) else {
        let _ = link.stream().shutdown(Shutdown::Both);
        return;
    };
    let (watcher, who) = (chat.clone(), id.clone());
    // Without a watcher (no thread to be had) the link still works; a dead peer is then
    // seen by its own link to us ending or going silent (rule 4), or by a failed write.
    let _ = chat
        .0
        .group
        .spawn(format!("chat-watch-{}", id.addr), move || {
            // Heartbeats, and a `{server_leave,..}` when the peer leaves (rule 5).
            let end = link.read_frames(&name, |line| match protocol::parse_peer(line) {
                Ok(PeerMessage::Leave(left)) if left == who => ControlFlow::Break("it left"),
                _ => ControlFlow::Continue(()),
            });
            log_debug!("{name} ended: {}", describe(&end));
            if matches!(end, End::Stopped(_)) {
                watcher.gone(&who);
            } else {
                watcher.out_failed(&who, number);
            }
        });
    // Ends when the federation drops the outbox (the peer was lost or removed, or this
    // server is leaving), or when a write fails, which shuts the link down.
    writer.run();
    // A no-op unless the write failed: the link is no longer the current one otherwise.
    chat.out_failed(id, number);
}

fn describe<B: std::fmt::Display>(end: &End<B>) -> String {
    match end {
        End::Closed => "it closed".to_owned(),
        End::Stopped(why) => why.to_string(),
        End::Lost(e) if e.is_timeout() => "silent past the dead-peer bound".to_owned(),
        End::Lost(e) => e.to_string(),
    }
}

/// Serves a link another server dialled to us, from its hello until it ends.
///
/// # Errors
/// When the answer to the hello cannot be written.
pub(super) fn serve_incoming(
    chat: &Chat,
    hello: Hello,
    conn: &Connection,
    mut reader: FrameReader<&TcpStream>,
) -> Result<(), HandlerError> {
    let stream = &conn.stream;
    let id = hello.from;
    let timeouts = chat.timeouts();
    // Before anything touches the federation: a server that cannot prove `id` with the
    // secret is closed (and logged) here, so its events never reach a client.
    let claimed = id.to_string().into_bytes();
    if link::authenticate(
        stream,
        &mut reader,
        &timeouts,
        auth(chat).as_ref(),
        &claimed,
    )
    .is_err()
    {
        return Ok(());
    }
    // Proven (or no secret asked): it may hold a reserve slot, and nothing below waits
    // on the peer for long.
    conn.opened();
    // Our heartbeats on this link tell the peer's watcher we are alive (rule 2); the
    // writer starts once the welcome is out.
    let name = format!("chat: the link from {id}");
    let config = OutboxConfig::new(name.clone(), HEARTBEAT_OUTBOX);
    let config = chat.0.liveness.outbox(config, heartbeat());
    let (beats, writer) = Outbox::new(Arc::clone(stream), config);
    let accepted = match &hello.to {
        Some(to) if to != chat.me() => Err("wrong_server"),
        _ => chat.hello(
            &id,
            InLink {
                stream: Arc::clone(stream),
                beats: beats.clone(),
            },
        ),
    };
    let mut answer = Vec::new();
    let verdict = match accepted {
        Err(reason) => {
            log_info!("chat: refused a link from {id}: {reason}");
            protocol::format_error(reason, &mut answer);
            Verdict::Refuse(answer)
        }
        Ok(()) => {
            protocol::format_welcome(chat.me(), &mut answer);
            Verdict::Welcome(answer)
        }
    };
    let mut left = false;
    let ending = match link::accept(stream, reader, &timeouts, verdict) {
        Ok(None) => return Ok(()),
        Err(e) => e.to_string(),
        Ok(Some(mut link)) => {
            if let Err(e) = chat
                .0
                .group
                .spawn(format!("chat-beat-{}", id.addr), move || writer.run())
            {
                log_info!("{name}: no heartbeat thread ({e}); the peer will take us for dead");
            }
            let mut logged = Quota::new(BAD_REQUEST_LINES);
            let end = link.read_frames(&name, |line| match protocol::parse_peer(line) {
                Ok(PeerMessage::Leave(who)) if who == id => ControlFlow::Break("it left"),
                Ok(message) => {
                    if chat.peer_message(&id, stream, message) {
                        ControlFlow::Continue(())
                    } else {
                        ControlFlow::Break("it was replaced or dropped")
                    }
                }
                Err(e) => {
                    if logged.allow() {
                        log_info!("chat: {id} sent a bad line ({e}); ignored");
                    }
                    ControlFlow::Continue(())
                }
            });
            if logged.suppressed() > 0 {
                log_info!(
                    "chat: {id} sent {} more bad line(s), ignored and not logged",
                    logged.suppressed()
                );
            }
            // Flushed and half-closed: the peer's watcher sees the end.
            drop(beats);
            left = matches!(end, End::Stopped("it left"));
            describe(&end)
        }
    };
    log_debug!("chat: the link from {id} ended: {ending}");
    chat.in_ended(&id, stream, left);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(addr: &str) -> ServerId {
        ServerId {
            addr: addr.to_owned(),
            incarnation: 1,
        }
    }

    /// A connected loopback pair's accepted end, standing for a link's socket.
    fn socket() -> (TcpStream, Arc<TcpStream>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dialled = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (dialled, Arc::new(listener.accept().unwrap().0))
    }

    /// A link to us over `stream` (its heartbeat writer not running).
    fn in_link(stream: &Arc<TcpStream>) -> InLink {
        let (beats, _writer) = Outbox::new(Arc::clone(stream), OutboxConfig::new("t", 4));
        InLink {
            stream: Arc::clone(stream),
            beats,
        }
    }

    #[test]
    fn a_server_known_only_from_its_hello_is_forgotten_once_its_links_end() {
        let mut fed = Federation::new(id("127.0.0.1:1"));
        // Made-up servers, one hello each, the links closed at once: nothing is kept.
        for port in 2..2 + MAX_PEERS as u16 + 10 {
            let stranger = id(&format!("127.0.0.1:{port}"));
            let (_d, link) = socket();
            assert_eq!(fed.hello(&stranger, in_link(&link)), Ok(true));
            assert!(fed.wants(&stranger), "dialled back while its link is open");
            assert!(fed.in_ended(&stranger, &link).is_empty());
            assert!(!fed.wants(&stranger), "{stranger} kept");
        }
        assert!(fed.peers.is_empty());
        // One that confirmed its link and announced a client, never live: its client
        // leaves with it, and so does our dialled link.
        // A new server's hello, our link to it up and its link confirmed: the sockets to
        // keep open, and its link to us.
        let both_links = |fed: &mut Federation, server: &ServerId| {
            let (d1, link) = socket();
            assert_eq!(fed.hello(server, in_link(&link)), Ok(true));
            let (d2, out) = socket();
            let (outbox, writer) = Outbox::new(out, OutboxConfig::new("t", 8));
            fed.link_up(server, outbox).ok().unwrap();
            let confirmed = fed.incoming_line(server, &link);
            assert!(matches!(confirmed, LinkLine::Confirmed(_)));
            ((d1, d2, writer), link)
        };
        let stranger = id("127.0.0.1:7");
        let (_held, link) = both_links(&mut fed, &stranger);
        fed.roster(&stranger, "eve", true);
        assert_eq!(fed.in_ended(&stranger, &link), ["eve"]);
        assert!(!fed.wants(&stranger));
        // A server that went live once is a member: lost, it is kept and redialled.
        let member = id("127.0.0.1:8");
        let (_held, link) = both_links(&mut fed, &member);
        fed.set_live(&member);
        assert!(fed.in_ended(&member, &link).is_empty());
        assert!(fed.wants(&member), "a lost member is redialled");
        // And one we learned of from a member's list is dialled whatever its links do.
        let listed = id("127.0.0.1:9");
        fed.learn(std::slice::from_ref(&listed));
        let (_d5, link) = socket();
        assert_eq!(fed.hello(&listed, in_link(&link)), Ok(false));
        assert!(fed.in_ended(&listed, &link).is_empty());
        assert!(fed.wants(&listed));
    }

    /// Rosters are bounded per peer and all together: five servers announcing as many
    /// clients as one may hold together hold no more than the total.
    #[test]
    fn rosters_hold_at_most_their_total() {
        let mut fed = Federation::new(id("127.0.0.1:1"));
        let peers: Vec<ServerId> = (2..7).map(|p| id(&format!("127.0.0.1:{p}"))).collect();
        fed.learn(&peers);
        for (i, peer) in peers.iter().enumerate() {
            for n in 0..MAX_ROSTER + 1 {
                fed.roster(peer, &format!("c{i}-{n}"), true);
            }
        }
        assert_eq!(fed.rosters().count(), MAX_ROSTERS);
        // A leave makes room again.
        fed.roster(&peers[0], "c0-0", false);
        fed.roster(&peers[4], "late", true);
        assert_eq!(fed.holder("late"), Some(&peers[4]));
    }

    #[test]
    fn a_peer_is_live_with_both_links_and_only_a_confirmed_redial_replaces_it() {
        let mut fed = Federation::new(id("127.0.0.1:1"));
        let peer = id("127.0.0.1:2");
        assert_eq!(
            fed.learn(std::slice::from_ref(&peer)),
            std::slice::from_ref(&peer)
        );
        // Its link to us, welcomed: pending until a line arrives on it.
        let (_d1, first) = socket();
        assert_eq!(fed.hello(&peer, in_link(&first)), Ok(false));
        let (_d2, out) = socket();
        let (outbox, _writer) = Outbox::new(out, OutboxConfig::new("t", 8));
        let link = fed.link_up(&peer, outbox).ok().unwrap();
        assert!(
            fed.ready(&peer).is_none(),
            "not live on an unconfirmed link"
        );
        assert!(matches!(fed.incoming_line(&peer, &first), LinkLine::Confirmed(l) if l.is_empty()));
        assert!(fed.ready(&peer).is_some());
        fed.set_live(&peer);
        assert_eq!(fed.members().len(), 2);
        fed.roster(&peer, "bob", true);

        // A hello held by a cut and delivered late: pending, never confirmed, and its end
        // costs nothing.
        let (_d3, stale) = socket();
        assert_eq!(fed.hello(&peer, in_link(&stale)), Ok(false));
        assert!(fed.in_ended(&peer, &stale).is_empty());
        assert!(matches!(fed.incoming_line(&peer, &stale), LinkLine::Stale));
        assert_eq!(fed.members().len(), 2);
        assert!(matches!(
            fed.incoming_line(&peer, &first),
            LinkLine::Current
        ));

        // The peer's real redial: once confirmed, the old links go and bob leaves with them.
        let (_d4, redial) = socket();
        assert_eq!(fed.hello(&peer, in_link(&redial)), Ok(false));
        assert!(
            matches!(fed.incoming_line(&peer, &redial), LinkLine::Confirmed(l) if l == ["bob"])
        );
        assert_eq!(
            fed.members().len(),
            1,
            "not live until our own redial is up"
        );
        assert!(fed.wants(&peer), "a lost peer is redialled");
        assert!(fed.out_failed(&peer, link).is_empty(), "a stale report");
        assert!(matches!(fed.incoming_line(&peer, &first), LinkLine::Stale));

        // The new link ending loses it again (nothing to announce); a leave removes it.
        assert!(fed.in_ended(&peer, &redial).is_empty());
        assert!(fed.wants(&peer));
        assert!(fed.remove(&peer, None).is_empty());
        assert!(!fed.wants(&peer));
        let (_d5, late) = socket();
        assert_eq!(fed.hello(&peer, in_link(&late)), Err("server_gone"));
    }

    #[test]
    fn a_peer_cannot_grow_its_roster_without_bound() {
        let mut fed = Federation::new(id("127.0.0.1:1"));
        let peer = id("127.0.0.1:2");
        let new = fed.learn(std::slice::from_ref(&peer));
        assert_eq!(new, std::slice::from_ref(&peer));
        for n in 0..MAX_ROSTER + 10 {
            fed.roster(&peer, &format!("c{n}"), true);
        }
        assert_eq!(fed.rosters().count(), MAX_ROSTER);
        // Leaves still make room, and the names it holds leave with the server.
        fed.roster(&peer, "c0", false);
        fed.roster(&peer, "late", true);
        assert!(fed.rosters().any(|n| n == "late"));
        assert_eq!(fed.remove(&peer, None).len(), MAX_ROSTER);
    }
}
