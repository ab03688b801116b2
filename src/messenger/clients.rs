//! The client registry: every client connection of this server, its outbox, and who is
//! logged in where. The replica holds it under its lock; it knows nothing of replication,
//! and reads no socket (the connection code in [`super::server`] drains the outboxes).

use super::protocol::{self, Reply};
use crate::framing::{encode_frame, Framing};
use crate::log_debug;
use crossbeam_channel::Sender;
use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;

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

    /// Logs `user` in on `conn`, ending any earlier session of either (the decisions only
    /// log in a logged-out connection as a user logged in nowhere).
    pub(super) fn log_in(&mut self, conn: u64, user: String) {
        self.log_out(conn);
        if let Some(old) = self.by_user.insert(user.clone(), conn) {
            self.by_conn.remove(&old);
        }
        self.by_conn.insert(conn, user);
    }

    /// Logs out whoever is logged in on `conn`.
    pub(super) fn log_out(&mut self, conn: u64) {
        if let Some(user) = self.by_conn.remove(&conn) {
            if self.by_user.get(&user) == Some(&conn) {
                self.by_user.remove(&user);
            }
        }
    }

    fn clear(&mut self) {
        self.by_user.clear();
        self.by_conn.clear();
    }
}

/// One client connection, as the registry knows it.
struct Entry {
    /// Frames for the connection's outbox writer.
    outbox: Sender<Out>,
    /// The socket, to close it when the server steps down or the client stops reading.
    stream: Arc<TcpStream>,
}

/// Every client connection of this server, and its sessions.
#[derive(Default)]
pub(super) struct Clients {
    conns: HashMap<u64, Entry>,
    sessions: Sessions,
}

impl Clients {
    /// Registers connection `conn`, whose outbox writer reads from `outbox`.
    pub(super) fn add(&mut self, conn: u64, outbox: Sender<Out>, stream: Arc<TcpStream>) {
        self.conns.insert(conn, Entry { outbox, stream });
    }

    /// Forgets connection `conn` and logs it out. Its outbox sender is dropped here, so
    /// its writer drains what is queued and ends.
    pub(super) fn remove(&mut self, conn: u64) {
        self.conns.remove(&conn);
        self.sessions.log_out(conn);
    }

    /// Whether connection `conn` is registered.
    pub(super) fn contains(&self, conn: u64) -> bool {
        self.conns.contains_key(&conn)
    }

    /// The sessions, to decide requests against.
    pub(super) fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The sessions, to log in and out.
    pub(super) fn sessions_mut(&mut self) -> &mut Sessions {
        &mut self.sessions
    }

    /// Queues frames for connection `conn`. One whose outbox is full is not reading: it is
    /// disconnected (its undelivered messages stay queued for its next login).
    pub(super) fn send(&self, conn: u64, out: Out) {
        if let Some(c) = self.conns.get(&conn) {
            if c.outbox.try_send(out).is_err() {
                log_debug!("messenger: connection {conn} is not reading; closing it");
                let _ = c.stream.shutdown(Shutdown::Both);
            }
        }
    }

    /// Queues frames for whichever connection `user` is logged in on, if any.
    pub(super) fn send_to_user(&self, user: &str, out: Out) {
        if let Some(conn) = self.sessions.conn_of(user) {
            self.send(conn, out);
        }
    }

    /// Closes every client connection (their threads then end and remove them).
    pub(super) fn shutdown_all(&self) {
        for c in self.conns.values() {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
    }

    /// Closes every client connection and ends every session: the server stepped down,
    /// and its clients must fail over and log in again with the new primary.
    pub(super) fn close_all(&mut self) {
        self.shutdown_all();
        self.sessions.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_logged_in_on_one_connection_and_a_connection_as_one_user() {
        let mut s = Sessions::default();
        s.log_in(1, "ann".into());
        s.log_in(2, "bob".into());
        assert_eq!((s.user(1), s.conn_of("bob")), (Some("ann"), Some(2)));
        // Moving ann to connection 3 ends her session on 1.
        s.log_in(3, "ann".into());
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
