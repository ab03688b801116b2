//! Load for the messenger's real-process tests (`tests/messenger.rs`,
//! `tests/messenger_majority.rs`): senders in closed loops and receivers logged in
//! throughout, every acknowledged send recorded; [`Raw`], exact bytes over one
//! connection; and [`launch`], how a messenger server is started. Included with `#[path]`
//! next to `common` (and `common/cluster.rs`).
#![allow(dead_code)]

use crate::cluster::Launch;
use crate::common::{connect, eventually, IO_TIMEOUT};
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use switchboard::framing::{encode_frame, FrameReader, Framing};
use switchboard::messenger::protocol::Delivery;
use switchboard::messenger::Client;

/// `messenger-server` (`program`) for a [`crate::cluster::Cluster`]: its id, every
/// server's address, what it dials and its data directory, then `extra` (primary mode
/// unless `extra` says `--quorum majority`).
pub fn launch(program: &'static str, prefix: &'static str, extra: &[&str]) -> Launch {
    let args = |s: &crate::cluster::Spawn| {
        let (id, dir) = (s.id.to_string(), s.data_dir.to_str().unwrap());
        let args = [
            "--id",
            &id,
            "--peers",
            &s.peers,
            "--dial",
            &s.dial,
            "--data-dir",
            dir,
        ];
        args.map(str::to_owned).to_vec()
    };
    Launch::new(program, prefix, args, extra)
}

/// A send the cluster acknowledged: its text, the server that answered, and when.
#[derive(Clone)]
pub struct Acked {
    pub text: String,
    pub by: Option<usize>,
    pub at: Instant,
}

/// Senders `s{i}` each sending to `r{i}` in a loop, and the receivers logged in
/// throughout; each client made by `client(i)` (so a test picks the way in).
pub struct Load {
    stop: Arc<AtomicBool>,
    stop_receivers: Arc<AtomicBool>,
    pub acked: Arc<Mutex<Vec<Acked>>>,
    senders: Vec<thread::JoinHandle<usize>>,
    receivers: Vec<thread::JoinHandle<Vec<Delivery>>>,
}

impl Load {
    pub fn start(
        n: usize,
        sender: impl Fn(usize) -> Client,
        receiver: impl Fn(usize) -> Client,
    ) -> Load {
        let mut setup = sender(0);
        for i in 0..n {
            setup.register(&format!("s{i}")).unwrap();
            setup.register(&format!("r{i}")).unwrap();
        }
        let stop_receivers = Arc::new(AtomicBool::new(false));
        let receivers = (0..n)
            .map(|i| receive(receiver(i), &format!("r{i}"), Arc::clone(&stop_receivers)))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let senders = (0..n)
            .map(|i| {
                let (mut c, stop, acked) = (sender(i), Arc::clone(&stop), Arc::clone(&acked));
                c.login(&format!("s{i}")).unwrap();
                thread::spawn(move || {
                    let mut failed = 0;
                    for k in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let text = format!("s{i} message {k}");
                        match c.send(&format!("r{i}"), &text) {
                            Ok(()) => acked.lock().unwrap().push(Acked {
                                text,
                                by: c.server(),
                                at: Instant::now(),
                            }),
                            Err(_) => failed += 1,
                        }
                    }
                    failed
                })
            })
            .collect();
        Load {
            stop,
            stop_receivers,
            acked,
            senders,
            receivers,
        }
    }

    pub fn acks(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits for `n` more acknowledged sends.
    pub fn more(&self, n: usize) {
        let target = self.acks() + n;
        eventually(&format!("{target} acknowledged sends"), || {
            self.acks() >= target
        });
    }

    /// Stops, and returns every acknowledged send and every delivery.
    pub fn finish(self) -> (Vec<Acked>, Vec<Delivery>) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.senders {
            s.join().unwrap();
        }
        self.stop_receivers.store(true, Ordering::SeqCst);
        let delivered = self
            .receivers
            .into_iter()
            .flat_map(|r| r.join().unwrap())
            .collect();
        let acked = self.acked.lock().unwrap().clone();
        (acked, delivered)
    }
}

/// Logs `c` in as `name` and collects everything it receives, live and across its own
/// failovers, until `stop`; then a final barrier request (on the primary: after its answer,
/// every message committed for `name` has been handed to it).
pub fn receive(
    mut c: Client,
    name: &str,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<Delivery>> {
    c.login(name).unwrap();
    thread::spawn(move || {
        let mut got: Vec<Delivery> = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let _ = c.keep_up();
            got.extend(c.deliveries().recv_timeout(Duration::from_millis(20)));
        }
        c.search("barrier").unwrap();
        got.extend(c.deliveries().try_iter());
        got
    })
}

/// Exact bytes over one connection to a messenger server: each payload in one u32 frame.
pub struct Raw {
    pub stream: TcpStream,
    pub reader: FrameReader<TcpStream>,
}

impl Raw {
    /// Connects (retrying until `IO_TIMEOUT`), with reads timing out after `IO_TIMEOUT`.
    pub fn connect(addr: SocketAddr) -> Raw {
        Raw::over(connect(addr))
    }

    /// One attempt to connect, with reads timing out after `read_timeout`.
    pub fn try_connect(addr: SocketAddr, read_timeout: Duration) -> Option<Raw> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).ok()?;
        stream.set_read_timeout(Some(read_timeout)).ok()?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).ok()?;
        Some(Raw::over(stream))
    }

    /// Over a stream whose timeouts are already set.
    pub fn over(stream: TcpStream) -> Raw {
        Raw {
            reader: FrameReader::new(stream.try_clone().unwrap(), Framing::U32),
            stream,
        }
    }

    pub fn send(&mut self, payload: &[u8]) {
        let mut frame = Vec::new();
        encode_frame(Framing::U32, payload, &mut frame).unwrap();
        self.stream.write_all(&frame).unwrap();
    }

    /// The next frame; the test fails if none comes.
    pub fn recv(&mut self) -> Vec<u8> {
        let frame = self.reader.read_frame().expect("a frame");
        frame.expect("not closed").to_vec()
    }

    pub fn ask(&mut self, payload: &[u8]) -> Vec<u8> {
        self.send(payload);
        self.recv()
    }

    /// The answer to `payload`; `None` if none came in time or the connection closed.
    pub fn try_ask(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        let mut frame = Vec::new();
        encode_frame(Framing::U32, payload, &mut frame).unwrap();
        self.stream.write_all(&frame).ok()?;
        self.reader.read_frame().ok().flatten().map(|f| f.to_vec())
    }

    pub fn closed(&mut self) -> bool {
        matches!(self.reader.read_frame(), Ok(None) | Err(_))
    }

    /// Whether the server ended the connection: the end of the stream or a reset, not a
    /// read that timed out (which `closed` also counts).
    pub fn ended_by_server(&mut self) -> bool {
        match self.reader.read_frame() {
            Ok(None) => true,
            Err(e) => !e.is_timeout(),
            Ok(Some(_)) => false,
        }
    }
}

/// Sends the payload `first`, then `request(n)` for n = 1, 2, … (each a `u32` frame) to
/// `addr` as fast as the socket takes them, never reading, for 3 s or until a write fails:
/// how it failed (`None`: it never did). A client that floods a server.
pub fn flood(
    addr: SocketAddr,
    first: &[u8],
    request: impl Fn(u64) -> Vec<u8>,
) -> Option<ErrorKind> {
    let mut s = connect(addr);
    // A closed connection's socket may stop taking bytes without failing the write at
    // once (the server no longer reads it): a short timeout.
    s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut burst = Vec::new();
    encode_frame(Framing::U32, first, &mut burst).unwrap();
    let until = Instant::now() + Duration::from_secs(3);
    let mut n = 0u64;
    while Instant::now() < until {
        for _ in 0..5000 {
            n += 1;
            encode_frame(Framing::U32, &request(n), &mut burst).unwrap();
        }
        if let Err(e) = s.write_all(&burst) {
            return Some(e.kind());
        }
        burst.clear();
    }
    None
}

/// Whether a flooder ([`flood`]) was cut off by the server (not by its own deadline).
pub fn cut_off(how: &Option<ErrorKind>) -> bool {
    matches!(
        how,
        Some(ErrorKind::BrokenPipe | ErrorKind::ConnectionReset)
    )
}

/// After clients flooded a cluster ([`flood`], each flooder's end in `cut`): `client`,
/// registered as `ann`, logs in and hears what it sends itself; every flooder was cut off
/// by the server; and no line of the servers' `logs` says a link was closed
/// (`link_closed`).
pub fn served_after_flood(
    client: &mut Client,
    cut: &[Option<ErrorKind>],
    logs: impl Fn() -> String,
    link_closed: impl Fn(&str) -> bool,
) {
    client.login("ann").unwrap();
    client.send("ann", "after the flood").unwrap();
    let got = client.deliveries().recv_timeout(IO_TIMEOUT).unwrap();
    assert_eq!(got.text, "after the flood");
    let logs = logs();
    assert!(cut.iter().all(cut_off), "not cut off: {cut:?}\n{logs}");
    let closed: Vec<&str> = logs.lines().filter(|l| link_closed(l)).collect();
    assert!(closed.is_empty(), "a link was closed: {closed:?}\n{logs}");
}
