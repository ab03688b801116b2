//! Server-to-server links: [`dial`] and [`accept`] run the one handshake every link
//! starts with, then a [`Link`] carries frames: an [`Outbox`] and its writer out, a reader
//! loop ([`Link::read_frames`]) in. Services keep their own messages and state machines;
//! the steps of opening and running a link are here, once.
//!
//! ```text
//!  dialer                                   acceptor (a Server handler)
//!  connect (Timeouts::connect per address)
//!  ── hello ─────────────────────────────▶  reads the first frame, decides: a Verdict
//!  ◀──────────────────── welcome | refusal  (a refusal ends the connection)
//!  read timeout := Timeouts::idle           read timeout := Timeouts::idle
//!  writer drains the Outbox ◀──────────────▶ reader loop: frames until the end
//! ```
//!
//! # Seams for what comes next
//!
//! - **Authentication** (a cluster secret: each side sends a nonce and answers the other's
//!   with a keyed MAC; the primitives are [`crate::auth`]) runs between the hello and the
//!   welcome when the service configures an [`Auth`]: the dialer's nonce goes right after
//!   the hello, the acceptor answers with its nonce and tag, the dialer checks it and
//!   sends its own tag, and only then does the acceptor's service decide and welcome:
//!
//!   ```text
//!   dialer  ── hello, auth1 nonce_d ──────────────────▶ acceptor reads the hello (parse only)
//!           ◀────────────── auth2 nonce_a tag_a id_a ── link::authenticate
//!           ── auth3 tag_d ───────────────────────────▶ checked against the hello's identity
//!           ◀───────────────────── welcome | refusal ── the service decides (state touched)
//!   ```
//!
//!   The acceptor's step is a separate call, [`authenticate`], because the service's
//!   verdict (registering a peer) must come after it: a link that fails it never reaches
//!   the service's state. The dialer's is inside [`Dialer::dial_with_auth`].
//! - **Dead-peer detection** ([`Liveness`]): a link's writer sends a heartbeat when idle
//!   ([`Liveness::outbox`], every third of the bound) and its reader gives up after the
//!   bound without a frame ([`Liveness::timeouts`]; [`End::Lost`] with a timeout), so a
//!   silent peer is declared dead within the bound ([`DEAD_PEER`], 3 s, by default) on both
//!   ends. A service that wants it on both directions of a link runs a heartbeat writer on
//!   the accepted end too ([`Link::outbox`] works on either end).
//! - **Memory** ([`Link::charged_outbox`]): a link's queue is charged to the server's
//!   client memory budget ([`crate::budget`]) on an account of its own; a link the budget
//!   cannot cover is closed at once, logged, and its reader ends, so the service redials
//!   it as any lost link. Chat federation links and chat-peer links use it.
//! - **Redial** ([`redial`]): [`dial`] is one attempt; the supervisor loop dials while the
//!   peer is configured or known, serves each link until it ends, and waits
//!   [`Backoff::next_delay`] between tries (jittered, at most [`MAX_RETRY`] apart),
//!   resetting the backoff once a link is up.
//!
//! ```
//! use switchboard::framing::{encode_frame, FrameReader, Framing, Limits};
//! use switchboard::link::{self, Answer, Timeouts, Verdict};
//! use std::net::TcpListener;
//! use std::sync::Arc;
//! use std::thread;
//! use std::time::Duration;
//!
//! let timeouts = Timeouts::uniform(Duration::from_secs(5));
//! let listener = TcpListener::bind("127.0.0.1:0")?;
//! let addr = listener.local_addr()?;
//! let acceptor = thread::spawn(move || {
//!     let (stream, _) = listener.accept().unwrap();
//!     let stream = Arc::new(stream);
//!     let mut reader = FrameReader::new(&*stream, Framing::Line);
//!     let hello = reader.read_frame().unwrap().unwrap().to_vec();
//!     let verdict = if hello == b"hello alice" {
//!         Verdict::Welcome(b"welcome\n".to_vec())
//!     } else {
//!         Verdict::Refuse(b"refused stranger\n".to_vec())
//!     };
//!     let mut link = link::accept(&stream, reader, &timeouts, verdict).unwrap().unwrap();
//!     let mut got = Vec::new();
//!     link.read_frames("demo", |frame| {
//!         got.push(String::from_utf8_lossy(frame).into_owned());
//!         std::ops::ControlFlow::<()>::Continue(())
//!     });
//!     got
//! });
//!
//! let parse = |frame: &[u8]| -> Result<Answer<()>, std::io::Error> {
//!     Ok(match frame {
//!         b"welcome" => Answer::Welcome(()),
//!         other => Answer::Refused(String::from_utf8_lossy(other).into_owned()),
//!     })
//! };
//! let limits = Limits::default();
//! let (link, ()) = link::dial(addr, Framing::Line, limits, b"hello alice\n", &timeouts, parse)?;
//! let (outbox, writer) = link.outbox(switchboard::outbox::OutboxConfig::new("demo", 8));
//! let writer = thread::spawn(move || writer.run());
//! outbox.send(Arc::from(&b"one\n"[..]))?;
//! drop(outbox); // flushed, then half-closed: the acceptor's loop sees a clean end
//! writer.join().unwrap();
//! assert_eq!(acceptor.join().unwrap(), ["one"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::auth::{self, Nonce, Secret, Side};
use crate::budget::Budget;
use crate::framing::{encode_frame, FrameError, FrameReader, Framing, Limits};
use crate::group::{Group, GroupError, Registration};
use crate::log::{Preview, PREVIEW};
use crate::log_info;
use crate::outbox::{Outbox, OutboxConfig, Writer};
use std::error::Error;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

/// How long each step of a link may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting, per address tried.
    pub connect: Duration,
    /// Waiting for the answer to a hello.
    pub handshake: Duration,
    /// Any one write, handshake included: a peer that stops reading fails its link.
    pub write: Duration,
    /// Reading once the link is up: `None` waits forever (a link may be quiet), `Some`
    /// declares a peer dead after that long without a frame (pair it with a heartbeat).
    pub idle: Option<Duration>,
}

impl Timeouts {
    /// Every step bounded by `d`, idle included.
    pub fn uniform(d: Duration) -> Timeouts {
        Timeouts {
            connect: d,
            handshake: d,
            write: d,
            idle: Some(d),
        }
    }
}

/// The dialer's reading of the acceptor's first frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<P> {
    /// Accepted, by the peer `P` (who answered).
    Welcome(P),
    /// Refused, for this reason.
    Refused(String),
}

/// The acceptor's decision on a hello: the frame to answer with, framing included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Take the link; this frame is the welcome.
    Welcome(Vec<u8>),
    /// Refuse it; this frame (possibly empty) is written, and the link ends.
    Refuse(Vec<u8>),
}

/// Why a link could not be opened.
#[derive(Debug)]
pub enum LinkError {
    /// The address resolved to nothing.
    Resolve(String),
    /// The address is the dialler's own.
    Myself,
    /// Connecting, writing or reading failed (refused, timed out, reset).
    Io(io::Error),
    /// The answer was not a frame of the link's framing (or was over its limit).
    Frame(FrameError),
    /// The answer was a frame, but not one the protocol knows.
    Protocol(Box<dyn Error + Send + Sync>),
    /// The peer closed the connection without answering.
    Closed,
    /// The peer refused the link (or the dialler could not take it), for this reason.
    Refused(String),
    /// The cluster-secret handshake failed: the far end does not know the secret, did
    /// not run the handshake, or answered for another identity or cluster.
    Unauthenticated(&'static str),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Resolve(addr) => write!(f, "{addr} resolves to no address"),
            LinkError::Myself => f.write_str("that is this server's own address"),
            LinkError::Io(e) => write!(f, "{e}"),
            LinkError::Frame(e) => write!(f, "bad answer: {e}"),
            LinkError::Protocol(e) => write!(f, "bad answer: {e}"),
            LinkError::Closed => f.write_str("closed without answering"),
            // The reason is the far end's, and may be anything up to a frame's limit.
            LinkError::Refused(reason) => write!(f, "refused: {}", Preview(reason, PREVIEW)),
            LinkError::Unauthenticated(why) => write!(f, "not authenticated: {why}"),
        }
    }
}

impl Error for LinkError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            LinkError::Io(e) => Some(e),
            LinkError::Frame(e) => Some(e),
            LinkError::Protocol(e) => Some(&**e),
            _ => None,
        }
    }
}

impl From<io::Error> for LinkError {
    fn from(e: io::Error) -> Self {
        LinkError::Io(e)
    }
}

impl From<FrameError> for LinkError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(e) => LinkError::Io(e),
            e => LinkError::Frame(e),
        }
    }
}

/// What this end proves on a link, and in which cluster: [`crate::auth`]'s exchange, run
/// by [`Dialer::dial_with_auth`] and [`authenticate`] when a service configures one.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The cluster secret.
    pub secret: Secret,
    /// The cluster's name (a service label, a room), bound into every tag: a proof made
    /// for one cluster or service is worthless in another sharing the secret.
    pub cluster: Vec<u8>,
    /// This end's identity as its service names it in its hello or welcome (an address,
    /// a member term): the far end checks the tag against the identity it is told.
    pub identity: Vec<u8>,
}

/// A socket shared by a link's reader and writer, readable through the `Arc`: the reader
/// of a dialled link owns one, so a [`Link`] can move to the thread that serves it.
#[derive(Debug, Clone)]
pub struct SharedStream(pub Arc<TcpStream>);

impl Read for SharedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}

/// An open link (example: [the module docs](crate::link)), its handshake done: the socket and
/// the reader holding whatever was read past the handshake.
pub struct Link<R = SharedStream> {
    stream: Arc<TcpStream>,
    reader: FrameReader<R>,
    /// Keeps the socket in a group's shutdown list for as long as the link is served.
    registration: Option<Registration>,
    /// The far end's identity, proven by the handshake (dialled links with an [`Auth`]).
    peer_identity: Option<Vec<u8>>,
}

/// How a link's reader loop ended.
#[derive(Debug)]
pub enum End<B> {
    /// The peer closed the link at a frame boundary.
    Closed,
    /// The frame handler asked to stop, with this reason.
    Stopped(B),
    /// The link broke: reset, shut down, cut mid-frame, out of sync, or silent past
    /// [`Timeouts::idle`] (see [`FrameError::is_timeout`]).
    Lost(FrameError),
}

impl<R: Read> Link<R> {
    /// The identity the far end proved with the cluster secret, on a link dialled with an
    /// [`Auth`]: the service checks that its welcome names the same one.
    pub fn peer_identity(&self) -> Option<&[u8]> {
        self.peer_identity.as_deref()
    }

    /// The link's socket (to register with a [`Group`], or to shut down).
    pub fn stream(&self) -> &Arc<TcpStream> {
        &self.stream
    }

    /// Registers the link's socket with `group` (if not already with one), until the link
    /// is dropped: a shutdown of the group then ends the link's reads and writes.
    ///
    /// # Errors
    /// [`GroupError::Closing`] when the group is shutting down (the socket is shut down).
    pub fn register(&mut self, group: &Group) -> Result<(), GroupError> {
        if self.registration.is_none() {
            self.registration = Some(group.register(&self.stream)?);
        }
        Ok(())
    }

    /// An outbox writing to this link, and its writer (run it on a thread of the caller's).
    pub fn outbox(&self, config: OutboxConfig) -> (Outbox, Writer) {
        Outbox::new(Arc::clone(&self.stream), config)
    }

    /// [`Link::outbox`] whose queued bytes are charged to `budget` (none: not charged),
    /// on an account of the link's own named after the outbox, as is the link's read
    /// buffer from now on (a peer that sends a large frame, or one that never ends, makes
    /// the reader hold it): while a cut network holds the link's bytes its queue grows,
    /// and costs at most the budget. A link the budget cannot cover is dead at once: its
    /// charge refused (the outbox closes the link and logs `over the client memory
    /// budget`), or closed by the budget as the largest holder when another connection or
    /// link needs room (the budget logs which). Either way the socket is shut down both
    /// ways, so the link's reader ends and the service redials it as any lost link; what
    /// the queue held is dropped with the link.
    ///
    /// ```
    /// use switchboard::budget::Budget;
    /// use switchboard::framing::{Framing, Limits};
    /// use switchboard::link::{self, Answer, Timeouts, Verdict};
    /// use switchboard::outbox::{OutboxConfig, SendError};
    /// use std::net::TcpListener;
    /// use std::sync::Arc;
    ///
    /// let listener = TcpListener::bind("127.0.0.1:0")?;
    /// let addr = listener.local_addr()?;
    /// let timeouts = Timeouts::uniform(std::time::Duration::from_secs(5));
    /// let acceptor = std::thread::spawn(move || {
    ///     let (stream, _) = listener.accept().unwrap();
    ///     let (stream, mut buf) = (Arc::new(stream), [0u8; 6]);
    ///     std::io::Read::read_exact(&mut &*stream, &mut buf).unwrap();
    ///     let welcome = Verdict::Welcome(b"welcome\n".to_vec());
    ///     let reader = switchboard::framing::FrameReader::new(&*stream, Framing::Line);
    ///     let _link = link::accept(&stream, reader, &timeouts, welcome).unwrap();
    ///     std::thread::sleep(std::time::Duration::from_millis(500)); // reads nothing
    /// });
    /// let welcome = |_: &[u8]| Ok::<_, std::io::Error>(Answer::Welcome(()));
    /// let (mut link, ()) = link::dial(addr, Framing::Line, Limits::default(), b"hello\n", &timeouts, welcome)?;
    /// let budget = Budget::new("demo", 64 << 10);
    /// // No writer runs: what is sent stays queued, as behind a cut network.
    /// let (outbox, _writer) = link.charged_outbox(OutboxConfig::new("demo: link", 1000), Some(&budget));
    /// // The link's read buffer is charged from now on (a few KiB after the handshake).
    /// assert!(budget.held() > 0);
    /// let line: switchboard::outbox::Bytes = Arc::from(vec![b'x'; 16 << 10]);
    /// outbox.send(Arc::clone(&line))?;
    /// outbox.send(Arc::clone(&line))?;
    /// outbox.send(Arc::clone(&line))?;
    /// // 64 KiB and the read buffer would pass the budget: the link is closed, logged, and
    /// // its bytes come back.
    /// assert_eq!(outbox.send(line), Err(SendError::Overflow));
    /// assert_eq!(budget.refusals(), 1);
    /// # drop((outbox, _writer, link));
    /// # assert_eq!(budget.held(), 0);
    /// # acceptor.join().unwrap();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn charged_outbox(
        &mut self,
        config: OutboxConfig,
        budget: Option<&Budget>,
    ) -> (Outbox, Writer) {
        let account = budget.map(|b| b.account(&config.name, Some(&self.stream)));
        if account.is_some() {
            self.reader.charge_to(account.as_ref());
        }
        self.outbox(config.account(account.as_ref()))
    }

    /// Hands each frame to `on_frame` until the link ends or `on_frame` breaks. A frame
    /// over the reader's limit is skipped and logged under `name`: the stream stays in
    /// sync, and one oversized frame does not cost a link.
    pub fn read_frames<B>(
        &mut self,
        name: &str,
        mut on_frame: impl FnMut(&[u8]) -> ControlFlow<B>,
    ) -> End<B> {
        loop {
            match self.reader.read_frame() {
                Ok(Some(frame)) => {
                    if let ControlFlow::Break(why) = on_frame(frame) {
                        return End::Stopped(why);
                    }
                }
                Ok(None) => return End::Closed,
                Err(e) if e.is_recoverable() => log_info!("{name}: {e}; skipped"),
                Err(e) => return End::Lost(e),
            }
        }
    }
}

/// Connects to the first of `addrs` that answers, each within `timeout`, in the resolver's
/// order (`localhost` often resolves to ::1 first, while servers listen on 127.0.0.1).
///
/// # Errors
/// The last connect error, or `NotFound` when `addrs` resolves to nothing.
pub fn connect(addrs: impl ToSocketAddrs, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing");
    for addr in addrs.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Opens links of one kind: their framing, limits and timeouts, and optionally the
/// [`Group`] whose shutdown must close them, from the connect on. Issue 22's redial (a
/// loop over [`Dialer::dial`] with jittered backoff) is meant to live here.
///
/// ```
/// use switchboard::framing::Framing;
/// use switchboard::group::Group;
/// use switchboard::link::{Answer, Dialer, LinkError, Timeouts};
/// use std::net::TcpListener;
/// use std::time::Duration;
///
/// let group = Group::new("links");
/// let dialer = Dialer {
///     group: Some(group.clone()),
///     ..Dialer::new(Framing::Line, Timeouts::uniform(Duration::from_secs(1)))
/// };
/// // Nobody listens here any more: the dial fails, typed.
/// let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
/// let answer = |_: &[u8]| Ok::<_, std::io::Error>(Answer::Welcome(()));
/// assert!(matches!(dialer.dial(addr, b"hello\n", answer), Err(LinkError::Io(_))));
/// group.close(Duration::from_secs(1));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Dialer {
    /// The framing of every frame on the link, the handshake's included.
    pub framing: Framing,
    /// The limits the link's reader enforces.
    pub limits: Limits,
    /// How long each step may take.
    pub timeouts: Timeouts,
    /// Sockets are registered here as soon as they connect.
    pub group: Option<Group>,
}

impl Dialer {
    /// A dialer of `framing` with default limits and no group.
    pub fn new(framing: Framing, timeouts: Timeouts) -> Dialer {
        Dialer {
            framing,
            limits: Limits::default(),
            timeouts,
            group: None,
        }
    }

    /// Opens a link: connects to `addr`, sends `hello` (an encoded frame), reads one frame
    /// and lets `answer` read it. On a welcome the link is returned with the idle read
    /// timeout set, together with who answered.
    ///
    /// # Errors
    /// [`LinkError::Refused`] when the peer refused; otherwise why no answer could be had
    /// (connect, write or read failure, a close, a frame `answer` does not accept, the
    /// group shutting down).
    pub fn dial<P, E>(
        &self,
        addr: impl ToSocketAddrs,
        hello: &[u8],
        answer: impl FnOnce(&[u8]) -> Result<Answer<P>, E>,
    ) -> Result<(Link, P), LinkError>
    where
        E: Into<Box<dyn Error + Send + Sync>>,
    {
        self.dial_with_auth(None, addr, hello, answer)
    }

    /// [`Dialer::dial`], and with `auth` [`crate::auth`]'s exchange around the hello
    /// (without it the wire is the service's hello and answer alone): the far end's
    /// identity is then proven, and returned by [`Link::peer_identity`]. (The secret is an
    /// argument rather than a field so that services building a `Dialer` field by field
    /// keep compiling.)
    ///
    /// # Errors
    /// As [`Dialer::dial`], and [`LinkError::Unauthenticated`] when the handshake fails.
    pub fn dial_with_auth<P, E>(
        &self,
        auth: Option<&Auth>,
        addr: impl ToSocketAddrs,
        hello: &[u8],
        answer: impl FnOnce(&[u8]) -> Result<Answer<P>, E>,
    ) -> Result<(Link, P), LinkError>
    where
        E: Into<Box<dyn Error + Send + Sync>>,
    {
        let timeouts = &self.timeouts;
        let stream = Arc::new(connect(addr, timeouts.connect)?);
        // Registered before the handshake, so a shutdown meanwhile cuts it short.
        let registration = match &self.group {
            Some(group) => Some(group.register(&stream).map_err(io::Error::other)?),
            None => None,
        };
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeouts.handshake))?;
        stream.set_write_timeout(Some(timeouts.write))?;
        let shared = SharedStream(Arc::clone(&stream));
        let mut reader = FrameReader::with_limits(shared, self.framing, self.limits);
        let (peer, peer_identity) = greet_as_dialer(&stream, &mut reader, auth, hello, answer)
            .inspect_err(|e| {
                if let LinkError::Unauthenticated(why) = e {
                    log_info!(
                        "link: dialled {}: not authenticated: {why}",
                        peer_name(&stream)
                    );
                }
            })?;
        stream.set_read_timeout(timeouts.idle)?;
        let link = Link {
            stream,
            reader,
            registration,
            peer_identity,
        };
        Ok((link, peer))
    }
}

/// [`Dialer::dial`] without a group: one link, opened with these settings (example: [the
/// module docs](crate::link)).
///
/// # Errors
/// As [`Dialer::dial`].
pub fn dial<P, E>(
    addr: impl ToSocketAddrs,
    framing: Framing,
    limits: Limits,
    hello: &[u8],
    timeouts: &Timeouts,
    answer: impl FnOnce(&[u8]) -> Result<Answer<P>, E>,
) -> Result<(Link, P), LinkError>
where
    E: Into<Box<dyn Error + Send + Sync>>,
{
    let dialer = Dialer {
        limits,
        ..Dialer::new(framing, *timeouts)
    };
    dialer.dial(addr, hello, answer)
}

/// The dialer's half of the handshake: hello out, answer in. With `auth`, the dialer's
/// nonce goes out with the hello, the acceptor's tag is checked, and the dialer's own tag
/// is written, all before the service's answer is read; returns who answered and the
/// identity it proved.
fn greet_as_dialer<P, E>(
    stream: &TcpStream,
    reader: &mut FrameReader<SharedStream>,
    auth: Option<&Auth>,
    hello: &[u8],
    answer: impl FnOnce(&[u8]) -> Result<Answer<P>, E>,
) -> Result<(P, Option<Vec<u8>>), LinkError>
where
    E: Into<Box<dyn Error + Send + Sync>>,
{
    let mut out = stream;
    let framing = reader.framing();
    let Some(auth) = auth else {
        out.write_all(hello)?;
        return read_answer(reader, answer).map(|p| (p, None));
    };
    let mine = Nonce::fresh()?;
    let mut first = hello.to_vec();
    encode_frame(
        framing,
        &auth::Message::Challenge(mine).format(),
        &mut first,
    )?;
    out.write_all(&first)?;
    let frame = reader.read_frame()?.ok_or(LinkError::Closed)?;
    let Some(auth::Message::Answer(theirs, tag, identity)) = auth::Message::parse(frame) else {
        return Err(LinkError::Unauthenticated(
            "the peer answered without the handshake (no --secret-file there?)",
        ));
    };
    let a = &auth.secret;
    if !a.verify(
        Side::Acceptor,
        &theirs,
        &mine,
        &identity,
        &auth.cluster,
        &tag,
    ) {
        return Err(LinkError::Unauthenticated(
            "the peer's proof is wrong (another secret or cluster?)",
        ));
    }
    let tag = a.tag(Side::Dialer, &mine, &theirs, &auth.identity, &auth.cluster);
    let mut proof = Vec::new();
    encode_frame(framing, &auth::Message::Proof(tag).format(), &mut proof)?;
    out.write_all(&proof)?;
    // An acceptor that finds our proof wrong closes without answering.
    let peer = read_answer(reader, answer).map_err(|e| match e {
        LinkError::Closed => LinkError::Unauthenticated("the peer closed after our proof"),
        e => e,
    })?;
    Ok((peer, Some(identity)))
}

/// Reads the service's answer to a hello.
fn read_answer<P, E>(
    reader: &mut FrameReader<SharedStream>,
    answer: impl FnOnce(&[u8]) -> Result<Answer<P>, E>,
) -> Result<P, LinkError>
where
    E: Into<Box<dyn Error + Send + Sync>>,
{
    // The acceptor writes nothing after its answer until our traffic starts, so the
    // reader buffers at most the answer; anything past it stays buffered for the link.
    let frame = reader.read_frame()?.ok_or(LinkError::Closed)?;
    match answer(frame).map_err(|e| LinkError::Protocol(e.into()))? {
        Answer::Welcome(peer) => Ok(peer),
        Answer::Refused(reason) => Err(LinkError::Refused(reason)),
    }
}

/// The acceptor's half (example: [the module docs](crate::link)): answers a hello that `reader`
/// has read from `stream` (the service decided the [`Verdict`]), sets the link's timeouts
/// (write, and idle as the read timeout), and returns the link on a welcome, `None` on a
/// refusal (written, and the link is over).
///
/// # Errors
/// When the timeouts cannot be set or the answer cannot be written.
pub fn accept<R: Read>(
    stream: &Arc<TcpStream>,
    mut reader: FrameReader<R>,
    timeouts: &Timeouts,
    verdict: Verdict,
) -> io::Result<Option<Link<R>>> {
    stream.set_write_timeout(Some(timeouts.write))?;
    // Set before the welcome goes out, so the link is bounded from its first frame on.
    stream.set_read_timeout(timeouts.idle)?;
    if !greet_as_acceptor(stream, &mut reader, verdict)? {
        return Ok(None);
    }
    Ok(Some(Link {
        stream: Arc::clone(stream),
        reader,
        registration: None,
        peer_identity: None,
    }))
}

/// The acceptor's half of [`crate::auth`]'s exchange, run when the service has read and
/// parsed the hello (whose sender claims `claimed`) and **before** it decides anything or
/// touches its state: reads the dialer's nonce, answers with ours and our tag, reads and
/// checks the dialer's tag. Without `auth` it does nothing and the wire is unchanged.
///
/// On failure the link is shut down and logged with the peer's address; the service
/// just returns.
///
/// # Errors
/// [`LinkError::Unauthenticated`] when the dialer ran no handshake or proved nothing;
/// otherwise why the handshake could not be read or written (a close, a timeout).
pub fn authenticate<R: Read>(
    stream: &TcpStream,
    reader: &mut FrameReader<R>,
    timeouts: &Timeouts,
    auth: Option<&Auth>,
    claimed: &[u8],
) -> Result<(), LinkError> {
    let Some(auth) = auth else {
        return Ok(());
    };
    let result = prove_as_acceptor(stream, reader, timeouts, auth, claimed);
    if let Err(e) = &result {
        log_info!("link: refused {}: {e}", peer_name(stream));
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    result
}

fn prove_as_acceptor<R: Read>(
    stream: &TcpStream,
    reader: &mut FrameReader<R>,
    timeouts: &Timeouts,
    auth: &Auth,
    claimed: &[u8],
) -> Result<(), LinkError> {
    // Bounded by the handshake timeout: a stranger that says nothing costs one thread for
    // that long, never for good.
    stream.set_read_timeout(Some(timeouts.handshake))?;
    stream.set_write_timeout(Some(timeouts.write))?;
    let framing = reader.framing();
    let frame = reader.read_frame()?.ok_or(LinkError::Closed)?;
    let Some(auth::Message::Challenge(theirs)) = auth::Message::parse(frame) else {
        return Err(LinkError::Unauthenticated(
            "no handshake after the hello (no --secret-file there?)",
        ));
    };
    let mine = Nonce::fresh()?;
    let a = &auth.secret;
    let tag = a.tag(
        Side::Acceptor,
        &mine,
        &theirs,
        &auth.identity,
        &auth.cluster,
    );
    let mut answer = Vec::new();
    let message = auth::Message::Answer(mine, tag, auth.identity.clone());
    encode_frame(framing, &message.format(), &mut answer)?;
    (&*stream).write_all(&answer)?;
    let frame = reader.read_frame()?.ok_or(LinkError::Closed)?;
    let Some(auth::Message::Proof(tag)) = auth::Message::parse(frame) else {
        return Err(LinkError::Unauthenticated("no proof after our answer"));
    };
    if !a.verify(Side::Dialer, &theirs, &mine, claimed, &auth.cluster, &tag) {
        return Err(LinkError::Unauthenticated(
            "a wrong proof (another secret, cluster or identity)",
        ));
    }
    Ok(())
}

/// The far end's address, for a log line.
fn peer_name(stream: &TcpStream) -> String {
    stream
        .peer_addr()
        .map_or_else(|_| "a peer".to_owned(), |a| a.to_string())
}

/// Writes the answer. Issue 15's challenge goes here: the acceptor's nonce and tag ride with
/// the welcome, and the dialer's tag is read from `reader` before the link counts as up.
fn greet_as_acceptor<R: Read>(
    stream: &Arc<TcpStream>,
    _reader: &mut FrameReader<R>,
    verdict: Verdict,
) -> io::Result<bool> {
    let mut out = &**stream;
    match verdict {
        Verdict::Refuse(frame) => {
            out.write_all(&frame)?;
            Ok(false)
        }
        Verdict::Welcome(frame) => {
            out.write_all(&frame)?;
            Ok(true)
        }
    }
}

/// Resolves `addr`, to check it before dialling (a dialler refusing its own address).
///
/// # Errors
/// [`LinkError::Io`] when resolution fails, [`LinkError::Resolve`] when it yields nothing.
pub fn resolve(addr: &str) -> Result<Vec<SocketAddr>, LinkError> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(LinkError::Resolve(addr.to_owned()));
    }
    Ok(addrs)
}

impl<R: Read> Link<R> {
    /// [`Link::read_frames`] by reads: `on_frame` for each frame one read of the socket
    /// completed, then `on_read` once, before the next read may block. For a service that
    /// answers a batch at once (one fsync and one acknowledgement for every record a read
    /// brought, not one per record). Over-limit frames are skipped and logged as there.
    pub fn read_batches<B>(
        &mut self,
        name: &str,
        mut on_frame: impl FnMut(&[u8]) -> ControlFlow<B>,
        mut on_read: impl FnMut(),
    ) -> End<B> {
        loop {
            match self.reader.fill() {
                Ok(true) => {}
                Ok(false) => {
                    return match self.reader.finish() {
                        Ok(()) => End::Closed,
                        Err(e) => End::Lost(e),
                    }
                }
                Err(e) => return End::Lost(e),
            }
            let stopped = loop {
                match self.reader.next_buffered() {
                    Ok(Some(frame)) => {
                        if let ControlFlow::Break(why) = on_frame(frame) {
                            break Some(End::Stopped(why));
                        }
                    }
                    Ok(None) => break None,
                    Err(e) if e.is_recoverable() => log_info!("{name}: {e}; skipped"),
                    Err(e) => break Some(End::Lost(e)),
                }
            };
            on_read();
            if let Some(end) = stopped {
                return end;
            }
        }
    }
}

mod backoff;
pub use backoff::{Backoff, FIRST_RETRY, MAX_RETRY};
mod liveness;
pub use liveness::{redial, Liveness, Redials, DEAD_PEER};

#[cfg(test)]
mod tests;
