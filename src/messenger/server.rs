//! Client connections, sockets only: read a connection's frames and hand each request to
//! the replica, which decides it with `requests` and queues the answer under its lock; the
//! registry (`clients`) moves each answer into the connection's [`Outbox`] once the changes
//! it reveals are committed, and the framework's writer thread drains it. A connection
//! whose first frame is a HELLO is a replication link instead, served by the replica.
//!
//! Ordering: a connection's replies leave in request order; messages pushed to a recipient
//! are queued under the replica's lock, so they leave in message-number order, after the
//! login hand-over they follow.

use super::clients::OUTBOX;
use super::protocol::{self, Reply};
use super::replica_protocol::HELLO;
use super::replication::Replica;
use crate::framing::{encode_frame, FrameReader, Framing, Limits};
use crate::log_debug;
use crate::outbox::{Outbox, OutboxConfig, Writer};
use crate::request::{read_step, Step};
use crate::server::{Connection, HandlerError};
use std::net::TcpStream;
use std::sync::Arc;

/// The largest frame a client may send (a HELLO included); a longer one is a bad request.
const CLIENT_MAX_FRAME: usize = 4096;
/// Bytes of answers a client may fall behind before it is disconnected.
const OUTBOX_BYTES: usize = 8 << 20;

/// What a server over its connection limit writes before closing: `41`, "no primary right
/// now, try again shortly", which every client already handles by retrying (the other
/// servers, then this one). A framed reply, so a client never mistakes it for a length.
pub fn refusal() -> Vec<u8> {
    let mut payload = Vec::new();
    protocol::encode_reply(&Reply::Unavailable, &mut payload);
    let mut frame = Vec::new();
    encode_frame(Framing::U32, &payload, &mut frame).expect("a one-byte frame");
    frame
}

impl Replica {
    /// Serves one accepted connection: a replication link if its first frame is a HELLO,
    /// else a client.
    ///
    /// # Errors
    /// A framing error that loses sync, or a failed socket; each ends this connection only.
    pub fn serve(self: &Arc<Self>, conn: Connection) -> Result<(), HandlerError> {
        let mut reader = client_reader(&conn);
        let first = match read_step(&mut reader, &conn)? {
            Step::Frame(f) => f.to_vec(),
            // Longer than any request: answered as a bad request.
            Step::Skipped(_) => Vec::new(),
            Step::End => return Ok(()),
        };
        if first.first() == Some(&HELLO) {
            return self.serve_peer(&conn, &first, reader);
        }
        serve_client(&**self, &conn, reader, first)
    }
}

/// What a client connection needs of the server behind it: the primary-backup [`Replica`]
/// or the majority mode's [`super::majority::Majority`].
pub(super) trait Service {
    /// This server's id: its index in `--peers`.
    fn id(&self) -> usize;
    /// Registers connection `conn`, whose answers go to `outbox` (drained by `writer`).
    fn add_client(&self, conn: u64, outbox: Outbox, writer: Writer) -> std::io::Result<()>;
    /// Handles one request; true when the connection is to close.
    fn request(&self, conn: u64, payload: &[u8]) -> bool;
    /// Forgets connection `conn`: its reader ended.
    fn remove_client(&self, conn: u64);
}

impl Service for Replica {
    fn id(&self) -> usize {
        Replica::id(self)
    }

    fn add_client(&self, conn: u64, outbox: Outbox, writer: Writer) -> std::io::Result<()> {
        Replica::add_client(self, conn, outbox, writer)
    }

    fn request(&self, conn: u64, payload: &[u8]) -> bool {
        Replica::request(self, conn, payload)
    }

    fn remove_client(&self, conn: u64) {
        Replica::remove_client(self, conn)
    }
}

/// The reader of a client connection: `u32` frames of at most [`CLIENT_MAX_FRAME`] bytes,
/// counted against the server's client memory.
pub(super) fn client_reader(conn: &Connection) -> FrameReader<&TcpStream> {
    let limits = Limits {
        max_frame: CLIENT_MAX_FRAME,
        ..Limits::default()
    };
    FrameReader::with_limits(&*conn.stream, Framing::U32, limits).accounted(conn.account())
}

/// Serves a client connection whose first frame `first` was read already: each request
/// to `service`, until the connection ends or a request closes it. One let in past the
/// connection limit (the reserve is for peer links) is refused instead.
pub(super) fn serve_client(
    replica: &impl Service,
    conn: &Connection,
    mut reader: FrameReader<&TcpStream>,
    first: Vec<u8>,
) -> Result<(), HandlerError> {
    if conn.in_reserve() {
        conn.refuse();
        return Ok(());
    }
    let name = format!("messenger-{}: connection {}", replica.id(), conn.id);
    // Answers are small, but a search can list many messages: bytes are bounded as well.
    let config = OutboxConfig::new(name, OUTBOX)
        .max_bytes(OUTBOX_BYTES)
        .account(conn.account());
    let (outbox, writer) = Outbox::new(Arc::clone(&conn.stream), config);
    if let Err(e) = replica.add_client(conn.id, outbox, writer) {
        log_debug!(
            "messenger-{}: connection {} not served: {e}",
            replica.id(),
            conn.id
        );
        return Ok(());
    }
    let mut next = Some(first);
    let result = loop {
        let payload = match next.take() {
            Some(f) => f,
            None => match read_step(&mut reader, conn) {
                Ok(Step::Frame(f)) => f.to_vec(),
                // Longer than any request: answered as a bad request, and skipped.
                Ok(Step::Skipped(_)) => Vec::new(),
                // Closed, cut mid-frame, idle past the timeout, or vanished.
                Ok(Step::End) => break Ok(()),
                Err(e) => break Err(e),
            },
        };
        if replica.request(conn.id, &payload) {
            break Ok(());
        }
    };
    // The read buffer goes back to the client memory budget before `remove_client` waits
    // for the replica's lock: answers are queued (and charged) under that lock, and a
    // charge past the budget waits for the bytes of the connections it evicted (this one
    // among them) to come back; they must not need the lock it holds.
    drop(reader);
    // The registry drops the outbox once what is held for this connection has gone out:
    // the writer then flushes and half-closes, and ends in the replica's group.
    replica.remove_client(conn.id);
    result.map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Budget;
    use crate::server::{Server, ServerConfig};
    use std::io::Write;
    use std::sync::{Mutex, PoisonError};
    use std::thread;
    use std::time::{Duration, Instant};

    /// A service whose `remove_client` waits for a lock the test holds, as the replica's
    /// does while another connection's answer is queued under it.
    #[derive(Default)]
    struct Locked {
        lock: Mutex<()>,
    }

    impl Service for Locked {
        fn id(&self) -> usize {
            0
        }
        fn add_client(&self, _: u64, outbox: Outbox, writer: Writer) -> std::io::Result<()> {
            thread::spawn(move || writer.run());
            drop(outbox);
            Ok(())
        }
        fn request(&self, _: u64, _: &[u8]) -> bool {
            false
        }
        fn remove_client(&self, _: u64) {
            drop(self.lock.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }

    /// An evicted client's read buffer comes back to the budget without the lock that
    /// answers are charged under: a charge past the budget waits (100 ms) for evicted
    /// connections' bytes, and waited in vain for these (see the chat's test of the same).
    #[test]
    fn an_evicted_client_gives_its_read_buffer_back_before_it_is_removed() {
        let budget = Budget::new("messenger", 64 << 10);
        let config = ServerConfig {
            client_memory: Some(budget.clone()),
            ..ServerConfig::named("messenger")
        };
        let service = Arc::new(Locked::default());
        let served = Arc::clone(&service);
        let server = Server::bind("127.0.0.1:0", config, move |conn: Connection| {
            let mut reader = client_reader(&conn);
            let Ok(Step::Frame(first)) = read_step(&mut reader, &conn) else {
                return Ok(());
            };
            let first = first.to_vec();
            serve_client(&*served, &conn, reader, first)
        })
        .unwrap()
        .spawn()
        .unwrap();
        let mut client = TcpStream::connect(server.local_addr()).unwrap();
        client
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // A whole first frame, then most of a 4,000-byte one: its read buffer is charged.
        client.write_all(&[0, 0, 0, 1, 7]).unwrap();
        client.write_all(&4000u32.to_be_bytes()).unwrap();
        client.write_all(&[b'x'; 3000]).unwrap();
        let within_10s = |done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            done()
        };
        assert!(
            within_10s(&|| budget.held() >= 3000),
            "the partial frame is charged"
        );
        let held = service.lock.lock().unwrap();
        // Charges smaller than the client's fill the budget: the one that passes it evicts
        // the client, the largest holder.
        let charges = budget.charge_until_an_eviction(1 << 10, 100);
        assert_eq!(budget.evictions(), 1);
        let charged: usize = charges.iter().map(|c| c.bytes()).sum();
        let back = within_10s(&|| budget.held() <= charged);
        drop(held);
        assert!(
            back,
            "the evicted client's read buffer stayed charged until it was removed ({} held, \
             {charged} by the test)",
            budget.held()
        );
        drop(charges);
        server.stop();
    }
}
