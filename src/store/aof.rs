//! The append-only file: every applied write, replayed on start.
//!
//! ```text
//! file   := "SWBAOF1\n" record*
//! record := 'S' klen:u32be vlen:u32be key value crc:u32be      store KEY VALUE
//!         | 'D' klen:u32be key crc:u32be                        delete KEY
//! crc    := CRC-32 (IEEE, as zlib's crc32) of the record's bytes before it
//! ```
//!
//! A crash can leave the last record half written; replay stops at the first record that
//! is incomplete or fails its CRC, reports it, and cuts the file back to the last good
//! record so new records follow a clean boundary. It never refuses to start over it.
//!
//! Writers append records to an in-memory buffer under the store's shard lock (so records
//! of one key are in map order) and then commit: `always` writes and fsyncs before the
//! connection processes its next command (one fsync serves every writer waiting at that
//! moment: group commit); `everysec` and `no` write the buffer to the OS at the end of each
//! batch of commands, so a killed process loses nothing, and `everysec` fsyncs once a second.
//!
//! Rewrite (compaction): once the log is larger than a minimum size and more than twice what
//! a snapshot of the live data would take, a background thread writes a fresh log, one
//! 'S' record per live key, to `PATH.rewrite`, appends the records written meanwhile, and
//! renames it over `PATH` (see [`Aof::rewrite`] for why nothing is lost). At any moment
//! `PATH` holds a complete log, old or new; a `PATH.rewrite` found at start is a rewrite
//! that never finished, and is deleted.

use crate::log_info;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::state::Store;

const MAGIC: &[u8] = b"SWBAOF1\n";

/// The default minimum size of a log before it is rewritten automatically.
pub const DEFAULT_REWRITE_MIN: u64 = 64 << 20;

/// Bytes of keys and values a rewrite copies out of the store under one shard lock.
const SNAPSHOT_CHUNK: usize = 64 << 10;

/// The records written during a rewrite are copied to the new file in rounds that block no
/// one, until a round is smaller than this; the rest is copied while commits wait.
const TAIL_BYTES: usize = 64 << 10;

/// At most this many such rounds: writers that outpace the copy are caught up with anyway.
const TAIL_ROUNDS: usize = 8;

/// When the log is flushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fsync {
    /// Before the next command on the writing connection is processed.
    Always,
    /// Once a second (writes reach the OS at the end of each batch).
    #[default]
    EverySec,
    /// Never explicitly (writes reach the OS at the end of each batch).
    No,
}

impl FromStr for Fsync {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Fsync::Always),
            "everysec" => Ok(Fsync::EverySec),
            "no" => Ok(Fsync::No),
            _ => Err(format!(
                "unknown fsync policy {s:?} (expected always, everysec or no)"
            )),
        }
    }
}

/// A size in bytes, written as a number with an optional binary suffix: `4096`, `512k`,
/// `64m`, `1g` (`kb`, `mb`, `gb` and `kib`, `mib`, `gib` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let digits = lower
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(lower.len());
        let (number, suffix) = lower.split_at(digits);
        let shift = match suffix {
            "" | "b" => Some(0),
            "k" | "kb" | "kib" => Some(10),
            "m" | "mb" | "mib" => Some(20),
            "g" | "gb" | "gib" => Some(30),
            _ => None,
        };
        shift
            .zip(number.parse::<u64>().ok())
            .and_then(|(shift, n)| n.checked_mul(1 << shift))
            .map(ByteSize)
            .ok_or_else(|| format!("bad size {s:?} (expected e.g. 4096, 512k, 64m or 1g)"))
    }
}

/// What replay found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Replay {
    /// Records applied.
    pub records: u64,
    /// Offset and length of a torn or corrupt tail that was cut off, if any.
    pub torn: Option<(u64, u64)>,
}

impl fmt::Display for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} records replayed", self.records)?;
        if let Some((at, len)) = self.torn {
            write!(
                f,
                "; a torn or corrupt record at byte {at} ({len} bytes) was ignored and cut off"
            )?;
        }
        Ok(())
    }
}

/// What a finished rewrite did, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// Size of the old log when the new one replaced it.
    pub old_len: u64,
    /// Size of the new log.
    pub new_len: u64,
    /// Keys in the snapshot.
    pub keys: u64,
    /// From the start of the snapshot to the switch.
    pub took: Duration,
    /// Bytes of records appended while it ran (copied to the new file after the snapshot
    /// records they follow).
    pub buffered: u64,
    /// The most of those bytes held in memory at once: they are moved to the new file
    /// after every snapshot chunk, so this stays near what the writers append during one
    /// chunk's copy, however long the whole snapshot takes.
    pub buffered_peak: u64,
}

impl fmt::Display for Rewritten {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} bytes, {} keys, {:.1} ms, {} bytes written meanwhile (at most {} held)",
            self.old_len,
            self.new_len,
            self.keys,
            self.took.as_secs_f64() * 1000.0,
            self.buffered,
            self.buffered_peak
        )
    }
}

struct Pending {
    buf: Vec<u8>,
    /// Sequence number of the last record appended.
    seq: u64,
    /// While a rewrite runs: every record appended since it started (the since-snapshot
    /// buffer), not yet copied to the new file.
    since: Option<Vec<u8>>,
    /// Bytes appended to `since` during the current rewrite, and the most it held at once.
    since_total: u64,
    since_peak: u64,
}

struct Output {
    file: File,
    /// The buffer swapped with `Pending::buf`, kept to reuse its allocation.
    spare: Vec<u8>,
    written: u64,
    synced: u64,
    /// Why a write or fsync of the log failed, once one has: the file may then end in a
    /// partial record, after which replay would stop, and a failed fsync may have dropped
    /// pages. No commit succeeds after that (until a restart replays what is good), so no
    /// write is ever acknowledged that a restart would not bring back.
    failed: Option<String>,
}

/// The automatic rewrite in the background, if one runs.
#[derive(Default)]
struct Rewriter {
    /// Dropping the sender asks the rewrite to give up (at shutdown).
    running: Option<(Sender<()>, JoinHandle<()>)>,
    /// Set by [`Aof::close`]: no rewrite starts after it.
    closed: bool,
}

/// An open append-only file.
pub struct Aof {
    path: PathBuf,
    policy: Fsync,
    pending: Mutex<Pending>,
    output: Mutex<Output>,
    /// Dropping it stops the `everysec` syncer.
    stop_syncer: Mutex<Option<Sender<()>>>,
    syncer: Mutex<Option<JoinHandle<()>>>,
    /// The log's size as last written, read by the cheap check after every commit.
    len: AtomicU64,
    /// Automatic rewrites: the minimum log size, 0 for none.
    rewrite_min: AtomicU64,
    /// Commits look closer (count the live data) only once `len` passes this; `u64::MAX`
    /// while a rewrite runs.
    check_at: AtomicU64,
    rewriter: Mutex<Rewriter>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent before it can panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Aof {
    /// Opens (or creates) the log at `path`, replays it into `store`, and cuts off a torn
    /// tail.
    ///
    /// # Errors
    /// When the file cannot be read, created or written, or exists and is not a log of
    /// this format (it is then left untouched).
    pub fn open(path: &Path, policy: Fsync, store: &Store) -> io::Result<(Arc<Aof>, Replay)> {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut replay = Replay::default();
        let good_end = if data.len() < MAGIC.len() && MAGIC.starts_with(&data) {
            // Empty, or torn while the header itself was written.
            0
        } else if !data.starts_with(MAGIC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a switchboard append-only file", path.display()),
            ));
        } else {
            let mut at = MAGIC.len();
            while at < data.len() {
                match decode_record(&data[at..]) {
                    Some((record, len)) => {
                        match record {
                            Record::Store(k, v) => store.set(k, v),
                            Record::Delete(k) => {
                                store.delete(k);
                            }
                        }
                        replay.records += 1;
                        at += len;
                    }
                    None => {
                        replay.torn = Some((at as u64, (data.len() - at) as u64));
                        break;
                    }
                }
            }
            at
        };
        let leftover = rewrite_path(path);
        match std::fs::remove_file(&leftover) {
            Ok(()) => log_info!(
                "aof {}: deleted {}, left by a rewrite that did not finish",
                path.display(),
                leftover.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log_info!(
                "aof {}: cannot delete {}, left by a rewrite that did not finish: {e}",
                path.display(),
                leftover.display()
            ),
        }
        let file = open_for_append(path, MAGIC, good_end, data.len())?;
        let len = good_end.max(MAGIC.len()) as u64;
        let aof = Arc::new(Aof {
            path: path.to_owned(),
            policy,
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                seq: 0,
                since: None,
                since_total: 0,
                since_peak: 0,
            }),
            output: Mutex::new(Output {
                file,
                spare: Vec::new(),
                written: 0,
                synced: 0,
                failed: None,
            }),
            stop_syncer: Mutex::new(None),
            syncer: Mutex::new(None),
            len: AtomicU64::new(len),
            rewrite_min: AtomicU64::new(0),
            check_at: AtomicU64::new(u64::MAX),
            rewriter: Mutex::new(Rewriter::default()),
        });
        if policy == Fsync::EverySec {
            aof.start_syncer()?;
        }
        Ok((aof, replay))
    }

    fn start_syncer(self: &Arc<Self>) -> io::Result<()> {
        let (stop, stopped) = bounded::<()>(0);
        let aof = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("aof-fsync".into())
            .spawn(move || loop {
                match stopped.recv_timeout(Duration::from_secs(1)) {
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(e) = aof.sync_to(u64::MAX) {
                            log_info!("aof {}: fsync failed: {e}", aof.path.display());
                        }
                    }
                    _ => return,
                }
            })?;
        *lock(&self.stop_syncer) = Some(stop);
        *lock(&self.syncer) = Some(thread);
        Ok(())
    }

    /// The fsync policy.
    pub fn policy(&self) -> Fsync {
        self.policy
    }

    /// Appends a `store` record to the buffer; returns its sequence number. Call it under
    /// the key's shard lock (see [`Store::set_logged`]).
    pub fn log_store(&self, key: &[u8], value: &[u8]) -> u64 {
        self.append(|buf| encode_store(key, value, buf))
    }

    /// Appends a `delete` record to the buffer; returns its sequence number.
    pub fn log_delete(&self, key: &[u8]) -> u64 {
        self.append(|buf| encode_delete(key, buf))
    }

    fn append(&self, encode: impl FnOnce(&mut Vec<u8>)) -> u64 {
        let mut p = lock(&self.pending);
        let p = &mut *p;
        let start = p.buf.len();
        encode(&mut p.buf);
        if let Some(since) = &mut p.since {
            since.extend_from_slice(&p.buf[start..]);
            p.since_total += (p.buf.len() - start) as u64;
            p.since_peak = p.since_peak.max(since.len() as u64);
        }
        p.seq += 1;
        p.seq
    }

    /// Makes record `seq` (and all before it) as durable as the policy promises: fsynced
    /// for `always`, handed to the OS otherwise.
    ///
    /// # Errors
    /// When writing or syncing the file fails; the records stay in memory only.
    pub fn commit(&self, seq: u64) -> io::Result<()> {
        match self.policy {
            Fsync::Always => self.sync_to(seq),
            Fsync::EverySec | Fsync::No => self.write_to(seq, false),
        }
    }

    fn sync_to(&self, seq: u64) -> io::Result<()> {
        self.write_to(seq, true)
    }

    /// Writes out pending records up to at least `seq`, and fsyncs if asked. Whoever holds
    /// `output` writes everything pending at that moment, so writers that queue behind an
    /// fsync usually find their record already written and synced when they get the lock.
    fn write_to(&self, seq: u64, sync: bool) -> io::Result<()> {
        let mut out = lock(&self.output);
        if let Some(why) = &out.failed {
            return Err(io::Error::other(format!(
                "the append-only file failed earlier ({why}); writes are refused until a restart"
            )));
        }
        let done = if sync { out.synced } else { out.written };
        if done >= seq && seq != u64::MAX {
            return Ok(());
        }
        let upto = {
            let mut p = lock(&self.pending);
            let out = &mut *out;
            std::mem::swap(&mut p.buf, &mut out.spare);
            p.seq
        };
        let out = &mut *out;
        let result = out.file.write_all(&out.spare);
        let wrote = out.spare.len() as u64;
        out.spare.clear();
        let result = result.map(|()| {
            self.len.fetch_add(wrote, Ordering::Relaxed);
            out.written = upto;
        });
        let result = match result {
            Ok(()) if sync && out.synced < upto => out.file.sync_data().map(|()| {
                out.synced = upto;
            }),
            other => other,
        };
        if let Err(e) = &result {
            log_info!(
                "aof {}: {e}; no further write will be acknowledged until the server is \
                 restarted",
                self.path.display()
            );
            out.failed = Some(e.to_string());
        }
        result
    }

    /// Writes and fsyncs everything, and stops the `everysec` syncer and any rewrite (one
    /// still copying its snapshot gives up; one past that finishes).
    ///
    /// # Errors
    /// When the final write or fsync fails.
    pub fn close(&self) -> io::Result<()> {
        lock(&self.stop_syncer).take();
        if let Some(t) = lock(&self.syncer).take() {
            let _ = t.join();
        }
        let running = {
            let mut r = lock(&self.rewriter);
            r.closed = true;
            r.running.take()
        };
        if let Some((stop, thread)) = running {
            drop(stop);
            let _ = thread.join();
        }
        self.sync_to(u64::MAX)
    }

    /// Turns automatic rewrites on for logs larger than `min_len` bytes (0: off).
    pub fn set_rewrite_min(&self, min_len: u64) {
        self.rewrite_min.store(min_len, Ordering::Relaxed);
        let check_at = if min_len == 0 { u64::MAX } else { min_len };
        self.check_at.store(check_at, Ordering::Relaxed);
    }

    /// The log's size in bytes, as last written.
    pub fn size(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    /// Call after a commit: starts a rewrite in the background when the log is larger than
    /// the minimum and more than twice a snapshot of `store`, unless one runs already.
    /// Costs two atomic loads until the log has grown enough to be worth a look.
    pub fn rewrite_if_due(self: &Arc<Self>, store: &Arc<Store>) {
        let len = self.size();
        if len <= self.check_at.load(Ordering::Relaxed) {
            return;
        }
        let mut rewriter = lock(&self.rewriter);
        let min = self.rewrite_min.load(Ordering::Relaxed);
        if rewriter.closed || min == 0 {
            return;
        }
        match rewriter.running.take() {
            Some((_, thread)) if thread.is_finished() => {
                let _ = thread.join();
            }
            Some(running) => {
                rewriter.running = Some(running);
                return;
            }
            None => {}
        }
        let (keys, bytes) = store.size();
        let live = snapshot_len(keys, bytes);
        if len <= min || len <= 2 * live {
            self.check_at.store(min.max(2 * live), Ordering::Relaxed);
            return;
        }
        self.check_at.store(u64::MAX, Ordering::Relaxed);
        log_info!(
            "aof {}: rewrite started: the log is {len} bytes, its live data about {live}",
            self.path.display()
        );
        let (stop, stopped) = bounded::<()>(0);
        let (aof, store) = (Arc::clone(self), Arc::clone(store));
        let spawned = std::thread::Builder::new()
            .name("aof-rewrite".into())
            .spawn(move || aof.rewrite_in_background(&store, &stopped));
        match spawned {
            Ok(thread) => rewriter.running = Some((stop, thread)),
            Err(e) => {
                log_info!("aof {}: cannot start a rewrite: {e}", self.path.display());
                self.check_at.store(len + min, Ordering::Relaxed);
            }
        }
    }

    fn rewrite_in_background(&self, store: &Store, stop: &Receiver<()>) {
        let min = self.rewrite_min.load(Ordering::Relaxed);
        match self.rewrite_unless_stopped(store, Some(stop)) {
            Ok(done) => {
                log_info!("aof {}: rewritten: {done}", self.path.display());
                let (keys, bytes) = store.size();
                self.check_at
                    .store(min.max(2 * snapshot_len(keys, bytes)), Ordering::Relaxed);
            }
            Err(e) => {
                log_info!(
                    "aof {}: rewrite failed, the old log stays in use: {e}",
                    self.path.display()
                );
                // Try again once the log has grown by the minimum, not at the next commit.
                self.check_at.store(self.size() + min, Ordering::Relaxed);
            }
        }
    }

    /// Replaces the log with one 'S' record per live key of `store` followed by the records
    /// appended meanwhile. Writers go on meanwhile; commits wait only for the last step.
    ///
    /// Why the new log replays to the current state: from the start, every appended record
    /// is also kept in the since-snapshot buffer, and the buffer is moved to the new file
    /// after each chunk of the snapshot and once more at the end, so every record since the
    /// start is in the new file, in append order, which for one key is map order (records
    /// are appended under the shard lock, after the map is changed). Take any key. If
    /// nothing wrote it after the start, the snapshot copied its state as it was at the
    /// start (present with that value, or absent). If something did, replay ends on
    /// whichever comes last in the file of its last record and its snapshot record (if
    /// any). Its last record: its current state. Its snapshot record: that comes later
    /// only when its chunk was copied after the buffer holding the last record was moved
    /// out, so after the record was applied to the map; the copy is then that current
    /// state too. Records are whole values, never increments, so replaying one the snapshot
    /// already reflects is harmless. Moving the buffer after every chunk keeps it small:
    /// the writes made during one chunk's copy, not during the whole snapshot.
    ///
    /// # Errors
    /// When a rewrite is running already, or the new file cannot be written, synced or
    /// renamed; the old log is then still complete and in use, and the new file is deleted.
    pub fn rewrite(&self, store: &Store) -> io::Result<Rewritten> {
        self.rewrite_unless_stopped(store, None)
    }

    /// [`Aof::rewrite`], given up (with `Interrupted`) when `stop` is disconnected while
    /// the snapshot is written.
    fn rewrite_unless_stopped(
        &self,
        store: &Store,
        stop: Option<&Receiver<()>>,
    ) -> io::Result<Rewritten> {
        let started = Instant::now();
        self.begin_capture()?;
        let temp = rewrite_path(&self.path);
        let result = self
            .write_snapshot(store, &temp, stop)
            .and_then(|(file, len, keys)| self.switch(file, &temp, len, keys, started));
        if result.is_err() {
            lock(&self.pending).since = None;
            let _ = std::fs::remove_file(&temp);
        }
        result
    }

    /// Starts keeping every appended record in the since-snapshot buffer.
    fn begin_capture(&self) -> io::Result<()> {
        let mut p = lock(&self.pending);
        if p.since.is_some() {
            return Err(io::Error::other("a rewrite is already running"));
        }
        p.since = Some(Vec::new());
        p.since_total = 0;
        p.since_peak = 0;
        Ok(())
    }

    /// Writes the magic, the snapshot and the since-snapshot buffer as it stands to
    /// `temp` (the buffer after each chunk: see [`Aof::rewrite`]), and fsyncs it; returns
    /// the file, its length and the number of keys. Holds each shard lock for one chunk's
    /// copy at most and the append lock for a swap of buffers, never across I/O.
    fn write_snapshot(
        &self,
        store: &Store,
        temp: &Path,
        stop: Option<&Receiver<()>>,
    ) -> io::Result<(File, u64, u64)> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(temp)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC)?;
        let (mut len, mut keys) = (MAGIC.len() as u64, 0);
        let mut records = Vec::new();
        let mut snapshot = store.snapshot();
        while snapshot.next_chunk(SNAPSHOT_CHUNK, |k, v| {
            encode_store(k, v, &mut records);
            keys += 1;
        }) {
            if stop.is_some_and(|s| s.try_recv() == Err(TryRecvError::Disconnected)) {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "stopped by shutdown",
                ));
            }
            out.write_all(&records)?;
            len += records.len() as u64;
            records.clear();
            // After the chunk, never before it: a record moved out here was applied to the
            // map before the next chunk is copied.
            len += self.move_since(&mut out, &mut records)?;
        }
        for _ in 0..TAIL_ROUNDS {
            let moved = self.move_since(&mut out, &mut records)?;
            len += moved;
            if moved < TAIL_BYTES as u64 {
                break;
            }
        }
        let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_data()?;
        Ok((file, len, keys))
    }

    /// Moves the since-snapshot buffer as it stands to `out` (swapping it with the empty
    /// `spare`, so neither allocation is lost); returns the bytes moved.
    fn move_since(&self, out: &mut impl Write, spare: &mut Vec<u8>) -> io::Result<u64> {
        debug_assert!(spare.is_empty());
        if let Some(since) = &mut lock(&self.pending).since {
            std::mem::swap(since, spare);
        }
        let moved = spare.len() as u64;
        let written = out.write_all(spare);
        spare.clear();
        written.map(|()| moved)
    }

    /// Appends the rest of the since-snapshot buffer to `temp`, fsyncs it, renames it over
    /// the log and makes it the live file. Commits wait meanwhile (the output lock is
    /// held); appends do not (the append lock is held only to take the buffers).
    fn switch(
        &self,
        mut file: File,
        temp: &Path,
        len: u64,
        keys: u64,
        started: Instant,
    ) -> io::Result<Rewritten> {
        let mut out = lock(&self.output);
        // Records appended from here on are not captured; they stay in `pending.buf` and
        // reach the new file with the next commit, since this holds `output` until the new
        // file is live. Records up to `upto` that were never written to the old file
        // (`unwritten`) need not be: each was appended after the start (and is in `tail`
        // or was copied already) or before it (and the snapshot reflects it).
        let (tail, mut unwritten, upto, buffered, buffered_peak) = {
            let mut p = lock(&self.pending);
            let tail = p.since.take().unwrap_or_default();
            let buf = std::mem::take(&mut p.buf);
            (tail, buf, p.seq, p.since_total, p.since_peak)
        };
        let renamed = file
            .write_all(&tail)
            .and_then(|()| file.sync_data())
            .and_then(|()| std::fs::rename(temp, &self.path));
        if let Err(e) = renamed {
            // The old log stays: give it back the records it has not been sent yet, ahead
            // of any appended since.
            let mut p = lock(&self.pending);
            unwritten.extend_from_slice(&p.buf);
            p.buf = unwritten;
            return Err(e);
        }
        // From here on the new file is the log at `path`; the old one is unlinked, so
        // whatever happens next the switch must be made.
        if let Err(e) = sync_dir(&self.path) {
            log_info!(
                "aof {}: fsync of its directory after a rewrite failed: {e}",
                self.path.display()
            );
        }
        let new_len = len + tail.len() as u64;
        let old_len = self.len.swap(new_len, Ordering::Relaxed);
        out.file = file;
        // Every record up to `upto` is in the new file or reflected by its snapshot, and
        // the file is synced: commits waiting for any of them are done.
        out.written = upto;
        out.synced = upto;
        Ok(Rewritten {
            old_len,
            new_len,
            keys,
            took: started.elapsed(),
            buffered,
            buffered_peak,
        })
    }
}

/// Bytes a fresh log of `keys` keys holding `bytes` of keys and values takes: the magic,
/// and per key a tag, two lengths and a CRC.
fn snapshot_len(keys: u64, bytes: u64) -> u64 {
    MAGIC.len() as u64 + keys * 13 + bytes
}

/// Where a rewrite writes the new log before renaming it over `path`: `PATH.rewrite`, in
/// the same directory, so the rename is atomic.
fn rewrite_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".rewrite");
    PathBuf::from(name)
}

/// Fsyncs the directory holding `path`, so a rename in it survives a machine crash.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Opens a log for appending after replay read `len` bytes of it and found them good up to
/// `good_end`: a log with no good header is started afresh with `magic`, a torn tail is
/// cut off, and the cut is synced before anything new is appended after it.
///
/// # Errors
/// When the file cannot be opened, cut, written or synced.
pub(crate) fn open_for_append(
    path: &Path,
    magic: &[u8],
    good_end: usize,
    len: usize,
) -> io::Result<File> {
    use std::io::Seek;
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    if good_end == 0 {
        file.set_len(0)?;
        file.write_all(magic)?;
    } else if good_end < len {
        file.set_len(good_end as u64)?;
    }
    // Appends go to the end; O_APPEND is not needed with one writer at a time.
    file.seek(io::SeekFrom::End(0))?;
    file.sync_all()?;
    Ok(file)
}

enum Record<'a> {
    Store(&'a [u8], &'a [u8]),
    Delete(&'a [u8]),
}

fn encode_store(key: &[u8], value: &[u8], buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.push(b'S');
    buf.extend_from_slice(&(key.len() as u32).to_be_bytes());
    buf.extend_from_slice(&(value.len() as u32).to_be_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(value);
    let crc = crc32(&buf[start..]);
    buf.extend_from_slice(&crc.to_be_bytes());
}

fn encode_delete(key: &[u8], buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.push(b'D');
    buf.extend_from_slice(&(key.len() as u32).to_be_bytes());
    buf.extend_from_slice(key);
    let crc = crc32(&buf[start..]);
    buf.extend_from_slice(&crc.to_be_bytes());
}

/// Decodes the record at the start of `data`: the record and its length, or `None` if it
/// is incomplete or corrupt.
fn decode_record(data: &[u8]) -> Option<(Record<'_>, usize)> {
    let u32_at = |at: usize| -> Option<usize> {
        let b = data.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let (record, body_end) = match data.first()? {
        b'S' => {
            let (klen, vlen) = (u32_at(1)?, u32_at(5)?);
            let key = data.get(9..9 + klen)?;
            let value = data.get(9 + klen..9 + klen + vlen)?;
            (Record::Store(key, value), 9 + klen + vlen)
        }
        b'D' => {
            let klen = u32_at(1)?;
            (Record::Delete(data.get(5..5 + klen)?), 5 + klen)
        }
        _ => return None,
    };
    let crc = u32_at(body_end)? as u32;
    (crc32(&data[..body_end]) == crc).then_some((record, body_end + 4))
}

/// CRC-32 (IEEE 802.3, reflected, as zlib), table-driven.
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !bytes.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn temp_path(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("switchboard-aof-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir
    }

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn after_a_failed_write_no_later_write_is_acknowledged() {
        let path = temp_path("write-fails");
        let store = Store::new();
        let (aof, _) = Aof::open(&path, Fsync::Always, &store).unwrap();
        let first = aof.log_store(b"k1", b"kept");
        aof.commit(first).unwrap();
        // The disk fills up: /dev/full fails every write with ENOSPC.
        let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let good = std::mem::replace(&mut lock(&aof.output).file, full);
        let second = aof.log_store(b"k2", b"lost");
        assert!(aof.commit(second).is_err());
        // Room again: the record that failed is gone, so no later write may be
        // acknowledged as durable (its commit would claim the lost one's place too).
        lock(&aof.output).file = good;
        let third = aof.log_store(b"k3", b"after");
        let err = aof.commit(third).unwrap_err();
        assert!(err.to_string().contains("failed earlier"), "{err}");
        drop(aof);
        let again = Store::new();
        let (_aof, replay) = Aof::open(&path, Fsync::Always, &again).unwrap();
        assert_eq!(replay.records, 1);
        assert_eq!(again.get(b"k1").unwrap(), b"kept");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn records_replay_in_order() {
        for policy in [Fsync::Always, Fsync::EverySec, Fsync::No] {
            let path = temp_path(&format!("replay-{policy:?}"));
            let store = Store::new();
            let (aof, replay) = Aof::open(&path, policy, &store).unwrap();
            assert_eq!(replay, Replay::default());
            let writes: [(&[u8], Option<&[u8]>); 4] = [
                (b"a", Some(b"1")),
                (b"b", Some(b"x,\ny\xff")),
                (b"a", None),
                (b"c", Some(b"")),
            ];
            let mut last = 0;
            for (k, v) in writes {
                last = match v {
                    Some(v) => aof.log_store(k, v),
                    None => aof.log_delete(k),
                };
            }
            aof.commit(last).unwrap();
            aof.close().unwrap();
            let again = Store::new();
            let (_aof, replay) = Aof::open(&path, policy, &again).unwrap();
            assert_eq!(replay.records, 4);
            assert_eq!(replay.torn, None);
            assert_eq!(again.get(b"a"), None);
            assert_eq!(again.get(b"b").unwrap(), b"x,\ny\xff");
            assert_eq!(again.get(b"c").unwrap(), b"");
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn a_torn_tail_at_every_cut_is_reported_and_cut_off() {
        let path = temp_path("torn");
        let mut whole = MAGIC.to_vec();
        encode_store(b"k1", b"v1", &mut whole);
        let first_end = whole.len();
        encode_store(b"k2", b"v2", &mut whole);
        for cut in first_end + 1..whole.len() {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let store = Store::new();
            let (aof, replay) = Aof::open(&path, Fsync::No, &store).unwrap();
            assert_eq!(replay.records, 1, "cut at {cut}");
            assert_eq!(
                replay.torn,
                Some((first_end as u64, (cut - first_end) as u64))
            );
            assert_eq!(store.get(b"k1").unwrap(), b"v1");
            assert_eq!(store.get(b"k2"), None);
            // New records land after the last good one.
            let seq = aof.log_store(b"k3", b"v3");
            aof.commit(seq).unwrap();
            aof.close().unwrap();
            let store = Store::new();
            let (_aof, replay) = Aof::open(&path, Fsync::No, &store).unwrap();
            assert_eq!((replay.records, replay.torn), (2, None));
            assert_eq!(store.get(b"k3").unwrap(), b"v3");
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_corrupt_record_is_caught_by_its_crc() {
        let path = temp_path("corrupt");
        let mut data = MAGIC.to_vec();
        encode_store(b"k", b"value", &mut data);
        let flip = data.len() - 6;
        data[flip] ^= 0x20;
        std::fs::write(&path, &data).unwrap();
        let store = Store::new();
        let (_aof, replay) = Aof::open(&path, Fsync::No, &store).unwrap();
        assert_eq!(replay.records, 0);
        assert!(replay.torn.is_some());
        assert!(replay.to_string().contains("ignored"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused_and_left_alone() {
        let path = temp_path("foreign");
        std::fs::write(&path, b"precious data, not a log").unwrap();
        let err = Aof::open(&path, Fsync::No, &Store::new()).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(std::fs::read(&path).unwrap(), b"precious data, not a log");
        std::fs::remove_file(&path).unwrap();
    }

    fn set(store: &Store, aof: &Aof, key: &str, value: &str) -> u64 {
        let (k, v) = (key.as_bytes(), value.as_bytes());
        store.set_logged(k, v, || aof.log_store(k, v))
    }

    fn delete(store: &Store, aof: &Aof, key: &str) {
        store.delete_logged(key.as_bytes(), || {
            aof.log_delete(key.as_bytes());
        });
    }

    fn contents(store: &Store) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut all = BTreeMap::new();
        let mut snapshot = store.snapshot();
        while snapshot.next_chunk(1 << 10, |k, v| {
            all.insert(k.to_vec(), v.to_vec());
        }) {}
        all
    }

    /// What a fresh start would find in the log at `path`.
    fn replayed(path: &Path) -> (BTreeMap<Vec<u8>, Vec<u8>>, Replay) {
        let store = Store::new();
        let (aof, replay) = Aof::open(path, Fsync::No, &store).unwrap();
        aof.close().unwrap();
        (contents(&store), replay)
    }

    #[test]
    fn a_rewrite_replays_to_the_same_map_wherever_writes_fall_around_it() {
        let path = temp_path("rewrite-steps");
        let store = Store::new();
        let (aof, _) = Aof::open(&path, Fsync::Always, &store).unwrap();
        for round in 0..20 {
            for i in 0..30 {
                set(&store, &aof, &format!("k{i}"), &format!("v{i}.{round}"));
            }
        }
        delete(&store, &aof, "k0");
        aof.commit(u64::MAX).unwrap();
        let before = aof.size();

        aof.begin_capture().unwrap();
        // Before the snapshot: the snapshot has these, and the buffer repeats them.
        set(&store, &aof, "k1", "during, before the snapshot");
        delete(&store, &aof, "k2");
        set(&store, &aof, "new1", "x");
        let seq = set(&store, &aof, "k0", "back");
        aof.commit(seq).unwrap();
        let temp = rewrite_path(&path);
        let (file, len, keys) = aof.write_snapshot(&store, &temp, None).unwrap();
        assert_eq!(keys, 30);
        // After it: only the buffer has these; some written to the old log, some not.
        set(&store, &aof, "k3", "after the snapshot");
        delete(&store, &aof, "new1");
        let seq = set(&store, &aof, "k1", "last");
        aof.commit(seq).unwrap();
        delete(&store, &aof, "k4");
        set(&store, &aof, "new2", "y");
        let done = aof.switch(file, &temp, len, keys, Instant::now()).unwrap();
        assert!(!temp.exists());
        assert!(done.old_len > before, "{done}");
        assert_eq!(done.new_len, aof.size());
        assert!(done.new_len < before / 5, "{done}");
        // After the switch: on to the new file.
        set(&store, &aof, "k5", "after the switch");
        delete(&store, &aof, "k6");
        aof.commit(u64::MAX).unwrap();
        aof.close().unwrap();

        let (map, replay) = replayed(&path);
        assert_eq!(replay.torn, None);
        assert_eq!(map, contents(&store));
        assert_eq!(map[&b"k1"[..]], b"last");
        assert_eq!(map[&b"k0"[..]], b"back");
        assert!(!map.contains_key(&b"k4"[..]) && !map.contains_key(&b"new1"[..]));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn writers_racing_rewrites_lose_nothing() {
        for policy in [Fsync::Always, Fsync::No] {
            let path = temp_path(&format!("rewrite-race-{policy:?}"));
            let store = Arc::new(Store::new());
            let (aof, _) = Aof::open(&path, policy, &store).unwrap();
            let writers: Vec<_> = (0..4)
                .map(|t| {
                    let (store, aof) = (Arc::clone(&store), Arc::clone(&aof));
                    std::thread::spawn(move || {
                        for i in 0..3000 {
                            // Keys shared between writers, some deleted now and then.
                            let key = format!("k{}", (i * 7 + t) % 40);
                            if i % 11 == 0 {
                                delete(&store, &aof, &key);
                            } else {
                                let seq = set(&store, &aof, &key, &format!("{t}.{i}"));
                                if i % 5 == 0 {
                                    aof.commit(seq).unwrap();
                                }
                            }
                        }
                    })
                })
                .collect();
            let mut rewrites = 0;
            while !writers.iter().all(|w| w.is_finished()) || rewrites < 3 {
                aof.rewrite(&store).unwrap();
                rewrites += 1;
            }
            for w in writers {
                w.join().unwrap();
            }
            aof.close().unwrap();
            let (map, replay) = replayed(&path);
            assert_eq!(replay.torn, None);
            assert_eq!(
                map,
                contents(&store),
                "{policy:?} after {rewrites} rewrites"
            );
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn writes_during_a_long_snapshot_are_moved_out_chunk_by_chunk() {
        // A snapshot of many chunks while writers flood: the writes made meanwhile go to
        // the new file chunk by chunk (so they are never all held in memory), and every
        // one survives.
        let path = temp_path("rewrite-flood");
        let store = Arc::new(Store::new());
        let (aof, _) = Aof::open(&path, Fsync::No, &store).unwrap();
        let value = "v".repeat(100);
        for i in 0..40_000 {
            set(&store, &aof, &format!("key{i:06}"), &value);
        }
        aof.commit(u64::MAX).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..2)
            .map(|t| {
                let (store, aof, stop) = (Arc::clone(&store), Arc::clone(&aof), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("key{:06}", (i * 7919 + t) % 50_000);
                        if i.is_multiple_of(13) {
                            delete(&store, &aof, &key);
                        } else {
                            set(&store, &aof, &key, &format!("{t}.{i}"));
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        // Records appended meanwhile must reach the new file between snapshot chunks, not
        // only after the last one. Deletes come only from the writers, and the preloaded
        // value only from the snapshot (the writers never write it), so some delete must
        // precede the last snapshot record with that value. The writers may get no CPU
        // during one rewrite's chunks; with them held to the end, this could never hold.
        let interleaved = (0..50).any(|_| {
            let done = aof.rewrite(&store).unwrap();
            let log = std::fs::read(&path).unwrap();
            // No one commits meanwhile, so the file is exactly what the rewrite wrote, and
            // the size it reports (which drives the next rewrite) must be the file's.
            assert_eq!(log.len() as u64, done.new_len, "{done}");
            assert_eq!(aof.size(), done.new_len);
            let mut at = MAGIC.len();
            let (mut first_delete, mut last_preloaded) = (None, None);
            while at < done.new_len as usize {
                let (record, used) = decode_record(&log[at..]).expect("a whole record");
                match record {
                    Record::Delete(_) if first_delete.is_none() => first_delete = Some(at),
                    Record::Store(_, v) if v == value.as_bytes() => last_preloaded = Some(at),
                    _ => {}
                }
                at += used;
            }
            matches!((first_delete, last_preloaded), (Some(d), Some(p)) if d < p)
        });
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        assert!(
            interleaved,
            "no write made during a rewrite came before its last chunk"
        );
        aof.close().unwrap();
        let (map, replay) = replayed(&path);
        assert_eq!(replay.torn, None);
        assert_eq!(map, contents(&store));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_failed_rewrite_leaves_the_old_log_in_use() {
        let path = temp_path("rewrite-fails");
        let store = Store::new();
        let (aof, _) = Aof::open(&path, Fsync::No, &store).unwrap();
        set(&store, &aof, "a", "1");
        aof.commit(u64::MAX).unwrap();

        // The new file cannot be created.
        let temp = rewrite_path(&path);
        std::fs::create_dir(&temp).unwrap();
        assert!(aof.rewrite(&store).is_err());
        std::fs::remove_dir(&temp).unwrap();
        assert!(lock(&aof.pending).since.is_none());

        // The rename fails at the switch, with records not yet written to the old log.
        aof.begin_capture().unwrap();
        let (file, len, keys) = aof.write_snapshot(&store, &temp, None).unwrap();
        set(&store, &aof, "b", "2");
        std::fs::remove_file(&temp).unwrap();
        assert!(aof.switch(file, &temp, len, keys, Instant::now()).is_err());
        set(&store, &aof, "c", "3");
        aof.commit(u64::MAX).unwrap();

        // A later rewrite works.
        set(&store, &aof, "a", "4");
        aof.rewrite(&store).unwrap();
        aof.close().unwrap();
        let (map, _) = replayed(&path);
        assert_eq!(map, contents(&store));
        assert_eq!(map.len(), 3);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_leftover_rewrite_file_is_deleted_at_open_and_the_log_replayed() {
        let path = temp_path("leftover");
        let store = Store::new();
        let (aof, _) = Aof::open(&path, Fsync::No, &store).unwrap();
        let seq = set(&store, &aof, "k", "v");
        aof.commit(seq).unwrap();
        aof.close().unwrap();
        std::fs::write(rewrite_path(&path), b"SWBAOF1\nhalf a rewr").unwrap();
        let (map, replay) = replayed(&path);
        assert_eq!(replay.records, 1);
        assert_eq!(map[&b"k"[..]], b"v");
        assert!(!rewrite_path(&path).exists());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn automatic_rewrites_keep_an_overwritten_log_small() {
        let path = temp_path("auto");
        let store = Arc::new(Store::new());
        let (aof, _) = Aof::open(&path, Fsync::No, &store).unwrap();
        aof.set_rewrite_min(4 << 10);
        let write = |i: usize| {
            let seq = set(&store, &aof, &format!("k{}", i % 10), &format!("{i:08}"));
            aof.commit(seq).unwrap();
            aof.rewrite_if_due(&store);
        };
        let wait_for_rewrite = || {
            if let Some((_, thread)) = lock(&aof.rewriter).running.take() {
                thread.join().unwrap();
            }
        };
        for i in 0..20_000 {
            write(i);
        }
        // The last rewrite may have copied many records written while it ran; the next
        // commit after it rewrites again if they are more than the threshold.
        wait_for_rewrite();
        write(20_000);
        wait_for_rewrite();
        aof.close().unwrap();
        // 20,001 records of 23 bytes were written: at most a threshold's worth is left.
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= (4 << 10) + 23, "{len} bytes");
        let (map, _) = replayed(&path);
        assert_eq!(map, contents(&store));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn byte_sizes() {
        for (text, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("512k", 512 << 10),
            ("64M", 64 << 20),
            ("64mb", 64 << 20),
            ("1GiB", 1 << 30),
        ] {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in ["", "k", "-1", "1.5m", "3x", "99999999999999999999g"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
    }

    #[test]
    fn fsync_words() {
        assert_eq!("always".parse::<Fsync>().unwrap(), Fsync::Always);
        assert_eq!("everysec".parse::<Fsync>().unwrap(), Fsync::EverySec);
        assert_eq!("no".parse::<Fsync>().unwrap(), Fsync::No);
        assert!("sometimes".parse::<Fsync>().is_err());
    }
}
