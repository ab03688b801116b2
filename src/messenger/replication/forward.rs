//! Forwarding: a client of a backup is served by the primary through the backup, as a
//! follower of a replicated store forwards to its leader. A client that reaches a backup
//! but not the primary (a network cut between them) is served all the same.
//!
//! The backup passes each request of such a connection (FORWARD) on its link to the
//! primary and binds the connection to that primary; the primary decides it as for a
//! connection of its own, a *remote* one in its client registry (sessions included), and
//! sends the answers, once committed, back on its link to the backup (RELAY), which
//! writes them to the client. When that primary is no longer the one the backup knows, or
//! either link is down, the backup closes the connection and the client fails over as
//! from any closed connection (logging in again, resending what was unanswered); the
//! primary forgets a backup's connections when its link to that backup ends or the
//! backup reports one closed (CLOSED).

use super::outbound::{FORWARD_QUEUE, LINK_OUTBOX};
use super::view::Inner;
use super::Replica;
use crate::framing::{encode_frame, Framing};
use crate::log_info;
use crate::messenger::clients::remote_id;
use crate::messenger::protocol::{self, Reply};
use crate::messenger::replica_protocol::{ReplicaMsg, Role, RELAY_CHUNK};
use crate::messenger::requests::Serving;
use std::sync::MutexGuard;
use std::time::Instant;

impl Replica {
    /// Whether this server can forward to server `p` now: it hears `p` and its own link
    /// to `p` is up.
    fn can_forward(&self, inner: &Inner, p: usize) -> bool {
        p != self.id && inner.peers[p].linked && inner.up(p, Instant::now())
    }

    /// As backup, forwards the request of client connection `conn` to the primary if it
    /// can (or must: the connection is bound to one). `None`: not forwarded, decide it
    /// here; `Some(close)`: forwarded, or closed because its primary is gone.
    pub(super) fn forward(&self, inner: &mut Inner, conn: u64, payload: &[u8]) -> Option<bool> {
        if inner.forward_closed.contains_key(&conn) {
            // Closed by the primary: what it sent after is not served anywhere.
            return Some(true);
        }
        let serving = inner.serving(self.id);
        let target = match inner.forwarded.get(&conn) {
            Some(&p) => p,
            None => match serving {
                Serving::Redirect(p) if remote_id(self.id, conn).is_some() => p,
                _ => return None,
            },
        };
        if serving != Serving::Redirect(target) || !self.can_forward(inner, target) {
            // Bound to a primary that is gone (or never reachable): the client fails over.
            return inner.forwarded.remove(&conn).map(|_| true);
        }
        let request = payload.to_vec();
        let msg = ReplicaMsg::Forward { conn, request }.encode();
        let p = &mut inner.peers[target];
        let (frames, bytes) = p.behind;
        if frames >= LINK_OUTBOX / 2 || bytes + p.forwarding + msg.len() > FORWARD_QUEUE {
            // The link is behind: this client asks faster than it carries the requests.
            // Closed (a new one is answered here: told where the primary is), and the
            // primary told to forget it; the client fails over.
            log_info!(
                "messenger-{}: the link to server {target} is behind; not forwarding client \
                 connection {conn}'s request (the connection is closed, or redirected)",
                self.id
            );
            let bound = inner.forwarded.remove(&conn).is_some();
            if bound {
                let closed = ReplicaMsg::Closed { conn }.encode();
                inner.peers[target].control.push(closed);
                self.changed.notify_all();
            }
            return bound.then_some(true);
        }
        p.forwarding += msg.len();
        p.control.push(msg);
        inner.forwarded.insert(conn, target);
        self.changed.notify_all();
        Some(false)
    }

    /// Closes the forwarded connections whose primary is no longer the one this server
    /// knows, or cannot be reached.
    pub(super) fn check_forwarded(&self, inner: &mut Inner) {
        if inner.forwarded.is_empty() {
            return;
        }
        let serving = inner.serving(self.id);
        let gone: Vec<u64> = inner
            .forwarded
            .iter()
            .filter(|&(_, &p)| serving != Serving::Redirect(p) || !self.can_forward(inner, p))
            .map(|(&conn, _)| conn)
            .collect();
        for conn in gone {
            inner.forwarded.remove(&conn);
            inner.clients.close(conn);
        }
    }

    /// Client connection `conn` of this server ended: if it was forwarded, the primary
    /// forgets it (and its session).
    pub(super) fn forwarded_ended(&self, inner: &mut Inner, conn: u64) {
        let ended = inner.forwarded.remove(&conn);
        if let Some(p) = ended.or_else(|| inner.forward_closed.remove(&conn)) {
            inner.peers[p]
                .control
                .push(ReplicaMsg::Closed { conn }.encode());
            self.changed.notify_all();
        }
    }

    /// A FORWARD, RELAY or CLOSED from server `from`.
    pub(super) fn on_forwarding(
        &self,
        mut inner: MutexGuard<'_, Inner>,
        from: usize,
        msg: ReplicaMsg,
    ) {
        match msg {
            ReplicaMsg::Forward { conn, request } => {
                let id = (inner.role == Role::Primary && !inner.stopping)
                    .then(|| inner.clients.remote(from, conn))
                    .flatten();
                let Some(id) = id else {
                    // Not (or no longer) the primary: the client tries again elsewhere.
                    let mut bytes = Vec::new();
                    let mut payload = Vec::new();
                    protocol::encode_reply(&Reply::Unavailable, &mut payload);
                    encode_frame(Framing::U32, &payload, &mut bytes).expect("a one-byte frame");
                    let relay = ReplicaMsg::Relay {
                        conn,
                        close: true,
                        bytes,
                    };
                    inner.peers[from].control.push(relay.encode());
                    self.changed.notify_all();
                    return;
                };
                let (close, appended) = self.decide(&mut inner, id, &request);
                if close {
                    inner.clients.remove(id);
                }
                self.changed.notify_all();
                // Synced on the thread that reads `from`'s link: `from` counts as heard
                // meanwhile (see `flush_reading`), or a slow disk would make the backup
                // look silent here and be dropped from the members.
                if let Some(seq) = appended {
                    drop(self.flush_reading(inner, from, seq));
                }
            }
            ReplicaMsg::Relay { conn, close, bytes }
                if inner.forwarded.get(&conn) == Some(&from) =>
            {
                inner.clients.relay_in(conn, bytes, close);
                if close {
                    // Kept as closed until the connection ends: its frames still buffered
                    // are dropped, and the primary is told CLOSED then (it keeps its closed
                    // entry until so told, to refuse requests already on their way; a
                    // connection no longer in `forwarded` used to be never told, and the
                    // entry stayed until the link went).
                    if let Some(p) = inner.forwarded.remove(&conn) {
                        inner.forward_closed.insert(conn, p);
                    }
                }
            }
            ReplicaMsg::Closed { conn } => {
                if let Some(id) = remote_id(from, conn) {
                    inner.clients.remove(id);
                }
            }
            _ => {}
        }
    }

    /// As primary, appends what is to be relayed to backup `j`'s clients to `out`, in
    /// RELAY frames of at most [`RELAY_CHUNK`] bytes each. While the link to `j` is behind
    /// (half its batches wait, as a backup's forwarding is bounded; bytes alone are not
    /// counted here, as a snapshot on its way to `j` is one large batch), an answer is not
    /// queued: its connection is closed instead (an empty RELAY with close 1, once) and
    /// marked closed, so that its requests still on their way are refused, not taken for a
    /// new connection's; the client fails over, rather than pile answers onto the link
    /// until it is closed for being behind.
    pub(super) fn relay_to(&self, inner: &mut Inner, j: usize, out: &mut Vec<u8>) {
        let behind = inner.peers[j].behind.0 >= LINK_OUTBOX / 2;
        let mut closed = Vec::new();
        for r in inner.clients.take_relay(j) {
            if behind {
                if closed.contains(&r.conn) {
                    continue;
                }
                closed.push(r.conn);
                log_info!(
                    "messenger-{}: the link to server {j} is behind; closing its client \
                     connection {}",
                    self.id,
                    r.conn
                );
                let close = ReplicaMsg::Relay {
                    conn: r.conn,
                    close: true,
                    bytes: Vec::new(),
                };
                super::feed::encode_peer(&close.encode(), out);
                if let Some(id) = remote_id(j, r.conn) {
                    inner.clients.close_unrelayed(id);
                }
                continue;
            }
            let mut parts = r.bytes.chunks(RELAY_CHUNK).peekable();
            if parts.peek().is_none() {
                let msg = ReplicaMsg::Relay {
                    conn: r.conn,
                    close: r.close,
                    bytes: Vec::new(),
                };
                super::feed::encode_peer(&msg.encode(), out);
            }
            while let Some(part) = parts.next() {
                let msg = ReplicaMsg::Relay {
                    conn: r.conn,
                    close: r.close && parts.peek().is_none(),
                    bytes: part.to_vec(),
                };
                super::feed::encode_peer(&msg.encode(), out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::outbound::{FORWARD_QUEUE, LINK_OUTBOX};
    use crate::framing::{FrameReader, Framing};
    use crate::messenger::clients::Out;
    use crate::messenger::protocol::Reply;
    use crate::messenger::replica_protocol::ReplicaMsg;

    /// The relays `out` holds, decoded.
    fn relays(out: &[u8]) -> Vec<ReplicaMsg> {
        let mut reader = FrameReader::new(out, Framing::U32);
        let mut got = Vec::new();
        while let Some(frame) = reader.read_frame().unwrap() {
            got.push(ReplicaMsg::decode(frame).unwrap());
        }
        got
    }

    /// A primary whose link to a backup is behind (half its batches wait) closes that
    /// backup's client instead of queueing its answer: one empty RELAY with close 1, and
    /// the connection closed, so a request of it still on its way is refused rather than
    /// taken for a new connection's. A connection ended already (its last answer queued)
    /// is told to close all the same. Bytes alone (a snapshot on its way) shed nothing.
    #[test]
    fn a_primary_whose_link_is_behind_closes_the_backups_client_instead_of_relaying() {
        let (p, dir) = super::super::testing::replica(0, 2, "relay-behind");
        let mut inner = p.lock();
        let answer = |close| Out::replies(0, None, &[Reply::Ok], close);
        let relayed = |inner: &mut super::Inner| {
            let mut out = Vec::new();
            p.relay_to(inner, 1, &mut out);
            relays(&out)
        };
        let is_close = |m: &ReplicaMsg, c: u64| matches!(m, ReplicaMsg::Relay { conn, close: true, bytes } if *conn == c && bytes.is_empty());
        let id = inner.clients.remote(1, 5).unwrap();
        inner.clients.send(id, answer(false), 0);
        let sent = relayed(&mut inner);
        assert!(
            matches!(&sent[..], [ReplicaMsg::Relay { conn: 5, close: false, bytes }] if !bytes.is_empty()),
            "{sent:?}"
        );

        // A snapshot's worth of bytes waiting: answers go as ever.
        inner.peers[1].behind = (1, FORWARD_QUEUE + 1);
        inner.clients.send(id, answer(false), 0);
        assert_eq!(relayed(&mut inner).len(), 1);

        inner.peers[1].behind = (LINK_OUTBOX / 2, 0);
        inner.clients.send(id, answer(false), 0);
        inner.clients.send(id, answer(false), 0);
        let sent = relayed(&mut inner);
        assert!(matches!(&sent[..], [m] if is_close(m, 5)), "{sent:?}");
        assert!(!inner.clients.is_open(id));
        assert_eq!(
            inner.clients.remote(1, 5),
            None,
            "a late request is refused"
        );

        // Connection 6 ended (a quit) with its answer and close queued: closed all the same.
        let id = inner.clients.remote(1, 6).unwrap();
        inner.clients.send(id, answer(true), 0);
        inner.clients.remove(id);
        let sent = relayed(&mut inner);
        assert!(matches!(&sent[..], [m] if is_close(m, 6)), "{sent:?}");
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A backup told by the primary to close a forwarded connection drops the frames of
    /// it still buffered (forwarded, the primary would take them for a new connection's)
    /// and says CLOSED when the connection ends, so the primary forgets its entry (kept,
    /// closed, to refuse its requests still on their way) instead of keeping it until the
    /// link goes.
    #[test]
    fn a_backup_told_to_close_a_forwarded_connection_drops_the_rest_and_says_closed() {
        let (b, dir) = super::super::testing::replica(1, 2, "relay-close");
        let mut inner = b.lock();
        inner.forwarded.insert(7, 0);
        let close = ReplicaMsg::Relay {
            conn: 7,
            close: true,
            bytes: Vec::new(),
        };
        b.on_forwarding(inner, 0, close);
        let mut inner = b.lock();
        assert!(!inner.forwarded.contains_key(&7));
        // A frame it sent after: not forwarded, and the connection is to close.
        assert_eq!(b.forward(&mut inner, 7, b"x"), Some(true));
        assert!(inner.peers[0].control.is_empty());
        b.forwarded_ended(&mut inner, 7);
        let told: Vec<ReplicaMsg> = (inner.peers[0].control.iter())
            .map(|m| ReplicaMsg::decode(m).unwrap())
            .collect();
        assert!(
            matches!(&told[..], [ReplicaMsg::Closed { conn: 7 }]),
            "{told:?}"
        );
        assert!(inner.forward_closed.is_empty());
        drop(inner);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
