//! Helpers the crate's own tests share: a client socket that cannot hang a test, and a
//! bounded wait for a condition.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Every wait in a test ends within this.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to `addr` whose connect, reads and writes each give up after [`TIMEOUT`].
pub(crate) fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Polls `cond` until it holds; fails the test after [`TIMEOUT`].
pub(crate) fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}
