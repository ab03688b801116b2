//! The opening deadline ([`ServerConfig::opening_timeout`](super::ServerConfig::opening_timeout)):
//! one thread per server shuts down every connection that has not opened in time; a
//! second one, with a deadline of its own, watches the connections in the reserve
//! ([`ServerConfig::reserved_connections`](super::ServerConfig::reserved_connections)).
//!
//! A handler's own read timeouts bound each read, not the opening as a whole: a client that
//! trickles a hello one byte per timeout could hold its thread for as long as the hello may
//! be long. Shutting the socket down ends whatever the handler is blocked in, however it
//! reads.

use crate::log_info;
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Entries kept at least before opened and closed ones are swept out of the queue.
const SWEEP_FROM: usize = 1024;

/// A connection being watched.
struct Watched {
    deadline: Instant,
    id: u64,
    peer: SocketAddr,
    stream: Weak<TcpStream>,
    opened: Arc<AtomicBool>,
}

impl Watched {
    /// The socket, if the connection is still open and has not opened yet.
    fn pending(&self) -> Option<Arc<TcpStream>> {
        if self.opened.load(Ordering::Acquire) {
            return None;
        }
        self.stream.upgrade()
    }
}

/// The watching thread of one server, and the queue that feeds it; dropping it stops the
/// thread and joins it.
pub(super) struct Watch {
    timeout: Duration,
    tx: Option<Sender<Watched>>,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    /// Starts the thread (`NAME-WHAT`: `opening`, or `reserve` for the reserve's watch).
    pub(super) fn start(name: &str, what: &str, timeout: Duration) -> io::Result<Watch> {
        let (tx, rx) = unbounded();
        let owned = name.to_owned();
        let thread = thread::Builder::new()
            .name(format!("{name}-{what}"))
            .stack_size(64 << 10)
            .spawn(move || run(&owned, timeout, &rx))?;
        Ok(Watch {
            timeout,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Watches connection `id` from now: unless the flag returned is set within the
    /// timeout, its socket is shut down (both ways).
    pub(super) fn watch(
        &self,
        id: u64,
        peer: SocketAddr,
        stream: &Arc<TcpStream>,
    ) -> Arc<AtomicBool> {
        let opened = Arc::new(AtomicBool::new(false));
        if let Some(tx) = &self.tx {
            let _ = tx.send(Watched {
                deadline: Instant::now() + self.timeout,
                id,
                peer,
                stream: Arc::downgrade(stream),
                opened: Arc::clone(&opened),
            });
        }
        opened
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread: entries arrive in the order of their deadlines (one accepting thread, one
/// timeout), so the queue's front is always the next one due.
fn run(name: &str, timeout: Duration, rx: &Receiver<Watched>) {
    let mut queue: VecDeque<Watched> = VecDeque::new();
    let mut sweep_at = SWEEP_FROM;
    loop {
        let next = match queue.front() {
            Some(first) => rx.recv_deadline(first.deadline),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(watched) => {
                queue.push_back(watched);
                // Connections that opened (or ended) early would otherwise wait here until
                // their deadline: a burst of them is swept, so the queue holds about as
                // many entries as there are connections still opening.
                if queue.len() >= sweep_at {
                    queue.retain(|w| w.pending().is_some());
                    sweep_at = (queue.len() * 2).max(SWEEP_FROM);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        while queue.front().is_some_and(|w| w.deadline <= now) {
            let Some(due) = queue.pop_front() else { break };
            if let Some(stream) = due.pending() {
                log_info!(
                    "{name}: connection {} from {} did not open within {timeout:?}; closed",
                    due.id,
                    due.peer
                );
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}
