//! Client connections: the primary decides each request against the state, logs and
//! replicates the change it makes, and answers through the connection's outbox, whose
//! writer thread holds every frame back until the changes it reveals are committed. Other
//! servers answer with a redirect to the primary, or "unavailable" while there is none,
//! and close the connection; a confirm, which is never answered, they ignore.
//!
//! Ordering: a connection's replies leave in request order; messages pushed to a recipient
//! are queued under the state lock, so they leave in message-number order, after the
//! login hand-over they follow.

use super::peer::{Role, HELLO};
use super::protocol::{self, Delivery, Reply, Request};
use super::replication::{Inner, Node};
use super::state::Session;
use crate::framing::{encode_frame, FrameError, FrameReader, Framing, Limits};
use crate::log_debug;
use crate::server::{is_disconnect, Connection, HandlerError};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::HashMap;
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

/// One client connection, as the node knows it.
pub(super) struct ClientEntry {
    /// Frames for the outbox writer.
    pub(super) outbox: Sender<Out>,
    /// The socket, to close it when the server steps down.
    pub(super) stream: Arc<TcpStream>,
    /// Who is logged in on it.
    pub(super) user: Option<String>,
}

/// Frames to write once record `tag` of `epoch` is committed (at once if no tag).
pub(super) struct Out {
    epoch: u64,
    tag: Option<u64>,
    bytes: Vec<u8>,
    close: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

fn frame(reply: &Reply, out: &mut Vec<u8>) {
    let mut payload = Vec::new();
    protocol::encode_reply(reply, &mut payload);
    encode_frame(Framing::U32, &payload, out).expect("replies fit a u32 frame");
}

impl Node {
    /// Serves one accepted connection: a peer link if its first frame is a HELLO, else a
    /// client.
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
        self.serve_client(&conn, reader, first)
    }

    fn serve_client(
        self: &Arc<Self>,
        conn: &Connection,
        mut reader: FrameReader<&TcpStream>,
        first: Vec<u8>,
    ) -> Result<(), HandlerError> {
        let (tx, rx) = bounded::<Out>(OUTBOX);
        let node = Arc::clone(self);
        let stream = Arc::clone(&conn.stream);
        let writer = thread::Builder::new()
            .name(format!("messenger-{}-out-{}", self.id, conn.id))
            .stack_size(64 << 10)
            .spawn(move || node.run_outbox(&stream, &rx))?;
        self.lock().clients.insert(
            conn.id,
            ClientEntry {
                outbox: tx,
                stream: Arc::clone(&conn.stream),
                user: None,
            },
        );
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
            if self.handle(conn.id, &payload) == Flow::Close {
                break Ok(());
            }
        };
        {
            let mut inner = self.lock();
            if let Some(user) = inner.clients.remove(&conn.id).and_then(|c| c.user) {
                if inner.sessions.get(&user) == Some(&conn.id) {
                    inner.sessions.remove(&user);
                }
            }
        }
        // The entry held the only sender: the writer drains what is queued and ends.
        let _ = writer.join();
        result.map_err(Into::into)
    }

    /// Decides, applies and answers one request.
    fn handle(&self, conn_id: u64, payload: &[u8]) -> Flow {
        let decoded = protocol::decode_request(payload);
        let mut inner = self.lock();
        let epoch = inner.epoch;
        if inner.role != Role::Primary || inner.stopping {
            // A confirm is never answered, here either: the client expects no reply to it
            // and would take one for the answer to its next request, which gets the
            // redirect itself. Nothing else changes: a backup applies no confirm either
            // way, and the messages stay queued until a confirm reaches the primary.
            if matches!(decoded, Ok(Request::Confirm { .. })) {
                return Flow::Continue;
            }
            let reply = match inner.known_primary(self.id) {
                Some(p) if p != self.id => Reply::Redirect(p),
                _ => Reply::Unavailable,
            };
            let mut bytes = Vec::new();
            frame(&reply, &mut bytes);
            let out = Out {
                epoch,
                tag: None,
                bytes,
                close: true,
            };
            enqueue(&inner.clients, conn_id, out);
            return Flow::Close;
        }
        let mut bytes = Vec::new();
        let mut flow = Flow::Continue;
        let mut appended = None;
        match decoded {
            Err(v) => frame(&Reply::Refused(v), &mut bytes),
            Ok(request) => {
                let Some(me) = inner.clients.get(&conn_id).map(|c| c.user.clone()) else {
                    return Flow::Close;
                };
                let decision = {
                    let sessions = &inner.sessions;
                    inner
                        .state
                        .decide(me.as_deref(), |n| sessions.contains_key(n), &request)
                };
                if let Some(change) = &decision.change {
                    let (seq, delivered) = self.append_local(&mut inner, change);
                    appended = Some(seq);
                    if let Some((to, delivery)) = delivered {
                        push(&inner, epoch, seq, &to, delivery);
                    }
                }
                if let Some(reply) = &decision.reply {
                    frame(reply, &mut bytes);
                }
                match decision.session {
                    Session::Keep => {}
                    Session::LogIn(name) => {
                        for m in inner.state.mailbox(&name) {
                            let d = Delivery {
                                id: m.id,
                                from: m.from.clone(),
                                text: m.text.clone(),
                            };
                            frame(&Reply::Deliver(d), &mut bytes);
                        }
                        inner.sessions.insert(name.clone(), conn_id);
                        if let Some(c) = inner.clients.get_mut(&conn_id) {
                            c.user = Some(name);
                        }
                    }
                    Session::LogOut | Session::Quit => {
                        if let Some(user) = me {
                            if inner.sessions.get(&user) == Some(&conn_id) {
                                inner.sessions.remove(&user);
                            }
                        }
                        if let Some(c) = inner.clients.get_mut(&conn_id) {
                            c.user = None;
                        }
                        if decision.session == Session::Quit {
                            flow = Flow::Close;
                        }
                    }
                }
            }
        }
        if !bytes.is_empty() || flow == Flow::Close {
            // Every answer waits for the last change made so far: what it reveals (or
            // depends on) must be committed before the client sees it.
            let out = Out {
                epoch,
                tag: Some(inner.last.seq),
                bytes,
                close: flow == Flow::Close,
            };
            enqueue(&inner.clients, conn_id, out);
        }
        drop(inner);
        if let Some(seq) = appended {
            self.changed.notify_all();
            self.flush_to(seq);
        }
        flow
    }

    /// Writes a connection's frames as their changes commit.
    fn run_outbox(&self, stream: &TcpStream, rx: &Receiver<Out>) {
        let mut buf = Vec::new();
        'connection: while let Ok(out) = rx.recv() {
            let mut next = Some(out);
            let mut end = false;
            while let Some(out) = next.take() {
                if let Some(tag) = out.tag {
                    if !self.wait_commit(out.epoch, tag) {
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
}

/// Queues frames for a connection; one whose outbox is full is disconnected.
fn enqueue(clients: &HashMap<u64, ClientEntry>, conn_id: u64, out: Out) {
    if let Some(c) = clients.get(&conn_id) {
        if c.outbox.try_send(out).is_err() {
            log_debug!("messenger: connection {conn_id} is not reading; closing it");
            let _ = c.stream.shutdown(Shutdown::Both);
        }
    }
}

/// Delivers a message at once if its recipient is logged in.
fn push(inner: &Inner, epoch: u64, seq: u64, to: &str, d: Delivery) {
    if let Some(&conn_id) = inner.sessions.get(to) {
        let mut bytes = Vec::new();
        frame(&Reply::Deliver(d), &mut bytes);
        let out = Out {
            epoch,
            tag: Some(seq),
            bytes,
            close: false,
        };
        enqueue(&inner.clients, conn_id, out);
    }
}
