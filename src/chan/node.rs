//! The node: this process's advertised address and its channel database, which maps each
//! exported local channel to the port of its listener and back.

use super::listener::Listener;
use super::value::Host;
use super::{Chan, ChanError, LocalChan, Value};
use crate::framing;
use crate::server::{ServeReport, Server, ServerConfig, ServerHandle};
use crate::term::{self, Term};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Prefix of every listener's server name, and so of its threads' names.
pub(crate) const LISTENER_PREFIX: &str = "chan-";

/// How a [`Node`] behaves.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The address written into `{remote_chan,Host,Port}`, and the one listeners bind.
    pub advertise: IpAddr,
    /// Messages a local channel holds before writers block.
    ///
    /// Bounded, unlike the course's Erlang mailboxes: a full queue blocks the writer (a
    /// port listener's connection, and through TCP the remote writer) instead of growing
    /// memory without limit. The cost: a thread that writes more than this to a channel
    /// that only it reads waits forever.
    pub capacity: usize,
    /// Bytes that messages written from the network may hold in one channel's queue, as
    /// parsed (see [`Term::heap_bytes`]); past it, writers wait as they do on a full queue.
    /// A parsed term holds up to 16.5 times its text, so the message count alone would let
    /// a full queue of 1 MiB lines hold gigabytes. One message larger than this is still
    /// let in when the queue holds no other such bytes.
    pub capacity_bytes: usize,
    /// How long connecting to a remote channel may take.
    pub connect_timeout: Duration,
    /// How long one operation on a remote channel may take from start to end: a write
    /// (connecting, sending, and waiting for the listener's close), or a read's request
    /// and, for a read with a timeout, its answer on top of that timeout. One deadline
    /// for the whole, not a timeout per socket call, which a listener trickling a byte
    /// now and then would restart each time. A host name's resolution is not counted:
    /// the system resolver's own timeouts bound it.
    pub io_timeout: Duration,
    /// Connections one listener serves at once; beyond, newcomers are refused.
    pub max_connections: usize,
    /// A listener's connection that sends nothing for this long is closed. Writers send
    /// their line at once and readers their request; without it, connections that say
    /// nothing would hold the listener's connection slots for good (a remote reader
    /// waiting for its message is not idle: the listener is answering it).
    pub idle_timeout: Option<Duration>,
    /// Longest line a listener (or a remote read) accepts.
    pub line_limits: framing::Limits,
    /// Bounds on parsing the term in a line.
    pub term_limits: term::Limits,
    /// The budget every listener of the node charges its clients' memory to (read buffers
    /// and parsed messages waiting in channels; see [`crate::budget`]). `None`: per-channel
    /// and per-frame limits only.
    pub client_memory: Option<crate::budget::Budget>,
}

impl Default for NodeConfig {
    /// Advertises 127.0.0.1; 1024 messages and 16 MiB per channel; 5 s to connect, 10 s
    /// for I/O; listeners close connections idle for 10 s.
    fn default() -> Self {
        NodeConfig {
            advertise: Ipv4Addr::LOCALHOST.into(),
            capacity: 1024,
            capacity_bytes: 16 << 20,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            max_connections: 1024,
            idle_timeout: Some(Duration::from_secs(10)),
            line_limits: framing::Limits::default(),
            term_limits: term::Limits::default(),
            client_memory: None,
        }
    }
}

impl NodeConfig {
    /// The defaults, advertising `ip`.
    pub fn advertising(ip: IpAddr) -> Self {
        NodeConfig {
            advertise: ip,
            ..NodeConfig::default()
        }
    }
}

/// A local channel's port listener.
struct Export {
    port: u16,
    server: ServerHandle,
    thread: JoinHandle<ServeReport>,
}

/// The channel database.
#[derive(Default)]
struct Db {
    /// Exported channels by id, with their listeners.
    exports: HashMap<u64, Export>,
    /// The other direction: port to channel. Weak, so the database never keeps a channel
    /// alive; the channel's last handle retires its entry.
    homes: HashMap<u16, Weak<LocalChan>>,
    /// Listeners asked to stop whose threads have not been joined yet.
    stopping: Vec<JoinHandle<ServeReport>>,
    closed: bool,
}

/// One node of the channel network: creates local channels, gives them ports when they
/// leave the process, and recognizes them when they come home.
///
/// An explicit object rather than a global, so one process (a test) can hold several.
/// Dropping the last `Arc` shuts it down, as [`Node::shutdown`] does.
pub struct Node {
    config: NodeConfig,
    me: Weak<Node>,
    db: Mutex<Db>,
}

impl Node {
    /// A node with no channels and no open port.
    pub fn new(config: NodeConfig) -> Arc<Node> {
        Arc::new_cyclic(|me| Node {
            config,
            me: me.clone(),
            db: Mutex::new(Db::default()),
        })
    }

    /// The node's settings.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// A new local channel. It opens no port until it leaves the process.
    pub fn chan(&self) -> Chan {
        Chan::local(
            self.me.clone(),
            self.config.capacity,
            self.config.capacity_bytes,
        )
    }

    /// The channel at `host:port`: the local channel itself when that is one of this
    /// node's ports, else a remote channel.
    pub fn remote(&self, host: Host, port: u16) -> Chan {
        let mut home = None;
        if self.may_be_home(&host) {
            // The upgraded handle outlives the guard: dropping a channel's last handle
            // retires it, which takes this lock.
            let db = self.db();
            home = db.homes.get(&port).and_then(Weak::upgrade);
        }
        match home {
            Some(local) => Chan::from_local(local),
            None => Chan::remote(self.me.clone(), host, port),
        }
    }

    /// The message as it crosses the network: each local channel in it becomes
    /// `{remote_chan,Host,Port}`, opening its port listener if it has none yet.
    ///
    /// # Errors
    /// When a listener cannot be opened ([`ChanError::Listen`]) or the channel's node has
    /// shut down ([`ChanError::NodeDown`]).
    pub fn export(&self, msg: &Value) -> Result<Term, ChanError> {
        // A local channel is exported by the node that made it, wherever it is sent from.
        msg.to_term(&mut Chan::to_term)
    }

    /// The message as it arrived: each `{remote_chan,Host,Port}` becomes a channel, the
    /// local one itself when it names a port of this node.
    pub fn import(&self, term: Term) -> Value {
        Value::from_term(term, &mut |host, port| self.remote(host, port))
    }

    /// The message as a port listener queues it: as [`Node::import`], except that a
    /// channel naming this node stays a remote handle (host and port) while it waits in
    /// a queue, and the flag says whether there is one; [`Node::bring_home`] turns it
    /// into the local channel when the message is taken out. A queued strong handle could
    /// be the queue's own channel (anyone may write `{remote_chan,{127,0,0,1},P}` to port
    /// P), or two channels could hold each other: neither would ever be dropped, and
    /// their ports and listeners would live until the node shuts down.
    pub(crate) fn import_queued(&self, term: Term) -> (Value, bool) {
        let mut names_home = false;
        let value = Value::from_term(term, &mut |host, port| {
            names_home |= self.may_be_home(&host);
            Chan::remote(self.me.clone(), host, port)
        });
        (value, names_home)
    }

    /// Each remote handle in `value` that names one of this node's channels, as that
    /// channel (see [`Node::import_queued`]); a channel gone meanwhile stays remote.
    pub(crate) fn bring_home(&self, value: Value) -> Value {
        value.map_chans(&mut |chan| match chan.remote_addr() {
            Some((host, port)) if self.may_be_home(host) => self.remote(host.clone(), port),
            _ => chan,
        })
    }

    /// Whether a channel on `host` may be one of this node's.
    fn may_be_home(&self, host: &Host) -> bool {
        host.literal_ip() == Some(self.config.advertise)
    }

    /// How many channels have a port listener now.
    pub fn exported(&self) -> usize {
        self.db().exports.len()
    }

    /// The port of a local channel's listener, if it has one.
    pub fn port_of(&self, chan: &Chan) -> Option<u16> {
        let local = chan.as_local()?;
        self.db().exports.get(&local.id).map(|export| export.port)
    }

    /// Stops every port listener and joins its threads; later exports fail with
    /// [`ChanError::NodeDown`]. Idempotent.
    pub fn shutdown(&self) {
        let (exports, stopping) = {
            let mut db = self.db();
            db.closed = true;
            db.homes.clear();
            (
                std::mem::take(&mut db.exports),
                std::mem::take(&mut db.stopping),
            )
        };
        for export in exports.values() {
            export.server.shutdown();
        }
        // A listener thread that ends up here (it held the last handle to the node) must
        // not join itself; its server's own shutdown finishes the job.
        let on_listener = thread::current()
            .name()
            .is_some_and(|name| name.starts_with(LISTENER_PREFIX));
        if on_listener {
            return;
        }
        let threads = exports.into_values().map(|export| export.thread);
        for thread in threads.chain(stopping) {
            let _ = thread.join();
        }
    }

    /// The port of `local`'s listener, opened now if it has none.
    pub(crate) fn open_port(&self, local: &Arc<LocalChan>) -> Result<u16, ChanError> {
        let mut db = self.db();
        if db.closed {
            return Err(ChanError::NodeDown);
        }
        if let Some(export) = db.exports.get(&local.id) {
            return Ok(export.port);
        }
        let listener = TcpListener::bind((self.config.advertise, 0)).map_err(ChanError::Listen)?;
        let port = listener.local_addr().map_err(ChanError::Listen)?.port();
        let name = format!("{LISTENER_PREFIX}{}", local.id);
        let handler = Listener::new(&name, Arc::downgrade(local), self.me.clone(), &self.config);
        let mut config = ServerConfig::named(&name);
        config.max_connections = self.config.max_connections;
        config.idle_timeout = self.config.idle_timeout;
        config.client_memory = self.config.client_memory.clone();
        // A node exports channels by the hundred (every reply channel); their listeners'
        // start and stop are routine, logged in verbose mode only.
        config.quiet = true;
        let server =
            Server::with_handler(listener, config, handler.handler()).map_err(ChanError::Listen)?;
        let handle = server.handle();
        let thread = thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || server.run())
            .map_err(ChanError::Listen)?;
        db.exports.insert(
            local.id,
            Export {
                port,
                server: handle,
                thread,
            },
        );
        db.homes.insert(port, Arc::downgrade(local));
        local.exported.store(true, Ordering::Release);
        Ok(port)
    }

    /// Stops the listener of a channel whose last handle is gone. Runs wherever that
    /// handle was dropped, a listener thread included, so it never joins: finished threads
    /// are reaped here later, the rest at shutdown.
    pub(crate) fn retire(&self, id: u64) {
        let export = {
            let mut db = self.db();
            let export = db.exports.remove(&id);
            if let Some(export) = &export {
                db.homes.remove(&export.port);
            }
            export
        };
        let Some(export) = export else { return };
        export.server.shutdown();
        let mut db = self.db();
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut db.stopping)
            .into_iter()
            .partition(JoinHandle::is_finished);
        db.stopping = running;
        db.stopping.push(export.thread);
        drop(db);
        for thread in done {
            let _ = thread.join();
        }
    }

    fn db(&self) -> MutexGuard<'_, Db> {
        // Nothing panics while holding this lock; recover rather than cascade if it did.
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("advertise", &self.config.advertise)
            .field("exported", &self.exported())
            .finish()
    }
}
