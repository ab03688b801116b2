//! An outbox: a bounded queue of already-encoded frames for one connection, drained by one
//! writer thread onto its socket. State (a hub, a federation, a node's links) holds the
//! sending end, [`Outbox`], never the socket: a full outbox closes its own connection.
//!
//! - Frames are [`Bytes`] (`Arc<[u8]>`): a line fanned out to a hundred outboxes is
//!   encoded once and shared, not copied per receiver.
//! - The writer coalesces whatever is queued into one `write` of up to 64 KiB.
//! - With a heartbeat configured, the writer sends it whenever the queue has been empty
//!   for its interval, so the other end can tell a quiet link from a dead one.
//! - When every [`Outbox`] is dropped the writer sends what is queued, then half-closes
//!   (`shutdown(Write)`): the other end reads everything, then the end of the stream.
//! - A send to a full outbox shuts the connection down (both ways) and logs why once:
//!   the receiver has fallen a whole outbox behind, and nobody waits for it. Full is
//!   `limit` frames, or [`OutboxConfig::max_bytes`] bytes queued.
//! - With an [`Account`] ([`OutboxConfig::account`]) the queued bytes count against the
//!   server's client memory budget, charged in steps of 16 KiB so a busy outbox does not
//!   touch the shared counter per frame, and given back whenever the queue empties.
//!
//! ```
//! use switchboard::outbox::{Bytes, Outbox, OutboxConfig};
//! use std::io::Read;
//! use std::net::{TcpListener, TcpStream};
//! use std::sync::Arc;
//! use std::thread;
//!
//! let listener = TcpListener::bind("127.0.0.1:0")?;
//! let mut client = TcpStream::connect(listener.local_addr()?)?;
//! client.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
//! let (served, _) = listener.accept()?;
//!
//! let (outbox, writer) = Outbox::new(Arc::new(served), OutboxConfig::new("demo", 16));
//! let writer = thread::spawn(move || writer.run());
//! let hello: Bytes = Arc::from(&b"hello\n"[..]);
//! outbox.send(Bytes::clone(&hello))?;
//! outbox.send(hello)?;
//! drop(outbox); // the writer flushes, then half-closes
//! writer.join().unwrap();
//!
//! let mut got = String::new();
//! client.read_to_string(&mut got)?;
//! assert_eq!(got, "hello\nhello\n");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::budget::{Account, Charge};
use crate::{log_debug, log_info};
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use std::fmt;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// One encoded frame (framing included), shared by every outbox it is queued in.
pub type Bytes = Arc<[u8]>;

/// Bytes a writer gathers into one `write` call, at most (plus one frame).
const BATCH_BYTES: usize = 64 << 10;
/// Queued bytes are charged to the client memory budget in steps of this much.
const CHARGE_STEP: usize = 16 << 10;

/// How an outbox behaves (example: [the module docs](crate::outbox)).
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Prefixes the log lines of this connection (`"chat: connection 7"`).
    pub name: String,
    /// Frames that may wait; one more closes the connection. At least 1.
    pub limit: usize,
    /// Sent whenever nothing else has been sent for the interval.
    pub heartbeat: Option<(Duration, Bytes)>,
    /// Bytes that may wait; a frame that would pass it closes the connection (one frame
    /// larger than this is let in when nothing else waits). Unbounded unless set.
    pub max_bytes: usize,
    /// Where the queued bytes are charged (a connection's share of the server's client
    /// memory budget); a charge refused closes the connection as an overflow does.
    pub account: Option<Account>,
}

impl OutboxConfig {
    /// An outbox of `limit` frames, without heartbeat.
    pub fn new(name: impl Into<String>, limit: usize) -> OutboxConfig {
        OutboxConfig {
            name: name.into(),
            limit,
            heartbeat: None,
            max_bytes: usize::MAX,
            account: None,
        }
    }

    /// Bounds the bytes waiting as well as the frames.
    pub fn max_bytes(mut self, bytes: usize) -> OutboxConfig {
        self.max_bytes = bytes;
        self
    }

    /// Charges the bytes waiting to `account` (see [`crate::budget`]).
    pub fn account(mut self, account: Option<&Account>) -> OutboxConfig {
        self.account = account.cloned();
        self
    }

    /// Adds a heartbeat: `frame` goes out after every `every` without other traffic.
    pub fn heartbeat(mut self, every: Duration, frame: Bytes) -> OutboxConfig {
        self.heartbeat = Some((every, frame));
        self
    }
}

/// Why [`Outbox::send`] did not queue a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The outbox was full: the connection has been shut down.
    Overflow,
    /// The writer is gone (the connection failed or was closed).
    Closed,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Overflow => f.write_str("outbox full; connection closed"),
            SendError::Closed => f.write_str("connection closed"),
        }
    }
}

impl std::error::Error for SendError {}

/// The sending end of a connection's outbox (example: [the module docs](crate::outbox));
/// cloneable. Dropping the last one lets the writer flush and half-close.
#[derive(Clone)]
pub struct Outbox {
    tx: Sender<Bytes>,
    conn: Arc<Conn>,
}

/// What the senders share: the socket to shut down when the outbox overflows. Kept here,
/// so the state holding an [`Outbox`] never holds a socket.
struct Conn {
    name: String,
    limit: usize,
    max_bytes: usize,
    /// Bytes of the frames in the queue.
    queued: AtomicUsize,
    /// Of the client memory budget: at least `queued` (rounded up a step) while frames wait.
    charged: Option<Mutex<Charge>>,
    /// The bytes `charged` covers, read without its lock.
    covered: AtomicUsize,
    stream: Arc<TcpStream>,
    /// Set once the connection is shut down by a sender, so the reason is logged once.
    closed: AtomicBool,
}

/// The draining end: [`Writer::run`] on a thread of its own (example: [the module
/// docs](crate::outbox)).
pub struct Writer {
    rx: Receiver<Bytes>,
    conn: Arc<Conn>,
    heartbeat: Option<(Duration, Bytes)>,
}

impl Outbox {
    /// An outbox for `stream`, and the writer that drains it (to run on a thread).
    ///
    /// Built on crossbeam's unbounded channel, bounded by a length check: a bounded channel
    /// allocates every slot up front, which for thousands of mostly idle connections is
    /// memory spent on empty queues. Concurrent senders may overshoot the limit by one
    /// frame each, harmlessly.
    pub fn new(stream: Arc<TcpStream>, config: OutboxConfig) -> (Outbox, Writer) {
        let (tx, rx) = unbounded();
        let charged = config
            .account
            .and_then(|account| account.charge(0).ok())
            .map(Mutex::new);
        let conn = Arc::new(Conn {
            name: config.name,
            limit: config.limit.max(1),
            max_bytes: config.max_bytes,
            queued: AtomicUsize::new(0),
            charged,
            covered: AtomicUsize::new(0),
            stream,
            closed: AtomicBool::new(false),
        });
        let writer = Writer {
            rx,
            conn: Arc::clone(&conn),
            heartbeat: config.heartbeat,
        };
        (Outbox { tx, conn }, writer)
    }

    /// Queues `frame` behind everything queued before.
    ///
    /// # Errors
    /// [`SendError::Overflow`] when `limit` frames are waiting already: the connection is
    /// shut down, with the reason logged; [`SendError::Closed`] when the writer is gone.
    pub fn send(&self, frame: Bytes) -> Result<(), SendError> {
        let conn = &*self.conn;
        if self.tx.len() >= conn.limit {
            let why = format!("{} frames behind", conn.limit);
            conn.close(&why);
            return Err(SendError::Overflow);
        }
        let n = frame.len();
        let queued = conn.queued.fetch_add(n, Ordering::Relaxed) + n;
        if queued > conn.max_bytes && queued > n {
            conn.queued.fetch_sub(n, Ordering::Relaxed);
            conn.close(&format!("{} bytes behind", queued - n));
            return Err(SendError::Overflow);
        }
        if let Err(e) = conn.charge_at_least(queued) {
            conn.queued.fetch_sub(n, Ordering::Relaxed);
            conn.close(&e.to_string());
            return Err(SendError::Overflow);
        }
        self.tx.send(frame).map_err(|_| {
            conn.taken(n);
            SendError::Closed
        })
    }

    /// Counts `n` bytes held elsewhere for this connection (answers waiting for a commit,
    /// say) as queued until [`Outbox::released`]: charged to the account and counted
    /// against `max_bytes`, as queued frames are.
    ///
    /// # Errors
    /// [`SendError::Overflow`] as [`Outbox::send`] for bytes: the connection is shut down.
    pub fn hold(&self, n: usize) -> Result<(), SendError> {
        let conn = &*self.conn;
        let queued = conn.queued.fetch_add(n, Ordering::Relaxed) + n;
        let over = if queued > conn.max_bytes && queued > n {
            Some(format!("{} bytes behind", queued - n))
        } else {
            conn.charge_at_least(queued).err().map(|e| e.to_string())
        };
        if let Some(why) = over {
            conn.queued.fetch_sub(n, Ordering::Relaxed);
            conn.close(&why);
            return Err(SendError::Overflow);
        }
        Ok(())
    }

    /// Gives back `n` bytes [`Outbox::hold`] counted (before they are sent, or dropped).
    pub fn released(&self, n: usize) {
        self.conn.taken(n);
    }

    /// Bytes waiting.
    pub fn queued_bytes(&self) -> usize {
        self.conn.queued.load(Ordering::Relaxed)
    }

    /// Shuts the connection down both ways, logging `why` (once per connection): the
    /// writer stops, and whoever reads the connection sees it end.
    pub fn close(&self, why: &str) {
        self.conn.close(why);
    }

    /// Shuts down one direction of the connection without a log line: `Read` ends the
    /// connection's reader while the writer still flushes what is queued.
    pub fn shutdown(&self, how: Shutdown) {
        let _ = self.conn.stream.shutdown(how);
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.tx.len()
    }

    /// Whether no frame is waiting.
    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }

    /// Whether `other` writes to the same connection (a clone of this outbox).
    pub fn same_connection(&self, other: &Outbox) -> bool {
        Arc::ptr_eq(&self.conn, &other.conn)
    }
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("name", &self.conn.name)
            .field("queued", &self.tx.len())
            .field("limit", &self.conn.limit)
            .finish()
    }
}

impl Conn {
    /// Makes the budget charge cover `queued` bytes; changes it only when it falls short.
    fn charge_at_least(&self, queued: usize) -> Result<(), crate::budget::OverBudget> {
        let Some(charged) = &self.charged else {
            return Ok(());
        };
        if queued <= self.covered.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut charge = charged.lock().unwrap_or_else(PoisonError::into_inner);
        if charge.bytes() < queued {
            // Senders queue under their state's lock (a chat room's, a messenger's): the
            // charge must not make every other client wait on the budget.
            charge.resize_now(queued.next_multiple_of(CHARGE_STEP))?;
            self.covered.store(charge.bytes(), Ordering::Relaxed);
        }
        Ok(())
    }

    /// The writer took `n` bytes: once the queue is empty, the budget gets its charge back.
    fn taken(&self, n: usize) {
        let left = self.queued.fetch_sub(n, Ordering::Relaxed) - n;
        if let (0, Some(charged)) = (left, &self.charged) {
            let mut charge = charged.lock().unwrap_or_else(PoisonError::into_inner);
            // A sender may have queued more meanwhile: keep what it needs (less than
            // before, so this cannot be refused).
            let keep = self
                .queued
                .load(Ordering::Relaxed)
                .next_multiple_of(CHARGE_STEP);
            if keep < charge.bytes() {
                let _ = charge.resize(keep);
                self.covered.store(keep, Ordering::Relaxed);
            }
        }
    }

    fn close(&self, why: &str) {
        if !self.closed.swap(true, Ordering::Relaxed) {
            log_info!("{}: {why}; closing", self.name);
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl Writer {
    /// Writes queued frames until every [`Outbox`] is dropped, then half-closes. A failed
    /// write (the peer is gone, or the socket's write timeout expired) shuts the
    /// connection down both ways, so its reader sees the end too.
    pub fn run(self) {
        match self.drain() {
            Ok(()) => {
                let _ = self.conn.stream.shutdown(Shutdown::Write);
            }
            Err(e) => {
                log_debug!("{}: write failed: {e}", self.conn.name);
                let _ = self.conn.stream.shutdown(Shutdown::Both);
                // What is queued will never be written: its bytes, and their charge, go
                // back now, not when the state lets go of the last sender (which may wait
                // for a lock that a sender waiting on the budget holds).
                while self.try_take().is_some() {}
            }
        }
    }

    /// The next frame from the queue, without waiting; its bytes are no longer queued.
    fn try_take(&self) -> Option<Bytes> {
        let frame = self.rx.try_recv().ok()?;
        self.conn.taken(frame.len());
        Some(frame)
    }

    fn next(&self) -> Option<Bytes> {
        if let Some(frame) = self.try_take() {
            return Some(frame);
        }
        let frame = match &self.heartbeat {
            None => self.rx.recv().ok(),
            Some((every, beat)) => match self.rx.recv_timeout(*every) {
                Ok(frame) => Some(frame),
                Err(RecvTimeoutError::Timeout) => return Some(Bytes::clone(beat)),
                Err(RecvTimeoutError::Disconnected) => None,
            },
        };
        if let Some(frame) = &frame {
            self.conn.taken(frame.len());
        }
        frame
    }

    fn drain(&self) -> io::Result<()> {
        let mut out = &*self.conn.stream;
        while let Some(first) = self.next() {
            let Some(second) = self.try_take() else {
                out.write_all(&first)?;
                continue;
            };
            // Allocated per batch, not kept: an idle connection holds no buffer.
            let mut batch = Vec::with_capacity(first.len() + second.len() + 512);
            batch.extend_from_slice(&first);
            batch.extend_from_slice(&second);
            while batch.len() < BATCH_BYTES {
                match self.try_take() {
                    Some(frame) => batch.extend_from_slice(&frame),
                    None => break,
                }
            }
            out.write_all(&batch)?;
        }
        Ok(())
    }
}

/// Outboxes on loopback connections, for the tests of this module and of its users.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Outbox, OutboxConfig, Writer};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::time::Duration;

    /// A connected loopback pair: the client end (with a 5 s read timeout) and the served end.
    pub(crate) fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (served, _) = listener.accept().unwrap();
        (client, served)
    }

    /// An outbox on a loopback connection, its writer (not running: what is queued stays
    /// in the outbox, to count), and the client's end.
    pub(crate) fn unstarted() -> (Outbox, Writer, TcpStream) {
        let (client, served) = pair();
        let (outbox, writer) = Outbox::new(Arc::new(served), OutboxConfig::new("test", 8));
        (outbox, writer, client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::thread;
    use std::time::Instant;

    /// A connected pair: the client end (with a read timeout) and the served end.
    fn pair() -> (TcpStream, Arc<TcpStream>) {
        let (client, served) = testing::pair();
        served
            .set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (client, Arc::new(served))
    }

    fn frame(text: &str) -> Bytes {
        Arc::from(text.as_bytes())
    }

    #[test]
    fn dropping_the_outbox_flushes_then_half_closes() {
        let (mut client, served) = pair();
        let (outbox, writer) = Outbox::new(Arc::clone(&served), OutboxConfig::new("t", 100));
        for n in 0..50 {
            outbox.send(frame(&format!("{n}\n"))).unwrap();
        }
        let writer = thread::spawn(move || writer.run());
        drop(outbox);
        writer.join().unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        let want: String = (0..50).map(|n| format!("{n}\n")).collect();
        assert_eq!(got, want);
        // Half-closed, not closed: the client can still send, and the server reads it.
        client.write_all(b"still here").unwrap();
        drop(client);
        let mut back = String::new();
        (&*served).read_to_string(&mut back).unwrap();
        assert_eq!(back, "still here");
    }

    #[test]
    fn overflow_closes_the_connection_and_says_so() {
        let (mut client, served) = pair();
        // No writer runs: the client "stops reading" and the queue fills.
        let (outbox, _writer) = Outbox::new(served, OutboxConfig::new("t", 2));
        assert_eq!(outbox.send(frame("a\n")), Ok(()));
        assert_eq!(outbox.send(frame("b\n")), Ok(()));
        assert_eq!(outbox.len(), 2);
        assert_eq!(outbox.send(frame("c\n")), Err(SendError::Overflow));
        // The connection is shut down: the client sees its end, not a hang.
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).unwrap(), 0);
        assert!(outbox.conn.closed.load(Ordering::Relaxed));
        let other = outbox.clone();
        assert!(outbox.same_connection(&other));
    }

    #[test]
    fn bytes_are_bounded_as_well_as_frames_and_charged_to_the_budget() {
        let (mut client, served) = pair();
        let budget = crate::budget::Budget::new("t", 1 << 20);
        let account = budget.account("t", None);
        let config = OutboxConfig::new("t", 100)
            .max_bytes(10)
            .account(Some(&account));
        // No writer runs: the bytes stay queued.
        let (outbox, writer) = Outbox::new(served, config);
        // One frame larger than the bound goes in alone.
        assert_eq!(outbox.send(frame("0123456789abc\n")), Ok(()));
        assert_eq!(outbox.queued_bytes(), 14);
        assert_eq!(budget.held(), CHARGE_STEP);
        assert_eq!(outbox.send(frame("x\n")), Err(SendError::Overflow));
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).unwrap(), 0);
        // What was queued goes back to the budget once taken.
        assert!(writer.try_take().is_some());
        assert_eq!((outbox.queued_bytes(), budget.held()), (0, 0));
    }

    #[test]
    fn a_failed_writer_gives_the_queued_bytes_back_while_the_outbox_lives() {
        let (client, served) = pair();
        let budget = crate::budget::Budget::new("t", 1 << 20);
        let account = budget.account("t", None);
        let config = OutboxConfig::new("t", 100).account(Some(&account));
        let (outbox, writer) = Outbox::new(Arc::clone(&served), config);
        // Three frames: the writer takes the first two as one batch (64 KiB), and the
        // third is still queued when that write fails.
        for _ in 0..3 {
            outbox.send(frame(&"x".repeat(40_000))).unwrap();
        }
        assert_eq!(budget.held(), 128 << 10);
        // The connection is cut off (by the budget, an overflow or the peer) before the
        // writer gets to the frames: its write fails, and the bytes come back at once.
        served.shutdown(Shutdown::Both).unwrap();
        writer.run();
        assert_eq!((outbox.queued_bytes(), budget.held()), (0, 0));
        assert_eq!(outbox.send(frame("late\n")), Err(SendError::Closed));
        assert_eq!((outbox.queued_bytes(), budget.held()), (0, 0));
        drop(client);
    }

    #[test]
    fn a_send_after_the_writer_is_gone_is_refused() {
        let (_client, served) = pair();
        let (outbox, writer) = Outbox::new(served, OutboxConfig::new("t", 2));
        drop(writer);
        assert_eq!(outbox.send(frame("a\n")), Err(SendError::Closed));
    }

    #[test]
    fn an_idle_outbox_sends_heartbeats_and_traffic_in_order() {
        let (client, served) = pair();
        let config =
            OutboxConfig::new("t", 8).heartbeat(Duration::from_millis(20), frame("beat\n"));
        let (outbox, writer) = Outbox::new(served, config);
        let writer = thread::spawn(move || writer.run());
        let mut lines = std::io::BufReader::new(client);
        let mut line = String::new();
        let started = Instant::now();
        use std::io::BufRead;
        lines.read_line(&mut line).unwrap();
        assert_eq!(line, "beat\n");
        assert!(started.elapsed() >= Duration::from_millis(20));
        outbox.send(frame("data\n")).unwrap();
        // Skip any heartbeats sent before the data went in; the data comes next.
        loop {
            line.clear();
            lines.read_line(&mut line).unwrap();
            if line != "beat\n" {
                break;
            }
        }
        assert_eq!(line, "data\n");
        drop(outbox);
        writer.join().unwrap();
    }

    #[test]
    fn a_shared_frame_is_not_copied_per_outbox() {
        let (_c1, s1) = pair();
        let (_c2, s2) = pair();
        let (a, _wa) = Outbox::new(s1, OutboxConfig::new("a", 4));
        let (b, _wb) = Outbox::new(s2, OutboxConfig::new("b", 4));
        let line = frame("fan-out\n");
        a.send(Bytes::clone(&line)).unwrap();
        b.send(Bytes::clone(&line)).unwrap();
        assert_eq!(Arc::strong_count(&line), 3);
    }
}
