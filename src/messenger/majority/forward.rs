//! Forwarding in majority mode: a follower serves its clients through the leader, so a
//! client that reaches a follower but not the leader is served all the same, as a backup
//! serves its clients in primary mode (`replication::forward`).
//!
//! The follower passes each request of such a connection (`F`) to the Raft leader it
//! knows, on its Raft link to it ([`crate::raft::links::LinkTransport::post`], the
//! authenticated links of the cluster), and binds the connection to that leader. The
//! leader decides it as for a connection of its own, a *remote* one in its client
//! registry (sessions and pushed messages included), and sends the answers, once
//! committed and applied, back on its own link to the follower (`R`), which writes them
//! to the client. Nothing is lost unseen: both directions number their frames per
//! connection, and a gap (a link that failed and was redialled between two frames)
//! closes the connection, as does a link ending, the follower learning of another
//! leader, or the leader stepping down (it relays a close for each remote connection).
//! The client then fails over as from any closed connection: it logs in again and
//! resends what was unanswered, and its ids make a resend say ok without a second copy.
//!
//! Forwarding shares the links with Raft's own messages, and never fills them: a request
//! or an answer is queued only while the link has room for service frames
//! ([`LinkTransport::has_room`](crate::raft::links::LinkTransport::has_room)). A client
//! whose requests or answers do not fit (it asks faster than the link carries them) has
//! its connection closed as above; a full link closed instead would cost the cluster its
//! heartbeats and acknowledgements until redialled.
//!
//! Here: the messages, the follower's side (forwarding, writing relays in order) and the
//! leader's (deciding a follower's requests in order, numbering what it relays), all under
//! the service's one lock, so relays leave in the order the registry queued them.
//!
//! ```text
//! body (after the links' service byte 'S', one per frame, integers big-endian):
//!   'F' conn:u64 seq:u64 request      follower → leader: request number seq (1, 2, …) of
//!                                     the follower's connection conn (a client payload)
//!   'R' conn:u64 seq:u64 close:u8 bytes
//!                                     leader → follower: its reply frames number seq (1,
//!                                     2, …) for that connection, whole u32 client frames;
//!                                     close 1: close the connection after them. seq 0: the
//!                                     leader does not know the connection; close it.
//!   'X' conn:u64                      follower → leader: the connection ended (or the
//!                                     follower gave up on it); forget it and its session
//! ```

use super::{Forwarded, Inner, Remote, Shared};
use crate::framing::{encode_frame, Framing};
use crate::log_info;
use crate::messenger::clients::{remote_id, Out};
use crate::messenger::protocol::{self, Reply};
use crate::messenger::state::{Corrupt, Cursor};
use crate::raft::links::{PeerService, SERVICE_QUEUE};
use crate::raft::ReplicaId;

/// A relay's bytes are cut into frames of at most this many (a search answer can be
/// long; a Raft link's frame limit is a few MiB).
pub const RELAY_CHUNK: usize = 256 << 10;
/// A relay's bytes before its part of the answer: `R`, conn, seq, close.
const RELAY_HEADER: usize = 1 + 8 + 8 + 1;

/// One forwarding message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardMsg {
    /// Request `seq` of the follower's connection `conn`.
    Forward {
        /// The connection's id on the follower.
        conn: u64,
        /// 1 for its first request, then one more each.
        seq: u64,
        /// The client's payload.
        request: Vec<u8>,
    },
    /// Reply frames for the follower's connection `conn`.
    Relay {
        /// The connection's id on the follower.
        conn: u64,
        /// 1 for the first relay of the connection, then one more each; 0: unknown to
        /// the leader.
        seq: u64,
        /// Close the connection after `bytes`.
        close: bool,
        /// Whole `u32` reply frames.
        bytes: Vec<u8>,
    },
    /// The follower's connection `conn` ended.
    Closed {
        /// The connection's id on the follower.
        conn: u64,
    },
}

impl ForwardMsg {
    /// The message's encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            ForwardMsg::Forward { conn, seq, request } => {
                out.push(b'F');
                out.extend_from_slice(&conn.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(request);
            }
            ForwardMsg::Relay {
                conn,
                seq,
                close,
                bytes,
            } => {
                out.push(b'R');
                out.extend_from_slice(&conn.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.push(u8::from(*close));
                out.extend_from_slice(bytes);
            }
            ForwardMsg::Closed { conn } => {
                out.push(b'X');
                out.extend_from_slice(&conn.to_be_bytes());
            }
        }
        out
    }

    /// Decodes a message; all of `bytes` must be used.
    ///
    /// # Errors
    /// [`Corrupt`] when the bytes are not a forwarding message.
    pub fn decode(bytes: &[u8]) -> Result<ForwardMsg, Corrupt> {
        let mut c = Cursor::new(bytes);
        match c.u8()? {
            b'F' => {
                let (conn, seq) = (c.u64()?, c.u64()?);
                let request = c.rest().to_vec();
                Ok(ForwardMsg::Forward { conn, seq, request })
            }
            b'R' => {
                let (conn, seq) = (c.u64()?, c.u64()?);
                let close = match c.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(Corrupt("a relay's close flag is 0 or 1")),
                };
                let bytes = c.rest().to_vec();
                Ok(ForwardMsg::Relay {
                    conn,
                    seq,
                    close,
                    bytes,
                })
            }
            b'X' => {
                let conn = c.u64()?;
                c.end()?;
                Ok(ForwardMsg::Closed { conn })
            }
            _ => Err(Corrupt("unknown forwarding message")),
        }
    }
}

impl Shared {
    /// Posts a forwarding message to server `to` (an index); false if its link is down.
    pub(super) fn post(&self, to: usize, msg: &ForwardMsg) -> bool {
        self.links
            .get()
            .is_some_and(|l| l.post(to as ReplicaId + 1, &msg.encode()))
    }

    /// Whether the link to server `to` is up and has room for forwarding messages of
    /// `bytes` in all ([`LinkTransport::has_room`](crate::raft::links::LinkTransport::has_room)):
    /// requests and answers are let onto a Raft link only while it has, so that a client
    /// flooding a follower, or asking for answers faster than the link carries them, sheds
    /// its own connection and not the cluster's link.
    fn room(&self, to: usize, bytes: usize) -> bool {
        self.links
            .get()
            .is_some_and(|l| l.has_room(to as ReplicaId + 1, bytes))
    }

    /// Whether the link to server `to` is up.
    fn is_up(&self, to: usize) -> bool {
        self.links
            .get()
            .is_some_and(|l| l.is_up(to as ReplicaId + 1))
    }

    /// [`post`](Self::post) if the link has [`room`](Self::room) for it; a request that
    /// finds its link up but full is logged (its connection is then closed or redirected).
    fn post_if_room(&self, to: usize, msg: &ForwardMsg) -> bool {
        let Some(links) = self.links.get() else {
            return false;
        };
        let (body, peer) = (msg.encode(), to as ReplicaId + 1);
        if links.has_room(peer, body.len()) {
            return links.post(peer, &body);
        }
        if let (true, ForwardMsg::Forward { conn, .. }) = (links.is_up(peer), msg) {
            log_info!(
                "messenger-{}: the link to server {to} is full; not forwarding client \
                 connection {conn}'s request (the connection is closed, or redirected)",
                self.id
            );
        }
        false
    }

    /// Sends what the registry queued for followers' clients, each connection's relays
    /// numbered in order; a closing relay ends the leader's record of its connection.
    /// Called under the lock after anything that may queue relays, so they leave in the
    /// order they were queued.
    pub(super) fn pump(&self, inner: &mut Inner) {
        for peer in (0..self.peers).filter(|&p| p != self.id) {
            for r in inner.clients.take_relay(peer) {
                let Some(id) = remote_id(peer, r.conn) else {
                    continue;
                };
                let Some(remote) = inner.remotes.get_mut(&id) else {
                    // Forgotten (the follower closed it): nobody to relay to.
                    continue;
                };
                // The whole answer or none of it: a link that cannot take it (its follower
                // reads it slower than this client asks) closes the client's connection,
                // with a small close that goes whatever the link holds, and the client
                // fails over as from any closed connection.
                // An answer larger than half the mark (a login's whole mailbox can pass it)
                // needs only that much room: it goes whole once the link has drained.
                let parts_of = r.bytes.len().div_ceil(RELAY_CHUNK).max(1);
                let need = r.bytes.len() + parts_of * RELAY_HEADER;
                if !self.room(peer, need.min(SERVICE_QUEUE / 2)) {
                    if self.is_up(peer) {
                        log_info!(
                            "messenger-{}: the link to server {peer} is full; closing its \
                             client connection {}",
                            self.id,
                            r.conn
                        );
                    }
                    remote.sent += 1;
                    let close = ForwardMsg::Relay {
                        conn: r.conn,
                        seq: remote.sent,
                        close: true,
                        bytes: Vec::new(),
                    };
                    self.post(peer, &close);
                    inner.remotes.remove(&id);
                    inner.clients.remove(id);
                    continue;
                }
                let mut parts = r.bytes.chunks(RELAY_CHUNK).peekable();
                let mut first = true;
                while first || parts.peek().is_some() {
                    first = false;
                    let part = parts.next().unwrap_or_default();
                    remote.sent += 1;
                    let msg = ForwardMsg::Relay {
                        conn: r.conn,
                        seq: remote.sent,
                        close: r.close && parts.peek().is_none(),
                        bytes: part.to_vec(),
                    };
                    // A relay lost with its link: the follower sees the link end, or the
                    // next relay's number skip, and closes the connection.
                    self.post(peer, &msg);
                }
                if r.close {
                    inner.remotes.remove(&id);
                    inner.clients.remove(id);
                }
            }
        }
    }

    /// As follower: stops serving forwarded connection `conn` (its leader changed, a
    /// link to it failed, or a relay went missing): what it was relayed is flushed, then
    /// it is closed, and the client fails over; the leader forgets it.
    pub(super) fn drop_forwarded(&self, inner: &mut Inner, conn: u64) {
        if let Some(f) = inner.forwarded.remove(&conn) {
            self.post(f.leader, &ForwardMsg::Closed { conn });
            inner
                .clients
                .send(conn, Out::replies(0, None, &[], true), 0);
        }
    }

    /// As follower, forwards the request of client connection `conn` to the leader if it
    /// can (or must: the connection is bound to one). `None`: not forwarded, decide it
    /// here; `Some(close)`: forwarded, or to be closed because its leader is gone.
    pub(super) fn forward(&self, inner: &mut Inner, conn: u64, payload: &[u8]) -> Option<bool> {
        if let Some(f) = inner.forwarded.get_mut(&conn) {
            let msg = ForwardMsg::Forward {
                conn,
                seq: f.sent + 1,
                request: payload.to_vec(),
            };
            let same = !inner.stopping && inner.lead.is_none() && inner.leader == Some(f.leader);
            // A link down, or full (this client sends faster than the leader takes its
            // requests): the connection is closed, and the client fails over.
            if same && self.post_if_room(f.leader, &msg) {
                f.sent += 1;
                return Some(false);
            }
            let leader = f.leader;
            inner.forwarded.remove(&conn);
            self.post(leader, &ForwardMsg::Closed { conn });
            return Some(true);
        }
        match (&inner.lead, inner.leader) {
            (None, Some(l)) if l != self.id && !inner.stopping && inner.clients.contains(conn) => {
                let msg = ForwardMsg::Forward {
                    conn,
                    seq: 1,
                    request: payload.to_vec(),
                };
                // Its link down or full: redirected instead, as before forwarding.
                self.post_if_room(l, &msg).then(|| {
                    let f = Forwarded {
                        leader: l,
                        sent: 1,
                        got: 0,
                    };
                    inner.forwarded.insert(conn, f);
                    false
                })
            }
            _ => None,
        }
    }

    /// As leader, request `seq` of follower `peer`'s connection `conn`: decided as a
    /// connection of its own if it is the next one of a connection it serves (or the
    /// first of a new one); else the follower is told to close it.
    fn on_forward(&self, inner: &mut Inner, peer: usize, conn: u64, seq: u64, request: &[u8]) {
        let id = remote_id(peer, conn);
        let known = id.and_then(|id| inner.remotes.get(&id).map(|r| r.got));
        let leading = inner.lead.is_some() && !inner.stopping;
        let expected = known.map_or(1, |got| got + 1);
        let registered = match id {
            Some(_) if leading && seq == expected => {
                known.is_some() || inner.clients.remote(peer, conn).is_some()
            }
            _ => false,
        };
        let Some(id) = id.filter(|_| registered) else {
            // Not leading, or a request went missing: the connection is not served here.
            if let Some(id) = id.filter(|_| known.is_some()) {
                // Its close is relayed in order, after what it was owed.
                inner.clients.close(id);
                return;
            }
            let mut bytes = Vec::new();
            let mut payload = Vec::new();
            protocol::encode_reply(&Reply::Unavailable, &mut payload);
            encode_frame(Framing::U32, &payload, &mut bytes).expect("a one-byte frame");
            let relay = ForwardMsg::Relay {
                conn,
                // A first request is answered `41`; a later one of a connection this
                // server does not know is closed without an answer.
                seq: u64::from(seq == 1),
                close: true,
                bytes,
            };
            self.post(peer, &relay);
            return;
        };
        let remote = inner.remotes.entry(id).or_insert(Remote {
            peer,
            sent: 0,
            got: 0,
        });
        remote.got = seq;
        if self.request(inner, id, request) {
            inner.clients.remove(id);
        }
    }

    /// As follower, relay `seq` from `peer` for connection `conn`: written to the client
    /// if it is the next one of a connection bound to that leader; after a gap the
    /// connection is closed.
    fn on_relay(
        &self,
        inner: &mut Inner,
        from: (usize, u64),
        seq: u64,
        close: bool,
        bytes: Vec<u8>,
    ) {
        let (peer, conn) = from;
        let Some(f) = inner.forwarded.get_mut(&conn).filter(|f| f.leader == peer) else {
            return;
        };
        if seq != f.got + 1 {
            self.drop_forwarded(inner, conn);
            return;
        }
        f.got = seq;
        if close {
            inner.forwarded.remove(&conn);
        }
        inner.clients.relay_in(conn, bytes, close);
    }
}

/// Forwarding frames on the Raft links this server accepts.
impl PeerService for Shared {
    fn frame(&self, from: ReplicaId, body: &[u8]) {
        let msg = match ForwardMsg::decode(body) {
            Ok(m) => m,
            Err(e) => {
                log_info!("messenger-{}: from server {from}: {e}; dropped", self.id);
                return;
            }
        };
        let Some(peer) = (from as usize).checked_sub(1) else {
            return;
        };
        let mut guard = self.lock();
        let inner = &mut *guard;
        match msg {
            ForwardMsg::Forward { conn, seq, request } => {
                self.on_forward(inner, peer, conn, seq, &request);
            }
            ForwardMsg::Relay {
                conn,
                seq,
                close,
                bytes,
            } => self.on_relay(inner, (peer, conn), seq, close, bytes),
            ForwardMsg::Closed { conn } => {
                if let Some(id) = remote_id(peer, conn) {
                    if inner.remotes.remove(&id).is_some() {
                        inner.clients.remove(id);
                    }
                }
            }
        }
        self.pump(inner);
    }

    /// What the link carried after its last frame is lost: as leader, the follower's
    /// connections are closed (their closes relayed on the other link, if it is up); as
    /// follower, the connections forwarded to that leader are closed.
    fn ended(&self, from: ReplicaId) {
        let Some(peer) = (from as usize).checked_sub(1) else {
            return;
        };
        let mut guard = self.lock();
        let inner = &mut *guard;
        let served: Vec<u64> = (inner.remotes.iter())
            .filter(|(_, r)| r.peer == peer)
            .map(|(&id, _)| id)
            .collect();
        for id in served {
            inner.clients.close(id);
        }
        let forwarded: Vec<u64> = (inner.forwarded.iter())
            .filter(|(_, f)| f.leader == peer)
            .map(|(&conn, _)| conn)
            .collect();
        for conn in forwarded {
            self.drop_forwarded(inner, conn);
        }
        self.pump(inner);
        inner.remotes.retain(|_, r| r.peer != peer);
    }
}

#[cfg(test)]
mod tests {
    use super::super::fence::Machine;
    use super::super::Lead;
    use super::*;
    use crate::messenger::clients::Clients;
    use crate::messenger::state::State;
    use crate::outbox::testing::unstarted as outbox;
    use crate::outbox::Outbox;
    use crate::raft::links::LinkTransport;
    use std::collections::HashMap;
    use std::sync::{Condvar, Mutex, OnceLock};

    #[test]
    fn messages_are_the_documented_bytes_and_round_trip() {
        let forward = ForwardMsg::Forward {
            conn: 7,
            seq: 1,
            request: b"\x03*".to_vec(),
        };
        let mut want = vec![b'F'];
        want.extend_from_slice(&7u64.to_be_bytes());
        want.extend_from_slice(&1u64.to_be_bytes());
        want.extend_from_slice(b"\x03*");
        assert_eq!(forward.encode(), want);
        let relay = ForwardMsg::Relay {
            conn: 7,
            seq: 2,
            close: true,
            bytes: b"\0\0\0\x01\x20".to_vec(),
        };
        let mut want = vec![b'R'];
        want.extend_from_slice(&7u64.to_be_bytes());
        want.extend_from_slice(&2u64.to_be_bytes());
        want.push(1);
        want.extend_from_slice(b"\0\0\0\x01\x20");
        assert_eq!(relay.encode(), want);
        let closed = ForwardMsg::Closed { conn: 9 };
        assert_eq!(
            closed.encode(),
            [b"X".as_slice(), &9u64.to_be_bytes()].concat()
        );
        for m in [forward, relay, closed] {
            assert_eq!(ForwardMsg::decode(&m.encode()).unwrap(), m);
        }
        // Short, unknown, a bad flag, trailing bytes after a close: errors, not panics.
        assert!(ForwardMsg::decode(b"").is_err());
        assert!(ForwardMsg::decode(b"F\0\0").is_err());
        assert!(ForwardMsg::decode(b"Q").is_err());
        let mut bad = ForwardMsg::Relay {
            conn: 1,
            seq: 1,
            close: false,
            bytes: Vec::new(),
        }
        .encode();
        bad[17] = 2;
        assert!(ForwardMsg::decode(&bad).is_err());
        let mut long = ForwardMsg::Closed { conn: 1 }.encode();
        long.push(0);
        assert!(ForwardMsg::decode(&long).is_err());
    }

    /// Server `id` of three, with no links (posts fail), leading epoch 1 if `leads`, and
    /// server 0 as the leader Raft knows.
    fn shared(id: usize, leads: bool) -> Shared {
        let lead = leads.then(|| Lead {
            epoch: 1,
            term: 1,
            next: 1,
            committed: 0,
            view: State::new(),
        });
        Shared {
            id,
            limits: crate::messenger::state::Limits::default(),
            peers: 3,
            inner: Mutex::new(Inner {
                machine: Machine::default(),
                lead,
                clients: Clients::default(),
                queue: Vec::new(),
                claim: None,
                leader: Some(0),
                forwarded: HashMap::new(),
                remotes: HashMap::new(),
                stopping: false,
            }),
            queued: Condvar::new(),
            links: OnceLock::new(),
        }
    }

    /// Client connection `conn` of a follower, bound to leader 0 with two requests
    /// forwarded: its outbox (to watch), and its writer and far end to keep meanwhile.
    fn bound_to_0(inner: &mut Inner, conn: u64) -> (Outbox, impl Sized) {
        let (out, writer, client) = outbox();
        inner.clients.add(conn, out.clone());
        let bound = Forwarded {
            leader: 0,
            sent: 2,
            got: 0,
        };
        inner.forwarded.insert(conn, bound);
        (out, (writer, client))
    }

    /// A claim of this server's earlier life (replayed at a restart, or learnt from the
    /// leader's log) leads nothing: requests are not served as the leader's, so no answer
    /// goes out for a change that cannot commit. The claim this process waits for does.
    #[test]
    fn only_a_claim_this_process_made_makes_it_lead() {
        use crate::raft::driver::StateMachine;
        let s = std::sync::Arc::new(shared(1, false));
        let mut applier = super::super::Applier(std::sync::Arc::clone(&s));
        let claim = |epoch| super::super::Command::Lead { node: 1, epoch }.encode();
        applier.apply(1, &claim(1));
        assert!(s.lock().lead.is_none(), "a replayed claim led");
        s.lock().claim = Some((std::time::Instant::now(), 3));
        applier.apply(2, &claim(2));
        let inner = s.lock();
        let lead = inner.lead.as_ref().expect("its own claim leads");
        assert_eq!((lead.epoch, lead.term), (2, 3));
        assert!(inner.claim.is_none());
    }

    #[test]
    fn a_follower_writes_relays_in_number_order_and_closes_at_a_gap() {
        let s = shared(1, false);
        let mut guard = s.lock();
        let inner = &mut *guard;
        let (watch, _far) = bound_to_0(inner, 7);
        let frame = Out::replies(0, None, &[Reply::Ok], false).bytes;
        s.on_relay(inner, (0, 7), 1, false, frame.clone());
        assert_eq!(watch.len(), 1);
        // From a server it is not bound to: ignored.
        s.on_relay(inner, (2, 7), 2, false, frame.clone());
        assert_eq!((watch.len(), inner.forwarded[&7].got), (1, 1));
        // Relay 2 lost (a link redialled): relay 3 is not written, the connection closes.
        s.on_relay(inner, (0, 7), 3, false, frame);
        assert_eq!(watch.len(), 1);
        assert!(!inner.forwarded.contains_key(&7));
    }

    /// A Raft link to `peer` (a Raft id) whose writer does not run, filled with service
    /// frames until it has no more room for them: as a link whose far end reads slower
    /// than a client asks. With its outbox, and its writer and far end to keep meanwhile.
    fn full_link(peer: crate::raft::ReplicaId) -> (LinkTransport, Outbox, impl Sized) {
        let (client, served) = crate::outbox::testing::pair();
        // As many frames may wait as on a Raft link.
        let config = crate::outbox::OutboxConfig::new("test link", 4096);
        let (link, writer) = Outbox::new(std::sync::Arc::new(served), config);
        let links = LinkTransport::over(vec![(peer, link.clone())]);
        for size in [1 << 20, 1 << 14, 1 << 8, 1] {
            let filler = vec![b'x'; size];
            while links.has_room(peer, size) {
                assert!(links.post(peer, &filler));
            }
        }
        (links, link, (writer, client))
    }

    #[test]
    fn a_full_link_sheds_the_client_and_keeps_the_link() {
        // A follower whose link to the leader (server 0, Raft id 1) is full: a bound
        // connection's next request closes it (and tells the leader), a new connection is
        // decided here (redirected) rather than forwarded.
        let s = shared(1, false);
        let (links, link, _far) = full_link(1);
        assert!(s.links.set(links).is_ok());
        let mut guard = s.lock();
        let inner = &mut *guard;
        let _bound = bound_to_0(inner, 7);
        let queued = link.len();
        assert_eq!(s.forward(inner, 7, b"\x03*"), Some(true));
        assert!(!inner.forwarded.contains_key(&7));
        assert_eq!(link.len(), queued + 1, "the leader is told it closed");
        let (out, _writer, _client) = outbox();
        inner.clients.add(8, out);
        assert_eq!(s.forward(inner, 8, b"\x01ann"), None);
        assert!(!inner.forwarded.contains_key(&8));
        let links = s.links.get().unwrap();
        assert!(links.post(1, b"more"), "the link is kept");
        drop(guard);

        // A leader whose link to follower 1 (Raft id 2) is full: an answer for that
        // follower's client is not queued; the connection is closed with a close relay
        // and forgotten.
        let s = shared(0, true);
        let (links, link, _far) = full_link(2);
        assert!(s.links.set(links).is_ok());
        let mut guard = s.lock();
        let inner = &mut *guard;
        // Follower 1's connection 5, served since its first request, whose answer is
        // ready to relay.
        let id = inner.clients.remote(1, 5).unwrap();
        let remote = Remote {
            peer: 1,
            sent: 0,
            got: 1,
        };
        inner.remotes.insert(id, remote);
        inner
            .clients
            .send(id, Out::replies(0, None, &[Reply::Ok], false), 0);
        let queued = link.len();
        s.pump(inner);
        assert_eq!(link.len(), queued + 1, "only the close went");
        assert!(inner.remotes.is_empty() && !inner.clients.contains(id));
        let links = s.links.get().unwrap();
        assert!(links.post(2, b"more"), "the link is kept");
    }

    #[test]
    fn a_leader_serves_a_followers_connection_in_request_order_and_drops_it_at_a_gap() {
        let s = shared(0, true);
        let mut guard = s.lock();
        let inner = &mut *guard;
        let id = remote_id(1, 5).unwrap();
        s.on_forward(inner, 1, 5, 1, b"\x01ann");
        s.on_forward(inner, 1, 5, 2, b"\x03*");
        assert_eq!((inner.queue.len(), inner.remotes[&id].got), (2, 2));
        assert!(inner.clients.contains(id));
        // Request 3 lost: request 4 is not decided, the connection is closed and forgotten.
        s.on_forward(inner, 1, 5, 4, b"\x01bob");
        s.pump(inner);
        assert_eq!(inner.queue.len(), 2);
        assert!(inner.remotes.is_empty() && !inner.clients.contains(id));
        // A connection it does not know, past its first request: not served.
        s.on_forward(inner, 1, 6, 2, b"\x01bob");
        assert!(inner.remotes.is_empty() && inner.queue.len() == 2);
        // Not leading: not even a first request.
        inner.lead = None;
        s.on_forward(inner, 1, 8, 1, b"\x01bob");
        assert!(inner.remotes.is_empty() && inner.queue.len() == 2);
    }
}
