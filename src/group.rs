//! Tracked threads: a [`Group`] starts named threads, registers the sockets they serve, and
//! at shutdown closes every socket and joins every thread by a deadline, naming the ones
//! that did not finish. One implementation for every tracked thread: the server's
//! connection threads ([`crate::server`]) and every service's background threads.
//!
//! ```
//! use switchboard::group::Group;
//! use std::io::Read;
//! use std::net::{TcpListener, TcpStream};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! let listener = TcpListener::bind("127.0.0.1:0")?;
//! let client = TcpStream::connect(listener.local_addr()?)?;
//! let (served, _) = listener.accept()?;
//! let served = Arc::new(served);
//!
//! let group = Group::new("demo");
//! let registration = group.register(&served)?;
//! group.spawn("demo-reader", move || {
//!     let mut buf = [0u8; 64];
//!     // Blocks until `close` shuts the registered socket down.
//!     while matches!((&*served).read(&mut buf), Ok(n) if n > 0) {}
//!     drop(registration);
//! })?;
//! let report = group.close(Duration::from_secs(5));
//! assert_eq!((report.joined, report.stragglers.len()), (1, 0));
//! drop(client);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::log_info;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A set of tracked threads and registered sockets (example: [the module
/// docs](crate::group)); cloneable, usable from any thread (a tracked thread may start more).
#[derive(Clone)]
pub struct Group(Arc<Inner>);

struct Inner {
    name: String,
    stack_size: Option<usize>,
    state: Mutex<State>,
    /// Signalled whenever a tracked thread finishes its body.
    finished: Condvar,
}

#[derive(Default)]
struct State {
    /// Set by [`Group::shutdown`]: no thread starts and no socket registers after it.
    closing: bool,
    next: u64,
    threads: HashMap<u64, Tracked>,
    /// Threads whose bodies have returned, not yet joined: reaping visits only these, so a
    /// group of ten thousand live threads (a server's connections) pays nothing per spawn
    /// for the ones still running.
    done: Vec<u64>,
    sockets: HashMap<u64, Arc<TcpStream>>,
}

struct Tracked {
    name: String,
    thread: Option<JoinHandle<()>>,
}

/// Why [`Group::spawn`] or [`Group::register`] refused.
#[derive(Debug)]
pub enum GroupError {
    /// The group is shutting down (a registered socket was shut down at once).
    Closing,
    /// The OS would not start a thread.
    Io(io::Error),
}

impl fmt::Display for GroupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupError::Closing => f.write_str("shutting down"),
            GroupError::Io(e) => write!(f, "cannot start a thread: {e}"),
        }
    }
}

impl std::error::Error for GroupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GroupError::Io(e) => Some(e),
            GroupError::Closing => None,
        }
    }
}

/// What [`Group::join`] found at its deadline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JoinReport {
    /// Threads joined.
    pub joined: usize,
    /// Names of the threads still running at the deadline, left detached.
    pub stragglers: Vec<String>,
}

/// Keeps a socket registered with its group; dropping it unregisters the socket, so the
/// group holds only live connections.
#[must_use = "dropping the registration unregisters the socket at once"]
pub struct Registration {
    group: Arc<Inner>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.group.state().sockets.remove(&self.id);
    }
}

/// Marks its thread finished however the body ends (returns or panics).
struct Finish {
    group: Arc<Inner>,
    id: u64,
    /// Set as the thread starts. A thread that cannot be created drops its body, and with
    /// it this guard, inside `spawn`, which holds the state lock: the guard must not take
    /// it then (the lock is not reentrant), and `spawn` removes the entry itself.
    started: bool,
}

impl Drop for Finish {
    fn drop(&mut self) {
        if !self.started {
            return;
        }
        let mut st = self.group.state();
        // Its body has returned (or unwound): joining it cannot block for long.
        if st.threads.contains_key(&self.id) {
            st.done.push(self.id);
        }
        drop(st);
        self.group.finished.notify_all();
    }
}

impl State {
    /// Takes the finished threads out of the table, to be joined without the lock.
    fn reap(&mut self) -> Vec<JoinHandle<()>> {
        let done = std::mem::take(&mut self.done);
        done.iter()
            .filter_map(|id| self.threads.remove(id).and_then(|t| t.thread))
            .collect()
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing under this lock panics; recover rather than cascade if something did.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Group {
    /// An empty group; `name` prefixes its log lines.
    pub fn new(name: &str) -> Group {
        Group::build(name, None)
    }

    /// An empty group whose threads get stacks of `bytes` (a link or writer thread touches
    /// a few pages; thousands fit where the 2 MiB default would not).
    pub fn with_stack_size(name: &str, bytes: usize) -> Group {
        Group::build(name, Some(bytes))
    }

    fn build(name: &str, stack_size: Option<usize>) -> Group {
        Group(Arc::new(Inner {
            name: name.to_owned(),
            stack_size,
            state: Mutex::new(State::default()),
            finished: Condvar::new(),
        }))
    }

    /// Starts a named thread that [`Group::join`] will wait for. Finished threads are
    /// joined here, so the group stays as large as the threads that are live.
    ///
    /// # Errors
    /// [`GroupError::Closing`] after [`Group::shutdown`]; [`GroupError::Io`] when the OS
    /// will not start a thread (logged here).
    pub fn spawn(
        &self,
        name: impl Into<String>,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<(), GroupError> {
        let name = name.into();
        // The lock is held across the start, so `shutdown` either refuses this thread or
        // finds it: no thread escapes a join by starting during shutdown.
        let mut st = self.0.state();
        if st.closing {
            return Err(GroupError::Closing);
        }
        let finished = st.reap();
        let id = st.next;
        st.next += 1;
        let finish = Finish {
            group: Arc::clone(&self.0),
            id,
            started: false,
        };
        let mut builder = thread::Builder::new().name(name.clone());
        if let Some(bytes) = self.0.stack_size {
            builder = builder.stack_size(bytes);
        }
        // Registered before the thread can run, so its `Finish` always finds its entry.
        st.threads.insert(
            id,
            Tracked {
                name: name.clone(),
                thread: None,
            },
        );
        // The body waits in a slot this call holds too: a thread that cannot be created
        // drops its closure inside `builder.spawn`, under the state lock, and what a body
        // owns may take that lock when dropped (a socket's registration). Left in the
        // slot, it is dropped below, after the lock.
        let body = Arc::new(Mutex::new(Some(body)));
        let slot = Arc::clone(&body);
        let spawned = builder.spawn(move || {
            let mut finish = finish;
            finish.started = true;
            let body = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            drop(slot);
            if let Some(body) = body {
                body();
            }
        });
        let result = match spawned {
            Ok(thread) => {
                if let Some(t) = st.threads.get_mut(&id) {
                    t.thread = Some(thread);
                }
                Ok(())
            }
            Err(e) => {
                st.threads.remove(&id);
                // A `join` may be waiting for the table to empty.
                self.0.finished.notify_all();
                log_info!("{}: cannot start thread {name}: {e}", self.0.name);
                Err(GroupError::Io(e))
            }
        };
        drop(st);
        drop(body);
        // Their bodies have returned; each join waits for an unwinding stack at most.
        for thread in finished {
            let _ = thread.join();
        }
        result
    }

    /// Registers `stream`, so [`Group::shutdown`] shuts it down, until the returned
    /// [`Registration`] is dropped.
    ///
    /// # Errors
    /// [`GroupError::Closing`] after [`Group::shutdown`]; the stream is shut down then, so a
    /// connection opened during shutdown (a dial, a handshake) ends at once.
    pub fn register(&self, stream: &Arc<TcpStream>) -> Result<Registration, GroupError> {
        let mut st = self.0.state();
        if st.closing {
            let _ = stream.shutdown(Shutdown::Both);
            return Err(GroupError::Closing);
        }
        let id = st.next;
        st.next += 1;
        st.sockets.insert(id, Arc::clone(stream));
        Ok(Registration {
            group: Arc::clone(&self.0),
            id,
        })
    }

    /// Refuses new threads and sockets from now on and shuts down every registered socket,
    /// which ends the blocking reads and writes of the threads serving them. Idempotent.
    pub fn shutdown(&self) {
        let mut st = self.0.state();
        st.closing = true;
        for socket in st.sockets.values() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    /// Whether [`Group::shutdown`] has been called.
    pub fn is_closing(&self) -> bool {
        self.0.state().closing
    }

    /// Threads started and not yet joined (finished ones included until they are).
    pub fn len(&self) -> usize {
        self.0.state().threads.len()
    }

    /// Threads whose bodies are still running.
    pub fn live(&self) -> usize {
        let st = self.0.state();
        st.threads.len() - st.done.len()
    }

    /// Whether no thread is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until every tracked thread has finished, or `within` has passed, joining each
    /// as it finishes (threads started meanwhile included). Threads still running then are
    /// reported by name and stay tracked (a later join may still join them; dropping the
    /// group leaves them detached). Does not shut anything down: call
    /// [`Group::shutdown`] first, or use [`Group::close`], unless the threads end by
    /// themselves (writers flushing what is queued).
    pub fn join(&self, within: Duration) -> JoinReport {
        let deadline = Instant::now() + within;
        let mut report = JoinReport::default();
        let mut st = self.0.state();
        loop {
            let threads = st.reap();
            if !threads.is_empty() {
                // Joined without the lock: an unwinding thread may still take it.
                drop(st);
                for thread in threads {
                    let _ = thread.join();
                    report.joined += 1;
                }
                st = self.0.state();
                continue;
            }
            if st.threads.is_empty() {
                return report;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .0
                .finished
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let mut stragglers: Vec<String> = st.threads.values().map(|t| t.name.clone()).collect();
        stragglers.sort();
        report.stragglers = stragglers;
        report
    }

    /// [`Group::shutdown`], then [`Group::join`] by `within`; stragglers are logged.
    pub fn close(&self, within: Duration) -> JoinReport {
        self.shutdown();
        let report = self.join(within);
        if !report.stragglers.is_empty() {
            log_info!(
                "{}: {} thread(s) still running after {within:?}, left behind: {}",
                self.0.name,
                report.stragglers.len(),
                report.stragglers.join(", ")
            );
        }
        report
    }
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.0.state();
        f.debug_struct("Group")
            .field("name", &self.0.name)
            .field("threads", &st.threads.len())
            .field("sockets", &st.sockets.len())
            .field("closing", &st.closing)
            .finish()
    }
}

/// Something that can be asked to stop: the handle of a service's main loop.
pub trait Stop {
    /// Asks the service to stop; returns at once.
    fn stop(&self);
}

/// A service's main loop on a thread of its own, with its handle; stopped (asked, then
/// joined) when dropped, so a test's server never outlives the test.
///
/// ```
/// use switchboard::group::{Running, Stop};
/// use crossbeam_channel::{bounded, Sender};
///
/// struct Handle(Sender<()>);
/// impl Stop for Handle {
///     fn stop(&self) {
///         let _ = self.0.try_send(());
///     }
/// }
///
/// let (stop, stopped) = bounded(1);
/// let running = Running::spawn("service", Handle(stop), move || {
///     let mut served = 0;
///     while stopped.try_recv().is_err() && served < 1_000_000 {
///         served += 1;
///     }
///     served
/// })?;
/// assert!(running.stop().is_some());
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Running<H: Stop, T> {
    handle: H,
    thread: Option<JoinHandle<T>>,
}

impl<H: Stop, T: Send + 'static> Running<H, T> {
    /// Runs `body` on a thread named `name`; `handle` stops it.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn spawn(
        name: &str,
        handle: H,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<Running<H, T>> {
        let thread = thread::Builder::new().name(name.into()).spawn(body)?;
        Ok(Running {
            handle,
            thread: Some(thread),
        })
    }

    /// The handle of the running service.
    pub fn handle(&self) -> &H {
        &self.handle
    }

    /// Stops the service and waits for its result (`None` if its thread panicked).
    pub fn stop(mut self) -> Option<T> {
        self.handle.stop();
        self.thread.take().and_then(|t| t.join().ok())
    }

    /// Waits until the service stops by other means (its handle, a signal).
    pub fn wait(mut self) -> Option<T> {
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl<H: Stop, T> Drop for Running<H, T> {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.handle.stop();
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{bounded, Sender};
    use std::io::Read;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, Arc<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (served, _) = listener.accept().unwrap();
        served
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (client, Arc::new(served))
    }

    #[test]
    fn close_shuts_registered_sockets_and_joins_their_threads() {
        let group = Group::with_stack_size("test", 64 << 10);
        let (_client, served) = pair();
        let reg = group.register(&served).unwrap();
        let (tx, rx) = bounded(1);
        group
            .spawn("test-reader", move || {
                let mut buf = [0u8; 8];
                let n = (&*served).read(&mut buf);
                drop(reg);
                let _ = tx.send(n.map_err(|e| e.kind()));
            })
            .unwrap();
        let started = Instant::now();
        let report = group.close(Duration::from_secs(5));
        assert_eq!(
            report,
            JoinReport {
                joined: 1,
                stragglers: vec![]
            }
        );
        // Ended by the shutdown (a read of 0), not by its 10 s read timeout.
        assert_eq!(rx.try_recv().unwrap(), Ok(0));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(group.is_empty());
    }

    #[test]
    fn join_by_a_deadline_names_the_stragglers() {
        let group = Group::new("test");
        let (release, wait) = bounded::<()>(0);
        group
            .spawn("test-stuck", move || {
                let _ = wait.recv_timeout(Duration::from_secs(10));
            })
            .unwrap();
        group.spawn("test-quick", || {}).unwrap();
        let report = group.close(Duration::from_millis(200));
        assert_eq!(report.joined, 1);
        assert_eq!(report.stragglers, ["test-stuck"]);
        drop(release);
    }

    #[test]
    fn after_shutdown_nothing_starts_and_sockets_close_at_once() {
        let group = Group::new("test");
        group.shutdown();
        assert!(group.is_closing());
        assert!(matches!(
            group.spawn("late", || {}),
            Err(GroupError::Closing)
        ));
        let (_client, served) = pair();
        assert!(matches!(group.register(&served), Err(GroupError::Closing)));
        let mut buf = [0u8; 8];
        assert_eq!((&*served).read(&mut buf).unwrap(), 0, "shut down already");
    }

    #[test]
    fn threads_started_by_tracked_threads_are_joined_too() {
        let group = Group::new("test");
        let inner = group.clone();
        let (tx, rx) = bounded(1);
        group
            .spawn("outer", move || {
                let _ = inner.spawn("inner", move || {
                    let _ = tx.send(());
                });
            })
            .unwrap();
        let report = group.join(Duration::from_secs(5));
        assert_eq!(report.joined, 2);
        assert!(report.stragglers.is_empty());
        assert_eq!(rx.try_recv(), Ok(()));
    }

    #[test]
    fn a_dropped_registration_is_not_shut_down() {
        let group = Group::new("test");
        let (_client, served) = pair();
        drop(group.register(&served).unwrap());
        group.shutdown();
        served
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut buf = [0u8; 8];
        let err = (&*served).read(&mut buf).unwrap_err();
        assert!(matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));
    }

    #[test]
    fn a_running_service_is_stopped_when_dropped() {
        struct Flag(Sender<()>);
        impl Stop for Flag {
            fn stop(&self) {
                let _ = self.0.try_send(());
            }
        }
        let (tx, rx) = bounded(1);
        let running = Running::spawn("svc", Flag(tx), move || {
            rx.recv_timeout(Duration::from_secs(10)).is_ok()
        })
        .unwrap();
        assert_eq!(
            running.stop(),
            Some(true),
            "stopped by its handle, not timed out"
        );
        let (tx, rx) = bounded(1);
        let (done_tx, done) = bounded(1);
        let running = Running::spawn("svc", Flag(tx), move || {
            let _ = done_tx.send(rx.recv_timeout(Duration::from_secs(10)).is_ok());
        })
        .unwrap();
        drop(running);
        assert_eq!(done.try_recv(), Ok(true), "joined in drop, after its stop");
    }

    #[test]
    fn a_thread_that_cannot_start_is_an_error_not_a_hang() {
        // A stack no machine can map: the thread cannot be created.
        let group = Group::with_stack_size("test", 1 << 46);
        let (tx, rx) = bounded(1);
        let g = group.clone();
        thread::spawn(move || {
            let _ = tx.send(g.spawn("huge", || {}).map_err(|e| e.to_string()));
        });
        let result = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("spawn returned");
        assert!(result.is_err(), "{result:?}");
        assert!(group.is_empty());
        assert!(group.join(Duration::from_secs(10)).stragglers.is_empty());
    }

    #[test]
    fn a_body_that_cannot_start_is_dropped_outside_the_lock() {
        // The server's connection threads (and the chat's link threads) hold their
        // socket's registration: a thread that cannot be created drops its body, and the
        // registration unregisters the socket, which takes the group's lock.
        let group = Group::with_stack_size("test", 1 << 46);
        let (client, served) = pair();
        let registration = group.register(&served).unwrap();
        let (tx, rx) = bounded(1);
        let g = group.clone();
        thread::spawn(move || {
            let spawned = g.spawn("huge", move || drop(registration));
            let _ = tx.send(spawned.map_err(|e| e.to_string()));
        });
        let result = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("spawn deadlocked dropping a body that holds a registration");
        assert!(result.is_err(), "{result:?}");
        assert!(format!("{group:?}").contains("sockets: 0"), "{group:?}");
        drop(client);
    }
}
