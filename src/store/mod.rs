//! The classic key-value store server (`store-server`): `store,K,V` / `lookup,K`, plus
//! `delete` and `stats`, over any framing, with an optional append-only file.
//!
//! - [`protocol`]: requests and replies, pure.
//! - [`state`]: the sharded map.
//! - [`aof`]: the append-only file: replay, and rewrite in the background.
//! - [`replicated`]: the store over Raft (`--raft`): linearizable, partition-safe.
//! - [`cli`]: `store-server`'s options and what it runs.
//! - [`client`]: a blocking client (used by `store-client`, `store-bench` and tests).
//! - [`bench`](mod@bench): the closed-loop load generator behind `store-bench`.
//! - [`floor`]: the design's floor to measure the store against (`store-bench --floor`).
//! - [`soak`]: the memory soak behind `store-bench --soak`.
//!
//! Connections are served by the framework's [`RequestLoop`]: whatever the socket has is
//! read, every complete request in it answered into one output buffer, and that buffer
//! written with one call, so a pipelined batch costs one read and one write however many
//! requests it holds. Requests keep arrival order across connections ([`crate::order`]).

pub mod aof;
pub mod bench;
pub mod cli;
pub mod client;
pub mod floor;
mod keyhash;
pub mod protocol;
pub mod replicated;
pub mod soak;
pub mod state;
mod table;
mod tally;

use crate::framing::{begin_frame, end_frame, FrameError, Framing, Limits};
use crate::order::Arrivals;
use crate::request::{self, Replies, RequestLoop};
use crate::server::{Connection, Handler, HandlerError, ServerHandle};
use aof::{Aof, Fsync, Replay};
use protocol::{Request, Stats, Verb};
use state::{Lookups, Store};
use std::hint::cold_path;
use std::io;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tally::{Tallies, Tally};

/// The default port of the course's Python store server.
pub const DEFAULT_ADDR: &str = "127.0.0.1:65002";

/// Replies are sent when the batch is done, or sooner once this many bytes are waiting, so
/// a batch of lookups of large values cannot balloon one connection's memory.
const FLUSH_AT: usize = 64 << 10;

/// How a store is set up.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The framing of requests and replies.
    pub framing: Framing,
    /// Frame size limits.
    pub limits: Limits,
    /// The append-only file, if writes are to be persisted.
    pub aof: Option<PathBuf>,
    /// When the append-only file is synced.
    pub fsync: Fsync,
    /// Rewrite the append-only file once it is larger than this many bytes and more than
    /// twice its live data (0: never).
    pub aof_rewrite_min: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            framing: Framing::default(),
            limits: Limits::default(),
            aof: None,
            fsync: Fsync::default(),
            aof_rewrite_min: aof::DEFAULT_REWRITE_MIN,
        }
    }
}

/// The store service: state, persistence and counters, shared by every connection.
pub struct StoreService {
    /// Shared with the append-only file's background rewrite.
    store: Arc<Store>,
    aof: Option<Arc<Aof>>,
    framing: Framing,
    requests: RequestLoop,
    arrivals: Arrivals,
    started: Instant,
    /// Requests by verb, counted by each connection (see [`tally`]).
    commands: Arc<Tallies>,
    /// Line framing and no value holds a `\n`, so a `{just,V}` reply needs no scan for
    /// one: a line-framed request cannot carry a `\n`, and the values replayed at start
    /// were checked once. (A log written by a server with a size-prefixed framing may hold
    /// such values; then every reply is checked, and one holding `\n` becomes an error.)
    plain_lines: bool,
}

impl StoreService {
    /// Creates the service, replaying the append-only file if there is one.
    ///
    /// # Errors
    /// When the append-only file cannot be opened, read or created.
    pub fn open(options: &StoreOptions) -> io::Result<(Arc<StoreService>, Option<Replay>)> {
        let store = Arc::new(Store::new());
        let (aof, replay) = match &options.aof {
            Some(path) => {
                let (aof, replay) = Aof::open(path, options.fsync, &store)?;
                aof.set_rewrite_min(options.aof_rewrite_min);
                (Some(aof), Some(replay))
            }
            None => (None, None),
        };
        let plain_lines = options.framing == Framing::Line
            && !store.any_value(|v| crate::framing::find_newline(v).is_some());
        let arrivals = Arrivals::new();
        let requests = RequestLoop::new(options.framing)
            .limits(options.limits)
            .in_order(&arrivals);
        let service = StoreService {
            store,
            aof,
            framing: options.framing,
            requests,
            arrivals,
            started: Instant::now(),
            commands: Arc::default(),
            plain_lines,
        };
        Ok((Arc::new(service), replay))
    }

    /// The state, for inspection.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Flushes and syncs the append-only file; call after the server has stopped.
    ///
    /// # Errors
    /// When the final write or fsync fails.
    pub fn close(&self) -> io::Result<()> {
        self.aof.as_ref().map_or(Ok(()), |aof| aof.close())
    }

    /// Current counters.
    pub fn stats(&self, server: &ServerHandle) -> Stats {
        stats_of(&self.store, server, self.started, self.commands.sum())
    }

    /// The server's handler: serves each connection with [`StoreService::serve`], in
    /// arrival order across connections (see [`crate::order`]).
    pub fn handler(self: &Arc<Self>) -> impl Handler {
        let service = Arc::clone(self);
        self.arrivals.handler(move |conn| service.serve(&conn))
    }

    /// Serves one connection until it closes. Keeps arrival order only when the server's
    /// handler is [`StoreService::handler`].
    ///
    /// # Errors
    /// A size header that is not a length (the stream lost sync), a failed socket, or a
    /// failed append-only file write: each ends this connection only.
    pub fn serve(&self, conn: &Connection) -> Result<(), HandlerError> {
        let mut session = Session {
            service: self,
            batch: Batch::default(),
            lookups: self.store.lookups(),
            tally: self.commands.open(),
        };
        self.requests.serve_session(conn, &mut session)
    }

    /// The fast path of the commonest request: a `lookup,KEY` frame when replies need no
    /// framing work (`plain_lines`), recognised by
    /// [`protocol::parse_lookup`] and answered with one hash, one read lock and one copy.
    /// [`Fast::No`], with nothing done, for any other frame: [`StoreService::execute`]
    /// takes it. Its replies and counts are those of the general path (tested).
    ///
    /// A reply that does not fit the buffer's spare capacity is not copied
    /// ([`Fast::Room`]): the caller makes room, charged to the connection's memory budget
    /// before it is allocated ([`Replies::reserve`]), and copies it
    /// (`Session::look_up_with_room`; every connection's first lookup goes that way, so
    /// the integration tests check its replies). So a thousand connections looking up a
    /// large value they never read cannot hold a thousand uncharged copies of it at once.
    #[inline(always)]
    fn lookup_fast(
        &self,
        frame: &[u8],
        batch: &mut Batch,
        lookups: &mut Lookups<'_>,
        out: &mut Vec<u8>,
    ) -> Fast {
        let Some(key) = protocol::parse_lookup(frame).filter(|_| self.plain_lines) else {
            return Fast::No;
        };
        lookups.line(key, |line| {
            let line = line.unwrap_or(NOTHING_LINE);
            // The test `extend_from_slice` makes before it grows the buffer.
            if line.len() > out.capacity() - out.len() {
                cold_path();
                return Fast::Room(line.len());
            }
            out.extend_from_slice(line);
            batch.counts[Verb::Lookup as usize] += 1;
            Fast::Done
        })
    }

    /// The fast path of the commonest write: a `store,KEY,VALUE` frame when there is no
    /// append-only file (with one, writes go through the general path, which logs and
    /// commits them), recognised by [`protocol::parse_store`] and applied with one hash and
    /// one write lock. False, with nothing done, for any other frame. The caller must hold
    /// no shard lock ([`Lookups::release`]). Its effects and counts are those of the
    /// general path (tested).
    #[inline]
    fn store_fast(&self, frame: &[u8], batch: &mut Batch) -> bool {
        if self.aof.is_some() {
            return false;
        }
        let Some((key, value)) = protocol::parse_store(frame) else {
            return false;
        };
        batch.counts[Verb::Store as usize] += 1;
        self.store.set(key, value);
        true
    }

    /// Applies one request and appends its reply (if any) to `out`: the general path. A
    /// lookup's reply goes in at once when it fits the buffer's spare room; a larger one
    /// is given room first, charged before it is allocated (as on the fast path), and the
    /// key is looked up again.
    #[inline(never)]
    fn execute(
        &self,
        frame: &[u8],
        batch: &mut Batch,
        out: &mut Replies<'_>,
        conn: &Connection,
    ) -> io::Result<()> {
        let request = protocol::parse(frame);
        if let Ok(Request::Lookup { key }) = &request {
            let (framing, buf) = (self.framing, out.buffer());
            let room = buf.capacity() - buf.len();
            let need = self.store.with_value(key, |v| {
                let need = v.map_or(0, <[u8]>::len) + LOOKUP_FRAMING;
                if need > room {
                    return need;
                }
                batch.reply_lookup(framing, v, buf);
                0
            });
            if need == 0 {
                batch.counts[Verb::Lookup as usize] += 1;
                return Ok(());
            }
            out.reserve(need)?;
        }
        self.apply(request, batch, out.buffer(), || self.stats(&conn.server))
    }

    /// Applies a parsed request (or answers why it is none), appending its reply (if any) to
    /// `out`; `stats` gives the counters when the request asks for them.
    fn apply(
        &self,
        request: Result<Request<'_>, protocol::ProtocolError>,
        batch: &mut Batch,
        out: &mut Vec<u8>,
        stats: impl FnOnce() -> Stats,
    ) -> io::Result<()> {
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                batch.reply_error(self.framing, e.reason(), out);
                return Ok(());
            }
        };
        if let (Some(aof), Request::Store { .. } | Request::Delete { .. }) = (&self.aof, &request) {
            if aof.failed() {
                // Applied, the write would be seen by others and gone after a restart.
                return Err(io::Error::other(
                    "the append-only file failed earlier; writes are refused until a restart",
                ));
            }
        }
        batch.counts[request.verb() as usize] += 1;
        let framing = self.framing;
        match request {
            Request::Store { key, value } => match &self.aof {
                None => self.store.set(key, value),
                Some(aof) => {
                    let seq = self
                        .store
                        .set_logged(key, value, || aof.log_store(key, value));
                    self.logged(aof, seq, batch)?;
                }
            },
            Request::Lookup { key } => {
                self.store
                    .with_value(key, |v| batch.reply_lookup(framing, v, out));
            }
            Request::Delete { key } => {
                let mut seq = None;
                let deleted = self.store.delete_logged(key, || {
                    seq = self.aof.as_ref().map(|aof| aof.log_delete(key));
                });
                if let (Some(aof), Some(seq)) = (&self.aof, seq) {
                    self.logged(aof, seq, batch)?;
                }
                let mark = begin_frame(framing, out);
                if deleted {
                    protocol::format_ok(out);
                } else {
                    protocol::format_nothing(out);
                }
                end_frame(framing, out, mark).expect("short reply fits any frame");
            }
            Request::Stats => {
                // A write since (on either path) changes the keys and bytes: read again.
                let writes =
                    batch.counts[Verb::Store as usize] + batch.counts[Verb::Delete as usize];
                let stats = match batch.stats {
                    Some((stats, at)) if at == writes => stats,
                    _ => {
                        let stats = stats();
                        batch.stats = Some((stats, writes));
                        stats
                    }
                };
                let mark = begin_frame(framing, out);
                protocol::format_stats(&stats, out);
                end_frame(framing, out, mark).expect("stats fit any frame");
            }
        }
        Ok(())
    }

    /// A write was logged as record `seq`: with `--fsync always` it is synced before the
    /// next command; otherwise it is handed to the OS at the end of the batch.
    fn logged(&self, aof: &Arc<Aof>, seq: u64, batch: &mut Batch) -> io::Result<()> {
        if aof.policy() == Fsync::Always {
            self.commit(aof, seq)
        } else {
            batch.unsynced = Some(seq);
            Ok(())
        }
    }

    /// Commits record `seq`, then starts a log rewrite if one is due.
    fn commit(&self, aof: &Arc<Aof>, seq: u64) -> io::Result<()> {
        aof.commit(seq)?;
        aof.rewrite_if_due(&self.store);
        Ok(())
    }
}

/// The `stats` counters of a store served by `server` since `started`, with requests
/// counted by verb in `commands` ([`Verb::ALL`] order).
pub(crate) fn stats_of(
    store: &Store,
    server: &ServerHandle,
    started: Instant,
    commands: [u64; 5],
) -> Stats {
    let (keys, bytes) = store.size();
    let s = server.stats();
    let memory = server.client_memory();
    let of = |f: fn(&crate::budget::Budget) -> usize| memory.map_or(0, |b| f(b) as u64);
    Stats {
        client_memory: of(crate::budget::Budget::held),
        client_memory_peak: of(crate::budget::Budget::peak),
        client_memory_limit: of(crate::budget::Budget::limit),
        uptime_secs: started.elapsed().as_secs(),
        live_connections: s.live as u64,
        total_connections: s.accepted,
        refused_connections: s.refused,
        keys,
        bytes,
        commands,
    }
}

/// One connection of the store, for the [`RequestLoop`].
struct Session<'s> {
    service: &'s StoreService,
    batch: Batch,
    /// The batch's lookups on the fast path, holding shard locks between them: released
    /// before anything else touches the store and before any socket I/O.
    lookups: Lookups<'s>,
    /// This connection's `stats` counters.
    tally: Tally,
}

impl Session<'_> {
    /// Before replies go out: commits this batch's own writes (and starts a log rewrite if
    /// one is due), then every write logged so far by any connection, since a reply may
    /// show one (a lookup, a delete's answer). Nothing without an append-only file; only
    /// atomic loads when everything is kept already.
    fn keep_logged(&mut self) -> io::Result<()> {
        let service = self.service;
        let Some(aof) = &service.aof else {
            return Ok(());
        };
        if let Some(seq) = self.batch.unsynced.take() {
            service.commit(aof, seq)?;
        }
        aof.commit_all()
    }

    /// A fast-path lookup whose reply, of `n` bytes, did not fit the buffer: makes room,
    /// charged before it is allocated, with no shard lock held while the budget may make
    /// this wait, and copies the reply (the value as it is now: should it have grown
    /// meanwhile, the buffer grows and is charged after the request, as any reply's).
    #[cold]
    #[inline(never)]
    fn look_up_with_room(
        &mut self,
        frame: &[u8],
        n: usize,
        out: &mut Replies<'_>,
    ) -> io::Result<()> {
        self.lookups.release();
        out.reserve(n)?;
        let key = protocol::parse_lookup(frame).expect("a fast-path lookup");
        self.batch.counts[Verb::Lookup as usize] += 1;
        let buffer = out.buffer();
        self.service.store.with_lookup_line(key, |line| {
            buffer.extend_from_slice(line.unwrap_or(NOTHING_LINE));
        });
        Ok(())
    }
}

impl request::Session for Session<'_> {
    #[inline]
    fn request(
        &mut self,
        conn: &Connection,
        frame: &[u8],
        out: &mut Replies<'_>,
    ) -> Result<ControlFlow<()>, HandlerError> {
        let service = self.service;
        match service.lookup_fast(frame, &mut self.batch, &mut self.lookups, out.buffer()) {
            Fast::Done => {}
            Fast::Room(n) => self.look_up_with_room(frame, n, out)?,
            Fast::No => {
                self.lookups.release();
                if !service.store_fast(frame, &mut self.batch) {
                    service.execute(frame, &mut self.batch, out, conn)?;
                }
            }
        }
        if out.len() >= FLUSH_AT {
            self.lookups.release();
            self.keep_logged()?;
            if !out.flush_early()? {
                return Ok(ControlFlow::Break(()));
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    fn too_long(
        &mut self,
        _conn: &Connection,
        error: &FrameError,
        out: &mut Replies<'_>,
    ) -> Result<ControlFlow<()>, HandlerError> {
        let framing = self.service.framing;
        self.lookups.release();
        self.batch
            .reply_error(framing, error.reason(), out.buffer());
        Ok(ControlFlow::Continue(()))
    }

    fn batch_done(
        &mut self,
        _conn: &Connection,
        _out: &mut Replies<'_>,
    ) -> Result<ControlFlow<()>, HandlerError> {
        self.lookups.release();
        self.keep_logged()?;
        self.tally.add(&mut self.batch.counts);
        self.batch.stats = None;
        Ok(ControlFlow::Continue(()))
    }
}

/// The reply to a lookup of a missing key, as a line.
const NOTHING_LINE: &[u8] = b"nothing\n";

/// What [`StoreService::lookup_fast`] did with a frame.
#[derive(Debug, PartialEq, Eq)]
enum Fast {
    /// Not a lookup it answers: nothing done.
    No,
    /// Answered and counted.
    Done,
    /// A lookup whose reply, of this many bytes, does not fit the buffer's spare
    /// capacity: nothing done; the caller makes room and copies it.
    Room(usize),
}

/// The most a lookup's reply adds to its value: the widest frame header (10-byte ASCII),
/// `{just,` and `}`, and a line's `\n`.
const LOOKUP_FRAMING: usize = 10 + 6 + 1 + 1;

/// Appends a lookup's reply, framed: `{just,Value}`, or `nothing`. When the value does not
/// fit the framing (one stored through a size-prefixed framing may hold `\n`, or be longer
/// than a `u16` frame), nothing is appended and the caller answers with the error.
fn append_lookup_reply(
    framing: Framing,
    value: Option<&[u8]>,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let mark = begin_frame(framing, out);
    match value {
        Some(v) => protocol::format_just(v, out),
        None => protocol::format_nothing(out),
    }
    end_frame(framing, out, mark)
}

/// One connection's work in progress for the current batch of requests.
#[derive(Default)]
struct Batch {
    /// Requests by verb, added to the service's counters once per batch.
    counts: [u64; 5],
    /// The last append-only record this batch wrote, not yet committed.
    unsynced: Option<u64>,
    /// The counters as this batch's first `stats` read them: the others in the same read
    /// answer the same, up to a write (which changes the keys and bytes): with the
    /// batch's count of writes when they were read. Reading them sums every live connection's counters under one lock
    /// (and takes every shard's read lock), so a read of a megabyte of `stats` would
    /// otherwise cost that 175,000 times over, holding off connections opening and closing.
    stats: Option<(Stats, u64)>,
}

impl Batch {
    /// A lookup's reply: `{just,Value}`, or `nothing`, framed; an error when the value
    /// does not fit the framing (one stored through a size-prefixed framing may hold
    /// `\n`). The lookup itself is counted by the caller.
    fn reply_lookup(&mut self, framing: Framing, value: Option<&[u8]>, out: &mut Vec<u8>) {
        if let Err(e) = append_lookup_reply(framing, value, out) {
            self.reply_error(framing, e.reason(), out);
        }
    }

    fn reply_error(&mut self, framing: Framing, reason: &str, out: &mut Vec<u8>) {
        self.counts[Verb::Error as usize] += 1;
        let mark = begin_frame(framing, out);
        protocol::format_error(reason, out);
        end_frame(framing, out, mark).expect("error replies fit any frame");
    }
}

/// Reads the soft open-file limit from `/proc/self/limits`.
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A warning when the open-file limit cannot hold `max_connections` sockets plus a margin
/// for the listener, the log and the standard streams.
pub fn open_file_warning(max_connections: usize) -> Option<String> {
    let limit = open_file_limit()?;
    let needed = max_connections as u64 + 64;
    (limit < needed).then(|| {
        format!(
            "the open-file limit is {limit} but --max-connections {max_connections} needs about \
             {needed}; connections past the limit will fail to be accepted. Raise it with \
             `ulimit -n {needed}` (or lower --max-connections)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `frame` down the general path: its reply bytes and counts.
    fn general(service: &StoreService, frame: &[u8]) -> (Vec<u8>, [u64; 5]) {
        let (mut out, mut batch) = (Vec::new(), Batch::default());
        service
            .apply(protocol::parse(frame), &mut batch, &mut out, Stats::default)
            .unwrap();
        (out, batch.counts)
    }

    #[test]
    fn the_store_fast_path_does_what_the_general_path_does() {
        let (fast, _) = StoreService::open(&StoreOptions::default()).unwrap();
        let (slow, _) = StoreService::open(&StoreOptions::default()).unwrap();
        let mut handled = 0;
        for frame in protocol::tests::lookalike_frames() {
            let mut batch = Batch::default();
            if fast.store_fast(&frame, &mut batch) {
                handled += 1;
                let (out, counts) = general(&slow, &frame);
                assert!(out.is_empty(), "{frame:?}: a store has no reply");
                assert_eq!(batch.counts, counts, "{frame:?}");
            } else {
                assert_eq!(batch.counts, [0; 5], "{frame:?}");
                assert!(
                    !matches!(protocol::parse(&frame), Ok(Request::Store { .. })),
                    "a store left to the general path: {frame:?}"
                );
                // The general path on both, so that they stay alike.
                general(&fast, &frame);
                general(&slow, &frame);
            }
            assert_eq!(fast.store().size(), slow.store().size(), "{frame:?}");
        }
        assert!(handled > 100, "too few stores among the samples: {handled}");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut snap = fast.store().snapshot();
        while snap.next_chunk(1 << 16, |k, v| a.push((k.to_vec(), v.to_vec()))) {}
        let mut snap = slow.store().snapshot();
        while snap.next_chunk(1 << 16, |k, v| b.push((k.to_vec(), v.to_vec()))) {}
        a.sort();
        b.sort();
        assert_eq!(a, b);
        assert!(a.len() > 50, "too few keys stored: {}", a.len());

        // With an append-only file, every write goes through the general path.
        let dir = std::env::temp_dir().join(format!("store-fast-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let options = StoreOptions {
            aof: Some(dir.join("a.aof")),
            ..StoreOptions::default()
        };
        let (logged, _) = StoreService::open(&options).unwrap();
        assert!(!logged.store_fast(b"store,k,v", &mut Batch::default()));
        drop(logged);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn after_the_append_only_file_fails_no_write_is_applied() {
        let dir = std::env::temp_dir().join(format!("store-aof-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let options = StoreOptions {
            aof: Some(dir.join("a.aof")),
            fsync: Fsync::Always,
            ..StoreOptions::default()
        };
        let (service, _) = StoreService::open(&options).unwrap();
        let apply = |frame: &[u8]| {
            let (mut out, mut batch) = (Vec::new(), Batch::default());
            service.apply(protocol::parse(frame), &mut batch, &mut out, Stats::default)
        };
        apply(b"store,kept,1").unwrap();
        service.aof.as_ref().unwrap().fill_disk();
        // The write that meets the full disk is refused (its connection ends)...
        assert!(apply(b"store,first,2").is_err());
        // ...and every later one before it is applied: others would see it, and it
        // would be gone after a restart.
        assert!(apply(b"store,later,3").is_err());
        assert!(apply(b"delete,kept").is_err());
        assert_eq!(service.store().get(b"later"), None);
        assert!(service.store().get(b"kept").is_some());
        // Lookups are still answered.
        assert!(apply(b"lookup,kept").is_ok());
        drop(service);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_lookup_fast_path_answers_as_the_general_path_does() {
        let (service, _) = StoreService::open(&StoreOptions::default()).unwrap();
        assert!(service.plain_lines);
        for (k, v) in [
            (&b"k"[..], &b"v"[..]),
            (b"key", b""),
            (b"a,b", b"{x,y},z"),
            (b"\xff\xfe", b"\xff\r\t"),
            (b"k ", b"space"),
            (b"key:00000001", &[b'x'; 300][..]),
        ] {
            service.store().set(k, v);
        }
        let mut handled = 0;
        // One `Lookups` throughout, as a session keeps it: it holds shard locks from one
        // fast lookup to the next, and lets go before the general path runs.
        let mut lookups = service.store().lookups();
        for frame in protocol::tests::lookalike_frames() {
            let mut out = Vec::with_capacity(1024);
            out.extend_from_slice(b"before");
            let mut batch = Batch::default();
            if service.lookup_fast(&frame, &mut batch, &mut lookups, &mut out) == Fast::Done {
                handled += 1;
                let (want, counts) = general(&service, &frame);
                assert_eq!(out[b"before".len()..], want, "{frame:?}");
                assert_eq!(batch.counts, counts, "{frame:?}");
            } else {
                assert_eq!(out, b"before", "{frame:?}");
                assert_eq!(batch.counts, [0; 5], "{frame:?}");
                assert!(
                    !matches!(protocol::parse(&frame), Ok(Request::Lookup { .. })),
                    "a lookup left to the general path: {frame:?}"
                );
            }
            // The general path may write (store, delete): later lookups see another map.
            lookups.release();
            general(&service, &frame);
        }
        assert!(
            handled > 100,
            "too few lookups among the samples: {handled}"
        );

        // Size-prefixed framings frame every reply: no fast path.
        let options = StoreOptions {
            framing: Framing::U32,
            ..StoreOptions::default()
        };
        let (framed, _) = StoreService::open(&options).unwrap();
        let (mut out, mut batch) = (Vec::new(), Batch::default());
        let mut lookups = framed.store().lookups();
        let fast = framed.lookup_fast(b"lookup,k", &mut batch, &mut lookups, &mut out);
        assert_eq!(fast, Fast::No);
        assert!(out.is_empty());
    }

    #[test]
    fn a_lookup_reply_that_does_not_fit_is_left_for_room_to_be_made() {
        let (service, _) = StoreService::open(&StoreOptions::default()).unwrap();
        service.store().set(b"big", &[b'v'; 1000]);
        let mut lookups = service.store().lookups();
        let (mut out, mut batch) = (Vec::with_capacity(100), Batch::default());
        out.extend_from_slice(b"before");
        let fast = service.lookup_fast(b"lookup,big", &mut batch, &mut lookups, &mut out);
        assert_eq!(fast, Fast::Room(b"{just,}\n".len() + 1000));
        assert_eq!((&out[..], batch.counts), (&b"before"[..], [0; 5]));
        lookups.release();
        out.reserve(1008);
        let fast = service.lookup_fast(b"lookup,big", &mut batch, &mut lookups, &mut out);
        assert_eq!(fast, Fast::Done);
        assert_eq!(out.len(), b"before".len() + 1008);
        assert_eq!(batch.counts[Verb::Lookup as usize], 1);
        // A missing key's `nothing` needs room too (in an empty buffer).
        let mut empty = Vec::new();
        let missing = service.lookup_fast(b"lookup,no", &mut batch, &mut lookups, &mut empty);
        assert_eq!(missing, Fast::Room(b"nothing\n".len()));
    }

    /// The `stats` of one read are answered from one reading of the counters: a read of a
    /// megabyte of `stats` sums every connection's counters once, not 175,000 times.
    #[test]
    fn the_stats_of_one_batch_read_the_counters_once() {
        let (service, _) = StoreService::open(&StoreOptions::default()).unwrap();
        let mut batch = Batch::default();
        let mut out = Vec::new();
        let readings = std::cell::Cell::new(0);
        let reading = || {
            readings.set(readings.get() + 1);
            Stats {
                keys: readings.get(),
                ..Stats::default()
            }
        };
        for _ in 0..3 {
            let stats = protocol::parse(b"stats");
            service.apply(stats, &mut batch, &mut out, reading).unwrap();
        }
        assert_eq!(readings.get(), 1);
        assert_eq!(batch.counts[Verb::Stats as usize], 3);
        let replies = String::from_utf8(out).unwrap();
        assert_eq!(replies.matches("{keys,1}").count(), 3, "{replies}");
        // A write in the same read changes what they report: read afresh after it.
        let mut out = Vec::new();
        for frame in [&b"store,k,v"[..], b"stats"] {
            let request = protocol::parse(frame);
            service
                .apply(request, &mut batch, &mut out, reading)
                .unwrap();
        }
        assert_eq!(readings.get(), 2);
        // The next batch reads them afresh (`batch_done` forgets them).
        batch.stats = None;
        service
            .apply(protocol::parse(b"stats"), &mut batch, &mut out, reading)
            .unwrap();
        assert_eq!(readings.get(), 3);
    }

    /// A client whose first batch asks for more replies than one flush (`FLUSH_AT`) and
    /// never reads them. Before its first batch settled, a mid-batch write blocked on it
    /// for good, and every younger connection waited the longest wait of arrival order (an
    /// hour here: the getter's read would time out). The batch now settles before its
    /// early write (`Replies::flush_early`).
    #[test]
    fn a_first_batch_is_not_written_mid_batch_before_it_settles() {
        use crate::budget::Budget;
        use crate::server::{Server, ServerConfig};
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener};
        use std::time::Duration;
        let (service, _) = StoreService::open(&StoreOptions::default()).unwrap();
        let Ok(mut service) = Arc::try_unwrap(service) else {
            unreachable!("not shared yet")
        };
        service.arrivals = Arrivals::with_max_wait(Duration::from_secs(3600));
        service.requests = RequestLoop::new(Framing::Line).in_order(&service.arrivals);
        let service = Arc::new(service);
        let config = ServerConfig {
            client_memory: Some(Budget::new("store", 256 << 20)),
            ..ServerConfig::named("store")
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = Server::with_handler(listener, config, service.handler())
            .unwrap()
            .spawn()
            .unwrap();
        let connect = || crate::testing::connect(server.local_addr());
        let mut setter = connect();
        let value = "v".repeat(128 << 10);
        setter
            .write_all(format!("store,k,{value}\nlookup,k\n").as_bytes())
            .unwrap();
        let mut first = [0u8; 6];
        setter.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"{just,");
        drop(setter);
        // 1.8 KB of lookups, one read's worth, asking for 25 MiB of replies.
        let mut hog = connect();
        hog.write_all("lookup,k\n".repeat(200).as_bytes()).unwrap();
        let mut getter = connect();
        getter.write_all(b"store,j,after\nlookup,j\n").unwrap();
        getter.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        getter.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "{just,after}\n");
        drop(hog);
        server.stop();
    }
}
