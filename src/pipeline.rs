//! The queue-based server of seed 004, Part 4, as a reusable set of stages: per-connection
//! readers feed `(connection id, frame)` through transform workers to one sender, which
//! hands each reply to the outbox of the connection it came from.
//!
//! ```text
//!  reader 1 ─┐           ┌─▶ [queue] worker 0 ─┐                     ┌─▶ [outbox] writer 1 ─▶ socket 1
//!  reader 2 ─┼─ id % N ──┤                     ├─▶ [queue] sender ─id─┼─▶ [outbox] writer 2 ─▶ socket 2
//!  reader 3 ─┘           └─▶ [queue] worker 1 ─┘                     └─▶ [outbox] writer 3 ─▶ socket 3
//!  one thread per         N transform threads       one thread          one writer thread per
//!  connection             (`send` waits while a queue is full)          connection; `try_send`
//!                                                                       into a full outbox drops
//!                                                                       that connection
//! ```
//!
//! - **Order.** Each connection is routed to one worker (`id % N`), so its frames pass
//!   through one FIFO worker queue and one FIFO sender queue: replies keep request order by
//!   construction, with no sequence numbers and no reorder buffer (which a single slow frame
//!   could make grow without bound). The price: one connection uses one worker, and a slow
//!   frame delays the connections that share its worker. For a cheap, uniform transform
//!   such as echo's that is the better trade.
//! - **Slow clients.** The sender never blocks on a socket: it `try_send`s each reply into
//!   the connection's bounded outbox, drained by that connection's own writer thread. When
//!   the outbox is full, the client has stopped reading; that connection alone is dropped
//!   (its socket shut down, the reason logged), and everyone else keeps their throughput.
//! - **Bookkeeping.** A connection's route is registered in-band (an `Open` event ahead of
//!   its first frame) and removed in-band (a `Close` event behind its last frame), so the
//!   sender hands over every reply before it forgets the route, without a lock.
//! - **Shutdown.** Every stage is `for event in rx { tx.send(f(event)) }`: when the last
//!   [`Inlet`] and the [`Pipeline`] are dropped, the workers' queues disconnect, the workers
//!   end, then the sender, then the writers. [`Pipeline::shutdown`] joins them in that order.

use crate::framing::{FrameReader, FrameWriter, Framing, Limits};
use crate::server::{Connection, HandlerError};
use crate::{log_debug, log_info};
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// A writer batches the replies already waiting in its outbox into one `write`, up to this
/// many bytes, so one system call carries a burst without an unbounded buffer.
const WRITE_BATCH: usize = 64 << 10;
/// Stack size of a connection's writer thread: it only encodes frames and writes.
const WRITER_STACK: usize = 64 << 10;

/// How a [`Pipeline`] is built.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Names the threads (`NAME-transform-I`, `NAME-sender`, `NAME-out-ID`) and log lines.
    pub name: String,
    /// The framing readers decode and writers encode.
    pub framing: Framing,
    /// Frame limits for the readers; a frame over the limit ends its connection.
    pub limits: Limits,
    /// Transform worker threads (at least one).
    pub workers: usize,
    /// Events each worker's queue, and the sender's queue, hold before their producers wait.
    pub queue: usize,
    /// Replies one connection may have waiting to be written; one more and the connection
    /// is dropped as not reading. Counted in frames, so it bounds memory at `outbox` times
    /// the largest reply.
    pub outbox: usize,
    /// How long a writer may be stuck in one `write` before the connection is dropped.
    pub write_timeout: Option<Duration>,
}

impl PipelineConfig {
    /// Defaults: 2 workers, queues of 128 events, outboxes of 128 replies, 30 s write
    /// timeout, default frame limits. The bounds count frames, so what one connection can
    /// hold in flight is about `2 × queue + outbox` frames; enough for a pipelining client,
    /// and it keeps a flooder's cost bounded.
    pub fn new(name: &str, framing: Framing) -> Self {
        PipelineConfig {
            name: name.to_owned(),
            framing,
            limits: Limits::default(),
            workers: 2,
            queue: 128,
            outbox: 128,
            write_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// What flows from the readers through the workers to the sender.
enum Event {
    /// A new connection: where its replies go. Travels ahead of its first frame.
    Open {
        id: u64,
        stream: Arc<TcpStream>,
        outbox: Sender<Vec<u8>>,
    },
    /// A request on the way in, or its reply on the way out.
    Frame { id: u64, payload: Vec<u8> },
    /// The transform panicked on this connection's frame: drop the connection.
    Failed { id: u64 },
    /// The connection's reader has ended. Travels behind its last frame.
    Close { id: u64 },
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
    /// Connections dropped because they stopped reading (outbox full) or a transform failed.
    pub dropped: u64,
}

/// Why a connection could not join or feed the pipeline.
#[derive(Debug)]
pub enum PipelineError {
    /// The pipeline has shut down.
    Stopped,
    /// The connection's writer thread or socket options could not be set up.
    Io(io::Error),
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PipelineError::Stopped => f.write_str("the pipeline has shut down"),
            PipelineError::Io(e) => write!(f, "cannot set up the connection's writer: {e}"),
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
/// [`Inlet`]; see the module docs for the wiring.
#[derive(Debug)]
pub struct Pipeline {
    inlet: Inlet,
    /// Workers first, then the sender: the order they end in.
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl Pipeline {
    /// Starts `config.workers` transform threads running `transform` on every frame, and
    /// the sender thread.
    ///
    /// `transform` should not panic; if it does, the connection whose frame it was is
    /// dropped (and logged), and the worker goes on.
    ///
    /// # Errors
    /// When a thread cannot be started (those already started end on their own).
    pub fn start<F>(config: PipelineConfig, transform: F) -> io::Result<Pipeline>
    where
        F: Fn(Vec<u8>) -> Vec<u8> + Send + Sync + 'static,
    {
        let config = Arc::new(config);
        let counters = Arc::new(Counters::default());
        let transform = Arc::new(transform);
        let (to_sender, sender_rx) = bounded(config.queue);
        let mut threads = Vec::new();
        let mut workers = Vec::new();
        for i in 0..config.workers.max(1) {
            let (tx, rx) = bounded(config.queue);
            let out = to_sender.clone();
            let f = Arc::clone(&transform);
            threads.push(
                thread::Builder::new()
                    .name(format!("{}-transform-{i}", config.name))
                    .spawn(move || transform_stage(rx, out, &*f))?,
            );
            workers.push(tx);
        }
        // Only the workers hold the sender's queue now, so it disconnects when they end.
        drop(to_sender);
        let (name, sender_counters) = (config.name.clone(), Arc::clone(&counters));
        threads.push(
            thread::Builder::new()
                .name(format!("{}-sender", config.name))
                .spawn(move || send_stage(sender_rx, &sender_counters, &name))?,
        );
        Ok(Pipeline {
            inlet: Inlet {
                workers: workers.into(),
                config,
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
    /// (workers plus the sender, unless one of them panicked).
    ///
    /// Dropping the pipeline's own queue handles ends the stages only once every [`Inlet`]
    /// and [`Feed`] is gone too, so call this after the server that feeds the pipeline has
    /// stopped (its connection threads joined); until then it waits.
    pub fn shutdown(self) -> usize {
        let Pipeline { inlet, threads, .. } = self;
        drop(inlet);
        threads.into_iter().filter_map(|t| t.join().ok()).count()
    }
}

/// The readers' side of a [`Pipeline`]: cloneable, one clone per server handler.
#[derive(Debug, Clone)]
pub struct Inlet {
    workers: Arc<[Sender<Event>]>,
    config: Arc<PipelineConfig>,
}

impl Inlet {
    /// Registers connection `id`: starts its writer thread and routes its replies there.
    /// Dropping the returned [`Feed`] removes the route.
    ///
    /// # Errors
    /// [`PipelineError::Stopped`] when the pipeline has shut down; [`PipelineError::Io`]
    /// when the write timeout cannot be set or the writer thread cannot be started.
    pub fn open(&self, id: u64, stream: Arc<TcpStream>) -> Result<Feed, PipelineError> {
        let config = &self.config;
        stream
            .set_write_timeout(config.write_timeout)
            .map_err(PipelineError::Io)?;
        let (outbox, replies) = bounded(config.outbox.max(1));
        let (framing, name) = (config.framing, config.name.clone());
        let writer_stream = Arc::clone(&stream);
        let writer = thread::Builder::new()
            .name(format!("{}-out-{id}", config.name))
            .stack_size(WRITER_STACK)
            .spawn(move || write_stage(replies, &writer_stream, framing, &name, id))
            .map_err(PipelineError::Io)?;
        let input = self.workers[(id % self.workers.len() as u64) as usize].clone();
        let feed = Feed {
            id,
            input,
            writer: Some(writer),
        };
        if feed.input.send(Event::Open { id, stream, outbox }).is_err() {
            // The event, and with it the outbox, is gone: the writer ends, and dropping the
            // feed joins it.
            return Err(PipelineError::Stopped);
        }
        Ok(feed)
    }

    /// The reader stage for one connection, run on the connection's own thread: opens its
    /// route, feeds every frame in, and removes the route when the connection ends. A frame
    /// over the limit ends the connection (there is no error reply to send it).
    ///
    /// # Errors
    /// Whatever ended the connection abnormally: a framing error, a failed read, or the
    /// pipeline shutting down. A read timeout (an idle connection) is a normal end.
    pub fn serve(&self, conn: &Connection) -> Result<(), HandlerError> {
        let feed = self.open(conn.id, Arc::clone(&conn.stream))?;
        let config = &self.config;
        let mut reader = FrameReader::with_limits(&*conn.stream, config.framing, config.limits);
        loop {
            match reader.read_frame() {
                Ok(Some(frame)) => feed.submit(frame.to_vec())?,
                Ok(None) => return Ok(()),
                Err(e) if e.is_timeout() => {
                    log_debug!("{}: connection {} idle; closing", config.name, conn.id);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// One connection's registration in the pipeline; see [`Inlet::open`]. Dropping it sends
/// the close marker behind the connection's last frame and joins its writer, which ends
/// once every reply queued before the close has been written.
#[derive(Debug)]
pub struct Feed {
    id: u64,
    input: Sender<Event>,
    writer: Option<JoinHandle<()>>,
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
        // If the pipeline is gone, so is the route and its outbox, and the writer ends too.
        let _ = self.input.send(Event::Close { id: self.id });
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// A worker: transforms frames, passes the other events on in order.
fn transform_stage(
    rx: Receiver<Event>,
    tx: Sender<Event>,
    transform: &(dyn Fn(Vec<u8>) -> Vec<u8> + Sync),
) {
    for event in rx {
        let event = match event {
            Event::Frame { id, payload } => {
                // The panic hook has printed the panic; the sender logs the drop.
                match panic::catch_unwind(AssertUnwindSafe(|| transform(payload))) {
                    Ok(payload) => Event::Frame { id, payload },
                    Err(_) => Event::Failed { id },
                }
            }
            other => other,
        };
        if tx.send(event).is_err() {
            break;
        }
    }
}

/// Where the sender puts one connection's replies.
struct Route {
    // Declared first so it is dropped before the outbox: once the writer sees its outbox
    // close and ends, the sender no longer holds the socket either.
    stream: Arc<TcpStream>,
    outbox: Sender<Vec<u8>>,
}

/// The sender's route table; only the sender thread touches it.
struct Routes<'a> {
    map: HashMap<u64, Route>,
    counters: &'a Counters,
    name: &'a str,
}

impl Routes<'_> {
    fn open(&mut self, id: u64, route: Route) {
        self.map.insert(id, route);
        self.counters.routes.store(self.map.len(), Ordering::SeqCst);
    }

    /// Hands a reply to its connection's writer, or drops a connection that is not reading.
    fn deliver(&mut self, id: u64, payload: Vec<u8>) {
        // No route: the connection was dropped and this reply has nowhere to go.
        let Some(route) = self.map.get(&id) else {
            return;
        };
        match route.outbox.try_send(payload) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let bound = route.outbox.capacity().unwrap_or(0);
                let why = format!("{bound} replies unsent, the client is not reading");
                self.drop_connection(id, &why);
            }
            // Its writer failed, and has shut the socket down already.
            Err(TrySendError::Disconnected(_)) => {
                self.forget(id);
            }
        }
    }

    /// Removes a route, letting its writer finish what is queued and end.
    fn forget(&mut self, id: u64) -> Option<Route> {
        let route = self.map.remove(&id);
        self.counters.routes.store(self.map.len(), Ordering::SeqCst);
        route
    }

    /// Removes a route and cuts its connection off.
    fn drop_connection(&mut self, id: u64, why: &str) {
        if let Some(route) = self.forget(id) {
            log_info!("{}: dropping connection {id}: {why}", self.name);
            self.counters.dropped.fetch_add(1, Ordering::SeqCst);
            // Wakes the connection's reader, and its writer if it is stuck in `write`.
            let _ = route.stream.shutdown(Shutdown::Both);
        }
    }
}

/// The sender: routes each reply to its connection's outbox without ever blocking.
fn send_stage(rx: Receiver<Event>, counters: &Counters, name: &str) {
    let mut routes = Routes {
        map: HashMap::new(),
        counters,
        name,
    };
    for event in rx {
        match event {
            Event::Open { id, stream, outbox } => routes.open(id, Route { stream, outbox }),
            Event::Frame { id, payload } => routes.deliver(id, payload),
            Event::Failed { id } => routes.drop_connection(id, "the transform panicked"),
            Event::Close { id } => {
                routes.forget(id);
            }
        }
    }
}

/// A connection's writer: sends its replies, batching those already waiting.
fn write_stage(
    replies: Receiver<Vec<u8>>,
    stream: &TcpStream,
    framing: Framing,
    name: &str,
    id: u64,
) {
    let mut writer = FrameWriter::new(stream, framing);
    while let Ok(first) = replies.recv() {
        let mut next = Some(first);
        while let Some(reply) = next {
            if let Err(e) = writer.queue(&reply) {
                log_info!("{name}: connection {id}: reply cannot be framed: {e}; closing");
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            next = if writer.queued_len() < WRITE_BATCH {
                replies.try_recv().ok()
            } else {
                None
            };
        }
        if let Err(e) = writer.flush() {
            log_debug!("{name}: connection {id}: write failed: {e}");
            // Ends the reader too, which removes the route.
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{RunningServer, Server, ServerConfig};
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener};
    use std::time::Instant;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn client(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        s
    }

    /// A connected pair: (the server's end, shared as a connection's is; the client's end).
    fn socket_pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = client(listener.local_addr().unwrap());
        (Arc::new(listener.accept().unwrap().0), peer)
    }

    fn serve(pipeline: &Pipeline) -> RunningServer {
        let inlet = pipeline.inlet();
        Server::bind(
            "127.0.0.1:0",
            ServerConfig::named("pipe"),
            move |c: Connection| inlet.serve(&c),
        )
        .unwrap()
        .spawn()
        .unwrap()
    }

    fn config(workers: usize) -> PipelineConfig {
        let mut config = PipelineConfig::new("pipe", Framing::Line);
        config.workers = workers;
        config
    }

    fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn replies_keep_request_order_with_several_workers() {
        // Uneven work per frame, so the workers finish out of step with each other.
        let pipeline = Pipeline::start(config(4), |mut p: Vec<u8>| {
            for _ in 0..p.len() % 7 * 50 {
                thread::yield_now();
            }
            p.insert(0, b'>');
            p
        })
        .unwrap();
        let server = serve(&pipeline);
        let addr = server.local_addr();
        let clients: Vec<_> = (0..6)
            .map(|c| {
                thread::spawn(move || {
                    let mut s = client(addr);
                    let requests: String = (0..300).map(|i| format!("{c}-{i}\n")).collect();
                    // All pipelined in one write, before any reply is read.
                    s.write_all(requests.as_bytes()).unwrap();
                    let expected: String = (0..300).map(|i| format!(">{c}-{i}\n")).collect();
                    let mut got = vec![0u8; expected.len()];
                    s.read_exact(&mut got).unwrap();
                    assert_eq!(String::from_utf8(got).unwrap(), expected);
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        server.stop();
        assert_eq!(pipeline.shutdown(), 5);
    }

    #[test]
    fn a_client_that_never_reads_is_dropped_alone() {
        let mut config = config(2);
        config.framing = Framing::U32;
        config.outbox = 4;
        let pipeline = Pipeline::start(config, |p| p).unwrap();
        let server = serve(&pipeline);
        let addr = server.local_addr();
        let mut prober = client(addr);
        let mut round_trip = || {
            prober.write_all(b"\0\0\0\x05probe").unwrap();
            let mut got = [0u8; 9];
            prober.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"\0\0\0\x05probe");
        };
        round_trip();
        let mut flood = client(addr);
        let flood_control = flood.try_clone().unwrap();
        let flooder = thread::spawn(move || {
            let mut frame = vec![0, 0, 16, 0];
            frame.resize(4 + 4096, b'f');
            while flood.write_all(&frame).is_ok() {}
            // What it finally reads ends in end of stream (or a reset), not a timeout.
            io::copy(&mut flood, &mut io::sink())
        });
        while pipeline.stats().dropped == 0 {
            round_trip();
        }
        // The server has let go; stop a write the flooder's kernel may still be holding.
        let _ = flood_control.shutdown(Shutdown::Write);
        match flooder.join().unwrap() {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
        round_trip();
        eventually("the flooder's route to go", || pipeline.stats().routes == 1);
        server.stop();
        assert_eq!(pipeline.stats().routes, 0);
        assert_eq!(pipeline.stats().dropped, 1);
        assert_eq!(pipeline.shutdown(), 3);
    }

    /// The most a TCP connection's kernel buffers can hold, both ends together.
    fn kernel_buffers_max() -> usize {
        let max = |path| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|t| t.split_whitespace().nth(2)?.parse().ok())
                .unwrap_or(8 << 20)
        };
        max("/proc/sys/net/ipv4/tcp_rmem") + max("/proc/sys/net/ipv4/tcp_wmem")
    }

    #[test]
    fn a_client_that_pauses_reading_blocks_only_its_own_writer() {
        const FRAME: usize = 16 << 10;
        // More than the kernel can buffer, so its writer is stuck in `write`; less than the
        // outbox holds, so it is not dropped.
        let burst = kernel_buffers_max() / FRAME + 64;
        let mut config = config(2);
        config.framing = Framing::U32;
        config.outbox = burst + 1;
        let pipeline = Pipeline::start(config, |p| p).unwrap();
        let server = serve(&pipeline);
        let mut paused = client(server.local_addr());
        let mut frame = (FRAME as u32).to_be_bytes().to_vec();
        frame.resize(4 + FRAME, b'p');
        for _ in 0..burst {
            paused.write_all(&frame).unwrap();
        }
        let mut other = client(server.local_addr());
        for i in 0..100u8 {
            other.write_all(&[0, 0, 0, 1, i]).unwrap();
            let mut got = [0u8; 5];
            other.read_exact(&mut got).unwrap();
            assert_eq!(got, [0, 0, 0, 1, i]);
        }
        // Nothing was lost while it paused.
        let mut reply = vec![0u8; frame.len()];
        for _ in 0..burst {
            paused.read_exact(&mut reply).unwrap();
            assert_eq!(reply, frame);
        }
        assert_eq!(pipeline.stats().dropped, 0);
        server.stop();
        assert_eq!(pipeline.shutdown(), 3);
    }

    #[test]
    fn a_closed_connection_leaves_no_route_and_no_thread() {
        let pipeline = Pipeline::start(config(3), |p| p).unwrap();
        let inlet = pipeline.inlet();
        let (stream, peer) = socket_pair();
        let feed = inlet.open(7, Arc::clone(&stream)).unwrap();
        for word in ["a", "b", "c"] {
            feed.submit(word.as_bytes().to_vec()).unwrap();
        }
        let mut got = [0u8; 6];
        (&peer).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"a\nb\nc\n");
        assert_eq!(pipeline.stats().routes, 1);
        // Dropping the feed removes the route and joins the writer: nothing else holds the
        // socket any more.
        drop(feed);
        assert_eq!(pipeline.stats().routes, 0);
        assert_eq!(Arc::strong_count(&stream), 1);
        drop(inlet);
        assert_eq!(pipeline.shutdown(), 4);
    }

    #[test]
    fn replies_queued_before_the_close_are_still_written() {
        let pipeline = Pipeline::start(config(1), |p| p).unwrap();
        let (stream, peer) = socket_pair();
        let feed = pipeline.inlet().open(1, stream).unwrap();
        for i in 0..100 {
            feed.submit(format!("{i}").into_bytes()).unwrap();
        }
        drop(feed);
        let mut all = String::new();
        (&peer).read_to_string(&mut all).unwrap();
        let expected: String = (0..100).map(|i| format!("{i}\n")).collect();
        assert_eq!(all, expected);
        assert_eq!(pipeline.shutdown(), 2);
    }

    #[test]
    fn shutdown_waits_for_the_last_inlet_then_joins_every_stage_in_order() {
        let pipeline = Pipeline::start(config(3), |p| p).unwrap();
        let inlet = pipeline.inlet();
        let shutdown = thread::spawn(move || pipeline.shutdown());
        // Still usable: the stages run until the last inlet is gone.
        let (stream, peer) = socket_pair();
        let feed = inlet.open(1, stream).unwrap();
        feed.submit(b"still here".to_vec()).unwrap();
        let mut got = [0u8; 11];
        (&peer).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still here\n");
        assert!(!shutdown.is_finished());
        drop(feed);
        drop(inlet);
        assert_eq!(shutdown.join().unwrap(), 4);
    }

    #[test]
    fn a_panicking_transform_drops_only_its_connection() {
        let pipeline = Pipeline::start(config(1), |p: Vec<u8>| {
            assert!(p != b"boom", "the transform refuses boom");
            p
        })
        .unwrap();
        let server = serve(&pipeline);
        let mut victim = client(server.local_addr());
        let mut bystander = client(server.local_addr());
        victim.write_all(b"boom\n").unwrap();
        let mut rest = Vec::new();
        let closed = victim.read_to_end(&mut rest);
        assert!(closed.is_ok() || closed.unwrap_err().kind() == io::ErrorKind::ConnectionReset);
        assert!(rest.is_empty());
        bystander.write_all(b"fine\n").unwrap();
        let mut got = [0u8; 5];
        bystander.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"fine\n");
        assert_eq!(pipeline.stats().dropped, 1);
        server.stop();
        assert_eq!(pipeline.shutdown(), 2);
    }
}
