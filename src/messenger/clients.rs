//! The client registry: every client connection of this server, its outbox, the frames
//! held back until the changes they reveal are committed, and who is logged in where. The
//! replica holds it under its lock; it knows nothing of replication and holds no socket:
//! each connection's [`Outbox`] (the framework's, drained by a writer thread) is its only
//! way out, and a frame enters it only once its change is committed.
//!
//! A connection may also be *remote*: a client of a backup whose requests the backup
//! forwards to this server (the primary). Its frames go, once committed, to a relay queue
//! per backup, which that backup's replication link carries back ([`Clients::take_relay`]).

use super::protocol::{self, Reply};
use super::state::Session;
use crate::framing::{encode_frame, Framing};
use crate::outbox::{Bytes, Outbox};
use std::collections::{HashMap, VecDeque};
use std::net::Shutdown;

/// Frames queued or held for one client: its outbox's limit, and the most frames held for
/// commit on its behalf. A client that lets this many go unread (or pipelines this many
/// requests ahead of the commits) is disconnected; its undelivered messages stay queued
/// for its next login.
pub(super) const OUTBOX: usize = 1024;

/// Frames for one client, to write once record `tag` of `epoch` is committed (at once if
/// no tag).
pub(super) struct Out {
    /// The primary's epoch when the frames were queued.
    pub(super) epoch: u64,
    /// The record the frames wait for.
    pub(super) tag: Option<u64>,
    /// Whole `u32` frames.
    pub(super) bytes: Vec<u8>,
    /// Close the connection after these frames.
    pub(super) close: bool,
}

impl Out {
    /// `replies`, framed, waiting for record `tag` of `epoch`.
    pub(super) fn replies(epoch: u64, tag: Option<u64>, replies: &[Reply], close: bool) -> Out {
        let mut bytes = Vec::new();
        for reply in replies {
            let mut payload = Vec::new();
            protocol::encode_reply(reply, &mut payload);
            encode_frame(Framing::U32, &payload, &mut bytes).expect("replies fit a u32 frame");
        }
        Out {
            epoch,
            tag,
            bytes,
            close,
        }
    }
}

/// Who is logged in on which connection: at most one connection per user and one user per
/// connection. Not replicated: sessions belong to the primary's connections.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Sessions {
    by_user: HashMap<String, u64>,
    by_conn: HashMap<u64, String>,
    /// The session token each logged-in connection gave at login, if any.
    tokens: HashMap<u64, u64>,
}

impl Sessions {
    /// Who is logged in on connection `conn`.
    pub(super) fn user(&self, conn: u64) -> Option<&str> {
        self.by_conn.get(&conn).map(String::as_str)
    }

    /// The connection `user` is logged in on.
    pub(super) fn conn_of(&self, user: &str) -> Option<u64> {
        self.by_user.get(user).copied()
    }

    /// Whether `user` is logged in on a connection whose session a login with `token`
    /// may not take over (any, without a token).
    pub(super) fn held_against(&self, user: &str, token: Option<u64>) -> bool {
        self.conn_of(user)
            .is_some_and(|c| token.is_none() || self.tokens.get(&c) != token.as_ref())
    }

    /// Logs `user` in on `conn` with session `token`, ending any earlier session of either
    /// (the decisions only log in a logged-out connection as a user logged in nowhere, or
    /// in a session the login takes over); returns the connection whose session it took.
    pub(super) fn log_in(&mut self, conn: u64, user: String, token: Option<u64>) -> Option<u64> {
        self.log_out(conn);
        let old = self.by_user.insert(user.clone(), conn);
        if let Some(old) = old {
            self.by_conn.remove(&old);
            self.tokens.remove(&old);
        }
        self.by_conn.insert(conn, user);
        if let Some(t) = token {
            self.tokens.insert(conn, t);
        }
        old.filter(|&o| o != conn)
    }

    /// Logs out whoever is logged in on `conn`.
    pub(super) fn log_out(&mut self, conn: u64) {
        self.tokens.remove(&conn);
        if let Some(user) = self.by_conn.remove(&conn) {
            if self.by_user.get(&user) == Some(&conn) {
                self.by_user.remove(&user);
            }
        }
    }

    fn clear(&mut self) {
        self.by_user.clear();
        self.by_conn.clear();
        self.tokens.clear();
    }
}

/// Where a connection's frames go.
enum Sink {
    /// A connection of this server. Dropping the outbox lets the writer flush what is
    /// queued and half-close.
    Local(Outbox),
    /// A client of backup `peer`, connection `conn` there: frames go to the relay queue.
    Remote { peer: usize, conn: u64 },
}

/// Frames for a backup's client, to relay.
pub(super) struct Relayed {
    /// The connection's id on the backup.
    pub(super) conn: u64,
    /// Whole reply frames.
    pub(super) bytes: Bytes,
    /// Close the connection after them.
    pub(super) close: bool,
}

/// Ids of remote connections: this bit, the backup's id, then its connection id.
const REMOTE: u64 = 1 << 63;
const REMOTE_PEER_SHIFT: u32 = 44;

/// The registry's id for connection `conn` of backup `peer`, if it fits.
pub(super) fn remote_id(peer: usize, conn: u64) -> Option<u64> {
    (conn < 1 << REMOTE_PEER_SHIFT && peer < 1 << 16)
        .then_some(REMOTE | (peer as u64) << REMOTE_PEER_SHIFT | conn)
}

/// One client connection, as the registry knows it.
struct Entry {
    /// Its way out.
    sink: Sink,
    /// Frames of this connection in [`Clients::held`].
    held: usize,
    /// Its reader has ended: the entry goes once nothing is held for it any more.
    leaving: bool,
    /// A frame that closes the connection was sent: nothing more goes out on it.
    closed: bool,
}

/// Frames waiting for their change to commit.
struct Held {
    conn: u64,
    epoch: u64,
    tag: u64,
    bytes: Bytes,
    close: bool,
}

/// Every client connection of this server, its held frames, and its sessions.
#[derive(Default)]
pub(super) struct Clients {
    conns: HashMap<u64, Entry>,
    /// Frames waiting for a commit, in the order they were queued. Tags are the last
    /// record's sequence number when queued, which only grows while this server is primary
    /// (and everything held is dropped when it stops being primary), so the queue is sorted
    /// by tag: a commit releases a prefix of it, and each connection's frames leave in the
    /// order they were queued.
    held: VecDeque<Held>,
    sessions: Sessions,
    /// Frames for the clients of each backup (by backup id), in order.
    relay: HashMap<usize, Vec<Relayed>>,
}

impl Clients {
    /// Registers connection `conn`, whose frames go to `outbox`.
    pub(super) fn add(&mut self, conn: u64, outbox: Outbox) {
        self.insert(conn, Sink::Local(outbox));
    }

    fn insert(&mut self, conn: u64, sink: Sink) {
        let entry = Entry {
            sink,
            held: 0,
            leaving: false,
            closed: false,
        };
        self.conns.insert(conn, entry);
    }

    /// The registry's id for connection `conn` of backup `peer`, registered if it is new;
    /// `None` if it cannot be (an id out of range, or a connection that closed).
    pub(super) fn remote(&mut self, peer: usize, conn: u64) -> Option<u64> {
        let id = remote_id(peer, conn)?;
        match self.conns.get(&id) {
            Some(e) if e.closed || e.leaving => None,
            Some(_) => Some(id),
            None => {
                self.insert(id, Sink::Remote { peer, conn });
                Some(id)
            }
        }
    }

    /// Forgets every connection of backup `peer` (its link is gone), logging them out;
    /// what was to be relayed to it is dropped.
    pub(super) fn drop_remote(&mut self, peer: usize) {
        let gone: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, e)| matches!(e.sink, Sink::Remote { peer: p, .. } if p == peer))
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.sessions.log_out(id);
            self.conns.remove(&id);
        }
        self.held
            .retain(|h| h.conn & REMOTE == 0 || remote_peer(h.conn) != peer);
        self.relay.remove(&peer);
    }

    /// Takes what is to be relayed to backup `peer`'s clients.
    pub(super) fn take_relay(&mut self, peer: usize) -> Vec<Relayed> {
        self.relay.remove(&peer).unwrap_or_default()
    }

    /// Forgets connection `conn` (its reader ended) and logs it out. Its outbox is dropped
    /// once the frames held for it have been released, so its writer sends them, then ends.
    pub(super) fn remove(&mut self, conn: u64) {
        self.sessions.log_out(conn);
        if let Some(entry) = self.conns.get_mut(&conn) {
            entry.leaving = true;
            if entry.held == 0 {
                self.conns.remove(&conn);
            }
        }
    }

    /// Whether connection `conn` is registered and still reading.
    pub(super) fn contains(&self, conn: u64) -> bool {
        self.conns.get(&conn).is_some_and(|e| !e.leaving)
    }

    /// Registered, and not closed by this server: a request read from it may be decided.
    /// A connection closed when the server stepped down may still have requests in its
    /// reader's buffer (read while the server was stalled); deciding them later, after it
    /// took over again, would apply what no answer can reach.
    pub(super) fn is_open(&self, conn: u64) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|e| !e.leaving && !e.closed)
    }

    /// The sessions, to decide requests against.
    pub(super) fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Carries out a decision's session effect for connection `conn` (`token`: a login's
    /// session token). A session a login takes over (the same client, come back another
    /// way) has its old connection closed.
    pub(super) fn session_effect(&mut self, conn: u64, session: Session, token: Option<u64>) {
        match session {
            Session::LogIn(name) => {
                if let Some(old) = self.sessions.log_in(conn, name, token) {
                    self.close(old);
                }
            }
            Session::LogOut | Session::Quit => self.sessions.log_out(conn),
            Session::Keep => {}
        }
    }

    /// Hands relayed frames to forwarded connection `conn` of this server at once (the
    /// primary sent them once committed); closes it after them if `close`.
    pub(super) fn relay_in(&mut self, conn: u64, bytes: Vec<u8>, close: bool) {
        if let Some(entry) = self.conns.get_mut(&conn) {
            if !entry.closed {
                deliver(entry, Bytes::from(bytes), close, &mut self.relay);
            }
        }
    }

    /// Closes connection `conn` at once (its forwarding ended, or its session was taken
    /// over), dropping what is queued for it; a remote one is told to close.
    pub(super) fn close(&mut self, conn: u64) {
        self.sessions.log_out(conn);
        let Some(entry) = self.conns.get_mut(&conn) else {
            return;
        };
        match &entry.sink {
            Sink::Local(outbox) => outbox.shutdown(Shutdown::Both),
            Sink::Remote { .. } if !entry.closed => {
                deliver(entry, Bytes::from(Vec::new()), true, &mut self.relay);
            }
            Sink::Remote { .. } => {}
        }
        entry.closed = true;
    }

    /// Closes remote connection `conn` whose close its server's caller sends itself (the
    /// link to that server is behind: nothing more is relayed for it), logging it out. The
    /// entry stays, closed, so that a request of it still on its way is refused rather
    /// than taken for a new connection's.
    pub(super) fn close_unrelayed(&mut self, conn: u64) {
        self.sessions.log_out(conn);
        if let Some(entry) = self.conns.get_mut(&conn) {
            entry.closed = true;
        }
    }

    /// Frames held for a commit, all connections together.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.held.len()
    }

    /// Queues frames for connection `conn`: into its outbox at once if what they wait for
    /// is `committed` already and nothing of it is held before them, else held until
    /// [`Clients::release`]. A connection with [`OUTBOX`] frames held, or a full outbox,
    /// is not reading: it is disconnected.
    pub(super) fn send(&mut self, conn: u64, out: Out, committed: u64) {
        let Some(entry) = self.conns.get_mut(&conn) else {
            return;
        };
        if entry.closed {
            return;
        }
        let bytes = Bytes::from(out.bytes);
        let ready = out.tag.is_none_or(|tag| tag <= committed);
        if ready && entry.held == 0 {
            deliver(entry, bytes, out.close, &mut self.relay);
            return;
        }
        if entry.held >= OUTBOX {
            match &entry.sink {
                Sink::Local(outbox) => outbox.close("too many answers waiting for commit"),
                Sink::Remote { .. } => {
                    deliver(entry, Bytes::from(Vec::new()), true, &mut self.relay);
                }
            }
            return;
        }
        // Held bytes count as the connection's queued ones (charged to the client memory
        // budget, within its outbox's byte bound) until released: a login's hand-over can
        // be megabytes, and a client pipelining them while commits are slow would hold
        // them beside the budget. Past either, the connection is closed.
        if let Sink::Local(outbox) = &entry.sink {
            if outbox.hold(bytes.len()).is_err() {
                return;
            }
        }
        // An untagged frame behind held ones waits with the last of them.
        let last = self.held.back().map_or(0, |h| h.tag);
        let tag = out.tag.unwrap_or(last).max(last);
        entry.held += 1;
        self.held.push_back(Held {
            conn,
            epoch: out.epoch,
            tag,
            bytes,
            close: out.close,
        });
    }

    /// Queues frames for whichever connection `user` is logged in on, if any.
    pub(super) fn send_to_user(&mut self, user: &str, out: Out, committed: u64) {
        if let Some(conn) = self.sessions.conn_of(user) {
            self.send(conn, out, committed);
        }
    }

    /// Moves every frame of `epoch` that waits for a record up to `committed` into its
    /// connection's outbox (a channel send each: no I/O under the replica's lock).
    pub(super) fn release(&mut self, epoch: u64, committed: u64) {
        while self.held.front().is_some_and(|h| h.tag <= committed) {
            let Some(h) = self.held.pop_front() else {
                break;
            };
            let Some(entry) = self.conns.get_mut(&h.conn) else {
                continue;
            };
            entry.held -= 1;
            if let Sink::Local(outbox) = &entry.sink {
                outbox.released(h.bytes.len());
            }
            if h.epoch == epoch && !entry.closed {
                deliver(entry, h.bytes, h.close, &mut self.relay);
            }
            if entry.leaving && entry.held == 0 {
                self.conns.remove(&h.conn);
            }
        }
    }

    /// Drops every held frame: what they answer will never be committed by this server in
    /// their epoch (it stepped down, or it is stopping). Their connections are closed.
    fn drop_held(&mut self) {
        for h in self.held.drain(..) {
            if let Some(Entry {
                sink: Sink::Local(outbox),
                ..
            }) = self.conns.get(&h.conn)
            {
                outbox.released(h.bytes.len());
            }
        }
        self.conns.retain(|_, e| {
            e.held = 0;
            !e.leaving
        });
    }

    /// Closes every client connection (their threads then end and remove them; remote
    /// ones are told to close and forgotten), dropping whatever is held for them.
    fn shutdown_all(&mut self) {
        let relay = &mut self.relay;
        self.conns.retain(|_, c| match &c.sink {
            Sink::Local(outbox) => {
                outbox.shutdown(Shutdown::Both);
                // Frames its reader already took in are not requests any more (see
                // `is_open`).
                c.closed = true;
                true
            }
            Sink::Remote { peer, conn } => {
                relay.entry(*peer).or_default().push(Relayed {
                    conn: *conn,
                    bytes: Bytes::from(Vec::new()),
                    close: true,
                });
                false
            }
        });
        self.drop_held();
    }

    /// Closes every client connection and forgets them: the server is stopping. Their
    /// outboxes are dropped here, so their writers end without waiting for the readers.
    pub(super) fn stop(&mut self) {
        self.shutdown_all();
        self.conns.clear();
        self.sessions.clear();
    }

    /// Closes every client connection and ends every session: the server stepped down,
    /// and its clients must fail over and log in again with the new primary.
    pub(super) fn close_all(&mut self) {
        self.shutdown_all();
        self.sessions.clear();
    }
}

/// The backup a remote connection id belongs to.
fn remote_peer(id: u64) -> usize {
    ((id & !REMOTE) >> REMOTE_PEER_SHIFT) as usize
}

/// Hands frames to a connection's writer (or, for a remote one, to the relay queue of its
/// backup); a frame that closes the connection is its last. A full outbox has closed its
/// connection and logged why.
fn deliver(entry: &mut Entry, bytes: Bytes, close: bool, relay: &mut HashMap<usize, Vec<Relayed>>) {
    match &entry.sink {
        Sink::Local(outbox) => {
            if !bytes.is_empty() {
                let _ = outbox.send(bytes);
            }
            if close {
                // The reader ends (if the request that closes it has not ended it already);
                // the writer flushes what is queued, then half-closes.
                outbox.shutdown(Shutdown::Read);
            }
        }
        Sink::Remote { peer, conn } => relay.entry(*peer).or_default().push(Relayed {
            conn: *conn,
            bytes,
            close,
        }),
    }
    if close {
        entry.closed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::FrameReader;
    use crate::outbox::testing::unstarted as outbox;

    fn ok(epoch: u64, tag: Option<u64>) -> Out {
        Out::replies(epoch, tag, &[Reply::Ok], false)
    }

    #[test]
    fn frames_enter_the_outbox_only_once_their_change_commits_in_queue_order() {
        let mut clients = Clients::default();
        let (a, a_writer, _a_client) = outbox();
        let (b, _b_writer, _b_client) = outbox();
        let watch_a = a.clone();
        let watch_b = b.clone();
        clients.add(1, a);
        clients.add(2, b);
        // Committed already: straight in. Waiting for record 5 or 6: held.
        clients.send(1, ok(7, Some(3)), 3);
        clients.send(1, ok(7, Some(5)), 3);
        clients.send(2, ok(7, Some(6)), 3);
        // Untagged, behind a held frame of its connection: waits with it, never overtakes.
        clients.send(1, ok(7, None), 3);
        assert_eq!((watch_a.len(), watch_b.len(), clients.held()), (1, 0, 3));
        clients.release(7, 5);
        assert_eq!((watch_a.len(), watch_b.len(), clients.held()), (2, 0, 2));
        // A connection whose reader ended stays registered until what it is owed is out.
        clients.remove(2);
        assert!(!clients.contains(2));
        clients.release(7, 6);
        assert_eq!((watch_a.len(), watch_b.len(), clients.held()), (3, 1, 0));
        assert!(!clients.conns.contains_key(&2), "gone once released");
        // Stepping down drops what is held (it will never commit in its epoch) and closes.
        clients.send(1, ok(7, Some(9)), 6);
        clients.close_all();
        assert_eq!((watch_a.len(), clients.held()), (3, 0));
        clients.release(7, 9);
        assert_eq!(watch_a.len(), 3);
        drop(a_writer);
    }

    /// Frames held for a commit are charged to the connection's share of the client
    /// memory budget as its queued ones are, and given back once released; past the
    /// budget the connection is closed, not held beside it.
    #[test]
    fn held_frames_are_charged_to_the_budget_until_released() {
        use crate::budget::Budget;
        use crate::outbox::OutboxConfig;
        let budget = Budget::new("test", 4 << 20);
        let account = budget.account("connection 1", None);
        let (_client, served) = crate::outbox::testing::pair();
        let config = OutboxConfig::new("test", OUTBOX)
            .max_bytes(64 << 20)
            .account(Some(&account));
        let (out, _writer) = Outbox::new(std::sync::Arc::new(served), config);
        let mut clients = Clients::default();
        clients.add(1, out.clone());
        let big = |tag| Out {
            epoch: 7,
            tag: Some(tag),
            bytes: vec![b'x'; 1 << 20],
            close: false,
        };
        clients.send(1, big(5), 3);
        clients.send(1, big(6), 3);
        assert_eq!(clients.held(), 2);
        assert!(budget.held() >= 2 << 20, "held {}", budget.held());
        // Released into the outbox: charged there, the same bytes (not twice).
        clients.release(7, 5);
        assert!(budget.held() < 3 << 20, "held {}", budget.held());
        // Past the budget: closed, and nothing more is held for it.
        for tag in 7..12 {
            clients.send(1, big(tag), 3);
        }
        assert!(budget.held() <= 4 << 20, "held {}", budget.held());
        assert!(clients.held() < 6, "{} held", clients.held());
    }

    #[test]
    fn the_written_frames_are_the_replies_in_order() {
        let mut clients = Clients::default();
        let (a, writer, client) = outbox();
        clients.add(1, a);
        clients.send(
            1,
            Out::replies(1, None, &[Reply::Ok, Reply::Unavailable], true),
            0,
        );
        // Nothing goes out on a connection after a frame that closes it.
        clients.send(1, ok(1, None), 0);
        clients.remove(1);
        writer.run();
        let mut reader = FrameReader::new(client, Framing::U32);
        let mut got = Vec::new();
        while let Some(frame) = reader.read_frame().unwrap() {
            got.push(protocol::decode_reply(frame).unwrap());
        }
        assert_eq!(got, [Reply::Ok, Reply::Unavailable]);
    }

    #[test]
    fn a_user_is_logged_in_on_one_connection_and_a_connection_as_one_user() {
        let mut s = Sessions::default();
        s.log_in(1, "ann".into(), None);
        s.log_in(2, "bob".into(), None);
        assert_eq!((s.user(1), s.conn_of("bob")), (Some("ann"), Some(2)));
        // Moving ann to connection 3 ends her session on 1.
        s.log_in(3, "ann".into(), None);
        assert_eq!((s.user(1), s.conn_of("ann")), (None, Some(3)));
        // Logging out a connection that holds nobody changes nothing.
        s.log_out(1);
        assert_eq!(s.conn_of("ann"), Some(3));
        s.log_out(3);
        assert_eq!(
            (s.user(3), s.conn_of("ann"), s.user(2)),
            (None, None, Some("bob"))
        );
    }

    #[test]
    fn replies_are_framed_in_order() {
        let out = Out::replies(7, Some(3), &[Reply::Ok, Reply::Unavailable], true);
        let mut want = Vec::new();
        for r in [Reply::Ok, Reply::Unavailable] {
            let mut payload = Vec::new();
            protocol::encode_reply(&r, &mut payload);
            want.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            want.extend_from_slice(&payload);
        }
        assert_eq!((out.epoch, out.tag, out.close), (7, Some(3), true));
        assert_eq!(out.bytes, want);
    }
}
