//! Client connections, sockets only: read a connection's frames, hand each request to the
//! replica (which decides it with `requests` and queues the answer under its
//! lock), and write the answers from the connection's outbox, whose writer thread holds
//! every frame back until the changes it reveals are committed. A connection whose first
//! frame is a HELLO is a replication link instead, served by the replica.
//!
//! Ordering: a connection's replies leave in request order; messages pushed to a recipient
//! are queued under the replica's lock, so they leave in message-number order, after the
//! login hand-over they follow.

use super::clients::Out;
use super::replica_protocol::HELLO;
use super::replication::Replica;
use crate::framing::{FrameError, FrameReader, Framing, Limits};
use crate::server::{is_disconnect, Connection, HandlerError};
use crossbeam_channel::{bounded, Receiver};
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::thread;

/// Frames queued for one client. A client that lets this many go unread is disconnected
/// (its undelivered messages stay queued for its next login).
const OUTBOX: usize = 1024;
/// The largest frame a client may send (a HELLO included); a longer one is a bad request.
const CLIENT_MAX_FRAME: usize = 4096;
/// The outbox writer sends at most this much per write.
const WRITE_BATCH: usize = 64 << 10;

impl Replica {
    /// Serves one accepted connection: a replication link if its first frame is a HELLO,
    /// else a client.
    ///
    /// # Errors
    /// A framing error that loses sync, or a failed socket; each ends this connection only.
    pub fn serve(self: &Arc<Self>, conn: Connection) -> Result<(), HandlerError> {
        let limits = Limits {
            max_frame: CLIENT_MAX_FRAME,
            ..Limits::default()
        };
        let mut reader = FrameReader::with_limits(&*conn.stream, Framing::U32, limits);
        let first = match reader.read_frame() {
            Ok(Some(f)) => f.to_vec(),
            Ok(None) => return Ok(()),
            Err(e) if e.is_recoverable() => Vec::new(),
            Err(FrameError::Io(e)) if is_disconnect(&e) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if first.first() == Some(&HELLO) {
            let buffered = reader.buffered_len();
            drop(reader);
            return self.serve_peer(&conn, &first, buffered);
        }
        serve_client(self, &conn, reader, first)
    }
}

fn serve_client(
    replica: &Arc<Replica>,
    conn: &Connection,
    mut reader: FrameReader<&TcpStream>,
    first: Vec<u8>,
) -> Result<(), HandlerError> {
    let (tx, rx) = bounded::<Out>(OUTBOX);
    let writer = {
        let replica = Arc::clone(replica);
        let stream = Arc::clone(&conn.stream);
        thread::Builder::new()
            .name(format!("messenger-{}-out-{}", replica.id(), conn.id))
            .stack_size(64 << 10)
            .spawn(move || write_outbox(&replica, &stream, &rx))?
    };
    replica.add_client(conn.id, tx, Arc::clone(&conn.stream));
    let mut next = Some(first);
    let result = loop {
        let payload = match next.take() {
            Some(f) => f,
            None => match reader.read_frame() {
                Ok(Some(f)) => f.to_vec(),
                Ok(None) => break Ok(()),
                // Longer than any request: answered as a bad request, and skipped.
                Err(e) if e.is_recoverable() => Vec::new(),
                Err(FrameError::Io(e)) if is_disconnect(&e) => break Ok(()),
                Err(e) => break Err(e),
            },
        };
        if replica.request(conn.id, &payload) {
            break Ok(());
        }
    };
    // The registry held the only sender: the writer drains what is queued and ends.
    replica.remove_client(conn.id);
    let _ = writer.join();
    result.map_err(Into::into)
}

/// Writes a connection's frames as their changes commit.
fn write_outbox(replica: &Replica, stream: &TcpStream, rx: &Receiver<Out>) {
    let mut buf = Vec::new();
    'connection: while let Ok(out) = rx.recv() {
        let mut next = Some(out);
        let mut end = false;
        while let Some(out) = next.take() {
            if let Some(tag) = out.tag {
                if !replica.wait_commit(out.epoch, tag) {
                    end = true;
                    break;
                }
            }
            buf.extend_from_slice(&out.bytes);
            if out.close {
                end = true;
                break;
            }
            if buf.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        let mut w = stream;
        if !buf.is_empty() && w.write_all(&buf).is_err() {
            break 'connection;
        }
        buf.clear();
        if end {
            break;
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}
