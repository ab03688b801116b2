//! [`Chan`]: one handle for a channel in this process (a bounded in-memory queue) or on
//! another node (a host and port), read and written the same way.

use super::protocol::{self, ReadReply};
use super::value::remote_chan_term;
use super::{ChanError, Host, Node, Value};
use crate::framing::{FrameReader, Framing};
use crate::term::Term;
use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::Duration;

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
/// [`NodeConfig::capacity_bytes`](super::NodeConfig::capacity_bytes)).
#[derive(Debug)]
pub struct Delivery {
    value: Value,
    _charge: Option<Charge>,
    /// Its share of the node's client memory budget, if it has one.
    _memory: Option<crate::budget::Charge>,
}

impl Delivery {
    fn local(value: Value) -> Delivery {
        Delivery {
            value,
            _charge: None,
            _memory: None,
        }
    }

    pub(crate) fn charged(
        value: Value,
        charge: Charge,
        memory: Option<crate::budget::Charge>,
    ) -> Delivery {
        Delivery {
            value,
            _charge: Some(charge),
            _memory: memory,
        }
    }

    /// The message, giving its bytes back to the channel's budget.
    pub fn into_value(self) -> Value {
        self.value
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
    /// A remote channel that cannot be reached ([`ChanError::Unreachable`]); a failed or
    /// timed-out write or wait ([`ChanError::Io`]: the message may or may not have
    /// arrived); a listener that answered, which it does only to refuse
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
    /// remote send is bounded by the node's I/O timeout already; `timeout` is not used.)
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

    /// A connection to the port listener, with `TCP_NODELAY` and the node's timeouts.
    fn connect(&self, node: &Node) -> Result<TcpStream, ChanError> {
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
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, config.connect_timeout) {
                Ok(stream) => {
                    let setup = stream
                        .set_nodelay(true)
                        .and_then(|()| stream.set_write_timeout(Some(config.io_timeout)))
                        .and_then(|()| stream.set_read_timeout(Some(config.io_timeout)));
                    return match setup {
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
        let mut stream = self.connect(&node)?;
        stream.write_all(&line).map_err(|e| self.io_error(e))?;
        // The course's writer closes here. Half-closing and waiting for the listener to
        // close in turn costs one wake-up and buys two things: the message is in the queue
        // when `send` returns, so one sender's messages arrive in order however the
        // listener's threads are scheduled; and a listener's `{error,...}` reaches us.
        stream
            .shutdown(std::net::Shutdown::Write)
            .map_err(|e| self.io_error(e))?;
        let mut answer = Vec::new();
        match (&stream).take(MAX_WRITE_ANSWER).read_to_end(&mut answer) {
            Ok(_) if answer.is_empty() => Ok(()),
            Ok(_) => Err(self.bad_reply(answer.trim_ascii_end())),
            Err(e) => Err(self.io_error(e)),
        }
    }

    fn recv(&self, timeout: Option<Duration>) -> Result<Value, ChanError> {
        let node = self.node()?;
        let config = node.config();
        let stream = self.connect(&node)?;
        // The listener answers `timeout` itself; the socket only guards against a dead one.
        let patience = timeout.map(|t| t.saturating_add(config.io_timeout));
        stream
            .set_read_timeout(patience)
            .map_err(|e| self.io_error(e))?;
        let mut request = Vec::new();
        protocol::write_read(timeout, &mut request);
        (&stream)
            .write_all(&request)
            .map_err(|e| self.io_error(e))?;
        let mut reader = FrameReader::with_limits(&stream, Framing::Line, config.line_limits);
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
