//! The clients of this server: who is joined under which name, each with a bounded outbox
//! that the client's own writer thread drains onto its socket, so a slow reader delays
//! nobody but itself.

use crate::outbox::{Bytes, Outbox};
use std::collections::HashMap;
use std::net::Shutdown;

/// One encoded line (`\n` included), shared by every outbox it is queued in: a fan-out to a
/// hundred clients encodes once and copies a pointer a hundred times.
pub type Line = Bytes;

/// A joined client: where its lines go.
#[derive(Debug)]
pub struct Client {
    /// The connection it belongs to: a stale leave from an earlier connection that used the
    /// same name must not remove the new one.
    pub conn: u64,
    /// The outbox its writer thread drains; a full one closes the connection itself.
    pub outbox: Outbox,
}

/// The joined clients of this server, by name. Not locked itself: it lives in the chat
/// state, under the one lock that orders every event this server handles.
#[derive(Debug, Default)]
pub struct Hub {
    clients: HashMap<String, Client>,
}

impl Hub {
    /// Adds a client; `false` when the name is in use here.
    pub fn join(&mut self, name: &str, client: Client) -> bool {
        if self.clients.contains_key(name) {
            return false;
        }
        self.clients.insert(name.to_owned(), client);
        true
    }

    /// Removes the client `name` of connection `conn`, if it is still joined.
    pub fn leave(&mut self, name: &str, conn: u64) -> Option<Client> {
        match self.clients.get(name) {
            Some(client) if client.conn == conn => self.clients.remove(name),
            _ => None,
        }
    }

    /// Removes the client `name`, whichever connection it is on: another server's claim to
    /// the name won (see `State::claim`).
    pub fn evict(&mut self, name: &str) -> Option<Client> {
        self.clients.remove(name)
    }

    /// Whether `name` is joined here.
    pub fn has(&self, name: &str) -> bool {
        self.clients.contains_key(name)
    }

    /// Whether connection `conn` is joined as `name`.
    pub fn is_joined(&self, name: &str, conn: u64) -> bool {
        self.clients.get(name).is_some_and(|c| c.conn == conn)
    }

    /// Queues `line` for every client. A client whose outbox is full (it fell a whole
    /// outbox behind: the outbox has closed its connection) or whose writer is gone is
    /// removed; its name is pushed to `dropped` so the caller can announce it as leaving.
    pub fn deliver(&mut self, line: &Line, dropped: &mut Vec<String>) {
        let start = dropped.len();
        for (name, client) in &self.clients {
            if client.outbox.send(Line::clone(line)).is_err() {
                dropped.push(name.clone());
            }
        }
        for name in &dropped[start..] {
            if let Some(client) = self.clients.remove(name) {
                // Closed already by an overflow; a writer gone had shut it down too.
                client.outbox.shutdown(Shutdown::Both);
            }
        }
    }

    /// The names joined here.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.clients.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::OutboxConfig;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;

    fn outbox(limit: usize) -> (Outbox, crate::outbox::Writer, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let (served, _) = listener.accept().unwrap();
        let (outbox, writer) = Outbox::new(Arc::new(served), OutboxConfig::new("test", limit));
        (outbox, writer, client)
    }

    #[test]
    fn a_full_outbox_drops_that_client_only() {
        let mut hub = Hub::default();
        let (fast, _fast_writer, _fast_client) = outbox(2);
        let (slow, _slow_writer, mut slow_client) = outbox(1);
        let (dup, _dup_writer, _dup_client) = outbox(1);
        assert!(hub.join(
            "fast",
            Client {
                conn: 1,
                outbox: fast.clone()
            }
        ));
        assert!(!hub.join(
            "fast",
            Client {
                conn: 9,
                outbox: dup
            }
        ));
        assert!(hub.join(
            "slow",
            Client {
                conn: 2,
                outbox: slow
            }
        ));
        let line: Line = Arc::from(&b"x\n"[..]);
        let mut dropped = Vec::new();
        hub.deliver(&line, &mut dropped);
        assert!(dropped.is_empty());
        assert_eq!(fast.len(), 1);
        hub.deliver(&line, &mut dropped);
        assert_eq!(dropped, ["slow"]);
        // The slow client's connection is closed: it reads the end, not a hang.
        assert_eq!(slow_client.read(&mut [0u8; 8]).unwrap(), 0);
        assert!(!hub.is_joined("slow", 2));
        assert!(hub.is_joined("fast", 1));
        assert!(hub.leave("fast", 9).is_none(), "another connection's leave");
        assert!(hub.leave("fast", 1).is_some());
        assert_eq!(hub.names().count(), 0);
    }
}
