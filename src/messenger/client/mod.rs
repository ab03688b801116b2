//! A blocking messenger client that fails over on its own (used by `messenger-client`, the
//! bench and the tests).
//!
//! It talks to one server at a time. When that connection breaks, times out, or answers
//! with a redirect or "unavailable", it tries the servers again (the redirect's target
//! first, then in id order), logs in again silently if it was logged in, and resends the
//! request it was waiting on. Resends are safe: a send carries a random id the cluster
//! remembers, a register carries a random nonce, logout and confirm are idempotent, and a
//! resent delete whose account is already gone counts as done.
//!
//! Incoming messages arrive on [`Client::deliveries`], each exactly once: a background
//! reader drops any message numbered at or below the highest it passed on *of the same
//! epoch* (numbers are unique forever and increase per recipient within one history; a
//! lower epoch after a higher one is a message from a primary that lost a network split,
//! new to this client, not a repeat), then confirms the last number it received on the
//! connection, dropped ones included (a message handed over again means its confirm was
//! lost), so the cluster stops keeping those messages. It never confirms a number it did
//! not receive on that connection, which in that server's history follows every message
//! the connection was handed.
//!
//! [`console`] is the interactive `messenger-client` on top of it.

pub mod console;

use super::protocol::{self, Delivery, MessageId, Reply, Request, Violation};
use crate::framing::{encode_frame, FrameReader, Framing, Limits};
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long one server may take to answer one request before the client moves on.
/// Above the cluster's own worst case (a hung backup is dropped after 1 s).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Connecting to one server.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// Pause before another round of the servers when none is primary.
const RETRY_PAUSE: Duration = Duration::from_millis(25);
/// How long every server may refuse connections before a request gives up: long enough to
/// ride out a restart of the one server left, short enough that a user who started the
/// client without a cluster hears so at once instead of after [`Client::timeout`].
pub const ALL_REFUSED_GRACE: Duration = Duration::from_secs(1);
/// The longest reply payload the server can send (see [`read_loop`]).
const MAX_REPLY: usize = 3 + protocol::MAX_LIST * (protocol::MAX_NAME + 1);

/// What can go wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The cluster answered that the request breaks a rule.
    Refused(Violation),
    /// Sending, logging out and deleting need a login (checked before asking).
    NotLoggedIn,
    /// No primary answered within the client's timeout.
    Unavailable,
    /// Every server refused connections for [`ALL_REFUSED_GRACE`]: none is running.
    NoServer(Vec<SocketAddr>),
    /// An answer that does not fit the request.
    Unexpected(Reply),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Refused(v) => write!(f, "refused: {v}"),
            ClientError::NotLoggedIn => f.write_str("log in first"),
            ClientError::Unavailable => f.write_str("no server answered in time"),
            ClientError::NoServer(servers) => {
                let list: Vec<String> = servers.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "no server accepts connections (tried {})",
                    list.join(", ")
                )
            }
            ClientError::Unexpected(r) => write!(f, "unexpected answer {r:?}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// Epochs whose highest number passed on a client remembers; older ones are forgotten
/// (far more failovers than any one session sees).
const SEEN_EPOCHS: usize = 64;

/// The highest message number passed on, per epoch, for one user; shared with the
/// connection readers.
#[derive(Default)]
struct Seen {
    user: Option<String>,
    last: std::collections::BTreeMap<u64, u64>,
}

impl Seen {
    /// Whether `id` is new (and from now on seen): above the highest passed on of its
    /// epoch. An epoch older than every one remembered is taken as seen.
    fn fresh(&mut self, id: MessageId) -> bool {
        if self.last.len() >= SEEN_EPOCHS && self.last.keys().next().is_some_and(|&e| id.epoch < e)
        {
            return false;
        }
        let last = self.last.entry(id.epoch).or_insert(0);
        let fresh = id.seq > *last;
        *last = (*last).max(id.seq);
        while self.last.len() > SEEN_EPOCHS {
            self.last.pop_first();
        }
        fresh
    }
}

/// One connection and its reader thread.
struct Conn {
    stream: Arc<TcpStream>,
    /// Serialises whole-frame writes from the caller and the reader (confirms).
    write: Arc<Mutex<()>>,
    replies: Receiver<Reply>,
    server: usize,
    reader: Option<JoinHandle<()>>,
}

fn write_request(stream: &TcpStream, lock: &Mutex<()>, request: &Request) -> io::Result<()> {
    let mut payload = Vec::new();
    protocol::encode_request(request, &mut payload);
    let mut frame = Vec::new();
    encode_frame(Framing::U32, &payload, &mut frame).map_err(io::Error::other)?;
    let _guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
    let mut w = stream;
    w.write_all(&frame)
}

impl Conn {
    fn open(
        server: usize,
        addr: SocketAddr,
        seen: &Arc<Mutex<Seen>>,
        deliveries: &Sender<Delivery>,
    ) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let stream = Arc::new(stream);
        let write = Arc::new(Mutex::new(()));
        let (tx, replies) = unbounded();
        let (s, w, seen, deliveries) = (
            Arc::clone(&stream),
            Arc::clone(&write),
            Arc::clone(seen),
            deliveries.clone(),
        );
        let reader = thread::Builder::new()
            .name("messenger-client-reader".into())
            .spawn(move || read_loop(&s, &w, &tx, &seen, &deliveries))?;
        Ok(Conn {
            stream,
            write,
            replies,
            server,
            reader: Some(reader),
        })
    }

    fn call(&self, request: &Request, timeout: Duration) -> Option<Reply> {
        write_request(&self.stream, &self.write, request).ok()?;
        self.replies.recv_timeout(timeout).ok()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Reads frames: messages go to `deliveries` (new ones only) and are all confirmed,
/// everything else to `replies`. A login's answer is passed on after the messages it hands
/// over.
fn read_loop(
    stream: &TcpStream,
    write: &Mutex<()>,
    replies: &Sender<Reply>,
    seen: &Mutex<Seen>,
    deliveries: &Sender<Delivery>,
) {
    // The largest reply: a search that found MAX_LIST names of MAX_NAME bytes, `|` between
    // them. 64 KiB, as this once was, broke `search *` on clusters of a few thousand
    // accounts: the reply counted as a framing error, and every retry failed the same way.
    let limits = Limits {
        max_frame: MAX_REPLY,
        ..Limits::default()
    };
    let mut reader = FrameReader::with_limits(stream, Framing::U32, limits);
    let mut handover: Option<(u16, u16)> = None;
    loop {
        if !matches!(reader.fill(), Ok(true)) {
            return;
        }
        let mut confirm = None;
        loop {
            let frame = match reader.next_buffered() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => return,
            };
            let Some(reply) = protocol::decode_reply(frame) else {
                return;
            };
            match reply {
                Reply::Deliver(d) => {
                    let fresh = seen
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .fresh(d.id);
                    // Confirmed even if seen before: handed over again, its confirm was lost.
                    confirm = Some(d.id);
                    if fresh {
                        let _ = deliveries.send(d);
                    }
                    if let Some((count, left)) = &mut handover {
                        *left -= 1;
                        if *left == 0 {
                            let _ = replies.send(Reply::LoggedIn { count: *count });
                            handover = None;
                        }
                    }
                }
                Reply::LoggedIn { count } if count > 0 => handover = Some((count, count)),
                other => {
                    let _ = replies.send(other);
                }
            }
        }
        if let Some(upto) = confirm {
            if write_request(stream, write, &Request::Confirm { upto }).is_err() {
                return;
            }
        }
    }
}

/// A random u64 for send ids and register nonces, from std's per-process random keys.
pub fn random_id() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish().max(1)
}

/// A client of a messenger cluster.
pub struct Client {
    servers: Vec<SocketAddr>,
    conn: Option<Conn>,
    user: Option<String>,
    seen: Arc<Mutex<Seen>>,
    tx: Sender<Delivery>,
    rx: Receiver<Delivery>,
    server: Option<usize>,
    /// This client's session token, sent with every login: a silent login again, through
    /// another server, takes over the session its lost connection may still hold.
    session: u64,
    /// How long a request may take, failovers included, before it fails as
    /// [`ClientError::Unavailable`] (default 15 s).
    pub timeout: Duration,
}

impl Client {
    /// A client of the servers at `servers` (by id). Connects on the first request.
    pub fn new(servers: Vec<SocketAddr>) -> Client {
        let (tx, rx) = unbounded();
        Client {
            servers,
            conn: None,
            user: None,
            seen: Arc::default(),
            tx,
            rx,
            server: None,
            session: random_id(),
            timeout: Duration::from_secs(15),
        }
    }

    /// Incoming messages, each once, in order.
    pub fn deliveries(&self) -> &Receiver<Delivery> {
        &self.rx
    }

    /// The servers, by id.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Who is logged in.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The id of the server that answered the last request.
    pub fn server(&self) -> Option<usize> {
        self.server
    }

    /// Creates an account (does not log in).
    ///
    /// # Errors
    /// `Refused` (`NameTaken`, `AlreadyLoggedIn`, `BadName`), or `Unavailable`.
    pub fn register(&mut self, name: &str) -> Result<(), ClientError> {
        let nonce = Some(random_id());
        let name = name.to_owned();
        ok(self.request(&Request::Register { name, nonce }))
    }

    /// Logs in; the pending messages it hands over are on [`Client::deliveries`] when it
    /// returns. Returns how many were handed over.
    ///
    /// # Errors
    /// `Refused` (`NoSuchUser`, `InUse`, `AlreadyLoggedIn`, `BadName`), or `Unavailable`.
    pub fn login(&mut self, name: &str) -> Result<u16, ClientError> {
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if seen.user.as_deref() != Some(name) {
                *seen = Seen {
                    user: Some(name.to_owned()),
                    last: Default::default(),
                };
            }
        }
        let request = Request::Login {
            name: name.to_owned(),
            session: Some(self.session),
        };
        match self.request(&request)? {
            Reply::LoggedIn { count } => {
                self.user = Some(name.to_owned());
                Ok(count)
            }
            other => Err(error(other)),
        }
    }

    /// Usernames matching `pattern` (`*` matches any run of characters).
    ///
    /// # Errors
    /// `Refused(BadPattern)`, or `Unavailable`.
    pub fn search(&mut self, pattern: &str) -> Result<Vec<String>, ClientError> {
        let pattern = pattern.to_owned();
        match self.request(&Request::Search { pattern })? {
            Reply::Found(names) => Ok(names),
            other => Err(error(other)),
        }
    }

    /// Sends `text` to `to`; returns once the cluster has acknowledged it.
    ///
    /// # Errors
    /// `NotLoggedIn`, `Refused` (`NoSuchUser`, `BadText`, `Full`, …), or
    /// `Unavailable`.
    pub fn send(&mut self, to: &str, text: &str) -> Result<(), ClientError> {
        self.send_with_id(to, text, random_id())
    }

    /// [`Client::send`] with a chosen id: a second send with the same id is acknowledged
    /// and not delivered again.
    ///
    /// # Errors
    /// As [`Client::send`].
    pub fn send_with_id(&mut self, to: &str, text: &str, id: u64) -> Result<(), ClientError> {
        let from = self.user.clone().ok_or(ClientError::NotLoggedIn)?;
        let (to, text) = (to.to_owned(), text.to_owned());
        ok(self.request(&Request::Send { from, to, id, text }))
    }

    /// Logs out.
    ///
    /// # Errors
    /// `NotLoggedIn`, or `Unavailable`.
    pub fn logout(&mut self) -> Result<(), ClientError> {
        let name = self.user.clone().ok_or(ClientError::NotLoggedIn)?;
        ok(self.request(&Request::Logout { name }))?;
        self.user = None;
        Ok(())
    }

    /// Deletes the account and its pending messages, and logs out.
    ///
    /// # Errors
    /// `NotLoggedIn`, or `Unavailable`.
    pub fn delete(&mut self) -> Result<(), ClientError> {
        let name = self.user.clone().ok_or(ClientError::NotLoggedIn)?;
        ok(self.request(&Request::Delete { name }))?;
        self.user = None;
        Ok(())
    }

    /// Logs out if logged in and closes the connection. Without a connection there is
    /// nothing to close (a server logs out a user whose connection closed), so it returns
    /// at once; with one, it waits at most one reply timeout.
    ///
    /// # Errors
    /// `Unavailable`.
    pub fn quit(&mut self) -> Result<(), ClientError> {
        if self.conn.is_none() {
            self.user = None;
            return Ok(());
        }
        let timeout = std::mem::replace(&mut self.timeout, REPLY_TIMEOUT);
        let result = ok(self.request(&Request::Quit));
        self.timeout = timeout;
        self.user = None;
        self.conn = None;
        result
    }

    /// Reconnects and logs in again if the connection was lost. A client that only
    /// receives calls this now and then, so messages keep coming across failovers.
    ///
    /// # Errors
    /// `Unavailable`, or `Refused(NoSuchUser)` if the account is gone.
    pub fn keep_up(&mut self) -> Result<(), ClientError> {
        let lost = self
            .conn
            .as_ref()
            .is_none_or(|c| c.reader.as_ref().is_none_or(JoinHandle::is_finished));
        if lost && self.user.is_some() {
            self.conn = None;
            self.connect(None, Instant::now() + self.timeout)?;
        }
        Ok(())
    }

    /// Sends one request to the primary, failing over as needed, and returns its answer.
    ///
    /// # Errors
    /// `Unavailable` when no primary answered within [`Client::timeout`];
    /// `Refused(NoSuchUser)` when a silent re-login finds the account gone (a resent
    /// delete then succeeds instead).
    pub fn request(&mut self, request: &Request) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut hint = None;
        let mut resent = false;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Unavailable);
            }
            if self.conn.is_none() {
                match self.connect(hint.take(), deadline) {
                    Ok(()) => {}
                    Err(ClientError::Refused(Violation::NoSuchUser))
                        if matches!(request, Request::Delete { .. }) =>
                    {
                        return Ok(Reply::Ok);
                    }
                    Err(e) => return Err(e),
                }
            }
            let conn = self.conn.as_ref().expect("connected");
            let wait = REPLY_TIMEOUT.min(deadline.saturating_duration_since(now));
            let reply = if write_request(&conn.stream, &conn.write, request).is_ok() {
                conn.replies.recv_timeout(wait)
            } else {
                Err(RecvTimeoutError::Disconnected)
            };
            match reply {
                Ok(Reply::Redirect(id)) if id < self.servers.len() => {
                    self.conn = None;
                    hint = Some(id);
                }
                Ok(Reply::Unavailable) => {
                    self.conn = None;
                    thread::sleep(RETRY_PAUSE);
                }
                // Our own earlier login may still hold the account on a server that did not
                // notice the old connection closing yet.
                Ok(Reply::Refused(Violation::InUse))
                    if resent && matches!(request, Request::Login { .. }) =>
                {
                    self.conn = None;
                    thread::sleep(RETRY_PAUSE);
                }
                Ok(reply) => {
                    self.server = Some(conn.server);
                    return Ok(reply);
                }
                // Broken: the id order again. Silent: possibly hung, so the next server
                // first (a hung process's kernel still accepts connections).
                Err(RecvTimeoutError::Disconnected) => self.conn = None,
                Err(RecvTimeoutError::Timeout) => {
                    hint = Some((conn.server + 1) % self.servers.len());
                    self.conn = None;
                }
            }
            resent = true;
        }
    }

    /// Connects to the primary: the hinted server first, then in id order, round after
    /// round until the deadline, logging in again if a user was logged in.
    fn connect(&mut self, mut hint: Option<usize>, deadline: Instant) -> Result<(), ClientError> {
        let mut all_refused_since = None;
        loop {
            let mut reached = false;
            let order: Vec<usize> = hint
                .take()
                .into_iter()
                .chain(0..self.servers.len())
                .collect();
            for id in order {
                if Instant::now() >= deadline {
                    return Err(ClientError::Unavailable);
                }
                let conn = match Conn::open(id, self.servers[id], &self.seen, &self.tx) {
                    Ok(conn) => conn,
                    // Only a refusal says nobody listens there. A connect that timed out
                    // may be a live server on a loaded machine (its accept queue full):
                    // the request waits for it until its deadline.
                    Err(e) => {
                        reached |= e.kind() != io::ErrorKind::ConnectionRefused;
                        continue;
                    }
                };
                reached = true;
                let Some(name) = self.user.clone() else {
                    self.conn = Some(conn);
                    return Ok(());
                };
                let login = Request::Login {
                    name,
                    session: Some(self.session),
                };
                match conn.call(&login, REPLY_TIMEOUT) {
                    Some(Reply::LoggedIn { .. }) => {
                        self.conn = Some(conn);
                        return Ok(());
                    }
                    Some(Reply::Redirect(p)) if p < self.servers.len() => {
                        hint = Some(p);
                        break;
                    }
                    Some(Reply::Refused(Violation::NoSuchUser)) => {
                        self.user = None;
                        return Err(ClientError::Refused(Violation::NoSuchUser));
                    }
                    _ => {}
                }
            }
            if reached {
                all_refused_since = None;
            } else if all_refused_since.get_or_insert_with(Instant::now).elapsed()
                >= ALL_REFUSED_GRACE
            {
                return Err(ClientError::NoServer(self.servers.clone()));
            }
            if hint.is_none() {
                thread::sleep(RETRY_PAUSE);
            }
        }
    }
}

fn error(reply: Reply) -> ClientError {
    match reply {
        Reply::Refused(v) => ClientError::Refused(v),
        other => ClientError::Unexpected(other),
    }
}

fn ok(reply: Result<Reply, ClientError>) -> Result<(), ClientError> {
    match reply? {
        Reply::Ok => Ok(()),
        other => Err(error(other)),
    }
}

/// The interactive commands `messenger-client` understands.
pub const HELP: &str = "commands: register NAME | login NAME | search PATTERN | send TO MESSAGE | \
                        logout | delete | quit | help";

/// Runs one interactive command line; returns what to print, or `None` for `quit`.
pub fn run_command(client: &mut Client, line: &str) -> Option<String> {
    let line = line.trim();
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    let rest = rest.trim_start();
    let result = match word {
        "" => return Some(String::new()),
        "help" => Ok(HELP.to_owned()),
        "register" => client
            .register(rest)
            .map(|()| format!("registered {rest}; now log in")),
        "login" => client
            .login(rest)
            .map(|n| format!("logged in as {rest}; {n} waiting message(s)")),
        "search" => client.search(rest).map(|names| {
            if names.is_empty() {
                "no match".to_owned()
            } else {
                names.join(" ")
            }
        }),
        "send" => match rest.split_once(' ') {
            Some((to, text)) => client.send(to, text).map(|()| "sent".to_owned()),
            None => Ok("usage: send TO MESSAGE".to_owned()),
        },
        "logout" => client.logout().map(|()| "logged out".to_owned()),
        "delete" => client.delete().map(|()| "account deleted".to_owned()),
        "quit" => {
            let _ = client.quit();
            return None;
        }
        _ => Ok(format!("unknown command {word:?}; {HELP}")),
    };
    Some(result.unwrap_or_else(|e| format!("error: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server whose accept queue is full (a live process on a loaded machine) times
    /// connects out; that is not a refusal: the request waits for it until its own
    /// deadline instead of saying after [`ALL_REFUSED_GRACE`] that no server runs.
    #[test]
    fn a_connect_that_times_out_is_not_a_refusal() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Never accepted: fill the queue until a connect times out.
        let mut queued = Vec::new();
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => queued.push(s),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => break,
                Err(e) => panic!("{e}"),
            }
            assert!(queued.len() < 10_000, "the accept queue never filled");
        }
        let mut client = Client::new(vec![addr]);
        client.timeout = ALL_REFUSED_GRACE * 2;
        assert_eq!(client.search("*"), Err(ClientError::Unavailable));
        drop((listener, queued));
    }

    #[test]
    fn repeats_are_told_apart_per_epoch_never_across_epochs() {
        let id = |epoch, seq| MessageId { epoch, seq };
        let mut seen = Seen::default();
        assert!(seen.fresh(id(3, 150)));
        assert!(!seen.fresh(id(3, 150)), "handed over again");
        assert!(!seen.fresh(id(3, 90)));
        // A later epoch that reused sequence numbers below 150: new messages.
        assert!(seen.fresh(id(4, 102)));
        assert!(seen.fresh(id(4, 103)));
        // A message of the primary that lost a split, reaching the client after the
        // winner's: new too, though its number is lower.
        assert!(seen.fresh(id(3, 151)));
        assert!(!seen.fresh(id(4, 103)));
        // Only the latest epochs are remembered; anything older counts as seen.
        for e in 10..10 + SEEN_EPOCHS as u64 {
            assert!(seen.fresh(id(e, 1)));
        }
        assert_eq!(seen.last.len(), SEEN_EPOCHS);
        assert!(!seen.fresh(id(5, 1_000)));
    }

    #[test]
    fn the_largest_search_reply_is_read_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (server, _) = listener.accept().unwrap();
        let ours = stream.try_clone().unwrap();
        let names: Vec<String> = (0..protocol::MAX_LIST)
            .map(|i| format!("{i:0>50}"))
            .collect();
        let mut payload = Vec::new();
        protocol::encode_reply(&Reply::Found(names.clone()), &mut payload);
        assert_eq!(payload.len(), MAX_REPLY - 1, "the bound is tight");
        let mut frame = Vec::new();
        encode_frame(Framing::U32, &payload, &mut frame).unwrap();
        let writer = thread::spawn(move || (&server).write_all(&frame));
        let (tx, replies) = unbounded();
        let (deliveries, _rx) = unbounded();
        let seen = Mutex::new(Seen::default());
        let reader = thread::spawn(move || {
            read_loop(&stream, &Mutex::new(()), &tx, &seen, &deliveries);
        });
        let reply = replies.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(reply, Reply::Found(names));
        writer.join().unwrap().unwrap();
        ours.shutdown(Shutdown::Both).unwrap();
        reader.join().unwrap();
    }
}
