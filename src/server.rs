//! The thread-per-connection TCP server: accept, hand each connection to a handler on its
//! own named OS thread, cap and time out connections, and shut everything down on request.
//!
//! ```no_run
//! use switchboard::server::{Connection, HandlerError, Server, ServerConfig};
//! use std::io::{Read, Write};
//!
//! let server = Server::bind("127.0.0.1:0", ServerConfig::named("echo"), |c: Connection| {
//!     let mut stream = &*c.stream;
//!     let mut buf = [0u8; 4096];
//!     loop {
//!         let n = stream.read(&mut buf)?;
//!         if n == 0 { return Ok::<(), HandlerError>(()); }
//!         stream.write_all(&buf[..n])?;
//!     }
//! })?;
//! let running = server.spawn()?;
//! println!("listening on {}", running.local_addr());
//! running.stop();
//! # Ok::<(), std::io::Error>(())
//! ```

use crate::framing::{FrameError, FrameReader};
use crate::{log_debug, log_info};
use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The error a handler ends its connection with; logged in one line, never fatal to the
/// server. Only the end of a connection is on this path, so a boxed error costs nothing.
pub type HandlerError = Box<dyn Error + Send + Sync>;

/// Serves one connection; runs on that connection's own thread.
pub trait Handler: Send + Sync + 'static {
    /// Handles `conn` until it ends.
    ///
    /// # Errors
    /// Whatever ended the connection abnormally; the server logs it and goes on.
    fn handle(&self, conn: Connection) -> Result<(), HandlerError>;
}

impl<F> Handler for F
where
    F: Fn(Connection) -> Result<(), HandlerError> + Send + Sync + 'static,
{
    fn handle(&self, conn: Connection) -> Result<(), HandlerError> {
        self(conn)
    }
}

/// One accepted connection, as a handler receives it.
#[derive(Debug)]
pub struct Connection {
    /// The socket (`TCP_NODELAY` set, and the idle timeout as its read timeout). Read and
    /// write through `&*stream` (`&TcpStream` is `Read + Write`); clone the `Arc` to hand it
    /// to another thread. Sharing one descriptor, instead of `try_clone`, keeps a
    /// connection at one file descriptor, which matters at ten thousand connections.
    pub stream: Arc<TcpStream>,
    /// The client's address.
    pub peer: SocketAddr,
    /// A number unique among this server's connections.
    pub id: u64,
    /// The server this connection belongs to (for statistics, or to stop it).
    pub server: ServerHandle,
}

/// How long a connection that has not settled holds back younger ones (see
/// [`Connection::wait_for_earlier`]). Long enough to cover a runnable thread's scheduling
/// delay on a loaded machine; short, because a client that connects and stays silent
/// never settles and costs each newcomer up to this once.
pub const SETTLE_WINDOW: Duration = Duration::from_millis(50);

impl Connection {
    /// Declares that this connection has acted on everything its first read delivered.
    ///
    /// Together with [`Connection::wait_for_earlier`] this gives arrival order across
    /// connections: a client that sends a request and closes (the course's one-shot Erlang
    /// clients) has its request applied before a request on any connection accepted after
    /// it, although the two run on different threads. Idempotent; ending the connection
    /// settles it too.
    pub fn settle(&self) {
        self.server.shared.unfresh(self.id);
    }

    /// Waits until every connection accepted before this one has settled, or has been
    /// connected for [`SETTLE_WINDOW`] without sending anything (a silent client cannot
    /// hold anyone back for longer). Returns at once in the common case.
    pub fn wait_for_earlier(&self) {
        let shared = &self.server.shared;
        let mut fresh = shared.fresh();
        loop {
            let now = Instant::now();
            // Ids and accept times grow together, so the expired entries are the first ones;
            // dropping them here keeps the map as small as the set of recent newcomers.
            while let Some((_, &since)) = fresh.first_key_value() {
                if since + SETTLE_WINDOW > now {
                    break;
                }
                fresh.pop_first();
            }
            let Some((_, &since)) = fresh.range(..self.id).next_back() else {
                return;
            };
            let until = since + SETTLE_WINDOW;
            fresh = shared
                .settled
                .wait_timeout(fresh, until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Connection {
    /// Waits for the next read of requests for a handler that keeps arrival order across
    /// connections (see [`Connection::settle`]): fills `reader` (which reads this
    /// connection's stream) and, before the first batch, waits for earlier connections.
    ///
    /// `Ok(true)`: complete frames may be buffered; take them with
    /// [`FrameReader::next_buffered`], act on them, then call [`Connection::settle`] once
    /// the first batch is done. `Ok(false)`: the connection is over, normally: the client
    /// closed it (a frame it cut off is logged as not applied), it stayed idle past the
    /// server's idle timeout, or it vanished; the connection is settled.
    ///
    /// # Errors
    /// A read that failed otherwise, or a size header that is not a length (the stream
    /// lost sync): the connection cannot go on.
    pub fn fill_in_order<R: Read>(
        &self,
        reader: &mut FrameReader<R>,
        first: bool,
    ) -> Result<bool, FrameError> {
        let name = &self.server.shared.name;
        match reader.fill() {
            Ok(true) => {
                if first {
                    self.wait_for_earlier();
                }
                Ok(true)
            }
            Ok(false) => {
                self.settle();
                if let Err(e) = reader.finish() {
                    log_info!(
                        "{name}: connection {} from {}: {e}; that request was not applied",
                        self.id,
                        self.peer
                    );
                }
                Ok(false)
            }
            Err(e) if e.is_timeout() => {
                log_debug!("{name}: connection {} idle; closing", self.id);
                Ok(false)
            }
            Err(FrameError::Io(e)) if is_disconnect(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// How a [`Server`] behaves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Names the threads (`NAME-conn-ID`) and prefixes the log lines.
    pub name: String,
    /// Live connections beyond which new ones are refused.
    pub max_connections: usize,
    /// Close a connection after this long without receiving anything.
    pub idle_timeout: Option<Duration>,
    /// Stack size of each connection thread. Idle threads touch only a few pages of it, so
    /// thousands of connections fit in little memory.
    pub stack_size: usize,
    /// Bytes written to a refused connection before it is closed, already framed.
    pub refusal: Vec<u8>,
    /// How long shutdown waits for connection threads to finish.
    pub shutdown_deadline: Duration,
    /// Log the server's start and stop only in verbose mode: for servers a program starts
    /// by the hundred (a remote channel's listener), where they are routine events.
    pub quiet: bool,
}

impl ServerConfig {
    /// Defaults: 10,000 connections, no idle timeout, 128 KiB stacks, a line-framed
    /// `{error,too_many_connections}` refusal, 5 s shutdown deadline.
    pub fn named(name: &str) -> Self {
        ServerConfig {
            name: name.to_owned(),
            max_connections: 10_000,
            idle_timeout: None,
            stack_size: 128 << 10,
            refusal: b"{error,too_many_connections}\n".to_vec(),
            shutdown_deadline: Duration::from_secs(5),
            quiet: false,
        }
    }
}

/// Counters a running server keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerStats {
    /// Connections being served now.
    pub live: usize,
    /// Connections accepted and served since start (refused ones excluded).
    pub accepted: u64,
    /// Connections refused (over `max_connections`, or no thread could be started).
    pub refused: u64,
}

/// What a server reports when it has shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeReport {
    /// Counters at the end.
    pub stats: ServerStats,
    /// Connection threads joined during shutdown.
    pub joined: usize,
    /// Connection threads still running at the deadline (left detached).
    pub abandoned: usize,
}

/// A connection the server can still reach: a clone of its socket to shut it down, and its
/// thread to join.
struct Tracked {
    stream: Arc<TcpStream>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    name: String,
    stopping: AtomicBool,
    /// Where `shutdown` connects to wake the blocking `accept`.
    wake_addr: SocketAddr,
    accepted: AtomicU64,
    refused: AtomicU64,
    /// Live connections. Each thread removes its own entry as it ends, so nothing outlives
    /// its connection; `drained` is signalled when the table becomes empty.
    table: Mutex<HashMap<u64, Tracked>>,
    drained: Condvar,
    /// Connections that have not yet settled (see [`Connection::settle`]), with the time
    /// they were accepted; `settled` is signalled whenever one leaves.
    fresh: Mutex<BTreeMap<u64, Instant>>,
    settled: Condvar,
}

impl Shared {
    fn fresh(&self) -> MutexGuard<'_, BTreeMap<u64, Instant>> {
        self.fresh.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn unfresh(&self, id: u64) {
        if self.fresh().remove(&id).is_some() {
            self.settled.notify_all();
        }
    }

    fn table(&self) -> MutexGuard<'_, HashMap<u64, Tracked>> {
        // Nothing panics while holding this lock; recover rather than cascade if it did.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A cloneable handle to a server: statistics and shutdown, from any thread.
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
    local: SocketAddr,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("name", &self.shared.name)
            .field("local", &self.local)
            .finish()
    }
}

impl ServerHandle {
    /// Asks the server to stop: it stops accepting, shuts down every live connection and
    /// joins their threads within the deadline. Returns at once; idempotent.
    pub fn shutdown(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // The accept loop is blocked in accept(2); a connection of our own wakes it, and it
        // sees the flag before serving anything. Retry in case the backlog is full.
        for _ in 0..3 {
            if TcpStream::connect_timeout(&self.shared.wake_addr, Duration::from_secs(1)).is_ok() {
                break;
            }
        }
    }

    /// Whether shutdown has been requested.
    pub fn is_stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Current counters.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            live: self.shared.table().len(),
            accepted: self.shared.accepted.load(Ordering::Relaxed),
            refused: self.shared.refused.load(Ordering::Relaxed),
        }
    }
}

/// Removes a connection's bookkeeping when its thread ends, however it ends.
struct Departure {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Departure {
    fn drop(&mut self) {
        self.shared.unfresh(self.id);
        let mut table = self.shared.table();
        table.remove(&self.id);
        if table.is_empty() {
            self.shared.drained.notify_all();
        }
    }
}

/// A bound server, ready to [`run`](Server::run) or [`spawn`](Server::spawn).
pub struct Server {
    listener: TcpListener,
    config: ServerConfig,
    handler: Arc<dyn Handler>,
    handle: ServerHandle,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port; see [`Server::local_addr`]).
    ///
    /// # Errors
    /// When the address cannot be resolved or bound.
    pub fn bind(
        addr: impl ToSocketAddrs,
        config: ServerConfig,
        handler: impl Handler,
    ) -> io::Result<Server> {
        Server::from_listener(TcpListener::bind(addr)?, config, handler)
    }

    /// Serves an already-bound listener.
    ///
    /// # Errors
    /// When the listener's address cannot be read.
    pub fn from_listener(
        listener: TcpListener,
        config: ServerConfig,
        handler: impl Handler,
    ) -> io::Result<Server> {
        let local = listener.local_addr()?;
        let wake_ip = match local {
            SocketAddr::V4(a) if a.ip().is_unspecified() => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(a) if a.ip().is_unspecified() => Ipv6Addr::LOCALHOST.into(),
            a => a.ip(),
        };
        let shared = Arc::new(Shared {
            name: config.name.clone(),
            stopping: AtomicBool::new(false),
            wake_addr: SocketAddr::new(wake_ip, local.port()),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            table: Mutex::new(HashMap::new()),
            drained: Condvar::new(),
            fresh: Mutex::new(BTreeMap::new()),
            settled: Condvar::new(),
        });
        Ok(Server {
            listener,
            config,
            handler: Arc::new(handler),
            handle: ServerHandle { shared, local },
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local
    }

    /// A handle to stop the server or read its counters.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Runs the server on a thread of its own.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn spawn(self) -> io::Result<RunningServer> {
        let handle = self.handle();
        let thread = thread::Builder::new()
            .name(format!("{}-accept", self.config.name))
            .spawn(move || self.run())?;
        Ok(RunningServer {
            handle,
            thread: Some(thread),
        })
    }

    /// Accepts and serves connections until [`ServerHandle::shutdown`] is called, then
    /// closes the listener, shuts down live connections and joins their threads.
    pub fn run(self) -> ServeReport {
        self.accept_until_stopped();
        let Server {
            listener,
            config,
            handle,
            ..
        } = self;
        // Closing the listener first frees the port and refuses newcomers during the drain.
        drop(listener);
        let report = drain(&handle, &config);
        let stopped = format!(
            "{}: stopped ({} connections served, {} refused, {} threads joined, {} abandoned)",
            config.name,
            report.stats.accepted,
            report.stats.refused,
            report.joined,
            report.abandoned
        );
        if config.quiet {
            log_debug!("{stopped}");
        } else {
            log_info!("{stopped}");
        }
        report
    }

    fn accept_until_stopped(&self) {
        let name = &self.config.name;
        if self.config.quiet {
            log_debug!("{name}: listening on {}", self.handle.local);
        } else {
            log_info!("{name}: listening on {}", self.handle.local);
        }
        let mut backoff = Duration::ZERO;
        loop {
            let accepted = self.listener.accept();
            if self.handle.is_stopping() {
                break;
            }
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::ZERO;
                    self.admit(stream, peer);
                }
                Err(e) if is_per_connection(&e) => {
                    log_debug!("{name}: accept: {e} (retrying)");
                }
                Err(e) => {
                    // EMFILE and friends: the condition lasts until connections close, so
                    // back off instead of spinning, and keep the listener.
                    backoff =
                        (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    log_info!("{name}: accept failed: {e}; retrying in {backoff:?}");
                    thread::sleep(backoff);
                }
            }
        }
    }

    fn admit(&self, stream: TcpStream, peer: SocketAddr) {
        let shared = &self.handle.shared;
        let name = &self.config.name;
        let live = shared.table().len();
        if live >= self.config.max_connections {
            self.refuse(stream, peer, "connection limit reached");
            return;
        }
        // Per-connection setup failures (the peer already gone) cost that connection only.
        let setup = stream
            .set_nodelay(true)
            .and_then(|()| stream.set_read_timeout(self.config.idle_timeout));
        if let Err(e) = setup {
            log_debug!("{name}: dropping connection from {peer}: {e}");
            return;
        }
        let stream = Arc::new(stream);
        let id = shared.accepted.fetch_add(1, Ordering::Relaxed);
        // Registered before the thread starts, so a thread that ends at once still finds
        // (and removes) its entries.
        shared.fresh().insert(id, Instant::now());
        shared.table().insert(
            id,
            Tracked {
                stream: Arc::clone(&stream),
                thread: None,
            },
        );
        let conn = Connection {
            stream,
            peer,
            id,
            server: self.handle.clone(),
        };
        let handler = Arc::clone(&self.handler);
        let departure = Departure {
            shared: Arc::clone(shared),
            id,
        };
        let thread_name = format!("{name}-conn-{id}");
        let spawned = thread::Builder::new()
            .name(thread_name)
            .stack_size(self.config.stack_size)
            .spawn(move || serve(handler, conn, departure));
        match spawned {
            Ok(thread) => {
                if let Some(entry) = shared.table().get_mut(&id) {
                    entry.thread = Some(thread);
                }
            }
            Err(e) => {
                // The closure (and with it the socket and the departure) was dropped.
                shared.accepted.fetch_sub(1, Ordering::Relaxed);
                shared.refused.fetch_add(1, Ordering::Relaxed);
                log_info!("{name}: refused connection from {peer}: cannot start a thread: {e}");
            }
        }
    }

    fn refuse(&self, mut stream: TcpStream, peer: SocketAddr, why: &str) {
        let shared = &self.handle.shared;
        let refused = shared.refused.fetch_add(1, Ordering::Relaxed) + 1;
        log_info!(
            "{}: refused connection from {peer}: {why} (max {}; {refused} refused so far)",
            self.config.name,
            self.config.max_connections
        );
        // A fresh socket's send buffer is empty, but never let a refusal block accepting.
        let _ = stream.set_nonblocking(true);
        let _ = stream.write_all(&self.config.refusal);
        let _ = stream.shutdown(Shutdown::Both);
    }
}

/// Shuts down every live connection and joins the threads that finish by the deadline.
fn drain(handle: &ServerHandle, config: &ServerConfig) -> ServeReport {
    let shared = &handle.shared;
    let deadline = Instant::now() + config.shutdown_deadline;
    let mut threads = Vec::new();
    for (&id, entry) in shared.table().iter_mut() {
        let _ = entry.stream.shutdown(Shutdown::Both);
        threads.extend(entry.thread.take().map(|t| (id, t)));
    }
    let mut table = shared.table();
    while !table.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        table = shared
            .drained
            .wait_timeout(table, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    let abandoned = table.len();
    let stuck: Vec<u64> = table.keys().copied().collect();
    drop(table);
    let mut joined = 0;
    for (id, thread) in threads {
        // A thread whose entry is gone has finished its work and is only unwinding its
        // stack, so joining it cannot block; a stuck one is left detached.
        if !stuck.contains(&id) && thread.join().is_ok() {
            joined += 1;
        }
    }
    ServeReport {
        stats: handle.stats(),
        joined,
        abandoned,
    }
}

/// True for the errors a socket gives when its peer has gone away (reset, aborted, broken
/// pipe, closed early): the end of a connection, not worth a log line.
pub fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
    )
}

/// Errors that concern one incoming connection, not the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// The body of a connection thread.
fn serve(handler: Arc<dyn Handler>, conn: Connection, departure: Departure) {
    let name = &departure.shared.name;
    let (id, peer) = (conn.id, conn.peer);
    log_debug!("{name}: connection {id} from {peer}");
    match panic::catch_unwind(AssertUnwindSafe(|| handler.handle(conn))) {
        Ok(Ok(())) => log_debug!("{name}: connection {id} from {peer} closed"),
        Ok(Err(e)) => log_info!("{name}: connection {id} from {peer} ended: {e}"),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            log_info!("{name}: connection {id} from {peer}: handler panicked: {what}");
        }
    }
    drop(departure);
}

/// A server running on its own thread; stops it when dropped.
pub struct RunningServer {
    handle: ServerHandle,
    thread: Option<JoinHandle<ServeReport>>,
}

impl RunningServer {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local
    }

    /// A handle to the server.
    pub fn handle(&self) -> &ServerHandle {
        &self.handle
    }

    /// Shuts the server down and waits for it.
    pub fn stop(mut self) -> ServeReport {
        self.handle.shutdown();
        self.join()
    }

    /// Waits until the server stops (someone else calls [`ServerHandle::shutdown`]).
    pub fn wait(mut self) -> ServeReport {
        self.join()
    }

    fn join(&mut self) -> ServeReport {
        let thread = self.thread.take().expect("joined once");
        match thread.join() {
            Ok(report) => report,
            Err(panic) => panic::resume_unwind(panic),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.handle.shutdown();
            let _ = self.thread.take().map(JoinHandle::join);
        }
    }
}

/// Makes Ctrl-C and SIGTERM call `on_signal` (usually [`ServerHandle::shutdown`]).
///
/// # Errors
/// When a handler is already installed or the signal cannot be hooked.
pub fn on_termination(on_signal: impl Fn() + Send + 'static) -> Result<(), ctrlc::Error> {
    ctrlc::set_handler(on_signal)
}
