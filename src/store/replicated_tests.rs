//! One real follower against a leader the test plays by hand: the follower is told that
//! replica 2 leads (a Heartbeat delivered to its driver) and forwards its clients'
//! requests to a listener of the test's, which answers each one when the test says. So a
//! write stays unapplied for as long as the test wants, and every assertion is about
//! order (what reached the leader before what), never about time.

use super::*;
use crate::raft::{Body, Message};
use crate::server::RunningServer;
use crossbeam_channel::{unbounded, RecvTimeoutError};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;

/// How long a test waits for something that must happen before it fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// A connection the follower opened to the test's leader to forward a client's requests.
struct Forwarded {
    reader: BufReader<TcpStream>,
    /// Its first request (after the `raft-forward` frame).
    first: String,
}

impl Forwarded {
    fn answer(&mut self, reply: &str) {
        let mut stream = self.reader.get_ref();
        stream.write_all(format!("{reply}\n").as_bytes()).unwrap();
    }
}

/// A follower (replica 1, in line framing) of the test's leader (replica 2); replica 3 is
/// never up.
struct Follower {
    svc: Arc<ReplicatedStore>,
    server: Option<RunningServer>,
    addr: SocketAddr,
    /// Forwarding connections, in the order their first request reached the leader.
    forwarded: Receiver<Forwarded>,
    leader: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    dir: PathBuf,
}

impl Follower {
    fn start(name: &str) -> Follower {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let leader_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let leader = leader_listener.local_addr().unwrap();
        let absent = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let dir = std::env::temp_dir().join(format!(
            "switchboard-replicated-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let peers = [addr, leader, absent].map(|a| a.to_string()).to_vec();
        let mut options = ReplicatedOptions::new(0, peers, dir.clone());
        // Nothing the test holds back times out, and no election starts (10 ticks of
        // silence at the least) while a test runs.
        options.request_timeout = Duration::from_secs(30);
        options.tick = Duration::from_secs(10);
        let svc = ReplicatedStore::open(options).unwrap();
        svc.raft.deliver(Message {
            from: 2,
            to: 1,
            term: 1,
            body: Body::Heartbeat {
                commit: 0,
                round: 1,
            },
        });
        let deadline = Instant::now() + PATIENCE;
        while svc.status().leader != Some(2) {
            assert!(
                Instant::now() < deadline,
                "the follower never heard the leader"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let config = ServerConfig {
            name: "store".into(),
            ..ServerConfig::default()
        };
        let server = Server::with_handler(listener, config, svc.handler())
            .and_then(Server::spawn)
            .unwrap();
        let (tx, forwarded) = unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for stream in leader_listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    stream.set_read_timeout(Some(PATIENCE)).unwrap();
                    let mut reader = BufReader::new(stream);
                    // The follower's Raft link (its hello) is dropped: it answers nobody.
                    if read_line(&mut reader) != "raft-forward" {
                        continue;
                    }
                    let first = read_line(&mut reader);
                    if tx.send(Forwarded { reader, first }).is_err() {
                        return;
                    }
                }
            })
        };
        Follower {
            svc,
            server: Some(server),
            addr,
            forwarded,
            leader,
            stop,
            accept: Some(accept),
            dir,
        }
    }

    /// A client connection to the follower that has sent `requests`.
    fn client(&self, requests: &[u8]) -> TcpStream {
        let mut c = TcpStream::connect(self.addr).unwrap();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        c.write_all(requests).unwrap();
        c
    }

    /// The next forwarding connection to reach the leader.
    fn next_forwarded(&self) -> Forwarded {
        self.forwarded
            .recv_timeout(PATIENCE)
            .expect("a request forwarded to the leader")
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
        self.svc.close();
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.leader);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One line, without its `\n`; empty at the end of the stream.
fn read_line(reader: &mut impl BufRead) -> String {
    let mut line = String::new();
    let _ = reader.read_line(&mut line);
    line.trim_end_matches('\n').to_owned()
}

/// The course's one-shot clients: one stores and closes, the next looks the key up on a
/// new connection and must see the value. Through a follower the store is applied only
/// when the leader says so, here once the test answers it: until then the follower must
/// not forward the lookup (the leader would answer it from a state without the store).
/// A commit takes a majority's fsyncs, which under disk load passed the 50 ms that
/// newcomers used to wait; the test holds the store's answer ten times as long.
#[test]
fn a_lookup_on_a_later_connection_waits_for_a_store_being_forwarded() {
    let f = Follower::start("order");
    drop(f.client(b"store,once,1\n"));
    let mut store = f.next_forwarded();
    assert_eq!(store.first, "store,once,1");
    let getter = f.client(b"lookup,once\n");
    match f.forwarded.recv_timeout(10 * crate::order::MAX_WAIT) {
        Err(RecvTimeoutError::Timeout) => {}
        Ok(early) => panic!(
            "{:?} reached the leader before the store it follows was applied",
            early.first
        ),
        Err(e) => panic!("{e}"),
    }
    store.answer("ok");
    let mut lookup = f.next_forwarded();
    assert_eq!(lookup.first, "lookup,once");
    lookup.answer("{just,1}");
    assert_eq!(read_line(&mut BufReader::new(getter)), "{just,1}");
}

/// A client that stalls part-way through its first request holds nobody back: a later
/// connection's lookup is served meanwhile (newcomers now wait for an earlier connection
/// with bytes pending as long as a request may take, so the partial request must not
/// count as pending), and the request, once complete, is forwarded.
#[test]
fn a_first_request_cut_short_holds_no_later_connection_back() {
    let f = Follower::start("partial");
    let mut slow = f.client(b"store,sl");
    let getter = f.client(b"lookup,k\n");
    let mut lookup = f.next_forwarded();
    assert_eq!(lookup.first, "lookup,k");
    lookup.answer("nothing");
    assert_eq!(read_line(&mut BufReader::new(getter)), "nothing");
    slow.write_all(b"ow,v\n").unwrap();
    let mut store = f.next_forwarded();
    assert_eq!(store.first, "store,slow,v");
    store.answer("ok");
    // A lookup on the same connection comes after the store's answer.
    slow.write_all(b"lookup,slow\n").unwrap();
    assert_eq!(read_line(&mut store.reader), "lookup,slow");
    store.answer("{just,v}");
    assert_eq!(read_line(&mut BufReader::new(slow)), "{just,v}");
}
