//! The federation: which servers are members, the links between them, and what happens
//! when one goes. Failure model: servers crash (or leave) and links between live servers
//! are reliable, as TCP is; the rules are exact under it.
//!
//! 1. **One-way links.** Every member dials every other member once and only writes on the
//!    link it dialled (after reading the one welcome line); it only reads the links others
//!    dialled to it. Two servers are joined by two links, one each way, so nobody has to
//!    decide who dials, and each server's own events go out on one ordered link per peer.
//! 2. **The member list** is this server and every server its outgoing link is up to.
//!    Whenever it grows it goes to every peer (`{update_servers,..}`), and a server that
//!    hears of one it does not know dials it. Lists are merged by union, minus the servers
//!    known to be gone, so concurrent joins through different members converge: every new
//!    server is heard of by everyone, in whatever order, and everyone dials it.
//! 3. **A server is gone** when its incoming link ends (EOF, error or `{server_leave,..}`).
//!    Its clients, the names it announced on that link, are announced leaving to local
//!    clients, and its id is remembered as gone, so a stale list cannot bring it back. A
//!    restarted server has a new incarnation: it is a new member.
//! 4. **An outgoing link that fails** (write error, EOF, a full queue, a failed dial) with
//!    an incoming link from the same server: that incoming link is half-closed, so the
//!    peer sees us go, drops us and closes its link, and rule 3 then removes it here once
//!    everything it sent has been read. Without an incoming link the peer is removed at once.
//!
//! A crash is never reported second-hand: every member has its own links to the crashed
//! server and sees them end, so no server can be expelled on another's word.

use super::hub::Line;
use super::protocol::{self, Hello, PeerMessage, ServerId, Welcome};
use super::{encode, line_limits, Chat};
use crate::framing::{FrameReader, Framing};
use crate::link::{self, Answer, Dialer, End, Link, LinkError, Timeouts, Verdict};
use crate::outbox::{Outbox, OutboxConfig};
use crate::server::HandlerError;
use crate::term::Term;
use crate::{log_debug, log_info};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::net::{Shutdown, TcpStream};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

/// Servers one server links to, at most: each costs three threads and two sockets.
const MAX_PEERS: usize = 256;
/// Client names one peer's roster holds, at most. A real server announces one per client
/// connection (10,000 by default); the cap stops a connection that merely says
/// `{server_hello,..}` from growing this server's memory without bound, one
/// `{present,Name}` line at a time.
const MAX_ROSTER: usize = 1 << 16;
/// Gone servers remembered, at most (a stale list naming an older one costs one failed dial).
const MAX_GONE: usize = 4096;
/// Connecting to a server may take 3 s, its answer to `{server_hello,..}` 5 s; a link write
/// blocked 5 s means the peer has stopped reading, and the link fails. A link is quiet
/// while nobody talks, so it is read without a timeout (the idle timeout is for clients).
const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(3),
    handshake: Duration::from_secs(5),
    write: Duration::from_secs(5),
    idle: None,
};

/// The member list and the links, kept in the chat state under its lock.
pub struct Federation {
    me: ServerId,
    peers: BTreeMap<ServerId, Neighbour>,
    gone: VecDeque<ServerId>,
    leaving: bool,
    next_link: u64,
}

struct Neighbour {
    out: Out,
    /// The link this peer dialled to us, which we read.
    incoming: Option<Arc<TcpStream>>,
    /// The clients on that server, as announced on its link.
    roster: BTreeSet<String>,
    /// Whether a name was refused for the roster being full (logged once per peer).
    roster_full: bool,
}

/// The state of our link to a peer.
enum Out {
    Dialing,
    /// Up: its outbox (the only one, so dropping it closes the link) and its number, by
    /// which a report from the link's threads is told from a stale one.
    Up {
        outbox: Outbox,
        link: u64,
    },
    /// Failed while an incoming link lives on; the peer goes when that ends (rule 4).
    Failed,
}

impl Federation {
    pub fn new(me: ServerId) -> Federation {
        Federation {
            me,
            peers: BTreeMap::new(),
            gone: VecDeque::new(),
            leaving: false,
            next_link: 0,
        }
    }

    /// This server and every server our link is up to, sorted.
    pub fn members(&self) -> Vec<ServerId> {
        let mut members: Vec<ServerId> = std::iter::once(&self.me)
            .chain(
                self.peers
                    .iter()
                    .filter(|(_, p)| matches!(p.out, Out::Up { .. }))
                    .map(|(id, _)| id),
            )
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
            self.peers.insert(id.clone(), Neighbour::new(None));
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
        self.peers.insert(id.clone(), Neighbour::new(None));
        Ok(())
    }

    /// Registers a link dialled to us; `Ok(true)` when its server is new and must be dialled.
    ///
    /// # Errors
    /// The reason the link is refused, for `{error,Reason}`.
    pub fn hello(&mut self, id: &ServerId, stream: Arc<TcpStream>) -> Result<bool, &'static str> {
        self.admissible(id)?;
        if let Some(peer) = self.peers.get_mut(id) {
            if peer.incoming.is_some() {
                return Err("duplicate_link");
            }
            peer.incoming = Some(stream);
            return Ok(false);
        }
        if self.peers.len() >= MAX_PEERS {
            return Err("too_many_servers");
        }
        self.peers.insert(id.clone(), Neighbour::new(Some(stream)));
        Ok(true)
    }

    /// Whether `id` is a member whose link to us we are reading.
    pub fn has_incoming(&self, id: &ServerId) -> bool {
        self.peers.get(id).is_some_and(|p| p.incoming.is_some())
    }

    /// Makes our dialled link to `id` live; returns its number, or `None` (and the outbox
    /// back) when it is no longer wanted.
    pub fn link_up(&mut self, id: &ServerId, outbox: Outbox) -> Result<u64, Outbox> {
        if self.leaving {
            return Err(outbox);
        }
        match self.peers.get_mut(id) {
            Some(peer) if matches!(peer.out, Out::Dialing) => {
                let link = self.next_link;
                self.next_link += 1;
                peer.out = Out::Up { outbox, link };
                self.report();
                Ok(link)
            }
            _ => Err(outbox),
        }
    }

    /// Queues `line` on every live link; a link whose queue is full or whose writer is gone
    /// is pushed to `failed`.
    pub fn relay(&mut self, line: &Line, failed: &mut Vec<(ServerId, u64)>) {
        for (id, peer) in &self.peers {
            if let Out::Up { outbox, link } = &peer.out {
                // A full outbox has closed its link and logged why.
                if outbox.send(Line::clone(line)).is_err() {
                    log_info!("chat: the link to {id} is full or closed; dropping it");
                    failed.push((id.clone(), *link));
                }
            }
        }
    }

    /// Our link to `id` (link number `link`, or the dial when `None`) failed: rule 4.
    /// Returns the clients that left with the server, if it is removed now.
    pub fn link_failed(&mut self, id: &ServerId, link: Option<u64>) -> Vec<String> {
        let Some(peer) = self.peers.get_mut(id) else {
            return Vec::new();
        };
        let current = match (&peer.out, link) {
            (Out::Up { link: up, .. }, Some(failed)) => *up == failed,
            (Out::Dialing, None) => true,
            _ => false,
        };
        if !current {
            return Vec::new();
        }
        let was_up = matches!(peer.out, Out::Up { .. });
        if let Out::Up { outbox, .. } = std::mem::replace(&mut peer.out, Out::Failed) {
            outbox.shutdown(Shutdown::Both);
        }
        if let Some(incoming) = &peer.incoming {
            log_info!("chat: the link to {id} failed; closing its link to us");
            let _ = incoming.shutdown(Shutdown::Write);
            if was_up {
                self.report();
            }
            return Vec::new();
        }
        self.remove(id, None)
    }

    /// Removes `id` (only if its incoming link is `incoming`, when given): closes both
    /// links and returns its clients, who left with it.
    pub fn remove(&mut self, id: &ServerId, incoming: Option<&Arc<TcpStream>>) -> Vec<String> {
        let matches = match (self.peers.get(id), incoming) {
            (None, _) => false,
            (Some(peer), Some(ended)) => peer
                .incoming
                .as_ref()
                .is_some_and(|mine| Arc::ptr_eq(mine, ended)),
            (Some(_), None) => true,
        };
        let Some(peer) = self.peers.remove(id).filter(|_| matches) else {
            return Vec::new();
        };
        if let Out::Up { outbox, .. } = &peer.out {
            outbox.shutdown(Shutdown::Both);
        }
        if let Some(incoming) = &peer.incoming {
            let _ = incoming.shutdown(Shutdown::Both);
        }
        if self.gone.len() >= MAX_GONE {
            self.gone.pop_front();
        }
        self.gone.push_back(id.clone());
        log_info!(
            "chat: server {id} is gone; {} of its clients leave",
            peer.roster.len()
        );
        self.report();
        peer.roster.into_iter().collect()
    }

    /// Records that client `name` of server `id` is there (`present`) or left.
    pub fn roster(&mut self, id: &ServerId, name: &str, present: bool) {
        let Some(peer) = self.peers.get_mut(id) else {
            return;
        };
        if !present {
            peer.roster.remove(name);
        } else if peer.roster.len() < MAX_ROSTER {
            peer.roster.insert(name.to_owned());
        } else if !peer.roster.contains(name) && !peer.roster_full {
            // Such a name's events still reach local clients; only its leave when the
            // server goes is not announced, and `who` does not list it.
            peer.roster_full = true;
            log_info!("chat: {id} announced more than {MAX_ROSTER} clients; not recording more");
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

    /// Leaves: `{server_leave,Id}` goes last on every live link, whose writer then closes
    /// it; links to us are shut down. Nothing is linked or accepted after this.
    pub fn leave(&mut self) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        let bye = encode(|out| protocol::format_peer(&PeerMessage::Leave(self.me.clone()), out));
        for (_, peer) in std::mem::take(&mut self.peers) {
            if let Out::Up { outbox, .. } = &peer.out {
                let _ = outbox.send(Line::clone(&bye));
                // Ends the watcher now, not when (or if) the peer closes its end.
                outbox.shutdown(Shutdown::Read);
            }
            // Dropping the outbox lets the writer send what is queued, the leave last, and
            // half-close.
            if let Some(incoming) = &peer.incoming {
                let _ = incoming.shutdown(Shutdown::Both);
            }
        }
        log_info!("chat: left the federation");
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
    fn new(incoming: Option<Arc<TcpStream>>) -> Neighbour {
        Neighbour {
            out: Out::Dialing,
            incoming,
            roster: BTreeSet::new(),
            roster_full: false,
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
        ..Dialer::new(Framing::Line, TIMEOUTS)
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
    let (chat2, who) = (chat.clone(), id.clone());
    let name = format!("chat-link-{}", id.addr);
    if let Err(e) = chat
        .0
        .group
        .spawn(name, move || serve_outgoing(chat2, who, link))
    {
        // Undo `expect`, so the peer is not left `Dialing` for good.
        chat.link_failed(&id, None);
        return Err(LinkError::Io(io::Error::other(e)));
    }
    Ok(id)
}

/// Dials `id` and serves the link until it ends.
pub(super) fn run_outgoing(chat: Chat, id: ServerId) {
    let hello = Hello {
        from: chat.me().clone(),
        to: Some(id.clone()),
    };
    match dial(&chat, &id.addr, &hello) {
        Ok((link, answered)) if answered == id => serve_outgoing(chat, id, link),
        Ok((link, answered)) => {
            log_info!("chat: {answered} answered for {id}; taking {id} as gone");
            let _ = link.stream().shutdown(Shutdown::Both);
            chat.link_failed(&id, None);
        }
        Err(e) => {
            log_info!("chat: cannot link to {id}: {e}");
            chat.link_failed(&id, None);
        }
    }
}

/// Writes our lines to `id` until the link is dropped, and watches it for EOF meanwhile.
fn serve_outgoing(chat: Chat, id: ServerId, mut link: Link) {
    let config = OutboxConfig::new(format!("chat: the link to {id}"), chat.0.link_outbox);
    let (outbox, writer) = link.outbox(config);
    let Some(number) = chat.link_up(&id, outbox) else {
        let _ = link.stream().shutdown(Shutdown::Both);
        return;
    };
    let (watcher, who) = (chat.clone(), id.clone());
    // The peer writes nothing on a link we dialled: the reader returns when it closes (or
    // breaks) the link, so a crashed peer is seen at once, not at our next write. Without
    // a watcher (no thread to be had) the link still works; a crashed peer is then seen by
    // its own link to us ending (rule 3), or by our next write failing.
    let _ = chat
        .0
        .group
        .spawn(format!("chat-watch-{}", id.addr), move || {
            let name = format!("chat: the link to {who}");
            link.read_frames(&name, |_| ControlFlow::<()>::Continue(()));
            watcher.link_failed(&who, Some(number));
        });
    // Ends when the federation drops the outbox (the peer was removed, or this server is
    // leaving), or when a write fails, which shuts the link down.
    writer.run();
    // A no-op unless the write failed: the link is no longer the current one otherwise.
    chat.link_failed(&id, Some(number));
}

/// Serves a link another server dialled to us, from its hello until it ends.
///
/// # Errors
/// When the answer to the hello cannot be written.
pub(super) fn serve_incoming(
    chat: &Chat,
    hello: Hello,
    stream: &Arc<TcpStream>,
    mut reader: FrameReader<&TcpStream>,
) -> Result<(), HandlerError> {
    let id = hello.from;
    // Before anything touches the federation: a server that cannot prove `id` with the
    // secret is closed (and logged) here, so its events never reach a client.
    let claimed = id.to_string().into_bytes();
    if link::authenticate(
        stream,
        &mut reader,
        &TIMEOUTS,
        auth(chat).as_ref(),
        &claimed,
    )
    .is_err()
    {
        return Ok(());
    }
    let accepted = match &hello.to {
        Some(to) if to != chat.me() => Err("wrong_server"),
        _ => chat.hello(&id, stream),
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
    let ending = match link::accept(stream, reader, &TIMEOUTS, verdict) {
        Ok(None) => return Ok(()),
        Err(e) => e.to_string(),
        Ok(Some(mut link)) => {
            let name = format!("chat: the link from {id}");
            let end = link.read_frames(&name, |line| match protocol::parse_peer(line) {
                Ok(PeerMessage::Leave(who)) if who == id => ControlFlow::Break("it left"),
                Ok(message) => {
                    if chat.peer_message(&id, message) {
                        ControlFlow::Continue(())
                    } else {
                        ControlFlow::Break("it was dropped")
                    }
                }
                Err(e) => {
                    log_info!("chat: {id} sent a bad line ({e}); ignored");
                    ControlFlow::Continue(())
                }
            });
            match end {
                End::Closed => "it closed".to_owned(),
                End::Stopped(why) => why.to_owned(),
                End::Lost(e) => e.to_string(),
            }
        }
    };
    log_debug!("chat: the link from {id} ended: {ending}");
    chat.peer_gone(&id, stream);
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
