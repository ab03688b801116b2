//! One client connection: requests are read here, on the connection's thread; replies and
//! events reach the client through its outbox, drained by a writer thread of its own, so
//! both come out in the order they were queued.

use super::hub::{Client, Line};
use super::protocol::{self, ClientRequest, Refusal};
use super::{encode, Chat};
use crate::framing::{FrameError, FrameReader};
use crate::outbox::{Outbox, OutboxConfig};
use crate::request::{read_step, Step};
use crate::server::{Connection, HandlerError};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// A write to a client blocked this long means it has stopped reading: it is disconnected.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A writer thread only moves bytes from its queue to its socket.
const WRITER_STACK: usize = 64 << 10;
/// Bytes of lines a client may fall behind before it is disconnected, as `--outbox` lines
/// may (lines are up to 64 KiB: 4,096 of them could be 256 MiB).
const OUTBOX_BYTES: usize = 16 << 20;

/// Serves a client whose first request (or refusal) has been read already.
///
/// # Errors
/// When the writer thread cannot start, or the connection fails other than by closing.
pub(super) fn serve(
    chat: &Chat,
    conn: &Connection,
    mut reader: FrameReader<&TcpStream>,
    first: Result<ClientRequest, Refusal>,
) -> Result<(), HandlerError> {
    let stream = &conn.stream;
    stream.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT))?;
    let id = conn.id;
    let config = OutboxConfig::new(format!("chat: connection {id}"), chat.0.outbox)
        .max_bytes(OUTBOX_BYTES)
        .account(conn.account());
    let (outbox, writer) = Outbox::new(Arc::clone(stream), config);
    // Joined below, by this connection's thread: the writer lives exactly as long as the
    // session. A failed write shuts the socket down, so the reader sees the end too.
    let writer = thread::Builder::new()
        .name(format!("chat-out-{id}"))
        .stack_size(WRITER_STACK)
        .spawn(move || writer.run())?;
    let mut session = Session {
        chat,
        conn: conn.id,
        outbox,
        name: None,
    };
    let outcome = session.run(conn, &mut reader, first);
    // The read buffer goes back to the client memory budget before the leave below waits
    // for the state's lock: a fan-out holding that lock may be charging an outbox past the
    // budget, waiting for the bytes of the connections it evicted (this one among them) to
    // come back, and it would wait in vain, 100 ms a charge, while every newcomer's join
    // waits for the lock.
    drop(reader);
    if let Some(name) = session.name.take() {
        // Gone without a leave request: the others are told all the same.
        chat.leave(&name, conn.id);
    }
    if outcome.is_err() {
        let _ = stream.shutdown(Shutdown::Both);
    }
    // Dropping the last outbox lets the writer send what is queued (an `exit`) and end.
    drop(session);
    let _ = writer.join();
    outcome.map_err(Into::into)
}

struct Session<'a> {
    chat: &'a Chat,
    conn: u64,
    outbox: Outbox,
    /// The name this connection joined as.
    name: Option<String>,
}

/// Whether the connection goes on after a request.
enum Flow {
    Go,
    Stop,
}

impl Session<'_> {
    fn run(
        &mut self,
        conn: &Connection,
        reader: &mut FrameReader<&TcpStream>,
        first: Result<ClientRequest, Refusal>,
    ) -> Result<(), FrameError> {
        let mut next = Some(first);
        loop {
            let request = match next.take() {
                Some(request) => request,
                None => match read_step(reader, conn)? {
                    Step::Frame(line) => protocol::parse_client(line).map_err(Refusal::from),
                    Step::Skipped(_) => Err(Refusal::LineTooLong),
                    Step::End => return Ok(()),
                },
            };
            if let Flow::Stop = self.handle(request) {
                return Ok(());
            }
        }
    }

    fn handle(&mut self, request: Result<ClientRequest, Refusal>) -> Flow {
        let refusal = match request {
            Err(refusal) => refusal,
            Ok(ClientRequest::Join(name)) => {
                if self.name.is_some() {
                    Refusal::AlreadyJoined
                } else if self.chat.join(&name, self.client()) {
                    self.name = Some(name);
                    return Flow::Go;
                } else {
                    Refusal::NameTaken
                }
            }
            Ok(ClientRequest::Send { name, text }) => match self.check(&name) {
                Err(refusal) => refusal,
                Ok(()) if self.chat.send(&name, self.conn, text) => return Flow::Go,
                // Disconnected for falling behind; its socket is shut down already.
                Ok(()) => {
                    self.name = None;
                    return Flow::Stop;
                }
            },
            Ok(ClientRequest::Leave(name)) => match self.check(&name) {
                Err(refusal) => refusal,
                Ok(()) => {
                    self.name = None;
                    if self.chat.leave(&name, self.conn) {
                        // Removed first, so this is the last line queued for the client.
                        let _ = self.outbox.send(encode(protocol::format_exit));
                    }
                    return Flow::Stop;
                }
            },
            Ok(ClientRequest::Servers) => {
                let members = self.chat.members();
                return self.reply(encode(|out| protocol::format_servers(&members, out)));
            }
            Ok(ClientRequest::Who) => {
                let names = self.chat.who();
                return self.reply(encode(|out| protocol::format_clients(&names, out)));
            }
        };
        self.reply(encode(|out| protocol::format_error(refusal.reason(), out)))
    }

    /// A send or leave must come from a joined connection, under its own name.
    fn check(&self, name: &str) -> Result<(), Refusal> {
        match &self.name {
            None => Err(Refusal::NotJoined),
            Some(mine) if mine != name => Err(Refusal::NotYourName),
            Some(_) => Ok(()),
        }
    }

    fn client(&self) -> Client {
        Client {
            conn: self.conn,
            outbox: self.outbox.clone(),
        }
    }

    /// Queues a reply behind whatever events are queued. A client that lets a whole
    /// outbox of replies and events pile up is too far behind, as for events: the outbox
    /// disconnects it (and the session's end announces its leave).
    fn reply(&self, line: Line) -> Flow {
        match self.outbox.send(line) {
            Ok(()) => Flow::Go,
            Err(_) => Flow::Stop,
        }
    }
}
