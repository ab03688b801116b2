//! A fault-injecting TCP proxy for partition tests and benchmarks: it forwards every
//! connection to one target and can cut, heal, cut one way, or slow the traffic, the way a
//! network fails, without closing anything.
//!
//! A cut network drops packets: the process behind it is alive, nothing is refused or
//! closed, and later everything flows again. TCP retransmits what was dropped, so bytes sent
//! during a cut arrive after the heal (unless an end gives up first). The proxy models
//! exactly that: during a cut it stops reading from the sending side (its kernel buffers
//! fill, writes eventually block) and holds what it has already read, end-of-stream
//! included; a connection accepted during a cut is dialled onwards only once the path is
//! whole again, as a SYN retried after the heal would be. What it cannot model is a connect
//! that hangs in the kernel: the client's connect completes at once against the proxy's
//! listener, and then no byte passes.
//!
//! ```
//! use std::io::{Read, Write};
//! use std::net::{TcpListener, TcpStream};
//! use std::time::Duration;
//! use switchboard::proxy::FaultProxy;
//!
//! let target = TcpListener::bind("127.0.0.1:0")?;
//! let proxy = FaultProxy::start(target.local_addr()?)?;
//! let mut client = TcpStream::connect(proxy.local_addr())?;
//! let (mut server, _) = target.accept()?;
//! server.set_read_timeout(Some(Duration::from_millis(200)))?;
//!
//! proxy.cut();
//! client.write_all(b"held")?;
//! let mut buf = [0u8; 4];
//! assert!(server.read_exact(&mut buf).is_err(), "nothing passes a cut");
//!
//! proxy.heal();
//! server.set_read_timeout(Some(Duration::from_secs(10)))?;
//! server.read_exact(&mut buf)?;
//! assert_eq!(&buf, b"held", "what was sent during the cut arrives after the heal");
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Which way the bytes go, seen from the proxy's clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client that connected to the proxy towards the target.
    ToTarget,
    /// From the target back to the client.
    FromTarget,
}

/// What the network between the two sides does now.
#[derive(Debug, Clone, Copy)]
struct Path {
    to_target: bool,
    from_target: bool,
    /// Added before each chunk is passed on.
    delay: Duration,
    stopping: bool,
}

impl Path {
    fn open(&self, d: Direction) -> bool {
        match d {
            Direction::ToTarget => self.to_target,
            Direction::FromTarget => self.from_target,
        }
    }
}

struct Shared {
    target: SocketAddr,
    path: Mutex<Path>,
    changed: Condvar,
    /// Every socket the proxy holds, so that stopping it wakes every blocked read.
    sockets: Mutex<Vec<Arc<TcpStream>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn path(&self) -> MutexGuard<'_, Path> {
        self.path.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, f: impl FnOnce(&mut Path)) {
        f(&mut self.path());
        self.changed.notify_all();
    }

    /// Blocks while `d` is cut; returns the delay to apply, or `None` when stopping.
    fn wait_open(&self, d: Direction) -> Option<Duration> {
        let mut path = self.path();
        loop {
            if path.stopping {
                return None;
            }
            if path.open(d) {
                return Some(path.delay);
            }
            path = self
                .changed
                .wait(path)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn hold(&self, s: &Arc<TcpStream>) {
        let mut sockets = self.sockets.lock().unwrap_or_else(PoisonError::into_inner);
        // A socket only this list still holds belongs to a finished connection.
        sockets.retain(|s| Arc::strong_count(s) > 1);
        sockets.push(Arc::clone(s));
    }

    fn spawn(&self, name: &str, f: impl FnOnce() + Send + 'static) {
        let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        // Finished pumps are dropped here, so a long benchmark does not collect handles.
        threads.retain(|t| !t.is_finished());
        match thread::Builder::new().name(name.to_owned()).spawn(f) {
            Ok(t) => threads.push(t),
            Err(e) => crate::log_info!("proxy: cannot start a thread: {e}"),
        }
    }
}

/// A running proxy; stops (closing every connection it forwards) when dropped.
pub struct FaultProxy {
    shared: Arc<Shared>,
    local: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards each connection to `target`.
    ///
    /// # Errors
    /// When no port can be bound or the accept thread cannot be started.
    pub fn start(target: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((target.ip(), 0))?;
        let local = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            path: Mutex::new(Path {
                to_target: true,
                from_target: true,
                delay: Duration::ZERO,
                stopping: false,
            }),
            changed: Condvar::new(),
            sockets: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        let accept = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("proxy-accept".into())
                .spawn(move || accept_loop(&listener, &shared))?
        };
        Ok(FaultProxy {
            shared,
            local,
            accept: Some(accept),
        })
    }

    /// Where clients connect to reach the target through the proxy.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The address everything is forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// Stops all traffic both ways, without closing anything.
    pub fn cut(&self) {
        self.shared.set(|p| {
            p.to_target = false;
            p.from_target = false;
        });
    }

    /// Stops the traffic one way only; the other way still flows.
    pub fn cut_one_way(&self, d: Direction) {
        self.shared.set(|p| match d {
            Direction::ToTarget => p.to_target = false,
            Direction::FromTarget => p.from_target = false,
        });
    }

    /// Lets everything flow again, held bytes first.
    pub fn heal(&self) {
        self.shared.set(|p| {
            p.to_target = true;
            p.from_target = true;
        });
    }

    /// Delays every chunk passed on by `delay` (zero: full speed).
    pub fn slow(&self, delay: Duration) {
        self.shared.set(|p| p.delay = delay);
    }

    fn stop_now(&mut self) {
        self.shared.set(|p| p.stopping = true);
        // Wake the blocking accept; it sees the flag first.
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_secs(1));
        for s in self
            .shared
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let threads = std::mem::take(
            &mut *self
                .shared
                .threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.path().stopping {
            return;
        }
        let Ok(client) = client else { continue };
        let client = Arc::new(client);
        shared.hold(&client);
        let s = Arc::clone(shared);
        shared.spawn("proxy-conn", move || connect_onwards(&s, client));
    }
}

/// Dials the target once the path is whole (a SYN needs both ways), then pumps both ways.
fn connect_onwards(shared: &Arc<Shared>, client: Arc<TcpStream>) {
    loop {
        if shared.wait_open(Direction::ToTarget).is_none()
            || shared.wait_open(Direction::FromTarget).is_none()
        {
            return;
        }
        let p = *shared.path();
        if p.to_target && p.from_target {
            break;
        }
    }
    let target = match TcpStream::connect_timeout(&shared.target, Duration::from_secs(5)) {
        Ok(t) => Arc::new(t),
        Err(_) => {
            // The target refuses: so does the proxy, by closing.
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    };
    let _ = target.set_nodelay(true);
    let _ = client.set_nodelay(true);
    shared.hold(&target);
    let (s, from, to) = (Arc::clone(shared), Arc::clone(&target), Arc::clone(&client));
    shared.spawn("proxy-pump", move || {
        pump(&s, &from, &to, Direction::FromTarget)
    });
    pump(shared, &client, &target, Direction::ToTarget);
}

/// Copies `from` to `to` while the path allows it; holds what it read during a cut.
fn pump(shared: &Shared, from: &TcpStream, to: &TcpStream, d: Direction) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if shared.wait_open(d).is_none() {
            return;
        }
        let n = match (&*from).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        // A cut that began while this read was blocked holds its bytes (or its end of
        // stream) until the heal, as the network would.
        let Some(delay) = shared.wait_open(d) else {
            return;
        };
        if n == 0 {
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
        if !delay.is_zero() {
            thread::sleep(delay);
        }
        if (&*to).write_all(&buf[..n]).is_err() {
            let _ = from.shutdown(Shutdown::Read);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const WAIT: Duration = Duration::from_secs(10);
    /// How long a test listens for bytes that must not arrive.
    const QUIET: Duration = Duration::from_millis(300);

    fn pair(proxy: &FaultProxy, target: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(proxy.local_addr()).unwrap();
        let (server, _) = target.accept().unwrap();
        for s in [&client, &server] {
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.set_write_timeout(Some(WAIT)).unwrap();
        }
        (client, server)
    }

    fn read_n(mut s: &TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).unwrap();
        buf
    }

    fn nothing_arrives(mut s: &TcpStream) {
        s.set_read_timeout(Some(QUIET)).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            other => panic!("expected silence, got {other:?}"),
        }
        s.set_read_timeout(Some(WAIT)).unwrap();
    }

    fn setup() -> (TcpListener, FaultProxy) {
        let target = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = FaultProxy::start(target.local_addr().unwrap()).unwrap();
        (target, proxy)
    }

    #[test]
    fn forwards_both_ways_and_end_of_stream() {
        let (target, proxy) = setup();
        let (mut c, mut s) = pair(&proxy, &target);
        c.write_all(b"ping").unwrap();
        assert_eq!(read_n(&s, 4), b"ping");
        s.write_all(b"pong").unwrap();
        assert_eq!(read_n(&c, 4), b"pong");
        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn a_cut_holds_bytes_and_end_of_stream_until_the_heal() {
        let (target, proxy) = setup();
        let (mut c, mut s) = pair(&proxy, &target);
        proxy.cut();
        c.write_all(b"during").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        s.write_all(b"back").unwrap();
        nothing_arrives(&s);
        nothing_arrives(&c);
        proxy.heal();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"during", "held bytes, then the held end of stream");
        assert_eq!(read_n(&c, 4), b"back");
    }

    #[test]
    fn a_one_way_cut_lets_the_other_way_flow() {
        let (target, proxy) = setup();
        let (mut c, mut s) = pair(&proxy, &target);
        proxy.cut_one_way(Direction::ToTarget);
        c.write_all(b"lost?").unwrap();
        s.write_all(b"heard").unwrap();
        assert_eq!(read_n(&c, 5), b"heard");
        nothing_arrives(&s);
        proxy.heal();
        assert_eq!(read_n(&s, 5), b"lost?");
    }

    #[test]
    fn a_connection_made_during_a_cut_reaches_the_target_only_after_the_heal() {
        let (target, proxy) = setup();
        proxy.cut();
        let mut c = TcpStream::connect(proxy.local_addr()).unwrap();
        c.write_all(b"early").unwrap();
        target.set_nonblocking(true).unwrap();
        thread::sleep(QUIET);
        assert!(
            matches!(target.accept(), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "no connection may reach the target through a cut"
        );
        proxy.heal();
        let deadline = Instant::now() + WAIT;
        let s = loop {
            match target.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept after heal: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        assert_eq!(read_n(&s, 5), b"early");
    }

    #[test]
    fn a_refusing_target_closes_the_client() {
        let target = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = target.local_addr().unwrap();
        drop(target);
        let proxy = FaultProxy::start(addr).unwrap();
        let mut c = TcpStream::connect(proxy.local_addr()).unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    }

    #[test]
    fn stopping_closes_every_forwarded_connection() {
        let (target, proxy) = setup();
        let (c, s) = pair(&proxy, &target);
        proxy.cut();
        drop(proxy);
        for mut end in [&c, &s] {
            let mut b = [0u8; 1];
            assert!(matches!(end.read(&mut b), Ok(0) | Err(_)));
        }
    }

    #[test]
    fn slow_delays_without_losing_order() {
        let (target, proxy) = setup();
        let (mut c, s) = pair(&proxy, &target);
        proxy.slow(Duration::from_millis(20));
        let started = Instant::now();
        for i in 0..5u8 {
            c.write_all(&[i]).unwrap();
            assert_eq!(read_n(&s, 1), [i]);
        }
        assert!(started.elapsed() >= Duration::from_millis(100));
    }
}
