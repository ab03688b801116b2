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
//! its replies keep request order with no sequence numbers. A sender writes with a short
//! timeout ([`PipelineConfig::write_timeout`]) and drops a connection that does not take
//! its replies. Why it is built this way (lanes, batching, the kernel buffer as the
//! outbox, handoff queues), with the measurements: README, "The pipeline's design".

use crate::framing::{encode_frame, Framing, Limits};
use crate::handoff::{self, HandoffReceiver, HandoffSender};
use crate::request::{read_step, Step};
use crate::server::{Connection, HandlerError, ServeReport, Server, ServerConfig, ServerHandle};
use crate::{log_debug, log_info};
use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::mem;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
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
/// [`PipelineConfig::write_timeout`] unless set: a few scheduling delays on a loaded
/// machine, short enough that a stalled client costs the others little.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_millis(10);
/// How often a closing [`Feed`] looks whether the pipeline has shut down meanwhile.
const CLOSE_POLL: Duration = Duration::from_millis(50);
/// The shortest write timeout: a zero timeout would mean none at all to the kernel.
const MIN_WRITE_TIMEOUT: Duration = Duration::from_millis(1);

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
    /// While it waits, the replies of the connections that share the sender (and, once its
    /// queue is full, the worker feeding it) wait too: keep it short.
    pub write_timeout: Duration,
}

impl PipelineConfig {
    /// Defaults: 2 workers, 2 senders, queues of 128 events, a 10 ms write timeout, default
    /// frame limits. What one connection can hold in flight is about `2 × queue` frames plus its
    /// socket buffers: enough for a pipelining client, and it keeps a flooder's cost
    /// bounded.
    pub fn new(name: &str, framing: Framing) -> Self {
        PipelineConfig {
            name: name.to_owned(),
            framing,
            limits: Limits::default(),
            workers: 2,
            senders: 2,
            queue: 128,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
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
    Open { id: u64, stream: Arc<TcpStream> },
    /// A request on the way in, or its reply on the way out.
    Frame { id: u64, payload: Vec<u8> },
    /// The transform failed on this connection's frame: drop the connection.
    Failed { id: u64, why: String },
    /// The connection's reader has ended. Travels behind its last frame; the sender drops
    /// `done` once the route is gone, which is what the [`Feed`] waits for.
    Close { id: u64, done: Sender<()> },
    /// Sent to each worker by [`Pipeline::shutdown`]: end now, whoever still holds an inlet.
    Stop,
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
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PipelineError::Stopped => f.write_str("the pipeline has shut down"),
            PipelineError::Io(e) => write!(f, "cannot set the connection's write timeout: {e}"),
        }
    }
}

impl std::error::Error for PipelineError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PipelineError::Io(e) => Some(e),
            PipelineError::Stopped => None,
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
        let timeout = self.config.write_timeout.max(MIN_WRITE_TIMEOUT);
        stream
            .set_write_timeout(Some(timeout))
            .map_err(PipelineError::Io)?;
        if self.stopped.load(Ordering::SeqCst) {
            return Err(PipelineError::Stopped);
        }
        let input = self.workers[(id % self.workers.len() as u64) as usize].clone();
        if input.send(Event::Open { id, stream }).is_err() {
            return Err(PipelineError::Stopped);
        }
        let stopped = Arc::clone(&self.stopped);
        Ok(Feed { id, input, stopped })
    }

    /// The reader stage for one connection, run on the connection's own thread: opens its
    /// route, feeds every frame in, and removes the route when the connection ends. A frame
    /// over the limit ends the connection (there is no error reply to send it).
    ///
    /// # Errors
    /// Whatever ended the connection abnormally: a framing error, a failed read, or the
    /// pipeline shutting down. The idle timeout is a normal end (see [`read_step`]).
    pub fn serve(&self, conn: &Connection) -> Result<(), HandlerError> {
        let feed = self.open(conn.id, Arc::clone(&conn.stream))?;
        let mut reader = conn.reader(self.config.framing, self.config.limits);
        loop {
            match read_step(&mut reader, conn)? {
                Step::Frame(frame) => feed.submit(frame.to_vec())?,
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
}

impl Feed {
    /// Hands one frame to the transform stage; waits while the worker's queue is full.
    ///
    /// # Errors
    /// [`PipelineError::Stopped`] when the pipeline has shut down.
    pub fn submit(&self, payload: Vec<u8>) -> Result<(), PipelineError> {
        let id = self.id;
        self.input
            .send(Event::Frame { id, payload })
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
            Event::Frame { id, payload } => {
                // The panic hook has printed the panic; the sender logs the drop.
                let reply = panic::catch_unwind(AssertUnwindSafe(|| transform(id, payload)))
                    .unwrap_or_else(|_| Reply::Fail("the transform panicked".into()));
                let tx = sender(id);
                match reply {
                    Reply::Nothing => Ok(()),
                    Reply::One(payload) => tx.send(Event::Frame { id, payload }).map_err(drop),
                    Reply::Many(payloads) => payloads.into_iter().try_for_each(|payload| {
                        tx.send(Event::Frame { id, payload }).map_err(drop)
                    }),
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

/// Where the sender writes one connection's replies.
struct Route {
    stream: Arc<TcpStream>,
    /// Encoded replies not yet written: the connection's share of the current batch.
    unsent: Vec<u8>,
}

/// The sender's route table; only the sender thread touches it.
struct Routes<'a> {
    map: HashMap<u64, Route>,
    /// Connections with replies in `unsent`, in the order they got their first one. May
    /// name a connection twice or one that is gone: flushing those is a no-op.
    pending: Vec<u64>,
    config: &'a PipelineConfig,
    counters: &'a Counters,
}

impl Routes<'_> {
    fn handle(&mut self, event: Event) {
        match event {
            Event::Open { id, stream } => {
                let unsent = Vec::new();
                if self.map.insert(id, Route { stream, unsent }).is_none() {
                    self.counters.routes.fetch_add(1, Ordering::SeqCst);
                }
            }
            Event::Frame { id, payload } => self.queue(id, &payload),
            Event::Failed { id, why } => {
                self.flush(id);
                self.drop_connection(id, &why);
            }
            Event::Close { id, done } => {
                self.flush(id);
                self.forget(id);
                drop(done);
            }
            // Workers never pass it on.
            Event::Stop => {}
        }
    }

    /// Adds a reply to its connection's share of the batch; writes the share once it is
    /// large.
    fn queue(&mut self, id: u64, payload: &[u8]) {
        // No route: the connection was dropped and this reply has nowhere to go.
        let Some(route) = self.map.get_mut(&id) else {
            return;
        };
        if route.unsent.is_empty() {
            self.pending.push(id);
        }
        if let Err(e) = encode_frame(self.config.framing, payload, &mut route.unsent) {
            self.drop_connection(id, &format!("a reply cannot be framed: {e}"));
        } else if route.unsent.len() >= WRITE_BATCH {
            self.flush(id);
        }
    }

    /// Writes every connection's share of the batch.
    fn flush_all(&mut self) {
        let mut pending = mem::take(&mut self.pending);
        for &id in &pending {
            self.flush(id);
        }
        pending.clear();
        // Keeps the allocation for the next batch.
        self.pending = pending;
    }

    /// Writes one connection's unsent replies; drops the connection if it is not reading.
    fn flush(&mut self, id: u64) {
        let Some(route) = self.map.get_mut(&id) else {
            return;
        };
        if route.unsent.is_empty() {
            return;
        }
        let limit = self.config.write_timeout.max(MIN_WRITE_TIMEOUT);
        let written = write_within(&route.stream, &route.unsent, limit);
        let unsent = route.unsent.len();
        route.unsent.clear();
        // A burst's buffer is not kept for the life of a connection that goes quiet.
        route.unsent.shrink_to(UNSENT_KEPT);
        match written {
            Ok(()) => {}
            Err(e) if is_timeout(&e) => {
                let why = format!(
                    "{unsent} bytes of replies not taken in {limit:?}, the client is not reading"
                );
                self.drop_connection(id, &why);
            }
            Err(e) => {
                // The peer is gone (reset, or its end shut down): nothing to count.
                log_debug!("{}: connection {id}: write failed: {e}", self.config.name);
                if let Some(route) = self.forget(id) {
                    // Wakes its reader, which ends the connection.
                    let _ = route.stream.shutdown(Shutdown::Both);
                }
            }
        }
    }

    /// Removes a route; the sender's handle on the socket goes with it.
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
            // Wakes the connection's reader, which ends the connection and its feed.
            let _ = route.stream.shutdown(Shutdown::Both);
        }
    }
}

/// Writes all of `buf`, or fails with a timeout once `limit` has passed. The socket's own
/// write timeout (`limit` too) bounds each `write` call but not their sum, and a client
/// that reads a trickle lets every call make a little progress: without the overall
/// deadline it could hold its sender for as long as it likes. With it, a write waits at
/// most about twice `limit`.
fn write_within(stream: &TcpStream, mut buf: &[u8], limit: Duration) -> io::Result<()> {
    let deadline = Instant::now() + limit;
    while !buf.is_empty() {
        match (&*stream).write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if !buf.is_empty() && Instant::now() >= deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
    }
    Ok(())
}

/// Whether a write failed because the peer did not take the bytes in time (`SO_SNDTIMEO`
/// reports `EAGAIN`).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The sender: writes each reply to its connection, a batch at a time, never waiting on a
/// socket for longer than the write timeout.
fn send_stage(rx: HandoffReceiver<Event>, config: &PipelineConfig, counters: &Counters) {
    let mut routes = Routes {
        map: HashMap::new(),
        pending: Vec::new(),
        config,
        counters,
    };
    while let Some(first) = rx.recv() {
        routes.handle(first);
        // What is already queued goes out with it, one write per connection.
        for event in rx.try_iter().take(SEND_BATCH - 1) {
            routes.handle(event);
        }
        routes.flush_all();
    }
}

#[cfg(test)]
mod tests;
