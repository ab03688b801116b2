//! Arrival order across connections, for the servers that promise it (opt-in): a request
//! on a connection accepted later is applied after what an earlier connection had already
//! sent. The course's one-shot clients rely on it: one stores on a connection and closes,
//! the next looks the key up on a new connection, and must see the value, although the
//! two connections run on different threads.
//!
//! How: every connection is registered on the accept thread, in accept order
//! ([`Arrivals::handler`] does it, through [`Handler::accepted`]). Before a connection acts
//! on its first read it waits for the earlier connections that are still *unsettled* and
//! have bytes pending. A connection settles once it has acted on its first read, or on the
//! reads that complete a first request longer than one read (and when it ends); from then
//! on nobody waits for it. A connection that has sent nothing holds nobody back, however
//! long it stays silent, and costs newcomers nothing, however many such connections there
//! are.
//!
//! Whether an earlier connection has bytes pending is told by its reader's own state. A
//! reader *parks* (blocks until bytes come, without taking them), and once woken marks its
//! connection *holding* before it takes them, until it has applied them. Newcomers wait
//! for the holding connections, and peek at two kinds of sockets (a non-blocking peek,
//! through [`Connection::nonblocking`]; the peeked connection's reads tell the resulting
//! `EAGAIN` from a timeout by the socket's toggle count, and retry): the *fresh*, whose
//! threads have not yet reached their first wait, and those that parked in the last
//! 100 ms (a reader may park with bytes already in its socket and be preempted before it
//! sees them). Both are the few connections that are just starting, so a newcomer's cost
//! grows with the rate of new connections, not with how many silent ones are open.
//! While no more than 128 connections are parked (`PEEK_EVERY_PARKED_UP_TO`), newcomers peek at
//! all of them, and nothing is left to the scheduler. Past that, the instant left
//! uncovered is a reader parked for longer, which its bytes have woken
//! and which has not run yet; in the course's case (store, close, connect again, look up)
//! its bytes came before the newcomer was even accepted, so it has been runnable through
//! the newcomer's accept, thread start and first read, and a thread woken from a long
//! sleep is the scheduler's first pick.
//! Only connections that have not yet received anything are waited for, so a handler that
//! writes before its first read (a greeting) should [`settle`](Arrivals::settle) first.
//!
//! The [`request`](crate::request) loop does all of this when given an [`Arrivals`]:
//!
//! ```
//! use switchboard::framing::Framing;
//! use switchboard::order::Arrivals;
//! use switchboard::request::RequestLoop;
//! use switchboard::server::{Server, ServerConfig};
//! use std::collections::HashMap;
//! use std::io::{Read, Write};
//! use std::net::{Shutdown, TcpListener, TcpStream};
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//!
//! // `set,K,V` (no reply) and `get,K`, applied in arrival order across connections.
//! let map = Arc::new(Mutex::new(HashMap::<Vec<u8>, Vec<u8>>::new()));
//! let arrivals = Arrivals::new();
//! let requests = RequestLoop::new(Framing::Line).in_order(&arrivals);
//! let handler = arrivals.handler(move |conn| {
//!     requests.serve(&conn, |req| {
//!         let mut map = map.lock().unwrap();
//!         match req.splitn(3, |&b| b == b',').collect::<Vec<_>>()[..] {
//!             [b"set", k, v] => { map.insert(k.to_vec(), v.to_vec()); None }
//!             [b"get", k] => Some(map.get(k).cloned().unwrap_or_default()),
//!             _ => Some(b"?".to_vec()),
//!         }
//!     })
//! });
//! let listener = TcpListener::bind("127.0.0.1:0")?;
//! let server = Server::with_handler(listener, ServerConfig::default(), handler)?.spawn()?;
//! for i in 0..20 {
//!     // Store and close at once, then ask on a new connection: always seen.
//!     let mut setter = TcpStream::connect(server.local_addr())?;
//!     setter.write_all(format!("set,k,{i}\n").as_bytes())?;
//!     setter.shutdown(Shutdown::Write)?;
//!     let mut getter = TcpStream::connect(server.local_addr())?;
//!     getter.set_read_timeout(Some(Duration::from_secs(10)))?;
//!     getter.write_all(b"get,k\n")?;
//!     getter.shutdown(Shutdown::Write)?;
//!     let mut reply = String::new();
//!     getter.read_to_string(&mut reply)?;
//!     assert_eq!(reply, format!("{i}\n"));
//! }
//! server.stop();
//! # Ok::<(), std::io::Error>(())
//! ```

use crate::server::{Connection, Handler, HandlerError, WeakNonblocking};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The longest a connection waits for earlier ones that have bytes pending. They apply
/// them as soon as their threads run, so this bounds only a first request that blocks
/// (a queue that is full) or a machine that is badly overloaded.
pub const MAX_WAIT: Duration = Duration::from_millis(50);

/// For how long after it parks a connection is still peeked at by newcomers: its reader
/// may have parked with bytes already in its socket and been preempted before it saw them
/// (a machine with a load of 30 does that), or have seen them and not yet run. Peeks are
/// a few system calls each, and only connections that parked this recently are peeked at,
/// so a newcomer's cost grows with the rate of new connections, not with their number.
const PEEK_PARKED_FOR: Duration = Duration::from_millis(100);

/// Up to this many parked connections, a newcomer peeks at every one of them (a few
/// microseconds each), not only at the lately parked: the order then holds whatever the
/// scheduler does. Past it (silent connections by the hundred: an attack, or a crowd of
/// idle clients) a newcomer peeks only at the lately parked, so its cost stays bounded.
const PEEK_EVERY_PARKED_UP_TO: usize = 128;

/// Where an unsettled connection's reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Registered; its reader has not yet started waiting for its first bytes (its thread
    /// may not have run at all), so only a peek at its socket tells whether bytes came.
    Fresh,
    /// Its reader is blocked until bytes come, and marks it [`Stage::Holding`] as soon as
    /// they do, before taking them: nobody looks at it meanwhile.
    Parked,
    /// Its reader has bytes to take, or has taken some and not yet applied them.
    Holding,
}

/// A connection not yet settled.
struct Unsettled {
    /// Weak: the registry never keeps a socket open; a connection whose thread never
    /// started (or ended without settling) is pruned once its socket is gone.
    stream: WeakNonblocking,
    stage: Stage,
}

/// The unsettled connections, and indexes of the two stages a newcomer must look at, so
/// that its cost does not grow with the number of parked (silent) connections.
#[derive(Default)]
struct Table {
    /// By connection id, which grows in accept order.
    all: BTreeMap<u64, Unsettled>,
    /// Ids in [`Stage::Fresh`]: threads that have not reached their first wait, a few at
    /// any time however many connections are open.
    fresh: BTreeSet<u64>,
    /// Ids in [`Stage::Holding`].
    holding: BTreeSet<u64>,
    /// Ids that parked in the last [`PEEK_PARKED_FOR`], oldest first (some since settled
    /// or woken: they are skipped): a few, at any rate of connections.
    parked_lately: VecDeque<(u64, Instant)>,
}

impl Table {
    /// Moves `id` to `stage`; `false` when it has settled.
    fn set(&mut self, id: u64, stage: Stage) -> bool {
        let Some(entry) = self.all.get_mut(&id) else {
            return false;
        };
        let was = std::mem::replace(&mut entry.stage, stage);
        match was {
            Stage::Fresh => self.fresh.remove(&id),
            Stage::Holding => self.holding.remove(&id),
            Stage::Parked => false,
        };
        match stage {
            Stage::Fresh => self.fresh.insert(id),
            Stage::Holding => self.holding.insert(id),
            Stage::Parked => {
                let now = Instant::now();
                self.forget_parked_before(now);
                self.parked_lately.push_back((id, now));
                false
            }
        };
        true
    }

    /// Forgets `id`; its stage, if it was unsettled.
    fn remove(&mut self, id: u64) -> Option<Stage> {
        let entry = self.all.remove(&id)?;
        self.fresh.remove(&id);
        self.holding.remove(&id);
        Some(entry.stage)
    }

    /// Drops from `parked_lately` what parked longer than [`PEEK_PARKED_FOR`] before `now`.
    fn forget_parked_before(&mut self, now: Instant) {
        while let Some(&(_, at)) = self.parked_lately.front() {
            if now.duration_since(at) < PEEK_PARKED_FOR {
                break;
            }
            self.parked_lately.pop_front();
        }
    }

    /// Whether a connection accepted before `id` holds bytes.
    fn holding_before(&self, id: u64) -> bool {
        self.holding.range(..id).next().is_some()
    }
}

struct Registry {
    unsettled: Mutex<Table>,
    /// Signalled whenever a connection settles or lets go of its bytes.
    settled: Condvar,
    max_wait: Duration,
    /// Peeks made by newcomers at earlier sockets (for the tests: silent connections cost
    /// none).
    peeks: AtomicU64,
}

/// The arrival-order registry of one server: share it (it is a cheap `Clone`) between the
/// server's handler, which registers connections, and the code that serves them.
///
/// Example: the [module docs](crate::order).
#[derive(Clone)]
pub struct Arrivals {
    registry: Arc<Registry>,
}

impl Default for Arrivals {
    fn default() -> Self {
        Arrivals::with_max_wait(MAX_WAIT)
    }
}

impl std::fmt::Debug for Arrivals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.unsettled();
        f.debug_struct("Arrivals")
            .field("unsettled", &table.all.len())
            .field("fresh", &table.fresh.len())
            .field("holding", &table.holding.len())
            .finish()
    }
}

impl Arrivals {
    /// An empty registry whose connections wait at most [`MAX_WAIT`].
    pub fn new() -> Self {
        Arrivals::default()
    }

    /// An empty registry whose connections wait at most `max_wait` for earlier ones.
    pub fn with_max_wait(max_wait: Duration) -> Self {
        Arrivals {
            registry: Arc::new(Registry {
                unsettled: Mutex::default(),
                settled: Condvar::new(),
                max_wait,
                peeks: AtomicU64::new(0),
            }),
        }
    }

    fn unsettled(&self) -> MutexGuard<'_, Table> {
        self.registry
            .unsettled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Wraps a handler so that it registers each connection in accept order and settles
    /// it when it ends: pass the result to [`Server::with_handler`](crate::server::Server::with_handler).
    pub fn handler<F>(&self, handler: F) -> Ordered<F>
    where
        F: Fn(Connection) -> Result<(), HandlerError> + Send + Sync + 'static,
    {
        Ordered {
            arrivals: self.clone(),
            handler,
        }
    }

    /// Registers `conn`. Must run on the accept thread, in accept order (from
    /// [`Handler::accepted`]); [`Arrivals::handler`] does it for you.
    pub fn register(&self, conn: &Connection) {
        let entry = Unsettled {
            stream: conn.nonblocking_weak(),
            stage: Stage::Fresh,
        };
        let mut table = self.unsettled();
        table.all.insert(conn.id, entry);
        table.fresh.insert(conn.id);
    }

    /// Declares that `conn` has acted on everything its first read delivered: younger
    /// connections stop waiting for it. Idempotent; ending the connection (through
    /// [`Ordered`]) settles it too.
    pub fn settle(&self, conn: &Connection) {
        self.settle_id(conn.id);
    }

    fn settle_id(&self, id: u64) {
        if self.unsettled().remove(id).is_some() {
            self.registry.settled.notify_all();
        }
    }

    /// Declares that `conn` has applied everything it read so far but its first request is
    /// not complete yet: younger connections wait for it again only once more bytes are
    /// pending (so a peer that stalls mid-request holds nobody back). Call
    /// [`await_first_bytes`](Arrivals::await_first_bytes) before reading the rest.
    /// `false` when `conn` has already settled.
    pub fn release(&self, conn: &Connection) -> bool {
        if !self.unsettled().set(conn.id, Stage::Parked) {
            return false;
        }
        self.registry.settled.notify_all();
        true
    }

    /// Blocks until `conn`'s peer has sent something (without taking it), then marks the
    /// connection as holding bytes, so that younger connections wait for it from the
    /// moment the bytes leave the socket until it settles. Call before the first read; the
    /// [`request`](crate::request) loop does. `false` when nothing came: the peer closed,
    /// vanished, or stayed idle past the server's idle timeout.
    pub fn await_first_bytes(&self, conn: &Connection) -> bool {
        // Parked, this socket is soon no longer peeked at: bytes arriving wake this thread,
        // which marks the connection before it takes them. Newcomers look only at the
        // fresh, the lately parked and the holding, so silent connections cost them
        // nothing.
        if !self.unsettled().set(conn.id, Stage::Parked) {
            return conn.wait_readable();
        }
        if !conn.wait_readable() {
            return false;
        }
        self.unsettled().set(conn.id, Stage::Holding);
        true
    }

    /// Waits until no connection accepted before `conn` is unsettled with bytes pending,
    /// or the registry's maximum wait has passed. Returns at once in the common case
    /// (nobody earlier, or only silent connections).
    pub fn wait_for_earlier(&self, conn: &Connection) {
        let deadline = Instant::now() + self.registry.max_wait;
        loop {
            // The fresh are looked at outside the lock; the holding are waited for.
            let mut fresh = Vec::new();
            let mut busy;
            {
                let mut table = self.unsettled();
                busy = table.holding_before(conn.id);
                if !busy {
                    let mut gone = Vec::new();
                    for &id in table.fresh.range(..conn.id) {
                        let stream = &table.all[&id].stream;
                        match stream.upgrade() {
                            None => gone.push(id),
                            Some(_) => fresh.push(stream.clone()),
                        }
                    }
                    for id in gone {
                        table.remove(id);
                    }
                    table.forget_parked_before(Instant::now());
                    let parked = table.all.len() - table.fresh.len() - table.holding.len();
                    if parked <= PEEK_EVERY_PARKED_UP_TO {
                        // Few silent connections: peek at every one, so that no scheduling
                        // of their readers can reorder anything.
                        for e in table.all.range(..conn.id).map(|(_, e)| e) {
                            if e.stage == Stage::Parked {
                                fresh.push(e.stream.clone());
                            }
                        }
                    } else {
                        for &(id, _) in &table.parked_lately {
                            match table.all.get(&id) {
                                Some(e) if id < conn.id && e.stage == Stage::Parked => {
                                    fresh.push(e.stream.clone());
                                }
                                _ => {}
                            }
                        }
                    }
                }
            }
            // A connection marks itself holding (under the lock) before it takes its bytes
            // out of the socket, so a peek that finds none means: none were pending, or
            // they were taken after the list was made, and the mark is seen now.
            if !busy && !fresh.is_empty() {
                let peeks = &self.registry.peeks;
                peeks.fetch_add(fresh.len() as u64, Ordering::Relaxed);
                busy = fresh.iter().any(has_pending) || self.unsettled().holding_before(conn.id);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !busy || left.is_zero() {
                return;
            }
            let unsettled = self.unsettled();
            // Woken when one settles or lets go, or soon anyway: the list is made again.
            drop(
                self.registry
                    .settled
                    .wait_timeout(unsettled, left.min(Duration::from_millis(5)))
                    .unwrap_or_else(PoisonError::into_inner),
            );
        }
    }
}

/// Whether bytes are waiting in the socket, without blocking and without taking them (its
/// own reader tells the instant's `EAGAIN` from a timeout: see [`Connection`]).
fn has_pending(stream: &WeakNonblocking) -> bool {
    stream
        .upgrade()
        .is_some_and(|stream| stream.run(|s| s.peek(&mut [0u8; 1])).is_ok_and(|n| n > 0))
}

/// A handler that keeps arrival order: see [`Arrivals::handler`].
///
/// Example: the [module docs](crate::order).
pub struct Ordered<F> {
    arrivals: Arrivals,
    handler: F,
}

impl<F> Handler for Ordered<F>
where
    F: Fn(Connection) -> Result<(), HandlerError> + Send + Sync + 'static,
{
    fn handle(&self, conn: Connection) -> Result<(), HandlerError> {
        let settle = Settle {
            arrivals: &self.arrivals,
            id: conn.id,
        };
        let result = (self.handler)(conn);
        drop(settle);
        result
    }

    fn accepted(&self, conn: &Connection) {
        self.arrivals.register(conn);
    }
}

/// Settles a connection however its handler ends (a panic included).
struct Settle<'a> {
    arrivals: &'a Arrivals,
    id: u64,
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        self.arrivals.settle_id(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::Framing;
    use crate::request::RequestLoop;
    use crate::server::{RunningServer, Server, ServerConfig};
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// `set,K,V` (no reply) and `get,K`, in arrival order, with `arrivals`.
    fn map_server(arrivals: &Arrivals) -> RunningServer {
        let map = Arc::new(Mutex::new(HashMap::<Vec<u8>, Vec<u8>>::new()));
        let requests = RequestLoop::new(Framing::Line).in_order(arrivals);
        let handler = arrivals.handler(move |conn| {
            requests.serve(&conn, |req| {
                let mut map = map.lock().unwrap();
                match req.splitn(3, |&b| b == b',').collect::<Vec<_>>()[..] {
                    [b"set", k, v] => {
                        map.insert(k.to_vec(), v.to_vec());
                        None
                    }
                    [b"get", k] => Some(map.get(k).cloned().unwrap_or_default()),
                    _ => Some(b"?".to_vec()),
                }
            })
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Server::with_handler(listener, ServerConfig::named("order"), handler)
            .unwrap()
            .spawn()
            .unwrap()
    }

    use crate::testing::connect;

    /// Sets `k` to `value` on a connection closed at once, then reads `k` on a new one.
    fn set_then_get(addr: SocketAddr, value: &str) -> String {
        let mut setter = connect(addr);
        setter
            .write_all(format!("set,k,{value}\n").as_bytes())
            .unwrap();
        setter.shutdown(Shutdown::Write).unwrap();
        let mut getter = connect(addr);
        getter.write_all(b"get,k\n").unwrap();
        getter.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        getter.read_to_string(&mut reply).unwrap();
        reply
    }

    #[test]
    fn silent_connections_opened_before_a_client_do_not_hold_it_back() {
        // Waiting for a silent connection would last an hour, and the getter's read would
        // time out: the replies below prove nobody waited for the silent ones.
        let arrivals = Arrivals::with_max_wait(Duration::from_secs(3600));
        let server = map_server(&arrivals);
        let addr = server.local_addr();
        let silent: Vec<TcpStream> = (0..3).map(|_| connect(addr)).collect();
        for i in 0..20 {
            assert_eq!(set_then_get(addr, &i.to_string()), format!("{i}\n"));
        }
        // A silent connection that finally speaks is served like any other.
        let mut late = &silent[1];
        late.write_all(b"get,k\n").unwrap();
        let mut reply = [0u8; 3];
        late.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"19\n");
        drop(silent);
        server.stop();
    }

    #[test]
    fn newcomers_do_not_look_at_many_parked_silent_connections() {
        // 40 newcomers after that many silent connections: peeking at every earlier silent
        // one would be 7,120 peeks; only a setter whose thread had not started yet is
        // looked at.
        let peeks = peeks_of_40_newcomers_after(PEEK_EVERY_PARKED_UP_TO + 50);
        assert!(peeks <= 80, "{peeks} peeks");
    }

    #[test]
    fn newcomers_peek_at_every_parked_connection_while_they_are_few() {
        // Nothing is left to the scheduler: every newcomer looks at all 50.
        let peeks = peeks_of_40_newcomers_after(50);
        assert!(peeks >= 40 * 50, "{peeks} peeks");
    }

    /// Opens `silent` connections that send nothing, waits until they are parked and no
    /// longer lately, then makes 20 set-then-get pairs (40 newcomers); the peeks they made.
    fn peeks_of_40_newcomers_after(silent: usize) -> u64 {
        let arrivals = Arrivals::with_max_wait(Duration::from_secs(3600));
        let server = map_server(&arrivals);
        let addr = server.local_addr();
        let conns: Vec<TcpStream> = (0..silent).map(|_| connect(addr)).collect();
        for id in 0..silent as u64 {
            until(&arrivals, id, |e| {
                e.is_some_and(|e| e.stage == Stage::Parked)
            });
        }
        // Parked long enough that they are no longer lately parked (the time is the thing
        // tested, not a wait for the server).
        std::thread::sleep(PEEK_PARKED_FOR);
        for i in 0..20 {
            assert_eq!(set_then_get(addr, &i.to_string()), format!("{i}\n"));
        }
        let peeks = arrivals.registry.peeks.load(Ordering::Relaxed);
        drop(conns);
        server.stop();
        peeks
    }

    /// Waits until `pred` holds of connection `id`'s entry (`None`: not registered).
    fn until(arrivals: &Arrivals, id: u64, pred: impl Fn(Option<&Unsettled>) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !pred(arrivals.unsettled().all.get(&id)) {
            assert!(Instant::now() < deadline, "connection {id}: timed out");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_first_request_split_across_reads_holds_later_connections_back() {
        let arrivals = Arrivals::with_max_wait(TIMEOUT);
        let server = map_server(&arrivals);
        let mut setter = connect(server.local_addr());
        until(&arrivals, 0, |e| e.is_some());
        setter.write_all(b"set,k,fir").unwrap();
        // Until its reader has taken the partial request (and settled, or let go of it):
        // parked again with nothing left in its socket.
        until(&arrivals, 0, |e| {
            e.is_none_or(|e| {
                e.stage == Stage::Parked && e.stream.upgrade().is_some() && !has_pending(&e.stream)
            })
        });
        assert!(
            arrivals.unsettled().all.contains_key(&0),
            "settled with part of its first request still to apply"
        );
        // The rest, then a lookup on a new connection: it waits for the setter.
        setter.write_all(b"st\n").unwrap();
        setter.shutdown(Shutdown::Write).unwrap();
        let mut getter = connect(server.local_addr());
        getter.write_all(b"get,k\n").unwrap();
        getter.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        getter.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "first\n");
        server.stop();
    }

    #[test]
    fn a_first_batch_applied_settles_before_its_replies_are_written() {
        // A client whose first batch asks for 37.5 MiB of replies and never reads them: its
        // write blocks for good. Applied, it holds nobody back (it used to settle only once
        // the replies were written: every later connection waited the maximum wait).
        let arrivals = Arrivals::with_max_wait(Duration::from_secs(3600));
        let server = map_server(&arrivals);
        let mut setter = connect(server.local_addr());
        let value = "v".repeat(128 << 10);
        setter
            .write_all(format!("set,k,{value}\n").as_bytes())
            .unwrap();
        setter.shutdown(Shutdown::Write).unwrap();
        until(&arrivals, 0, |e| e.is_none());
        let mut hog = connect(server.local_addr());
        // 1.8 KB of requests, taken by one read (the reader's first buffer is 2 KiB, so
        // the batch is all of its first requests), asking for 37.5 MiB.
        hog.write_all("get,k\n".repeat(300).as_bytes()).unwrap();
        let mut getter = connect(server.local_addr());
        getter.write_all(b"set,j,after\nget,j\n").unwrap();
        getter.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        getter.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "after\n");
        drop(hog);
        server.stop();
    }

    #[test]
    fn one_shot_writers_are_applied_in_accept_order_with_the_default_wait() {
        let arrivals = Arrivals::new();
        let server = map_server(&arrivals);
        let silent = connect(server.local_addr());
        for i in 0..50 {
            let value = format!("v{i}");
            assert_eq!(
                set_then_get(server.local_addr(), &value),
                format!("{value}\n")
            );
        }
        // Every connection settles as it ends (the silent one too, when the server shuts it
        // down): nothing is left registered once the server has joined their threads.
        let report = server.stop();
        assert_eq!(report.abandoned, 0);
        assert!(arrivals.unsettled().all.is_empty());
        drop(silent);
    }
}
