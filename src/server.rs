//! The thread-per-connection TCP server: accept, hand each connection to a handler on its
//! own named OS thread, cap and time out connections, and shut everything down on request.
//!
//! ```
//! use switchboard::server::{Server, ServerConfig};
//! use std::io::{Read, Write};
//! use std::net::TcpStream;
//! use std::time::Duration;
//!
//! let config = ServerConfig {
//!     max_connections: 100,
//!     idle_timeout: Some(Duration::from_secs(60)),
//!     ..ServerConfig::named("echo")
//! };
//! let server = Server::bind("127.0.0.1:0", config, |conn| {
//!     // `&Connection` reads like the socket, and its idle timeout is a clean end (0).
//!     let mut buf = [0u8; 4096];
//!     loop {
//!         let n = (&conn).read(&mut buf)?;
//!         if n == 0 {
//!             return Ok(());
//!         }
//!         (&*conn.stream).write_all(&buf[..n])?;
//!     }
//! })?;
//! let running = server.spawn()?;
//! let mut client = TcpStream::connect(running.local_addr())?;
//! client.set_read_timeout(Some(Duration::from_secs(10)))?;
//! client.write_all(b"hi")?;
//! let mut reply = [0u8; 2];
//! client.read_exact(&mut reply)?;
//! assert_eq!(&reply, b"hi");
//! let report = running.stop();
//! assert_eq!(report.stats.accepted, 1);
//! # Ok::<(), std::io::Error>(())
//! ```

use crate::budget::{Account, Budget};
use crate::framing::{encode_frame, FrameError, FrameReader, Framing, Limits};
use crate::group::Group;
use crate::{log_debug, log_info};
use std::error::Error;
use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs,
};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

mod opening;

/// Refusals at the connection cap are logged at most this often (each is counted).
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(1);

/// How long a connection in the reserve ([`ServerConfig::reserved_connections`]) may take
/// to open ([`Connection::opened`]), or the server's opening timeout if that is shorter.
pub const RESERVE_OPENING_TIMEOUT: Duration = Duration::from_secs(5);

/// The error a handler ends its connection with; logged in one line, never fatal to the
/// server. Only the end of a connection is on this path, so a boxed error costs nothing.
pub type HandlerError = Box<dyn Error + Send + Sync>;

/// Serves one connection; runs on that connection's own thread. A closure
/// `Fn(Connection) -> Result<(), HandlerError>` is one; [`crate::order::Ordered`] is one that
/// also uses [`Handler::accepted`].
///
/// Example: the [module docs](crate::server), and "Write your own server" in the [crate docs](crate).
pub trait Handler: Send + Sync + 'static {
    /// Handles `conn` until it ends.
    ///
    /// # Errors
    /// Whatever ended the connection abnormally; the server logs it and goes on.
    fn handle(&self, conn: Connection) -> Result<(), HandlerError>;

    /// Called on the accept thread, in accept order, before `conn`'s own thread starts:
    /// for bookkeeping that must follow accept order (see [`crate::order::Arrivals`]). It
    /// delays every newcomer, so keep it short. Does nothing unless overridden.
    fn accepted(&self, conn: &Connection) {
        let _ = conn;
    }
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
///
/// Example: the [module docs](crate::server), and "Write your own server" in the [crate docs](crate).
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
    idle_timeout: Option<Duration>,
    /// Its share of the server's client memory budget, if it has one.
    account: Option<Account>,
    /// The instants another thread makes the socket non-blocking (see
    /// [`Connection::nonblocking`]).
    toggles: Arc<Toggles>,
    /// Set by [`Connection::opened`], when the server has an opening timeout or this
    /// connection is in the reserve.
    opened: Option<Arc<AtomicBool>>,
    /// Accepted past `max_connections`, into the reserve
    /// ([`ServerConfig::reserved_connections`]).
    reserve: bool,
}

impl Connection {
    /// Reads through this connection as a handler should: blocking, with the server's idle
    /// timeout turned into a clean end of stream (see [`ServerConfig::idle_timeout`]).
    /// Equivalent to `FrameReader::with_limits(&conn, framing, limits)`.
    ///
    /// ```
    /// # use switchboard::server::{Server, ServerConfig};
    /// # use switchboard::framing::{Framing, Limits};
    /// # use std::io::Write;
    /// let server = Server::bind("127.0.0.1:0", ServerConfig::default(), |conn| {
    ///     let mut reader = conn.reader(Framing::Line, Limits::default());
    ///     while let Some(line) = reader.read_frame()? {
    ///         (&*conn.stream).write_all(&[line, b"\n"].concat())?;
    ///     }
    ///     Ok(()) // the client closed, or stayed idle too long
    /// })?;
    /// # drop(server);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn reader(&self, framing: Framing, limits: Limits) -> FrameReader<&Connection> {
        FrameReader::with_limits(self, framing, limits).accounted(self.account())
    }

    /// This connection's share of the server's client memory budget
    /// ([`ServerConfig::client_memory`]): charge what it makes the server hold to it.
    pub fn account(&self) -> Option<&Account> {
        self.account.as_ref()
    }

    /// A handle with which another thread may use the socket without blocking, while this
    /// connection's own reads through `&Connection` go on blocking (see [`Nonblocking`]).
    pub fn nonblocking(&self) -> Nonblocking {
        Nonblocking {
            stream: Arc::clone(&self.stream),
            toggles: Arc::clone(&self.toggles),
        }
    }

    /// As [`Connection::nonblocking`], without keeping the socket open.
    pub(crate) fn nonblocking_weak(&self) -> WeakNonblocking {
        WeakNonblocking {
            stream: Arc::downgrade(&self.stream),
            toggles: Arc::clone(&self.toggles),
        }
    }

    /// The server's idle timeout, which is this connection's read timeout.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// Whether this connection was accepted past [`ServerConfig::max_connections`], into
    /// the reserve ([`ServerConfig::reserved_connections`]): its handler should serve it
    /// only if it is one of those the reserve is kept for (an authenticated peer link,
    /// say, calling [`Connection::opened`] once it has proved itself) and
    /// [`Connection::refuse`] it otherwise.
    pub fn in_reserve(&self) -> bool {
        self.reserve
    }

    /// Answers this connection as one over the connection limit is answered (the server's
    /// refusal, [`ServerConfig::refusal`]) and shuts it down: for a connection in the
    /// reserve that is not one the reserve is for. Counted as refused, not accepted. The
    /// handler should return next.
    pub fn refuse(&self) {
        let shared = &self.server.shared;
        shared.accepted.fetch_sub(1, Ordering::Relaxed);
        shared.refused.fetch_add(1, Ordering::Relaxed);
        log_debug!(
            "{}: connection {} from {} refused: over the connection limit, and not one the \
             reserve is for",
            shared.name,
            self.id,
            self.peer
        );
        // A refusal is a few bytes into an empty send buffer: never wait on it.
        let _ = self.stream.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = (&*self.stream).write_all(&shared.refusal);
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Tells the server that this connection has opened (its hello, handshake or first
    /// request is done): the opening timeout ([`ServerConfig::opening_timeout`]) no longer
    /// applies to it. Does nothing when the server has none and the connection is not in
    /// the reserve.
    pub fn opened(&self) {
        if let Some(opened) = &self.opened {
            opened.store(true, Ordering::Release);
        }
    }

    /// Waits until the peer has sent something, without taking it: `true` when bytes are
    /// waiting, `false` when the peer closed, vanished or stayed idle past the timeout.
    pub(crate) fn wait_readable(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.retrying(|s| s.peek(&mut byte)), Ok(n) if n > 0)
    }

    /// Runs a blocking read-like call on the socket, telling the idle timeout (`Ok(0)`: end
    /// of stream) from a spurious `EAGAIN`: another thread may make the socket non-blocking
    /// for an instant to peek at it (see [`crate::order`]), and a read that starts in that
    /// instant fails at once. Such a failure comes long before the timeout, so it is retried.
    ///
    /// The clock is read only when the server has an idle timeout: without one, the socket
    /// has no read timeout unless the handler set one itself, and a timeout error that no
    /// toggle explains is then the handler's own (its timeout, or its non-blocking socket).
    #[inline]
    fn retrying(&self, mut op: impl FnMut(&TcpStream) -> io::Result<usize>) -> io::Result<usize> {
        let started = self.idle_timeout.map(|_| Instant::now());
        let before = self.toggles.count.load(Ordering::SeqCst);
        match op(&self.stream) {
            Ok(n) => Ok(n),
            Err(e) => self.retry(e, before, started, op),
        }
    }

    /// [`retrying`](Self::retrying) after the first call failed with `first`: what to make
    /// of it, and the calls after it.
    #[cold]
    #[inline(never)]
    fn retry(
        &self,
        first: io::Error,
        mut before: u64,
        started: Option<Instant>,
        mut op: impl FnMut(&TcpStream) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut spurious = 0;
        let mut result = Err(first);
        // When the call that failed began (timed only with an idle timeout).
        let mut call = started;
        loop {
            match result {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The socket was non-blocking for another thread's instant during the call
                // (odd: one was under way as it started; changed: one began meanwhile),
                // unless the call itself waited out the read timeout: peeks every few
                // milliseconds (newcomers looking at parked connections) would otherwise
                // explain away every real timeout, and an idle connection never end.
                Err(e)
                    if is_timeout(&e)
                        && (before % 2 == 1
                            || self.toggles.count.load(Ordering::SeqCst) != before)
                        && !self.waited_out(call) =>
                {
                    thread::yield_now();
                }
                Err(e) if is_timeout(&e) => {
                    let timeout = self.stream.read_timeout().ok().flatten();
                    // The socket's read timeout (the idle timeout, or one the handler set
                    // itself) has expired, as a spurious EAGAIN never waits that long.
                    let (expired, idle) = match (started, timeout) {
                        (_, None) => (false, false),
                        (None, Some(_)) => (true, false),
                        (Some(started), Some(t)) => {
                            let elapsed = started.elapsed();
                            let expired = elapsed >= t / 2;
                            (
                                expired,
                                expired && self.idle_timeout.is_some_and(|t| elapsed >= t / 2),
                            )
                        }
                    };
                    // A handler that made its own socket non-blocking, or set a shorter
                    // read timeout, gets its error back.
                    if !expired && spurious < SPURIOUS_RETRIES {
                        spurious += 1;
                        thread::yield_now();
                    } else if idle {
                        log_debug!(
                            "{}: connection {} idle; closing",
                            self.server.shared.name,
                            self.id
                        );
                        return Ok(0);
                    } else {
                        return Err(e);
                    }
                }
                other => return other,
            }
            before = self.toggles.count.load(Ordering::SeqCst);
            call = started.map(|_| Instant::now());
            result = op(&self.stream);
        }
    }

    /// The count of another thread's non-blocking instants so far, for
    /// [`Connection::toggled_since`].
    #[inline]
    pub(crate) fn toggles(&self) -> u64 {
        self.toggles.count.load(Ordering::SeqCst)
    }

    /// Whether a non-blocking instant was under way when the count read `before`, or began
    /// since: a call that failed with `EAGAIN` meanwhile may have started in one.
    pub(crate) fn toggled_since(&self, before: u64) -> bool {
        before % 2 == 1 || self.toggles() != before
    }

    /// Writes all of `buf`, riding out another thread's non-blocking instants as reads
    /// through the connection do (see [`Connection::nonblocking`]): a write that starts in
    /// one, with the send buffer full, fails at once with `EAGAIN`, and is retried. A write
    /// timeout the handler set on the socket still ends it, as does a socket the handler
    /// made non-blocking itself (no other thread's instant explains those).
    ///
    /// # Errors
    /// As `write_all`.
    pub fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        let mut spurious = 0;
        while !buf.is_empty() {
            let before = self.toggles.count.load(Ordering::SeqCst);
            let call = Instant::now();
            match (&*self.stream).write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    spurious = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if is_timeout(&e)
                        && spurious < SPURIOUS_RETRIES
                        && (before % 2 == 1
                            || self.toggles.count.load(Ordering::SeqCst) != before)
                        && (self.stream.write_timeout().ok().flatten())
                            .is_none_or(|t| call.elapsed() < t / 2) =>
                {
                    spurious += 1;
                    // Waits for the instant to end: the other thread holds the turn for it.
                    drop(
                        (self.toggles.turn.lock())
                            .unwrap_or_else(std::sync::PoisonError::into_inner),
                    );
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether a call begun at `call` failed after waiting half the socket's read timeout
    /// or more: a real timeout, as a spurious `EAGAIN` fails at once.
    fn waited_out(&self, call: Option<Instant>) -> bool {
        let timeout = self.stream.read_timeout().ok().flatten();
        matches!((call, timeout), (Some(call), Some(t)) if call.elapsed() >= t / 2)
    }
}

/// Reads of a connection: blocking, and a read that outlasts the server's idle timeout is
/// the end of the stream (`Ok(0)`) instead of an `EAGAIN` error.
impl Read for &Connection {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.retrying(|mut s| s.read(buf))
    }
}

/// A connection's socket as another thread uses it for an instant without blocking: a
/// sender that must not wait on a client that does not read, or a check for pending bytes.
/// The connection's own thread may be blocked in a read meanwhile; a read that starts
/// while the socket is non-blocking fails at once, and [`Connection`]'s reads tell that from
/// a timeout by the toggle count this handle keeps, and retry.
///
/// The instants of one thread at a time: handles on one socket take turns (two that
/// overlapped would end each other's instant early, and a peek meant not to block would
/// block).
#[derive(Debug, Clone)]
pub struct Nonblocking {
    stream: Arc<TcpStream>,
    toggles: Arc<Toggles>,
}

/// One socket's non-blocking instants: how many began and ended (odd while one lasts), and
/// the turn they take.
#[derive(Debug, Default)]
struct Toggles {
    count: AtomicU64,
    turn: std::sync::Mutex<()>,
}

/// A [`Nonblocking`] that does not keep the socket open.
#[derive(Debug, Clone)]
pub(crate) struct WeakNonblocking {
    stream: std::sync::Weak<TcpStream>,
    toggles: Arc<Toggles>,
}

impl WeakNonblocking {
    /// The handle, while the socket is open.
    pub(crate) fn upgrade(&self) -> Option<Nonblocking> {
        Some(Nonblocking {
            stream: self.stream.upgrade()?,
            toggles: Arc::clone(&self.toggles),
        })
    }
}

impl Nonblocking {
    /// A handle on a socket that no [`Connection`] reads (its own toggle count).
    pub fn new(stream: Arc<TcpStream>) -> Nonblocking {
        Nonblocking {
            stream,
            toggles: Arc::default(),
        }
    }

    /// The socket.
    pub fn stream(&self) -> &Arc<TcpStream> {
        &self.stream
    }

    /// Runs `op` with the socket non-blocking (`WouldBlock` instead of a wait), then makes
    /// it blocking again.
    ///
    /// # Errors
    /// When the socket's mode cannot be changed (it is failing), or as `op`.
    pub fn run<T>(&self, op: impl FnOnce(&TcpStream) -> io::Result<T>) -> io::Result<T> {
        let turn = self
            .toggles
            .turn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.toggles.count.fetch_add(1, Ordering::SeqCst);
        let result = self
            .stream
            .set_nonblocking(true)
            .and_then(|()| op(&self.stream));
        // A socket that cannot be switched back is failing; its reader will find out.
        let _ = self.stream.set_nonblocking(false);
        self.toggles.count.fetch_add(1, Ordering::SeqCst);
        drop(turn);
        result
    }
}

/// How often a read retries a spurious `EAGAIN` before it reports it: a peek from another
/// thread lasts three system calls, so a few retries always outlast it.
const SPURIOUS_RETRIES: u32 = 1000;

/// Whether a socket error is a read or write timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` expiring
/// report `EAGAIN`, which std calls `WouldBlock`).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// How a [`Server`] behaves: `ServerConfig { max_connections: 100, ..ServerConfig::default() }`.
///
/// Example: the [module docs](crate::server), and "Write your own server" in the [crate docs](crate).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Names the threads (`NAME-conn-ID`) and prefixes the log lines.
    pub name: String,
    /// Live connections beyond which new ones are refused (but for those the reserve
    /// takes: `reserved_connections`).
    pub max_connections: usize,
    /// How long a connection may go without receiving anything, or with a write blocked
    /// (its socket's read and write timeouts). Past it, reads through
    /// the [`Connection`] (its `Read` impl, [`Connection::reader`], the
    /// [`request`](crate::request) loop) see a clean end of stream, so the handler returns
    /// and the server closes the connection. A handler that reads the raw `stream`, or
    /// whose write blocks that long on a client that does not read, gets a `WouldBlock`
    /// error instead; returned with `?`, it is logged as an idle close, not as a failure.
    /// (A handler may set another write timeout on the socket.)
    pub idle_timeout: Option<Duration>,
    /// How long a connection may take to open: from its accept until its handler calls
    /// [`Connection::opened`] (one in the reserve: at most [`RESERVE_OPENING_TIMEOUT`]).
    /// Past it the socket is shut down both ways, which ends the handler's blocked read or
    /// write however it reads, and is logged. Read timeouts bound each read only: a peer
    /// trickling its hello a byte at a time outlasts any of them, not this. `None`: no
    /// bound (the default), but for connections in the reserve (`reserved_connections`).
    pub opening_timeout: Option<Duration>,
    /// Connections accepted past `max_connections`, up to this many more, into the
    /// reserve (default 0: none): for connections its handler can tell apart as soon as
    /// they open, such as a cluster's own authenticated peer links, so that clients
    /// holding every ordinary slot cannot keep them out (a flood of idle connections would
    /// otherwise keep a dropped replication link from being dialled again). The handler
    /// sees [`Connection::in_reserve`] and [`Connection::refuse`]s those the reserve is not
    /// for; one that has not called [`Connection::opened`] within
    /// [`RESERVE_OPENING_TIMEOUT`] (or `opening_timeout`, if shorter) is shut down, so
    /// nobody holds the reserve without proving themselves. But anyone who may connect can
    /// keep it full by connecting again each time one is shut down: `reserve_from` narrows
    /// who may.
    pub reserved_connections: usize,
    /// The addresses the reserve takes connections from (default: empty, from anywhere):
    /// past `max_connections`, a connection from any other address is refused as at the
    /// limit, before its thread starts (an IPv4 peer on an IPv6 socket is compared as IPv4).
    /// A cluster gives its members' addresses.
    pub reserve_from: Vec<IpAddr>,
    /// Stack size of each connection thread. Idle threads touch only a few pages of it, so
    /// thousands of connections fit in little memory.
    pub stack_size: usize,
    /// The framing the server's clients speak: a refused connection gets
    /// `{error,too_many_connections}` in it (unless `refusal` says otherwise).
    pub framing: Framing,
    /// Bytes written to a refused connection before it is closed, already framed; `None`
    /// for `{error,too_many_connections}` in `framing`.
    pub refusal: Option<Vec<u8>>,
    /// How long shutdown waits for connection threads to finish.
    pub shutdown_deadline: Duration,
    /// Log the server's start and stop only in verbose mode: for servers a program starts
    /// by the hundred (a remote channel's listener), where they are routine events.
    pub quiet: bool,
    /// The budget what clients make the server hold is charged to (read buffers through
    /// [`Connection::reader`], and whatever else the service charges to
    /// [`Connection::account`]); servers of one process may share one. `None`: unbounded
    /// but for per-frame limits.
    pub client_memory: Option<Budget>,
}

impl Default for ServerConfig {
    /// Named `server`, 10,000 connections, no idle or opening timeout, 128 KiB stacks, `line`
    /// framing (so a `{error,too_many_connections}` line as the refusal), 5 s shutdown
    /// deadline.
    fn default() -> Self {
        ServerConfig {
            name: "server".to_owned(),
            max_connections: 10_000,
            idle_timeout: None,
            opening_timeout: None,
            reserved_connections: 0,
            reserve_from: Vec::new(),
            stack_size: 128 << 10,
            framing: Framing::Line,
            refusal: None,
            shutdown_deadline: Duration::from_secs(5),
            quiet: false,
            client_memory: None,
        }
    }
}

impl ServerConfig {
    /// The defaults, under another name.
    pub fn named(name: &str) -> Self {
        ServerConfig {
            name: name.to_owned(),
            ..ServerConfig::default()
        }
    }

    /// The bytes a refused connection gets.
    fn refusal_bytes(&self) -> Vec<u8> {
        if let Some(refusal) = &self.refusal {
            return refusal.clone();
        }
        let mut out = Vec::new();
        encode_frame(self.framing, b"{error,too_many_connections}", &mut out)
            .expect("a short line fits every framing");
        out
    }
}

/// Counters a running server keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerStats {
    /// Connections being served now.
    pub live: usize,
    /// Connections accepted and served since start (refused ones excluded).
    pub accepted: u64,
    /// Connections refused: over `max_connections` (and the reserve,
    /// [`ServerConfig::reserved_connections`], or turned away from it by its handler), or
    /// no thread could be started.
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

struct Shared {
    name: String,
    stopping: AtomicBool,
    /// Where `shutdown` connects to wake the blocking `accept`.
    wake_addr: SocketAddr,
    accepted: AtomicU64,
    refused: AtomicU64,
    /// What a refused connection is sent: the config's refusal, encoded once.
    refusal: Vec<u8>,
    client_memory: Option<Budget>,
    /// The connection threads and their sockets. Each thread unregisters its socket as it
    /// ends and is joined by the next accept, so nothing outlives its connection; shutdown
    /// shuts every registered socket and joins by the deadline.
    group: Group,
}

/// A cloneable handle to a server: statistics and shutdown, from any thread.
///
/// Example: [`on_termination`], [`crate::pipeline`].
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

    /// The server's name ([`ServerConfig::name`]).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Whether shutdown has been requested.
    pub fn is_stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The client memory budget ([`ServerConfig::client_memory`]), for its counters.
    pub fn client_memory(&self) -> Option<&Budget> {
        self.shared.client_memory.as_ref()
    }

    /// Current counters.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            live: self.shared.group.live(),
            accepted: self.shared.accepted.load(Ordering::Relaxed),
            refused: self.shared.refused.load(Ordering::Relaxed),
        }
    }
}

/// A bound server, ready to [`run`](Server::run), [`run_until_signal`](Server::run_until_signal)
/// or [`spawn`](Server::spawn).
///
/// Example: the [module docs](crate::server), and "Write your own server" in the [crate docs](crate).
pub struct Server {
    listener: TcpListener,
    config: ServerConfig,
    handler: Arc<dyn Handler>,
    handle: ServerHandle,
    /// Shuts down ordinary connections (not the reserve's) that do not open in time
    /// ([`ServerConfig::opening_timeout`]).
    opening: Option<opening::Watch>,
    /// The same for connections in the reserve ([`ServerConfig::reserved_connections`]),
    /// with a deadline of its own (a watch keeps one timeout, so that its queue is in
    /// deadline order).
    reserve_opening: Option<opening::Watch>,
    /// When a refusal was last logged, and how many were not since: at most one line a
    /// second, for a flood at the cap would otherwise write a line per attempt, on the
    /// accepting thread.
    refusals_logged: std::cell::Cell<Option<Instant>>,
    refusals_unlogged: std::cell::Cell<u64>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port; see [`Server::local_addr`]) and serves each
    /// connection with `handler`, a closure (its argument's type is inferred).
    ///
    /// # Errors
    /// When the address cannot be resolved or bound.
    pub fn bind<F>(addr: impl ToSocketAddrs, config: ServerConfig, handler: F) -> io::Result<Server>
    where
        F: Fn(Connection) -> Result<(), HandlerError> + Send + Sync + 'static,
    {
        Server::with_handler(TcpListener::bind(addr)?, config, handler)
    }

    /// Serves an already-bound listener with a closure, as [`Server::bind`].
    ///
    /// # Errors
    /// When the listener's address cannot be read.
    pub fn from_listener<F>(
        listener: TcpListener,
        config: ServerConfig,
        handler: F,
    ) -> io::Result<Server>
    where
        F: Fn(Connection) -> Result<(), HandlerError> + Send + Sync + 'static,
    {
        Server::with_handler(listener, config, handler)
    }

    /// Serves an already-bound listener with any [`Handler`] (a closure, or a type that
    /// implements [`Handler::accepted`], such as [`crate::order::Ordered`]).
    ///
    /// # Errors
    /// When the listener's address cannot be read, or the thread that watches openings
    /// ([`ServerConfig::opening_timeout`]) cannot start.
    pub fn with_handler(
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
            refusal: config.refusal_bytes(),
            client_memory: config.client_memory.clone(),
            group: Group::with_stack_size(&config.name, config.stack_size),
        });
        let opening = match config.opening_timeout {
            Some(timeout) => Some(opening::Watch::start(&config.name, "opening", timeout)?),
            None => None,
        };
        let reserve_opening = match config.reserved_connections {
            0 => None,
            _ => {
                let timeout = config
                    .opening_timeout
                    .map_or(RESERVE_OPENING_TIMEOUT, |t| t.min(RESERVE_OPENING_TIMEOUT));
                Some(opening::Watch::start(&config.name, "reserve", timeout)?)
            }
        };
        Ok(Server {
            listener,
            config,
            handler: Arc::new(handler),
            handle: ServerHandle { shared, local },
            opening,
            reserve_opening,
            refusals_logged: std::cell::Cell::new(None),
            refusals_unlogged: std::cell::Cell::new(0),
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

    /// Runs the server on this thread until Ctrl-C or SIGTERM (see [`on_termination`]),
    /// then shuts it down as [`Server::run`] does.
    ///
    /// # Errors
    /// When the signal handler cannot be installed (one is already, in this process).
    pub fn run_until_signal(self) -> Result<ServeReport, ctrlc::Error> {
        let handle = self.handle();
        on_termination(move || handle.shutdown())?;
        Ok(self.run())
    }

    /// Accepts and serves connections until [`ServerHandle::shutdown`] is called, then
    /// closes the listener, shuts down live connections and joins their threads.
    pub fn run(self) -> ServeReport {
        self.accept_until_stopped();
        let Server {
            listener,
            config,
            handle,
            opening,
            reserve_opening,
            ..
        } = self;
        // Closing the listener first frees the port and refuses newcomers during the drain.
        drop(listener);
        let report = drain(&handle, &config);
        drop((opening, reserve_opening));
        let memory = config
            .client_memory
            .as_ref()
            .map(|b| format!("; {}", b.summary()))
            .unwrap_or_default();
        let stopped = format!(
            "{}: stopped ({} connections served, {} refused, {} threads joined, {} \
             abandoned{memory})",
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
        let live = shared.group.live();
        let max = self.config.max_connections;
        if live >= max.saturating_add(self.config.reserved_connections) {
            self.refuse(stream, peer, "connection limit reached");
            return;
        }
        let reserve = live >= max;
        let from = &self.config.reserve_from;
        if reserve
            && !from.is_empty()
            && !from
                .iter()
                .any(|a| a.to_canonical() == peer.ip().to_canonical())
        {
            self.refuse(stream, peer, "connection limit reached");
            return;
        }
        // Per-connection setup failures (the peer already gone) cost that connection only.
        // The idle timeout bounds a blocked write too: a client that neither sends nor
        // takes anything is idle whichever way its connection is stuck.
        let idle = self.config.idle_timeout;
        let setup = stream
            .set_nodelay(true)
            .and_then(|()| idle.map_or(Ok(()), |t| stream.set_read_timeout(Some(t))))
            .and_then(|()| idle.map_or(Ok(()), |t| stream.set_write_timeout(Some(t))));
        if let Err(e) = setup {
            log_debug!("{name}: dropping connection from {peer}: {e}");
            return;
        }
        let stream = Arc::new(stream);
        // Registered before the thread starts, so shutdown either finds the socket or has
        // already refused it (and shut it down).
        let Ok(registration) = shared.group.register(&stream) else {
            return;
        };
        let id = shared.accepted.fetch_add(1, Ordering::Relaxed);
        let watch = if reserve {
            &self.reserve_opening
        } else {
            &self.opening
        };
        let opened = watch.as_ref().map(|w| w.watch(id, peer, &stream));
        let account =
            self.config.client_memory.as_ref().map(|budget| {
                budget.account(&format!("connection {id} from {peer}"), Some(&stream))
            });
        let conn = Connection {
            stream,
            peer,
            id,
            server: self.handle.clone(),
            idle_timeout: self.config.idle_timeout,
            account,
            toggles: Arc::default(),
            opened,
            reserve,
        };
        self.handler.accepted(&conn);
        let handler = Arc::clone(&self.handler);
        let server = name.clone();
        let spawned = shared.group.spawn(format!("{name}-conn-{id}"), move || {
            serve(&server, handler, conn);
            drop(registration);
        });
        if let Err(e) = spawned {
            // The closure (and with it the socket and its registration) was dropped.
            shared.accepted.fetch_sub(1, Ordering::Relaxed);
            shared.refused.fetch_add(1, Ordering::Relaxed);
            log_info!("{name}: refused connection from {peer}: {e}");
        }
    }

    fn refuse(&self, mut stream: TcpStream, peer: SocketAddr, why: &str) {
        let shared = &self.handle.shared;
        let refused = shared.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let last = self.refusals_logged.get();
        if last.is_none_or(|t| now.duration_since(t) >= REFUSALS_LOGGED_EVERY) {
            let unlogged = self.refusals_unlogged.replace(0);
            let also = if unlogged > 0 {
                format!(", {unlogged} not logged since the last line")
            } else {
                String::new()
            };
            log_info!(
                "{}: refused connection from {peer}: {why} (max {}; {refused} refused so far{also})",
                self.config.name,
                self.config.max_connections
            );
            self.refusals_logged.set(Some(now));
        } else {
            self.refusals_unlogged.set(self.refusals_unlogged.get() + 1);
        }
        // A fresh socket's send buffer is empty, but never let a refusal block accepting.
        let _ = stream.set_nonblocking(true);
        let _ = stream.write_all(&shared.refusal);
        let _ = stream.shutdown(Shutdown::Both);
    }
}

/// Shuts down every live connection and joins the threads that finish by the deadline;
/// the rest are left detached (and named in the log).
fn drain(handle: &ServerHandle, config: &ServerConfig) -> ServeReport {
    let report = handle.shared.group.close(config.shutdown_deadline);
    ServeReport {
        stats: handle.stats(),
        joined: report.joined,
        abandoned: report.stragglers.len(),
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

/// Whether a handler's error is a read timeout: the idle timeout, reached by a handler that
/// reads the raw stream and returns the error with `?`.
fn is_idle_end(e: &(dyn Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(e) = e.downcast_ref::<io::Error>() {
            return is_timeout(e);
        }
        if let Some(e) = e.downcast_ref::<FrameError>() {
            return e.is_timeout();
        }
        cause = e.source();
    }
    false
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
fn serve(name: &str, handler: Arc<dyn Handler>, conn: Connection) {
    let (id, peer) = (conn.id, conn.peer);
    log_debug!("{name}: connection {id} from {peer}");
    match panic::catch_unwind(AssertUnwindSafe(|| handler.handle(conn))) {
        Ok(Ok(())) => log_debug!("{name}: connection {id} from {peer} closed"),
        Ok(Err(e)) if is_idle_end(&*e) => {
            log_debug!("{name}: connection {id} from {peer} idle; closed")
        }
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
}

/// A server running on its own thread; stops it when dropped.
///
/// Example: the [module docs](crate::server), and "Write your own server" in the [crate docs](crate).
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

/// Makes Ctrl-C and SIGTERM call `on_signal` (usually [`ServerHandle::shutdown`]; for a
/// single server [`Server::run_until_signal`] does this). Once per process.
///
/// ```
/// use switchboard::server::{on_termination, Server, ServerConfig};
///
/// let server = Server::bind("127.0.0.1:0", ServerConfig::default(), |_conn| Ok(()))?;
/// let handle = server.handle();
/// on_termination(move || handle.shutdown()).expect("the first handler of the process");
/// let running = server.spawn()?;
/// // What a Ctrl-C does:
/// let me = std::process::id().to_string();
/// std::process::Command::new("kill").args(["-INT", &me]).status()?;
/// let report = running.wait(); // returns once the signal has stopped the server
/// assert_eq!(report.abandoned, 0);
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
/// When a handler is already installed or the signal cannot be hooked.
pub fn on_termination(on_signal: impl Fn() + Send + 'static) -> Result<(), ctrlc::Error> {
    ctrlc::set_handler(on_signal)
}
