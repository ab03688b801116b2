//! A replica's storage on disk, in one directory: what [`RaftCore::restart`] needs after a
//! crash, written so that nothing a vote or an acknowledgement promised is lost.
//!
//! ```text
//! raft-hard-state   magic "switchboard raft hard state 1\n"
//!                   term:u64 has_vote:u8 vote:u64 commit:u64 crc:u32     (replaced atomically)
//! raft-snapshot     magic "switchboard raft snapshot 1\n"
//!                   index:u64 term:u64 len:u64 data crc:u32              (replaced atomically)
//! raft-log          magic "switchboard raft log 1\n", then records:
//!                   index:u64 term:u64 len:u32 data crc:u32              (appended)
//! ```
//! Integers are big-endian; each CRC-32 covers the bytes before it in its file (after the
//! magic) or record. The hard state and the snapshot are written to a `.tmp` file, fsynced
//! and renamed ([`durable::write_atomically`]): never torn, so any failed check refuses
//! the start. The log follows [`crate::durable`]'s rule: a torn final record (a crash cut
//! the last write short) is cut back and logged; a bad record with an intact one after it
//! (a flipped byte, a zeroed page) is damage, and the start is refused.
//!
//! **Group commit**: [`RaftStorage::save`] writes everything one [`Ready`] asks for (all
//! its entries in one `write`) and calls fsync once. The hard state is rewritten only when
//! the term or the vote changes (the commit index rides along then; it is a hint, and
//! [`RaftCore::restart`] clamps it to the log).
//!
//! **Order** (a crash between any two steps is safe): a snapshot first, then the log is
//! rewritten without the entries it covers; then entries (truncating a conflicting suffix
//! first); the hard state last. Its commit index may count the entries written before it
//! in the same save (or in saves the driver merged into it), and a crash between them must
//! not leave a commit index pointing at entries of another history that were about to be
//! replaced. Writing the term and vote last is safe too: every message that relies on
//! them waits until the whole save is on disk. At start, log entries after the snapshot are
//! kept only if they continue it (the log holds the snapshot's index with its term, or
//! starts right after it): a crash between a leader's snapshot being written and the log
//! being replaced leaves the old log, which must not be mistaken for the new history.
//!
//! [`RaftCore::restart`]: super::RaftCore::restart

use super::message::{Entry, Snapshot};
use super::types::{HardState, Ready, Stored};
use crate::durable::{self, crc32, End, Header};
use crate::log_info;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const HARD_MAGIC: &[u8] = b"switchboard raft hard state 1\n";
const SNAP_MAGIC: &[u8] = b"switchboard raft snapshot 1\n";
const LOG_MAGIC: &[u8] = b"switchboard raft log 1\n";
/// A record's bytes before its data.
const RECORD_HEAD: usize = 20;
/// The largest entry the log takes (a client's command; the frame limit is lower).
pub const MAX_ENTRY: usize = 64 << 20;

/// The files of one replica, open for appending.
#[derive(Debug)]
pub struct RaftStorage {
    /// Held for the storage's life (`DIR/lock`), so no other replica uses it meanwhile.
    _lock: durable::Lock,
    dir: PathBuf,
    log: File,
    /// Index of the first entry in the log file (meaningful when `offsets` is not empty).
    first: u64,
    /// Byte offset of each entry in the log file, from `first` on.
    offsets: Vec<u64>,
    /// The log file's length.
    end: u64,
    /// What the hard-state file holds.
    hard: HardState,
    /// The snapshot file's index and term.
    snap: (u64, u64),
    /// Disk syncs since the start: one per log append, hard state or snapshot saved.
    syncs: u64,
}

/// A file that is not what this module wrote.
fn invalid(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {why}; refusing to start", path.display()),
    )
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn header(data: &[u8]) -> Header {
    if data.len() < RECORD_HEAD {
        return Header::Cut;
    }
    let len = u32::from_be_bytes([data[16], data[17], data[18], data[19]]) as usize;
    if len > MAX_ENTRY {
        Header::Bad
    } else {
        Header::Len(RECORD_HEAD + len + 4)
    }
}

fn encode_record(e: &Entry, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&e.index.to_be_bytes());
    out.extend_from_slice(&e.term.to_be_bytes());
    out.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
    out.extend_from_slice(&e.data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// Reads a whole atomically written file: its magic, a body, and a CRC of the body.
fn read_whole(path: &Path, magic: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(rest) = bytes.strip_prefix(magic) else {
        return Err(invalid(path, "not a file of this kind (bad magic)"));
    };
    if rest.len() < 4 {
        return Err(invalid(path, "too short"));
    }
    let (body, crc) = rest.split_at(rest.len() - 4);
    if crc32(body).to_be_bytes() != crc {
        return Err(invalid(
            path,
            "CRC mismatch (the file was changed or damaged)",
        ));
    }
    Ok(Some(body.to_vec()))
}

/// The name's start of a compaction's snapshot file written ahead ([`prepare_snapshot`]).
const PREPARED: &str = "raft-snapshot.prepared-";

/// The snapshot file's bytes after the magic: index, term, length, data, CRC.
fn write_snapshot_file(w: &mut impl Write, index: u64, term: u64, data: &[u8]) -> io::Result<()> {
    let mut head = Vec::with_capacity(24);
    head.extend_from_slice(&index.to_be_bytes());
    head.extend_from_slice(&term.to_be_bytes());
    head.extend_from_slice(&(data.len() as u64).to_be_bytes());
    let crc = durable::crc32_parts(&[&head, data]);
    w.write_all(SNAP_MAGIC)?;
    w.write_all(&head)?;
    w.write_all(data)?;
    w.write_all(&crc.to_be_bytes())
}

/// Writes a compaction's snapshot file (the blob `data` at `index`, whose entry has
/// `term`) in `dir`, under a name of its own, and syncs it; returns its path, for
/// [`RaftStorage::save_prepared_snapshot`]. Runs on the thread that built the blob, so
/// the disk thread, and every append queued behind the compaction, does not wait for a
/// large state to be written. A file left by a crash is removed at the next open.
///
/// # Errors
/// When the file cannot be written or synced (it is removed then).
pub fn prepare_snapshot(dir: &Path, index: u64, term: u64, data: &[u8]) -> io::Result<PathBuf> {
    let path = dir.join(format!("{PREPARED}{index}"));
    let written = File::create(&path).and_then(|file| {
        let mut w = io::BufWriter::with_capacity(1 << 20, file);
        write_snapshot_file(&mut w, index, term, data)?;
        w.into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

impl RaftStorage {
    /// Opens (creating if needed) the storage in `dir` and reads back what it holds.
    ///
    /// # Errors
    /// When a file cannot be read or written, or is damaged (see the module's rule).
    pub fn open(dir: &Path) -> io::Result<(RaftStorage, Stored)> {
        fs::create_dir_all(dir)?;
        // Before anything is read or deleted: a second replica on this directory is refused.
        let lock = durable::Lock::take(&dir.join("lock"), dir)?;
        for tmp in ["raft-hard-state.tmp", "raft-snapshot.tmp", "raft-log.tmp"] {
            // Never the only copy of anything: the file it would replace is whole.
            let _ = fs::remove_file(dir.join(tmp));
        }
        for entry in fs::read_dir(dir)?.flatten() {
            // A compaction's snapshot written ahead and never renamed into place.
            if entry.file_name().to_string_lossy().starts_with(PREPARED) {
                let _ = fs::remove_file(entry.path());
            }
        }
        let hard_path = dir.join("raft-hard-state");
        let hard = match read_whole(&hard_path, HARD_MAGIC)? {
            None => HardState::default(),
            Some(b) if b.len() == 25 => HardState {
                term: u64_at(&b, 0),
                vote: (b[8] == 1).then(|| u64_at(&b, 9)),
                commit: u64_at(&b, 17),
            },
            Some(_) => return Err(invalid(&hard_path, "wrong length")),
        };
        let snap_path = dir.join("raft-snapshot");
        let snapshot = match read_whole(&snap_path, SNAP_MAGIC)? {
            None => Snapshot::default(),
            Some(b) if b.len() >= 24 && u64_at(&b, 16) == (b.len() - 24) as u64 => Snapshot {
                index: u64_at(&b, 0),
                term: u64_at(&b, 8),
                data: b[24..].to_vec(),
            },
            Some(_) => return Err(invalid(&snap_path, "wrong length")),
        };
        let log_path = dir.join("raft-log");
        let data = match fs::read(&log_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let start = if data.is_empty() {
            0
        } else if data.starts_with(LOG_MAGIC) {
            LOG_MAGIC.len()
        } else if LOG_MAGIC.starts_with(&data) {
            0 // the magic itself was torn: a log created just before a crash
        } else {
            return Err(invalid(&log_path, "not a raft log (bad magic)"));
        };
        let mut entries = Vec::new();
        let mut offsets = Vec::new();
        let mut good_end = start;
        if start > 0 {
            let scan = durable::scan(&data, start, header, |r| {
                let b = &data[r.clone()];
                offsets.push(r.start as u64);
                entries.push(Entry {
                    index: u64_at(b, 0),
                    term: u64_at(b, 8),
                    data: b[RECORD_HEAD..b.len() - 4].to_vec(),
                });
            });
            good_end = scan.good_end;
            match scan.end {
                End::Clean => {}
                End::Torn { at, len } => log_info!(
                    "raft: {}: a torn final record ({len} bytes at {at}) cut back",
                    log_path.display()
                ),
                End::Damaged(d) => {
                    return Err(io::Error::from(durable::Damaged {
                        path: log_path.clone(),
                        damage: d,
                        check: format!("ls -l {}", log_path.display()),
                        repair: format!(
                            "move {} aside; the replica then catches up from its peers",
                            dir.display()
                        ),
                    }))
                }
            }
        }
        if entries
            .windows(2)
            .any(|w| w[1].index != w[0].index + 1 || w[1].term < w[0].term)
        {
            return Err(invalid(&log_path, "entries out of order"));
        }
        let first = entries.first().map_or(0, |e| e.index);
        let continues = entries.is_empty()
            || first == snapshot.index + 1
            || entries
                .iter()
                .any(|e| e.index == snapshot.index && e.term == snapshot.term);
        if !continues {
            log_info!(
                "raft: {}: the log does not continue the snapshot at {}; dropped",
                log_path.display(),
                snapshot.index
            );
            entries.clear();
        }
        let file = durable::open_for_append(&log_path, LOG_MAGIC, good_end, data.len())?;
        let mut storage = RaftStorage {
            _lock: lock,
            dir: dir.to_owned(),
            log: file,
            first,
            offsets,
            end: good_end.max(LOG_MAGIC.len()) as u64,
            hard,
            snap: (snapshot.index, snapshot.term),
            syncs: 0,
        };
        if !continues {
            storage.rewrite_log_after(u64::MAX)?;
        }
        let stored = Stored {
            hard_state: hard,
            snapshot,
            entries,
        };
        Ok((storage, stored))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last index in the log file (the snapshot's if the log is empty).
    pub fn last_index(&self) -> u64 {
        if self.offsets.is_empty() {
            self.snap.0
        } else {
            self.first + self.offsets.len() as u64 - 1
        }
    }

    /// How many times this storage has synced the disk since it was opened (each log
    /// append, hard state and snapshot counts once): for counting fsyncs per write.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// Persists what `ready` asks for, in the module's order, with one fsync for all of
    /// its entries. Returns the (index, term) to report with
    /// [`RaftCore::persisted`](super::RaftCore::persisted), if anything was written.
    ///
    /// # Errors
    /// When a write or an fsync fails: the replica must stop (what is on disk is unknown).
    pub fn save(&mut self, ready: &Ready) -> io::Result<Option<(u64, u64)>> {
        self.save_parts(ready.hard_state, ready.snapshot.as_ref(), &ready.entries)
    }

    /// [`RaftStorage::save`] for a Ready's parts held elsewhere (the driver shares an
    /// installed snapshot's blob with the thread restoring it rather than copy it).
    ///
    /// # Errors
    /// When a write or an fsync fails: the replica must stop (what is on disk is unknown).
    pub fn save_parts(
        &mut self,
        hard_state: Option<HardState>,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
    ) -> io::Result<Option<(u64, u64)>> {
        let mut ack = None;
        if let Some(snap) = snapshot {
            self.save_snapshot(snap)?;
            ack = Some((snap.index, snap.term));
        }
        if let Some(last) = entries.last() {
            self.append(entries)?;
            ack = Some((last.index, last.term));
        }
        // Last: the commit index it carries may count the entries just written (or those
        // a truncation just replaced), and must never reach the disk before them.
        if let Some(h) = hard_state {
            if !self.same_term_and_vote(&h) {
                self.save_hard_state(h)?;
            }
        }
        Ok(ack)
    }

    /// True when `h` has the stored term and vote: saving it would write nothing (the
    /// commit index alone is never written).
    pub fn same_term_and_vote(&self, h: &HardState) -> bool {
        (h.term, h.vote) == (self.hard.term, self.hard.vote)
    }

    /// Replaces the hard-state file.
    ///
    /// # Errors
    /// When it cannot be written and synced.
    pub fn save_hard_state(&mut self, h: HardState) -> io::Result<()> {
        let mut body = Vec::with_capacity(29);
        body.extend_from_slice(&h.term.to_be_bytes());
        body.push(u8::from(h.vote.is_some()));
        body.extend_from_slice(&h.vote.unwrap_or(0).to_be_bytes());
        body.extend_from_slice(&h.commit.to_be_bytes());
        let crc = crc32(&body);
        body.extend_from_slice(&crc.to_be_bytes());
        let path = self.dir.join("raft-hard-state");
        durable::write_atomically(&path, &self.dir.join("raft-hard-state.tmp"), |w| {
            w.write_all(HARD_MAGIC)?;
            w.write_all(&body)
        })?;
        self.syncs += 1;
        self.hard = h;
        Ok(())
    }

    /// Replaces the snapshot file, then the log: the entries after the snapshot are kept
    /// when the log holds the snapshot's last entry with its term (a compaction), and all
    /// are dropped otherwise (a snapshot from the leader replaces the whole log, §7).
    ///
    /// # Errors
    /// When a file cannot be written and synced.
    pub fn save_snapshot(&mut self, snap: &Snapshot) -> io::Result<()> {
        let path = self.dir.join("raft-snapshot");
        durable::write_atomically(&path, &self.dir.join("raft-snapshot.tmp"), |w| {
            write_snapshot_file(w, snap.index, snap.term, &snap.data)
        })?;
        self.snapshot_in_place(snap)
    }

    /// [`RaftStorage::save_snapshot`] for a snapshot whose file [`prepare_snapshot`]
    /// wrote and synced already: renames it into place, then replaces the log. Only the
    /// rename and the log's tail are written here, so appends queued behind a compaction
    /// do not wait for a large state to be written.
    ///
    /// # Errors
    /// When the file cannot be renamed, or the log rewritten.
    pub fn save_prepared_snapshot(&mut self, snap: &Snapshot, prepared: &Path) -> io::Result<()> {
        let path = self.dir.join("raft-snapshot");
        fs::rename(prepared, &path)?;
        durable::sync_dir(&path)?;
        self.snapshot_in_place(snap)
    }

    /// The snapshot file now holds `snap`: the log follows.
    fn snapshot_in_place(&mut self, snap: &Snapshot) -> io::Result<()> {
        self.syncs += 1;
        let keep = self.term_at(snap.index)? == Some(snap.term);
        self.snap = (snap.index, snap.term);
        self.rewrite_log_after(if keep { snap.index } else { u64::MAX })
    }

    /// The term of the log file's entry at `index`, read back from the file (`None` when
    /// the file holds no such entry).
    ///
    /// # Errors
    /// When the read fails: taken for "no such entry", it would drop the whole log's tail.
    fn term_at(&self, index: u64) -> io::Result<Option<u64>> {
        let Some(offset) = index
            .checked_sub(self.first)
            .and_then(|at| usize::try_from(at).ok())
            .and_then(|at| self.offsets.get(at))
        else {
            return Ok(None);
        };
        let mut b = [0u8; 16];
        read_at(&self.log, *offset, &mut b)?;
        Ok((u64_at(&b, 0) == index).then(|| u64_at(&b, 8)))
    }

    /// Replaces the log file by one holding only its entries after `index` (none for
    /// `u64::MAX`).
    fn rewrite_log_after(&mut self, index: u64) -> io::Result<()> {
        let path = self.dir.join("raft-log");
        let from = match index.checked_add(1) {
            Some(i) if i >= self.first && i <= self.last_index() && !self.offsets.is_empty() => {
                Some((i, self.offsets[(i - self.first) as usize]))
            }
            _ => None,
        };
        let tail = match from {
            Some((_, offset)) => {
                let mut b = vec![0u8; (self.end - offset) as usize];
                read_at(&self.log, offset, &mut b)?;
                b
            }
            None => Vec::new(),
        };
        durable::write_atomically(&path, &self.dir.join("raft-log.tmp"), |w| {
            w.write_all(LOG_MAGIC)?;
            w.write_all(&tail)
        })?;
        self.log = durable::open_for_append(&path, LOG_MAGIC, 1, 1)?;
        match from {
            Some((i, offset)) => {
                let skip = (i - self.first) as usize;
                let shift = offset - LOG_MAGIC.len() as u64;
                self.offsets = self.offsets[skip..].iter().map(|o| o - shift).collect();
                self.first = i;
            }
            None => {
                self.offsets.clear();
                self.first = 0;
            }
        }
        self.end = (LOG_MAGIC.len() + tail.len()) as u64;
        Ok(())
    }

    /// Appends `entries` (contiguous), first cutting the log back to the first one's
    /// index if the file holds that index already (§5.3: a conflicting suffix goes); one
    /// write and one fsync for all of them.
    ///
    /// # Errors
    /// When the entries do not continue the log, or a write or an fsync fails.
    pub fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        let Some(e) = entries.first() else {
            return Ok(());
        };
        if !self.offsets.is_empty() && e.index <= self.last_index() {
            if e.index < self.first {
                return Err(io::Error::other(format!(
                    "raft: entry {} is before the log's first {}",
                    e.index, self.first
                )));
            }
            let keep = (e.index - self.first) as usize;
            self.end = self.offsets[keep];
            self.offsets.truncate(keep);
            self.log.set_len(self.end)?;
        } else if !self.offsets.is_empty() && e.index != self.last_index() + 1 {
            return Err(io::Error::other(format!(
                "raft: entry {} leaves a gap after {}",
                e.index,
                self.last_index()
            )));
        }
        if self.offsets.is_empty() {
            self.first = e.index;
        }
        let mut buf = Vec::new();
        for e in entries {
            self.offsets.push(self.end + buf.len() as u64);
            encode_record(e, &mut buf);
        }
        write_at(&self.log, self.end, &buf)?;
        self.end += buf.len() as u64;
        // fdatasync: the data and the length that reaches it, not the timestamps.
        self.log.sync_data()?;
        self.syncs += 1;
        Ok(())
    }
}

fn read_at(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

fn write_at(file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_in_use_is_refused() {
        let d = dir("locked");
        let (storage, _) = RaftStorage::open(&d).unwrap();
        let err = RaftStorage::open(&d).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy, "{err}");
        drop(storage);
        assert!(RaftStorage::open(&d).is_ok());
        fs::remove_dir_all(&d).unwrap();
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "switchboard-raft-disk-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("command {index}").into_bytes(),
        }
    }

    fn indexes(s: &Stored) -> Vec<(u64, u64)> {
        s.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn entries_hard_state_and_truncation_survive_a_reopen() {
        let d = dir("basic");
        let (mut st, stored) = RaftStorage::open(&d).unwrap();
        assert!(stored.entries.is_empty() && stored.hard_state == HardState::default());
        let ready = Ready {
            hard_state: Some(HardState {
                term: 3,
                vote: Some(2),
                commit: 0,
            }),
            entries: (1..=5).map(|i| entry(i, 1 + i / 3)).collect(),
            ..Ready::default()
        };
        assert_eq!(st.save(&ready).unwrap(), Some((5, 2)));
        // A conflicting suffix from index 4 on is replaced.
        st.append(&[entry(4, 3), entry(5, 3), entry(6, 3)]).unwrap();
        assert!(st.append(&[entry(9, 3)]).is_err(), "a gap is refused");
        drop(st);
        let (st, stored) = RaftStorage::open(&d).unwrap();
        assert_eq!(stored.hard_state.term, 3);
        assert_eq!(stored.hard_state.vote, Some(2));
        assert_eq!(
            indexes(&stored),
            [(1, 1), (2, 1), (3, 2), (4, 3), (5, 3), (6, 3)]
        );
        assert_eq!(stored.entries[3].data, b"command 4");
        assert_eq!(st.last_index(), 6);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_commit_index_never_reaches_the_disk_before_the_entries_it_counts() {
        // A follower holds 1-3 committed and 4-5 of an old term; a new leader's Append
        // replaces 4 and commits it, in a save that also changes the term. A crash before
        // the entries are written (here: the log refuses the write) must not leave the
        // new commit index pointing at the old entry 4.
        let d = dir("commit-order");
        let (mut st, _) = RaftStorage::open(&d).unwrap();
        let first = Ready {
            hard_state: Some(HardState {
                term: 1,
                vote: Some(1),
                commit: 0,
            }),
            entries: (1..=5).map(|i| entry(i, 1)).collect(),
            ..Ready::default()
        };
        st.save(&first).unwrap();
        st.log = File::open(d.join("raft-log")).unwrap();
        let newer = HardState {
            term: 2,
            vote: None,
            commit: 4,
        };
        assert!(st.save_parts(Some(newer), None, &[entry(4, 2)]).is_err());
        drop(st);
        let (_, stored) = RaftStorage::open(&d).unwrap();
        assert_eq!(indexes(&stored), [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
        assert_eq!(
            (stored.hard_state.term, stored.hard_state.commit),
            (1, 0),
            "the hard state went first"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    /// Storage in a fresh directory `name` holding entries 1-10 of term 1, and a
    /// compaction's snapshot at 6 (not saved).
    fn ten_entries(name: &str) -> (PathBuf, RaftStorage, Snapshot) {
        let d = dir(name);
        let (mut st, _) = RaftStorage::open(&d).unwrap();
        st.append(&(1..=10).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        let snap = Snapshot {
            index: 6,
            term: 1,
            data: b"state at 6".to_vec(),
        };
        (d, st, snap)
    }

    #[test]
    fn a_compaction_keeps_the_tail_and_an_installed_snapshot_replaces_the_log() {
        let (d, mut st, snap) = ten_entries("snap");
        st.save_snapshot(&snap).unwrap();
        st.append(&[entry(11, 2)]).unwrap();
        drop(st);
        let (mut st, stored) = RaftStorage::open(&d).unwrap();
        assert_eq!(stored.snapshot, snap);
        assert_eq!(indexes(&stored), [(7, 1), (8, 1), (9, 1), (10, 1), (11, 2)]);
        // A leader's snapshot of another history: the whole log goes.
        let theirs = Snapshot {
            index: 9,
            term: 4,
            data: b"theirs".to_vec(),
        };
        st.save_snapshot(&theirs).unwrap();
        st.append(&[entry(10, 4)]).unwrap();
        drop(st);
        let (_, stored) = RaftStorage::open(&d).unwrap();
        assert_eq!(stored.snapshot, theirs);
        assert_eq!(indexes(&stored), [(10, 4)]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_log_that_cannot_be_read_back_fails_a_compaction_and_keeps_its_tail() {
        // Taken for "no such entry", the failed read would have dropped entries 7-10.
        let (d, mut st, snap) = ten_entries("unreadable");
        st.log = fs::OpenOptions::new()
            .write(true)
            .open(d.join("raft-log"))
            .unwrap();
        assert!(st.save_snapshot(&snap).is_err());
        drop(st);
        let (_, stored) = RaftStorage::open(&d).unwrap();
        // The snapshot is in place; the log was left whole (a compaction's cut comes after).
        assert_eq!(stored.snapshot, snap);
        assert_eq!(
            indexes(&stored),
            (1..=10).map(|i| (i, 1)).collect::<Vec<_>>()
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_snapshot_written_ahead_is_renamed_into_place_and_a_leftover_one_removed() {
        let (d, mut st, snap) = ten_entries("prepared");
        let ahead = prepare_snapshot(&d, 6, 1, &snap.data).unwrap();
        st.save_prepared_snapshot(&snap, &ahead).unwrap();
        assert!(!ahead.exists());
        st.append(&[entry(11, 2)]).unwrap();
        drop(st);
        let (st, stored) = RaftStorage::open(&d).unwrap();
        assert_eq!(stored.snapshot, snap);
        assert_eq!(indexes(&stored), [(7, 1), (8, 1), (9, 1), (10, 1), (11, 2)]);
        // The same bytes as a snapshot written in place.
        let written = fs::read(d.join("raft-snapshot")).unwrap();
        let mut st = st;
        st.save_snapshot(&snap).unwrap();
        assert_eq!(fs::read(d.join("raft-snapshot")).unwrap(), written);
        // One written ahead and never renamed (a crash came first) is removed at start.
        let left = prepare_snapshot(&d, 9, 1, b"never renamed").unwrap();
        drop(st);
        let (_, stored) = RaftStorage::open(&d).unwrap();
        assert!(!left.exists());
        assert_eq!(stored.snapshot, snap);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_log_left_behind_a_newer_snapshot_is_not_taken_for_its_history() {
        // A crash after the snapshot file was replaced but before the log was: the old
        // log's entries past the snapshot belong to another history.
        let d = dir("stale");
        let (mut st, _) = RaftStorage::open(&d).unwrap();
        st.append(&(1..=8).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        let old_log = fs::read(d.join("raft-log")).unwrap();
        st.save_snapshot(&Snapshot {
            index: 5,
            term: 3,
            data: vec![],
        })
        .unwrap();
        drop(st);
        fs::write(d.join("raft-log"), old_log).unwrap();
        let (_, stored) = RaftStorage::open(&d).unwrap();
        assert_eq!(stored.snapshot.index, 5);
        assert!(stored.entries.is_empty(), "{:?}", indexes(&stored));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_torn_tail_is_cut_and_a_flipped_byte_is_refused() {
        let d = dir("damage");
        let (mut st, _) = RaftStorage::open(&d).unwrap();
        st.append(&(1..=4).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        drop(st);
        let path = d.join("raft-log");
        let whole = fs::read(&path).unwrap();
        // Torn: the last record cut short, at every length.
        let last = whole.len() - (RECORD_HEAD + b"command 4".len() + 4);
        for cut in [last + 1, last + RECORD_HEAD, whole.len() - 1] {
            fs::write(&path, &whole[..cut]).unwrap();
            let (mut st, stored) = RaftStorage::open(&d).unwrap();
            assert_eq!(indexes(&stored), [(1, 1), (2, 1), (3, 1)], "cut at {cut}");
            // Appending goes on after the cut.
            st.append(&[entry(4, 2)]).unwrap();
            drop(st);
            let (_, stored) = RaftStorage::open(&d).unwrap();
            assert_eq!(stored.entries.len(), 4);
            assert_eq!(stored.entries[3].term, 2);
        }
        // A flipped byte in the second record, intact ones after it: refused, unchanged.
        let mut bad = whole.clone();
        bad[LOG_MAGIC.len() + RECORD_HEAD + 4 + 9 + 22] ^= 0x10;
        fs::write(&path, &bad).unwrap();
        let err = RaftStorage::open(&d).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("damaged"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), bad, "nothing was cut");
        // A flipped byte in the hard state: refused too.
        fs::write(&path, &whole).unwrap();
        let (mut st, _) = RaftStorage::open(&d).unwrap();
        st.save_hard_state(HardState {
            term: 7,
            vote: None,
            commit: 2,
        })
        .unwrap();
        drop(st);
        let hs = d.join("raft-hard-state");
        let mut b = fs::read(&hs).unwrap();
        b[HARD_MAGIC.len() + 7] ^= 1;
        fs::write(&hs, &b).unwrap();
        assert!(RaftStorage::open(&d).is_err());
        fs::remove_dir_all(&d).unwrap();
    }
}
