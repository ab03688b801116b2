//! Each server's data directory: a snapshot of the state and the log of the changes after
//! it, both with CRCs, replayed on start.
//!
//! ```text
//! DIR/snapshot     := "SWBMSNP2\n" seq:u64 epoch:u64 len:u64 state[len] crc:u32
//!                     (a legacy "SWBMSNP1\n" snapshot is read too: see `state`)
//! DIR/changes.log  := "SWBMLOG1\n" record*
//! record           := seq:u64 epoch:u64 len:u32 change[len] crc:u32
//! crc              := CRC-32 (IEEE, as zlib) of the bytes after the magic line (snapshot) or
//!                     of the record's bytes before it (record)
//! ```
//!
//! `state` and `change` are the encodings of [`super::state`]. A record's `seq` is its place
//! in the history (1, 2, 3, …; a message's number is the `seq` of its send) and `epoch` the
//! term of the primary that wrote it; epochs never decrease along a log. The snapshot is
//! the state after record `seq` (`0 0` and an empty state when there is none yet).
//!
//! Start: load the snapshot, then replay the log records that continue it (`seq` one more
//! than the last, `epoch` not lower). A torn final record (by [`crate::durable`]'s rule; a
//! record is plausible when its `len` is at most [`MAX_CHANGE`]) is cut off and reported,
//! and so is an intact record that does not continue the log, with everything after it (a
//! replica cannot apply a change after a gap; it catches up from the primary). Records at
//! or before the snapshot are skipped: they are left over when a crash came between
//! writing a snapshot and emptying the log. Damage (a bad record with an intact one after
//! it, bytes that cannot begin a record) refuses the start and changes nothing, and so does
//! a snapshot that fails its checks: it is written to `snapshot.tmp`, fsynced and renamed,
//! so only a damaged disk produces one. [`super::repair`] (`--check`, `--repair`)
//! report on the directory and keep what can still be replayed.
//!
//! Compaction: after [`COMPACT_AFTER`] records the server encodes a snapshot of its state
//! (under its state lock) and hands it to a thread of its own ([`Disk::compact`]), which
//! writes and syncs it aside, renames it into place, and only then replaces the log by one
//! holding just the records appended since (a crash in between loses nothing). Requests
//! never wait for those writes; only the final copy of the records appended meanwhile is
//! done under the log's lock. A backup that receives a snapshot from its primary installs
//! it at once, under the lock ([`Disk::install`]): its state is replaced anyway.
//!
//! Appends go to a buffer (under the server's state lock, so in sequence order);
//! [`Disk::sync_to`] writes the buffer with one call and, with `fsync`, syncs it: whoever
//! syncs takes everything appended so far, so concurrent requests share one fsync.

use super::protocol::MessageId;
use super::state::{Change, Corrupt, Cursor, State};
use crate::durable::{self, crc32, open_for_append, Damaged, End, Frame, Header};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

const SNAPSHOT_MAGIC: &[u8] = b"SWBMSNP2\n";
/// Snapshots written before message numbers carried their epoch: read, never written.
const LEGACY_SNAPSHOT_MAGIC: &[u8] = b"SWBMSNP1\n";
pub(super) const LOG_MAGIC: &[u8] = b"SWBMLOG1\n";
pub(super) const SNAPSHOT: &str = "snapshot";
const SNAPSHOT_TMP: &str = "snapshot.tmp";
/// A compaction's new log, written aside and renamed over [`LOG`].
const LOG_TMP: &str = "changes.log.tmp";
pub(super) const LOG: &str = "changes.log";
/// The directory's lock file ([`durable::Lock`]): one server (or repair) at a time.
pub(super) const LOCK: &str = "lock";

/// The largest change a record may hold: a length over it is damage, not a record. A change
/// is at most two names and a text of 65,535 bytes (see [`super::state`]).
pub const MAX_CHANGE: usize = 1 << 20;

/// Bytes of a record before its change: `seq`, `epoch`, `len`.
const RECORD_HEADER: usize = 20;

/// Records after which the state is snapshotted and the log emptied.
pub const COMPACT_AFTER: u64 = 50_000;

/// A place in the history: a record's epoch and sequence number. Ordered by epoch first,
/// so the greater of two logs' last positions is the more up-to-date log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    /// The term of the primary that wrote the record.
    pub epoch: u64,
    /// The record's sequence number.
    pub seq: u64,
}

impl From<Pos> for MessageId {
    /// A message is numbered by the position of the change that sent it.
    fn from(pos: Pos) -> MessageId {
        MessageId {
            epoch: pos.epoch,
            seq: pos.seq,
        }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.seq, self.epoch)
    }
}

/// One logged change: where it is, and its encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its place.
    pub pos: Pos,
    /// [`Change::encode`] bytes.
    pub change: Vec<u8>,
}

/// What [`Disk::open`] found.
#[derive(Debug)]
pub struct Loaded {
    /// The state after the snapshot and every replayed record.
    pub state: State,
    /// The snapshot's position.
    pub base: Pos,
    /// The replayed records, in order.
    pub records: Vec<Record>,
    /// Offset and length of a tail that was cut off, if any.
    pub torn: Option<(u64, u64)>,
}

impl Loaded {
    /// The position of the last change loaded.
    pub fn last(&self) -> Pos {
        self.records.last().map_or(self.base, |r| r.pos)
    }
}

impl fmt::Display for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "snapshot at {}, {} records replayed, last {}, {} accounts",
            self.base,
            self.records.len(),
            self.last(),
            self.state.accounts()
        )?;
        if let Some((at, len)) = self.torn {
            write!(
                f,
                "; a torn or stale tail at byte {at} ({len} bytes) was cut off"
            )?;
        }
        Ok(())
    }
}

struct Pending {
    buf: Vec<u8>,
    /// Sequence number of the last record appended.
    last: u64,
    /// The log file's length once everything buffered is written: where the next record
    /// will start.
    end: u64,
    /// Counts [`Disk::install`]s: a compaction started before one is stale.
    generation: u64,
}

struct Output {
    file: File,
    spare: Vec<u8>,
    /// Records up to this sequence number are written (and synced, with `fsync`).
    written: u64,
}

/// What the compaction thread and the server's threads share.
struct Files {
    /// Held for the directory's life ([`LOCK`]), so no other server uses it meanwhile.
    _lock: durable::Lock,
    dir: PathBuf,
    fsync: bool,
    pending: Mutex<Pending>,
    output: Mutex<Output>,
    since_snapshot: AtomicU64,
    /// Held while a snapshot file is written and the log emptied up to it: by a
    /// compaction's thread for all of it, and by [`Disk::install`].
    snapshot_io: Mutex<()>,
}

/// One server's data directory, open.
pub struct Disk {
    files: Arc<Files>,
    /// The thread of the last compaction started (finished or not).
    compactor: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent before it can panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn invalid(path: &Path, what: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

impl Disk {
    /// Opens (creating it if needed) the data directory and loads it.
    ///
    /// # Errors
    /// When the directory or its files cannot be created, read or written; when a file is not
    /// of this format; when the snapshot fails its checks ([`SnapshotDamaged`]) or the log is
    /// damaged ([`Damaged`]), as the error's inner error. Files are left untouched then.
    pub fn open(dir: &Path, fsync: bool) -> io::Result<(Disk, Loaded)> {
        fs::create_dir_all(dir)?;
        // Before anything is read or deleted: a second server on this directory is refused.
        let lock = durable::Lock::take(&dir.join(LOCK), dir)?;
        let _ = fs::remove_file(dir.join(SNAPSHOT_TMP));
        let _ = fs::remove_file(dir.join(LOG_TMP));
        let (base, mut state) = read_snapshot(dir)?;
        let log_path = dir.join(LOG);
        let data = read_log(&log_path)?;
        let mut records = Vec::new();
        let mut torn = None;
        let good_end = if data.len() < LOG_MAGIC.len() {
            0
        } else {
            let mut intact = Vec::new();
            let scan = durable::scan(&data, LOG_MAGIC.len(), header, |r| intact.push(r));
            match scan.end {
                End::Clean => {}
                End::Torn { at, len } => torn = Some((at, len)),
                End::Damaged(damage) => return Err(damaged(dir, damage).into()),
            }
            let mut last = base;
            let mut end = scan.good_end;
            for at in intact {
                let Some((record, change)) = continuing(&data[at.clone()], base, last) else {
                    // Intact but stale: it and all after it are cut, as a torn tail is.
                    torn = Some((at.start as u64, (data.len() - at.start) as u64));
                    end = at.start;
                    break;
                };
                if let Some(change) = change {
                    state.apply(record.pos.into(), &change);
                    last = record.pos;
                    records.push(record);
                }
            }
            end
        };
        let file = open_for_append(&log_path, LOG_MAGIC, good_end, data.len())?;
        let end = file.metadata()?.len();
        let loaded = Loaded {
            state,
            base,
            records,
            torn,
        };
        let last = loaded.last().seq;
        let files = Files {
            _lock: lock,
            dir: dir.to_owned(),
            fsync,
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                last,
                end,
                generation: 0,
            }),
            output: Mutex::new(Output {
                file,
                spare: Vec::new(),
                written: last,
            }),
            since_snapshot: AtomicU64::new(loaded.records.len() as u64),
            snapshot_io: Mutex::new(()),
        };
        let disk = Disk {
            files: Arc::new(files),
            compactor: Mutex::new(None),
        };
        Ok((disk, loaded))
    }

    /// Buffers a record. Call in sequence order (under the state lock).
    pub fn append(&self, pos: Pos, change: &[u8]) {
        let mut p = lock(&self.files.pending);
        let before = p.buf.len();
        encode_record(pos, change, &mut p.buf);
        p.end += (p.buf.len() - before) as u64;
        p.last = pos.seq;
        self.files.since_snapshot.fetch_add(1, Ordering::Relaxed);
    }

    /// Records appended since the last snapshot (or since the last compaction began).
    pub fn since_snapshot(&self) -> u64 {
        self.files.since_snapshot.load(Ordering::Relaxed)
    }

    /// Makes every record up to `seq` durable: written to the file, and fsynced with the
    /// `fsync` option. Writes everything buffered at that moment.
    ///
    /// # Errors
    /// When the write or the fsync fails.
    pub fn sync_to(&self, seq: u64) -> io::Result<()> {
        let files = &*self.files;
        let mut out = lock(&files.output);
        if out.written >= seq {
            return Ok(());
        }
        let upto = files.write_pending(&mut out)?;
        if files.fsync {
            out.file.sync_data()?;
        }
        out.written = upto;
        Ok(())
    }

    /// Holds the log's writes as a sync under way does, until the guard is dropped: every
    /// [`Disk::sync_to`] meanwhile waits (tests of a slow disk).
    #[cfg(test)]
    pub(crate) fn hold_writes(&self) -> impl Sized + '_ {
        lock(&self.files.output)
    }

    /// Holds snapshot writes as a slow disk would, until the guard is dropped: a
    /// compaction's thread waits before it writes (tests).
    #[cfg(test)]
    pub(crate) fn hold_snapshots(&self) -> impl Sized + '_ {
        lock(&self.files.snapshot_io)
    }

    /// Replaces the data with `snapshot` (an [`encode_snapshot`] at `pos`) and an empty
    /// log; records buffered but not written are dropped (the snapshot covers them). The
    /// snapshot is durable before the log is emptied. A compaction under way finishes its
    /// writes first, and is then given up.
    ///
    /// # Errors
    /// When a file cannot be written, synced or renamed.
    pub fn install(&self, snapshot: &[u8], pos: Pos) -> io::Result<()> {
        let files = &*self.files;
        let _io = lock(&files.snapshot_io);
        let mut out = lock(&files.output);
        let mut p = lock(&files.pending);
        p.buf.clear();
        p.last = pos.seq;
        p.generation += 1;
        durable::write_atomically(
            &files.dir.join(SNAPSHOT),
            &files.dir.join(SNAPSHOT_TMP),
            |out| out.write_all(snapshot),
        )?;
        out.file.set_len(LOG_MAGIC.len() as u64)?;
        out.file.seek(io::SeekFrom::End(0))?;
        out.file.sync_all()?;
        p.end = LOG_MAGIC.len() as u64;
        out.written = pos.seq;
        files.since_snapshot.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Whether a compaction started by [`Disk::compact`] is still writing.
    pub fn compacting(&self) -> bool {
        lock(&self.compactor)
            .as_ref()
            .is_some_and(|thread| !thread.is_finished())
    }

    /// Compacts the log: `snapshot` (an [`encode_snapshot`] at `pos`, the last record
    /// appended) is written and synced, then the log's records up to `pos` are dropped, on
    /// a thread of its own, so that neither the caller nor anyone appending or syncing
    /// meanwhile waits for those writes; only the final copy of the records appended
    /// since is done under the log's lock. Call under the state lock, right after the
    /// record at `pos` was appended, when [`Disk::compacting`] is false. A crash at any
    /// point leaves a directory that loads the same state: the old snapshot and the whole
    /// log, or the new snapshot and a log that may still hold the records it covers
    /// (skipped on load), or the new snapshot and the records after it.
    ///
    /// A failure to write calls `failed` on that thread (the data on disk stays
    /// loadable).
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn compact(&self, snapshot: Vec<u8>, pos: Pos, failed: fn(&io::Error)) -> io::Result<()> {
        let mut compactor = lock(&self.compactor);
        if let Some(previous) = compactor.take() {
            // Finished (the caller checked `compacting`): only its thread is left to reap.
            let _ = previous.join();
        }
        let (from, generation) = {
            let p = lock(&self.files.pending);
            debug_assert_eq!(p.last, pos.seq, "a compaction at the last record appended");
            (p.end, p.generation)
        };
        self.files.since_snapshot.store(0, Ordering::Relaxed);
        let files = Arc::clone(&self.files);
        let thread = std::thread::Builder::new()
            .name("messenger-compact".into())
            .spawn(move || {
                if let Err(e) = files.compact(&snapshot, from, generation) {
                    failed(&e);
                }
            })?;
        *compactor = Some(thread);
        Ok(())
    }
}

impl Drop for Disk {
    /// Waits for a compaction under way, so that the directory is quiet once the disk is
    /// gone (and a test may open it again).
    fn drop(&mut self) {
        if let Some(thread) = lock(&self.compactor).take() {
            let _ = thread.join();
        }
    }
}

impl Files {
    /// Writes everything buffered to the log file (without a sync); returns the sequence
    /// number of the last record it holds.
    fn write_pending(&self, out: &mut Output) -> io::Result<u64> {
        let upto = {
            let mut p = lock(&self.pending);
            std::mem::swap(&mut p.buf, &mut out.spare);
            p.last
        };
        let result = out.file.write_all(&out.spare);
        out.spare.clear();
        result.map(|()| upto)
    }

    /// A compaction's writes ([`Disk::compact`]): the snapshot, written and synced aside
    /// and renamed; then the log replaced by one holding only what was appended after
    /// the snapshot's record, which starts at byte `from` of the log. Nothing, if an
    /// install (`generation`) came first.
    fn compact(&self, snapshot: &[u8], from: u64, generation: u64) -> io::Result<()> {
        let _io = lock(&self.snapshot_io);
        if lock(&self.pending).generation != generation {
            return Ok(());
        }
        durable::write_atomically(
            &self.dir.join(SNAPSHOT),
            &self.dir.join(SNAPSHOT_TMP),
            |out| out.write_all(snapshot),
        )?;
        // The snapshot is durable: the records it covers may go. Under the log's lock from
        // here, so nothing is written to the old file once its tail is copied.
        let mut out = lock(&self.output);
        self.write_pending(&mut out)?;
        let len = out.file.metadata()?.len();
        let kept = len
            .checked_sub(from)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| invalid(&self.dir.join(LOG), "shorter than a compaction's start"))?;
        let mut tail = vec![0; kept];
        out.file.read_exact_at(&mut tail, from)?;
        let (path, temp) = (self.dir.join(LOG), self.dir.join(LOG_TMP));
        let fresh = (|| {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&temp)?;
            file.write_all(LOG_MAGIC)?;
            file.write_all(&tail)?;
            file.sync_all()?;
            fs::rename(&temp, &path)?;
            Ok(file)
        })();
        let file = match fresh {
            Ok(file) => file,
            Err(e) => {
                let _ = fs::remove_file(&temp);
                return Err(e);
            }
        };
        // Renamed: from now on appends must go to the new file, whatever the directory's
        // sync says. The directory is synced before the log's lock goes: a record appended
        // and acknowledged in the new file must not outlive, across a power cut, the name
        // that points to it (the old name would come back without it).
        out.file = file;
        lock(&self.pending).end -= from - LOG_MAGIC.len() as u64;
        let synced = durable::sync_dir(&path);
        drop(out);
        synced
    }
}

/// The snapshot file's bytes (also sent whole to a peer that needs them).
pub fn encode_snapshot(pos: Pos, state: &State) -> Vec<u8> {
    let mut out = SNAPSHOT_MAGIC.to_vec();
    out.extend_from_slice(&pos.seq.to_be_bytes());
    out.extend_from_slice(&pos.epoch.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    let body = out.len();
    state.encode(&mut out);
    let len = (out.len() - body) as u64;
    out[body - 8..body].copy_from_slice(&len.to_be_bytes());
    let crc = crc32(&out[SNAPSHOT_MAGIC.len()..]);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Decodes snapshot bytes.
///
/// # Errors
/// [`Corrupt`] when they are not a snapshot or fail the CRC.
pub fn decode_snapshot(bytes: &[u8]) -> Result<(Pos, State), Corrupt> {
    let (body, legacy) = match bytes.strip_prefix(SNAPSHOT_MAGIC) {
        Some(body) => (body, false),
        None => (
            bytes
                .strip_prefix(LEGACY_SNAPSHOT_MAGIC)
                .ok_or(Corrupt("not a messenger snapshot"))?,
            true,
        ),
    };
    if body.len() < 28 {
        return Err(Corrupt("truncated snapshot"));
    }
    let (covered, crc) = body.split_at(body.len() - 4);
    if crc32(covered).to_be_bytes() != crc {
        return Err(Corrupt("snapshot CRC mismatch"));
    }
    let mut c = Cursor::new(covered);
    let pos = Pos {
        seq: c.u64()?,
        epoch: c.u64()?,
    };
    let len = c.u64()?;
    let state = c.rest();
    if state.len() as u64 != len {
        return Err(Corrupt("snapshot length mismatch"));
    }
    let state = if legacy {
        State::decode_legacy(state)?
    } else {
        State::decode(state)?
    };
    Ok((pos, state))
}

/// Appends one record (header, change, CRC) to `out`.
pub fn encode_record(pos: Pos, change: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&pos.seq.to_be_bytes());
    out.extend_from_slice(&pos.epoch.to_be_bytes());
    out.extend_from_slice(&(change.len() as u32).to_be_bytes());
    out.extend_from_slice(change);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// The header of the log record at the start of `data` (see [`Header`]).
pub fn header(data: &[u8]) -> Header {
    match data.get(16..RECORD_HEADER) {
        None => Header::Cut,
        Some(len) => match u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize {
            len if len > MAX_CHANGE => Header::Bad,
            len => Header::Len(RECORD_HEADER + len + 4),
        },
    }
}

/// What the bytes at the start of `data` are, as a log record (see [`Frame`]).
pub fn frame(data: &[u8]) -> Frame {
    durable::frame(data, header)
}

/// Decodes the record at the start of `data`: the record and its length, or `None` if it
/// is incomplete or fails its CRC.
pub fn decode_record(data: &[u8]) -> Option<(Record, usize)> {
    let Frame::Intact(len) = frame(data) else {
        return None;
    };
    Some((parse_record(&data[..len])?, len))
}

/// The record in `bytes`, which [`frame`] found intact (its CRC is not checked again).
fn parse_record(bytes: &[u8]) -> Option<Record> {
    let mut c = Cursor::new(bytes);
    let seq = c.u64().ok()?;
    let epoch = c.u64().ok()?;
    let change_len = c.u32().ok()? as usize;
    let change = c.take(change_len).ok()?;
    Some(Record {
        pos: Pos { epoch, seq },
        change: change.to_vec(),
    })
}

/// The intact record in `bytes` (a range [`frame`] found intact), judged against a log that so far ends at `last` after a
/// snapshot at `base`: `Some((record, None))` when the snapshot already holds it (skip it),
/// `Some((record, Some(change)))` when it continues the log, `None` when it does not.
pub(super) fn continuing(bytes: &[u8], base: Pos, last: Pos) -> Option<(Record, Option<Change>)> {
    let record = parse_record(bytes)?;
    if record.pos.seq <= base.seq {
        return Some((record, None));
    }
    let continues = record.pos.seq == last.seq + 1 && record.pos.epoch >= last.epoch;
    let change = Change::decode(&record.change).ok().filter(|_| continues)?;
    Some((record, Some(change)))
}

/// The snapshot in `dir`: its position and state (`0 0` and an empty state when there is
/// none).
pub(super) fn read_snapshot(dir: &Path) -> io::Result<(Pos, State)> {
    let path = dir.join(SNAPSHOT);
    match fs::read(&path) {
        Ok(bytes) => decode_snapshot(&bytes).map_err(|why| {
            SnapshotDamaged {
                dir: dir.to_owned(),
                why,
            }
            .into()
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((Pos::default(), State::new())),
        Err(e) => Err(e),
    }
}

/// The change log's bytes (none when it does not exist).
///
/// # Errors
/// When it cannot be read, or is not a messenger log (a prefix of the magic is a log torn
/// as it was created).
pub(super) fn read_log(path: &Path) -> io::Result<Vec<u8>> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let header_torn = data.len() < LOG_MAGIC.len() && LOG_MAGIC.starts_with(&data);
    if !data.starts_with(LOG_MAGIC) && !header_torn {
        return Err(invalid(path, "not a switchboard messenger log"));
    }
    Ok(data)
}

/// The commands that check and repair the data directory `dir`.
fn commands(dir: &Path) -> (String, String) {
    let dir = dir.display();
    (
        format!("messenger-server --data-dir {dir} --check"),
        format!("messenger-server --data-dir {dir} --repair"),
    )
}

/// The refusal for a change log in `dir` damaged as `damage`.
fn damaged(dir: &Path, damage: durable::Damage) -> Damaged {
    let (check, repair) = commands(dir);
    Damaged {
        path: dir.join(LOG),
        damage,
        check,
        repair,
    }
}

/// A snapshot that fails its checks: refused at start, set aside by [`super::repair`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotDamaged {
    /// The data directory.
    pub dir: PathBuf,
    /// What is wrong with it.
    pub why: Corrupt,
}

impl fmt::Display for SnapshotDamaged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (check, repair) = commands(&self.dir);
        write!(
            f,
            "{} is damaged ({}); it is written whole and renamed into place, so the disk \
             changed it: nothing was cut and the server does not start. Report: `{check}`. \
             Repair (sets the snapshot and the change log aside as *.damaged-<unix time>; the \
             server then starts empty and catches up from its peers): `{repair}`",
            self.dir.join(SNAPSHOT).display(),
            self.why
        )
    }
}

impl std::error::Error for SnapshotDamaged {}

impl From<SnapshotDamaged> for io::Error {
    fn from(d: SnapshotDamaged) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_in_use_is_refused() {
        let dir = temp_dir("locked");
        let (disk, _) = Disk::open(&dir, false).unwrap();
        let err = Disk::open(&dir, false).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy, "{err}");
        drop(disk);
        assert!(Disk::open(&dir, false).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("switchboard-msglog-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn reg(name: &str) -> Vec<u8> {
        Change::Register {
            name: name.into(),
            nonce: 0,
        }
        .to_bytes()
    }

    fn pos(epoch: u64, seq: u64) -> Pos {
        Pos { epoch, seq }
    }

    #[test]
    fn positions_order_by_epoch_first() {
        assert!(pos(2, 1) > pos(1, 100));
        assert!(pos(1, 5) > pos(1, 4));
        assert_eq!(pos(3, 7).to_string(), "7@3");
    }

    #[test]
    fn records_replay_after_a_restart() {
        let dir = temp_dir("replay");
        let (disk, loaded) = Disk::open(&dir, true).unwrap();
        assert_eq!(loaded.last(), Pos::default());
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            disk.append(pos(1, i as u64 + 1), &reg(n));
        }
        disk.sync_to(3).unwrap();
        drop(disk);
        let (_disk, loaded) = Disk::open(&dir, true).unwrap();
        assert_eq!(loaded.records.len(), 3);
        assert_eq!(loaded.last(), pos(1, 3));
        assert!(loaded.state.exists("c"));
        assert_eq!(loaded.torn, None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_tail_at_every_cut_is_cut_off_and_appends_follow_it() {
        let dir = temp_dir("torn");
        fs::create_dir_all(&dir).unwrap();
        let mut whole = LOG_MAGIC.to_vec();
        encode_record(pos(1, 1), &reg("a"), &mut whole);
        let first_end = whole.len();
        encode_record(pos(1, 2), &reg("b"), &mut whole);
        for cut in first_end + 1..whole.len() {
            fs::write(dir.join(LOG), &whole[..cut]).unwrap();
            let (disk, loaded) = Disk::open(&dir, false).unwrap();
            assert_eq!(loaded.records.len(), 1, "cut at {cut}");
            assert_eq!(
                loaded.torn,
                Some((first_end as u64, (cut - first_end) as u64))
            );
            disk.append(pos(1, 2), &reg("z"));
            disk.sync_to(2).unwrap();
            drop(disk);
            let (_disk, loaded) = Disk::open(&dir, false).unwrap();
            assert_eq!((loaded.records.len(), loaded.torn), (2, None));
            assert!(loaded.state.exists("z") && !loaded.state.exists("b"));
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_record_that_does_not_continue_the_log_ends_it() {
        let dir = temp_dir("gap");
        fs::create_dir_all(&dir).unwrap();
        let mut data = LOG_MAGIC.to_vec();
        encode_record(pos(2, 1), &reg("a"), &mut data);
        let good = data.len();
        // An older epoch after a newer one: a stale tail.
        encode_record(pos(1, 2), &reg("b"), &mut data);
        fs::write(dir.join(LOG), &data).unwrap();
        let (_disk, loaded) = Disk::open(&dir, false).unwrap();
        assert_eq!(loaded.records.len(), 1);
        assert_eq!(loaded.torn.unwrap().0, good as u64);
        assert_eq!(fs::metadata(dir.join(LOG)).unwrap().len(), good as u64);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_snapshot_replaces_the_log_and_later_records_continue_it() {
        let dir = temp_dir("snapshot");
        let (disk, _) = Disk::open(&dir, true).unwrap();
        let mut state = State::new();
        for seq in 1..=4 {
            let name = format!("u{seq}");
            disk.append(pos(1, seq), &reg(&name));
            state.apply(pos(1, seq).into(), &Change::decode(&reg(&name)).unwrap());
        }
        disk.sync_to(4).unwrap();
        disk.install(&encode_snapshot(pos(1, 4), &state), pos(1, 4))
            .unwrap();
        assert_eq!(disk.since_snapshot(), 0);
        disk.append(pos(3, 5), &reg("late"));
        disk.sync_to(5).unwrap();
        drop(disk);
        let (disk, loaded) = Disk::open(&dir, true).unwrap();
        assert_eq!(loaded.base, pos(1, 4));
        assert_eq!(loaded.records.len(), 1);
        assert!(loaded.state.exists("u1") && loaded.state.exists("late"));
        drop(disk);
        // Records at or before the snapshot (a crash between the two steps) are skipped.
        let mut data = LOG_MAGIC.to_vec();
        encode_record(pos(1, 3), &reg("old"), &mut data);
        encode_record(pos(1, 4), &reg("old2"), &mut data);
        encode_record(pos(2, 5), &reg("new"), &mut data);
        fs::write(dir.join(LOG), &data).unwrap();
        let (_disk, loaded) = Disk::open(&dir, true).unwrap();
        assert_eq!(loaded.records.len(), 1);
        assert!(loaded.state.exists("new") && !loaded.state.exists("old"));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Waits for a compaction's thread to finish (at most 10 s).
    fn compacted(disk: &Disk) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while disk.compacting() {
            assert!(
                std::time::Instant::now() < deadline,
                "the compaction never finished"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    #[test]
    fn a_compaction_writes_aside_while_appends_and_syncs_go_on() {
        let dir = temp_dir("compact");
        let (disk, _) = Disk::open(&dir, true).unwrap();
        let add = |disk: &Disk, seq: u64| disk.append(pos(1, seq), &reg(&format!("u{seq}")));
        for seq in 1..=4 {
            add(&disk, seq);
        }
        disk.sync_to(2).unwrap();
        let snapshot = {
            let mut state = State::new();
            for seq in 1..=4 {
                let change = Change::decode(&reg(&format!("u{seq}"))).unwrap();
                state.apply(pos(1, seq).into(), &change);
            }
            encode_snapshot(pos(1, 4), &state)
        };
        // A slow disk: the snapshot's writes wait. Appends and syncs do not.
        let held = disk.hold_snapshots();
        disk.compact(snapshot, pos(1, 4), |e| panic!("{e}"))
            .unwrap();
        assert!(disk.compacting());
        assert_eq!(disk.since_snapshot(), 0);
        for seq in 5..=6 {
            add(&disk, seq);
        }
        disk.sync_to(6).unwrap();
        assert_eq!(disk.since_snapshot(), 2);
        assert!(disk.compacting(), "it waits for the snapshot's turn");
        drop(held);
        compacted(&disk);
        add(&disk, 7);
        disk.sync_to(7).unwrap();
        // The log holds only what came after the snapshot's record.
        let mut expected = LOG_MAGIC.to_vec();
        for seq in 5..=7 {
            encode_record(pos(1, seq), &reg(&format!("u{seq}")), &mut expected);
        }
        assert_eq!(fs::read(dir.join(LOG)).unwrap(), expected);
        assert!(!dir.join(LOG_TMP).exists() && !dir.join(SNAPSHOT_TMP).exists());
        drop(disk);
        let (_disk, loaded) = Disk::open(&dir, true).unwrap();
        assert_eq!(loaded.base, pos(1, 4));
        assert_eq!(loaded.records.len(), 3);
        assert_eq!(loaded.last(), pos(1, 7));
        assert!((1..=7).all(|seq| loaded.state.exists(&format!("u{seq}"))));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_compaction_overtaken_by_an_install_writes_nothing() {
        let dir = temp_dir("compact-install");
        let (disk, _) = Disk::open(&dir, false).unwrap();
        for seq in 1..=3 {
            disk.append(pos(1, seq), &reg(&format!("u{seq}")));
        }
        disk.sync_to(3).unwrap();
        let log = fs::read(dir.join(LOG)).unwrap();
        let held = disk.hold_snapshots();
        let stale = encode_snapshot(pos(1, 3), &State::new());
        disk.compact(stale, pos(1, 3), |e| panic!("{e}")).unwrap();
        // An install's mark, as one that came first leaves it (an install itself would
        // wait for the held snapshot lock).
        lock(&disk.files.pending).generation += 1;
        drop(held);
        compacted(&disk);
        assert!(!dir.join(SNAPSHOT).exists(), "a stale snapshot was written");
        assert_eq!(fs::read(dir.join(LOG)).unwrap(), log, "the log was cut");
        // And a real install after a compaction leaves the installed snapshot.
        let held = disk.hold_snapshots();
        let stale = encode_snapshot(pos(1, 3), &State::new());
        disk.compact(stale, pos(1, 3), |e| panic!("{e}")).unwrap();
        drop(held);
        let mut state = State::new();
        state.apply(pos(2, 9).into(), &Change::decode(&reg("peer")).unwrap());
        disk.install(&encode_snapshot(pos(2, 9), &state), pos(2, 9))
            .unwrap();
        compacted(&disk);
        disk.append(pos(2, 10), &reg("next"));
        disk.sync_to(10).unwrap();
        drop(disk);
        let (_disk, loaded) = Disk::open(&dir, false).unwrap();
        assert_eq!((loaded.base, loaded.last()), (pos(2, 9), pos(2, 10)));
        assert!(loaded.state.exists("peer") && loaded.state.exists("next"));
        assert!(!loaded.state.exists("u1"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_snapshots_and_foreign_files_are_refused() {
        let dir = temp_dir("corrupt");
        fs::create_dir_all(&dir).unwrap();
        let mut snap = encode_snapshot(pos(1, 0), &State::new());
        assert_eq!(decode_snapshot(&snap).unwrap().0, pos(1, 0));
        let n = snap.len();
        snap[n - 6] ^= 1;
        fs::write(dir.join(SNAPSHOT), &snap).unwrap();
        let err = Disk::open(&dir, false).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        fs::remove_file(dir.join(SNAPSHOT)).unwrap();
        fs::write(dir.join(LOG), b"precious, not a log").unwrap();
        assert!(Disk::open(&dir, false).is_err());
        assert_eq!(fs::read(dir.join(LOG)).unwrap(), b"precious, not a log");
        fs::remove_dir_all(&dir).unwrap();
    }
}
