//! The append-only file: every applied write, replayed on start.
//!
//! ```text
//! file   := "SWBAOF1\n" record*
//! record := 'S' klen:u32be vlen:u32be key value crc:u32be      store KEY VALUE
//!         | 'D' klen:u32be key crc:u32be                        delete KEY
//! crc    := CRC-32 (IEEE, as zlib's crc32) of the record's bytes before it
//! ```
//!
//! A crash can leave the last record half written: such a torn final record is reported and
//! cut off, so new records follow a clean boundary. Anything more (a bad record with an
//! intact one after it, bytes that cannot begin a record) is damage: [`Aof::open`] refuses
//! the file and changes nothing, and [`check`] / [`repair`] (`--aof-check`, `--aof-repair`)
//! report on it and keep every intact record. The exact rule is [`crate::durable`]'s; a
//! record is plausible when its tag is `S` or `D` and its key and value lengths add up to
//! at most 1 GiB.
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
//!
//! Files: this one opens, replays, appends and commits; `record.rs` is the record codec;
//! `rewrite.rs` is the compaction; `repair.rs` checks and repairs a damaged file.

mod record;
mod repair;
mod rewrite;

use record::{encode_delete, encode_store, Record};
pub use repair::{check, check_or_repair, repair, Checked, Repaired};
use rewrite::rewrite_path;
pub use rewrite::Rewritten;

use crate::durable::{self, open_for_append, Damaged, End, Lock};
use crate::log_info;
use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::state::Store;

const MAGIC: &[u8] = b"SWBAOF1\n";

/// The default minimum size of a log before it is rewritten automatically.
pub const DEFAULT_REWRITE_MIN: u64 = 64 << 20;

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
        crate::cli::byte_size(s).map(ByteSize)
    }
}

/// What replay found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Replay {
    /// Records applied.
    pub records: u64,
    /// Offset and length of a torn final record that was cut off, if any.
    pub torn: Option<(u64, u64)>,
}

impl fmt::Display for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} records replayed", self.records)?;
        if let Some((at, len)) = self.torn {
            write!(
                f,
                "; a torn final record at byte {at} ({len} bytes) was ignored and cut off"
            )?;
        }
        Ok(())
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

/// The automatic rewrites: one long-lived thread, started at the first, that owns and
/// reuses their large buffers (see `rewrite.rs`).
#[derive(Default)]
struct Rewriter {
    /// The rewrite thread's inbox: a rewrite to run, of this store. Dropping it asks a
    /// rewrite under way to give up, and the thread to end (at shutdown).
    requests: Option<Sender<Arc<Store>>>,
    thread: Option<JoinHandle<()>>,
    /// A rewrite has been asked for and has not finished.
    busy: Arc<AtomicBool>,
    /// Set by [`Aof::close`]: no rewrite starts after it.
    closed: bool,
}

/// What the log's writers and its rewrite buffer, kept from the start for the life of the
/// log: allocated here, on the thread that opens it, and reused, so no client thread's
/// allocator arena ends up holding a large buffer it then frees.
const WRITE_BUF: usize = 256 << 10;

/// An open append-only file.
pub struct Aof {
    /// Held for the log's life (`PATH.lock`), so no other server appends to it meanwhile.
    _lock: Option<Lock>,
    path: PathBuf,
    policy: Fsync,
    pending: Mutex<Pending>,
    output: Mutex<Output>,
    /// Dropping it stops the `everysec` syncer.
    stop_syncer: Mutex<Option<Sender<()>>>,
    syncer: Mutex<Option<JoinHandle<()>>>,
    /// The log's size as last written, read by the cheap check after every commit.
    len: AtomicU64,
    /// The sequence number of the last record appended (a mirror of `pending.seq`, read
    /// without its lock by [`Aof::commit_all`]).
    appended: AtomicU64,
    /// Records up to this one are as durable as the policy promises (synced for `always`,
    /// written for the others): a mirror of `output`, read without its lock.
    kept: AtomicU64,
    /// A write or fsync failed ([`Aof::failed`]): a mirror of `output.failed`.
    broken: AtomicBool,
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
    /// final record.
    ///
    /// # Errors
    /// When the file cannot be read, created or written; when it exists and is not a log of
    /// this format; when it is damaged (more than a torn final record: the error's inner
    /// [`Damaged`] says where, and how to check and repair it). The file is left untouched
    /// in the last two cases.
    pub fn open(path: &Path, policy: Fsync, store: &Store) -> io::Result<(Arc<Aof>, Replay)> {
        // Before anything is read or deleted: a second server on this log is refused.
        let lock = Lock::beside(path)?;
        Aof::open_holding(path, policy, store, Some(lock))
    }

    /// [`Aof::open`] as a new process would after this one was killed: without the lock
    /// this process's live log still holds.
    #[cfg(test)]
    pub(crate) fn open_after_a_crash(
        path: &Path,
        policy: Fsync,
        store: &Store,
    ) -> io::Result<(Arc<Aof>, Replay)> {
        Aof::open_holding(path, policy, store, None)
    }

    fn open_holding(
        path: &Path,
        policy: Fsync,
        store: &Store,
        lock: Option<Lock>,
    ) -> io::Result<(Arc<Aof>, Replay)> {
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
            return Err(not_a_log(path));
        } else {
            let scan = durable::scan(
                &data,
                MAGIC.len(),
                record::header,
                |at| match record::parse(&data[at]) {
                    Some(Record::Store(k, v)) => store.set(k, v),
                    Some(Record::Delete(k)) => {
                        store.delete(k);
                    }
                    None => {}
                },
            );
            replay.records = scan.records;
            match scan.end {
                End::Clean => {}
                End::Torn { at, len } => replay.torn = Some((at, len)),
                End::Damaged(damage) => return Err(damaged(path, damage).into()),
            }
            scan.good_end
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
            _lock: lock,
            path: path.to_owned(),
            policy,
            pending: Mutex::new(Pending {
                buf: Vec::with_capacity(WRITE_BUF),
                seq: 0,
                since: None,
                since_total: 0,
                since_peak: 0,
            }),
            output: Mutex::new(Output {
                file,
                spare: Vec::with_capacity(WRITE_BUF),
                written: 0,
                synced: 0,
                failed: None,
            }),
            stop_syncer: Mutex::new(None),
            syncer: Mutex::new(None),
            len: AtomicU64::new(len),
            appended: AtomicU64::new(0),
            kept: AtomicU64::new(0),
            broken: AtomicBool::new(false),
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
        // Weak: a log dropped without `close` (a test's crash) is dropped, its lock with it,
        // and this thread ends as the stop sender goes.
        let weak = Arc::downgrade(self);
        let thread = std::thread::Builder::new()
            .name("aof-fsync".into())
            .spawn(move || loop {
                match stopped.recv_timeout(Duration::from_secs(1)) {
                    Err(RecvTimeoutError::Timeout) => {
                        let Some(aof) = weak.upgrade() else { return };
                        if let Err(e) = aof.sync_aside() {
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
            if since.len() > rewrite::MAX_SINCE {
                // The rewrite has fallen behind (a slow disk, a starved thread): give it
                // up rather than hold the writes without bound; it notices and fails.
                p.since = None;
            }
        }
        p.seq += 1;
        self.appended.store(p.seq, Ordering::Release);
        p.seq
    }

    /// Whether a write or an fsync of the log has failed: no write is applied or
    /// acknowledged after that until a restart.
    pub fn failed(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Makes every record appended so far, by any connection, as durable as the policy
    /// promises ([`Aof::commit`]). A connection calls it before its replies go out: a
    /// reply may show another connection's write (a lookup, a delete's answer), which must
    /// not be seen before it is kept. Only an atomic load when nothing new was appended.
    ///
    /// # Errors
    /// As [`Aof::commit`].
    pub fn commit_all(&self) -> io::Result<()> {
        let target = self.appended.load(Ordering::Acquire);
        if self.kept.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        self.commit(target)
    }

    /// Makes every later write fail, as a full disk would (tests).
    #[cfg(test)]
    pub(crate) fn fill_disk(&self) {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full");
        lock(&self.output).file = full.expect("/dev/full");
    }

    /// Brings the lock-free mirrors up to `out`.
    fn mirror(&self, out: &Output) {
        let kept = if self.policy == Fsync::Always {
            out.synced
        } else {
            out.written
        };
        self.kept.fetch_max(kept, Ordering::AcqRel);
        if out.failed.is_some() {
            self.broken.store(true, Ordering::Release);
        }
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
        self.mirror(out);
        result
    }

    /// The `everysec` syncer's fsync: writes what is pending under the log's lock, then
    /// syncs a duplicate of the file's descriptor with the lock released, so that the
    /// writers' commits meanwhile (which only hand records to the OS) wait for no fsync.
    fn sync_aside(&self) -> io::Result<()> {
        self.write_to(u64::MAX, false)?;
        let (file, upto) = {
            let out = lock(&self.output);
            if out.synced >= out.written {
                return Ok(());
            }
            (out.file.try_clone()?, out.written)
        };
        let synced = file.sync_data();
        let mut out = lock(&self.output);
        match &synced {
            // A rewrite may have put a new file in place meanwhile: it synced everything
            // up to its own switch, which is past `upto`.
            Ok(()) => out.synced = out.synced.max(upto),
            Err(e) => {
                log_info!(
                    "aof {}: {e}; no further write will be acknowledged until the server is \
                     restarted",
                    self.path.display()
                );
                out.failed = Some(e.to_string());
            }
        }
        self.mirror(&out);
        synced
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
        let (requests, thread) = {
            let mut r = lock(&self.rewriter);
            r.closed = true;
            (r.requests.take(), r.thread.take())
        };
        drop(requests);
        if let Some(thread) = thread {
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
}

/// The error for a file at `path` that is not a log of this format.
fn not_a_log(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} is not a switchboard append-only file", path.display()),
    )
}

/// The refusal for a log at `path` damaged as `damage`, with the commands for it.
fn damaged(path: &Path, damage: durable::Damage) -> Damaged {
    let aof = path.display();
    Damaged {
        path: path.to_owned(),
        damage,
        check: format!("store-server --aof {aof} --aof-check"),
        repair: format!("store-server --aof {aof} --aof-repair"),
    }
}

/// A fresh path in the temporary directory for a test's log.
#[cfg(test)]
fn temp_path(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("switchboard-aof-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// The copies of torn final records cut from the log at `path` (`PATH.torn-*`).
#[cfg(test)]
fn torn_copies(path: &Path) -> Vec<PathBuf> {
    let name = format!("{}.torn-", path.file_name().unwrap().to_string_lossy());
    let mut copies: Vec<PathBuf> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&name))
        .collect();
    copies.sort();
    copies
}

/// Removes a test's log, its lock file and its torn records' copies.
#[cfg(test)]
fn remove_log(path: &Path) {
    std::fs::remove_file(path).unwrap();
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    let _ = std::fs::remove_file(lock);
    for copy in torn_copies(path) {
        std::fs::remove_file(copy).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    #[test]
    fn after_a_failed_write_no_later_write_is_acknowledged() {
        let path = temp_path("write-fails");
        let store = Store::new();
        let (aof, _) = Aof::open_after_a_crash(&path, Fsync::Always, &store).unwrap();
        let first = aof.log_store(b"k1", b"kept");
        aof.commit(first).unwrap();
        // The disk fills up: /dev/full fails every write with ENOSPC.
        let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let good = std::mem::replace(&mut lock(&aof.output).file, full);
        let second = aof.log_store(b"k2", b"lost");
        assert!(!aof.failed());
        assert!(aof.commit(second).is_err());
        assert!(
            aof.failed(),
            "writes are refused before they are applied from now on"
        );
        // Room again: the record that failed is gone, so no later write may be
        // acknowledged as durable (its commit would claim the lost one's place too).
        lock(&aof.output).file = good;
        let third = aof.log_store(b"k3", b"after");
        let err = aof.commit(third).unwrap_err();
        assert!(err.to_string().contains("failed earlier"), "{err}");
        drop(aof);
        let again = Store::new();
        let (_aof, replay) = Aof::open_after_a_crash(&path, Fsync::Always, &again).unwrap();
        assert_eq!(replay.records, 1);
        assert_eq!(again.get(b"k1").unwrap(), b"kept");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn commit_all_keeps_every_connections_records_before_a_reply_shows_them() {
        for policy in [Fsync::Always, Fsync::EverySec, Fsync::No] {
            let path = temp_path(&format!("commit-all-{policy:?}"));
            let store = Store::new();
            let (aof, _) = Aof::open_after_a_crash(&path, policy, &store).unwrap();
            // Another connection's write, applied and logged, its commit still to come.
            store.set_logged(b"k", b"v", || aof.log_store(b"k", b"v"));
            let before = std::fs::metadata(&path).unwrap().len();
            aof.commit_all().unwrap();
            assert!(
                std::fs::metadata(&path).unwrap().len() > before,
                "{policy:?}"
            );
            if policy == Fsync::Always {
                assert_eq!(lock(&aof.output).synced, 1);
            }
            // Nothing new: kept already, no lock taken.
            assert_eq!(aof.kept.load(Ordering::Acquire), 1);
            aof.commit_all().unwrap();
            // Written so that a kill -9 now loses nothing a reply showed.
            drop(aof);
            let again = Store::new();
            let (_aof, replay) = Aof::open_after_a_crash(&path, policy, &again).unwrap();
            assert_eq!(
                (replay.records, again.get(b"k").as_deref()),
                (1, Some(&b"v"[..]))
            );
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn the_everysec_sync_writes_and_syncs_what_is_pending() {
        let path = temp_path("sync-aside");
        let store = Store::new();
        let (aof, _) = Aof::open_after_a_crash(&path, Fsync::No, &store).unwrap();
        let seq = aof.log_store(b"k", b"v");
        aof.commit(seq).unwrap();
        let marks = |aof: &Aof| {
            let out = lock(&aof.output);
            (out.written, out.synced)
        };
        assert_eq!(marks(&aof), (1, 0));
        // A record appended after the write: the sync writes it too, then syncs.
        aof.log_store(b"k2", b"v2");
        aof.sync_aside().unwrap();
        assert_eq!(marks(&aof), (2, 2));
        // Nothing new: nothing to do.
        aof.sync_aside().unwrap();
        drop(aof);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn records_replay_in_order() {
        for policy in [Fsync::Always, Fsync::EverySec, Fsync::No] {
            let path = temp_path(&format!("replay-{policy:?}"));
            let store = Store::new();
            let (aof, replay) = Aof::open_after_a_crash(&path, policy, &store).unwrap();
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
            let (_aof, replay) = Aof::open_after_a_crash(&path, policy, &again).unwrap();
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
            let (aof, replay) = Aof::open_after_a_crash(&path, Fsync::No, &store).unwrap();
            assert_eq!(replay.records, 1, "cut at {cut}");
            assert_eq!(
                replay.torn,
                Some((first_end as u64, (cut - first_end) as u64))
            );
            assert_eq!(store.get(b"k1").unwrap(), b"v1");
            assert_eq!(store.get(b"k2"), None);
            // Cut, but never without a copy of what was cut.
            let copies = torn_copies(&path);
            let last = copies.last().expect("a copy of the torn record");
            assert_eq!(std::fs::read(last).unwrap(), &whole[first_end..cut]);
            std::fs::remove_file(last).unwrap();
            // New records land after the last good one.
            let seq = aof.log_store(b"k3", b"v3");
            aof.commit(seq).unwrap();
            aof.close().unwrap();
            let store = Store::new();
            let (_aof, replay) = Aof::open_after_a_crash(&path, Fsync::No, &store).unwrap();
            assert_eq!((replay.records, replay.torn), (2, None));
            assert_eq!(store.get(b"k3").unwrap(), b"v3");
        }
        remove_log(&path);
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
        let (_aof, replay) = Aof::open_after_a_crash(&path, Fsync::No, &store).unwrap();
        assert_eq!(replay.records, 0);
        assert!(replay.torn.is_some());
        assert!(replay.to_string().contains("ignored"));
        remove_log(&path);
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused_and_left_alone() {
        let path = temp_path("foreign");
        std::fs::write(&path, b"precious data, not a log").unwrap();
        let err = Aof::open_after_a_crash(&path, Fsync::No, &Store::new())
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(std::fs::read(&path).unwrap(), b"precious data, not a log");
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
