//! A local channel's port listener: serves the lines of [`protocol`](super::protocol) on
//! every connection, writing `{remote_msg,Msg}` into the channel in arrival order and
//! answering remote reads.

use super::channel::Delivery;
use super::protocol::{self, Request, RequestError};
use super::{LocalChan, Node, NodeConfig, Value};
use crate::framing::{FrameError, Framing};
use crate::log::{Quota, BAD_REQUEST_LINES};
use crate::order::Arrivals;
use crate::request::{self, Replies, RequestLoop};
use crate::server::{Connection, Handler, HandlerError};
use crate::{log_debug, log_info};
use crossbeam_channel::{RecvTimeoutError, SendTimeoutError};
use std::collections::BTreeSet;
use std::io;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

/// How often a listener thread blocked on its channel looks up to see whether the server
/// is stopping or a remote reader has gone.
const POLL: Duration = Duration::from_millis(100);

/// Replies are written when a read's lines are done, or sooner once this many bytes wait
/// (as the store does): a read of a megabyte of empty lines draws 17 bytes of
/// `{error,bad_term}\n` for each, and without it one connection would make the listener
/// hold 17 MiB until it could write them.
const FLUSH_AT: usize = 64 << 10;

/// Serves one exported channel. Holds the channel and the node weakly: a listener never
/// keeps either alive.
pub(crate) struct Listener {
    name: String,
    chan: Weak<LocalChan>,
    node: Weak<Node>,
    intake: Intake,
    /// Remote reads waiting for a message, or for their answer to be written.
    readers: Readers,
    arrivals: Arrivals,
    requests: RequestLoop,
    term_limits: crate::term::Limits,
    io_timeout: Duration,
}

impl Listener {
    pub(crate) fn new(
        name: &str,
        chan: Weak<LocalChan>,
        node: Weak<Node>,
        config: &NodeConfig,
    ) -> Listener {
        let arrivals = Arrivals::new();
        Listener {
            name: name.to_owned(),
            chan,
            node,
            intake: Intake::new(waiting_at_most(config.max_connections)),
            readers: Readers::new(waiting_at_most(config.max_connections)),
            arrivals: arrivals.clone(),
            requests: RequestLoop::new(Framing::Line)
                .limits(config.line_limits)
                .in_order(&arrivals),
            term_limits: config.term_limits,
            io_timeout: config.io_timeout,
        }
    }

    /// The server's handler: serves each connection in arrival order across connections.
    pub(crate) fn handler(self) -> impl Handler {
        let arrivals = self.arrivals.clone();
        arrivals.handler(move |conn| self.serve(&conn))
    }

    /// Serves one connection until it closes: any number of lines, in order.
    fn serve(&self, conn: &Connection) -> Result<(), HandlerError> {
        // A reader that stops reading cannot hold this thread for longer than this.
        conn.stream.set_write_timeout(Some(self.io_timeout))?;
        let mut session = Session {
            listener: self,
            turn: None,
            logged: Quota::new(BAD_REQUEST_LINES),
        };
        let served = self.requests.serve_session(conn, &mut session);
        if session.logged.suppressed() > 0 {
            log_info!(
                "{}: connection {} from {}: {} more bad or refused request(s), not logged",
                self.name,
                conn.id,
                conn.peer,
                session.logged.suppressed()
            );
        }
        served
    }

    /// Writes a message into the channel, waiting while the queue is full or its byte
    /// budget spent; `false` when the server is stopping.
    fn push(
        &self,
        msg: crate::term::Term,
        memory: Option<crate::budget::Charge>,
        conn: &Connection,
    ) -> bool {
        let (Some(node), Some(chan)) = (self.node.upgrade(), self.chan.upgrade()) else {
            log_debug!("{}: channel gone; message dropped", self.name);
            return true;
        };
        let cost = msg.heap_bytes();
        let (value, names_home) = node.import_queued(msg);
        let home = names_home.then(|| self.node.clone());
        drop(node);
        let charge = loop {
            match chan.budget.take(cost, POLL) {
                Some(charge) => break charge,
                None if !conn.server.is_stopping() => {}
                None => return false,
            }
        };
        let mut delivery = Delivery::charged(value, home, charge, memory);
        loop {
            match chan.tx.send_timeout(delivery, POLL) {
                Ok(()) => return true,
                Err(SendTimeoutError::Timeout(back)) if !conn.server.is_stopping() => {
                    delivery = back;
                }
                Err(_) => return false,
            }
        }
    }

    /// Appends the answer to a read: the next message, or `timeout`. `false` when there
    /// is no one to answer (the reader left, the server is stopping, the channel is gone).
    fn answer_read(&self, timeout: Option<Duration>, conn: &Connection, out: &mut Vec<u8>) -> bool {
        let Some(chan) = self.chan.upgrade() else {
            return false;
        };
        // `{remote_read,Ms}` takes any Ms up to i64::MAX: a deadline past what an Instant can
        // hold is no deadline, not a panic.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let value: Value = loop {
            let wait = deadline.map_or(POLL, |d| {
                d.saturating_duration_since(Instant::now()).min(POLL)
            });
            match chan.rx.recv_timeout(wait) {
                Ok(delivery) => break delivery.into_value(),
                Err(RecvTimeoutError::Disconnected) => return false,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                protocol::write_timeout(out);
                return true;
            }
            // Taking a message for a reader that has gone would lose it.
            if conn.server.is_stopping() || peer_closed(conn) {
                return false;
            }
        };
        let Some(node) = self.node.upgrade() else {
            return false;
        };
        match node.export(&value) {
            Ok(term) => protocol::write_msg(&term, out),
            Err(e) => {
                log_info!(
                    "{}: cannot send a message to a remote reader: {e}",
                    self.name
                );
                protocol::write_error("export_failed", out);
            }
        }
        true
    }
}

/// One connection of a listener, for the [`RequestLoop`].
struct Session<'l> {
    listener: &'l Listener,
    /// The right to push into the channel, taken at this batch's first message.
    turn: Option<Turn<'l>>,
    /// Log lines left for this connection's bad and refused requests.
    logged: Quota,
}

impl request::Session for Session<'_> {
    fn request(
        &mut self,
        conn: &Connection,
        line: &[u8],
        out: &mut Replies<'_>,
    ) -> Result<ControlFlow<()>, HandlerError> {
        let listener = self.listener;
        let request = protocol::parse_request(line, &listener.term_limits);
        let flow = self.answer(conn, request, out)?;
        self.flush_if_full(flow, out)
    }

    fn too_long(
        &mut self,
        conn: &Connection,
        _error: &FrameError,
        out: &mut Replies<'_>,
    ) -> Result<ControlFlow<()>, HandlerError> {
        let flow = self.answer(conn, Err(RequestError::TooLong), out)?;
        self.flush_if_full(flow, out)
    }

    fn batch_done(
        &mut self,
        _conn: &Connection,
        _out: &mut Replies<'_>,
    ) -> Result<ControlFlow<()>, HandlerError> {
        self.turn = None;
        Ok(ControlFlow::Continue(()))
    }
}

impl Session<'_> {
    /// Writes the replies waiting once they pass [`FLUSH_AT`], before the read's other
    /// lines are served. The write may block on a client that does not read, so first
    /// the channel is given up (writers get their turn meanwhile; this connection's next
    /// message queues up for it again, ahead of younger connections) and the connection
    /// settled ([`Replies::flush_early`]: younger connections need not wait for it): the rest of its read is then
    /// ordered as a later read's would be. Only a read of some 4,000 refused lines gets
    /// here; a writer's message draws no reply.
    fn flush_if_full(
        &mut self,
        flow: ControlFlow<()>,
        out: &mut Replies<'_>,
    ) -> Result<ControlFlow<()>, HandlerError> {
        if flow.is_break() || out.len() < FLUSH_AT {
            return Ok(flow);
        }
        self.turn = None;
        Ok(if out.flush_early()? {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        })
    }

    fn answer(
        &mut self,
        conn: &Connection,
        request: Result<Request, RequestError>,
        out: &mut Replies<'_>,
    ) -> Result<ControlFlow<()>, HandlerError> {
        let listener = self.listener;
        match request {
            Ok(Request::Msg(msg)) => {
                // Charged as parsed: what the queue really holds, not the line's length.
                let memory = match conn.account().map(|a| a.charge(msg.heap_bytes())) {
                    None => None,
                    Some(Ok(charge)) => Some(charge),
                    Some(Err(e)) => {
                        if self.logged.allow() {
                            log_info!(
                                "{}: connection {} from {}: message refused: {e}",
                                listener.name,
                                conn.id,
                                conn.peer
                            );
                        }
                        protocol::write_error("over_memory_budget", out.buffer());
                        return Ok(ControlFlow::Continue(()));
                    }
                };
                if self.turn.is_none() {
                    match listener.intake.enter(conn, &listener.arrivals) {
                        Ok(turn) => self.turn = Some(turn),
                        Err(NoTurn::Stopping) => return Ok(ControlFlow::Break(())),
                        Err(NoTurn::Crowded) => {
                            if self.logged.allow() {
                                log_info!(
                                    "{}: connection {} from {}: message refused: {} writers \
                                     wait for the channel already",
                                    listener.name,
                                    conn.id,
                                    conn.peer,
                                    listener.intake.max_waiting
                                );
                            }
                            protocol::write_error("too_many_writers", out.buffer());
                            return Ok(ControlFlow::Continue(()));
                        }
                    }
                }
                if !listener.push(msg, memory, conn) {
                    return Ok(ControlFlow::Break(())); // stopping
                }
            }
            Ok(Request::Read { timeout }) => {
                // Held until the answer is written: a reader that waits reads nothing from
                // its socket, so no idle timeout ends it.
                let Some(_reading) = listener.readers.enter() else {
                    if self.logged.allow() {
                        log_info!(
                            "{}: connection {} from {}: read refused: {} readers wait \
                             already",
                            listener.name,
                            conn.id,
                            conn.peer,
                            listener.readers.max
                        );
                    }
                    protocol::write_error("too_many_readers", out.buffer());
                    return Ok(ControlFlow::Continue(()));
                };
                // Writers must get their turn while this reader waits.
                self.turn = None;
                listener.arrivals.settle(conn);
                if !out.flush()? || !listener.answer_read(timeout, conn, out.buffer()) {
                    return Ok(ControlFlow::Break(()));
                }
                if !out.flush()? {
                    return Ok(ControlFlow::Break(()));
                }
            }
            Err(e) => {
                if self.logged.allow() {
                    log_info!(
                        "{}: connection {} from {}: {e}",
                        listener.name,
                        conn.id,
                        conn.peer
                    );
                }
                protocol::write_error(e.reason(), out.buffer());
            }
        }
        Ok(ControlFlow::Continue(()))
    }
}

/// Whether the peer has closed its end (or the socket failed), without blocking.
fn peer_closed(conn: &Connection) -> bool {
    let stream = &conn.stream;
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let closed = match stream.peek(&mut [0u8; 1]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).is_err() || closed
}

/// Hands the channel to one connection at a time, in accept order.
///
/// The framework's [`crate::order`] orders connections that settle promptly. A writer
/// blocked on a full queue has not settled, and after [`crate::order::MAX_WAIT`] a younger
/// connection would overtake it. So a connection with messages enters the intake
/// (by its id, which grows in accept order) *before* it settles, and pushes only when it
/// is the oldest one waiting: order holds even under backpressure.
struct Intake {
    state: Mutex<IntakeState>,
    changed: Condvar,
    /// Writers that may wait at once ([`waiting_at_most`]).
    max_waiting: usize,
}

#[derive(Default)]
struct IntakeState {
    waiting: BTreeSet<u64>,
    holder: Option<u64>,
}

/// How many of a listener's `max_connections` may be writers waiting for the channel, and
/// how many may be remote readers waiting for a message: all but a sixteenth (at most 16)
/// of them each. Writers to a full channel wait, each holding its connection; without the
/// reserve, enough of them would take every slot, and a remote reader, the one who could
/// make room, would be refused for good. Readers of an empty channel wait the same way
/// (and, reading nothing from their sockets meanwhile, are never idle), and the reserve
/// keeps room for the writer who would give them a message. The two never wait at once
/// for long: readers wait on an empty channel, writers on a full one.
fn waiting_at_most(max_connections: usize) -> usize {
    max_connections
        .saturating_sub((max_connections / 16).min(16))
        .max(1)
}

/// Counts the remote reads being answered, up to a cap.
struct Readers {
    waiting: AtomicUsize,
    /// Readers that may wait at once ([`waiting_at_most`]).
    max: usize,
}

/// One remote read being answered; its place is given back on drop.
struct Reading<'a>(&'a AtomicUsize);

impl Readers {
    fn new(max: usize) -> Readers {
        Readers {
            waiting: AtomicUsize::new(0),
            max,
        }
    }

    /// A place for one more reader, unless `max` of them wait already.
    fn enter(&self) -> Option<Reading<'_>> {
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Reading(&self.waiting))
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a connection did not get its turn to push.
enum NoTurn {
    /// The server is stopping.
    Stopping,
    /// As many writers as may are waiting already.
    Crowded,
}

/// The right to push into the channel; released on drop.
struct Turn<'a> {
    intake: &'a Intake,
    id: u64,
}

impl Intake {
    fn state(&self) -> MutexGuard<'_, IntakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn new(max_waiting: usize) -> Intake {
        Intake {
            state: Mutex::default(),
            changed: Condvar::new(),
            max_waiting,
        }
    }

    /// Waits for `conn`'s turn.
    fn enter(&self, conn: &Connection, arrivals: &Arrivals) -> Result<Turn<'_>, NoTurn> {
        let mut state = self.state();
        if state.waiting.len() >= self.max_waiting {
            arrivals.settle(conn);
            return Err(NoTurn::Crowded);
        }
        state.waiting.insert(conn.id);
        arrivals.settle(conn);
        loop {
            if state.holder.is_none() && state.waiting.first() == Some(&conn.id) {
                state.holder = Some(conn.id);
                return Ok(Turn {
                    intake: self,
                    id: conn.id,
                });
            }
            if conn.server.is_stopping() {
                state.waiting.remove(&conn.id);
                self.changed.notify_all();
                return Err(NoTurn::Stopping);
            }
            state = self
                .changed
                .wait_timeout(state, POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut state = self.intake.state();
        state.waiting.remove(&self.id);
        state.holder = None;
        self.intake.changed.notify_all();
    }
}
