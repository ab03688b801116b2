//! The clients of this server: who is joined under which name, each with a bounded outbox
//! that the client's own writer thread drains onto its socket, so a slow reader delays
//! nobody but itself.

use crossbeam_channel::{unbounded, Receiver, Sender};
use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;

/// One encoded line (`\n` included), shared by every outbox it is queued in: a fan-out to a
/// hundred clients encodes once and copies a pointer a hundred times.
pub type Line = Arc<[u8]>;

/// Lines that a writer sends in one `write` call, at most (plus one line).
const BATCH_BYTES: usize = 64 << 10;

/// The sending end of a queue of lines that holds at most `limit`. Built on crossbeam's
/// unbounded channel, which allocates as it fills: a bounded one allocates every slot up
/// front (24 bytes a line), which for thousands of connections would be memory spent on
/// queues that are almost always empty.
#[derive(Debug, Clone)]
pub struct LineTx {
    tx: Sender<Line>,
    limit: usize,
}

impl LineTx {
    /// Queues `line`; `false` when `limit` lines are waiting already, or the reader is gone.
    pub fn offer(&self, line: Line) -> bool {
        // Checked, then sent: concurrent senders can overshoot by one line each, harmlessly.
        self.tx.len() < self.limit && self.tx.send(line).is_ok()
    }
}

/// A queue of at most `limit` lines.
pub fn queue(limit: usize) -> (LineTx, Receiver<Line>) {
    let (tx, rx) = unbounded();
    (
        LineTx {
            tx,
            limit: limit.max(1),
        },
        rx,
    )
}

/// Where a joined client's lines go.
#[derive(Debug)]
pub struct Outbox {
    /// The connection it belongs to: a stale leave from an earlier connection that used the
    /// same name must not remove the new one.
    pub conn: u64,
    /// The queue its writer thread drains.
    pub tx: LineTx,
    /// Its socket, to shut down when it falls too far behind.
    pub stream: Arc<TcpStream>,
}

/// The joined clients of this server, by name. Not locked itself: it lives in the chat
/// state, under the one lock that orders every event this server handles.
#[derive(Debug, Default)]
pub struct Hub {
    clients: HashMap<String, Outbox>,
}

impl Hub {
    /// Adds a client; `false` when the name is in use here.
    pub fn join(&mut self, name: &str, outbox: Outbox) -> bool {
        if self.clients.contains_key(name) {
            return false;
        }
        self.clients.insert(name.to_owned(), outbox);
        true
    }

    /// Removes the client `name` of connection `conn`, if it is still joined.
    pub fn leave(&mut self, name: &str, conn: u64) -> Option<Outbox> {
        match self.clients.get(name) {
            Some(outbox) if outbox.conn == conn => self.clients.remove(name),
            _ => None,
        }
    }

    /// Whether connection `conn` is joined as `name`.
    pub fn is_joined(&self, name: &str, conn: u64) -> bool {
        self.clients.get(name).is_some_and(|o| o.conn == conn)
    }

    /// Queues `line` for every client. A client whose outbox is full (it fell a whole
    /// outbox behind) or whose writer is gone is removed and its socket shut down; its name
    /// is pushed to `dropped` so the caller can announce it as leaving.
    pub fn deliver(&mut self, line: &Line, dropped: &mut Vec<String>) {
        let start = dropped.len();
        for (name, outbox) in &self.clients {
            if !outbox.tx.offer(Line::clone(line)) {
                dropped.push(name.clone());
            }
        }
        for name in &dropped[start..] {
            if let Some(outbox) = self.clients.remove(name) {
                let _ = outbox.stream.shutdown(Shutdown::Both);
            }
        }
    }

    /// The names joined here.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.clients.keys().map(String::as_str)
    }
}

/// Writes the lines of `rx` to `out` until every sender is gone, coalescing whatever is
/// queued into one `write` call. Used by client writers and server links alike.
///
/// # Errors
/// When a write fails (the peer is gone, or a write timeout expired).
pub fn drain(rx: &Receiver<Line>, mut out: &TcpStream) -> io::Result<()> {
    while let Ok(first) = rx.recv() {
        let Ok(second) = rx.try_recv() else {
            out.write_all(&first)?;
            continue;
        };
        // Allocated per batch, not kept: an idle client holds no buffer.
        let mut batch = Vec::with_capacity(first.len() + second.len() + 512);
        batch.extend_from_slice(&first);
        batch.extend_from_slice(&second);
        while batch.len() < BATCH_BYTES {
            match rx.try_recv() {
                Ok(line) => batch.extend_from_slice(&line),
                Err(_) => break,
            }
        }
        out.write_all(&batch)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn socket() -> Arc<TcpStream> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        Arc::new(stream)
    }

    #[test]
    fn a_full_outbox_drops_that_client_only() {
        let mut hub = Hub::default();
        let (fast_tx, fast_rx) = queue(2);
        let (slow_tx, _slow_rx) = queue(1);
        let stream = socket();
        assert!(hub.join(
            "fast",
            Outbox {
                conn: 1,
                tx: fast_tx,
                stream: stream.clone()
            }
        ));
        let (dup_tx, _) = queue(1);
        assert!(!hub.join(
            "fast",
            Outbox {
                conn: 9,
                tx: dup_tx,
                stream: stream.clone()
            }
        ));
        assert!(hub.join(
            "slow",
            Outbox {
                conn: 2,
                tx: slow_tx,
                stream
            }
        ));
        let line: Line = Arc::from(&b"x\n"[..]);
        let mut dropped = Vec::new();
        hub.deliver(&line, &mut dropped);
        assert!(dropped.is_empty());
        assert_eq!(fast_rx.recv().unwrap(), line);
        hub.deliver(&line, &mut dropped);
        assert_eq!(dropped, ["slow"]);
        assert!(!hub.is_joined("slow", 2));
        assert!(hub.is_joined("fast", 1));
        assert!(hub.leave("fast", 9).is_none(), "another connection's leave");
        assert!(hub.leave("fast", 1).is_some());
        assert_eq!(hub.names().count(), 0);
    }
}
