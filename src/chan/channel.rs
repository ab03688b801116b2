//! [`Chan`]: one handle for a channel in this process (a bounded in-memory queue) or on
//! another node (a host and port), read and written the same way.

use super::protocol::{self, ReadReply};
use super::value::remote_chan_term;
use super::{ChanError, Host, Node, Value};
use crate::framing::{FrameReader, Framing};
use crate::term::Term;
use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

/// Most of a listener's answer to a write that is kept for the error (there should be none).
const MAX_WRITE_ANSWER: u64 = 4096;

/// Channel ids, unique in the process, so two nodes in one process never share a key.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A channel. Cloning gives another handle to the same channel; equal handles name the
/// same channel (a local one by identity, a remote one by host and port).
#[derive(Clone)]
pub struct Chan(Kind);

#[derive(Clone)]
enum Kind {
    Local(Arc<LocalChan>),
    Remote(Arc<RemoteChan>),
}

/// A message in a local channel's queue. A message that came over the network holds its
/// share of the channel's byte budget until it is taken out (see
/// [`NodeConfig::capacity_bytes`](super::NodeConfig::capacity_bytes)), and the channels
/// in it that name this node as remote handles (seen so through `Deref`) until
/// [`Delivery::into_value`] brings them home: so a queue holding its own channel's name
/// does not keep that channel alive.
#[derive(Debug)]
pub struct Delivery {
    value: Value,
    /// The node to bring channels home to, when the value names one of its channels.
    home: Option<Weak<Node>>,
    _charge: Option<Charge>,
    /// Its share of the node's client memory budget, if it has one.
    _memory: Option<crate::budget::Charge>,
}

impl Delivery {
    fn local(value: Value) -> Delivery {
        Delivery {
            value,
            home: None,
            _charge: None,
            _memory: None,
        }
    }

    pub(crate) fn charged(
        value: Value,
        home: Option<Weak<Node>>,
        charge: Charge,
        memory: Option<crate::budget::Charge>,
    ) -> Delivery {
        Delivery {
            value,
            home,
            _charge: Some(charge),
            _memory: memory,
        }
    }

    /// The message, giving its bytes back to the channel's budget; a channel in it that
    /// names one of this node's channels still open is that local channel.
    pub fn into_value(self) -> Value {
        match self.home.as_ref().and_then(Weak::upgrade) {
            Some(node) => node.bring_home(self.value),
            None => self.value,
        }
    }
}

impl Deref for Delivery {
    type Target = Value;

    fn deref(&self) -> &Value {
        &self.value
    }
}

/// The bytes that parsed messages from the network may hold in one channel's queue.
/// Counting messages alone is not enough: a parsed term holds up to 16 times its text, so
/// 1,024 queued 1 MiB lines could hold gigabytes.
#[derive(Debug)]
pub(crate) struct ByteBudget {
    cap: usize,
    used: Mutex<usize>,
    freed: Condvar,
}

impl ByteBudget {
    fn new(cap: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            cap,
            used: Mutex::new(0),
            freed: Condvar::new(),
        })
    }

    /// Takes `n` bytes, waiting at most `wait` for room. A message larger than the whole
    /// budget is let in when the queue holds no other charged bytes, or it could never be
    /// delivered; the parser's own bound keeps it finite.
    pub(crate) fn take(self: &Arc<Self>, n: usize, wait: Duration) -> Option<Charge> {
        let used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut used, _) = self
            .freed
            .wait_timeout_while(used, wait, |used| *used > 0 && *used + n > self.cap)
            .unwrap_or_else(PoisonError::into_inner);
        if *used > 0 && *used + n > self.cap {
            return None;
        }
        *used += n;
        Some(Charge {
            budget: Arc::clone(self),
            n,
        })
    }

    /// Bytes held now.
    pub(crate) fn used(&self) -> usize {
        *self.used.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Bytes of a [`ByteBudget`] held by one queued message; given back when dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<ByteBudget>,
    n: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let mut used = self
            .budget
            .used
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *used -= self.n;
        drop(used);
        self.budget.freed.notify_all();
    }
}

/// A channel of this process: its queue, and the node that exports it when it leaves.
pub(crate) struct LocalChan {
    pub(crate) id: u64,
    owner: Weak<Node>,
    pub(crate) tx: Sender<Delivery>,
    pub(crate) rx: Receiver<Delivery>,
    /// What messages from the network may hold of memory in the queue.
    pub(crate) budget: Arc<ByteBudget>,
    /// Set once the owner has opened a port listener for it (see `Drop`).
    pub(crate) exported: AtomicBool,
}

/// A channel on another node (or on this one, under an address not recognized as ours).
struct RemoteChan {
    host: Host,
    port: u16,
    /// The node that imported it: its settings, and the import of what `recv` reads.
    node: Weak<Node>,
}

impl Drop for LocalChan {
    /// The last handle is gone, so no message written to the port can ever be read: the
    /// port listener is stopped and the port released.
    fn drop(&mut self) {
        if self.exported.load(Ordering::Acquire) {
            if let Some(node) = self.owner.upgrade() {
                node.retire(self.id);
            }
        }
    }
}

impl Chan {
    pub(crate) fn local(owner: Weak<Node>, capacity: usize, capacity_bytes: usize) -> Chan {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        Chan(Kind::Local(Arc::new(LocalChan {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            owner,
            tx,
            rx,
            budget: ByteBudget::new(capacity_bytes),
            exported: AtomicBool::new(false),
        })))
    }

    pub(crate) fn remote(node: Weak<Node>, host: Host, port: u16) -> Chan {
        Chan(Kind::Remote(Arc::new(RemoteChan { host, port, node })))
    }

    pub(crate) fn from_local(local: Arc<LocalChan>) -> Chan {
        Chan(Kind::Local(local))
    }

    pub(crate) fn as_local(&self) -> Option<&Arc<LocalChan>> {
        match &self.0 {
            Kind::Local(local) => Some(local),
            Kind::Remote(_) => None,
        }
    }

    /// The channel as it crosses the network, `{remote_chan,Host,Port}`. A local channel
    /// gets its port listener from the node that made it, now if it has none yet.
    ///
    /// # Errors
    /// When the listener cannot be opened ([`ChanError::Listen`]) or the channel's node
    /// has shut down ([`ChanError::NodeDown`]).
    pub fn to_term(&self) -> Result<Term, ChanError> {
        match &self.0 {
            Kind::Remote(remote) => Ok(remote_chan_term(&remote.host, remote.port)),
            Kind::Local(local) => {
                let owner = local.owner.upgrade().ok_or(ChanError::NodeDown)?;
                let port = owner.open_port(local)?;
                Ok(remote_chan_term(&Host::Ip(owner.config().advertise), port))
            }
        }
    }

    /// Whether the channel's queue is in this process.
    pub fn is_local(&self) -> bool {
        self.as_local().is_some()
    }

    /// Host and port of a remote channel.
    pub fn remote_addr(&self) -> Option<(&Host, u16)> {
        match &self.0 {
            Kind::Remote(remote) => Some((&remote.host, remote.port)),
            Kind::Local(_) => None,
        }
    }

    /// The queue of a local channel, to wait on it together with other channels
    /// (`crossbeam_channel::select!`); take each message out with
    /// [`Delivery::into_value`].
    pub fn receiver(&self) -> Option<&Receiver<Delivery>> {
        self.as_local().map(|local| &local.rx)
    }

    /// Bytes that messages from the network hold in this local channel's queue now.
    pub fn queued_bytes(&self) -> usize {
        self.as_local().map_or(0, |local| local.budget.used())
    }

    /// Writes one message.
    ///
    /// Locally the message is queued as is, channels and all; this blocks while the queue
    /// is full. Remotely the message is exported (each local channel in it gets a port),
    /// and one line `{remote_msg,Msg}` is sent on a connection of its own, as the course's
    /// writers do: connect, send, close. The close is a half-close, and `send` returns
    /// once the listener has closed its end too, that is once the message is in the
    /// remote queue (waiting, like a local send, while that queue is full).
    ///
    /// # Errors
    /// A remote channel that cannot be reached ([`ChanError::Unreachable`]); a failed
    /// write or wait, or one not done within the node's
    /// [`io_timeout`](super::NodeConfig::io_timeout) from the start (connecting
    /// included), whatever the listener trickles meanwhile ([`ChanError::Io`], of kind
    /// `TimedOut` for the deadline: the message may or may not have arrived); a listener that answered, which it does only to refuse
    /// ([`ChanError::BadReply`]); a local channel in the message that cannot get a port
    /// ([`ChanError::Listen`]); a node that has shut down ([`ChanError::NodeDown`]).
    pub fn send(&self, msg: impl Into<Value>) -> Result<(), ChanError> {
        match &self.0 {
            Kind::Local(local) => local
                .tx
                .send(Delivery::local(msg.into()))
                .map_err(|_| ChanError::NodeDown),
            Kind::Remote(remote) => remote.send(msg.into()),
        }
    }

    /// [`Chan::send`], waiting at most `timeout` for room in a local channel's queue. (A
    /// remote send is bounded by the node's I/O timeout already, connecting and the
    /// listener's answer included; `timeout` is not used.)
    ///
    /// # Errors
    /// [`ChanError::Timeout`] when the local queue stayed full; otherwise as
    /// [`Chan::send`].
    pub fn send_timeout(&self, msg: impl Into<Value>, timeout: Duration) -> Result<(), ChanError> {
        match &self.0 {
            Kind::Local(local) => local
                .tx
                .send_timeout(Delivery::local(msg.into()), timeout)
                .map_err(|e| match e {
                    SendTimeoutError::Timeout(_) => ChanError::Timeout,
                    SendTimeoutError::Disconnected(_) => ChanError::NodeDown,
                }),
            Kind::Remote(remote) => remote.send(msg.into()),
        }
    }

    /// Whether both handles are the same local channel (one queue).
    pub fn same_queue(&self, other: &Chan) -> bool {
        matches!((&self.0, &other.0), (Kind::Local(a), Kind::Local(b)) if Arc::ptr_eq(a, b))
    }

    /// Reads the next message, waiting as long as it takes.
    ///
    /// A remote channel is read with a `remote_read` request to its port listener.
    ///
    /// # Errors
    /// For a remote channel, as [`Chan::send`], plus [`ChanError::BadReply`].
    pub fn recv(&self) -> Result<Value, ChanError> {
        match &self.0 {
            Kind::Local(local) => local
                .rx
                .recv()
                .map(Delivery::into_value)
                .map_err(|_| ChanError::NodeDown),
            Kind::Remote(remote) => remote.recv(None),
        }
    }

    /// Reads the next message, waiting at most `timeout`.
    ///
    /// # Errors
    /// [`ChanError::Timeout`] when no message came in time; otherwise as [`Chan::recv`].
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Value, ChanError> {
        match &self.0 {
            Kind::Local(local) => local
                .rx
                .recv_timeout(timeout)
                .map(Delivery::into_value)
                .map_err(|e| match e {
                    RecvTimeoutError::Timeout => ChanError::Timeout,
                    RecvTimeoutError::Disconnected => ChanError::NodeDown,
                }),
            Kind::Remote(remote) => remote.recv(Some(timeout)),
        }
    }
}

impl RemoteChan {
    fn addr(&self) -> String {
        match &self.host {
            Host::Ip(ip) => SocketAddr::new(*ip, self.port).to_string(),
            Host::Name(name) => format!("{name}:{}", self.port),
        }
    }

    /// A connection to the port listener, with `TCP_NODELAY`, made within the node's
    /// connect timeout and what is left of `deadline`.
    ///
    /// A host name is resolved first, by the system resolver, whose own timeouts bound it
    /// (`/etc/resolv.conf`), not `deadline`: std has no resolver with a time limit. IP
    /// literals and `localhost` need no query.
    fn connect(&self, node: &Node, deadline: &Deadline) -> Result<TcpStream, ChanError> {
        let config = node.config();
        let unreachable = |source| ChanError::Unreachable {
            addr: self.addr(),
            source,
        };
        let mut addrs: Vec<SocketAddr> = match self.host.literal_ip() {
            Some(ip) => vec![SocketAddr::new(ip, self.port)],
            None => (self.host.to_string(), self.port)
                .to_socket_addrs()
                .map_err(unreachable)?
                .collect(),
        };
        // IPv4 first, as Erlang's gen_tcp (inet) would connect.
        addrs.sort_by_key(SocketAddr::is_ipv6);
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            let patience = match deadline.left() {
                Ok(left) => left.min(config.connect_timeout),
                Err(e) => return Err(unreachable(e)),
            };
            match TcpStream::connect_timeout(&addr, patience) {
                Ok(stream) => {
                    return match stream.set_nodelay(true) {
                        Ok(()) => Ok(stream),
                        Err(source) => Err(self.io_error(source)),
                    };
                }
                Err(e) => last = e,
            }
        }
        Err(unreachable(last))
    }

    fn io_error(&self, source: std::io::Error) -> ChanError {
        ChanError::Io {
            addr: self.addr(),
            source,
        }
    }

    fn node(&self) -> Result<Arc<Node>, ChanError> {
        self.node.upgrade().ok_or(ChanError::NodeDown)
    }

    fn send(&self, msg: Value) -> Result<(), ChanError> {
        let node = self.node()?;
        let term = node.export(&msg)?;
        let mut line = Vec::new();
        protocol::write_msg(&term, &mut line);
        // Connecting, writing and the listener's close, all within one I/O timeout.
        let deadline = Deadline::after(node.config().io_timeout);
        let stream = self.connect(&node, &deadline)?;
        let mut timed = Timed::new(&stream, Some(deadline));
        timed.write_all(&line).map_err(|e| self.io_error(e))?;
        // The course's writer closes here. Half-closing and waiting for the listener to
        // close in turn costs one wake-up and buys two things: the message is in the queue
        // when `send` returns, so one sender's messages arrive in order however the
        // listener's threads are scheduled; and a listener's `{error,...}` reaches us.
        stream
            .shutdown(std::net::Shutdown::Write)
            .map_err(|e| self.io_error(e))?;
        let mut answer = Vec::new();
        match timed.take(MAX_WRITE_ANSWER).read_to_end(&mut answer) {
            Ok(_) if answer.is_empty() => Ok(()),
            Ok(_) => Err(self.bad_reply(answer.trim_ascii_end())),
            Err(e) => Err(self.io_error(e)),
        }
    }

    fn recv(&self, timeout: Option<Duration>) -> Result<Value, ChanError> {
        let node = self.node()?;
        let config = node.config();
        // The listener answers `timeout` itself; the I/O timeout on top of it only guards
        // against a dead or dawdling one. Without a timeout, connecting and asking are
        // bounded, and the answer is waited for as long as it takes.
        let answer_by = timeout.map(|t| Deadline::after(t.saturating_add(config.io_timeout)));
        let deadline = answer_by.unwrap_or_else(|| Deadline::after(config.io_timeout));
        let stream = self.connect(&node, &deadline)?;
        let mut request = Vec::new();
        protocol::write_read(timeout, &mut request);
        Timed::new(&stream, Some(deadline))
            .write_all(&request)
            .map_err(|e| self.io_error(e))?;
        let timed = Timed::new(&stream, answer_by);
        let mut reader = FrameReader::with_limits(timed, Framing::Line, config.line_limits);
        let line = match reader.read_frame() {
            Ok(Some(line)) => line,
            Ok(None) => return Err(self.bad_reply(b"connection closed")),
            Err(crate::framing::FrameError::Io(e)) => return Err(self.io_error(e)),
            Err(e) => return Err(self.bad_reply(e.to_string().as_bytes())),
        };
        match protocol::parse_read_reply(line, &config.term_limits) {
            Some(ReadReply::Msg(term)) => Ok(node.import(term)),
            Some(ReadReply::Timeout) => Err(ChanError::Timeout),
            None => Err(self.bad_reply(line)),
        }
    }

    fn bad_reply(&self, reply: &[u8]) -> ChanError {
        ChanError::BadReply {
            addr: self.addr(),
            reply: String::from_utf8_lossy(reply).into_owned(),
        }
    }
}

/// The end of one remote operation. The socket's own timeouts bound each read or write
/// call, not the whole: a listener that trickles a byte every few seconds would restart
/// them every time and hold a `send` for hours.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    /// `None`: past what an `Instant` can hold, so never.
    at: Option<Instant>,
    total: Duration,
}

impl Deadline {
    fn after(total: Duration) -> Deadline {
        Deadline {
            at: Instant::now().checked_add(total),
            total,
        }
    }

    /// The time left, or the error that says it has run out.
    fn left(&self) -> io::Result<Duration> {
        let Some(at) = self.at else {
            return Ok(Duration::MAX);
        };
        time_left(at, Instant::now()).ok_or_else(|| self.expired())
    }

    fn expired(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no answer within {:?} (connecting, writing and the answer together)",
                self.total
            ),
        )
    }
}

/// What is left before `deadline` at `now`; `None` once nothing is (a socket timeout of
/// zero would mean none at all).
fn time_left(deadline: Instant, now: Instant) -> Option<Duration> {
    Some(deadline.saturating_duration_since(now)).filter(|left| !left.is_zero())
}

/// A connection whose reads and writes share one [`Deadline`]: before each call the
/// socket's timeout is set to the time left, and a call that times out past the deadline
/// says so. Without a deadline, calls wait as long as it takes.
struct Timed<'s> {
    stream: &'s TcpStream,
    deadline: Option<Deadline>,
}

impl<'s> Timed<'s> {
    fn new(stream: &'s TcpStream, deadline: Option<Deadline>) -> Timed<'s> {
        Timed { stream, deadline }
    }

    /// The socket timeout for the next call.
    fn patience(&self) -> io::Result<Option<Duration>> {
        match &self.deadline {
            // A timeout beyond what the OS takes is no timeout.
            Some(d) => d
                .left()
                .map(|left| Some(left).filter(|&l| l < Duration::from_secs(1 << 30))),
            None => Ok(None),
        }
    }

    /// A timed-out call's error, told as the deadline's once it has passed.
    fn timed_out(&self, e: io::Error) -> io::Error {
        let timeout = matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        );
        match &self.deadline {
            Some(d) if timeout && d.left().is_err() => d.expired(),
            _ => e,
        }
    }
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(self.patience()?)?;
        let mut stream = self.stream;
        stream.read(buf).map_err(|e| self.timed_out(e))
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(self.patience()?)?;
        let mut stream = self.stream;
        stream.write(buf).map_err(|e| self.timed_out(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl PartialEq for Chan {
    fn eq(&self, other: &Chan) -> bool {
        match (&self.0, &other.0) {
            (Kind::Local(a), Kind::Local(b)) => a.id == b.id,
            (Kind::Remote(a), Kind::Remote(b)) => a.host == b.host && a.port == b.port,
            _ => false,
        }
    }
}

impl fmt::Debug for Chan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Local(local) => write!(f, "Chan(local #{})", local.id),
            Kind::Remote(remote) => write!(f, "Chan(remote {})", remote.addr()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_runs_out_at_the_deadline_not_at_zero_timeouts() {
        let now = Instant::now();
        let later = now + Duration::from_millis(5);
        assert_eq!(time_left(later, now), Some(Duration::from_millis(5)));
        assert_eq!(
            time_left(later, later),
            None,
            "a zero timeout would be none"
        );
        assert_eq!(time_left(now, later), None);
    }

    /// A listener for one connection that takes what the client sends up to `until`
    /// (the end of the stream, or a line), then writes `answer` one byte every 100 ms
    /// until the client goes away: each read of the client's succeeds well within any
    /// socket timeout.
    fn trickler(until_eof: bool, answer: &'static [u8]) -> (u16, std::thread::JoinHandle<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            conn.set_write_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut got = Vec::new();
            let mut byte = [0u8; 1];
            while let Ok(1) = conn.read(&mut byte) {
                got.push(byte[0]);
                if !until_eof && byte[0] == b'\n' {
                    break;
                }
            }
            for b in answer.iter().cycle().take(10_000) {
                std::thread::sleep(Duration::from_millis(100));
                if conn.write_all(&[*b]).is_err() {
                    return;
                }
            }
        });
        (port, thread)
    }

    fn slow_node() -> Arc<Node> {
        crate::log::capture_in_tests();
        Node::new(super::super::NodeConfig {
            io_timeout: Duration::from_millis(500),
            ..super::super::NodeConfig::default()
        })
    }

    /// Runs `op` on a thread of its own; what it returned, or `None` if it is still
    /// running after 30 s (60 times the node's deadline).
    fn within_30_s<T: Send + 'static>(op: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (done, finished) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || done.send(op()));
        finished.recv_timeout(Duration::from_secs(30)).ok()
    }

    fn is_deadline(e: &ChanError) -> bool {
        matches!(e, ChanError::Io { source, .. } if source.kind() == io::ErrorKind::TimedOut
            && source.to_string().contains("connecting, writing and the answer together"))
    }

    #[test]
    fn a_listener_that_trickles_its_answer_cannot_hold_a_send_past_the_deadline() {
        let node = slow_node();
        let (port, trickling) = trickler(true, b"{error,slow}");
        let chan = node.remote(Host::Ip([127, 0, 0, 1].into()), port);
        let sent = within_30_s(move || chan.send(Value::atom("hi"))).expect("the send gave up");
        let e = sent.expect_err("no close, no delivery");
        assert!(is_deadline(&e), "{e}");
        trickling.join().unwrap();
    }

    #[test]
    fn a_listener_that_trickles_its_answer_cannot_hold_a_read_past_the_deadline() {
        let node = slow_node();
        let (port, trickling) = trickler(false, b"{remote_msg,slow}");
        let chan = node.remote(Host::Ip([127, 0, 0, 1].into()), port);
        let read = within_30_s(move || chan.recv_timeout(Duration::from_millis(100)))
            .expect("the read gave up");
        let e = read.expect_err("no whole line in time");
        assert!(is_deadline(&e), "{e}");
        trickling.join().unwrap();
    }

    #[test]
    fn a_value_is_charged_at_least_what_its_term_holds() {
        // The listener charges a message by its parsed term's size before it becomes a
        // Value; the two must be laid out alike for that charge to be the real one.
        assert_eq!(std::mem::size_of::<Value>(), Term::NODE_BYTES);
    }

    #[test]
    fn the_budget_waits_for_room_and_lets_one_large_message_in_alone() {
        let b = ByteBudget::new(100);
        let a = b.take(60, Duration::ZERO).unwrap();
        assert!(
            b.take(50, Duration::from_millis(20)).is_none(),
            "over budget"
        );
        let c = b.take(40, Duration::ZERO).unwrap();
        assert_eq!(b.used(), 100);
        drop(a);
        drop(c);
        assert_eq!(b.used(), 0);
        let huge = b.take(1_000, Duration::ZERO).expect("alone, it passes");
        assert!(b.take(1, Duration::from_millis(20)).is_none());
        // A waiting taker is woken when room is made, long before its own timeout.
        let b2 = Arc::clone(&b);
        let (done, finished) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || done.send(b2.take(10, Duration::from_secs(60)).is_some()));
        std::thread::sleep(Duration::from_millis(20));
        drop(huge);
        assert_eq!(finished.recv_timeout(Duration::from_secs(10)), Ok(true));
    }
}
