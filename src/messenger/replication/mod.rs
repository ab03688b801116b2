//! One replica: a server of the cluster, with its state, its log, its role, and its links
//! to the others. The rules it follows are written out in the [module documentation](super);
//! the constants re-exported here are their timing.
//!
//! The parts, a file each: `view` (what a replica knows, behind its one lock: its role,
//! the records it keeps in memory, its view of each other server, its client registry),
//! `records` (appending, taking records and snapshots, making them durable), `roles` (the
//! rules that change the role and the commit point, and the ticker), `feed` (what each
//! outbound link carries), `outbound` (dialing and handing frames to the link's outbox),
//! `inbound` (a peer's messages) and `forward` (a backup's clients served by the primary
//! through it). Here: opening, starting and stopping a replica, and
//! what the client connections of [`super::server`] may ask of it.
//!
//! Threads, all in the replica's [`Group`] (closed by [`Replica::stop`]): one link thread
//! per peer dials it ([`crate::link::Dialer`]) and hands every message for it (records,
//! acknowledgements, heartbeats, fetch answers), pulled from shared state under the one
//! lock, to the link's [`Outbox`], whose writer thread writes them; a writer per client
//! connection drains that client's outbox; a ticker turns silences into failures, drops
//! members that stopped acknowledging, and re-evaluates the role; a flusher syncs what the
//! ticker appended (an epoch record), so that no tick waits for an fsync and a slow fsync
//! does not look like a stall. The inbound link from each peer is served on that
//! connection's own thread (the server's). One more thread is not in the group: a
//! compaction's, which writes the snapshot with no lock held and is joined when the disk
//! is dropped ([`Disk::compact`]).

mod feed;
mod forward;
mod inbound;
mod outbound;
mod records;
mod roles;
mod timing;
mod view;

pub use roles::next_epoch;
pub use timing::{ACK_TIMEOUT, DOWN_AFTER, HEARTBEAT_EVERY, STALL};

use super::clients::{Clients, Out};
use super::log::{Disk, Pos, COMPACT_AFTER};
use super::protocol;
use super::replica_protocol::{ReplicaMsg, Role};
use super::requests::{self, Serving};
use super::state::Limits;
use crate::auth::Secret;
use crate::group::Group;
use crate::link::Auth;
use crate::log_info;
use crate::outbox::{Outbox, Writer};
use outbound::Dial;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use view::{Inner, Remote};

/// How a server is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// This server's id: its index in `peers`.
    pub id: usize,
    /// Every server's address, by id (clients and peers use the same port).
    pub peers: Vec<SocketAddr>,
    /// Where the snapshot and the change log live.
    pub data_dir: PathBuf,
    /// Fsync the log before a change counts as durable here (otherwise it is written to
    /// the OS, which survives a killed process but not a power cut).
    pub fsync: bool,
    /// Snapshot the state and empty the log after this many records
    /// ([`COMPACT_AFTER`] by default).
    pub compact_after: u64,
    /// Where this server dials each server, by id (`--dial`; by default `peers`): an
    /// address that reaches it through a NAT, a tunnel or a test's fault proxy. `peers`
    /// stays the cluster's identity (HELLO carries it), the same on every server.
    pub dial: Vec<SocketAddr>,
    /// The cluster secret (`--secret-file`): with it, every replication link runs
    /// [`crate::auth`]'s handshake after the HELLO, and a peer that proves nothing is
    /// refused before it touches anything; without it the wire is as it always was.
    pub secret: Option<Secret>,
    /// What this server refuses as primary (`--max-accounts`); set the same on every
    /// server (a backup applies what its primary decided, whatever its own).
    pub limits: Limits,
}

impl Options {
    /// Server `id` of `peers`, keeping its data in `data_dir`, with fsync and the default
    /// compaction threshold.
    pub fn new(id: usize, peers: Vec<SocketAddr>, data_dir: PathBuf) -> Options {
        Options {
            id,
            dial: peers.clone(),
            peers,
            data_dir,
            fsync: true,
            compact_after: COMPACT_AFTER,
            secret: None,
            limits: Limits::default(),
        }
    }
}

/// One messenger server: a replica of the state machine. Serve its port with
/// [`Replica::serve`], after [`Replica::start`].
pub struct Replica {
    id: usize,
    addrs: Vec<SocketAddr>,
    /// Where each server is dialled (`Options::dial`).
    dial: Vec<SocketAddr>,
    /// The `--peers` list as HELLO carries it.
    cluster: String,
    /// What this server proves on its replication links, when a secret is configured.
    auth: Option<Auth>,
    inner: Mutex<Inner>,
    /// Link threads and the ticker wait on this.
    changed: Condvar,
    /// The flusher waits on this for `flush_wanted` to pass `durable`.
    flush_asked: Condvar,
    disk: Disk,
    compact_after: u64,
    /// What requests are decided within.
    limits: Limits,
    /// The link threads, the ticker, the flusher and the client writers; [`Replica::stop`]
    /// closes it.
    group: Group,
}

/// How long [`Replica::stop`] waits for the replica's threads.
const STOP_DEADLINE: Duration = Duration::from_secs(5);
/// Stack of the replica's threads: each touches a few pages of it (a snapshot is encoded
/// on the heap), so a small stack keeps a thread per client writer cheap.
const STACK: usize = 128 << 10;

/// The first heartbeat mark of this process's life: above every mark of an earlier life
/// (marks grow by one per change, far slower than nanoseconds).
fn first_mark() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// The cluster name every replication link's tags are bound to: the service, then the
/// `--peers` list as HELLO carries it (so a proof made for chat, or for another messenger
/// cluster sharing the secret file, is worthless here).
fn auth_cluster(peers: &str) -> Vec<u8> {
    [b"switchboard messenger ".as_slice(), peers.as_bytes()].concat()
}

/// A storage failure is a crash: the server stops at once rather than acknowledge a change
/// it could not write.
fn fatal(e: &io::Error) -> ! {
    log_info!("messenger: storage failure: {e}; exiting");
    std::process::exit(70);
}

impl Replica {
    /// Opens the data directory and loads it; returns the replica (a backup until the rules
    /// say otherwise) and a one-line report of what was loaded.
    ///
    /// # Errors
    /// When `id` is not an index of `peers`, or the data directory cannot be opened (see
    /// [`Disk::open`]).
    pub fn open(options: &Options) -> io::Result<(Arc<Replica>, String)> {
        let n = options.peers.len();
        if options.id >= n {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("--id {} but only {n} peers", options.id),
            ));
        }
        if options.dial.len() != n {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "--dial names {} addresses but --peers {n}",
                    options.dial.len()
                ),
            ));
        }
        let (disk, loaded) = Disk::open(&options.data_dir, options.fsync)?;
        let report = loaded.to_string();
        let last = loaded.last();
        let now = Instant::now();
        let mut inner = Inner {
            role: Role::Backup,
            epoch: last.epoch,
            max_epoch: last.epoch,
            takeover: 0,
            primary_since: now,
            state: loaded.state,
            last: loaded.base,
            window: VecDeque::new(),
            base: loaded.base,
            durable: last.seq,
            flush_wanted: last.seq,
            committed: 0,
            in_sync: false,
            peers: (0..n).map(|_| Remote::new()).collect(),
            clients: Clients::default(),
            need: None,
            last_ack: None,
            acked: Pos::default(),
            version: first_mark(),
            started: now,
            last_tick: now,
            stopping: false,
            epochs_exhausted: false,
            forwarded: HashMap::new(),
            forward_closed: HashMap::new(),
        };
        for r in loaded.records {
            inner.push(r.pos, r.change);
        }
        let cluster = options
            .peers
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let auth = options.secret.as_ref().map(|secret| Auth {
            secret: secret.clone(),
            cluster: auth_cluster(&cluster),
            identity: options.id.to_string().into_bytes(),
        });
        let replica = Replica {
            id: options.id,
            addrs: options.peers.clone(),
            dial: options.dial.clone(),
            cluster,
            auth,
            inner: Mutex::new(inner),
            changed: Condvar::new(),
            flush_asked: Condvar::new(),
            disk,
            compact_after: options.compact_after.max(1),
            limits: options.limits,
            group: Group::with_stack_size(&format!("messenger-{}", options.id), STACK),
        };
        Ok((Arc::new(replica), report))
    }

    /// Starts the link threads, the ticker and the flusher.
    ///
    /// # Errors
    /// When a thread cannot be started, or the replica is stopping.
    pub fn start(self: &Arc<Self>) -> io::Result<()> {
        for j in (0..self.addrs.len()).filter(|&j| j != self.id) {
            let dial = Dial {
                to: j,
                addr: self.dial[j],
                hello: ReplicaMsg::Hello {
                    from: self.id,
                    cluster: self.cluster.clone(),
                }
                .encode(),
                welcome: ReplicaMsg::Welcome.encode(),
                name: format!("messenger-{}", self.id),
                auth: self.auth.clone(),
            };
            let (replica, group) = (Arc::clone(self), self.group.clone());
            self.group
                .spawn(format!("messenger-{}-link-{j}", self.id), move || {
                    outbound::run(&*replica, &dial, &group);
                })
                .map_err(io::Error::other)?;
        }
        let replica = Arc::clone(self);
        self.group
            .spawn(format!("messenger-{}-tick", self.id), move || {
                replica.run_ticker();
            })
            .map_err(io::Error::other)?;
        let replica = Arc::clone(self);
        self.group
            .spawn(format!("messenger-{}-flush", self.id), move || {
                replica.run_flusher();
            })
            .map_err(io::Error::other)?;
        Ok(())
    }

    /// Stops serving: closes client connections and wakes every waiting thread. Call it
    /// with the server's shutdown; then [`Replica::stop`].
    pub fn begin_stop(&self) {
        let mut inner = self.lock();
        inner.stopping = true;
        inner.clients.stop();
        self.changed.notify_all();
        self.flush_asked.notify_all();
    }

    /// Stops, closes the replica's threads (within 5 s; stragglers are
    /// logged) and writes out the log.
    pub fn stop(&self) {
        self.begin_stop();
        self.group.close(STOP_DEADLINE);
        if let Err(e) = self.disk.sync_to(u64::MAX) {
            log_info!("messenger-{}: final log write failed: {e}", self.id);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Critical sections leave the state consistent before anything that can panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// This server's id: its index in `--peers`.
    pub(in crate::messenger) fn id(&self) -> usize {
        self.id
    }

    /// Registers client connection `conn`: its frames go to `outbox`, and `writer` (which
    /// drains it) runs in the replica's group, so [`Replica::stop`] joins it.
    ///
    /// # Errors
    /// When the writer cannot be started (the replica is stopping, or the OS refuses a
    /// thread): the connection is not registered.
    pub(in crate::messenger) fn add_client(
        &self,
        conn: u64,
        outbox: Outbox,
        writer: Writer,
    ) -> io::Result<()> {
        let name = format!("messenger-{}-out-{conn}", self.id);
        self.group
            .spawn(name, move || writer.run())
            .map_err(io::Error::other)?;
        self.lock().clients.add(conn, outbox);
        Ok(())
    }

    /// Forgets client connection `conn` (its reader ended) and its session; its writer
    /// sends what is queued and held for it as that commits, then ends.
    pub(in crate::messenger) fn remove_client(&self, conn: u64) {
        let mut inner = self.lock();
        inner.clients.remove(conn);
        self.forwarded_ended(&mut inner, conn);
    }

    /// Decides, applies and queues the answer to one request from client connection
    /// `conn` (see [`requests::respond`]), or, on a backup, forwards it to the primary (see
    /// `forward`); true when the connection is to close.
    pub(in crate::messenger) fn request(&self, conn: u64, payload: &[u8]) -> bool {
        let mut inner = self.lock();
        if let Some(close) = self.forward(&mut inner, conn, payload) {
            return close;
        }
        let (close, appended) = self.decide(&mut inner, conn, payload);
        drop(inner);
        // Outside the lock: the flush is disk I/O.
        if let Some(seq) = appended {
            self.changed.notify_all();
            self.flush_to(seq);
        }
        close
    }

    /// [`Replica::request`] for connection `conn` of the registry (one of this server's,
    /// or a backup's forwarded one), under the lock: whether it closes, and the sequence
    /// number of the change it appended, to flush.
    fn decide(&self, inner: &mut Inner, conn: u64, payload: &[u8]) -> (bool, Option<u64>) {
        let decoded = protocol::decode_request(payload);
        let serving = inner.serving(self.id);
        if serving == Serving::Primary && !inner.clients.is_open(conn) {
            return (true, None);
        }
        let effects = requests::respond(
            serving,
            &inner.state,
            self.limits,
            inner.clients.sessions(),
            conn,
            decoded,
        );
        let epoch = inner.epoch;
        let committed = inner.committed;
        let mut appended = None;
        if let Some(change) = &effects.change {
            let (seq, delivered) = self.append_local(inner, change);
            appended = Some(seq);
            // Queued under the lock, so a recipient's messages leave in number order,
            // after the login hand-over they follow.
            if let Some((to, d)) = delivered {
                let out = Out::replies(epoch, Some(seq), &[protocol::Reply::Deliver(d)], false);
                inner.clients.send_to_user(&to, out, committed);
            }
        }
        inner
            .clients
            .session_effect(conn, effects.session, effects.token);
        if !effects.replies.is_empty() || effects.close {
            // An answer waits for the last change made so far, its own included.
            let tag = effects.after_commit.then_some(inner.last.seq);
            let out = Out::replies(epoch, tag, &effects.replies, effects.close);
            inner.clients.send(conn, out, committed);
        }
        (effects.close, appended)
    }
}

/// What the unit tests of this module's parts share.
#[cfg(test)]
pub(super) mod testing {
    use super::Replica;
    use crate::messenger::Options;
    use std::path::PathBuf;
    use std::sync::Arc;

    /// Server `id` of a cluster of `servers` (at addresses never dialled), its data in a
    /// fresh directory named after `name` (unique among the tests) and the process.
    pub(in crate::messenger) fn replica(
        id: usize,
        servers: usize,
        name: &str,
    ) -> (Arc<Replica>, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("switchboard-replica-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let peers = (1..=servers)
            .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
            .collect();
        let replica = Replica::open(&Options::new(id, peers, dir.clone()))
            .unwrap()
            .0;
        (replica, dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::{FrameReader, Framing};
    use crate::messenger::protocol::{
        decode_reply, encode_request, Delivery, MessageId, Reply, Request, Violation,
    };
    use crate::outbox::OutboxConfig;
    use std::net::{TcpListener, TcpStream};

    /// A client connection as the replica sees it: registered with an outbox whose writer
    /// runs in the replica's group; the client's end reads what it writes.
    struct Conn {
        reader: FrameReader<TcpStream>,
    }

    impl Conn {
        fn add(replica: &Replica, id: u64) -> Conn {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (served, _) = listener.accept().unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            served
                .set_write_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let config = OutboxConfig::new(format!("test {id}"), 8);
            let (outbox, writer) = Outbox::new(Arc::new(served), config);
            replica.add_client(id, outbox, writer).unwrap();
            Conn {
                reader: FrameReader::new(client, Framing::U32),
            }
        }

        /// The next `n` replies written to this connection.
        fn next(&mut self, n: usize) -> Vec<Reply> {
            (0..n)
                .map(|_| {
                    let frame = self.reader.read_frame().unwrap().expect("a reply");
                    decode_reply(frame).unwrap()
                })
                .collect()
        }

        /// Whether the server closed the connection (nothing more to read).
        fn closed(&mut self) -> bool {
            matches!(self.reader.read_frame(), Ok(None) | Err(_))
        }
    }

    fn ask(replica: &Replica, conn: u64, request: &Request) -> bool {
        let mut payload = Vec::new();
        encode_request(request, &mut payload);
        replica.request(conn, &payload)
    }

    /// A request read from a connection that the server closed when it stepped down (it
    /// was stalled, and read the request on waking) is not decided, even once the server
    /// is primary again: its client was told nothing and fails over. It used to be
    /// applied if the server took over again before the reader got to it (seen in CI:
    /// `tests/messenger.rs`, the frozen primary).
    #[test]
    fn a_request_from_a_connection_closed_at_a_step_down_is_never_decided() {
        let (replica, dir) = testing::replica(0, 1, "closed-at-step-down");
        // Alone, it takes over at once.
        replica.reconcile(replica.lock());
        let _ann = Conn::add(&replica, 1);
        let register = |name: &str| Request::Register {
            name: name.into(),
            nonce: None,
        };
        assert!(
            !ask(&replica, 1, &register("ann")),
            "an open connection is served"
        );
        replica.lock().clients.close_all();
        let last = replica.lock().last;
        assert_eq!(replica.lock().role, Role::Primary);
        assert!(
            ask(&replica, 1, &register("bob")),
            "the connection is to close"
        );
        assert_eq!(replica.lock().last, last, "nothing was appended");
        assert!(!replica.lock().state.exists("bob"));
        replica.stop();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_primary_applies_each_requests_effects_and_answers_once_they_commit() {
        let dir = std::env::temp_dir().join(format!("switchboard-req-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let peers = vec!["127.0.0.1:1".parse().unwrap()];
        let (replica, _) = Replica::open(&Options::new(0, peers, dir.clone())).unwrap();
        // Alone, it takes over at once: its epoch record is seq 1.
        replica.reconcile(replica.lock());
        assert_eq!(replica.lock().role, Role::Primary);
        let (mut ann, mut bob) = (Conn::add(&replica, 1), Conn::add(&replica, 2));

        for name in ["ann", "bob"] {
            let register = Request::Register {
                name: name.into(),
                nonce: None,
            };
            assert!(!ask(&replica, 1, &register));
        }
        // Alone, a change is committed once it is durable here, which the request saw to:
        // nothing stays held.
        assert_eq!(ann.next(2), [Reply::Ok, Reply::Ok]);
        assert_eq!(replica.lock().committed, 3);
        assert_eq!(replica.lock().clients.held(), 0);
        let login = |name: &str| Request::Login {
            name: name.into(),
            session: None,
        };
        assert!(!ask(&replica, 2, &login("bob")));
        assert_eq!(bob.next(1), [Reply::LoggedIn { count: 0 }]);
        assert!(!ask(&replica, 1, &login("ann")));
        ann.next(1);
        // A send is pushed to its logged-in recipient.
        let send = Request::Send {
            from: "ann".into(),
            to: "bob".into(),
            id: 7,
            text: "hi".into(),
        };
        assert!(!ask(&replica, 1, &send));
        let hi = Reply::Deliver(Delivery {
            id: MessageId { epoch: 1, seq: 4 },
            from: "ann".into(),
            text: "hi".into(),
        });
        assert_eq!(bob.next(1), std::slice::from_ref(&hi));
        assert_eq!(ann.next(1), [Reply::Ok]);
        // Quit: answered, logged out, and once the reader is gone the connection closes.
        assert!(ask(&replica, 2, &Request::Quit));
        replica.remove_client(2);
        assert_eq!(bob.next(1), [Reply::Ok]);
        assert!(bob.closed());
        assert!(!ask(&replica, 1, &login("bob")));
        assert_eq!(ann.next(1), [Reply::Refused(Violation::AlreadyLoggedIn)]);
        // bob is free to log in again elsewhere: on connection 3, bob's quit closed 2.
        let mut bob = Conn::add(&replica, 3);
        assert!(!ask(&replica, 3, &login("bob")));
        assert_eq!(bob.next(2), [Reply::LoggedIn { count: 1 }, hi]);
        // Stepped down, with no primary known: every client is closed, and a request that
        // still arrives is to close its connection.
        let mut inner = replica.lock();
        replica.step_down(&mut inner, "test");
        drop(inner);
        assert!(bob.closed() && ann.closed());
        let search = Request::Search {
            pattern: "*".into(),
        };
        assert!(ask(&replica, 3, &search));
        replica.stop();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
