//! Compaction: a fresh log, one record per live key plus the writes made meanwhile,
//! written beside the live one and renamed over it. Why nothing is lost: [`Aof::rewrite`].

use super::record::encode_store;
use super::{lock, Aof, MAGIC};
use crate::durable::sync_dir;
use crate::log_info;
use crate::store::state::Store;
use crossbeam_channel::{unbounded, Receiver, TryRecvError};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Bytes of keys and values a rewrite copies out of the store under one shard lock.
const SNAPSHOT_CHUNK: usize = 64 << 10;

/// The records written during a rewrite are copied to the new file in rounds that block no
/// one, until a round is smaller than this; the rest is copied while commits wait.
const TAIL_BYTES: usize = 64 << 10;

/// At most this many such rounds: writers that outpace the copy are caught up with anyway.
const TAIL_ROUNDS: usize = 8;

/// The most the since-snapshot buffer may hold: writers that outpace a rewrite by more (its
/// thread starved, or its disk slow) make it give up, to be tried again later, instead of
/// growing memory by what they write for as long as it lags (a rewrite stuck for 28 s on a
/// busy disk took the server to 885 MiB).
pub(super) const MAX_SINCE: usize = 64 << 20;

/// Capacity the since-snapshot buffers keep between rewrites.
const KEEP_SINCE: usize = 4 << 20;

/// Bytes of a new log written between its fsyncs, so the last one (while writers append to
/// the since-snapshot buffer) is short.
const SYNC_EVERY: u64 = 16 << 20;

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

impl Aof {
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
        if rewriter.closed || min == 0 || rewriter.busy.load(Ordering::SeqCst) {
            return;
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
        if rewriter.requests.is_none() {
            let (requests, inbox) = unbounded::<Arc<Store>>();
            let (aof, busy) = (Arc::downgrade(self), Arc::clone(&rewriter.busy));
            let spawned = std::thread::Builder::new()
                .name("aof-rewrite".into())
                .spawn(move || rewrite_thread(&aof, &inbox, &busy));
            match spawned {
                Ok(thread) => {
                    rewriter.requests = Some(requests);
                    rewriter.thread = Some(thread);
                }
                Err(e) => {
                    log_info!("aof {}: cannot start a rewrite: {e}", self.path.display());
                    self.check_at.store(len + min, Ordering::Relaxed);
                    return;
                }
            }
        }
        rewriter.busy.store(true, Ordering::SeqCst);
        let asked = rewriter
            .requests
            .as_ref()
            .is_some_and(|tx| tx.send(Arc::clone(store)).is_ok());
        if !asked {
            rewriter.busy.store(false, Ordering::SeqCst);
            self.check_at.store(len + min, Ordering::Relaxed);
        }
    }

    /// Whether an automatic rewrite has been asked for and has not finished.
    pub fn rewriting(&self) -> bool {
        lock(&self.rewriter).busy.load(Ordering::SeqCst)
    }

    fn rewrite_in_background(
        &self,
        store: &Store,
        stop: &Receiver<Arc<Store>>,
        buffers: &mut Buffers,
    ) {
        let min = self.rewrite_min.load(Ordering::Relaxed);
        // Disconnected: the log is closing. (Nothing else is sent while this runs.)
        let stopped = || matches!(stop.try_recv(), Err(TryRecvError::Disconnected));
        match self.rewrite_with(store, Some(&stopped), buffers) {
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
        self.rewrite_with(store, None, &mut Buffers::default())
    }

    /// [`Aof::rewrite`] with `buffers`, given up (with `Interrupted`) when `stop` says so
    /// while the snapshot is written.
    fn rewrite_with(
        &self,
        store: &Store,
        stop: Option<&dyn Fn() -> bool>,
        buffers: &mut Buffers,
    ) -> io::Result<Rewritten> {
        let started = Instant::now();
        self.begin_capture(buffers)?;
        let temp = rewrite_path(&self.path);
        let result = self
            .write_snapshot(store, &temp, stop, buffers)
            .and_then(|(file, len, keys)| self.switch(file, &temp, len, keys, started, buffers));
        if result.is_err() {
            if let Some(mut since) = lock(&self.pending).since.take() {
                since.clear();
                buffers.since = since;
            }
            let _ = std::fs::remove_file(&temp);
        }
        result
    }

    /// Starts keeping every appended record in the since-snapshot buffer (the one in
    /// `buffers`, lent to the writers until the switch).
    fn begin_capture(&self, buffers: &mut Buffers) -> io::Result<()> {
        let mut p = lock(&self.pending);
        if p.since.is_some() {
            return Err(io::Error::other("a rewrite is already running"));
        }
        buffers.since.clear();
        p.since = Some(std::mem::take(&mut buffers.since));
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
        stop: Option<&dyn Fn() -> bool>,
        buffers: &mut Buffers,
    ) -> io::Result<(File, u64, u64)> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(temp)?;
        let Buffers { out, spare, .. } = buffers;
        out.clear();
        out.extend_from_slice(MAGIC);
        let (mut len, mut keys, mut synced) = (0, 0, 0);
        let mut snapshot = store.snapshot();
        while snapshot.next_chunk(SNAPSHOT_CHUNK, |k, v| {
            encode_store(k, v, out);
            keys += 1;
        }) {
            if stop.is_some_and(|stopped| stopped()) {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "stopped by shutdown",
                ));
            }
            // After the chunk, never before it: a record moved out here was applied to the
            // map before the next chunk is copied.
            self.move_since(&mut file, out, spare, &mut len)?;
            if out.len() >= OUT_BUF {
                len += write_out(&mut file, out)?;
            }
            if len - synced >= SYNC_EVERY {
                file.sync_data()?;
                synced = len;
            }
        }
        for _ in 0..TAIL_ROUNDS {
            let moved = self.move_since(&mut file, out, spare, &mut len)?;
            len += write_out(&mut file, out)?;
            if moved < TAIL_BYTES {
                break;
            }
        }
        file.sync_data()?;
        Ok((file, len, keys))
    }

    /// Moves the since-snapshot buffer as it stands to the end of `out` (swapping it with
    /// the empty `spare` under the append lock, so neither allocation is lost and the copy
    /// is made outside it), or, when it is large, writes `out` and then it to `file`
    /// (adding what it writes to `len`); returns the bytes moved.
    ///
    /// # Errors
    /// When the writers outpaced the rewrite and it was given up (see [`MAX_SINCE`]).
    fn move_since(
        &self,
        file: &mut File,
        out: &mut Vec<u8>,
        spare: &mut Vec<u8>,
        len: &mut u64,
    ) -> io::Result<usize> {
        debug_assert!(spare.is_empty());
        match &mut lock(&self.pending).since {
            Some(since) => std::mem::swap(since, spare),
            None => return Err(outpaced()),
        }
        let moved = spare.len();
        if moved < TAIL_BYTES {
            out.extend_from_slice(spare);
        } else {
            // A large batch goes to the file as it is, not copied once more: in order,
            // behind what `out` holds.
            *len += write_out(file, out)?;
            file.write_all(spare)?;
            *len += moved as u64;
        }
        spare.clear();
        // Kept for the next rewrite, but not at the size of a burst the writers once made.
        spare.shrink_to(KEEP_SINCE);
        Ok(moved)
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
        buffers: &mut Buffers,
    ) -> io::Result<Rewritten> {
        let mut out = lock(&self.output);
        let out = &mut *out;
        // Records appended from here on are not captured; they stay in `pending.buf` and
        // reach the new file with the next commit, since this holds `output` until the new
        // file is live. Records up to `upto` that were never written to the old file
        // (now in `out.spare`, swapped with the empty `pending.buf`) need not be: each was
        // appended after the start (and is in `tail` or was copied already) or before it
        // (and the snapshot reflects it).
        debug_assert!(out.spare.is_empty());
        let (mut tail, upto, buffered, buffered_peak) = {
            let mut p = lock(&self.pending);
            let Some(tail) = p.since.take() else {
                return Err(outpaced());
            };
            std::mem::swap(&mut p.buf, &mut out.spare);
            (tail, p.seq, p.since_total, p.since_peak)
        };
        let renamed = file
            .write_all(&tail)
            .and_then(|()| file.sync_data())
            .and_then(|()| std::fs::rename(temp, &self.path));
        let tail_len = tail.len() as u64;
        tail.clear();
        tail.shrink_to(KEEP_SINCE);
        buffers.since = tail;
        if let Err(e) = renamed {
            // The old log stays: give it back the records it has not been sent yet, ahead
            // of any appended since.
            let mut p = lock(&self.pending);
            out.spare.extend_from_slice(&p.buf);
            std::mem::swap(&mut p.buf, &mut out.spare);
            out.spare.clear();
            return Err(e);
        }
        out.spare.clear();
        // From here on the new file is the log at `path`; the old one is unlinked, so
        // whatever happens next the switch must be made.
        if let Err(e) = sync_dir(&self.path) {
            // The rename may not survive a power loss, and with it every write to the new
            // file: none is acknowledged from here on.
            log_info!(
                "aof {}: fsync of its directory after a rewrite failed: {e}; no further write \
                 will be acknowledged until the server is restarted",
                self.path.display()
            );
            out.failed = Some(format!("fsync of its directory after a rewrite: {e}"));
        }
        let new_len = len + tail_len;
        let old_len = self.len.swap(new_len, Ordering::Relaxed);
        out.file = file;
        // Every record up to `upto` is in the new file or reflected by its snapshot, and
        // the file is synced: commits waiting for any of them are done.
        out.written = upto;
        out.synced = upto;
        self.mirror(out);
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

/// Bytes of a new log gathered in memory before they are written.
const OUT_BUF: usize = 1 << 20;

/// The large buffers of a rewrite, owned by the rewrite thread for the life of the log and
/// reused by every rewrite: allocated and freed on one thread, in one allocator arena,
/// instead of anew on whichever thread happens to run a rewrite (with 64 connection
/// threads, glibc's per-thread arenas each kept a share of them: RSS crept up to 405 MiB
/// over ten minutes of honest load).
#[derive(Default)]
pub(super) struct Buffers {
    /// The new log's bytes on their way to the file.
    out: Vec<u8>,
    /// The since-snapshot buffer, lent to the writers while a rewrite runs.
    since: Vec<u8>,
    /// Swapped with `since` to take its records out.
    spare: Vec<u8>,
}

/// The error of a rewrite the writers outpaced by [`MAX_SINCE`].
fn outpaced() -> io::Error {
    io::Error::other(format!(
        "writers outpaced the rewrite by more than {} MiB; it will be tried again",
        MAX_SINCE >> 20
    ))
}

/// Writes out `out` to `file` and empties it; returns the bytes written.
fn write_out(file: &mut File, out: &mut Vec<u8>) -> io::Result<u64> {
    let n = out.len() as u64;
    file.write_all(out)?;
    out.clear();
    // One large burst (a big value, or writers that outpaced a chunk) is not kept.
    out.shrink_to(OUT_BUF * 2);
    Ok(n)
}

/// The rewrite thread: runs the rewrites asked for, with buffers of its own, until the
/// log closes (its inbox disconnects) or is dropped.
fn rewrite_thread(aof: &Weak<Aof>, inbox: &Receiver<Arc<Store>>, busy: &AtomicBool) {
    let mut buffers = Buffers::default();
    for store in inbox {
        let Some(aof) = aof.upgrade() else {
            return;
        };
        aof.rewrite_in_background(&store, inbox, &mut buffers);
        busy.store(false, Ordering::SeqCst);
    }
}

/// Bytes a fresh log of `keys` keys holding `bytes` of keys and values takes: the magic,
/// and per key a tag, two lengths and a CRC.
fn snapshot_len(keys: u64, bytes: u64) -> u64 {
    MAGIC.len() as u64 + keys * 13 + bytes
}

/// Where a rewrite writes the new log before renaming it over `path`: `PATH.rewrite`, in
/// the same directory, so the rename is atomic.
pub(super) fn rewrite_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".rewrite");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::super::record::{decode_record, Record};
    use super::super::{temp_path, Fsync, Replay};
    use super::*;
    use std::collections::BTreeMap;

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
        let (aof, replay) = Aof::open_after_a_crash(path, Fsync::No, &store).unwrap();
        aof.close().unwrap();
        (contents(&store), replay)
    }

    #[test]
    fn a_rewrite_replays_to_the_same_map_wherever_writes_fall_around_it() {
        let path = temp_path("rewrite-steps");
        let store = Store::new();
        let (aof, _) = Aof::open_after_a_crash(&path, Fsync::Always, &store).unwrap();
        for round in 0..20 {
            for i in 0..30 {
                set(&store, &aof, &format!("k{i}"), &format!("v{i}.{round}"));
            }
        }
        delete(&store, &aof, "k0");
        aof.commit(u64::MAX).unwrap();
        let before = aof.size();

        let mut buffers = Buffers::default();
        aof.begin_capture(&mut buffers).unwrap();
        // Before the snapshot: the snapshot has these, and the buffer repeats them.
        set(&store, &aof, "k1", "during, before the snapshot");
        delete(&store, &aof, "k2");
        set(&store, &aof, "new1", "x");
        let seq = set(&store, &aof, "k0", "back");
        aof.commit(seq).unwrap();
        let temp = rewrite_path(&path);
        let (file, len, keys) = aof
            .write_snapshot(&store, &temp, None, &mut buffers)
            .unwrap();
        assert_eq!(keys, 30);
        // After it: only the buffer has these; some written to the old log, some not.
        set(&store, &aof, "k3", "after the snapshot");
        delete(&store, &aof, "new1");
        let seq = set(&store, &aof, "k1", "last");
        aof.commit(seq).unwrap();
        delete(&store, &aof, "k4");
        set(&store, &aof, "new2", "y");
        let done = aof
            .switch(file, &temp, len, keys, Instant::now(), &mut buffers)
            .unwrap();
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
            let (aof, _) = Aof::open_after_a_crash(&path, policy, &store).unwrap();
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
        let (aof, _) = Aof::open_after_a_crash(&path, Fsync::No, &store).unwrap();
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
        let (aof, _) = Aof::open_after_a_crash(&path, Fsync::No, &store).unwrap();
        set(&store, &aof, "a", "1");
        aof.commit(u64::MAX).unwrap();

        // The new file cannot be created.
        let temp = rewrite_path(&path);
        std::fs::create_dir(&temp).unwrap();
        assert!(aof.rewrite(&store).is_err());
        std::fs::remove_dir(&temp).unwrap();
        assert!(lock(&aof.pending).since.is_none());

        // The rename fails at the switch, with records not yet written to the old log.
        let mut buffers = Buffers::default();
        aof.begin_capture(&mut buffers).unwrap();
        let (file, len, keys) = aof
            .write_snapshot(&store, &temp, None, &mut buffers)
            .unwrap();
        set(&store, &aof, "b", "2");
        std::fs::remove_file(&temp).unwrap();
        assert!(aof
            .switch(file, &temp, len, keys, Instant::now(), &mut buffers)
            .is_err());
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
        let (aof, _) = Aof::open_after_a_crash(&path, Fsync::No, &store).unwrap();
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
        let (aof, _) = Aof::open_after_a_crash(&path, Fsync::No, &store).unwrap();
        aof.set_rewrite_min(4 << 10);
        let write = |i: usize| {
            let seq = set(&store, &aof, &format!("k{}", i % 10), &format!("{i:08}"));
            aof.commit(seq).unwrap();
            aof.rewrite_if_due(&store);
        };
        let wait_for_rewrite = || {
            while aof.rewriting() {
                std::thread::sleep(Duration::from_millis(1));
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
}
