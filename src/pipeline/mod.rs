//! Reader → transform → sender stages over bounded queues: each connection's reader
//! thread feeds its frames to transform workers, whose replies a sender thread writes
//! back to the connection they came from, in request order.
//!
//! ```
//! use switchboard::framing::Framing;
//! use switchboard::pipeline::{Pipeline, PipelineConfig, Reply};
//! use switchboard::server::ServerConfig;
//! use std::io::{BufRead, BufReader, Write};
//! use std::net::{TcpListener, TcpStream};
//! use std::time::Duration;
//!
//! // Replies twice to `twice`, not at all to `quiet`, drops a connection that says `bye`.
//! let pipeline = Pipeline::start(PipelineConfig::new("demo", Framing::Line), |_conn, frame| {
//!     match &frame[..] {
//!         b"twice" => Reply::Many(vec![frame.clone(), frame]),
//!         b"quiet" => Reply::Nothing,
//!         b"bye" => Reply::Fail("said bye".into()),
//!         _ => Reply::One(frame.to_ascii_uppercase()),
//!     }
//! })?;
//! let server = pipeline.into_server(TcpListener::bind("127.0.0.1:0")?, ServerConfig::default())?;
//! let (addr, handle) = (server.local_addr(), server.handle());
//! let running = std::thread::spawn(move || server.run());
//!
//! let client = TcpStream::connect(addr)?;
//! client.set_read_timeout(Some(Duration::from_secs(10)))?;
//! (&client).write_all(b"quiet\nhi\ntwice\n")?;
//! let mut lines = BufReader::new(&client).lines();
//! for expected in ["HI", "twice", "twice"] {
//!     assert_eq!(lines.next().unwrap()?, expected);
//! }
//! handle.shutdown();
//! let report = running.join().unwrap();
//! assert_eq!(report.pipeline_joined, 4); // 2 workers, 2 senders
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! ```text
//!  reader 1 ─┐          ┌─▶ [queue] worker 0 ─┐          ┌─▶ [queue] sender 0 ─┐     ┌─▶ socket 1
//!  reader 2 ─┼─ id % N ─┤                     ├─ id % S ─┤                     ├─────┼─▶ socket 2
//!  reader 3 ─┘          └─▶ [queue] worker 1 ─┘          └─▶ [queue] sender 1 ─┘     └─▶ socket 3
//! ```
//!
//! A connection always goes through the same worker (`id % N`) and sender (`id % S`), so
//! its replies keep request order with no sequence numbers. A connection may have only so
//! much in flight ([`PipelineConfig::inflight_bytes`], [`PipelineConfig::inflight_frames`]):
//! its reader waits for its replies to go before it reads more, so a flooder holds little
//! of the shared queues. A sender never waits on a socket: it writes without blocking,
//! keeps what a full socket did not take in that connection's own outbox, tries again,
//! and drops the connection if its replies are not taken within
//! [`PipelineConfig::write_timeout`]. Why it is built this way (lanes, batching, the
//! kernel buffer as the outbox, handoff queues), with the measurements: README, "The
//! pipeline's design".

use crate::budget::{Account, Charge, OverBudget};
use crate::framing::{encode_frame, Framing, Limits};
use crate::handoff::{self, HandoffReceiver, HandoffSender, Waited};
use crate::request::{read_step, Step};
use crate::server::{
    Connection, HandlerError, Nonblocking, ServeReport, Server, ServerConfig, ServerHandle,
};
use crate::{log_debug, log_info};
use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::mem;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Events the sender takes from its queue after a wake-up before it writes: enough to
/// coalesce a burst, few enough that the first reply of a batch is not held back long.
const SEND_BATCH: usize = 256;
/// Bytes of replies the sender gathers for one connection before writing them, so one
/// write carries a burst without an unbounded buffer.
const WRITE_BATCH: usize = 64 << 10;
/// Bytes of buffer a connection's route keeps between batches.
const UNSENT_KEPT: usize = 4 << 10;
/// [`PipelineConfig::write_timeout`] unless set. The sender never waits on a socket, so a
/// client that does not read costs the others nothing while it is held; held for a second
/// (its reader asleep, its socket full, no CPU spent on it), a flooder that reconnects
/// floods a hundred times less than one dropped after 10 ms (with 8 such flooders, a
/// measured client's p99 was 0.2-0.3 ms against 1.8-2.2 ms: README, "Echo under a flood").
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a closing [`Feed`] looks whether the pipeline has shut down meanwhile.
const CLOSE_POLL: Duration = Duration::from_millis(50);
/// The shortest write timeout: a zero timeout would mean none at all to the kernel.
const MIN_WRITE_TIMEOUT: Duration = Duration::from_millis(1);
/// How soon a sender tries again to write to a connection whose socket was full; the
/// wait doubles, up to [`MAX_RETRY`], while the client takes nothing.
const RETRY: Duration = Duration::from_millis(1);
const MAX_RETRY: Duration = Duration::from_millis(64);

/// How a [`Pipeline`] is built.
///
/// Example: the [module docs](crate::pipeline).
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Names the threads (`NAME-transform-I`, `NAME-sender-I`) and log lines.
    pub name: String,
    /// The framing readers decode and senders encode.
    pub framing: Framing,
    /// Frame limits for the readers; a frame over the limit ends its connection.
    pub limits: Limits,
    /// Transform worker threads (at least one).
    pub workers: usize,
    /// Sender threads (at least one); each writes the replies of the connections whose
    /// id is its number modulo `senders`.
    pub senders: usize,
    /// Events each worker's queue, and each sender's queue, hold before their producers
    /// wait.
    pub queue: usize,
    /// How long a sender waits for one connection to take a batch of replies (room in its
    /// socket send buffer) before it drops the connection as not reading (at least 1 ms).
    /// The sender does not wait meanwhile: it writes without blocking, serves the others,
    /// and tries the connection again after 1 ms, then less often (up to every 64 ms)
    /// while it takes nothing.
    pub write_timeout: Duration,
    /// Bytes of requests one connection may have in the pipeline (queued, being
    /// transformed, or replies not yet written); its reader waits for room before it
    /// hands in more. One frame larger than this goes in alone.
    pub inflight_bytes: usize,
    /// Requests one connection may have in the pipeline, likewise.
    pub inflight_frames: usize,
}

impl PipelineConfig {
    /// Defaults: 2 workers, 2 senders, queues of 128 events, a 1 s write timeout, default
    /// frame limits, 256 KiB and 32 requests in flight per connection: enough for a
    /// pipelining client, and what a flooder can put ahead of the others in its lane.
    pub fn new(name: &str, framing: Framing) -> Self {
        PipelineConfig {
            name: name.to_owned(),
            framing,
            limits: Limits::default(),
            workers: 2,
            senders: 2,
            queue: 128,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            inflight_bytes: 256 << 10,
            inflight_frames: 32,
        }
    }
}

/// What the transform makes of one frame.
///
/// Example: the [module docs](crate::pipeline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// No reply.
    Nothing,
    /// One reply (its payload; the sender frames it).
    One(Vec<u8>),
    /// Several replies, in this order.
    Many(Vec<Vec<u8>>),
    /// Drop the connection, for this reason (logged); replies queued before it still go.
    Fail(String),
}

impl From<Vec<u8>> for Reply {
    fn from(payload: Vec<u8>) -> Reply {
        Reply::One(payload)
    }
}

/// What flows from the readers through the workers to the sender.
enum Event {
    /// A new connection: where its replies go. Travels ahead of its first frame.
    Open {
        id: u64,
        stream: Nonblocking,
        lane: Arc<Lane>,
    },
    /// A request on the way in, or its reply on the way out, with the request's room in
    /// its connection's lane (the last reply to a request carries it).
    Frame {
        id: u64,
        payload: Vec<u8>,
        ticket: Option<Ticket>,
    },
    /// The transform failed on this connection's frame: drop the connection.
    Failed { id: u64, why: String },
    /// The connection's reader has ended. Travels behind its last frame; the sender drops
    /// `done` once the route is gone, which is what the [`Feed`] waits for.
    Close { id: u64, done: Sender<()> },
    /// Sent to each worker by [`Pipeline::shutdown`]: end now, whoever still holds an inlet.
    Stop,
}

/// What one connection has in the pipeline, bounded ([`PipelineConfig::inflight_bytes`]):
/// its reader takes room for each request, and whoever drops the request's [`Ticket`] (the
/// sender once the reply is written, or the worker when there is none) gives it back.
#[derive(Debug)]
struct Lane {
    state: Mutex<InFlight>,
    room: Condvar,
    max_bytes: usize,
    max_frames: usize,
    account: Option<Account>,
}

#[derive(Debug, Default)]
struct InFlight {
    bytes: usize,
    frames: usize,
    /// The connection was dropped: its reader must stop.
    closed: bool,
}

/// One request's room in its connection's lane, and its bytes of the client memory
/// budget; given back when dropped.
#[derive(Debug)]
struct Ticket {
    lane: Arc<Lane>,
    bytes: usize,
    _memory: Option<Charge>,
}

impl Lane {
    fn new(config: &PipelineConfig, account: Option<&Account>) -> Arc<Lane> {
        Arc::new(Lane {
            state: Mutex::default(),
            room: Condvar::new(),
            max_bytes: config.inflight_bytes.max(1),
            max_frames: config.inflight_frames.max(1),
            account: account.cloned(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for room for a request of `bytes`.
    fn enter(self: &Arc<Self>, bytes: usize) -> Result<Ticket, PipelineError> {
        let memory = match &self.account {
            Some(account) => Some(account.charge(bytes).map_err(PipelineError::OverBudget)?),
            None => None,
        };
        let mut state = self.lock();
        while !state.closed
            && state.frames > 0
            && (state.frames >= self.max_frames || state.bytes + bytes > self.max_bytes)
        {
            state = self
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if state.closed {
            return Err(PipelineError::Dropped);
        }
        state.bytes += bytes;
        state.frames += 1;
        Ok(Ticket {
            lane: Arc::clone(self),
            bytes,
            _memory: memory,
        })
    }

    /// The connection was dropped: its reader stops waiting for room.
    fn close(&self) {
        self.lock().closed = true;
        self.room.notify_all();
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.lane.lock();
        state.bytes -= self.bytes;
        state.frames -= 1;
        drop(state);
        self.lane.room.notify_one();
    }
}

/// Counters the sender keeps, readable from any thread.
#[derive(Debug, Default)]
struct Counters {
    routes: AtomicUsize,
    dropped: AtomicU64,
}

/// Counters of a running pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PipelineStats {
    /// Connections the sender currently routes replies to.
    pub routes: usize,
    /// Connections dropped because they stopped reading (a write timed out), a transform
    /// failed, or a reply could not be framed.
    pub dropped: u64,
}

/// Why a connection could not join or feed the pipeline.
#[derive(Debug)]
pub enum PipelineError {
    /// The pipeline has shut down.
    Stopped,
    /// The connection's write timeout could not be set.
    Io(io::Error),
    /// The connection was dropped (it did not take its replies, or its transform failed).
    Dropped,
    /// The request would pass the server's client memory budget, and this connection holds
    /// the most of it.
    OverBudget(OverBudget),
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PipelineError::Stopped => f.write_str("the pipeline has shut down"),
            PipelineError::Io(e) => write!(f, "cannot set the connection's write timeout: {e}"),
            PipelineError::Dropped => f.write_str("the pipeline dropped the connection"),
            PipelineError::OverBudget(e) => write!(f, "request refused: {e}"),
        }
    }
}

impl std::error::Error for PipelineError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PipelineError::Io(e) => Some(e),
            PipelineError::OverBudget(e) => Some(e),
            PipelineError::Stopped | PipelineError::Dropped => None,
        }
    }
}

/// The running stages: transform workers and the sender. Readers join through an
/// [`Inlet`], or all at once through [`Pipeline::into_server`].
///
/// Example: the [module docs](crate::pipeline).
#[derive(Debug)]
pub struct Pipeline {
    inlet: Inlet,
    /// Workers first, then the sender: the order they end in.
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
}

/// The transform: from a connection id and a frame to its replies.
type Transform = dyn Fn(u64, Vec<u8>) -> Reply + Send + Sync;

impl Pipeline {
    /// Starts `config.workers` transform threads running `transform` on every frame (with
    /// the id of the connection it came from), and the sender threads.
    ///
    /// `transform` should not panic; if it does, the connection whose frame it was is
    /// dropped (and logged), and the worker goes on.
    ///
    /// # Errors
    /// When a thread cannot be started (those already started end on their own).
    pub fn start<F>(config: PipelineConfig, transform: F) -> io::Result<Pipeline>
    where
        F: Fn(u64, Vec<u8>) -> Reply + Send + Sync + 'static,
    {
        let config = Arc::new(config);
        let counters = Arc::new(Counters::default());
        let transform: Arc<Transform> = Arc::new(transform);
        let (mut to_senders, mut sender_queues) = (Vec::new(), Vec::new());
        for _ in 0..config.senders.max(1) {
            let (tx, rx) = handoff::bounded(config.queue);
            to_senders.push(tx);
            sender_queues.push(rx);
        }
        let to_senders: Arc<[HandoffSender<Event>]> = to_senders.into();
        let mut threads = Vec::new();
        let mut workers = Vec::new();
        for i in 0..config.workers.max(1) {
            let (tx, rx) = handoff::bounded(config.queue);
            let out = Arc::clone(&to_senders);
            let f = Arc::clone(&transform);
            threads.push(
                thread::Builder::new()
                    .name(format!("{}-transform-{i}", config.name))
                    .spawn(move || transform_stage(rx, &out, &*f))?,
            );
            workers.push(tx);
        }
        // Only the workers hold the senders' queues now, so they disconnect when the
        // workers end.
        drop(to_senders);
        for (i, rx) in sender_queues.into_iter().enumerate() {
            let (sender_config, sender_counters) = (Arc::clone(&config), Arc::clone(&counters));
            threads.push(
                thread::Builder::new()
                    .name(format!("{}-sender-{i}", config.name))
                    .spawn(move || send_stage(rx, &sender_config, &sender_counters))?,
            );
        }
        Ok(Pipeline {
            inlet: Inlet {
                workers: workers.into(),
                config,
                stopped: Arc::new(AtomicBool::new(false)),
            },
            threads,
            counters,
        })
    }

    /// A handle for connection threads to feed the pipeline with.
    pub fn inlet(&self) -> Inlet {
        self.inlet.clone()
    }

    /// Current counters.
    pub fn stats(&self) -> PipelineStats {
        PipelineStats {
            routes: self.counters.routes.load(Ordering::SeqCst),
            dropped: self.counters.dropped.load(Ordering::SeqCst),
        }
    }

    /// Shuts the stages down in order and joins them; returns how many threads were joined
    /// (workers plus senders, unless one of them panicked).
    ///
    /// Each worker ends once it has handled what was queued before the call; then the
    /// senders end. It does not wait for the connections still feeding the pipeline (one
    /// a server abandoned at its shutdown deadline, say): from then on their frames are
    /// refused with [`PipelineError::Stopped`]. So stop the server that feeds the
    /// pipeline first ([`Pipeline::into_server`] does both in order), or its last replies
    /// may be lost.
    pub fn shutdown(self) -> usize {
        let Pipeline { inlet, threads, .. } = self;
        inlet.stopped.store(true, Ordering::SeqCst);
        for worker in inlet.workers.iter() {
            // Behind whatever is queued; a worker that is already gone needs no telling.
            let _ = worker.send(Event::Stop);
        }
        drop(inlet);
        threads.into_iter().filter_map(|t| t.join().ok()).count()
    }

    /// A server on `listener` whose connections feed this pipeline (their reader stage is
    /// [`Inlet::serve`]); running it shuts the pipeline down behind the server. A refused
    /// connection gets its refusal in the pipeline's framing.
    ///
    /// # Errors
    /// When the listener's address cannot be read.
    pub fn into_server(
        self,
        listener: TcpListener,
        mut config: ServerConfig,
    ) -> io::Result<PipelineServer> {
        config.framing = self.inlet.config.framing;
        let inlet = self.inlet();
        let server = Server::from_listener(listener, config, move |conn| inlet.serve(&conn))?;
        Ok(PipelineServer {
            server,
            pipeline: self,
        })
    }
}

/// A [`Server`] feeding a [`Pipeline`]: see [`Pipeline::into_server`].
///
/// Example: the [module docs](crate::pipeline).
pub struct PipelineServer {
    server: Server,
    pipeline: Pipeline,
}

/// What a [`PipelineServer`] reports when it has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineReport {
    /// The server's own report.
    pub server: ServeReport,
    /// Pipeline stage threads joined.
    pub pipeline_joined: usize,
    /// The pipeline's counters at the end.
    pub pipeline: PipelineStats,
}

impl PipelineServer {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// A handle to stop the server (from a signal handler, say).
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// The pipeline's current counters.
    pub fn pipeline_stats(&self) -> PipelineStats {
        self.pipeline.stats()
    }

    /// Serves until [`ServerHandle::shutdown`], then shuts the pipeline down behind the
    /// server, which never waits for a connection the server abandoned.
    pub fn run(self) -> PipelineReport {
        let PipelineServer { server, pipeline } = self;
        let server = server.run();
        let stats = pipeline.stats();
        PipelineReport {
            server,
            pipeline_joined: pipeline.shutdown(),
            pipeline: stats,
        }
    }
}

/// The readers' side of a [`Pipeline`]: cloneable, one clone per server handler.
/// [`Pipeline::into_server`] wires one to every connection (example in the
/// [module docs](crate::pipeline)).
#[derive(Debug, Clone)]
pub struct Inlet {
    workers: Arc<[HandoffSender<Event>]>,
    config: Arc<PipelineConfig>,
    /// Set by [`Pipeline::shutdown`]: a closing [`Feed`] stops waiting for the sender.
    stopped: Arc<AtomicBool>,
}

impl Inlet {
    /// Registers connection `id`: sets its write timeout and routes its replies to it.
    /// Dropping the returned [`Feed`] removes the route.
    ///
    /// # Errors
    /// [`PipelineError::Stopped`] when the pipeline has shut down; [`PipelineError::Io`]
    /// when the write timeout cannot be set.
    pub fn open(&self, id: u64, stream: Arc<TcpStream>) -> Result<Feed, PipelineError> {
        self.open_with(id, Nonblocking::new(stream), None)
    }

    /// As [`Inlet::open`], for a [`Connection`] of a server: its reads are not disturbed by
    /// the sender's non-blocking writes, and what it has in flight is charged to its share
    /// of the server's client memory budget.
    ///
    /// # Errors
    /// As [`Inlet::open`].
    pub fn open_connection(&self, conn: &Connection) -> Result<Feed, PipelineError> {
        self.open_with(conn.id, conn.nonblocking(), conn.account())
    }

    fn open_with(
        &self,
        id: u64,
        stream: Nonblocking,
        account: Option<&Account>,
    ) -> Result<Feed, PipelineError> {
        // Writes do not block; the timeout is a backstop should one ever do.
        let timeout = self.config.write_timeout.max(MIN_WRITE_TIMEOUT);
        stream
            .stream()
            .set_write_timeout(Some(timeout))
            .map_err(PipelineError::Io)?;
        if self.stopped.load(Ordering::SeqCst) {
            return Err(PipelineError::Stopped);
        }
        let input = self.workers[(id % self.workers.len() as u64) as usize].clone();
        let lane = Lane::new(&self.config, account);
        let open = Event::Open {
            id,
            stream,
            lane: Arc::clone(&lane),
        };
        if input.send(open).is_err() {
            return Err(PipelineError::Stopped);
        }
        let stopped = Arc::clone(&self.stopped);
        Ok(Feed {
            id,
            input,
            stopped,
            lane,
        })
    }

    /// The reader stage for one connection, run on the connection's own thread: opens its
    /// route, feeds every frame in, and removes the route when the connection ends. A frame
    /// over the limit ends the connection (there is no error reply to send it).
    ///
    /// # Errors
    /// Whatever ended the connection abnormally: a framing error, a failed read, or the
    /// pipeline shutting down. The idle timeout is a normal end (see [`read_step`]).
    pub fn serve(&self, conn: &Connection) -> Result<(), HandlerError> {
        let feed = self.open_connection(conn)?;
        let mut reader = conn.reader(self.config.framing, self.config.limits);
        loop {
            match read_step(&mut reader, conn)? {
                Step::Frame(frame) => match feed.submit(frame.to_vec()) {
                    // The sender has said why (logged); the reader just stops.
                    Err(PipelineError::Dropped) => return Ok(()),
                    other => other?,
                },
                Step::Skipped(e) => return Err(e.into()),
                Step::End => return Ok(()),
            }
        }
    }
}

/// One connection's registration in the pipeline; see [`Inlet::open`]. Dropping it sends
/// the close marker behind the connection's last frame and waits until the sender has
/// written every reply queued before it and forgotten the route.
#[derive(Debug)]
pub struct Feed {
    id: u64,
    input: HandoffSender<Event>,
    stopped: Arc<AtomicBool>,
    lane: Arc<Lane>,
}

impl Feed {
    /// Hands one frame to the transform stage; waits while the connection has its fill in
    /// flight, or the worker's queue is full.
    ///
    /// # Errors
    /// [`PipelineError::Stopped`] when the pipeline has shut down,
    /// [`PipelineError::Dropped`] when it has dropped this connection,
    /// [`PipelineError::OverBudget`] when the frame would pass the client memory budget.
    pub fn submit(&self, payload: Vec<u8>) -> Result<(), PipelineError> {
        let ticket = self.lane.enter(payload.len())?;
        let id = self.id;
        self.input
            .send(Event::Frame {
                id,
                payload,
                ticket: Some(ticket),
            })
            .map_err(|_| PipelineError::Stopped)
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        // Nothing is ever sent on `done`: the sender drops it, which ends the wait. If the
        // pipeline is gone, so is the route, and there is nothing to wait for.
        // Once the pipeline is shut down, a close queued behind a worker's stop is never
        // handled: stop waiting then.
        let (done, closed) = bounded::<()>(0);
        if self.input.send(Event::Close { id: self.id, done }).is_ok() {
            while !self.stopped.load(Ordering::SeqCst) {
                if !matches!(
                    closed.recv_timeout(CLOSE_POLL),
                    Err(RecvTimeoutError::Timeout)
                ) {
                    break;
                }
            }
        }
    }
}

/// A worker: transforms frames, passes the other events on in order.
fn transform_stage(
    rx: HandoffReceiver<Event>,
    senders: &[HandoffSender<Event>],
    transform: &Transform,
) {
    let sender = |id: u64| &senders[(id % senders.len() as u64) as usize];
    for event in &rx {
        let sent = match event {
            Event::Stop => break,
            Event::Frame {
                id,
                payload,
                ticket,
            } => {
                // The panic hook has printed the panic; the sender logs the drop.
                let reply = panic::catch_unwind(AssertUnwindSafe(|| transform(id, payload)))
                    .unwrap_or_else(|_| Reply::Fail("the transform panicked".into()));
                let tx = sender(id);
                // The request's room goes with its last reply (or now, if it has none).
                match reply {
                    Reply::Nothing => Ok(()),
                    Reply::One(payload) => tx
                        .send(Event::Frame {
                            id,
                            payload,
                            ticket,
                        })
                        .map_err(drop),
                    Reply::Many(payloads) => {
                        let last = payloads.len().saturating_sub(1);
                        let mut ticket = ticket;
                        payloads
                            .into_iter()
                            .enumerate()
                            .try_for_each(|(i, payload)| {
                                let ticket = if i == last { ticket.take() } else { None };
                                tx.send(Event::Frame {
                                    id,
                                    payload,
                                    ticket,
                                })
                                .map_err(drop)
                            })
                    }
                    Reply::Fail(why) => tx.send(Event::Failed { id, why }).map_err(drop),
                }
            }
            Event::Open { id, .. } | Event::Failed { id, .. } | Event::Close { id, .. } => {
                sender(id).send(event).map_err(drop)
            }
        };
        if sent.is_err() {
            break;
        }
    }
}

/// Where the sender writes one connection's replies: its own outbox, so a full socket
/// holds up nobody else.
struct Route {
    stream: Nonblocking,
    lane: Arc<Lane>,
    /// Encoded replies not yet written: the connection's share of the current batch, and
    /// what its socket did not take.
    unsent: Vec<u8>,
    /// The room of the requests whose replies are in `unsent`, given back once written.
    tickets: Vec<Ticket>,
    /// Since when `unsent` has waited for room in the socket.
    blocked_since: Option<Instant>,
    /// When to try the full socket again, and the wait before that.
    retry_at: Instant,
    backoff: Duration,
    /// The reader has ended; the route goes once `unsent` is written (dropping this ends
    /// the reader's wait).
    closing: Option<Sender<()>>,
}

/// The sender's route table; only the sender thread touches it.
struct Routes<'a> {
    map: HashMap<u64, Route>,
    /// Connections with replies in `unsent`, in the order they got their first one. May
    /// name a connection twice or one that is gone: flushing those is a no-op.
    pending: Vec<u64>,
    /// Connections whose sockets were full at the last try, and the earliest time one of
    /// them is due to be tried again.
    blocked: Vec<u64>,
    next_retry: Option<Instant>,
    config: &'a PipelineConfig,
    counters: &'a Counters,
}

impl Routes<'_> {
    fn handle(&mut self, event: Event) {
        match event {
            Event::Open { id, stream, lane } => {
                let route = Route {
                    stream,
                    lane,
                    unsent: Vec::new(),
                    tickets: Vec::new(),
                    blocked_since: None,
                    retry_at: Instant::now(),
                    backoff: RETRY,
                    closing: None,
                };
                if self.map.insert(id, route).is_none() {
                    self.counters.routes.fetch_add(1, Ordering::SeqCst);
                }
            }
            Event::Frame {
                id,
                payload,
                ticket,
            } => self.queue(id, &payload, ticket),
            Event::Failed { id, why } => {
                self.flush(id);
                self.drop_connection(id, &why);
            }
            Event::Close { id, done } => {
                self.flush(id);
                match self.map.get_mut(&id) {
                    // Replies still waiting for room: they go first (or the connection is
                    // dropped at their deadline), then the route.
                    Some(route) if !route.unsent.is_empty() => route.closing = Some(done),
                    _ => {
                        self.forget(id);
                        drop(done);
                    }
                }
            }
            // Workers never pass it on.
            Event::Stop => {}
        }
    }

    /// Adds a reply to its connection's share of the batch; writes the share once it is
    /// large.
    fn queue(&mut self, id: u64, payload: &[u8], ticket: Option<Ticket>) {
        // No route: the connection was dropped and this reply has nowhere to go.
        let Some(route) = self.map.get_mut(&id) else {
            return;
        };
        if route.unsent.is_empty() {
            self.pending.push(id);
        }
        route.tickets.extend(ticket);
        if let Err(e) = encode_frame(self.config.framing, payload, &mut route.unsent) {
            self.drop_connection(id, &format!("a reply cannot be framed: {e}"));
        } else if route.unsent.len() >= WRITE_BATCH {
            self.flush(id);
        }
    }

    /// Writes every connection's share of the batch, and tries the full sockets again.
    fn flush_all(&mut self) {
        let now = Instant::now();
        let mut ids = mem::take(&mut self.pending);
        for &id in &ids {
            self.flush(id);
        }
        let blocked = mem::take(&mut self.blocked);
        for &id in &blocked {
            if self.map.get(&id).is_some_and(|route| route.retry_at <= now) {
                self.flush(id);
            }
        }
        ids.extend(blocked);
        self.next_retry = None;
        ids.retain(|id| {
            let Some(route) = self.map.get(id).filter(|r| r.blocked_since.is_some()) else {
                return false;
            };
            self.next_retry = Some(
                self.next_retry
                    .map_or(route.retry_at, |t| t.min(route.retry_at)),
            );
            true
        });
        ids.sort_unstable();
        ids.dedup();
        self.blocked = ids;
    }

    /// Writes what one connection's socket takes now, without waiting; drops the
    /// connection once its replies have waited longer than the write timeout.
    fn flush(&mut self, id: u64) {
        let Some(route) = self.map.get_mut(&id) else {
            return;
        };
        if route.unsent.is_empty() {
            return;
        }
        let written = route.stream.run(|stream| write_some(stream, &route.unsent));
        let limit = self.config.write_timeout.max(MIN_WRITE_TIMEOUT);
        match written {
            Ok(n) if n == route.unsent.len() => {
                route.unsent.clear();
                // A burst's buffer is not kept for the life of a connection that goes quiet.
                route.unsent.shrink_to(UNSENT_KEPT);
                route.tickets.clear();
                route.blocked_since = None;
                if route.closing.is_some() {
                    self.forget(id);
                }
            }
            Ok(n) => {
                route.unsent.drain(..n);
                let now = Instant::now();
                route.backoff = if n > 0 || route.blocked_since.is_none() {
                    RETRY
                } else {
                    (route.backoff * 2).min(MAX_RETRY)
                };
                route.retry_at = now + route.backoff;
                let since = *route.blocked_since.get_or_insert(now);
                if now.duration_since(since) >= limit {
                    let why = format!(
                        "{} bytes of replies not taken in {limit:?}, the client is not reading",
                        route.unsent.len()
                    );
                    self.drop_connection(id, &why);
                }
            }
            Err(e) => {
                // The peer is gone (reset, or its end shut down): nothing to count.
                log_debug!("{}: connection {id}: write failed: {e}", self.config.name);
                if let Some(route) = self.forget(id) {
                    // Wakes its reader, which ends the connection.
                    let _ = route.stream.stream().shutdown(Shutdown::Both);
                }
            }
        }
    }

    /// Removes a route; the sender's handle on the socket goes with it, and the room its
    /// replies held.
    fn forget(&mut self, id: u64) -> Option<Route> {
        let route = self.map.remove(&id);
        if route.is_some() {
            self.counters.routes.fetch_sub(1, Ordering::SeqCst);
        }
        route
    }

    /// Removes a route and cuts its connection off.
    fn drop_connection(&mut self, id: u64, why: &str) {
        if let Some(route) = self.forget(id) {
            log_info!("{}: dropping connection {id}: {why}", self.config.name);
            self.counters.dropped.fetch_add(1, Ordering::SeqCst);
            route.lane.close();
            // Wakes the connection's reader, which ends the connection and its feed.
            let _ = route.stream.stream().shutdown(Shutdown::Both);
        }
    }
}

/// Writes as much of `buf` as the (non-blocking) socket takes now: the bytes written.
fn write_some(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match (&*stream).write(&buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The sender: writes each reply to its connection, a batch at a time, never waiting on a
/// socket; the connections whose sockets were full are tried again every [`RETRY`].
fn send_stage(rx: HandoffReceiver<Event>, config: &PipelineConfig, counters: &Counters) {
    let mut routes = Routes {
        map: HashMap::new(),
        pending: Vec::new(),
        blocked: Vec::new(),
        next_retry: None,
        config,
        counters,
    };
    loop {
        let first = match routes.next_retry {
            None => match rx.recv() {
                Some(event) => Some(event),
                None => break,
            },
            Some(at) => match rx.recv_deadline(at) {
                Ok(event) => Some(event),
                Err(Waited::Timeout) => None,
                Err(Waited::Disconnected) => break,
            },
        };
        if let Some(first) = first {
            routes.handle(first);
            // What is already queued goes out with it, one write per connection.
            for event in rx.try_iter().take(SEND_BATCH - 1) {
                routes.handle(event);
            }
        }
        routes.flush_all();
    }
}

#[cfg(test)]
mod tests;
