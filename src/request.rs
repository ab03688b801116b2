//! The request loop: serve a connection's frames with a function from request to reply,
//! and the read step it is made of, for handlers that run a loop of their own.
//!
//! Both end a connection the same way: normally (`Ok`) when the peer closes at a frame
//! boundary, closes mid-frame (logged: that request was not applied), stays idle past the
//! server's idle timeout, or vanishes (reset, broken pipe); with an error when a size
//! header is not a length (the stream lost sync) or the socket fails otherwise. A frame over
//! the limit is skipped and answered (the stream is still in sync): the loop replies
//! `{error,too_long}` in the connection's framing.
//!
//! ```
//! use switchboard::framing::Framing;
//! use switchboard::request::RequestLoop;
//! use switchboard::server::{Server, ServerConfig};
//! use std::io::{BufRead, BufReader, Write};
//! use std::net::TcpStream;
//! use std::time::Duration;
//!
//! // A line server that answers `ping` and ignores everything else.
//! let requests = RequestLoop::new(Framing::Line);
//! let server = Server::bind("127.0.0.1:0", ServerConfig::default(), move |conn| {
//!     requests.serve(&conn, |req| (req == b"ping").then(|| b"pong".to_vec()))
//! })?
//! .spawn()?;
//! let client = TcpStream::connect(server.local_addr())?;
//! client.set_read_timeout(Some(Duration::from_secs(10)))?;
//! (&client).write_all(b"hello\nping\n")?;
//! let mut reply = String::new();
//! BufReader::new(&client).read_line(&mut reply)?;
//! assert_eq!(reply, "pong\n");
//! server.stop();
//! # Ok::<(), std::io::Error>(())
//! ```

use crate::budget::Charge;
use crate::framing::{encode_frame, FrameError, FrameReader, Framing, Limits};
use crate::order::Arrivals;
use crate::server::{is_disconnect, is_timeout, Connection, HandlerError};
use crate::{log_debug, log_info};
use std::hint::cold_path;
use std::io::{self, Read, Write};
use std::ops::ControlFlow;

/// The reply to a frame over the limit, before framing.
pub const TOO_LONG: &[u8] = b"{error,too_long}";

/// A write buffer larger than this is given back after it is sent, so a burst of large
/// replies does not stay allocated while a connection idles.
const KEEP_OUT: usize = 256 << 10;

/// What one [`read_step`] found (example there).
#[derive(Debug)]
pub enum Step<'a> {
    /// A whole frame.
    Frame(&'a [u8]),
    /// A frame over the limit was skipped; the stream is still in sync, so answer it (or
    /// not) and read on.
    Skipped(FrameError),
    /// The connection is over, normally: closed, cut mid-frame (logged), idle past the
    /// timeout, or vanished.
    End,
}

/// Reads the next frame of `conn` from `reader` (blocking) and sorts out what the handler
/// must do: the read step of every request loop.
///
/// ```
/// use switchboard::framing::{Framing, Limits};
/// use switchboard::request::{read_step, Step};
/// use switchboard::server::{Server, ServerConfig};
/// use std::io::Write;
///
/// let server = Server::bind("127.0.0.1:0", ServerConfig::default(), |conn| {
///     let mut reader = conn.reader(Framing::Line, Limits::default());
///     loop {
///         match read_step(&mut reader, &conn)? {
///             Step::Frame(line) => (&*conn.stream).write_all(&[line, b"\n"].concat())?,
///             Step::Skipped(_) => (&*conn.stream).write_all(b"{error,too_long}\n")?,
///             Step::End => return Ok(()),
///         }
///     }
/// })?;
/// # drop(server);
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
/// A size header that is not a length, or a socket that failed otherwise than by its
/// peer going away: the connection cannot go on.
pub fn read_step<'r, R: Read>(
    reader: &'r mut FrameReader<R>,
    conn: &Connection,
) -> Result<Step<'r>, FrameError> {
    match reader.read_frame() {
        Ok(Some(frame)) => Ok(Step::Frame(frame)),
        Ok(None) => Ok(Step::End),
        Err(e) if e.is_recoverable() => Ok(Step::Skipped(e)),
        Err(e) => ended(e, conn).map(|()| Step::End),
    }
}

/// `Ok` when a read error is a normal end of the connection (logged as fits), else the
/// error.
pub(crate) fn ended(e: FrameError, conn: &Connection) -> Result<(), FrameError> {
    let name = conn.server.name();
    match e {
        FrameError::Truncated { .. } => {
            log_info!(
                "{name}: connection {} from {}: {e}; that request was not applied",
                conn.id,
                conn.peer
            );
            Ok(())
        }
        e if e.is_timeout() => {
            log_debug!("{name}: connection {} idle; closing", conn.id);
            Ok(())
        }
        FrameError::Io(e) if is_disconnect(&e) => Ok(()),
        e => Err(e),
    }
}

/// Replies on their way to one connection: framed into one buffer, written with one call
/// when the batch of requests a read delivered is done (or sooner, by [`Replies::flush`]).
///
/// Example: [`Session`].
#[derive(Debug)]
pub struct Replies<'c> {
    conn: &'c Connection,
    framing: Framing,
    out: Vec<u8>,
    /// The buffer's capacity, charged to the connection's share of the server's client
    /// memory budget: a client that asks for large replies and never reads them makes the
    /// server hold them while the write blocks.
    charge: Option<Charge>,
    /// The connection's first batch is not settled yet: the arrivals to settle it in
    /// before an early write ([`Replies::flush_early`]).
    held: Option<Arrivals>,
}

impl<'c> Replies<'c> {
    pub(crate) fn new(conn: &'c Connection, framing: Framing) -> Self {
        Replies {
            conn,
            framing,
            out: Vec::new(),
            charge: conn.account().and_then(|a| a.charge(0).ok()),
            held: None,
        }
    }

    /// Marks the connection's first batch as not settled yet in `arrivals` (`None`: it
    /// is, or there is no arrival order), for [`Replies::flush_early`].
    pub(crate) fn hold(&mut self, arrivals: Option<&Arrivals>) {
        self.held = arrivals.cloned();
    }

    /// Whether the connection's first batch has not settled yet (nor been settled by
    /// [`Replies::flush_early`]).
    pub(crate) fn is_held(&self) -> bool {
        self.held.is_some()
    }

    /// Writes what is waiting before the batch is done: a large batch's replies as they
    /// build up, so that they never pile up in memory. A connection whose first batch is
    /// not settled yet settles first: every younger connection waits for it until then,
    /// and a write blocked on a client that does not read would hold them all back, for
    /// the longest wait of arrival order each. The requests left in such a batch are then
    /// applied after younger connections' first ones: arrival order holds for a first read
    /// whose replies stay under the session's early-write threshold (the store's is 64
    /// KiB), as a one-shot client's do.
    ///
    /// # Errors
    /// As [`flush`](Self::flush).
    pub fn flush_early(&mut self) -> io::Result<bool> {
        if let Some(arrivals) = self.held.take() {
            cold_path();
            arrivals.settle(self.conn);
        }
        self.flush()
    }

    /// Brings the charge to the buffer's capacity. The buffer grows as replies are added,
    /// so this runs after each request (a comparison, unless it grew) and before a write.
    ///
    /// # Errors
    /// [`OverBudget`](crate::budget::OverBudget), as an `OutOfMemory` I/O error: the
    /// budget is reached and this connection holds the most (the connection must end).
    #[inline(always)]
    pub(crate) fn charge_capacity(&mut self) -> io::Result<()> {
        match &self.charge {
            Some(charge) if charge.bytes() != self.out.capacity() => self.recharge(),
            _ => Ok(()),
        }
    }

    /// [`charge_capacity`](Self::charge_capacity) when the buffer's capacity changed.
    #[cold]
    #[inline(never)]
    fn recharge(&mut self) -> io::Result<()> {
        self.charge_to(self.out.capacity())
    }

    /// Brings the charge to `bytes`; over the budget, the buffer is given back at once.
    fn charge_to(&mut self, bytes: usize) -> io::Result<()> {
        let Some(charge) = &mut self.charge else {
            return Ok(());
        };
        charge.resize(bytes).map_err(|e| {
            // Given back now rather than when the connection's thread ends.
            self.out = Vec::new();
            let _ = charge.resize(0);
            io::Error::from(e)
        })
    }

    /// Makes room for `additional` more bytes, charging the grown buffer to the
    /// connection's share of the client memory budget *before* it is allocated (as the
    /// buffer grows by itself, it is charged after each request): for a reply of known
    /// size that may be large, so that many connections cannot each allocate one before
    /// any is charged. The buffer at least doubles, as a `Vec` grows.
    ///
    /// # Errors
    /// As [`flush`](Self::flush): `OutOfMemory` when the budget is reached and this
    /// connection holds the most (the connection must end; nothing is allocated).
    pub fn reserve(&mut self, additional: usize) -> io::Result<()> {
        let (len, capacity) = (self.out.len(), self.out.capacity());
        if capacity - len >= additional {
            return Ok(());
        }
        cold_path();
        let want = len
            .saturating_add(additional)
            .max(capacity.saturating_mul(2));
        self.charge_to(want)?;
        self.out.reserve_exact(want - len);
        self.charge_capacity()
    }

    /// Adds one reply, framed.
    ///
    /// # Errors
    /// As [`encode_frame`]: the payload does not fit the framing (nothing is added).
    pub fn frame(&mut self, payload: &[u8]) -> Result<(), FrameError> {
        encode_frame(self.framing, payload, &mut self.out)
    }

    /// The buffer itself, for replies formatted in place (with
    /// [`begin_frame`](crate::framing::begin_frame) and
    /// [`end_frame`](crate::framing::end_frame), or already framed).
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// The framing replies are written in.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    /// Whether nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Writes what is waiting now; `Ok(false)` when the peer has gone away.
    ///
    /// # Errors
    /// When the write fails otherwise (its write timeout, say), or the replies waiting
    /// would pass the server's client memory budget while this connection holds the most
    /// (`OutOfMemory`; the connection must end).
    pub fn flush(&mut self) -> io::Result<bool> {
        if self.out.is_empty() {
            return Ok(true);
        }
        // Charged for as long as the write may block on a peer that does not read.
        self.charge_capacity()?;
        let mut stream = &*self.conn.stream;
        let toggles = self.conn.toggles();
        // One write nearly always takes it all; the rest, or a retry, as the connection
        // writes: a parked connection's socket may be made non-blocking for an instant by
        // a newcomer's peek ([`Connection::write_all`]).
        let result = match stream.write(&self.out) {
            Ok(n) if n == self.out.len() => Ok(()),
            Ok(n) => {
                cold_path();
                self.conn.write_all(&self.out[n..])
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                cold_path();
                self.conn.write_all(&self.out)
            }
            // Another thread's non-blocking instant (a newcomer's peek) explains it: retried.
            // Otherwise it is the socket's write timeout (the idle timeout, say).
            Err(e) if is_timeout(&e) && self.conn.toggled_since(toggles) => {
                cold_path();
                self.conn.write_all(&self.out)
            }
            Err(e) => {
                cold_path();
                Err(e)
            }
        };
        self.out.clear();
        if self.out.capacity() > KEEP_OUT {
            cold_path();
            self.out = Vec::new();
            self.charge_capacity()?;
        }
        match result {
            Ok(()) => Ok(true),
            Err(e) if is_disconnect(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// One connection's side of a [`RequestLoop`]: its state, and what it does with each
/// request. `ControlFlow::Break(())` ends the connection normally, once the replies already
/// in [`Replies`] are written; the requests after it are not handled.
///
/// ```
/// use switchboard::framing::Framing;
/// use switchboard::request::{Replies, RequestLoop, Session};
/// use switchboard::server::{Connection, HandlerError, Server, ServerConfig};
/// use std::io::{BufRead, BufReader, Write};
/// use std::ops::ControlFlow;
///
/// /// Numbers each connection's requests; `quit` ends the connection.
/// struct Numbered(u64);
///
/// impl Session for Numbered {
///     fn request(&mut self, conn: &Connection, req: &[u8], out: &mut Replies<'_>)
///         -> Result<ControlFlow<()>, HandlerError> {
///         if req == b"quit" {
///             return Ok(ControlFlow::Break(()));
///         }
///         self.0 += 1;
///         out.frame(format!("{} #{}", conn.id, self.0).as_bytes())?;
///         Ok(ControlFlow::Continue(()))
///     }
/// }
///
/// let requests = RequestLoop::new(Framing::Line);
/// let server = Server::bind("127.0.0.1:0", ServerConfig::default(), move |conn| {
///     requests.serve_session(&conn, &mut Numbered(0))
/// })?
/// .spawn()?;
/// let client = std::net::TcpStream::connect(server.local_addr())?;
/// client.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
/// (&client).write_all(b"a\nb\nquit\nnever answered\n")?;
/// let lines: Vec<String> = BufReader::new(&client).lines().collect::<Result<_, _>>()?;
/// assert_eq!(lines, ["0 #1", "0 #2"]);
/// server.stop();
/// # Ok::<(), std::io::Error>(())
/// ```
pub trait Session {
    /// Acts on one request; replies go into `out`.
    ///
    /// # Errors
    /// Whatever must end the connection.
    fn request(
        &mut self,
        conn: &Connection,
        frame: &[u8],
        out: &mut Replies<'_>,
    ) -> Result<ControlFlow<()>, HandlerError>;

    /// A frame over the limit was skipped; by default the reply is `{error,too_long}`.
    ///
    /// # Errors
    /// Whatever must end the connection.
    fn too_long(
        &mut self,
        conn: &Connection,
        error: &FrameError,
        out: &mut Replies<'_>,
    ) -> Result<ControlFlow<()>, HandlerError> {
        let _ = (conn, error);
        out.frame(TOO_LONG)?;
        Ok(ControlFlow::Continue(()))
    }

    /// Every request of the read has been handled, and the replies are about to be
    /// written: the place to commit what they promise (a log's fsync, counters).
    ///
    /// # Errors
    /// Whatever must end the connection.
    fn batch_done(
        &mut self,
        conn: &Connection,
        out: &mut Replies<'_>,
    ) -> Result<ControlFlow<()>, HandlerError> {
        let _ = (conn, out);
        Ok(ControlFlow::Continue(()))
    }
}

/// Serves a connection's requests: reads whatever the socket has, handles every complete
/// frame in it, writes the replies with one call, and blocks again (a pipelined batch costs
/// one read and one write). Cheap to clone: one per server, shared by its handlers.
///
/// Example: the [module docs](crate::request).
#[derive(Debug, Clone)]
pub struct RequestLoop {
    framing: Framing,
    limits: Limits,
    arrivals: Option<Arrivals>,
}

impl RequestLoop {
    /// A loop over `framing` frames, with the default [`Limits`].
    pub fn new(framing: Framing) -> Self {
        RequestLoop {
            framing,
            limits: Limits::default(),
            arrivals: None,
        }
    }

    /// With frame limits `limits`.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Keeping arrival order across connections (see [`crate::order`]): a connection's
    /// first batch waits for earlier connections with requests pending, and settles when
    /// done. The server's handler must come from [`Arrivals::handler`].
    pub fn in_order(mut self, arrivals: &Arrivals) -> Self {
        self.arrivals = Some(arrivals.clone());
        self
    }

    /// The framing of requests and replies.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Serves `conn` with a function from request to reply (`None`: no reply).
    ///
    /// # Errors
    /// As [`read_step`], a failed write, or a reply the framing cannot carry.
    pub fn serve<F>(&self, conn: &Connection, f: F) -> Result<(), HandlerError>
    where
        F: FnMut(&[u8]) -> Option<Vec<u8>>,
    {
        self.serve_session(conn, &mut FnSession(f))
    }

    /// Serves `conn` with a [`Session`]: per-connection state that sees the connection and
    /// writes its replies itself.
    ///
    /// # Errors
    /// As [`read_step`], a failed write, or whatever the session returns.
    pub fn serve_session<S: Session>(
        &self,
        conn: &Connection,
        session: &mut S,
    ) -> Result<(), HandlerError> {
        let mut reader = conn.reader(self.framing, self.limits);
        let mut out = Replies::new(conn, self.framing);
        let mut first = self.arrivals.as_ref();
        out.hold(first);
        loop {
            if let Some(arrivals) = first {
                // Only until the connection's first batch is done.
                cold_path();
                // Nothing came (closed, idle, vanished): a read would only wait again. Part
                // of a first request may be buffered: it was cut off, as at any end.
                if !arrivals.await_first_bytes(conn) {
                    if let Err(e) = reader.finish() {
                        ended(e, conn)?;
                    }
                    return Ok(());
                }
            }
            match reader.fill() {
                Ok(true) => {}
                Ok(false) => {
                    cold_path();
                    if let Err(e) = reader.finish() {
                        ended(e, conn)?;
                    }
                    return Ok(());
                }
                Err(e) => {
                    cold_path();
                    return Ok(ended(e, conn)?);
                }
            }
            if let Some(arrivals) = first {
                cold_path();
                arrivals.wait_for_earlier(conn);
            }
            let fatal = loop {
                let flow = match reader.next_buffered() {
                    Ok(Some(frame)) => {
                        let flow = session.request(conn, frame, &mut out)?;
                        out.charge_capacity()?;
                        flow
                    }
                    Ok(None) => break None,
                    Err(e) if e.is_recoverable() => {
                        cold_path();
                        session.too_long(conn, &e, &mut out)?
                    }
                    Err(e) => {
                        cold_path();
                        break Some(e);
                    }
                };
                if flow.is_break() {
                    cold_path();
                    // The replies to the requests before it still go; the connection is
                    // ending anyway, so a failed write changes nothing.
                    let _ = out.flush();
                    return Ok(());
                }
            };
            let flow = session.batch_done(conn, &mut out)?;
            if let Some(arrivals) = first {
                cold_path();
                // Applied: younger connections need not wait for the replies to be written
                // (a client that never reads would hold them back for as long as its
                // write blocks). Part of a request still to come (it was longer than one
                // read) must be applied before a younger connection's requests, as the
                // rest of it is. (An early write settled it already.)
                if !out.is_held()
                    || fatal.is_some()
                    || reader.buffered_len() == 0
                    || !arrivals.release(conn)
                {
                    arrivals.settle(conn);
                    first = None;
                    out.hold(None);
                }
            }
            if !out.flush()? || flow.is_break() {
                return Ok(());
            }
            if let Some(e) = fatal {
                cold_path();
                return Err(e.into());
            }
        }
    }
}

/// A plain request → reply function as a [`Session`].
struct FnSession<F>(F);

impl<F: FnMut(&[u8]) -> Option<Vec<u8>>> Session for FnSession<F> {
    fn request(
        &mut self,
        _conn: &Connection,
        frame: &[u8],
        out: &mut Replies<'_>,
    ) -> Result<ControlFlow<()>, HandlerError> {
        if let Some(reply) = (self.0)(frame) {
            out.frame(&reply)?;
        }
        Ok(ControlFlow::Continue(()))
    }
}
